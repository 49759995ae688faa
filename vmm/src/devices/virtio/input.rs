//! virtio-input as an absolute tablet: the console's pointer position,
//! scaled to the tablet's axes, and its buttons and wheel, so the guest's
//! pointer sits where the browser's is (a relative PS/2 mouse drifts with
//! the guest's acceleration). Linux's virtio_input driver finds it; the
//! PS/2 mouse serves guests without one.
//!
//! Queue 0 carries events to the guest in buffers it posts; queue 1 carries
//! the guest's status (LEDs), which a tablet ignores.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

use super::{features, read_config_bytes, Interrupt, VirtioDevice};
use crate::bus::lock;
use crate::memory::GuestMemory;

/// Virtio device ID of input devices.
pub const ID_INPUT: u32 = 18;
const QUEUE_SIZE: u16 = 64;
/// Largest coordinate on either axis.
pub const ABS_MAX: u32 = 0x7fff;
/// Events kept while the guest has posted no buffer (a few moves).
const PENDING_MAX: usize = 256;

mod ev {
    pub const SYN: u16 = 0x00;
    pub const KEY: u16 = 0x01;
    pub const REL: u16 = 0x02;
    pub const ABS: u16 = 0x03;
    pub const ABS_X: u16 = 0x00;
    pub const ABS_Y: u16 = 0x01;
    pub const REL_WHEEL: u16 = 0x08;
    pub const BTN_LEFT: u16 = 0x110;
    pub const BTN_RIGHT: u16 = 0x111;
    pub const BTN_MIDDLE: u16 = 0x112;
}

mod cfg {
    pub const ID_NAME: u8 = 0x01;
    pub const ID_SERIAL: u8 = 0x02;
    pub const ID_DEVIDS: u8 = 0x03;
    pub const PROP_BITS: u8 = 0x10;
    pub const EV_BITS: u8 = 0x11;
    pub const ABS_INFO: u8 = 0x12;
}

/// One input event as the guest reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Event {
    kind: u16,
    code: u16,
    value: u32,
}

struct Running {
    mem: GuestMemory,
    eventq: Queue,
    /// The status queue (LEDs): taken, never read; kept for where it stands.
    statusq: Option<Queue>,
    interrupt: Arc<Interrupt>,
}

#[derive(Default)]
struct State {
    running: Option<Running>,
    pending: VecDeque<Event>,
    buttons: u8,
}

/// The tablet. Cloning shares it: the VM keeps one to send the pointer.
#[derive(Clone, Default)]
pub struct Tablet {
    state: Arc<Mutex<State>>,
    select: (u8, u8),
}

/// Sets bit `n` of a bitmap.
fn bit(map: &mut [u8], n: u16) {
    map[usize::from(n / 8)] |= 1 << (n % 8);
}

impl Tablet {
    /// A tablet nobody drives yet.
    pub fn new() -> Tablet {
        Tablet::default()
    }

    /// The console's pointer at (`x`, `y`) on a `width` x `height` screen,
    /// `buttons` held (bit 0 left, 1 middle, 2 right: RFB's), `wheel` clicks
    /// (negative: up).
    pub fn pointer(&self, x: u16, y: u16, width: u32, height: u32, buttons: u8, wheel: i32) {
        let scale = |v: u16, size: u32| {
            u32::from(v).min(size.saturating_sub(1)) * ABS_MAX / size.saturating_sub(1).max(1)
        };
        let mut s = lock(&self.state);
        let mut events = vec![
            Event {
                kind: ev::ABS,
                code: ev::ABS_X,
                value: scale(x, width),
            },
            Event {
                kind: ev::ABS,
                code: ev::ABS_Y,
                value: scale(y, height),
            },
        ];
        for (mask, code) in [(1u8, ev::BTN_LEFT), (2, ev::BTN_MIDDLE), (4, ev::BTN_RIGHT)] {
            if (s.buttons ^ buttons) & mask != 0 {
                events.push(Event {
                    kind: ev::KEY,
                    code,
                    value: u32::from(buttons & mask != 0),
                });
            }
        }
        s.buttons = buttons;
        if wheel != 0 {
            // REL_WHEEL grows upward.
            events.push(Event {
                kind: ev::REL,
                code: ev::REL_WHEEL,
                value: (-wheel) as u32,
            });
        }
        events.push(Event {
            kind: ev::SYN,
            code: 0,
            value: 0,
        });
        if s.pending.len() + events.len() <= PENDING_MAX {
            s.pending.extend(events);
        }
        Self::flush(&mut s);
    }

    /// Moves pending events into the buffers the guest posted.
    fn flush(s: &mut State) {
        let State {
            running, pending, ..
        } = s;
        let Some(r) = running.as_mut() else {
            return;
        };
        let mut sent = false;
        while let Some(e) = pending.front().copied() {
            let Some(chain) = r.eventq.pop_descriptor_chain(&r.mem) else {
                break;
            };
            let head = chain.head_index();
            let mut bytes = [0u8; 8];
            bytes[..2].copy_from_slice(&e.kind.to_le_bytes());
            bytes[2..4].copy_from_slice(&e.code.to_le_bytes());
            bytes[4..].copy_from_slice(&e.value.to_le_bytes());
            let used = match chain.into_iter().next() {
                Some(d) if d.is_write_only() && d.len() >= 8 => {
                    u32::from(r.mem.write_slice(&bytes, d.addr()).is_ok()) * 8
                }
                _ => 0,
            };
            let _ = r.eventq.add_used(&r.mem, head, used);
            pending.pop_front();
            sent = true;
        }
        if sent {
            r.interrupt.signal_used(0);
        }
    }

    fn config(&self) -> Vec<u8> {
        let (select, subsel) = self.select;
        let mut u = vec![0u8; 128];
        let size = match (select, subsel) {
            (cfg::ID_NAME, 0) => {
                let name = b"EnSpeed tablet";
                u[..name.len()].copy_from_slice(name);
                name.len()
            }
            (cfg::ID_SERIAL, 0) => {
                u[..1].copy_from_slice(b"0");
                1
            }
            (cfg::ID_DEVIDS, 0) => {
                // Bus virtual (6), vendor, product, version.
                for (i, v) in [6u16, 0x0627, 0x0001, 0x0001].iter().enumerate() {
                    u[2 * i..2 * i + 2].copy_from_slice(&v.to_le_bytes());
                }
                8
            }
            (cfg::PROP_BITS, 0) => 0,
            (cfg::EV_BITS, t) => {
                match u16::from(t) {
                    ev::KEY => {
                        for b in [ev::BTN_LEFT, ev::BTN_RIGHT, ev::BTN_MIDDLE] {
                            bit(&mut u, b);
                        }
                    }
                    ev::REL => bit(&mut u, ev::REL_WHEEL),
                    ev::ABS => {
                        bit(&mut u, ev::ABS_X);
                        bit(&mut u, ev::ABS_Y);
                    }
                    _ => return vec![0u8; 8],
                }
                u.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1)
            }
            (cfg::ABS_INFO, a) if u16::from(a) == ev::ABS_X || u16::from(a) == ev::ABS_Y => {
                u[4..8].copy_from_slice(&ABS_MAX.to_le_bytes());
                20
            }
            _ => 0,
        };
        let mut c = vec![select, subsel, size as u8, 0, 0, 0, 0, 0];
        c.extend_from_slice(&u);
        c
    }
}

impl VirtioDevice for Tablet {
    fn device_type(&self) -> u32 {
        ID_INPUT
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        features::VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            match offset + i as u64 {
                0 => self.select.0 = b,
                1 => self.select.1 = b,
                _ => {}
            }
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        _features: u64,
        mut queues: Vec<Queue>,
        _queue_evts: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), String> {
        if queues.is_empty() {
            return Err("the tablet needs its event queue".into());
        }
        let eventq = queues.remove(0);
        let statusq = queues.pop();
        let mut s = lock(&self.state);
        s.running = Some(Running {
            mem,
            eventq,
            statusq,
            interrupt,
        });
        s.pending.clear();
        Ok(())
    }

    fn reset(&mut self) {
        let mut s = lock(&self.state);
        s.running = None;
        s.pending.clear();
        s.buttons = 0;
    }

    /// Events go into the guest's buffers as they come, under the state's lock: once
    /// `running` is taken, nothing more is written. Moves not delivered yet are dropped (the
    /// pointer's next move supersedes them).
    fn pause(&mut self, _mem: &GuestMemory) -> Result<Vec<super::RingPosition>, String> {
        let mut s = lock(&self.state);
        let r = s.running.take().ok_or("the tablet is not running")?;
        s.pending.clear();
        let mut at = vec![super::RingPosition::of(&r.eventq)];
        at.extend(r.statusq.as_ref().map(super::RingPosition::of));
        Ok(at)
    }

    fn restore_config(&mut self, source: &[u8]) {
        if let [select, subsel, ..] = *source {
            self.select = (select, subsel);
        }
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    fn read_cfg(t: &mut Tablet, select: u8, subsel: u8) -> Vec<u8> {
        t.write_config(0, &[select, subsel]);
        let mut c = vec![0u8; 136];
        t.read_config(0, &mut c);
        let size = usize::from(c[2]);
        c[8..8 + size].to_vec()
    }

    #[test]
    fn the_guest_learns_a_tablet_and_reads_scaled_moves_and_clicks() {
        let mut t = Tablet::new();
        assert_eq!(read_cfg(&mut t, cfg::ID_NAME, 0), b"EnSpeed tablet");
        let abs = read_cfg(&mut t, cfg::EV_BITS, ev::ABS as u8);
        assert_eq!(abs, vec![0b11]);
        let keys = read_cfg(&mut t, cfg::EV_BITS, ev::KEY as u8);
        assert_eq!(keys.len(), 0x112 / 8 + 1);
        let info = read_cfg(&mut t, cfg::ABS_INFO, 0);
        assert_eq!(u32::from_le_bytes(info[4..8].try_into().unwrap()), ABS_MAX);
        assert!(read_cfg(&mut t, cfg::EV_BITS, 0x15).is_empty());

        // Before the driver is up, moves wait (bounded).
        for _ in 0..1000 {
            t.pointer(0, 0, 100, 100, 0, 0);
        }
        assert!(lock(&t.state).pending.len() <= PENDING_MAX);
        t.reset();

        let (mem, _f) = crate::memory::create(16).unwrap();
        let mq = MockSplitQueue::new(&mem, 16);
        let descs: Vec<RawDescriptor> = (0..8)
            .map(|i| {
                RawDescriptor::from(SplitDescriptor::new(
                    0x10000 + i * 8,
                    8,
                    VRING_DESC_F_WRITE as u16,
                    0,
                ))
            })
            .collect();
        mq.build_multiple_desc_chains(&descs).unwrap();
        let q: Queue = mq.create_queue().unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Interrupt::new(irq.try_clone().unwrap());
        t.activate(
            mem.clone(),
            0,
            vec![q, Queue::new(16).unwrap()],
            vec![],
            interrupt,
        )
        .unwrap();
        // The middle of a 1024x768 screen with the left button: X, Y, BTN_LEFT down, SYN.
        t.pointer(512, 384, 1024, 768, 1, 0);
        let ev = |i: u64| {
            let mut b = [0u8; 8];
            mem.read_slice(&mut b, GuestAddress(0x10000 + i * 8))
                .unwrap();
            (
                u16::from_le_bytes([b[0], b[1]]),
                u16::from_le_bytes([b[2], b[3]]),
                u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            )
        };
        assert_eq!(ev(0), (ev::ABS, ev::ABS_X, 512 * ABS_MAX / 1023));
        assert_eq!(ev(1), (ev::ABS, ev::ABS_Y, 384 * ABS_MAX / 767));
        assert_eq!(ev(2), (ev::KEY, ev::BTN_LEFT, 1));
        assert_eq!(ev(3), (ev::SYN, 0, 0));
        assert_eq!(irq.read().unwrap(), 1);
        // Off-screen coordinates clamp to the edge.
        t.pointer(5000, 0, 1024, 768, 1, 0);
        assert_eq!(ev(4), (ev::ABS, ev::ABS_X, ABS_MAX));

        assert_eq!(ev(6), (ev::SYN, 0, 0));
        // Paused for a live migration: where it stood in both rings (7 events used), and
        // nothing more is written.
        let at = t.pause(&mem).unwrap();
        assert_eq!(at.len(), 2);
        assert_eq!((at[0].next_avail, at[0].next_used), (7, 7));
        t.pointer(0, 0, 1024, 768, 0, 0);
        assert_eq!(ev(7), (0, 0, 0), "nothing written after the pause");
        assert!(t.pause(&mem).is_err(), "paused already");
        // The target's tablet reads its configuration where the guest had selected it.
        let mut there = Tablet::new();
        t.write_config(0, &[cfg::ID_NAME, 0]);
        let mut source = vec![0u8; 64];
        t.read_config(0, &mut source);
        there.restore_config(&source);
        let mut here = vec![0u8; 64];
        there.read_config(0, &mut here);
        assert_eq!(here, source);
    }
}
