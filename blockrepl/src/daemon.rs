//! `enspeed blockd`: the replicated disks of one server.
//!
//! It keeps every disk under its data directory (`DIR/NAME/{data,meta,bitmap}`),
//! accepts mirror links from primaries on its TCP address, keeps the links of
//! its own primaries to their backups, serves disks to VMMs over
//! vhost-user-blk, and answers a control socket: one JSON request per line,
//! one JSON answer per line (`{"ok":true,...}` or `{"ok":false,"error":...}`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::meta::Role;
use crate::net::{MirrorNet, MirrorStream};
use crate::proto::{Frame, Hello, Kind};
use crate::replica::{lock, LinkState, NewRole, Replica, Status, Timing};
use crate::store::BlockStore;
use crate::vhost_blk::VhostBlkServer;

/// Longest control request accepted.
const MAX_LINE: u64 = 64 * 1024;
/// Default bitmap region: 1 MiB.
pub const DEFAULT_REGION: u64 = 1 << 20;

/// Parses a size: bytes, or with a K, M, G or T suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, shift) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 10),
        Some('M') => (&s[..s.len() - 1], 20),
        Some('G') => (&s[..s.len() - 1], 30),
        Some('T') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 4096, 64M, 10G)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s} is too large"))
}

/// A request on the control socket; also the subcommands of `enspeed disk`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, clap::Subcommand)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Create a disk: a primary (the first copy), or with --backup an empty backup.
    Create {
        /// Name, the same on both servers.
        name: String,
        /// Size: bytes, or with a K, M, G or T suffix.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Bitmap region size (default 1M).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[arg(long, value_parser = parse_size)]
        region_size: Option<u64>,
        /// Create an empty backup that waits for its primary.
        #[serde(default)]
        #[arg(long)]
        backup: bool,
        /// Keep the copy in this storage pool (a directory such as /vms1); the
        /// data directory then holds a link to it, so the disk is found again
        /// at start. The data directory itself when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[arg(long)]
        pool: Option<PathBuf>,
        /// Fill the new primary copy with the data of the disk FROM on this blockd (a clone;
        /// FROM must not be written meanwhile: its VM is stopped).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[arg(long)]
        from: Option<String>,
        /// Fill the new primary copy with the raw disk image in file IMAGE (an appliance's,
        /// from the library; at most the disk's size).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[arg(long)]
        image: Option<PathBuf>,
        /// The server at the other end, as its certificate names it: for a backup, the only
        /// primary it takes a link from (any server of the cluster when absent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[arg(long)]
        peer_server: Option<u64>,
        /// The disk's identity (hex, the control plane's): a primary carries it, a backup
        /// takes a link only from a primary that carries it. Random for a primary when absent;
        /// a backup then takes the first primary's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[arg(long)]
        disk_id: Option<String>,
    },
    /// Show one disk, or all: role, generation, link, resync progress.
    Status {
        /// The disk; all when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Mirror a primary to the backup served by the blockd at PEER (host:port).
    Attach {
        /// The disk.
        name: String,
        /// The backup server's blockd mirror address.
        peer: String,
        /// The backup's server, as its certificate must name it (any server of the cluster
        /// when absent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[arg(long)]
        peer_server: Option<u64>,
    },
    /// Stop mirroring a primary (its writes stall until it is promoted to go on alone).
    Detach {
        /// The disk.
        name: String,
    },
    /// Raise the generation: promote a backup, or let a primary go on alone.
    Promote {
        /// The disk.
        name: String,
        /// The new generation, above the current one.
        #[arg(long)]
        generation: u64,
        /// Promote a backup whose data is not consistent.
        #[serde(default)]
        #[arg(long)]
        force: bool,
    },
    /// Make a primary a backup again.
    Demote {
        /// The disk.
        name: String,
        /// The new primary's server: the only one it takes a link from from now on (any
        /// server of the cluster when absent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[arg(long)]
        primary_server: Option<u64>,
    },
    /// Grow a disk no VM is using to SIZE (each copy is grown by its own blockd; a link between
    /// copies of different sizes is refused until both are). The same size again is done.
    Grow {
        /// The disk.
        name: String,
        /// The new size: bytes, or with a K, M, G or T suffix.
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Delete a disk that is not linked.
    Delete {
        /// The disk.
        name: String,
    },
    /// Start point-in-time images of backup copies NAMES, together (a VM's disks: crash
    /// consistent across them), each into DIR/NAME.raw, made while the copies go on taking
    /// their primary's writes; `status` shows each one's progress.
    Snapshot {
        /// The backup copies, in sync.
        #[arg(required = true)]
        names: Vec<String>,
        /// A directory for the images (created).
        #[arg(long)]
        dir: PathBuf,
        /// Copy at most this many bytes a second (K, M, G suffixes; default 16M), so that
        /// the guest's writes keep the disk.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[arg(long, value_parser = parse_size)]
        rate: Option<u64>,
    },
    /// Stop the snapshots of copies NAMES being made (their images are left to the caller).
    SnapshotCancel {
        /// The copies.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// The cluster's roster, from the node agent: mirror links are made only with these
    /// certificates (hex SHA-256 by server id), never with a revoked one.
    #[command(skip)]
    Roster {
        /// Each member's certificate, with its server id. (Pairs, not a map: a map's integer
        /// keys do not survive this enum's tagged form in JSON.)
        members: Vec<(u64, String)>,
        /// Removed servers' certificates.
        revoked: Vec<String>,
    },
}

/// The answer to a request.
#[derive(Debug, Serialize, Deserialize, Default)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// What went wrong, when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Disks, for `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<Vec<Status>>,
}

impl Response {
    fn ok() -> Self {
        Response {
            ok: true,
            ..Default::default()
        }
    }

    fn err(msg: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(msg.into()),
            disks: None,
        }
    }
}

/// How blockd runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Data directory.
    pub dir: PathBuf,
    /// Mirror address to listen on (host:port).
    pub listen: String,
    /// Control socket path.
    pub control: PathBuf,
    /// Link timings.
    pub timing: Timing,
    /// How mirror links are made: mutual TLS with the server's certificate.
    pub net: MirrorNet,
}

/// Errors starting blockd.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Setting up a directory, socket or listener failed.
    #[error("blockd: {what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// A disk in the data directory cannot be opened.
    #[error("blockd: {0}")]
    Disk(#[from] crate::replica::ReplicaError),
    /// A disk's services cannot start.
    #[error("blockd: disk {0}: {1}")]
    Start(String, String),
}

/// One disk of this server and the vhost-user-blk socket that serves it.
struct Disk {
    replica: Arc<Replica>,
    vhost: VhostBlkServer,
}

/// The server's disks.
pub struct Blockd {
    cfg: Config,
    net: Arc<MirrorNet>,
    disks: Mutex<BTreeMap<String, Disk>>,
}

/// The vhost-user-blk socket of the disk in `dir`: a VMM boots with
/// `--disk vhost-user=DIR/vhost.sock`. A backup's socket refuses I/O.
pub fn vhost_socket(disk_dir: &Path) -> PathBuf {
    disk_dir.join("vhost.sock")
}

/// Starts what runs for each disk: its connector and its vhost-user-blk server.
fn start_disk(r: Arc<Replica>) -> Result<Disk, String> {
    crate::resync::start(&r).map_err(|e| format!("starting the connector of {}: {e}", r.name()))?;
    let store: Arc<dyn BlockStore> = r.clone();
    let vhost =
        crate::vhost_blk::spawn(&vhost_socket(r.dir()), store).map_err(|e| e.to_string())?;
    Ok(Disk { replica: r, vhost })
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

impl Blockd {
    /// Opens every disk under the data directory and starts their connectors.
    pub fn open(cfg: Config) -> Result<Arc<Blockd>, DaemonError> {
        std::fs::create_dir_all(&cfg.dir).map_err(io(format!("creating {}", cfg.dir.display())))?;
        let net = Arc::new(cfg.net.clone());
        let mut disks = BTreeMap::new();
        for entry in
            std::fs::read_dir(&cfg.dir).map_err(io(format!("reading {}", cfg.dir.display())))?
        {
            let entry = entry.map_err(io(format!("reading {}", cfg.dir.display())))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !entry.path().join("meta").exists() {
                continue;
            }
            let r = Replica::open(&cfg.dir, &name, cfg.timing, Arc::clone(&net))?;
            tracing::info!(disk = %name, role = ?r.meta().role, generation = r.meta().generation, "disk opened");
            let d = start_disk(r).map_err(|e| DaemonError::Start(name.clone(), e))?;
            disks.insert(name, d);
        }
        Ok(Arc::new(Blockd {
            cfg,
            net,
            disks: Mutex::new(disks),
        }))
    }

    /// Runs blockd: the mirror listener on a thread, the control socket here.
    pub fn run(self: &Arc<Self>) -> Result<(), DaemonError> {
        let listener = TcpListener::bind(&self.cfg.listen)
            .map_err(io(format!("listening on {}", self.cfg.listen)))?;
        let _ = std::fs::remove_file(&self.cfg.control);
        let control = UnixListener::bind(&self.cfg.control)
            .map_err(io(format!("binding {}", self.cfg.control.display())))?;
        tracing::info!(listen = %self.cfg.listen, control = %self.cfg.control.display(), "blockd ready");
        let me = self.clone();
        std::thread::Builder::new()
            .name("mirror-listener".into())
            .spawn(move || me.accept_mirrors(listener))
            .map_err(io("starting the mirror listener"))?;
        for conn in control.incoming() {
            match conn {
                Ok(c) => {
                    let me = self.clone();
                    let _ = std::thread::Builder::new()
                        .name("control".into())
                        .spawn(move || me.control(c));
                }
                Err(e) => tracing::warn!(error = %e, "control socket accept"),
            }
        }
        Ok(())
    }

    fn accept_mirrors(self: Arc<Self>, listener: TcpListener) {
        for conn in listener.incoming() {
            match conn {
                Ok(c) => {
                    let me = self.clone();
                    let _ = std::thread::Builder::new()
                        .name("mirror-session".into())
                        .spawn(move || me.mirror(c));
                }
                Err(e) => tracing::warn!(error = %e, "mirror accept"),
            }
        }
    }

    /// A primary connected: check who it is, read its Hello and hand it to the disk it names
    /// if that disk takes a link from this server.
    fn mirror(&self, tcp: TcpStream) {
        let peer = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        let _ = tcp.set_nodelay(true);
        let _ = tcp.set_read_timeout(Some(self.cfg.timing.link_timeout));
        let (mut stream, server) = match self.net.accept(tcp) {
            Ok(s) => s,
            Err(why) => {
                tracing::warn!(peer = %peer, why = %why, "mirror connection refused");
                return;
            }
        };
        let refuse = |s: &mut MirrorStream, why: String| {
            tracing::warn!(peer = %peer, ?server, why = %why, "mirror connection refused");
            let _ = Frame::error(1, 0, &why)
                .write_to(s)
                .and_then(|()| s.flush());
        };
        let first = match Frame::read_from(
            &mut (&mut stream).take(u64::from(crate::proto::MAX_PAYLOAD) + 64),
        ) {
            Ok(f) if f.kind == Kind::Hello => f,
            Ok(f) => return refuse(&mut stream, format!("expected Hello, got {:?}", f.kind)),
            Err(e) => return refuse(&mut stream, format!("bad first frame: {e}")),
        };
        let hello: Hello = match first.parse_json() {
            Ok(h) => h,
            Err(e) => return refuse(&mut stream, e),
        };
        let Some(disk) = self.get(&hello.disk) else {
            return refuse(
                &mut stream,
                format!("no disk named {:?} on this server", hello.disk),
            );
        };
        if let (Some(want), Some(got)) = (disk.peer_server(), server) {
            if want != got {
                return refuse(
                    &mut stream,
                    format!(
                        "disk {} takes its link from server {want}, not from server {got}",
                        hello.disk
                    ),
                );
            }
        }
        crate::backup::serve(disk, stream, hello);
    }

    fn control(&self, conn: UnixStream) {
        let mut w = match conn.try_clone() {
            Ok(w) => w,
            Err(_) => return,
        };
        let mut r = BufReader::new(conn);
        loop {
            let mut line = String::new();
            match (&mut r).take(MAX_LINE).read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let resp = if !line.ends_with('\n') && line.len() as u64 >= MAX_LINE {
                let r = Response::err(format!("request longer than {MAX_LINE} bytes"));
                let _ = reply(&mut w, &r);
                return;
            } else {
                match serde_json::from_str::<Request>(line.trim()) {
                    Ok(req) => self.handle(req),
                    Err(e) => Response::err(format!("bad request: {e}")),
                }
            };
            if reply(&mut w, &resp).is_err() {
                return;
            }
        }
    }

    /// The disk named `name`, if there is one.
    pub fn get(&self, name: &str) -> Option<Arc<Replica>> {
        lock(&self.disks).get(name).map(|d| d.replica.clone())
    }

    fn disk(&self, name: &str) -> Result<Arc<Replica>, String> {
        self.get(name)
            .ok_or_else(|| format!("no disk named {name:?}"))
    }

    /// Starts snapshots of backup copies `names` together into `dir` (`Request::Snapshot`):
    /// each copy's write gate held at once while they are installed, then one thread copies
    /// them, one after the other.
    fn snapshot(&self, names: &[String], dir: &Path, rate: u64) -> Result<Response, String> {
        use crate::meta::DataState;
        use crate::snapshot::Snapshot;
        let mut sorted = names.to_vec();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != names.len() {
            return Err("a disk is named twice".into());
        }
        // The disks stay locked until the snapshots are in place: none is grown, deleted or
        // snapshotted by another request meanwhile.
        let disks = lock(&self.disks);
        let replicas: Vec<Arc<Replica>> = {
            sorted
                .iter()
                .map(|n| {
                    let d = disks.get(n).ok_or_else(|| format!("no disk named {n:?}"))?;
                    let st = d.replica.status();
                    if st.role != Role::Backup {
                        return Err(format!("disk {n} is {:?} here, not a backup copy", st.role));
                    }
                    if st.data != DataState::Consistent {
                        return Err(format!(
                            "disk {n}'s backup copy here is not in sync with its primary ({:?})",
                            st.data
                        ));
                    }
                    if lock(&d.replica.snapshot).is_some() {
                        return Err(format!("disk {n}: a snapshot of it is being made"));
                    }
                    Ok(Arc::clone(&d.replica))
                })
                .collect::<Result<_, String>>()?
        };
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let made: Vec<(Arc<Replica>, Arc<Snapshot>)> = {
            // Between two writes on every copy at once.
            let _gates: Vec<_> = replicas.iter().map(|r| lock(&r.gate)).collect();
            let mut made = Vec::new();
            for r in &replicas {
                let image = dir.join(format!("{}.raw", r.name()));
                match Snapshot::new(&image, r.capacity) {
                    Ok(s) => made.push((Arc::clone(r), Arc::new(s))),
                    Err(e) => {
                        for (r, _) in &made {
                            let _ = std::fs::remove_file(dir.join(format!("{}.raw", r.name())));
                        }
                        return Err(format!("creating {}: {e}", image.display()));
                    }
                }
            }
            for (r, s) in &made {
                *lock(&r.snapshot) = Some(Arc::clone(s));
                *lock(&r.last_snapshot) = None;
            }
            made
        };
        drop(disks);
        tracing::info!(disks = ?sorted, dir = %dir.display(), "snapshot started");
        std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || {
                let mut failed: Option<String> = None;
                for (r, s) in made {
                    if let Some(why) = &failed {
                        s.cancel();
                        tracing::warn!(disk = %r.name(), why, "snapshot given up");
                    }
                    let walked = s.run(&r.data, rate);
                    {
                        // Out of the write path, between two writes: no write copies ahead
                        // from now on, so the image's bytes are final.
                        let _gate = lock(&r.gate);
                        *lock(&r.last_snapshot) = Some(s.progress());
                        *lock(&r.snapshot) = None;
                    }
                    let result = walked.and_then(|()| s.finish());
                    *lock(&r.last_snapshot) = Some(s.progress());
                    match &result {
                        Ok(()) => tracing::info!(disk = %r.name(), saved_by_writes = s.progress().saved_by_writes, "snapshot made"),
                        Err(e) => {
                            tracing::warn!(disk = %r.name(), error = %e, "snapshot failed");
                            failed.get_or_insert_with(|| format!("disk {}: {e}", r.name()));
                        }
                    }
                }
            })
            .map_err(|e| {
                for r in &replicas {
                    *lock(&r.snapshot) = None;
                }
                format!("starting the snapshot's copier: {e}")
            })?;
        Ok(Response::ok())
    }

    /// Carries out one control request.
    pub fn handle(&self, req: Request) -> Response {
        let result: Result<Response, String> = (|| match req {
            Request::Create {
                name,
                size,
                region_size,
                backup,
                pool,
                from,
                image,
                peer_server,
                disk_id,
            } => {
                let mut disks = lock(&self.disks);
                if disks.contains_key(&name) {
                    return Err(format!("disk {name} already exists"));
                }
                let source = match (&from, &image) {
                    (None, None) => None,
                    (Some(_), Some(_)) => {
                        return Err(format!(
                            "disk {name}: filled from another disk or from an image, not both"
                        ))
                    }
                    (_, _) if backup => {
                        return Err(format!(
                            "disk {name}: a backup is filled by its primary, not from another disk or an image"
                        ))
                    }
                    (None, Some(i)) => {
                        let len = std::fs::metadata(i)
                            .map_err(|e| format!("disk {name}: image {}: {e}", i.display()))?
                            .len();
                        if len > size {
                            return Err(format!(
                                "disk {name}: {size} bytes cannot hold image {}'s {len}",
                                i.display()
                            ));
                        }
                        Some((format!("image {}", i.display()), i.clone(), len))
                    }
                    (Some(f), None) => {
                        let d = disks
                            .get(f)
                            .ok_or_else(|| format!("disk {name}: no disk {f} to copy from"))?;
                        let st = d.replica.status();
                        if st.capacity > size {
                            return Err(format!(
                                "disk {name}: {size} bytes cannot hold disk {f}'s {}",
                                st.capacity
                            ));
                        }
                        if st.role == Role::Backup {
                            return Err(format!("disk {name}: disk {f} is a backup copy here; clone from its primary"));
                        }
                        Some((format!("disk {f}"), d.replica.dir().join("data"), st.capacity))
                    }
                };
                let role = if backup {
                    NewRole::Backup
                } else {
                    NewRole::Primary
                };
                let pool = pool.filter(|p| !p.as_os_str().is_empty() && *p != self.cfg.dir);
                let home = pool.as_deref().unwrap_or(&self.cfg.dir);
                if pool.is_some() {
                    let link = self.cfg.dir.join(&name);
                    if link.symlink_metadata().is_ok() {
                        return Err(format!("{} already exists", link.display()));
                    }
                    std::fs::create_dir_all(home)
                        .map_err(|e| format!("creating pool {}: {e}", home.display()))?;
                }
                let r = Replica::create(
                    home,
                    &name,
                    size,
                    region_size.unwrap_or(DEFAULT_REGION),
                    role,
                    peer_server,
                    disk_id,
                    self.cfg.timing,
                    Arc::clone(&self.net),
                )
                .map_err(|e| e.to_string())?;
                if let Some((f, src, len)) = &source {
                    // Its data is no longer all zeros: a new backup needs a full sync.
                    r.forget_zeros().map_err(|e| {
                        let _ = std::fs::remove_dir_all(r.dir());
                        format!("disk {name}: {e}")
                    })?;
                    let copied = crate::clone::copy_data(src, &r.dir().join("data"), *len)
                        .map_err(|e| {
                            let _ = std::fs::remove_dir_all(r.dir());
                            format!("disk {name}: copying the data of {f}: {e}")
                        })?;
                    tracing::info!(disk = %name, from = %f, copied, "filled with data");
                }
                if pool.is_some() {
                    std::os::unix::fs::symlink(r.dir(), self.cfg.dir.join(&name)).map_err(|e| {
                        format!(
                            "linking {} into {}: {e}",
                            r.dir().display(),
                            self.cfg.dir.display()
                        )
                    })?;
                }
                tracing::info!(disk = %name, size, backup, "disk created");
                disks.insert(name, start_disk(r)?);
                Ok(Response::ok())
            }
            Request::Status { name } => {
                let report = |d: &Disk| Status {
                    vhost_socket: Some(d.vhost.socket().to_path_buf()),
                    ..d.replica.status()
                };
                let all = lock(&self.disks);
                let disks = match name {
                    Some(n) => vec![report(
                        all.get(&n).ok_or_else(|| format!("no disk named {n:?}"))?,
                    )],
                    None => all.values().map(report).collect(),
                };
                Ok(Response {
                    ok: true,
                    error: None,
                    disks: Some(disks),
                })
            }
            Request::Attach {
                name,
                peer,
                peer_server,
            } => {
                self.disk(&name)?
                    .set_peer(Some(peer), peer_server)
                    .map_err(|e| e.to_string())?;
                Ok(Response::ok())
            }
            Request::Detach { name } => {
                self.disk(&name)?
                    .set_peer(None, None)
                    .map_err(|e| e.to_string())?;
                Ok(Response::ok())
            }
            Request::Promote {
                name,
                generation,
                force,
            } => {
                let d = self.disk(&name)?;
                if let Some(s) = lock(&d.snapshot).as_ref() {
                    // Writes no longer come through the mirror: no point in time to copy.
                    s.fail(format!(
                        "disk {name} was promoted to generation {generation}"
                    ));
                }
                d.raise_generation(generation, force)
                    .map_err(|e| e.to_string())?;
                Ok(Response::ok())
            }
            Request::Demote {
                name,
                primary_server,
            } => {
                let d = self.disk(&name)?;
                d.demote().map_err(|e| e.to_string())?;
                d.set_peer_server(primary_server)
                    .map_err(|e| e.to_string())?;
                Ok(Response::ok())
            }
            Request::Grow { name, size } => {
                let mut disks = lock(&self.disks);
                let d = disks
                    .get(&name)
                    .ok_or_else(|| format!("no disk named {name:?}"))?;
                if lock(&d.replica.snapshot).is_some() {
                    return Err(format!("disk {name}: a snapshot of it is being made"));
                }
                let capacity = d.replica.meta().capacity;
                if size == capacity {
                    return Ok(Response::ok());
                }
                if size < capacity || size % 512 != 0 {
                    return Err(format!(
                        "disk {name} holds {capacity} bytes: it grows only, to a multiple of 512 ({size} asked)"
                    ));
                }
                // Closed (its links and its vhost-user socket), grown, opened again.
                let d = disks.remove(&name).expect("present");
                d.replica.stop();
                let stopped = d.vhost.stop();
                let grown = Replica::grow(&self.cfg.dir, &name, size);
                let r = Replica::open(&self.cfg.dir, &name, self.cfg.timing, Arc::clone(&self.net))
                    .map_err(|e| format!("disk {name}: opening it again after the grow: {e}"))?;
                disks.insert(name.clone(), start_disk(r)?);
                stopped.map_err(|e| format!("stopping the vhost-user server of {name}: {e}"))?;
                grown.map_err(|e| e.to_string())?;
                Ok(Response::ok())
            }
            Request::Snapshot { names, dir, rate } => {
                self.snapshot(&names, &dir, rate.unwrap_or(crate::snapshot::DEFAULT_RATE))
            }
            Request::SnapshotCancel { names } => {
                let disks = lock(&self.disks);
                for n in &names {
                    let d = disks.get(n).ok_or_else(|| format!("no disk named {n:?}"))?;
                    if let Some(s) = lock(&d.replica.snapshot).as_ref() {
                        s.cancel();
                    }
                }
                Ok(Response::ok())
            }
            Request::Delete { name } => {
                let mut disks = lock(&self.disks);
                let d = disks
                    .get(&name)
                    .ok_or_else(|| format!("no disk named {name:?}"))?;
                if lock(&d.replica.snapshot).is_some() {
                    return Err(format!("disk {name}: a snapshot of it is being made"));
                }
                if d.replica.status().link != LinkState::Down {
                    return Err(format!(
                        "disk {name} is linked to its peer: detach or demote it first"
                    ));
                }
                let d = disks.remove(&name).expect("present");
                d.replica.stop();
                let dir = std::fs::canonicalize(d.replica.dir())
                    .unwrap_or_else(|_| d.replica.dir().to_owned());
                d.vhost
                    .stop()
                    .map_err(|e| format!("stopping the vhost-user server of {name}: {e}"))?;
                std::fs::remove_dir_all(&dir)
                    .map_err(|e| format!("removing {}: {e}", dir.display()))?;
                // The link from the data directory, when the copy was in a pool.
                let _ = std::fs::remove_file(self.cfg.dir.join(&name));
                Ok(Response::ok())
            }
            Request::Roster { members, revoked } => {
                let fp = |hex: &String| {
                    enspeed_trust::Fingerprint::parse(hex)
                        .ok_or_else(|| format!("{hex:?} is not a certificate fingerprint"))
                };
                let members = members
                    .iter()
                    .map(|(id, hex)| Ok((*id, fp(hex)?)))
                    .collect::<Result<Vec<_>, String>>()?;
                let revoked = revoked.iter().map(fp).collect::<Result<Vec<_>, String>>()?;
                tracing::info!(
                    members = members.len(),
                    revoked = revoked.len(),
                    "roster set"
                );
                self.net.set_roster(members, revoked);
                Ok(Response::ok())
            }
        })();
        result.unwrap_or_else(Response::err)
    }
}

fn reply(w: &mut UnixStream, r: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).expect("responses serialize");
    line.push(b'\n');
    w.write_all(&line)
}

/// Sends `request` to the blockd control socket at `socket`; returns the answer (which may
/// be a refusal: `ok` false and its `error`).
pub fn call(socket: &Path, request: &Request) -> std::io::Result<Response> {
    let mut s = UnixStream::connect(socket)?;
    let mut line = serde_json::to_vec(request).expect("requests serialize");
    line.push(b'\n');
    s.write_all(&line)?;
    let mut line = String::new();
    BufReader::new(s).take(MAX_LINE * 16).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad answer {line:?}: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_unknowns_are_refused() {
        let r: Request =
            serde_json::from_str(r#"{"cmd":"create","name":"d","size":4096}"#).unwrap();
        assert_eq!(
            r,
            Request::Create {
                name: "d".into(),
                size: 4096,
                region_size: None,
                backup: false,
                pool: None,
                from: None,
                image: None,
                peer_server: None,
                disk_id: None,
            }
        );
        let r: Request =
            serde_json::from_str(r#"{"cmd":"promote","name":"d","generation":3}"#).unwrap();
        assert_eq!(
            r,
            Request::Promote {
                name: "d".into(),
                generation: 3,
                force: false
            }
        );
        assert!(serde_json::from_str::<Request>(
            r#"{"cmd":"create","name":"d","size":1,"color":1}"#
        )
        .is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"explode"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"promote","name":"d"}"#).is_err());
    }

    #[test]
    fn every_request_survives_its_trip_through_json() {
        // The agent sends these as JSON: each must come back as it was sent.
        for r in [
            Request::Roster {
                members: vec![(1, "ab".repeat(32)), (7, "cd".repeat(32))],
                revoked: vec!["ef".repeat(32)],
            },
            Request::Promote {
                name: "d".into(),
                generation: 3,
                force: true,
            },
            Request::Grow {
                name: "d".into(),
                size: 3 << 30,
            },
        ] {
            let json = serde_json::to_string(&r).unwrap();
            let back: Request =
                serde_json::from_str(&json).unwrap_or_else(|e| panic!("{json}: {e}"));
            assert_eq!(back, r);
        }
    }
}
