//! The CMOS RAM and real-time clock (MC146818) at ports 0x70-0x71: the
//! time the firmware and the OS read at boot (the host's UTC), the memory
//! sizes PC firmware reads from their fixed CMOS bytes, and the periodic
//! interrupt (IRQ 8) at the rate the guest sets, which BIOS waits (int 15h
//! AH=86h) and some OSes count time with.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use vmm_sys_util::eventfd::EventFd;

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
/// Register B: periodic interrupt enabled.
const B_PIE: u8 = 0x40;
/// Register C: an interrupt is pending (IRQF) because of the periodic timer (PF).
const C_PERIODIC: u8 = 0xc0;
/// Register B: binary, not BCD.
const B_BINARY: u8 = 0x04;

/// The periodic interrupt: what the ticker thread and the registers share.
struct Periodic {
    /// Register A's rate (low 4 bits), and register B's PIE as bit 7.
    setting: AtomicU8,
    /// Register C's flags, set by the ticker, cleared when the guest reads C.
    flags: AtomicU8,
    stop: AtomicBool,
}

/// The period of rate `r` (register A's low 4 bits): 32768 Hz >> (r - 1), no
/// faster than the host can sleep (1 ms); 0 is off.
fn period(r: u8) -> Option<Duration> {
    let r = r & 0xf;
    if r == 0 {
        return None;
    }
    let hz = 32_768u64 >> (u64::from(r.max(3)) - 1);
    Some(Duration::from_micros((1_000_000 / hz).max(1000)))
}

/// The CMOS.
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    /// What the guest set the clock to, as seconds added to the host's.
    offset_secs: i64,
    periodic: Arc<Periodic>,
}

impl Drop for Cmos {
    fn drop(&mut self) {
        self.periodic.stop.store(true, Ordering::SeqCst);
    }
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

/// The CMOS as a live migration carries it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CmosSnapshot {
    /// The index register.
    pub index: u8,
    /// The 128 bytes of CMOS RAM.
    pub ram: Vec<u8>,
    /// The guest's clock, in seconds from the host's (both hosts keep UTC).
    pub offset_secs: i64,
    /// Register C's pending flags.
    pub flags: u8,
}

impl Cmos {
    /// The CMOS, for a live migration.
    pub fn snapshot(&self) -> CmosSnapshot {
        CmosSnapshot {
            index: self.index,
            ram: self.ram.to_vec(),
            offset_secs: self.offset_secs,
            flags: self.periodic.flags.load(Ordering::SeqCst),
        }
    }

    /// Takes a migrated CMOS; the periodic interrupt runs at the rate it had.
    pub fn restore(&mut self, s: &CmosSnapshot) -> Result<(), String> {
        self.ram = s
            .ram
            .as_slice()
            .try_into()
            .map_err(|_| format!("CMOS RAM of {} bytes", s.ram.len()))?;
        // A guest sets its clock to a year of 0 to 9999 (century and year bytes): an offset
        // beyond ten thousand years came from no guest.
        const LIMIT_SECS: i64 = 10_000 * 366 * 86_400;
        if s.offset_secs.abs() > LIMIT_SECS {
            return Err(format!("a clock {} s away from the host's", s.offset_secs));
        }
        self.index = s.index & 0x7f;
        self.offset_secs = s.offset_secs;
        self.periodic.flags.store(s.flags, Ordering::SeqCst);
        self.update_periodic();
        Ok(())
    }

    /// A CMOS for `below_4g` bytes of RAM under 4 GiB, `above_4g` over it,
    /// and `vcpus` CPUs; its periodic interrupt raises `irq` (IRQ 8), if given.
    pub fn new(below_4g: u64, above_4g: u64, vcpus: u8, irq: Option<EventFd>) -> Self {
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
        let periodic = Arc::new(Periodic {
            setting: AtomicU8::new(ram[reg::A as usize] & 0xf),
            flags: AtomicU8::new(0),
            stop: AtomicBool::new(false),
        });
        if let Some(irq) = irq {
            let p = periodic.clone();
            let spawned = std::thread::Builder::new()
                .name("rtc".into())
                .spawn(move || Self::tick(&p, &irq));
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "no RTC periodic interrupt: cannot start its thread");
            }
        }
        Cmos {
            index: 0,
            ram,
            offset_secs: 0,
            periodic,
        }
    }

    /// The ticker: while the guest has the periodic interrupt on, flags it
    /// and raises IRQ 8 at its rate; until the CMOS goes.
    fn tick(p: &Periodic, irq: &EventFd) {
        const IDLE: Duration = Duration::from_millis(20);
        while !p.stop.load(Ordering::SeqCst) {
            let s = p.setting.load(Ordering::SeqCst);
            match period(s) {
                Some(d) if s & 0x80 != 0 => {
                    std::thread::sleep(d);
                    p.flags.fetch_or(C_PERIODIC, Ordering::SeqCst);
                    let _ = irq.write(1);
                }
                _ => std::thread::sleep(IDLE),
            }
        }
    }

    /// Tells the ticker what registers A and B now say.
    fn update_periodic(&self) {
        let pie = if self.ram[reg::B as usize] & B_PIE != 0 {
            0x80
        } else {
            0
        };
        self.periodic
            .setting
            .store(pie | (self.ram[reg::A as usize] & 0xf), Ordering::SeqCst);
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
            // Reading C acknowledges the interrupt.
            reg::C => self.periodic.flags.swap(0, Ordering::SeqCst),
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
                if r == reg::A || r == reg::B {
                    self.update_periodic();
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
    fn the_periodic_interrupt_runs_only_while_enabled_and_reading_c_acknowledges_it() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut c = Cmos::new(64 << 20, 0, 1, Some(irq.try_clone().unwrap()));
        std::thread::sleep(Duration::from_millis(60));
        assert!(irq.read().is_err(), "off until the guest sets PIE");
        assert_eq!(
            period(6),
            Some(Duration::from_micros(1000)),
            "1024 Hz, as fast as we sleep"
        );
        assert_eq!(period(0xf), Some(Duration::from_micros(500_000)));
        assert_eq!(period(0), None);
        c.write(0, &[reg::A]);
        c.write(1, &[0x2f]); // 2 Hz
        c.write(0, &[reg::B]);
        c.write(1, &[B_24H | B_PIE]);
        std::thread::sleep(Duration::from_millis(700));
        assert!(irq.read().unwrap() >= 1);
        assert_eq!(rd(&mut c, reg::C), C_PERIODIC);
        assert_eq!(rd(&mut c, reg::C), 0, "read once, acknowledged");
        c.write(0, &[reg::B]);
        c.write(1, &[B_24H]);
        std::thread::sleep(Duration::from_millis(600));
        let _ = irq.read();
        std::thread::sleep(Duration::from_millis(600));
        assert!(irq.read().is_err(), "off again");
        drop(c);
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
        let mut c = Cmos::new(0xc000_0000, 1 << 30, 4, None);
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
