//! LiveSync beside the local disk, in one run: 4 KiB synchronous (FUA)
//! write latency and IOPS at queue depth 1 and 32, and sequential write MB/s,
//! on (1) a plain local file, (2) a replicated disk whose backup is an
//! `enspeed blockd` on loopback, (3) the same with the backup in another
//! network namespace behind a veth pair with 0.1 ms netem delay each way
//! (0.2 ms round trip). The primary runs in this process on the library's
//! write path (the one blockd serves over vhost-user-blk); every file lives
//! on the same filesystem. Prints Markdown.
//!
//! Mirror links are mutual TLS under a CA made for the run, as between a cluster's servers;
//! each LiveSync setup runs a second time over plain TCP (`--plaintext-mirror`), and the
//! second table gives what TLS costs.
//!
//! `livesync-bench guest` measures the whole way a guest's write goes instead: the test guest
//! doing its I/O on a disk served over vhost-user-blk by a real primary `enspeed blockd`
//! mirrored to a real backup blockd, beside the same guest on a local file (the VMM's own
//! virtio-blk) and on two local files written in parallel (a vhost-user-blk backend in this
//! process), same run ([`guest_main`]).
//!
//! Run with `scripts/bench-livesync.sh` (root, for the namespace). Knobs:
//! BENCH_OPS (4 KiB writes per measurement, default 2000), BENCH_ROUNDS (3).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockrepl::net::MirrorNet;
use blockrepl::store::{BlockStore, FileStore};
use enspeed_tests::blockd::{backup, primary, primary_daemon};
use enspeed_tests::{guest_args, Scratch, Vmm};

const DISK: u64 = 512 << 20;
const NS: &str = "enspeed-bench";
const NS_HOST_IP: &str = "10.199.0.1";
const NS_PEER_IP: &str = "10.199.0.2";

fn sh(args: &[&str]) {
    let st = Command::new(args[0])
        .args(&args[1..])
        .status()
        .expect("run a setup command");
    assert!(st.success(), "{args:?} failed");
}

fn teardown_ns() {
    let _ = Command::new("ip")
        .args(["link", "del", "esb0"])
        .stderr(Stdio::null())
        .status();
    let _ = Command::new("ip")
        .args(["netns", "del", NS])
        .stderr(Stdio::null())
        .status();
}

/// Sets up the namespace and its veth pair; returns whether netem delays it.
fn setup_ns() -> bool {
    teardown_ns();
    sh(&["ip", "netns", "add", NS]);
    sh(&[
        "ip", "link", "add", "esb0", "type", "veth", "peer", "name", "esb1",
    ]);
    sh(&["ip", "link", "set", "esb1", "netns", NS]);
    sh(&[
        "ip",
        "addr",
        "add",
        &format!("{NS_HOST_IP}/30"),
        "dev",
        "esb0",
    ]);
    sh(&["ip", "link", "set", "esb0", "up"]);
    for c in [
        vec![
            "ip",
            "addr",
            "add",
            &format!("{NS_PEER_IP}/30"),
            "dev",
            "esb1",
        ],
        vec!["ip", "link", "set", "esb1", "up"],
        vec!["ip", "link", "set", "lo", "up"],
    ] {
        let mut a = vec!["ip", "netns", "exec", NS];
        a.extend(c);
        sh(&a);
    }
    let netem = |args: &[&str]| {
        Command::new(args[0])
            .args(&args[1..])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    netem(&[
        "tc", "qdisc", "add", "dev", "esb0", "root", "netem", "delay", "100us",
    ]) && netem(&[
        "ip", "netns", "exec", NS, "tc", "qdisc", "add", "dev", "esb1", "root", "netem", "delay",
        "100us",
    ])
}

/// A TCP echo server on `addr` (run in the namespace: `livesync-bench echo ADDR`).
fn echo_server(addr: &str) {
    let l = std::net::TcpListener::bind(addr).expect("bind the echo server");
    for c in l.incoming() {
        let Ok(mut c) = c else { continue };
        std::thread::spawn(move || {
            let _ = c.set_nodelay(true);
            let mut buf = [0u8; 64];
            while let Ok(n) = std::io::Read::read(&mut c, &mut buf) {
                if n == 0 || std::io::Write::write_all(&mut c, &buf[..n]).is_err() {
                    return;
                }
            }
        });
    }
}

/// Median TCP round trip to the echo server at `addr`, in ms.
fn tcp_rtt_ms(addr: &str) -> f64 {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut c = loop {
        match std::net::TcpStream::connect(addr) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("echo server {addr}: {e}"),
        }
    };
    c.set_nodelay(true).unwrap();
    let mut times: Vec<f64> = (0..500)
        .map(|_| {
            let t0 = Instant::now();
            c.write_all(&[7u8; 64]).unwrap();
            let mut got = 0;
            let mut buf = [0u8; 64];
            while got < 64 {
                got += c.read(&mut buf[got..]).unwrap();
            }
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    times[times.len() / 2]
}

/// Relays TCP from a loopback port to `target`, holding every chunk `delay`
/// in each direction; returns the loopback address.
fn delay_relay(target: String, delay: Duration) -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for inbound in l.incoming() {
            let Ok(inbound) = inbound else { continue };
            let Ok(outbound) = std::net::TcpStream::connect(&target) else {
                continue;
            };
            for (from, to) in [
                (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                (outbound, inbound),
            ] {
                relay_one_way(from, to, delay);
            }
        }
    });
    addr
}

/// The cluster's CA, made for the run in `dir`: server 1's certificate (the primaries) and
/// server 2's (the backups).
fn certificates(dir: &Path) -> (enspeed_trust::TrustDir, enspeed_trust::TrustDir) {
    let (one, two) = (
        enspeed_trust::TrustDir::of(&dir.join("server1")),
        enspeed_trust::TrustDir::of(&dir.join("server2")),
    );
    one.create_cluster(1).unwrap();
    two.install(&one.enroll(2).unwrap()).unwrap();
    (one, two)
}

/// The network namespace and its echo server: both go when dropped (a panic too).
struct Namespace(std::process::Child);

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        teardown_ns();
    }
}

/// The paths the round trips are measured on: an echo server on loopback, then the network
/// namespace with an echo server of its own. Answers the loopback echo's address, the
/// namespace, and whether netem delays the namespace's veth.
fn echoes_and_namespace() -> (String, Namespace, bool) {
    let echo_lo = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    {
        let a = echo_lo.clone();
        std::thread::spawn(move || echo_server(&a));
    }
    let netem = setup_ns();
    let echo = Command::new("ip")
        .args(["netns", "exec", NS])
        .arg(std::env::current_exe().unwrap())
        .args(["echo", &format!("{NS_PEER_IP}:7701")])
        .spawn();
    let ns = Namespace(echo.unwrap_or_else(|e| {
        teardown_ns();
        panic!("start the echo server in the namespace: {e}")
    }));
    (echo_lo, ns, netem)
}

/// How to reach `addr`, in the namespace, 0.1 ms later each way: itself when netem delays the
/// veth, else through a relay that holds each chunk.
fn delayed(addr: String, netem: bool) -> String {
    if netem {
        addr
    } else {
        delay_relay(addr, Duration::from_micros(100))
    }
}

/// What [`delayed`] does, in words.
fn delay_how(netem: bool) -> &'static str {
    if netem {
        "tc netem 0.1 ms each way"
    } else {
        "a relay holding each chunk 0.1 ms each way (no netem in this kernel)"
    }
}

fn relay_one_way(mut from: std::net::TcpStream, mut to: std::net::TcpStream, delay: Duration) {
    use std::io::{Read, Write};
    let _ = from.set_nodelay(true);
    let _ = to.set_nodelay(true);
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 << 10];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0
                || tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
            {
                return;
            }
        }
    });
    std::thread::spawn(move || {
        for (due, chunk) in rx {
            // Sleep most of the wait, spin the last stretch: sleeps overshoot.
            loop {
                let now = Instant::now();
                if now >= due {
                    break;
                }
                if due - now > Duration::from_micros(60) {
                    std::thread::sleep(due - now - Duration::from_micros(50));
                } else {
                    std::hint::spin_loop();
                }
            }
            if to.write_all(&chunk).is_err() {
                let _ = to.shutdown(std::net::Shutdown::Both);
                return;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
    });
}

fn write_wait(s: &dyn BlockStore, off: u64, data: Vec<u8>, fua: bool) {
    let (tx, rx) = mpsc::channel();
    s.write(off, data, fua, Box::new(move |r| tx.send(r).unwrap()));
    rx.recv().unwrap().expect("write");
}

struct Lat {
    median_us: f64,
    p99_us: f64,
    iops: f64,
}

/// `ops` 4 KiB FUA writes at random offsets from `qd` threads.
fn sync_writes(s: Arc<dyn BlockStore>, ops: usize, qd: usize) -> Lat {
    let started = Instant::now();
    let threads: Vec<_> = (0..qd)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut x = 0x2545_F491_4F6C_DD1Du64 ^ (t as u64 + 1).wrapping_mul(0x9E37_79B9);
                let mut lat = Vec::with_capacity(ops / qd);
                for _ in 0..ops / qd {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let off = (x % (DISK / 4096)) * 4096;
                    let t0 = Instant::now();
                    write_wait(&*s, off, vec![(x & 0xff) as u8; 4096], true);
                    lat.push(t0.elapsed().as_secs_f64() * 1e6);
                }
                lat
            })
        })
        .collect();
    let mut all: Vec<f64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let secs = started.elapsed().as_secs_f64();
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Lat {
        median_us: all[all.len() / 2],
        p99_us: all[(all.len() * 99 / 100).min(all.len() - 1)],
        iops: all.len() as f64 / secs,
    }
}

/// 256 MiB of 1 MiB writes from 4 threads, then a flush: MB/s.
fn seq_write(s: Arc<dyn BlockStore>) -> f64 {
    let total: u64 = 256 << 20;
    let started = Instant::now();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                let part = total / 4;
                for i in 0..part >> 20 {
                    write_wait(&*s, t * part + (i << 20), vec![t as u8 + 1; 1 << 20], false);
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let (tx, rx) = mpsc::channel();
    s.flush(Box::new(move |r| tx.send(r).unwrap()));
    rx.recv().unwrap().expect("flush");
    total as f64 / started.elapsed().as_secs_f64() / 1e6
}

/// Two local files written in parallel, each write complete when both are:
/// what two durable copies cost on this machine's one disk, the floor the
/// replicated disk is held against here (on two servers each copy has its
/// own disk).
struct TwoFiles {
    a: FileStore,
    b: Arc<FileStore>,
    jobs: std::sync::Mutex<mpsc::Sender<(u64, Vec<u8>, bool, mpsc::Sender<std::io::Result<()>>)>>,
}

impl TwoFiles {
    fn new(a: &Path, b: &Path) -> TwoFiles {
        let b = Arc::new(FileStore::open(b, false).unwrap());
        let (tx, rx) = mpsc::channel::<(u64, Vec<u8>, bool, mpsc::Sender<std::io::Result<()>>)>();
        let shared = Arc::new(std::sync::Mutex::new(rx));
        for _ in 0..32 {
            let (b, shared) = (b.clone(), shared.clone());
            std::thread::spawn(move || loop {
                let job = shared.lock().unwrap().recv();
                let Ok((off, data, fua, reply)) = job else {
                    return;
                };
                b.write(off, data, fua, Box::new(move |r| drop(reply.send(r))));
            });
        }
        TwoFiles {
            a: FileStore::open(a, false).unwrap(),
            b,
            jobs: std::sync::Mutex::new(tx),
        }
    }
}

impl BlockStore for TwoFiles {
    fn capacity(&self) -> u64 {
        self.a.capacity()
    }
    fn device_id(&self) -> String {
        "two-files".into()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.a.read(offset, buf)
    }
    fn write(&self, offset: u64, data: Vec<u8>, fua: bool, done: blockrepl::store::Done) {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .lock()
            .unwrap()
            .send((offset, data.clone(), fua, tx))
            .unwrap();
        let (dtx, drx) = mpsc::channel();
        self.a
            .write(offset, data, fua, Box::new(move |r| drop(dtx.send(r))));
        let first = drx.recv().unwrap();
        let second = rx.recv().unwrap();
        done(first.and(second));
    }
    fn flush(&self, done: blockrepl::store::Done) {
        let (tx, rx) = mpsc::channel();
        self.b.flush(Box::new(move |r| drop(tx.send(r))));
        self.a
            .flush(Box::new(move |r| done(r.and(rx.recv().unwrap()))));
    }
}

struct Row {
    name: String,
    qd1: Lat,
    qd32: Lat,
    seq: f64,
}

/// One write in every 1 MiB region, so the file's blocks are allocated and
/// every bitmap region is marked (a replicated disk marks a region durably on
/// its first write; a running guest's working set is marked, and the first
/// write to a cold region pays one extra fdatasync).
fn warm(s: &Arc<dyn BlockStore>, ops: usize) {
    for r in 0..DISK >> 20 {
        write_wait(&**s, r << 20, vec![1; 4096], false);
    }
    let _ = sync_writes(s.clone(), ops / 4, 4);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Runs every measurement on every store, store after store, `rounds` times,
/// and keeps each figure's median over the rounds.
fn measure_all(stores: &[(&str, Arc<dyn BlockStore>)], ops: usize, rounds: usize) -> Vec<Row> {
    for (name, s) in stores {
        eprintln!("warming {name}");
        warm(s, ops);
    }
    let mut runs: Vec<Vec<(Lat, Lat, f64)>> = stores.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (i, (name, s)) in stores.iter().enumerate() {
            eprintln!("round {round}: {name}");
            runs[i].push((
                sync_writes(s.clone(), ops, 1),
                sync_writes(s.clone(), ops, 32),
                seq_write(s.clone()),
            ));
        }
    }
    stores
        .iter()
        .zip(runs)
        .map(|((name, _), r)| {
            let lat = |f: &dyn Fn(&(Lat, Lat, f64)) -> f64| median(r.iter().map(f).collect());
            Row {
                name: name.to_string(),
                qd1: Lat {
                    median_us: lat(&|x| x.0.median_us),
                    p99_us: lat(&|x| x.0.p99_us),
                    iops: lat(&|x| x.0.iops),
                },
                qd32: Lat {
                    median_us: lat(&|x| x.1.median_us),
                    p99_us: lat(&|x| x.1.p99_us),
                    iops: lat(&|x| x.1.iops),
                },
                seq: lat(&|x| x.2),
            }
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("echo") {
        echo_server(&args[2]);
        return;
    }
    if args.get(1).map(String::as_str) == Some("guest") {
        guest_main();
        return;
    }
    let ops: usize = std::env::var("BENCH_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let base = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/tmp".into());
    std::env::set_var("TMPDIR", &base);
    let scratch = Scratch::new("livesync-bench");
    let dir = scratch.0.clone();

    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    for f in ["local.img", "two-a.img", "two-b.img"] {
        std::fs::File::create(dir.join(f))
            .unwrap()
            .set_len(DISK)
            .unwrap();
    }
    let local: Arc<dyn BlockStore> =
        Arc::new(FileStore::open(&dir.join("local.img"), false).unwrap());
    let two: Arc<dyn BlockStore> = Arc::new(TwoFiles::new(
        &dir.join("two-a.img"),
        &dir.join("two-b.img"),
    ));

    // The cluster's CA, made for the run: the primary is server 1, the backups server 2.
    let (one, two_tls) = certificates(&dir);
    let tls = || MirrorNet::tls(&one.0).unwrap();
    let (_b1, addr1) = backup(
        &dir.join("backup-lo"),
        "127.0.0.1",
        None,
        Some(&two_tls.0),
        DISK,
    );
    let lo: Arc<dyn BlockStore> = primary(&dir.join("primary-lo"), &addr1, tls(), DISK);
    let (_b1p, addr1p) = backup(&dir.join("backup-lo-plain"), "127.0.0.1", None, None, DISK);
    let lo_plain: Arc<dyn BlockStore> = primary(
        &dir.join("primary-lo-plain"),
        &addr1p,
        MirrorNet::Plain,
        DISK,
    );
    let (echo_lo, namespace, netem) = echoes_and_namespace();
    let (_b2, addr2) = backup(
        &dir.join("backup-ns"),
        NS_PEER_IP,
        Some(NS),
        Some(&two_tls.0),
        DISK,
    );
    let (_b2p, addr2p) = backup(
        &dir.join("backup-ns-plain"),
        NS_PEER_IP,
        Some(NS),
        None,
        DISK,
    );
    let (peer, peer_plain) = (delayed(addr2, netem), delayed(addr2p, netem));
    let (echo_addr, how) = (
        delayed(format!("{NS_PEER_IP}:7701"), netem),
        delay_how(netem),
    );
    let ns: Arc<dyn BlockStore> = primary(&dir.join("primary-ns"), &peer, tls(), DISK);
    let ns_plain: Arc<dyn BlockStore> = primary(
        &dir.join("primary-ns-plain"),
        &peer_plain,
        MirrorNet::Plain,
        DISK,
    );

    let rows = measure_all(
        &[
            ("local disk", local),
            ("two local files in parallel (two copies, one disk)", two),
            ("LiveSync, backup on loopback", lo),
            ("LiveSync, backup on loopback, plain TCP", lo_plain),
            ("LiveSync, backup in another netns, +0.2 ms RTT", ns),
            (
                "LiveSync, backup in another netns, +0.2 ms RTT, plain TCP",
                ns_plain,
            ),
        ],
        ops,
        rounds,
    );
    let rtt_lo = tcp_rtt_ms(&echo_lo);
    let rtt_ns = tcp_rtt_ms(&echo_addr);
    drop(namespace);
    let [local, two, lo_row, lo_plain, ns_row, ns_plain] =
        <[Row; 6]>::try_from(rows).ok().expect("six rows");

    println!("Delay added by {how}; RTT is the median TCP round trip of 64 bytes on the same path. Each figure is the median of {rounds} rounds; in each round every setup runs in turn.");
    println!();
    println!("| setup | RTT (ms) | 4K sync write qd1 median (us) | p99 (us) | qd1 IOPS | qd32 median (us) | qd32 p99 (us) | qd32 IOPS | seq write MB/s |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (r, rtt) in [
        (&local, 0.0),
        (&two, 0.0),
        (&lo_row, rtt_lo),
        (&lo_plain, rtt_lo),
        (&ns_row, rtt_ns),
        (&ns_plain, rtt_ns),
    ] {
        println!(
            "| {} | {:.3} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            r.name,
            rtt,
            r.qd1.median_us,
            r.qd1.p99_us,
            r.qd1.iops,
            r.qd32.median_us,
            r.qd32.p99_us,
            r.qd32.iops,
            r.seq
        );
    }
    println!();
    println!("| setup | qd1 median / (local + RTT) | qd1 median / (two local copies + RTT) | qd32 IOPS / local | qd32 IOPS / two local copies | seq MB/s / local | seq MB/s / two local copies |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (r, rtt) in [(&lo_row, rtt_lo), (&ns_row, rtt_ns)] {
        let floor = local.qd1.median_us + rtt * 1000.0;
        let floor2 = two.qd1.median_us + rtt * 1000.0;
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            r.name,
            r.qd1.median_us / floor,
            r.qd1.median_us / floor2,
            r.qd32.iops / local.qd32.iops,
            r.qd32.iops / two.qd32.iops,
            r.seq / local.seq,
            r.seq / two.seq
        );
    }
    println!();
    println!("What TLS costs on the mirror path (TLS over plain TCP, same run; target: under 5%):");
    println!();
    println!("| path | 4K sync write qd1 median | qd32 IOPS | seq write MB/s |");
    println!("| --- | ---: | ---: | ---: |");
    for (name, tls, plain) in [
        ("loopback", &lo_row, &lo_plain),
        ("another netns, +0.2 ms RTT", &ns_row, &ns_plain),
    ] {
        println!(
            "| {name} | {:+.1}% latency | {:+.1}% | {:+.1}% |",
            (tls.qd1.median_us / plain.qd1.median_us - 1.0) * 100.0,
            (tls.qd32.iops / plain.qd32.iops - 1.0) * 100.0,
            (tls.seq / plain.seq - 1.0) * 100.0
        );
    }
}

/// The disk the guest benchmarks write.
const GUEST_DISK: u64 = 512 << 20;

/// What one `bench` run of the test guest measured.
struct GuestRun {
    /// Operations a second, or MB/s for blocks of 64 KiB and more.
    rate: f64,
    p50_us: f64,
    p99_us: f64,
}

/// Boots the test guest on `disk` (a `--disk` value) for one `bench` run with `cmdline`.
fn guest_bench(disk: &str, cmdline: &str) -> GuestRun {
    let mut vm = Vmm::start(&guest_args(
        &format!("tg.run=bench {cmdline} tg.end=halt"),
        &["--disk", disk],
    ));
    vm.wait_for("tg: bench start", Duration::from_secs(60));
    let t0 = Instant::now();
    let done = vm.wait_for("tg: bench done", Duration::from_secs(600));
    let secs = t0.elapsed().as_secs_f64();
    let info = vm.wait_for("tg: bench info", Duration::from_secs(10));
    let lat = vm.wait_for("tg: bench lat", Duration::from_secs(60));
    let field = |line: &str, key: &str| -> f64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
    };
    // The guest times each operation in TSC cycles; the run's wall time gives their rate.
    let tsc_per_us = field(&info, "tsc=") / secs / 1e6;
    let (ops, bytes) = (field(&done, "ops="), field(&done, "bytes="));
    let rate = if bytes / ops >= 65536.0 {
        bytes / secs / 1e6
    } else {
        ops / secs
    };
    GuestRun {
        rate,
        p50_us: field(&lat, "p50=") / tsc_per_us,
        p99_us: field(&lat, "p99=") / tsc_per_us,
    }
}

/// One round's figures for one setup: sync writes at qd1 and qd32, and sequential MB/s.
struct GuestRow {
    qd1: GuestRun,
    qd32: GuestRun,
    seq: f64,
}

fn guest_round(disk: &str, ops: usize) -> GuestRow {
    let sync = |qd: usize, ops: usize| {
        guest_bench(
            disk,
            &format!("tg.mode=randwrite tg.bs=4096 tg.qd={qd} tg.ops={ops} tg.sync=1"),
        )
    };
    GuestRow {
        qd1: sync(1, ops),
        qd32: sync(32, ops * 4),
        // 256 MiB in 1 MiB writes, four in flight, then a flush.
        seq: guest_bench(
            disk,
            "tg.mode=seqwrite tg.bs=1048576 tg.qd=4 tg.ops=256 tg.flushend=1",
        )
        .rate,
    }
}

/// The whole way a guest's write goes, beside the same guest on local files: see the module
/// documentation. Prints Markdown.
fn guest_main() {
    let ops: usize = std::env::var("BENCH_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let base = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/tmp".into());
    std::env::set_var("TMPDIR", &base);
    let scratch = Scratch::new("livesync-guest-bench");
    let dir = scratch.0.clone();
    for f in ["local.img", "two-a.img", "two-b.img"] {
        std::fs::File::create(dir.join(f))
            .unwrap()
            .set_len(GUEST_DISK)
            .unwrap();
    }
    let two = Arc::new(TwoFiles::new(
        &dir.join("two-a.img"),
        &dir.join("two-b.img"),
    ));
    let two_sock = dir.join("two.sock");
    let two_server =
        blockrepl::vhost_blk::spawn(&two_sock, two).expect("serve the two local files");

    let (one, two_tls) = certificates(&dir);
    let (_b_lo, addr_lo) = backup(
        &dir.join("backup-lo"),
        "127.0.0.1",
        None,
        Some(&two_tls.0),
        GUEST_DISK,
    );
    let (_p_lo, sock_lo) = primary_daemon(&dir.join("primary-lo"), &addr_lo, &one.0, GUEST_DISK);
    let (echo_lo, namespace, netem) = echoes_and_namespace();
    let (_b_ns, addr_ns) = backup(
        &dir.join("backup-ns"),
        NS_PEER_IP,
        Some(NS),
        Some(&two_tls.0),
        GUEST_DISK,
    );
    let peer = delayed(addr_ns, netem);
    let (echo_addr, how) = (
        delayed(format!("{NS_PEER_IP}:7701"), netem),
        delay_how(netem),
    );
    let (_p_ns, sock_ns) = primary_daemon(&dir.join("primary-ns"), &peer, &one.0, GUEST_DISK);

    let vhost = |p: &Path| format!("vhost-user={}", p.display());
    let setups = [
        (
            "local file (the VMM's own virtio-blk)",
            dir.join("local.img").display().to_string(),
        ),
        (
            "two local files in parallel (vhost-user-blk)",
            vhost(&two_sock),
        ),
        ("LiveSync, backup on loopback", vhost(&sock_lo)),
        (
            "LiveSync, backup in another netns, +0.2 ms RTT",
            vhost(&sock_ns),
        ),
    ];
    // Every block of every disk written once first (allocated, and every LiveSync bitmap
    // region marked), unmeasured.
    for (name, disk) in &setups {
        eprintln!("filling {name}");
        guest_bench(
            disk,
            &format!(
                "tg.mode=seqwrite tg.bs=1048576 tg.qd=4 tg.ops={} tg.flushend=1",
                GUEST_DISK >> 20
            ),
        );
    }
    let mut runs: Vec<Vec<GuestRow>> = setups.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (i, (name, disk)) in setups.iter().enumerate() {
            eprintln!("round {round}: {name}");
            runs[i].push(guest_round(disk, ops));
        }
    }
    let rtt_lo = tcp_rtt_ms(&echo_lo);
    let rtt_ns = tcp_rtt_ms(&echo_addr);
    drop(namespace);
    two_server.stop().expect("the vhost-user-blk backend stops");

    // Each figure's median over the rounds, in the shape of one round.
    let rows: Vec<GuestRow> = runs
        .iter()
        .map(|r| {
            let m = |f: &dyn Fn(&GuestRow) -> f64| median(r.iter().map(f).collect());
            let run = |rate: &dyn Fn(&GuestRow) -> &GuestRun| GuestRun {
                rate: m(&|x| rate(x).rate),
                p50_us: m(&|x| rate(x).p50_us),
                p99_us: m(&|x| rate(x).p99_us),
            };
            GuestRow {
                qd1: run(&|x| &x.qd1),
                qd32: run(&|x| &x.qd32),
                seq: m(&|x| x.seq),
            }
        })
        .collect();
    let rtts = [0.0, 0.0, rtt_lo, rtt_ns];
    println!("The test guest's own I/O (`tg.run=bench`), each operation timed in the guest from its submission to its completion; a sync write is a 4 KiB write and then a FLUSH, as an O_DSYNC write on a disk with a write cache. qd1: {ops} operations; qd32: {} operations; sequential: 256 MiB of 1 MiB writes, four in flight, then a flush. Delay added by {how}; RTT is the median TCP round trip of 64 bytes on the same path. Each figure is the median of {rounds} rounds; in each round every setup runs in turn.", ops * 4);
    println!();
    println!("| setup | RTT (ms) | sync write qd1 p50 (us) | p99 (us) | qd1 IOPS | qd32 p50 (us) | qd32 p99 (us) | qd32 IOPS | seq write MB/s |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for ((name, _), (r, rtt)) in setups.iter().zip(rows.iter().zip(rtts)) {
        println!(
            "| {name} | {rtt:.3} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            r.qd1.p50_us,
            r.qd1.p99_us,
            r.qd1.rate,
            r.qd32.p50_us,
            r.qd32.p99_us,
            r.qd32.rate,
            r.seq
        );
    }
    println!();
    println!("| setup | qd1 p50 / (local + RTT) | target | qd32 IOPS / two local copies | target | seq MB/s / two local copies | target | qd32 IOPS / local | seq MB/s / local |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let (local, two) = (&rows[0], &rows[1]);
    for (i, target) in [(2usize, 1.5f64), (3, 1.15)] {
        let r = &rows[i];
        let qd1 = r.qd1.p50_us / (local.qd1.p50_us + rtts[i] * 1000.0);
        let qd32 = r.qd32.rate / two.qd32.rate;
        let seq = r.seq / two.seq;
        let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
        println!(
            "| {} | {qd1:.2} | at most {target} ({}) | {qd32:.2} | at least 0.8 ({}) | {seq:.2} | at least 0.9 ({}) | {:.2} | {:.2} |",
            setups[i].0,
            verdict(qd1 <= target),
            verdict(qd32 >= 0.8),
            verdict(seq >= 0.9),
            r.qd32.rate / local.qd32.rate,
            r.seq / local.seq
        );
    }
}
