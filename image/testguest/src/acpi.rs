//! Just enough ACPI for the `poweroff` and `reboot` ends: RSDP -> XSDT/RSDT
//! -> FADT, its sleep-control / PM1a / reset registers.

use crate::io::{inw, outb, outl, outw, peek32, peek64, rd8, wr16, wr32, wr64, wr8};
use core::fmt;

/// Why an ACPI end could not be attempted.
#[derive(Clone, Copy)]
pub enum Error {
    /// No valid RSDP at the given address or in the BIOS areas.
    NoRsdp,
    /// The XSDT/RSDT is missing or has a bad signature/checksum.
    BadRoot,
    /// No FADT ("FACP") with a valid checksum.
    NoFadt,
    /// The FADT has neither SLEEP_CONTROL_REG nor PM1a_CNT_BLK.
    NoSleepReg,
    /// Reset register not supported.
    NoResetReg,
    /// A register is in an address space we cannot write.
    BadSpace(u8),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match *self {
            Error::NoRsdp => write!(f, "no-rsdp"),
            Error::BadRoot => write!(f, "bad-xsdt-rsdt"),
            Error::NoFadt => write!(f, "no-fadt"),
            Error::NoSleepReg => write!(f, "no-sleep-register"),
            Error::NoResetReg => write!(f, "no-reset-register"),
            Error::BadSpace(s) => write!(f, "unsupported-address-space {}", s),
        }
    }
}

/// Everything we map is below 4 GiB.
fn in_map(addr: u64, len: u64) -> bool {
    addr != 0 && addr < 0x1_0000_0000 && len <= 0x1_0000_0000 - addr
}

fn sum(addr: u64, len: u64) -> u8 {
    (0..len).fold(0u8, |s, i| s.wrapping_add(rd8(addr + i)))
}

fn sig(addr: u64, s: &[u8; 4]) -> bool {
    (0..4).all(|i| rd8(addr + i as u64) == s[i])
}

fn rsdp_valid(a: u64) -> bool {
    if !in_map(a, 36) || !(0..8).all(|i| rd8(a + i) == b"RSD PTR "[i as usize]) || sum(a, 20) != 0 {
        return false;
    }
    if rd8(a + 15) >= 2 {
        let len = peek32(a + 20) as u64;
        return len >= 36 && in_map(a, len) && sum(a, len) == 0;
    }
    true
}

/// Validates `hint` as an RSDP, else scans the EBDA and 0xE0000-0xFFFFF
/// like a PC OS does (the boot protocol field may be 0).
fn find_rsdp(hint: u64) -> Option<u64> {
    if hint != 0 {
        return rsdp_valid(hint).then_some(hint);
    }
    let ebda = (crate::io::rd16(0x40e) as u64) << 4;
    let areas = [(ebda, 1024u64), (0xE0000, 0x20000)];
    for (start, len) in areas {
        if start == 0 {
            continue;
        }
        let mut a = start;
        while a < start + len {
            if rsdp_valid(a) {
                return Some(a);
            }
            a += 16;
        }
    }
    None
}

fn table_valid(a: u64, s: &[u8; 4]) -> Option<u64> {
    if !in_map(a, 36) || !sig(a, s) {
        return None;
    }
    let len = peek32(a + 4) as u64;
    (len >= 36 && in_map(a, len) && sum(a, len) == 0).then_some(len)
}

/// A Generic Address Structure.
#[derive(Clone, Copy)]
struct Gas {
    space: u8,
    width: u8,
    access: u8,
    addr: u64,
}

impl Gas {
    fn read(a: u64) -> Gas {
        Gas { space: rd8(a), width: rd8(a + 1), access: rd8(a + 3), addr: peek64(a + 4) }
    }

    /// Access width in bytes (bit width, else access size, else `dflt`).
    fn bytes(&self, dflt: u8) -> u8 {
        match (self.width, self.access) {
            (8, _) | (_, 1) => 1,
            (16, _) | (_, 2) => 2,
            (32, _) | (_, 3) => 4,
            (64, _) | (_, 4) => 8,
            _ => dflt,
        }
    }

    fn write(&self, v: u64, dflt: u8) -> Result<(), Error> {
        let n = self.bytes(dflt);
        match self.space {
            0 if in_map(self.addr, n as u64) => match n {
                1 => wr8(self.addr, v as u8),
                2 => wr16(self.addr, v as u16),
                4 => wr32(self.addr, v as u32),
                _ => wr64(self.addr, v),
            },
            1 if self.addr <= 0xffff => {
                let p = self.addr as u16;
                match n {
                    1 => outb(p, v as u8),
                    2 => outw(p, v as u16),
                    _ => outl(p, v as u32),
                }
            }
            s => return Err(Error::BadSpace(s)),
        }
        Ok(())
    }
}

/// The FADT and its length.
struct Fadt {
    a: u64,
    len: u64,
}

impl Fadt {
    fn has(&self, off: u64, n: u64) -> bool {
        self.len >= off + n
    }

    fn gas(&self, off: u64) -> Option<Gas> {
        if !self.has(off, 12) {
            return None;
        }
        let g = Gas::read(self.a + off);
        (g.addr != 0).then_some(g)
    }

    fn flags(&self) -> u32 {
        if self.has(112, 4) {
            peek32(self.a + 112)
        } else {
            0
        }
    }
}

fn find_fadt(rsdp_hint: u64) -> Result<Fadt, Error> {
    let rsdp = find_rsdp(rsdp_hint).ok_or(Error::NoRsdp)?;
    let xsdt = if rd8(rsdp + 15) >= 2 { peek64(rsdp + 24) } else { 0 };
    let (root, esize, rlen) = if let Some(l) = (xsdt != 0).then(|| table_valid(xsdt, b"XSDT")).flatten() {
        (xsdt, 8, l)
    } else {
        let rsdt = peek32(rsdp + 16) as u64;
        let l = table_valid(rsdt, b"RSDT").ok_or(Error::BadRoot)?;
        (rsdt, 4, l)
    };
    let n = (rlen - 36) / esize;
    for i in 0..n {
        let e = root + 36 + i * esize;
        let t = if esize == 8 { peek64(e) } else { peek32(e) as u64 };
        if let Some(len) = table_valid(t, b"FACP") {
            return Ok(Fadt { a: t, len });
        }
    }
    Err(Error::NoFadt)
}

/// SLP_TYP for S5 from the DSDT's `\_S5_` package (first element), for the
/// PM1a path only. Pattern-matched, not interpreted: `NameOp "_S5_"
/// PackageOp PkgLength NumElements <element>`.
fn dsdt_s5(f: &Fadt) -> Option<u8> {
    let x = if f.has(148, 8) { peek64(f.a + 140) } else { 0 };
    let d = if x != 0 { x } else { peek32(f.a + 40) as u64 };
    let len = table_valid(d, b"DSDT")?;
    let mut i = 36;
    while i + 8 < len {
        if sig(d + i, b"_S5_") && rd8(d + i + 4) == 0x12 {
            let lead = rd8(d + i + 5);
            let p = d + i + 5 + 1 + (lead >> 6) as u64 + 1; // skip PkgLength, NumElements
            return match rd8(p) {
                0x0a => Some(rd8(p + 1) & 7), // BytePrefix
                0x00 => Some(0),              // ZeroOp
                0x01 => Some(1),              // OneOp
                _ => None,
            };
        }
        i += 1;
    }
    None
}

/// Enters S5. Hardware-reduced SLEEP_CONTROL_REG gets (5 << 2) | SLP_EN
/// (0x34); otherwise PM1a_CNT gets SLP_TYP << 10 | SLP_EN with SLP_TYP from
/// the DSDT's `\_S5_` (5 if absent, which is what EnSpeed uses).
/// Returns only if the write could not be attempted.
pub fn poweroff(rsdp_hint: u64) -> Result<(), Error> {
    let f = find_fadt(rsdp_hint)?;
    if let Some(g) = f.gas(244) {
        return g.write(0x34, 1);
    }
    let typ = dsdt_s5(&f).unwrap_or(5) as u16;
    let val = |old: u16| (old & !(7 << 10 | 1 << 13)) | typ << 10 | 1 << 13;
    if let Some(g) = f.gas(172) {
        let old = if g.space == 1 && g.addr <= 0xffff { inw(g.addr as u16) } else { 0 };
        return g.write(val(old) as u64, 2);
    }
    let port = if f.has(64, 4) { peek32(f.a + 64) } else { 0 };
    if port == 0 || port > 0xffff {
        return Err(Error::NoSleepReg);
    }
    outw(port as u16, val(inw(port as u16)));
    Ok(())
}

/// Writes RESET_VALUE to the FADT's RESET_REG if RESET_REG_SUP is set.
pub fn reset(rsdp_hint: u64) -> Result<(), Error> {
    let f = find_fadt(rsdp_hint)?;
    const RESET_REG_SUP: u32 = 1 << 10;
    if f.flags() & RESET_REG_SUP == 0 || !f.has(128, 1) {
        return Err(Error::NoResetReg);
    }
    let g = f.gas(116).ok_or(Error::NoResetReg)?;
    g.write(rd8(f.a + 128) as u64, 1)
}
