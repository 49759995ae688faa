//! The ISO library's files. Every VM server keeps a copy of every ISO image in its data
//! directory's `isos/`, named by the image's SHA-256 (`<sha256>.iso`), so a VM's CD-ROM is
//! found on whichever server the VM runs, after a failover too.
//!
//! - An upload is written by the server that takes it (`Upload`): into a `.part` file, hashed
//!   as it arrives and synced; the API records it (`Action::AddIso`) as held by that server,
//!   then renames it into place (before, the clean-up below could take it for a deleted one).
//! - The other servers' agents (`Sync`) copy it from a server holding it, over its client
//!   port (`{"op":"iso_file","sha256":...}`, answered by one line, then the bytes), check its
//!   SHA-256 and size, and record that they hold it (`Command::IsoHeld`).
//! - Files no ISO names any more are deleted.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};

use enspeed_trust::TlsStream;

use crate::peers::Peers;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::state_machine::{IsoRecord, StateMachine};

/// The library's directory under a server's data directory.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("isos")
}

/// Whether `sha256` is a SHA-256 in hex (and so safe as a file name).
pub fn is_sha256(sha256: &str) -> bool {
    sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The file of the image with `sha256` in library directory `dir`.
pub fn file(dir: &Path, sha256: &str) -> PathBuf {
    dir.join(format!("{}.iso", sha256.to_ascii_lowercase()))
}

/// A file being received: hashed as written, put in place only when whole.
pub struct Upload {
    dir: PathBuf,
    part: PathBuf,
    out: File,
    hash: Sha256,
    size: u64,
    sealed: bool,
}

impl Upload {
    /// Starts a file in library directory `dir`.
    pub fn new(dir: &Path) -> io::Result<Upload> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        std::fs::create_dir_all(dir)?;
        // A unique name per upload: several may run at once.
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let part = dir.join(format!(".upload-{}-{n}.part", std::process::id()));
        let out = File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&part)?;
        Ok(Upload {
            dir: dir.to_path_buf(),
            part,
            out,
            hash: Sha256::new(),
            size: 0,
            sealed: false,
        })
    }

    /// Appends `bytes`.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.hash.update(bytes);
        self.size += bytes.len() as u64;
        Ok(())
    }

    /// Bytes so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The SHA-256 of the bytes so far, hex.
    pub fn sha256(&self) -> String {
        hex(&self.hash.clone().finalize())
    }

    /// Makes the file durable, still under its temporary name: an image is put in place
    /// (`Sealed::place`) only once the library lists it, or the agent's clean-up, which deletes
    /// unlisted images, could take it first.
    pub fn seal(mut self) -> io::Result<Sealed> {
        self.out.sync_all()?;
        self.sealed = true;
        Ok(Sealed {
            sha256: self.sha256(),
            size: self.size,
            dir: self.dir.clone(),
            part: self.part.clone(),
            placed: false,
        })
    }
}

impl Drop for Upload {
    /// An upload abandoned before `seal` leaves nothing behind.
    fn drop(&mut self) {
        if !self.sealed {
            let _ = std::fs::remove_file(&self.part);
        }
    }
}

/// A whole, durable upload waiting to be put in place; dropped, it is deleted.
pub struct Sealed {
    /// SHA-256 of its content, hex.
    pub sha256: String,
    /// Bytes.
    pub size: u64,
    dir: PathBuf,
    part: PathBuf,
    placed: bool,
}

impl Sealed {
    /// Renames it to `<sha256>.iso`, durably.
    pub fn place(mut self) -> io::Result<()> {
        std::fs::rename(&self.part, file(&self.dir, &self.sha256))?;
        self.placed = true;
        File::open(&self.dir)?.sync_all()
    }
}

impl Drop for Sealed {
    fn drop(&mut self) {
        if !self.placed {
            let _ = std::fs::remove_file(&self.part);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What an `iso_file` answer says before the image's bytes.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct IsoFileHead {
    /// The image's bytes that follow.
    size: u64,
}

/// Serves `{"op":"iso_file","sha256":...}` on a client connection: one answer line with the
/// size, then the file's bytes.
pub fn serve_file(mut w: TlsStream, dir: Option<&Path>, sha256: &str) {
    let open = || -> Result<(File, u64), String> {
        if !is_sha256(sha256) {
            return Err(format!("{sha256:?} is not a SHA-256"));
        }
        let dir = dir.ok_or("this server keeps no library")?;
        let path = file(dir, sha256);
        let f = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let size = f.metadata().map_err(|e| e.to_string())?.len();
        Ok((f, size))
    };
    match open() {
        Err(e) => {
            let _ = crate::api::answer_line(&mut w, &crate::api::Response::err(e));
        }
        Ok((mut f, size)) => {
            let head = crate::api::Response::ok(json!(IsoFileHead { size }));
            if crate::api::answer_line(&mut w, &head).is_ok() {
                let _ = io::copy(&mut f, &mut w);
            }
        }
    }
}

/// Copies the image `iso` from the server at `address` into library directory `dir`,
/// checking its size and SHA-256; `progress` gets the bytes copied so far.
pub fn fetch(
    peers: &Peers,
    address: &str,
    dir: &Path,
    iso: &IsoRecord,
    progress: &dyn Fn(u64),
) -> Result<(), String> {
    let what = |e: String| format!("ISO {} from {address}: {e}", iso.name);
    let req = crate::api::Request::IsoFile {
        sha256: iso.sha256.clone(),
    };
    let (s, head) = crate::api::open_stream(peers, address, &req, Duration::from_secs(30))
        .map_err(|e| what(e.to_string()))?;
    let size = serde_json::from_value::<IsoFileHead>(head)
        .map_err(|e| what(format!("its answer: {e}")))?
        .size;
    if size != iso.size {
        return Err(what(format!(
            "it has {size} bytes, the library says {}",
            iso.size
        )));
    }
    let mut up = Upload::new(dir).map_err(|e| what(e.to_string()))?;
    let mut r = BufReader::with_capacity(1 << 20, s).take(size);
    let mut buf = vec![0u8; 1 << 20];
    let mut told = Instant::now();
    loop {
        let n = r.read(&mut buf).map_err(|e| what(e.to_string()))?;
        if n == 0 {
            break;
        }
        up.write(&buf[..n]).map_err(|e| what(e.to_string()))?;
        if told.elapsed() > Duration::from_secs(1) {
            progress(up.size());
            told = Instant::now();
        }
    }
    if up.size() != size {
        return Err(what(format!("cut after {} of {size} bytes", up.size())));
    }
    // Checked before it is put in place: the name is the hash.
    let sha = up.sha256();
    if sha != iso.sha256 {
        return Err(what(format!("its SHA-256 is {sha}, not {}", iso.sha256)));
    }
    up.seal()
        .and_then(Sealed::place)
        .map_err(|e| what(e.to_string()))?;
    progress(size);
    Ok(())
}

/// What a server's agent does for the library: copies missing images (one at a time, in the
/// background) and deletes images no longer in it.
#[derive(Clone, Default)]
pub struct Sync {
    /// The copy under way: the ISO's name and bytes so far.
    running: Arc<Mutex<Option<(String, u64)>>>,
    /// When a copy of an ISO last failed, to wait before trying again.
    failed: Arc<Mutex<HashMap<String, Instant>>>,
}

impl Sync {
    /// One pass over `state` (read at `read_at`) for server `me` with library directory `dir`:
    /// answers the ISOs this server now holds but the state does not say so (to record with
    /// `IsoHeld`).
    pub fn pass(
        &self,
        peers: &Arc<Peers>,
        state: &StateMachine,
        read_at: SystemTime,
        me: u64,
        dir: &Path,
    ) -> Vec<IsoRecord> {
        let mut held = Vec::new();
        for iso in state.isos.values() {
            if iso.servers.contains(&me) {
                continue;
            }
            let path = file(dir, &iso.sha256);
            if std::fs::metadata(&path).is_ok_and(|m| m.len() == iso.size) {
                held.push(iso.clone());
                continue;
            }
            self.start_fetch(peers, state, me, dir, iso);
        }
        delete_unlisted(state, read_at, dir);
        held
    }

    /// The copy under way, if any: the ISO's name and bytes so far.
    pub fn progress(&self) -> Option<(String, u64)> {
        self.running.lock().expect("library lock").clone()
    }

    fn start_fetch(
        &self,
        peers: &Arc<Peers>,
        state: &StateMachine,
        me: u64,
        dir: &Path,
        iso: &IsoRecord,
    ) {
        let mut running = self.running.lock().expect("library lock");
        if running.is_some() {
            return;
        }
        let recent = self
            .failed
            .lock()
            .expect("library lock")
            .get(&iso.name)
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10));
        if recent {
            return;
        }
        let Some(from) = iso
            .servers
            .iter()
            .filter(|s| **s != me)
            .filter_map(|s| state.servers.get(s))
            .find(|s| !s.down)
        else {
            return;
        };
        *running = Some((iso.name.clone(), 0));
        let (address, dir, iso, me_) = (from.address.clone(), dir.to_path_buf(), iso.clone(), me);
        let from_id = from.id;
        let (this, peers) = (self.clone(), Arc::clone(peers));
        let spawned = std::thread::Builder::new()
            .name("library-fetch".into())
            .spawn(move || {
                tracing::info!(server = me_, iso = %iso.name, from = from_id, bytes = iso.size, "copying an ISO image");
                let t = Instant::now();
                let progress = |n: u64| {
                    *this.running.lock().expect("library lock") = Some((iso.name.clone(), n));
                    tracing::debug!(iso = %iso.name, bytes = n, of = iso.size, "ISO copy progress");
                };
                match fetch(&peers, &address, &dir, &iso, &progress) {
                    Ok(()) => tracing::info!(
                        server = me_, iso = %iso.name, ms = t.elapsed().as_millis() as u64,
                        "ISO image copied and checked"
                    ),
                    Err(e) => {
                        tracing::warn!(server = me_, error = %e, "copying an ISO image failed");
                        this.failed
                            .lock()
                            .expect("library lock")
                            .insert(iso.name.clone(), Instant::now());
                    }
                }
                *this.running.lock().expect("library lock") = None;
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start an ISO copy");
            *running = None;
        }
    }
}

/// Deletes `<sha256>.iso` files no ISO of `state` names, and upload leftovers a day old.
///
/// `state` was read at `read_at`: a file put in place since then (its inode changed by the
/// rename, after the commit that listed it) may be listed in a newer state, so it is kept (with
/// a second's margin).
pub fn delete_unlisted(state: &StateMachine, read_at: SystemTime, dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    // A second's margin: file times come from the kernel's coarse clock, a tick behind.
    let before = read_at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
        - 1_000_000_000;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let placed_before = e.metadata().is_ok_and(|m| {
            i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()) < before
        });
        if !placed_before {
            continue;
        }
        let stale_part = name.ends_with(".part")
            && e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|a| a > Duration::from_secs(86_400)));
        let unlisted = name
            .strip_suffix(".iso")
            .is_some_and(|sha| is_sha256(sha) && !state.isos.values().any(|i| i.sha256 == sha));
        if stale_part || unlisted {
            match std::fs::remove_file(e.path()) {
                Ok(()) => tracing::info!(file = %e.path().display(), "library file deleted"),
                Err(err) => {
                    tracing::warn!(file = %e.path().display(), error = %err, "cannot delete a library file")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_land_under_their_hash_and_abandoned_ones_leave_nothing() {
        let dir = std::env::temp_dir().join(format!("enspeed-library-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut up = Upload::new(&dir).unwrap();
        up.write(b"hello ").unwrap();
        up.write(b"iso").unwrap();
        let sealed = up.seal().unwrap();
        let (sha, size) = (sealed.sha256.clone(), sealed.size);
        assert_eq!(size, 9);
        assert!(is_sha256(&sha));
        assert!(!file(&dir, &sha).exists(), "in place only once listed");
        sealed.place().unwrap();
        assert_eq!(std::fs::read(file(&dir, &sha)).unwrap(), b"hello iso");
        let mut gone = Upload::new(&dir).unwrap();
        gone.write(b"half").unwrap();
        drop(gone);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![format!("{sha}.iso")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_hashes_name_files() {
        assert!(is_sha256(&"ab".repeat(32)));
        assert!(!is_sha256("../../etc/passwd"));
        assert!(!is_sha256(&"zz".repeat(32)));
        assert!(!is_sha256(&"ab".repeat(33)));
    }
}
