//! The control plane's key-value registers are linearizable while servers die and links break.
//!
//! Three `enspeed server`s (control plane only, `--no-agent`), each in its own network
//! namespace, reach one another through a bridge in a hub namespace (their Raft link). The test
//! reaches each server through a separate veth from its own namespace (the client link), so a
//! server whose Raft link is cut still answers its clients: the case where a stale leader could
//! serve an old value. Six client threads, two per server, put, get and compare-and-set random
//! keys; a nemesis kills servers with SIGKILL and restarts them from disk, and sets Raft links
//! down and up again. The history (invocation and answer times; no answer = unknown outcome) is
//! checked by `enspeed_tests::linearizability`.
//!
//! Needs root (network namespaces).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use enspeed_tests::cluster::{self, CallError, Client, LogOnPanic, Server};
use enspeed_tests::linearizability::{self, Answer, Call, Operation, Value};
use enspeed_tests::netns::Net;
use enspeed_tests::Scratch;
use serde_json::{json, Value as Json};

const SERVERS: usize = 3;
const CLIENTS_PER_SERVER: usize = 2;
const KEYS: usize = 40;
/// How long the clients run, faults included.
const WORKLOAD: Duration = Duration::from_secs(24);
/// A client gives up on an answer after this long (the servers' own request timeout is 2 s).
const CLIENT: Client = Client {
    connect: Some(Duration::from_millis(500)),
    read: Duration::from_secs(3),
};
const WAIT: Duration = Duration::from_secs(20);
/// How the test's own requests (status, who leads) wait.
const STATUS: Client = Client {
    connect: Some(Duration::from_millis(500)),
    read: Duration::from_secs(2),
};

fn json_value(v: &Json) -> Value {
    v.as_str().map(str::to_string)
}

/// A small deterministic generator (xorshift), seeded per client.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// One client's loop against the server at `addr` until `stop`; its part of the history.
fn client(id: usize, addr: String, origin: Instant, stop: Arc<AtomicBool>) -> Vec<Operation> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (id as u64 + 1).wrapping_mul(0x2545_f491));
    // The last value this client saw per key: what its compare-and-sets expect.
    let mut last: Vec<Value> = vec![None; KEYS];
    let mut history = Vec::new();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let k = rng.below(KEYS as u64) as usize;
        let key = format!("lin{k}");
        n += 1;
        let value = format!("c{id}.{n}");
        let (call_, req) = match rng.below(10) {
            0..=3 => (Call::Get, json!({"op": "get", "key": key})),
            4..=6 => (
                Call::Put(value.clone()),
                json!({"op": "put", "key": key, "value": value}),
            ),
            _ => (
                Call::Cas {
                    expected: last[k].clone(),
                    new: Some(value.clone()),
                },
                json!({"op": "propose", "command": {"cmd": "compare_and_set", "key": key,
                    "expected": last[k], "value": value}}),
            ),
        };
        let invoked = origin.elapsed();
        let r = CLIENT.call(&addr, &req);
        let completed = origin.elapsed();
        let answer = match (&call_, r) {
            (_, Err(CallError::NotSent(_))) => {
                // The server is down; try again shortly.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            (_, Err(CallError::NoAnswer(_) | CallError::Refused(_))) => Answer::Unknown,
            (Call::Get, Ok(r)) => Answer::Get(json_value(&r["value"])),
            (Call::Put(_), Ok(r)) => Answer::Put {
                previous: json_value(&r["previous"]),
            },
            (Call::Cas { .. }, Ok(r)) => Answer::Cas {
                set: r["set"].as_bool().expect("cas answers set"),
                previous: json_value(&r["previous"]),
            },
        };
        last[k] = match (&call_, &answer) {
            (_, Answer::Get(v)) => v.clone(),
            (Call::Put(v), Answer::Put { .. }) => Some(v.clone()),
            (Call::Cas { new, .. }, Answer::Cas { set: true, .. }) => new.clone(),
            (_, Answer::Cas { previous, .. }) => previous.clone(),
            _ => last[k].clone(),
        };
        history.push(Operation {
            client: id,
            key,
            call: call_,
            answer,
            invoked,
            completed,
        });
    }
    history
}

/// The leader's id as server `via` sees it.
fn leader(servers: &Mutex<Vec<Server>>, via: usize) -> Option<usize> {
    let addr = servers.lock().unwrap()[via - 1].addr.clone();
    STATUS.status(&addr)?["leader"].as_u64().map(|l| l as usize)
}

#[test]
fn concurrent_puts_gets_and_compare_and_sets_are_linearizable_through_kills_and_cuts() {
    let started = Instant::now();
    let scratch = Scratch::new("linearizable");
    // Apart from the failover test's 10.x.1/24 and 10.x.2/24; client links on 10.x.4-6.
    let net = Net::new("l", SERVERS, 3);
    net.add_client_links();
    let servers: Vec<Server> = (1..=SERVERS)
        .map(|i| {
            let mut s = Server::new(
                i as u64,
                format!("{}:7300", net.addr(i)),
                scratch.path(&format!("server{i}")),
                &[
                    "--no-agent",
                    "--request-timeout-ms",
                    "2000",
                    "--snapshot-every",
                    "500",
                ],
            );
            s.ns = Some(net.ns(i).to_string());
            s.log_on_panic = LogOnPanic::Last(60);
            s
        })
        .collect();
    let servers = Arc::new(Mutex::new(servers));
    {
        let mut s = servers.lock().unwrap();
        cluster::bootstrap(&mut s, &STATUS, WAIT);
        let addrs: Vec<String> = s.iter().map(|s| s.addr.clone()).collect();
        drop(s);
        cluster::wait_for("three voters everywhere", WAIT, || {
            addrs
                .iter()
                .all(|a| {
                    STATUS.status(a).is_some_and(|st| {
                        st["voters"].as_array().map(Vec::len) == Some(SERVERS)
                            && st["leader"].as_u64().is_some()
                    })
                })
                .then_some(())
        });
    }

    let origin = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..SERVERS * CLIENTS_PER_SERVER)
        .map(|c| {
            let addr = servers.lock().unwrap()[c % SERVERS].addr.clone();
            let stop = stop.clone();
            std::thread::spawn(move || client(c, addr, origin, stop))
        })
        .collect();

    // The nemesis: in turn, kill -9 the leader, cut the leader's Raft link, kill -9 a
    // follower, cut a follower's link; each fault held ~2.5 s, then healed, then 1.5 s calm.
    let mut faults = Vec::new();
    let mut round = 0;
    std::thread::sleep(Duration::from_millis(1500));
    while origin.elapsed() + Duration::from_secs(4) < WORKLOAD {
        let l = (1..=SERVERS)
            .find_map(|via| leader(&servers, via))
            .unwrap_or(1);
        let victim = if round % 4 < 2 { l } else { l % SERVERS + 1 };
        let kill = round % 2 == 0;
        let at = origin.elapsed();
        if kill {
            servers.lock().unwrap()[victim - 1].kill9();
        } else {
            net.link(victim, false);
        }
        std::thread::sleep(Duration::from_millis(2500));
        if kill {
            servers.lock().unwrap()[victim - 1].start(&[]);
        } else {
            net.link(victim, true);
        }
        faults.push(format!(
            "{:.1}s {} server {victim}{}",
            at.as_secs_f64(),
            if kill { "kill -9" } else { "cut Raft link of" },
            if victim == l { " (leader)" } else { "" }
        ));
        std::thread::sleep(Duration::from_millis(1500));
        round += 1;
    }
    while origin.elapsed() < WORKLOAD {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let history: Vec<Operation> = clients
        .into_iter()
        .flat_map(|c| c.join().expect("client thread"))
        .collect();

    let answered = history
        .iter()
        .filter(|o| o.answer != Answer::Unknown)
        .count();
    let unknown = history.len() - answered;
    eprintln!("faults: {}", faults.join("; "));
    let t = Instant::now();
    let result = linearizability::check(&history);
    let took = t.elapsed();
    match result {
        Ok(sum) => eprintln!(
            "linearizable: {} operations on {} keys ({answered} answered, {unknown} unknown of which {} kept in the search); {} search states, checked in {took:?}; test took {:?}",
            history.len(),
            sum.keys,
            sum.unknown,
            sum.states,
            started.elapsed()
        ),
        Err(v) => panic!("faults: {faults:?}\n{v}"),
    }
    assert!(faults.len() >= 4, "too few faults injected: {faults:?}");
    assert!(
        answered >= 500,
        "only {answered} operations answered: the cluster did not serve through the faults"
    );
    // The check is not vacuous: the same history with one late read turned stale is refused.
    let (i, stale) = history
        .iter()
        .enumerate()
        .rev()
        .find(|(_, o)| matches!(o.answer, Answer::Get(Some(_))))
        .expect("an answered read of a written key");
    let mut forged: Vec<Operation> = history
        .iter()
        .filter(|o| o.key == stale.key)
        .cloned()
        .collect();
    let j = forged.iter().position(|o| *o == history[i]).unwrap();
    forged[j].answer = Answer::Get(None);
    assert!(
        linearizability::check(&forged).is_err(),
        "a read of {} as absent after it was written passed the check",
        stale.key
    );

    // The cluster serves again once the last fault healed.
    let last_answer = history
        .iter()
        .filter(|o| o.answer != Answer::Unknown)
        .map(|o| o.completed)
        .max();
    assert!(
        last_answer > Some(WORKLOAD - Duration::from_secs(1)),
        "no answer in the last second: {last_answer:?}"
    );
}
