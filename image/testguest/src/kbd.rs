//! i8042 keyboard controller: the `kbd` and `keys` actions and the
//! `kbd-reset` end.

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
    let mut keys = Keys::new();
    // Bits: 0 ctrl, 1 alt, 2 del made; 3 ctrl, 4 alt, 5 del released.
    let mut seen = 0u8;
    say!("kbd waiting");
    let mut polls = 0u64;
    // After the three makes, allow a short extra wait for the releases.
    while polls < limit && !dl.expired() && !release_dl.as_ref().is_some_and(|d| d.expired()) && seen & 0x3f != 0x3f {
        polls += 1;
        let Some((e0, b)) = keys.poll() else { continue };
        seen |= match (e0, b) {
            (false, 0x1d) => 1,
            (false, 0x38) => 2,
            (true, 0x53) => 4,
            (false, 0x9d) => 8,
            (false, 0xb8) => 16,
            (true, 0xd3) => 32,
            _ => 0,
        };
        if seen & 7 == 7 && release_dl.is_none() {
            release_dl = Some(crate::io::Deadline::after_ms(500));
        }
    }
    let list = heapless_hex(keys.raw());
    say!("kbd scancodes={}", list.as_str());
    if seen & 7 == 7 {
        say!("kbd ctrl-alt-del");
    } else {
        fail!("kbd timeout");
    }
}

/// Set 1 make codes of the character keys (US layout): unshifted and
/// shifted character, indexed by code from 0x00 to 0x39 (0 = not a
/// character key).
const CHARS: [(u8, u8); 0x3a] = {
    let mut t = [(0u8, 0u8); 0x3a];
    let rows: [(usize, &[u8], &[u8]); 4] = [
        (0x02, b"1234567890-=", b"!@#$%^&*()_+"),
        (0x10, b"qwertyuiop[]", b"QWERTYUIOP{}"),
        (0x1e, b"asdfghjkl;'`", b"ASDFGHJKL:\"~"),
        (0x2b, b"\\zxcvbnm,./", b"|ZXCVBNM<>?"),
    ];
    let mut r = 0;
    while r < rows.len() {
        let (start, plain, shifted) = rows[r];
        let mut i = 0;
        while i < plain.len() {
            t[start + i] = (plain[i], shifted[i]);
            i += 1;
        }
        r += 1;
    }
    t[0x39] = (b' ', b' ');
    t
};

/// Names of the other keys `keys` reports: (E0 prefix, set 1 make code, name).
const NAMES: &[(bool, u8, &str)] = &[
    (false, 0x01, "esc"),
    (false, 0x0e, "bs"),
    (false, 0x0f, "tab"),
    (false, 0x38, "alt"),
    (false, 0x3a, "caps"),
    (false, 0x3b, "f1"),
    (false, 0x3c, "f2"),
    (false, 0x3d, "f3"),
    (false, 0x3e, "f4"),
    (false, 0x3f, "f5"),
    (false, 0x40, "f6"),
    (false, 0x41, "f7"),
    (false, 0x42, "f8"),
    (false, 0x43, "f9"),
    (false, 0x44, "f10"),
    (false, 0x57, "f11"),
    (false, 0x58, "f12"),
    (true, 0x38, "altgr"),
    (true, 0x47, "home"),
    (true, 0x48, "up"),
    (true, 0x49, "pgup"),
    (true, 0x4b, "left"),
    (true, 0x4d, "right"),
    (true, 0x4f, "end"),
    (true, 0x50, "down"),
    (true, 0x51, "pgdn"),
    (true, 0x52, "ins"),
    (true, 0x53, "del"),
];

/// Text of a line being typed, in a fixed buffer (the rest is dropped).
struct Text {
    buf: [u8; 256],
    len: usize,
}

impl Text {
    fn push(&mut self, s: &[u8]) {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

/// Action `keys`: prints `tg: keys waiting`, then decodes what the
/// keyboard sends (translated set 1, US layout) into a line of text until
/// Enter: characters as typed (Shift applied, Ctrl+letter as `^X`), other
/// keys as `<name>` (`<esc>`, `<bs>`, `<tab>`, `<alt>`, `<f1>`..`<f12>`,
/// `<up>`, `<del>`, ...; unknown ones `<e0xx>`/`<xx>`), Shift and Ctrl
/// themselves as nothing. At Enter: `tg: keys scancodes=<hex,...> line=<text>`
/// (the raw bytes of the line, up to 64, Enter's make included). Repeats
/// for `tg.keylines` lines (1), within `tg.kbdms` ms (60000) in all, else
/// `tg: FAIL keys timeout ...`.
pub fn act_keys() {
    let lines = cmdline::num("tg.keylines", 1);
    let dl = crate::io::Deadline::after_ms(cmdline::num("tg.kbdms", 60_000));
    let mut keys = Keys::new();
    let mut text = Text { buf: [0; 256], len: 0 };
    let (mut lshift, mut rshift, mut ctrl) = (false, false, false);
    let mut done = 0;
    say!("keys waiting");
    while done < lines && !dl.expired() {
        let Some((ext, b)) = keys.poll() else { continue };
        let (code, make) = (b & 0x7f, b & 0x80 == 0);
        match (ext, code) {
            (false, 0x2a) => lshift = make,
            (false, 0x36) => rshift = make,
            (_, 0x1d) => ctrl = make,
            _ if !make => {}
            (_, 0x1c) => {
                let list = heapless_hex(keys.raw());
                say!("keys scancodes={} line={}", list.as_str(), text.as_str());
                keys.n = 0;
                text.len = 0;
                done += 1;
            }
            (false, c) if usize::from(c) < CHARS.len() && CHARS[usize::from(c)].0 != 0 => {
                let (plain, shifted) = CHARS[usize::from(c)];
                if ctrl && plain.is_ascii_lowercase() {
                    text.push(&[b'^', plain.to_ascii_uppercase()]);
                } else {
                    text.push(&[if lshift || rshift { shifted } else { plain }]);
                }
            }
            (ext, c) => match NAMES.iter().find(|(e, k, _)| *e == ext && *k == c) {
                Some((_, _, name)) => {
                    text.push(b"<");
                    text.push(name.as_bytes());
                    text.push(b">");
                }
                None => {
                    const H: &[u8; 16] = b"0123456789abcdef";
                    text.push(if ext { b"<e0" } else { b"<" });
                    text.push(&[H[usize::from(c >> 4)], H[usize::from(c & 15)], b'>']);
                }
            },
        }
    }
    if done < lines {
        let list = heapless_hex(keys.raw());
        fail!("keys timeout scancodes={} line={}", list.as_str(), text.as_str());
    }
}

/// What the keyboard sends through the i8042, one poll at a time: mouse bytes skipped, the
/// raw bytes kept (the first 64), an E0 prefix folded into the code after it.
struct Keys {
    codes: [u8; 64],
    n: usize,
    e0: bool,
}

impl Keys {
    fn new() -> Keys {
        Keys { codes: [0; 64], n: 0, e0: false }
    }

    /// One look at the controller: the next key code, and whether E0 came before it.
    fn poll(&mut self) -> Option<(bool, u8)> {
        let st = inb(STATUS);
        if st & ST_OBF == 0 {
            core::hint::spin_loop();
            return None;
        }
        let b = inb(DATA);
        if st & ST_AUX != 0 {
            return None;
        }
        if self.n < self.codes.len() {
            self.codes[self.n] = b;
            self.n += 1;
        }
        if b == 0xe0 {
            self.e0 = true;
            return None;
        }
        Some((core::mem::replace(&mut self.e0, false), b))
    }

    /// The bytes kept so far.
    fn raw(&self) -> &[u8] {
        &self.codes[..self.n]
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
