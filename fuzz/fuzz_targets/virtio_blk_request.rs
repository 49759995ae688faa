//! virtio-blk request parsing (`enspeed_virtio_blk::parse`) on a descriptor chain a guest built
//! from the input, then the data copies the devices make for a request that parsed.
//!
//! Input: byte 0 is the head descriptor's index, byte 1 picks the size limit, and the rest is
//! guest memory from address 0, where the queue's 16-entry descriptor table starts (16 bytes a
//! descriptor: address, length, flags, next, little endian). Guest memory is two 64 KiB regions
//! with a hole between them, so ranges can run off a region's end or into the hole.
//!
//! A request that parses lies in guest memory: its data and status byte can be read and
//! written, its length is what its segments add up to and within the limit, and its disk
//! range, when there is one, lies inside the disk.

#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_blk::{disk_range, gather, parse, scatter, Op, ID_LEN, SECTOR_SIZE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const QUEUE_SIZE: u16 = 16;
const REGION: usize = 0x1_0000;
const SECOND_REGION: u64 = 0x2_0000;
/// The rings follow the descriptor table, as a driver lays them out.
const AVAIL: u64 = 16 * QUEUE_SIZE as u64;
const USED: u64 = 0x200;
/// The disk requests are checked against.
const CAPACITY: u64 = 1 << 20;
/// Larger requests are not copied (the VMM's device never copies them either, it hands the
/// segments to the kernel): a chain of indirect descriptors over all of guest memory would make
/// each run allocate hundreds of MiB.
const MAX_COPY: u64 = 4 << 20;

fuzz_target!(|data: &[u8]| {
    let [head, limit, image @ ..] = data else {
        return;
    };
    let max_data = match limit % 3 {
        0 => u64::MAX,
        1 => 128 << 10,
        _ => 4096,
    };
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), REGION),
        (GuestAddress(SECOND_REGION), REGION),
    ])
    .expect("guest memory maps");
    let image = &image[..image.len().min(REGION)];
    mem.write_slice(image, GuestAddress(0)).unwrap();
    // One request available: flags, idx, then the ring's first entry.
    mem.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
    mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    mem.write_obj(u16::from(*head), GuestAddress(AVAIL + 4))
        .unwrap();

    let mut queue = Queue::new(QUEUE_SIZE).unwrap();
    queue.set_size(QUEUE_SIZE);
    queue.try_set_desc_table_address(GuestAddress(0)).unwrap();
    queue
        .try_set_avail_ring_address(GuestAddress(AVAIL))
        .unwrap();
    queue.try_set_used_ring_address(GuestAddress(USED)).unwrap();
    queue.set_ready(true);
    let Some(chain) = queue.pop_descriptor_chain(&mem) else {
        return;
    };

    let req = match parse(chain, &mem, max_data) {
        Ok(req) => req,
        Err(refused) => {
            if let Some(status) = refused.status {
                assert!(
                    mem.check_range(status, 1),
                    "refused with a status byte outside memory"
                );
            }
            return;
        }
    };
    assert!(mem.check_range(req.status, 1), "status byte outside memory");
    for s in &req.data {
        assert!(s.len > 0, "empty data segment");
        assert!(
            mem.check_range(s.addr, s.len as usize),
            "data segment outside memory"
        );
    }
    let total: u64 = req.data.iter().map(|s| u64::from(s.len)).sum();
    assert_eq!(req.data_len, total);
    match req.op {
        Op::Read | Op::Write => {
            assert!(req.data_len <= max_data);
            assert_eq!(req.data_len % SECTOR_SIZE, 0);
        }
        Op::GetId => assert!(req.data_len >= ID_LEN as u64),
        Op::Flush => assert!(req.data.is_empty()),
    }
    if let Some(offset) = disk_range(&req, CAPACITY) {
        assert_eq!(Some(offset), req.sector.checked_mul(SECTOR_SIZE));
        assert!(offset + req.data_len <= CAPACITY);
    }
    if req.data_len > MAX_COPY {
        return;
    }
    match req.op {
        Op::Write => {
            let buf = gather(&mem, &req.data, req.data_len).expect("a parsed write's data reads");
            assert_eq!(buf.len() as u64, req.data_len);
        }
        Op::Read => {
            let buf = vec![0xa5; req.data_len as usize];
            scatter(&mem, &req.data, &buf).expect("a parsed read's buffers take its data");
        }
        Op::GetId => {
            scatter(&mem, &req.data, &[0x5a; ID_LEN])
                .expect("a parsed GET_ID's buffer takes the id");
        }
        Op::Flush => {}
    }
});
