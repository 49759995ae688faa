//! A PCI function's 256-byte configuration space: the standard header, its
//! base address registers and a capability list, with a mask of the bits the
//! guest may write. Everything the guest writes is filtered through that
//! mask, so a BAR reads back its size when the guest writes all ones, and
//! read-only identity registers stay what the device says.

/// Header register offsets (type 0 header).
pub mod reg {
    #![allow(missing_docs)]
    pub const VENDOR_ID: usize = 0x00;
    pub const DEVICE_ID: usize = 0x02;
    pub const COMMAND: usize = 0x04;
    pub const STATUS: usize = 0x06;
    pub const REVISION: usize = 0x08;
    pub const PROG_IF: usize = 0x09;
    pub const SUBCLASS: usize = 0x0a;
    pub const CLASS: usize = 0x0b;
    pub const HEADER_TYPE: usize = 0x0e;
    pub const BAR0: usize = 0x10;
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    pub const SUBSYSTEM_ID: usize = 0x2e;
    pub const ROM_BAR: usize = 0x30;
    pub const CAPABILITIES: usize = 0x34;
    pub const INTERRUPT_LINE: usize = 0x3c;
    pub const INTERRUPT_PIN: usize = 0x3d;
}

/// Command register bits.
pub mod command {
    /// Decode I/O BARs.
    pub const IO: u16 = 1 << 0;
    /// Decode memory BARs.
    pub const MEMORY: u16 = 1 << 1;
    /// The device may master the bus (DMA, MSI).
    pub const BUS_MASTER: u16 = 1 << 2;
    /// INTx is disabled.
    pub const INTX_DISABLE: u16 = 1 << 10;
}

/// Status register: the capability list exists.
const STATUS_CAP_LIST: u16 = 1 << 4;
/// Status register: INTx is asserted.
pub const STATUS_INTERRUPT: u16 = 1 << 3;
/// First byte of the device-specific area where capabilities go.
const CAP_START: usize = 0x40;
/// Number of BARs in a type 0 header.
pub const BAR_COUNT: usize = 6;
/// The expansion ROM, addressed as BAR number 6 by [`PciConfig::bar_window`].
pub const ROM_BAR: usize = 6;

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory, not prefetchable.
    Memory32,
    /// 64-bit memory (takes this BAR and the next), not prefetchable.
    Memory64,
    /// 32-bit memory, prefetchable (a framebuffer).
    Prefetchable32,
}

/// A BAR the device declared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Bar {
    size: u64,
    kind: BarKind,
}

/// Errors in how a device builds its configuration space.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A BAR's size is not a power of two of at least 16 bytes, or its slot is taken.
    #[error("BAR {index} of {size:#x} bytes cannot be declared")]
    Bar {
        /// Which BAR.
        index: usize,
        /// Its size.
        size: u64,
    },
    /// The capabilities do not fit in configuration space.
    #[error("PCI capabilities overflow configuration space")]
    CapabilitiesFull,
}

/// The identity of a PCI function.
#[derive(Clone, Copy, Debug)]
pub struct Identity {
    /// Vendor.
    pub vendor: u16,
    /// Device.
    pub device: u16,
    /// Revision.
    pub revision: u8,
    /// Class code (base class, subclass, programming interface).
    pub class: (u8, u8, u8),
    /// Subsystem vendor.
    pub subsystem_vendor: u16,
    /// Subsystem.
    pub subsystem: u16,
}

/// One function's configuration space.
pub struct PciConfig {
    regs: [u8; 256],
    wmask: [u8; 256],
    bars: [Option<Bar>; BAR_COUNT],
    /// Size of the expansion ROM, if any.
    rom: Option<u64>,
    /// BAR slots in use, the upper halves of 64-bit BARs included.
    taken: [bool; BAR_COUNT],
    next_cap: usize,
    last_cap_ptr: usize,
}

impl PciConfig {
    /// A type 0 header for `id`; `interrupt_pin` is 1-4 for INTA-INTD, 0 for none.
    pub fn new(id: Identity, interrupt_pin: u8) -> Self {
        let mut c = PciConfig {
            regs: [0; 256],
            wmask: [0; 256],
            bars: [None; BAR_COUNT],
            rom: None,
            taken: [false; BAR_COUNT],
            next_cap: CAP_START,
            last_cap_ptr: reg::CAPABILITIES,
        };
        c.set_u16(reg::VENDOR_ID, id.vendor);
        c.set_u16(reg::DEVICE_ID, id.device);
        c.regs[reg::REVISION] = id.revision;
        c.regs[reg::PROG_IF] = id.class.2;
        c.regs[reg::SUBCLASS] = id.class.1;
        c.regs[reg::CLASS] = id.class.0;
        c.set_u16(reg::SUBSYSTEM_VENDOR_ID, id.subsystem_vendor);
        c.set_u16(reg::SUBSYSTEM_ID, id.subsystem);
        c.regs[reg::INTERRUPT_PIN] = interrupt_pin;
        let cmd = command::IO | command::MEMORY | command::BUS_MASTER | command::INTX_DISABLE;
        c.wmask[reg::COMMAND..reg::COMMAND + 2].copy_from_slice(&cmd.to_le_bytes());
        c.wmask[reg::INTERRUPT_LINE] = 0xff;
        c
    }

    /// Declares BAR `index` of `size` bytes (a power of two).
    pub fn add_bar(&mut self, index: usize, size: u64, kind: BarKind) -> Result<(), ConfigError> {
        let slots = if kind == BarKind::Memory64 { 2 } else { 1 };
        let bad = || ConfigError::Bar { index, size };
        if !size.is_power_of_two()
            || size < 16
            || (kind != BarKind::Memory64 && size > 1 << 31)
            || index + slots > BAR_COUNT
            || self.taken[index..index + slots].iter().any(|t| *t)
        {
            return Err(bad());
        }
        self.taken[index..index + slots].fill(true);
        self.bars[index] = Some(Bar { size, kind });
        let off = reg::BAR0 + 4 * index;
        let mask = !(size - 1);
        let flags: u32 = match kind {
            BarKind::Memory32 => 0,
            BarKind::Memory64 => 0b100,
            BarKind::Prefetchable32 => 0b1000,
        };
        self.set_u32(off, flags);
        self.wmask[off..off + 4].copy_from_slice(&((mask as u32) & !0xf).to_le_bytes());
        if kind == BarKind::Memory64 {
            self.wmask[off + 4..off + 8].copy_from_slice(&((mask >> 32) as u32).to_le_bytes());
        }
        Ok(())
    }

    /// Declares an expansion ROM of `size` bytes (a power of two, at least 2 KiB).
    pub fn add_rom(&mut self, size: u64) -> Result<(), ConfigError> {
        if !size.is_power_of_two() || !(2048..=1 << 24).contains(&size) || self.rom.is_some() {
            return Err(ConfigError::Bar {
                index: ROM_BAR,
                size,
            });
        }
        self.rom = Some(size);
        let mask = (!(size - 1) as u32) | 1;
        self.wmask[reg::ROM_BAR..reg::ROM_BAR + 4].copy_from_slice(&mask.to_le_bytes());
        Ok(())
    }

    /// Appends a capability with `id` and `body` (the bytes after its ID and
    /// next pointer); `writable` masks the body's guest-writable bits. Returns
    /// the capability's offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, ConfigError> {
        let at = self.next_cap;
        let end = at + 2 + body.len();
        if end > 256 || writable.len() > body.len() {
            return Err(ConfigError::CapabilitiesFull);
        }
        self.regs[at] = id;
        self.regs[at + 1] = 0;
        self.regs[at + 2..end].copy_from_slice(body);
        self.wmask[at + 2..at + 2 + writable.len()].copy_from_slice(writable);
        self.regs[self.last_cap_ptr] = at as u8;
        self.last_cap_ptr = at + 1;
        self.next_cap = (end + 3) & !3;
        let status = self.u16(reg::STATUS) | STATUS_CAP_LIST;
        self.set_u16(reg::STATUS, status);
        Ok(at)
    }

    /// Lets the guest write every bit of the bytes in `range` (chipset
    /// registers kept as plain storage).
    pub fn make_writable(&mut self, range: std::ops::Range<usize>) {
        for m in &mut self.wmask[range] {
            *m = 0xff;
        }
    }

    /// Reads `data.len()` bytes at `offset`; out of range reads as all ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.regs.get(offset + i).copied().unwrap_or(0xff);
        }
    }

    /// The guest writes `data` at `offset`; only writable bits change.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let Some(m) = self.wmask.get(offset + i).copied() else {
                return;
            };
            let r = &mut self.regs[offset + i];
            *r = (*r & !m) | (b & m);
        }
    }

    /// The registers as they stand, for a live migration.
    pub fn snapshot(&self) -> Vec<u8> {
        self.regs.to_vec()
    }

    /// Takes what the guest wrote into a migrated function's configuration space: only the
    /// bits the guest may write are taken, so the identity, the capabilities and the BARs'
    /// sizes stay this function's own whatever the stream says.
    pub fn restore(&mut self, regs: &[u8]) -> Result<(), String> {
        if regs.len() != self.regs.len() {
            return Err(format!(
                "a configuration space of {} bytes, not {}",
                regs.len(),
                self.regs.len()
            ));
        }
        self.write(0, regs);
        Ok(())
    }

    /// A 16-bit register.
    pub fn u16(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.regs[offset], self.regs[offset + 1]])
    }

    /// A 32-bit register.
    pub fn u32(&self, offset: usize) -> u32 {
        u32::from_le_bytes(self.regs[offset..offset + 4].try_into().expect("4 bytes"))
    }

    /// Sets an 8-bit register as the device (no mask).
    pub fn set_u8(&mut self, offset: usize, v: u8) {
        self.regs[offset] = v;
    }

    /// Sets a 16-bit register as the device (no mask).
    pub fn set_u16(&mut self, offset: usize, v: u16) {
        self.regs[offset..offset + 2].copy_from_slice(&v.to_le_bytes());
    }

    /// Sets a 32-bit register as the device (no mask).
    pub fn set_u32(&mut self, offset: usize, v: u32) {
        self.regs[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.u16(reg::COMMAND)
    }

    /// Sets or clears the INTx status bit.
    pub fn set_interrupt_status(&mut self, asserted: bool) {
        let s = self.u16(reg::STATUS);
        let s = if asserted {
            s | STATUS_INTERRUPT
        } else {
            s & !STATUS_INTERRUPT
        };
        self.set_u16(reg::STATUS, s);
    }

    /// Where memory BAR `index` is decoded now: `None` while memory decoding
    /// is off or the guest has not placed it (address zero or all ones).
    pub fn bar_window(&self, index: usize) -> Option<(u64, u64)> {
        if self.command() & command::MEMORY == 0 {
            return None;
        }
        if index == ROM_BAR {
            let size = self.rom?;
            let v = self.u32(reg::ROM_BAR);
            let addr = u64::from(v & !0x7ff);
            return (v & 1 != 0 && addr != 0).then_some((addr, size));
        }
        let bar = self.bars.get(index).copied().flatten()?;
        let off = reg::BAR0 + 4 * index;
        let mut addr = u64::from(self.u32(off) & !0xf);
        if bar.kind == BarKind::Memory64 {
            addr |= u64::from(self.u32(off + 4)) << 32;
        }
        let mask = !(bar.size - 1);
        if addr == 0 || addr == mask & 0xffff_ffff_ffff_fff0 {
            return None;
        }
        Some((addr, bar.size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Identity {
        Identity {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: (1, 0, 0),
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        }
    }

    #[test]
    fn bars_report_their_size_and_decode_only_when_enabled() {
        let mut c = PciConfig::new(id(), 1);
        c.add_bar(0, 0x8000, BarKind::Memory32).unwrap();
        c.add_bar(2, 0x4000, BarKind::Memory64).unwrap();
        assert!(
            c.add_bar(3, 0x1000, BarKind::Memory32).is_err(),
            "upper half of BAR 2"
        );
        assert!(c.add_bar(4, 0x1001, BarKind::Memory32).is_err());
        c.write(reg::BAR0, &[0xff; 4]);
        assert_eq!(c.u32(reg::BAR0), 0xffff_8000);
        c.write(reg::BAR0 + 8, &[0xff; 4]);
        c.write(reg::BAR0 + 12, &[0xff; 4]);
        assert_eq!(c.u32(reg::BAR0 + 8), 0xffff_c004);
        assert_eq!(c.u32(reg::BAR0 + 12), 0xffff_ffff);
        assert_eq!(c.bar_window(0), None);
        c.write(reg::BAR0, &0xc000_0000u32.to_le_bytes());
        c.write(reg::BAR0 + 8, &0xc001_0000u32.to_le_bytes());
        c.write(reg::BAR0 + 12, &1u32.to_le_bytes());
        assert_eq!(c.bar_window(0), None, "memory decoding is off");
        c.write(reg::COMMAND, &command::MEMORY.to_le_bytes());
        assert_eq!(c.bar_window(0), Some((0xc000_0000, 0x8000)));
        assert_eq!(c.bar_window(2), Some((0x1_c001_0000, 0x4000)));
        assert_eq!(c.bar_window(1), None);
    }

    #[test]
    fn the_rom_decodes_only_when_enabled() {
        let mut c = PciConfig::new(id(), 0);
        c.add_rom(0x10000).unwrap();
        assert!(c.add_rom(0x10000).is_err());
        c.write(reg::ROM_BAR, &[0xff; 4]);
        assert_eq!(c.u32(reg::ROM_BAR), 0xffff_0001);
        c.write(reg::ROM_BAR, &0xfeb0_0000u32.to_le_bytes());
        c.write(reg::COMMAND, &command::MEMORY.to_le_bytes());
        assert_eq!(c.bar_window(ROM_BAR), None, "not enabled");
        c.write(reg::ROM_BAR, &0xfeb0_0001u32.to_le_bytes());
        assert_eq!(c.bar_window(ROM_BAR), Some((0xfeb0_0000, 0x10000)));
        let mut p = PciConfig::new(id(), 0);
        p.add_bar(0, 1 << 24, BarKind::Prefetchable32).unwrap();
        p.write(reg::BAR0, &[0xff; 4]);
        assert_eq!(p.u32(reg::BAR0), 0xff00_0008);
    }

    #[test]
    fn identity_is_read_only_and_capabilities_chain() {
        let mut c = PciConfig::new(id(), 1);
        c.write(reg::VENDOR_ID, &[0, 0, 0, 0]);
        assert_eq!(c.u16(reg::VENDOR_ID), 0x1af4);
        assert_eq!(c.u16(reg::DEVICE_ID), 0x1042);
        let a = c.add_capability(0x09, &[4, 1, 0, 0], &[]).unwrap();
        let b = c
            .add_capability(0x11, &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[0, 0xc0])
            .unwrap();
        assert_eq!(c.regs[reg::CAPABILITIES] as usize, a);
        assert_eq!(c.regs[a + 1] as usize, b);
        assert_eq!(c.regs[b + 1], 0);
        assert_ne!(c.u16(reg::STATUS) & STATUS_CAP_LIST, 0);
        c.write(b + 2, &[0xff, 0xff]);
        assert_eq!(c.u16(b + 2), 0xc000);
        let big = vec![0u8; 300];
        assert!(c.add_capability(1, &big, &[]).is_err());
        let mut out = [0u8; 4];
        c.read(254, &mut out);
        assert_eq!(out[2..], [0xff, 0xff]);
    }
}
