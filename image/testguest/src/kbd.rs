//! i8042 keyboard controller: the `kbd` action and the `kbd-reset` end.

use crate::cmdline;
use crate::io::{inb, outb};
use crate::{fail, say};

const DATA: u16 = 0x60;
const STATUS: u16 = 0x64;
const ST_OBF: u8 = 1; // output buffer full: a byte to read at 0x60
const ST_IBF: u8 = 2; // input buffer full: controller busy
const ST_AUX: u8 = 0x20; // the byte is from the mouse port

/// Action `kbd`: polls the controller until Ctrl, Alt and (E0) Del have
/// been pressed (translated set 1 as a PC sees them), then briefly waits
/// for their releases. Bounded by `tg.kbdwait` poll loops and, since a
/// port read costs anything from nanoseconds (TCG) to many microseconds
/// (kvm-pvm), also by `tg.kbdms` milliseconds of TSC time (default 60 s).
pub fn act_kbd() {
    let limit = cmdline::num("tg.kbdwait", 200_000_000);
    let dl = crate::io::Deadline::after_ms(cmdline::num("tg.kbdms", 60_000));
    let mut release_dl: Option<crate::io::Deadline> = None;
    let mut codes = [0u8; 64];
    let mut n = 0;
    // Bits: 0 ctrl, 1 alt, 2 del made; 3 ctrl, 4 alt, 5 del released.
    let mut seen = 0u8;
    let mut e0 = false;
    say!("kbd waiting");
    let mut polls = 0u64;
    // After the three makes, allow a short extra wait for the releases.
    while polls < limit && !dl.expired() && !release_dl.as_ref().is_some_and(|d| d.expired()) && seen & 0x3f != 0x3f {
        polls += 1;
        let st = inb(STATUS);
        if st & ST_OBF == 0 {
            core::hint::spin_loop();
            continue;
        }
        let b = inb(DATA);
        if st & ST_AUX != 0 {
            continue;
        }
        if n < codes.len() {
            codes[n] = b;
            n += 1;
        }
        if b == 0xe0 {
            e0 = true;
            continue;
        }
        seen |= match (e0, b) {
            (false, 0x1d) => 1,
            (false, 0x38) => 2,
            (true, 0x53) => 4,
            (false, 0x9d) => 8,
            (false, 0xb8) => 16,
            (true, 0xd3) => 32,
            _ => 0,
        };
        e0 = false;
        if seen & 7 == 7 && release_dl.is_none() {
            release_dl = Some(crate::io::Deadline::after_ms(500));
        }
    }
    let list = heapless_hex(&codes[..n]);
    say!("kbd scancodes={}", list.as_str());
    if seen & 7 == 7 {
        say!("kbd ctrl-alt-del");
    } else {
        fail!("kbd timeout");
    }
}

/// Comma-separated hex bytes in a fixed buffer.
struct HexList {
    buf: [u8; 3 * 64],
    len: usize,
}

impl HexList {
    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

fn heapless_hex(bytes: &[u8]) -> HexList {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut l = HexList { buf: [0; 3 * 64], len: 0 };
    for (i, &b) in bytes.iter().enumerate() {
        if i > 0 {
            l.buf[l.len] = b',';
            l.len += 1;
        }
        l.buf[l.len] = H[(b >> 4) as usize];
        l.buf[l.len + 1] = H[(b & 15) as usize];
        l.len += 2;
    }
    l
}

/// Pulses the CPU reset line through the keyboard controller (command
/// 0xFE), as a PC kernel's `reboot=k` does.
pub fn reset() {
    for _ in 0..1_000_000 {
        if inb(STATUS) & ST_IBF == 0 {
            break;
        }
        core::hint::spin_loop();
    }
    outb(STATUS, 0xfe);
}
