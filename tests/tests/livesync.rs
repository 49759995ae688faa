//! LiveSync with real processes: two `enspeed blockd` servers on loopback,
//! the test guest writing through `enspeed vmm` and vhost-user-blk, and the
//! primary killed with SIGKILL at random moments.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use enspeed_tests::cluster::free_port;
use enspeed_tests::*;

const BOOT: Duration = Duration::from_secs(30);
const BLOCKS: u64 = 64;

/// A running `enspeed blockd`.
struct Blockd {
    child: Option<Child>,
    dir: PathBuf,
    addr: String,
    log: PathBuf,
}

impl Blockd {
    fn start(dir: &Path) -> Blockd {
        std::fs::create_dir_all(dir).unwrap();
        let mut b = Blockd {
            child: None,
            dir: dir.to_owned(),
            addr: format!("127.0.0.1:{}", free_port()),
            log: dir.join("blockd.log"),
        };
        b.restart();
        b
    }

    fn control(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    fn restart(&mut self) {
        let _ = std::fs::remove_file(self.control());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(enspeed_bin())
            .args(["blockd", "--dir"])
            .arg(self.dir.join("disks"))
            .args(["--listen", &self.addr, "--control"])
            .arg(self.control())
            .args(["--link-timeout-ms", "1000"])
            .env("ENSPEED_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn enspeed blockd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(self.control()).is_err() {
            assert!(
                Instant::now() < deadline,
                "blockd did not start:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `enspeed disk` against this blockd.
    fn disk(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(enspeed_bin())
            .arg("disk")
            .arg("--control")
            .arg(self.control())
            .args(args)
            .output()
            .expect("run enspeed disk");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn ok(&self, args: &[&str]) -> String {
        self.disk(args).unwrap_or_else(|e| {
            panic!(
                "enspeed disk {args:?}: {e}\nblockd log:\n{}",
                self.log_text()
            )
        })
    }

    fn status(&self, name: &str) -> serde_json::Value {
        let out = self.ok(&["status", name, "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v[0].clone()
    }

    fn wait_status(
        &self,
        name: &str,
        what: &str,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.status(name);
            if f(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {s}\nblockd log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn vhost_socket(&self, name: &str) -> String {
        self.status(name)["vhost_socket"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn data(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.join("disks").join(name).join("data")).unwrap()
    }
}

impl Drop for Blockd {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn in_sync(s: &serde_json::Value) -> bool {
    s["link"] == "in-sync"
}

/// A primary on `a` mirrored to a new backup on `b`, in sync.
fn mirrored_pair(a: &Blockd, b: &Blockd, size: &str) {
    a.ok(&["create", "d", "--size", size]);
    b.ok(&["create", "d", "--size", size, "--backup"]);
    a.ok(&["attach", "d", &b.addr]);
    a.wait_status("d", "the first full sync", in_sync);
}

/// The highest seq the guest's `tg: ack` lines report. The stamp action
/// writes one block at a time, so every seq up to it was acknowledged.
fn highest_ack(output: &str) -> u64 {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("tg: ack blk="))
        .filter_map(|rest| rest.split(" seq=").nth(1)?.trim().parse::<u64>().ok())
        .max()
        .unwrap_or(0)
}

/// Records in `acks` (per block, the highest acknowledged seq) that writes
/// `first..=last` were acknowledged; block = seq % blocks.
fn record_acks(acks: &mut [u64], first: u64, last: u64) {
    let blocks = acks.len() as u64;
    for seq in first.max(last.saturating_sub(blocks - 1))..=last {
        let b = (seq % blocks) as usize;
        acks[b] = acks[b].max(seq);
    }
}

#[test]
fn the_guest_writes_through_vmm_and_the_backup_matches_byte_for_byte() {
    if !kvm_available("the_guest_writes_through_vmm_and_the_backup_matches_byte_for_byte") {
        return;
    }
    let s = Scratch::new("livesync-match");
    let a = Blockd::start(&s.path("a"));
    let b = Blockd::start(&s.path("b"));
    mirrored_pair(&a, &b, "32M");
    let mut vm = Vmm::start(&guest_args(
        "tg.run=stamp,blkid tg.blocks=256 tg.ops=2048 tg.ackevery=256 tg.flushevery=16 tg.end=poweroff",
        &["--disk", &format!("vhost-user={}", a.vhost_socket("d"))],
    ));
    vm.wait_for("tg: blk dev=0 sectors=65536 ro=0 flush=1", BOOT);
    vm.wait_for("tg: ack blk=0 seq=2048", BOOT);
    vm.wait_for("tg: blk id=d", BOOT);
    vm.wait_for("tg: done ok", BOOT);
    assert!(vm.wait_exit(BOOT).success());
    let (pa, pb) = (a.data("d"), b.data("d"));
    assert!(
        pa.iter().any(|x| *x != 0),
        "the guest's writes are not on the primary"
    );
    let first_diff = pa.iter().zip(&pb).position(|(x, y)| x != y);
    assert_eq!(first_diff, None, "the backup differs from the primary");
    let mut acks = vec![0u64; 256];
    record_acks(&mut acks, 1, highest_ack(&vm.output()));
    for (i, &seq) in acks.iter().enumerate() {
        let want = if seq > 0 {
            Stamp::Seq(seq)
        } else {
            Stamp::Empty
        };
        assert_eq!(read_stamp(&pb, i as u64), want, "block {i} on the backup");
    }
}

#[test]
fn acknowledged_writes_survive_kill_9_of_the_primary() {
    if !kvm_available("acknowledged_writes_survive_kill_9_of_the_primary") {
        return;
    }
    let rounds: u64 = std::env::var("LIVESYNC_CRASHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let s = Scratch::new("livesync-crash");
    let mut servers = [Blockd::start(&s.path("a")), Blockd::start(&s.path("b"))];
    mirrored_pair(&servers[0], &servers[1], "64M");
    let mut acks = vec![0u64; BLOCKS as usize];
    let mut base = 0u64;
    let mut generation = 1u64;
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut partial_resyncs = 0;
    let mut total_acks = 0usize;
    for round in 0..rounds {
        let (p, q) = ((round % 2) as usize, ((round + 1) % 2) as usize);
        let socket = servers[p].vhost_socket("d");
        let mut vm = Vmm::start(&guest_args(
            &format!("tg.run=stamp tg.blocks={BLOCKS} tg.ops=0 tg.ackevery=16 tg.flushevery=8 tg.seqbase={base} tg.end=halt"),
            &["--disk", &format!("vhost-user={socket}")],
        ));
        vm.wait_for("tg: ready", BOOT);
        vm.wait_for("tg: ack", BOOT);
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(rng % 400));
        // Power cut of the primary's storage, then of its VMM.
        servers[p].kill9();
        vm.kill9();
        let max = highest_ack(&vm.output());
        assert!(max > base, "round {round}: no write acknowledged");
        record_acks(&mut acks, base + 1, max);
        total_acks += (max - base) as usize;
        // Writes after the last ack line may have reached the disk: start
        // the next run above them.
        base = max + 16;

        // Failover: the backup is promoted (the control plane's Raft commit
        // raises the generation).
        generation += 1;
        servers[q].ok(&["promote", "d", "--generation", &generation.to_string()]);
        let st = servers[q].status("d");
        assert_eq!(st["role"], "standalone", "round {round}: {st}");
        let image = servers[q].data("d");
        for blk in 0..BLOCKS {
            let got = read_stamp(&image, blk);
            let want = acks[blk as usize];
            match got {
                Stamp::Torn => panic!("round {round}: block {blk} is torn on the promoted backup"),
                Stamp::Empty if want > 0 => {
                    panic!("round {round}: block {blk} acknowledged at seq {want} is empty")
                }
                Stamp::Seq(s) if s < want => {
                    panic!(
                        "round {round}: block {blk} holds seq {s}, below the acknowledged {want}"
                    )
                }
                _ => {}
            }
        }

        // The old primary returns as the backup and is resynced.
        servers[p].restart();
        servers[p].ok(&["demote", "d"]);
        servers[q].ok(&["attach", "d", &servers[p].addr.clone()]);
        let st = servers[q].wait_status("d", "the returning server's resync", in_sync);
        if st["last_resync"]["full"] == false {
            partial_resyncs += 1;
        }
    }
    assert!(
        total_acks as u64 > rounds,
        "the guest acknowledged too few writes ({total_acks}) to test anything"
    );
    assert_eq!(
        partial_resyncs, rounds,
        "a returning primary needed a full sync"
    );
    // Both copies are identical once the last resync finished.
    let (a, b) = (servers[0].data("d"), servers[1].data("d"));
    assert!(a == b, "copies differ after the last resync");
    eprintln!("{rounds} kills, {total_acks} acknowledged writes checked, every resync partial");
}
