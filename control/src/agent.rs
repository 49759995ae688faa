//! The node agent: runs inside `enspeed server` on every server that runs VMs. It supervises
//! the server's `enspeed blockd` and one `enspeed vmm` per VM whose disk's primary is here, and
//! makes them match the committed state; it reports what it sees back through Raft.
//!
//! Three threads:
//!
//! ```text
//!   heartbeat  every interval: heartbeat to the leader; the answer is the state, read
//!              linearizably, so it also proves a quorum still had this server in view. It
//!              names the revision held: the leader answers what changed since (records), or
//!              only the revision while nothing did, or the whole state when it no longer
//!              keeps the changes from there
//!   watchdog   no quorum answer for fence_timeout ──> fence: SIGKILL every VMM and blockd
//!              (nothing here writes a disk any more), before the leader's lease on this
//!              server (longer) can run out and the backups be promoted
//!   reconcile  on each fresh state: blockd up; each disk copy in its role and generation;
//!              each VM started where its disk's primary is, stopped elsewhere; report
//! ```
//!
//! A fenced server starts nothing until a heartbeat sent after the fence is answered, and then
//! only what that (linearizable) state says is its own.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use blockrepl::daemon::{self, Request as BlockdRequest};
use blockrepl::meta::Role;
use blockrepl::replica::LinkState;
use vmm_api::Request as VmmRequest;

use crate::api::{self, HeartbeatAnswer, Request};
use crate::copyback;
use crate::library::Shelf;
use crate::node::NodeHandle;
use crate::state_machine::{
    ApplianceDisk, BootOrder, Capacity, Command as StateCommand, DiskBus, DiskObservation,
    DiskRecord, MoveOutcome, NicAddresses, Observation, StateMachine, TaskKind, TaskOutcome,
    TaskRecord, TaskState, VmFault, VmObservation, VmPart, VmRecord,
};
use crate::transport::AddressBook;

/// The library's lists as the agent last looked at its files: ISOs and appliances.
type LibraryList = (
    imbl::OrdMap<String, crate::state_machine::IsoRecord>,
    imbl::OrdMap<String, crate::state_machine::ApplianceRecord>,
);

/// What a task does on this server.
enum Job {
    /// A copy back: each disk's data file and size.
    CopyBack(Vec<(PathBuf, u64)>),
    /// A live backup: the disks' names (their backup copies are here).
    Backup(Vec<String>),
    /// A download: from where, and the SHA-256 the OVA must have.
    Download { url: String, sha256: Option<String> },
}

/// Runs task `id` here, reporting its progress, and ends it: its images are put in the
/// library's place, then the cluster is told (so that the task reads "done" only when they
/// are there).
fn run_task(s: &Shared, id: u64, job: Job, cancel: &AtomicBool) {
    let me = s.cfg.id;
    let library = s.cfg.library_dir.clone();
    let told_of = |done_bytes, total_bytes| {
        s.propose(StateCommand::TaskProgress {
            id,
            server: me,
            done_bytes,
            total_bytes,
        });
    };
    let progress = |done_bytes| told_of(done_bytes, None);
    let work = library.join(format!(".work-task-{id}"));
    let copied = |sealed: Vec<crate::library::Sealed>| {
        let disks = sealed
            .iter()
            .map(|s| ApplianceDisk {
                size: s.size,
                sha256: s.sha256.clone(),
            })
            .collect();
        (TaskOutcome::CopiedBack { disks }, sealed)
    };
    let made = match job {
        Job::CopyBack(files) => {
            copyback::copy_disks(&files, &library, cancel, &progress).map(copied)
        }
        Job::Backup(names) => {
            backup_disks(s, &names, &work, &library, cancel, &progress).map(copied)
        }
        Job::Download { url, sha256 } => {
            crate::download::fetch(&url, sha256.as_deref(), &work, &library, cancel, &told_of).map(
                |d| {
                    // Its name and origin are the task's.
                    let appliance = d.imported.appliance("", String::new());
                    (TaskOutcome::Imported { appliance }, d.imported.disks)
                },
            )
        }
    };
    // Kept from the library's clean-up until the cluster has answered.
    let made = made.and_then(|(outcome, sealed)| {
        crate::library::Sealed::place_all(sealed)
            .map(|placed| (outcome, placed))
            .map_err(|e| {
                format!(
                    "putting the task's images in place in {}: {e}",
                    library.display()
                )
            })
    });
    let (outcome, made) = match made {
        Ok((outcome, placed)) => (outcome, Ok(placed)),
        Err(reason) => (
            TaskOutcome::Failed {
                reason: reason.clone(),
            },
            Err(reason),
        ),
    };
    let ended = StateCommand::TaskEnded {
        id,
        server: me,
        at_ms: now_ms(),
        outcome,
    };
    // Told until the cluster takes it (a task left running is no one's): for ten minutes at
    // most, when this server, without a quorum that long, has fenced itself anyway.
    let told = (0..600)
        .any(|_| s.propose(ended.clone()) || (std::thread::sleep(Duration::from_secs(1)), false).1);
    match made {
        // Listed now (or refused, and then deleted as unlisted files).
        Ok(_placed) if told => tracing::info!(server = me, task = id, "task done"),
        Ok(_) => tracing::warn!(
            server = me,
            task = id,
            "task done, but the cluster was not told"
        ),
        Err(e) => tracing::warn!(server = me, task = id, error = %e, "task failed"),
    }
    let _ = std::fs::remove_dir_all(&work);
}

/// A live backup of backup copies `names` here: blockd snapshots them together into `work`
/// (inside library directory `library`), then each image is hashed into the library's.
fn backup_disks(
    s: &Shared,
    names: &[String],
    work: &Path,
    library: &Path,
    cancel: &AtomicBool,
    progress: &dyn Fn(u64),
) -> Result<Vec<crate::library::Sealed>, String> {
    let socket = s.blockd_socket();
    let call = |req: &BlockdRequest| match daemon::call(&socket, req) {
        Ok(r) if r.ok => Ok(r),
        Ok(r) => Err(r.error.unwrap_or_default()),
        Err(e) => Err(format!("blockd: {e}")),
    };
    let snapshots = || -> Result<Vec<blockrepl::snapshot::SnapshotProgress>, String> {
        let disks = call(&BlockdRequest::Status { name: None })?
            .disks
            .unwrap_or_default();
        names
            .iter()
            .map(|n| {
                disks
                    .iter()
                    .find(|d| &d.name == n)
                    .ok_or_else(|| format!("no copy of disk {n} here"))
                    .map(|d| d.snapshot.clone().unwrap_or_default())
            })
            .collect()
    };
    // One left by an earlier attempt (this agent restarted) goes first.
    let _ = call(&BlockdRequest::SnapshotCancel {
        names: names.to_vec(),
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while snapshots()?
        .iter()
        .any(|p| !p.image.as_os_str().is_empty() && !p.finished && p.error.is_none())
    {
        if Instant::now() > deadline {
            return Err("an earlier snapshot of these disks does not stop".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_dir_all(work);
    call(&BlockdRequest::Snapshot {
        names: names.to_vec(),
        dir: work.to_path_buf(),
        rate: None,
    })?;
    loop {
        if cancel.load(Ordering::Relaxed) {
            let _ = call(&BlockdRequest::SnapshotCancel {
                names: names.to_vec(),
            });
            return Err("cancelled".into());
        }
        let now = snapshots()?;
        if let Some(n) = names
            .iter()
            .zip(&now)
            .find_map(|(n, p)| p.image.as_os_str().is_empty().then_some(n))
        {
            return Err(format!(
                "blockd has no snapshot of disk {n} any more (it restarted?)"
            ));
        }
        if let Some((n, e)) = names
            .iter()
            .zip(&now)
            .find_map(|(n, p)| p.error.as_ref().map(|e| (n, e)))
        {
            return Err(format!("disk {n}: {e}"));
        }
        progress(now.iter().map(|p| p.done).sum());
        if now.iter().all(|p| p.finished) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    names
        .iter()
        .map(|n| {
            crate::library::Sealed::adopt(library, Shelf::Image, work.join(format!("{n}.raw")))
                .map_err(|e| format!("disk {n}'s image: {e}"))
        })
        .collect()
}

/// Now, ms since the epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What the agent is told.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// This server.
    pub id: u64,
    /// Where the agent keeps VM files (serial logs, control sockets) and blockd's socket.
    pub dir: PathBuf,
    /// blockd's data directory (one folder per disk copy).
    pub blockd_dir: PathBuf,
    /// The ISO library's copy on this server (`library`).
    pub library_dir: PathBuf,
    /// blockd's mirror address, host:port.
    pub blockd_listen: String,
    /// blockd's mirror link timeout.
    pub link_timeout: Duration,
    /// The server's certificates (DATA/tls): blockd's mirror links are mutual TLS with them.
    pub tls_dir: PathBuf,
    /// The `enspeed` binary that blockd and the VMMs run from.
    pub binary: PathBuf,
    /// What this server offers to VMs.
    pub capacity: Capacity,
    /// Timings.
    pub timing: AgentTiming,
}

/// The agent's timings; the leader's lease on a server must be longer than `fence_timeout`
/// plus the time to kill its processes.
#[derive(Clone, Copy, Debug)]
pub struct AgentTiming {
    /// Between heartbeats.
    pub heartbeat: Duration,
    /// Without a quorum answer this long, the server fences itself.
    pub fence_timeout: Duration,
    /// At most one observation report this often.
    pub observe_every: Duration,
    /// A VMM that crashed is restarted after this long.
    pub restart_backoff: Duration,
    /// A guest asked to shut down (ACPI power button) is stopped hard after this long.
    pub shutdown_timeout: Duration,
}

impl AgentTiming {
    /// Defaults for a lease of `lease`: heartbeats every 100 ms, fencing at 70% of the lease
    /// (above the longest Raft election with the default ticks, 1 s, so replacing a dead leader
    /// fences nobody; 0.6 s below the lease, to kill the VMMs).
    pub fn for_lease(lease: Duration) -> AgentTiming {
        AgentTiming {
            heartbeat: Duration::from_millis(100),
            fence_timeout: lease * 7 / 10,
            observe_every: Duration::from_millis(500),
            restart_backoff: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(60),
        }
    }
}

/// One VMM this agent started.
struct VmProcess {
    child: Child,
    /// The disk generation it booted on.
    generation: u64,
}

/// The processes this agent runs. Held only for quick, non-blocking steps: the watchdog
/// takes it to fence.
#[derive(Default)]
struct Processes {
    blockd: Option<Child>,
    vmms: HashMap<String, VmProcess>,
}

/// The state as a quorum answered it.
struct Fresh {
    /// When the heartbeat it answered was sent.
    sent: Instant,
    /// The state as the leader answered it then (the one held already, when it had not
    /// changed since).
    state: Arc<StateMachine>,
}

struct Shared {
    cfg: AgentConfig,
    node: NodeHandle,
    book: AddressBook,
    procs: Mutex<Processes>,
    /// Set by the watchdog; cleared once a heartbeat sent after `fenced_at` is answered.
    fenced: AtomicBool,
    fenced_at: Mutex<Option<Instant>>,
    /// When the last answered heartbeat was sent.
    last_quorum: Mutex<Instant>,
    /// VMs moving live from here, by name: their migration's thread decides what becomes of
    /// their VMM, not the reconcile loop.
    outgoing: Mutex<HashMap<String, Outgoing>>,
    /// Where each of those migrations stands, as its VMM last said (reported to the cluster).
    progress: Mutex<HashMap<String, vmm_api::MigrationProgress>>,
}

/// A live migration from here.
#[derive(Clone, Copy, Debug)]
struct Outgoing {
    /// Its move.
    move_id: u64,
    /// How it ended, and when: `true` the VM runs elsewhere now (its VMM here ends), `false`
    /// it runs on here.
    ended: Option<(bool, Instant)>,
    /// A Manager asked to give it up.
    cancel: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether VM `name` is moving out of this server live: its move under way, or ended with the
/// VM elsewhere. A failed move, kept only so that it does not start again at once, is not: its
/// VM runs on here like any other.
fn moving_out(outgoing: &Mutex<HashMap<String, Outgoing>>, name: &str) -> bool {
    lock(outgoing)
        .get(name)
        .is_some_and(|o| !matches!(o.ended, Some((false, _))))
}

/// Starts the agent's threads.
pub fn start(cfg: AgentConfig, node: NodeHandle, book: AddressBook) -> std::io::Result<()> {
    std::fs::create_dir_all(&cfg.dir)?;
    std::fs::create_dir_all(&cfg.blockd_dir)?;
    let shared = Arc::new(Shared {
        cfg,
        node,
        book,
        procs: Mutex::new(Processes::default()),
        fenced: AtomicBool::new(false),
        fenced_at: Mutex::new(None),
        last_quorum: Mutex::new(Instant::now()),
        outgoing: Mutex::new(HashMap::new()),
        progress: Mutex::new(HashMap::new()),
    });
    let (tx, rx) = channel();
    {
        let s = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("agent-heartbeat".into())
            .spawn(move || s.heartbeats(tx))?;
    }
    {
        let s = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("agent-watchdog".into())
            .spawn(move || s.watchdog())?;
    }
    std::thread::Builder::new()
        .name("agent".into())
        .spawn(move || Reconciler::new(shared).run(rx))?;
    Ok(())
}

impl Shared {
    fn heartbeats(&self, tx: std::sync::mpsc::Sender<Fresh>) {
        let every = self.cfg.timing.heartbeat;
        let wait = self.cfg.timing.fence_timeout.max(every);
        // The state last answered, by revision: the leader sends it again only once it changed.
        let mut held: Option<(u64, Arc<StateMachine>)> = None;
        loop {
            let sent = Instant::now();
            let r = api::request(
                Request::Heartbeat {
                    server: self.cfg.id,
                    known: held.as_ref().map(|(revision, _)| *revision),
                },
                &self.node,
                &self.book,
                wait,
            );
            let state = match (r.ok, r.result) {
                (true, Some(v)) => match serde_json::from_value::<HeartbeatAnswer>(v) {
                    Ok(answer) => {
                        // Unless the state comes whole, held again only once it is made.
                        let revision = answer.revision;
                        let made = match (answer.state, answer.changes, held.take()) {
                            (Some(state), _, _) => Ok(state),
                            (None, None, Some((r, state))) if r == revision => Ok(state),
                            (None, Some(changes), Some((_, state))) => {
                                let mut next = StateMachine::clone(&state);
                                changes
                                    .iter()
                                    .try_for_each(|c| next.apply_change(c))
                                    .map(|()| Arc::new(next))
                                    .map_err(|e| e.to_string())
                            }
                            _ => Err("neither the state nor its changes from the one held".into()),
                        };
                        match made {
                            Ok(state) => {
                                held = Some((revision, Arc::clone(&state)));
                                Some(state)
                            }
                            Err(e) => {
                                tracing::error!(server = self.cfg.id, revision, error = %e, "heartbeat answer does not make a state; asking for it whole");
                                None
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(server = self.cfg.id, error = %e, "heartbeat answer is not a state");
                        None
                    }
                },
                _ => {
                    tracing::debug!(server = self.cfg.id, error = ?r.error, "heartbeat not answered");
                    None
                }
            };
            if let Some(state) = state {
                {
                    let mut q = lock(&self.last_quorum);
                    *q = (*q).max(sent);
                }
                if tx.send(Fresh { sent, state }).is_err() {
                    return;
                }
            }
            std::thread::sleep(every.saturating_sub(sent.elapsed()));
        }
    }

    fn watchdog(&self) {
        loop {
            std::thread::sleep(Duration::from_millis(20));
            if self.fenced.load(Ordering::SeqCst) {
                continue;
            }
            let since = lock(&self.last_quorum).elapsed();
            if since > self.cfg.timing.fence_timeout {
                self.fence(since);
            }
        }
    }

    /// Kills every VMM and blockd at once: this server may have been declared down.
    fn fence(&self, since: Duration) {
        self.fenced.store(true, Ordering::SeqCst);
        *lock(&self.fenced_at) = Some(Instant::now());
        let mut p = lock(&self.procs);
        let vms: Vec<String> = p.vmms.keys().cloned().collect();
        for vm in p.vmms.values_mut() {
            let _ = vm.child.kill();
        }
        if let Some(b) = p.blockd.as_mut() {
            let _ = b.kill();
        }
        for vm in p.vmms.values_mut() {
            let _ = vm.child.wait();
        }
        if let Some(b) = p.blockd.as_mut() {
            let _ = b.wait();
        }
        let killed = !vms.is_empty() || p.blockd.is_some();
        p.vmms.clear();
        p.blockd = None;
        if !killed {
            tracing::info!(
                server = self.cfg.id,
                no_quorum_ms = since.as_millis() as u64,
                "fenced: no quorum answer in time; nothing ran"
            );
            return;
        }
        tracing::warn!(
            server = self.cfg.id,
            no_quorum_ms = since.as_millis() as u64,
            vms = ?vms,
            "fenced: no quorum answer in time; VMMs and blockd killed"
        );
    }

    fn blockd_socket(&self) -> PathBuf {
        self.cfg.dir.join("blockd.sock")
    }

    fn vm_dir(&self, vm: &str) -> PathBuf {
        crate::console::vm_dir(&self.cfg.dir, vm)
    }

    /// Proposes a command through the leader; logs a failure.
    fn propose(&self, command: StateCommand) -> bool {
        api::propose(command, self.cfg.id, &self.node, &self.book) == api::Proposed::Taken
    }
}

/// Runs a command whose process dies with this server's (the thread that spawns it lives as
/// long as the process): a control plane that dies leaves no VMM or blockd running unfenced.
/// One request to a VMM's control socket; its answer, or why there is none (or a refusal).
fn vmm_call(socket: &Path, req: &VmmRequest) -> Result<vmm_api::Response, vmm_api::CallError> {
    vmm_api::call(socket, req, Duration::from_secs(5))
}

fn spawn_tied(cmd: &mut Command) -> std::io::Result<Child> {
    // SAFETY: prctl and getppid are async-signal-safe and touch no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

fn log_file(path: &Path) -> Stdio {
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        Ok(f) => f.into(),
        Err(_) => Stdio::null(),
    }
}

/// What the reconcile loop remembers of one VM between passes (none: nothing to remember:
/// not run here, or stopped as the state asked).
#[derive(Debug)]
enum VmState {
    /// Its VMM runs here (the process itself is in `Processes`, where the watchdog finds it).
    Running {
        /// The CD-ROM's media as the VMM last said or was told, and when.
        media: (Option<PathBuf>, Instant),
        /// When its guest was asked to shut down, if it was.
        stopping: Option<Instant>,
        /// Its network cards, unplugged when this state is dropped (once its VMM ended).
        cards: Vec<crate::netdev::Card>,
    },
    /// Its guest powered off by itself: reported until the state says stopped.
    PoweredOff,
    /// Its VMM failed to start or ended with a failure, then: restarted after the backoff;
    /// `why` it could not start, when that is known (reported on the VM).
    Crashed {
        /// When.
        at: Instant,
        /// Why, if it never started.
        why: Option<VmFault>,
    },
}

/// The reconcile loop and what it remembers between passes.
struct Reconciler {
    s: Arc<Shared>,
    /// Each VM's state here, by name.
    vms: HashMap<String, VmState>,
    /// The roster last given to blockd, and that blockd's process id.
    roster_sent: Option<(u32, BlockdRequest)>,
    last_report: Option<(Instant, Observation)>,
    registered: bool,
    /// Copies the ISO library's images to this server.
    library: crate::library::Sync,
    /// When the state of the current pass was asked for.
    read_at: std::time::SystemTime,
    /// The library as the last look at its files saw it, and when.
    library_seen: (LibraryList, Instant),
    /// The tasks running here, by id: each one's cancel flag.
    tasks: HashMap<u64, Arc<AtomicBool>>,
}

/// A disk copy as blockd reports it.
type Copy = blockrepl::replica::Status;

impl Reconciler {
    fn new(s: Arc<Shared>) -> Reconciler {
        Reconciler {
            s,
            vms: HashMap::new(),
            roster_sent: None,
            last_report: None,
            registered: false,
            library: crate::library::Sync::default(),
            read_at: std::time::UNIX_EPOCH,
            library_seen: (Default::default(), Instant::now()),
            tasks: HashMap::new(),
        }
    }

    fn run(mut self, rx: Receiver<Fresh>) {
        let id = self.s.cfg.id;
        loop {
            let mut fresh = match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(f) => Some(f),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            while let Ok(f) = rx.try_recv() {
                fresh = Some(f);
            }
            self.reap();
            let Some(fresh) = fresh else { continue };
            // Only a state answered after the fence (if any) may start anything again.
            if self.s.fenced.load(Ordering::SeqCst) {
                let at = *lock(&self.s.fenced_at);
                if at.is_some_and(|at| fresh.sent <= at) {
                    continue;
                }
                tracing::info!(server = id, "back in the quorum: no longer fenced");
                self.s.fenced.store(false, Ordering::SeqCst);
            }
            if fresh.sent.elapsed() > self.s.cfg.timing.fence_timeout {
                continue;
            }
            // When the state was read: the library's clean-up judges files placed before it.
            self.read_at = std::time::SystemTime::now()
                .checked_sub(fresh.sent.elapsed())
                .unwrap_or(std::time::UNIX_EPOCH);
            self.pass(&fresh.state);
        }
    }

    /// Reaps exited children.
    fn reap(&mut self) {
        // The process table only under its lock (the watchdog takes it to fence); the VMs'
        // states after, since dropping a running one unplugs its cards (ip, nft).
        let (ended, alive) = {
            let mut p = lock(&self.s.procs);
            if let Some(b) = p.blockd.as_mut() {
                if let Ok(Some(st)) = b.try_wait() {
                    tracing::warn!(server = self.s.cfg.id, status = %st, "blockd exited");
                    p.blockd = None;
                }
            }
            let mut ended = Vec::new();
            for (name, vm) in p.vmms.iter_mut() {
                if let Ok(Some(st)) = vm.child.try_wait() {
                    ended.push((name.clone(), st));
                }
            }
            for (name, _) in &ended {
                p.vmms.remove(name);
            }
            let alive: HashSet<String> = p.vmms.keys().cloned().collect();
            (ended, alive)
        };
        for (name, st) in ended {
            // A VM that moved live: its VMM ends once it runs elsewhere.
            if moving_out(&self.s.outgoing, &name) {
                tracing::info!(vm = %name, status = %st, "VMM ended after a live migration");
                self.vms.remove(&name);
                continue;
            }
            // A shutdown the state asked for is not news to report (and the VM may have been
            // powered on again meanwhile).
            let asked = matches!(
                self.vms.get(&name),
                Some(VmState::Running {
                    stopping: Some(_),
                    ..
                })
            );
            if st.success() && asked {
                tracing::info!(vm = %name, "guest shut down");
                self.vms.remove(&name);
            } else if st.success() {
                tracing::info!(vm = %name, "guest powered off");
                self.vms.insert(name, VmState::PoweredOff);
            } else {
                tracing::warn!(vm = %name, status = %st, "VMM ended");
                self.vms.insert(
                    name,
                    VmState::Crashed {
                        at: Instant::now(),
                        why: None,
                    },
                );
            }
        }
        // VMMs the watchdog killed (fenced) run no more.
        self.vms
            .retain(|name, st| !matches!(st, VmState::Running { .. }) || alive.contains(name));
    }

    fn pass(&mut self, state: &StateMachine) {
        let id = self.s.cfg.id;
        let Some(me) = state.servers.get(&id) else {
            return;
        };
        if !self.registered
            || me.mirror != self.s.cfg.blockd_listen
            || me.capacity != self.s.cfg.capacity
        {
            self.registered = self.s.propose(StateCommand::Register {
                id,
                mirror: self.s.cfg.blockd_listen.clone(),
                capacity: self.s.cfg.capacity.clone(),
            });
        }
        if !self.ensure_blockd() {
            return;
        }
        self.roster(state);
        let copies = self.copies();
        let Some(copies) = copies else { return };
        let mut ready = HashSet::new();
        for d in state.disks.values() {
            let copy = copies.get(&d.name);
            if copy.is_some_and(|c| !d.holds(&c.disk_id)) {
                // Another disk's copy by this name: `forget_deleted` removes it first.
                continue;
            }
            if d.primary == id {
                if self.primary_copy(state, d, copy) {
                    ready.insert(d.name.clone());
                }
            } else if d.backup == Some(id) {
                self.backup_copy(state, d, copy);
            }
        }
        self.vms(state, &ready, &copies);
        self.cdroms(state);
        self.run_tasks(state);
        // The library's files are looked at when its list changes, else once a second (a copy
        // that ended, a retry): not on every heartbeat.
        let (seen, at) = &self.library_seen;
        if (&seen.0, &seen.1) != (&state.isos, &state.appliances)
            || at.elapsed() >= Duration::from_secs(1)
        {
            self.library_seen = (
                (state.isos.clone(), state.appliances.clone()),
                Instant::now(),
            );
            let held = self.library.pass(
                self.s.node.peers(),
                state,
                self.read_at,
                id,
                &self.s.cfg.library_dir,
            );
            for iso in held.isos {
                self.s.propose(StateCommand::IsoHeld {
                    name: iso.name,
                    sha256: iso.sha256,
                    server: id,
                });
            }
            for a in held.appliances {
                self.s.propose(StateCommand::ApplianceHeld {
                    name: a.name,
                    disks: a.disks.into_iter().map(|d| d.sha256).collect(),
                    server: id,
                });
            }
        }
        self.forget_deleted(state, &copies);
        let powered_off: Vec<String> = self
            .vms
            .iter()
            .filter(|(_, st)| matches!(st, VmState::PoweredOff))
            .map(|(name, _)| name.clone())
            .collect();
        for name in powered_off {
            // Reported until the state says stopped (or the VM is gone).
            if state.vms.get(&name).is_none_or(|vm| !vm.running)
                || self.s.propose(StateCommand::SetVmRunning {
                    name: name.clone(),
                    running: false,
                })
            {
                self.vms.remove(&name);
            }
        }
        self.report(state);
    }

    /// Gives blockd the cluster's roster (each member's certificate, the removed servers'),
    /// when it changed or blockd restarted: its mirror links take no other certificate.
    fn roster(&mut self, state: &StateMachine) {
        let (members, revoked) = state.certificates();
        let roster = BlockdRequest::Roster {
            members: members.into_iter().collect(),
            revoked,
        };
        let Some(pid) = lock(&self.s.procs).blockd.as_ref().map(|c| c.id()) else {
            return;
        };
        if self.roster_sent.as_ref() == Some(&(pid, roster.clone())) {
            return;
        }
        match self.blockd(&roster) {
            Ok(_) => self.roster_sent = Some((pid, roster)),
            Err(e) => {
                tracing::warn!(server = self.s.cfg.id, error = %e, "cannot give blockd the roster")
            }
        }
    }

    /// Starts blockd if it is not running; whether it answers.
    fn ensure_blockd(&mut self) -> bool {
        let socket = self.s.blockd_socket();
        let mut p = lock(&self.s.procs);
        if p.blockd.is_none() {
            if self.s.fenced.load(Ordering::SeqCst) {
                return false;
            }
            if !self.s.node.peers().is_member() {
                return false;
            }
            let _ = std::fs::remove_file(&socket);
            let cfg = &self.s.cfg;
            let mut cmd = Command::new(&cfg.binary);
            cmd.arg("blockd")
                .arg("--dir")
                .arg(&cfg.blockd_dir)
                .args(["--listen", &cfg.blockd_listen])
                .arg("--control")
                .arg(&socket)
                .args([
                    "--link-timeout-ms",
                    &cfg.link_timeout.as_millis().to_string(),
                ])
                .arg("--tls")
                .arg(&cfg.tls_dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file(&cfg.dir.join("blockd.log")));
            match spawn_tied(&mut cmd) {
                Ok(c) => {
                    tracing::info!(server = cfg.id, pid = c.id(), listen = %cfg.blockd_listen, "blockd started");
                    p.blockd = Some(c);
                }
                Err(e) => {
                    tracing::error!(server = cfg.id, error = %e, "cannot start blockd");
                    return false;
                }
            }
        }
        drop(p);
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if Instant::now() > deadline || lock(&self.s.procs).blockd.is_none() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    fn blockd(&self, req: &BlockdRequest) -> Result<daemon::Response, String> {
        match daemon::call(&self.s.blockd_socket(), req) {
            Ok(r) if r.ok => Ok(r),
            Ok(r) => Err(r.error.unwrap_or_default()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The copies blockd holds, by disk name.
    fn copies(&self) -> Option<BTreeMap<String, Copy>> {
        let r = self
            .blockd(&BlockdRequest::Status { name: None })
            .map_err(|e| tracing::warn!(server = self.s.cfg.id, error = %e, "blockd status"))
            .ok()?;
        let copies = r.disks.unwrap_or_default().into_iter();
        let out = copies.map(|c| (c.name.clone(), c)).collect();
        Some(out)
    }

    fn request(&self, disk: &str, req: BlockdRequest) -> bool {
        let what = format!("{req:?}");
        match self.blockd(&req) {
            Ok(_) => {
                tracing::info!(server = self.s.cfg.id, disk, request = %what, "blockd done");
                true
            }
            Err(e) => {
                tracing::warn!(server = self.s.cfg.id, disk, request = %what, error = %e, "blockd refused");
                false
            }
        }
    }

    /// Creates this server's copy of `d`, in the pool placement chose here: empty, or a
    /// primary filled with its clone source's data or its appliance's disk image.
    fn create_copy(&self, d: &DiskRecord, backup: bool) -> bool {
        let image = match d.image.as_ref().filter(|_| !backup) {
            None => None,
            Some(sha) => {
                let f = crate::library::file(&self.s.cfg.library_dir, Shelf::Image, sha);
                if !f.exists() {
                    // Placement chose a server holding it: it comes back after a clean-up only.
                    tracing::warn!(server = self.s.cfg.id, disk = %d.name, image = %sha, "the disk's appliance image is not here yet");
                    return false;
                }
                Some(f)
            }
        };
        self.request(
            &d.name,
            BlockdRequest::Create {
                name: d.name.clone(),
                size: d.size,
                region_size: None,
                backup,
                pool: d.pools.get(&self.s.cfg.id).map(PathBuf::from),
                // A clone's primary copy starts as its source's data (here, by placement).
                from: d.clone_of.clone().filter(|_| !backup),
                image,
                // A backup takes its link from the disk's primary server only.
                peer_server: if backup { Some(d.primary) } else { d.backup },
                // Both copies carry the disk's identity: a copy left by a deleted disk of the
                // same name is never taken for this one's.
                disk_id: d.copy_id(),
            },
        )
    }

    /// Makes the copy here the disk's primary at its generation, mirrored to its backup;
    /// whether it can serve the VM.
    fn primary_copy(&self, state: &StateMachine, d: &DiskRecord, copy: Option<&Copy>) -> bool {
        let name = &d.name;
        let Some(copy) = copy else {
            // Only a disk that never failed over starts from an empty primary here.
            if d.generation == 1 {
                self.create_copy(d, false);
            } else {
                tracing::error!(disk = %name, generation = d.generation, "the primary copy is missing here");
            }
            return false;
        };
        if copy.generation < d.generation {
            // The committed generation raise: a backup is promoted, or a primary goes on alone.
            return self.request(
                name,
                BlockdRequest::Promote {
                    name: name.clone(),
                    generation: d.generation,
                    force: false,
                },
            ) && self.attach(state, d, None);
        }
        if copy.generation > d.generation || copy.role == Role::Backup {
            tracing::error!(disk = %name, generation = copy.generation, role = %copy.role, want = d.generation, "copy does not fit the state");
            return false;
        }
        self.attach(state, d, copy.peer.as_deref());
        // A disk grown while its VM was off: its VM starts once the copy here is that size.
        !self.grow_copy(state, d, copy)
    }

    /// Grows the copy here to the disk's size when the disk was grown: a primary copy while its
    /// VM is powered off and not running here, a backup copy at once (no VM reads it; its link
    /// is down for the moment the grow takes). Whether the copy is still smaller than the disk.
    fn grow_copy(&self, state: &StateMachine, d: &DiskRecord, copy: &Copy) -> bool {
        if copy.capacity >= d.size {
            return false;
        }
        let in_use = copy.role != Role::Backup
            && state
                .vms
                .values()
                .filter(|vm| vm.disks.contains(&d.name))
                .any(|vm| {
                    vm.running || matches!(self.vms.get(&vm.name), Some(VmState::Running { .. }))
                });
        if !in_use {
            self.request(
                &d.name,
                BlockdRequest::Grow {
                    name: d.name.clone(),
                    size: d.size,
                },
            );
        }
        true
    }

    /// Points the primary's mirror at the disk's backup (or at none).
    fn attach(&self, state: &StateMachine, d: &DiskRecord, current: Option<&str>) -> bool {
        let want = d
            .backup
            .and_then(|b| state.servers.get(&b))
            .map(|s| (s.mirror.clone(), s.id))
            .filter(|(m, _)| !m.is_empty());
        if current == want.as_ref().map(|(m, _)| m.as_str()) {
            return true;
        }
        let req = match want {
            Some((peer, server)) => BlockdRequest::Attach {
                name: d.name.clone(),
                peer,
                peer_server: Some(server),
            },
            None => BlockdRequest::Detach {
                name: d.name.clone(),
            },
        };
        self.request(&d.name, req)
    }

    /// Makes the copy here the disk's backup: created empty, or a returning primary demoted.
    fn backup_copy(&mut self, state: &StateMachine, d: &DiskRecord, copy: Option<&Copy>) {
        let name = &d.name;
        match copy {
            None => {
                self.create_copy(d, true);
            }
            Some(c) if c.role == Role::Backup && c.capacity < d.size => {
                self.grow_copy(state, d, c);
            }
            Some(c) if c.role != Role::Backup => {
                // Nothing here may write it any more. (A VM that moved live from here has let
                // its disk go at its pause; its migration ends its VMM.)
                for vm in state.vms.values().filter(|vm| vm.disks.contains(name)) {
                    if !moving_out(&self.s.outgoing, &vm.name) {
                        self.stop_vm(&vm.name, "its disk is a backup here now");
                    }
                }
                self.request(
                    name,
                    BlockdRequest::Demote {
                        name: name.clone(),
                        primary_server: Some(d.primary),
                    },
                );
            }
            Some(_) => {}
        }
    }

    /// Deletes the copies of disks the state no longer has (their VM was deleted), and those
    /// it no longer places here once the disk is in sync on two other servers (a move to a
    /// third server, a drain, a backup placed elsewhere while this server was down): a primary
    /// copy is detached from its backup first, and a copy is deleted once its link is down, on
    /// this pass or a later one. A copy the state no longer places here is kept while its disk
    /// has no in-sync backup: it may become the backup again and then needs only a partial
    /// resync.
    fn forget_deleted(&self, state: &StateMachine, copies: &BTreeMap<String, Copy>) {
        let me = self.s.cfg.id;
        // Disks a VM of this server runs from (or is moving from, or waits to take).
        let in_use: HashSet<&String> = self
            .vms
            .iter()
            .filter(|(_, st)| !matches!(st, VmState::PoweredOff))
            .filter_map(|(vm, _)| state.vms.get(vm))
            .flat_map(|vm| &vm.disks)
            .collect();
        for (name, c) in copies {
            let kept = state.disks.get(name).is_some_and(|d| {
                let placed_here =
                    d.primary == me || d.backup == Some(me) || d.pools.contains_key(&me);
                d.holds(&c.disk_id) && (placed_here || !d.backup_synced || in_use.contains(name))
            });
            if kept {
                continue;
            }
            if c.link != LinkState::Down {
                if c.role != Role::Backup {
                    self.request(name, BlockdRequest::Detach { name: name.clone() });
                }
                continue;
            }
            if self.request(name, BlockdRequest::Delete { name: name.clone() }) {
                match state.disks.get(name) {
                    Some(d) if d.holds(&c.disk_id) => {
                        tracing::info!(server = me, disk = %name, primary = d.primary, backup = ?d.backup, "disk copy deleted: the disk is in sync on two other servers")
                    }
                    Some(d) => {
                        tracing::info!(server = me, disk = %name, copy = %c.disk_id, disk_id = ?d.copy_id(), "disk copy deleted: a copy of another disk by this name")
                    }
                    None => {
                        tracing::info!(server = me, disk = %name, "disk copy deleted: the state no longer has its disk")
                    }
                }
            }
        }
    }

    /// Asks the guest of `name` to shut down (the ACPI power button, through its VMM's control
    /// socket; the VMM stops it hard after `shutdown_timeout`), once; stops it here if it is
    /// still running well after that.
    fn shut_down(&mut self, name: &str) {
        let timeout = self.s.cfg.timing.shutdown_timeout;
        let Some(VmState::Running { stopping, .. }) = self.vms.get_mut(name) else {
            return;
        };
        match *stopping {
            Some(since) if since.elapsed() > timeout + Duration::from_secs(5) => {
                self.stop_vm(name, "the guest did not shut down in time");
            }
            Some(_) => {}
            None => {
                *stopping = Some(Instant::now());
                let socket = crate::console::api_socket(&self.s.vm_dir(name));
                let (vm, server) = (name.to_string(), self.s.cfg.id);
                let request = VmmRequest::Shutdown {
                    timeout_secs: Some(timeout.as_secs().max(1)),
                };
                // Not on this thread: a VMM that hangs must not hold the reconcile pass.
                let wait = Duration::from_secs(5);
                let _ = std::thread::Builder::new()
                    .name("shutdown".into())
                    .spawn(move || {
                        let sent = vmm_api::call(&socket, &request, wait);
                        match sent {
                            Ok(a) => tracing::info!(server, vm = %vm, note = ?a.error, "guest asked to shut down"),
                            Err(e) => tracing::warn!(server, vm = %vm, error = %e, "cannot ask the guest to shut down"),
                        }
                    });
            }
        }
    }

    /// Starts each task the state gives this server (once), and passes a cancel on to it.
    fn run_tasks(&mut self, state: &StateMachine) {
        let me = self.s.cfg.id;
        let running = |t: &&TaskRecord| t.server == me && t.state == TaskState::Running;
        // A task no longer running (cancelled, failed by the cluster) stops here too.
        self.tasks.retain(|id, cancel| {
            let on = state.tasks.get(id).as_ref().is_some_and(running);
            if !on {
                cancel.store(true, Ordering::Relaxed);
            }
            on
        });
        for t in state.tasks.values().filter(running) {
            if let Some(cancel) = self.tasks.get(&t.id) {
                if t.cancel {
                    cancel.store(true, Ordering::Relaxed);
                }
                continue;
            }
            let job = match &t.kind {
                // The web service that received the upload runs it (webui's imports).
                TaskKind::Import { .. } => continue,
                TaskKind::Download { url, sha256, .. } => Job::Download {
                    url: url.clone(),
                    sha256: sha256.clone(),
                },
                TaskKind::CopyBack { .. } | TaskKind::Backup { .. } => {
                    let Some(v) = t.kind.vm().and_then(|vm| state.vm_by_id(vm)) else {
                        continue;
                    };
                    let disks: Vec<&DiskRecord> =
                        v.disks.iter().filter_map(|d| state.disks.get(d)).collect();
                    if matches!(t.kind, TaskKind::Backup { .. }) {
                        Job::Backup(disks.iter().map(|d| d.name.clone()).collect())
                    } else if self.vms.contains_key(&v.name) {
                        // Its VMM still runs (or is being stopped) here: the disks wait for it.
                        continue;
                    } else {
                        Job::CopyBack(
                            disks
                                .iter()
                                .map(|d| {
                                    (copyback::data_file(&self.s.cfg.blockd_dir, &d.name), d.size)
                                })
                                .collect(),
                        )
                    }
                }
            };
            let cancel = Arc::new(AtomicBool::new(t.cancel));
            self.tasks.insert(t.id, Arc::clone(&cancel));
            let (s, id) = (Arc::clone(&self.s), t.id);
            tracing::info!(server = me, task = id, what = %crate::state_machine::describe_task(&t.kind), "task begins");
            let spawned = std::thread::Builder::new()
                .name("task".into())
                .spawn(move || run_task(&s, id, job, &cancel));
            if let Err(e) = spawned {
                tracing::warn!(server = me, task = t.id, error = %e, "cannot start a task");
                self.tasks.remove(&t.id);
            }
        }
    }

    /// The file of the ISO in VM `vm`'s CD-ROM drive, if it has one this server holds.
    fn cdrom_file(&self, state: &StateMachine, vm: &VmRecord) -> Option<PathBuf> {
        let iso = state.isos.get(vm.cdrom.as_ref()?)?;
        let path = crate::library::file(&self.s.cfg.library_dir, Shelf::Iso, &iso.sha256);
        path.exists().then_some(path)
    }

    /// Puts into each running VM's CD-ROM drive the ISO the state says (once this server
    /// holds it), or ejects it; checks the VMM's media every few seconds.
    fn cdroms(&mut self, state: &StateMachine) {
        let running: Vec<(String, (Option<PathBuf>, Instant))> = self
            .vms
            .iter()
            .filter_map(|(name, st)| match st {
                VmState::Running { media, .. } => Some((name.clone(), media.clone())),
                _ => None,
            })
            .collect();
        for (name, known) in running {
            let Some(vm) = state.vms.get(&name) else {
                continue;
            };
            // A VMM busy with a live migration (or waiting for one) answers nothing else.
            if vm.moving.as_ref().is_some_and(|m| !m.switched)
                || moving_out(&self.s.outgoing, &name)
            {
                continue;
            }
            let want = self.cdrom_file(state, vm);
            let drive = vm.disks.len();
            let socket = crate::console::api_socket(&self.s.vm_dir(&name));
            // Asked again every few seconds: a guest reboot rebuilds the VM with its first media.
            let stale = known.1.elapsed() > Duration::from_secs(5);
            let mut has = known.0;
            if stale {
                match vmm_call(&socket, &VmmRequest::Status {}) {
                    Ok(v) => {
                        has = v
                            .status
                            .and_then(|st| st.disks.into_iter().nth(drive))
                            .and_then(|d| d.path);
                        self.set_media(&name, has.clone());
                    }
                    // Starting, or gone: the next pass asks again.
                    Err(_) => continue,
                }
            }
            if has == want {
                continue;
            }
            let req = VmmRequest::Media {
                disk: drive,
                path: want.clone(),
            };
            match vmm_call(&socket, &req) {
                Ok(_) => {
                    tracing::info!(server = self.s.cfg.id, vm = %name, media = ?want, "CD-ROM media changed");
                    self.set_media(&name, want);
                }
                Err(e) => {
                    tracing::warn!(server = self.s.cfg.id, vm = %name, error = %e, "cannot change the CD-ROM media")
                }
            }
        }
    }

    /// Records running VM `name`'s CD-ROM media as its VMM said or was told now.
    fn set_media(&mut self, name: &str, now: Option<PathBuf>) {
        if let Some(VmState::Running { media, .. }) = self.vms.get_mut(name) {
            *media = (now, Instant::now());
        }
    }

    fn stop_vm(&mut self, name: &str, why: &str) {
        // Its cards are unplugged (dropped) once the VMM no longer holds their taps.
        let _cards = match self.vms.remove(name) {
            Some(VmState::Running { cards, .. }) => cards,
            Some(other) => {
                self.vms.insert(name.to_string(), other);
                Vec::new()
            }
            None => Vec::new(),
        };
        let mut p = lock(&self.s.procs);
        if let Some(mut vm) = p.vmms.remove(name) {
            let _ = vm.child.kill();
            let _ = vm.child.wait();
            tracing::info!(server = self.s.cfg.id, vm = %name, why, "VMM stopped");
        }
        drop(p);
    }

    /// Starts the VMs whose disks' primary copies are ready here; stops the others.
    fn vms(
        &mut self,
        state: &StateMachine,
        ready: &HashSet<String>,
        copies: &BTreeMap<String, Copy>,
    ) {
        let id = self.s.cfg.id;
        let me_down = state.servers.get(&id).is_none_or(|s| s.down);
        let running: Vec<String> = lock(&self.s.procs).vmms.keys().cloned().collect();
        for name in running {
            let why = match state.vms.get(&name) {
                None => Some("the VM was deleted"),
                // Its live migration decides.
                Some(_) if moving_out(&self.s.outgoing, &name) => None,
                // Coming here live: its VMM waits for the VM.
                Some(vm)
                    if vm.running
                        && vm
                            .moving
                            .as_ref()
                            .is_some_and(|m| m.to == id && !m.switched)
                        && !me_down =>
                {
                    None
                }
                Some(vm) if !vm.running && vm.graceful_stop && !me_down => {
                    self.shut_down(&name);
                    None
                }
                Some(vm) if !vm.running => Some("the VM should be stopped"),
                Some(vm) if !self.is_primary_here(state, vm) => Some("its disk's primary moved"),
                _ if me_down => Some("this server is declared down"),
                _ => None,
            };
            if let Some(why) = why {
                self.stop_vm(&name, why);
            }
        }
        if me_down {
            return;
        }
        self.live_moves(state, copies);
        for vm in state.vms.values() {
            if !vm.running
                || !self.is_primary_here(state, vm)
                || !vm.disks.iter().all(|d| ready.contains(d))
                || lock(&self.s.procs).vmms.contains_key(&vm.name)
            {
                continue;
            }
            match self.vms.get(&vm.name) {
                Some(VmState::PoweredOff | VmState::Running { .. }) => continue,
                Some(VmState::Crashed { at, .. })
                    if at.elapsed() < self.s.cfg.timing.restart_backoff =>
                {
                    continue
                }
                _ => {}
            }
            self.start_vm(state, vm, copies, None);
        }
    }

    /// Live migrations: a VM coming here gets a VMM waiting for it (`--incoming`); one leaving
    /// from here gets a thread that has its VMM send it (`move_out`).
    fn live_moves(&mut self, state: &StateMachine, copies: &BTreeMap<String, Copy>) {
        let id = self.s.cfg.id;
        // Moves that ended: forgotten once their VMM is gone or runs on here. A failed one is
        // kept while the state read for this pass still has it (the move's end, committed by
        // its thread, not applied here yet), so that it does not start again at once; for a
        // while only, after which a move whose end never committed is tried again.
        {
            let alive: HashSet<String> = lock(&self.s.procs).vmms.keys().cloned().collect();
            let still_moving = |name: &str, id: u64| {
                state
                    .vms
                    .get(name)
                    .and_then(|vm| vm.moving.as_ref())
                    .is_some_and(|m| m.id == id)
            };
            lock(&self.s.outgoing).retain(|name, o| match o.ended {
                None => true,
                Some((true, _)) => alive.contains(name),
                Some((false, at)) => {
                    still_moving(name, o.move_id) && at.elapsed() < FAILED_MOVE_RETRY
                }
            });
        }
        for vm in state.vms.values() {
            let Some(m) = vm.moving.as_ref().filter(|m| !m.switched) else {
                continue;
            };
            // A move to another server than the disks' backup waits for the new copies there.
            if !state.live_move_ready(vm) {
                continue;
            }
            let has_vmm = lock(&self.s.procs).vmms.contains_key(&vm.name);
            if m.to == id {
                let recently_crashed = matches!(
                    self.vms.get(&vm.name),
                    Some(VmState::Crashed { at, .. }) if at.elapsed() < self.s.cfg.timing.restart_backoff
                );
                if vm.running
                    && !has_vmm
                    && !recently_crashed
                    && vm.disks.iter().all(|d| copies.contains_key(d))
                {
                    self.start_vm(state, vm, copies, Some(m.id));
                }
            } else if has_vmm
                && self.is_primary_here(state, vm)
                && matches!(
                    self.vms.get(&vm.name),
                    Some(VmState::Running { stopping: None, .. })
                )
            {
                let mut out = lock(&self.s.outgoing);
                if let Some(o) = out.get_mut(&vm.name) {
                    // Its move's thread, or an earlier move's still deciding: one at a time.
                    o.cancel |= m.cancel && o.move_id == m.id;
                    continue;
                }
                // Two at a time (a drain moves every VM): the others wait for a later pass.
                if out.values().filter(|o| o.ended.is_none()).count() >= MOVES_AT_ONCE {
                    continue;
                }
                let Some(address) = state.servers.get(&m.to).map(|s| s.address.clone()) else {
                    continue;
                };
                out.insert(
                    vm.name.clone(),
                    Outgoing {
                        move_id: m.id,
                        ended: None,
                        cancel: m.cancel,
                    },
                );
                drop(out);
                let s = Arc::clone(&self.s);
                let out = MoveOut {
                    name: vm.name.clone(),
                    id: m.id,
                    downtime_ms: m.downtime_ms,
                    auto_converge: m.auto_converge,
                    address,
                    dir: self.s.vm_dir(&vm.name),
                };
                let spawned = std::thread::Builder::new()
                    .name(format!("move-{}", vm.name))
                    .spawn(move || {
                        let moved = move_out(&s, &out);
                        if let Some(o) = lock(&s.outgoing)
                            .get_mut(&out.name)
                            .filter(|o| o.move_id == out.id)
                        {
                            o.ended = Some((moved, Instant::now()));
                        }
                    });
                if let Err(e) = spawned {
                    tracing::error!(vm = %vm.name, error = %e, "cannot start the live migration's thread");
                    lock(&self.s.outgoing).remove(&vm.name);
                }
            }
        }
    }

    fn is_primary_here(&self, state: &StateMachine, vm: &VmRecord) -> bool {
        state.vm_primary(vm) == Some(self.s.cfg.id)
    }

    /// Plugs VM `vm`'s network cards here (`netdev::Card`): the VMM's `--net` arguments and
    /// the cards, or why the VM cannot run here.
    fn plug(
        &self,
        state: &StateMachine,
        vm: &VmRecord,
    ) -> Result<(Vec<String>, Vec<crate::netdev::Card>), String> {
        let (mut nets, mut cards) = (Vec::new(), Vec::new());
        for (i, nic) in vm.nics.iter().enumerate() {
            let net = state
                .networks
                .get(&nic.network)
                .ok_or_else(|| format!("its network {} is gone", nic.network))?;
            let card = crate::netdev::Card::plug(self.s.cfg.id, vm.id, i, nic, net)?;
            nets.push(format!("tap={},mac={}", card.tap(), card.mac()));
            cards.push(card);
        }
        Ok((nets, cards))
    }

    /// Starts VM `vm`'s VMM here; with `incoming` (a live move), one that waits for the VM to
    /// come from its source's VMM (`--incoming`).
    fn start_vm(
        &mut self,
        state: &StateMachine,
        vm: &VmRecord,
        copies: &BTreeMap<String, Copy>,
        incoming: Option<u64>,
    ) {
        let dir = self.s.vm_dir(&vm.name);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::error!(vm = %vm.name, error = %e, "cannot create the VM's directory");
            return;
        }
        let (nets, cards) = match self.plug(state, vm) {
            Ok(n) => n,
            Err(why) => {
                tracing::error!(server = self.s.cfg.id, vm = %vm.name, error = %why, "the VM's network cannot be plugged in here");
                self.vms.insert(
                    vm.name.clone(),
                    VmState::Crashed {
                        at: Instant::now(),
                        why: Some(VmFault {
                            part: VmPart::Network,
                            detail: why,
                        }),
                    },
                );
                return;
            }
        };
        let generation = vm
            .disks
            .first()
            .and_then(|d| state.disks.get(d))
            .map_or(0, |d| d.generation);
        let api = crate::console::api_socket(&dir);
        let vnc = crate::console::vnc_socket(&dir);
        let _ = std::fs::remove_file(&api);
        let _ = std::fs::remove_file(&vnc);
        let mut cmd = Command::new(&self.s.cfg.binary);
        cmd.arg("vmm");
        match vm.boot.firmware() {
            None => {
                cmd.args(["--kernel", &vm.kernel]).args([
                    "--cmdline",
                    &vm.cmdline.replace("{generation}", &generation.to_string()),
                ]);
                if !vm.initrd.is_empty() {
                    cmd.args(["--initrd", &vm.initrd]);
                }
            }
            Some(firmware) => {
                cmd.args(["--firmware", firmware]).args([
                    "--boot",
                    match vm.boot_order {
                        BootOrder::DiskFirst => "disk,cdrom",
                        BootOrder::CdromFirst => "cdrom,disk",
                    },
                ]);
            }
        }
        cmd.args(["--memory", &vm.memory_mib.to_string()])
            .args(["--vcpus", &vm.vcpus.max(1).to_string()]);
        // Virtio unless said otherwise; a VM booted by the guest kernel has its disks on
        // virtio (the state refuses SATA for it).
        let bus = match (vm.boot.firmware(), vm.disk_bus) {
            (Some(_), DiskBus::Sata) => ",bus=sata",
            _ => "",
        };
        for d in &vm.disks {
            let socket = copies.get(d).and_then(|c| c.vhost_socket.clone());
            let socket = socket.unwrap_or_default();
            cmd.arg("--disk")
                .arg(format!("vhost-user={}{bus}", socket.display()));
        }
        // The CD-ROM drive, after the disks: the ISO if this server holds it yet, else empty
        // (`cdroms` inserts it once copied).
        // With firmware boot the drive is the SATA CD-ROM; either way its media is changed on
        // the control socket as the drive after the disks.
        let cdrom = self.cdrom_file(state, vm);
        match (&cdrom, vm.boot.firmware()) {
            (Some(path), None) => cmd
                .arg("--disk")
                .arg(format!("{},readonly", path.display())),
            (None, None) => cmd.args(["--disk", "empty,readonly"]),
            (Some(path), Some(_)) => cmd.arg("--cdrom").arg(path),
            (None, Some(_)) => cmd.args(["--cdrom", "empty"]),
        };
        for n in &nets {
            cmd.arg("--net").arg(n);
        }
        if incoming.is_some() {
            let sock = crate::livemove::incoming_socket(&dir);
            let _ = std::fs::remove_file(&sock);
            cmd.arg("--incoming").arg(&sock);
        }
        cmd.arg("--serial")
            .arg(dir.join("serial.log"))
            .arg("--api-socket")
            .arg(&api)
            // The graphical console, for the web server's VNC relay (`console`).
            .arg("--vnc")
            .arg(&vnc)
            .args(["--name", &vm.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&dir.join("vmm.log")));
        // Spawned under the lock, after checking the fence: the watchdog kills what is here.
        let mut p = lock(&self.s.procs);
        if self.s.fenced.load(Ordering::SeqCst) {
            return;
        }
        match spawn_tied(&mut cmd) {
            Ok(child) => {
                tracing::info!(server = self.s.cfg.id, vm = %vm.name, pid = child.id(), generation, live_move = ?incoming, "VMM started");
                p.vmms
                    .insert(vm.name.clone(), VmProcess { child, generation });
                self.vms.insert(
                    vm.name.clone(),
                    VmState::Running {
                        media: (cdrom, Instant::now()),
                        stopping: None,
                        cards,
                    },
                );
            }
            Err(e) => {
                tracing::error!(vm = %vm.name, error = %e, "cannot start the VMM");
                self.vms.insert(
                    vm.name.clone(),
                    VmState::Crashed {
                        at: Instant::now(),
                        why: Some(VmFault {
                            part: VmPart::Vmm,
                            detail: e.to_string(),
                        }),
                    },
                );
            }
        }
    }

    /// Reports what runs here when it changed, at most once per `observe_every`.
    fn report(&mut self, state: &StateMachine) {
        let Some(copies) = self.copies() else { return };
        let mut o = Observation {
            blockd_up: true,
            ..Default::default()
        };
        for (name, c) in copies {
            o.disks.insert(
                name,
                DiskObservation {
                    role: c.role,
                    generation: c.generation,
                    link: c.link,
                    peer: c.peer,
                    // Rounded (to MiB, to whole percent) so a resync in progress does not
                    // report every pass.
                    out_of_sync_bytes: c.out_of_sync_bytes >> 20 << 20,
                    resync_percent: c.resync.map(|r| r.percent.clamp(0.0, 100.0) as u8),
                },
            );
        }
        for (name, vm) in lock(&self.s.procs).vmms.iter() {
            o.vms.insert(
                name.clone(),
                VmObservation {
                    running: true,
                    pid: Some(vm.child.id()),
                    generation: vm.generation,
                    fault: None,
                    migration: lock(&self.s.progress).get(name).cloned(),
                    addresses: match self.vms.get(name) {
                        Some(VmState::Running { cards, .. }) => cards
                            .iter()
                            .map(|c| NicAddresses {
                                mac: c.mac().to_string(),
                                ips: c.addresses(),
                            })
                            .filter(|a| !a.ips.is_empty())
                            .collect(),
                        _ => Vec::new(),
                    },
                },
            );
        }
        // VMs that should run here and cannot: why, on the VM.
        for (name, st) in &self.vms {
            if let VmState::Crashed { why: Some(why), .. } = st {
                let wanted = state
                    .vms
                    .get(name)
                    .is_some_and(|vm| vm.running && self.is_primary_here(state, vm));
                if wanted && !o.vms.contains_key(name) {
                    o.vms.insert(
                        name.clone(),
                        VmObservation {
                            fault: Some(why.clone()),
                            ..Default::default()
                        },
                    );
                }
            }
        }
        let committed = state.observed.get(&self.s.cfg.id);
        if committed == Some(&o) {
            self.last_report = Some((Instant::now(), o));
            return;
        }
        // Not again while the last report may still be on its way, nor more often than
        // `observe_every`.
        let too_soon = self.last_report.as_ref().is_some_and(|(t, last)| {
            (*last == o && t.elapsed() < Duration::from_secs(2))
                || t.elapsed() < self.s.cfg.timing.observe_every
        });
        if too_soon {
            return;
        }
        self.s.propose(StateCommand::Observe {
            id: self.s.cfg.id,
            observation: o.clone(),
        });
        self.last_report = Some((Instant::now(), o));
    }
}

/// Promotes this server's copies of `vm`'s disks to the generation the state gives them (a
/// live migration's target, at the switch, while the VM is paused: the agent's next pass would
/// do the same, later). Whether every copy serves as primary at that generation now.
pub(crate) fn promote_here(agent_dir: &Path, state: &StateMachine, vm: &VmRecord, me: u64) -> bool {
    let socket = agent_dir.join("blockd.sock");
    let mut all = true;
    for name in &vm.disks {
        let Some(d) = state.disks.get(name).filter(|d| d.primary == me) else {
            all = false;
            continue;
        };
        let status = daemon::call(
            &socket,
            &BlockdRequest::Status {
                name: Some(name.clone()),
            },
        );
        let at = status
            .ok()
            .and_then(|r| r.disks)
            .and_then(|c| c.into_iter().next())
            .map(|c| (c.generation, c.role));
        if at.is_some_and(|(g, role)| g == d.generation && role != Role::Backup) {
            continue;
        }
        let req = BlockdRequest::Promote {
            name: name.clone(),
            generation: d.generation,
            force: false,
        };
        match daemon::call(&socket, &req) {
            Ok(r) if r.ok => {
                tracing::info!(server = me, disk = %name, generation = d.generation, "disk promoted for a live migration")
            }
            Ok(r) => {
                all = false;
                tracing::warn!(server = me, disk = %name, error = ?r.error, "disk not promoted for a live migration")
            }
            Err(e) => {
                all = false;
                tracing::warn!(server = me, disk = %name, error = %e, "blockd")
            }
        }
    }
    all
}

/// Live migrations from one server at once.
const MOVES_AT_ONCE: usize = 2;
/// How long a failed move whose end the state does not show is left before it is tried again.
const FAILED_MOVE_RETRY: Duration = Duration::from_secs(10);

/// How long a live migration may take, from the request to the target's word.
const MOVE_TIMEOUT: Duration = Duration::from_secs(600);

/// How long a live migration's stream may carry nothing in each phase before the source's agent
/// cuts it: while the guest runs on, a while; while it is paused, little; while the target takes
/// the disks, longer than its relay tries (`livemove`: the switch, then the copies promoted).
fn stall_limit(phase: vmm_api::MigrationPhase) -> Duration {
    match phase {
        vmm_api::MigrationPhase::Copying => Duration::from_secs(10),
        vmm_api::MigrationPhase::Paused => Duration::from_secs(5),
        vmm_api::MigrationPhase::Handover => Duration::from_secs(20),
    }
}

/// A live migration from here, as its thread carries it out.
struct MoveOut {
    /// The VM.
    name: String,
    /// The move (`LiveMove::id`).
    id: u64,
    /// The longest pause allowed, ms (the VMM's default when none).
    downtime_ms: Option<u64>,
    /// Slow the guest down if the copy does not converge.
    auto_converge: bool,
    /// The target server's address.
    address: String,
    /// The VM's directory here (its VMM's control socket).
    dir: PathBuf,
}

/// Has the VMM of `out`'s VM send it, live, to the target server over mutual TLS (see
/// `livemove`); then tells the cluster how it ended. Whether the VM runs elsewhere now.
fn move_out(s: &Shared, out: &MoveOut) -> bool {
    let (me, name, move_id) = (s.cfg.id, out.name.as_str(), out.id);
    let api_sock = crate::console::api_socket(&out.dir);
    let started = Instant::now();
    // While it runs: where it stands, for the cluster to show; a cancel, passed on once; a
    // stream that stopped moving (the link to the target cut, the target's server gone) cut
    // here, so that the VMM's send fails now rather than when TCP gives up.
    let running = AtomicBool::new(true);
    let stream: Arc<Mutex<Option<Flowing>>> = Arc::default();
    // Bytes the relay passed on to the target: what "nothing went" is measured by (the VMM's
    // own figures move only every 16 MiB of memory, or once a round).
    let relayed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stalled: Mutex<Option<String>> = Mutex::new(None);
    let result = std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut cancelled = false;
            let mut last = None;
            let mut since = Instant::now();
            while running.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(300));
                let status = vmm_call(&api_sock, &VmmRequest::MigrationStatus {})
                    .ok()
                    .and_then(|r| r.migration);
                let phase = status.as_ref().map(|p| p.phase);
                if let Some(p) = status {
                    let now = (p.phase, relayed.load(Ordering::Relaxed));
                    if last != Some(now) {
                        (last, since) = (Some(now), Instant::now());
                    } else if since.elapsed() >= stall_limit(p.phase) {
                        if let Some(flowing) = lock(&stream).take() {
                            let why = format!(
                                "nothing went to the target for {} s while {}",
                                since.elapsed().as_secs(),
                                match p.phase {
                                    vmm_api::MigrationPhase::Copying => "copying memory",
                                    vmm_api::MigrationPhase::Paused => "sending the last pages",
                                    vmm_api::MigrationPhase::Handover => "waiting for the target",
                                }
                            );
                            tracing::warn!(server = me, vm = %name, why = %why, "live migration stalled: its stream is cut");
                            flowing.cut();
                            *lock(&stalled) = Some(why);
                        }
                    }
                    lock(&s.progress).insert(name.to_string(), p);
                }
                let asked = lock(&s.outgoing).get(name).is_some_and(|o| o.cancel);
                if asked && !cancelled {
                    match phase {
                        // While it copies; not before its migration has begun (the VMM would
                        // refuse), asked again on the next look if it refused.
                        Some(vmm_api::MigrationPhase::Copying) => {
                            match vmm_call(&api_sock, &VmmRequest::CancelMigration {}) {
                                Ok(_) => {
                                    cancelled = true;
                                    tracing::info!(server = me, vm = %name, "live migration cancelled")
                                }
                                Err(e) => tracing::warn!(server = me, vm = %name, error = %e, "live migration not cancelled yet"),
                            }
                        }
                        // Past its copy it is too late: the move goes on to its end.
                        Some(_) => {
                            cancelled = true;
                            tracing::info!(server = me, vm = %name, "live migration not cancelled: past its copy")
                        }
                        None => {}
                    }
                }
            }
        });
        let r = send_vm(s, out, &api_sock, &stream, &relayed);
        running.store(false, Ordering::SeqCst);
        r.map_err(|e| match lock(&stalled).take() {
            Some(why) => format!("{why} ({e})"),
            None => e,
        })
    });
    lock(&s.progress).remove(name);
    let end = |outcome: MoveOutcome| {
        for _ in 0..20 {
            if s.propose(StateCommand::EndMove {
                vm: name.to_string(),
                move_id,
                at_ms: now_ms(),
                outcome: outcome.clone(),
            }) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        false
    };
    let why = match result {
        Ok(m) => {
            tracing::info!(server = me, vm = %name, downtime_ms = m.downtime_ms, total_ms = m.total_ms, rounds = m.rounds, bytes = m.transferred_bytes, "VM moved live");
            end(MoveOutcome::Done {
                downtime_ms: m.downtime_ms,
                total_ms: m.total_ms,
                transferred_bytes: m.transferred_bytes,
                rounds: m.rounds,
            });
            return true;
        }
        Err(why) => why,
    };
    tracing::warn!(server = me, vm = %name, why = %why, took_ms = started.elapsed().as_millis() as u64, "live migration failed");
    // A call that timed out while the VMM still migrates: given up, and waited for, before its
    // state can be judged.
    let settle = Instant::now() + Duration::from_secs(120);
    while let Some(p) = vmm_call(&api_sock, &VmmRequest::MigrationStatus {})
        .ok()
        .and_then(|r| r.migration)
    {
        if p.phase == vmm_api::MigrationPhase::Copying {
            let _ = vmm_call(&api_sock, &VmmRequest::CancelMigration {});
        }
        if Instant::now() > settle {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Where is the VM? A VMM still running it here: it stays. One paused after sending all of
    // it: the state says whose it is (the switch committed or not), and the move's end makes
    // that final before it runs again here.
    let status = vmm_call(&api_sock, &VmmRequest::Status {})
        .ok()
        .and_then(|r| r.status);
    match status.map(|st| st.state) {
        Some(vmm_api::RunState::Paused) => {}
        Some(_) => {
            end(MoveOutcome::Failed { why });
            return false;
        }
        None => {
            // No VMM answers (it ended): the state says whose the VM is. The target's, its
            // switch committed before the VMM ended (the move's answer lost): this copy is over,
            // as after a move. Else it is this server's, to start again.
            let elsewhere = (0..8)
                .find_map(|_| {
                    let st = api::read_state(&s.node, &s.book, Duration::from_secs(2));
                    if st.is_none() {
                        std::thread::sleep(Duration::from_millis(250));
                    }
                    st
                })
                .and_then(|st| st.vms.get(name).map(|vm| st.vm_primary(vm) != Some(me)));
            end(MoveOutcome::Failed { why });
            return elsewhere == Some(true);
        }
    }
    let deadline = Instant::now() + MOVE_TIMEOUT;
    while Instant::now() < deadline {
        let Some(state) = api::read_state(&s.node, &s.book, Duration::from_secs(2)) else {
            std::thread::sleep(Duration::from_millis(250));
            continue;
        };
        let Some(vm) = state.vms.get(name) else {
            return false;
        };
        if state.vm_primary(vm) != Some(me) {
            // The target holds its disks: it is the target's to run; this copy ends.
            let _ = vmm_call(&api_sock, &VmmRequest::Stop {});
            end(MoveOutcome::Failed { why });
            return true;
        }
        // Still here: once the move's end is committed no switch can follow, and it runs on.
        if vm.moving.as_ref().is_none_or(|m| m.id != move_id)
            || end(MoveOutcome::Failed { why: why.clone() })
        {
            let again = api::read_state(&s.node, &s.book, Duration::from_secs(2));
            let ours = again
                .as_ref()
                .and_then(|st| st.vms.get(name).map(|vm| st.vm_primary(vm) == Some(me)));
            if ours == Some(true) {
                match vmm_call(&api_sock, &VmmRequest::Resume {}) {
                    Ok(_) => {
                        tracing::info!(server = me, vm = %name, "the VM runs on here after its failed live migration")
                    }
                    Err(e) => {
                        tracing::error!(server = me, vm = %name, error = %e, "cannot resume the VM after its failed live migration")
                    }
                }
                return false;
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    tracing::error!(server = me, vm = %name, "cannot learn whether the VM moved; it stays paused here");
    false
}

/// The migration itself: the stream relayed from the VMM's migration socket to the target
/// server over mutual TLS.
/// Both ends of a live migration's stream at the source, while it flows.
struct Flowing {
    vmm: UnixStream,
    tls: enspeed_trust::TlsStream,
}

impl Flowing {
    /// Ends the stream at once: the VMM's send fails, and so does a send to the target that
    /// waits on a silent peer.
    fn cut(self) {
        let _ = self.vmm.shutdown(std::net::Shutdown::Both);
        let _ = self.tls.abort();
    }
}

/// Both ends of the stream are kept in `stream` while it flows, for the caller to cut; the
/// bytes passed on to the target are counted in `relayed`.
fn send_vm(
    s: &Shared,
    out: &MoveOut,
    api_sock: &Path,
    stream: &Arc<Mutex<Option<Flowing>>>,
    relayed: &Arc<std::sync::atomic::AtomicU64>,
) -> Result<vmm_api::Migrated, String> {
    let (name, address) = (out.name.as_str(), out.address.as_str());
    use std::os::unix::fs::PermissionsExt;
    let mut tls = s
        .node
        .peers()
        .connect(address, Duration::from_secs(5))
        .map_err(|e| format!("reaching the target server at {address}: {e}"))?;
    crate::livemove::write_opening(
        &mut tls,
        &crate::livemove::Opening {
            vm: name.to_string(),
            move_id: out.id,
        },
    )
    .map_err(|e| format!("the target server at {address}: {e}"))?;
    // The target's replies come only at the end, however long the copy takes; a send that
    // cannot go on for this long has a silent peer.
    let _ = tls.set_read_timeout(None);
    let _ = tls.set_write_timeout(Some(Duration::from_secs(30)));
    let sock = out.dir.join("outgoing.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = std::os::unix::net::UnixListener::bind(&sock)
        .map_err(|e| format!("{}: {e}", sock.display()))?;
    let _ = std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600));
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("{}: {e}", sock.display()))?;
    let relay_sock = sock.clone();
    let slot = stream.clone();
    let counted = relayed.clone();
    let relay = std::thread::Builder::new()
        .name(format!("move-relay-{name}"))
        .spawn(move || {
            // The VMM connects once asked to migrate; it was asked right after this started.
            let deadline = Instant::now() + Duration::from_secs(10);
            let vmm = loop {
                match listener.accept() {
                    Ok((c, _)) => break c,
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => return,
                }
            };
            let _ = std::fs::remove_file(&relay_sock);
            let _ = vmm.set_nonblocking(false);
            if let (Ok(vmm), Ok(tls)) = (vmm.try_clone(), tls.try_clone()) {
                *lock(&slot) = Some(Flowing { vmm, tls });
            }
            let (Ok(mut vmm_r), Ok(mut tls_r)) = (vmm.try_clone(), tls.try_clone()) else {
                return;
            };
            let mut vmm_w = vmm;
            let back = std::thread::spawn(move || {
                let _ = std::io::copy(&mut tls_r, &mut vmm_w);
                let _ = vmm_w.shutdown(std::net::Shutdown::Write);
            });
            let mut buf = vec![0u8; 256 << 10];
            loop {
                let n = match std::io::Read::read(&mut vmm_r, &mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if std::io::Write::write_all(&mut tls, &buf[..n]).is_err() {
                    break;
                }
                counted.fetch_add(n as u64, Ordering::Relaxed);
            }
            // The VMM is done with the stream, or the target with it: the replies too (a target
            // gone silent must not hold the reader until TCP gives up), and the VMM's end (a
            // VMM still sending must hear it now: the clones kept for cutting hold it open).
            // A stream cut for standing still is not closed politely: nothing goes through.
            match lock(&slot).take() {
                Some(flowing) => {
                    let _ = tls.shutdown(std::net::Shutdown::Both);
                    let _ = flowing.vmm.shutdown(std::net::Shutdown::Both);
                }
                None => {
                    let _ = tls.abort();
                    let _ = vmm_r.shutdown(std::net::Shutdown::Both);
                }
            }
            let _ = back.join();
        })
        .map_err(|e| format!("cannot start the relay: {e}"))?;
    let answer = vmm_api::call(
        api_sock,
        &VmmRequest::Migrate {
            to: sock.clone(),
            downtime_ms: out.downtime_ms,
            auto_converge: out.auto_converge,
        },
        MOVE_TIMEOUT,
    );
    let _ = relay.join();
    let _ = std::fs::remove_file(&sock);
    match answer {
        Ok(r) => r
            .migrated
            .ok_or_else(|| "the VMM answered without the migration's figures".to_string()),
        Err(e) => Err(e.to_string()),
    }
}
