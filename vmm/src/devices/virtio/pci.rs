//! The virtio-pci transport, modern only (virtio 1.x "Virtio Over PCI Bus"):
//! what firmware (SeaBIOS, OVMF) and every current OS drive. One 32-bit
//! memory BAR holds the common configuration, the ISR, the device's own
//! configuration, the queue notify addresses and the MSI-X table; vendor
//! capabilities tell the driver where each lies.
//!
//! Queue notifies are ioeventfds at the BAR's current address (moved when
//! the guest moves the BAR); interrupts are MSI-X vectors the driver
//! chooses, or INTx while MSI-X is off (the firmware polls).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use virtio_queue::QueueT;

use super::transport::{status, VirtioState};
use super::{ids, Interrupt, IntxLine, PciVectors, VirtioDevice, NO_VECTOR};
use crate::devices::pci::config::{reg as pcireg, BarKind, ConfigError, Identity, PciConfig};
use crate::devices::pci::msix::{self, MsiSender, Msix};
use crate::devices::pci::PciDevice;
use crate::memory::GuestMemory;

/// Layout of BAR 0.
mod bar {
    pub const SIZE: u64 = 0x8000;
    pub const COMMON: u64 = 0x0000;
    pub const COMMON_LEN: u64 = 0x38;
    pub const ISR: u64 = 0x1000;
    pub const DEVICE: u64 = 0x2000;
    pub const DEVICE_LEN: u64 = 0x1000;
    pub const NOTIFY: u64 = 0x3000;
    /// Bytes between two queues' notify addresses.
    pub const NOTIFY_MULTIPLIER: u32 = 4;
    pub const MSIX_TABLE: u64 = 0x4000;
    pub const MSIX_PBA: u64 = 0x6000;
}

/// Vendor capability configuration types.
mod cap {
    pub const VENDOR: u8 = 0x09;
    pub const COMMON_CFG: u8 = 1;
    pub const NOTIFY_CFG: u8 = 2;
    pub const ISR_CFG: u8 = 3;
    pub const DEVICE_CFG: u8 = 4;
}

/// Common configuration register offsets.
mod common {
    #![allow(missing_docs)]
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const MSIX_CONFIG: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
}

/// What a virtio-pci function adds to a migrated device's state: its MSI-X table and the
/// vectors the driver chose (its configuration space travels with the bus's).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PciTransportSnapshot {
    /// The MSI-X table.
    pub msix: msix::MsixSnapshot,
    /// The vector of configuration changes.
    pub config_vector: u16,
    /// Each queue's vector.
    pub queue_vectors: Vec<u16>,
}

/// One virtio device as a PCI function.
pub struct VirtioPci {
    config: PciConfig,
    state: VirtioState,
    msix: Arc<Msix>,
    msix_cap: usize,
    vm: Option<Arc<VmFd>>,
    /// Where the notify ioeventfds are registered now.
    notify_base: Option<u64>,
}

/// The PCI identity of a virtio device of `device_type`.
fn identity(device_type: u32) -> Identity {
    let class = match device_type {
        ids::BLOCK => (0x01, 0x00, 0x00),
        ids::NET => (0x02, 0x00, 0x00),
        super::input::ID_INPUT => (0x09, 0x80, 0x00),
        _ => (0xff, 0x00, 0x00),
    };
    Identity {
        vendor: 0x1af4,
        device: 0x1040 + device_type as u16,
        revision: 1,
        class,
        subsystem_vendor: 0x1af4,
        subsystem: 0x1100,
    }
}

impl VirtioPci {
    /// Wraps `device`. Messages go out through `send`, INTx through `intx`;
    /// `vm` registers the notify ioeventfds (tests pass none).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        send: MsiSender,
        intx: IntxLine,
        vm: Option<Arc<VmFd>>,
    ) -> Result<Self, VirtioPciError> {
        let queues = device.queue_max_sizes().len();
        // One vector per queue and one for configuration changes.
        let msix = Arc::new(Msix::new(queues as u16 + 1, send));
        let mut config = PciConfig::new(identity(device.device_type()), 1);
        config.add_bar(0, bar::SIZE, BarKind::Memory32)?;
        let vendor_cap = |ty: u8, offset: u64, len: u64, extra: &[u8]| {
            let mut body = vec![16 + extra.len() as u8, ty, 0, 0, 0, 0];
            body.extend_from_slice(&(offset as u32).to_le_bytes());
            body.extend_from_slice(&(len as u32).to_le_bytes());
            body.extend_from_slice(extra);
            body
        };
        config.add_capability(
            cap::VENDOR,
            &vendor_cap(cap::COMMON_CFG, bar::COMMON, bar::COMMON_LEN, &[]),
            &[],
        )?;
        config.add_capability(
            cap::VENDOR,
            &vendor_cap(
                cap::NOTIFY_CFG,
                bar::NOTIFY,
                queues as u64 * u64::from(bar::NOTIFY_MULTIPLIER),
                &bar::NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
            &[],
        )?;
        config.add_capability(
            cap::VENDOR,
            &vendor_cap(cap::ISR_CFG, bar::ISR, 1, &[]),
            &[],
        )?;
        config.add_capability(
            cap::VENDOR,
            &vendor_cap(cap::DEVICE_CFG, bar::DEVICE, bar::DEVICE_LEN, &[]),
            &[],
        )?;
        let (body, writable) = msix.capability(0, bar::MSIX_TABLE as u32, bar::MSIX_PBA as u32);
        let msix_cap = config.add_capability(msix::CAP_ID, &body, &writable)?;
        let interrupt = Interrupt::pci(PciVectors::new(msix.clone(), queues, intx));
        let state = VirtioState::new(device, mem, interrupt).map_err(VirtioPciError::Queues)?;
        Ok(VirtioPci {
            config,
            state,
            msix,
            msix_cap,
            vm,
            notify_base: None,
        })
    }

    /// The device itself.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.state.device_mut()
    }

    /// Notes a configuration change and tells the guest.
    pub fn config_changed(&mut self) {
        self.state.config_changed();
    }

    /// Moves the notify ioeventfds to where BAR 0 is now.
    fn place_notifiers(&mut self) {
        let Some(vm) = &self.vm else {
            return;
        };
        let now = self
            .config
            .bar_window(0)
            .map(|(base, _)| base + bar::NOTIFY);
        if now == self.notify_base {
            return;
        }
        let at = |base: u64, i: usize| {
            IoEventAddress::Mmio(base + i as u64 * u64::from(bar::NOTIFY_MULTIPLIER))
        };
        if let Some(old) = self.notify_base.take() {
            for (i, e) in self.state.queue_evts().iter().enumerate() {
                let _ = vm.unregister_ioevent(e, &at(old, i), NoDatamatch);
            }
        }
        if let Some(base) = now {
            for (i, e) in self.state.queue_evts().iter().enumerate() {
                if let Err(err) = vm.register_ioevent(e, &at(base, i), NoDatamatch) {
                    // The BAR handler forwards notifies itself; only slower.
                    tracing::warn!(error = %err, "no ioeventfd for a virtio-pci queue");
                }
            }
            self.notify_base = Some(base);
        }
    }

    /// Stops the device where it stands for a live migration; its state, the PCI parts with it.
    pub fn pause(&mut self) -> Result<super::VirtioSnapshot, String> {
        let mut snap = self.state.pause()?;
        let v = self.vectors();
        snap.pci = Some(PciTransportSnapshot {
            msix: self.msix.snapshot(),
            config_vector: v.config.load(Ordering::SeqCst),
            queue_vectors: v.queues.iter().map(|q| q.load(Ordering::SeqCst)).collect(),
        });
        Ok(snap)
    }

    /// Runs a device stopped where it stood: paused for a migration that failed, or restored
    /// from one once the VM runs here.
    pub fn unpause(&mut self) -> Result<(), String> {
        self.state.unpause()
    }

    /// Takes a migrated device's state, after its configuration space
    /// ([`PciDevice::restore_config`]): the MSI-X table and vectors first, so that the device,
    /// running again, signals where the driver said.
    pub fn restore(&mut self, snap: &super::VirtioSnapshot) -> Result<(), String> {
        let pci = snap
            .pci
            .as_ref()
            .ok_or("the source's device is not on PCI")?;
        let vectors = self.msix.vectors();
        let vector_ok = |v: u16| v < vectors || v == NO_VECTOR;
        if pci.queue_vectors.len() != self.state.num_queues()
            || !vector_ok(pci.config_vector)
            || !pci.queue_vectors.iter().all(|&v| vector_ok(v))
        {
            return Err(format!(
                "MSI-X vectors {:?} and {} do not fit {} queues and {vectors} vectors",
                pci.queue_vectors,
                pci.config_vector,
                self.state.num_queues()
            ));
        }
        self.msix.restore(&pci.msix)?;
        let v = self.vectors();
        v.config.store(pci.config_vector, Ordering::SeqCst);
        for (q, &n) in v.queues.iter().zip(&pci.queue_vectors) {
            q.store(n, Ordering::SeqCst);
        }
        self.state.restore(snap)
    }

    fn vectors(&self) -> &PciVectors {
        self.state
            .interrupt()
            .pci_vectors()
            .expect("a virtio-pci interrupt has PCI vectors")
    }

    fn read_common(&mut self, offset: u64) -> u64 {
        let st = &mut self.state;
        match offset {
            common::DEVICE_FEATURE_SELECT => u64::from(st.device_features_sel),
            common::DEVICE_FEATURE => u64::from(st.device_features_word()),
            common::DRIVER_FEATURE_SELECT => u64::from(st.driver_features_sel),
            common::DRIVER_FEATURE => u64::from(st.driver_features_word()),
            common::MSIX_CONFIG => u64::from(self.vectors().config.load(Ordering::SeqCst)),
            common::NUM_QUEUES => self.state.num_queues() as u64,
            common::DEVICE_STATUS => u64::from(st.status()),
            common::CONFIG_GENERATION => u64::from(st.config_generation() as u8),
            common::QUEUE_SELECT => u64::from(st.queue_sel),
            common::QUEUE_SIZE => st.selected_queue().map_or(0, |q| u64::from(q.size())),
            common::QUEUE_MSIX_VECTOR => {
                let sel = st.queue_sel as usize;
                self.vectors()
                    .queues
                    .get(sel)
                    .map_or(u64::from(NO_VECTOR), |v| {
                        u64::from(v.load(Ordering::SeqCst))
                    })
            }
            common::QUEUE_ENABLE => st.selected_queue().map_or(0, |q| u64::from(q.ready())),
            common::QUEUE_NOTIFY_OFF => u64::from(st.queue_sel),
            common::QUEUE_DESC => st.selected_queue().map_or(0, |q| q.desc_table()),
            common::QUEUE_DRIVER => st.selected_queue().map_or(0, |q| q.avail_ring()),
            common::QUEUE_DEVICE => st.selected_queue().map_or(0, |q| q.used_ring()),
            _ => 0,
        }
    }

    fn write_common(&mut self, offset: u64, v: u64) {
        let allowed = self.state.queue_config_allowed();
        let vectors = self.msix.vectors();
        // A vector beyond the table reads back as NO_VECTOR: the driver sees it refused.
        let vector = |v: u64| {
            let v = v as u16;
            if v < vectors {
                v
            } else {
                NO_VECTOR
            }
        };
        let st = &mut self.state;
        match offset {
            common::DEVICE_FEATURE_SELECT => st.device_features_sel = v as u32,
            common::DRIVER_FEATURE_SELECT => st.driver_features_sel = v as u32,
            common::DRIVER_FEATURE => st.set_driver_features_word(v as u32),
            common::MSIX_CONFIG => self.vectors().config.store(vector(v), Ordering::SeqCst),
            common::DEVICE_STATUS => st.set_status(v as u32),
            common::QUEUE_SELECT => st.queue_sel = v as u32,
            common::QUEUE_SIZE if allowed => {
                if let Some(q) = st.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            common::QUEUE_MSIX_VECTOR => {
                let sel = st.queue_sel as usize;
                if let Some(q) = self.vectors().queues.get(sel) {
                    q.store(vector(v), Ordering::SeqCst);
                }
            }
            common::QUEUE_ENABLE if allowed => {
                if let Some(q) = st.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            common::QUEUE_DESC
            | common::QUEUE_DRIVER
            | common::QUEUE_DEVICE
            | 0x24
            | 0x2c
            | 0x34
                if allowed =>
            {
                if let Some(q) = st.selected_queue() {
                    let (lo, hi) = if offset & 4 == 0 {
                        (Some(v as u32), None)
                    } else {
                        (None, Some(v as u32))
                    };
                    match offset & !7 {
                        common::QUEUE_DESC => q.set_desc_table_address(lo, hi),
                        common::QUEUE_DRIVER => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => {}
        }
    }
}

/// Width of the common configuration field at `offset`, if one starts there.
fn common_width(offset: u64) -> Option<usize> {
    Some(match offset {
        0x00..=0x0c if offset % 4 == 0 => 4,
        0x10 | 0x12 | 0x16 | 0x18 | 0x1a | 0x1c | 0x1e => 2,
        0x14 | 0x15 => 1,
        0x20..=0x34 if offset % 4 == 0 => 4,
        _ => return None,
    })
}

impl PciDevice for VirtioPci {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        let control = self.msix_cap + 2;
        if offset <= control + 1 && offset + data.len() > control {
            self.msix.set_control(self.config.u16(control));
        }
        if (pcireg::COMMAND..pcireg::COMMAND + 2).contains(&offset)
            || (pcireg::BAR0..pcireg::BAR0 + 4).contains(&offset)
        {
            self.place_notifiers();
        }
    }

    fn read_bar(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            bar::COMMON..0x1000 => {
                if common_width(offset) == Some(data.len()) {
                    let v = self.read_common(offset);
                    let n = data.len();
                    data.copy_from_slice(&v.to_le_bytes()[..n]);
                }
            }
            bar::ISR => data[0] = self.state.interrupt().take_isr() as u8,
            bar::DEVICE..0x3000 => self.state.device().read_config(offset - bar::DEVICE, data),
            bar::MSIX_TABLE..bar::MSIX_PBA => self.msix.read_table(offset - bar::MSIX_TABLE, data),
            bar::MSIX_PBA..bar::SIZE => self.msix.read_pba(offset - bar::MSIX_PBA, data),
            _ => {}
        }
    }

    fn write_bar(&mut self, _bar: usize, offset: u64, data: &[u8]) {
        match offset {
            bar::COMMON..0x1000 => {
                if common_width(offset) == Some(data.len()) {
                    let mut b = [0u8; 8];
                    b[..data.len()].copy_from_slice(data);
                    self.write_common(offset, u64::from_le_bytes(b));
                }
            }
            bar::DEVICE..0x3000 => {
                if self.state.status() & status::DRIVER != 0 {
                    self.state
                        .device_mut()
                        .write_config(offset - bar::DEVICE, data);
                }
            }
            bar::NOTIFY..bar::MSIX_TABLE => {
                // Reached only when KVM did not take the ioeventfd.
                let q = (offset - bar::NOTIFY) / u64::from(bar::NOTIFY_MULTIPLIER);
                self.state.notify(q as u32);
            }
            bar::MSIX_TABLE..bar::MSIX_PBA => self.msix.write_table(offset - bar::MSIX_TABLE, data),
            _ => {}
        }
    }

    fn restore_config(&mut self, regs: &[u8]) -> Result<(), String> {
        self.config.restore(regs)?;
        self.msix.set_control(self.config.u16(self.msix_cap + 2));
        self.place_notifiers();
        Ok(())
    }
}

/// Errors building a virtio-pci function.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// Its configuration space.
    #[error("virtio-pci configuration space: {0}")]
    Config(#[from] ConfigError),
    /// Its queues' notifiers.
    #[error("virtio-pci queues: {0}")]
    Queues(std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::lock;
    use crate::devices::virtio::features;
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::sync::Mutex;
    use virtio_queue::Queue;
    use vmm_sys_util::eventfd::EventFd;

    struct Dummy {
        activations: Arc<AtomicUsize>,
        interrupt: Arc<Mutex<Option<Arc<Interrupt>>>>,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            ids::BLOCK
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn features(&self) -> u64 {
            features::VERSION_1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&[9, 8, 7, 6], offset, data);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            _mem: GuestMemory,
            _features: u64,
            _queues: Vec<Queue>,
            _evts: Vec<EventFd>,
            i: Arc<Interrupt>,
        ) -> Result<(), String> {
            self.activations.fetch_add(1, Ordering::SeqCst);
            *lock(&self.interrupt) = Some(i);
            Ok(())
        }
        fn reset(&mut self) {}
        fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
            self
        }
    }

    fn w(t: &mut VirtioPci, off: u64, v: u64, n: usize) {
        t.write_bar(0, off, &v.to_le_bytes()[..n]);
    }

    fn r(t: &mut VirtioPci, off: u64, n: usize) -> u64 {
        let mut b = [0u8; 8];
        t.read_bar(0, off, &mut b[..n]);
        u64::from_le_bytes(b)
    }

    #[test]
    fn a_driver_brings_the_device_up_and_gets_msix_or_intx() {
        let (mem, _f) = crate::memory::create(16).unwrap();
        let act = Arc::new(AtomicUsize::new(0));
        let irq = Arc::new(Mutex::new(None));
        let sent = Arc::new(Mutex::new(vec![]));
        let line = Arc::new(AtomicBool::new(false));
        let (s, l) = (sent.clone(), line.clone());
        let mut t = VirtioPci::new(
            Box::new(Dummy {
                activations: act.clone(),
                interrupt: irq.clone(),
            }),
            mem,
            Box::new(move |a, d| lock(&s).push((a, d))),
            Box::new(move |up| l.store(up, Ordering::SeqCst)),
            None,
        )
        .unwrap();
        // Identity and capabilities, as a driver walks them.
        let mut id = [0u8; 4];
        t.config().read(0, &mut id);
        assert_eq!(id, [0xf4, 0x1a, 0x42, 0x10]);
        let mut types = vec![];
        let mut p = t.config().u16(pcireg::CAPABILITIES) as usize & 0xff;
        while p != 0 {
            let mut c = [0u8; 4];
            t.config().read(p, &mut c);
            types.push((c[0], c[3]));
            p = c[1] as usize;
        }
        assert_eq!(types, vec![(9, 1), (9, 2), (9, 3), (9, 4), (0x11, 0)]);

        assert_eq!(r(&mut t, common::NUM_QUEUES, 2), 1);
        w(&mut t, common::DEVICE_STATUS, 3, 1);
        w(&mut t, common::DRIVER_FEATURE_SELECT, 1, 4);
        w(&mut t, common::DRIVER_FEATURE, 1, 4);
        w(&mut t, common::DEVICE_STATUS, 0xb, 1);
        assert_eq!(r(&mut t, common::DEVICE_STATUS, 1), 0xb);
        w(&mut t, common::QUEUE_SELECT, 0, 2);
        assert_eq!(r(&mut t, common::QUEUE_SIZE, 2), 16);
        w(&mut t, common::QUEUE_DESC, 0x10000, 4);
        w(&mut t, common::QUEUE_DRIVER, 0x11000, 4);
        w(&mut t, common::QUEUE_DEVICE, 0x12000, 4);
        w(&mut t, common::QUEUE_DEVICE + 4, 0, 4);
        assert_eq!(r(&mut t, common::QUEUE_DRIVER, 4), 0x11000);
        w(&mut t, common::QUEUE_MSIX_VECTOR, 1, 2);
        assert_eq!(r(&mut t, common::QUEUE_MSIX_VECTOR, 2), 1);
        w(&mut t, common::QUEUE_MSIX_VECTOR, 7, 2);
        assert_eq!(
            r(&mut t, common::QUEUE_MSIX_VECTOR, 2),
            u64::from(NO_VECTOR)
        );
        w(&mut t, common::QUEUE_MSIX_VECTOR, 1, 2);
        w(&mut t, common::QUEUE_ENABLE, 1, 2);
        w(&mut t, common::DEVICE_STATUS, 0xf, 1);
        assert_eq!(act.load(Ordering::SeqCst), 1);
        assert_eq!(r(&mut t, bar::DEVICE + 1, 2), 0x0708);
        // Odd widths in the common area are ignored.
        w(&mut t, common::QUEUE_SELECT, 5, 4);
        assert_eq!(r(&mut t, common::QUEUE_SELECT, 2), 0);

        // MSI-X off: INTx, lowered by reading the ISR.
        let i = lock(&irq).clone().unwrap();
        i.signal_used(0);
        assert!(line.load(Ordering::SeqCst));
        assert_eq!(r(&mut t, bar::ISR, 1), 1);
        assert!(!line.load(Ordering::SeqCst));
        assert_eq!(r(&mut t, bar::ISR, 1), 0);
        // MSI-X on, vector 1 unmasked: the queue's message goes out.
        let control = t.msix_cap + 2;
        t.write_config(control, &0x8000u16.to_le_bytes());
        w(&mut t, bar::MSIX_TABLE + 16, 0xfee0_0000, 4);
        w(&mut t, bar::MSIX_TABLE + 24, 0x31, 4);
        w(&mut t, bar::MSIX_TABLE + 28, 0, 4);
        i.signal_used(0);
        assert_eq!(*lock(&sent), vec![(0xfee0_0000, 0x31)]);
        assert!(!line.load(Ordering::SeqCst));
        // No vector for configuration changes: nothing is sent.
        i.signal_config();
        assert_eq!(lock(&sent).len(), 1);
    }
}
