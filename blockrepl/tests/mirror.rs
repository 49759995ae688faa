//! Two blockd instances over real TCP on loopback (in this process), with a
//! proxy between them that can cut the link: mirrored writes, stalls, going
//! on alone, resync of only the changed regions, full sync while writing,
//! stale primaries, and malformed frames.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockrepl::daemon::{Blockd, Config, Request};
use blockrepl::meta::{DataState, Role};
use blockrepl::net::{MirrorNet, MirrorStream};
use blockrepl::proto::{Frame, Hello, Kind, Welcome};
use blockrepl::replica::{LinkState, Replica, Timing};
use blockrepl::store::BlockStore;

const MIB: u64 = 1 << 20;

fn timing() -> Timing {
    Timing {
        link_timeout: Duration::from_millis(1000),
        ping_interval: Duration::from_millis(150),
        retry_interval: Duration::from_millis(100),
        clean_interval: Duration::from_millis(200),
        clean_after_passes: 2,
        checkpoint_regions: 4,
    }
}

/// The certificate every blockd here presents: server 1's, under a CA made once for the
/// test process (the links are mutual TLS, as in a cluster).
fn certificate() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let d = scratch("certificate");
        let t = enspeed_trust::TrustDir::of(&d);
        t.create_cluster(1).unwrap();
        t.0
    })
}

fn net() -> MirrorNet {
    MirrorNet::tls(certificate()).unwrap()
}

/// A fresh directory for `name`. The test process cannot clean up after itself (its servers
/// run until it exits), so the first call removes what earlier runs, no longer alive, left.
fn scratch(name: &str) -> PathBuf {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(|| {
        let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for e in entries.flatten() {
            let file = e.file_name();
            let pid = file
                .to_str()
                .and_then(|f| f.strip_prefix("mirror-test-"))
                .and_then(|f| f.split('-').next())
                .and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    });
    let d = std::env::temp_dir().join(format!("mirror-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Server {
    blockd: Arc<Blockd>,
    addr: String,
    dir: PathBuf,
}

fn server(dir: &Path) -> Server {
    let addr = format!("127.0.0.1:{}", free_port());
    let cfg = Config {
        dir: dir.to_owned(),
        listen: addr.clone(),
        control: dir.join("control.sock"),
        timing: timing(),
        net: net(),
    };
    let blockd = Blockd::open(cfg).unwrap();
    let b = blockd.clone();
    std::thread::spawn(move || b.run().unwrap());
    // The listener is up once the control socket exists.
    wait_for("blockd to listen", || dir.join("control.sock").exists());
    Server {
        blockd,
        addr,
        dir: dir.to_owned(),
    }
}

impl Server {
    fn req(&self, r: Request) {
        let resp = self.blockd.handle(r);
        assert!(resp.ok, "request failed: {:?}", resp.error);
    }

    fn try_req(&self, r: Request) -> Result<(), String> {
        let resp = self.blockd.handle(r);
        if resp.ok {
            Ok(())
        } else {
            Err(resp.error.unwrap_or_default())
        }
    }

    fn disk(&self, name: &str) -> Arc<Replica> {
        self.blockd.get(name).unwrap()
    }

    fn data(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(name).join("data")).unwrap()
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A TCP proxy that can cut the link (dropping connections, refusing new ones), or hold
/// what it carries for a while (the link stays up; nothing gets through).
struct Proxy {
    addr: String,
    up: Arc<AtomicBool>,
    held: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

fn proxy(target: String) -> Proxy {
    proxy_at(target, None)
}

/// A proxy passing at most `rate` bytes a second each way, if given.
fn proxy_at(target: String, rate: Option<u64>) -> Proxy {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let up = Arc::new(AtomicBool::new(true));
    let held = Arc::new(AtomicBool::new(false));
    let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let (u, h, c) = (up.clone(), held.clone(), conns.clone());
    std::thread::spawn(move || {
        for inbound in l.incoming() {
            let inbound = inbound.unwrap();
            if !u.load(Ordering::SeqCst) {
                drop(inbound);
                continue;
            }
            let Ok(outbound) = TcpStream::connect(&target) else {
                continue;
            };
            c.lock()
                .unwrap()
                .extend([inbound.try_clone().unwrap(), outbound.try_clone().unwrap()]);
            for (mut from, mut to) in [
                (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                (outbound, inbound),
            ] {
                let held = h.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 16 << 10];
                    while let Ok(n) = from.read(&mut buf) {
                        while held.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        if n == 0 || to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        if let Some(rate) = rate {
                            std::thread::sleep(Duration::from_secs_f64(n as f64 / rate as f64));
                        }
                    }
                    let _ = to.shutdown(Shutdown::Both);
                });
            }
        }
    });
    Proxy {
        addr,
        up,
        held,
        conns,
    }
}

impl Proxy {
    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// Holds everything either way (true), or lets it through again.
    fn hold(&self, on: bool) {
        self.held.store(on, Ordering::SeqCst);
    }
}

/// Writes through the store; returns a receiver of the outcome.
fn submit(d: &Replica, offset: u64, data: Vec<u8>) -> mpsc::Receiver<std::io::Result<()>> {
    let (tx, rx) = mpsc::channel();
    d.write(offset, data, false, Box::new(move |r| tx.send(r).unwrap()));
    rx
}

fn write(d: &Replica, offset: u64, data: Vec<u8>) {
    submit(d, offset, data)
        .recv_timeout(Duration::from_secs(10))
        .expect("write completes")
        .expect("write succeeds");
}

/// Flushes through the store; returns a receiver of the outcome.
fn submit_flush(d: &Replica) -> mpsc::Receiver<std::io::Result<()>> {
    let (tx, rx) = mpsc::channel();
    d.flush(Box::new(move |r| tx.send(r).unwrap()));
    rx
}

fn flush(d: &Replica) {
    submit_flush(d)
        .recv_timeout(Duration::from_secs(10))
        .expect("flush completes")
        .expect("flush succeeds");
}

fn block(tag: u8, n: usize) -> Vec<u8> {
    (0..n).map(|i| tag ^ (i as u8).wrapping_mul(31)).collect()
}

/// Creates disk `name` of `size` bytes (regions of 1 MiB) on `s`: a primary, or a backup.
fn create(s: &Server, name: &str, size: u64, backup: bool) {
    s.req(Request::Create {
        name: name.into(),
        size,
        region_size: Some(MIB),
        backup,
        pool: None,
        from: None,
        image: None,
        peer_server: None,
        disk_id: None,
    });
}

fn pair(name: &str, size: u64) -> (Server, Server, Proxy) {
    let a = server(&scratch(&format!("{name}-a")));
    let b = server(&scratch(&format!("{name}-b")));
    let p = proxy(b.addr.clone());
    create(&a, "d", size, false);
    create(&b, "d", size, true);
    a.req(Request::Attach {
        name: "d".into(),
        peer: p.addr.clone(),
        peer_server: None,
    });
    wait_for("the first sync", || {
        a.disk("d").status().link == LinkState::InSync
    });
    (a, b, p)
}

#[test]
fn writes_reach_both_copies_before_they_complete() {
    let (a, b, _p) = pair("mirror", 16 * MIB);
    let d = a.disk("d");
    for i in 0..64u64 {
        write(&d, (i * 7919 % 4096) * 4096, block(i as u8, 4096));
    }
    // A write completes only when the backup holds it: the backup's file
    // matches right away, before any flush.
    assert!(
        a.data("d") == b.data("d"),
        "backup differs from primary after acknowledged writes"
    );
    flush(&d);
    let sb = b.disk("d").status();
    assert_eq!(
        (sb.role, sb.data, sb.generation),
        (Role::Backup, DataState::Consistent, 1)
    );
}

#[test]
fn a_flush_after_small_writes_asks_nothing_of_the_backup_and_after_a_large_one_waits_for_it() {
    let (a, b, p) = pair("flush", 16 * MIB);
    let d = a.disk("d");
    // Every hold below is shorter than the link timeout (1 s): the link stays up.
    let held_for = Duration::from_millis(500);
    // The first flush after opening goes to both (the test after this one); this one from
    // then on.
    flush(&d);
    write(&d, 4096, block(1, 4096));
    // The backup made the small write durable before acknowledging it: the flush is local,
    // and completes while nothing gets through to the backup.
    p.hold(true);
    let local = submit_flush(&d).recv_timeout(held_for);
    p.hold(false);
    local
        .expect("a flush after small writes waited for the backup")
        .unwrap();
    // A larger write is acknowledged once applied: the next flush waits for the backup.
    assert!(blockrepl::replica::DURABLE_WRITE_MAX < MIB as usize);
    write(&d, 2 * MIB, block(2, MIB as usize));
    p.hold(true);
    let remote = submit_flush(&d);
    assert!(
        remote.recv_timeout(Duration::from_millis(400)).is_err(),
        "a flush after a large write completed without the backup's answer"
    );
    p.hold(false);
    remote
        .recv_timeout(Duration::from_secs(5))
        .expect("the flush completes once the backup answers")
        .unwrap();
    // That answer covers the large write: the next flush is local again.
    p.hold(true);
    let again = submit_flush(&d).recv_timeout(held_for);
    p.hold(false);
    again
        .expect("a flush after a covered large write waited for the backup")
        .unwrap();
    assert_eq!(d.status().link, LinkState::InSync);
    assert!(a.data("d") == b.data("d"), "the copies differ");
}

#[test]
fn the_first_flush_after_a_copy_is_opened_or_its_generation_raised_goes_to_both() {
    let (a, _b, p) = pair("first-flush", 16 * MIB);
    let d = a.disk("d");
    let must_wait = |what: &str| {
        write(&d, 4096, block(1, 4096));
        p.hold(true);
        let f = submit_flush(&d);
        assert!(
            f.recv_timeout(Duration::from_millis(400)).is_err(),
            "the first flush {what} completed without the backup"
        );
        p.hold(false);
        f.recv_timeout(Duration::from_secs(5))
            .expect("the flush completes once the backup answers")
            .unwrap();
    };
    // Just opened: what the copies held before may be in a page cache only.
    must_wait("after the copy was opened");
    // Going on alone (then mirrored again): a promoted backup's copy is in that state too.
    a.req(Request::Promote {
        name: "d".into(),
        generation: 2,
        force: false,
    });
    wait_for("the resync after the promotion", || {
        d.status().link == LinkState::InSync
    });
    must_wait("after the generation was raised");
}

#[test]
fn a_cut_link_stalls_writes_until_the_primary_goes_on_alone_then_resync_copies_only_changed_regions(
) {
    let (a, b, p) = pair("cut", 64 * MIB);
    let d = a.disk("d");
    for i in 0..64u64 {
        write(&d, i * MIB, block(1, 4096));
    }
    flush(&d);
    // Let the clean pass clear the bits of those regions: both hold them.
    wait_for("the bitmap to be clean", || {
        d.status().out_of_sync_bytes == 0
    });

    p.cut();
    wait_for("the link to go down", || d.status().link == LinkState::Down);
    let stalled = submit(&d, 5 * MIB + 4096, block(2, 4096));
    assert!(
        stalled.recv_timeout(Duration::from_millis(1500)).is_err(),
        "a write completed while the backup was unreachable and the primary was not told to go on alone"
    );
    assert!(d.status().stalled_writes >= 1);
    // The control plane's decision: the backup is out of date, go on alone.
    a.req(Request::Promote {
        name: "d".into(),
        generation: 2,
        force: false,
    });
    stalled
        .recv_timeout(Duration::from_secs(5))
        .expect("the stalled write completes")
        .unwrap();
    let s = d.status();
    assert_eq!(
        (s.role, s.generation, s.bitmap_base),
        (Role::Standalone, 2, 1)
    );
    // Changed while alone: regions 5 (the stalled write), 10, 11 and 40.
    for off in [10 * MIB, 11 * MIB + 8192, 40 * MIB + MIB - 4096] {
        write(&d, off, block(3, 4096));
    }
    assert_eq!(d.status().out_of_sync_bytes, 4 * MIB);

    p.restore();
    // Keep writing while the backup catches up.
    let writer = {
        let d = d.clone();
        std::thread::spawn(move || {
            for i in 0..200u64 {
                write(&d, (i % 60) * MIB + 12288, block(i as u8, 4096));
            }
        })
    };
    wait_for("resync to finish", || d.status().link == LinkState::InSync);
    writer.join().unwrap();
    flush(&d);
    // Only the marked regions, plus regions the writer touched meanwhile
    // (the writer marks them too): never the whole 64 MiB.
    let total = d.status().last_resync.expect("a resync ran").total_bytes;
    assert!(
        (4 * MIB..64 * MIB).contains(&total),
        "resync copied {total} bytes"
    );
    assert!(a.data("d") == b.data("d"), "copies differ after resync");
    let sb = b.disk("d").status();
    assert_eq!((sb.generation, sb.data), (2, DataState::Consistent));
    assert_eq!(d.status().role, Role::Primary);
}

#[test]
fn resync_after_going_alone_copies_exactly_the_changed_regions() {
    let (a, b, p) = pair("exact", 256 * MIB);
    let d = a.disk("d");
    write(&d, 0, block(1, 4096));
    flush(&d);
    wait_for("the bitmap to be clean", || {
        d.status().out_of_sync_bytes == 0
    });
    p.cut();
    wait_for("the link to go down", || d.status().link == LinkState::Down);
    a.req(Request::Promote {
        name: "d".into(),
        generation: 2,
        force: false,
    });
    for r in [3u64, 100, 101, 255] {
        write(&d, r * MIB + 512, block(r as u8, 8192));
    }
    let started = Instant::now();
    p.restore();
    wait_for("resync", || d.status().link == LinkState::InSync);
    let took = started.elapsed();
    let last = d.status().last_resync.expect("a resync ran");
    assert_eq!(
        (last.total_bytes, last.full),
        (4 * MIB, false),
        "resync should copy the 4 changed regions"
    );
    assert!(a.data("d") == b.data("d"));
    eprintln!("resync of 4 changed MiB of 256 MiB took {took:?}");
}

/// Creates on `s` a disk `name` whose data is not all zeros from its start: a clone of a
/// written disk, as a VM cloned from another's disk (its backup needs a full sync).
fn create_clone(s: &Server, name: &str, size: u64) {
    let src = format!("{name}-src");
    create(&s, &src, size, false);
    write(&s.disk(&src), size / 2, block(0x5a, 8192));
    s.req(Request::Create {
        name: name.into(),
        size,
        region_size: Some(MIB),
        backup: false,
        pool: None,
        from: Some(src),
        image: None,
        peer_server: None,
        disk_id: None,
    });
    assert!(
        !s.disk(name).meta().from_zeros,
        "a clone's data is not all zeros"
    );
}

#[test]
fn a_new_backup_gets_a_full_sync_while_the_guest_writes() {
    let a = server(&scratch("full-a"));
    let b = server(&scratch("full-b"));
    create_clone(&a, "d", 128 * MIB);
    let d = a.disk("d");
    for i in 0..128u64 {
        write(&d, i * MIB + (i % 7) * 4096, block(i as u8, 65536));
    }
    create(&b, "d", 128 * MIB, true);
    a.req(Request::Attach {
        name: "d".into(),
        peer: b.addr.clone(),
        peer_server: None,
    });
    let mut saw_full = false;
    for i in 0..300u64 {
        write(&d, ((i * 37) % 128) * MIB + 4096, block(!(i as u8), 4096));
        if let Some(r) = d.status().resync {
            saw_full |= r.full;
        }
    }
    wait_for("full sync", || d.status().link == LinkState::InSync);
    flush(&d);
    assert!(saw_full || d.status().resync.is_none());
    assert!(
        a.data("d") == b.data("d"),
        "copies differ after a full sync under writes"
    );
}

#[test]
fn a_blank_disk_s_new_backup_gets_only_what_was_written_and_later_backups_a_full_sync() {
    let a = server(&scratch("zeros-a"));
    let b = server(&scratch("zeros-b"));
    let c = server(&scratch("zeros-c"));
    create(&a, "d", 64 * MIB, false);
    let d = a.disk("d");
    assert!(d.meta().from_zeros, "a new blank primary starts from zeros");
    // The guest writes alone before its backup exists: three regions.
    for r in [2u64, 9, 30] {
        write(&d, r * MIB + 512, block(r as u8, 8192));
    }
    create(&b, "d", 64 * MIB, true);
    a.req(Request::Attach {
        name: "d".into(),
        peer: b.addr.clone(),
        peer_server: None,
    });
    wait_for("the first sync", || d.status().link == LinkState::InSync);
    let first = d.status().last_resync.expect("a resync ran");
    assert!(
        !first.full,
        "a blank disk's new backup got a full sync: {first:?}"
    );
    assert_eq!(first.total_bytes, 3 * MIB, "{first:?}");
    flush(&d);
    assert!(a.data("d") == b.data("d"), "the copies differ");
    assert_eq!(b.disk("d").status().data, DataState::Consistent);
    // Once the first backup holds it, the bitmap is cleaned: another new backup (the first
    // one lost) needs the whole disk.
    assert!(
        !d.meta().from_zeros,
        "still claims zeros after its bits were cleared"
    );
    a.req(Request::Detach { name: "d".into() });
    create(&c, "d", 64 * MIB, true);
    a.req(Request::Attach {
        name: "d".into(),
        peer: c.addr.clone(),
        peer_server: None,
    });
    wait_for("the second backup's sync", || {
        d.status().link == LinkState::InSync && d.status().last_resync.is_some_and(|r| r.full)
    });
    flush(&d);
    assert!(a.data("d") == c.data("d"), "the second backup differs");
}

#[test]
fn a_cut_full_sync_resumes_where_it_stopped_and_its_percentage_never_goes_back() {
    let a = server(&scratch("resume-a"));
    let b = server(&scratch("resume-b"));
    // About 3 s of full sync through a link of 16 MiB/s.
    let p = proxy_at(b.addr.clone(), Some(16 * MIB));
    create_clone(&a, "d", 48 * MIB);
    let d = a.disk("d");
    for i in 0..48u64 {
        write(&d, i * MIB, block(i as u8, MIB as usize));
    }
    create(&b, "d", 48 * MIB, true);
    a.req(Request::Attach {
        name: "d".into(),
        peer: p.addr.clone(),
        peer_server: None,
    });
    // The percentages seen, in order, and the link cut once a third is copied.
    let mut seen: Vec<f64> = Vec::new();
    let mut cut = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.status().link != LinkState::InSync {
        assert!(Instant::now() < deadline, "no sync in 60 s: {seen:?}");
        if let Some(r) = d.status().resync {
            assert!(r.full, "a new backup gets a full sync");
            if seen.last() != Some(&r.percent) {
                seen.push(r.percent);
            }
            if !cut && r.percent > 33.0 {
                p.cut();
                cut = true;
                std::thread::sleep(Duration::from_millis(300));
                p.restore();
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(cut, "the sync ended before a third was copied: {seen:?}");
    assert!(
        seen.windows(2).all(|w| w[1] >= w[0]),
        "the percentage went back: {seen:?}"
    );
    // The second try began past what the first made durable (4-region checkpoints).
    let after_cut = seen.iter().skip_while(|p| **p <= 33.0).nth(1).copied();
    assert!(
        after_cut.is_some_and(|p| p >= 25.0),
        "restarted from 0: {seen:?}"
    );
    flush(&d);
    assert!(
        a.data("d") == b.data("d"),
        "copies differ after a resumed full sync"
    );
    assert_eq!(b.disk("d").status().data, DataState::Consistent);
}

/// A filesystem whose write-back fails for want of room, as a disk that fails: ext4 (no
/// journal) on a loop device whose backing file lives in a small tmpfs, filled but for 4 MiB.
/// Data written and held in the page cache past that fails when written back, and the next
/// fdatasync reports it; once room is made, a later write and fdatasync succeed, the failed
/// data gone. Needs root (mount, losetup); `None`, said loudly, where it cannot be made.
struct FailingFs {
    /// Where the ext4 is mounted.
    dir: PathBuf,
    tmpfs: PathBuf,
    loop_dev: String,
}

impl FailingFs {
    fn mount(base: &Path) -> Option<FailingFs> {
        let run = |cmd: &str, args: &[&str]| -> Result<String, String> {
            let out = std::process::Command::new(cmd)
                .args(args)
                .output()
                .map_err(|e| format!("{cmd}: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "{cmd} {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        sweep_failing_fs();
        let (tmpfs, dir) = (base.join("tmpfs"), base.join("fs"));
        std::fs::create_dir_all(&tmpfs).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        if let Err(e) = run(
            "mount",
            &["-t", "tmpfs", "-o", "size=32m", "tmpfs", tmpfs.to_str()?],
        ) {
            eprintln!("\n!!!! SKIPPED: cannot mount a tmpfs for the failing disk ({e}) !!!!\n");
            return None;
        }
        let backing = tmpfs.join("backing");
        std::fs::File::create(&backing)
            .and_then(|f| f.set_len(64 * MIB))
            .unwrap();
        let loop_dev = match run("losetup", &["-f", "--show", backing.to_str()?]) {
            Ok(l) => l,
            Err(e) => {
                let _ = run("umount", &[tmpfs.to_str()?]);
                eprintln!("\n!!!! SKIPPED: no loop device for the failing disk ({e}) !!!!\n");
                return None;
            }
        };
        let fs = FailingFs {
            dir,
            tmpfs,
            loop_dev,
        };
        let made = run(
            "mkfs.ext4",
            &[
                "-q",
                "-O",
                "^has_journal",
                "-E",
                "lazy_itable_init=0",
                &fs.loop_dev,
            ],
        )
        .and_then(|_| {
            run(
                "mount",
                &[&fs.loop_dev, fs.dir.to_str().unwrap_or_default()],
            )
        });
        if let Err(e) = made {
            eprintln!("\n!!!! SKIPPED: cannot make the failing disk's ext4 ({e}) !!!!\n");
            return None;
        }
        // The tmpfs filled but for 4 MiB: the room the ext4's blocks have left.
        let free = free_bytes(&fs.tmpfs);
        std::fs::write(
            fs.tmpfs.join("filler"),
            vec![0u8; free.saturating_sub(4 * MIB) as usize],
        )
        .unwrap();
        Some(fs)
    }

    /// Frees the tmpfs's filler: write-back has room again.
    fn make_room(&self) {
        std::fs::remove_file(self.tmpfs.join("filler")).unwrap();
    }
}

impl Drop for FailingFs {
    fn drop(&mut self) {
        // Lazily: this process's blockd keeps its files open until the process ends.
        let run = |args: &[&str]| {
            let _ = std::process::Command::new(args[0])
                .args(&args[1..])
                .status();
        };
        run(&["umount", "-l", self.dir.to_str().unwrap_or_default()]);
        run(&["losetup", "-d", &self.loop_dev]);
        run(&["umount", "-l", self.tmpfs.to_str().unwrap_or_default()]);
    }
}

/// Unmounts what an earlier run of this test, killed before its `FailingFs` was dropped, left
/// mounted, and detaches its loop device.
fn sweep_failing_fs() {
    let ours = format!("/mirror-test-{}-", std::process::id());
    let left =
        |p: &str| p.contains("/mirror-test-") && p.contains("-failed-flush/") && !p.contains(&ours);
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|p| left(p))
        .collect();
    // The ext4 before the tmpfs its loop device's file lives in.
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = std::process::Command::new("umount")
            .args(["-l", p])
            .status();
    }
    let loops = std::process::Command::new("losetup")
        .arg("-a")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for l in loops.lines().filter(|l| left(l)) {
        if let Some((dev, _)) = l.split_once(':') {
            let _ = std::process::Command::new("losetup")
                .args(["-d", dev])
                .status();
        }
    }
}

/// Free bytes of the filesystem at `p` (`df`'s figure).
fn free_bytes(p: &Path) -> u64 {
    let out = std::process::Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(p)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap()
}

/// A flush that failed fails every later flush of its disk (item 1 of issue 15: a "sticky"
/// failure). The kernel reports a failed write-back to one fdatasync only: the disk's data
/// lives on a filesystem whose write-back fails for want of room (`FailingFs`); the first
/// flush fails; room is made, a new write goes in, and the next flush, whose fdatasync alone
/// would now succeed although the earlier data is lost, fails too, and says why.
#[test]
fn a_failed_flush_fails_every_later_flush_of_its_disk() {
    let base = scratch("failed-flush");
    let Some(fs) = FailingFs::mount(&base) else {
        return;
    };
    let s = server(&fs.dir);
    create(&s, "d", 32 * MIB, false);
    let d = s.disk("d");
    // 20 MiB in writes of 1 MiB (larger than a write made durable on its own): in the page
    // cache, acknowledged, not yet on the disk.
    for i in 0..20u64 {
        write(&d, i * MIB, block(i as u8 + 1, MIB as usize));
    }
    let first = submit_flush(&d)
        .recv_timeout(Duration::from_secs(30))
        .expect("the flush completes");
    let e = first.expect_err("a flush whose write-back failed must fail");
    eprintln!("the first flush: {e}");
    fs.make_room();
    write(&d, 0, block(0xee, MIB as usize));
    let again = submit_flush(&d)
        .recv_timeout(Duration::from_secs(30))
        .expect("the flush completes");
    let e = again.expect_err("a flush after a failed one must fail too");
    assert!(e.to_string().contains("an earlier flush failed"), "{e}");
    drop(s);
    drop(fs);
}

#[test]
fn a_stale_primary_is_refused() {
    let (a, b, p) = pair("stale", 8 * MIB);
    let d = a.disk("d");
    write(&d, 0, block(1, 4096));
    p.cut();
    // Failover: the backup is promoted with a higher generation.
    b.req(Request::Promote {
        name: "d".into(),
        generation: 2,
        force: false,
    });
    p.restore();
    wait_for("the old primary to be refused", || {
        d.status()
            .last_error
            .is_some_and(|e| e.contains("not a backup"))
    });
    // Even as a backup again, the copy at generation 2 refuses generation 1.
    b.req(Request::Demote {
        name: "d".into(),
        primary_server: None,
    });
    wait_for("the stale primary to be refused", || {
        d.status()
            .last_error
            .is_some_and(|e| e.contains("stale primary"))
    });
    let stalled = submit(&d, 4096, block(9, 4096));
    assert!(
        stalled.recv_timeout(Duration::from_millis(800)).is_err(),
        "a stale primary's write completed"
    );
    assert_eq!(
        b.data("d")[4096..8192],
        vec![0u8; 4096][..],
        "the stale primary's write reached the backup"
    );
}

#[test]
fn a_switchover_demotes_the_old_primary_its_stalled_write_fails_and_the_resync_rewrites_it() {
    let (a, b, _p) = pair("switch", 16 * MIB);
    let d = a.disk("d");
    write(&d, 0, block(1, 4096));
    flush(&d);
    wait_for("the bitmap to be clean", || {
        d.status().out_of_sync_bytes == 0
    });
    // The control plane moves the disk: the backup is promoted first; the old primary's next
    // write lands locally but is refused by the new primary, so it stalls.
    b.req(Request::Promote {
        name: "d".into(),
        generation: 2,
        force: false,
    });
    let stalled = submit(&d, 3 * MIB, block(7, 4096));
    assert!(
        stalled.recv_timeout(Duration::from_millis(800)).is_err(),
        "a write completed unmirrored"
    );
    // Then it stops the guest there and demotes the old primary: the write fails, never acknowledged.
    a.req(Request::Demote {
        name: "d".into(),
        primary_server: None,
    });
    let failed = stalled
        .recv_timeout(Duration::from_secs(5))
        .expect("the stalled write is answered");
    assert!(failed.is_err(), "the unmirrored write was reported done");
    assert_eq!(
        a.data("d")[3 * MIB as usize..3 * MIB as usize + 4096],
        block(7, 4096)[..]
    );
    assert_eq!(d.status().role, Role::Backup);
    // The new primary takes the old one as its backup: the region the failed write touched is
    // resynced from the new primary, so the copies agree again.
    b.req(Request::Attach {
        name: "d".into(),
        peer: a.addr.clone(),
        peer_server: None,
    });
    wait_for("the resync to the old primary", || {
        b.disk("d").status().link == LinkState::InSync
    });
    flush(&b.disk("d"));
    assert!(
        a.data("d") == b.data("d"),
        "the old primary kept its unacknowledged write"
    );
    assert_eq!(
        a.data("d")[3 * MIB as usize..3 * MIB as usize + 4096],
        vec![0u8; 4096][..]
    );
}

#[test]
fn promotion_of_an_inconsistent_or_empty_backup_is_refused() {
    let b = server(&scratch("refuse-b"));
    b.req(Request::Create {
        name: "d".into(),
        size: 8 * MIB,
        region_size: None,
        backup: true,
        pool: None,
        from: None,
        image: None,
        peer_server: None,
        disk_id: None,
    });
    let e = b
        .try_req(Request::Promote {
            name: "d".into(),
            generation: 5,
            force: false,
        })
        .unwrap_err();
    assert!(e.contains("Empty"), "{e}");
    let e = b
        .try_req(Request::Promote {
            name: "d".into(),
            generation: 0,
            force: true,
        })
        .unwrap_err();
    assert!(e.contains("not above"), "{e}");
}

fn raw_session(b: &Server, generation: u64) -> (MirrorStream, Welcome) {
    let (mut s, _) = net().connect(&b.addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let hello = Hello {
        disk: "d".into(),
        disk_id: "feedface".into(),
        capacity: 8 * MIB,
        region_size: MIB,
        generation,
        bitmap_base: 0,
        fill: String::new(),
        new_fill: "f111".into(),
        from_zeros: false,
    };
    Frame::json(Kind::Hello, 1, generation, &hello)
        .write_to(&mut s)
        .unwrap();
    let reply = Frame::read_from(&mut s).unwrap();
    assert_eq!(reply.kind, Kind::Welcome, "{}", reply.text());
    (s, reply.parse_json().unwrap())
}

fn expect_error(s: &mut MirrorStream, what: &str) -> String {
    loop {
        match Frame::read_from(s) {
            Ok(f) if f.kind == Kind::Error => return f.text(),
            Ok(f) if f.kind == Kind::Ack => panic!("{what}: the backup acknowledged it"),
            Ok(f) => panic!("{what}: unexpected {:?}", f.kind),
            Err(e) => return e.to_string(),
        }
    }
}

#[test]
fn malformed_truncated_and_corrupt_frames_are_refused_and_do_not_touch_the_disk() {
    let b = server(&scratch("malformed-b"));
    create(&b, "d", 8 * MIB, true);
    let zeros = b.data("d");

    // Payload checksum wrong.
    let (mut s, w) = raw_session(&b, 1);
    assert!(w.needs_full_sync);
    let mut f = Frame::new(Kind::Write, 2, 1);
    f.offset = 4096;
    f.payload = vec![0xee; 4096];
    let mut bytes = f.to_bytes();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    s.write_all(&bytes).unwrap();
    let why = expect_error(&mut s, "corrupt payload");
    assert!(why.contains("checksum"), "{why}");

    // Header bit flipped.
    let (mut s, _) = raw_session(&b, 1);
    let mut bytes = f.to_bytes();
    bytes[26] ^= 0x10;
    s.write_all(&bytes).unwrap();
    let why = expect_error(&mut s, "corrupt header");
    assert!(why.contains("checksum"), "{why}");

    // Truncated: half a frame, then the primary goes away.
    let (mut s, _) = raw_session(&b, 1);
    let bytes = f.to_bytes();
    s.write_all(&bytes[..bytes.len() / 2]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);

    // A write beyond the end of the disk.
    let (mut s, _) = raw_session(&b, 1);
    let mut beyond = f.clone();
    beyond.offset = 8 * MIB - 2048;
    beyond.write_to(&mut s).unwrap();
    let ack = Frame::read_from(&mut s).unwrap();
    assert_eq!(ack.kind, Kind::Ack);
    assert_ne!(
        ack.status, 0,
        "a write beyond the end was acknowledged as done"
    );

    // A frame of another generation inside the session.
    let (mut s, _) = raw_session(&b, 1);
    let mut other = f.clone();
    other.generation = 7;
    other.write_to(&mut s).unwrap();
    let why = expect_error(&mut s, "wrong generation");
    assert!(why.contains("generation"), "{why}");

    // Garbage instead of a Hello.
    let (mut g, _) = net().connect(&b.addr, Duration::from_secs(5)).unwrap();
    g.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    g.write_all(&[0x55; 200]).unwrap();
    let why = expect_error(&mut g, "garbage hello");
    assert!(why.contains("magic"), "{why}");

    // A Hello for a disk that is not there.
    let (mut s, _) = net().connect(&b.addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let hello = Hello {
        disk: "nope".into(),
        disk_id: "1".into(),
        capacity: MIB,
        region_size: MIB,
        generation: 1,
        bitmap_base: 0,
        fill: String::new(),
        new_fill: "f222".into(),
        from_zeros: false,
    };
    Frame::json(Kind::Hello, 1, 1, &hello)
        .write_to(&mut s)
        .unwrap();
    let why = expect_error(&mut s, "unknown disk");
    assert!(why.contains("no disk named"), "{why}");

    assert!(b.data("d") == zeros, "a refused frame changed the disk");
    // The backup is still usable by a well-behaved primary.
    let (mut s, _) = raw_session(&b, 1);
    let mut good = f.clone();
    good.seq = 2;
    good.write_to(&mut s).unwrap();
    let ack = Frame::read_from(&mut s).unwrap();
    assert_eq!((ack.kind, ack.status, ack.offset), (Kind::Ack, 0, 2));
    assert_eq!(b.data("d")[4096..8192], vec![0xee; 4096][..]);
}

#[test]
fn raising_the_generation_of_a_connected_primary_resyncs_and_mirrors_again() {
    let (a, b, _p) = pair("raise", 16 * MIB);
    let d = a.disk("d");
    write(&d, 3 * MIB, block(7, 4096));
    a.req(Request::Promote {
        name: "d".into(),
        generation: 2,
        force: false,
    });
    wait_for("mirroring at generation 2", || {
        let s = d.status();
        s.link == LinkState::InSync && s.generation == 2
    });
    let last = d.status().last_resync.expect("a resync ran");
    assert!(
        !last.full,
        "the backup was in sync at the base generation: no full sync needed"
    );
    write(&d, 4 * MIB, block(8, 4096));
    assert!(a.data("d") == b.data("d"));
    let sb = b.disk("d").status();
    assert_eq!((sb.generation, sb.data), (2, DataState::Consistent));
    // Demoting the primary while it is linked ends the link without hanging.
    a.req(Request::Demote {
        name: "d".into(),
        primary_server: None,
    });
    assert_eq!(d.status().role, Role::Backup);
}

#[test]
fn a_disk_grows_on_both_copies_keeps_its_data_and_mirrors_its_new_end() {
    let (a, b, _p) = pair("grow", 8 * MIB);
    write(&a.disk("d"), 4096, block(1, 4096));
    let grow = |s: &Server, size: u64| {
        s.try_req(Request::Grow {
            name: "d".into(),
            size,
        })
    };
    // Smaller, or not a multiple of 512: refused; the same size: done, nothing changes.
    assert!(grow(&a, 4 * MIB).unwrap_err().contains("grows only"));
    assert!(grow(&a, 8 * MIB + 100).is_err());
    grow(&a, 8 * MIB).unwrap();
    assert_eq!(a.disk("d").status().link, LinkState::InSync);
    // The primary first: no link to a backup of another size.
    grow(&a, 24 * MIB).unwrap();
    assert_eq!(a.disk("d").status().capacity, 24 * MIB);
    std::thread::sleep(Duration::from_millis(500));
    assert_ne!(
        a.disk("d").status().link,
        LinkState::InSync,
        "linked to a smaller backup"
    );
    grow(&b, 24 * MIB).unwrap();
    wait_for("the link at the new size", || {
        a.disk("d").status().link == LinkState::InSync
    });
    let d = a.disk("d");
    write(&d, 20 * MIB, block(2, 4096));
    let (da, db) = (a.data("d"), b.data("d"));
    assert_eq!((da.len(), db.len()), (24 * MIB as usize, 24 * MIB as usize));
    assert!(da == db, "the copies differ after the grow");
    assert_eq!(&da[4096..8192], &block(1, 4096)[..], "the old data is kept");
    // A grow cut between the data file and the metadata: the next start trims it back.
    drop(d);
    let extra = a.dir.join("d").join("data");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&extra)
        .unwrap()
        .set_len(40 * MIB)
        .unwrap();
    let again = Replica::open(&a.dir, "d", timing(), Arc::new(net())).unwrap();
    assert_eq!(again.status().capacity, 24 * MIB);
    assert_eq!(std::fs::metadata(&extra).unwrap().len(), 24 * MIB);
}

#[test]
fn a_disk_in_a_storage_pool_is_linked_from_the_data_directory_and_deleted_with_it() {
    let a = server(&scratch("pool-a"));
    let pool = scratch("pool-vms1");
    a.req(Request::Create {
        name: "p".into(),
        size: 8 * MIB,
        region_size: None,
        backup: false,
        pool: Some(pool.clone()),
        from: None,
        image: None,
        peer_server: None,
        disk_id: None,
    });
    assert!(
        pool.join("p").join("data").exists(),
        "the copy is not in the pool"
    );
    let link = a.dir.join("p");
    assert!(link.symlink_metadata().unwrap().file_type().is_symlink());
    write(&a.disk("p"), 4096, block(5, 4096));
    // Found again through the link, as blockd does at start.
    let again = Replica::open(&a.dir, "p", timing(), Arc::new(net())).unwrap();
    let mut buf = vec![0u8; 4096];
    again.read(4096, &mut buf).unwrap();
    assert_eq!(buf, block(5, 4096));
    drop(again);
    a.req(Request::Delete { name: "p".into() });
    assert!(
        !pool.join("p").exists() && link.symlink_metadata().is_err(),
        "delete left the copy or its link"
    );
}

#[test]
fn a_removed_server_s_certificate_is_refused_until_the_roster_admits_it() {
    let a = server(&scratch("roster-a"));
    let b = server(&scratch("roster-b"));
    let fp = enspeed_trust::Identity::load(&enspeed_trust::TrustDir(certificate().to_owned()))
        .unwrap()
        .fingerprint
        .to_string();
    // The backup's roster lists the primary's certificate as a removed server's.
    b.req(Request::Roster {
        members: Default::default(),
        revoked: vec![fp.clone()],
    });
    let bad = b.try_req(Request::Roster {
        members: Default::default(),
        revoked: vec!["not-a-fingerprint".into()],
    });
    assert!(bad.unwrap_err().contains("not a certificate fingerprint"));
    for (s, backup) in [(&a, false), (&b, true)] {
        s.req(Request::Create {
            name: "d".into(),
            size: 4 * MIB,
            region_size: Some(MIB),
            backup,
            pool: None,
            from: None,
            image: None,
            peer_server: None,
            disk_id: None,
        });
    }
    a.req(Request::Attach {
        name: "d".into(),
        peer: b.addr.clone(),
        peer_server: None,
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(a.disk("d").status().link, LinkState::Down, "refused");
    assert_eq!(
        b.disk("d").status().data,
        DataState::Empty,
        "nothing written"
    );
    // The primary refuses a backup whose certificate its roster revokes, too.
    a.req(Request::Roster {
        members: Default::default(),
        revoked: vec![fp.clone()],
    });
    b.req(Request::Roster {
        members: vec![(1, fp.clone())],
        revoked: vec![],
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(a.disk("d").status().link, LinkState::Down);
    let err = a.disk("d").status().last_error.unwrap_or_default();
    assert!(err.contains("revoked"), "{err}");
    // Once both rosters admit it (server 1 holds it), the link comes up and syncs.
    a.req(Request::Roster {
        members: vec![(1, fp)],
        revoked: vec![],
    });
    wait_for("the link, once admitted", || {
        a.disk("d").status().link == LinkState::InSync
    });
}

/// A 4 KiB block stamped with write number `seq`.
fn stamped(seq: u64) -> Vec<u8> {
    let mut b = block(seq as u8, 4096);
    b[..8].copy_from_slice(&seq.to_le_bytes());
    b[8..16].copy_from_slice(&(!seq).to_le_bytes());
    b
}

/// The write number a block of an image holds: 0 for the blocks written before the stamps
/// began, None for anything else (a torn or foreign block).
fn stamp_of(b: &[u8]) -> Option<u64> {
    let seq = u64::from_le_bytes(b[..8].try_into().unwrap());
    let check = u64::from_le_bytes(b[8..16].try_into().unwrap());
    if check == !seq && b == stamped(seq).as_slice() {
        Some(seq)
    } else if b.iter().all(|x| *x == 0xab) {
        Some(0)
    } else {
        None
    }
}

#[test]
fn a_live_snapshot_of_two_backup_copies_holds_exactly_the_writes_before_one_point() {
    let size = 128 * MIB;
    let (a, b, _p) = pair("snapshot", size);
    for s in [&a, &b] {
        s.req(Request::Create {
            name: "e".into(),
            size,
            region_size: Some(MIB),
            backup: std::ptr::eq(s, &b),
            pool: None,
            from: None,
            image: None,
            peer_server: None,
            disk_id: None,
        });
    }
    a.req(Request::Attach {
        name: "e".into(),
        peer: b.addr.clone(),
        peer_server: None,
    });
    wait_for("e in sync", || {
        a.disk("e").status().link == LinkState::InSync
    });
    // Both disks full of data, so that the copier has work while the stamps go on.
    for name in ["d", "e"] {
        for m in 0..size / MIB {
            write(&a.disk(name), m * MIB, vec![0xab; MIB as usize]);
        }
    }
    // Writes one after the other, each once the previous one completed, alternating disks,
    // to blocks from the end of the disks (where the copier comes last).
    let blocks = 512u64;
    let place = move |seq: u64| {
        let name = ["d", "e"][(seq % 2) as usize];
        (name, (blocks - 1 - (seq / 2) % blocks) * 4096 * 61)
    };
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (disks, stop2, done2) = (
        [a.disk("d"), a.disk("e")],
        Arc::clone(&stop),
        Arc::clone(&done),
    );
    let writer = std::thread::spawn(move || {
        let mut seq = 0;
        while !stop2.load(Ordering::Relaxed) {
            seq += 1;
            let (name, at) = place(seq);
            write(&disks[usize::from(name == "e")], at, stamped(seq));
            done2.store(seq, Ordering::Relaxed);
        }
    });
    wait_for("writes under way", || done.load(Ordering::Relaxed) > 200);
    let before = done.load(Ordering::Relaxed);
    let images = scratch("snapshot-images");
    b.req(Request::Snapshot {
        names: vec!["e".into(), "d".into()],
        dir: images.clone(),
        rate: Some(64 << 20),
    });
    let refused = b.try_req(Request::Snapshot {
        names: vec!["d".into()],
        dir: scratch("snapshot-again"),
        rate: None,
    });
    assert!(refused.unwrap_err().contains("being made"));
    wait_for("both images made", || {
        ["d", "e"]
            .iter()
            .all(|n| b.disk(n).status().snapshot.is_some_and(|s| s.finished))
    });
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let after = done.load(Ordering::Relaxed);
    // The point: the newest write found; every write up to it is there, none after it.
    let image = |n: &str| std::fs::read(images.join(format!("{n}.raw"))).unwrap();
    let (d, e) = (image("d"), image("e"));
    let found = |seq: u64| {
        let (name, at) = place(seq);
        let img = if name == "d" { &d } else { &e };
        stamp_of(&img[at as usize..at as usize + 4096])
    };
    let k = (1..=after)
        .filter(|s| found(*s) == Some(*s))
        .max()
        .expect("stamps in the images");
    assert!(
        k >= before,
        "the writes completed before the start are there: {k} < {before}"
    );
    assert!(k < after, "writes went on after the start: {k} of {after}");
    // Each place is written by writes 2 * blocks apart: it holds the last of them at or
    // before the point (the filler, 0, if none).
    let period = 2 * blocks;
    for first in 1..=period {
        let want = (first..=k).step_by(period as usize).last().unwrap_or(0);
        assert_eq!(
            found(first),
            Some(want),
            "the place of write {first}, cut at {k}"
        );
    }
    for n in ["d", "e"] {
        assert_eq!(image(n).len() as u64, size);
    }
    let saved: u64 = ["d", "e"]
        .iter()
        .map(|n| b.disk(n).status().snapshot.unwrap().saved_by_writes)
        .sum();
    assert!(saved > 0, "writes met chunks not copied yet");
}
