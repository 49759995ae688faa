//! A LiveSync pair for the benchmarks: an `enspeed blockd` process holding an empty backup
//! copy, and a primary copy in the benchmark's own process (on the write path blockd serves
//! a VMM) mirrored to it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockrepl::net::MirrorNet;
use blockrepl::replica::{LinkState, NewRole, Replica, Timing};

use crate::enspeed_bin;

/// A backup blockd process; killed when dropped.
pub struct Backup {
    child: Child,
    _dir: PathBuf,
    /// Its control socket.
    pub control: PathBuf,
}

impl Drop for Backup {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a backup blockd in `dir` listening on `ip` (inside network namespace `ns` when
/// given: port 7700 with TLS, 7702 without, since a fresh namespace has every port free; a
/// free port on loopback otherwise), with an empty backup disk `d` of `size` bytes; mirror
/// links over TLS with the certificate in `tls`, or plain TCP. Answers it and its address.
pub fn backup(
    dir: &Path,
    ip: &str,
    ns: Option<&str>,
    tls: Option<&Path>,
    size: u64,
) -> (Backup, String) {
    std::fs::create_dir_all(dir).unwrap();
    let port = match ns {
        Some(_) if tls.is_some() => 7700,
        Some(_) => 7702,
        None => std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port(),
    };
    let addr = format!("{ip}:{port}");
    let control = dir.join("control.sock");
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(enspeed_bin());
            c
        }
        None => Command::new(enspeed_bin()),
    };
    cmd.arg("blockd")
        .arg("--dir")
        .arg(dir.join("disks"))
        .args(["--listen", &addr, "--control"])
        .arg(&control);
    match tls {
        Some(d) => cmd.arg("--tls").arg(d),
        None => cmd.arg("--plaintext-mirror"),
    };
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn blockd");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = blockrepl::daemon::call(
            &control,
            &blockrepl::daemon::Request::Create {
                name: "d".into(),
                size,
                region_size: None,
                backup: true,
                pool: None,
                from: None,
                image: None,
                peer_server: None,
                disk_id: None,
            },
        );
        match r {
            Ok(resp) if resp.ok => break,
            Ok(resp) => panic!("creating the backup disk: {:?}", resp.error),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("blockd did not start: {e}"),
        }
    }
    (
        Backup {
            child,
            _dir: dir.to_owned(),
            control,
        },
        addr,
    )
}

/// A primary disk `d` of `size` bytes in this process, in `dir`, mirrored to `peer` (over
/// `net`), once in sync.
pub fn primary(dir: &Path, peer: &str, net: MirrorNet, size: u64) -> Arc<Replica> {
    std::fs::create_dir_all(dir).unwrap();
    let r = Replica::create(
        dir,
        "d",
        size,
        1 << 20,
        NewRole::Primary,
        None,
        None,
        Timing::default(),
        Arc::new(net),
    )
    .unwrap();
    blockrepl::resync::start(&r).unwrap();
    r.set_peer(Some(peer.to_owned()), None).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while r.status().link != LinkState::InSync {
        assert!(
            Instant::now() < deadline,
            "no sync with {peer}: {:?}",
            r.status().last_error
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    r
}
