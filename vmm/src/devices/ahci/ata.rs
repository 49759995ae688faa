//! ATA: the IDENTIFY data every driver reads first, and a SATA disk over a
//! file (READ/WRITE DMA, FLUSH), for guests without virtio drivers.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Sector size of disks.
pub const SECTOR: u64 = 512;

/// ATA status bits.
pub mod status {
    /// An error; the error register says which.
    pub const ERR: u8 = 0x01;
    /// Seek complete (kept set, as drives do).
    pub const DSC: u8 = 0x10;
    /// Ready.
    pub const DRDY: u8 = 0x40;
    /// Busy.
    pub const BSY: u8 = 0x80;
    /// A command ended well.
    pub const OK: u8 = DRDY | DSC;
}

/// Error register: command aborted.
pub const ABRT: u8 = 0x04;

/// ATA commands we answer.
pub mod cmd {
    #![allow(missing_docs)]
    pub const DEVICE_RESET: u8 = 0x08;
    pub const READ_VERIFY: u8 = 0x40;
    pub const READ_VERIFY_EXT: u8 = 0x42;
    pub const READ_DMA_EXT: u8 = 0x25;
    pub const WRITE_DMA_EXT: u8 = 0x35;
    pub const INITIALIZE_PARAMS: u8 = 0x91;
    pub const PACKET: u8 = 0xa0;
    pub const IDENTIFY_PACKET: u8 = 0xa1;
    pub const SET_MULTIPLE: u8 = 0xc6;
    pub const READ_DMA: u8 = 0xc8;
    pub const WRITE_DMA: u8 = 0xca;
    pub const STANDBY_IMMEDIATE: u8 = 0xe0;
    pub const IDLE_IMMEDIATE: u8 = 0xe1;
    pub const CHECK_POWER_MODE: u8 = 0xe5;
    pub const FLUSH_CACHE: u8 = 0xe7;
    pub const FLUSH_CACHE_EXT: u8 = 0xea;
    pub const IDENTIFY: u8 = 0xec;
    pub const SET_FEATURES: u8 = 0xef;
}

/// Writes `s` into IDENTIFY words as ATA strings are: space padded, the two
/// bytes of each word swapped.
fn put_string(words: &mut [u16], s: &str) {
    let mut b: Vec<u8> = s.bytes().take(words.len() * 2).collect();
    b.resize(words.len() * 2, b' ');
    for (w, pair) in words.iter_mut().zip(b.chunks(2)) {
        *w = u16::from(pair[0]) << 8 | u16::from(pair[1]);
    }
}

/// IDENTIFY (PACKET) DEVICE data: 256 little-endian words. `sectors` is
/// `None` for an ATAPI device.
pub fn identify(serial: &str, model: &str, sectors: Option<u64>) -> [u8; 512] {
    let mut w = [0u16; 256];
    put_string(&mut w[10..20], serial);
    put_string(&mut w[23..27], "1.0");
    put_string(&mut w[27..47], model);
    w[49] = 0x0300; // LBA and DMA
    w[53] = 0x0006; // words 64-70 and 88 valid
    w[63] = 0x0007; // multiword DMA 0-2
    w[64] = 0x0003; // PIO 3-4
    w[65..69].copy_from_slice(&[120, 120, 120, 120]);
    w[76] = 0x0006; // SATA Gen1 and Gen2
    w[80] = 0x01f0; // ATA/ATAPI-4 to ACS
    w[87] = 0x4000;
    w[88] = 0x203f; // UDMA 0-5, mode 5 selected
    match sectors {
        Some(n) => {
            w[0] = 0x0040; // fixed disk
            w[47] = 0x8010;
            w[60] = (n.min(0x0fff_ffff) & 0xffff) as u16;
            w[61] = (n.min(0x0fff_ffff) >> 16) as u16;
            w[82] = 0x4020; // write cache
            w[83] = 0x7400; // LBA48, FLUSH CACHE (EXT)
            w[84] = 0x4000;
            w[85] = 0x4020;
            w[86] = 0x3400;
            for (i, word) in w[100..104].iter_mut().enumerate() {
                *word = (n >> (16 * i)) as u16;
            }
            w[106] = 0x4000; // 512-byte sectors
        }
        None => {
            w[0] = 0x85c0; // ATAPI, CD-ROM, removable, 12-byte packets
            w[82] = 0x4010; // PACKET
            w[83] = 0x4000;
            w[84] = 0x4000;
            w[85] = 0x4010;
        }
    }
    let mut out = [0u8; 512];
    for (i, v) in w.iter().enumerate() {
        out[2 * i..2 * i + 2].copy_from_slice(&v.to_le_bytes());
    }
    out
}

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum AtaError {
    /// The file cannot be opened or sized.
    #[error("cannot open SATA disk {path}: {err}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
}

/// A SATA disk over a file.
pub struct AtaDisk {
    file: File,
    path: PathBuf,
    sectors: u64,
    readonly: bool,
}

impl AtaDisk {
    /// Opens `path`.
    pub fn open(path: &Path, readonly: bool) -> Result<AtaDisk, AtaError> {
        let (file, len) =
            crate::devices::open_image(path, readonly).map_err(|err| AtaError::Open {
                path: path.into(),
                err,
            })?;
        Ok(AtaDisk {
            file,
            path: path.into(),
            sectors: len / SECTOR,
            readonly,
        })
    }

    /// The backing file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// IDENTIFY DEVICE data.
    pub fn identify(&self) -> [u8; 512] {
        identify("ENSPEED-SATA", "EnSpeed SATA disk", Some(self.sectors))
    }

    /// Whether `count` sectors from `lba` lie on the disk.
    pub fn in_range(&self, lba: u64, count: u64) -> bool {
        lba.checked_add(count)
            .is_some_and(|end| end <= self.sectors)
    }

    /// Reads `count` sectors from `lba`.
    pub fn read(&self, lba: u64, count: u64) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; (count * SECTOR) as usize];
        self.file.read_exact_at(&mut buf, lba * SECTOR)?;
        Ok(buf)
    }

    /// Writes `data` (whole sectors) at `lba`.
    pub fn write(&self, lba: u64, data: &[u8]) -> std::io::Result<()> {
        if self.readonly {
            return Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        }
        self.file.write_all_at(data, lba * SECTOR)
    }

    /// Makes written data durable.
    pub fn flush(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(d: &[u8; 512], i: usize) -> u16 {
        u16::from_le_bytes([d[2 * i], d[2 * i + 1]])
    }

    #[test]
    fn identify_data_says_what_drivers_look_for() {
        let d = identify("S1", "EnSpeed SATA disk", Some(0x1_2345_6789));
        assert_eq!(word(&d, 0), 0x0040);
        assert_eq!(word(&d, 60), 0xffff);
        assert_eq!(word(&d, 61), 0x0fff);
        assert_eq!(word(&d, 100), 0x6789);
        assert_eq!(word(&d, 101), 0x2345);
        assert_eq!(word(&d, 102), 1);
        assert_ne!(word(&d, 83) & (1 << 10), 0, "LBA48");
        // "En" byte-swapped into word 27.
        assert_eq!(word(&d, 27), u16::from(b'E') << 8 | u16::from(b'n'));
        let c = identify("S2", "EnSpeed CD-ROM", None);
        assert_eq!(word(&c, 0) >> 14, 2, "ATAPI");
        assert_eq!((word(&c, 0) >> 8) & 0x1f, 5, "CD-ROM");
    }
}
