//! virtio-net over a tap: queue 0 receives, queue 1 transmits.
//!
//! The guest may hand its checksums and TCP segmentation to the host (CSUM, HOST_TSO4/6) and
//! take large, unchecksummed segments (GUEST_CSUM, GUEST_TSO4/6) in mergeable receive buffers
//! (MRG_RXBUF), as with QEMU and vhost-net: the virtio-net header travels to and from the tap
//! unchanged, and the kernel checks what the guest puts in it.

pub mod tap;

use std::os::fd::RawFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use self::tap::{offload, Tap, VNET_HDR_LEN};
use super::worker::{QueueHandler, Worker};
use super::{features, ids, read_config_bytes, Interrupt, RingPosition, VirtioDevice};
use crate::memory::GuestMemory;

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// Feature bits of virtio-net (virtio 1.2, 5.1.3).
mod bit {
    pub const CSUM: u64 = 1 << 0;
    pub const GUEST_CSUM: u64 = 1 << 1;
    pub const MAC: u64 = 1 << 5;
    pub const GUEST_TSO4: u64 = 1 << 7;
    pub const GUEST_TSO6: u64 = 1 << 8;
    pub const GUEST_ECN: u64 = 1 << 9;
    pub const HOST_TSO4: u64 = 1 << 11;
    pub const HOST_TSO6: u64 = 1 << 12;
    pub const HOST_ECN: u64 = 1 << 13;
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const STATUS: u64 = 1 << 16;
}
const LINK_UP: u16 = 1;
/// Largest frame plus header we move: a 64 KiB segment, its Ethernet and VLAN headers, and the
/// virtio-net header.
const MAX_FRAME: usize = VNET_HDR_LEN + 18 + 65_535;
/// Where num_buffers sits in the virtio-net header.
const NUM_BUFFERS: usize = 10;

/// A virtio-net device.
pub struct Net {
    tap: Option<Tap>,
    mac: [u8; 6],
    worker: Option<Worker<NetWorker>>,
}

impl Net {
    /// A NIC on `tap` with address `mac`.
    pub fn new(tap: Tap, mac: [u8; 6]) -> Net {
        Net {
            tap: Some(tap),
            mac,
            worker: None,
        }
    }
}

/// What the tap may hand the guest, from the features the guest took: the tap segments and
/// checksums whatever the guest cannot take.
fn tap_offloads(negotiated: u64) -> u32 {
    if negotiated & bit::GUEST_CSUM == 0 {
        return 0;
    }
    let mut f = offload::CSUM;
    if negotiated & bit::GUEST_TSO4 != 0 {
        f |= offload::TSO4;
    }
    if negotiated & bit::GUEST_TSO6 != 0 {
        f |= offload::TSO6;
    }
    if negotiated & bit::GUEST_ECN != 0 && f & (offload::TSO4 | offload::TSO6) != 0 {
        f |= offload::TSO_ECN;
    }
    f
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        ids::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        features::VERSION_1
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC
            | bit::CSUM
            | bit::GUEST_CSUM
            | bit::GUEST_TSO4
            | bit::GUEST_TSO6
            | bit::GUEST_ECN
            | bit::HOST_TSO4
            | bit::HOST_TSO6
            | bit::HOST_ECN
            | bit::MRG_RXBUF
            | bit::MAC
            | bit::STATUS
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 8];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        read_config_bytes(&c, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemory,
        features: u64,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), String> {
        let tap = self
            .tap
            .take()
            .ok_or("tap already in use by a running worker")?;
        let name = format!("net-{}", tap.name());
        if let Err(e) = tap.set_offloads(tap_offloads(features)) {
            let msg = format!("tap {}: cannot set its offloads: {e}", tap.name());
            self.tap = Some(tap);
            return Err(msg);
        }
        let mut queues = queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            self.tap = Some(tap);
            return Err("virtio-net needs two queues".into());
        };
        let handler = NetWorker {
            mem,
            rx: Rx::new(rx, features & bit::MRG_RXBUF != 0),
            tx,
            tap,
            interrupt,
            rx_frame: vec![0; MAX_FRAME],
            tx_frame: vec![0; MAX_FRAME],
            pending: None,
        };
        self.worker = Some(
            Worker::spawn(name, handler, queue_evts)
                .map_err(|e| format!("cannot start NIC worker: {e}"))?,
        );
        Ok(())
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn reset(&mut self) {
        // The tap comes back with the worker so a re-initialising driver can use it.
        if let Some(w) = self.worker.take() {
            if let Some(tap) = w.stop().map(|h| h.tap) {
                self.tap = Some(tap);
            }
        }
    }

    // A frame read from the tap and waiting for room in the guest's receive ring is dropped,
    // as a full ring drops it: nothing in a ring is lost.
    fn pause(&mut self, _mem: &GuestMemory) -> Result<Vec<RingPosition>, String> {
        let w = self
            .worker
            .take()
            .ok_or("the NIC's worker is not running")?;
        let h = w.stop().ok_or("the NIC's worker had failed")?;
        let at = vec![RingPosition::of(&h.rx.queue), RingPosition::of(&h.tx)];
        self.tap = Some(h.tap);
        Ok(at)
    }
}

struct NetWorker {
    mem: GuestMemory,
    rx: Rx,
    tx: Queue,
    tap: Tap,
    interrupt: Arc<Interrupt>,
    /// The frame read from the tap, which waits there while the guest has no room for it.
    rx_frame: Vec<u8>,
    /// The frame being gathered from a transmit chain.
    tx_frame: Vec<u8>,
    /// The length of a frame in `rx_frame` the guest had no room for yet.
    pending: Option<usize>,
}

/// The receive queue and how frames are placed in it.
struct Rx {
    queue: Queue,
    /// The guest takes a frame in several receive chains (num_buffers says how many).
    mergeable: bool,
    /// Where the frame being delivered goes: guest buffers and how much of each.
    spans: Vec<(GuestAddress, usize)>,
    /// The receive chains it fills, and how much of each.
    heads: Vec<(u16, u32)>,
}

/// What became of a frame offered to the guest.
#[derive(Debug, PartialEq, Eq)]
enum Delivery {
    /// Written to the guest (or, not fitting a buffer the guest sized too small, dropped).
    Done,
    /// The guest has not posted room enough for it: nothing was taken off its ring.
    NoRoom,
}

impl NetWorker {
    fn transmit(&mut self) {
        let mut sent = false;
        loop {
            let _ = self.tx.disable_notification(&self.mem);
            while let Some(chain) = self.tx.pop_descriptor_chain(&self.mem) {
                let head = chain.head_index();
                let mut len = 0usize;
                let mut ok = true;
                for d in chain {
                    let n = d.len() as usize;
                    if d.is_write_only() || len + n > MAX_FRAME {
                        ok = false;
                        break;
                    }
                    if self
                        .mem
                        .read_slice(&mut self.tx_frame[len..len + n], d.addr())
                        .is_err()
                    {
                        ok = false;
                        break;
                    }
                    len += n;
                }
                if ok && len > VNET_HDR_LEN {
                    // The kernel checks the header's offload requests and drops a frame whose
                    // request is malformed.
                    if let Err(e) = self.tap.send(&self.tx_frame[..len]) {
                        tracing::debug!(error = %e, "tap dropped a frame");
                    }
                } else {
                    tracing::debug!("dropped a malformed transmit chain");
                }
                let _ = self.tx.add_used(&self.mem, head, 0);
                sent = true;
            }
            if !matches!(self.tx.enable_notification(&self.mem), Ok(true))
                || super::ring_broken(&mut self.tx, &self.mem)
            {
                break;
            }
        }
        if sent && self.tx.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.signal_used(TX);
        }
    }

    fn receive(&mut self) {
        let mut delivered = false;
        loop {
            let len = match self.pending.take() {
                Some(l) => l,
                None => match self.tap.recv(&mut self.rx_frame) {
                    Ok(Some(n)) => n,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "tap read failed");
                        break;
                    }
                },
            };
            if self.rx.deliver(&self.mem, &mut self.rx_frame[..len]) == Delivery::NoRoom {
                self.pending = Some(len);
                if self.rx.await_buffers(&self.mem) {
                    continue;
                }
                break;
            }
            delivered = true;
        }
        if delivered && self.rx.queue.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.signal_used(RX);
        }
    }
}

impl Rx {
    fn new(queue: Queue, mergeable: bool) -> Rx {
        Rx {
            queue,
            mergeable,
            spans: Vec::new(),
            heads: Vec::new(),
        }
    }

    /// Offers `frame` (its virtio-net header first) to the guest: into one receive chain, or with
    /// mergeable buffers into as many as it takes, their count written in the header.
    fn deliver(&mut self, mem: &GuestMemory, frame: &mut [u8]) -> Delivery {
        let len = frame.len();
        let start = self.queue.next_avail();
        self.spans.clear();
        self.heads.clear();
        let mut room = 0usize;
        let mut malformed = false;
        while room < len && (self.mergeable || self.heads.is_empty()) {
            let Some(chain) = self.queue.pop_descriptor_chain(mem) else {
                self.queue.set_next_avail(start);
                return Delivery::NoRoom;
            };
            let head = chain.head_index();
            let mut taken = 0usize;
            for d in chain {
                if !d.is_write_only() {
                    malformed = true;
                    break;
                }
                let n = (d.len() as usize).min(len - room - taken);
                if n == 0 {
                    break;
                }
                self.spans.push((d.addr(), n));
                taken += n;
            }
            self.heads.push((head, taken as u32));
            room += taken;
            if malformed {
                break;
            }
        }
        // A frame that does not fit (a non-mergeable buffer too small, or a chain the device
        // cannot write) is dropped: the buffers go back empty.
        let fits = room == len && len >= VNET_HDR_LEN && !malformed;
        if !fits {
            tracing::debug!(
                len,
                room,
                "a received frame did not fit the guest's buffers"
            );
            return self.give_back_empty(mem);
        }
        let count = self.heads.len() as u16;
        frame[NUM_BUFFERS..NUM_BUFFERS + 2].copy_from_slice(&count.to_le_bytes());
        let mut done = 0usize;
        for &(addr, n) in &self.spans {
            if mem.write_slice(&frame[done..done + n], addr).is_err() {
                return self.give_back_empty(mem);
            }
            done += n;
        }
        for &(head, n) in &self.heads {
            let _ = self.queue.add_used(mem, head, n);
        }
        Delivery::Done
    }

    fn give_back_empty(&mut self, mem: &GuestMemory) -> Delivery {
        for &(head, _) in &self.heads {
            let _ = self.queue.add_used(mem, head, 0);
        }
        Delivery::Done
    }

    /// After a frame found no room: asks the guest to kick when it posts its next receive buffer,
    /// and says whether it posted one meanwhile (then try again at once).
    fn await_buffers(&mut self, mem: &GuestMemory) -> bool {
        let Ok(seen) = self.queue.avail_idx(mem, Ordering::Acquire) else {
            return false;
        };
        let _ = self.queue.enable_notification(mem);
        if self.queue.event_idx_enabled() {
            // enable_notification asks for a kick past the first buffer not taken; with some
            // buffers posted but too few for this frame, the kick has to come past the last.
            let avail_event = 4 + 8 * u64::from(self.queue.size());
            let _ = mem.store(
                seen.0.to_le(),
                GuestAddress(self.queue.used_ring() + avail_event),
                Ordering::Relaxed,
            );
        }
        fence(Ordering::SeqCst);
        matches!(self.queue.avail_idx(mem, Ordering::Acquire), Ok(now) if now != seen)
            && !super::ring_broken(&mut self.queue, mem)
    }
}

impl QueueHandler for NetWorker {
    fn queue_notified(&mut self, index: usize) {
        match index {
            RX => self.receive(),
            TX => self.transmit(),
            _ => {}
        }
    }

    fn extra_fds(&self) -> Vec<RawFd> {
        vec![self.tap.raw_fd()]
    }

    fn extra_ready(&mut self, _index: usize) {
        self.receive();
    }
}

pub use vmm_api::parse_mac;

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes};

    const BUF: u64 = 0x10_0000;

    /// `n` one-descriptor receive chains of `size` bytes each, from descriptor `first`.
    fn post(mq: &MockSplitQueue<GuestMemory>, first: u16, n: u16, size: u32, flags: u16) {
        let descs: Vec<RawDescriptor> = (first..first + n)
            .map(|i| {
                RawDescriptor::from(SplitDescriptor::new(
                    BUF + u64::from(i) * 0x1_0000,
                    size,
                    flags,
                    0,
                ))
            })
            .collect();
        mq.add_desc_chains(&descs, first).unwrap();
    }

    /// A frame: a zeroed virtio-net header, then `len` bytes counting up.
    fn frame(len: usize) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend((0..len).map(|i| (i % 251) as u8));
        f
    }

    /// The used ring's entry `i`: (descriptor, length).
    fn used(mem: &GuestMemory, mq: &MockSplitQueue<GuestMemory>, i: u64) -> (u32, u32) {
        let a = mq.used_addr().unchecked_add(4 + 8 * i);
        (
            mem.read_obj::<u32>(a).unwrap(),
            mem.read_obj::<u32>(a.unchecked_add(4)).unwrap(),
        )
    }

    fn used_idx(mem: &GuestMemory, mq: &MockSplitQueue<GuestMemory>) -> u16 {
        mem.read_obj::<u16>(mq.used_addr().unchecked_add(2))
            .unwrap()
    }

    fn read(mem: &GuestMemory, desc: u16, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        mem.read_slice(&mut b, GuestAddress(BUF + u64::from(desc) * 0x1_0000))
            .unwrap();
        b
    }

    #[test]
    fn a_large_segment_spreads_over_mergeable_buffers_and_says_how_many() {
        let (mem, _f) = crate::memory::create(16).unwrap();
        let mq = MockSplitQueue::new(&mem, 16);
        post(&mq, 0, 4, 1526, VRING_DESC_F_WRITE as u16);
        let mut rx = Rx::new(mq.create_queue().unwrap(), true);
        let f = frame(4000);
        assert_eq!(rx.deliver(&mem, &mut f.clone()), Delivery::Done);
        assert_eq!(used_idx(&mem, &mq), 3);
        assert_eq!(used(&mem, &mq, 0), (0, 1526));
        assert_eq!(used(&mem, &mq, 1), (1, 1526));
        assert_eq!(used(&mem, &mq, 2), (2, 4012 - 2 * 1526));
        let mut got = read(&mem, 0, 1526);
        got.extend(read(&mem, 1, 1526));
        got.extend(read(&mem, 2, 4012 - 2 * 1526));
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
        assert_eq!(&got[VNET_HDR_LEN..], &f[VNET_HDR_LEN..]);

        // A small frame takes one buffer, and says so.
        assert_eq!(rx.deliver(&mem, &mut frame(60)), Delivery::Done);
        assert_eq!(used(&mem, &mq, 3), (3, 72));
        assert_eq!(read(&mem, 3, 12)[10..12], [1, 0]);
    }

    #[test]
    fn a_frame_waits_whole_until_the_guest_posts_room_for_it_and_the_guest_is_asked_to_kick() {
        let (mem, _f) = crate::memory::create(16).unwrap();
        let mq = MockSplitQueue::new(&mem, 16);
        post(&mq, 0, 1, 1526, VRING_DESC_F_WRITE as u16);
        let mut q: Queue = mq.create_queue().unwrap();
        q.set_event_idx(true);
        let mut rx = Rx::new(q, true);
        let mut f = frame(3000);
        assert_eq!(rx.deliver(&mem, &mut f), Delivery::NoRoom);
        assert_eq!(used_idx(&mem, &mq), 0, "nothing taken");
        assert_eq!(
            rx.queue.next_avail(),
            0,
            "the buffer is still the guest's to fill"
        );
        assert!(!rx.await_buffers(&mem), "no buffer came meanwhile");
        // The guest must kick when it posts past the one buffer it has posted.
        let avail_event = mq.used_addr().unchecked_add(4 + 8 * 16);
        assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 1);
        post(&mq, 1, 2, 1526, VRING_DESC_F_WRITE as u16);
        assert_eq!(rx.deliver(&mem, &mut f), Delivery::Done);
        assert_eq!(used_idx(&mem, &mq), 2, "3012 bytes in two buffers of 1526");
        assert_eq!(rx.queue.next_avail(), 2);
    }

    #[test]
    fn without_mergeable_buffers_one_chain_holds_a_frame_or_it_is_dropped() {
        let (mem, _f) = crate::memory::create(16).unwrap();
        let mq = MockSplitQueue::new(&mem, 16);
        post(&mq, 0, 3, 1526, VRING_DESC_F_WRITE as u16);
        let mut rx = Rx::new(mq.create_queue().unwrap(), false);
        assert_eq!(rx.deliver(&mem, &mut frame(1514)), Delivery::Done);
        assert_eq!(used(&mem, &mq, 0), (0, 1526));
        assert_eq!(read(&mem, 0, 12)[10..12], [1, 0], "num_buffers is 1");
        // Too big for the guest's buffer: dropped, the buffer returned empty.
        assert_eq!(rx.deliver(&mem, &mut frame(3000)), Delivery::Done);
        assert_eq!(used(&mem, &mq, 1), (1, 0));
        assert_eq!(rx.deliver(&mem, &mut frame(100)), Delivery::Done);
        assert_eq!(used(&mem, &mq, 2), (2, 112));
        assert_eq!(rx.deliver(&mem, &mut frame(100)), Delivery::NoRoom);
    }

    #[test]
    fn a_receive_buffer_the_device_may_not_write_loses_the_frame_not_the_ring() {
        let (mem, _f) = crate::memory::create(16).unwrap();
        let mq = MockSplitQueue::new(&mem, 16);
        post(&mq, 0, 1, 1526, 0);
        post(&mq, 1, 1, 1526, VRING_DESC_F_WRITE as u16);
        let mut rx = Rx::new(mq.create_queue().unwrap(), true);
        assert_eq!(rx.deliver(&mem, &mut frame(100)), Delivery::Done);
        assert_eq!(used(&mem, &mq, 0), (0, 0));
        assert!(
            read(&mem, 0, 112).iter().all(|b| *b == 0),
            "nothing written"
        );
        assert_eq!(rx.deliver(&mem, &mut frame(100)), Delivery::Done);
        assert_eq!(used(&mem, &mq, 1), (1, 112));
    }

    #[test]
    fn the_tap_hands_over_only_what_the_guest_took() {
        assert_eq!(
            tap_offloads(bit::GUEST_TSO4),
            0,
            "no segments without checksums"
        );
        assert_eq!(tap_offloads(bit::GUEST_CSUM), offload::CSUM);
        assert_eq!(
            tap_offloads(bit::GUEST_CSUM | bit::GUEST_TSO4 | bit::GUEST_TSO6 | bit::GUEST_ECN),
            offload::CSUM | offload::TSO4 | offload::TSO6 | offload::TSO_ECN
        );
        assert_eq!(
            tap_offloads(bit::GUEST_CSUM | bit::GUEST_ECN),
            offload::CSUM
        );
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("52:54:00:12:34:5a"),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0x5a])
        );
        assert_eq!(parse_mac("52:54:00:12:34"), None);
        assert_eq!(parse_mac("52:54:00:12:34:56:78"), None);
        assert_eq!(parse_mac("5254:00:12:34:56"), None);
        assert_eq!(parse_mac("zz:54:00:12:34:56"), None);
    }
}
