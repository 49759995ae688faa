//! ATA: the IDENTIFY data every driver reads first, and a SATA disk over a
//! file (READ/WRITE DMA, FLUSH), for guests without virtio drivers.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::vhost::{Request, VhostUserStore, REQUEST_BYTES};

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
    /// The disk's vhost-user-blk backend cannot be reached or refused.
    #[error("SATA disk: {0}")]
    Backend(String),
}

/// Where a SATA disk's blocks are.
enum Store {
    /// A file of this server's.
    File {
        /// The file.
        file: File,
        /// Writes are refused.
        readonly: bool,
        /// Its size in sectors.
        sectors: u64,
    },
    /// A vhost-user-blk backend (a cluster VM's LiveSync disk).
    VhostUser(VhostUserStore),
}

/// A SATA disk over a file or a vhost-user-blk backend.
pub struct AtaDisk {
    store: Store,
    path: PathBuf,
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
            store: Store::File {
                file,
                readonly,
                sectors: len / SECTOR,
            },
            path: path.into(),
        })
    }

    /// The disk a vhost-user-blk backend at `socket` serves, connected now; or, for a VM that
    /// comes by live migration (`deferred`), at its first command, once the source let the
    /// backend go.
    pub fn vhost_user(socket: &Path, deferred: bool) -> Result<AtaDisk, AtaError> {
        let store = if deferred {
            VhostUserStore::deferred(socket)
        } else {
            VhostUserStore::connect(socket).map_err(AtaError::Backend)?
        };
        Ok(AtaDisk {
            store: Store::VhostUser(store),
            path: socket.into(),
        })
    }

    /// The backing file, or the backend's socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A live migration's handover: a backend's connection is let go, for the target's VMM.
    pub fn hand_over(&mut self) {
        if let Store::VhostUser(s) = &mut self.store {
            s.hand_over();
        }
    }

    /// The size in sectors; a deferred backend's is learnt by connecting.
    fn size(&mut self) -> Result<u64, String> {
        match &mut self.store {
            Store::File { sectors, .. } => Ok(*sectors),
            Store::VhostUser(s) => s.sectors(),
        }
    }

    /// IDENTIFY DEVICE data.
    pub fn identify(&mut self) -> Result<[u8; 512], String> {
        let n = self.size()?;
        Ok(identify("ENSPEED-SATA", "EnSpeed SATA disk", Some(n)))
    }

    /// Whether `count` sectors from `lba` lie on the disk.
    pub fn in_range(&mut self, lba: u64, count: u64) -> Result<bool, String> {
        let n = self.size()?;
        Ok(lba.checked_add(count).is_some_and(|end| end <= n))
    }

    /// Reads `count` sectors from `lba`.
    pub fn read(&mut self, lba: u64, count: u64) -> Result<Vec<u8>, String> {
        let len = (count * SECTOR) as usize;
        match &mut self.store {
            Store::File { file, .. } => {
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, lba * SECTOR)
                    .map_err(|e| e.to_string())?;
                Ok(buf)
            }
            Store::VhostUser(s) => {
                let mut out = Vec::with_capacity(len);
                let step = (REQUEST_BYTES as u64) / SECTOR;
                let mut at = 0;
                while at < count {
                    let n = step.min(count - at);
                    let part = s.request(Request::Read, lba + at, &[], (n * SECTOR) as usize)?;
                    out.extend_from_slice(&part);
                    at += n;
                }
                Ok(out)
            }
        }
    }

    /// Writes `data` (whole sectors) at `lba`.
    pub fn write(&mut self, lba: u64, data: &[u8]) -> Result<(), String> {
        match &mut self.store {
            Store::File { readonly: true, .. } => Err("the disk is read-only".into()),
            Store::File { file, .. } => file
                .write_all_at(data, lba * SECTOR)
                .map_err(|e| e.to_string()),
            Store::VhostUser(s) => {
                for (i, part) in data.chunks(REQUEST_BYTES).enumerate() {
                    let sector = lba + (i * REQUEST_BYTES) as u64 / SECTOR;
                    s.request(Request::Write, sector, part, 0)?;
                }
                Ok(())
            }
        }
    }

    /// Makes written data durable.
    pub fn flush(&mut self) -> Result<(), String> {
        match &mut self.store {
            Store::File { file, .. } => file.sync_data().map_err(|e| e.to_string()),
            Store::VhostUser(s) => s.request(Request::Flush, 0, &[], 0).map(|_| ()),
        }
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
