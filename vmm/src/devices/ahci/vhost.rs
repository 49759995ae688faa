//! A SATA disk whose blocks a vhost-user-blk backend (`enspeed blockd`) serves: a cluster VM's
//! LiveSync disk on the AHCI controller, for guests without virtio drivers.
//!
//! The AHCI device runs each command to its end on the vCPU that issued it, so this side is a
//! small virtio-blk driver of its own: one split ring of `RING_SIZE` descriptors and a bounce
//! buffer in a memfd of the VMM's (never guest RAM: the guest cannot see or change a request
//! under way), shared with the backend by the vhost-user memory table, one request at a time.
//! The data goes between the buffer and guest RAM through the AHCI's own copies.
//!
//! ```text
//!   connect: the vhost-user-blk handshake (capacity from the config space), memory table,
//!            ring 0 (size, addresses, base 0, call, kick), enabled
//!   request: header, data (up to DATA_SEGMENTS x SEGMENT bytes), status; kick; wait for
//!            the call (REPLY_TIMEOUT); the used ring names the chain
//!   hand over (live migration): hang up, so that the target's VMM may take the backend; the
//!            next request connects again (on the target, or here if the move failed)
//! ```

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost::vhost_user::Frontend;
use vhost::{VhostBackend, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::features;
use crate::devices::virtio::vhost_user_blk::{
    share_memory, start_ring, VhostUserBlk, REPLY_TIMEOUT,
};
use crate::memory::GuestMemory;

/// Descriptors in the ring: a request's header, data and status.
const RING_SIZE: u16 = 16;
/// Bytes in one data descriptor: the backend's `size_max`.
const SEGMENT: usize = 128 << 10;
/// Data descriptors in one request.
const DATA_SEGMENTS: usize = 8;
/// Bytes one request moves at most; longer commands take several.
pub const REQUEST_BYTES: usize = SEGMENT * DATA_SEGMENTS;

/// Where things lie in the private memory (its own addresses, from 0).
mod at {
    pub const DESC: u64 = 0;
    pub const AVAIL: u64 = 0x400;
    pub const USED: u64 = 0x800;
    pub const HEADER: u64 = 0xc00;
    pub const STATUS: u64 = 0xc10;
    pub const DATA: u64 = 0x1000;
}

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;

/// virtio-blk request types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Read sectors into the buffer.
    Read,
    /// Write sectors from the buffer.
    Write,
    /// Make written sectors durable.
    Flush,
}

impl Request {
    fn code(self) -> u32 {
        match self {
            Request::Read => 0,
            Request::Write => 1,
            Request::Flush => 4,
        }
    }
}

/// A connection to the backend with its ring.
struct Connection {
    frontend: Frontend,
    mem: GuestMemory,
    kick: EventFd,
    call: EventFd,
    /// The next avail index this side writes, and the used index it has seen.
    next: u16,
}

/// A SATA disk served by a vhost-user-blk backend.
pub struct VhostUserStore {
    socket: PathBuf,
    conn: Option<Connection>,
    /// Learnt from the backend's config space at the first connection.
    sectors: Option<u64>,
}

impl VhostUserStore {
    /// Connects to the backend at `socket` now (a VM starting here).
    pub fn connect(socket: &Path) -> Result<VhostUserStore, String> {
        let mut s = Self::deferred(socket);
        s.connection()?;
        Ok(s)
    }

    /// A disk of a VM that comes by live migration: it reaches the backend at its first
    /// request, once the source has let the backend go.
    pub fn deferred(socket: &Path) -> VhostUserStore {
        VhostUserStore {
            socket: socket.to_path_buf(),
            conn: None,
            sectors: None,
        }
    }

    /// The disk's size in 512-byte sectors (connecting if need be).
    pub fn sectors(&mut self) -> Result<u64, String> {
        if self.sectors.is_none() {
            self.connection()?;
        }
        Ok(self.sectors.unwrap_or(0))
    }

    /// Hangs up, so that another VMM may take the backend (a live migration's handover); the
    /// next request connects again.
    pub fn hand_over(&mut self) {
        self.conn = None;
    }

    fn connection(&mut self) -> Result<&mut Connection, String> {
        if self.conn.is_none() {
            let c = self.open()?;
            self.conn = Some(c);
        }
        Ok(self.conn.as_mut().expect("just set"))
    }

    fn open(&mut self) -> Result<Connection, String> {
        let socket = self.socket.display().to_string();
        let h = VhostUserBlk::handshake(&self.socket).map_err(|e| e.to_string())?;
        let sectors = u64::from_le_bytes(h.config[0..8].try_into().expect("8 bytes"));
        if self.sectors.is_some_and(|s| s != sectors) {
            return Err(format!(
                "vhost-user-blk backend {socket} now serves a disk of {sectors} sectors, not {}",
                self.sectors.unwrap_or(0)
            ));
        }
        let fail = |e: String| format!("vhost-user-blk backend {socket}: cannot {e}");
        let (mem, _file) = crate::memory::private(at::DATA + REQUEST_BYTES as u64)
            .map_err(|e| format!("memory for the SATA disk's ring: {e}"))?;
        let kick = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("an eventfd: {e}"))?;
        let call = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("an eventfd: {e}"))?;
        let mut fe = h.frontend;
        fe.set_features(features::VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
            .map_err(|e| fail(format!("set its features: {e}")))?;
        share_memory(&mut fe, &mem).map_err(fail)?;
        let host = |a: u64| {
            mem.get_host_address(GuestAddress(a))
                .map(|p| p as u64)
                .map_err(|e| format!("the SATA disk's ring at {a:#x}: {e}"))
        };
        let ring = VringConfigData {
            queue_max_size: RING_SIZE,
            queue_size: RING_SIZE,
            flags: 0,
            desc_table_addr: host(at::DESC)?,
            used_ring_addr: host(at::USED)?,
            avail_ring_addr: host(at::AVAIL)?,
            log_addr: None,
        };
        start_ring(&mut fe, 0, &ring, 0, &call, &kick).map_err(fail)?;
        self.sectors = Some(sectors);
        tracing::info!(socket = %socket, sectors, "SATA disk on its vhost-user-blk backend");
        Ok(Connection {
            frontend: fe,
            mem,
            kick,
            call,
            next: 0,
        })
    }

    /// Runs one request: `sector` and, for a write, `data`; for a read, `len` bytes come back.
    /// At most [`REQUEST_BYTES`] bytes.
    pub fn request(
        &mut self,
        kind: Request,
        sector: u64,
        data: &[u8],
        len: usize,
    ) -> Result<Vec<u8>, String> {
        let socket = self.socket.display().to_string();
        let conn = self.connection()?;
        let result = conn.run(kind, sector, data, len);
        if let Err(e) = &result {
            // Whatever state the ring is in, the next request starts from a new connection.
            tracing::warn!(socket = %socket, error = %e, "SATA disk request failed");
            self.conn = None;
        }
        result.map_err(|e| format!("vhost-user-blk backend {socket}: {e}"))
    }
}

impl Connection {
    fn run(
        &mut self,
        kind: Request,
        sector: u64,
        data: &[u8],
        len: usize,
    ) -> Result<Vec<u8>, String> {
        let bytes = if kind == Request::Write {
            data.len()
        } else {
            len
        };
        if bytes > REQUEST_BYTES {
            return Err(format!(
                "a request of {bytes} bytes (at most {REQUEST_BYTES})"
            ));
        }
        let m = &self.mem;
        let w = |r: Result<(), vm_memory::GuestMemoryError>| {
            r.map_err(|e| format!("the ring's memory: {e}"))
        };
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&kind.code().to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        w(m.write_slice(&header, GuestAddress(at::HEADER)))?;
        w(m.write_obj(0xffu8, GuestAddress(at::STATUS)))?;
        if kind == Request::Write {
            w(m.write_slice(data, GuestAddress(at::DATA)))?;
        }
        // The chain: header, data segments, status; descriptor i links to i + 1.
        let mut descs: Vec<(u64, u32, u16)> = vec![(at::HEADER, 16, 0)];
        let data_flags = if kind == Request::Read {
            VIRTQ_DESC_F_WRITE
        } else {
            0
        };
        let mut off = 0;
        while off < bytes {
            let n = SEGMENT.min(bytes - off);
            descs.push((at::DATA + off as u64, n as u32, data_flags));
            off += n;
        }
        descs.push((at::STATUS, 1, VIRTQ_DESC_F_WRITE));
        let last = descs.len() - 1;
        for (i, (addr, n, flags)) in descs.iter().enumerate() {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&n.to_le_bytes());
            let next = if i < last { VIRTQ_DESC_F_NEXT } else { 0 };
            d[12..14].copy_from_slice(&(flags | next).to_le_bytes());
            d[14..16].copy_from_slice(&((i + 1) as u16 % RING_SIZE).to_le_bytes());
            w(m.write_slice(&d, GuestAddress(at::DESC + 16 * i as u64)))?;
        }
        // The chain's head (descriptor 0) in the avail ring, then the index past it.
        let slot = u64::from(self.next % RING_SIZE);
        w(m.write_obj(0u16, GuestAddress(at::AVAIL + 4 + 2 * slot)))?;
        fence(Ordering::SeqCst);
        self.next = self.next.wrapping_add(1);
        w(m.write_obj(self.next, GuestAddress(at::AVAIL + 2)))?;
        fence(Ordering::SeqCst);
        self.kick
            .write(1)
            .map_err(|e| format!("kicking its ring: {e}"))?;
        self.wait_used()?;
        let m = &self.mem;
        let status: u8 = m
            .read_obj(GuestAddress(at::STATUS))
            .map_err(|e| format!("the ring's memory: {e}"))?;
        if status != 0 {
            return Err(format!(
                "{kind:?} of {bytes} bytes at sector {sector} failed (virtio-blk status {status})"
            ));
        }
        let mut out = Vec::new();
        if kind == Request::Read {
            out = vec![0u8; len];
            m.read_slice(&mut out, GuestAddress(at::DATA))
                .map_err(|e| format!("the ring's memory: {e}"))?;
        }
        Ok(out)
    }

    /// Waits until the backend has put the request in the used ring.
    fn wait_used(&self) -> Result<(), String> {
        let deadline = std::time::Instant::now() + REPLY_TIMEOUT;
        loop {
            let used: u16 = self
                .mem
                .read_obj(GuestAddress(at::USED + 2))
                .map_err(|e| format!("the ring's memory: {e}"))?;
            if used == self.next {
                let _ = self.call.read();
                return Ok(());
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(format!("no answer in {} s", REPLY_TIMEOUT.as_secs()));
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.call.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.frontend.as_raw_fd(),
                    events: libc::POLLIN | libc::POLLRDHUP,
                    revents: 0,
                },
            ];
            let ms = left.as_millis().min(1000) as i32;
            // SAFETY: `fds` is a valid array of two pollfds for the call's duration.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
            if r > 0 && fds[1].revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0 {
                return Err("the backend hung up".into());
            }
            if fds[0].revents & libc::POLLIN != 0 {
                let _ = self.call.read();
            }
        }
    }
}
