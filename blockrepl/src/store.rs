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
            format!(
                "{len} bytes at offset {offset} lie beyond the end of the disk ({capacity} bytes)"
            ),
        )),
    }
}

/// Writes `data` at `offset` of `file`, or, when `data` is whole 4 KiB blocks of zeros,
/// punches a hole there instead: reads return the same zeros, and a full sync of a new disk
/// (mostly zeros) leaves no gigabytes of dirty pages for the kernel to write back, which
/// otherwise hold up every other fsync on the machine (the control plane's included).
/// Falls back to writing where the file system cannot punch holes.
pub fn write_or_punch(file: &File, data: &[u8], offset: u64) -> io::Result<()> {
    const BLOCK: usize = 4096;
    let whole = !data.is_empty() && data.len() % BLOCK == 0 && offset % BLOCK as u64 == 0;
    if whole && data.iter().all(|b| *b == 0) {
        use std::os::fd::AsRawFd;
        let (Ok(off), Ok(len)) = (
            libc::off_t::try_from(offset),
            libc::off_t::try_from(data.len()),
        ) else {
            return file.write_all_at(data, offset);
        };
        // SAFETY: fallocate on our own open descriptor; it touches no memory of ours.
        let r = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
        };
        if r == 0 {
            return Ok(());
        }
    }
    file.write_all_at(data, offset)
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
        Ok(FileStore {
            file,
            capacity,
            read_only,
            id,
        })
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
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "the disk is read-only",
                ));
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
    fn zeros_become_a_hole_that_reads_back_as_zeros() {
        let dir = std::env::temp_dir().join(format!("enspeed-punch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(1 << 20).unwrap();
        write_or_punch(&f, &vec![0xab; 64 << 10], 0).unwrap();
        write_or_punch(&f, &vec![0; 32 << 10], 16 << 10).unwrap();
        // Not whole blocks: written, not punched.
        write_or_punch(&f, &[0; 100], 100).unwrap();
        let mut buf = vec![0u8; 64 << 10];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf[200..16 << 10].iter().all(|b| *b == 0xab));
        assert!(buf[..100].iter().all(|b| *b == 0xab));
        assert!(buf[100..200].iter().all(|b| *b == 0));
        assert!(buf[16 << 10..48 << 10].iter().all(|b| *b == 0));
        assert!(buf[48 << 10..].iter().all(|b| *b == 0xab));
        assert_eq!(f.metadata().unwrap().len(), 1 << 20, "the size stays");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ranges_beyond_the_end_are_refused() {
        assert!(check_range(4096, 0, 4096).is_ok());
        assert!(check_range(4096, 512, 4096).is_err());
        assert!(check_range(4096, u64::MAX, 1).is_err());
    }
}
