//! Failover with real processes: two `enspeed server`s that run VMs and a witness, each in its
//! own network namespace, joined by veth pairs to a bridge in a hub namespace. Each server's
//! node agent runs its `enspeed blockd` and the VM's `enspeed vmm`; the VM is the level-1 test
//! guest stamping blocks on its LiveSync disk.
//!
//! - power cut: every process of the VM's primary server is killed with SIGKILL; the VM boots
//!   on the backup, and every write the guest saw acknowledged is there. Repeated: the killed
//!   server is restarted, returns as the backup, is resynced, and is the next drill's target
//!   (`FAILOVER_DRILLS`, default 8). Prints the time from the kill to the VMM on the backup.
//! - partition: the primary's link is cut (bridge port down), not its power: it stops the VM
//!   itself, the backup takes over, and when the link returns the old primary does not resume
//!   the VM and becomes the resynced backup. Both namespaces are watched throughout: the VM
//!   never runs in two places.
//! - live migration: the VM moves to its backup server and back while its guest writes, over
//!   the servers' mutual-TLS links, without booting again; a move whose target VMM is killed
//!   during the copy leaves it running where it was.
//!
//! Needs root (network namespaces) and /dev/kvm.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use enspeed_tests::cluster::{wait_for_explained, Server};
use enspeed_tests::netns::{run, Net};
use enspeed_tests::*;
use serde_json::{json, Value};

/// One cluster at a time: the machine has two cores.
static ONE_CLUSTER: Mutex<()> = Mutex::new(());

const WAIT: Duration = Duration::from_secs(30);
const BLOCKS: u64 = 16;
const VM: &str = "vm1";
const DISK: &str = "vm1-0";
/// What a server's log says when it fenced itself with something running.
const FENCED: &str = "fenced: no quorum answer in time; VMMs and blockd killed";

/// Server `i` of `net`, listening on port 7300 of its address.
fn server(net: &Net, scratch: &Scratch, i: usize, extra: &[&str]) -> Server {
    let mut s = Server::new(
        i as u64,
        format!("{}:7300", net.addr(i)),
        scratch.path(&format!("server{i}")),
        extra,
    );
    s.ns = Some(net.ns(i).to_string());
    s
}

/// What a server's agent keeps of the VM.
trait VmFiles {
    fn serial(&self) -> String;
    fn disk_data(&self) -> Vec<u8>;
}

impl VmFiles for Server {
    fn serial(&self) -> String {
        std::fs::read_to_string(self.data.join("agent/vms").join(VM).join("serial.log"))
            .unwrap_or_default()
    }

    fn disk_data(&self) -> Vec<u8> {
        std::fs::read(self.data.join("disks").join(DISK).join("data")).unwrap_or_default()
    }
}

struct Cluster {
    net: Net,
    servers: Vec<Server>,
    _scratch: Scratch,
}

impl Cluster {
    /// Servers 1 and 2 run VMs; server 3 is the witness.
    fn start(tag: &str) -> Cluster {
        Cluster::start_with(tag, true)
    }

    /// Servers 1 and 2 run VMs; server 3 is the witness, or runs VMs too.
    fn start_with(tag: &str, witness: bool) -> Cluster {
        let scratch = Scratch::new(&format!("failover-{tag}"));
        let net = Net::new(tag, 3, if tag == "a" { 1 } else { 2 });
        let common = ["--memory-mib", "1024", "--disk-gib", "1"];
        let mut servers: Vec<Server> = (1..=3)
            .map(|i| {
                if i == 3 && witness {
                    server(&net, &scratch, i, &[])
                } else {
                    server(&net, &scratch, i, &common)
                }
            })
            .collect();
        servers[0].start(&["--init"]);
        let first = servers[0].addr.clone();
        let mut c = Cluster {
            net,
            servers,
            _scratch: scratch,
        };
        c.wait("server 1 to lead", |c| {
            c.call(1, json!({"op": "status"}))
                .ok()
                .filter(|s| s["role"] == "Leader")
        });
        let data = c.servers[0].data.clone();
        c.servers[1].start_joining_at(&first, &data, &[]);
        c.servers[2].start_joining_at(&first, &data, if witness { &["--witness"] } else { &[] });
        let vm_servers = if witness { 2 } else { 3 };
        c.wait("the agents registered", |c| {
            let s = c.state()?;
            let ok = (1..=vm_servers).all(|i| {
                s["servers"][i.to_string()]["mirror"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
            });
            ok.then_some(())
        });
        c
    }

    /// Stops the VM (running on server `at`) and checks that its disk there holds every write
    /// the guest acknowledged on any server.
    fn stop_and_check_acknowledged(&self, at: usize) {
        let r = self.call(
            3,
            json!({"op": "propose", "command": {"cmd": "set_vm_running", "name": VM, "running": false}}),
        );
        r.unwrap_or_else(|e| panic!("stop: {e}"));
        self.wait("the VM stopped", |c| (!c.net.vmm_running(at)).then_some(()));
        let last = self
            .servers
            .iter()
            .map(|s| highest_ack(&s.serial(), 0))
            .max()
            .unwrap();
        let image = self.servers[at - 1].disk_data();
        for (blk, want) in acked_blocks(0, last) {
            match read_stamp(&image, blk) {
                Stamp::Seq(got) if got >= want => {}
                other => panic!("block {blk}: {other:?}, acknowledged seq {want}"),
            }
        }
    }

    fn dump(&self) -> String {
        let mut out = String::new();
        for s in &self.servers {
            out += &format!("---- server {} log ----\n{}\n", s.id, s.log());
            let agent = s.data.join("agent");
            for f in ["blockd.log", &format!("vms/{VM}/vmm.log")] {
                let t = std::fs::read_to_string(agent.join(f)).unwrap_or_default();
                out += &format!("---- server {} {f} ----\n{t}\n", s.id);
            }
        }
        out
    }

    /// One request through `enspeed cluster`, run in server `via`'s namespace as that server
    /// (its certificate, from its data directory): `status`, `read` of the state, or `propose`.
    fn call(&self, via: usize, req: Value) -> Result<Value, String> {
        let op: Vec<String> = match req["op"].as_str() {
            Some("status") => vec!["status".into()],
            Some("read") => vec!["state".into()],
            Some("propose") => vec!["propose".into(), req["command"].to_string()],
            other => panic!("no `enspeed cluster` operation for {other:?}"),
        };
        let out = run(Command::new("ip")
            .args(["netns", "exec", self.net.ns(via), "timeout", "10"])
            .arg(enspeed_tests::enspeed_bin())
            .args(["cluster", "--timeout-ms", "8000", "--server"])
            .arg(format!("{}:7300", self.net.addr(via)))
            .arg("--data")
            .arg(&self.servers[via - 1].data)
            .args(&op))?;
        serde_json::from_str(&out).map_err(|e| format!("{e}: {out:?}"))
    }

    /// The state, read linearizably through the witness.
    fn state(&self) -> Option<Value> {
        self.call(3, json!({"op": "read", "query": {"query": "state"}}))
            .ok()
    }

    fn wait<T>(&self, what: &str, mut f: impl FnMut(&Cluster) -> Option<T>) -> T {
        wait_for_explained(
            what,
            WAIT,
            || f(self),
            || format!("state: {:?}\n{}", self.state(), self.dump()),
        )
    }

    /// Polls `done` every 5 ms (failover is timed to the millisecond) until it holds; panics
    /// with `failed`, the state and the logs once `WAIT` has passed since `since`.
    fn poll(&self, since: Instant, failed: &str, mut done: impl FnMut() -> bool) {
        while !done() {
            assert!(
                since.elapsed() < WAIT,
                "{failed}\nstate: {:?}\n{}",
                self.state(),
                self.dump()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn create_vm(&self) {
        self.create_vm_of(64);
    }

    /// A VM of `memory_mib` MiB whose guest first puts data in all of it from 32 MiB but the
    /// last 64 MiB (memory a live migration must carry: pages never touched cost it nothing).
    fn create_vm_of(&self, memory_mib: u64) {
        let fill = memory_mib.saturating_sub(96);
        let cmdline = format!(
            "console=ttyS0 tg.run=fill,verify,stamp tg.fillmib={fill} tg.blocks={BLOCKS} tg.ops=0 tg.ackevery=4 tg.flushevery=4 tg.seqbase={{generation}}000000 tg.end=halt"
        );
        let r = self.call(
            3,
            json!({"op": "propose", "command": {
                "cmd": "create_vm", "name": VM, "memory_mib": memory_mib, "vcpus": 1,
                "disk_size": 16u64 << 20, "kernel": testguest().display().to_string(),
                "cmdline": cmdline, "running": true,
            }}),
        );
        let r = r.unwrap_or_else(|e| panic!("create_vm: {e}"));
        eprintln!("placed: {r}");
    }

    fn disk(&self) -> Value {
        self.state()
            .map(|s| s["disks"][DISK].clone())
            .unwrap_or_default()
    }

    /// Waits until the VM runs on `primary`, mirrored in sync to the other server, and the
    /// guest acknowledged some writes.
    fn wait_protected(&self, primary: usize) {
        let backup = 3 - primary;
        self.wait("the disk placed and its backup in sync", |c| {
            let d = c.disk();
            (d["primary"] == primary && d["backup"] == backup && d["backup_synced"] == true)
                .then_some(())
        });
        self.wait("the guest's acknowledged writes", |c| {
            (highest_ack(&c.servers[primary - 1].serial(), 0) > 0 && c.net.vmm_running(primary))
                .then_some(())
        });
        assert!(
            !self.net.vmm_running(backup),
            "the VM runs on its backup too"
        );
    }
}

/// The highest seq above `base` the guest's `tg: ack` lines report.
fn highest_ack(serial: &str, base: u64) -> u64 {
    serial
        .lines()
        .filter_map(|l| l.strip_prefix("tg: ack blk="))
        .filter_map(|rest| rest.split(" seq=").nth(1)?.trim().parse::<u64>().ok())
        .filter(|s| *s > base)
        .max()
        .unwrap_or(0)
}

/// Per block, the highest seq acknowledged in the run that started above `base` and reached
/// `last` (writes go one at a time: an ack of `last` means every earlier one completed).
fn acked_blocks(base: u64, last: u64) -> BTreeMap<u64, u64> {
    let mut acks = BTreeMap::new();
    for seq in (base + 1).max(last.saturating_sub(BLOCKS - 1))..=last {
        acks.insert(seq % BLOCKS, seq);
    }
    acks
}

/// Checks the promoted copy: what the guest's `verify` saw when it booted there, and the data
/// file, hold every acknowledged write. Blocks the new boot wrote (seq above `new_base`) count
/// as newer.
/// The guest's "tg: verify blk=" lines in `serial` that are whole: the log is read while the
/// guest writes it, and a line cut before its end would misreport its block's seq.
fn verified_blocks(serial: &str) -> u64 {
    serial
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n') && l.contains("tg: verify blk="))
        .count() as u64
}

fn check_acknowledged(acks: &BTreeMap<u64, u64>, new_serial: &str, image: &[u8], new_base: u64) {
    let seen: BTreeMap<u64, String> = new_serial
        .lines()
        .filter_map(|l| l.strip_prefix("tg: verify blk="))
        .filter_map(|r| {
            let (b, rest) = r.split_once(' ')?;
            Some((b.parse().ok()?, rest.to_string()))
        })
        .collect();
    assert_eq!(
        seen.len() as u64,
        BLOCKS,
        "the guest on the backup verified every block:\n{new_serial}"
    );
    for (&blk, &want) in acks {
        let v = &seen[&blk];
        let got: u64 = v
            .strip_prefix("seq=")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("block {blk} is {v} on the backup, acknowledged seq {want}"));
        assert!(
            got >= want,
            "block {blk}: the guest on the backup read seq {got}, below the acknowledged {want}"
        );
        match read_stamp(image, blk) {
            Stamp::Seq(s) if s >= want || s > new_base => {}
            other => {
                panic!("block {blk} in the promoted data file: {other:?}, acknowledged seq {want}")
            }
        }
    }
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
fn power_cut_of_the_primary_the_vm_boots_on_its_backup_with_every_acknowledged_write() {
    if !kvm_available("power_cut_of_the_primary") {
        return;
    }
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let drills: usize = std::env::var("FAILOVER_DRILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let mut c = Cluster::start("a");
    c.create_vm();
    let mut primary = c.disk()["primary"].as_u64().unwrap() as usize;
    let (mut to_vmm, mut to_ready) = (Vec::new(), Vec::new());
    // FAILOVER_KILL_LEADER=1: before each cut, the primary's server is made the Raft leader
    // (the leader elsewhere is restarted until it is), so every drill replaces a dead leader.
    let kill_leader = std::env::var_os("FAILOVER_KILL_LEADER").is_some();
    let leader_of = |c: &Cluster| {
        c.call(3, json!({"op": "status"}))
            .ok()
            .and_then(|s| s["leader"].as_u64())
    };
    for drill in 0..drills {
        c.wait_protected(primary);
        let backup = 3 - primary;
        for _ in 0..10 {
            match leader_of(&c) {
                Some(l) if !kill_leader || l as usize == primary => break,
                Some(l) => {
                    c.servers[l as usize - 1].kill9();
                    // Long enough for the others to elect a leader (or the restarted one).
                    std::thread::sleep(Duration::from_millis(1500));
                    c.servers[l as usize - 1].start(&[]);
                    c.wait("a leader again", leader_of);
                    c.wait_protected(primary);
                }
                None => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        let generation = c.disk()["generation"].as_u64().unwrap();
        let leader = leader_of(&c);
        std::thread::sleep(Duration::from_millis(300));
        let fences = c.servers[backup - 1].log().matches(FENCED).count();
        let killed = Instant::now();
        c.net.power_cut(primary);
        let base = generation * 1_000_000;
        let last = highest_ack(&c.servers[primary - 1].serial(), base);
        assert!(last > base, "drill {drill}: no write acknowledged");
        // The backup's VMM appears, then its guest prints.
        let new_serial_len = c.servers[backup - 1].serial().len();
        c.poll(
            killed,
            &format!("drill {drill}: the VM did not start on server {backup}"),
            || c.net.vmm_running(backup),
        );
        let vmm = killed.elapsed();
        let new_base = (generation + 1) * 1_000_000;
        c.poll(
            killed,
            &format!("drill {drill}: the guest did not start on server {backup}"),
            || {
                let s = c.servers[backup - 1].serial();
                s[new_serial_len.min(s.len())..].contains("tg: ready")
            },
        );
        let ready = killed.elapsed();
        c.servers[primary - 1].kill9();
        eprintln!(
            "drill {drill}: server {primary} (leader: {leader:?}) killed at ack {last}; VMM on server {backup} after {vmm:?}, guest ready after {ready:?}"
        );
        // Replacing a dead leader must not make the survivors fence themselves.
        assert_eq!(
            c.servers[backup - 1].log().matches(FENCED).count(),
            fences,
            "drill {drill}: server {backup} fenced itself\n{}",
            c.dump()
        );
        to_vmm.push(vmm);
        to_ready.push(ready);
        // What the guest saw acknowledged is on the promoted copy.
        let acks = acked_blocks(base, last);
        c.wait("the guest on the backup to verify its disk", |c| {
            let s = c.servers[backup - 1].serial();
            let s = &s[new_serial_len.min(s.len())..];
            (verified_blocks(s) >= BLOCKS).then(|| s.to_string())
        });
        let s = c.servers[backup - 1].serial();
        check_acknowledged(
            &acks,
            &s[new_serial_len..],
            &c.servers[backup - 1].disk_data(),
            new_base,
        );
        let d = c.disk();
        assert_eq!(
            (d["primary"].as_u64(), d["generation"].as_u64()),
            (Some(backup as u64), Some(generation + 1)),
            "{d}"
        );

        // The killed server returns, is demoted and resynced as the backup: the next target.
        c.servers[primary - 1].start(&[]);
        primary = backup;
    }
    let (m_vmm, m_ready) = (median(&mut to_vmm), median(&mut to_ready));
    eprintln!("failover over {drills} power cuts: median {m_vmm:?} to the VMM on the backup, {m_ready:?} to the guest's first line; all: {to_vmm:?}");
    c.wait_protected(primary);
}

#[test]
fn partition_of_the_primary_it_stops_the_vm_itself_and_returns_as_the_backup() {
    if !kvm_available("partition_of_the_primary") {
        return;
    }
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start("b");
    c.create_vm();
    let primary = c.disk()["primary"].as_u64().unwrap() as usize;
    let backup = 3 - primary;
    c.wait_protected(primary);
    let generation = c.disk()["generation"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let cut = Instant::now();
    c.net.link(primary, false);
    // Watch both servers until the VM runs on the backup: never on both.
    let mut stopped_at = None;
    c.poll(
        cut,
        &format!("the VM did not move to server {backup}"),
        || {
            let (on_p, on_b) = (c.net.vmm_running(primary), c.net.vmm_running(backup));
            assert!(
                !(on_p && on_b),
                "the VM runs on both servers {:?} after the cut\n{}",
                cut.elapsed(),
                c.dump()
            );
            if !on_p && stopped_at.is_none() {
                stopped_at = Some(cut.elapsed());
            }
            on_b
        },
    );
    let moved = cut.elapsed();
    eprintln!("partition: server {primary} stopped the VM itself after {:?}; VMM on server {backup} after {moved:?}", stopped_at.unwrap());
    let base = generation * 1_000_000;
    let last = highest_ack(&c.servers[primary - 1].serial(), base);
    assert!(last > base, "no write acknowledged before the cut");
    let new_serial_len = 0;
    c.wait("the guest on the backup to verify its disk", |c| {
        (verified_blocks(&c.servers[backup - 1].serial()) >= BLOCKS).then_some(())
    });
    check_acknowledged(
        &acked_blocks(base, last),
        &c.servers[backup - 1].serial()[new_serial_len..],
        &c.servers[backup - 1].disk_data(),
        (generation + 1) * 1_000_000,
    );

    // Some seconds more cut off: the old primary starts nothing.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert!(
            !c.net.vmm_running(primary),
            "the cut-off server restarted the VM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    c.net.link(primary, true);
    let healed = Instant::now();
    // It comes back as the backup, resynced, and never runs the VM.
    loop {
        assert!(
            !c.net.vmm_running(primary),
            "the returning server runs the VM"
        );
        assert!(
            c.net.vmm_running(backup),
            "the VM stopped on its new primary"
        );
        let d = c.disk();
        if d["primary"] == backup && d["backup"] == primary && d["backup_synced"] == true {
            break;
        }
        assert!(
            healed.elapsed() < WAIT,
            "server {primary} did not become the resynced backup: {d}\n{}",
            c.dump()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "partition healed: server {primary} is the resynced backup after {:?}",
        healed.elapsed()
    );
    // Its agent reports its copy as the backup, and the new primary's link in sync.
    c.wait("both servers' reports", |c| {
        let st = c.state()?;
        let copy = &st["observed"][primary.to_string()]["disks"][DISK];
        let p = &st["observed"][backup.to_string()]["disks"][DISK];
        (copy["role"] == "backup" && copy["generation"] == generation + 1 && p["link"] == "in-sync")
            .then_some(())
    });
    // The returning server held the generation the new primary's bitmap starts
    // from: only the changed regions were copied back, not the whole disk.
    let socket = c.servers[backup as usize - 1]
        .data
        .join("agent/blockd.sock");
    let status = blockrepl::daemon::call(
        &socket,
        &blockrepl::daemon::Request::Status {
            name: Some(DISK.into()),
        },
    )
    .unwrap_or_else(|e| panic!("blockd of server {backup} at {}: {e}", socket.display()));
    let disks = status.disks.expect("a status answer lists the disk");
    let last = disks[0]
        .last_resync
        .as_ref()
        .expect("the returning copy was resynced");
    assert!(
        !last.full,
        "the returning primary got a full sync: {last:?}"
    );
    eprintln!(
        "partition healed: resync copied {} bytes back",
        last.total_bytes
    );
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        assert!(!c.net.vmm_running(primary));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The VM's VMID.
fn vm_id(c: &Cluster) -> u64 {
    c.state().expect("the state")["vms"][VM]["id"]
        .as_u64()
        .expect("the VM's id")
}

/// Asks the cluster to migrate the VM (as a Manager would, through the cluster's protocol).
fn migrate(c: &Cluster) -> Value {
    let id = vm_id(c);
    c.call(
        3,
        json!({"op": "propose", "command": {
            "cmd": "act", "actor": 0, "at_ms": 0,
            "action": {"kind": "migrate_vm", "vm": id, "downtime_ms": 100},
        }}),
    )
    .unwrap_or_else(|e| panic!("migrate: {e}"))
}

/// The lines of server `i`'s log that contain `what`.
fn log_lines(c: &Cluster, i: usize, what: &str) -> Vec<String> {
    c.servers[i - 1]
        .log()
        .lines()
        .filter(|l| l.contains(what))
        .map(str::to_string)
        .collect()
}

/// Live migration with real processes (issue 13): the stamping guest (256 MiB) moves to its
/// backup server and back while it writes, each time without booting again (no second
/// `tg: entry` anywhere), acknowledging on past its last acknowledgement at the source, with
/// its pause in the server's log; before that, a move whose target VMM is killed during the copy
/// fails and the VM runs on where it was, and so do a cancelled one and one whose link is cut
/// in the middle of the copy; a move whose source VMM
/// stops and is killed after it sent the whole VM ends with the VM running on at the target (its
/// relay gives the go); after, a drain of its server moves it live once more.
/// At the end every acknowledged write is on the disk.
#[test]
fn a_running_vm_moves_live_there_and_back_without_a_reboot_or_a_lost_write() {
    if !kvm_available("a_running_vm_moves_live") {
        return;
    }
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start("m");
    c.create_vm_of(256);
    let mut primary = c.disk()["primary"].as_u64().unwrap() as usize;
    c.wait_protected(primary);
    let boots = |c: &Cluster| -> usize {
        c.servers[..2]
            .iter()
            .map(|s| s.serial().matches("tg: entry").count())
            .sum()
    };
    assert_eq!(boots(&c), 1, "one boot so far");

    // The target's VMM stopped (SIGSTOP) while it takes the VM, so that the copy stalls, then
    // killed: the move fails, the VM runs on where it was. The source's cable is held to
    // 100 Mbit/s meanwhile, so that the copy takes seconds and is under way when that happens.
    let target = 3 - primary;
    c.net.rate(primary, Some(100));
    let r = migrate(&c);
    assert_eq!(r["live"], true, "{r}");
    let started = Instant::now();
    let signal = |sig: i32| {
        for (pid, cmd) in c.net.processes(target) {
            if cmd.contains(" vmm ") {
                // SAFETY: kill(2) on a pid read from the namespace.
                unsafe { libc::kill(pid as i32, sig) };
            }
        }
    };
    c.poll(started, "no VMM waited on the target", || {
        c.net.vmm_running(target)
    });
    std::thread::sleep(Duration::from_millis(500));
    signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(1));
    signal(libc::SIGKILL);
    c.wait("the failed move ended", |c| {
        let s = c.state()?;
        s["vms"][VM]["moving"].is_null().then_some(())
    });
    assert_eq!(c.disk()["primary"], primary as u64, "the disks stayed");
    let failed = log_lines(&c, primary, "live migration failed");
    assert_eq!(failed.len(), 1, "{failed:?}");
    eprintln!("killed target: {}", failed[0]);
    let last = highest_ack(&c.servers[primary - 1].serial(), 0);
    c.wait("the guest writing on at the source", |c| {
        (highest_ack(&c.servers[primary - 1].serial(), 0) > last + 8).then_some(())
    });
    assert!(!c.net.vmm_running(target), "the target's VMM is gone");
    assert_eq!(boots(&c), 1, "the guest did not boot again");

    // Progress and cancel, the copy still held to 100 Mbit/s: the source's progress reaches the
    // state; a cancel asked while it copies takes effect: the move fails, the VM runs on where
    // it was.
    c.wait_protected(primary);
    let r = migrate(&c);
    assert_eq!(r["live"], true, "{r}");
    let seen = c.wait("the move's progress in the state", |c| {
        let s = c.state()?;
        let p = s["observed"][primary.to_string()]["vms"][VM]["migration"].clone();
        (p["phase"] == "copying" && p["transferred_bytes"].as_u64()? > 0).then_some(p)
    });
    assert_eq!(seen["memory_bytes"], 256u64 << 20, "{seen}");
    let id = vm_id(&c);
    let r = c.call(
        3,
        json!({"op": "propose", "command": {
            "cmd": "act", "actor": 0, "at_ms": 0,
            "action": {"kind": "cancel_migration", "vm": id},
        }}),
    );
    let r = r.unwrap_or_else(|e| panic!("cancel: {e}"));
    assert!(r.get("audit").is_some(), "the cancel was taken: {r}");
    c.wait("the cancelled move ended", |c| {
        let s = c.state()?;
        s["vms"][VM]["moving"].is_null().then_some(())
    });
    assert_eq!(c.disk()["primary"], primary as u64, "the disks stayed");
    let failed = log_lines(&c, primary, "live migration failed");
    assert!(
        failed.len() == 2 && failed[1].contains("cancelled"),
        "{failed:?}"
    );
    let last = highest_ack(&c.servers[primary - 1].serial(), 0);
    c.wait("the guest writing on at the source", |c| {
        (highest_ack(&c.servers[primary - 1].serial(), 0) > last + 8).then_some(())
    });
    assert_eq!(boots(&c), 1, "the guest did not boot again");

    // The link between the two cut in the middle of the copy (the migration's connection goes
    // silent; Raft's do not): the source's agent sees the copy stand still, cuts the stream after
    // 10 s, the move fails, and the VM, never paused, runs on where it was.
    c.wait_protected(primary);
    let target = 3 - primary;
    let to = c.servers[target - 1].addr.clone();
    let before: Vec<u16> = c.net.connections(primary, &to);
    let r = migrate(&c);
    assert_eq!(r["live"], true, "{r}");
    // Asked of the source's VMM itself (the state's copy of its progress may still be the last
    // move's).
    let api = c.servers[primary - 1]
        .data
        .join("agent/vms")
        .join(VM)
        .join("api.sock");
    let flows = c.wait("the copy under way on a new connection", |c| {
        let r = vmm_api::call(
            &api,
            &vmm_api::Request::MigrationStatus {},
            Duration::from_secs(1),
        );
        let p = r.ok()?.migration?;
        if p.phase != vmm_api::MigrationPhase::Copying || p.transferred_bytes == 0 {
            return None;
        }
        let flows: Vec<u16> = c
            .net
            .connections(primary, &to)
            .into_iter()
            .filter(|p| !before.contains(p))
            .collect();
        (!flows.is_empty()).then_some(flows)
    });
    c.net.drop_flows(primary, &flows);
    let cut = Instant::now();
    c.wait("the stalled move ended", |c| {
        let s = c.state()?;
        s["vms"][VM]["moving"].is_null().then_some(())
    });
    c.net.drop_flows(primary, &[]);
    assert_eq!(c.disk()["primary"], primary as u64, "the disks stayed");
    let failed = log_lines(&c, primary, "live migration failed");
    assert!(
        failed.len() == 3 && failed[2].contains("nothing went to the target for"),
        "{failed:?}"
    );
    eprintln!(
        "cut link, move ended after {:?}: {}",
        cut.elapsed(),
        failed[2]
    );
    let last = highest_ack(&c.servers[primary - 1].serial(), 0);
    c.wait("the guest writing on at the source", |c| {
        (highest_ack(&c.servers[primary - 1].serial(), 0) > last + 8).then_some(())
    });
    assert_eq!(boots(&c), 1, "the guest did not boot again");

    c.net.rate(primary, None);

    // The source's VMM stopped (SIGSTOP) once it sent the whole VM, while it waits for the
    // target's Ready, then killed: the target's relay, the disks handed over, hears no go and
    // gives it itself, and the VM runs on at the target where it stood, without a reboot; the
    // source never runs it again. The moment lasts milliseconds: it is caught by polling the
    // source VMM's phase, and a move that ended before it was caught is tried again the other
    // way, up to five times.
    let mut caught = false;
    for attempt in 0..5 {
        let to = 3 - primary;
        c.wait_protected(primary);
        let api = c.servers[primary - 1]
            .data
            .join("agent/vms")
            .join(VM)
            .join("api.sock");
        let vmm = c
            .net
            .processes(primary)
            .into_iter()
            .find(|(_, cmd)| cmd.contains(" vmm "))
            .map(|(pid, _)| pid as i32)
            .expect("the source's VMM");
        let before = highest_ack(&c.servers[primary - 1].serial(), 0);
        let r = migrate(&c);
        assert_eq!(r["live"], true, "{r}");
        let started = Instant::now();
        loop {
            let status = vmm_api::call(
                &api,
                &vmm_api::Request::MigrationStatus {},
                Duration::from_secs(1),
            );
            match status {
                Ok(r)
                    if r.migration.as_ref().map(|m| m.phase)
                        == Some(vmm_api::MigrationPhase::Handover) =>
                {
                    // SAFETY: kill(2) on the pid of the source's VMM.
                    unsafe { libc::kill(vmm, libc::SIGSTOP) };
                    caught = true;
                    break;
                }
                Ok(_) => {}
                // The VMM ended: the VM moved before the moment was caught.
                Err(_) if !c.net.vmm_running(primary) => break,
                Err(_) => {}
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "attempt {attempt}: the move never reached its handover"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        c.wait(
            &format!("attempt {attempt}: the guest writing on at server {to}"),
            |c| (highest_ack(&c.servers[to - 1].serial(), before) > before + 8).then_some(()),
        );
        if caught {
            let at_source = highest_ack(&c.servers[primary - 1].serial(), 0);
            // SAFETY: as above.
            unsafe { libc::kill(vmm, libc::SIGKILL) };
            c.wait("the move ended after the source's VMM was killed", |c| {
                let s = c.state()?;
                let here =
                    s["disks"][DISK]["primary"] == to as u64 && s["vms"][VM]["moving"].is_null();
                (here && !c.net.vmm_running(primary)).then_some(())
            });
            let words = log_lines(&c, to, "the VM runs here on the relay's word");
            assert_eq!(words.len(), 1, "{words:?}");
            eprintln!(
                "attempt {attempt}: source VMM stopped in its handover: {}",
                words[0]
            );
            assert!(
                highest_ack(&c.servers[primary - 1].serial(), 0) == at_source,
                "the stopped source wrote on"
            );
        } else {
            c.wait(&format!("attempt {attempt}: the move ended"), |c| {
                let s = c.state()?;
                let here =
                    s["disks"][DISK]["primary"] == to as u64 && s["vms"][VM]["moving"].is_null();
                (here && !c.net.vmm_running(primary)).then_some(())
            });
        }
        assert_eq!(boots(&c), 1, "attempt {attempt}: the guest booted again");
        primary = to;
        if caught {
            break;
        }
    }
    assert!(
        caught,
        "the source's handover was never caught in five moves"
    );

    // There and back.
    for round in 0..2 {
        let to = 3 - primary;
        c.wait_protected(primary);
        let before = highest_ack(&c.servers[primary - 1].serial(), 0);
        let moves_before = log_lines(&c, primary, "VM moved live").len();
        let r = migrate(&c);
        assert_eq!(r["live"], true, "{r}");
        c.wait(
            &format!("round {round}: the VM running on server {to}"),
            |c| {
                let s = c.state()?;
                let here =
                    s["disks"][DISK]["primary"] == to as u64 && s["vms"][VM]["moving"].is_null();
                (here && c.net.vmm_running(to) && !c.net.vmm_running(primary)).then_some(())
            },
        );
        c.wait(
            &format!("round {round}: the guest writing on at server {to}"),
            |c| (highest_ack(&c.servers[to - 1].serial(), before) > before + 8).then_some(()),
        );
        assert_eq!(boots(&c), 1, "round {round}: the guest booted again");
        let moved = log_lines(&c, primary, "VM moved live");
        assert_eq!(moved.len(), moves_before + 1, "{moved:?}");
        eprintln!("round {round}: {}", moved[moves_before]);
        primary = to;
    }

    // A drain moves it live too, and leaves no copy on the drained server.
    let to = 3 - primary;
    c.wait_protected(primary);
    let before = highest_ack(&c.servers[primary - 1].serial(), 0);
    let r = c.call(
        3,
        json!({"op": "propose", "command": {
            "cmd": "act", "actor": 0, "at_ms": 0,
            "action": {"kind": "drain_server", "id": primary},
        }}),
    );
    let r = r.unwrap_or_else(|e| panic!("drain: {e}"));
    assert_eq!(r["moving_live"], 1, "{r}");
    c.wait(&format!("the drained VM running on server {to}"), |c| {
        let s = c.state()?;
        let d = &s["disks"][DISK];
        let moved = d["primary"] == to as u64 && d["backup"].is_null();
        (moved && s["vms"][VM]["moving"].is_null() && c.net.vmm_running(to)).then_some(())
    });
    c.wait("the guest writing on after the drain", |c| {
        (highest_ack(&c.servers[to - 1].serial(), before) > before + 8).then_some(())
    });
    assert_eq!(boots(&c), 1, "the drain rebooted the guest");
    primary = to;

    // Every acknowledged write is on the disk, once the guest stopped.
    c.stop_and_check_acknowledged(primary);
}

/// Live migration to a third server (issue 13): three servers run VMs; the VM (256 MiB, writing
/// its disk) moves to the one that holds no copy of its disk. That server first gets a new
/// backup copy, synced from the primary while the guest runs on; then the VM moves there live
/// as to a backup: no reboot, its writes going on, every acknowledged write on the disk.
#[test]
fn a_running_vm_moves_live_to_a_third_server_after_its_new_copy_syncs() {
    if !kvm_available("a_running_vm_moves_live_to_a_third_server") {
        return;
    }
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start_with("t", false);
    c.create_vm_of(256);
    let placed = c.wait("the disk placed, its backup in sync", |c| {
        let d = c.disk();
        (d["backup_synced"] == true).then_some(d)
    });
    let primary = placed["primary"].as_u64().unwrap() as usize;
    let old = placed["backup"].as_u64().unwrap() as usize;
    let third = 6 - primary - old;
    c.wait("the guest's acknowledged writes", |c| {
        (highest_ack(&c.servers[primary - 1].serial(), 0) > 0).then_some(())
    });
    let before = highest_ack(&c.servers[primary - 1].serial(), 0);
    let id = vm_id(&c);
    let r = c.call(
        3,
        json!({"op": "propose", "command": {
            "cmd": "act", "actor": 0, "at_ms": 0,
            "action": {"kind": "migrate_vm", "vm": id, "to": third},
        }}),
    );
    let r = r.unwrap_or_else(|e| panic!("migrate: {e}"));
    assert_eq!(r["live"], true, "{r}");
    assert_eq!(r["copying_disks"], true, "{r}");
    let d = c.disk();
    assert_eq!(
        (d["primary"].as_u64(), d["backup"].as_u64()),
        (Some(primary as u64), Some(third as u64)),
        "{d}"
    );
    let started = Instant::now();
    c.wait(&format!("the VM running on server {third}"), |c| {
        let s = c.state()?;
        let d = &s["disks"][DISK];
        let here = d["primary"] == third as u64 && s["vms"][VM]["moving"].is_null();
        (here && c.net.vmm_running(third) && !c.net.vmm_running(primary)).then_some(())
    });
    eprintln!("moved to the third server in {:?}", started.elapsed());
    c.wait("the guest writing on at the third server", |c| {
        (highest_ack(&c.servers[third - 1].serial(), before) > before + 8).then_some(())
    });
    let boots: usize = c
        .servers
        .iter()
        .map(|s| s.serial().matches("tg: entry").count())
        .sum();
    assert_eq!(boots, 1, "the guest booted again");
    let moved = log_lines(&c, primary, "VM moved live");
    assert_eq!(moved.len(), 1, "{moved:?}");
    eprintln!("{}", moved[0]);
    assert!(!c.net.vmm_running(old), "a VM runs on the old backup");
    // The old backup's copy goes once the disk is in sync on the two servers it is on now.
    let old_copy = c.servers[old - 1].data.join("disks").join(DISK);
    c.wait("the old backup's copy deleted", |c| {
        (c.disk()["backup_synced"] == true && !old_copy.exists()).then_some(())
    });
    assert_eq!(
        log_lines(
            &c,
            old,
            "disk copy deleted: the disk is in sync on two other servers"
        )
        .len(),
        1
    );

    // Every acknowledged write is on the disk, once the guest stopped.
    c.stop_and_check_acknowledged(third);
}

/// The count in the boot disk's last "bootdisk: tick n=XXXX" line of `serial` (hex).
fn last_bootdisk_tick(serial: &str) -> Option<u32> {
    serial.lines().rev().find_map(|l| {
        let n = l.split("tick n=").nth(1)?;
        u32::from_str_radix(n.trim().get(..4)?, 16).ok()
    })
}

/// A running VM booted by its firmware moves live between servers and back (issue 13): the
/// project's boot disk, on the VM's LiveSync disk, counts on SeaBIOS's clock and reads that
/// disk through SeaBIOS's virtio-pci driver at every count (vhost-user to blockd). After each
/// move it counts on at the other server from where it was, never started again, its reads
/// answered there by the copy that became primary.
#[test]
fn a_firmware_booted_vm_moves_live_there_and_back_counting_on() {
    if !kvm_available("a_firmware_booted_vm_moves_live_there_and_back") {
        return;
    }
    firmware_vm_moves_live_there_and_back("w", "virtio");
}

/// The same with the disk on the SATA controller: SeaBIOS's reads go through the AHCI to
/// blockd over the VMM's own vhost-user ring, which the source lets go at the handover.
#[test]
fn a_firmware_booted_vm_with_a_sata_disk_moves_live_there_and_back_counting_on() {
    if !kvm_available("a_firmware_booted_vm_with_a_sata_disk_moves_live") {
        return;
    }
    firmware_vm_moves_live_there_and_back("x", "sata");
}

fn firmware_vm_moves_live_there_and_back(cluster: &str, bus: &str) {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(cluster);
    let r = c.call(
        3,
        json!({"op": "propose", "command": {
            "cmd": "create_vm", "name": VM, "memory_mib": 128, "vcpus": 1,
            "disk_size": 16u64 << 20, "kernel": "", "boot": "bios", "disk_bus": bus,
            "running": false,
        }}),
    );
    eprintln!("placed: {}", r.unwrap_or_else(|e| panic!("create_vm: {e}")));
    let placed = c.wait("the disk placed, its backup in sync", |c| {
        let d = c.disk();
        (d["backup_synced"] == true).then_some(d)
    });
    // The boot disk (counting, mode 3) written into both copies alike while the VM is off:
    // they stay equal, as LiveSync keeps them.
    let mut img = std::fs::read(bootdisk()).unwrap();
    img[0x204] = 3;
    for s in &c.servers[..2] {
        let path = s.data.join("disks").join(DISK).join("data");
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &img, 0).unwrap();
        f.sync_all().unwrap();
    }
    c.call(
        3,
        json!({"op": "propose", "command": {"cmd": "set_vm_running", "name": VM, "running": true}}),
    )
    .unwrap_or_else(|e| panic!("start: {e}"));
    let mut at = placed["primary"].as_u64().unwrap() as usize;
    c.wait("the boot disk counting", |c| {
        (last_bootdisk_tick(&c.servers[at - 1].serial()).unwrap_or(0) >= 3).then_some(())
    });
    for leg in ["there", "back"] {
        let to = 3 - at;
        c.wait("the disk's backup in sync", |c| {
            (c.disk()["backup_synced"] == true).then_some(())
        });
        let before = last_bootdisk_tick(&c.servers[at - 1].serial()).unwrap();
        let r = migrate(&c);
        assert_eq!(r["live"], true, "{r}");
        c.wait(&format!("the move {leg} ended"), |c| {
            let s = c.state()?;
            (s["vms"][VM]["moving"].is_null() && c.disk()["primary"] == to as u64).then_some(())
        });
        let moved = log_lines(&c, at, "VM moved live");
        eprintln!("firmware VM moved {leg}: {moved:?}");
        c.wait(&format!("the count going on at server {to}"), |c| {
            let n = last_bootdisk_tick(&c.servers[to - 1].serial())?;
            (n > before + 1).then_some(())
        });
        let serial = c.servers[to - 1].serial();
        assert!(
            !serial.contains("FAIL"),
            "the boot disk failed at server {to}:\n{serial}"
        );
        assert!(
            !c.net.vmm_running(at),
            "the VM still runs at server {at} too"
        );
        at = to;
    }
    let serials: usize = c.servers[..2]
        .iter()
        .map(|s| s.serial().matches("started by the firmware").count())
        .sum();
    assert_eq!(serials, 1, "the VM was started again\n{}", c.dump());
    if bus == "sata" {
        let log = c.servers[at - 1]
            .data
            .join("agent/vms")
            .join(VM)
            .join("vmm.log");
        let log = std::fs::read_to_string(log).unwrap_or_default();
        assert!(
            log.contains("SATA disk on its vhost-user-blk backend"),
            "the disk was not on the SATA controller:\n{log}"
        );
    }
}
