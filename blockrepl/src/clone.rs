//! Filling a new disk with another disk's data (a VM clone): only the parts of the source
//! file that hold data are read and written (`SEEK_DATA`/`SEEK_HOLE`), so a mostly empty
//! disk copies in time proportional to what was written to it, and the copy stays sparse.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// The largest piece read and written at once.
const CHUNK: usize = 1 << 20;

/// Where the next data at or after `offset` starts, and where it ends; `None` past the last.
pub fn next_data(f: &File, offset: u64, len: u64) -> io::Result<Option<(u64, u64)>> {
    if offset >= len {
        return Ok(None);
    }
    let fd = f.as_raw_fd();
    // SAFETY: lseek on a descriptor we own; no memory is passed.
    let start = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_DATA) };
    if start < 0 {
        let e = io::Error::last_os_error();
        // ENXIO: no data after `offset`.
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    // SAFETY: as above.
    let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
    if end < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some(((start as u64).min(len), (end as u64).min(len))))
}

/// Copies the first `len` bytes of `src` into `dst` (which must be at least that long and
/// read as zeros where `src` has holes), syncs `dst`, and answers how many bytes held data.
pub fn copy_data(src: &Path, dst: &Path, len: u64) -> io::Result<u64> {
    let from = File::open(src)?;
    let to = std::fs::OpenOptions::new().write(true).open(dst)?;
    let mut buf = vec![0u8; CHUNK];
    let mut copied = 0u64;
    let mut at = 0u64;
    while let Some((start, end)) = next_data(&from, at, len)? {
        let mut pos = start;
        while pos < end {
            let n = ((end - pos) as usize).min(CHUNK);
            from.read_exact_at(&mut buf[..n], pos)?;
            // Zeros inside a data extent need no write: the new file reads zeros there.
            if buf[..n].iter().any(|&b| b != 0) {
                to.write_all_at(&buf[..n], pos)?;
            }
            pos += n as u64;
            copied += n as u64;
        }
        at = end;
    }
    to.sync_all()?;
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_is_copied_and_holes_stay_holes() {
        let dir = std::env::temp_dir().join(format!("clone-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        let len = 64u64 << 20;
        let src = File::create(&a).unwrap();
        src.set_len(len).unwrap();
        for (off, byte) in [
            (0u64, 1u8),
            (5 << 20, 2),
            ((40 << 20) + 4096, 3),
            (len - 512, 4),
        ] {
            src.write_all_at(&vec![byte; 512], off).unwrap();
        }
        File::create(&b).unwrap().set_len(len).unwrap();
        let n = copy_data(&a, &b, len).unwrap();
        assert!(n < len / 4, "only the written extents were read: {n}");
        assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());
        use std::os::unix::fs::MetadataExt;
        assert!(
            std::fs::metadata(&b).unwrap().blocks() * 512 < len / 4,
            "the copy stays sparse"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
