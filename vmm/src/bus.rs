//! Port-I/O and MMIO dispatch: which device answers a guest access.

use std::sync::{Arc, Mutex};

/// A device reachable through a bus. Offsets are relative to the range the
/// device was inserted at; `data.len()` is the access width (1, 2, 4 or 8).
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

struct Range {
    base: u64,
    len: u64,
    device: SharedDevice,
}

/// Errors when wiring devices onto a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Two devices claim overlapping addresses.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Start of the refused range.
        base: u64,
        /// Length of the refused range.
        len: u64,
    },
}

/// A set of non-overlapping address ranges, each owned by one device.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

impl Bus {
    /// Adds `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        if len == 0
            || self
                .ranges
                .iter()
                .any(|r| base < r.base + r.len && r.base < end)
        {
            return Err(BusError::Overlap { base, len });
        }
        let at = self.ranges.partition_point(|r| r.base < base);
        self.ranges.insert(at, Range { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64, width: usize) -> Option<(&SharedDevice, u64)> {
        let i = self
            .ranges
            .partition_point(|r| r.base <= addr)
            .checked_sub(1)?;
        let r = &self.ranges[i];
        let offset = addr - r.base;
        // The whole access must fall inside the device's range.
        (offset.checked_add(width as u64)? <= r.len).then_some((&r.device, offset))
    }

    /// Dispatches a read; returns false (and fills `data` with 0xff, as an
    /// unclaimed ISA bus reads) when no device owns the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((dev, offset)) => {
                lock(dev).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns false when no device owns the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((dev, offset)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device. A device whose lock was poisoned by a panic on another
/// thread is still served: its state is plain data, and refusing every later
/// access would only turn one bug into a hung guest.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_refuses_overlaps() {
        let mut bus = Bus::default();
        let a = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(a.clone(), 0x100, 0x10).unwrap();
        assert!(bus.insert(a.clone(), 0x108, 0x10).is_err());
        assert!(bus.insert(a.clone(), 0xf8, 0x10).is_err());
        assert!(bus.insert(a.clone(), 0x110, 0).is_err());
        bus.insert(a.clone(), 0x110, 0x10).unwrap();

        let mut d = [0u8; 2];
        assert!(bus.read(0x103, &mut d));
        assert_eq!(d, [3, 3]);
        // Straddling the end of a range is not an access to that device.
        let mut d = [0u8; 4];
        assert!(!bus.read(0x11e, &mut d));
        assert_eq!(d, [0xff; 4]);
        assert!(!bus.read(0x50, &mut d));
        assert!(bus.write(0x112, &[7]));
        assert_eq!(lock(&a).0, vec![(2, vec![7])]);
        assert!(!bus.write(u64::MAX, &[1]));
    }
}
