//! Benchmarks the control plane as the cluster grows: for 100, 1,000 and 10,000 VMs, the CPU
//! each idle server spends (its process and its children, over `BENCH_SECS`), and the API's
//! latency: the VM list at the leader and at a follower, a page of 100 of it at the follower
//! (`?after=VMID&limit=100`, from a VMID moving through the list), the summary (the counts the
//! UI's first screen shows) at the follower, a power operation (one Raft commit)
//! at the leader with one client and through a follower with 16. Prints Markdown.
//!
//! Five `enspeed server`s on loopback. Servers 1-3 run their node agents (heartbeats ten times
//! a second, blockd, the reconciler's pass over the whole state) but offer no capacity, so no
//! VM is placed on them and their agents hold no disk copy; servers 4 and 5 run no agent
//! (`--no-agent`) and hold every VM's disk records, so that 10,000 VMs cost the agents what
//! the control plane makes them do, not 20,000 disk copies' initial syncs. The VMs stay
//! powered off. A lease no server runs out of keeps 4 and 5 up without heartbeats.
//! Environment: BENCH_SIZES (100,1000,10000), BENCH_SECS per measurement (10),
//! BENCH_DIR (/var/tmp), BENCH_AUDIT (0: audit entries to reach at the end, then the power
//! operation again).

use std::sync::Arc;
use std::time::{Duration, Instant};

use enspeed_tests::cluster::free_port;
use enspeed_tests::web::{
    bench_clients, bench_cluster, bench_users, measure, wait_for_user, Pacer, Web, PASSWORD,
};
use enspeed_tests::{env_u64, ms};
use serde_json::json;

/// Clock ticks a second of /proc's CPU times.
const HZ: f64 = 100.0;

/// User and system CPU ticks of `pid` and every process below it.
fn cpu_ticks(pid: u32) -> u64 {
    let mut procs = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // After the command's closing parenthesis: state, ppid, ... utime (14), stime (15).
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        procs.push((p, num(1) as u32, num(11) + num(12)));
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            procs
                .iter()
                .filter(|(_, pp, _)| *pp == parent)
                .map(|(p, _, _)| *p),
        );
        i += 1;
    }
    procs
        .iter()
        .filter(|(p, _, _)| tree.contains(p))
        .map(|(_, _, t)| t)
        .sum()
}

fn main() {
    let sizes: Vec<u64> = std::env::var("BENCH_SIZES")
        .unwrap_or_else(|_| "100,1000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let secs = env_u64("BENCH_SECS", 10);
    let audit_goal = env_u64("BENCH_AUDIT", 0);
    let most = sizes.iter().copied().max().unwrap_or(0);
    let base_dir = std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let dir = std::path::PathBuf::from(base_dir)
        .join(format!("enspeed-scale-bench-{}", std::process::id()));
    let (servers, web, client) = bench_cluster(&dir, 5, |i| {
        let mut args = vec!["--lease-ms".to_string(), "3600000".into()];
        if i <= 3 {
            args.extend([
                "--blockd-listen".into(),
                format!("127.0.0.1:{}", free_port()),
            ]);
        } else {
            args.extend([
                "--no-agent".to_string(),
                "--memory-mib".into(),
                (most * 64 + 1024).to_string(),
                "--disk-gib".into(),
                (most + 16).to_string(),
            ]);
        }
        args
    });
    let leader = client.status(&servers[0].addr).unwrap()["leader"]
        .as_u64()
        .unwrap() as usize;
    // A follower that runs an agent: the API's requests through it are forwarded.
    let follower = (1..=3).find(|&s| s != leader).unwrap();
    let (lw, fw) = (web[leader - 1].clone(), web[follower - 1].clone());

    println!(
        "### Control plane at scale ({}, {} cores)",
        date(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!(
        "Five servers on loopback: 1-3 with their agents (heartbeats every 100 ms, no capacity), 4-5 without agents holding the VMs' disk records; leader: server {leader}, follower measured: server {follower}. CPU over {secs} s, idle (no request), as % of one core, process and children."
    );
    println!();
    println!("| VMs | state JSON | CPU s1 | CPU s2 | CPU s3 | CPU s4 | CPU s5 | list p50 / p99 (leader, 1) | list p50 / p99 (follower, 1) | a page of 100 p50 / p99 (follower, 1) | summary p50 / p99 (follower, 1) | power p50 / p99 (leader, 1) | power per s, p50 / p99 (follower, 16) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");

    let m = Web::logged_in(&lw, "admin", PASSWORD);
    let users = bench_users(&lw, 16);
    wait_for_user(&client, &servers, users.last().unwrap());
    let (at_leader, at_follower) = (bench_clients(&lw, &users), bench_clients(&fw, &users));
    let mut made = 0u64;
    for &n in &sizes {
        // Eight creators at once, each a user of its own and under the API's pace for one
        // user (`Pacer`): 10,000 one by one would take minutes.
        let from = made;
        let creators: Vec<_> = at_leader[..8]
            .iter()
            .enumerate()
            .map(|(c, w)| {
                let w = w.clone();
                std::thread::spawn(move || {
                    let mut pace = Pacer::default();
                    for i in (from..n).filter(|i| i % 8 == c as u64) {
                        pace.wait();
                        let r = w.send(
                            "POST",
                            "/api/v1/vms",
                            Some(json!({"name": format!("vm{i:05}"), "memory_mib": 64, "vcpus": 1, "disk_gib": 1})),
                        );
                        assert_eq!(r.0, 201, "create vm{i}: {r:?}");
                    }
                })
            })
            .collect();
        for c in creators {
            c.join().expect("creator");
        }
        made = n;
        let state = client
            .call(
                &servers[leader - 1].addr,
                &json!({"op": "read", "query": {"query": "state"}}),
            )
            .unwrap();
        assert_eq!(state["vms"].as_object().map(|v| v.len() as u64), Some(n));
        let state_kib = state.to_string().len() / 1024;
        // Let the agents' first passes over the new VMs end.
        std::thread::sleep(Duration::from_secs(5));
        eprintln!(
            "scale-bench: {n} VMs; measuring idle CPU, leader pid {}",
            servers[leader - 1].pid().unwrap()
        );
        let before: Vec<u64> = servers
            .iter()
            .map(|s| cpu_ticks(s.pid().unwrap()))
            .collect();
        let t = Instant::now();
        std::thread::sleep(Duration::from_secs(secs));
        let wall = t.elapsed().as_secs_f64();
        let cpu: Vec<String> = servers
            .iter()
            .zip(&before)
            .map(|(s, b)| {
                let used = cpu_ticks(s.pid().unwrap()).saturating_sub(*b) as f64 / HZ;
                format!("{:.1}%", used / wall * 100.0)
            })
            .collect();
        let list: Arc<dyn Fn(&Web, usize, u64) -> u16 + Send + Sync> =
            Arc::new(|w: &Web, _, _| w.fetch("/api/v1/vms").0);
        // A whole page of 100 from a VMID that moves through the list (VMIDs are 1 to n).
        let page: Arc<dyn Fn(&Web, usize, u64) -> u16 + Send + Sync> =
            Arc::new(move |w: &Web, _, k: u64| {
                let after = k * 37 % n.saturating_sub(99).max(1);
                w.fetch(&format!("/api/v1/vms?after={after}&limit=100")).0
            });
        let summary: Arc<dyn Fn(&Web, usize, u64) -> u16 + Send + Sync> =
            Arc::new(|w: &Web, _, _| w.fetch("/api/v1/summary").0);
        let power = power_op(n);
        let short = secs.div_ceil(2);
        let (_, _, l50, l99) = measure(&at_leader, 1, short, Arc::clone(&list));
        let (_, _, f50, f99) = measure(&at_follower, 1, short, Arc::clone(&list));
        let (_, _, g50, g99) = measure(&at_follower, 1, short, Arc::clone(&page));
        let (_, _, s50, s99) = measure(&at_follower, 1, short, Arc::clone(&summary));
        let (_, _, p50, p99) = measure(&at_leader, 1, short, Arc::clone(&power));
        let (_, rate, q50, q99) = measure(&at_follower, 16, short, Arc::clone(&power));
        println!(
            "| {n} | {state_kib} KiB | {} | {} / {} | {} / {} | {} / {} | {} / {} | {} / {} | {rate:.0}, {} / {} |",
            cpu.join(" | "),
            ms(l50),
            ms(l99),
            ms(f50),
            ms(f99),
            ms(g50),
            ms(g99),
            ms(s50),
            ms(s99),
            ms(p50),
            ms(p99),
            ms(q50),
            ms(q99),
        );
    }
    if audit_goal > 0 {
        // Power operations until the audit log holds `audit_goal` entries, then once more.
        let have = |m: &Web| {
            m.get("/api/v1/audit?newest=1").1[0]["seq"]
                .as_u64()
                .unwrap_or(0)
        };
        let t = Instant::now();
        let filler = power_op(made);
        while have(&m) < audit_goal {
            measure(&at_leader, 8, 5, Arc::clone(&filler));
        }
        let entries = have(&m);
        let (_, _, p50, p99) = measure(&at_leader, 1, secs, Arc::clone(&filler));
        let (_, rate, q50, q99) = measure(&at_follower, 16, secs, Arc::clone(&filler));
        println!();
        println!(
            "With the audit log at {entries} entries (filled in {:.0} s), {made} VMs: power p50 / p99 at the leader, 1 client: {} / {}; through a follower, 16 clients: {rate:.0} per s, {} / {}.",
            t.elapsed().as_secs_f64(),
            ms(p50),
            ms(p99),
            ms(q50),
            ms(q99)
        );
    }
    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A power operation on one of the first `vms` VMs, on and off in turn: one Raft commit each.
fn power_op(vms: u64) -> Arc<dyn Fn(&Web, usize, u64) -> u16 + Send + Sync> {
    Arc::new(move |w: &Web, c: usize, k: u64| {
        let id = (c as u64 * 97 + k) % vms + 1;
        let action = if k % 2 == 0 { "on" } else { "force-off" };
        w.send(
            "POST",
            &format!("/api/v1/vms/{id}/power"),
            Some(json!({ "action": action })),
        )
        .0
    })
}

/// Today's date, YYYY-MM-DD (UTC).
fn date() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
