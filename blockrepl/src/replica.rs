//! One copy of a replicated disk: its data file, metadata and bitmap, its
//! role, and the write path that mirrors every guest write to the backup.
//!
//! A guest write on the primary:
//!
//! 1. sets the bitmap bits of the regions it touches, durably (nothing to do
//!    when they are set already);
//! 2. is registered as pending (waiting while resync copies one of its regions);
//! 3. goes to the backup as a Write frame, then to the local file;
//! 4. completes when the local write is done and the backup acknowledged it.
//!
//! A write of at most [`DURABLE_WRITE_MAX`] bytes is made durable on both copies before it
//! completes, each side in a group commit (one fdatasync for every write waiting then): the
//! backup before acknowledging it (the frame goes with FUA), the primary on its own syncer
//! thread, while the frame is on its way. A guest flush then asks nothing of either copy
//! when every larger write completed before it is covered by an earlier flush: a
//! synchronous write (a write, then a flush) costs one round trip and the slower of the two
//! fdatasyncs, not two round trips and a fdatasync after them. Larger writes (streams) are
//! acknowledged once applied, and the next flush goes to the backup and the local disk.
//!
//! When the link is down, step 3's frame is not sent and the write stalls
//! until either the backup returns and resync has copied its regions, or the
//! caller raises the generation and the disk goes on alone.
//!
//! Lock order: `meta`, then `bitmap`, then `core`; a [`Link`]'s own locks are
//! never held while taking any of these.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::bitmap::Bitmap;
use crate::link::Link;
use crate::meta::{DataState, Meta, MetaError, MetaFile, Role};
use crate::net::MirrorNet;
use crate::store::{check_range, BlockStore, Done};

/// The largest guest write the backup makes durable before acknowledging it (see the module
/// documentation): the size of a database's or a journal's synchronous writes, whose flush
/// then costs no second round trip; larger writes are streams, whose flushes are rare.
pub const DURABLE_WRITE_MAX: usize = 64 << 10;

/// Timings of the mirror link.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// The link is declared down when nothing arrived for this long.
    pub link_timeout: Duration,
    /// An idle link sends a Ping this often.
    pub ping_interval: Duration,
    /// A primary retries connecting to its backup this often.
    pub retry_interval: Duration,
    /// How often a primary in sync clears bitmap bits both sides hold.
    pub clean_interval: Duration,
    /// A region's bit is cleared only after this many passes without a
    /// write: the working set stays marked, so a write rarely pays for
    /// marking its region (like an activity log), and a resync after a
    /// failure copies at most what was written in that time besides what
    /// changed.
    pub clean_after_passes: u32,
    /// A resync makes what it copied durable on the backup, and clears those regions' bits,
    /// after this many regions (so a cut resync resumes past them).
    pub checkpoint_regions: usize,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            link_timeout: Duration::from_millis(2000),
            ping_interval: Duration::from_millis(400),
            retry_interval: Duration::from_millis(300),
            clean_interval: Duration::from_secs(2),
            clean_after_passes: 15,
            checkpoint_regions: 256,
        }
    }
}

/// Errors of replica management.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// Metadata failed.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// A file operation failed.
    #[error("disk {disk}: {what}: {source}")]
    Io {
        /// The disk.
        disk: String,
        /// What was being done.
        what: String,
        /// Why it failed.
        source: io::Error,
    },
    /// The request does not fit the disk's state.
    #[error("disk {disk}: {why}")]
    Refused {
        /// The disk.
        disk: String,
        /// Why.
        why: String,
    },
}

/// Progress of a running resync, as the CLI shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ResyncProgress {
    /// Whether every region is copied (new or diverged backup).
    pub full: bool,
    /// Bytes to copy in all.
    pub total_bytes: u64,
    /// Bytes copied so far.
    pub done_bytes: u64,
    /// Bytes still to copy.
    pub bytes_left: u64,
    /// Percent done.
    pub percent: f64,
    /// Copy rate so far, bytes per second.
    pub rate_bytes_per_sec: u64,
}

/// The state of the mirror link, seen from this copy.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum LinkState {
    /// No connection.
    Down,
    /// Connected, resync running.
    Resyncing,
    /// Connected, both copies hold the same data.
    InSync,
    /// Connected as the backup of a primary.
    Serving,
}

impl LinkState {
    /// The link state as the wire and the CLI name it.
    pub fn name(self) -> &'static str {
        match self {
            LinkState::Down => "down",
            LinkState::Resyncing => "resyncing",
            LinkState::InSync => "in-sync",
            LinkState::Serving => "serving",
        }
    }
}

impl std::fmt::Display for LinkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What `enspeed disk status` shows, and what blockd's control socket reports of a copy.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// Disk name.
    pub name: String,
    /// Identity.
    pub disk_id: String,
    /// Size in bytes.
    pub capacity: u64,
    /// Bitmap region size.
    pub region_size: u64,
    /// Role.
    pub role: Role,
    /// Generation.
    pub generation: u64,
    /// Data state.
    pub data: DataState,
    /// Generation the bitmap is relative to.
    pub bitmap_base: u64,
    /// Backup address (primary side).
    pub peer: Option<String>,
    /// The server at the other end (the backup's, or the only primary a backup takes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_server: Option<u64>,
    /// Link state.
    pub link: LinkState,
    /// Regions marked in the bitmap, in bytes.
    pub out_of_sync_bytes: u64,
    /// Writes waiting for the backup.
    pub stalled_writes: usize,
    /// Running resync, if any.
    pub resync: Option<ResyncProgress>,
    /// The last resync that finished, as it ended.
    pub last_resync: Option<ResyncProgress>,
    /// The last link or resync error.
    pub last_error: Option<String>,
    /// The vhost-user-blk socket a VMM reaches the disk on (blockd's report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_socket: Option<PathBuf>,
    /// The snapshot being made of this backup copy, or the last one, as it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<crate::snapshot::SnapshotProgress>,
}

/// A pending guest write or flush.
struct Pending {
    done: Option<Done>,
    regions: (u64, u64),
    local: Option<io::Result<()>>,
    remote: bool,
    /// The link its frame goes out on: the one up when it was registered. A resync that
    /// finishes on that link leaves it to that link's answer, even before it is sent (it was
    /// completed early, before the backup held it, when this was set only once sent).
    sent_on: Option<u64>,
    /// A write the backup acknowledges once applied, not durable (larger than
    /// [`DURABLE_WRITE_MAX`]).
    applied_only: bool,
    /// A flush: how many applied-only writes had completed when it was registered (all of
    /// them were sent and written before it, so its fdatasyncs cover them).
    covers: Option<u64>,
    /// A flush whose backup half is the backup's answer (not skipped, not completed
    /// without it).
    answered: bool,
}

/// Volatile state, under one lock.
pub(crate) struct Core {
    pub(crate) role: Role,
    pub(crate) generation: u64,
    next_id: u64,
    pending: HashMap<u64, Pending>,
    /// Local writes in progress, per region.
    local_busy: HashMap<u64, u32>,
    /// Writes not yet complete on both sides, per region.
    unacked: HashMap<u64, u32>,
    /// Regions written since the last clean pass.
    touched: HashSet<u64>,
    /// Set regions and the clean passes they have gone without a write.
    idle_passes: HashMap<u64, u32>,
    /// The region resync is copying now: writes to it wait.
    resync_busy: Option<u64>,
    /// Applied-only writes completed so far.
    applied_only_done: u64,
    /// Of those, how many a flush the backup answered covers.
    applied_only_flushed: u64,
    /// Of those, how many a local fdatasync of a flush covers.
    applied_only_synced: u64,
    pub(crate) link: Option<Arc<Link>>,
    pub(crate) in_sync: bool,
    pub(crate) serving_session: Option<u64>,
    pub(crate) resync: Option<ResyncProgress>,
    pub(crate) last_resync: Option<ResyncProgress>,
    pub(crate) last_error: Option<String>,
}

/// One copy of a replicated disk.
pub struct Replica {
    pub(crate) name: String,
    pub(crate) dir: PathBuf,
    pub(crate) data: File,
    pub(crate) capacity: u64,
    pub(crate) region_size: u64,
    pub(crate) meta: Mutex<MetaFile>,
    pub(crate) bitmap: Mutex<Bitmap>,
    pub(crate) core: Mutex<Core>,
    pub(crate) cond: Condvar,
    pub(crate) timing: Timing,
    pub(crate) net: Arc<MirrorNet>,
    pub(crate) stopping: AtomicBool,
    /// Held while a mirrored write is applied to a backup copy (with the copy-before-write of
    /// a snapshot): a snapshot starts between two writes, on several copies at once.
    pub(crate) gate: Mutex<()>,
    /// The point-in-time image being made of this backup copy, if one is.
    pub(crate) snapshot: Mutex<Option<Arc<crate::snapshot::Snapshot>>>,
    /// The last snapshot's progress (the current one's, while it runs).
    pub(crate) last_snapshot: Mutex<Option<crate::snapshot::SnapshotProgress>>,
    /// Local halves waiting for the group commit's next fdatasync.
    group: Arc<GroupCommit>,
    /// Whether the group commit's thread was started (on the first write that needs it).
    group_started: std::sync::Once,
    /// This replica, for that thread.
    me: std::sync::Weak<Replica>,
    /// The first local fdatasync that failed, if one did (see [`Replica::sync_local`]).
    sync_failed: Mutex<Option<String>>,
}

/// The primary's group commit: ids of pending writes and flushes whose local half completes
/// with the next fdatasync, which its thread makes for all of them at once.
#[derive(Default)]
struct GroupCommit {
    /// (waiting ids, stopped: new ones are synced by their caller).
    waiting: Mutex<(Vec<u64>, bool)>,
    cond: Condvar,
}

impl GroupCommit {
    fn stop(&self) {
        lock(&self.waiting).1 = true;
        self.cond.notify_all();
    }

    /// The thread's loop: one fdatasync for all that waits, until stopped and drained or
    /// the replica is gone.
    fn run(&self, replica: std::sync::Weak<Replica>) {
        loop {
            let ids = {
                let mut w = lock(&self.waiting);
                while w.0.is_empty() && !w.1 {
                    w = self.cond.wait(w).unwrap_or_else(|p| p.into_inner());
                }
                if w.0.is_empty() {
                    return;
                }
                std::mem::take(&mut w.0)
            };
            let Some(r) = replica.upgrade() else { return };
            let synced = r.sync_local();
            for id in ids {
                let result = match &synced {
                    Ok(()) => Ok(()),
                    Err(e) => Err(io::Error::new(
                        e.kind(),
                        format!("flushing disk {}: {e}", r.name),
                    )),
                };
                r.finish(id, Some(result), false);
            }
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.group.stop();
    }
}

/// How a new disk starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewRole {
    /// The first copy: serves the guest alone until a backup is attached.
    Primary,
    /// An empty copy that waits for a primary's full sync.
    Backup,
}

pub(crate) fn random_id() -> io::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The largest region size accepted (one resync frame each).
pub const MAX_REGION: u64 = 4 << 20;

impl Replica {
    /// Creates disk `name` of `capacity` bytes under `dir/name`.
    pub fn create(
        dir: &Path,
        name: &str,
        capacity: u64,
        region_size: u64,
        role: NewRole,
        peer_server: Option<u64>,
        disk_id: Option<String>,
        timing: Timing,
        net: Arc<MirrorNet>,
    ) -> Result<Arc<Replica>, ReplicaError> {
        let refused = |why: String| ReplicaError::Refused {
            disk: name.to_owned(),
            why,
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            || name.starts_with('.')
        {
            return Err(refused(
                "a disk name is letters, digits, '-', '_' and '.', not starting with '.'".into(),
            ));
        }
        if capacity == 0 || capacity % 512 != 0 {
            return Err(refused(format!(
                "capacity {capacity} is not a positive multiple of 512"
            )));
        }
        if let Some(id) = &disk_id {
            if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(refused(format!(
                    "disk identity {id:?} is not 1 to 64 hex digits"
                )));
            }
        }
        if !region_size.is_power_of_two() || !(4096..=MAX_REGION).contains(&region_size) {
            return Err(refused(format!(
                "region size {region_size} is not a power of two between 4 KiB and 4 MiB"
            )));
        }
        let ddir = dir.join(name);
        let io_err = |what: &str, source| ReplicaError::Io {
            disk: name.to_owned(),
            what: what.to_owned(),
            source,
        };
        std::fs::create_dir(&ddir).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                refused("already exists".into())
            } else {
                io_err("creating its directory", e)
            }
        })?;
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(ddir.join("data"))
            .map_err(|e| io_err("creating the data file", e))?;
        data.set_len(capacity)
            .map_err(|e| io_err("sizing the data file", e))?;
        data.sync_all()
            .map_err(|e| io_err("syncing the data file", e))?;
        let meta = match role {
            NewRole::Primary => Meta {
                name: name.to_owned(),
                disk_id: match disk_id {
                    Some(id) => id,
                    None => random_id().map_err(|e| io_err("reading /dev/urandom", e))?,
                },
                capacity,
                region_size,
                generation: 1,
                role: Role::Standalone,
                data: DataState::Consistent,
                bitmap_base: 0,
                peer: None,
                peer_server,
                fill: String::new(),
                // Its data file is all holes, and every write marks its regions.
                from_zeros: true,
            },
            NewRole::Backup => Meta {
                name: name.to_owned(),
                disk_id: disk_id.unwrap_or_default(),
                capacity,
                region_size,
                generation: 0,
                role: Role::Backup,
                data: DataState::Empty,
                bitmap_base: 0,
                peer: None,
                peer_server,
                fill: String::new(),
                from_zeros: false,
            },
        };
        Bitmap::open(&ddir.join("bitmap"), capacity.div_ceil(region_size))
            .map_err(|e| io_err("creating the bitmap", e))?;
        MetaFile::create(&ddir.join("meta"), meta)?;
        Replica::open(dir, name, timing, net)
    }

    /// Grows the disk `dir/name`, not open, to `capacity` bytes: the data file first (the new
    /// part reads as zeros; synced), then the metadata, which is what makes it so (`open`
    /// trims a data file that grew without it). Its bitmap grows when it is opened; the new
    /// regions start clean, since both copies grow with zeros. A copy linked to a peer of
    /// another size is refused until the peer grows too.
    pub fn grow(dir: &Path, name: &str, capacity: u64) -> Result<(), ReplicaError> {
        let ddir = dir.join(name);
        let refused = |why: String| ReplicaError::Refused {
            disk: name.to_owned(),
            why,
        };
        let io_err = |what: &str, source| ReplicaError::Io {
            disk: name.to_owned(),
            what: what.to_owned(),
            source,
        };
        let mut meta = MetaFile::open(&ddir.join("meta"))?;
        let old = meta.get().capacity;
        if capacity < old {
            return Err(refused(format!(
                "it holds {old} bytes: a disk only grows, and {capacity} is smaller"
            )));
        }
        if capacity % 512 != 0 {
            return Err(refused(format!(
                "capacity {capacity} is not a multiple of 512"
            )));
        }
        if capacity == old {
            return Ok(());
        }
        let data = OpenOptions::new()
            .write(true)
            .open(ddir.join("data"))
            .map_err(|e| io_err("opening the data file", e))?;
        data.set_len(capacity)
            .and_then(|()| data.sync_all())
            .map_err(|e| io_err("growing the data file", e))?;
        meta.update(|m| m.capacity = capacity)?;
        tracing::info!(disk = %name, from = old, to = capacity, "disk grown");
        Ok(())
    }

    /// Opens the existing disk `dir/name`, its mirror links made with `net`.
    pub fn open(
        dir: &Path,
        name: &str,
        timing: Timing,
        net: Arc<MirrorNet>,
    ) -> Result<Arc<Replica>, ReplicaError> {
        let ddir = dir.join(name);
        let io_err = |what: &str, source| ReplicaError::Io {
            disk: name.to_owned(),
            what: what.to_owned(),
            source,
        };
        let mut meta = MetaFile::open(&ddir.join("meta"))?;
        let m = meta.get().clone();
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .open(ddir.join("data"))
            .map_err(|e| io_err("opening the data file", e))?;
        let len = data
            .metadata()
            .map_err(|e| io_err("reading the data file's size", e))?
            .len();
        if len > m.capacity {
            // A grow that stopped between the data file and the metadata (`grow`): the bytes
            // past the recorded end were never written. Trimmed back; the grow is asked again.
            tracing::warn!(disk = %name, len, capacity = m.capacity, "an unfinished grow: the data file is trimmed to the recorded size");
            data.set_len(m.capacity)
                .and_then(|()| data.sync_all())
                .map_err(|e| io_err("trimming an unfinished grow", e))?;
        } else if len != m.capacity {
            return Err(ReplicaError::Refused {
                disk: name.to_owned(),
                why: format!("data file holds {len} bytes, metadata says {}", m.capacity),
            });
        }
        let bitmap_lost = !ddir.join("bitmap").exists();
        let bitmap = Bitmap::open(&ddir.join("bitmap"), m.capacity.div_ceil(m.region_size))
            .map_err(|e| io_err("opening the bitmap", e))?;
        if bitmap_lost && m.from_zeros {
            // A bitmap made anew marks nothing: it cannot tell a new backup what was written.
            tracing::warn!(
                disk = name,
                "the bitmap was missing: a new backup will need a full sync"
            );
            meta.update(|m| m.from_zeros = false)?;
        }
        let core = Core {
            role: m.role,
            generation: m.generation,
            next_id: 1,
            pending: HashMap::new(),
            local_busy: HashMap::new(),
            unacked: HashMap::new(),
            touched: HashSet::new(),
            idle_passes: HashMap::new(),
            resync_busy: None,
            // What the copy holds from before (a run of this process that ended, or its
            // writes as a backup) may be in the page cache only: the first flush syncs both.
            applied_only_done: 1,
            applied_only_flushed: 0,
            applied_only_synced: 0,
            link: None,
            in_sync: false,
            serving_session: None,
            resync: None,
            last_resync: None,
            last_error: None,
        };
        Ok(Arc::new_cyclic(|me| Replica {
            group: Arc::default(),
            group_started: std::sync::Once::new(),
            me: me.clone(),
            sync_failed: Mutex::new(None),
            name: name.to_owned(),
            dir: ddir,
            data,
            capacity: m.capacity,
            region_size: m.region_size,
            meta: Mutex::new(meta),
            bitmap: Mutex::new(bitmap),
            core: Mutex::new(core),
            cond: Condvar::new(),
            timing,
            net,
            stopping: AtomicBool::new(false),
            gate: Mutex::new(()),
            snapshot: Mutex::new(None),
            last_snapshot: Mutex::new(None),
        }))
    }

    /// The disk's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The disk's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A copy of the durable record.
    pub fn meta(&self) -> Meta {
        lock(&self.meta).get().clone()
    }

    pub(crate) fn core(&self) -> MutexGuard<'_, Core> {
        lock(&self.core)
    }

    pub(crate) fn refused(&self, why: impl Into<String>) -> ReplicaError {
        ReplicaError::Refused {
            disk: self.name.clone(),
            why: why.into(),
        }
    }

    pub(crate) fn io_err(&self, what: &str, source: io::Error) -> ReplicaError {
        ReplicaError::Io {
            disk: self.name.clone(),
            what: what.to_owned(),
            source,
        }
    }

    /// The regions `offset..offset+len` touches, first and last.
    pub(crate) fn regions_of(&self, offset: u64, len: u64) -> (u64, u64) {
        let first = offset / self.region_size;
        let last = (offset + len.max(1) - 1) / self.region_size;
        (first, last)
    }

    /// What `enspeed disk status` shows.
    pub fn status(&self) -> Status {
        let m = self.meta();
        let out_of_sync = lock(&self.bitmap).count() * self.region_size;
        let core = self.core();
        let link = match (&core.link, core.serving_session, core.in_sync) {
            (Some(_), _, true) => LinkState::InSync,
            (Some(_), _, false) => LinkState::Resyncing,
            (None, Some(_), _) => LinkState::Serving,
            (None, None, _) => LinkState::Down,
        };
        Status {
            name: m.name,
            disk_id: m.disk_id,
            capacity: m.capacity,
            region_size: m.region_size,
            role: m.role,
            generation: m.generation,
            data: m.data,
            bitmap_base: m.bitmap_base,
            peer: m.peer,
            peer_server: m.peer_server,
            link,
            out_of_sync_bytes: out_of_sync.min(self.capacity),
            stalled_writes: core.pending.values().filter(|p| !p.remote).count(),
            resync: core.resync.clone(),
            last_resync: core.last_resync.clone(),
            last_error: core.last_error.clone(),
            vhost_socket: None,
            snapshot: match lock(&self.snapshot).as_ref() {
                Some(s) => Some(s.progress()),
                None => lock(&self.last_snapshot).clone(),
            },
        }
    }

    /// Sets (or with None, removes) the backup's mirror address, and the server it must be
    /// (any of the cluster if `None`).
    pub fn set_peer(
        &self,
        peer: Option<String>,
        peer_server: Option<u64>,
    ) -> Result<(), ReplicaError> {
        let mut meta = lock(&self.meta);
        if meta.get().role == Role::Backup && peer.is_some() {
            return Err(
                self.refused("a backup does not connect to a peer; attach it on the primary")
            );
        }
        meta.update(|m| {
            m.peer = peer;
            if m.peer.is_some() {
                m.peer_server = peer_server;
            }
        })?;
        drop(meta);
        self.drop_link("the backup was changed");
        self.cond.notify_all();
        Ok(())
    }

    /// Before a bit of this copy's bitmap is cleared: from then on it no longer marks all that
    /// was written since the data was all zeros, so a new backup needs a full sync.
    pub(crate) fn forget_zeros(&self) -> Result<(), String> {
        let mut meta = lock(&self.meta);
        if meta.get().from_zeros {
            meta.update(|m| m.from_zeros = false)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Sets the server at the other end: on a backup, the only primary it takes a link from
    /// (any server of the cluster if `None`).
    pub fn set_peer_server(&self, server: Option<u64>) -> Result<(), ReplicaError> {
        lock(&self.meta).update(|m| m.peer_server = server)?;
        Ok(())
    }

    /// The server at the other end, if one is named.
    pub fn peer_server(&self) -> Option<u64> {
        lock(&self.meta).get().peer_server
    }

    /// Raises the generation to `generation`: a backup is promoted, a primary
    /// goes on alone; either way the result is Standalone, and writes stalled
    /// for an unreachable backup complete. The control plane calls this after
    /// a Raft commit. A backup whose data is not consistent is refused unless
    /// `force`.
    pub fn raise_generation(&self, generation: u64, force: bool) -> Result<(), ReplicaError> {
        let mut meta = lock(&self.meta);
        let m = meta.get().clone();
        if generation <= m.generation {
            return Err(self.refused(format!(
                "generation {generation} is not above the current generation {}",
                m.generation
            )));
        }
        if m.role == Role::Backup && m.data != DataState::Consistent && !force {
            return Err(self.refused(format!(
                "this copy's data is {:?}: it cannot serve a guest (force to promote anyway)",
                m.data
            )));
        }
        // A backup in sync at its generation is the base of the changes from
        // now on; a primary's bitmap already runs from its base.
        let base = if m.role == Role::Backup {
            m.generation
        } else {
            m.bitmap_base
        };
        meta.update(|m| {
            m.generation = generation;
            m.role = Role::Standalone;
            m.bitmap_base = base;
            if force {
                m.data = DataState::Consistent;
            }
        })?;
        let (done, link) = {
            let mut core = self.core();
            core.generation = generation;
            core.role = Role::Standalone;
            core.serving_session = None;
            // A promoted backup applied its primary's larger writes without syncing them:
            // the first flush from now on syncs.
            core.applied_only_done += 1;
            core.in_sync = false;
            (self.complete_stalled(&mut core, None), core.link.take())
        };
        drop(meta);
        // Killed outside the lock: a dying link reports to this replica.
        if let Some(l) = link {
            l.kill();
        }
        tracing::info!(disk = %self.name, generation, base, "generation raised: standalone");
        run_done(done);
        self.cond.notify_all();
        Ok(())
    }

    /// Makes this copy a backup: it stops serving the guest and waits for a
    /// primary. The control plane demotes a copy only after a Raft commit made
    /// another copy the primary, and after stopping the guest here: writes
    /// still pending then (stalled, because the new primary refuses frames of
    /// the old generation) were never acknowledged to anyone. They fail with an
    /// error, once their local part is done; their regions stay marked in the
    /// bitmap, so the resync from the new primary rewrites them here. Refused
    /// while a local write does not finish.
    pub fn demote(&self) -> Result<(), ReplicaError> {
        let mut meta = lock(&self.meta);
        if meta.get().role == Role::Backup {
            return Ok(());
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let abandoned = loop {
            let mut core = self.core();
            if core.pending.values().all(|p| p.local.is_some()) {
                let ids: Vec<u64> = core.pending.keys().copied().collect();
                let mut out = Vec::new();
                for id in ids {
                    let p = core.pending.remove(&id).expect("listed");
                    release(&mut core.unacked, p.regions);
                    out.push((
                        p.done,
                        Err(io::Error::other(format!(
                            "disk {}: demoted to backup before the write was mirrored",
                            self.name
                        ))),
                    ));
                }
                break out;
            }
            if std::time::Instant::now() >= deadline {
                return Err(self.refused(format!(
                    "{} guest writes are still being written locally",
                    core.pending.len()
                )));
            }
            drop(core);
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        if !abandoned.is_empty() {
            tracing::warn!(disk = %self.name, writes = abandoned.len(), "demoting: unacknowledged guest writes failed; their regions stay marked for the resync");
        }
        let made_backup = self
            .sync_local()
            .map_err(|e| self.io_err("syncing before demotion", e))
            .and_then(|()| {
                meta.update(|m| {
                    m.role = Role::Backup;
                    m.peer = None;
                    // A backup's bitmap does not mark what its primary writes into it.
                    m.from_zeros = false;
                })
                .map_err(ReplicaError::from)
            });
        if let Err(e) = made_backup {
            drop(meta);
            run_done(abandoned);
            return Err(e);
        }
        let link = {
            let mut core = self.core();
            core.role = Role::Backup;
            core.in_sync = false;
            core.link.take()
        };
        drop(meta);
        if let Some(l) = link {
            l.kill();
        }
        run_done(abandoned);
        tracing::info!(disk = %self.name, "demoted to backup");
        self.cond.notify_all();
        Ok(())
    }

    /// Drops the current link to the backup, if any (it will be retried).
    pub(crate) fn drop_link(&self, why: &str) {
        let link = self.core().link.take();
        if let Some(l) = link {
            tracing::warn!(disk = %self.name, why, "mirror link dropped");
            l.kill();
        }
    }

    /// The link `link_id` died: pending writes sent on it stall.
    pub(crate) fn link_down(&self, link_id: u64, why: &str) {
        let mut core = self.core();
        if core.link.as_ref().is_some_and(|l| l.id() == link_id) {
            core.link = None;
            core.in_sync = false;
            core.resync = None;
            core.last_error = Some(why.to_owned());
            tracing::warn!(disk = %self.name, why, "mirror link down");
        }
        drop(core);
        self.cond.notify_all();
    }

    /// Completes, once the other half is done too, pending write `id`.
    fn finish(&self, id: u64, local: Option<io::Result<()>>, remote: bool) {
        let done = {
            let mut core = self.core();
            let Some(p) = core.pending.get_mut(&id) else {
                return;
            };
            if let Some(r) = local {
                p.local = Some(r);
            }
            p.remote |= remote;
            if p.local.is_none() || !p.remote {
                return;
            }
            let p = core.pending.remove(&id).expect("present");
            core.completed(&p);
            vec![(p.done, p.local.unwrap_or(Ok(())))]
        };
        run_done(done);
    }

    /// An acknowledgement for pending write `id` arrived from the backup.
    pub(crate) fn remote_done(&self, id: u64) {
        self.finish(id, None, true);
    }

    /// Completes every pending write whose remote half is owed and that was
    /// not sent on `current` (the stalled ones), returning their callbacks.
    pub(crate) fn complete_stalled(
        &self,
        core: &mut Core,
        current: Option<u64>,
    ) -> Vec<(Option<Done>, io::Result<()>)> {
        let ids: Vec<u64> = core
            .pending
            .iter()
            .filter(|(_, p)| !p.remote && (current.is_none() || p.sent_on != current))
            .map(|(id, _)| *id)
            .collect();
        let mut out = Vec::new();
        for id in ids {
            let p = core.pending.get_mut(&id).expect("present");
            p.remote = true;
            // Completed without the backup's answer: a flush covers nothing there.
            p.answered = false;
            if p.local.is_some() {
                let p = core.pending.remove(&id).expect("present");
                core.completed(&p);
                out.push((p.done, p.local.unwrap_or(Ok(()))));
            }
        }
        out
    }

    /// Waits until no local write is in progress on `region`, then marks it
    /// as being copied: new writes to it wait until [`Replica::end_copy`].
    pub(crate) fn begin_copy(&self, region: u64) {
        let mut core = self.core();
        while core.resync_busy.is_some() {
            core = self.cond.wait(core).unwrap_or_else(|p| p.into_inner());
        }
        core.resync_busy = Some(region);
        while core.local_busy.get(&region).copied().unwrap_or(0) > 0 {
            core = self.cond.wait(core).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Ends the copy begun by [`Replica::begin_copy`].
    pub(crate) fn end_copy(&self) {
        self.core().resync_busy = None;
        self.cond.notify_all();
    }

    /// Regions safe to clear now: no pending write, and untouched for
    /// `clean_after_passes` passes; forgets what was touched.
    pub(crate) fn clean_candidates(&self, set: &[u64]) -> Vec<u64> {
        let mut guard = self.core();
        let core = &mut *guard;
        let mut idle = HashMap::with_capacity(set.len());
        let mut candidates = Vec::new();
        for &r in set {
            let passes = if core.touched.contains(&r) {
                0
            } else {
                core.idle_passes.get(&r).copied().unwrap_or(0) + 1
            };
            idle.insert(r, passes);
            if passes >= self.timing.clean_after_passes
                && core.unacked.get(&r).copied().unwrap_or(0) == 0
            {
                candidates.push(r);
            }
        }
        core.idle_passes = idle;
        core.touched.clear();
        candidates
    }

    /// Forgets which regions were written (before a barrier that covers them).
    pub(crate) fn reset_touched(&self) {
        self.core().touched.clear();
    }

    /// Of `candidates`, those still untouched; called with the bitmap locked.
    pub(crate) fn still_clean(&self, candidates: &[u64]) -> Vec<u64> {
        let core = self.core();
        candidates
            .iter()
            .copied()
            .filter(|r| !core.touched.contains(r) && core.unacked.get(r).copied().unwrap_or(0) == 0)
            .collect()
    }

    /// Registers a write (regions given; `applied_only` when it is not made durable before
    /// it completes) or flush (None) and returns its id, the link to send it on if it goes
    /// to the backup and a link is up, and for a flush whether it needs a local fdatasync.
    fn register(
        &self,
        done: Done,
        regions: Option<(u64, u64)>,
        applied_only: bool,
    ) -> Result<(u64, Option<Arc<Link>>, bool), Done> {
        let mut core = self.core();
        if core.role == Role::Backup {
            return Err(done);
        }
        if let Some((first, last)) = regions {
            while core
                .resync_busy
                .is_some_and(|r| (first..=last).contains(&r))
            {
                core = self.cond.wait(core).unwrap_or_else(|p| p.into_inner());
            }
            for r in first..=last {
                *core.local_busy.entry(r).or_default() += 1;
                *core.unacked.entry(r).or_default() += 1;
                core.touched.insert(r);
            }
        }
        let id = core.next_id;
        core.next_id += 1;
        // Standalone does not wait for the backup, but a connected backup
        // (being resynced) still gets every write, in order.
        let standalone = core.role == Role::Standalone;
        let flush = regions.is_none();
        // Every write completed so far is durable on the backup: the flush skips it.
        let skip_backup =
            flush && !standalone && core.applied_only_flushed == core.applied_only_done;
        // ... and on the local disk: no fdatasync either.
        let sync_local = flush && core.applied_only_synced != core.applied_only_done;
        let remote = standalone || skip_backup;
        let covers = flush.then_some(core.applied_only_done);
        let link = if skip_backup { None } else { core.link.clone() };
        core.pending.insert(
            id,
            Pending {
                done: Some(done),
                regions: regions.unwrap_or((1, 0)),
                local: None,
                remote,
                sent_on: link.as_ref().map(|l| l.id()),
                applied_only,
                covers,
                answered: flush && !remote,
            },
        );
        Ok((id, link, sync_local))
    }

    /// Completes the local half of pending `id` with the group commit's next fdatasync.
    fn sync_later(&self, id: u64) {
        self.group_started.call_once(|| {
            let (group, me) = (self.group.clone(), self.me.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("sync {}", self.name))
                .spawn(move || group.run(me));
            if let Err(e) = spawned {
                tracing::warn!(disk = %self.name, error = %e, "no group commit thread: each write syncs alone");
                self.group.stop();
            }
        });
        let mut w = lock(&self.group.waiting);
        if w.1 {
            drop(w);
            let synced = self.sync_local();
            return self.finish(id, Some(synced), false);
        }
        w.0.push(id);
        drop(w);
        self.group.cond.notify_one();
    }

    fn local_finished(&self, regions: (u64, u64)) {
        let mut core = self.core();
        for r in regions.0..=regions.1 {
            if let Some(n) = core.local_busy.get_mut(&r) {
                *n -= 1;
                if *n == 0 {
                    core.local_busy.remove(&r);
                }
            }
        }
        drop(core);
        self.cond.notify_all();
    }

    /// Stops background work (connector, sessions).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.group.stop();
        self.drop_link("stopping");
        self.cond.notify_all();
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Waits on the condition variable for at most `d`.
    pub(crate) fn wait_a_while(&self, d: Duration) {
        let core = self.core();
        let _ = self.cond.wait_timeout(core, d);
    }

    /// Publishes the progress of the running resync (None: none runs).
    pub(crate) fn set_progress(&self, p: Option<ResyncProgress>) {
        self.core().resync = p;
    }

    /// Makes the local data durable. A failure sticks: the kernel reports a lost write-back
    /// to one fdatasync only, so every later one fails too (a flush after it must not
    /// succeed on the strength of a sync that happened not to see the error).
    pub(crate) fn sync_local(&self) -> io::Result<()> {
        if let Some(e) = lock(&self.sync_failed).as_ref() {
            return Err(io::Error::other(format!(
                "disk {}: an earlier flush failed ({e}); its data may be lost",
                self.name
            )));
        }
        self.data.sync_data().inspect_err(|e| {
            tracing::error!(disk = %self.name, error = %e, "flush failed: every later flush fails too");
            *lock(&self.sync_failed) = Some(e.to_string());
        })
    }

    /// Computes a progress record: `done` of `total` bytes, `copied` of them since `started`.
    pub(crate) fn progress(
        full: bool,
        total: u64,
        done: u64,
        copied: u64,
        started: Instant,
    ) -> ResyncProgress {
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        ResyncProgress {
            full,
            total_bytes: total,
            done_bytes: done,
            bytes_left: total - done,
            percent: if total == 0 {
                100.0
            } else {
                done as f64 * 100.0 / total as f64
            },
            rate_bytes_per_sec: (copied as f64 / secs) as u64,
        }
    }
}

impl Core {
    /// Accounts for pending write or flush `p`, just completed.
    fn completed(&mut self, p: &Pending) {
        release(&mut self.unacked, p.regions);
        if p.applied_only {
            self.applied_only_done += 1;
        }
        if let Some(n) = p.covers {
            if p.answered {
                self.applied_only_flushed = self.applied_only_flushed.max(n);
            }
            if matches!(p.local, Some(Ok(()))) {
                self.applied_only_synced = self.applied_only_synced.max(n);
            }
        }
    }
}

fn release(unacked: &mut HashMap<u64, u32>, (first, last): (u64, u64)) {
    for r in first..=last {
        if let Some(n) = unacked.get_mut(&r) {
            *n -= 1;
            if *n == 0 {
                unacked.remove(&r);
            }
        }
    }
}

pub(crate) fn run_done(done: Vec<(Option<Done>, io::Result<()>)>) {
    for (d, r) in done {
        if let Some(d) = d {
            d(r);
        }
    }
}

/// Locks `m`, taking the data of a poisoned lock (a panicked holder) as is.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl BlockStore for Replica {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn device_id(&self) -> String {
        self.name.clone()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(self.capacity, offset, buf.len())?;
        if self.core().role == Role::Backup {
            return Err(io::Error::other(format!(
                "disk {} is a backup here: it serves no guest",
                self.name
            )));
        }
        self.data.read_exact_at(buf, offset)
    }

    fn write(&self, offset: u64, data: Vec<u8>, fua: bool, done: Done) {
        if let Err(e) = check_range(self.capacity, offset, data.len()) {
            return done(Err(e));
        }
        let regions = self.regions_of(offset, data.len() as u64);
        if let Err(e) = lock(&self.bitmap).set_range(regions.0, regions.1) {
            return done(Err(e));
        }
        let durable = fua || data.len() <= DURABLE_WRITE_MAX;
        let (id, link, _) = match self.register(done, Some(regions), !durable) {
            Ok(r) => r,
            Err(done) => {
                return done(Err(io::Error::other(format!(
                    "disk {} is a backup here: it serves no guest",
                    self.name
                ))))
            }
        };
        if let Some(link) = link {
            // On failure the link is dead: the write stalls like any other.
            let _ = link.send_write(id, offset, &data, durable);
        }
        let local = self.data.write_all_at(&data, offset);
        self.local_finished(regions);
        match local {
            Ok(()) if durable => self.sync_later(id),
            local => self.finish(id, Some(local), false),
        }
    }

    fn flush(&self, done: Done) {
        let (id, link, sync_local) = match self.register(done, None, false) {
            Ok(r) => r,
            Err(done) => {
                return done(Err(io::Error::other(format!(
                    "disk {} is a backup here: it serves no guest",
                    self.name
                ))))
            }
        };
        if let Some(link) = link {
            let _ = link.send_flush(id);
        }
        if sync_local {
            self.sync_later(id);
        } else {
            self.finish(id, Some(Ok(())), false);
        }
    }
}
