//! The VGA programmed as a VGA BIOS and a driver program it.

use super::*;

fn vga() -> VgaPci {
    let dir = std::env::temp_dir().join(format!(
        "enspeed-vga-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let bios = dir.join("vgabios.bin");
    let mut rom = vec![0u8; 40 << 10];
    rom[0] = 0x55;
    rom[1] = 0xaa;
    std::fs::write(&bios, &rom).unwrap();
    let v = VgaPci::new(&bios, None, 9).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    v
}

/// 80x25 text with 9x16 cells, the standard palette's grey and black.
fn text_mode(s: &mut VgaState) {
    s.crtc[1] = 79;
    s.crtc[9] = 15;
    s.crtc[0x12] = 0x8f;
    s.crtc[7] = 0x1f & 0x02 | 0x10;
    s.crtc[0x13] = 40;
    s.crtc[0xa] = 0x20; // no cursor
    s.attr[0x10] = 0x0c;
    for i in 0..16 {
        s.attr[i] = i as u8;
    }
    s.dac[7] = [0x2a, 0x2a, 0x2a];
    s.dac[0] = [0, 0, 0];
}

#[test]
fn text_written_through_the_window_is_drawn_with_the_loaded_font() {
    let v = vga();
    let st = v.state();
    let mut s = lock(&st);
    // The BIOS loads a glyph into plane 2 the way vgabios does: plane 2 only,
    // sequential addressing, window at 0xA0000.
    s.write_port(0x3c4, 2);
    s.write_port(0x3c5, 0x04);
    s.write_port(0x3c4, 4);
    s.write_port(0x3c5, 0x07);
    s.write_port(0x3ce, 5);
    s.write_port(0x3cf, 0x00);
    s.write_port(0x3ce, 6);
    s.write_port(0x3cf, 0x04);
    s.write_port(0x3ce, 8);
    s.write_port(0x3cf, 0xff);
    for line in 0..16u64 {
        s.write_window(
            u64::from(b'A') * 32 + line,
            if line == 3 { 0xff } else { 0x81 },
        );
    }
    // Back to text: planes 0 and 1, odd/even, window at 0xB8000.
    s.write_port(0x3c4, 2);
    s.write_port(0x3c5, 0x03);
    s.write_port(0x3c4, 4);
    s.write_port(0x3c5, 0x02);
    s.write_port(0x3ce, 5);
    s.write_port(0x3cf, 0x10);
    s.write_port(0x3ce, 6);
    s.write_port(0x3cf, 0x0e);
    text_mode(&mut s);
    // 'A' in grey on black in the second cell of the first row.
    s.write_window(0x1_8000 + 2, b'A');
    s.write_window(0x1_8000 + 3, 0x07);
    assert_eq!(s.read_window(0x1_8000 + 2), b'A');
    let mut out = vec![];
    let (w, h) = render::render(&s, true, &mut out);
    assert_eq!((w, h), (720, 400));
    let grey = 0x00aa_aaaa;
    // Line 3 of the glyph is all on (8 pixels, the 9th column off); line 0 only its edges.
    let px = |x: usize, y: usize| out[y * 720 + x];
    assert_eq!((9..17).map(|x| px(x, 3)).collect::<Vec<_>>(), vec![grey; 8]);
    assert_eq!(px(17, 3), 0);
    assert_eq!(px(9, 0), grey);
    assert_eq!(px(10, 0), 0);
    assert_eq!(px(0, 3), 0, "the first cell is blank");
}

#[test]
fn dispi_modes_render_from_vram_and_report_their_capabilities() {
    let mut v = vga();
    let st = v.state();
    {
        let mut s = lock(&st);
        s.write_dispi(dispi::ENABLE, dispi::GETCAPS);
        assert_eq!(s.read_dispi(dispi::XRES), MAX_XRES);
        s.write_dispi(dispi::ENABLE, 0);
        s.write_dispi(dispi::XRES, 800);
        s.write_dispi(dispi::YRES, 600);
        s.write_dispi(dispi::BPP, 32);
        s.write_dispi(dispi::BPP, 7); // refused
        assert_eq!(s.read_dispi(dispi::BPP), 32);
        s.write_dispi(dispi::ENABLE, dispi::ENABLED | dispi::LFB_ENABLED);
        assert_eq!(s.read_dispi(dispi::VIRT_WIDTH), 800);
    }
    // The guest writes through BAR 0 (here the trapped path) and the banked window.
    v.write_bar(0, (10 * 800 + 5) * 4, &0x0012_3456u32.to_le_bytes());
    {
        let mut s = lock(&st);
        s.write_dispi(dispi::BANK, 1);
        s.write_window(4, 0x77);
    }
    let s = lock(&st);
    let mut out = vec![];
    assert_eq!(render::render(&s, true, &mut out), (800, 600));
    assert_eq!(out[10 * 800 + 5], 0x0012_3456);
    assert_eq!(out[0x1_0000 / 4 + 1] & 0xff, 0x77);
}

#[test]
fn the_rom_and_registers_answer_through_the_bars_and_junk_is_harmless() {
    let mut v = vga();
    let mut b = [0u8; 2];
    v.read_bar(ROM_BAR, 0, &mut b);
    assert_eq!(b, [0x55, 0xaa]);
    v.write_bar(2, 0x500 + 2 * dispi::XRES as u64, &1024u16.to_le_bytes());
    v.read_bar(2, 0x500 + 2 * dispi::XRES as u64, &mut b);
    assert_eq!(u16::from_le_bytes(b), 1024);
    let st = v.state();
    let mut s = lock(&st);
    for port in 0x3b0..0x3e0u16 {
        s.write_port(port, 0xff);
        let _ = s.read_port(port);
    }
    s.write_dispi(dispi::XRES, 60000);
    s.write_dispi(dispi::BANK, 60000);
    s.write_dispi(999, 1);
    for off in [0u64, 0x1ffff, 0x2_0000, u64::MAX] {
        s.write_window(off, 1);
        let _ = s.read_window(off);
    }
    let mut out = vec![];
    let (w, h) = render::render(&s, false, &mut out);
    assert!(w > 0 && h > 0 && out.len() == (w * h) as usize);
}
