//! Benchmarks the ISO library and the serial console relay on three `enspeed server`s on
//! loopback (two VM servers and a witness, with their agents). Prints Markdown.
//!
//! - ISO: an image of BENCH_ISO_MIB MiB (default 512) uploaded through the API to server 1
//!   (streamed to disk, hashed on the way, synced), then copied by server 2's agent (checked
//!   against its SHA-256, synced); beside it, the local reference: `cp` of the same file plus
//!   `sync`, and `sha256sum` of it.
//! - Console: a line typed on a running VM's serial console until the guest echoes it, straight
//!   on the VMM's control socket, through the API on the VM's own server, and through the API
//!   on another server (BENCH_LINES lines each, default 200).
//!
//! Environment: BENCH_ISO_MIB, BENCH_LINES, BENCH_DIR (/var/tmp).

use std::io::{BufRead, BufReader, Write};
use std::time::{Duration, Instant};

use enspeed_tests::cluster;
use enspeed_tests::web::{Web, WebCluster, PASSWORD};
use enspeed_tests::{env_u64, mib_per_s, ms, percentile, sh_timed};
use serde_json::json;

fn main() {
    let mib = env_u64("BENCH_ISO_MIB", 512);
    let lines = env_u64("BENCH_LINES", 200) as usize;
    let dir =
        std::path::PathBuf::from(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
            .join(format!("enspeed-library-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let iso = dir.join("bench.iso");
    // Incompressible content, made once.
    sh_timed(&format!(
        "head -c {} /dev/urandom > {}",
        mib << 20,
        iso.display()
    ));
    let size = mib << 20;

    // The local reference.
    let copy = dir.join("copy.iso");
    let cp = sh_timed(&format!("cp {} {} && sync", iso.display(), copy.display()));
    let hash = sh_timed(&format!("sha256sum {} > /dev/null", iso.display()));
    std::fs::remove_file(&copy).unwrap();

    let c = WebCluster::start(
        "library-bench",
        &[
            "--guest-cmdline",
            "console=ttyS0 tg.run=echo tg.echoms=3600000",
        ],
    );
    let m = Web::logged_in(&c.web[0], "admin", PASSWORD);

    // Upload to server 1, streamed from the file.
    let cookie = m.cookie.clone().unwrap();
    let csrf = m.csrf.clone().unwrap();
    let t = Instant::now();
    let r = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(3600))
        .build()
        .put(&format!("{}/api/v1/isos/bench.iso", c.web[0]))
        .set("Cookie", &cookie)
        .set("X-CSRF-Token", &csrf)
        .set("Content-Type", "application/octet-stream")
        .set("Content-Length", &size.to_string())
        .send(std::fs::File::open(&iso).unwrap())
        .expect("upload");
    let upload = t.elapsed();
    assert_eq!(r.status(), 201);
    let t = Instant::now();
    cluster::wait_for("server 2's copy", Duration::from_secs(3600), || {
        let l = m.get("/api/v1/isos").1;
        (l[0]["servers"] == json!([1, 2])).then_some(())
    });
    let replicate = t.elapsed();

    // The console: a VM running the test guest's echo loop.
    let vm = m
        .send(
            "POST",
            "/api/v1/vms",
            Some(json!({"name": "echo", "memory_mib": 64, "disk_gib": 1, "start": true})),
        )
        .1["id"]
        .as_u64()
        .unwrap();
    let v = cluster::wait_for("the VM running", Duration::from_secs(60), || {
        let v = m.get(&format!("/api/v1/vms/{vm}")).1;
        (v["status"] == "running").then_some(v)
    });
    let primary = v["primary"]["server"].as_u64().unwrap() as usize;
    let other = if primary == 1 { 2 } else { 1 };
    let mut rows = Vec::new();

    // Straight on the VMM's control socket.
    let socket = c.servers[primary - 1].data.join("agent/vms/echo/api.sock");
    let mut direct = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    direct.write_all(b"{\"cmd\":\"serial\"}\n").unwrap();
    let mut rd = BufReader::new(direct.try_clone().unwrap());
    let until = |rd: &mut dyn BufRead, want: &str| {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(rd.read_line(&mut line).unwrap() > 0, "the console closed");
            if line.contains(want) {
                return;
            }
        }
    };
    until(&mut rd, "tg: echo ready");
    let mut lat = Vec::new();
    for i in 0..lines {
        let t = Instant::now();
        direct
            .write_all(format!("direct {i}\r").as_bytes())
            .unwrap();
        until(&mut rd, &format!("tg: echo direct {i}"));
        lat.push(t.elapsed());
    }
    rows.push(("the VMM's control socket (unix)", lat));

    for (label, server) in [
        ("the API on the VM's server (WebSocket, relay)", primary),
        ("the API on another server (WebSocket, 2 relays)", other),
    ] {
        let w = Web::logged_in(&c.web[server - 1], "admin", PASSWORD);
        let mut con = w.console(vm, "serial", None).expect("console");
        con.read_until("tg: echo ready", Duration::from_secs(30));
        let mut lat = Vec::new();
        for i in 0..lines {
            let t = Instant::now();
            con.send(format!("api {server} {i}\r").as_bytes());
            con.read_until(
                &format!("tg: echo api {server} {i}"),
                Duration::from_secs(30),
            );
            lat.push(t.elapsed());
        }
        rows.push((label, lat));
    }

    println!(
        "### ISO library and serial console ({}, 2 cores)\n",
        today()
    );
    println!("| {mib} MiB ISO image | time | MiB/s | vs local |");
    println!("|---|---|---|---|");
    println!(
        "| local: `cp` + `sync` | {:.2} s | {:.0} | 1.00x |",
        cp.as_secs_f64(),
        mib_per_s(size, cp)
    );
    println!(
        "| local: `sha256sum` | {:.2} s | {:.0} | |",
        hash.as_secs_f64(),
        mib_per_s(size, hash)
    );
    println!(
        "| upload through the API (stream, SHA-256, fsync) | {:.2} s | {:.0} | {:.2}x |",
        upload.as_secs_f64(),
        mib_per_s(size, upload),
        mib_per_s(size, upload) / mib_per_s(size, cp)
    );
    println!(
        "| copy to the other VM server (agent, checked, fsync) | {:.2} s | {:.0} | {:.2}x |",
        replicate.as_secs_f64(),
        mib_per_s(size, replicate),
        mib_per_s(size, replicate) / mib_per_s(size, cp)
    );
    println!();
    println!(
        "| serial console, a line typed to its echo ({lines} lines) | p50 | p99 | p50 vs direct |"
    );
    println!("|---|---|---|---|");
    for (_, lat) in rows.iter_mut() {
        lat.sort();
    }
    let base = percentile(&rows[0].1, 0.5);
    for (label, lat) in rows {
        let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
        println!(
            "| {label} | {} | {} | {:.2}x |",
            ms(p50),
            ms(p99),
            p50.as_secs_f64() / base.as_secs_f64()
        );
    }
    drop(c);
    let _ = std::fs::remove_dir_all(&dir);
}

fn today() -> String {
    let out = std::process::Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
