//! The CMOS RAM and real-time clock (MC146818) at ports 0x70-0x71: the
//! time the firmware and the OS read at boot (the host's UTC), and the
//! memory sizes PC firmware reads from their fixed CMOS bytes.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;

/// The index port; data is at +1.
pub const PORT: u16 = 0x70;

mod reg {
    pub const SECONDS: u8 = 0x00;
    pub const MINUTES: u8 = 0x02;
    pub const HOURS: u8 = 0x04;
    pub const WEEKDAY: u8 = 0x06;
    pub const DAY: u8 = 0x07;
    pub const MONTH: u8 = 0x08;
    pub const YEAR: u8 = 0x09;
    pub const A: u8 = 0x0a;
    pub const B: u8 = 0x0b;
    pub const C: u8 = 0x0c;
    pub const D: u8 = 0x0d;
    pub const CENTURY: u8 = 0x32;
}

/// Register B: 24-hour clock.
const B_24H: u8 = 0x02;
/// Register B: binary, not BCD.
const B_BINARY: u8 = 0x04;

/// The CMOS.
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    /// What the guest set the clock to, as seconds added to the host's.
    offset_secs: i64,
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// (year, month, day) to days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl Cmos {
    /// A CMOS for `below_4g` bytes of RAM under 4 GiB, `above_4g` over it,
    /// and `vcpus` CPUs.
    pub fn new(below_4g: u64, above_4g: u64, vcpus: u8) -> Self {
        let mut ram = [0u8; 128];
        ram[reg::A as usize] = 0x26;
        ram[reg::B as usize] = B_24H;
        ram[reg::D as usize] = 0x80;
        // Base memory: 640 KiB.
        ram[0x15] = 0x80;
        ram[0x16] = 0x02;
        // Extended memory in KiB between 1 MiB and 64 MiB.
        let ext_kib = (below_4g.saturating_sub(1 << 20) >> 10).min(0xfc00) as u16;
        ram[0x17..0x19].copy_from_slice(&ext_kib.to_le_bytes());
        ram[0x30..0x32].copy_from_slice(&ext_kib.to_le_bytes());
        // Memory above 16 MiB in 64 KiB units.
        let above_16m = (below_4g.saturating_sub(16 << 20) >> 16).min(0xffff) as u16;
        ram[0x34..0x36].copy_from_slice(&above_16m.to_le_bytes());
        // Memory above 4 GiB in 64 KiB units (24 bits).
        let high = (above_4g >> 16).min(0xff_ffff) as u32;
        ram[0x5b..0x5e].copy_from_slice(&high.to_le_bytes()[..3]);
        ram[0x5f] = vcpus.saturating_sub(1);
        Cmos {
            index: 0,
            ram,
            offset_secs: 0,
        }
    }

    fn now(&self) -> i64 {
        let host = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        host + self.offset_secs
    }

    fn encode(&self, v: u32) -> u8 {
        if self.ram[reg::B as usize] & B_BINARY != 0 {
            v as u8
        } else {
            ((v / 10) << 4 | (v % 10)) as u8
        }
    }

    fn decode(&self, v: u8) -> u32 {
        if self.ram[reg::B as usize] & B_BINARY != 0 {
            u32::from(v)
        } else {
            u32::from(v >> 4) * 10 + u32::from(v & 0xf)
        }
    }

    /// The clock's registers at `t` seconds since the epoch.
    fn clock(&self, r: u8, t: i64) -> u8 {
        let days = t.div_euclid(86_400);
        let secs = t.rem_euclid(86_400) as u32;
        let (y, m, d) = civil_from_days(days);
        match r {
            reg::SECONDS => self.encode(secs % 60),
            reg::MINUTES => self.encode(secs / 60 % 60),
            reg::HOURS => {
                let h = secs / 3600;
                if self.ram[reg::B as usize] & B_24H != 0 {
                    self.encode(h)
                } else {
                    let h12 = if h % 12 == 0 { 12 } else { h % 12 };
                    self.encode(h12) | if h >= 12 { 0x80 } else { 0 }
                }
            }
            reg::WEEKDAY => self.encode(((days + 4).rem_euclid(7) + 1) as u32),
            reg::DAY => self.encode(d),
            reg::MONTH => self.encode(m),
            reg::YEAR => self.encode(y.rem_euclid(100) as u32),
            _ => self.encode(y.div_euclid(100) as u32),
        }
    }

    /// The guest sets one field of the clock: the offset from the host moves so
    /// that field reads back as written.
    fn set_clock(&mut self, r: u8, v: u8) {
        let t = self.now();
        let days = t.div_euclid(86_400);
        let secs = t.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        let v = self.decode(v & if r == reg::HOURS { 0x7f } else { 0xff }) as i64;
        let (mut y, mut m, mut d) = (y, m, d);
        let (mut h, mut min, mut s) = (secs / 3600, secs / 60 % 60, secs % 60);
        match r {
            reg::SECONDS => s = v.min(59),
            reg::MINUTES => min = v.min(59),
            reg::HOURS => h = v.min(23),
            reg::DAY => d = (v as u32).clamp(1, 31),
            reg::MONTH => m = (v as u32).clamp(1, 12),
            reg::YEAR => y = y.div_euclid(100) * 100 + v.min(99),
            reg::CENTURY => y = v.min(99) * 100 + y.rem_euclid(100),
            _ => return,
        }
        let target = days_from_civil(y, m, d) * 86_400 + h * 3600 + min * 60 + s;
        self.offset_secs += target - t;
    }
}

fn is_clock(r: u8) -> bool {
    matches!(
        r,
        reg::SECONDS
            | reg::MINUTES
            | reg::HOURS
            | reg::WEEKDAY
            | reg::DAY
            | reg::MONTH
            | reg::YEAR
            | reg::CENTURY
    )
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if offset != 1 || data.len() != 1 {
            return;
        }
        let r = self.index;
        data[0] = match r {
            _ if is_clock(r) => self.clock(r, self.now()),
            // Never "update in progress": every read sees a whole second.
            reg::A => self.ram[reg::A as usize] & 0x7f,
            reg::C => 0,
            _ => self.ram[usize::from(r)],
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        match offset {
            // Bit 7 is the NMI mask, not part of the index.
            0 => self.index = data[0] & 0x7f,
            1 => {
                let r = self.index;
                match r {
                    _ if is_clock(r) && r != reg::WEEKDAY => self.set_clock(r, data[0]),
                    reg::C | reg::D | reg::WEEKDAY => {}
                    _ => self.ram[usize::from(r)] = data[0],
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(c: &mut Cmos, r: u8) -> u8 {
        c.write(0, &[r | 0x80]);
        let mut b = [0u8];
        c.read(1, &mut b);
        b[0]
    }

    #[test]
    fn calendar_round_trips() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_427), (2025, 12, 5));
        for d in [-1000, 0, 59, 60, 11_016, 20_454, 40_000] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
    }

    #[test]
    fn clock_in_bcd_and_binary_and_memory_sizes() {
        let mut c = Cmos::new(0xc000_0000, 1 << 30, 4);
        let t = c.now();
        let bcd = rd(&mut c, reg::YEAR);
        let (y, _, _) = civil_from_days(t.div_euclid(86_400));
        assert_eq!(bcd, c.encode((y % 100) as u32));
        assert_eq!(rd(&mut c, reg::CENTURY), 0x20);
        c.write(0, &[reg::B]);
        c.write(1, &[B_24H | B_BINARY]);
        assert_eq!(rd(&mut c, reg::CENTURY), 20);
        assert_eq!(rd(&mut c, 0x34), 0x00);
        assert_eq!(rd(&mut c, 0x35), 0xbf);
        assert_eq!(rd(&mut c, 0x5c), 0x40);
        assert_eq!(rd(&mut c, 0x5f), 3);
        assert_eq!(rd(&mut c, reg::A) & 0x80, 0);
        // The guest sets the year: it reads back, the other fields move on.
        c.write(0, &[reg::YEAR]);
        c.write(1, &[99]);
        assert_eq!(rd(&mut c, reg::YEAR), 99);
        assert_eq!(rd(&mut c, reg::CENTURY), 20);
        // 12-hour BCD mode sets the PM bit past noon.
        c.write(0, &[reg::B]);
        c.write(1, &[0]);
        let h = rd(&mut c, reg::HOURS);
        assert!(h & 0x7f >= 1 && h & 0x7f <= 0x12, "{h:#x}");
    }
}
