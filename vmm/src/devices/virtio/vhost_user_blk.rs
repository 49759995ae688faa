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
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::worker::{QueueHandler, Worker};
use super::{features, ids, read_config_bytes, Interrupt, VirtioDevice};
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
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
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
    frontend: Frontend,
    features: u64,
    config: [u8; CONFIG_LEN],
    hung_up: Arc<AtomicBool>,
}

/// A ring the backend is serving.
struct Started {
    queues: usize,
    relay: Worker<CallRelay>,
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
        let wanted = VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK;
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
        Ok(VhostUserBlk {
            socket: path,
            started: None,
            frontend: fe,
            features: offered & GUEST_FEATURES,
            config,
            hung_up: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The backend's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
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
        let fe = &mut self.frontend;
        let fail = |what: &str| {
            let what = what.to_string();
            move |e: vhost::Error| format!("{what}: {e}")
        };
        fe.set_features(acked | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
            .map_err(fail("set features"))?;
        // One entry per RAM region: the same memfd at different offsets
        // when RAM skips the 32-bit MMIO hole.
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(fail("describe guest RAM"))?;
        fe.set_mem_table(&regions)
            .map_err(fail("share guest RAM"))?;
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
            fe.set_vring_num(i, q.size())
                .map_err(fail("set the queue size"))?;
            fe.set_vring_addr(i, &ring)
                .map_err(fail("set the ring addresses"))?;
            fe.set_vring_base(i, q.next_avail())
                .map_err(fail("set the ring base"))?;
            fe.set_vring_call(i, call)
                .map_err(fail("set the call eventfd"))?;
            fe.set_vring_kick(i, kick)
                .map_err(fail("set the kick eventfd"))?;
            fe.set_vring_enable(i, true)
                .map_err(fail("enable the ring"))?;
        }
        Ok(())
    }
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
        let relay = CallRelay {
            interrupt,
            socket_fd: self.frontend.as_raw_fd(),
            socket: socket.clone(),
            hung_up: self.hung_up.clone(),
        };
        let relay = Worker::spawn(format!("vhost-blk-{socket}"), relay, vec![call])
            .map_err(|e| format!("cannot start the interrupt relay: {e}"))?;
        self.started = Some(Started {
            queues: queues.len(),
            relay,
        });
        Ok(())
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
        for i in 0..started.queues {
            // GET_VRING_BASE returns once the backend finished the requests it took.
            let r = self
                .frontend
                .set_vring_enable(i, false)
                .and_then(|()| self.frontend.get_vring_base(i));
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
    interrupt: Arc<Interrupt>,
    socket_fd: RawFd,
    socket: String,
    hung_up: Arc<AtomicBool>,
}

impl QueueHandler for CallRelay {
    // Also called once when the relay starts, which makes one spurious
    // interrupt at DRIVER_OK; drivers ignore those.
    fn queue_notified(&mut self, _index: usize) {
        // Linux's virtio-mmio driver reads InterruptStatus, so the bit must
        // be set: the irqfd alone would not do.
        self.interrupt.signal_used();
    }

    fn extra_fds(&self) -> Vec<RawFd> {
        vec![self.socket_fd]
    }

    fn extra_ready(&mut self, _index: usize) {
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
        if n == 0 && !self.hung_up.swap(true, Ordering::SeqCst) {
            tracing::error!(socket = %self.socket, "vhost-user-blk backend hung up; the disk no longer answers the guest");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
