//! Kernel-style command line: storage, `key=value` lookup and the number
//! formats Linux accepts (`memparse`, `%lli`).

use crate::io::{rd8, Global};

/// Longest command line we keep (Linux x86 allows 2048; be generous).
const MAX: usize = 4096;

struct Store {
    buf: [u8; MAX],
    len: usize,
}

static CMDLINE: Global<Store> = Global::new(Store { buf: [0; MAX], len: 0 });

/// Copies the NUL-terminated command line at physical `addr` (0 = none).
/// Non-ASCII bytes become '?' so the text is always valid UTF-8 and safe to
/// echo on the serial line.
pub fn load(addr: u64) {
    let s = CMDLINE.get();
    s.len = 0;
    if addr == 0 || addr >= 0x1_0000_0000 - MAX as u64 {
        return;
    }
    while s.len < MAX {
        let b = rd8(addr + s.len as u64);
        if b == 0 {
            break;
        }
        s.buf[s.len] = if b.is_ascii() && (b >= 0x20 || b == b'\t' || b == b'\n') { b } else { b'?' };
        s.len += 1;
    }
}

/// The whole command line.
pub fn text() -> &'static str {
    let s = CMDLINE.get();
    // Only ASCII was stored (see `load`).
    core::str::from_utf8(&s.buf[..s.len]).unwrap_or("")
}

/// Space-separated words, like the kernel's parser (no quoting needed here).
pub fn words() -> impl Iterator<Item = &'static str> {
    text().split(|c: char| c == ' ' || c == '\t' || c == '\n').filter(|w| !w.is_empty())
}

/// The value of the last `key=value` word (later words override earlier
/// ones, so a harness can append to a default command line).
pub fn get(key: &str) -> Option<&'static str> {
    let mut found = None;
    for w in words() {
        if let Some(v) = w.strip_prefix(key).and_then(|r| r.strip_prefix('=')) {
            found = Some(v);
        }
    }
    found
}

/// A numeric option (`memparse` syntax: decimal, 0x hex, 0 octal, K/M/G
/// suffixes). A malformed value prints FAIL and yields `default`.
pub fn num(key: &str, default: u64) -> u64 {
    match get(key) {
        None => default,
        Some(v) => match memparse(v) {
            Some((n, "")) => n,
            _ => {
                crate::fail!("cmdline {}={} bad-number", key, v);
                default
            }
        },
    }
}

/// Like C `strtoull(s, &end, 0)`: returns the value and the unparsed rest,
/// or None if no digit was found.
pub fn strtoull(s: &str) -> Option<(u64, &str)> {
    let b = s.as_bytes();
    let (radix, start) = if b.len() > 2 && b[0] == b'0' && (b[1] | 0x20) == b'x' && (b[2] as char).is_ascii_hexdigit() {
        (16, 2)
    } else if b.len() > 1 && b[0] == b'0' {
        (8, 1)
    } else {
        (10, 0)
    };
    let mut v: u64 = 0;
    let mut i = start;
    while i < b.len() {
        let d = match (b[i] as char).to_digit(radix) {
            Some(d) => d as u64,
            None => break,
        };
        v = v.wrapping_mul(radix as u64).wrapping_add(d);
        i += 1;
    }
    if i == 0 {
        return None;
    }
    Some((v, &s[i..]))
}

/// Linux `memparse`: a number with an optional K/M/G/T/P/E suffix.
pub fn memparse(s: &str) -> Option<(u64, &str)> {
    let (mut v, rest) = strtoull(s)?;
    let shift = match rest.as_bytes().first().map(|c| c | 0x20) {
        Some(b'k') => 10,
        Some(b'm') => 20,
        Some(b'g') => 30,
        Some(b't') => 40,
        Some(b'p') => 50,
        Some(b'e') => 60,
        _ => return Some((v, rest)),
    };
    v <<= shift;
    Some((v, &rest[1..]))
}

/// One `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` entry.
#[derive(Clone, Copy)]
pub struct MmioDesc {
    /// Size of the register window.
    pub size: u64,
    /// Physical base address of the transport.
    pub base: u64,
    /// Interrupt line (unused: we poll).
    pub irq: u32,
}

/// Parses the value of `virtio_mmio.device=` the way Linux's
/// `vm_cmdline_set` does: `memparse` size, then `@%lli:%u[:%d]` with nothing
/// after it.
pub fn parse_virtio_mmio(v: &str) -> Option<MmioDesc> {
    let (size, rest) = memparse(v)?;
    let rest = rest.strip_prefix('@')?;
    let (base, rest) = strtoull(rest)?;
    let rest = rest.strip_prefix(':')?;
    let (irq, rest) = strtoull_dec(rest)?;
    let rest = match rest.strip_prefix(':') {
        Some(r) => {
            let r = r.strip_prefix('-').unwrap_or(r);
            strtoull_dec(r)?.1
        }
        None => rest,
    };
    if size == 0 || !rest.is_empty() || irq > u32::MAX as u64 {
        return None;
    }
    Some(MmioDesc { size, base, irq: irq as u32 })
}

fn strtoull_dec(s: &str) -> Option<(u64, &str)> {
    let n = s.bytes().take_while(|c| c.is_ascii_digit()).count();
    if n == 0 {
        return None;
    }
    let mut v = 0u64;
    for c in s[..n].bytes() {
        v = v.wrapping_mul(10).wrapping_add((c - b'0') as u64);
    }
    Some((v, &s[n..]))
}

/// Parses a dotted IPv4 address.
pub fn parse_ipv4(s: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = s.split('.');
    for o in out.iter_mut() {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let v: u32 = p.parse().ok()?;
        if v > 255 {
            return None;
        }
        *o = v as u8;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(out)
}
