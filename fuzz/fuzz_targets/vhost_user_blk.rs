//! The vhost-user-blk backend's request path (`blockrepl::vhost_blk`) on a ring a guest filled
//! from the input, served in-process (`vhost_blk::serve_ring`, no socket) against a small disk
//! held in memory.
//!
//! Input: byte 0 says how the store behaves (read-only or not; writes and flushes completed
//! at once, failed, completed only after the ring was served, or dropped unanswered) and the
//! rest is guest memory from address 0: the 16-entry descriptor table (16 bytes a descriptor:
//! address, length, flags, next), then at 0x100 the available ring (flags, idx, 16 heads). The
//! used ring, at 0x200, is the backend's to write.
//!
//! The backend never asks the store for bytes outside the disk or off a sector boundary, never
//! writes a read-only disk, and never panics or spins on a ring, whatever the guest put there.
//! (What it returns on the used ring is not checked: a guest may point its buffers at its own
//! rings, and the backend's writes there are then the guest's doing.)

#![no_main]

use std::io;
use std::sync::{Arc, Mutex};

use blockrepl::store::{BlockStore, Done};
use blockrepl::vhost_blk::{serve_ring, GuestMemoryMmap};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const QUEUE_SIZE: u16 = 16;
const MEMORY: usize = 0x1_0000;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
const CAPACITY: u64 = 64 << 10;

/// How the store answers writes and flushes.
#[derive(Clone, Copy, PartialEq)]
enum Answer {
    Now,
    Fail,
    Later,
    Never,
}

/// A disk in memory that checks what the backend asks of it.
struct MemStore {
    data: Mutex<Vec<u8>>,
    read_only: bool,
    answer: Answer,
    /// Callbacks held back until the ring has been served.
    later: Mutex<Vec<Done>>,
}

impl MemStore {
    fn check(&self, offset: u64, len: usize) {
        assert_eq!(offset % 512, 0, "I/O at {offset}, not on a sector");
        assert_eq!(len % 512, 0, "I/O of {len} bytes, not whole sectors");
        assert!(
            offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= CAPACITY),
            "{len} bytes at {offset} lie outside a disk of {CAPACITY} bytes"
        );
    }

    fn complete(&self, done: Done) {
        match self.answer {
            Answer::Now => done(Ok(())),
            Answer::Fail => done(Err(io::Error::other("injected failure"))),
            Answer::Later => self.later.lock().unwrap().push(done),
            Answer::Never => drop(done),
        }
    }
}

impl BlockStore for MemStore {
    fn capacity(&self) -> u64 {
        CAPACITY
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn device_id(&self) -> String {
        "fuzz-disk".into()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len());
        let data = self.data.lock().unwrap();
        buf.copy_from_slice(&data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    fn write(&self, offset: u64, bytes: Vec<u8>, _fua: bool, done: Done) {
        assert!(!self.read_only, "write to a read-only disk");
        self.check(offset, bytes.len());
        let mut data = self.data.lock().unwrap();
        data[offset as usize..offset as usize + bytes.len()].copy_from_slice(&bytes);
        drop(data);
        self.complete(done);
    }

    fn flush(&self, done: Done) {
        self.complete(done);
    }
}

fuzz_target!(|data: &[u8]| {
    let [mode, image @ ..] = data else {
        return;
    };
    let store = Arc::new(MemStore {
        data: Mutex::new(vec![0; CAPACITY as usize]),
        read_only: mode & 1 == 1,
        answer: match (mode >> 1) & 3 {
            0 => Answer::Now,
            1 => Answer::Fail,
            2 => Answer::Later,
            _ => Answer::Never,
        },
        later: Mutex::new(Vec::new()),
    });
    let mem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY)]).expect("guest memory maps");
    mem.write_slice(&image[..image.len().min(MEMORY)], GuestAddress(0))
        .unwrap();

    serve_ring(
        store.clone(),
        &mem,
        QUEUE_SIZE,
        [GuestAddress(0), GuestAddress(AVAIL), GuestAddress(USED)],
    )
    .expect("the ring is served");
    let held = std::mem::take(&mut *store.later.lock().unwrap());
    for done in held {
        done(Ok(()));
    }
});
