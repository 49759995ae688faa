//! virtio-net over a tap: queue 0 receives, queue 1 transmits.

pub mod tap;

use std::os::fd::RawFd;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

use self::tap::{Tap, VNET_HDR_LEN};
use super::worker::{QueueHandler, Worker};
use super::{features, ids, read_config_bytes, Interrupt, VirtioDevice};
use crate::memory::GuestMemory;

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;
const LINK_UP: u16 = 1;
/// Largest frame plus header we move: 64 KiB, what a tap can hand us.
const MAX_FRAME: usize = 65_562;

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
            | F_MAC
            | F_STATUS
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
        _features: u64,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), String> {
        let tap = self
            .tap
            .take()
            .ok_or("tap already in use by a running worker")?;
        let name = format!("net-{}", tap.name());
        let mut queues = queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err("virtio-net needs two queues".into());
        };
        let handler = NetWorker {
            mem,
            rx,
            tx,
            tap,
            interrupt,
            frame: vec![0; MAX_FRAME],
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
}

struct NetWorker {
    mem: GuestMemory,
    rx: Queue,
    tx: Queue,
    tap: Tap,
    interrupt: Arc<Interrupt>,
    frame: Vec<u8>,
    /// A frame read from the tap while the guest had no receive buffer.
    pending: Option<usize>,
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
                        .read_slice(&mut self.frame[len..len + n], d.addr())
                        .is_err()
                    {
                        ok = false;
                        break;
                    }
                    len += n;
                }
                if ok && len > VNET_HDR_LEN {
                    if let Err(e) = self.tap.send(&self.frame[..len]) {
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

    /// Copies the frame in `self.frame[..len]` into the next receive buffer.
    /// Returns false when the guest has no buffer for it.
    fn deliver(&mut self, len: usize) -> bool {
        let Some(chain) = self.rx.pop_descriptor_chain(&self.mem) else {
            return false;
        };
        let head = chain.head_index();
        let mut done = 0usize;
        for d in chain {
            if done == len {
                break;
            }
            if !d.is_write_only() {
                done = 0;
                break;
            }
            let n = (d.len() as usize).min(len - done);
            if self
                .mem
                .write_slice(&self.frame[done..done + n], d.addr())
                .is_err()
            {
                done = 0;
                break;
            }
            done += n;
        }
        // A frame that does not fit is dropped; the buffer goes back empty.
        let used = if done == len { len as u32 } else { 0 };
        let _ = self.rx.add_used(&self.mem, head, used);
        true
    }

    fn receive(&mut self) {
        let mut delivered = false;
        loop {
            let len = match self.pending.take() {
                Some(l) => l,
                None => match self.tap.recv(&mut self.frame) {
                    Ok(Some(n)) => n,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "tap read failed");
                        break;
                    }
                },
            };
            if !self.deliver(len) {
                self.pending = Some(len);
                // Ask to be notified when the guest adds buffers, then re-check.
                if matches!(self.rx.enable_notification(&self.mem), Ok(true))
                    && !super::ring_broken(&mut self.rx, &self.mem)
                {
                    continue;
                }
                break;
            }
            delivered = true;
        }
        if delivered && self.rx.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.signal_used(RX);
        }
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
