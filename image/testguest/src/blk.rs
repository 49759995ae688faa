//! virtio-blk driver (device id 2) and the block actions: `blk`, `blkid`,
//! `stamp`, `verify` and `bench`.

use crate::cmdline;
use crate::io::{crc32_update, rdtsc, Global, XorShift};
use crate::usermode;
use crate::virtio::{Error, Mmio, Seg, Virtq};
use crate::{fail, say};

/// VIRTIO_BLK_F_RO: the device is read-only (accepted only to report it).
const F_RO: u64 = 1 << 5;
/// VIRTIO_BLK_F_FLUSH: the device has a write cache and takes FLUSH.
const F_FLUSH: u64 = 1 << 9;

/// Request types.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

/// Status values.
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// Largest buffer one data descriptor carries; bigger requests use several.
const SEG_MAX: u32 = 128 * 1024;
/// Largest request (`tg.bs` limit).
const BS_MAX: u64 = 1 << 20;
/// Requests in flight per device (`tg.qd` limit).
const SLOTS: usize = 128;
/// Block devices we drive.
pub const MAX_BLK: usize = 4;

/// Header (device-readable) and status byte (device-writable) of one
/// request; lives in static memory, so its address is its physical address.
#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct ReqMem {
    typ: u32,
    reserved: u32,
    sector: u64,
    status: u8,
    _pad: [u8; 15],
}

/// One initialised virtio-blk device.
pub struct Blk {
    mmio: Mmio,
    vq: Virtq,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// VIRTIO_BLK_F_RO was offered.
    pub ro: bool,
    /// VIRTIO_BLK_F_FLUSH was negotiated.
    pub flush: bool,
    reqs: [ReqMem; SLOTS],
    slot_free: [u16; SLOTS],
    nslot_free: usize,
}

static BLKS: Global<[Option<Blk>; MAX_BLK]> = Global::new([const { None }; MAX_BLK]);
static NBLK: Global<usize> = Global::new(0);

/// Data buffers for all block actions (identity-mapped, so usable for DMA).
#[repr(C, align(4096))]
struct Arena([u8; ARENA_SIZE]);
const ARENA_SIZE: usize = 4 << 20;
// Not zeroed at boot (`.noinit`): every user fills what it reads back, and
// clearing 4 MiB costs about a second of page faults under a nested KVM.
#[link_section = ".noinit"]
static ARENA: Global<Arena> = Global::new(Arena([0; ARENA_SIZE]));

fn arena() -> &'static mut [u8; ARENA_SIZE] {
    &mut ARENA.get().0
}

fn arena_addr(off: usize) -> u64 {
    ARENA.ptr() as u64 + off as u64
}

/// Initialises the virtio-blk device at `mmio` (already probed).
pub fn init(index: usize, mmio: Mmio) -> Result<(), Error> {
    if *NBLK.get() >= MAX_BLK {
        return Err(Error::Other("too many block devices"));
    }
    let feats = mmio.begin_init(F_RO | F_FLUSH)?;
    let vq = Virtq::setup(&mmio, 0)?;
    mmio.driver_ok()?;
    let capacity = mmio.cfg64(0);
    let mut dev = Blk {
        mmio,
        vq,
        capacity,
        ro: feats & F_RO != 0,
        flush: feats & F_FLUSH != 0,
        reqs: [ReqMem { typ: 0, reserved: 0, sector: 0, status: 0, _pad: [0; 15] }; SLOTS],
        slot_free: [0; SLOTS],
        nslot_free: SLOTS,
    };
    for (i, s) in dev.slot_free.iter_mut().enumerate() {
        *s = i as u16;
    }
    say!("blk dev={} sectors={} ro={} flush={}", index, capacity, dev.ro as u8, dev.flush as u8);
    let n = NBLK.get();
    BLKS.get()[*n] = Some(dev);
    *n += 1;
    Ok(())
}

fn first() -> Option<&'static mut Blk> {
    BLKS.get()[0].as_mut()
}

impl Blk {
    /// Queues (does not kick) a request; returns its slot. For IN and
    /// GET_ID the data buffer is device-writable.
    fn submit(&mut self, typ: u32, sector: u64, data: u64, len: u32) -> Result<u16, Error> {
        if self.nslot_free == 0 {
            return Err(Error::QueueFull);
        }
        let mut segs = [Seg { addr: 0, len: 0, write: false }; 2 + (BS_MAX as usize / SEG_MAX as usize)];
        let nseg_data = (len as usize).div_ceil(SEG_MAX as usize);
        if nseg_data + 2 > segs.len() {
            return Err(Error::Other("request too large"));
        }
        let slot = self.slot_free[self.nslot_free - 1];
        let r = &mut self.reqs[slot as usize];
        r.typ = typ;
        r.reserved = 0;
        r.sector = sector;
        // Anything but 0/1/2 afterwards means the device never wrote it.
        r.status = 0xff;
        let rp = r as *const ReqMem as u64;
        let write = typ == T_IN || typ == T_GET_ID;
        segs[0] = Seg { addr: rp, len: 16, write: false };
        for i in 0..nseg_data {
            let off = i as u32 * SEG_MAX;
            segs[1 + i] = Seg { addr: data + off as u64, len: (len - off).min(SEG_MAX), write };
        }
        segs[1 + nseg_data] = Seg { addr: rp + 16, len: 1, write: true };
        self.vq.add(&segs[..nseg_data + 2], slot as u32)?;
        self.nslot_free -= 1;
        Ok(slot)
    }

    /// Takes one completion if available: (slot, status byte).
    fn complete(&mut self) -> Result<Option<(u16, u8)>, Error> {
        let Some((slot, len)) = self.vq.poll()? else {
            return Ok(None);
        };
        // The status byte is always written, so the length is at least 1.
        if len == 0 {
            return Err(Error::Other("used len 0 (status not written)"));
        }
        let status = unsafe { core::ptr::read_volatile(&self.reqs[slot as usize].status) };
        self.slot_free[self.nslot_free] = slot as u16;
        self.nslot_free += 1;
        if status > S_UNSUPP {
            return Err(Error::Other("garbage status byte"));
        }
        Ok(Some((slot as u16, status)))
    }

    /// Polls for one completion, bounded by the global timeout.
    fn wait_one(&mut self) -> Result<(u16, u8), Error> {
        let dl = crate::virtio::deadline();
        loop {
            if let Some(c) = self.complete()? {
                return Ok(c);
            }
            if dl.expired() {
                self.mmio.check()?;
                return Err(Error::Timeout);
            }
            core::hint::spin_loop();
        }
    }

    /// One synchronous request; returns the status byte. Completions of
    /// requests abandoned by an earlier timeout are skipped, not mistaken
    /// for this one.
    fn sync(&mut self, typ: u32, sector: u64, data: u64, len: u32) -> Result<u8, Error> {
        let slot = self.submit(typ, sector, data, len)?;
        self.vq.kick();
        loop {
            let (s, status) = self.wait_one()?;
            if s == slot {
                return Ok(status);
            }
        }
    }

    /// A synchronous request that must succeed.
    fn sync_ok(&mut self, typ: u32, sector: u64, data: u64, len: u32) -> Result<(), Error> {
        match self.sync(typ, sector, data, len)? {
            S_OK => Ok(()),
            s => Err(Error::Status(s)),
        }
    }

    /// FLUSH if negotiated (without the feature the device is write-through).
    fn flush_cache(&mut self) -> Result<(), Error> {
        if self.flush {
            self.sync_ok(T_FLUSH, 0, 0, 0)
        } else {
            Ok(())
        }
    }
}

/// Looks up the first block device or prints `FAIL <what> no-device`.
fn need_dev(what: &str) -> Option<&'static mut Blk> {
    let d = first();
    if d.is_none() {
        fail!("{} no-device", what);
    }
    d
}

/// Action `blkid`: GET_ID and print the id string.
pub fn act_blkid() {
    let Some(d) = need_dev("blkid") else { return };
    let buf = arena();
    buf[..20].fill(0);
    match d.sync(T_GET_ID, 0, arena_addr(0), 20) {
        Ok(S_OK) => {
            let id = &buf[..20];
            let n = id.iter().position(|&b| b == 0).unwrap_or(20);
            say!("blk id={}", crate::serial::Printable(&id[..n]));
        }
        Ok(s) => fail!("blkid status {}", s),
        Err(e) => fail!("blkid {}", e),
    }
}

/// Deterministic test pattern of a 4 KiB block at `sector` for this run.
fn pattern(buf: &mut [u8], seed: u64, sector: u64) {
    let mut r = XorShift::new(seed ^ sector.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    for c in buf.chunks_exact_mut(8) {
        c.copy_from_slice(&r.next().to_le_bytes());
    }
    buf[..8].copy_from_slice(&sector.to_le_bytes());
}

/// Action `blk`: write/flush/read-back/verify of `tg.blocks` 4 KiB blocks
/// spread over the disk, a read of the last sector and an out-of-range
/// read that must fail with IOERR.
pub fn act_blk() {
    let Some(d) = need_dev("blk") else { return };
    if let Err(e) = blk_test(d) {
        fail!("blk {}", e);
    }
}

fn blk_test(d: &mut Blk) -> Result<(), Error> {
    let cap_blocks = d.capacity / 8;
    let n = cmdline::num("tg.blocks", 64).min(cap_blocks);
    if n == 0 || d.capacity == 0 {
        return Err(Error::Other("disk too small"));
    }
    let sector_of = |k: u64| -> u64 {
        let span = (cap_blocks - 1) as u128;
        ((k as u128 * span / (n - 1).max(1) as u128) as u64) * 8
    };
    let seed = rdtsc() | 1;
    let (wbuf, rbuf) = arena().split_at_mut(4096);
    let rbuf = &mut rbuf[..4096];
    let (waddr, raddr) = (arena_addr(0), arena_addr(4096));
    let written = if d.ro {
        say!("blk read-only: skipping the write test");
        0
    } else {
        for k in 0..n {
            let s = sector_of(k);
            usermode::run(|| pattern(wbuf, seed, s));
            d.sync_ok(T_OUT, s, waddr, 4096)?;
        }
        d.flush_cache()?;
        for k in 0..n {
            let s = sector_of(k);
            usermode::run(|| rbuf.fill(0xAA));
            d.sync_ok(T_IN, s, raddr, 4096)?;
            let same = usermode::run(|| {
                pattern(wbuf, seed, s);
                wbuf[..] == rbuf[..]
            });
            if !same {
                fail!("blk mismatch sector={}", s);
                return Err(Error::Other("data mismatch"));
            }
        }
        n
    };
    d.sync_ok(T_IN, d.capacity - 1, raddr, 512)?;
    match d.sync(T_IN, d.capacity, raddr, 512)? {
        S_IOERR => {}
        S_OK => return Err(Error::Other("out-of-range read succeeded")),
        s => return Err(Error::Status(s)),
    }
    say!("blk ok blocks={}", written);
    Ok(())
}

/// Layout of a stamped block (see README): magic, index, seq, crc32 over
/// the rest of the block, then a payload derived from (index, seq).
const STAMP_MAGIC: &[u8; 8] = b"ENSPSTMP";
const CRC_OFF: usize = 24;
const PAYLOAD_OFF: usize = 32;

fn stamp_payload(buf: &mut [u8], index: u64, seq: u64) {
    let mut r = XorShift::new(index.wrapping_mul(0xA24B_AED4_963E_E407) ^ seq.wrapping_mul(0x9FB2_1C65_1E98_DF25) ^ 0x5354_4d50);
    for c in buf[PAYLOAD_OFF..].chunks_exact_mut(8) {
        c.copy_from_slice(&r.next().to_le_bytes());
    }
}

fn stamp_crc(buf: &[u8]) -> u32 {
    let c = crc32_update(0, &buf[..CRC_OFF]);
    crc32_update(c, &buf[CRC_OFF + 4..4096])
}

fn stamp_block(buf: &mut [u8], index: u64, seq: u64) {
    buf[..8].copy_from_slice(STAMP_MAGIC);
    buf[8..16].copy_from_slice(&index.to_le_bytes());
    buf[16..24].copy_from_slice(&seq.to_le_bytes());
    buf[CRC_OFF..PAYLOAD_OFF].fill(0);
    stamp_payload(buf, index, seq);
    let crc = stamp_crc(buf);
    buf[CRC_OFF..CRC_OFF + 4].copy_from_slice(&crc.to_le_bytes());
}

fn stamp_blocks(d: &Blk, what: &str) -> Option<u64> {
    let blocks = cmdline::num("tg.blocks", 64);
    if blocks == 0 || blocks > d.capacity / 8 {
        fail!("{} tg.blocks={} does not fit {} sectors", what, blocks, d.capacity);
        return None;
    }
    Some(blocks)
}

/// Action `stamp`: crash-consistency writer (block seq % blocks, an ack
/// line after each completed write, FLUSH every `tg.flushevery` writes).
pub fn act_stamp() {
    let Some(d) = need_dev("stamp") else { return };
    let Some(blocks) = stamp_blocks(d, "stamp") else { return };
    if d.ro {
        fail!("stamp read-only");
        return;
    }
    let ops = cmdline::num("tg.ops", 0);
    let every = cmdline::num("tg.flushevery", 8);
    let ackevery = cmdline::num("tg.ackevery", 1).max(1);
    let buf = &mut arena()[..4096];
    let addr = arena_addr(0);
    // Runs after earlier ones continue above their numbers.
    let mut seq = cmdline::num("tg.seqbase", 0);
    let last = seq.saturating_add(ops);
    loop {
        seq += 1;
        let blk = seq % blocks;
        usermode::run(|| stamp_block(buf, blk, seq));
        if let Err(e) = d.sync_ok(T_OUT, blk * 8, addr, 4096) {
            fail!("stamp write blk={} seq={} {}", blk, seq, e);
            return;
        }
        // Every write before a printed ack completed too (one at a time).
        let print = seq % ackevery == 0;
        if print {
            say!("ack blk={} seq={}", blk, seq);
        }
        if every > 0 && seq % every == 0 {
            if let Err(e) = d.flush_cache() {
                fail!("stamp flush seq={} {}", seq, e);
                return;
            }
            if print {
                say!("flushed seq={}", seq);
            }
        }
        if ops > 0 && seq >= last {
            return;
        }
    }
}

/// What `verify` found in a block.
enum Found {
    Empty,
    Intact(u64),
    Torn,
}

/// Classifies block `i` as read back into `buf`; `exp` is scratch space.
fn classify(buf: &[u8], exp: &mut [u8], i: u64) -> Found {
    if buf.iter().all(|&b| b == 0) {
        return Found::Empty;
    }
    let index = u64::from_le_bytes(buf[8..16].try_into().unwrap());
    let seq = u64::from_le_bytes(buf[16..24].try_into().unwrap());
    let crc = u32::from_le_bytes(buf[CRC_OFF..CRC_OFF + 4].try_into().unwrap());
    let mut ok = &buf[..8] == STAMP_MAGIC && index == i && crc == stamp_crc(buf);
    if ok {
        // A valid checksum over the wrong payload would be a writer bug
        // (or a misdirected write); count it as not intact too.
        stamp_payload(exp, index, seq);
        ok = buf[PAYLOAD_OFF..] == exp[PAYLOAD_OFF..];
    }
    if ok {
        Found::Intact(seq)
    } else {
        Found::Torn
    }
}

/// Action `verify`: classify every stamped block as valid, empty or torn.
pub fn act_verify() {
    let Some(d) = need_dev("verify") else { return };
    let Some(blocks) = stamp_blocks(d, "verify") else { return };
    let (buf, exp) = arena().split_at_mut(4096);
    let exp = &mut exp[..4096];
    let addr = arena_addr(0);
    let mut torn = 0u64;
    for i in 0..blocks {
        if let Err(e) = d.sync_ok(T_IN, i * 8, addr, 4096) {
            fail!("verify read blk={} {}", i, e);
            return;
        }
        match usermode::run(|| classify(buf, exp, i)) {
            Found::Empty => say!("verify blk={} empty", i),
            Found::Intact(seq) => say!("verify blk={} seq={}", i, seq),
            Found::Torn => {
                say!("verify blk={} torn", i);
                torn += 1;
            }
        }
    }
    say!("verify ok blocks={} torn={}", blocks, torn);
}

/// Action `bench`: keep `tg.qd` requests of `tg.bs` bytes in flight until
/// `tg.ops` have completed. With `tg.sync=1` (write modes) an operation is a
/// write and then a FLUSH (what an O_DSYNC write is on a device with a write
/// cache): it completes when its flush does. With `tg.flushend=1` a FLUSH
/// after the last completion is timed too.
pub fn act_bench() {
    let Some(d) = need_dev("bench") else { return };
    if let Err(e) = bench(d) {
        fail!("bench {}", e);
    }
}

/// Most operations whose latencies a bench keeps (later ones are counted, not kept).
const LAT_MAX: usize = 1 << 16;

/// Each kept operation's latency in TSC cycles (saturated at u32::MAX).
#[repr(C, align(4096))]
struct Latencies([u32; LAT_MAX]);
// Written before it is read, so not zeroed at boot.
#[link_section = ".noinit"]
static LATENCIES: Global<Latencies> = Global::new(Latencies([0; LAT_MAX]));

/// Per slot: when its operation was submitted, and whether it is now at its flush.
#[derive(Clone, Copy)]
struct InFlight {
    started: u64,
    flushing: bool,
}

fn bench(d: &mut Blk) -> Result<(), Error> {
    let mode = cmdline::get("tg.mode").unwrap_or("randread");
    let (typ, random) = match mode {
        "randread" => (T_IN, true),
        "randwrite" => (T_OUT, true),
        "seqread" => (T_IN, false),
        "seqwrite" => (T_OUT, false),
        _ => return Err(Error::Other("unknown tg.mode")),
    };
    let bs = cmdline::num("tg.bs", 4096);
    if bs < 512 || bs % 512 != 0 || bs > BS_MAX {
        return Err(Error::Other("tg.bs must be a multiple of 512 up to 1M"));
    }
    let qd = cmdline::num("tg.qd", 1);
    if qd == 0 || qd > SLOTS as u64 {
        return Err(Error::Other("tg.qd must be 1..128"));
    }
    let ops = cmdline::num("tg.ops", 1000);
    if ops == 0 {
        return Err(Error::Other("tg.ops must be > 0"));
    }
    let sync = cmdline::num("tg.sync", 0) != 0;
    if sync && (typ != T_OUT || !d.flush) {
        return Err(Error::Other("tg.sync needs a write mode and a device with FLUSH"));
    }
    let flush_end = cmdline::num("tg.flushend", 0) != 0;
    if flush_end && !d.flush {
        return Err(Error::Other("tg.flushend needs a device with FLUSH"));
    }
    let disk = d.capacity * 512;
    let span = cmdline::num("tg.span", disk).min(disk);
    let nblk = span / bs;
    if nblk == 0 {
        return Err(Error::Other("tg.span smaller than tg.bs"));
    }
    if typ == T_OUT && d.ro {
        return Err(Error::Other("read-only"));
    }
    let descs = (bs as u32).div_ceil(SEG_MAX) as u16 + 2;
    if descs > d.vq.size() {
        return Err(Error::Other("queue too small for tg.bs"));
    }
    // Data is irrelevant for a benchmark, so requests share buffers when
    // qd * bs exceeds the arena.
    let nbuf = (ARENA_SIZE as u64 / bs).max(1);
    let mut rng = XorShift::new(0x7467_6265_6e63_6821);
    let mut slots = [InFlight { started: 0, flushing: false }; SLOTS];
    let lat = &mut LATENCIES.get().0;
    let (mut submitted, mut completed, mut inflight) = (0u64, 0u64, 0u64);
    say!("bench start");
    let t0 = rdtsc();
    while completed < ops {
        let mut added = false;
        while submitted < ops && inflight < qd && d.vq.free_descs() >= descs {
            let blk = if random { rng.next() % nblk } else { submitted % nblk };
            let buf = arena_addr(((submitted % nbuf) * bs) as usize);
            let slot = d.submit(typ, blk * bs / 512, buf, bs as u32)?;
            slots[slot as usize] = InFlight { started: rdtsc(), flushing: false };
            submitted += 1;
            inflight += 1;
            added = true;
        }
        if added {
            d.vq.kick();
        }
        let mut next = Some(d.wait_one()?);
        let mut flushes = false;
        while let Some((slot, st)) = next {
            if st != S_OK {
                return Err(Error::Status(st));
            }
            let op = slots[slot as usize];
            if sync && !op.flushing {
                // The write is done; the operation goes on with its flush.
                let f = d.submit(T_FLUSH, 0, 0, 0)?;
                slots[f as usize] = InFlight { started: op.started, flushing: true };
                flushes = true;
            } else {
                if (completed as usize) < LAT_MAX {
                    lat[completed as usize] = (rdtsc() - op.started).min(u32::MAX as u64) as u32;
                }
                completed += 1;
                inflight -= 1;
            }
            next = d.complete()?;
        }
        if flushes {
            d.vq.kick();
        }
    }
    if flush_end {
        d.flush_cache()?;
    }
    let cycles = rdtsc() - t0;
    say!("bench done ops={} bytes={}", completed, completed * bs);
    say!("bench info mode={} bs={} qd={} span={} tsc={}", mode, bs, qd, nblk * bs, cycles);
    let kept = &mut lat[..(completed as usize).min(LAT_MAX)];
    kept.sort_unstable();
    let at = |q: usize| kept[(kept.len() * q / 100).min(kept.len() - 1)];
    say!("bench lat sync={} p50={} p99={} max={}", sync as u8, at(50), at(99), kept[kept.len() - 1]);
    Ok(())
}
