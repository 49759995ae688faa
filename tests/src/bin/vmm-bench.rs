//! Side-by-side VMM benchmarks: `enspeed vmm` against QEMU (`-M microvm`)
//! on the same test guest, the same disk file and this machine's /dev/kvm,
//! interleaved run by run. Prints a Markdown table of medians and ratios,
//! then a second one: the same disk served by a vhost-user-blk backend (in
//! this process, over the file) beside the VMM's own virtio-blk.
//!
//! Run with `scripts/bench.sh` (release build). Knobs: BENCH_RUNS (boot
//! runs, default 10), BENCH_SECONDS_SCALE (multiplies op counts, default 1).
//! `vmm-bench --vhost-user-only` prints only the second table (no QEMU needed).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blockrepl::store::FileStore;
use enspeed_tests::{enspeed_bin, testguest, Scratch};

const GUEST_MIB: u64 = 128;

#[derive(Clone, Copy, PartialEq)]
enum Engine {
    Enspeed,
    Qemu,
}

impl Engine {
    fn name(self) -> &'static str {
        match self {
            Engine::Enspeed => "enspeed",
            Engine::Qemu => "qemu",
        }
    }

    fn command(self, cmdline: &str, disk: Option<&Path>) -> Command {
        match self {
            Engine::Enspeed => {
                let mut c = Command::new(enspeed_bin());
                c.args(["vmm", "--kernel"]).arg(testguest());
                c.args([
                    "--memory",
                    &GUEST_MIB.to_string(),
                    "--cmdline",
                    &format!("console=ttyS0 {cmdline}"),
                ]);
                if let Some(d) = disk {
                    c.arg("--disk").arg(d);
                }
                c
            }
            Engine::Qemu => {
                let mut c = Command::new("qemu-system-x86_64");
                // acpi=off: microvm then lists its virtio-mmio devices on the
                // command line, as EnSpeed does. Guest RAM on a memfd, as EnSpeed's.
                c.args([
                    "-M",
                    "microvm,x-option-roms=off,rtc=off,acpi=off,memory-backend=mem",
                    "-accel",
                    "kvm",
                    "-cpu",
                    "host,-arch-capabilities",
                    "-m",
                    &format!("{GUEST_MIB}M"),
                    "-object",
                    &format!("memory-backend-memfd,id=mem,size={GUEST_MIB}M"),
                    "-smp",
                    "1",
                    "-nodefaults",
                    "-no-user-config",
                    "-display",
                    "none",
                    "-serial",
                    "stdio",
                    "-global",
                    "virtio-mmio.force-legacy=false",
                    "-kernel",
                ]);
                c.arg(testguest());
                c.args(["-append", &format!("console=ttyS0 {cmdline}")]);
                if let Some(d) = disk {
                    c.arg("-drive").arg(format!(
                        "id=d0,file={},format=raw,if=none,cache=writeback,aio=threads",
                        d.display()
                    ));
                    c.args(["-device", "virtio-blk-device,drive=d0"]);
                }
                c
            }
        }
    }
}

/// A running VMM whose serial lines arrive with the time they were read.
struct Run {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<(Instant, String)>,
    start: Instant,
}

impl Run {
    fn start(engine: Engine, cmdline: &str, disk: Option<&Path>) -> Run {
        let mut c = engine.command(cmdline, disk);
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let start = Instant::now();
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", engine.name()));
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(out).lines() {
                let Ok(l) = l else { return };
                if tx.send((Instant::now(), l)).is_err() {
                    return;
                }
            }
        });
        Run {
            child,
            lines: rx,
            start,
        }
    }

    /// Waits for a line containing `pat`; returns when it was seen and the line.
    fn wait(&mut self, pat: &str, timeout: Duration) -> (Instant, String) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((t, l)) if l.contains(pat) => return (t, l),
                Ok((_, l)) if l.contains("tg: FAIL") => panic!("guest failed: {l}"),
                Ok(_) => {}
                Err(_) => panic!("no {pat:?} within {timeout:?}"),
            }
        }
    }

    /// Resident memory that is not guest RAM: (private anonymous, file-backed) KiB.
    fn overhead_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("RssAnon:"), field("RssFile:"))
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A fully allocated (not sparse) disk file, so reads hit real blocks.
fn make_disk(s: &Scratch, mib: u64) -> PathBuf {
    let p = s.path("bench-disk.img");
    let chunk = vec![0x5au8; 1 << 20];
    let mut f = std::fs::File::create(&p).unwrap();
    for _ in 0..mib {
        std::io::Write::write_all(&mut f, &chunk).unwrap();
    }
    f.sync_all().unwrap();
    p
}

/// Runs the guest's `bench` action and returns IOPS, or MB/s for blocks of
/// 64 KiB and more, timed between its start and done lines.
fn bench_rate(engine: Engine, disk: &Path, mode: &str, bs: u64, qd: u64, ops: u64) -> f64 {
    let cl = format!("tg.run=bench tg.mode={mode} tg.bs={bs} tg.qd={qd} tg.ops={ops} tg.end=halt");
    let mut r = Run::start(engine, &cl, Some(disk));
    let (t0, _) = r.wait("tg: bench start", Duration::from_secs(120));
    let (t1, line) = r.wait("tg: bench done", Duration::from_secs(600));
    let done: u64 = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("ops="))
        .and_then(|v| v.parse().ok())
        .unwrap();
    let secs = (t1 - t0).as_secs_f64();
    if bs >= 65536 {
        done as f64 * bs as f64 / secs / 1e6
    } else {
        done as f64 / secs
    }
}

/// (e) The disk file served by a vhost-user-blk backend in this process
/// (a plain FileStore, not replicated) beside the VMM serving it itself.
fn vhost_user_table(s: &Scratch, disk: &Path, scale: u64) {
    let sock = s.path("bench-disk.sock");
    let store = FileStore::open(disk, false).expect("open the bench disk");
    let server = blockrepl::vhost_blk::spawn(&sock, std::sync::Arc::new(store))
        .expect("start the vhost-user-blk backend");
    // Engine::command passes the disk through as the --disk value.
    let vhost = PathBuf::from(format!("vhost-user={}", sock.display()));
    println!(
        "| measure | size | in-process virtio-blk | vhost-user-blk | vhost-user / in-process |"
    );
    println!("| --- | --- | ---: | ---: | ---: |");
    for (mode, bs, qd, ops) in [
        ("randwrite", 4096u64, 1u64, 4000u64),
        ("randwrite", 4096, 32, 20000),
        ("randread", 4096, 1, 4000),
        ("randread", 4096, 32, 20000),
        ("seqwrite", 131072, 4, 4000),
        ("seqread", 131072, 4, 4000),
    ] {
        let ops = ops * scale;
        let mut rate = [Vec::new(), Vec::new()];
        for _ in 0..3 {
            rate[0].push(bench_rate(Engine::Enspeed, disk, mode, bs, qd, ops));
            rate[1].push(bench_rate(Engine::Enspeed, &vhost, mode, bs, qd, ops));
        }
        let (a, b) = (median(&mut rate[0]), median(&mut rate[1]));
        let unit = if bs >= 65536 { "MB/s" } else { "IOPS" };
        println!(
            "| virtio-blk {mode} {} KiB qd{qd} ({unit}, median of 3) | {ops} ops | {a:.1} | {b:.1} | {:.2} |",
            bs / 1024,
            b / a
        );
    }
    server.stop().expect("the vhost-user-blk backend stops");
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--vhost-user-only") {
        let s = Scratch::new("bench");
        let disk = make_disk(&s, 256);
        vhost_user_table(&s, &disk, env_num("BENCH_SCALE", 1));
        return;
    }
    let runs = env_num("BENCH_RUNS", 10) as usize;
    let scale = env_num("BENCH_SCALE", 1);
    let s = Scratch::new("bench");
    let disk = make_disk(&s, 256);
    let engines = [Engine::Enspeed, Engine::Qemu];
    let timeout = Duration::from_secs(120);
    let mut rows: Vec<(String, String, [f64; 2], bool)> = Vec::new();

    // (a) Boot: spawn to the guest's first line, and to "ready" (devices probed).
    let mut entry = [Vec::new(), Vec::new()];
    let mut ready = [Vec::new(), Vec::new()];
    let mut mem = [(0u64, 0u64); 2];
    for _ in 0..runs {
        for (i, e) in engines.iter().enumerate() {
            let mut r = Run::start(*e, "tg.end=halt", Some(&disk));
            let (t_entry, _) = r.wait("tg: entry", timeout);
            let (t_ready, _) = r.wait("tg: ready", timeout);
            entry[i].push((t_entry - r.start).as_secs_f64() * 1000.0);
            ready[i].push((t_ready - r.start).as_secs_f64() * 1000.0);
            r.wait("tg: done", timeout);
            mem[i] = r.overhead_kib();
        }
    }
    let m = |v: &mut Vec<f64>| median(v);
    rows.push((
        "boot: spawn to guest entry (ms, median)".into(),
        format!("{runs} runs"),
        [m(&mut entry[0]), m(&mut entry[1])],
        false,
    ));
    rows.push((
        "boot: spawn to guest ready (ms, median)".into(),
        format!("{runs} runs"),
        [m(&mut ready[0]), m(&mut ready[1])],
        false,
    ));

    // (b) virtio-blk from the guest, timed by the host between the guest's
    // "bench start" and "bench done" lines.
    let cases: [(&str, u64, u64, u64); 6] = [
        ("randread", 4096, 1, 4000),
        ("randread", 4096, 32, 20000),
        ("randwrite", 4096, 1, 4000),
        ("randwrite", 4096, 32, 20000),
        ("seqread", 131072, 4, 4000),
        ("seqwrite", 131072, 4, 4000),
    ];
    for (mode, bs, qd, ops) in cases {
        let ops = ops * scale;
        let mut rate = [Vec::new(), Vec::new()];
        for _ in 0..3 {
            for (i, e) in engines.iter().enumerate() {
                rate[i].push(bench_rate(*e, &disk, mode, bs, qd, ops));
            }
        }
        let unit = if bs >= 65536 { "MB/s" } else { "IOPS" };
        rows.push((
            format!(
                "virtio-blk {mode} {} KiB qd{qd} ({unit}, median of 3)",
                bs / 1024
            ),
            format!("{ops} ops"),
            [m(&mut rate[0]), m(&mut rate[1])],
            true,
        ));
    }

    // (d) Resident memory beyond guest RAM (guest RAM is a memfd in both: RssShmem).
    rows.push((
        "resident memory beyond guest RAM: private (MiB)".into(),
        "idle guest".into(),
        [mem[0].0 as f64 / 1024.0, mem[1].0 as f64 / 1024.0],
        false,
    ));
    rows.push((
        "resident memory beyond guest RAM: +file-backed (MiB)".into(),
        "idle guest".into(),
        [
            (mem[0].0 + mem[0].1) as f64 / 1024.0,
            (mem[1].0 + mem[1].1) as f64 / 1024.0,
        ],
        false,
    ));

    println!("| measure | size | enspeed | qemu | enspeed / qemu |");
    println!("| --- | --- | ---: | ---: | ---: |");
    for (name, size, v, _) in &rows {
        println!(
            "| {name} | {size} | {:.1} | {:.1} | {:.2} |",
            v[0],
            v[1],
            v[0] / v[1]
        );
    }
    println!();
    vhost_user_table(&s, &disk, scale);
}
