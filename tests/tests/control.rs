//! The control plane with real processes: `enspeed server`s, each in its own network namespace
//! linked to the others by veth pairs through a bridge, form a Raft cluster, lose their leader
//! to SIGKILL, are all killed and restarted from disk, grow by a server that catches up from a
//! snapshot after log compaction, and shrink again. Every check goes through the JSON-lines
//! client protocol, as `enspeed cluster` does. Needs root (network namespaces).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use enspeed_tests::cluster::{self, CallError, Client, LogOnPanic, Server};
use enspeed_tests::netns::Net;
use enspeed_tests::*;
use serde_json::{json, Value};

/// The tests here each run a cluster; one at a time keeps elections free of CPU starvation.
static ONE_CLUSTER: Mutex<()> = Mutex::new(());

const WAIT: Duration = Duration::from_secs(20);
const CLIENT: Client = Client {
    connect: None,
    read: Duration::from_secs(15),
};

/// Namespaces for up to four servers on 10.x.10/24, reachable from the test over direct links
/// (10.x.11-14); apart from the other tests' networks.
fn network(tag: &str) -> Net {
    let net = Net::new(tag, 4, 10);
    net.add_client_links();
    net
}

/// Server `id` in its namespace of `net`, its data in `scratch`, printing its log if the test
/// fails.
fn server(scratch: &Scratch, net: &Net, id: u64, extra: &[&str]) -> Server {
    let i = id as usize;
    let mut s = Server::new(
        id,
        format!("{}:7100", net.addr(i)),
        scratch.path(&format!("server{id}")),
        extra,
    );
    s.ns = Some(net.ns(i).to_string());
    s.log_on_panic = LogOnPanic::All;
    s
}

/// The client protocol, on a new connection per request.
trait Requests {
    fn call(&self, req: Value) -> Result<Value, CallError>;

    fn status(&self) -> Option<Value> {
        self.call(json!({"op": "status"})).ok()
    }

    fn put(&self, key: &str, value: &str);

    fn get(&self, key: &str) -> Value;

    /// This server's applied state, without asking the leader.
    fn local_state(&self) -> Option<Value> {
        self.call(json!({"op": "read", "query": {"query": "state"}, "local": true}))
            .ok()
    }
}

impl Requests for Server {
    fn call(&self, req: Value) -> Result<Value, CallError> {
        CLIENT.call(&self.addr, &req)
    }

    fn put(&self, key: &str, value: &str) {
        let r = self.call(json!({"op": "put", "key": key, "value": value}));
        assert!(r.is_ok(), "put {key} via server {}: {r:?}", self.id);
    }

    fn get(&self, key: &str) -> Value {
        let r = self.call(json!({"op": "get", "key": key}));
        r.unwrap_or_else(|e| panic!("get {key} via server {}: {e}", self.id))["value"].clone()
    }
}

/// Polls `f` until it returns something, or panics after `WAIT`.
fn wait_for<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    cluster::wait_for(what, WAIT, f)
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"))
}

/// What every server must show at any moment, above all after a restart.
fn check_indexes(s: &Value) {
    let (applied, commit, last) = (u(s, "applied"), u(s, "commit"), u(s, "last_index"));
    assert!(
        applied <= commit && commit <= last,
        "server {}: applied {applied}, commit {commit}, last {last}",
        s["id"]
    );
}

fn voters(s: &Value) -> Vec<u64> {
    s["voters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

/// The leader's id once every server in `servers` agrees on one that is among them.
fn agreed_leader(servers: &[&Server]) -> u64 {
    wait_for("a leader all servers agree on", || {
        let ids: Vec<Option<u64>> = servers
            .iter()
            .map(|s| s.status().and_then(|st| st["leader"].as_u64()))
            .collect();
        let first = ids[0]?;
        (ids.iter().all(|l| *l == Some(first)) && servers.iter().any(|s| s.id == first))
            .then_some(first)
    })
}

/// Waits until every server in `servers` has voters `want` and has applied what the first has.
fn converged(servers: &[&Server], want: &[u64]) {
    wait_for(&format!("voters {want:?} applied everywhere"), || {
        let st: Vec<Value> = servers.iter().map(|s| s.status()).collect::<Option<_>>()?;
        st.iter().for_each(check_indexes);
        let applied = u(&st[0], "applied");
        st.iter()
            .all(|s| voters(s) == want && u(s, "applied") == applied)
            .then_some(())
    })
}

/// Starts server 1 with --init and the others with --join, and waits for them to agree.
fn form_cluster(servers: &mut [Server]) {
    cluster::bootstrap(servers, &CLIENT, WAIT);
    let ids: Vec<u64> = servers.iter().map(|s| s.id).collect();
    converged(&servers.iter().collect::<Vec<_>>(), &ids);
}

/// The servers with ids `ids`, of `servers` numbered from 1.
fn pick<'a>(servers: &'a [Server], ids: &[u64]) -> Vec<&'a Server> {
    ids.iter().map(|&i| &servers[i as usize - 1]).collect()
}

#[test]
fn three_servers_survive_the_loss_of_the_leader_and_a_full_restart() {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("control-restart");
    let net = network("r");
    let mut servers: Vec<Server> = (1..=3).map(|id| server(&scratch, &net, id, &[])).collect();
    form_cluster(&mut servers);

    // Writes through every server (followers forward to the leader); reads from every server.
    for i in 0..30 {
        servers[i % 3].put(&format!("k{i}"), &format!("v{i}"));
    }
    for s in &servers {
        for i in (0..30).step_by(7) {
            assert_eq!(
                s.get(&format!("k{i}")),
                json!(format!("v{i}")),
                "via server {}",
                s.id
            );
        }
    }

    // A node agent's heartbeat gets the whole state, then only its revision while the state
    // stays that one, then only what changed: on the leader, and through each follower
    // (forwarded).
    for s in &servers {
        let heartbeat = |known: Option<u64>| {
            let mut req = json!({"op": "heartbeat", "server": s.id});
            if let Some(k) = known {
                req["known"] = json!(k);
            }
            s.call(req)
                .unwrap_or_else(|e| panic!("heartbeat of server {}: {e}", s.id))
        };
        let first = heartbeat(None);
        assert_eq!(first["state"]["kv"]["k0"], "v0", "server {}: {first}", s.id);
        // The agents' own reports may change the state between two heartbeats: an answer
        // carries something exactly when its revision is not the one known.
        wait_for("a heartbeat answered at the revision it knew", || {
            let known = u(&heartbeat(None), "revision");
            let again = heartbeat(Some(known));
            let same = u(&again, "revision") == known;
            let carries = again.get("state").is_some() || again.get("changes").is_some();
            assert_eq!(carries, !same, "known {known}: {again}");
            same.then_some(())
        });
        let known = u(&heartbeat(None), "revision");
        s.put("heartbeat", &s.id.to_string());
        let changed = heartbeat(Some(known));
        assert!(u(&changed, "revision") > known, "{changed}");
        assert!(changed.get("state").is_none(), "{changed}");
        let change = changed["changes"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["key"] == "kv/heartbeat"))
            .unwrap_or_else(|| panic!("the put among the changes: {changed}"));
        assert_eq!(change["value"], s.id.to_string());
        // A revision the leader cannot answer changes from (here one it has not reached) gets
        // the whole state.
        let whole = heartbeat(Some(known + 1_000_000));
        assert_eq!(
            whole["state"]["kv"]["heartbeat"],
            s.id.to_string(),
            "{whole}"
        );
    }

    // Commit latency: sequential puts on one connection to the leader.
    let leader = agreed_leader(&servers.iter().collect::<Vec<_>>());
    {
        let mut conn = CLIENT.open(&servers[leader as usize - 1].addr).unwrap();
        let mut lat = Vec::new();
        let start = Instant::now();
        for i in 0..200 {
            let t = Instant::now();
            let r = conn.call(&json!({"op": "put", "key": format!("lat{i}"), "value": "x"}));
            assert!(r.is_ok(), "{r:?}");
            lat.push(t.elapsed());
        }
        let total = start.elapsed();
        lat.sort();
        eprintln!(
            "commit latency, 3 servers in network namespaces, one client: p50 {:?}, p99 {:?}, {:.0} writes/s",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            200.0 / total.as_secs_f64()
        );
    }

    // kill -9 the leader: the other two elect a new one; committed state is intact; writes go on.
    let old = leader as usize - 1;
    servers[old].kill9();
    let killed = Instant::now();
    let rest: Vec<&Server> = servers.iter().filter(|s| s.id != leader).collect();
    let new_leader = agreed_leader(&rest);
    assert_ne!(new_leader, leader);
    eprintln!(
        "new leader {new_leader} elected {:?} after kill -9 of leader {leader}",
        killed.elapsed()
    );
    for s in &rest {
        for i in 0..30 {
            assert_eq!(
                s.get(&format!("k{i}")),
                json!(format!("v{i}")),
                "via server {} after the leader died",
                s.id
            );
        }
    }
    for i in 0..10 {
        rest[i % 2].put(&format!("n{i}"), &format!("w{i}"));
    }

    // The old leader comes back from its disk and catches up.
    servers[old].start(&[]);
    converged(&servers.iter().collect::<Vec<_>>(), &[1, 2, 3]);
    let st = servers[old].local_state().unwrap();
    assert_eq!(st["kv"]["n9"], "w9", "the restarted server caught up");

    // Power cut of everything, then a restart from disk.
    let before: Vec<Value> = servers.iter().map(|s| s.status().unwrap()).collect();
    for s in &mut servers {
        s.kill9();
    }
    for s in &mut servers {
        s.start(&[]);
    }
    for (s, b) in servers.iter().zip(&before) {
        let st = wait_for("status after restart", || s.status());
        check_indexes(&st);
        assert!(
            u(&st, "commit") >= u(b, "commit") && u(&st, "last_index") >= u(b, "last_index"),
            "server {} lost log: {b} then {st}",
            s.id
        );
        assert_eq!(voters(&st), vec![1, 2, 3]);
    }
    agreed_leader(&servers.iter().collect::<Vec<_>>());
    for s in &servers {
        assert_eq!(s.get("k29"), json!("v29"));
        assert_eq!(s.get("n9"), json!("w9"));
        assert_eq!(s.get("lat199"), json!("x"));
    }
    servers[0].put("after-restart", "yes");
    converged(&servers.iter().collect::<Vec<_>>(), &[1, 2, 3]);
    for s in &servers {
        let st = s.local_state().unwrap();
        assert_eq!(st["kv"]["after-restart"], "yes");
        // The puts, the latency writes, `n0`..`n9`, the heartbeats' and this one.
        assert_eq!(st["kv"].as_object().unwrap().len(), 30 + 200 + 10 + 1 + 1);
        check_indexes(&s.status().unwrap());
    }
}

/// A witness stands for election only after a VM server would have (`NodeConfig::witness`):
/// when the leader of three dies, the VM server that survives stands alone instead of splitting
/// the vote with the witness. Each server's election timeout, as drawn again at every change of
/// leader (default ticks: 50 ms, 6 to an election): 350 to 600 ms, the witness's 600 to 900 ms.
#[test]
fn a_witness_draws_its_election_timeout_after_the_vm_servers() {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("control-witness");
    let net = network("w");
    let mut servers: Vec<Server> = (1..=3)
        .map(|id| {
            let role: &[&str] = if id == 3 { &["--witness"] } else { &[] };
            server(&scratch, &net, id, role)
        })
        .collect();
    form_cluster(&mut servers);
    let drawn = |s: &Server| {
        let st = wait_for("a status", || s.status());
        u(&st, "election_timeout_ms")
    };
    for round in 0..3 {
        for s in &servers {
            let ms = drawn(s);
            let range = if s.id == 3 { 600..900 } else { 350..600 };
            assert!(
                range.contains(&ms),
                "round {round}: server {} drew {ms} ms, not in {range:?}",
                s.id
            );
        }
        // The leader's death makes every survivor draw again; the dead one draws at its start.
        let leader = agreed_leader(&servers.iter().collect::<Vec<_>>());
        servers[leader as usize - 1].kill9();
        let rest: Vec<&Server> = servers.iter().filter(|s| s.id != leader).collect();
        let next = agreed_leader(&rest);
        eprintln!("round {round}: leader {leader} killed, server {next} leads");
        servers[leader as usize - 1].start(&[]);
        converged(&servers.iter().collect::<Vec<_>>(), &[1, 2, 3]);
    }
}

#[test]
fn a_new_server_catches_up_from_a_snapshot_and_servers_can_be_removed() {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("control-membership");
    let compact = ["--snapshot-every", "20"];
    let net = network("m");
    let mut servers: Vec<Server> = (1..=3)
        .map(|id| server(&scratch, &net, id, &compact))
        .collect();
    form_cluster(&mut servers);
    for i in 0..100 {
        servers[i % 3].put(&format!("k{i}"), &i.to_string());
    }
    converged(&servers.iter().collect::<Vec<_>>(), &[1, 2, 3]);
    for s in &servers {
        let st = s.status().unwrap();
        assert!(
            u(&st, "first_index") > 80,
            "server {} compacted its log: {st}",
            s.id
        );
    }

    // A fourth server, a witness, joins through a follower; the log it would need is gone, so
    // it must be sent a snapshot.
    let leader = agreed_leader(&servers.iter().collect::<Vec<_>>());
    let via = servers.iter().find(|s| s.id != leader).unwrap();
    let (via, via_data) = (via.addr.clone(), via.data.clone());
    let mut s4 = server(&scratch, &net, 4, &compact);
    s4.extra.push("--witness".into());
    s4.start_joining_at(&via, &via_data, &[]);
    servers.push(s4);
    converged(&servers.iter().collect::<Vec<_>>(), &[1, 2, 3, 4]);
    let st4 = servers[3].status().unwrap();
    assert!(
        u(&st4, "first_index") > 80,
        "server 4 started from a snapshot: {st4}"
    );
    assert!(
        servers[3].log().contains("installed a snapshot"),
        "server 4 says it installed a snapshot"
    );
    let state = servers[3].local_state().unwrap();
    assert_eq!(state["kv"].as_object().unwrap().len(), 100);
    assert_eq!(state["kv"]["k99"], "99");
    assert_eq!(state["servers"]["4"]["witness"], true);
    assert_eq!(state["servers"]["1"]["witness"], false);
    // A witness holds no disk copy.
    let disk = json!({"cmd": "create_disk", "name": "d0", "size": 1024, "primary": 1, "backup": 4, "generation": 1});
    let refused = servers[3].call(json!({"op": "propose", "command": disk}));
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("witness")),
        "{refused:?}"
    );

    // Remove a follower, through the new server.
    let leader = agreed_leader(&servers.iter().collect::<Vec<_>>());
    let gone = servers
        .iter()
        .find(|s| s.id != leader && s.id != 4)
        .unwrap()
        .id;
    servers[3]
        .call(json!({"op": "remove_server", "id": gone}))
        .unwrap();
    let mut members: Vec<u64> = [1, 2, 3, 4].into_iter().filter(|&i| i != gone).collect();
    let idx = |id: u64| id as usize - 1;
    servers[idx(gone)].kill9();
    converged(&pick(&servers, &members), &members);
    let state = servers[idx(members[0])]
        .call(json!({"op": "read", "query": {"query": "state"}}))
        .unwrap();
    assert!(
        state["servers"].get(gone.to_string()).is_none(),
        "server {gone} forgotten: {state}"
    );
    servers[3].put("after-removal", "1");

    // Remove the leader itself: it hands leadership over first.
    let leader = agreed_leader(&pick(&servers, &members));
    let other = *members.iter().find(|&&i| i != leader).unwrap();
    servers[idx(other)]
        .call(json!({"op": "remove_server", "id": leader}))
        .unwrap();
    members.retain(|&i| i != leader);
    servers[idx(leader)].kill9();
    converged(&pick(&servers, &members), &members);
    let new_leader = agreed_leader(&pick(&servers, &members));
    assert_ne!(new_leader, leader);
    servers[idx(members[0])].put("two-left", "ok");
    for &i in &members {
        assert_eq!(servers[idx(i)].get("two-left"), json!("ok"));
        assert_eq!(servers[idx(i)].get("after-removal"), json!("1"));
        assert_eq!(servers[idx(i)].get("k0"), json!("0"));
    }
}
