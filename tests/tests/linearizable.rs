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

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use enspeed_tests::linearizability::{self, Answer, Call, Operation, Value};
use enspeed_tests::Scratch;
use serde_json::{json, Value as Json};

const SERVERS: usize = 3;
const CLIENTS_PER_SERVER: usize = 2;
const KEYS: usize = 40;
/// How long the clients run, faults included.
const WORKLOAD: Duration = Duration::from_secs(24);
/// A client gives up on an answer after this long (the servers' own request timeout is 2 s).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);
const WAIT: Duration = Duration::from_secs(20);

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args)).unwrap_or_else(|e| panic!("{e}"));
}

/// The namespaces: a hub with a bridge for the Raft links, one namespace per server, and a
/// client link from this namespace to each server.
struct Net {
    hub: String,
    servers: Vec<String>,
    subnet: String,
}

impl Net {
    fn new() -> Net {
        let pid = std::process::id();
        // Apart from the failover test's 10.x.1/24 and 10.x.2/24.
        let subnet = format!("10.{}", 100 + pid % 100);
        let hub = format!("es{pid}lh");
        let _ = run(Command::new("ip").args(["netns", "del", &hub]));
        ip(&["netns", "add", &hub]);
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &hub, "link", "set", "br0", "up"]);
        let mut net = Net {
            hub: hub.clone(),
            servers: Vec::new(),
            subnet,
        };
        for i in 1..=SERVERS {
            let ns = format!("es{pid}l{i}");
            let _ = run(Command::new("ip").args(["netns", "del", &ns]));
            ip(&["netns", "add", &ns]);
            net.servers.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            // Raft link: eth0 in the server, p<i> on the bridge.
            let port = format!("p{i}");
            ip(&[
                "-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ]);
            ip(&["-n", &hub, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &hub, "link", "set", &port, "up"]);
            let server = net.addr(i);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{server}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            // Client link: a /30 from here, and a host route to the server's address over it.
            let here = format!("lc{pid}{i}");
            let (near, far) = (
                format!("{}.{}.1", net.subnet, 3 + i),
                format!("{}.{}.2", net.subnet, 3 + i),
            );
            ip(&[
                "link", "add", &here, "type", "veth", "peer", "name", "cl0", "netns", &ns,
            ]);
            ip(&["addr", "add", &format!("{near}/30"), "dev", &here]);
            ip(&["link", "set", &here, "up"]);
            ip(&["-n", &ns, "addr", "add", &format!("{far}/30"), "dev", "cl0"]);
            ip(&["-n", &ns, "link", "set", "cl0", "up"]);
            ip(&[
                "route",
                "add",
                &format!("{server}/32"),
                "via",
                &far,
                "dev",
                &here,
            ]);
        }
        net
    }

    /// Server `i`'s address on its Raft link (also where clients reach it).
    fn addr(&self, i: usize) -> String {
        format!("{}.3.{i}", self.subnet)
    }

    /// Cuts (or restores) server `i`'s Raft link at the bridge; its client link stays.
    fn raft_link(&self, i: usize, up: bool) {
        ip(&[
            "-n",
            &self.hub,
            "link",
            "set",
            &format!("p{i}"),
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth ends, their peers here, and the routes over them.
        for ns in self.servers.iter().chain(std::iter::once(&self.hub)) {
            let _ = run(Command::new("ip").args(["netns", "del", ns]));
        }
    }
}

/// One `enspeed server` in its namespace, restartable on the same data directory.
struct Server {
    id: usize,
    addr: String,
    ns: String,
    data: PathBuf,
    child: Option<Child>,
}

impl Server {
    fn start(&mut self, bootstrap: &[&str]) {
        assert!(self.child.is_none(), "server {} already running", self.id);
        std::fs::create_dir_all(&self.data).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.with_extension("log"))
            .unwrap();
        // `ip netns exec` execs the server: the child is the server itself.
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(enspeed_tests::enspeed_bin())
            .args(["server", "--id", &self.id.to_string(), "--data"])
            .arg(&self.data)
            .args(["--listen", &self.addr, "--no-agent"])
            .args(["--request-timeout-ms", "2000", "--snapshot-every", "500"])
            .args(bootstrap)
            .env("ENSPEED_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start enspeed server");
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.data.with_extension("log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("---- server {} log (last lines) ----", self.id);
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Why a request got no answer.
enum CallError {
    /// The connection was refused: the request was never sent, it cannot have taken effect.
    NotSent,
    /// Sent, but no answer or an error: it may have taken effect.
    Unknown,
}

fn call(addr: &str, req: &Json, timeout: Duration) -> Result<Json, CallError> {
    let sa: SocketAddr = addr.parse().unwrap();
    let mut s = TcpStream::connect_timeout(&sa, Duration::from_millis(500))
        .map_err(|_| CallError::NotSent)?;
    s.set_read_timeout(Some(timeout)).unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(format!("{req}\n").as_bytes())
        .map_err(|_| CallError::Unknown)?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|_| CallError::Unknown)?;
    let v: Json = serde_json::from_str(&line).map_err(|_| CallError::Unknown)?;
    if v["ok"] == true {
        Ok(v["result"].clone())
    } else {
        Err(CallError::Unknown)
    }
}

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
        let r = call(&addr, &req, CLIENT_TIMEOUT);
        let completed = origin.elapsed();
        let answer = match (&call_, r) {
            (_, Err(CallError::NotSent)) => {
                // The server is down; try again shortly.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            (_, Err(CallError::Unknown)) => Answer::Unknown,
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

fn status(addr: &str) -> Option<Json> {
    call(addr, &json!({"op": "status"}), Duration::from_secs(2)).ok()
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The leader's id as server `via` sees it.
fn leader(servers: &Mutex<Vec<Server>>, via: usize) -> Option<usize> {
    let addr = servers.lock().unwrap()[via - 1].addr.clone();
    status(&addr)?["leader"].as_u64().map(|l| l as usize)
}

#[test]
fn concurrent_puts_gets_and_compare_and_sets_are_linearizable_through_kills_and_cuts() {
    let started = Instant::now();
    let scratch = Scratch::new("linearizable");
    let net = Net::new();
    let servers: Vec<Server> = (1..=SERVERS)
        .map(|i| Server {
            id: i,
            addr: format!("{}:7300", net.addr(i)),
            ns: net.servers[i - 1].clone(),
            data: scratch.path(&format!("server{i}")),
            child: None,
        })
        .collect();
    let servers = Arc::new(Mutex::new(servers));
    {
        let mut s = servers.lock().unwrap();
        s[0].start(&["--init"]);
        let a = s[0].addr.clone();
        wait_for("server 1 to lead", || {
            (status(&a)?["leader"] == 1).then_some(())
        });
        for i in 1..SERVERS {
            s[i].start(&["--join", &a]);
        }
        let addrs: Vec<String> = s.iter().map(|s| s.addr.clone()).collect();
        drop(s);
        wait_for("three voters everywhere", || {
            addrs
                .iter()
                .all(|a| {
                    status(a).is_some_and(|st| {
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
            net.raft_link(victim, false);
        }
        std::thread::sleep(Duration::from_millis(2500));
        if kill {
            servers.lock().unwrap()[victim - 1].start(&[]);
        } else {
            net.raft_link(victim, true);
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
