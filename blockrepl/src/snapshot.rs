//! Point-in-time images of backup copies, made while the copies go on taking their primary's
//! writes (a live backup): copy before write. From the moment a snapshot starts, each 4 KiB
//! chunk of the copy (larger past 1 TiB) goes into the image once, as it was then: by the
//! copier, which walks the copy's data at a bounded rate, or by a mirrored write about to
//! change a chunk not copied yet, which copies it first. The guest's writes never wait for the
//! copier's I/O; the first write to a chunk pays one read and one write of that chunk.
//!
//! Several copies (a VM's disks) start together, under each copy's write gate at once
//! (`Replica::gate`): since a backup applies a write before it is acknowledged, and a guest
//! issues a write that depends on another only once that one is acknowledged, the images hold
//! every write acknowledged before the start and, of the writes in flight then, never one
//! without those it depends on: crash-consistent across the disks.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::replica::lock;

/// The smallest unit copied into an image (a disk past 1 TiB uses larger ones, so that the
/// map of what is copied stays within 32 MiB).
pub const MIN_CHUNK: u64 = 4 << 10;

/// The copier's reads.
const BATCH: u64 = 1 << 20;

/// Where a snapshot stands (in a disk's status).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotProgress {
    /// The image being made.
    pub image: PathBuf,
    /// Bytes of the copy walked by the copier so far.
    pub done: u64,
    /// Bytes in all.
    pub total: u64,
    /// Chunks copied ahead of a write.
    pub saved_by_writes: u64,
    /// Whole: the image holds the copy as it was at the start.
    pub finished: bool,
    /// Why it failed or stopped, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Which chunks are in the image (or on their way there), and how far the copier got.
struct Chunks {
    copied: Vec<u64>,
    progress: SnapshotProgress,
}

impl Chunks {
    fn has(&self, c: u64) -> bool {
        self.copied[(c / 64) as usize] & (1 << (c % 64)) != 0
    }

    fn mark(&mut self, c: u64) {
        self.copied[(c / 64) as usize] |= 1 << (c % 64);
    }
}

/// How fast a copier goes unless told: most of a disk's bandwidth stays the guest's.
pub const DEFAULT_RATE: u64 = 16 << 20;

/// Has the kernel start writing `f`'s dirty pages out, without waiting for them: the image's
/// pages never pile up into one long write-out that a sync of the copy would queue behind.
fn start_writeback(f: &File) {
    use std::os::unix::io::AsRawFd;
    // SAFETY: sync_file_range on a descriptor we own, whole file, no memory passed.
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// A point-in-time image of one copy, being made.
///
/// A chunk is marked (under the lock, nothing else) by whichever comes first: a write about
/// to change it, which then copies it itself before changing it, or the copier, which read it
/// before taking the lock: since a write marks a chunk before it changes it, a chunk the
/// copier finds unmarked was not changed while it read it. Neither holds the lock over I/O.
/// Both may write the same old bytes to the image; never other bytes.
pub struct Snapshot {
    image: File,
    capacity: u64,
    chunk: u64,
    chunks: Mutex<Chunks>,
    cancel: AtomicBool,
}

impl Snapshot {
    /// Starts an image of a copy of `capacity` bytes in the new file `path` (sparse, the
    /// copy's size). Its copy must be under its write gate until it is installed.
    pub fn new(path: &Path, capacity: u64) -> io::Result<Snapshot> {
        let image = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        image.set_len(capacity)?;
        let chunk = (capacity >> 28).next_power_of_two().max(MIN_CHUNK);
        let chunks = capacity.div_ceil(chunk);
        Ok(Snapshot {
            image,
            capacity,
            chunk,
            chunks: Mutex::new(Chunks {
                copied: vec![0; chunks.div_ceil(64) as usize],
                progress: SnapshotProgress {
                    image: path.to_path_buf(),
                    total: capacity,
                    ..Default::default()
                },
            }),
            cancel: AtomicBool::new(false),
        })
    }

    /// Writes `bytes` (what the copy held at `at`) into the image; zeros stay a hole.
    fn put(&self, bytes: &[u8], at: u64) -> io::Result<()> {
        if bytes.iter().any(|b| *b != 0) {
            self.image.write_all_at(bytes, at)?;
        }
        Ok(())
    }

    /// Before `len` bytes of `data` at `offset` change: their chunks not in the image yet are
    /// copied as they are now. Called by the one thread that changes the copy.
    pub fn preserve(&self, data: &File, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 || offset >= self.capacity {
            return Ok(());
        }
        let end = (offset + len).min(self.capacity);
        let mine: Vec<u64> = {
            let mut st = lock(&self.chunks);
            if st.progress.finished || st.progress.error.is_some() {
                return Ok(());
            }
            let mine: Vec<u64> = (offset / self.chunk..end.div_ceil(self.chunk))
                .filter(|c| !st.has(*c))
                .collect();
            for c in &mine {
                st.mark(*c);
            }
            st.progress.saved_by_writes += mine.len() as u64;
            mine
        };
        let mut buf = vec![0u8; self.chunk as usize];
        for c in mine {
            let at = c * self.chunk;
            let n = (self.capacity - at).min(self.chunk) as usize;
            let copied = data
                .read_exact_at(&mut buf[..n], at)
                .and_then(|()| self.put(&buf[..n], at));
            if let Err(e) = copied {
                // Marked but not copied: the image is not the copy at its start any more.
                self.fail(format!("copying {n} bytes at {at} ahead of a write: {e}"));
                return Err(e);
            }
        }
        Ok(())
    }

    /// Ends it failed (the image is no longer the copy at the start): the copier stops.
    pub fn fail(&self, why: String) {
        let mut st = lock(&self.chunks);
        st.progress.error.get_or_insert(why);
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// The copier: every chunk of `data` that holds data and is not in the image yet, in
    /// order, at most `rate` bytes a second, the image's pages written out as it goes (so
    /// that the disk keeps room for the copy's own syncs). Stops when cancelled. Once it is
    /// through, the snapshot is taken out of its copy's write path and `finish` makes the
    /// image whole.
    pub fn run(&self, data: &File, rate: u64) -> Result<(), String> {
        let mut buf = vec![0u8; BATCH as usize];
        let mut at = 0u64;
        let started = std::time::Instant::now();
        let (mut copied, mut unflushed) = (0u64, 0u64);
        let r = (|| {
            while let Some((start, end)) =
                crate::clone::next_data(data, at, self.capacity).map_err(|e| e.to_string())?
            {
                let mut pos = start / self.chunk * self.chunk;
                let end = (end.div_ceil(self.chunk) * self.chunk).min(self.capacity);
                while pos < end {
                    if self.cancel.load(Ordering::Relaxed) {
                        return Err("cancelled".to_string());
                    }
                    let n = (end - pos).min(BATCH);
                    data.read_exact_at(&mut buf[..n as usize], pos)
                        .map_err(|e| format!("reading at {pos}: {e}"))?;
                    let mine: Vec<u64> = {
                        let mut st = lock(&self.chunks);
                        let first = pos / self.chunk;
                        let mine: Vec<u64> = (first..(pos + n).div_ceil(self.chunk))
                            .filter(|c| !st.has(*c))
                            .collect();
                        for c in &mine {
                            st.mark(*c);
                        }
                        st.progress.done = pos + n;
                        mine
                    };
                    for c in mine {
                        let from = (c * self.chunk - pos) as usize;
                        let to = (from + self.chunk as usize).min(n as usize);
                        self.put(&buf[from..to], c * self.chunk)
                            .map_err(|e| format!("writing the image at {}: {e}", c * self.chunk))?;
                    }
                    pos += n;
                    copied += n;
                    unflushed += n;
                    if unflushed >= 8 << 20 {
                        start_writeback(&self.image);
                        unflushed = 0;
                    }
                    // At most `rate` bytes a second, on average since the start.
                    let due =
                        std::time::Duration::from_secs_f64(copied as f64 / rate.max(1) as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
                at = end;
            }
            Ok(())
        })();
        let mut st = lock(&self.chunks);
        match (&r, &st.progress.error) {
            (Ok(()), Some(e)) => Err(e.clone()),
            (Ok(()), None) => Ok(()),
            (Err(e), _) => {
                st.progress.error.get_or_insert(e.clone());
                r
            }
        }
    }

    /// Makes the image durable and says it is whole: once the copier is through and no write
    /// can copy ahead any more (the snapshot is out of its copy's write path), so that the
    /// image's bytes never change after it says so.
    pub fn finish(&self) -> Result<(), String> {
        if let Err(e) = self.image.sync_all() {
            let why = format!("making the image durable: {e}");
            self.fail(why.clone());
            return Err(why);
        }
        let mut st = lock(&self.chunks);
        if let Some(e) = &st.progress.error {
            return Err(e.clone());
        }
        st.progress.done = self.capacity;
        st.progress.finished = true;
        Ok(())
    }

    /// Stops the copier.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Where it stands.
    pub fn progress(&self) -> SnapshotProgress {
        lock(&self.chunks).progress.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_is_the_copy_at_the_start_whatever_is_written_meanwhile() {
        let dir = std::env::temp_dir().join(format!("enspeed-snap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let size = 4u64 << 20;
        let data = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("data"))
            .unwrap();
        data.set_len(size).unwrap();
        let mut before = vec![0u8; size as usize];
        for (i, b) in before.iter_mut().enumerate().take(3 << 20).skip(1 << 20) {
            *b = (i % 251) as u8 + 1;
        }
        data.write_all_at(&before, 0).unwrap();
        let s = Snapshot::new(&dir.join("image"), size).unwrap();
        // Writes after the start, some into chunks with data, some into a hole, one across
        // the end of the copier's reach: preserved first, then applied.
        for (off, len) in [
            (1 << 20, 4096u64),
            ((3 << 20) + 5, 70_000),
            (100, 10),
            (size - 10, 10),
        ] {
            s.preserve(&data, off, len).unwrap();
            data.write_all_at(&vec![0xee; len as usize], off).unwrap();
        }
        s.run(&data, u64::MAX).unwrap();
        assert!(!s.progress().finished, "whole only once finished");
        s.finish().unwrap();
        let p = s.progress();
        assert!(p.finished && p.error.is_none() && p.done == size, "{p:?}");
        assert!(p.saved_by_writes >= 4, "{p:?}");
        assert_eq!(std::fs::read(dir.join("image")).unwrap(), before);
        // Another, cancelled before it runs: it says so.
        let t = Snapshot::new(&dir.join("image2"), size).unwrap();
        t.cancel();
        assert_eq!(t.run(&data, u64::MAX).err().as_deref(), Some("cancelled"));
        assert_eq!(t.progress().error.as_deref(), Some("cancelled"));
        assert!(
            Snapshot::new(&dir.join("image"), size).is_err(),
            "never over a file"
        );
        // One failed ahead of a write (or promoted): the copier says so, never "finished".
        let u = Snapshot::new(&dir.join("image3"), size).unwrap();
        u.fail("the copy was promoted".into());
        assert!(u.run(&data, u64::MAX).is_err());
        assert!(u.finish().is_err());
        assert!(!u.progress().finished);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
