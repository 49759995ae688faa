//! 16550 UART at I/O port 0x3f8 and the `tg: ` line protocol.

use crate::io::{inb, outb};
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

const COM1: u16 = 0x3f8;

/// Set once any `tg: FAIL` line has been printed; decides `done ok|fail`.
static FAILED: AtomicBool = AtomicBool::new(false);

/// Minimal UART init: 115200 8N1, FIFOs on, no interrupts.
pub fn init() {
    outb(COM1 + 1, 0x00); // IER: no interrupts
    outb(COM1 + 3, 0x80); // LCR: DLAB to set the divisor
    outb(COM1, 0x01); // divisor 1 = 115200 baud
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); // 8N1, DLAB off
    outb(COM1 + 2, 0xC7); // FIFO on, clear both, 14-byte threshold
    outb(COM1 + 4, 0x03); // DTR | RTS
}

/// Writes one byte, waiting (bounded, so a missing UART cannot hang us)
/// for the transmit holding register to be empty (LSR bit 5).
pub fn putb(b: u8) {
    let mut n = 0u32;
    while inb(COM1 + 5) & 0x20 == 0 && n < 1_000_000 {
        n += 1;
        core::hint::spin_loop();
    }
    outb(COM1, b);
}

struct Uart;

impl Write for Uart {
    /// Line breaks inside a message become spaces: every output line must
    /// start with `tg: ` (the newline is added by `say`/`fail` only).
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            putb(if b == b'\n' || b == b'\r' { b' ' } else { b });
        }
        Ok(())
    }
}

/// Prints one protocol line: `tg: <args>\n`.
pub fn say(args: fmt::Arguments) {
    let _ = Uart.write_str("tg: ");
    let _ = Uart.write_fmt(args);
    putb(b'\n');
}

/// Prints `tg: FAIL <args>` and remembers that the run failed.
pub fn fail(args: fmt::Arguments) {
    FAILED.store(true, Ordering::Relaxed);
    let _ = Uart.write_str("tg: FAIL ");
    let _ = Uart.write_fmt(args);
    putb(b'\n');
}

/// Whether any FAIL line was printed.
pub fn failed() -> bool {
    FAILED.load(Ordering::Relaxed)
}

/// Prints a protocol line (`tg: ` prefix and newline added).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => { $crate::serial::say(format_args!($($arg)*)) };
}

/// Prints a `tg: FAIL ...` line and marks the run as failed.
#[macro_export]
macro_rules! fail {
    ($($arg:tt)*) => { $crate::serial::fail(format_args!($($arg)*)) };
}

/// Formats bytes as text, replacing non-printable bytes with '?', so that
/// device-provided strings cannot break the line protocol.
pub struct Printable<'a>(pub &'a [u8]);

impl fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for &b in self.0 {
            let c = if (0x21..0x7f).contains(&b) || b == b' ' { b as char } else { '?' };
            f.write_char(c)?;
        }
        Ok(())
    }
}

/// Formats a MAC address as `aa:bb:cc:dd:ee:ff`.
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}
