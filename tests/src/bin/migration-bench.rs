//! Live migration (issue 13): downtime and total time of moving the running test guest between
//! two `enspeed vmm` processes on this machine, beside QEMU's own live migration of the same
//! guest between two QEMUs (KVM, `migrate tcp:`, the same 50 ms downtime limit), in one run.
//!
//! For each guest size (BENCH_MIB, default "256,1024") and load (idle: the guest rewrites one
//! page a millisecond; dirtying: 64 pages, 256 MB/s), each side migrates BENCH_ROUNDS times
//! (default 3). Downtime is as the migrating side reports it: EnSpeed from the pause to the
//! target's word that it runs; QEMU `query-migrate`'s downtime. (The guest's own clock does not
//! see the pause: both restore its TSC as it was when paused.) Each migrated guest must go on
//! counting on the target with its memory checks holding. Prints one line a migration and a
//! Markdown table of medians for BENCHMARKS.md.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use enspeed_tests::{enspeed_bin, testguest, Scratch};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_path(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until file `log` has at least `n` tick lines; their lines.
fn ticks(log: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(!text.contains("tg: FAIL"), "{}:\n{text}", log.display());
        let lines: Vec<String> = text
            .lines()
            .filter(|l| l.contains("tg: tick n="))
            .map(str::to_string)
            .collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{}: {n} tick lines never came:\n{text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The guest counts on on the target (its memory checks holding: `ticks` fails on a FAIL).
fn counts_on(target_log: &Path) {
    ticks(target_log, 3);
}

fn cmdline(load: &str) -> String {
    let pages = if load == "idle" { 1 } else { 64 };
    format!("console=ttyS0 tg.run=tick tg.tickms=600000 tg.tickpages={pages} tg.tickmib=64")
}

struct Figures {
    downtime_ms: f64,
    total_ms: f64,
}

fn vmm_api(sock: &Path, req: &str) -> serde_json::Value {
    let mut s = UnixStream::connect(sock).expect("the VMM's API");
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(b"\n").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

fn enspeed(dir: &Path, mib: u64, load: &str) -> Figures {
    let vmm = |name: &str, incoming: Option<&Path>| {
        let mut c = Command::new(enspeed_bin());
        c.arg("vmm")
            .arg("--kernel")
            .arg(testguest())
            .args(["--cmdline", &cmdline(load), "--memory", &mib.to_string()])
            .arg("--api-socket")
            .arg(dir.join(format!("{name}.api")))
            .arg("--serial")
            .arg(dir.join(format!("{name}.log")));
        if let Some(p) = incoming {
            c.arg("--incoming").arg(p);
        }
        Proc(
            c.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let _ = std::fs::remove_file(dir.join("src.log"));
    let _ = std::fs::remove_file(dir.join("dst.log"));
    let _src = vmm("src", None);
    ticks(&dir.join("src.log"), 5);
    let incoming = dir.join("in.sock");
    let _dst = vmm("dst", Some(&incoming));
    wait_path(&incoming);
    let r = vmm_api(
        &dir.join("src.api"),
        &format!(
            r#"{{"cmd":"migrate","to":"{}","downtime_ms":50}}"#,
            incoming.display()
        ),
    );
    assert_eq!(r["ok"], true, "{r}");
    let m = &r["migrated"];
    counts_on(&dir.join("dst.log"));
    Figures {
        downtime_ms: m["downtime_ms"].as_f64().unwrap(),
        total_ms: m["total_ms"].as_f64().unwrap(),
    }
}

/// A QMP session.
struct Qmp(BufReader<UnixStream>);

impl Qmp {
    fn open(path: &Path) -> Qmp {
        wait_path(path);
        let s = UnixStream::connect(path).unwrap();
        let mut q = Qmp(BufReader::new(s));
        q.line();
        q.run(r#"{"execute":"qmp_capabilities"}"#);
        q
    }

    fn line(&mut self) -> serde_json::Value {
        let mut l = String::new();
        self.0.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("QMP said {l:?}: {e}"))
    }

    /// Sends `cmd`; its answer (events in between are skipped).
    fn run(&mut self, cmd: &str) -> serde_json::Value {
        self.0.get_mut().write_all(cmd.as_bytes()).unwrap();
        loop {
            let v = self.line();
            if v.get("event").is_none() {
                assert!(v.get("error").is_none(), "QMP {cmd}: {v}");
                return v;
            }
        }
    }
}

fn qemu(dir: &Path, mib: u64, load: &str, port: u16) -> Figures {
    let start = |name: &str, incoming: Option<&str>| {
        let mut c = Command::new("qemu-system-x86_64");
        c.args([
            "-accel",
            "kvm",
            "-cpu",
            "host,-arch-capabilities",
            "-m",
            &mib.to_string(),
        ])
        .args(["-display", "none", "-no-reboot", "-nodefaults"])
        .arg("-kernel")
        .arg(testguest())
        .args(["-append", &cmdline(load)])
        .arg("-serial")
        .arg(format!(
            "file:{}",
            dir.join(format!("q{name}.log")).display()
        ))
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            dir.join(format!("q{name}.qmp")).display()
        ));
        if let Some(i) = incoming {
            c.args(["-incoming", i]);
        }
        Proc(
            c.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    for f in ["qsrc.log", "qdst.log", "qsrc.qmp", "qdst.qmp"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let _src = start("src", None);
    ticks(&dir.join("qsrc.log"), 5);
    let uri = format!("tcp:127.0.0.1:{port}");
    let _dst = start("dst", Some(&uri));
    let _ = Qmp::open(&dir.join("qdst.qmp"));
    let mut q = Qmp::open(&dir.join("qsrc.qmp"));
    // The same budget; no bandwidth cap (QEMU's default caps the stream, EnSpeed's has none).
    q.run(r#"{"execute":"migrate-set-parameters","arguments":{"downtime-limit":50,"max-bandwidth":107374182400}}"#);
    let t = Instant::now();
    q.run(&format!(
        r#"{{"execute":"migrate","arguments":{{"uri":"{uri}"}}}}"#
    ));
    let info = loop {
        let v = q.run(r#"{"execute":"query-migrate"}"#);
        match v["return"]["status"].as_str() {
            Some("completed") => break v["return"].clone(),
            Some("failed") | Some("cancelled") => panic!("QEMU's migration: {v}"),
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let total = t.elapsed();
    counts_on(&dir.join("qdst.log"));
    Figures {
        downtime_ms: info["downtime"].as_f64().unwrap_or(f64::NAN),
        total_ms: info["total-time"]
            .as_f64()
            .unwrap_or(total.as_secs_f64() * 1e3),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let sizes: Vec<u64> = std::env::var("BENCH_MIB")
        .unwrap_or_else(|_| "256,1024".into())
        .split(',')
        .map(|v| v.trim().parse().expect("BENCH_MIB"))
        .collect();
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let scratch = Scratch::new("migration-bench");
    let dir: PathBuf = scratch.0.clone();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut rows = Vec::new();
    for &mib in &sizes {
        for load in ["idle", "dirtying"] {
            let (mut e, mut q) = (Vec::new(), Vec::new());
            for round in 1..=rounds {
                // Side by side, alternating.
                let a = enspeed(&dir, mib, load);
                println!(
                    "{mib} MiB {load} round {round}: EnSpeed downtime {:.1} ms, total {:.0} ms",
                    a.downtime_ms, a.total_ms
                );
                let b = qemu(&dir, mib, load, port);
                println!(
                    "{mib} MiB {load} round {round}: QEMU downtime {:.1} ms, total {:.0} ms",
                    b.downtime_ms, b.total_ms
                );
                e.push(a);
                q.push(b);
            }
            let m = |v: &[Figures], f: fn(&Figures) -> f64| median(v.iter().map(f).collect());
            rows.push((
                mib,
                load,
                [m(&e, |f| f.downtime_ms), m(&e, |f| f.total_ms)],
                [m(&q, |f| f.downtime_ms), m(&q, |f| f.total_ms)],
            ));
        }
    }
    println!("\n| guest | load | EnSpeed downtime | total | QEMU downtime | total | downtime EnSpeed / QEMU | total EnSpeed / QEMU |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (mib, load, e, q) in rows {
        println!(
            "| {mib} MiB | {load} | {:.1} ms | {:.0} ms | {:.1} ms | {:.0} ms | {:.2} | {:.2} |",
            e[0],
            e[1],
            q[0],
            q[1],
            e[0] / q[0],
            e[1] / q[1]
        );
    }
}
