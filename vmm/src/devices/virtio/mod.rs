//! Virtio devices and their MMIO transport.
//!
//! A device runs its queues on a worker thread of its own, woken by the
//! ioeventfd KVM signals when the guest writes QueueNotify, and raises its
//! interrupt through an irqfd, so the vCPU does not leave KVM for either.

pub mod block;
pub mod mmio;
pub mod net;
pub mod vhost_user_blk;
pub mod worker;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemory;

/// Device IDs from the virtio specification.
pub mod ids {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
}

/// Feature bits common to all devices.
pub mod features {
    /// Indirect descriptors.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// used_event / avail_event notification suppression.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// Virtio 1.x (modern) device.
    pub const VERSION_1: u64 = 1 << 32;
}

/// InterruptStatus bit: a used buffer was added.
pub const INT_VRING: u32 = 0x1;
/// InterruptStatus bit: the configuration changed.
pub const INT_CONFIG: u32 = 0x2;

/// The interrupt of one device: the status register the guest reads and
/// acknowledges, and the irqfd that raises the line.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    /// An interrupt signalled through `irqfd`.
    pub fn new(irqfd: EventFd) -> Arc<Self> {
        Arc::new(Interrupt {
            status: AtomicU32::new(0),
            irqfd,
        })
    }

    /// Tells the guest that used buffers are waiting.
    pub fn signal_used(&self) {
        self.signal(INT_VRING);
    }

    /// Tells the guest the configuration space changed.
    pub fn signal_config(&self) {
        self.signal(INT_CONFIG);
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!(error = %e, "cannot raise virtio interrupt");
        }
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The guest acknowledges `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// What a virtio device implements; the transport does the rest.
pub trait VirtioDevice: Send {
    /// Virtio device ID.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the number of queues is its length.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered.
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the negotiated features and ready queues.
    fn activate(
        &mut self,
        mem: GuestMemory,
        features: u64,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), String>;
    /// Stops the device after a reset; its worker must be gone on return.
    fn reset(&mut self);
    /// For device-specific control (media change).
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

/// Copies `src` (a config structure's bytes) at `offset` into `data`; bytes
/// beyond the structure read as zero.
pub fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(off) = usize::try_from(offset) else {
        return;
    };
    if let Some(avail) = src.get(off..) {
        let n = avail.len().min(data.len());
        data[..n].copy_from_slice(&avail[..n]);
    }
}
