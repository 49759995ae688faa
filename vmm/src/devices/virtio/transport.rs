//! What both virtio transports (MMIO and PCI) keep of a device: its queues
//! and their notifiers, feature negotiation and the device status, as the
//! driver moves it. Only the register layout differs between transports.
//!
//! Device status, as the driver moves it:
//!
//! ```text
//!   0 --ACK--> ACKNOWLEDGE --DRIVER--> DRIVER --FEATURES_OK--> FEATURES_OK
//!                                                                 |
//!        any state --write 0--> reset                        DRIVER_OK: activate
//!        activation refused --> DEVICE_NEEDS_RESET (+ config interrupt)
//! ```

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{features, Interrupt, RingPosition, VirtioDevice};
use crate::memory::GuestMemory;

/// Device status bits.
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Bytes of a device's configuration space a migration compares: the target's device must
/// show the guest what the source's did (a disk's capacity, a NIC's address).
const CONFIG_COMPARED: usize = 64;

/// One queue as the driver set it up, and where the device stood in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// The size the device offers.
    pub max_size: u16,
    /// The size the driver chose.
    pub size: u16,
    /// The driver finished setting it up.
    pub ready: bool,
    /// Guest-physical address of the descriptor table.
    pub desc_table: u64,
    /// Of the available ring.
    pub avail_ring: u64,
    /// Of the used ring.
    pub used_ring: u64,
    /// Where the device stood.
    pub position: RingPosition,
    /// Notification suppression by event index.
    pub event_idx: bool,
}

/// A virtio device's state as a live migration carries it: the transport's registers and each
/// queue. The device's own state is its configuration space (compared, not carried: the
/// target's device is the same disk or NIC) and where it stands in its rings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioSnapshot {
    /// The device type, checked by the target.
    pub device_type: u32,
    /// The first bytes of its configuration space.
    pub config: Vec<u8>,
    /// The device status register.
    pub status: u32,
    /// The features the driver took.
    pub driver_features: u64,
    /// The driver's selectors.
    pub queue_sel: u32,
    /// Which word of the device's features the driver reads.
    pub device_features_sel: u32,
    /// Which word of its own features the driver writes.
    pub driver_features_sel: u32,
    /// The configuration generation counter.
    pub config_generation: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// Each queue.
    pub queues: Vec<QueueSnapshot>,
    /// What a virtio-pci transport adds (none for virtio-mmio).
    #[serde(default)]
    pub pci: Option<super::pci::PciTransportSnapshot>,
}

/// A device and the transport-independent state around it.
pub struct VirtioState {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    /// The queue the driver selected.
    pub queue_sel: u32,
    /// Which 32 bits of the device's features the driver reads.
    pub device_features_sel: u32,
    /// Which 32 bits of its own features the driver writes.
    pub driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
}

impl VirtioState {
    /// Wraps `device`, interrupting the guest through `interrupt`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
    ) -> std::io::Result<Self> {
        let mut queues = Vec::new();
        let mut queue_evts = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(
                Queue::new(max)
                    .map_err(|e| std::io::Error::other(format!("queue size {max}: {e:?}")))?,
            );
            queue_evts.push(EventFd::new(libc::EFD_NONBLOCK)?);
        }
        Ok(VirtioState {
            device,
            mem,
            interrupt,
            queues,
            queue_evts,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
        })
    }

    /// The eventfd of each queue, to register as ioeventfds on its notify address.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device's interrupt.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The device itself.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device itself, mutably.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The configuration generation counter.
    pub fn config_generation(&self) -> u32 {
        self.config_generation
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Notes a configuration change and tells the guest.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & status::DRIVER_OK != 0 {
            self.interrupt.signal_config();
        }
    }

    /// The queue the driver selected, if it exists.
    pub fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK.
    pub fn queue_config_allowed(&self) -> bool {
        self.status & (status::FEATURES_OK | status::DRIVER_OK | status::FAILED)
            == status::FEATURES_OK
    }

    /// The 32 bits of the device's features the driver selected.
    pub fn device_features_word(&self) -> u32 {
        match self.device_features_sel {
            0 => self.device.features() as u32,
            1 => (self.device.features() >> 32) as u32,
            _ => 0,
        }
    }

    /// The 32 bits of the driver's features it selected.
    pub fn driver_features_word(&self) -> u32 {
        match self.driver_features_sel {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        }
    }

    /// The driver writes the selected 32 bits of its features; ignored
    /// outside feature negotiation.
    pub fn set_driver_features_word(&mut self, v: u32) {
        if self.status & (status::DRIVER | status::FEATURES_OK) != status::DRIVER {
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
            _ => {}
        }
    }

    /// Notifies queue `index` (when KVM did not take the ioeventfd).
    pub fn notify(&self, index: u32) {
        if let Some(e) = self.queue_evts.get(index as usize) {
            let _ = e.write(1);
        }
    }

    /// Back to the state after power-on.
    pub fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt.ack(u32::MAX);
    }

    /// The driver writes the status register.
    pub fn set_status(&mut self, new: u32) {
        if new == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // Bits are only ever added, one step at a time (spec 3.1.1).
        if new & old != old {
            return;
        }
        let added = new & !old;
        if added & status::FEATURES_OK != 0 {
            let offered = self.device.features();
            if self.driver_features & !offered != 0
                || self.driver_features & features::VERSION_1 == 0
            {
                // Leave FEATURES_OK clear: the driver sees negotiation failed.
                self.status = new & !status::FEATURES_OK;
                return;
            }
        }
        if added & status::DRIVER_OK != 0 {
            if new & status::FEATURES_OK == 0 {
                return;
            }
            if let Err(e) = self.activate() {
                tracing::warn!(device = self.device.device_type(), error = %e, "virtio activation refused");
                self.status = new | status::DEVICE_NEEDS_RESET;
                self.config_changed();
                return;
            }
        }
        self.status = new;
    }

    /// Whether the device runs: the driver finished and activation succeeded.
    fn running(&self) -> bool {
        self.status & (status::DRIVER_OK | status::DEVICE_NEEDS_RESET) == status::DRIVER_OK
    }

    fn config_bytes(&self) -> Vec<u8> {
        let mut c = vec![0u8; CONFIG_COMPARED];
        self.device.read_config(0, &mut c);
        c
    }

    /// Stops the device where it stands for a live migration (nothing in flight on return,
    /// no more writes to guest memory) and says what a target needs to take it over.
    pub fn pause(&mut self) -> Result<VirtioSnapshot, String> {
        if self.running() {
            let at = self.device.pause(&self.mem)?;
            if at.len() != self.queues.len() {
                return Err(format!(
                    "the device stood in {} rings of {}",
                    at.len(),
                    self.queues.len()
                ));
            }
            for (q, p) in self.queues.iter_mut().zip(at) {
                q.set_next_avail(p.next_avail);
                q.set_next_used(p.next_used);
            }
        }
        Ok(VirtioSnapshot {
            device_type: self.device.device_type(),
            config: self.config_bytes(),
            status: self.status,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues: self
                .queues
                .iter()
                .map(|q| QueueSnapshot {
                    max_size: q.max_size(),
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                    position: RingPosition::of(q),
                    event_idx: q.event_idx_enabled(),
                })
                .collect(),
            pci: None,
        })
    }

    /// Runs a device stopped where it stood, from there: one [`VirtioState::pause`] stopped
    /// (the migration failed and the VM goes on here), or one [`VirtioState::restore`] set up
    /// (the migrated VM runs here now). A device that cannot run says so to its driver
    /// (DEVICE_NEEDS_RESET), which resets it.
    pub fn unpause(&mut self) -> Result<(), String> {
        if !self.running() {
            return Ok(());
        }
        self.activate().inspect_err(|_| {
            self.status |= status::DEVICE_NEEDS_RESET;
            self.config_changed();
        })
    }

    /// Takes a migrated device's state, on a device no guest has touched; it runs once
    /// [`VirtioState::unpause`] starts it, when the VM runs here (before that it takes nothing
    /// off its rings: nothing reaches a disk or the network while the source may still run the
    /// VM). Everything in `snap` came over the wire: checked, never trusted (a queue outside
    /// guest memory, features this device does not offer, a different device).
    pub fn restore(&mut self, snap: &VirtioSnapshot) -> Result<(), String> {
        if self.status != 0 {
            return Err("the device was already in use here".into());
        }
        self.device.connect()?;
        let ty = self.device.device_type();
        if snap.device_type != ty {
            return Err(format!(
                "the source's device is of type {}, this one of type {ty}",
                snap.device_type
            ));
        }
        self.device.restore_config(&snap.config);
        if snap.config != self.config_bytes() {
            return Err(
                "the device here differs from the source's (its configuration space: a disk of another size, or a NIC with another address)"
                    .into(),
            );
        }
        if snap.driver_features & !self.device.features() != 0 {
            return Err(format!(
                "the driver took features {:#x} this device does not offer",
                snap.driver_features & !self.device.features()
            ));
        }
        if snap.queues.len() != self.queues.len() {
            return Err(format!(
                "{} queues at the source, {} here",
                snap.queues.len(),
                self.queues.len()
            ));
        }
        let mut queues = Vec::new();
        for (i, (q, mine)) in snap.queues.iter().zip(&self.queues).enumerate() {
            if q.max_size != mine.max_size() {
                return Err(format!(
                    "queue {i} holds {} descriptors at the source, {} here",
                    q.max_size,
                    mine.max_size()
                ));
            }
            let mut restored = Queue::new(q.max_size).map_err(|e| format!("queue {i}: {e:?}"))?;
            if !q.ready {
                // What the driver wrote so far, checked as its register writes are.
                let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
                restored.set_size(q.size);
                let (lo, hi) = split(q.desc_table);
                restored.set_desc_table_address(lo, hi);
                let (lo, hi) = split(q.avail_ring);
                restored.set_avail_ring_address(lo, hi);
                let (lo, hi) = split(q.used_ring);
                restored.set_used_ring_address(lo, hi);
            } else {
                restored = Queue::try_from(QueueState {
                    max_size: q.max_size,
                    next_avail: q.position.next_avail,
                    next_used: q.position.next_used,
                    event_idx_enabled: q.event_idx,
                    size: q.size,
                    ready: q.ready,
                    desc_table: q.desc_table,
                    avail_ring: q.avail_ring,
                    used_ring: q.used_ring,
                })
                .map_err(|e| format!("queue {i}: {e:?}"))?;
            }
            if restored.ready() && !restored.is_valid(&self.mem) {
                return Err(format!(
                    "queue {i} lies outside guest memory or is misaligned"
                ));
            }
            queues.push(restored);
        }
        self.queues = queues;
        self.queue_sel = snap.queue_sel;
        self.device_features_sel = snap.device_features_sel;
        self.driver_features_sel = snap.driver_features_sel;
        self.driver_features = snap.driver_features;
        self.config_generation = snap.config_generation;
        self.status = snap.status;
        self.interrupt.restore(snap.interrupt_status);
        Ok(())
    }

    fn activate(&mut self) -> Result<(), String> {
        let event_idx = self.driver_features & features::RING_EVENT_IDX != 0;
        let mut queues = Vec::new();
        let mut evts = Vec::new();
        for (i, q) in self.queues.iter_mut().enumerate() {
            if !q.ready() {
                continue;
            }
            if !q.is_valid(&self.mem) {
                return Err(format!(
                    "queue {i} lies outside guest memory or is misaligned"
                ));
            }
            q.set_event_idx(event_idx);
            let q = Queue::try_from(q.state()).map_err(|e| format!("queue {i}: {e:?}"))?;
            queues.push(q);
            evts.push(self.queue_evts[i].try_clone().map_err(|e| e.to_string())?);
        }
        if queues.len() != self.queues.len() {
            return Err(format!(
                "only {} of {} queues are ready",
                queues.len(),
                self.queues.len()
            ));
        }
        self.device.activate(
            self.mem.clone(),
            self.driver_features,
            queues,
            evts,
            self.interrupt.clone(),
        )
    }
}
