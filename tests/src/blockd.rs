//! LiveSync pairs for the benchmarks: an `enspeed blockd` process holding an empty backup
//! copy, and a primary copy mirrored to it, either in the benchmark's own process (on the
//! write path blockd serves a VMM) or in a second blockd process serving a VMM over
//! vhost-user-blk.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockrepl::daemon::Request;
use blockrepl::net::MirrorNet;
use blockrepl::replica::{LinkState, NewRole, Replica, Timing};

use crate::enspeed_bin;

/// A blockd process; killed when dropped.
pub struct Blockd {
    child: Child,
    _dir: PathBuf,
    /// Its control socket.
    pub control: PathBuf,
}

impl Drop for Blockd {
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
) -> (Blockd, String) {
    let port = match ns {
        Some(_) if tls.is_some() => 7700,
        Some(_) => 7702,
        None => crate::cluster::free_port(),
    };
    let addr = format!("{ip}:{port}");
    let b = spawn(dir, &addr, ns, tls);
    b.create(size, true);
    (b, addr)
}

/// A primary disk `d` of `size` bytes in a blockd process of its own in `dir`, mirrored to
/// the backup blockd at `peer` (mutual TLS with the certificate in `tls`), once in sync;
/// with its vhost-user-blk socket, for a VMM.
pub fn primary_daemon(dir: &Path, peer: &str, tls: &Path, size: u64) -> (Blockd, PathBuf) {
    let listen = format!("127.0.0.1:{}", crate::cluster::free_port());
    let b = spawn(dir, &listen, None, Some(tls));
    b.create(size, false);
    let r = b.call(&Request::Attach {
        name: "d".into(),
        peer: peer.to_owned(),
        peer_server: None,
    });
    assert!(r.ok, "attaching the primary to {peer}: {:?}", r.error);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = b.call(&Request::Status {
            name: Some("d".into()),
        });
        let st = r.disks.and_then(|d| d.into_iter().next());
        match st {
            Some(st) if st.link == LinkState::InSync => {
                let sock = st
                    .vhost_socket
                    .expect("blockd reports the disk's vhost-user socket");
                return (b, sock);
            }
            st => assert!(
                Instant::now() < deadline,
                "no sync with {peer}: {:?}",
                st.and_then(|s| s.last_error)
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts a blockd in `dir` listening for primaries on `addr` (inside network namespace
/// `ns` when given), its mirror links over TLS with the certificate in `tls`, or plain TCP.
fn spawn(dir: &Path, addr: &str, ns: Option<&str>, tls: Option<&Path>) -> Blockd {
    std::fs::create_dir_all(dir).unwrap();
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
        .args(["--listen", addr, "--control"])
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
    Blockd {
        child,
        _dir: dir.to_owned(),
        control,
    }
}

impl Blockd {
    fn call(&self, req: &Request) -> blockrepl::daemon::Response {
        blockrepl::daemon::call(&self.control, req)
            .unwrap_or_else(|e| panic!("blockd at {}: {e}", self.control.display()))
    }

    /// Creates disk `d` of `size` bytes (an empty backup, or a primary), once blockd answers.
    fn create(&self, size: u64, backup: bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = blockrepl::daemon::call(
                &self.control,
                &Request::Create {
                    name: "d".into(),
                    size,
                    region_size: None,
                    backup,
                    pool: None,
                    from: None,
                    image: None,
                    peer_server: None,
                    disk_id: None,
                },
            );
            match r {
                Ok(resp) if resp.ok => return,
                Ok(resp) => panic!("creating the disk: {:?}", resp.error),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("blockd did not start: {e}"),
            }
        }
    }
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
