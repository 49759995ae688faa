//! fw_cfg: how the firmware learns what the VMM built (QEMU's "firmware
//! configuration" interface, which SeaBIOS and OVMF read): a selector port,
//! a data port, and the DMA interface. Items are numbered keys or named
//! files listed in a directory; the firmware reads the memory map, the boot
//! order, the ACPI tables and their loader script from here.
//!
//! Ports: selector at 0x510 (16-bit), data at 0x511 (8-bit), DMA address at
//! 0x514 (64-bit big-endian, the write of the low half starts the transfer).

use vm_memory::{Bytes, GuestAddress};

use crate::bus::BusDevice;
use crate::memory::GuestMemory;

/// The selector port; the device spans 12 ports from here.
pub const PORT: u16 = 0x510;
/// Ports the device answers, from [`PORT`].
pub const PORT_LEN: u64 = 12;

/// Well-known keys.
mod key {
    pub const SIGNATURE: u16 = 0x00;
    pub const ID: u16 = 0x01;
    pub const NB_CPUS: u16 = 0x05;
    pub const MAX_CPUS: u16 = 0x0f;
    pub const FILE_DIR: u16 = 0x19;
    /// First key of named files.
    pub const FILE_FIRST: u16 = 0x20;
}

/// ID feature bits: the traditional interface and DMA.
const ID_TRADITIONAL: u32 = 1;
const ID_DMA: u32 = 2;

/// DMA control bits.
mod dma {
    pub const ERROR: u32 = 1;
    pub const READ: u32 = 2;
    pub const SKIP: u32 = 4;
    pub const SELECT: u32 = 8;
    pub const WRITE: u32 = 0x10;
}

/// "QEMU CFG" read back from the DMA address port, so firmware knows DMA is there.
const DMA_SIGNATURE: u64 = 0x5145_4d55_2043_4647;
/// Longest file name, with its NUL.
const FILE_NAME_LEN: usize = 56;
/// Most files we list; far more than we add.
const MAX_FILES: usize = 256;

/// Errors adding items.
#[derive(Debug, thiserror::Error)]
pub enum FwCfgError {
    /// The name does not fit the directory entry, or is taken.
    #[error("fw_cfg file name {0:?} is too long or already listed")]
    Name(String),
    /// Too many files.
    #[error("too many fw_cfg files")]
    Full,
}

/// The fw_cfg device.
pub struct FwCfg {
    mem: GuestMemory,
    items: Vec<(u16, Vec<u8>)>,
    files: Vec<(String, u16)>,
    selected: u16,
    offset: usize,
    dma_addr: u64,
}

/// Where the guest stands in fw_cfg, as a live migration carries it (the items are the
/// target's own, made from the same configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FwCfgSnapshot {
    /// The selected item.
    pub selected: u16,
    /// How far into it the guest read.
    pub offset: u64,
    /// The DMA address's high half, written, its low half not yet.
    pub dma_addr: u64,
}

impl FwCfg {
    /// Where the guest stands, for a live migration.
    pub fn snapshot(&self) -> FwCfgSnapshot {
        FwCfgSnapshot {
            selected: self.selected,
            offset: self.offset as u64,
            dma_addr: self.dma_addr,
        }
    }

    /// Takes where a migrated guest stood.
    pub fn restore(&mut self, s: &FwCfgSnapshot) {
        self.selected = s.selected;
        self.offset = usize::try_from(s.offset).unwrap_or(usize::MAX);
        self.dma_addr = s.dma_addr;
    }

    /// A device for a VM of `vcpus` CPUs, with no files yet.
    pub fn new(mem: GuestMemory, vcpus: u8) -> Self {
        let mut f = FwCfg {
            mem,
            items: Vec::new(),
            files: Vec::new(),
            selected: 0,
            offset: 0,
            dma_addr: 0,
        };
        f.items.push((key::SIGNATURE, b"QEMU".to_vec()));
        f.items
            .push((key::ID, (ID_TRADITIONAL | ID_DMA).to_le_bytes().to_vec()));
        f.items
            .push((key::NB_CPUS, u16::from(vcpus).to_le_bytes().to_vec()));
        f.items
            .push((key::MAX_CPUS, u16::from(vcpus).to_le_bytes().to_vec()));
        f.rebuild_dir();
        f
    }

    /// Adds the file `name` with `data`.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<(), FwCfgError> {
        if name.len() >= FILE_NAME_LEN || self.files.iter().any(|(n, _)| n == name) {
            return Err(FwCfgError::Name(name.into()));
        }
        if self.files.len() >= MAX_FILES {
            return Err(FwCfgError::Full);
        }
        let k = key::FILE_FIRST + self.files.len() as u16;
        self.files.push((name.to_string(), k));
        self.items.push((k, data));
        self.rebuild_dir();
        Ok(())
    }

    fn item(&self, k: u16) -> &[u8] {
        self.items
            .iter()
            .find(|(key, _)| *key == k)
            .map_or(&[], |(_, d)| d.as_slice())
    }

    /// The directory: a big-endian count, then (size, key, name) entries
    /// sorted by name, as firmware expects.
    fn rebuild_dir(&mut self) {
        let mut files = self.files.clone();
        files.sort();
        let mut dir = (files.len() as u32).to_be_bytes().to_vec();
        for (name, k) in &files {
            dir.extend_from_slice(&(self.item(*k).len() as u32).to_be_bytes());
            dir.extend_from_slice(&k.to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut n = [0u8; FILE_NAME_LEN];
            n[..name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&n);
        }
        self.items.retain(|(k, _)| *k != key::FILE_DIR);
        self.items.push((key::FILE_DIR, dir));
    }

    fn select(&mut self, k: u16) {
        tracing::trace!(target: "fw_cfg", key = k, "select");
        self.selected = k;
        self.offset = 0;
    }

    /// Runs the DMA request whose descriptor is at `at`.
    fn run_dma(&mut self, at: u64) {
        let base = GuestAddress(at);
        let control = match self.mem.read_obj::<[u8; 4]>(base) {
            Ok(b) => u32::from_be_bytes(b),
            Err(_) => return,
        };
        let length = self
            .mem
            .read_obj::<[u8; 4]>(GuestAddress(at.wrapping_add(4)))
            .map(u32::from_be_bytes);
        let address = self
            .mem
            .read_obj::<[u8; 8]>(GuestAddress(at.wrapping_add(8)))
            .map(u64::from_be_bytes);
        let result = match (length, address) {
            (Ok(len), Ok(addr)) => self.transfer(control, len, addr),
            _ => dma::ERROR,
        };
        let _ = self.mem.write_obj(result.to_be_bytes(), base);
    }

    /// Does what `control` asks; returns the control word to write back
    /// (0 when done, the error bit if not).
    fn transfer(&mut self, control: u32, len: u32, addr: u64) -> u32 {
        tracing::trace!(target: "fw_cfg", control, len, addr, key = self.selected, offset = self.offset, "dma");
        if control & dma::SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        if control & dma::WRITE != 0 {
            return dma::ERROR;
        }
        let data = self.item(self.selected);
        let start = self.offset.min(data.len());
        let n = (len as usize).min(data.len() - start);
        if control & dma::READ != 0 {
            let chunk = data[start..start + n].to_vec();
            if self.mem.write_slice(&chunk, GuestAddress(addr)).is_err() {
                return dma::ERROR;
            }
            // Bytes beyond the item read as zero.
            let rest = len as usize - n;
            if rest > 0 {
                let zeros = vec![0u8; rest.min(1 << 20)];
                let mut at = addr.wrapping_add(n as u64);
                let mut left = rest;
                while left > 0 {
                    let k = left.min(zeros.len());
                    if self.mem.write_slice(&zeros[..k], GuestAddress(at)).is_err() {
                        return dma::ERROR;
                    }
                    at = at.wrapping_add(k as u64);
                    left -= k;
                }
            }
        }
        if control & (dma::READ | dma::SKIP) != 0 {
            self.offset = self.offset.saturating_add(len as usize);
        }
        0
    }
}

impl BusDevice for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            1 => {
                let d = self.item(self.selected);
                data[0] = d.get(self.offset).copied().unwrap_or(0);
                self.offset = self.offset.saturating_add(1);
            }
            4..=11 => {
                let sig = DMA_SIGNATURE.to_be_bytes();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = sig.get(offset as usize - 4 + i).copied().unwrap_or(0);
                }
            }
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (0, 2) => self.select(u16::from_le_bytes([data[0], data[1]])),
            // The address, big-endian: the high half first, the low half starts the request.
            (4, 4) => {
                let hi = u32::from_be_bytes(data.try_into().expect("4 bytes"));
                self.dma_addr = u64::from(hi) << 32;
            }
            (8, 4) => {
                let lo = u32::from_be_bytes(data.try_into().expect("4 bytes"));
                let at = self.dma_addr | u64::from(lo);
                self.dma_addr = 0;
                self.run_dma(at);
            }
            (4, 8) => {
                let at = u64::from_be_bytes(data.try_into().expect("8 bytes"));
                self.run_dma(at);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_item(f: &mut FwCfg, k: u16, n: usize) -> Vec<u8> {
        f.write(0, &k.to_le_bytes());
        (0..n)
            .map(|_| {
                let mut b = [0u8];
                f.read(1, &mut b);
                b[0]
            })
            .collect()
    }

    #[test]
    fn items_and_files_read_by_port_and_by_dma() {
        let (mem, _m) = crate::memory::create(16).unwrap();
        let mut f = FwCfg::new(mem.clone(), 2);
        f.add_file("etc/zeta", vec![1, 2, 3]).unwrap();
        f.add_file("bootorder", b"/pci@i0cf8/*@3\n".to_vec())
            .unwrap();
        assert!(f.add_file("bootorder", vec![]).is_err());
        assert!(f.add_file(&"x".repeat(56), vec![]).is_err());
        assert_eq!(read_item(&mut f, key::SIGNATURE, 4), b"QEMU");
        assert_eq!(read_item(&mut f, key::NB_CPUS, 2), [2, 0]);
        assert_eq!(
            read_item(&mut f, 0x1234, 2),
            [0, 0],
            "unknown keys read as zero"
        );
        let dir = read_item(&mut f, key::FILE_DIR, 4 + 2 * 64);
        assert_eq!(dir[..4], [0, 0, 0, 2]);
        // Sorted by name: bootorder first, with its size and key.
        assert_eq!(&dir[12..21], b"bootorder");
        assert_eq!(dir[4..8], 15u32.to_be_bytes());
        let bootorder_key = u16::from_be_bytes([dir[8], dir[9]]);
        assert_eq!(&dir[76..84], b"etc/zeta");
        // DMA: select bootorder, skip 1 byte, read 20 (the 5 past its end read as zero).
        let w = |at: u64, bytes: &[u8]| mem.write_slice(bytes, GuestAddress(at)).unwrap();
        let desc = |control: u32, len: u32, addr: u64| {
            let mut d = control.to_be_bytes().to_vec();
            d.extend_from_slice(&len.to_be_bytes());
            d.extend_from_slice(&addr.to_be_bytes());
            d
        };
        w(0x9000, &[0xaa; 32]);
        w(
            0x1000,
            &desc(
                u32::from(bootorder_key) << 16 | dma::SELECT | dma::SKIP,
                1,
                0,
            ),
        );
        f.write(4, &0u32.to_be_bytes());
        f.write(8, &0x1000u32.to_be_bytes());
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0);
        w(0x1000, &desc(dma::READ, 20, 0x9000));
        f.write(4, &0x1000u64.to_be_bytes());
        let mut got = [0u8; 21];
        mem.read_slice(&mut got, GuestAddress(0x9000)).unwrap();
        assert_eq!(&got[..14], b"pci@i0cf8/*@3\n");
        assert_eq!(got[14..20], [0; 6]);
        assert_eq!(got[20], 0xaa);
        // Writes and descriptors outside memory fail cleanly.
        w(0x1000, &desc(dma::WRITE, 4, 0x9000));
        f.write(4, &0x1000u64.to_be_bytes());
        assert_eq!(
            mem.read_obj::<[u8; 4]>(GuestAddress(0x1000)).unwrap(),
            dma::ERROR.to_be_bytes()
        );
        w(0x1000, &desc(dma::READ, 4, 0xffff_ffff_0000));
        f.write(4, &0x1000u64.to_be_bytes());
        assert_eq!(
            mem.read_obj::<[u8; 4]>(GuestAddress(0x1000)).unwrap(),
            dma::ERROR.to_be_bytes()
        );
        f.write(4, &0xffff_ffff_ffffu64.to_be_bytes());
        let mut sig = [0u8; 8];
        f.read(4, &mut sig);
        assert_eq!(&sig, b"QEMU CFG");
    }
}
