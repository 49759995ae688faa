//! Benchmarks Virtual Appliances, each beside its reference in the same run. Prints Markdown.
//!
//! - Import: an OVA of a BENCH_DISK_MIB MiB disk (default 2048) of incompressible data as a
//!   stream-optimized VMDK, uploaded through the API to a server of a three-server cluster on
//!   loopback until it answers 201 (its VMDK decoded to raw and hashed as it arrives, then
//!   manifest checked, synced, listed), beside `qemu-img convert` of the VMDK alone to raw
//!   (the reference), and the same followed by a sync of its output. BENCH_ROUNDS runs each (3),
//!   medians.
//! - Live backup: 4 KiB FUA writes at queue depth 1 through a primary copy (in this process,
//!   on the write path blockd serves a VMM) mirrored to an `enspeed blockd` backup on
//!   loopback, over a BENCH_BACKUP_MIB MiB disk (default 4096) full of data: their latency
//!   p50/p99 without a backup, then while blockd snapshots the backup copy (every write at a
//!   chunk not copied yet copies it first), only the writes made while the copier runs.
//!
//! Environment: BENCH_DISK_MIB, BENCH_BACKUP_MIB, BENCH_OPS (20000 writes without a backup),
//! BENCH_RATE (the snapshot's copier, bytes a second; blockd's default when unset),
//! BENCH_ROUNDS, BENCH_ONLY (backup or import), BENCH_DIR (/var/tmp).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use blockrepl::daemon::Request;
use blockrepl::net::MirrorNet;
use blockrepl::store::BlockStore;
use enspeed_tests::web::{Web, WebCluster, PASSWORD};
use enspeed_tests::{env_u64, mib_per_s, percentile, sh_timed};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn sha256_hex(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// The import half: answers its Markdown rows.
fn import(dir: &Path, rounds: usize) -> String {
    let mib = env_u64("BENCH_DISK_MIB", 2048);
    let raw = dir.join("disk.raw");
    sh_timed(&format!(
        "head -c {} /dev/urandom > {}",
        mib << 20,
        raw.display()
    ));
    let vmdk = dir.join("bench-disk1.vmdk");
    sh_timed(&format!(
        "qemu-img convert -q -f raw -O vmdk -o subformat=streamOptimized {} {}",
        raw.display(),
        vmdk.display()
    ));
    let ovf = enspeed_tests::ova::ovf("bench", 512, 1, 0, &[("bench-disk1.vmdk", mib << 20)]);
    let ovf_path = dir.join("bench.ovf");
    std::fs::write(&ovf_path, &ovf).unwrap();
    let mf = format!(
        "SHA256(bench.ovf)= {}\nSHA256(bench-disk1.vmdk)= {}\n",
        sha256_hex(&ovf_path),
        sha256_hex(&vmdk)
    );
    let mf_path = dir.join("bench.mf");
    std::fs::write(&mf_path, mf).unwrap();
    let ova = dir.join("bench.ova");
    enspeed_tests::ova::tar_files(
        &ova,
        &[
            ("bench.ovf", &ovf_path),
            ("bench.mf", &mf_path),
            ("bench-disk1.vmdk", &vmdk),
        ],
    )
    .unwrap();
    std::fs::remove_file(&raw).unwrap();
    let ova_bytes = std::fs::metadata(&ova).unwrap().len();
    let vmdk_bytes = std::fs::metadata(&vmdk).unwrap().len();

    let out = dir.join("ref.raw");
    let mut reference = Vec::new();
    let mut reference_synced = Vec::new();
    for _ in 0..rounds {
        let _ = std::fs::remove_file(&out);
        sh_timed("sync");
        reference.push(sh_timed(&format!(
            "qemu-img convert -q -f vmdk -O raw {} {}",
            vmdk.display(),
            out.display()
        )));
        let _ = std::fs::remove_file(&out);
        sh_timed("sync");
        reference_synced.push(sh_timed(&format!(
            "qemu-img convert -q -f vmdk -O raw {} {} && sync -f {}",
            vmdk.display(),
            out.display(),
            out.display()
        )));
    }
    let _ = std::fs::remove_file(&out);

    let c = WebCluster::start("appliance-bench", &[]);
    let m = Web::logged_in(&c.web[0], "admin", PASSWORD);
    let (cookie, csrf) = (m.cookie.clone().unwrap(), m.csrf.clone().unwrap());
    let mut ours = Vec::new();
    for round in 0..rounds {
        sh_timed("sync");
        let name = format!("bench-{round}");
        let t = Instant::now();
        let r = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(3600))
            .build()
            .put(&format!("{}/api/v1/appliances/{name}", c.web[0]))
            .set("Cookie", &cookie)
            .set("X-CSRF-Token", &csrf)
            .set("Content-Type", "application/octet-stream")
            .set("Content-Length", &ova_bytes.to_string())
            .send(std::fs::File::open(&ova).unwrap())
            .expect("import");
        ours.push(t.elapsed());
        assert_eq!(r.status(), 201);
        assert_eq!(
            m.send("DELETE", &format!("/api/v1/appliances/{name}"), None)
                .0,
            200
        );
    }
    // Where the time went, as the server logged it (the last import's steps).
    for l in c.servers[0]
        .log()
        .lines()
        .filter(|l| l.contains("appliance=bench-"))
    {
        eprintln!("{l}");
    }
    drop(c);
    let (ours, reference, reference_synced) =
        (median(ours), median(reference), median(reference_synced));
    let ours_rate = mib_per_s(ova_bytes, ours);
    let ref_rate = mib_per_s(vmdk_bytes, reference);
    let synced_rate = mib_per_s(vmdk_bytes, reference_synced);
    format!(
        "| import of a {} MiB OVA through the API (its VMDK decoded to raw, hashed and written out as it arrives; then checked and synced) | {:.2} s | {ours_rate:.0} MB/s | {:.2}x |\n\
         | `qemu-img convert` of its VMDK ({} MiB) alone to raw (reference) | {:.2} s | {ref_rate:.0} MB/s | 1.00x |\n\
         | `qemu-img convert` of its VMDK, then `sync` of the output | {:.2} s | {synced_rate:.0} MB/s | {:.2}x |\n",
        ova_bytes >> 20,
        ours.as_secs_f64(),
        ours_rate / ref_rate,
        vmdk_bytes >> 20,
        reference.as_secs_f64(),
        reference_synced.as_secs_f64(),
        synced_rate / ref_rate,
    )
}

fn write_wait(s: &dyn BlockStore, off: u64, data: Vec<u8>, fua: bool) {
    let (tx, rx) = mpsc::channel();
    s.write(off, data, fua, Box::new(move |r| tx.send(r).unwrap()));
    rx.recv().unwrap().expect("write");
}

/// 4 KiB FUA writes at random offsets of a `size`-byte disk, one at a time, until `until`
/// says stop (or `most` writes): their latencies.
fn writes(s: &dyn BlockStore, size: u64, most: usize, until: &dyn Fn() -> bool) -> Vec<Duration> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut lat = Vec::new();
    while lat.len() < most && !until() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % (size / 4096)) * 4096;
        let t = Instant::now();
        write_wait(s, off, vec![(x & 0xff) as u8 | 1; 4096], true);
        lat.push(t.elapsed());
    }
    lat.sort();
    lat
}

/// The live backup half: answers its Markdown rows.
fn backup(dir: &Path) -> String {
    let size = env_u64("BENCH_BACKUP_MIB", 4096) << 20;
    let (backup, addr) =
        enspeed_tests::blockd::backup(&dir.join("backup"), "127.0.0.1", None, None, size);
    let control = backup.control.clone();
    let call = |r: &Request| blockrepl::daemon::call(&control, r);
    let p = enspeed_tests::blockd::primary(&dir.join("primary"), &addr, MirrorNet::Plain, size);
    // Full of data, as a used disk is: the copier has all of it to copy.
    for m in 0..size >> 20 {
        write_wait(&*p, m << 20, vec![(m as u8) | 0x80; 1 << 20], false);
    }
    let store: &dyn BlockStore = &*p;
    let ops = env_u64("BENCH_OPS", 20_000) as usize;
    let _ = writes(store, size, 2000, &|| false);
    let without = writes(store, size, ops, &|| false);
    // During a snapshot of the backup copy: the writes made while its copier runs.
    let images = dir.join("images");
    let running = Arc::new(AtomicBool::new(true));
    let r = call(&Request::Snapshot {
        names: vec!["d".into()],
        dir: images.clone(),
        rate: std::env::var("BENCH_RATE")
            .ok()
            .and_then(|v| v.parse().ok()),
    })
    .unwrap();
    assert!(r.ok, "{:?}", r.error);
    let t = Instant::now();
    let (watch, control2) = (Arc::clone(&running), control.clone());
    let watcher = std::thread::spawn(move || {
        let mut saved = 0;
        while watch.load(Ordering::Relaxed) {
            let st = blockrepl::daemon::call(&control2, &Request::Status { name: None }).unwrap();
            let s = st.disks.unwrap()[0].snapshot.clone().unwrap_or_default();
            saved = s.saved_by_writes;
            if s.finished || s.error.is_some() {
                watch.store(false, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        saved
    });
    let during = writes(store, size, usize::MAX, &|| {
        !running.load(Ordering::Relaxed)
    });
    let copier = t.elapsed();
    let saved = watcher.join().unwrap();
    drop(backup);
    let row = |what: &str, l: &[Duration], base: &[Duration]| {
        let (p50, p99) = (percentile(l, 0.5), percentile(l, 0.99));
        format!(
            "| {what} | {} | {:.0} us | {:.2}x | {:.0} us | {:.2}x |\n",
            l.len(),
            p50.as_secs_f64() * 1e6,
            p50.as_secs_f64() / percentile(base, 0.5).as_secs_f64(),
            p99.as_secs_f64() * 1e6,
            p99.as_secs_f64() / percentile(base, 0.99).as_secs_f64(),
        )
    };
    format!(
        "{}{}\nThe snapshot's copier took {:.1} s for {} MiB; {} chunks (4 KiB) were copied ahead of a write.\n",
        row("4 KiB FUA writes, qd1, no backup (reference)", &without, &without),
        row("the same while the backup copy is snapshotted (live backup)", &during, &without),
        copier.as_secs_f64(),
        size >> 20,
        saved,
    )
}

fn main() {
    let rounds = env_u64("BENCH_ROUNDS", 3) as usize;
    let dir = PathBuf::from(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
        .join(format!("enspeed-appliance-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    if only != "import" {
        let backup = backup(&dir);
        println!("### Live backup: the guest's write latency (loopback)\n");
        println!("| | writes | p50 | vs none | p99 | vs none |\n|---|---|---|---|---|---|");
        print!("{backup}");
    }
    if only != "backup" {
        let import = import(&dir, rounds);
        println!("\n### Import (medians of {rounds} runs)\n");
        println!("| | time | rate | vs qemu-img |\n|---|---|---|---|");
        print!("{import}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
