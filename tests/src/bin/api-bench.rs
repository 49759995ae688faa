//! Benchmarks the orchestrator's REST API on three `enspeed server`s on loopback: requests per
//! second and latency of the VM list with 1,000 VMs, and of a power operation (a Raft commit
//! of the caller's change with its audit entry), through the Raft leader and through a
//! follower, with 1 and 8 clients on kept-alive connections. Prints Markdown.
//!
//! The node agents are off (`--no-agent`, and a lease long enough that no server is declared
//! down): the figures are the API's and the control plane's, not 2,000 disk copies' resyncs.
//! The clients run on the same machine and read each answer whole (without parsing it). Each
//! client is a Manager of its own, sending at most 90 requests a second (`web::CLIENT_RATE`),
//! under the pace the API holds each user to: the rates are capped by it.
//! Environment: BENCH_VMS (1000), BENCH_SECS per measurement (5), BENCH_DIR (/var/tmp).

use std::sync::Arc;
use std::time::Instant;

use enspeed_tests::ms;
use enspeed_tests::web::{
    bench_clients, bench_cluster, bench_users, measure, wait_for_user, Web, PASSWORD,
};
use serde_json::json;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let vms = env("BENCH_VMS", 1000);
    let secs = env("BENCH_SECS", 5);
    let base_dir = std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let dir = std::path::PathBuf::from(base_dir)
        .join(format!("enspeed-api-bench-{}", std::process::id()));
    let (servers, web, client) = bench_cluster(&dir, 3, |_| {
        [
            "--no-agent",
            "--lease-ms",
            "3600000",
            "--memory-mib",
            &(vms * 64 + 1024).to_string(),
            "--disk-gib",
            &(vms + 16).to_string(),
        ]
        .map(String::from)
        .to_vec()
    });
    let leader = client.status(&servers[0].addr).unwrap()["leader"]
        .as_u64()
        .unwrap() as usize;
    let follower = if leader == 1 { 2 } else { 1 };
    let (lw, fw) = (web[leader - 1].clone(), web[follower - 1].clone());

    let m = Web::logged_in(&lw, "admin", PASSWORD);
    let users = bench_users(&lw, 8);
    wait_for_user(&client, &servers, users.last().unwrap());
    let (at_leader, at_follower) = (bench_clients(&lw, &users), bench_clients(&fw, &users));
    let t = Instant::now();
    for i in 0..vms {
        let r = m.send(
            "POST",
            "/api/v1/vms",
            Some(json!({"name": format!("vm{i:04}"), "memory_mib": 64, "vcpus": 1, "disk_gib": 1})),
        );
        assert_eq!(r.0, 201, "create vm{i}: {r:?}");
    }
    let created = t.elapsed();
    let list = m.get("/api/v1/vms");
    assert_eq!(list.1.as_array().map(Vec::len), Some(vms as usize));
    let bytes = list.1.to_string().len();

    println!(
        "### Orchestrator API ({}, {} cores)",
        chrono_date(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!(
        "{vms} VMs created one by one through the API in {:.1} s ({:.0} creates/s, each a Raft commit with its audit entry); the list is {} KiB of JSON.",
        created.as_secs_f64(),
        vms as f64 / created.as_secs_f64(),
        bytes / 1024
    );
    println!();
    println!("| request, 3 servers on loopback, agents off | via | clients | requests | per second | p50 | p99 |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    let list_op: Arc<dyn Fn(&Web, usize, u64) -> u16 + Send + Sync> =
        Arc::new(|w: &Web, _, _| w.fetch("/api/v1/vms").0);
    let vms_n = vms;
    let power_op: Arc<dyn Fn(&Web, usize, u64) -> u16 + Send + Sync> =
        Arc::new(move |w: &Web, c: usize, n: u64| {
            let id = (c as u64 * 97 + n) % vms_n + 1;
            let action = if n % 2 == 0 { "on" } else { "force-off" };
            w.send(
                "POST",
                &format!("/api/v1/vms/{id}/power"),
                Some(json!({ "action": action })),
            )
            .0
        });
    for (what, op) in [
        (format!("GET /api/v1/vms ({vms} VMs)"), &list_op),
        ("POST /api/v1/vms/{id}/power".to_string(), &power_op),
    ] {
        for (via, webs) in [("leader", &at_leader), ("follower", &at_follower)] {
            for clients in [1, 8] {
                let (n, rate, p50, p99) = measure(webs, clients, secs, Arc::clone(op));
                println!(
                    "| {what} | {via} | {clients} | {n} | {rate:.0} | {} | {} |",
                    ms(p50),
                    ms(p99)
                );
            }
        }
    }
    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Today's date, YYYY-MM-DD (UTC), without a date crate.
fn chrono_date() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    out
}
