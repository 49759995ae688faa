//! virtio-blk over a file: read, write, flush, device id, and a read-only
//! mode whose media can be changed or ejected while the guest runs (ISO
//! images as CD-ROMs).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use virtio_blk::{status, Op, Request, ID_LEN, SECTOR_SIZE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::worker::{QueueHandler, Worker};
use super::{features, ids, read_config_bytes, Interrupt, RingPosition, VirtioDevice};
use crate::bus::lock;
use crate::memory::GuestMemory;

const QUEUE_SIZE: u16 = 256;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The backing file cannot be opened.
    #[error("cannot open disk {path}: {err}")]
    Open {
        /// Path.
        path: PathBuf,
        /// Cause.
        err: std::io::Error,
    },
    /// Media change on a writable disk.
    #[error("disk {0} is not removable media (only read-only disks are)")]
    NotRemovable(PathBuf),
}

/// The file behind the disk; `None` when the media is ejected.
struct Backend {
    file: Option<File>,
    path: Option<PathBuf>,
    sectors: u64,
}

impl Backend {
    fn open(path: &Path, readonly: bool) -> Result<Backend, BlockError> {
        let (file, len) =
            crate::devices::open_image(path, readonly).map_err(|err| BlockError::Open {
                path: path.to_owned(),
                err,
            })?;
        Ok(Backend {
            file: Some(file),
            path: Some(path.to_owned()),
            sectors: len / SECTOR_SIZE,
        })
    }
}

/// A virtio-blk device.
pub struct Block {
    backend: Arc<Mutex<Backend>>,
    readonly: bool,
    id: [u8; ID_LEN],
    worker: Option<Worker<BlockWorker>>,
    name: String,
}

impl Block {
    /// Opens `path` as a disk; `readonly` disks are removable media, and an empty `path`
    /// makes such a drive with no media in it.
    pub fn new(path: &Path, readonly: bool) -> Result<Block, BlockError> {
        let backend = if readonly && path.as_os_str().is_empty() {
            Backend {
                file: None,
                path: None,
                sectors: 0,
            }
        } else {
            Backend::open(path, readonly)?
        };
        let mut id = [0u8; ID_LEN];
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = name.len().min(id.len());
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        Ok(Block {
            backend: Arc::new(Mutex::new(backend)),
            readonly,
            id,
            worker: None,
            name,
        })
    }

    /// Replaces (`Some`) or ejects (`None`) the media. The caller tells the
    /// guest through a configuration-change interrupt.
    pub fn change_media(&mut self, path: Option<&Path>) -> Result<(), BlockError> {
        if !self.readonly {
            let p = lock(&self.backend).path.clone().unwrap_or_default();
            return Err(BlockError::NotRemovable(p));
        }
        let new = match path {
            Some(p) => Backend::open(p, true)?,
            None => Backend {
                file: None,
                path: None,
                sectors: 0,
            },
        };
        *lock(&self.backend) = new;
        Ok(())
    }

    /// The current media path, if any.
    pub fn media(&self) -> Option<PathBuf> {
        lock(&self.backend).path.clone()
    }

    /// Whether the disk is read-only (removable) media.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    fn config(&self) -> [u8; 24] {
        let mut c = [0u8; 24];
        c[0..8].copy_from_slice(&lock(&self.backend).sectors.to_le_bytes());
        // seg_max: descriptors per request minus header and status.
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        ids::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let ro = if self.readonly { F_RO } else { 0 };
        features::VERSION_1
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC
            | F_SEG_MAX
            | F_BLK_SIZE
            | F_FLUSH
            | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemory,
        _features: u64,
        mut queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), String> {
        let queue = queues.pop().ok_or("virtio-blk needs one queue")?;
        let handler = BlockWorker {
            mem,
            queue,
            backend: self.backend.clone(),
            readonly: self.readonly,
            id: self.id,
            interrupt,
            iovecs: Vec::with_capacity(usize::from(QUEUE_SIZE)),
        };
        let w = Worker::spawn(format!("blk-{}", self.name), handler, queue_evts)
            .map_err(|e| format!("cannot start disk worker: {e}"))?;
        self.worker = Some(w);
        Ok(())
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }

    // Requests run to completion on the worker: once it stopped, none is in flight.
    fn pause(&mut self, _mem: &GuestMemory) -> Result<Vec<RingPosition>, String> {
        let w = self
            .worker
            .take()
            .ok_or_else(|| format!("disk {}: its worker is not running", self.name))?;
        let h = w
            .stop()
            .ok_or_else(|| format!("disk {}: its worker had failed", self.name))?;
        Ok(vec![RingPosition::of(&h.queue)])
    }
}

struct BlockWorker {
    mem: GuestMemory,
    queue: Queue,
    backend: Arc<Mutex<Backend>>,
    readonly: bool,
    id: [u8; ID_LEN],
    interrupt: Arc<Interrupt>,
    iovecs: Vec<libc::iovec>,
}

// SAFETY: the iovec buffer only ever holds pointers into guest memory that
// this worker owns a handle to; it is rebuilt for every request.
unsafe impl Send for BlockWorker {}

impl BlockWorker {
    /// Runs one parsed request; returns the status byte and bytes written to the guest.
    fn execute(&mut self, req: &Request) -> (u8, u32) {
        use status::{IOERR, OK};
        let backend = lock(&self.backend);
        let Some(file) = backend.file.as_ref() else {
            // Ejected media: every access fails, as on an empty drive.
            return (IOERR, 0);
        };
        match req.op {
            Op::Read | Op::Write => {
                if req.op == Op::Write && self.readonly {
                    return (IOERR, 0);
                }
                let Some(offset) = virtio_blk::disk_range(req, backend.sectors * SECTOR_SIZE)
                else {
                    return (IOERR, 0);
                };
                match transfer(&self.mem, &mut self.iovecs, file, req, offset) {
                    Ok(()) if req.op == Op::Read => (OK, req.data_len as u32),
                    Ok(()) => (OK, 0),
                    Err(e) => {
                        tracing::warn!(error = %e, sector = req.sector, "disk I/O failed");
                        (IOERR, 0)
                    }
                }
            }
            Op::Flush => match file.sync_data() {
                Ok(()) => (OK, 0),
                Err(e) => {
                    tracing::warn!(error = %e, "disk flush failed");
                    (IOERR, 0)
                }
            },
            Op::GetId => {
                // The id may span several guest buffers; parse checked they hold ID_LEN bytes.
                if virtio_blk::scatter(&self.mem, &req.data, &self.id).is_err() {
                    return (IOERR, 0);
                }
                (OK, ID_LEN as u32)
            }
        }
    }
}

/// Moves a request's data with one preadv/pwritev, straight between the
/// file and guest memory.
fn transfer(
    mem: &GuestMemory,
    iovecs: &mut Vec<libc::iovec>,
    file: &File,
    req: &Request,
    offset: u64,
) -> std::io::Result<()> {
    iovecs.clear();
    for s in &req.data {
        let slice = mem
            .get_slice(s.addr, s.len as usize)
            .map_err(|e| std::io::Error::other(format!("guest buffer: {e}")))?;
        iovecs.push(libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: slice.len(),
        });
    }
    let mut offset = offset as i64;
    let mut iov: &mut [libc::iovec] = iovecs;
    while !iov.is_empty() {
        let n = iov.len().min(libc::UIO_MAXIOV as usize) as i32;
        // SAFETY: every iovec points into mapped guest memory checked by
        // get_slice above, which stays mapped while `self.mem` lives.
        let done = unsafe {
            if req.op == Op::Read {
                libc::preadv(file.as_raw_fd(), iov.as_ptr(), n, offset)
            } else {
                libc::pwritev(file.as_raw_fd(), iov.as_ptr(), n, offset)
            }
        };
        if done < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if done == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "file shorter than disk",
            ));
        }
        offset += done as i64;
        // Skip what was transferred.
        let mut left = done as usize;
        while left > 0 && !iov.is_empty() {
            if left >= iov[0].iov_len {
                left -= iov[0].iov_len;
                iov = &mut iov[1..];
            } else {
                iov[0].iov_base = iov[0].iov_base.wrapping_byte_add(left);
                iov[0].iov_len -= left;
                left = 0;
            }
        }
    }
    if req.op == Op::Read {
        // Written behind vm-memory's back: marked in guest memory's bitmap, now that the data
        // is there, for a live migration to send again.
        use vm_memory::bitmap::Bitmap;
        for s in &req.data {
            if let Ok(slice) = mem.get_slice(s.addr, s.len as usize) {
                slice.bitmap().mark_dirty(0, slice.len());
            }
        }
    }
    Ok(())
}

impl BlockWorker {
    fn process(&mut self) {
        loop {
            if self.queue.disable_notification(&self.mem).is_err() {
                return;
            }
            while let Some(chain) = self.queue.pop_descriptor_chain(&self.mem) {
                let head = chain.head_index();
                // No size limit: the device promises no size_max, and the
                // chain's length is bounded by the queue.
                let parsed = virtio_blk::parse(chain, &self.mem, u64::MAX);
                let (status_addr, status, len) = match parsed {
                    Ok(req) => {
                        let (st, len) = self.execute(&req);
                        (Some(req.status), st, len)
                    }
                    Err(refused) => {
                        tracing::debug!(error = %refused.error, "refused virtio-blk request");
                        (refused.status, refused.error.status(), 0)
                    }
                };
                let used = match status_addr {
                    Some(a) if self.mem.write_obj(status, a).is_ok() => len + 1,
                    _ => 0,
                };
                if let Err(e) = self.queue.add_used(&self.mem, head, used) {
                    tracing::warn!(error = ?e, "cannot return a used buffer");
                }
            }
            match self.queue.enable_notification(&self.mem) {
                Ok(true) if !super::ring_broken(&mut self.queue, &self.mem) => continue,
                _ => break,
            }
        }
        if self.queue.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.signal_used(0);
        }
    }
}

impl QueueHandler for BlockWorker {
    fn queue_notified(&mut self, _index: usize) {
        self.process();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestAddress};

    /// Runs one request (header type/sector, one data buffer) through a
    /// worker on a real file; returns the status byte and used length.
    fn run(
        path: &Path,
        readonly: bool,
        typ: u32,
        sector: u64,
        data: (u64, u32),
    ) -> (u8, u32, GuestMemory) {
        run_on(
            crate::memory::create(16).unwrap().0,
            path,
            readonly,
            typ,
            sector,
            data,
        )
    }

    /// [`run`] on `mem`.
    fn run_on(
        mem: GuestMemory,
        path: &Path,
        readonly: bool,
        typ: u32,
        sector: u64,
        data: (u64, u32),
    ) -> (u8, u32, GuestMemory) {
        let q = MockSplitQueue::new(&mem, 16);
        mem.write_obj(typ, GuestAddress(0x10000)).unwrap();
        mem.write_obj(sector, GuestAddress(0x10008)).unwrap();
        let write = if typ == virtio_blk::kind::OUT {
            0
        } else {
            VRING_DESC_F_WRITE as u16
        };
        let next = VRING_DESC_F_NEXT as u16;
        let v = [
            RawDescriptor::from(SplitDescriptor::new(0x10000, 16, next, 1)),
            RawDescriptor::from(SplitDescriptor::new(data.0, data.1, write | next, 2)),
            RawDescriptor::from(SplitDescriptor::new(
                0x30000,
                1,
                VRING_DESC_F_WRITE as u16,
                0,
            )),
        ];
        q.build_desc_chain(&v).unwrap();
        mem.write_obj(0xffu8, GuestAddress(0x30000)).unwrap();
        let backend = Arc::new(Mutex::new(Backend::open(path, readonly).unwrap()));
        let interrupt = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut w = BlockWorker {
            mem: mem.clone(),
            queue: q.create_queue().unwrap(),
            backend,
            readonly,
            id: [0; ID_LEN],
            interrupt: interrupt.clone(),
            iovecs: Vec::new(),
        };
        w.process();
        assert_ne!(
            interrupt.status() & super::super::INT_VRING,
            0,
            "the guest must be told"
        );
        let used_len: u32 = mem.read_obj(q.used_addr().unchecked_add(4 + 4)).unwrap();
        (mem.read_obj(GuestAddress(0x30000)).unwrap(), used_len, mem)
    }

    /// The data a read puts straight into guest memory (preadv, behind vm-memory's back) is
    /// marked in the memory's bitmap, for a live migration. (The status byte and the used ring
    /// go through vm-memory, which marks them; the test wrote those pages itself.)
    #[test]
    fn a_read_marks_the_pages_it_wrote_in_guest_memory_s_bitmap() {
        let path = tmp("bitmap", 1 << 20);
        let mem = crate::memory::create(16).unwrap().0;
        let region = mem.iter().next().unwrap();
        let bitmap = std::ops::Deref::deref(region).bitmap();
        bitmap.reset();
        let (st, _, mem2) = run_on(
            mem.clone(),
            &path,
            true,
            virtio_blk::kind::IN,
            0,
            (0x50000, 8192),
        );
        assert_eq!(st, status::OK);
        let pages = crate::migration::pages_of(&bitmap.get_and_reset());
        for page in [0x50, 0x51] {
            assert!(pages.contains(&page), "page {page:#x} not in {pages:x?}");
        }
        drop(mem2);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_ring_whose_available_index_runs_a_ring_ahead_is_left_alone_not_spun_on() {
        let p = tmp("broken-ring", 1 << 20);
        let mem = crate::memory::create(16).unwrap().0;
        let q = MockSplitQueue::new(&mem, 16);
        // The guest says 40 requests are there, on a ring of 16.
        mem.write_obj(40u16, q.avail_addr().unchecked_add(2))
            .unwrap();
        let interrupt = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut w = BlockWorker {
            mem: mem.clone(),
            queue: q.create_queue().unwrap(),
            backend: Arc::new(Mutex::new(Backend::open(&p, false).unwrap())),
            readonly: false,
            id: [0; ID_LEN],
            interrupt,
            iovecs: Vec::new(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            w.process();
            let _ = tx.send(());
        });
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .expect("the worker returned instead of spinning on the ring");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn writes_reach_the_file_and_reads_come_back() {
        use std::os::unix::fs::FileExt;
        let p = tmp("rw", 1 << 20);
        let (st, used, mem) = run(&p, false, virtio_blk::kind::IN, 0, (0x20000, 512));
        assert_eq!((st, used), (status::OK, 513));
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x20000)).unwrap(), 0);
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .write_all_at(&[0xab; 1024], 4096)
            .unwrap();
        let (st, used, mem) = run(&p, false, virtio_blk::kind::IN, 8, (0x20000, 1024));
        assert_eq!((st, used), (status::OK, 1025));
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0x20000 + 1016)).unwrap(),
            0xabab_abab_abab_abab
        );
        let (st, _, _) = run(&p, false, virtio_blk::kind::OUT, 16, (0x20000, 512));
        assert_eq!(st, status::OK);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn out_of_range_and_readonly_writes_fail_without_touching_the_file() {
        let p = tmp("range", 1 << 20);
        // Last sector is 2047: a read starting there of two sectors runs past the end.
        let (st, used, _) = run(&p, false, virtio_blk::kind::IN, 2047, (0x20000, 1024));
        assert_eq!((st, used), (status::IOERR, 1));
        let (st, _, _) = run(
            &p,
            false,
            virtio_blk::kind::IN,
            u64::MAX / 256,
            (0x20000, 512),
        );
        assert_eq!(st, status::IOERR);
        let (st, _, _) = run(&p, true, virtio_blk::kind::OUT, 0, (0x20000, 512));
        assert_eq!(st, status::IOERR);
        let (st, _, _) = run(&p, false, 77, 0, (0x20000, 512));
        assert_eq!(st, status::UNSUPP);
        assert!(
            std::fs::read(&p).unwrap().iter().all(|b| *b == 0),
            "a refused request wrote to the file"
        );
        std::fs::remove_file(p).unwrap();
    }

    fn tmp(name: &str, len: u64) -> PathBuf {
        let p = std::env::temp_dir().join(format!("enspeed-blk-{}-{name}", std::process::id()));
        let f = File::create(&p).unwrap();
        f.set_len(len).unwrap();
        p
    }

    #[test]
    fn config_reports_capacity_and_ro_feature() {
        let p = tmp("cfg", 1 << 20);
        let b = Block::new(&p, true).unwrap();
        let mut c = [0u8; 8];
        b.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c), 2048);
        assert_ne!(b.features() & F_RO, 0);
        let w = Block::new(&p, false).unwrap();
        assert_eq!(w.features() & F_RO, 0);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn only_readonly_media_can_change_and_eject_empties_it() {
        let p = tmp("media", 1 << 20);
        let q = tmp("media2", 2 << 20);
        let mut w = Block::new(&p, false).unwrap();
        assert!(matches!(
            w.change_media(None),
            Err(BlockError::NotRemovable(_))
        ));
        let mut r = Block::new(&p, true).unwrap();
        r.change_media(Some(&q)).unwrap();
        assert_eq!(r.media(), Some(q.clone()));
        let mut c = [0u8; 8];
        r.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c), 4096);
        r.change_media(None).unwrap();
        r.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c), 0);
        assert!(r
            .change_media(Some(Path::new("/nonexistent/x.iso")))
            .is_err());
        // A drive may start empty and get its media later.
        let mut e = Block::new(Path::new(""), true).unwrap();
        assert_eq!(e.media(), None);
        e.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c), 0);
        e.change_media(Some(&q)).unwrap();
        e.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c), 4096);
        assert!(Block::new(Path::new(""), false).is_err());
        std::fs::remove_file(p).unwrap();
        std::fs::remove_file(q).unwrap();
    }
}
