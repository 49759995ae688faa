//! The library's files: ISO images and appliances' disk images. Every VM server keeps a copy
//! of each in its data directory's `isos/`, named by the file's SHA-256 (`<sha256>.iso` for an
//! ISO image, `<sha256>.raw` for a raw disk image), so a VM's CD-ROM is found on whichever
//! server the VM runs, after a failover too, and a VM is made from an appliance on any server.
//!
//! - An upload (or an imported appliance's converted disk) is written by the server that takes
//!   it (`Upload`): into a `.part` file, hashed as it arrives and synced; the API records it
//!   (`Action::AddIso`) as held by that server, then renames it into place (before, the
//!   clean-up below could take it for a deleted one). A task's images (an import, a copy back,
//!   a backup) are renamed into place first and kept from the clean-up (`Sealed::place_all`)
//!   until the task's end is committed, so that a task reads "done" only when they are there.
//! - The other servers' agents (`Sync`) copy it from a server holding it, over its client
//!   port (`Request::LibraryFile`, answered by one line, then the bytes), check its SHA-256 and
//!   size, and record that they hold it (`Command::IsoHeld`, `Command::ApplianceHeld`).
//! - Files nothing names any more are deleted.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};

use enspeed_trust::TlsStream;

use crate::peers::Peers;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::state_machine::{ApplianceRecord, IsoRecord, StateMachine};

/// What a library file is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shelf {
    /// An ISO image, for CD-ROM drives.
    #[default]
    Iso,
    /// A raw disk image of an appliance.
    Image,
}

impl Shelf {
    /// Its files' extension.
    fn extension(self) -> &'static str {
        match self {
            Shelf::Iso => "iso",
            Shelf::Image => "raw",
        }
    }
}

/// The library's directory under a server's data directory.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("isos")
}

/// Whether `sha256` is a SHA-256 in hex (and so safe as a file name).
pub fn is_sha256(sha256: &str) -> bool {
    sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The file of the `shelf` file with `sha256` in library directory `dir`.
pub fn file(dir: &Path, shelf: Shelf, sha256: &str) -> PathBuf {
    dir.join(format!(
        "{}.{}",
        sha256.to_ascii_lowercase(),
        shelf.extension()
    ))
}

/// The chunks a disk image is hashed in.
pub const IMAGE_CHUNK: u64 = 1 << 20;

/// A library file's hash, as it is written: the SHA-256 of an ISO image's bytes; for a disk
/// image, the SHA-256 of the SHA-256s of its 1 MiB chunks (the last one may be shorter), so
/// that a sparse image is hashed reading only its data (a chunk of zeros has a known hash).
#[derive(Clone)]
pub struct Hasher {
    shelf: Shelf,
    whole: Sha256,
    chunk: Sha256,
    in_chunk: u64,
}

impl Hasher {
    /// A hash of nothing yet.
    pub fn new(shelf: Shelf) -> Hasher {
        Hasher {
            shelf,
            whole: Sha256::new(),
            chunk: Sha256::new(),
            in_chunk: 0,
        }
    }

    /// Adds `bytes`.
    pub fn update(&mut self, mut bytes: &[u8]) {
        if self.shelf == Shelf::Iso {
            self.whole.update(bytes);
            return;
        }
        while !bytes.is_empty() {
            let n = ((IMAGE_CHUNK - self.in_chunk) as usize).min(bytes.len());
            self.chunk.update(&bytes[..n]);
            self.in_chunk += n as u64;
            bytes = &bytes[n..];
            if self.in_chunk == IMAGE_CHUNK {
                let c = self.chunk.finalize_reset();
                self.whole.update(c);
                self.in_chunk = 0;
            }
        }
    }

    /// Adds `n` zero bytes: whole chunks of them without hashing them again.
    pub fn zeros(&mut self, mut n: u64) {
        let zero_chunk = zero_chunk_hash();
        let zeros = [0u8; 64 << 10];
        while n > 0 {
            if self.shelf == Shelf::Image && self.in_chunk == 0 && n >= IMAGE_CHUNK {
                self.whole.update(zero_chunk);
                n -= IMAGE_CHUNK;
                continue;
            }
            let k = (zeros.len() as u64).min(n);
            let k = match self.shelf {
                Shelf::Image => k.min(IMAGE_CHUNK - self.in_chunk),
                Shelf::Iso => k,
            };
            self.update(&zeros[..k as usize]);
            n -= k;
        }
    }

    /// The hash, hex.
    pub fn hex(&self) -> String {
        let mut whole = self.whole.clone();
        if self.in_chunk > 0 {
            whole.update(self.chunk.clone().finalize());
        }
        hex(&whole.finalize())
    }
}

/// The hash (`Hasher`) and size of library file `path` of `shelf`: a disk image read only
/// where it holds data, its chunks hashed on every core.
pub fn hash_file(path: &Path, shelf: Shelf) -> io::Result<(String, u64)> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    if shelf == Shelf::Iso {
        let mut h = Hasher::new(shelf);
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0u64;
        while at < len {
            let n = ((len - at) as usize).min(buf.len());
            f.read_exact_at(&mut buf[..n], at)?;
            h.update(&buf[..n]);
            at += n as u64;
        }
        return Ok((h.hex(), len));
    }
    // Which chunks hold data (the rest read as zeros).
    let chunks = len.div_ceil(IMAGE_CHUNK);
    let mut data = vec![false; chunks as usize];
    let mut from = 0;
    while let Some((s, e)) = blockrepl::clone::next_data(&f, from, len)? {
        for c in s / IMAGE_CHUNK..e.div_ceil(IMAGE_CHUNK) {
            data[c as usize] = true;
        }
        from = e;
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    let mut whole = Sha256::new();
    // A window of chunks at a time: every core hashes some, then they go in, in order.
    const WINDOW: u64 = 256;
    for first in (0..chunks).step_by(WINDOW as usize) {
        let last = (first + WINDOW).min(chunks);
        let parts: Vec<io::Result<ChunkHashes>> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads as u64)
                .map(|t| {
                    let (f, data) = (&f, &data);
                    scope.spawn(move || {
                        let mut buf = vec![0u8; IMAGE_CHUNK as usize];
                        let mut out = Vec::new();
                        for c in (first + t..last).step_by(threads) {
                            if !data[c as usize] {
                                continue;
                            }
                            let at = c * IMAGE_CHUNK;
                            let n = (len - at).min(IMAGE_CHUNK) as usize;
                            f.read_exact_at(&mut buf[..n], at)?;
                            out.push((c, Sha256::digest(&buf[..n]).into()));
                        }
                        Ok(out)
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("a hashing thread"))
                .collect()
        });
        let mut window: Vec<Option<[u8; 32]>> = vec![None; (last - first) as usize];
        for part in parts {
            for (c, h) in part? {
                window[(c - first) as usize] = Some(h);
            }
        }
        for (i, h) in window.into_iter().enumerate() {
            let c = first + i as u64;
            let n = (len - c * IMAGE_CHUNK).min(IMAGE_CHUNK);
            match h {
                Some(h) => whole.update(h),
                // A chunk of zeros: as the stream's hasher hashes one.
                None if n == IMAGE_CHUNK => whole.update(zero_chunk_hash()),
                None => whole.update(Sha256::digest(vec![0u8; n as usize])),
            }
        }
    }
    Ok((hex(&whole.finalize()), len))
}

/// Chunks hashed by one thread: each one's index and SHA-256.
type ChunkHashes = Vec<(u64, [u8; 32])>;

/// The hash of a whole chunk of zeros.
fn zero_chunk_hash() -> &'static [u8; 32] {
    static ZERO_CHUNK: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    ZERO_CHUNK.get_or_init(|| Sha256::digest(vec![0u8; IMAGE_CHUNK as usize]).into())
}

/// A file being received: hashed as written, put in place only when whole. A disk image is
/// written sparse: its blocks of zeros are left as holes.
pub struct Upload {
    dir: PathBuf,
    shelf: Shelf,
    part: PathBuf,
    out: File,
    /// None for a scratch file (an archive to unpack): not hashed, not synced.
    hash: Option<Hasher>,
    size: u64,
    /// Bytes whose write-out to the disk has been started (`WRITE_OUT_EVERY`).
    written_out: u64,
    sealed: bool,
}

/// The blocks a disk image's zeros are left unwritten in.
const SPARSE_BLOCK: usize = 4096;

/// How many bytes a file being received (to be made durable) gathers in the page cache before
/// their write-out to the disk is started: so that it is written as it arrives, not all at
/// once when it is synced. A scratch file is not: deleted soon after, its pages may never
/// have to reach the disk.
const WRITE_OUT_EVERY: u64 = 32 << 20;

impl Upload {
    /// Starts a `shelf` file in library directory `dir`.
    pub fn new(dir: &Path, shelf: Shelf) -> io::Result<Upload> {
        Upload::new_in(dir, dir, shelf)
    }

    /// Starts a `shelf` file of library directory `dir` in directory `work` (on its file
    /// system: a work directory inside it, which must exist: one deleted meanwhile, its
    /// upload given up, is not made again).
    pub fn new_in(work: &Path, dir: &Path, shelf: Shelf) -> io::Result<Upload> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        if work == dir {
            std::fs::create_dir_all(dir)?;
        }
        // A unique name per upload: several may run at once.
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let part = work.join(format!(".upload-{}-{n}.part", std::process::id()));
        let out = File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&part)?;
        Ok(Upload {
            dir: dir.to_path_buf(),
            shelf,
            part,
            out,
            hash: Some(Hasher::new(shelf)),
            size: 0,
            written_out: 0,
            sealed: false,
        })
    }

    /// Starts a scratch file in directory `dir`: received only to be read (an archive to
    /// unpack), so neither hashed nor made durable; dropped, it is deleted.
    pub fn scratch(dir: &Path) -> io::Result<Upload> {
        let mut up = Upload::new(dir, Shelf::Iso)?;
        up.hash = None;
        Ok(up)
    }

    /// Appends `bytes`.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        match self.shelf {
            Shelf::Iso => self.out.write_all(bytes)?,
            Shelf::Image => {
                // Block by block of the file (the first may be short), zeros skipped.
                let mut at = 0;
                while at < bytes.len() {
                    let pos = self.size + at as u64;
                    let n =
                        (SPARSE_BLOCK - (pos % SPARSE_BLOCK as u64) as usize).min(bytes.len() - at);
                    let block = &bytes[at..at + n];
                    if block.iter().any(|b| *b != 0) {
                        self.out.write_all_at(block, pos)?;
                    }
                    at += n;
                }
            }
        }
        if let Some(h) = &mut self.hash {
            h.update(bytes);
        }
        self.size += bytes.len() as u64;
        if self.hash.is_some() && self.size - self.written_out >= WRITE_OUT_EVERY {
            use std::os::fd::AsRawFd;
            // SAFETY: sync_file_range on a descriptor we own, a range of it, no memory passed.
            // Only starts the write-out; a failure here shows again at the sync.
            unsafe {
                libc::sync_file_range(
                    self.out.as_raw_fd(),
                    self.written_out as i64,
                    (self.size - self.written_out) as i64,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            self.written_out = self.size;
        }
        Ok(())
    }

    /// Appends `n` zero bytes without writing them: a hole in the file.
    pub fn skip_zeros(&mut self, n: u64) {
        if let Some(h) = &mut self.hash {
            h.zeros(n);
        }
        self.size += n;
    }

    /// Where it is being written.
    pub fn path(&self) -> &Path {
        &self.part
    }

    /// Bytes so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The hash (`Hasher`) of the bytes so far, hex (empty for a scratch file).
    pub fn sha256(&self) -> String {
        self.hash.as_ref().map(Hasher::hex).unwrap_or_default()
    }

    /// Makes the file durable, still under its temporary name: an image is put in place
    /// (`Sealed::place`) only once the library lists it, or the agent's clean-up, which deletes
    /// unlisted images, could take it first; or before, kept from the clean-up by a `Placed`
    /// (`Sealed::place_all`) until the commit that lists it is answered.
    pub fn seal(mut self) -> io::Result<Sealed> {
        // A disk image's zeros at its end are a hole too.
        self.out.set_len(self.size)?;
        if self.hash.is_some() {
            self.out.sync_all()?;
        }
        self.sealed = true;
        Ok(Sealed {
            sha256: self.sha256(),
            size: self.size,
            dir: self.dir.clone(),
            shelf: self.shelf,
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

/// A whole, durable library file waiting to be put in place; dropped, it is deleted.
#[derive(Debug)]
pub struct Sealed {
    /// Its hash (`Hasher`), hex.
    pub sha256: String,
    /// Bytes.
    pub size: u64,
    dir: PathBuf,
    shelf: Shelf,
    part: PathBuf,
    placed: bool,
}

impl Sealed {
    /// Takes file `part` (in library directory `dir`, on its file system) as a `shelf` file:
    /// hashes it and makes it durable.
    pub fn adopt(dir: &Path, shelf: Shelf, part: PathBuf) -> io::Result<Sealed> {
        let mut sealed = Sealed {
            sha256: String::new(),
            size: 0,
            dir: dir.to_path_buf(),
            shelf,
            part,
            placed: false,
        };
        // Dropped on an error: the file goes.
        (sealed.sha256, sealed.size) = hash_file(&sealed.part, shelf)?;
        File::open(&sealed.part)?.sync_all()?;
        Ok(sealed)
    }

    /// Where it waits.
    pub fn path(&self) -> &Path {
        &self.part
    }

    /// Renames it to its place (`<sha256>.iso` or `.raw`), durably.
    pub fn place(mut self) -> io::Result<()> {
        std::fs::rename(&self.part, file(&self.dir, self.shelf, &self.sha256))?;
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

/// Library files of this process put in place before the state lists them (`Placed`): the
/// clean-up (`delete_unlisted`) leaves them alone.
static UNLISTED_PLACED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Files put in place ahead of the commit that lists them, kept from the clean-up until this
/// is dropped: keep it until that commit is answered. If the commit was refused, the files are
/// unlisted and the clean-up deletes them afterwards.
#[derive(Debug)]
#[must_use = "dropped, the files may be taken for deleted ones before they are listed"]
pub struct Placed {
    paths: Vec<PathBuf>,
}

impl Sealed {
    /// Renames each of `sealed` to its place, durably, before the state lists them; the
    /// clean-up keeps them while the `Placed` lives. On an error the rest are deleted (and
    /// those already in place are left to the clean-up).
    pub fn place_all(sealed: Vec<Sealed>) -> io::Result<Placed> {
        let paths: Vec<PathBuf> = sealed
            .iter()
            .map(|s| file(&s.dir, s.shelf, &s.sha256))
            .collect();
        lock_unlisted().extend(paths.iter().cloned());
        let placed = Placed { paths };
        for s in sealed {
            s.place()?;
        }
        Ok(placed)
    }
}

impl Drop for Placed {
    fn drop(&mut self) {
        // Each file's inode change time becomes now, as a rename after the commit would have
        // made it: a clean-up judging by a state read before now keeps the file (its second's
        // margin), though the commit that state lacks has been answered.
        for p in &self.paths {
            if let Ok(m) = std::fs::metadata(p) {
                let _ = std::fs::set_permissions(p, m.permissions());
            }
        }
        let mut held = lock_unlisted();
        for p in &self.paths {
            if let Some(i) = held.iter().position(|h| h == p) {
                held.swap_remove(i);
            }
        }
    }
}

fn lock_unlisted() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    UNLISTED_PLACED.lock().unwrap_or_else(|e| e.into_inner())
}

/// A scratch directory inside a library directory (on its file system, so what is made there
/// is put in place by a rename), for an import or export; removed with what it holds when
/// dropped.
pub struct WorkDir(PathBuf);

impl WorkDir {
    /// A new, empty one in library directory `dir`.
    pub fn new(dir: &Path) -> io::Result<WorkDir> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!(".work-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)?;
        Ok(WorkDir(path))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a `LibraryFile` answer says before the file's bytes.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct LibraryFileHead {
    /// The file's bytes that follow.
    size: u64,
}

/// Serves `Request::LibraryFile` on a client connection: one answer line with the size, then
/// the file's bytes.
pub fn serve_file(mut w: TlsStream, dir: Option<&Path>, shelf: Shelf, sha256: &str) {
    let open = || -> Result<(File, u64), String> {
        if !is_sha256(sha256) {
            return Err(format!("{sha256:?} is not a SHA-256"));
        }
        let dir = dir.ok_or("this server keeps no library")?;
        let path = file(dir, shelf, sha256);
        let f = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let size = f.metadata().map_err(|e| e.to_string())?.len();
        Ok((f, size))
    };
    match open() {
        Err(e) => {
            let _ = crate::api::answer_line(&mut w, &crate::api::Response::err(e));
        }
        Ok((mut f, size)) => {
            let head = crate::api::Response::ok(json!(LibraryFileHead { size }));
            if crate::api::answer_line(&mut w, &head).is_ok() {
                let _ = io::copy(&mut f, &mut w);
            }
        }
    }
}

/// A library file a server lacks: what it is, for messages (`ISO x`, `appliance y's Disk0`),
/// and its shelf, SHA-256 and size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    /// What it is, for messages.
    pub what: String,
    /// Its shelf.
    pub shelf: Shelf,
    /// Its SHA-256, hex.
    pub sha256: String,
    /// Bytes.
    pub size: u64,
}

/// Copies library file `want` from the server at `address` into library directory `dir`,
/// checking its size and SHA-256; `progress` gets the bytes copied so far.
pub fn fetch(
    peers: &Peers,
    address: &str,
    dir: &Path,
    want: &Wanted,
    progress: &dyn Fn(u64),
) -> Result<(), String> {
    let what = |e: String| format!("{} from {address}: {e}", want.what);
    let req = crate::api::Request::LibraryFile {
        shelf: want.shelf,
        sha256: want.sha256.clone(),
    };
    let (s, head) = crate::api::open_stream(peers, address, &req, Duration::from_secs(30))
        .map_err(|e| what(e.to_string()))?;
    let size = serde_json::from_value::<LibraryFileHead>(head)
        .map_err(|e| what(format!("its answer: {e}")))?
        .size;
    if size != want.size {
        return Err(what(format!(
            "it has {size} bytes, the library says {}",
            want.size
        )));
    }
    let mut up = Upload::new(dir, want.shelf).map_err(|e| what(e.to_string()))?;
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
    if sha != want.sha256 {
        return Err(what(format!("its SHA-256 is {sha}, not {}", want.sha256)));
    }
    up.seal()
        .and_then(Sealed::place)
        .map_err(|e| what(e.to_string()))?;
    progress(size);
    Ok(())
}

/// What a library pass found this server holds that the state does not say yet.
#[derive(Debug, Default)]
pub struct Held {
    /// ISO images (to record with `IsoHeld`).
    pub isos: Vec<IsoRecord>,
    /// Appliances, every disk image of each (to record with `ApplianceHeld`).
    pub appliances: Vec<ApplianceRecord>,
}

/// What a server's agent does for the library: copies missing files (one at a time, in the
/// background) and deletes files no longer in it.
#[derive(Clone, Default)]
pub struct Sync {
    /// The copy under way: what it is and bytes so far.
    running: Arc<Mutex<Option<(String, u64)>>>,
    /// When a copy of a file (by SHA-256) last failed, to wait before trying again.
    failed: Arc<Mutex<HashMap<String, Instant>>>,
}

impl Sync {
    /// One pass over `state` (read at `read_at`) for server `me` with library directory `dir`:
    /// starts a copy of a file it lacks, deletes files nothing names, and answers the ISOs and
    /// appliances this server now holds but the state does not say so.
    pub fn pass(
        &self,
        peers: &Arc<Peers>,
        state: &StateMachine,
        read_at: SystemTime,
        me: u64,
        dir: &Path,
    ) -> Held {
        let mut held = Held::default();
        let here = |w: &Wanted| {
            std::fs::metadata(file(dir, w.shelf, &w.sha256)).is_ok_and(|m| m.len() == w.size)
        };
        for iso in state.isos.values().filter(|i| !i.servers.contains(&me)) {
            let want = Wanted {
                what: format!("ISO {}", iso.name),
                shelf: Shelf::Iso,
                sha256: iso.sha256.clone(),
                size: iso.size,
            };
            if here(&want) {
                held.isos.push(iso.clone());
            } else {
                self.start_fetch(peers, state, me, dir, &iso.servers, want);
            }
        }
        for a in state
            .appliances
            .values()
            .filter(|a| !a.servers.contains(&me))
        {
            let missing = a.disks.iter().enumerate().map(|(i, d)| Wanted {
                what: format!("appliance {}'s Disk{i}", a.name),
                shelf: Shelf::Image,
                sha256: d.sha256.clone(),
                size: d.size,
            });
            match missing.into_iter().find(|w| !here(w)) {
                None => held.appliances.push(a.clone()),
                Some(want) => self.start_fetch(peers, state, me, dir, &a.servers, want),
            }
        }
        delete_unlisted(state, read_at, dir);
        held
    }

    /// The copy under way, if any: what it is and bytes so far.
    pub fn progress(&self) -> Option<(String, u64)> {
        self.running.lock().expect("library lock").clone()
    }

    /// Starts copying `want` from one of `holders` (up, not `me`), unless a copy runs or one of
    /// it failed in the last ten seconds.
    fn start_fetch(
        &self,
        peers: &Arc<Peers>,
        state: &StateMachine,
        me: u64,
        dir: &Path,
        holders: &std::collections::BTreeSet<u64>,
        want: Wanted,
    ) {
        let mut running = self.running.lock().expect("library lock");
        if running.is_some() {
            return;
        }
        let recent = self
            .failed
            .lock()
            .expect("library lock")
            .get(&want.sha256)
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10));
        if recent {
            return;
        }
        let Some(from) = holders
            .iter()
            .filter(|s| **s != me)
            .filter_map(|s| state.servers.get(s))
            .find(|s| !s.down)
        else {
            return;
        };
        *running = Some((want.what.clone(), 0));
        let (address, dir, from_id) = (from.address.clone(), dir.to_path_buf(), from.id);
        let (this, peers) = (self.clone(), Arc::clone(peers));
        let spawned = std::thread::Builder::new()
            .name("library-fetch".into())
            .spawn(move || {
                tracing::info!(server = me, file = %want.what, from = from_id, bytes = want.size, "copying a library file");
                let t = Instant::now();
                let progress = |n: u64| {
                    *this.running.lock().expect("library lock") = Some((want.what.clone(), n));
                    tracing::debug!(file = %want.what, bytes = n, of = want.size, "library copy progress");
                };
                match fetch(&peers, &address, &dir, &want, &progress) {
                    Ok(()) => tracing::info!(
                        server = me, file = %want.what, ms = t.elapsed().as_millis() as u64,
                        "library file copied and checked"
                    ),
                    Err(e) => {
                        tracing::warn!(server = me, error = %e, "copying a library file failed");
                        this.failed
                            .lock()
                            .expect("library lock")
                            .insert(want.sha256.clone(), Instant::now());
                    }
                }
                *this.running.lock().expect("library lock") = None;
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a library copy");
            *running = None;
        }
    }
}

/// Whether `state` names library file `sha256` of `shelf`: an ISO image; an appliance's disk
/// image, or one a disk is still to be made from.
fn listed(state: &StateMachine, shelf: Shelf, sha256: &str) -> bool {
    match shelf {
        Shelf::Iso => state.isos.values().any(|i| i.sha256 == sha256),
        Shelf::Image => {
            state
                .appliances
                .values()
                .any(|a| a.disks.iter().any(|d| d.sha256 == sha256))
                || state
                    .disks
                    .values()
                    .any(|d| d.image.as_deref() == Some(sha256))
        }
    }
}

/// Deletes library files `state` does not name, and upload and work leftovers a day old.
///
/// `state` was read at `read_at`: a file put in place since then (its inode changed by the
/// rename, after the commit that listed it) may be listed in a newer state, so it is kept (with
/// a second's margin). So are files a task of this process put in place for a commit that is
/// still to come (`Placed`).
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
        if !placed_before || lock_unlisted().contains(&e.path()) {
            continue;
        }
        // A task's work directory lasts as long as its task runs.
        let task_running = name
            .strip_prefix(".work-task-")
            .and_then(|id| id.parse::<u64>().ok())
            .and_then(|id| state.tasks.get(&id))
            .is_some_and(|t| t.state == crate::state_machine::TaskState::Running);
        // An upload or a work directory a day old was left by a server that stopped.
        let stale_part = !task_running
            && (name.ends_with(".part") || name.starts_with(".work-"))
            && e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|a| a > Duration::from_secs(86_400)));
        let unlisted = [Shelf::Iso, Shelf::Image].into_iter().any(|shelf| {
            name.strip_suffix(shelf.extension())
                .and_then(|n| n.strip_suffix('.'))
                .is_some_and(|sha| is_sha256(sha) && !listed(state, shelf, sha))
        });
        if stale_part || unlisted {
            let gone = if e.file_type().is_ok_and(|t| t.is_dir()) {
                std::fs::remove_dir_all(e.path())
            } else {
                std::fs::remove_file(e.path())
            };
            match gone {
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
        let mut up = Upload::new(&dir, Shelf::Iso).unwrap();
        up.write(b"hello ").unwrap();
        up.write(b"iso").unwrap();
        let sealed = up.seal().unwrap();
        let (sha, size) = (sealed.sha256.clone(), sealed.size);
        assert_eq!(size, 9);
        assert!(is_sha256(&sha));
        assert!(
            !file(&dir, Shelf::Iso, &sha).exists(),
            "in place only once listed"
        );
        sealed.place().unwrap();
        assert_eq!(
            std::fs::read(file(&dir, Shelf::Iso, &sha)).unwrap(),
            b"hello iso"
        );
        let mut gone = Upload::new(&dir, Shelf::Iso).unwrap();
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
    fn a_disk_image_is_written_sparse_and_hashed_alike_from_its_data_or_its_stream() {
        let dir = std::env::temp_dir().join(format!("enspeed-library-img-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // 5 MiB and a half: data in chunk 0, a chunk of zeros, data across chunks 3 and 4, a
        // short tail of zeros.
        let len = (5 << 20) + (512 << 10);
        let mut bytes = vec![0u8; len];
        bytes[100..200].fill(7);
        bytes[(3 << 20) + 4000..(4 << 20) + 9000].fill(9);
        let mut up = Upload::new(&dir, Shelf::Image).unwrap();
        // In uneven pieces, as a network delivers them.
        for piece in bytes.chunks(300_007) {
            up.write(piece).unwrap();
        }
        let sealed = up.seal().unwrap();
        let (sha, size) = (sealed.sha256.clone(), sealed.size);
        sealed.place().unwrap();
        let path = file(&dir, Shelf::Image, &sha);
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        use std::os::unix::fs::MetadataExt;
        let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(
            allocated < 2 << 20,
            "{allocated} bytes allocated: zeros left as holes"
        );
        // From the file, reading only its data, the same hash; any change of a byte, another.
        assert_eq!(hash_file(&path, Shelf::Image).unwrap(), (sha.clone(), size));
        let mut h = Hasher::new(Shelf::Image);
        h.update(&bytes);
        assert_eq!(h.hex(), sha);
        bytes[(2 << 20) + 1] = 1;
        let mut h = Hasher::new(Shelf::Image);
        h.update(&bytes);
        assert_ne!(h.hex(), sha);
        // An ISO's hash is the plain SHA-256 of its bytes.
        let mut iso = Hasher::new(Shelf::Iso);
        iso.update(b"abc");
        iso.zeros(3);
        assert_eq!(iso.hex(), hex(&Sha256::digest(b"abc\0\0\0")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn images_placed_before_their_listing_are_kept_from_the_clean_up_until_it_is_answered() {
        let dir =
            std::env::temp_dir().join(format!("enspeed-library-early-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let seal = |bytes: &[u8]| {
            let mut up = Upload::new(&dir, Shelf::Image).unwrap();
            up.write(bytes).unwrap();
            up.seal().unwrap()
        };
        let sealed = vec![seal(b"disk zero"), seal(b"disk one")];
        let paths: Vec<PathBuf> = sealed
            .iter()
            .map(|s| file(&dir, Shelf::Image, &s.sha256))
            .collect();
        let placed = Sealed::place_all(sealed).unwrap();
        assert!(
            paths.iter().all(|p| p.exists()),
            "in place before the commit"
        );
        // A state read well after they were placed, that does not list them yet.
        let state = StateMachine::default();
        let later = SystemTime::now() + Duration::from_secs(10);
        delete_unlisted(&state, later, &dir);
        assert!(
            paths.iter().all(|p| p.exists()),
            "kept while the commit is awaited"
        );
        // A state read before the commit was answered, more than a second after the files
        // were placed, looked at after the answer: it does not list them, and they stay.
        std::thread::sleep(Duration::from_millis(1100));
        let read_before = SystemTime::now();
        drop(placed);
        delete_unlisted(&state, read_before, &dir);
        assert!(
            paths.iter().all(|p| p.exists()),
            "kept from a state read before the answer"
        );
        delete_unlisted(&state, later, &dir);
        assert!(
            paths.iter().all(|p| !p.exists()),
            "unlisted once the commit is answered: deleted"
        );
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
