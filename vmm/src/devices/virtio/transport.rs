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

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{features, Interrupt, VirtioDevice};
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
