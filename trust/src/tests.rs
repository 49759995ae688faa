//! Both ends of real connections on loopback.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use super::*;

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("enspeed-trust-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Accepts one connection with `accept` on a new thread; answers the peer it saw and echoes
/// what it reads, upper-cased, until the end of the stream.
fn serve_once(
    accept: impl FnOnce(std::net::TcpStream) -> Result<(TlsStream, Peer), Error> + Send + 'static,
) -> (String, std::thread::JoinHandle<Result<Peer, String>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let t = std::thread::spawn(move || {
        let (tcp, _) = l.accept().unwrap();
        let (mut s, peer) = accept(tcp).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let up: Vec<u8> = buf[..n].iter().map(u8::to_ascii_uppercase).collect();
                    if s.write_all(&up).is_err() {
                        break;
                    }
                }
            }
        }
        Ok(peer)
    });
    (addr, t)
}

const T: Duration = Duration::from_secs(5);

#[test]
fn members_know_each_other_by_certificate_and_strangers_are_refused() {
    let (one, two, other) = (scratch("one"), scratch("two"), scratch("other"));
    let d1 = TrustDir::of(&one);
    d1.create_cluster(1).unwrap();
    // Server 2 is enrolled by server 1, with the same CA.
    let d2 = TrustDir::of(&two);
    d2.install(&d1.enroll(2).unwrap()).unwrap();
    assert_eq!(d1.cluster_token().unwrap(), d2.cluster_token().unwrap());
    let (id1, id2) = (Identity::load(&d1).unwrap(), Identity::load(&d2).unwrap());
    assert_eq!((id1.id, id2.id), (1, 2));
    use std::os::unix::fs::PermissionsExt;
    for key in ["ca.key", "server.key", "cluster-token"] {
        let mode = std::fs::metadata(d2.file(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{key} is private");
    }

    // Mutual TLS: each side learns the other's id from its certificate.
    let server = id1.clone();
    let (addr, t) = serve_once(move |tcp| server.accept(tcp));
    let (mut c, peer) = id2.connector().connect(&addr, T).unwrap();
    assert_eq!(
        peer,
        Peer::Server {
            id: 1,
            fingerprint: id1.fingerprint
        }
    );
    c.write_all(b"hello").unwrap();
    let mut got = [0u8; 5];
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"HELLO");
    c.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(
        t.join().unwrap().unwrap(),
        Peer::Server {
            id: 2,
            fingerprint: id2.fingerprint
        }
    );

    // Another cluster's server: its certificate does not chain to this CA, either way.
    let d3 = TrustDir::of(&other);
    d3.create_cluster(2).unwrap();
    let stranger = Identity::load(&d3).unwrap();
    let server = id1.clone();
    let (addr, t) = serve_once(move |tcp| server.accept(tcp));
    assert!(stranger.connector().connect(&addr, T).is_err());
    assert!(
        t.join().unwrap().is_err(),
        "the server refused the stranger"
    );
    let server = stranger.clone();
    let (addr, t) = serve_once(move |tcp| server.accept(tcp));
    assert!(
        id1.connector().connect(&addr, T).is_err(),
        "and the client refuses it"
    );
    let _ = t.join();

    // The roster: a revoked certificate, or another one than the state records, is refused.
    let roster = Roster::default();
    let p2 = Peer::Server {
        id: 2,
        fingerprint: id2.fingerprint,
    };
    assert!(roster.check(&p2).is_ok(), "not yet added: may ask to be");
    roster.set([(2, id2.fingerprint)], []);
    assert!(roster.check(&p2).is_ok());
    roster.set([(2, id1.fingerprint)], []);
    assert!(roster
        .check(&p2)
        .unwrap_err()
        .contains("another certificate"));
    roster.set([], [id2.fingerprint]);
    assert!(roster.check(&p2).unwrap_err().contains("revoked"));
    assert!(roster.check(&Peer::Anonymous).is_err());
    for d in [one, two, other] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn joining_and_waiting_servers_pin_what_their_tokens_name() {
    let (one, wait, other) = (scratch("j1"), scratch("jw"), scratch("jo"));
    let d1 = TrustDir::of(&one);
    d1.create_cluster(1).unwrap();
    let id1 = Identity::load(&d1).unwrap();
    let token = ClusterToken::parse(&d1.read("cluster-token").unwrap()).unwrap();
    assert!(d1.admits(&token).unwrap());

    // A joining server reaches the cluster's server without a certificate of its own.
    let server = id1.clone();
    let (addr, t) = serve_once(move |tcp| server.accept(tcp));
    let (mut c, peer) = Connector::enrolling(token.ca).connect(&addr, T).unwrap();
    assert!(matches!(peer, Peer::Server { id: 1, .. }));
    c.write_all(b"x").unwrap();
    c.read_exact(&mut [0u8; 1]).unwrap();
    drop(c);
    assert_eq!(t.join().unwrap().unwrap(), Peer::Anonymous);

    // A token of another cluster does not reach this one.
    let d3 = TrustDir::of(&other);
    d3.create_cluster(1).unwrap();
    let wrong = d3.cluster_token().unwrap();
    assert!(!d1.admits(&wrong).unwrap());
    let server = id1.clone();
    let (addr, t) = serve_once(move |tcp| server.accept(tcp));
    assert!(Connector::enrolling(wrong.ca).connect(&addr, T).is_err());
    let _ = t.join();

    // A waiting server is reached by the certificate its token names, and only by that.
    let dw = TrustDir::of(&wait);
    let invite = dw.pending().unwrap();
    assert!(dw.pending().unwrap().matches(&invite), "made once, kept");
    let pending = Pending::load(&dw).unwrap();
    let (addr, t) = serve_once(move |tcp| pending.accept(tcp));
    let (mut c, _) = Connector::to_waiting(invite.server)
        .connect(&addr, T)
        .unwrap();
    c.write_all(b"y").unwrap();
    c.read_exact(&mut [0u8; 1]).unwrap();
    drop(c);
    let _ = t.join();
    let (addr, t) = serve_once(move |tcp| id1.accept(tcp));
    assert!(Connector::to_waiting(invite.server)
        .connect(&addr, T)
        .is_err());
    let _ = t.join();
    for d in [one, wait, other] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn both_directions_flow_at_once() {
    let dir = scratch("duplex");
    let d = TrustDir::of(&dir);
    d.create_cluster(1).unwrap();
    let id = Identity::load(&d).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let server = id.clone();
    const N: usize = 8 << 20;
    // Each side writes 8 MiB while it reads the other's 8 MiB: neither drains before it has
    // written everything, so the writes block unless reading goes on beside them.
    let side = |s: TlsStream| {
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let block = vec![0x5a_u8; 64 << 10];
            for _ in 0..N / block.len() {
                w.write_all(&block).unwrap();
            }
        });
        let mut r = s;
        let (mut total, mut buf) = (0usize, vec![0u8; 64 << 10]);
        while total < N {
            let n = r.read(&mut buf).unwrap();
            assert!(n > 0 && buf[..n].iter().all(|&b| b == 0x5a));
            total += n;
        }
        writer.join().unwrap();
        total
    };
    let t = std::thread::spawn(move || {
        let (tcp, _) = l.accept().unwrap();
        side(server.accept(tcp).unwrap().0)
    });
    let (c, _) = id.connector().connect(&addr, T).unwrap();
    assert_eq!(side(c), N);
    assert_eq!(t.join().unwrap(), N);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_read_returns_all_that_has_arrived_as_a_tcp_read_does() {
    // A backup's group commit looks at what its reader holds: a read that stopped at one TLS
    // record would make it answer frame by frame.
    let dir = scratch("all-arrived");
    let d = TrustDir::of(&dir);
    d.create_cluster(1).unwrap();
    let id = Identity::load(&d).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let server = id.clone();
    let t = std::thread::spawn(move || {
        let (tcp, _) = l.accept().unwrap();
        let (mut s, _) = server.accept(tcp).unwrap();
        for i in 0..24u8 {
            s.write_all(&[i; 4096]).unwrap();
        }
        let mut done = [0u8; 1];
        s.read_exact(&mut done).unwrap();
    });
    let (mut c, _) = id.connector().connect(&addr, T).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut buf = vec![0u8; 256 << 10];
    let n = c.read(&mut buf).unwrap();
    assert_eq!(
        n,
        24 * 4096,
        "24 records (96 KiB, more than one socket read), one read"
    );
    assert!(buf[..4096].iter().all(|&b| b == 0) && buf[n - 4096..n].iter().all(|&b| b == 23));
    c.write_all(b"k").unwrap();
    t.join().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}
