//! Copy back: a powered-off VM's disks copied, on their primary server, from blockd's copies
//! into this server's library as raw disk images (sparse: only where the disks hold data),
//! for a new appliance (`state_machine::TaskKind::CopyBack`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::library::{Sealed, Shelf, Upload};

/// The data file of disk copy `name` in blockd's data directory `blockd_dir` (through the
/// link to its pool, if it lives in one).
pub fn data_file(blockd_dir: &Path, name: &str) -> PathBuf {
    blockd_dir.join(name).join("data")
}

/// Copies each of `disks` (a data file and the disk's size) into library directory `library`:
/// sealed images, Disk0 first, to put in place once the appliance is listed. `progress` hears
/// the bytes done (holes included) now and then; `cancel` stops it.
pub fn copy_disks(
    disks: &[(PathBuf, u64)],
    library: &Path,
    cancel: &AtomicBool,
    progress: &dyn Fn(u64),
) -> Result<Vec<Sealed>, String> {
    let mut out = Vec::new();
    let mut done = 0u64;
    let mut told = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    for (i, (path, size)) in disks.iter().enumerate() {
        let what = |e: std::io::Error| format!("Disk{i} ({}): {e}", path.display());
        let f = File::open(path).map_err(what)?;
        let mut up = Upload::new(library, Shelf::Image).map_err(what)?;
        let mut at = 0u64;
        loop {
            let next = blockrepl::clone::next_data(&f, at, *size).map_err(what)?;
            let (start, end) = next.unwrap_or((*size, *size));
            up.skip_zeros(start - at);
            at = start;
            while at < end {
                if cancel.load(Ordering::Relaxed) {
                    return Err("cancelled".into());
                }
                let n = ((end - at) as usize).min(buf.len());
                f.read_exact_at(&mut buf[..n], at).map_err(what)?;
                up.write(&buf[..n]).map_err(what)?;
                at += n as u64;
                if told.elapsed() > Duration::from_secs(2) {
                    progress(done + at);
                    told = Instant::now();
                }
            }
            if next.is_none() {
                break;
            }
        }
        done += size;
        progress(done);
        out.push(up.seal().map_err(what)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_disk_is_copied_to_an_image_of_the_same_bytes_and_hash() {
        let dir = std::env::temp_dir().join(format!("enspeed-copyback-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let data = dir.join("data");
        let f = File::create(&data).unwrap();
        let size = 9u64 << 20;
        f.set_len(size).unwrap();
        f.write_all_at(b"first", 0).unwrap();
        f.write_all_at(&[7u8; 3 << 20], 5 << 20).unwrap();
        let lib = dir.join("lib");
        let cancel = AtomicBool::new(false);
        let seen = std::sync::Mutex::new(Vec::new());
        let sealed = copy_disks(&[(data.clone(), size)], &lib, &cancel, &|n| {
            seen.lock().unwrap().push(n)
        })
        .unwrap();
        assert_eq!(seen.lock().unwrap().last(), Some(&size));
        let s = &sealed[0];
        assert_eq!(s.size, size);
        assert_eq!(
            crate::library::hash_file(&data, Shelf::Image).unwrap(),
            (s.sha256.clone(), size)
        );
        assert_eq!(
            std::fs::read(s.path()).unwrap(),
            std::fs::read(&data).unwrap()
        );
        cancel.store(true, Ordering::Relaxed);
        let stopped = copy_disks(&[(data, size)], &lib, &cancel, &|_| {});
        assert_eq!(stopped.err().as_deref(), Some("cancelled"));
        drop(sealed);
        // Nothing is left of either: the sealed copy was dropped, the cancelled one too.
        assert_eq!(std::fs::read_dir(&lib).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
