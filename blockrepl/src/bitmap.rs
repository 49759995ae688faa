//! The persisted bitmap of regions that may differ from the peer.
//!
//! One bit per region of the disk. A bit is set, and made durable, before any
//! write to its region is issued; bits are cleared only once both copies are
//! known to hold the region durably (after a resync, or a flush of both sides
//! with no write to the region in between). A crash therefore never loses a
//! set bit that matters: the write it covers was not issued before the bit was
//! on disk. The file is written in 4 KiB pages; one update changes one page
//! (setting) or clears bits only (cleaning), so a page torn by a crash holds,
//! sector by sector, either the old or the new bits, both of them safe.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const PAGE: usize = 4096;

/// The bitmap and its file.
pub struct Bitmap {
    path: PathBuf,
    file: File,
    bits: Vec<u8>,
    regions: u64,
}

fn err(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("bitmap {}: {e}", path.display()))
}

impl Bitmap {
    /// Opens (creating if needed) the bitmap for `regions` regions.
    pub fn open(path: &Path, regions: u64) -> io::Result<Bitmap> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| err(path, e))?;
        let bytes = regions.div_ceil(8) as usize;
        let padded = bytes.div_ceil(PAGE).max(1) * PAGE;
        if file.metadata().map_err(|e| err(path, e))?.len() < padded as u64 {
            file.set_len(padded as u64).map_err(|e| err(path, e))?;
        }
        let mut bits = vec![0u8; padded];
        file.read_exact_at(&mut bits, 0).map_err(|e| err(path, e))?;
        // Bits past the last region mean nothing.
        for r in regions..(padded as u64 * 8) {
            bits[(r / 8) as usize] &= !(1 << (r % 8));
        }
        Ok(Bitmap {
            path: path.to_owned(),
            file,
            bits,
            regions,
        })
    }

    /// Number of regions.
    pub fn regions(&self) -> u64 {
        self.regions
    }

    /// Whether region `r` is set.
    pub fn get(&self, r: u64) -> bool {
        r < self.regions && self.bits[(r / 8) as usize] & (1 << (r % 8)) != 0
    }

    /// Number of set regions.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    /// Set regions, in order.
    pub fn set_regions(&self) -> Vec<u64> {
        (0..self.regions).filter(|&r| self.get(r)).collect()
    }

    /// The bits as bytes (region r is bit r % 8 of byte r / 8), without padding.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bits[..self.regions.div_ceil(8) as usize].to_vec()
    }

    /// Sets regions `first..=last` and makes them durable before returning;
    /// returns false (and writes nothing) when they were all set already.
    pub fn set_range(&mut self, first: u64, last: u64) -> io::Result<bool> {
        let mut dirty_pages = Vec::new();
        let mut newly = Vec::new();
        for r in first..=last.min(self.regions.saturating_sub(1)) {
            if !self.get(r) {
                self.bits[(r / 8) as usize] |= 1 << (r % 8);
                newly.push(r);
                let page = (r / 8) as usize / PAGE;
                if dirty_pages.last() != Some(&page) {
                    dirty_pages.push(page);
                }
            }
        }
        if dirty_pages.is_empty() {
            return Ok(false);
        }
        if let Err(e) = self.write_pages(&dirty_pages) {
            // Not durable: not set either, so the next write to these regions tries again
            // rather than taking them for marked.
            for r in newly {
                self.bits[(r / 8) as usize] &= !(1 << (r % 8));
            }
            return Err(e);
        }
        Ok(true)
    }

    /// Sets every region (a full sync is owed) durably.
    pub fn set_all(&mut self) -> io::Result<()> {
        self.set_range(0, self.regions.saturating_sub(1))
            .map(|_| ())
    }

    /// Clears `regions` durably.
    pub fn clear(&mut self, regions: &[u64]) -> io::Result<()> {
        let mut dirty_pages = Vec::new();
        for &r in regions {
            if self.get(r) {
                self.bits[(r / 8) as usize] &= !(1 << (r % 8));
                let page = (r / 8) as usize / PAGE;
                if !dirty_pages.contains(&page) {
                    dirty_pages.push(page);
                }
            }
        }
        if dirty_pages.is_empty() {
            return Ok(());
        }
        self.write_pages(&dirty_pages)
    }

    fn write_pages(&self, pages: &[usize]) -> io::Result<()> {
        for &p in pages {
            let range = p * PAGE..(p + 1) * PAGE;
            self.file
                .write_all_at(&self.bits[range], (p * PAGE) as u64)
                .map_err(|e| err(&self.path, e))?;
        }
        self.file.sync_data().map_err(|e| err(&self.path, e))
    }
}

/// The regions set in a bitmap given as bytes (see [`Bitmap::to_bytes`]),
/// below `regions`.
pub fn regions_in(bytes: &[u8], regions: u64) -> Vec<u64> {
    (0..regions)
        .filter(|&r| {
            bytes
                .get((r / 8) as usize)
                .is_some_and(|b| b & (1 << (r % 8)) != 0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("blockrepl-bitmap-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("bitmap")
    }

    #[test]
    fn bits_persist_and_clear() {
        let p = scratch("persist");
        let mut b = Bitmap::open(&p, 100_000).unwrap();
        assert_eq!(b.count(), 0);
        assert!(b.set_range(3, 5).unwrap());
        assert!(!b.set_range(4, 4).unwrap(), "already set: nothing to write");
        assert!(b.set_range(99_999, 200_000).unwrap());
        drop(b);
        let mut b = Bitmap::open(&p, 100_000).unwrap();
        assert_eq!(b.set_regions(), vec![3, 4, 5, 99_999]);
        b.clear(&[4, 99_999]).unwrap();
        drop(b);
        let b = Bitmap::open(&p, 100_000).unwrap();
        assert_eq!(b.set_regions(), vec![3, 5]);
        assert_eq!(regions_in(&b.to_bytes(), b.regions()), vec![3, 5]);
    }

    #[test]
    fn short_peer_bitmaps_are_read_safely() {
        assert_eq!(regions_in(&[0b101], 64), vec![0, 2]);
        assert_eq!(regions_in(&[0xff], 3), vec![0, 1, 2]);
        assert!(regions_in(&[], 64).is_empty());
    }
}
