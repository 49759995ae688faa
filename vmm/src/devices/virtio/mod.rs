//! Virtio devices and their transports (MMIO for direct kernel boot, PCI
//! for firmware boot).
//!
//! A device runs its queues on a worker thread of its own, woken by the
//! ioeventfd KVM signals when the guest writes QueueNotify, and raises its
//! interrupt through an irqfd, so the vCPU does not leave KVM for either.

pub mod block;
pub mod input;
pub mod mmio;
pub mod net;
pub mod pci;
pub mod transport;
pub mod vhost_user_blk;
pub mod worker;

use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;

pub use transport::VirtioSnapshot;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::pci::msix::Msix;
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

/// MSI-X vector number that means "no vector".
pub const NO_VECTOR: u16 = 0xffff;

/// Drives a PCI function's INTx line (level: true asserts).
pub type IntxLine = Box<dyn Fn(bool) + Send + Sync>;

/// How a virtio-pci function reaches the guest: MSI-X vectors chosen per
/// queue and for configuration changes by the driver, else its INTx line.
pub struct PciVectors {
    /// The function's MSI-X table.
    pub msix: Arc<Msix>,
    /// Vector of configuration changes.
    pub config: AtomicU16,
    /// Vector of each queue.
    pub queues: Vec<AtomicU16>,
    /// The INTx line, used while MSI-X is off.
    pub intx: IntxLine,
}

impl PciVectors {
    /// `queues` queues, no vectors chosen yet.
    pub fn new(msix: Arc<Msix>, queues: usize, intx: IntxLine) -> Self {
        PciVectors {
            msix,
            config: AtomicU16::new(NO_VECTOR),
            queues: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            intx,
        }
    }
}

enum Line {
    /// An edge-triggered line raised through an irqfd (virtio-mmio).
    Irqfd(EventFd),
    /// MSI-X or INTx (virtio-pci).
    Pci(PciVectors),
}

/// The interrupt of one device: the status register the guest reads and
/// acknowledges, and how the guest is told.
pub struct Interrupt {
    status: AtomicU32,
    line: Line,
}

impl Interrupt {
    /// An interrupt signalled through `irqfd`.
    pub fn new(irqfd: EventFd) -> Arc<Self> {
        Arc::new(Interrupt {
            status: AtomicU32::new(0),
            line: Line::Irqfd(irqfd),
        })
    }

    /// The interrupt of a virtio-pci function.
    pub fn pci(vectors: PciVectors) -> Arc<Self> {
        Arc::new(Interrupt {
            status: AtomicU32::new(0),
            line: Line::Pci(vectors),
        })
    }

    /// The PCI vectors, for the transport's registers.
    pub fn pci_vectors(&self) -> Option<&PciVectors> {
        match &self.line {
            Line::Pci(v) => Some(v),
            Line::Irqfd(_) => None,
        }
    }

    /// Tells the guest that used buffers are waiting on `queue`.
    pub fn signal_used(&self, queue: usize) {
        self.signal(INT_VRING, Some(queue));
    }

    /// Tells the guest the configuration space changed.
    pub fn signal_config(&self) {
        self.signal(INT_CONFIG, None);
    }

    fn signal(&self, bit: u32, queue: Option<usize>) {
        match &self.line {
            Line::Irqfd(fd) => {
                self.status.fetch_or(bit, Ordering::SeqCst);
                if let Err(e) = fd.write(1) {
                    tracing::warn!(error = %e, "cannot raise virtio interrupt");
                }
            }
            Line::Pci(v) => {
                let vector = match queue {
                    Some(q) => v
                        .queues
                        .get(q)
                        .map_or(NO_VECTOR, |a| a.load(Ordering::SeqCst)),
                    None => v.config.load(Ordering::SeqCst),
                };
                // With MSI-X on, the vector (none: NO_VECTOR, nothing sent); else INTx.
                if !v.msix.signal(vector) {
                    self.status.fetch_or(bit, Ordering::SeqCst);
                    (v.intx)(true);
                }
            }
        }
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Takes a migrated device's InterruptStatus; set bits are raised again (a guest that had
    /// not handled them yet is told once more; one with nothing to do ignores it).
    pub fn restore(&self, status: u32) {
        self.status.store(status, Ordering::SeqCst);
        if status != 0 {
            match &self.line {
                Line::Irqfd(fd) => {
                    if let Err(e) = fd.write(1) {
                        tracing::warn!(error = %e, "cannot raise virtio interrupt");
                    }
                }
                // INTx is a level: still asserted until the guest reads the ISR.
                Line::Pci(v) if !v.msix.enabled() => (v.intx)(true),
                Line::Pci(_) => {}
            }
        }
    }

    /// The guest acknowledges `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The virtio-pci ISR register: reading it acknowledges every bit and
    /// lowers INTx.
    pub fn take_isr(&self) -> u32 {
        let v = self.status.swap(0, Ordering::SeqCst);
        if let Line::Pci(p) = &self.line {
            (p.intx)(false);
        }
        v
    }
}

/// Where a device stands in one ring: the next descriptor chain it takes off the available ring
/// and the next entry it writes in the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RingPosition {
    /// Next available index.
    pub next_avail: u16,
    /// Next used index.
    pub next_used: u16,
}

impl RingPosition {
    /// Where a worker's `queue` stands.
    pub fn of(queue: &Queue) -> RingPosition {
        use virtio_queue::QueueT;
        RingPosition {
            next_avail: queue.next_avail(),
            next_used: queue.next_used(),
        }
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
    /// Stops the running device where it stands, for a live migration: on return nothing is
    /// in flight and it writes guest memory no more. Where it stands in each ring: the next
    /// available and the next used index. `activate` with queues at those places starts it
    /// again. A device that cannot be migrated refuses, saying why.
    fn pause(&mut self, _mem: &GuestMemory) -> Result<Vec<RingPosition>, String> {
        Err(format!(
            "a virtio device of type {} cannot be migrated",
            self.device_type()
        ))
    }
    /// Takes what a guest wrote into a migrated device's configuration space (`source`: its
    /// first bytes as the source's device read them), so that it reads as it did there; most
    /// devices' configuration is the device's own, with nothing to take.
    fn restore_config(&mut self, _source: &[u8]) {}
    /// Reaches what the device needs outside this process (a vhost-user backend) before it
    /// takes a migrated state, so that its features and configuration are known.
    fn connect(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// For device-specific control (media change).
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

/// A transport around a device: what the VM does with either kind.
pub trait VirtioTransport: Send {
    /// The device itself.
    fn device_mut(&mut self) -> &mut dyn VirtioDevice;
    /// Notes a configuration change and tells the guest.
    fn config_changed(&mut self);
    /// Stops the device where it stands for a live migration; its state and the transport's
    /// ([`transport::VirtioState::pause`]).
    fn pause(&mut self) -> Result<VirtioSnapshot, String>;
    /// Runs a device stopped where it stood: paused for a migration that failed, or restored
    /// from one once the VM runs here.
    fn unpause(&mut self) -> Result<(), String>;
    /// Takes a migrated device's state, on a device no guest has touched; it runs on
    /// [`VirtioTransport::unpause`].
    fn restore(&mut self, snap: &VirtioSnapshot) -> Result<(), String>;
}

impl VirtioTransport for mmio::MmioTransport {
    fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        mmio::MmioTransport::device_mut(self)
    }
    fn config_changed(&mut self) {
        mmio::MmioTransport::config_changed(self)
    }
    fn pause(&mut self) -> Result<VirtioSnapshot, String> {
        self.state_mut().pause()
    }
    fn unpause(&mut self) -> Result<(), String> {
        self.state_mut().unpause()
    }
    fn restore(&mut self, snap: &VirtioSnapshot) -> Result<(), String> {
        self.state_mut().restore(snap)
    }
}

impl VirtioTransport for pci::VirtioPci {
    fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        pci::VirtioPci::device_mut(self)
    }
    fn config_changed(&mut self) {
        pci::VirtioPci::config_changed(self)
    }
    fn pause(&mut self) -> Result<VirtioSnapshot, String> {
        pci::VirtioPci::pause(self)
    }
    fn unpause(&mut self) -> Result<(), String> {
        pci::VirtioPci::unpause(self)
    }
    fn restore(&mut self, snap: &VirtioSnapshot) -> Result<(), String> {
        pci::VirtioPci::restore(self, snap)
    }
}

/// Whether `queue`'s ring is malformed so that nothing can be taken off it though it never
/// looks empty (its available index runs more than a ring ahead of the requests taken): after
/// `enable_notification` said more requests are there, a worker that sees this stops rather
/// than spin, and the guest's next kick tries again.
pub fn ring_broken(queue: &mut virtio_queue::Queue, mem: &crate::memory::GuestMemory) -> bool {
    use virtio_queue::QueueOwnedT;
    let broken = queue.iter(mem).is_err();
    if broken {
        tracing::debug!("a virtio ring's available index runs more than a ring ahead: left alone");
    }
    broken
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
