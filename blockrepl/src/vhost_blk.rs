//! The vhost-user-blk backend: serves a [`BlockStore`] to a VMM over a unix
//! socket, the guest's virtqueue living in guest memory the VMM shares.
//!
//! One frontend at a time; when it hangs up (the VM stopped, rebooted or its
//! VMM crashed) the server accepts the next one on the same socket:
//!
//! ```text
//!   listening --accept--> serving one frontend --frontend hangs up--> listening
//!       |                        |
//!       +-------- stop ----------+--> stopped (socket removed)
//! ```
//!
//! Requests come off the ring on the vring worker thread. Reads and GET_ID
//! are answered there. Writes and flushes are handed to the store and
//! complete whenever and wherever the store calls back (a replicated store
//! answers when its backup has acknowledged): the completion writes the status
//! byte, returns the buffer on the used ring and signals the guest, while the
//! worker goes on taking requests. Every popped request is counted until it
//! completes, so that stopping the ring (GET_VRING_BASE, on reset or reboot)
//! waits for requests in flight, and a completion that arrives after the ring
//! was stopped anyway is dropped instead of writing into a ring the guest has
//! since reused.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VhostUserDaemon, VringT};
use virtio_blk::{status, Op, Request, ID_LEN, SECTOR_SIZE};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

/// Guest memory as the backend maps it: every write the backend makes into it (read data, status
/// bytes, the used ring) is marked in the frontend's dirty log while it keeps one (live migration:
/// `VHOST_USER_PROTOCOL_F_LOG_SHMFD`, `VHOST_F_LOG_ALL`).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<BitmapMmapRegion>;
type VringRwLock = vhost_user_backend::VringRwLock<GuestMemoryAtomic<GuestMemoryMmap>>;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::EventFd;

use crate::store::BlockStore;

/// Descriptors in the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data descriptors per request the guest may use (config `seg_max`).
const SEG_MAX: u32 = 128;
/// Bytes per data descriptor (config `size_max`).
const SIZE_MAX: u32 = 128 << 10;
/// Largest request accepted, as the config space promises.
const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Write data copied out of the guest and not yet acknowledged by the store.
/// Past it the worker stops taking requests until completions bring it
/// down, so a guest cannot make the backend buffer without bound.
const WRITE_BUDGET: u64 = 64 << 20;
/// How long stopping a ring waits for the store to finish requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Epoll token of the resume eventfd; tokens up to the queue count are the
/// library's.
const RESUME_EVENT: u16 = 2;

/// virtio-blk feature bits and config layout.
pub mod blk {
    #![allow(missing_docs)]
    pub const F_SIZE_MAX: u64 = 1 << 1;
    pub const F_SEG_MAX: u64 = 1 << 2;
    pub const F_RO: u64 = 1 << 5;
    pub const F_BLK_SIZE: u64 = 1 << 6;
    pub const F_FLUSH: u64 = 1 << 9;
    pub const F_RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const F_VERSION_1: u64 = 1 << 32;
    /// Bytes of `struct virtio_blk_config` the backend fills: capacity,
    /// size_max, seg_max, geometry (zero), blk_size.
    pub const CONFIG_LEN: usize = 24;
}

/// Errors of the backend's server.
#[derive(Debug, thiserror::Error)]
pub enum VhostBlkError {
    /// The socket cannot be created.
    #[error("cannot listen on vhost-user socket {path}: {err}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        err: vhost::vhost_user::Error,
    },
    /// Waiting for or accepting a frontend failed.
    #[error("cannot accept a frontend on vhost-user socket {path}: {err}")]
    Accept {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        err: io::Error,
    },
    /// The server thread or its eventfds cannot be created.
    #[error("cannot start the vhost-user-blk server on {path}: {err}")]
    Start {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        err: io::Error,
    },
    /// The server thread panicked.
    #[error("the vhost-user-blk server on {0} panicked")]
    Panicked(PathBuf),
}

/// Serves `store` on `socket` until an unrecoverable error; a frontend that
/// hangs up or misbehaves only ends its own connection.
pub fn serve(socket: &Path, store: Arc<dyn BlockStore>) -> Result<(), VhostBlkError> {
    let mut listener = listen(socket)?;
    let stop = Stop::new(socket)?;
    run(socket, &mut listener, store, &stop)
}

/// Starts serving `store` on `socket` on a thread of its own. The socket
/// exists when this returns, so a VMM may connect at once.
pub fn spawn(socket: &Path, store: Arc<dyn BlockStore>) -> Result<VhostBlkServer, VhostBlkError> {
    let mut listener = listen(socket)?;
    let stop = Arc::new(Stop::new(socket)?);
    let path = socket.to_path_buf();
    let (thread_stop, thread_path) = (stop.clone(), path.clone());
    let thread = std::thread::Builder::new()
        .name("vhost-blk".into())
        .spawn(move || run(&thread_path, &mut listener, store, &thread_stop))
        .map_err(|err| VhostBlkError::Start {
            path: path.clone(),
            err,
        })?;
    Ok(VhostBlkServer {
        path,
        stop,
        thread: Some(thread),
    })
}

/// A server running on its own thread; dropping it stops it too.
pub struct VhostBlkServer {
    path: PathBuf,
    stop: Arc<Stop>,
    thread: Option<JoinHandle<Result<(), VhostBlkError>>>,
}

impl VhostBlkServer {
    /// The socket it listens on.
    pub fn socket(&self) -> &Path {
        &self.path
    }

    /// Disconnects the frontend, if any, stops listening, removes the socket
    /// and returns how the server ended.
    pub fn stop(mut self) -> Result<(), VhostBlkError> {
        self.halt()
    }

    fn halt(&mut self) -> Result<(), VhostBlkError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.stop.request();
        thread
            .join()
            .map_err(|_| VhostBlkError::Panicked(self.path.clone()))?
    }
}

impl Drop for VhostBlkServer {
    fn drop(&mut self) {
        if let Err(e) = self.halt() {
            tracing::warn!(socket = %self.path.display(), error = %e, "vhost-user-blk server ended badly");
        }
    }
}

fn listen(socket: &Path) -> Result<Listener, VhostBlkError> {
    // A stale socket left by a crashed server would make bind fail.
    Listener::new(socket, true).map_err(|err| VhostBlkError::Listen {
        path: socket.to_path_buf(),
        err,
    })
}

/// How a server is asked to stop, whether it waits for a frontend or
/// serves one.
struct Stop {
    evt: EventFd,
    state: Mutex<StopState>,
}

#[derive(Default)]
struct StopState {
    requested: bool,
    connection: Option<ShutdownHandle>,
}

impl Stop {
    fn new(socket: &Path) -> Result<Stop, VhostBlkError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|err| VhostBlkError::Start {
            path: socket.to_path_buf(),
            err,
        })?;
        Ok(Stop {
            evt,
            state: Mutex::new(StopState::default()),
        })
    }

    fn request(&self) {
        let mut st = lock(&self.state);
        st.requested = true;
        if let Some(c) = st.connection.take() {
            c.shutdown();
        }
        let _ = self.evt.write(1);
    }

    fn requested(&self) -> bool {
        lock(&self.state).requested
    }

    /// Remembers the connection being served so a stop can cut it; cuts it at
    /// once if a stop came first.
    fn track(&self, connection: Option<ShutdownHandle>) {
        let mut st = lock(&self.state);
        match connection {
            Some(c) if st.requested => c.shutdown(),
            c => st.connection = c,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the disk down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits until a frontend connects (true) or a stop is requested (false).
fn wait_for_frontend(listener: &Listener, stop: &Stop) -> io::Result<bool> {
    let mut fds = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.evt.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: fds is a valid array of two pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 || stop.requested() {
            return Ok(false);
        }
        if fds[0].revents != 0 {
            return Ok(true);
        }
    }
}

fn run(
    socket: &Path,
    listener: &mut Listener,
    store: Arc<dyn BlockStore>,
    stop: &Stop,
) -> Result<(), VhostBlkError> {
    tracing::info!(socket = %socket.display(), capacity = store.capacity(), read_only = store.read_only(), "vhost-user-blk backend listening");
    loop {
        let ready = wait_for_frontend(listener, stop).map_err(|err| VhostBlkError::Accept {
            path: socket.to_path_buf(),
            err,
        })?;
        if !ready {
            tracing::info!(socket = %socket.display(), "vhost-user-blk backend stopped");
            return Ok(());
        }
        // A unix socket connection stays queued even if the frontend closes
        // it first, so the accept inside the daemon does not block here.
        serve_connection(socket, listener, store.clone(), stop)?;
    }
}

/// Serves one frontend until it hangs up. Only failures to accept are
/// errors of the server; a frontend breaking the protocol is logged.
fn serve_connection(
    socket: &Path,
    listener: &mut Listener,
    store: Arc<dyn BlockStore>,
    stop: &Stop,
) -> Result<(), VhostBlkError> {
    let start_err = |err: io::Error| VhostBlkError::Start {
        path: socket.to_path_buf(),
        err,
    };
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let disk: Arc<str> = socket.display().to_string().into();
    let backend = Arc::new(BlkBackend::new(disk, store, mem.clone()).map_err(start_err)?);
    let mut daemon = VhostUserDaemon::new("vhost-blk-conn".into(), backend.clone(), mem)
        .map_err(|e| start_err(io::Error::other(e.to_string())))?;
    for handler in daemon.get_epoll_handlers() {
        handler
            .register_listener(
                backend.resume.0.as_raw_fd(),
                EventSet::IN,
                u64::from(RESUME_EVENT),
            )
            .map_err(start_err)?;
    }
    if let Err(e) = daemon.start(listener) {
        return Err(VhostBlkError::Accept {
            path: socket.to_path_buf(),
            err: io::Error::other(e.to_string()),
        });
    }
    tracing::info!(socket = %socket.display(), "vhost-user frontend connected");
    stop.track(daemon.shutdown_handle());
    let result = daemon.wait();
    stop.track(None);
    use vhost::vhost_user::Error as ProtocolError;
    use vhost_user_backend::Error as DaemonError;
    match result {
        // A VMM that exits or reboots just closes the socket.
        Ok(())
        | Err(DaemonError::HandleRequest(
            ProtocolError::Disconnected | ProtocolError::PartialMessage,
        )) => tracing::info!(socket = %socket.display(), "vhost-user frontend disconnected"),
        Err(e) if stop.requested() => {
            tracing::debug!(socket = %socket.display(), error = %e, "connection cut by stop")
        }
        Err(e) => {
            tracing::warn!(socket = %socket.display(), error = %e, "vhost-user frontend connection failed")
        }
    }
    // Dropping the daemon stops the vring worker and waits for it.
    drop(daemon);
    backend.close_exit_consumers();
    Ok(())
}

/// Serves, on this thread and with no socket or frontend, the requests a guest made available
/// on the split ring of `size` descriptors in `mem` whose descriptor table, available ring and
/// used ring are at `rings`, as the vring worker serves them when the guest kicks. Writes and
/// flushes complete whenever `store` calls back, possibly after this returns. Not an interface:
/// it lets the fuzz target `fuzz/fuzz_targets/vhost_user_blk.rs` drive the request path.
#[doc(hidden)]
pub fn serve_ring(
    store: Arc<dyn BlockStore>,
    mem: &GuestMemoryMmap,
    size: u16,
    rings: [GuestAddress; 3],
) -> io::Result<()> {
    let mem = GuestMemoryAtomic::new(mem.clone());
    let backend = BlkBackend::new("in-process".into(), store, mem.clone())?;
    let vring = VringRwLock::new(mem, QUEUE_SIZE).map_err(io::Error::other)?;
    vring.set_queue_size(size);
    let [desc, avail, used] = rings.map(|a| a.0);
    vring
        .set_queue_info(desc, avail, used)
        .map_err(io::Error::other)?;
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    backend.handle_event(0, EventSet::IN, &[vring], 0)
}

/// Requests taken off the ring and not yet completed.
#[derive(Default)]
struct Inflight {
    /// Raised each time the ring stops; completions of older requests are dropped.
    epoch: u64,
    requests: usize,
    write_bytes: u64,
    /// The worker stopped taking requests because of [`WRITE_BUDGET`].
    throttled: bool,
}

/// The in-flight bookkeeping, shared by the worker and the completions.
///
/// Lock order: this mutex, then the vring's lock.
struct Queue {
    inflight: Mutex<Inflight>,
    drained: Condvar,
}

/// What serves one frontend connection.
struct BlkBackend {
    /// The socket, naming the disk in logs.
    disk: Arc<str>,
    store: Arc<dyn BlockStore>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    queue: Arc<Queue>,
    /// Wakes the worker when the write budget frees up.
    resume: (EventConsumer, Arc<EventNotifier>),
    /// The exit eventfds handed to the library, which registers them with
    /// epoll through `into_raw_fd` and never closes them.
    exit_consumers: Mutex<Vec<RawFd>>,
    features: u64,
    config: [u8; blk::CONFIG_LEN],
    id: [u8; ID_LEN],
    /// A request without a status byte was logged as a warning.
    warned: AtomicBool,
    /// A malformed ring was logged as a warning.
    ring_warned: AtomicBool,
}

impl BlkBackend {
    fn new(
        disk: Arc<str>,
        store: Arc<dyn BlockStore>,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
    ) -> io::Result<Self> {
        let (consumer, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        let ro = if store.read_only() { blk::F_RO } else { 0 };
        let features = blk::F_VERSION_1
            | blk::F_RING_INDIRECT_DESC
            | blk::F_SIZE_MAX
            | blk::F_SEG_MAX
            | blk::F_BLK_SIZE
            | blk::F_FLUSH
            | ro
            // The frontend's dirty log (live migration); never offered to the guest.
            | VhostUserVirtioFeatures::LOG_ALL.bits()
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let mut config = [0u8; blk::CONFIG_LEN];
        config[0..8].copy_from_slice(&(store.capacity() / SECTOR_SIZE).to_le_bytes());
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        let mut id = [0u8; ID_LEN];
        let name = store.device_id();
        let n = name.len().min(ID_LEN);
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        Ok(BlkBackend {
            disk,
            store,
            mem,
            queue: Arc::new(Queue {
                inflight: Mutex::new(Inflight::default()),
                drained: Condvar::new(),
            }),
            resume: (consumer, Arc::new(notifier)),
            exit_consumers: Mutex::new(Vec::new()),
            features,
            config,
            id,
            warned: AtomicBool::new(false),
            ring_warned: AtomicBool::new(false),
        })
    }

    /// Closes the exit eventfds once the daemon that leaked them is gone.
    fn close_exit_consumers(&self) {
        for fd in lock(&self.exit_consumers).drain(..) {
            // SAFETY: fd came from an EventConsumer created in exit_event and
            // turned into a raw fd by the library, which never closes it; its
            // worker thread was joined when the daemon was dropped, so nothing
            // uses it any more and nothing else owns it.
            unsafe { libc::close(fd) };
        }
    }

    /// Serves the ring until it is empty (notifications back on), the write
    /// budget is spent (the resume eventfd brings the worker back), or the
    /// ring is malformed (the guest's next kick tries again).
    fn process(&self, vring: &VringRwLock) {
        loop {
            if let Err(e) = vring.disable_notification() {
                tracing::warn!(disk = %self.disk, error = ?e, "cannot read the guest's ring");
                return;
            }
            match self.drain(vring) {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    // Nothing can be taken off it (its available index is more
                    // than a ring ahead of the requests taken, say), yet it
                    // never looks empty, so going on would spin. Once per
                    // connection: a guest must not flood the host's log.
                    if !self.ring_warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!(disk = %self.disk, error = ?e, "the guest's ring is malformed; served again at its next kick");
                    }
                    return;
                }
            }
            match vring.enable_notification() {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => {
                    tracing::warn!(disk = %self.disk, error = ?e, "cannot read the guest's ring");
                    return;
                }
            }
        }
    }

    /// Takes up to a ring's worth of requests; false when the write budget
    /// stopped it, an error when the ring is malformed.
    fn drain(&self, vring: &VringRwLock) -> Result<bool, virtio_queue::Error> {
        let mut throttled = false;
        let mut malformed = None;
        // Synchronous completions are signalled once, after the batch.
        let mut completed = false;
        // Bounded: at most one ring's worth per call; the caller loops.
        for _ in 0..QUEUE_SIZE {
            let (chain, epoch) = {
                let mut inflight = lock(&self.queue.inflight);
                if inflight.write_bytes >= WRITE_BUDGET {
                    inflight.throttled = true;
                    throttled = true;
                    break;
                }
                let chain = vring
                    .get_mut()
                    .get_queue_mut()
                    .iter(self.mem.memory())
                    .map(|mut avail| avail.next());
                let chain = match chain {
                    Ok(Some(chain)) => chain,
                    Ok(None) => break,
                    Err(e) => {
                        malformed = Some(e);
                        break;
                    }
                };
                // Counted under the same lock as the pop: stopping the ring
                // sees every request taken off it.
                inflight.requests += 1;
                (chain, inflight.epoch)
            };
            let mut done = Completion {
                disk: self.disk.clone(),
                queue: self.queue.clone(),
                vring: vring.clone(),
                mem: self.mem.clone(),
                resume: self.resume.1.clone(),
                head: chain.head_index(),
                status: None,
                epoch,
                write_bytes: 0,
                signal: false,
                finished: false,
            };
            let mem = self.mem.memory();
            match virtio_blk::parse(chain, &*mem, MAX_REQUEST_BYTES) {
                Ok(req) => {
                    done.status = Some(req.status);
                    completed |= self.execute(&mem, req, done);
                }
                Err(refused) => {
                    // Once per connection: a guest must not flood the host's log.
                    if refused.status.is_none() && !self.warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            disk = %self.disk,
                            "virtio-blk request without a status byte; returned unanswered (further ones are logged at debug level)"
                        );
                    }
                    tracing::debug!(disk = %self.disk, error = %refused.error, "refused virtio-blk request");
                    done.status = refused.status;
                    done.finish(refused.error.status(), 0);
                    completed = true;
                }
            }
        }
        if completed && vring.needs_notification().unwrap_or(true) {
            signal(&self.disk, vring);
        }
        match malformed {
            Some(e) => Err(e),
            None => Ok(!throttled),
        }
    }

    /// Runs one request. Returns whether it completed before returning, so
    /// that the worker signals the guest for it.
    fn execute(&self, mem: &GuestMemoryMmap, req: Request, mut done: Completion) -> bool {
        let capacity = self.store.capacity();
        match req.op {
            Op::Read => {
                let Some(offset) = virtio_blk::disk_range(&req, capacity) else {
                    done.finish(status::IOERR, 0);
                    return true;
                };
                let mut buf = vec![0u8; req.data_len as usize];
                let result = self.store.read(offset, &mut buf).and_then(|()| {
                    virtio_blk::scatter(mem, &req.data, &buf).map_err(io::Error::other)
                });
                match result {
                    Ok(()) => done.finish(status::OK, req.data_len as u32),
                    Err(e) => {
                        tracing::warn!(disk = %self.disk, error = %e, sector = req.sector, "read failed");
                        done.finish(status::IOERR, 0);
                    }
                }
                true
            }
            Op::Write => {
                if self.store.read_only() {
                    done.finish(status::IOERR, 0);
                    return true;
                }
                let Some(offset) = virtio_blk::disk_range(&req, capacity) else {
                    done.finish(status::IOERR, 0);
                    return true;
                };
                let data = match virtio_blk::gather(mem, &req.data, req.data_len) {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::warn!(disk = %self.disk, error = %e, "write data unreadable");
                        done.finish(status::IOERR, 0);
                        return true;
                    }
                };
                {
                    let mut inflight = lock(&self.queue.inflight);
                    // After a timed-out stop, a stale request must not count against the new ring.
                    if inflight.epoch == done.epoch {
                        inflight.write_bytes += req.data_len;
                        done.write_bytes = req.data_len;
                    }
                }
                done.signal = true;
                self.store
                    .write(offset, data, false, Box::new(move |r| done.finish_io(r)));
                false
            }
            Op::Flush => {
                done.signal = true;
                self.store.flush(Box::new(move |r| done.finish_io(r)));
                false
            }
            Op::GetId => {
                let n = (req.data_len as usize).min(ID_LEN);
                match virtio_blk::scatter(mem, &req.data, &self.id[..n]) {
                    Ok(()) => done.finish(status::OK, n as u32),
                    Err(_) => done.finish(status::IOERR, 0),
                }
                true
            }
        }
    }

    /// Waits for every request taken off the ring to complete, then makes
    /// any later completion a no-op.
    fn drain_inflight(&self) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        let mut inflight = lock(&self.queue.inflight);
        while inflight.requests > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::error!(
                    disk = %self.disk,
                    requests = inflight.requests,
                    "the store did not complete requests in time; the guest will never see them"
                );
                break;
            }
            inflight = self
                .queue
                .drained
                .wait_timeout(inflight, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        inflight.epoch += 1;
        inflight.requests = 0;
        inflight.write_bytes = 0;
        inflight.throttled = false;
    }
}

fn signal(disk: &str, vring: &VringRwLock) {
    if let Err(e) = vring.signal_used_queue() {
        tracing::warn!(disk, error = %e, "cannot signal the guest");
    }
}

/// The answer owed to the guest for one request. Finishing it twice is
/// impossible; dropping it unfinished (a store that lost the callback)
/// answers with an I/O error.
struct Completion {
    disk: Arc<str>,
    queue: Arc<Queue>,
    vring: VringRwLock,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    resume: Arc<EventNotifier>,
    head: u16,
    status: Option<GuestAddress>,
    epoch: u64,
    write_bytes: u64,
    /// Signal the guest right away (completions off the worker thread).
    signal: bool,
    finished: bool,
}

impl Completion {
    fn finish_io(mut self, result: io::Result<()>) {
        match result {
            Ok(()) => self.finish(status::OK, 0),
            Err(e) => {
                tracing::warn!(disk = %self.disk, error = %e, "store request failed");
                self.finish(status::IOERR, 0)
            }
        }
    }

    /// Writes the status byte, returns the chain with `data_len` bytes
    /// written before it, and signals the guest if asked to.
    fn finish(&mut self, st: u8, data_len: u32) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let mut inflight = lock(&self.queue.inflight);
        if inflight.epoch != self.epoch {
            tracing::debug!(
                disk = %self.disk,
                head = self.head,
                "completion after the ring stopped; dropped"
            );
            return;
        }
        let mem = self.mem.memory();
        let used = match self.status {
            Some(a) if mem.write_obj(st, a).is_ok() => data_len + 1,
            _ => 0,
        };
        if let Err(e) = self.vring.add_used(self.head, used) {
            tracing::warn!(disk = %self.disk, error = ?e, "cannot return a used buffer");
        } else if self.signal && self.vring.needs_notification().unwrap_or(true) {
            signal(&self.disk, &self.vring);
        }
        inflight.requests -= 1;
        inflight.write_bytes -= self.write_bytes;
        if inflight.throttled && inflight.write_bytes < WRITE_BUDGET {
            inflight.throttled = false;
            let _ = self.resume.notify();
        }
        if inflight.requests == 0 {
            self.queue.drained.notify_all();
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if !self.finished {
            tracing::warn!(disk = %self.disk, head = self.head, "request dropped unanswered; failing it");
            self.signal = true;
            self.finish(status::IOERR, 0);
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        usize::from(QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    // EVENT_IDX is not offered.
    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut out = vec![0u8; size as usize];
        if let Some(src) = self.config.get(offset as usize..) {
            let n = src.len().min(out.len());
            out[..n].copy_from_slice(&src[..n]);
        }
        out
    }

    // The guest memory the library maps is shared through `mem` already.
    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = new_event_consumer_and_notifier(
            EventFlag::NONBLOCK | EventFlag::CLOEXEC,
        )
        .map_err(|e| tracing::error!(disk = %self.disk, error = %e, "cannot create the vring worker's exit eventfd"))
        .ok()?;
        lock(&self.exit_consumers).push(consumer.as_raw_fd());
        Some((consumer, notifier))
    }

    fn stop_vring(&self, _queue_index: u32) -> io::Result<()> {
        self.drain_inflight();
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        // Errors here would end the vring worker, so guest mistakes are
        // logged and answered, never returned.
        let Some(vring) = vrings.first() else {
            return Ok(());
        };
        match device_event {
            0 => self.process(vring),
            RESUME_EVENT => {
                let _ = self.resume.0.consume();
                let running = {
                    let v = vring.get_ref();
                    v.get_queue().ready() && v.is_enabled()
                };
                if running {
                    self.process(vring);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
