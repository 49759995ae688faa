//! LiveSync with real processes: two `enspeed blockd` servers on loopback,
//! the test guest writing through `enspeed vmm` and vhost-user-blk, and the
//! primary killed with SIGKILL at random moments. Their mirror links are mutual
//! TLS under a CA made for the test (the blockds are servers 1 and 2); strangers'
//! hellos are refused.

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
    tls: PathBuf,
}

/// Certificates for servers 1..=n under a new CA, in `s`: their `tls` directories.
fn certificates(s: &Scratch, n: u64) -> Vec<PathBuf> {
    let first = enspeed_trust::TrustDir::of(&s.path("cert1"));
    first.create_cluster(1).unwrap();
    let mut dirs = vec![first.0.clone()];
    for id in 2..=n {
        let d = enspeed_trust::TrustDir::of(&s.path(&format!("cert{id}")));
        d.install(&first.enroll(id).unwrap()).unwrap();
        dirs.push(d.0);
    }
    dirs
}

impl Blockd {
    /// A blockd in `dir`, its mirror links made with the certificate in `tls`.
    fn start(dir: &Path, tls: &Path) -> Blockd {
        std::fs::create_dir_all(dir).unwrap();
        let mut b = Blockd {
            child: None,
            dir: dir.to_owned(),
            addr: format!("127.0.0.1:{}", free_port()),
            log: dir.join("blockd.log"),
            tls: tls.to_owned(),
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
            .arg("--tls")
            .arg(&self.tls)
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
    let certs = certificates(&s, 2);
    let a = Blockd::start(&s.path("a"), &certs[0]);
    let b = Blockd::start(&s.path("b"), &certs[1]);
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
    let certs = certificates(&s, 2);
    let mut servers = [
        Blockd::start(&s.path("a"), &certs[0]),
        Blockd::start(&s.path("b"), &certs[1]),
    ];
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

/// Says `hello` to the blockd at `addr`, over plain TCP or with the certificate in `tls`:
/// answers the first frame back, or why there was none.
fn say_hello(
    addr: &str,
    tls: Option<&Path>,
    hello: &blockrepl::proto::Hello,
) -> Result<blockrepl::proto::Frame, String> {
    use blockrepl::proto::{Frame, Kind};
    use std::io::Write;
    let timeout = Duration::from_secs(5);
    let mut s: Box<dyn ReadWrite> = match tls {
        None => {
            let s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(timeout)).unwrap();
            Box::new(s)
        }
        Some(dir) => {
            let id = enspeed_trust::Identity::load(&enspeed_trust::TrustDir(dir.to_owned()))
                .map_err(|e| e.to_string())?;
            let (s, _) = id
                .connector()
                .connect(addr, timeout)
                .map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(timeout)).unwrap();
            Box::new(s)
        }
    };
    Frame::json(Kind::Hello, 1, hello.generation, hello)
        .write_to(&mut s)
        .and_then(|()| s.flush())
        .map_err(|e| e.to_string())?;
    Frame::read_from(&mut s).map_err(|e| e.to_string())
}

trait ReadWrite: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> ReadWrite for T {}

#[test]
fn mirror_hellos_from_strangers_are_refused_on_an_empty_and_a_full_copy() {
    use blockrepl::proto::{Hello, Kind};
    let s = Scratch::new("livesync-strangers");
    // Servers 1 (the primary), 2 (the backup) and 3 (another server of the same cluster).
    let certs = certificates(&s, 3);
    let a = Blockd::start(&s.path("a"), &certs[0]);
    let b = Blockd::start(&s.path("b"), &certs[1]);
    // The primary's data: a clone of a disk holding a pattern (a new disk's own data would be
    // all zeros, which its backup needs no full sync for).
    let pattern: Vec<u8> = (0..8u32 << 20).map(|i| (i / 4096 % 251) as u8).collect();
    a.ok(&["create", "src", "--size", "8M"]);
    std::fs::write(a.dir.join("disks/src/data"), &pattern).unwrap();
    a.ok(&["create", "d", "--size", "8M", "--from", "src"]);
    b.ok(&[
        "create",
        "d",
        "--size",
        "8M",
        "--backup",
        "--peer-server",
        "1",
    ]);
    let primary = a.status("d");
    let hello = |generation: u64| Hello {
        disk: "d".into(),
        disk_id: primary["disk_id"].as_str().unwrap().into(),
        capacity: 8 << 20,
        region_size: 1 << 20,
        generation,
        bitmap_base: 0,
        fill: String::new(),
        new_fill: "5eed".into(),
        from_zeros: false,
    };
    let strangers = |generation: u64, copy: &str| {
        // No certificate at all: the TLS handshake fails, nothing is answered.
        let plain = say_hello(&b.addr, None, &hello(generation));
        assert!(
            plain.as_ref().is_err(),
            "plain TCP on the {copy} copy: {plain:?}"
        );
        // Another server of the cluster: refused, the copy takes its link from server 1.
        let other = say_hello(&b.addr, Some(&certs[2]), &hello(generation))
            .unwrap_or_else(|e| panic!("server 3 on the {copy} copy: {e}"));
        assert_eq!(other.kind, Kind::Error, "server 3 on the {copy} copy");
        assert!(
            other
                .text()
                .contains("takes its link from server 1, not from server 3"),
            "{}",
            other.text()
        );
    };
    strangers(1, "empty");
    let st = b.status("d");
    assert_eq!(
        (st["data"].as_str(), st["generation"].as_u64()),
        (Some("empty"), Some(0)),
        "{st}"
    );

    // The primary's link: with the wrong backup server named it refuses the blockd it
    // reaches; with the right one it syncs.
    a.ok(&["attach", "d", &b.addr, "--peer-server", "3"]);
    a.wait_status("d", "the link refused for naming another server", |st| {
        st["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("is server 2's, not the backup's (server 3)"))
    });
    a.ok(&["attach", "d", &b.addr, "--peer-server", "2"]);
    a.wait_status("d", "the first full sync", in_sync);
    assert!(
        b.data("d") == pattern,
        "the backup holds the primary's data"
    );

    // On the full copy, at a higher generation that would take it over: refused as well.
    strangers(7, "full");
    assert!(b.data("d") == pattern, "strangers changed nothing");
    assert!(in_sync(&a.status("d")), "the primary's link stays up");
    assert!(b.log_text().contains("mirror connection refused"));
}

/// A firmware-booted VM's disk on the SATA controller, served by blockd over vhost-user (a
/// cluster VM's LiveSync disk with `bus=sata`): SeaBIOS reads the project's boot disk from it
/// through int 13h (the AHCI's commands turned into virtio-blk requests on a ring of the VMM's
/// own), and the mirrored backup holds what the primary holds.
#[test]
fn a_firmware_vm_boots_its_sata_disk_from_blockd() {
    if !kvm_available("a_firmware_vm_boots_its_sata_disk_from_blockd") {
        return;
    }
    let s = Scratch::new("livesync-sata");
    let certs = certificates(&s, 2);
    let a = Blockd::start(&s.path("a"), &certs[0]);
    let b = Blockd::start(&s.path("b"), &certs[1]);
    mirrored_pair(&a, &b, "4M");
    // The boot disk's bytes in both copies (they are in sync: the same blocks on each).
    let image = std::fs::read(bootdisk()).unwrap();
    for d in [&a, &b] {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.dir.join("disks/d/data"))
            .unwrap();
        f.write_all_at(&image, 0).unwrap();
        f.sync_all().unwrap();
    }
    let socket = a.vhost_socket("d");
    let mut vm = Vmm::start(&[
        "--memory".to_string(),
        "128".into(),
        "--vcpus".into(),
        "1".into(),
        "--disk".into(),
        format!("vhost-user={socket},bus=sata"),
    ]);
    vm.wait_for("stage 2 read through int 13h", BOOT);
    vm.wait_for("powering off", BOOT);
    assert!(vm.wait_exit(BOOT).success());
    let out = vm.output();
    // The boot disk's bytes are only in blockd's copies: what booted came through it.
    assert!(
        !out.contains("bootdisk: FAIL"),
        "the boot disk failed:\n{out}"
    );
}
