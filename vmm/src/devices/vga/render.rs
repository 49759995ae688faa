//! Turns the VGA's current mode into an XRGB8888 picture: DISPI (VBE)
//! linear modes at 8 (palette), 15, 16, 24 and 32 bits a pixel; the VGA's
//! text modes, drawn with the font the VGA BIOS loaded into plane 2 (with
//! blink and the cursor); the 256-colour (mode 13h) and 16-colour planar
//! graphics modes.

use super::{dispi, VgaState, VRAM_SIZE};

/// Largest picture drawn.
const MAX_PIXELS: usize = (super::MAX_XRES as usize) * (super::MAX_YRES as usize);

/// Bytes the current DISPI mode's visible frame spans in VRAM.
pub fn dispi_frame_bytes(s: &VgaState) -> usize {
    let bpp = usize::from(s.dispi[dispi::BPP]).div_ceil(8).max(1);
    usize::from(s.dispi[dispi::VIRT_WIDTH].max(s.dispi[dispi::XRES]))
        * usize::from(s.dispi[dispi::VIRT_HEIGHT].max(s.dispi[dispi::YRES]))
        * bpp
}

/// 6-bit DAC entry to XRGB.
fn dac_rgb(s: &VgaState, i: u8) -> u32 {
    let [r, g, b] = s.dac[usize::from(i)];
    let e = |c: u8| u32::from(c << 2 | c >> 4);
    e(r) << 16 | e(g) << 8 | e(b)
}

/// A 16-colour index through the attribute controller's palette to XRGB.
fn attr_rgb(s: &VgaState, index: u8) -> u32 {
    let mut v = s.attr[usize::from(index & 0xf)] & 0x3f;
    if s.attr[0x10] & 0x80 != 0 {
        v = (v & 0xf) | (s.attr[0x14] & 0x3) << 4;
    }
    v |= (s.attr[0x14] & 0xc) << 4;
    dac_rgb(s, v)
}

/// Vertical display end, in scan lines.
fn display_lines(s: &VgaState) -> u32 {
    let c = &s.crtc;
    u32::from(c[0x12]) | u32::from(c[7] & 0x02) << 7 | u32::from(c[7] & 0x40) << 3
}

/// Draws the current mode into `out` (resized to fit); returns its width
/// and height. `blink` is the phase of blinking text and the cursor.
pub fn render(s: &VgaState, blink: bool, out: &mut Vec<u32>) -> (u32, u32) {
    let (w, h) = if s.dispi_enabled() {
        render_dispi(s, out)
    } else if s.attr[0x10] & 1 == 0 {
        render_text(s, blink, out)
    } else if s.gc[5] & 0x40 != 0 {
        render_256(s, out)
    } else {
        render_planar(s, out)
    };
    if w == 0 || h == 0 {
        // Nothing programmed yet (before the VGA BIOS runs): a black screen.
        out.clear();
        out.resize(640 * 480, 0);
        return (640, 480);
    }
    (w, h)
}

fn start(out: &mut Vec<u32>, w: u32, h: u32) -> bool {
    let n = w as usize * h as usize;
    if n == 0 || n > MAX_PIXELS {
        return false;
    }
    out.clear();
    out.resize(n, 0);
    true
}

fn render_dispi(s: &VgaState, out: &mut Vec<u32>) -> (u32, u32) {
    let (w, h) = (
        u32::from(s.dispi[dispi::XRES]),
        u32::from(s.dispi[dispi::YRES]),
    );
    let bpp = s.dispi[dispi::BPP];
    if !start(out, w, h) {
        return (0, 0);
    }
    let bytes = usize::from(bpp).div_ceil(8);
    let stride = usize::from(s.dispi[dispi::VIRT_WIDTH].max(s.dispi[dispi::XRES])) * bytes;
    let (xo, yo) = (
        usize::from(s.dispi[dispi::X_OFFSET]),
        usize::from(s.dispi[dispi::Y_OFFSET]),
    );
    // SAFETY: the mapping is VRAM_SIZE bytes and lives as long as `s`;
    // reads race with the guest's writes, which can only tear a pixel.
    let vram = unsafe { std::slice::from_raw_parts(s.vram.as_ptr(), VRAM_SIZE) };
    for y in 0..h as usize {
        let line = (y + yo) * stride + xo * bytes;
        for x in 0..w as usize {
            let at = line + x * bytes;
            let Some(p) = vram.get(at..at + bytes) else {
                return (w, h);
            };
            out[y * w as usize + x] = match bpp {
                32 => u32::from_le_bytes([p[0], p[1], p[2], 0]),
                24 => u32::from_le_bytes([p[0], p[1], p[2], 0]),
                16 => {
                    let v = u32::from(u16::from_le_bytes([p[0], p[1]]));
                    let (r, g, b) = (v >> 11, (v >> 5) & 0x3f, v & 0x1f);
                    (r << 3 | r >> 2) << 16 | (g << 2 | g >> 4) << 8 | (b << 3 | b >> 2)
                }
                15 => {
                    let v = u32::from(u16::from_le_bytes([p[0], p[1]]));
                    let (r, g, b) = ((v >> 10) & 0x1f, (v >> 5) & 0x1f, v & 0x1f);
                    (r << 3 | r >> 2) << 16 | (g << 3 | g >> 2) << 8 | (b << 3 | b >> 2)
                }
                _ => dac_rgb(s, p[0]),
            };
        }
    }
    (w, h)
}

fn render_text(s: &VgaState, blink: bool, out: &mut Vec<u32>) -> (u32, u32) {
    let c = &s.crtc;
    let cols = u32::from(c[1]) + 1;
    let char_h = u32::from(c[9] & 0x1f) + 1;
    let rows = (display_lines(s) + 1) / char_h;
    let char_w = if s.seq[1] & 1 != 0 { 8 } else { 9 };
    if c[1] == 0 || rows == 0 {
        return (0, 0);
    }
    let (w, h) = (cols * char_w, rows * char_h);
    if !start(out, w, h) {
        return (0, 0);
    }
    let origin = usize::from(c[0xc]) << 8 | usize::from(c[0xd]);
    // The offset register counts words; a text cell is one word.
    let stride = if c[0x13] == 0 {
        cols as usize
    } else {
        usize::from(c[0x13])
    };
    let cursor = usize::from(c[0xe]) << 8 | usize::from(c[0xf]);
    let cursor_on = c[0xa] & 0x20 == 0 && blink;
    let (cur_start, cur_end) = (u32::from(c[0xa] & 0x1f), u32::from(c[0xb] & 0x1f));
    let blink_attr = s.attr[0x10] & 0x08 != 0;
    let line_graphics = s.attr[0x10] & 0x04 != 0;
    // Character map select: font A for attribute bit 3 set, B for clear;
    // map m starts at (m & 3) * 16 KiB + (m >> 2) * 8 KiB of plane 2.
    let map = |m: u8| usize::from(m & 3) * 0x4000 + usize::from(m >> 2) * 0x2000;
    let font_b = map((s.seq[3] & 0x3) | (s.seq[3] >> 2) & 0x4);
    let font_a = map((s.seq[3] >> 2) & 0x3 | (s.seq[3] >> 3) & 0x4);
    for row in 0..rows as usize {
        for col in 0..cols as usize {
            let cell = origin + row * stride + col;
            let o = (cell * 2) & 0xffff;
            let ch = usize::from(s.planes[o * 4]);
            let attr = s.planes[o * 4 + 1];
            let mut fg = attr & 0xf;
            let mut bg = attr >> 4;
            if blink_attr {
                bg &= 7;
                if attr & 0x80 != 0 && !blink {
                    fg = bg;
                }
            }
            let (fg, bg) = (attr_rgb(s, fg), attr_rgb(s, bg));
            let font = if attr & 0x08 != 0 { font_a } else { font_b };
            for gy in 0..char_h {
                let glyph_at = (font + ch * 32 + gy as usize) & 0xffff;
                let bits = s.planes[glyph_at * 4 + 2];
                let under_cursor =
                    cursor_on && cell == cursor && gy >= cur_start && gy <= cur_end.max(cur_start);
                let y = row * char_h as usize + gy as usize;
                for gx in 0..char_w {
                    let on = if gx < 8 {
                        bits & (0x80 >> gx) != 0
                    } else {
                        line_graphics && (0xc0..=0xdf).contains(&ch) && bits & 1 != 0
                    };
                    let x = col * char_w as usize + gx as usize;
                    out[y * w as usize + x] = if on ^ under_cursor { fg } else { bg };
                }
            }
        }
    }
    (w, h)
}

/// Lines of one screen row, with double scanning.
fn scan_div(s: &VgaState) -> u32 {
    let c = &s.crtc;
    (u32::from(c[9] & 0x1f) + 1) * if c[9] & 0x80 != 0 { 2 } else { 1 }
}

fn render_256(s: &VgaState, out: &mut Vec<u32>) -> (u32, u32) {
    let c = &s.crtc;
    let w = (u32::from(c[1]) + 1) * 4;
    let h = (display_lines(s) + 1) / scan_div(s);
    if !start(out, w, h) {
        return (0, 0);
    }
    let origin = (usize::from(c[0xc]) << 8 | usize::from(c[0xd])) * 4;
    let stride = usize::from(c[0x13]) * 8;
    for y in 0..h as usize {
        for x in 0..w as usize {
            let at = (origin + y * stride + x) % s.planes.len();
            out[y * w as usize + x] = dac_rgb(s, s.planes[at]);
        }
    }
    (w, h)
}

fn render_planar(s: &VgaState, out: &mut Vec<u32>) -> (u32, u32) {
    let c = &s.crtc;
    let w = (u32::from(c[1]) + 1) * 8;
    let h = (display_lines(s) + 1) / scan_div(s);
    if !start(out, w, h) {
        return (0, 0);
    }
    let origin = usize::from(c[0xc]) << 8 | usize::from(c[0xd]);
    let stride = usize::from(c[0x13]) * 2;
    let enable = s.attr[0x12] & 0xf;
    for y in 0..h as usize {
        for x in 0..w as usize {
            let o = (origin + y * stride + x / 8) & 0xffff;
            let bit = 7 - (x % 8);
            let mut index = 0u8;
            for p in 0..4 {
                index |= ((s.planes[o * 4 + p] >> bit) & 1) << p;
            }
            out[y * w as usize + x] = attr_rgb(s, index & enable);
        }
    }
    (w, h)
}
