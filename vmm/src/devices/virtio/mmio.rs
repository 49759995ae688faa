//! The virtio-mmio transport, version 2 (virtio 1.x "MMIO Device Register
//! Layout"). Every register access comes from the guest and is checked:
//! out-of-range queue selectors, odd widths and writes in the wrong device
//! state are ignored, never trusted. The device status machine is in
//! [`super::transport`].

use std::sync::Arc;

use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

pub use super::transport::status;
use super::transport::VirtioState;
use super::{Interrupt, VirtioDevice};
use crate::bus::BusDevice;
use crate::memory::GuestMemory;

const MAGIC: u32 = 0x7472_6976;
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4e45_5053; // "SPEN"

/// Register offsets.
pub mod reg {
    #![allow(missing_docs)]
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// One virtio device behind its MMIO register window.
pub struct MmioTransport {
    state: VirtioState,
}

impl MmioTransport {
    /// Wraps `device`, signalling through `irqfd`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        irqfd: EventFd,
    ) -> std::io::Result<Self> {
        Ok(MmioTransport {
            state: VirtioState::new(device, mem, Interrupt::new(irqfd))?,
        })
    }

    /// The eventfd of each queue, to register as ioeventfds on QueueNotify.
    pub fn queue_evts(&self) -> &[EventFd] {
        self.state.queue_evts()
    }

    /// The device's interrupt, for configuration-change notices.
    pub fn interrupt(&self) -> Arc<Interrupt> {
        self.state.interrupt().clone()
    }

    /// The device itself.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.state.device_mut()
    }

    /// Notes a configuration change and tells the guest.
    pub fn config_changed(&mut self) {
        self.state.config_changed();
    }

    /// The transport's state, for a live migration.
    pub fn state_mut(&mut self) -> &mut VirtioState {
        &mut self.state
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let st = &mut self.state;
        if offset >= reg::CONFIG {
            st.device().read_config(offset - reg::CONFIG, data);
            return;
        }
        data.fill(0);
        if data.len() != 4 {
            return;
        }
        let v: u32 = match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => st.device().device_type(),
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => st.device_features_word(),
            reg::QUEUE_NUM_MAX => st.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => st.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => st.interrupt().status(),
            reg::STATUS => st.status(),
            reg::CONFIG_GENERATION => st.config_generation(),
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let st = &mut self.state;
        if offset >= reg::CONFIG {
            if st.status() & status::DRIVER != 0 {
                st.device_mut().write_config(offset - reg::CONFIG, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let v = u32::from_le_bytes(bytes);
        let allowed = st.queue_config_allowed();
        match offset {
            reg::DEVICE_FEATURES_SEL => st.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => st.driver_features_sel = v,
            reg::DRIVER_FEATURES => st.set_driver_features_word(v),
            reg::QUEUE_SEL => st.queue_sel = v,
            reg::QUEUE_NUM if allowed => {
                if let Some(q) = st.selected_queue() {
                    // A size the queue refuses leaves it unusable: is_valid fails later.
                    q.set_size(v.min(u32::from(u16::MAX)) as u16);
                }
            }
            reg::QUEUE_READY if allowed => {
                if let Some(q) = st.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_AVAIL_LOW
            | reg::QUEUE_AVAIL_HIGH
            | reg::QUEUE_USED_LOW
            | reg::QUEUE_USED_HIGH
                if allowed =>
            {
                if let Some(q) = st.selected_queue() {
                    let (lo, hi) = if offset & 4 == 0 {
                        (Some(v), None)
                    } else {
                        (None, Some(v))
                    };
                    match offset & !4 {
                        reg::QUEUE_DESC_LOW => q.set_desc_table_address(lo, hi),
                        reg::QUEUE_AVAIL_LOW => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            // Reached only when KVM did not take the ioeventfd.
            reg::QUEUE_NOTIFY => st.notify(v),
            reg::INTERRUPT_ACK => st.interrupt().ack(v),
            reg::STATUS => st.set_status(v),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::features;
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use virtio_queue::Queue;

    struct Dummy {
        activations: Arc<AtomicUsize>,
        resets: Arc<AtomicUsize>,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            features::VERSION_1 | 1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&[1, 2, 3, 4], offset, data);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            _mem: GuestMemory,
            _features: u64,
            queues: Vec<Queue>,
            evts: Vec<EventFd>,
            _i: Arc<Interrupt>,
        ) -> Result<(), String> {
            assert_eq!(queues.len(), evts.len());
            self.activations.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn reset(&mut self) {
            self.resets.fetch_add(1, Ordering::SeqCst);
        }
        fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
            self
        }
    }

    fn transport() -> (MmioTransport, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let (mem, _f) = crate::memory::create(16).unwrap();
        let a = Arc::new(AtomicUsize::new(0));
        let r = Arc::new(AtomicUsize::new(0));
        let d = Dummy {
            activations: a.clone(),
            resets: r.clone(),
        };
        (
            MmioTransport::new(Box::new(d), mem, EventFd::new(0).unwrap()).unwrap(),
            a,
            r,
        )
    }

    fn r32(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn w32(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn setup_queue(t: &mut MmioTransport, i: u32, base: u64) {
        w32(t, reg::QUEUE_SEL, i);
        w32(t, reg::QUEUE_NUM, 16);
        w32(t, reg::QUEUE_DESC_LOW, base as u32);
        w32(t, reg::QUEUE_AVAIL_LOW, (base + 0x100) as u32);
        w32(t, reg::QUEUE_USED_LOW, (base + 0x200) as u32);
        w32(t, reg::QUEUE_READY, 1);
    }

    fn negotiate(t: &mut MmioTransport) {
        w32(t, reg::STATUS, status::ACKNOWLEDGE);
        w32(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w32(t, reg::DRIVER_FEATURES_SEL, 1);
        w32(t, reg::DRIVER_FEATURES, 1);
        w32(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    #[test]
    fn identifies_itself() {
        let (mut t, _, _) = transport();
        assert_eq!(r32(&mut t, reg::MAGIC), MAGIC);
        assert_eq!(r32(&mut t, reg::VERSION), 2);
        assert_eq!(r32(&mut t, reg::DEVICE_ID), 42);
        w32(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r32(&mut t, reg::DEVICE_FEATURES), 1);
        w32(&mut t, reg::DEVICE_FEATURES_SEL, 7);
        assert_eq!(r32(&mut t, reg::DEVICE_FEATURES), 0);
        let mut c = [0u8; 8];
        t.read(reg::CONFIG + 2, &mut c);
        assert_eq!(c, [3, 4, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn full_handshake_activates_once() {
        let (mut t, act, _) = transport();
        negotiate(&mut t);
        assert_ne!(r32(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        setup_queue(&mut t, 0, 0x10000);
        setup_queue(&mut t, 1, 0x20000);
        w32(&mut t, reg::STATUS, 0xf);
        assert_eq!(act.load(Ordering::SeqCst), 1);
        assert_eq!(r32(&mut t, reg::STATUS), 0xf);
        // Queue registers are frozen once the driver is running.
        w32(&mut t, reg::QUEUE_SEL, 0);
        w32(&mut t, reg::QUEUE_READY, 0);
        assert_eq!(r32(&mut t, reg::QUEUE_READY), 1);
    }

    #[test]
    fn unknown_features_or_legacy_driver_fail_negotiation() {
        let (mut t, _, _) = transport();
        w32(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w32(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        w32(&mut t, reg::DRIVER_FEATURES, 1 << 7);
        w32(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(r32(&mut t, reg::STATUS) & status::FEATURES_OK, 0);

        let (mut t, _, _) = transport();
        w32(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w32(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(
            r32(&mut t, reg::STATUS) & status::FEATURES_OK,
            0,
            "VERSION_1 is required"
        );
    }

    #[test]
    fn driver_ok_with_queue_outside_memory_needs_reset() {
        let (mut t, act, resets) = transport();
        negotiate(&mut t);
        setup_queue(&mut t, 0, 0x10000);
        setup_queue(&mut t, 1, 0xffff_f000);
        w32(&mut t, reg::STATUS, 0xf);
        assert_eq!(act.load(Ordering::SeqCst), 0);
        assert_ne!(r32(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        w32(&mut t, reg::STATUS, 0);
        assert_eq!(r32(&mut t, reg::STATUS), 0);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn driver_ok_without_ready_queues_or_features_is_refused() {
        let (mut t, act, _) = transport();
        w32(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert_eq!(act.load(Ordering::SeqCst), 0);
        negotiate(&mut t);
        setup_queue(&mut t, 0, 0x10000);
        w32(&mut t, reg::STATUS, 0xf);
        assert_eq!(act.load(Ordering::SeqCst), 0);
        assert_ne!(r32(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn hostile_register_traffic_is_harmless() {
        let (mut t, _, _) = transport();
        w32(&mut t, reg::QUEUE_SEL, u32::MAX);
        assert_eq!(r32(&mut t, reg::QUEUE_NUM_MAX), 0);
        w32(&mut t, reg::QUEUE_NUM, 99);
        w32(&mut t, reg::QUEUE_NOTIFY, u32::MAX);
        t.write(reg::STATUS, &[0xff]);
        t.write(0xfff, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let mut wide = [0u8; 8];
        t.read(reg::MAGIC, &mut wide);
        assert_eq!(wide, [0; 8]);
        // Bits cannot be dropped without a reset.
        negotiate(&mut t);
        w32(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        assert_ne!(r32(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        // A queue size that is not a power of two is refused; the last valid one stays.
        for i in 0..2 {
            setup_queue(&mut t, i, 0x10000 * (u64::from(i) + 1));
        }
        w32(&mut t, reg::QUEUE_SEL, 0);
        w32(&mut t, reg::QUEUE_NUM, 3);
        w32(&mut t, reg::QUEUE_NUM, 0);
        w32(&mut t, reg::STATUS, 0xf);
        assert_eq!(r32(&mut t, reg::STATUS), 0xf);
    }
}
