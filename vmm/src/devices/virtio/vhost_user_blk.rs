//! virtio-blk served by a vhost-user-blk backend in another process
//! (`enspeed blockd`): the VMM keeps the MMIO transport and the interrupt
//! status; the backend reads the queue straight out of guest RAM, which the
//! VMM shares with it by memfd, is kicked by the queue's ioeventfd and calls
//! back through an eventfd the VMM turns into the guest's interrupt.
//!
//! ```text
//!   build: connect, features, protocol features, config space (cached)
//!   DRIVER_OK: features, memory table, vring num/addr/base/call/kick, enable
//!   reset (guest status 0, or teardown for reboot): disable, GET_VRING_BASE
//!   drop: hang up; a rebooted VM builds a new device and connects again
//! ```
//!
//! If the backend goes away while the guest runs, the disk stops answering
//! and the VMM logs it; the guest sees its requests time out. Reconnecting
//! under a running guest would need in-flight tracking and is not done.
//! A backend serves one frontend at a time: a VMM connecting while another
//! is served waits for it to hang up, up to the reply timeout.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::worker::{QueueHandler, Worker};
use super::{features, ids, read_config_bytes, Interrupt, RingPosition, VirtioDevice};
use crate::memory::GuestMemory;

/// Queue size offered to the guest; the backend may take up to this.
const QUEUE_SIZE: u16 = 256;
/// Bytes of the config space read from the backend: capacity, size_max,
/// seg_max, geometry and blk_size, as far as the VMM needs to show them.
const CONFIG_LEN: usize = 24;
/// How long to wait for the backend's socket to appear (it may be
/// restarting).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one answer from the backend may take; stopping a ring waits for
/// the store's requests in flight, which the backend bounds at 30 s.
pub(crate) const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// Feature bits passed from the backend to the guest: the device's own
/// (0-23) and the ring features the VMM's transport allows.
const GUEST_FEATURES: u64 =
    0x00ff_ffff | features::RING_INDIRECT_DESC | features::RING_EVENT_IDX | features::VERSION_1;

/// Errors connecting a disk to its backend.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserBlkError {
    /// The socket cannot be reached.
    #[error("cannot connect to vhost-user-blk backend {path}: {err}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        err: std::io::Error,
    },
    /// The backend refused or broke the handshake.
    #[error("vhost-user-blk backend {path}: cannot {what}: {err}")]
    Handshake {
        /// Socket path.
        path: PathBuf,
        /// The step that failed.
        what: &'static str,
        /// Cause.
        err: vhost::Error,
    },
    /// The backend lacks something the VMM needs.
    #[error("vhost-user-blk backend {path} does not offer {what}")]
    Unsupported {
        /// Socket path.
        path: PathBuf,
        /// What is missing.
        what: &'static str,
    },
}

/// A disk whose requests a vhost-user-blk backend serves.
pub struct VhostUserBlk {
    socket: PathBuf,
    /// Declared before `frontend`: the relay watches the socket and must
    /// stop before it closes.
    started: Option<Started>,
    /// None before a migrated VM's disk reaches its backend, and after a live migration
    /// handed the backend over.
    frontend: Option<Frontend>,
    features: u64,
    config: [u8; CONFIG_LEN],
    hung_up: Arc<AtomicBool>,
    /// The backend keeps a dirty log of its writes into guest memory when asked (live
    /// migration: the LOG_SHMFD protocol feature and VHOST_F_LOG_ALL).
    can_log: bool,
    /// The log of a live migration under way (its memfd and size), also handed to a ring the
    /// guest starts meanwhile.
    log: Option<(RawFd, u64)>,
}

/// A ring the backend is serving.
struct Started {
    queues: usize,
    relay: Worker<CallRelay>,
    /// The features the driver took.
    acked: u64,
    /// Each queue's used ring, guest-physical.
    used_rings: Vec<u64>,
}

/// What the handshake with a backend learnt.
pub(crate) struct Handshake {
    pub(crate) frontend: Frontend,
    features: u64,
    pub(crate) config: [u8; CONFIG_LEN],
    can_log: bool,
}

/// Connects to `socket`, waiting for it to appear for a while.
fn connect_socket(socket: &Path) -> std::io::Result<UnixStream> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e),
        }
    }
}

impl VhostUserBlk {
    /// Connects to the backend at `socket` and learns the disk from it.
    pub fn connect(socket: &Path) -> Result<VhostUserBlk, VhostUserBlkError> {
        let h = Self::handshake(socket)?;
        Ok(VhostUserBlk {
            socket: socket.to_path_buf(),
            started: None,
            frontend: Some(h.frontend),
            features: h.features,
            config: h.config,
            hung_up: Arc::new(AtomicBool::new(false)),
            can_log: h.can_log,
            log: None,
        })
    }

    /// A disk of a VM that comes by live migration: it reaches the backend at `socket` only
    /// when the migrated state arrives ([`VirtioDevice::connect`]), once the source let the
    /// backend go.
    pub fn deferred(socket: &Path) -> VhostUserBlk {
        VhostUserBlk {
            socket: socket.to_path_buf(),
            started: None,
            frontend: None,
            features: 0,
            config: [0; CONFIG_LEN],
            hung_up: Arc::new(AtomicBool::new(false)),
            can_log: false,
            log: None,
        }
    }

    /// Connects to the backend at `socket` and learns the disk from it (also for a ring of the
    /// VMM's own: the SATA disk's).
    pub(crate) fn handshake(socket: &Path) -> Result<Handshake, VhostUserBlkError> {
        let path = socket.to_path_buf();
        let stream = connect_socket(socket)
            .and_then(|s| {
                s.set_read_timeout(Some(REPLY_TIMEOUT))?;
                Ok(s)
            })
            .map_err(|err| VhostUserBlkError::Connect {
                path: path.clone(),
                err,
            })?;
        let mut fe = Frontend::from_stream(stream, 1);
        let step = |what| {
            let path = path.clone();
            move |err| VhostUserBlkError::Handshake { path, what, err }
        };
        fe.set_owner().map_err(step("claim the backend"))?;
        let offered = fe.get_features().map_err(step("read its features"))?;
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if offered & features::VERSION_1 == 0 {
            return Err(VhostUserBlkError::Unsupported {
                path,
                what: "VIRTIO_F_VERSION_1",
            });
        }
        if offered & protocol == 0 {
            return Err(VhostUserBlkError::Unsupported {
                path,
                what: "protocol features",
            });
        }
        let proto = fe
            .get_protocol_features()
            .map_err(step("read its protocol features"))?;
        if !proto.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(VhostUserBlkError::Unsupported {
                path,
                what: "the CONFIG protocol feature (config space)",
            });
        }
        let wanted = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::LOG_SHMFD;
        let can_log = proto.contains(VhostUserProtocolFeatures::LOG_SHMFD)
            && offered & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        fe.set_protocol_features(proto & wanted)
            .map_err(step("set protocol features"))?;
        let (_, bytes) = fe
            .get_config(
                0,
                CONFIG_LEN as u32,
                VhostUserConfigFlags::empty(),
                &[0; CONFIG_LEN],
            )
            .map_err(step("read its config space"))?;
        let mut config = [0u8; CONFIG_LEN];
        config.copy_from_slice(&bytes[..CONFIG_LEN]);
        let capacity = u64::from_le_bytes(config[0..8].try_into().expect("8 bytes"));
        tracing::info!(socket = %socket.display(), sectors = capacity, features = format_args!("{offered:#x}"), "vhost-user-blk backend connected");
        Ok(Handshake {
            frontend: fe,
            features: offered & GUEST_FEATURES,
            config,
            can_log,
        })
    }

    /// The connection to the backend; after a live migration handed it over, a new one.
    fn frontend(&mut self) -> Result<&mut Frontend, String> {
        if self.frontend.is_none() {
            let h = Self::handshake(&self.socket).map_err(|e| e.to_string())?;
            if self.features != 0 && (h.features != self.features || h.config != self.config) {
                return Err(format!(
                    "vhost-user-blk backend {} now offers another disk",
                    self.socket.display()
                ));
            }
            self.features = h.features;
            self.config = h.config;
            self.can_log = h.can_log;
            self.hung_up.store(false, Ordering::SeqCst);
            self.frontend = Some(h.frontend);
        }
        Ok(self.frontend.as_mut().expect("just set"))
    }

    /// Has the backend mark every page it writes in guest memory in `log` (live migration),
    /// from now on (and from its start, should the guest start the disk meanwhile) until the
    /// disk is handed over; `log` must outlive that or [`VhostUserBlk::stop_log`].
    pub fn start_log(&mut self, log: &crate::migration::SharedLog) -> Result<(), String> {
        if !self.can_log && self.frontend.is_some() {
            return Err(format!(
                "vhost-user-blk backend {} keeps no dirty log (LOG_SHMFD, LOG_ALL)",
                self.socket.display()
            ));
        }
        self.log = Some((log.fd(), log.size()));
        let Some(acked) = self.started.as_ref().map(|s| s.acked) else {
            return Ok(());
        };
        self.send_log(acked)
            .map_err(|e| format!("vhost-user-blk backend {}: {e}", self.socket.display()))
    }

    /// The migration ended here (it failed): the log is the caller's no more. (The backend
    /// goes on marking the log it mapped until the next connection: harmless.)
    pub fn stop_log(&mut self) {
        self.log = None;
    }

    fn send_log(&mut self, acked: u64) -> Result<(), String> {
        let Some((fd, size)) = self.log else {
            return Ok(());
        };
        let fe = self.frontend()?;
        fe.set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: size,
                mmap_offset: 0,
                mmap_handle: fd,
            }),
        )
        .and_then(|()| {
            fe.set_features(
                acked
                    | VhostUserVirtioFeatures::LOG_ALL.bits()
                    | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            )
        })
        .map_err(|e| format!("its dirty log: {e}"))
    }

    /// Hands the started queues to the backend.
    fn start(
        &mut self,
        mem: &GuestMemory,
        acked: u64,
        queues: &[Queue],
        kicks: &[EventFd],
        call: &EventFd,
    ) -> Result<(), String> {
        let fe = self.frontend()?;
        let fail = |what: &str| {
            let what = what.to_string();
            move |e: vhost::Error| format!("{what}: {e}")
        };
        fe.set_features(acked | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
            .map_err(fail("set features"))?;
        share_memory(fe, mem)?;
        self.send_log(acked)?;
        let fe = self.frontend()?;
        let host = |a: u64| {
            mem.get_host_address(GuestAddress(a))
                .map(|p| p as u64)
                .map_err(|e| format!("ring address {a:#x}: {e}"))
        };
        for (i, (q, kick)) in queues.iter().zip(kicks).enumerate() {
            let ring = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: host(q.desc_table())?,
                used_ring_addr: host(q.used_ring())?,
                avail_ring_addr: host(q.avail_ring())?,
                log_addr: None,
            };
            start_ring(fe, i, &ring, q.next_avail(), call, kick)?;
        }
        // A ring started again (after a reset or a live migration) may hold requests the guest
        // made available while notifications were off: the backend looks once by itself.
        for kick in kicks {
            let _ = kick.write(1);
        }
        Ok(())
    }
}

/// Shares `mem` with the backend: one entry per region (for guest RAM, the same memfd at
/// different offsets when RAM skips the 32-bit MMIO hole).
pub(crate) fn share_memory(fe: &mut Frontend, mem: &GuestMemory) -> Result<(), String> {
    let regions = mem
        .iter()
        .map(VhostUserMemoryRegionInfo::from_guest_region)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("describe the memory: {e}"))?;
    fe.set_mem_table(&regions)
        .map(|_| ())
        .map_err(|e| format!("share the memory: {e}"))
}

/// Hands ring `i` (at `ring`, its next request at `base`) to the backend with its eventfds,
/// and enables it.
pub(crate) fn start_ring(
    fe: &mut Frontend,
    i: usize,
    ring: &VringConfigData,
    base: u16,
    call: &EventFd,
    kick: &EventFd,
) -> Result<(), String> {
    let fail = |what: &str| {
        let what = what.to_string();
        move |e: vhost::Error| format!("{what}: {e}")
    };
    fe.set_vring_num(i, ring.queue_size)
        .map_err(fail("set the queue size"))?;
    fe.set_vring_addr(i, ring)
        .map_err(fail("set the ring addresses"))?;
    fe.set_vring_base(i, base)
        .map_err(fail("set the ring base"))?;
    fe.set_vring_call(i, call)
        .map_err(fail("set the call eventfd"))?;
    fe.set_vring_kick(i, kick)
        .map_err(fail("set the kick eventfd"))?;
    fe.set_vring_enable(i, true)
        .map_err(fail("enable the ring"))
}

impl VirtioDevice for VhostUserBlk {
    fn device_type(&self) -> u32 {
        ids::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    // No writable config field is offered (no CONFIG_WCE).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemory,
        features: u64,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), String> {
        let socket = self.socket.display().to_string();
        if self.hung_up.load(Ordering::SeqCst) {
            return Err(format!("vhost-user-blk backend {socket} is gone"));
        }
        let call = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("call eventfd: {e}"))?;
        self.start(&mem, features, &queues, &queue_evts, &call)
            .map_err(|e| format!("vhost-user-blk backend {socket}: {e}"))?;
        let socket_fd = self.frontend()?.as_raw_fd();
        let relay = CallRelay {
            call,
            interrupt,
            socket_fd,
            socket: socket.clone(),
            hung_up: self.hung_up.clone(),
        };
        // The call eventfd is an extra descriptor, not a queue: the worker
        // wakes queues once when it starts, which would raise an interrupt
        // for nothing.
        let relay = Worker::spawn(format!("vhost-blk-{socket}"), relay, Vec::new())
            .map_err(|e| format!("cannot start the interrupt relay: {e}"))?;
        self.started = Some(Started {
            queues: queues.len(),
            relay,
            acked: features,
            used_rings: queues.iter().map(|q| q.used_ring()).collect(),
        });
        Ok(())
    }

    fn connect(&mut self) -> Result<(), String> {
        self.frontend().map(|_| ())
    }

    // The backend finishes every request it took before it answers GET_VRING_BASE; then the
    // connection is closed, so that the target's VMM may take the backend (it serves one
    // frontend at a time). `activate` connects again should the migration fail.
    fn pause(&mut self, mem: &GuestMemory) -> Result<Vec<RingPosition>, String> {
        let socket = self.socket.display().to_string();
        let started = self
            .started
            .take()
            .ok_or_else(|| format!("vhost-user-blk backend {socket}: the disk is not running"))?;
        started.relay.stop();
        if self.hung_up.load(Ordering::SeqCst) {
            self.frontend = None;
            return Err(format!("vhost-user-blk backend {socket} is gone"));
        }
        let fe = self.frontend()?;
        let mut at = Vec::new();
        for (i, used) in started.used_rings.iter().enumerate() {
            let next_avail = fe
                .set_vring_enable(i, false)
                .and_then(|()| fe.get_vring_base(i))
                .map_err(|e| format!("vhost-user-blk backend {socket}: stopping its ring: {e}"))?;
            let next_used: u16 = mem
                .read_obj(GuestAddress(used + 2))
                .map_err(|e| format!("the disk's used ring at {used:#x}: {e}"))?;
            at.push(RingPosition {
                next_avail: next_avail as u16,
                next_used,
            });
        }
        self.frontend = None;
        Ok(at)
    }

    fn reset(&mut self) {
        let Some(started) = self.started.take() else {
            return;
        };
        // The guest expects no interrupt after a reset; stopping the relay
        // first also keeps it off the socket while the rings stop.
        started.relay.stop();
        if self.hung_up.load(Ordering::SeqCst) {
            return;
        }
        let Some(fe) = self.frontend.as_mut() else {
            return;
        };
        for i in 0..started.queues {
            // GET_VRING_BASE returns once the backend finished the requests it took.
            let r = fe
                .set_vring_enable(i, false)
                .and_then(|()| fe.get_vring_base(i));
            if let Err(e) = r {
                tracing::error!(socket = %self.socket.display(), queue = i, error = %e, "cannot stop the vhost-user-blk ring");
            }
        }
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// Turns the backend's call eventfd into the guest's interrupt, and notices
/// when the backend hangs up.
struct CallRelay {
    call: EventFd,
    interrupt: Arc<Interrupt>,
    socket_fd: RawFd,
    socket: String,
    hung_up: Arc<AtomicBool>,
}

impl CallRelay {
    const CALL: usize = 0;
    const SOCKET: usize = 1;

    /// Whether the backend closed its end of the socket.
    fn backend_hung_up(&self) -> bool {
        // The backend sends nothing unasked on this socket while the ring
        // runs, so readable means hung up; peek to be sure.
        let mut b = 0u8;
        // SAFETY: reads at most one byte into `b`; the socket stays open
        // while the relay runs (it stops before the frontend is dropped).
        let n = unsafe {
            libc::recv(
                self.socket_fd,
                (&mut b as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n == 0
    }
}

impl QueueHandler for CallRelay {
    // The relay watches no queue: the guest kicks the backend directly.
    fn queue_notified(&mut self, _index: usize) {}

    fn extra_fds(&self) -> Vec<RawFd> {
        vec![self.call.as_raw_fd(), self.socket_fd]
    }

    fn extra_ready(&mut self, index: usize) {
        match index {
            // Watched edge-triggered: reading resets the count, and a call
            // written after the read wakes the relay again. Linux's
            // virtio-mmio driver reads InterruptStatus, so the bit must be
            // set: the irqfd alone would not do.
            Self::CALL if self.call.read().is_ok() => self.interrupt.signal_used(0),
            // Logged once, however often the socket wakes the relay.
            Self::SOCKET
                if self.backend_hung_up() && !self.hung_up.swap(true, Ordering::SeqCst) =>
            {
                tracing::error!(socket = %self.socket, "vhost-user-blk backend hung up; the disk no longer answers the guest");
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::INT_VRING;
    use blockrepl::store::FileStore;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes};

    fn wait_until(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "{what}: not within 10 s");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A backend over a 1 MiB file whose first sector is 0x5a, and a device
    /// connected to it.
    fn backend(name: &str) -> (PathBuf, blockrepl::vhost_blk::VhostBlkServer, VhostUserBlk) {
        let dir = std::env::temp_dir().join(format!("enspeed-vub-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("disk.img");
        let mut data = vec![0u8; 1 << 20];
        data[..512].fill(0x5a);
        std::fs::write(&img, data).unwrap();
        let store = Arc::new(FileStore::open(&img, false).unwrap());
        let server = blockrepl::vhost_blk::spawn(&dir.join("sock"), store).unwrap();
        let dev = VhostUserBlk::connect(server.socket()).unwrap();
        (dir, server, dev)
    }

    /// Puts a one-sector read on a fresh ring at guest address 0 and starts
    /// the device on it; returns the used ring's address.
    fn start_read(
        dev: &mut VhostUserBlk,
        mem: &GuestMemory,
        interrupt: &Arc<Interrupt>,
        kick: &EventFd,
    ) -> GuestAddress {
        mem.write_slice(&[0u8; 0x1000], GuestAddress(0)).unwrap();
        mem.write_obj(0u32, GuestAddress(0x20000)).unwrap();
        mem.write_obj(0u64, GuestAddress(0x20008)).unwrap();
        mem.write_slice(&[0u8; 512], GuestAddress(0x30000)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(0x40000)).unwrap();
        let q = MockSplitQueue::new(mem, 16);
        let w = VRING_DESC_F_WRITE as u16;
        q.build_desc_chain(&[
            RawDescriptor::from(SplitDescriptor::new(0x20000, 16, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(0x30000, 512, w, 0)),
            RawDescriptor::from(SplitDescriptor::new(0x40000, 1, w, 0)),
        ])
        .unwrap();
        let queue: Queue = q.create_queue().unwrap();
        dev.activate(
            mem.clone(),
            features::VERSION_1,
            vec![queue],
            vec![kick.try_clone().unwrap()],
            interrupt.clone(),
        )
        .unwrap();
        kick.write(1).unwrap();
        q.used_addr()
    }

    #[test]
    fn a_request_completes_through_the_backend_with_interrupt_status_and_reset_restarts() {
        let (dir, server, mut dev) = backend("io");
        assert_ne!(dev.features() & features::VERSION_1, 0);
        assert_eq!(
            dev.features() & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0
        );
        let mut cap = [0u8; 8];
        dev.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 2048);

        let mem = crate::memory::create(16).unwrap().0;
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Interrupt::new(irqfd.try_clone().unwrap());
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        // Twice: a reset stops the ring and the next DRIVER_OK starts it again.
        for round in 0..2 {
            let used = start_read(&mut dev, &mem, &interrupt, &kick);
            let used_idx = || mem.read_obj::<u16>(used.unchecked_add(2)).unwrap();
            wait_until("used buffer", || used_idx() == 1);
            wait_until("interrupt status", || interrupt.status() & INT_VRING != 0);
            assert!(
                irqfd.read().is_ok(),
                "round {round}: the irqfd was not raised"
            );
            assert_eq!(mem.read_obj::<u8>(GuestAddress(0x40000)).unwrap(), 0);
            assert_eq!(
                mem.read_obj::<u64>(GuestAddress(0x30000 + 504)).unwrap(),
                0x5a5a_5a5a_5a5a_5a5a
            );
            assert_eq!(mem.read_obj::<u32>(used.unchecked_add(8)).unwrap(), 513);
            interrupt.ack(u32::MAX);
            dev.reset();
        }
        drop(dev);
        server.stop().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Live migration's part of the device: the backend marks in a log shared with the VMM
    /// the pages it writes into guest memory (the data it read, the status byte, the used
    /// ring), once asked and not before, and never a page it only reads; a paused ring says
    /// where it stood and lets the backend go to another frontend.
    #[test]
    fn the_backend_logs_its_writes_once_asked_and_a_paused_ring_says_where_it_stood() {
        use crate::migration::{pages_of, DirtyLog, SharedLog};
        use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
        let (dir, server, mut dev) = backend("log");
        let mem = crate::memory::create(16).unwrap().0;
        let log = SharedLog::new(&mem).unwrap();
        let interrupt = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let used = start_read(&mut dev, &mem, &interrupt, &kick);
        let used_idx = || mem.read_obj::<u16>(used.unchecked_add(2)).unwrap();
        wait_until("first read", || used_idx() == 1);
        assert_eq!(pages_of(&log.take(0, 16 << 20).unwrap()), Vec::<u64>::new());

        // Asked while the ring runs; a second read on it, descriptors 3 to 5.
        dev.start_log(&log).unwrap();
        mem.write_obj(0xffu8, GuestAddress(0x40000)).unwrap();
        let (n, w) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
        for (i, d) in [
            SplitDescriptor::new(0x20000, 16, n, 4),
            SplitDescriptor::new(0x30000, 512, w | n, 5),
            SplitDescriptor::new(0x40000, 1, w, 0),
        ]
        .into_iter()
        .enumerate()
        {
            mem.write_obj(RawDescriptor::from(d), GuestAddress(16 * (3 + i as u64)))
                .unwrap();
        }
        // MockSplitQueue's layout: 16 descriptors from 0, then the available ring (its flags,
        // its index, its entries).
        let avail = GuestAddress(16 * 16);
        mem.write_obj(3u16, avail.unchecked_add(4 + 2)).unwrap();
        mem.write_obj(2u16, avail.unchecked_add(2)).unwrap();
        kick.write(1).unwrap();
        wait_until("second read", || used_idx() == 2);
        let pages = pages_of(&log.take(0, 16 << 20).unwrap());
        for (what, page) in [
            ("data", 0x30),
            ("status", 0x40),
            ("used ring", used.0 / 4096),
        ] {
            assert!(
                pages.contains(&page),
                "the {what} page {page:#x} is not in {pages:x?}"
            );
        }
        assert!(
            !pages.contains(&0x20),
            "the header, only read, is marked: {pages:x?}"
        );
        assert_eq!(pages_of(&log.take(0, 16 << 20).unwrap()), Vec::<u64>::new());

        let at = dev.pause(&mem).unwrap();
        assert_eq!(
            at,
            vec![RingPosition {
                next_avail: 2,
                next_used: 2
            }]
        );
        // The backend serves another frontend now (it serves one at a time).
        let other = VhostUserBlk::connect(server.socket()).unwrap();
        drop(other);
        drop(dev);
        server.stop().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_backend_that_hangs_up_is_noticed_and_refuses_the_next_activation() {
        let (dir, server, mut dev) = backend("hangup");
        let mem = crate::memory::create(16).unwrap().0;
        let interrupt = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        start_read(&mut dev, &mem, &interrupt, &kick);
        server.stop().unwrap();
        wait_until("hang-up noticed", || dev.hung_up.load(Ordering::SeqCst));
        dev.reset();
        let q: Queue = MockSplitQueue::new(&mem, 16).create_queue().unwrap();
        let e = dev
            .activate(
                mem.clone(),
                features::VERSION_1,
                vec![q],
                vec![kick],
                interrupt,
            )
            .unwrap_err();
        assert!(e.contains("gone"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_unreachable_backend_is_an_error_naming_the_socket() {
        // Under a file, not a directory: refused at once, not waited for.
        let f = std::env::temp_dir().join(format!("enspeed-no-backend-{}", std::process::id()));
        std::fs::write(&f, b"").unwrap();
        let p = f.join("disk.sock");
        let e = VhostUserBlk::connect(&p).err().expect("no backend there");
        assert!(matches!(e, VhostUserBlkError::Connect { .. }));
        assert!(e.to_string().contains(&p.display().to_string()), "{e}");
        std::fs::remove_file(f).unwrap();
    }

    #[test]
    fn a_backend_that_hangs_up_during_the_handshake_is_an_error() {
        let p = std::env::temp_dir().join(format!("enspeed-hangup-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let l = std::os::unix::net::UnixListener::bind(&p).unwrap();
        let t = std::thread::spawn(move || drop(l.accept().unwrap()));
        assert!(matches!(
            VhostUserBlk::connect(&p),
            Err(VhostUserBlkError::Handshake { .. })
        ));
        t.join().unwrap();
        std::fs::remove_file(p).unwrap();
    }
}
