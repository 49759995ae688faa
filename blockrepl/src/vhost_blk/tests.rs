//! The backend driven by the `vhost` crate's real frontend over a real
//! socket, with guest memory in a memfd and a split ring written by hand the
//! way a guest driver writes it.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Address, FileOffset, GuestMemoryBackend, GuestRegionMmap};

use super::*;
use crate::store::{Done, FileStore};
use virtio_blk::kind;

const RING: u16 = 16;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDR: u64 = 0x10000;
const DATA: u64 = 0x100000;
const STATUS: u64 = 0x20000;
const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;

fn scratch(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("enspeed-vhost-blk-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// Guest RAM of `mib` MiB in one memfd, as the VMM has it.
fn guest_ram(mib: usize) -> GuestMemoryMmap {
    let name = CString::new("test-guest-ram").unwrap();
    // SAFETY: name is NUL-terminated; the fd is checked and owned below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd was just created and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len((mib << 20) as u64).unwrap();
    let region =
        GuestRegionMmap::from_range(GuestAddress(0), mib << 20, Some(FileOffset::new(file, 0)))
            .unwrap();
    GuestMemoryMmap::from_regions(vec![region]).unwrap()
}

/// A frontend with one started ring, driven like a guest driver.
struct Guest {
    fe: Frontend,
    mem: GuestMemoryMmap,
    kick: EventFd,
    _call: EventFd,
    next_desc: u16,
    avail_idx: u16,
    seen_used: u16,
}

impl Guest {
    fn connect(socket: &Path, ram_mib: usize) -> Guest {
        let mem = guest_ram(ram_mib);
        let mut fe = Frontend::connect(socket, 1).unwrap();
        fe.set_owner().unwrap();
        let features = fe.get_features().unwrap();
        fe.set_features(features).unwrap();
        let proto = fe.get_protocol_features().unwrap();
        assert!(proto
            .contains(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK));
        fe.set_protocol_features(
            VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK,
        )
        .unwrap();
        let regions: Vec<_> = mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).unwrap())
            .collect();
        fe.set_mem_table(&regions).unwrap();
        let host = |a: u64| mem.get_host_address(GuestAddress(a)).unwrap() as u64;
        fe.set_vring_num(0, RING).unwrap();
        fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: RING,
                flags: 0,
                desc_table_addr: host(DESC),
                used_ring_addr: host(USED),
                avail_ring_addr: host(AVAIL),
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(0, 0).unwrap();
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        fe.set_vring_call(0, &call).unwrap();
        fe.set_vring_kick(0, &kick).unwrap();
        fe.set_vring_enable(0, true).unwrap();
        Guest {
            fe,
            mem,
            kick,
            _call: call,
            next_desc: 0,
            avail_idx: 0,
            seen_used: 0,
        }
    }

    fn features(&self) -> u64 {
        self.fe.get_features().unwrap()
    }

    /// Makes the chain (addr, len, flags) available and kicks.
    fn submit(&mut self, descs: &[(u64, u32, u16)]) {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let at = GuestAddress(DESC + 16 * u64::from(self.next_desc));
            let next = (self.next_desc + 1) % RING;
            let flags = if i + 1 < descs.len() {
                flags | VRING_DESC_F_NEXT as u16
            } else {
                flags
            };
            self.mem.write_obj(addr, at).unwrap();
            self.mem.write_obj(len, at.unchecked_add(8)).unwrap();
            self.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
            self.mem.write_obj(next, at.unchecked_add(14)).unwrap();
            self.next_desc = next;
        }
        let slot = GuestAddress(AVAIL + 4 + 2 * u64::from(self.avail_idx % RING));
        self.mem.write_obj(head, slot).unwrap();
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        self.kick.write(1).unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// Waits for the next used element: (head, len).
    fn wait_used(&mut self) -> (u16, u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.used_idx() == self.seen_used {
            assert!(Instant::now() < deadline, "no used buffer within 10 s");
            std::thread::sleep(Duration::from_millis(1));
        }
        let at = USED + 4 + 8 * u64::from(self.seen_used % RING);
        self.seen_used = self.seen_used.wrapping_add(1);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        (id as u16, self.mem.read_obj(GuestAddress(at + 4)).unwrap())
    }

    fn header(&self, typ: u32, sector: u64) {
        self.mem.write_obj(typ, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    /// Runs one request with a data buffer of `len` bytes at DATA; returns
    /// the status byte and used length.
    fn io(&mut self, typ: u32, sector: u64, len: u32) -> (u8, u32) {
        self.header(typ, sector);
        let dir = if typ == kind::OUT { R } else { W };
        self.submit(&[(HDR, 16, R), (DATA, len, dir), (STATUS, 1, W)]);
        let (_, used) = self.wait_used();
        (self.status(), used)
    }
}

#[test]
fn serves_reads_writes_flush_and_id_and_refuses_bad_requests() {
    let dir = scratch("rw");
    let img = dir.join("disk0.img");
    File::create(&img).unwrap().set_len(1 << 20).unwrap();
    let store = Arc::new(FileStore::open(&img, false).unwrap());
    let server = spawn(&dir.join("sock"), store).unwrap();
    let mut g = Guest::connect(server.socket(), 16);

    let f = g.features();
    assert_eq!(f & blk::F_RO, 0);
    assert_ne!(f & blk::F_FLUSH, 0);
    assert_ne!(f & blk::F_VERSION_1, 0);
    let mut cfg = vec![0u8; blk::CONFIG_LEN];
    let (_, cfg_bytes) =
        g.fe.get_config(
            0,
            blk::CONFIG_LEN as u32,
            VhostUserConfigFlags::empty(),
            &cfg,
        )
        .unwrap();
    cfg.copy_from_slice(&cfg_bytes);
    assert_eq!(u64::from_le_bytes(cfg[0..8].try_into().unwrap()), 2048);
    assert_eq!(u32::from_le_bytes(cfg[20..24].try_into().unwrap()), 512);

    g.mem
        .write_slice(&[0xab; 4096], GuestAddress(DATA))
        .unwrap();
    assert_eq!(g.io(kind::OUT, 8, 4096), (status::OK, 1));
    let on_disk = std::fs::read(&img).unwrap();
    assert!(on_disk[4096..8192].iter().all(|b| *b == 0xab));
    assert!(on_disk[..4096].iter().all(|b| *b == 0));

    g.mem.write_slice(&[0; 4096], GuestAddress(DATA)).unwrap();
    assert_eq!(g.io(kind::IN, 8, 4096), (status::OK, 4097));
    assert_eq!(
        g.mem.read_obj::<u64>(GuestAddress(DATA + 4088)).unwrap(),
        0xabab_abab_abab_abab
    );

    g.header(kind::FLUSH, 0);
    g.submit(&[(HDR, 16, R), (STATUS, 1, W)]);
    assert_eq!(g.wait_used().1, 1);
    assert_eq!(g.status(), status::OK);

    assert_eq!(g.io(kind::GET_ID, 0, 20), (status::OK, 21));
    let mut id = [0u8; 20];
    g.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..10], b"disk0.img\0");

    // The last sector reads; the one past the end, or a range running over
    // it, or one whose byte offset overflows, does not.
    assert_eq!(g.io(kind::IN, 2047, 512).0, status::OK);
    assert_eq!(g.io(kind::IN, 2048, 512), (status::IOERR, 1));
    assert_eq!(g.io(kind::OUT, 2047, 1024), (status::IOERR, 1));
    assert_eq!(g.io(kind::IN, u64::MAX / 256, 512).0, status::IOERR);
    assert_eq!(g.io(99, 0, 512), (status::UNSUPP, 1));
    // A short header; data in the wrong direction; outside guest memory.
    g.header(kind::OUT, 0);
    g.submit(&[(HDR, 8, R), (STATUS, 1, W)]);
    assert_eq!((g.wait_used().1, g.status()), (1, status::IOERR));
    g.header(kind::OUT, 0);
    g.submit(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    assert_eq!((g.wait_used().1, g.status()), (1, status::IOERR));
    g.header(kind::IN, 0);
    g.submit(&[(HDR, 16, R), (64 << 20, 512, W), (STATUS, 1, W)]);
    assert_eq!((g.wait_used().1, g.status()), (1, status::IOERR));
    // No status byte: returned with nothing written, and the ring goes on.
    g.header(kind::IN, 0);
    g.submit(&[(HDR, 16, R)]);
    assert_eq!(g.wait_used().1, 0);
    assert_eq!(g.io(kind::IN, 0, 512).0, status::OK);

    assert_eq!(
        std::fs::read(&img).unwrap(),
        on_disk,
        "a refused request changed the disk"
    );
    drop(g);
    server.stop().unwrap();
    assert!(!dir.join("sock").exists(), "the socket is removed on stop");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_read_only_store_is_announced_and_refuses_writes() {
    let dir = scratch("ro");
    let img = dir.join("cd.iso");
    std::fs::write(&img, vec![7u8; 1 << 20]).unwrap();
    let server = spawn(
        &dir.join("sock"),
        Arc::new(FileStore::open(&img, true).unwrap()),
    )
    .unwrap();
    let mut g = Guest::connect(server.socket(), 16);
    assert_ne!(g.features() & blk::F_RO, 0);
    assert_eq!(g.io(kind::OUT, 0, 4096), (status::IOERR, 1));
    assert_eq!(g.io(kind::IN, 0, 4096), (status::OK, 4097));
    assert_eq!(g.mem.read_obj::<u8>(GuestAddress(DATA)).unwrap(), 7);
    assert!(std::fs::read(&img).unwrap().iter().all(|b| *b == 7));
    drop(g);
    drop(server);
    std::fs::remove_dir_all(dir).unwrap();
}

/// A write (offset and data) or a flush (`None`) waiting to be released.
type Held = (Option<(u64, Vec<u8>)>, Done);

/// A store in memory whose writes and flushes wait until the test releases
/// them, then complete on another thread, as a replicated store does.
struct HeldStore {
    data: Mutex<Vec<u8>>,
    held: Mutex<Vec<Held>>,
    arrived: Mutex<Sender<()>>,
}

impl HeldStore {
    fn new(size: usize) -> (Arc<HeldStore>, Receiver<()>) {
        let (tx, rx) = channel();
        let s = HeldStore {
            data: Mutex::new(vec![0; size]),
            held: Mutex::new(Vec::new()),
            arrived: Mutex::new(tx),
        };
        (Arc::new(s), rx)
    }

    /// Completes the `n` oldest held requests from a thread of their own.
    fn release(self: &Arc<Self>, n: usize) {
        let batch: Vec<_> = {
            let mut held = self.held.lock().unwrap();
            let n = n.min(held.len());
            held.drain(..n).collect()
        };
        let me = self.clone();
        std::thread::spawn(move || {
            for (write, done) in batch {
                if let Some((off, data)) = write {
                    me.data.lock().unwrap()[off as usize..off as usize + data.len()]
                        .copy_from_slice(&data);
                }
                done(Ok(()));
            }
        })
        .join()
        .unwrap();
    }

    fn held(&self) -> usize {
        self.held.lock().unwrap().len()
    }
}

impl BlockStore for HeldStore {
    fn capacity(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn device_id(&self) -> String {
        "held".into()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, data: Vec<u8>, _fua: bool, done: Done) {
        self.held.lock().unwrap().push((Some((offset, data)), done));
        let _ = self.arrived.lock().unwrap().send(());
    }
    fn flush(&self, done: Done) {
        self.held.lock().unwrap().push((None, done));
        let _ = self.arrived.lock().unwrap().send(());
    }
}

#[test]
fn writes_complete_from_another_thread_and_stopping_the_ring_waits_for_them() {
    let dir = scratch("async");
    let (store, arrived) = HeldStore::new(1 << 20);
    let server = spawn(&dir.join("sock"), store.clone()).unwrap();
    let mut g = Guest::connect(server.socket(), 16);

    // Two writes and a flush in flight at once: the worker does not wait.
    g.mem.write_slice(&[1; 512], GuestAddress(DATA)).unwrap();
    g.mem
        .write_slice(&[2; 512], GuestAddress(DATA + 0x1000))
        .unwrap();
    g.header(kind::OUT, 0);
    g.mem
        .write_obj(kind::OUT, GuestAddress(HDR + 0x100))
        .unwrap();
    g.mem.write_obj(1u64, GuestAddress(HDR + 0x108)).unwrap();
    g.submit(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
    g.submit(&[
        (HDR + 0x100, 16, R),
        (DATA + 0x1000, 512, R),
        (STATUS + 1, 1, W),
    ]);
    g.mem
        .write_obj(kind::FLUSH, GuestAddress(HDR + 0x200))
        .unwrap();
    g.submit(&[(HDR + 0x200, 16, R), (STATUS + 2, 1, W)]);
    for _ in 0..3 {
        arrived.recv_timeout(Duration::from_secs(10)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(g.used_idx(), 0, "completed before the store answered");
    store.release(3);
    for _ in 0..3 {
        assert_eq!(g.wait_used().1, 1);
    }
    assert_eq!(
        store.data.lock().unwrap()[..1024],
        [[1u8; 512], [2u8; 512]].concat()[..]
    );

    // GET_VRING_BASE waits for the write in flight, which still reaches the guest.
    g.header(kind::OUT, 4);
    g.submit(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
    arrived.recv_timeout(Duration::from_secs(10)).unwrap();
    let fe = g.fe.clone();
    let stopper = std::thread::spawn(move || fe.get_vring_base(0).unwrap());
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !stopper.is_finished(),
        "the ring stopped with a write in flight"
    );
    store.release(1);
    assert_eq!(stopper.join().unwrap(), 4);
    assert_eq!(g.wait_used().1, 1);
    assert_eq!(g.status(), status::OK);
    drop(g);
    drop(server);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_write_budget_holds_requests_back_until_completions_free_it() {
    let dir = scratch("budget");
    let (store, arrived) = HeldStore::new(128 << 20);
    let server = spawn(&dir.join("sock"), store.clone()).unwrap();
    let mut g = Guest::connect(server.socket(), 64);
    // Five writes of the largest size; the budget takes four.
    let big = MAX_REQUEST_BYTES as u32;
    for i in 0..5u64 {
        let hdr = HDR + 0x100 * i;
        g.mem.write_obj(kind::OUT, GuestAddress(hdr)).unwrap();
        g.mem
            .write_obj(i * u64::from(big) / 512, GuestAddress(hdr + 8))
            .unwrap();
        g.submit(&[(hdr, 16, R), (DATA, big, R), (STATUS + i, 1, W)]);
    }
    let budget = (WRITE_BUDGET / MAX_REQUEST_BYTES) as usize;
    for _ in 0..budget {
        arrived.recv_timeout(Duration::from_secs(10)).unwrap();
    }
    assert!(
        arrived.recv_timeout(Duration::from_millis(200)).is_err(),
        "the budget was exceeded"
    );
    assert_eq!(store.held(), budget);
    store.release(1);
    arrived
        .recv_timeout(Duration::from_secs(10))
        .expect("the held-back write was taken after a completion");
    store.release(budget);
    for _ in 0..5 {
        assert_eq!(g.wait_used().1, 1);
    }
    drop(g);
    drop(server);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_next_frontend_is_served_after_one_hangs_up_and_stop_cuts_a_connection() {
    let dir = scratch("again");
    let img = dir.join("disk.img");
    File::create(&img).unwrap().set_len(1 << 20).unwrap();
    let server = spawn(
        &dir.join("sock"),
        Arc::new(FileStore::open(&img, false).unwrap()),
    )
    .unwrap();
    for round in 1..=3u8 {
        let mut g = Guest::connect(server.socket(), 16);
        g.mem
            .write_slice(&[round; 512], GuestAddress(DATA))
            .unwrap();
        assert_eq!(g.io(kind::OUT, u64::from(round), 512), (status::OK, 1));
        // A reboot stops the ring before hanging up; a crash does not.
        if round == 2 {
            assert_eq!(g.fe.get_vring_base(0).unwrap(), 1);
        }
    }
    let on_disk = std::fs::read(&img).unwrap();
    for round in 1..=3usize {
        assert!(on_disk[round * 512..(round + 1) * 512]
            .iter()
            .all(|b| *b as usize == round));
    }
    // A frontend still connected does not keep the server from stopping.
    let _g = Guest::connect(server.socket(), 16);
    server.stop().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn config_reads_beyond_the_structure_are_zero() {
    let (store, _rx) = HeldStore::new(1 << 20);
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let b = BlkBackend::new("test".into(), store, mem).unwrap();
    assert_eq!(b.get_config(0, 8), 2048u64.to_le_bytes());
    assert_eq!(b.get_config(20, 8), [0, 2, 0, 0, 0, 0, 0, 0]);
    assert_eq!(b.get_config(4096, 4), [0; 4]);
    assert_eq!(&b.id[..5], b"held\0");
}
