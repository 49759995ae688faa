//! LiveSync's full sync and resync against disk size and against changed data (issue 15),
//! beside a local copy of the same data on the same disk in the same run.
//!
//! A primary copy in this process (the replica blockd runs) and a real `enspeed blockd` as its
//! backup, linked over mutual TLS on loopback: both copies on this machine's one disk.
//! - For each size (BENCH_SIZES_GIB, default "1,4,16"): the primary is written whole with
//!   incompressible data, then a new backup gets a full sync (the primary's bitmap has been
//!   cleaned once, so it owes the whole disk, as when a lost backup is replaced). Reference:
//!   `cp` of the primary's data file to a new file and its fdatasync, page cache dropped before
//!   each.
//! - On the 4 GiB disk (or the first size): the link is cut, the primary goes on alone and
//!   writes BENCH_CHANGED_MIB (default "64,512,2048") MiB, one whole 1 MiB region at a time
//!   spread over the disk, and the link returns: the resync must copy exactly those regions.
//!
//! Prints one line a measure and, at the end, Markdown for BENCHMARKS.md. Root (it drops the
//! page cache); files under BENCH_DIR (default /var/tmp): room for twice the largest size.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use blockrepl::daemon::{call, Request};
use blockrepl::net::MirrorNet;
use blockrepl::replica::{LinkState, NewRole, Replica, Timing};
use blockrepl::store::BlockStore;
use enspeed_tests::{enspeed_bin, Scratch};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

struct Blockd {
    child: Child,
    control: PathBuf,
    addr: String,
}

impl Drop for Blockd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Blockd {
    fn start(dir: &Path, tls: &Path) -> Blockd {
        std::fs::create_dir_all(dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let control = dir.join("control.sock");
        let child = Command::new(enspeed_bin())
            .arg("blockd")
            .arg("--dir")
            .arg(dir.join("disks"))
            .args(["--listen", &addr, "--control"])
            .arg(&control)
            .arg("--tls")
            .arg(tls)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn blockd");
        let b = Blockd {
            child,
            control,
            addr,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while call(&b.control, &Request::Status { name: None }).is_err() {
            assert!(Instant::now() < deadline, "blockd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        b
    }

    /// Deletes backup disk `name` once the backup has seen its primary's link go.
    fn delete(&self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = Request::Delete { name: name.into() };
            let resp = call(&self.control, &r).expect("blockd answers");
            if resp.ok {
                return;
            }
            assert!(Instant::now() < deadline, "{r:?}: {:?}", resp.error);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn req(&self, r: Request) {
        let resp = call(&self.control, &r).expect("blockd answers");
        assert!(resp.ok, "{r:?}: {:?}", resp.error);
    }
}

fn drop_caches() {
    // Each measure starts from the disk, not from the page cache of the one before.
    let _ = Command::new("sync").status();
    if std::fs::write("/proc/sys/vm/drop_caches", "3").is_err() {
        eprintln!("resync-bench: cannot drop the page cache (not root?): figures include it");
    }
}

/// Incompressible 1 MiB chunks (xorshift), different each call.
struct Noise(u64);

impl Noise {
    fn chunk(&mut self) -> Vec<u8> {
        let mut v = Vec::with_capacity(MIB as usize);
        for _ in 0..MIB / 8 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            v.extend_from_slice(&self.0.to_le_bytes());
        }
        v
    }
}

/// Writes whole 1 MiB regions `regions` through the primary's write path, 8 at a time.
fn write_regions(d: &Arc<Replica>, regions: impl Iterator<Item = u64>, noise: &mut Noise) {
    let mut waiting = Vec::new();
    for r in regions {
        let (tx, rx) = mpsc::channel();
        d.write(
            r * MIB,
            noise.chunk(),
            false,
            Box::new(move |res| {
                let _ = tx.send(res);
            }),
        );
        waiting.push(rx);
        if waiting.len() >= 8 {
            waiting.remove(0).recv().unwrap().expect("write");
        }
    }
    for rx in waiting {
        rx.recv().unwrap().expect("write");
    }
    let (tx, rx) = mpsc::channel();
    d.flush(Box::new(move |res| {
        let _ = tx.send(res);
    }));
    rx.recv().unwrap().expect("flush");
}

fn wait_in_sync(d: &Replica, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(3600);
    while d.status().link != LinkState::InSync {
        assert!(
            Instant::now() < deadline,
            "{what}: no sync in an hour: {:?}",
            d.status().last_error
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `cp` of `from` to a new file and its flush: the local floor for moving the data once.
fn local_copy(from: &Path, to: &Path) -> Duration {
    drop_caches();
    let t = Instant::now();
    let ok = Command::new("cp")
        .arg("--sparse=never")
        .arg(from)
        .arg(to)
        .status()
        .expect("run cp")
        .success();
    assert!(ok, "cp failed");
    std::fs::File::open(to).unwrap().sync_all().unwrap();
    let took = t.elapsed();
    std::fs::remove_file(to).unwrap();
    took
}

fn mb_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

fn list(var: &str, default: &str) -> Vec<u64> {
    std::env::var(var)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|v| v.trim().parse().unwrap_or_else(|_| panic!("{var}: {v:?}")))
        .collect()
}

fn main() {
    let sizes = list("BENCH_SIZES_GIB", "1,4,16");
    let changed = list("BENCH_CHANGED_MIB", "64,512,2048");
    let base = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/tmp".into());
    std::env::set_var("TMPDIR", &base);
    let scratch = Scratch::new("resync-bench");
    let dir = scratch.0.clone();
    let (one, two) = (
        enspeed_trust::TrustDir::of(&dir.join("server1")),
        enspeed_trust::TrustDir::of(&dir.join("server2")),
    );
    one.create_cluster(1).unwrap();
    two.install(&one.enroll(2).unwrap()).unwrap();
    let backup = Blockd::start(&dir.join("backup"), &two.0);
    let net = Arc::new(MirrorNet::tls(&one.0).unwrap());
    let mut full_rows = Vec::new();
    let mut resync_rows = Vec::new();
    let resync_on = if sizes.contains(&4) { 4 } else { sizes[0] };
    for &gib in &sizes {
        let size = gib * GIB;
        let name = format!("d{gib}");
        let pdir = dir.join("primary");
        std::fs::create_dir_all(&pdir).unwrap();
        let d = Replica::create(
            &pdir,
            &name,
            size,
            MIB,
            NewRole::Primary,
            None,
            None,
            Timing::default(),
            net.clone(),
        )
        .unwrap();
        blockrepl::resync::start(&d).unwrap();
        let mut noise = Noise(0x9e37_79b9_7f4a_7c15 ^ gib);
        let t = Instant::now();
        write_regions(&d, 0..size / MIB, &mut noise);
        eprintln!(
            "resync-bench: {gib} GiB written in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let create_backup = || {
            backup.req(Request::Create {
                name: name.clone(),
                size,
                region_size: Some(MIB),
                backup: true,
                pool: None,
                from: None,
                image: None,
                peer_server: None,
                disk_id: Some(d.status().disk_id),
            })
        };
        // A first backup takes what the guest wrote; once in sync the primary's bitmap is
        // cleaned, and a backup made after that (the first one lost) owes the whole disk.
        create_backup();
        d.set_peer(Some(backup.addr.clone()), Some(2)).unwrap();
        wait_in_sync(&d, "the first backup");
        d.set_peer(None, None).unwrap();
        backup.delete(&name);
        let cp = local_copy(&pdir.join(&name).join("data"), &dir.join("copy"));
        create_backup();
        drop_caches();
        let t = Instant::now();
        d.set_peer(Some(backup.addr.clone()), Some(2)).unwrap();
        wait_in_sync(&d, "the full sync");
        let took = t.elapsed();
        let last = d.status().last_resync.expect("a resync ran");
        assert!(last.full, "a replaced backup got no full sync: {last:?}");
        assert_eq!(last.total_bytes, size, "{last:?}");
        println!(
            "full sync of {gib} GiB: {:.1} s ({:.0} MB/s); cp of the same file: {:.1} s ({:.0} MB/s)",
            took.as_secs_f64(),
            mb_s(size, took),
            cp.as_secs_f64(),
            mb_s(size, cp)
        );
        full_rows.push((gib, took, cp));
        if gib == resync_on {
            let mut generation = d.status().generation;
            for &mib in &changed {
                let regions = (mib.min(size / MIB)).max(1);
                d.set_peer(None, None).unwrap();
                generation += 1;
                d.raise_generation(generation, false).unwrap();
                // Spread over the disk: every k-th region.
                let step = (size / MIB) / regions;
                write_regions(&d, (0..regions).map(|i| i * step), &mut noise);
                drop_caches();
                let t = Instant::now();
                d.set_peer(Some(backup.addr.clone()), Some(2)).unwrap();
                wait_in_sync(&d, "the resync");
                let took = t.elapsed();
                let last = d.status().last_resync.expect("a resync ran");
                assert!(
                    !last.full,
                    "going alone then back gave a full sync: {last:?}"
                );
                assert_eq!(last.total_bytes, regions * MIB, "{last:?}");
                println!(
                    "resync of {mib} MiB changed on {gib} GiB: {:.2} s ({:.0} MB/s)",
                    took.as_secs_f64(),
                    mb_s(regions * MIB, took)
                );
                resync_rows.push((gib, mib, took));
            }
        }
        d.set_peer(None, None).unwrap();
        backup.delete(&name);
        drop(d);
        std::fs::remove_dir_all(pdir.join(&name)).unwrap();
    }
    println!("\n| disk | full sync to a new backup | MB/s | cp of its data file | MB/s | sync / cp time |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    for (gib, took, cp) in &full_rows {
        let size = gib * GIB;
        println!(
            "| {gib} GiB | {:.1} s | {:.0} | {:.1} s | {:.0} | {:.2} |",
            took.as_secs_f64(),
            mb_s(size, *took),
            cp.as_secs_f64(),
            mb_s(size, *cp),
            took.as_secs_f64() / cp.as_secs_f64()
        );
    }
    println!("\n| disk | changed while alone | resync | MB/s | resync / full sync time |");
    println!("| ---: | ---: | ---: | ---: | ---: |");
    for (gib, mib, took) in &resync_rows {
        let full = full_rows
            .iter()
            .find(|r| r.0 == *gib)
            .map(|r| r.1)
            .expect("the full sync of that disk");
        println!(
            "| {gib} GiB | {mib} MiB | {:.2} s | {:.0} | {:.3} |",
            took.as_secs_f64(),
            mb_s(mib * MIB, *took),
            took.as_secs_f64() / full.as_secs_f64()
        );
    }
}
