//! Point-in-time images of backup copies, made while the copies go on taking their primary's
//! writes (a live backup): copy before write. From the moment a snapshot starts, each 64 KiB
//! chunk of the copy goes into the image once, as it was then: by the copier, which walks the
//! copy's data, or by a mirrored write about to change a chunk not copied yet, which copies it
//! first. The guest's writes are never held for the copier; the first write to a chunk pays
//! one read and one write of that chunk.
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

/// The unit copied into an image.
pub const CHUNK: u64 = 64 << 10;

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

/// Which chunks are in the image, and how far the copier got.
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

/// A point-in-time image of one copy, being made.
pub struct Snapshot {
    image: File,
    capacity: u64,
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
        let chunks = capacity.div_ceil(CHUNK);
        Ok(Snapshot {
            image,
            capacity,
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

    /// Copies chunk `c` of `data` into the image unless it is there; whether it copied it.
    fn copy_chunk(&self, st: &mut Chunks, data: &File, c: u64, buf: &mut [u8]) -> io::Result<bool> {
        if st.has(c) {
            return Ok(false);
        }
        let at = c * CHUNK;
        let n = (self.capacity - at).min(CHUNK) as usize;
        data.read_exact_at(&mut buf[..n], at)?;
        // Zeros stay a hole: the image reads zeros there already.
        if buf[..n].iter().any(|b| *b != 0) {
            self.image.write_all_at(&buf[..n], at)?;
        }
        st.mark(c);
        Ok(true)
    }

    /// Before `len` bytes of `data` at `offset` change: their chunks not in the image yet are
    /// copied as they are now.
    pub fn preserve(&self, data: &File, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 || offset >= self.capacity {
            return Ok(());
        }
        let end = (offset + len).min(self.capacity);
        let mut buf = vec![0u8; CHUNK as usize];
        let mut st = lock(&self.chunks);
        if st.progress.finished || st.progress.error.is_some() {
            return Ok(());
        }
        for c in offset / CHUNK..end.div_ceil(CHUNK) {
            if self.copy_chunk(&mut st, data, c, &mut buf)? {
                st.progress.saved_by_writes += 1;
            }
        }
        Ok(())
    }

    /// The copier: every chunk of `data` that holds data and is not in the image yet, in
    /// order; then the image is made durable. Stops when cancelled.
    pub fn run(&self, data: &File) -> Result<(), String> {
        let mut buf = vec![0u8; CHUNK as usize];
        let mut at = 0u64;
        let r = (|| {
            while let Some((start, end)) =
                crate::clone::next_data(data, at, self.capacity).map_err(|e| e.to_string())?
            {
                for c in start / CHUNK..end.div_ceil(CHUNK) {
                    if self.cancel.load(Ordering::Relaxed) {
                        return Err("cancelled".to_string());
                    }
                    // A chunk at a time under the lock: a write waits for one chunk at most.
                    let mut st = lock(&self.chunks);
                    self.copy_chunk(&mut st, data, c, &mut buf)
                        .map_err(|e| format!("copying at {}: {e}", c * CHUNK))?;
                    st.progress.done = ((c + 1) * CHUNK).min(self.capacity);
                }
                at = end;
            }
            self.image
                .sync_all()
                .map_err(|e| format!("making the image durable: {e}"))
        })();
        let mut st = lock(&self.chunks);
        match &r {
            Ok(()) => {
                st.progress.done = self.capacity;
                st.progress.finished = true;
            }
            Err(e) => st.progress.error = Some(e.clone()),
        }
        r
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
        s.run(&data).unwrap();
        let p = s.progress();
        assert!(p.finished && p.error.is_none() && p.done == size, "{p:?}");
        assert!(p.saved_by_writes >= 4, "{p:?}");
        assert_eq!(std::fs::read(dir.join("image")).unwrap(), before);
        // Another, cancelled before it runs: it says so.
        let t = Snapshot::new(&dir.join("image2"), size).unwrap();
        t.cancel();
        assert_eq!(t.run(&data).err().as_deref(), Some("cancelled"));
        assert_eq!(t.progress().error.as_deref(), Some("cancelled"));
        assert!(
            Snapshot::new(&dir.join("image"), size).is_err(),
            "never over a file"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
