//! A block store: what the vhost-user-blk backend serves to a guest.
//!
//! Reads are synchronous and local. Writes and flushes complete through a
//! callback, possibly on another thread, so that a replicated store can finish
//! a request when its backup acknowledges it while the backend goes on taking
//! new requests from the guest.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Called exactly once when a write or flush is complete, from any thread.
pub type Done = Box<dyn FnOnce(io::Result<()>) + Send>;

/// A disk a guest can use.
pub trait BlockStore: Send + Sync + 'static {
    /// Size in bytes, a multiple of 512.
    fn capacity(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool {
        false
    }
    /// The identity the guest reads with VIRTIO_BLK_T_GET_ID (at most 20 bytes used).
    fn device_id(&self) -> String;
    /// Reads `buf.len()` bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `data` at `offset`; with `fua`, completes only once it is durable.
    fn write(&self, offset: u64, data: Vec<u8>, fua: bool, done: Done);
    /// Completes once every write completed before it is durable.
    fn flush(&self, done: Done);
}

/// Checks that `len` bytes at `offset` lie inside a disk of `capacity` bytes.
pub fn check_range(capacity: u64, offset: u64, len: usize) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{len} bytes at offset {offset} lie beyond the end of the disk ({capacity} bytes)"),
        )),
    }
}

/// A plain local file, not replicated.
pub struct FileStore {
    file: File,
    capacity: u64,
    read_only: bool,
    id: String,
}

impl FileStore {
    /// Opens `path`; its size, rounded down to 512 bytes, is the capacity.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let capacity = file.metadata()?.len() & !511;
        let id = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(FileStore { file, capacity, read_only, id })
    }
}

impl BlockStore for FileStore {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn device_id(&self) -> String {
        self.id.clone()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(self.capacity, offset, buf.len())?;
        self.file.read_exact_at(buf, offset)
    }

    fn write(&self, offset: u64, data: Vec<u8>, fua: bool, done: Done) {
        let result = (|| {
            if self.read_only {
                return Err(io::Error::new(io::ErrorKind::PermissionDenied, "the disk is read-only"));
            }
            check_range(self.capacity, offset, data.len())?;
            self.file.write_all_at(&data, offset)?;
            if fua {
                self.file.sync_data()?;
            }
            Ok(())
        })();
        done(result);
    }

    fn flush(&self, done: Done) {
        done(self.file.sync_data());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_beyond_the_end_are_refused() {
        assert!(check_range(4096, 0, 4096).is_ok());
        assert!(check_range(4096, 512, 4096).is_err());
        assert!(check_range(4096, u64::MAX, 1).is_err());
    }
}
