//! Virtio 1.x over virtio-mmio version 2: transport registers, device
//! initialisation and split virtqueues in static memory, all polled.

use crate::io::{mb, rd16, rd32, rd8, wr16, wr32, wr64, Global};
use core::fmt;

/// Register offsets of the virtio-mmio (version 2) transport.
mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC: u64 = 0x080;
    pub const QUEUE_DRIVER: u64 = 0x090;
    pub const QUEUE_DEVICE: u64 = 0x0a0;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// "virt" in little endian.
pub const MAGIC: u32 = 0x7472_6976;
/// Device status bits.
const S_ACKNOWLEDGE: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_NEEDS_RESET: u32 = 64;
const S_FAILED: u32 = 128;

/// VIRTIO_F_VERSION_1: the only transport feature we accept.
pub const F_VERSION_1: u64 = 1 << 32;

/// Largest queue we use (and the size of the static ring memory).
pub const QMAX: usize = 256;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Milliseconds (TSC time) before a device wait gives up (`tg.timeout`).
pub static TIMEOUT_MS: Global<u64> = Global::new(30_000);

/// Deadline for one device wait.
pub fn deadline() -> crate::io::Deadline {
    crate::io::Deadline::after_ms(*TIMEOUT_MS.get())
}

/// Errors from the transport or a queue. Printed after `tg: FAIL <what>`.
#[derive(Clone, Copy, Debug)]
pub enum Error {
    /// Bad magic value at the base address.
    Magic(u32),
    /// Version 1 ("legacy") transport: not supported.
    Legacy,
    /// Any version other than 1 or 2.
    Version(u32),
    /// The device does not offer VIRTIO_F_VERSION_1.
    NoVersion1,
    /// The device refused our features (FEATURES_OK did not stick).
    FeaturesRejected,
    /// Reset did not complete.
    ResetTimeout,
    /// The queue is absent (QueueNumMax 0) or already live.
    QueueUnavailable(u16),
    /// A bounded wait ran out.
    Timeout,
    /// The used ring returned an id that is out of range or not in flight.
    BadId(u32),
    /// The used ring returned a length larger than the writable buffers.
    BadLen(u32, u32),
    /// The used index moved further than there are descriptors.
    UsedIdxJump(u16),
    /// Not enough free descriptors for the request.
    QueueFull,
    /// The device set DEVICE_NEEDS_RESET.
    NeedsReset,
    /// A device-specific status byte was not OK.
    Status(u8),
    /// Anything else, with a static explanation.
    Other(&'static str),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match *self {
            Error::Magic(m) => write!(f, "bad-magic 0x{:x}", m),
            Error::Legacy => write!(f, "legacy"),
            Error::Version(v) => write!(f, "bad-version {}", v),
            Error::NoVersion1 => write!(f, "no-VERSION_1"),
            Error::FeaturesRejected => write!(f, "features-rejected"),
            Error::ResetTimeout => write!(f, "reset timeout"),
            Error::QueueUnavailable(q) => write!(f, "queue{} unavailable", q),
            Error::Timeout => write!(f, "timeout"),
            Error::BadId(id) => write!(f, "used-ring bad id {}", id),
            Error::BadLen(len, max) => write!(f, "used-ring bad len {} max {}", len, max),
            Error::UsedIdxJump(n) => write!(f, "used-idx jumped by {}", n),
            Error::QueueFull => write!(f, "queue full"),
            Error::NeedsReset => write!(f, "device needs reset"),
            Error::Status(s) => write!(f, "status {}", s),
            Error::Other(s) => write!(f, "{}", s),
        }
    }
}

/// A virtio-mmio register window.
#[derive(Clone, Copy)]
pub struct Mmio {
    /// Physical base address.
    pub base: u64,
}

impl Mmio {
    /// Reads a transport register.
    pub fn r(&self, off: u64) -> u32 {
        rd32(self.base + off)
    }

    /// Writes a transport register.
    pub fn w(&self, off: u64, v: u32) {
        wr32(self.base + off, v)
    }

    /// Checks magic and version, returns the device id.
    pub fn probe(&self) -> Result<u32, Error> {
        let magic = self.r(reg::MAGIC);
        if magic != MAGIC {
            return Err(Error::Magic(magic));
        }
        match self.r(reg::VERSION) {
            2 => Ok(self.r(reg::DEVICE_ID)),
            1 => Err(Error::Legacy),
            v => Err(Error::Version(v)),
        }
    }

    /// Reads a config-space byte.
    pub fn cfg8(&self, off: u64) -> u8 {
        rd8(self.base + reg::CONFIG + off)
    }

    /// Reads a config-space u32.
    pub fn cfg32(&self, off: u64) -> u32 {
        rd32(self.base + reg::CONFIG + off)
    }

    /// Reads a config-space u64 as two 32-bit reads, retried until the
    /// config generation is stable (the spec's rule for multi-word fields).
    pub fn cfg64(&self, off: u64) -> u64 {
        for _ in 0..1000 {
            let g0 = self.r(reg::CONFIG_GENERATION);
            let lo = self.cfg32(off) as u64;
            let hi = self.cfg32(off + 4) as u64;
            if self.r(reg::CONFIG_GENERATION) == g0 {
                return hi << 32 | lo;
            }
        }
        0
    }

    fn status(&self) -> u32 {
        self.r(reg::STATUS)
    }

    fn set_status(&self, bits: u32) {
        self.w(reg::STATUS, self.status() | bits);
    }

    /// Marks the device FAILED (best effort after an error).
    pub fn set_failed(&self) {
        self.set_status(S_FAILED);
    }

    /// Resets the device and negotiates features: VERSION_1 plus whatever
    /// of `wanted` the device offers. Returns the negotiated set.
    pub fn begin_init(&self, wanted: u64) -> Result<u64, Error> {
        self.w(reg::STATUS, 0);
        let dl = deadline();
        while self.status() != 0 {
            if dl.expired() {
                return Err(Error::ResetTimeout);
            }
            core::hint::spin_loop();
        }
        self.set_status(S_ACKNOWLEDGE);
        self.set_status(S_DRIVER);
        self.w(reg::DEVICE_FEATURES_SEL, 0);
        let lo = self.r(reg::DEVICE_FEATURES) as u64;
        self.w(reg::DEVICE_FEATURES_SEL, 1);
        let hi = self.r(reg::DEVICE_FEATURES) as u64;
        let offered = hi << 32 | lo;
        if offered & F_VERSION_1 == 0 {
            self.set_failed();
            return Err(Error::NoVersion1);
        }
        let accepted = offered & (wanted | F_VERSION_1);
        self.w(reg::DRIVER_FEATURES_SEL, 0);
        self.w(reg::DRIVER_FEATURES, accepted as u32);
        self.w(reg::DRIVER_FEATURES_SEL, 1);
        self.w(reg::DRIVER_FEATURES, (accepted >> 32) as u32);
        self.set_status(S_FEATURES_OK);
        if self.status() & S_FEATURES_OK == 0 {
            self.set_failed();
            return Err(Error::FeaturesRejected);
        }
        Ok(accepted)
    }

    /// Sets DRIVER_OK: the device is live from here on.
    pub fn driver_ok(&self) -> Result<(), Error> {
        self.set_status(S_DRIVER_OK);
        self.check()
    }

    /// Fails if the device reports DEVICE_NEEDS_RESET.
    pub fn check(&self) -> Result<(), Error> {
        if self.status() & S_NEEDS_RESET != 0 {
            return Err(Error::NeedsReset);
        }
        Ok(())
    }
}

/// Ring memory of one split virtqueue of up to `QMAX` entries: descriptor
/// table at +0, available ring at +4 KiB, used ring at +8 KiB.
#[repr(C, align(4096))]
pub struct VqMem([u8; 3 * 4096]);

const DESC_OFF: u64 = 0;
const AVAIL_OFF: u64 = 4096;
const USED_OFF: u64 = 8192;

/// How many virtqueues all devices together may use.
const MAX_QUEUES: usize = 16;

static VQ_MEM: Global<[VqMem; MAX_QUEUES]> = Global::new([const { VqMem([0; 3 * 4096]) }; MAX_QUEUES]);
static VQ_USED: Global<usize> = Global::new(0);

/// Bookkeeping for one in-flight chain, indexed by its head descriptor.
#[derive(Clone, Copy)]
struct Inflight {
    active: bool,
    ndesc: u16,
    writable: u32,
    token: u32,
}

/// One segment of a request: physical address, length, device-writable.
#[derive(Clone, Copy)]
pub struct Seg {
    /// Physical address of the buffer.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Whether the device writes it (VIRTQ_DESC_F_WRITE).
    pub write: bool,
}

/// A split virtqueue driven by polling.
pub struct Virtq {
    mem: u64,
    size: u16,
    qidx: u16,
    notify: u64,
    free: [u16; QMAX],
    nfree: u16,
    next: [u16; QMAX],
    inflight: [Inflight; QMAX],
    avail_idx: u16,
    last_used: u16,
}

impl Virtq {
    /// Sets up queue `qidx` of `mmio` (between FEATURES_OK and DRIVER_OK)
    /// with size min(QueueNumMax, 256) rounded down to a power of two.
    pub fn setup(mmio: &Mmio, qidx: u16) -> Result<Virtq, Error> {
        mmio.w(reg::QUEUE_SEL, qidx as u32);
        let max = mmio.r(reg::QUEUE_NUM_MAX);
        if max == 0 || mmio.r(reg::QUEUE_READY) != 0 {
            return Err(Error::QueueUnavailable(qidx));
        }
        let used = VQ_USED.get();
        if *used >= MAX_QUEUES {
            return Err(Error::Other("out of static queue memory"));
        }
        let mem = &mut VQ_MEM.get()[*used];
        *used += 1;
        mem.0.fill(0);
        let mem = mem as *mut VqMem as u64;
        let mut size = (max as usize).min(QMAX);
        // Split rings index modulo the size with free-running u16 indices,
        // which only works for powers of two.
        size = 1 << (usize::BITS - 1 - size.leading_zeros());
        mmio.w(reg::QUEUE_NUM, size as u32);
        let wr_addr = |off: u64, addr: u64| {
            mmio.w(off, addr as u32);
            mmio.w(off + 4, (addr >> 32) as u32);
        };
        wr_addr(reg::QUEUE_DESC, mem + DESC_OFF);
        wr_addr(reg::QUEUE_DRIVER, mem + AVAIL_OFF);
        wr_addr(reg::QUEUE_DEVICE, mem + USED_OFF);
        // We poll: ask the device not to interrupt us.
        wr16(mem + AVAIL_OFF, AVAIL_F_NO_INTERRUPT);
        mb();
        mmio.w(reg::QUEUE_READY, 1);
        let mut q = Virtq {
            mem,
            size: size as u16,
            qidx,
            notify: mmio.base + reg::QUEUE_NOTIFY,
            free: [0; QMAX],
            nfree: size as u16,
            next: [0; QMAX],
            inflight: [Inflight { active: false, ndesc: 0, writable: 0, token: 0 }; QMAX],
            avail_idx: 0,
            last_used: 0,
        };
        for i in 0..size {
            q.free[i] = (size - 1 - i) as u16;
        }
        Ok(q)
    }

    /// Queue size in descriptors.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Free descriptors.
    pub fn free_descs(&self) -> u16 {
        self.nfree
    }

    /// Queues a descriptor chain (not yet visible to the device: see
    /// `kick`). `token` is handed back by `poll` on completion.
    pub fn add(&mut self, segs: &[Seg], token: u32) -> Result<(), Error> {
        let n = segs.len();
        if n == 0 || n > self.nfree as usize {
            return Err(Error::QueueFull);
        }
        let mut ids = [0u16; 32];
        if n > ids.len() {
            return Err(Error::QueueFull);
        }
        for id in ids.iter_mut().take(n) {
            self.nfree -= 1;
            *id = self.free[self.nfree as usize];
        }
        let mut writable = 0u32;
        for (i, s) in segs.iter().enumerate() {
            let id = ids[i];
            let d = self.mem + DESC_OFF + id as u64 * 16;
            let mut flags = if s.write { DESC_F_WRITE } else { 0 };
            let next = if i + 1 < n {
                flags |= DESC_F_NEXT;
                ids[i + 1]
            } else {
                0
            };
            if s.write {
                writable = writable.saturating_add(s.len);
            }
            wr64(d, s.addr);
            wr32(d + 8, s.len);
            wr16(d + 12, flags);
            wr16(d + 14, next);
            self.next[id as usize] = next;
        }
        let head = ids[0];
        self.inflight[head as usize] = Inflight { active: true, ndesc: n as u16, writable, token };
        let slot = (self.avail_idx % self.size) as u64;
        wr16(self.mem + AVAIL_OFF + 4 + slot * 2, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(())
    }

    /// Publishes everything added so far and notifies the device.
    pub fn kick(&mut self) {
        // Descriptors and ring entries must be visible before the index.
        mb();
        wr16(self.mem + AVAIL_OFF + 2, self.avail_idx);
        // The index must be visible before the device is told to look.
        mb();
        wr32(self.notify, self.qidx as u32);
    }

    /// Takes one completion off the used ring, if any: (token, len).
    /// Validates id and length so a misbehaving device is reported, not
    /// trusted.
    pub fn poll(&mut self) -> Result<Option<(u32, u32)>, Error> {
        let used_idx = rd16(self.mem + USED_OFF + 2);
        if used_idx == self.last_used {
            return Ok(None);
        }
        let pending = used_idx.wrapping_sub(self.last_used);
        if pending > self.size {
            return Err(Error::UsedIdxJump(pending));
        }
        // Read the element only after seeing the index move.
        mb();
        let e = self.mem + USED_OFF + 4 + (self.last_used % self.size) as u64 * 8;
        let id = rd32(e);
        let len = rd32(e + 4);
        if id >= self.size as u32 || !self.inflight[id as usize].active {
            return Err(Error::BadId(id));
        }
        let inf = self.inflight[id as usize];
        // A chain without device-writable parts has nothing to report; some
        // devices put the bytes consumed there, so only check the others.
        if inf.writable > 0 && len > inf.writable {
            return Err(Error::BadLen(len, inf.writable));
        }
        self.last_used = self.last_used.wrapping_add(1);
        self.inflight[id as usize].active = false;
        let mut d = id as u16;
        for _ in 0..inf.ndesc {
            self.free[self.nfree as usize] = d;
            self.nfree += 1;
            d = self.next[d as usize];
        }
        Ok(Some((inf.token, len)))
    }
}
