//! The Raft control plane's speed, in one run: three `enspeed server`s (control plane only) on
//! loopback, data on the same filesystem; committed writes per second and commit latency with
//! one client and with 16 concurrent clients, to the leader and through a follower (which
//! forwards to the leader); linearizable read latency. Every request is one JSON line on a
//! kept-open connection, as `enspeed cluster` sends it. Prints Markdown.
//!
//! Every connection between the servers is mutual TLS, as in the product. What TLS adds to a
//! commit is measured beside it: the round trip of a Raft-sized exchange (a 1 KiB append, a
//! 64-byte answer) over the servers' TLS stream and over plain TCP, in the same run; a commit
//! on the leader waits for one such exchange with a quorum.
//!
//! `control-bench failover LOG` instead summarizes the output of the failover test's power-cut
//! drills (`drill N: ... VMM on server B after D, guest ready after D`).
//!
//! Run with `scripts/bench-control.sh`. Knobs: BENCH_OPS (requests per measurement, default
//! 2000), BENCH_DIR (where the servers keep their data, /var/tmp).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use enspeed_tests::cluster::{self, free_port, Client, Server};
use enspeed_tests::{ms, percentile, Scratch};
use serde_json::{json, Value};

/// The bench's clients wait this long for an answer.
const CLIENT: Client = Client {
    connect: None,
    read: Duration::from_secs(30),
};
const WAIT: Duration = Duration::from_secs(30);

/// Server `id` on loopback, control plane only, its data in `scratch`.
fn server(scratch: &Scratch, id: u64) -> Server {
    let mut s = Server::new(
        id,
        format!("127.0.0.1:{}", free_port()),
        scratch.path(&format!("server{id}")),
        &["--no-agent"],
    );
    // The log level is the caller's (`ENSPEED_LOG`, warnings by default).
    s.log_level = None;
    s
}

/// `clients` threads, each sending `ops / clients` requests made by `req` to `addr` one after
/// another; the throughput and the sorted latencies.
fn measure(
    addr: &str,
    clients: usize,
    ops: usize,
    req: fn(usize, usize) -> Value,
) -> (f64, Vec<Duration>) {
    let per = ops / clients;
    let start = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let addr = addr.to_string();
            std::thread::spawn(move || {
                let mut conn = CLIENT
                    .open(&addr)
                    .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
                (0..per)
                    .map(|i| {
                        let r = req(c, i);
                        let t = Instant::now();
                        conn.call(&r).unwrap_or_else(|e| panic!("{r}: {e}"));
                        t.elapsed()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut lat: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let rate = lat.len() as f64 / start.elapsed().as_secs_f64();
    lat.sort();
    (rate, lat)
}

fn put(c: usize, i: usize) -> Value {
    json!({"op": "put", "key": format!("bench{c}.{}", i % 64), "value": format!("v{i}")})
}

fn get(c: usize, i: usize) -> Value {
    json!({"op": "get", "key": format!("bench{c}.{}", i % 64)})
}

fn bench() {
    let ops: usize = std::env::var("BENCH_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let base = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/tmp".into());
    std::env::set_var("TMPDIR", &base);
    let scratch = Scratch::new("control-bench");
    let mut servers: Vec<Server> = (1..=3).map(|id| server(&scratch, id)).collect();
    cluster::bootstrap(&mut servers, &CLIENT, WAIT);
    let leader = cluster::wait_for("three voters that agree on a leader", WAIT, || {
        let st: Vec<Value> = servers
            .iter()
            .map(|s| CLIENT.status(&s.addr))
            .collect::<Option<_>>()?;
        let l = st[0]["leader"].as_u64()?;
        st.iter()
            .all(|s| {
                s["leader"].as_u64() == Some(l) && s["voters"].as_array().map(Vec::len) == Some(3)
            })
            .then_some(l as usize)
    });
    let leader_addr = servers[leader - 1].addr.clone();
    let follower_addr = servers[leader % 3].addr.clone();
    // Warm up: connections, RocksDB, the keys the reads will read.
    measure(&leader_addr, 16, 16 * 64, |c, i| put(c, i));

    println!("| Raft control plane, 3 servers on loopback | requests | per second | p50 | p99 |");
    println!("|---|---:|---:|---:|---:|");
    let rows: [(&str, &str, usize, fn(usize, usize) -> Value); 6] = [
        (
            "committed writes, 1 client, to the leader",
            &leader_addr,
            1,
            put,
        ),
        (
            "committed writes, 16 clients, to the leader",
            &leader_addr,
            16,
            put,
        ),
        (
            "committed writes, 1 client, through a follower",
            &follower_addr,
            1,
            put,
        ),
        (
            "committed writes, 16 clients, through a follower",
            &follower_addr,
            16,
            put,
        ),
        (
            "linearizable reads, 1 client, at the leader",
            &leader_addr,
            1,
            get,
        ),
        (
            "linearizable reads, 1 client, through a follower",
            &follower_addr,
            1,
            get,
        ),
    ];
    let mut commit_median = None;
    for (what, addr, clients, req) in rows {
        let (rate, lat) = measure(addr, clients, ops, req);
        if commit_median.is_none() {
            commit_median = Some(percentile(&lat, 0.5));
        }
        println!(
            "| {what} | {} | {rate:.0} | {} | {} |",
            lat.len(),
            ms(percentile(&lat, 0.5)),
            ms(percentile(&lat, 0.99))
        );
    }
    let (tls, plain) = tls_round_trips(&scratch, ops);
    let commit = commit_median.expect("a commit row");
    let added = tls.saturating_sub(plain);
    println!();
    println!("What TLS adds to a commit (same run; target: under 5%):");
    println!();
    println!("| exchange of 1 KiB and 64 B on loopback | round trip median |");
    println!("|---|---:|");
    println!(
        "| mutual TLS (the servers' stream) | {:.1} us |",
        tls.as_secs_f64() * 1e6
    );
    println!("| plain TCP | {:.1} us |", plain.as_secs_f64() * 1e6);
    println!(
        "| added by TLS, against the median single-client commit ({}) | {:.1} us = {:.2}% |",
        ms(commit),
        added.as_secs_f64() * 1e6,
        added.as_secs_f64() / commit.as_secs_f64() * 100.0
    );
}

/// Median round trips of `ops` exchanges (1 KiB out, 64 bytes back) over the servers' TLS
/// stream and over plain TCP, alternating in rounds.
fn tls_round_trips(scratch: &Scratch, ops: usize) -> (Duration, Duration) {
    use enspeed_trust::{Identity, TrustDir};
    use std::io::{Read, Write};
    let dir = TrustDir::of(&scratch.path("rtt"));
    dir.create_cluster(1).unwrap();
    let id = Identity::load(&dir).unwrap();
    fn echo(mut s: impl Read + Write) {
        let mut buf = [0u8; 1024];
        while s.read_exact(&mut buf).is_ok() {
            if s.write_all(&buf[..64]).is_err() {
                return;
            }
        }
    }
    fn exchanges(mut s: impl Read + Write, n: usize) -> Vec<Duration> {
        let (out, mut back) = ([7u8; 1024], [0u8; 64]);
        (0..n)
            .map(|_| {
                let t = Instant::now();
                s.write_all(&out).unwrap();
                s.read_exact(&mut back).unwrap();
                t.elapsed()
            })
            .collect()
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = id.clone();
    std::thread::spawn(move || {
        for (i, tcp) in listener.incoming().enumerate() {
            let tcp = tcp.unwrap();
            tcp.set_nodelay(true).unwrap();
            if i % 2 == 0 {
                let (s, _) = server.accept(tcp).unwrap();
                std::thread::spawn(move || echo(s));
            } else {
                std::thread::spawn(move || echo(tcp));
            }
        }
    });
    let (mut tls, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let (s, _) = id
            .connector()
            .connect(&addr, Duration::from_secs(5))
            .unwrap();
        tls.extend(exchanges(s, ops));
        let s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_nodelay(true).unwrap();
        plain.extend(exchanges(s, ops));
    }
    tls.sort();
    plain.sort();
    (percentile(&tls, 0.5), percentile(&plain, 0.5))
}

/// Parses a duration as Rust's `Debug` prints it (`1.2345s`, `812.5ms`, `40µs`).
fn parse_debug_duration(s: &str) -> Option<Duration> {
    let s = s.trim_end_matches(|c: char| c == ',' || c == ';');
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix("µs") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix("ns") {
        (n, 1e-9)
    } else {
        (s.strip_suffix('s')?, 1.0)
    };
    Some(Duration::from_secs_f64(num.parse::<f64>().ok()? * scale))
}

/// The durations after `VMM on server B after` and `guest ready after` in each drill line.
fn drills(log: &str) -> (Vec<Duration>, Vec<Duration>) {
    let text = std::fs::read_to_string(log).unwrap_or_else(|e| panic!("{log}: {e}"));
    let (mut vmm, mut ready) = (Vec::new(), Vec::new());
    for line in text.lines().filter(|l| l.starts_with("drill ")) {
        // "... VMM on server B after D, guest ready after D"
        let to_vmm = line
            .split_once(" VMM on server ")
            .and_then(|(_, rest)| rest.split_once(" after "))
            .and_then(|(_, rest)| rest.split(',').next())
            .and_then(parse_debug_duration);
        let to_ready = line
            .split_once(" guest ready after ")
            .and_then(|(_, rest)| parse_debug_duration(rest.trim()));
        if let (Some(v), Some(r)) = (to_vmm, to_ready) {
            vmm.push(v);
            ready.push(r);
        }
    }
    (vmm, ready)
}

/// Prints the median and range of the failover drills in `log`.
fn failover(log: &str) {
    let (mut vmm, mut ready) = drills(log);
    if vmm.is_empty() {
        println!("| failover drills | no drill lines found in {log} | | |");
        return;
    }
    vmm.sort();
    ready.sort();
    let s = |d: Duration| format!("{:.2} s", d.as_secs_f64());
    println!("| Failover after a power cut of the VM's primary server (measured here) | drills | median | min .. max |");
    println!("|---|---:|---:|---:|");
    for (what, v) in [
        (
            "kill -9 of every process -> VMM running on the backup",
            &vmm,
        ),
        (
            "kill -9 of every process -> guest's first line on the backup",
            &ready,
        ),
    ] {
        println!(
            "| {what} | {} | {} | {} .. {} |",
            v.len(),
            s(v[v.len() / 2]),
            s(v[0]),
            s(v[v.len() - 1])
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        None => bench(),
        Some("failover") if args.len() == 3 => failover(&args[2]),
        _ => {
            eprintln!("usage: control-bench [failover LOG]");
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drill_lines_parse() {
        let log = std::env::temp_dir().join(format!("control-bench-{}", std::process::id()));
        std::fs::write(&log, "drill 0: server 1 (leader: Some(1)) killed at ack 1000560; VMM on server 2 after 2.966710218s, guest ready after 3.068818615s\n").unwrap();
        let (vmm, ready) = drills(log.to_str().unwrap());
        std::fs::remove_file(&log).unwrap();
        assert_eq!(vmm, [Duration::from_nanos(2_966_710_218)]);
        assert_eq!(ready, [Duration::from_nanos(3_068_818_615)]);
    }

    #[test]
    fn debug_durations_parse() {
        assert_eq!(
            parse_debug_duration("1.5s"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_debug_duration("812.5ms,"),
            Some(Duration::from_micros(812_500))
        );
        assert_eq!(
            parse_debug_duration("40µs"),
            Some(Duration::from_micros(40))
        );
        assert_eq!(parse_debug_duration("fast"), None);
    }
}
