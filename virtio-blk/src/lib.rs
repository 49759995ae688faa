//! Parsing a virtio-blk request out of a descriptor chain the guest built,
//! shared by the VMM's in-process virtio-blk device and the vhost-user-blk
//! backend of LiveSync disks.
//!
//! The guest decides every address and length, and virtio 1.x lets it split
//! header, data and status across descriptors however it likes, so parsing
//! works on byte ranges: the first 16 readable bytes are the header, the last
//! writable byte is the status, and what lies between is data. Nothing here
//! trusts the guest: every range is checked against guest memory, sizes are
//! bounded, and a bad chain becomes an error the guest can be told about.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

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
const HEADER_LEN: usize = 16;
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

/// A parsed request whose data segments lie in guest memory.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// The operation.
    pub op: Op,
    /// First sector.
    pub sector: u64,
    /// Data buffers in order.
    pub data: Vec<Segment>,
    /// Total data length in bytes, at most the `max_data` given to [`parse`].
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a chain is not a valid request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No writable byte for the status: nothing can be reported to the guest.
    #[error("descriptor chain has no writable status byte")]
    NoStatus,
    /// The chain is malformed; the status byte can carry the error.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// A request type the device does not implement.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

impl RequestError {
    /// The status byte that tells the guest about this error.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => status::UNSUPP,
            _ => status::IOERR,
        }
    }
}

/// A refused chain: why, and where its status byte is, if it has one.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    /// Why the request was refused.
    pub error: RequestError,
    /// Where to write the status byte.
    pub status: Option<GuestAddress>,
}

/// Takes `n` bytes off the front of `segs`.
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

/// Parses the request in `chain`; reads and writes of more than `max_data`
/// bytes are refused (a device that promises no limit passes `u64::MAX`).
pub fn parse<M>(
    chain: DescriptorChain<M>,
    mem: &(impl GuestMemoryBackend + ?Sized),
    max_data: u64,
) -> Result<Request, Refused>
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    let mut readable = Vec::new();
    let mut writable: Vec<Segment> = Vec::new();
    let mut error = None;
    // The chain iterator stops after as many descriptors as the table holds,
    // so a looping chain ends.
    for d in chain {
        if d.len() == 0 {
            continue;
        }
        let seg = Segment {
            addr: d.addr(),
            len: d.len(),
        };
        if !mem.check_range(seg.addr, seg.len as usize) {
            error.get_or_insert(RequestError::Malformed("descriptor outside guest memory"));
            continue;
        }
        if d.is_write_only() {
            writable.push(seg);
        } else if writable.is_empty() {
            readable.push(seg);
        } else {
            error.get_or_insert(RequestError::Malformed(
                "readable descriptor after a writable one",
            ));
        }
    }
    let Some(last) = writable.last_mut() else {
        return Err(Refused {
            error: RequestError::NoStatus,
            status: None,
        });
    };
    let status = last.addr.unchecked_add(u64::from(last.len) - 1);
    last.len -= 1;
    if last.len == 0 {
        writable.pop();
    }
    let refuse = |error| {
        Err(Refused {
            error,
            status: Some(status),
        })
    };
    if let Some(e) = error {
        return refuse(e);
    }

    let Some(header_segs) = take_front(&mut readable, HEADER_LEN as u64) else {
        return refuse(RequestError::Malformed(
            "request header shorter than 16 bytes",
        ));
    };
    let mut header = [0u8; HEADER_LEN];
    let mut at = 0usize;
    for s in &header_segs {
        let end = at + s.len as usize;
        if mem.read_slice(&mut header[at..end], s.addr).is_err() {
            return refuse(RequestError::Malformed("request header unreadable"));
        }
        at = end;
    }
    let typ = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let (op, data, stray) = match typ {
        kind::IN => (Op::Read, writable, total(&readable)),
        kind::OUT => (Op::Write, readable, total(&writable)),
        kind::FLUSH => (Op::Flush, Vec::new(), total(&readable) + total(&writable)),
        kind::GET_ID => (Op::GetId, writable, total(&readable)),
        other => return refuse(RequestError::Unsupported(other)),
    };
    if stray != 0 {
        return refuse(RequestError::Malformed(
            "data buffers in the wrong direction",
        ));
    }
    let data_len = total(&data);
    match op {
        Op::Read | Op::Write if !data_len.is_multiple_of(SECTOR_SIZE) => {
            return refuse(RequestError::Malformed(
                "data length is not a whole number of sectors",
            ))
        }
        Op::Read | Op::Write if data_len > max_data => {
            return refuse(RequestError::Malformed(
                "request larger than the device accepts",
            ))
        }
        Op::GetId if data_len < ID_LEN as u64 => {
            return refuse(RequestError::Malformed(
                "GET_ID buffer shorter than 20 bytes",
            ))
        }
        _ => {}
    }
    Ok(Request {
        op,
        sector,
        data,
        data_len,
        status,
    })
}

/// The byte range a read or write covers, if it lies inside a disk of
/// `capacity` bytes.
pub fn disk_range(req: &Request, capacity: u64) -> Option<u64> {
    let offset = req.sector.checked_mul(SECTOR_SIZE)?;
    let end = offset.checked_add(req.data_len)?;
    (end <= capacity).then_some(offset)
}

/// Copies the request's data out of guest memory.
pub fn gather(
    mem: &(impl GuestMemoryBackend + ?Sized),
    segs: &[Segment],
    len: u64,
) -> Result<Vec<u8>, vm_memory::GuestMemoryError> {
    let mut buf = vec![0u8; len as usize];
    let mut at = 0usize;
    for s in segs {
        let end = at + s.len as usize;
        mem.read_slice(&mut buf[at..end], s.addr)?;
        at = end;
    }
    Ok(buf)
}

/// Copies `buf` into the request's data buffers, as far as they reach.
pub fn scatter(
    mem: &(impl GuestMemoryBackend + ?Sized),
    segs: &[Segment],
    buf: &[u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut rest = buf;
    for s in segs {
        if rest.is_empty() {
            break;
        }
        let n = (s.len as usize).min(rest.len());
        mem.write_slice(&rest[..n], s.addr)?;
        rest = &rest[n..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::GuestMemoryMmap;

    const R: u16 = 0;
    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    /// Builds a chain of (addr, len, flags) and parses it with a 1 MiB limit.
    fn run(m: &GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> Result<Request, Refused> {
        run_limited(m, descs, 1 << 20)
    }

    /// Builds a chain of (addr, len, flags) and parses it.
    fn run_limited(
        m: &GuestMemoryMmap,
        descs: &[(u64, u32, u16)],
        max_data: u64,
    ) -> Result<Request, Refused> {
        let q = MockSplitQueue::new(m, 16);
        let v: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, (a, l, f))| {
                RawDescriptor::from(SplitDescriptor::new(*a, *l, *f, (i + 1) as u16))
            })
            .collect();
        q.build_desc_chain(&v).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let chain = queue.pop_descriptor_chain(m).unwrap();
        parse(chain, m, max_data)
    }

    fn header(m: &GuestMemoryMmap, at: u64, typ: u32, sector: u64) {
        m.write_obj(typ, GuestAddress(at)).unwrap();
        m.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        m.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    fn error(r: Result<Request, Refused>) -> RequestError {
        r.unwrap_err().error
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
        assert_eq!((r.op, r.data_len), (Op::Read, 1024));
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
        let r = run(&m, &[(0x10000, 16, R), (0x20000, 512, R)]);
        assert_eq!(
            r.unwrap_err(),
            Refused {
                error: RequestError::NoStatus,
                status: None
            }
        );
        let r = run(&m, &[(0x10000, 8, R), (0x30000, 1, W)]);
        assert_eq!(r.as_ref().unwrap_err().status, Some(GuestAddress(0x30000)));
        assert!(matches!(error(r), RequestError::Malformed(_)));
        for bad in [
            &[(0x10000, 16, R), (0x20000, 100, R), (0x30000, 1, W)][..],
            &[(0x10000, 16, R), (0x2000_0000, 512, R), (0x30000, 1, W)],
            &[(0x10000, 16, R), (u64::MAX - 10, 512, R), (0x30000, 1, W)],
            &[
                (0x10000, 16, R),
                (0x30000, 1, W),
                (0x20000, 512, R),
                (0x30010, 1, W),
            ],
            &[(0x10000, 16, R), (0x20000, 512, W), (0x30000, 1, W)],
            // Twice the 1 MiB limit given to parse.
            &[(0x10000, 16, R), (0x20_0000, 2 << 20, R), (0x30000, 1, W)],
        ] {
            assert!(
                matches!(error(run(&m, bad)), RequestError::Malformed(_)),
                "{bad:x?}"
            );
        }
        let e = error(run(&m, &[(0x10000, 8, R), (0x30000, 1, W)]));
        assert_eq!(e.status(), status::IOERR);
        header(&m, 0x10000, 99, 0);
        let e = error(run(&m, &[(0x10000, 16, R), (0x30000, 1, W)]));
        assert_eq!(
            (e.clone(), e.status()),
            (RequestError::Unsupported(99), status::UNSUPP)
        );
        header(&m, 0x10000, kind::GET_ID, 0);
        assert!(matches!(
            error(run(&m, &[(0x10000, 16, R), (0x30000, 5, W)])),
            RequestError::Malformed(_)
        ));
    }

    #[test]
    fn the_size_limit_is_the_callers() {
        let m = mem();
        header(&m, 0x10000, kind::OUT, 0);
        let big = [(0x10000, 16, R), (0x20_0000, 2 << 20, R), (0x30000, 1, W)];
        assert!(matches!(
            error(run_limited(&m, &big, (2 << 20) - 512)),
            RequestError::Malformed(_)
        ));
        let r = run_limited(&m, &big, u64::MAX).unwrap();
        assert_eq!((r.op, r.data_len), (Op::Write, 2 << 20));
    }

    #[test]
    fn a_descriptor_may_span_adjacent_regions() {
        let m = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 8 << 20),
            (GuestAddress(8 << 20), 8 << 20),
        ])
        .unwrap();
        header(&m, 0x10000, kind::OUT, 0);
        let r = run(
            &m,
            &[
                (0x10000, 16, R),
                ((8 << 20) - 512, 1024, R),
                (0x30000, 1, W),
            ],
        );
        assert_eq!(r.unwrap().data_len, 1024);
    }

    #[test]
    fn a_looping_chain_ends() {
        let m = mem();
        header(&m, 0x10000, kind::OUT, 0);
        let q = MockSplitQueue::new(&m, 16);
        // Descriptor 0 -> 1 -> 0 -> ... ; the chain iterator stops after the queue size.
        let next = VRING_DESC_F_NEXT as u16;
        let v = [
            RawDescriptor::from(SplitDescriptor::new(0x10000, 16, next, 1)),
            RawDescriptor::from(SplitDescriptor::new(0x20000, 512, next, 0)),
        ];
        q.build_desc_chain(&v).unwrap();
        // build_desc_chain rewrites `next`; point descriptor 1 back to 0.
        m.write_obj(0u16, q.desc_table_addr().unchecked_add(16 + 14))
            .unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let chain = queue.pop_descriptor_chain(&m).unwrap();
        assert_eq!(error(parse(chain, &m, 1 << 20)), RequestError::NoStatus);
    }

    #[test]
    fn ranges_past_the_end_or_overflowing_are_refused() {
        let req = |sector, data_len| Request {
            op: Op::Read,
            sector,
            data: Vec::new(),
            data_len,
            status: GuestAddress(0),
        };
        assert_eq!(disk_range(&req(7, 512), 4096), Some(3584));
        assert_eq!(disk_range(&req(8, 512), 4096), None);
        assert_eq!(disk_range(&req(u64::MAX / 256, 512), u64::MAX), None);
    }

    #[test]
    fn gather_and_scatter_follow_the_segments() {
        let m = mem();
        let segs = [
            Segment {
                addr: GuestAddress(0x1000),
                len: 3,
            },
            Segment {
                addr: GuestAddress(0x2000),
                len: 5,
            },
        ];
        scatter(&m, &segs, b"abcdefgh").unwrap();
        assert_eq!(gather(&m, &segs, 8).unwrap(), b"abcdefgh");
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x1003)).unwrap(), 0);
        assert!(gather(
            &m,
            &[Segment {
                addr: GuestAddress(16 << 20),
                len: 1
            }],
            1
        )
        .is_err());
    }
}
