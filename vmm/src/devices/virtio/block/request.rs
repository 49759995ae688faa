//! Parsing a virtio-blk request out of a descriptor chain the guest built.
//!
//! The guest decides every address and length, and virtio 1.x lets it split
//! header, data and status across descriptors however it likes, so parsing
//! works on byte ranges: the first 16 readable bytes are the header, the
//! last writable byte is the status, and what lies between is data.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::memory::GuestMemory;

/// Request types (virtio spec 5.2.6).
pub mod kind {
    #![allow(missing_docs)]
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
}

/// Status byte values.
pub mod status {
    #![allow(missing_docs)]
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

/// Bytes in a sector, the unit of request offsets.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the request header.
const HEADER_LEN: u64 = 16;
/// Length of the GET_ID answer.
pub const ID_LEN: usize = 20;

/// A contiguous piece of guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Where it starts.
    pub addr: GuestAddress,
    /// How long it is.
    pub len: u32,
}

/// What the guest asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read sectors into the data buffers.
    Read,
    /// Write the data buffers to sectors.
    Write,
    /// Make earlier writes durable.
    Flush,
    /// Return the device id string.
    GetId,
}

/// A parsed request, its data segments checked to lie in guest memory.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// The operation.
    pub op: Op,
    /// First sector.
    pub sector: u64,
    /// Data buffers in order.
    pub data: Vec<Segment>,
    /// Total data length in bytes.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a chain is not a valid request.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No writable byte for the status: nothing can be reported to the guest.
    #[error("descriptor chain has no writable status byte")]
    NoStatus,
    /// The chain is malformed; the status byte can carry the error.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// A request type this device does not implement.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

impl RequestError {
    /// Where to put the status byte, if the chain had one.
    pub fn status_addr(&self, parsed: &Parsed) -> Option<GuestAddress> {
        match self {
            RequestError::NoStatus => None,
            _ => parsed.status,
        }
    }
}

/// Segments of a chain, split into the readable and the writable part.
#[derive(Default, Debug)]
pub struct Parsed {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    /// The last writable byte, when there is one.
    pub status: Option<GuestAddress>,
}

/// Takes `n` bytes off the front of `segs`, returning them as segments.
fn take_front(segs: &mut Vec<Segment>, mut n: u64) -> Option<Vec<Segment>> {
    let mut out = Vec::new();
    while n > 0 {
        let first = segs.first_mut()?;
        let take = n.min(u64::from(first.len));
        out.push(Segment {
            addr: first.addr,
            len: take as u32,
        });
        if take == u64::from(first.len) {
            segs.remove(0);
        } else {
            first.addr = first.addr.checked_add(take)?;
            first.len -= take as u32;
        }
        n -= take;
    }
    Some(out)
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Walks the chain, checking every descriptor lies in guest memory and that
/// no readable descriptor follows a writable one.
pub fn split_chain<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemory,
) -> Result<Parsed, (Parsed, RequestError)>
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    let mut p = Parsed::default();
    let mut err = None;
    for d in chain {
        if d.len() == 0 {
            continue;
        }
        let seg = Segment {
            addr: d.addr(),
            len: d.len(),
        };
        // get_slice fails for ranges outside RAM or spanning two regions.
        if mem.get_slice(seg.addr, seg.len as usize).is_err() {
            err.get_or_insert(RequestError::Malformed("descriptor outside guest memory"));
            continue;
        }
        if d.is_write_only() {
            p.writable.push(seg);
        } else if p.writable.is_empty() {
            p.readable.push(seg);
        } else {
            err.get_or_insert(RequestError::Malformed(
                "readable descriptor after a writable one",
            ));
        }
    }
    if let Some(last) = p.writable.last_mut() {
        let at = last.addr.unchecked_add(u64::from(last.len) - 1);
        p.status = Some(at);
        last.len -= 1;
        if last.len == 0 {
            p.writable.pop();
        }
    }
    match (p.status, err) {
        (None, _) => Err((p, RequestError::NoStatus)),
        (Some(_), Some(e)) => Err((p, e)),
        (Some(_), None) => Ok(p),
    }
}

/// Turns the split chain into a request.
pub fn parse(mut p: Parsed, mem: &GuestMemory) -> Result<Request, (Parsed, RequestError)> {
    let status = match p.status {
        Some(s) => s,
        None => return Err((p, RequestError::NoStatus)),
    };
    let Some(header_segs) = take_front(&mut p.readable, HEADER_LEN) else {
        return Err((
            p,
            RequestError::Malformed("request header shorter than 16 bytes"),
        ));
    };
    let mut header = [0u8; HEADER_LEN as usize];
    let mut at = 0usize;
    for s in &header_segs {
        let end = at + s.len as usize;
        if mem.read_slice(&mut header[at..end], s.addr).is_err() {
            return Err((p, RequestError::Malformed("request header unreadable")));
        }
        at = end;
    }
    let typ = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let (op, data) = match typ {
        kind::IN => (Op::Read, std::mem::take(&mut p.writable)),
        kind::OUT => (Op::Write, std::mem::take(&mut p.readable)),
        kind::FLUSH => (Op::Flush, Vec::new()),
        kind::GET_ID => (Op::GetId, std::mem::take(&mut p.writable)),
        other => return Err((p, RequestError::Unsupported(other))),
    };
    let data_len = total(&data);
    let stray = match op {
        Op::Read | Op::GetId => total(&p.readable),
        Op::Write => total(&p.writable),
        Op::Flush => total(&p.readable) + total(&p.writable),
    };
    if stray != 0 {
        return Err((
            p,
            RequestError::Malformed("data buffers in the wrong direction"),
        ));
    }
    if matches!(op, Op::Read | Op::Write) && data_len % SECTOR_SIZE != 0 {
        return Err((
            p,
            RequestError::Malformed("data length is not a whole number of sectors"),
        ));
    }
    if op == Op::GetId && data_len < ID_LEN as u64 {
        return Err((
            p,
            RequestError::Malformed("GET_ID buffer shorter than 20 bytes"),
        ));
    }
    Ok(Request {
        op,
        sector,
        data,
        data_len,
        status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};

    const R: u16 = 0;
    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn mem() -> GuestMemory {
        crate::memory::create(16).unwrap().0
    }

    /// Builds a chain of (addr, len, flags) and parses it.
    fn run(m: &GuestMemory, descs: &[(u64, u32, u16)]) -> Result<Request, RequestError> {
        let q = MockSplitQueue::new(m, 16);
        let n = descs.len();
        let v: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, (a, l, f))| {
                let flags = if i + 1 < n {
                    f | VRING_DESC_F_NEXT as u16
                } else {
                    *f
                };
                RawDescriptor::from(SplitDescriptor::new(*a, *l, flags, (i + 1) as u16))
            })
            .collect();
        q.build_desc_chain(&v).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let chain = queue.pop_descriptor_chain(m).unwrap();
        split_chain(chain, m)
            .and_then(|p| parse(p, m))
            .map_err(|(_, e)| e)
    }

    fn header(m: &GuestMemory, at: u64, typ: u32, sector: u64) {
        m.write_obj(typ, GuestAddress(at)).unwrap();
        m.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        m.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    #[test]
    fn classic_three_descriptor_write() {
        let m = mem();
        header(&m, 0x10000, kind::OUT, 7);
        let r = run(&m, &[(0x10000, 16, R), (0x20000, 4096, R), (0x30000, 1, W)]).unwrap();
        assert_eq!(r.op, Op::Write);
        assert_eq!(r.sector, 7);
        assert_eq!(
            r.data,
            vec![Segment {
                addr: GuestAddress(0x20000),
                len: 4096
            }]
        );
        assert_eq!(r.status, GuestAddress(0x30000));
    }

    #[test]
    fn header_data_and_status_packed_any_way() {
        let m = mem();
        // Header and first data bytes share a descriptor; status shares the last data one.
        header(&m, 0x10000, kind::IN, 1);
        let r = run(
            &m,
            &[(0x10000, 16, R), (0x20000, 512, W), (0x30000, 513, W)],
        )
        .unwrap();
        assert_eq!(r.op, Op::Read);
        assert_eq!(r.data_len, 1024);
        assert_eq!(r.status, GuestAddress(0x30000 + 512));
        header(&m, 0x10000, kind::OUT, 1);
        let r = run(&m, &[(0x10000, 16 + 512, R), (0x30000, 1, W)]).unwrap();
        assert_eq!(
            r.data,
            vec![Segment {
                addr: GuestAddress(0x10010),
                len: 512
            }]
        );
        // Header split over two descriptors.
        header(&m, 0x10000, kind::FLUSH, 0);
        m.write_slice(&[0u8; 8], GuestAddress(0x40000)).unwrap();
        let r = run(&m, &[(0x10000, 8, R), (0x40000, 8, R), (0x30000, 1, W)]).unwrap();
        assert_eq!(r.op, Op::Flush);
    }

    #[test]
    fn malformed_chains_are_refused_with_a_reason() {
        let m = mem();
        header(&m, 0x10000, kind::OUT, 0);
        assert_eq!(
            run(&m, &[(0x10000, 16, R), (0x20000, 512, R)]),
            Err(RequestError::NoStatus)
        );
        assert!(matches!(
            run(&m, &[(0x10000, 8, R), (0x30000, 1, W)]),
            Err(RequestError::Malformed(_))
        ));
        assert!(matches!(
            run(&m, &[(0x10000, 16, R), (0x20000, 100, R), (0x30000, 1, W)]),
            Err(RequestError::Malformed(_))
        ));
        // Data outside guest RAM (16 MiB) or wrapping the address space.
        assert!(matches!(
            run(
                &m,
                &[(0x10000, 16, R), (0x2000_0000, 512, R), (0x30000, 1, W)]
            ),
            Err(RequestError::Malformed(_))
        ));
        assert!(matches!(
            run(
                &m,
                &[(0x10000, 16, R), (u64::MAX - 10, 512, R), (0x30000, 1, W)]
            ),
            Err(RequestError::Malformed(_))
        ));
        // Readable after writable.
        assert!(matches!(
            run(
                &m,
                &[
                    (0x10000, 16, R),
                    (0x30000, 1, W),
                    (0x20000, 512, R),
                    (0x30010, 1, W)
                ]
            ),
            Err(RequestError::Malformed(_))
        ));
        // A write whose data sits in writable buffers.
        assert!(matches!(
            run(&m, &[(0x10000, 16, R), (0x20000, 512, W), (0x30000, 1, W)]),
            Err(RequestError::Malformed(_))
        ));
        header(&m, 0x10000, 99, 0);
        assert_eq!(
            run(&m, &[(0x10000, 16, R), (0x30000, 1, W)]),
            Err(RequestError::Unsupported(99))
        );
        header(&m, 0x10000, kind::GET_ID, 0);
        assert!(matches!(
            run(&m, &[(0x10000, 16, R), (0x30000, 5, W)]),
            Err(RequestError::Malformed(_))
        ));
    }

    #[test]
    fn a_looping_chain_ends() {
        let m = mem();
        header(&m, 0x10000, kind::OUT, 0);
        let q = MockSplitQueue::new(&m, 16);
        // Descriptor 0 -> 1 -> 0 -> ... ; the chain iterator stops after the queue size.
        let v = [
            RawDescriptor::from(SplitDescriptor::new(
                0x10000,
                16,
                VRING_DESC_F_NEXT as u16,
                1,
            )),
            RawDescriptor::from(SplitDescriptor::new(
                0x20000,
                512,
                VRING_DESC_F_NEXT as u16,
                0,
            )),
        ];
        q.build_desc_chain(&v).unwrap();
        // build_desc_chain rewrites `next`; patch descriptor 1 to point back to 0.
        let d1 = q.desc_table_addr().unchecked_add(16 + 14);
        m.write_obj(0u16, d1).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let chain = queue.pop_descriptor_chain(&m).unwrap();
        let r = split_chain(chain, &m).and_then(|p| parse(p, &m));
        assert!(matches!(r, Err((_, RequestError::NoStatus))));
    }
}
