//! 16550 UART at I/O port 0x3f8 and the `tg: ` line protocol.

use crate::io::{inb, out_bytes, outb, Global};
use crate::usermode;
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

const COM1: u16 = 0x3f8;

/// Set once any `tg: FAIL` line has been printed; decides `done ok|fail`.
static FAILED: AtomicBool = AtomicBool::new(false);

/// Bytes the transmitter takes once LSR shows it empty: the 16550A's
/// FIFO depth, or 1 without a FIFO.
static TX_BURST: Global<u8> = Global::new(1);
/// Bytes that may still be written before LSR must be polled again.
static TX_ROOM: Global<u8> = Global::new(0);

/// Minimal UART init: 115200 8N1, FIFOs on, no interrupts.
pub fn init() {
    outb(COM1 + 1, 0x00); // IER: no interrupts
    outb(COM1 + 3, 0x80); // LCR: DLAB to set the divisor
    outb(COM1, 0x01); // divisor 1 = 115200 baud
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); // 8N1, DLAB off
    outb(COM1 + 2, 0xC7); // FIFO on, clear both, 14-byte threshold
    outb(COM1 + 4, 0x03); // DTR | RTS
    // IIR bits 7:6 read 11 when the FIFOs are really on (16550A).
    *TX_BURST.get() = if inb(COM1 + 2) & 0xC0 == 0xC0 { 16 } else { 1 };
    *TX_ROOM.get() = 0;
}

/// Writes bytes to the UART. Every port access is a VM exit (about 10 us
/// under kvm-pvm), so LSR is polled (bounded, so a missing UART cannot
/// hang us) only once per FIFO load: when it shows the transmitter empty,
/// `TX_BURST` bytes may follow.
fn write_bytes(mut bytes: &[u8]) {
    let room = TX_ROOM.get();
    while !bytes.is_empty() {
        if *room == 0 {
            let mut n = 0u32;
            while inb(COM1 + 5) & 0x20 == 0 && n < 1_000_000 {
                n += 1;
                core::hint::spin_loop();
            }
            *room = *TX_BURST.get();
        }
        let n = bytes.len().min(*room as usize);
        out_bytes(COM1, &bytes[..n]);
        *room -= n as u8;
        bytes = &bytes[n..];
    }
}

/// Longest line formatted at CPL 3; longer ones are written as they are
/// formatted, at CPL 0.
const LINE_MAX: usize = 1024;

/// One protocol line being formatted (without its newline).
struct Line {
    buf: [u8; LINE_MAX + 1],
    len: usize,
    full: bool,
}

static LINE: Global<Line> = Global::new(Line { buf: [0; LINE_MAX + 1], len: 0, full: false });

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if self.len == LINE_MAX {
                self.full = true;
                return Err(fmt::Error);
            }
            self.buf[self.len] = one_line(b);
            self.len += 1;
        }
        Ok(())
    }
}

/// Writes straight to the UART as it is formatted.
struct Uart;

impl Write for Uart {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            write_bytes(&[one_line(b)]);
        }
        Ok(())
    }
}

/// Line breaks inside a message become spaces: every output line must
/// start with `tg: ` (the newline is added by `line` only).
fn one_line(b: u8) -> u8 {
    if b == b'\n' || b == b'\r' {
        b' '
    } else {
        b
    }
}

/// Prints `<prefix><args>\n`. core::fmt runs thousands of instructions per
/// line, each emulated at CPL 0 under kvm-pvm (see usermode.rs), so the
/// line is formatted at CPL 3 into a buffer first when it fits.
fn line(prefix: &str, args: fmt::Arguments) {
    let l = LINE.get();
    let fits = usermode::run(|| {
        l.len = 0;
        l.full = false;
        let _ = l.write_str(prefix).and_then(|()| l.write_fmt(args));
        !l.full
    });
    if fits {
        l.buf[l.len] = b'\n';
        write_bytes(&l.buf[..l.len + 1]);
    } else {
        let _ = Uart.write_str(prefix);
        let _ = Uart.write_fmt(args);
        write_bytes(b"\n");
    }
}

/// Prints one protocol line: `tg: <args>\n`.
pub fn say(args: fmt::Arguments) {
    line("tg: ", args);
}

/// Prints `tg: FAIL <args>` and remembers that the run failed.
pub fn fail(args: fmt::Arguments) {
    FAILED.store(true, Ordering::Relaxed);
    line("tg: FAIL ", args);
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

/// Action `flood`: writes `tg.floodkib` KiB (default 1024) of text to the serial port as fast
/// as it goes, then `tg: flood done bytes=N`: a guest that floods its console.
pub fn act_flood() {
    let total = crate::cmdline::num("tg.floodkib", 1024) * 1024;
    let line = b"flood: a guest writes its serial port as fast as it can, line after line.\n";
    let mut n = 0u64;
    while n < total {
        write_bytes(line);
        n += line.len() as u64;
    }
    say!("flood done bytes={}", n);
}

/// Action `echo`: reads lines typed on the serial port and prints each back as
/// `tg: echo LINE` (printable ASCII only, at most 64 bytes), until the line `bye` or
/// `tg.echoms` milliseconds (default 30 s) pass. Polls the UART: the guest has no interrupts.
pub fn act_echo() {
    let dl = crate::io::Deadline::after_ms(crate::cmdline::num("tg.echoms", 30_000));
    let mut line = [0u8; 64];
    let mut n = 0;
    say!("echo ready");
    while !dl.expired() {
        if inb(COM1 + 5) & 0x01 == 0 {
            core::hint::spin_loop();
            continue;
        }
        let b = inb(COM1);
        if b == b'\r' || b == b'\n' {
            if n == 0 {
                continue;
            }
            // Only printable ASCII was kept.
            let text = core::str::from_utf8(&line[..n]).unwrap_or("");
            say!("echo {}", text);
            if text == "bye" {
                return;
            }
            n = 0;
        } else if (0x20..0x7f).contains(&b) && n < line.len() {
            line[n] = b;
            n += 1;
        }
    }
    say!("echo timeout");
}
