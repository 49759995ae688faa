//! This server's side of trust between servers: its certificate (or, while it waits to be
//! added, its self-signed one), the roster of certificates the committed state admits, and
//! TLS connections to and from the other servers (see `enspeed_trust`).

use std::collections::HashMap;
use std::net::TcpStream;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use enspeed_trust::{Connector, Identity, Peer, Pending, Roster, TlsStream, TrustDir};

use crate::state_machine::StateMachine;

/// A connection refused: from where, and why.
#[derive(Debug)]
pub struct Refused {
    /// The peer's address.
    pub from: String,
    /// Why.
    pub why: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.from, self.why)
    }
}

/// Logs each kind of refusal at most once a minute (a removed server retries all the time):
/// the log stays bounded, with the count of those not logged.
#[derive(Default)]
pub struct RefusalLog(
    std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, u64)>>,
);

impl RefusalLog {
    /// The most kinds of refusal remembered.
    const KINDS: usize = 256;

    /// Logs `r` unless its kind was logged less than a minute ago.
    pub fn log(&self, r: &Refused) {
        let now = std::time::Instant::now();
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= Self::KINDS && !seen.contains_key(&r.why) {
            seen.retain(|_, (at, _)| now.duration_since(*at) < Duration::from_secs(60));
            if seen.len() >= Self::KINDS {
                return;
            }
        }
        let (at, skipped) = seen.entry(r.why.clone()).or_insert((now, u64::MAX));
        if *skipped != u64::MAX && now.duration_since(*at) < Duration::from_secs(60) {
            *skipped += 1;
            return;
        }
        let before = if *skipped == u64::MAX { 0 } else { *skipped };
        *at = now;
        *skipped = 0;
        tracing::warn!(from = %r.from, why = %r.why, like_it_in_the_last_minute = before, "refused a connection");
    }
}

/// What this server can show.
enum Role {
    /// A member's certificate, under the cluster CA.
    Member(Identity),
    /// Waiting to be added: a self-signed certificate its join token names.
    Waiting(Pending),
}

/// Connections kept for the next request to a server: at most this many idle ones each...
const IDLE_PER_SERVER: usize = 16;
/// ...none kept longer than this (a server lets an idle client go after five minutes).
const IDLE_MAX: Duration = Duration::from_secs(60);
/// The most servers connections are kept for.
const POOLED_SERVERS: usize = 64;

/// This server's certificates and the roster; shared by every part that talks to servers.
pub struct Peers {
    dir: TrustDir,
    role: RwLock<Role>,
    roster: Roster,
    /// Idle connections by address, with the peer each reached and when each went idle.
    pool: Mutex<HashMap<String, Vec<(TlsStream, Peer, Instant)>>>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Peers({})", self.dir.0.display())
    }
}

impl Peers {
    /// A member's certificates, from data directory `data_dir`.
    pub fn member(data_dir: &Path) -> Result<Arc<Peers>, enspeed_trust::Error> {
        let dir = TrustDir::of(data_dir);
        let identity = Identity::load(&dir)?;
        Ok(Arc::new(Peers {
            dir,
            role: RwLock::new(Role::Member(identity)),
            roster: Roster::default(),
            pool: Mutex::default(),
        }))
    }

    /// A server waiting to be added, with the self-signed certificate in `data_dir`.
    pub fn waiting(data_dir: &Path) -> Result<Arc<Peers>, enspeed_trust::Error> {
        let dir = TrustDir::of(data_dir);
        dir.pending()?;
        let pending = Pending::load(&dir)?;
        Ok(Arc::new(Peers {
            dir,
            role: RwLock::new(Role::Waiting(pending)),
            roster: Roster::default(),
            pool: Mutex::default(),
        }))
    }

    /// The `DATA/tls` directory.
    pub fn dir(&self) -> &TrustDir {
        &self.dir
    }

    /// The certificates the committed state admits.
    pub fn roster(&self) -> &Roster {
        &self.roster
    }

    /// Takes the member certificate installed in the directory since (after an enrollment).
    pub fn become_member(&self) -> Result<(), enspeed_trust::Error> {
        let identity = Identity::load(&self.dir)?;
        *self.role.write().expect("role lock") = Role::Member(identity);
        Ok(())
    }

    /// Whether this server is a member (holds a certificate of its cluster).
    pub fn is_member(&self) -> bool {
        matches!(*self.role.read().expect("role lock"), Role::Member(_))
    }

    /// This member's certificate's fingerprint (hex), if it is a member.
    pub fn fingerprint(&self) -> Option<String> {
        match &*self.role.read().expect("role lock") {
            Role::Member(i) => Some(i.fingerprint.hex()),
            Role::Waiting(_) => None,
        }
    }

    /// Completes the TLS handshake of a connection accepted from `tcp`, and answers who is
    /// at the other end if they may speak to this server at all: a server whose certificate
    /// the roster admits, or a client with no certificate (which may only enroll, or, on a
    /// waiting server, invite it).
    pub fn accept(&self, tcp: TcpStream) -> Result<(TlsStream, Peer), Refused> {
        let from = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        let accepted = match &*self.role.read().expect("role lock") {
            Role::Member(i) => i.accept(tcp),
            Role::Waiting(p) => p.accept(tcp),
        };
        let (stream, peer) = accepted.map_err(|e| Refused {
            from: from.clone(),
            why: format!("TLS: {e}"),
        })?;
        if matches!(peer, Peer::Server { .. }) {
            self.roster
                .check(&peer)
                .map_err(|why| Refused { from, why })?;
        }
        Ok((stream, peer))
    }

    /// Connects to the server at `address` as this member, and checks that the server's
    /// certificate is one the roster admits.
    pub fn connect(&self, address: &str, timeout: Duration) -> std::io::Result<TlsStream> {
        self.connect_peer(address, timeout).map(|(s, _)| s)
    }

    fn connect_peer(&self, address: &str, timeout: Duration) -> std::io::Result<(TlsStream, Peer)> {
        let (stream, peer) = self.connector()?.connect(address, timeout)?;
        self.roster
            .check(&peer)
            .map_err(|e| std::io::Error::other(format!("{address}: {e}")))?;
        Ok((stream, peer))
    }

    /// A connection to the server at `address` for one request and its answer: an idle one
    /// kept from an earlier request (still open at the other end, its server still admitted
    /// by the roster), else a new one. Give it back with [`Peers::keep`] once answered.
    pub fn take(&self, address: &str, timeout: Duration) -> std::io::Result<(TlsStream, Peer)> {
        loop {
            let idle = self
                .pool
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_mut(address)
                .and_then(Vec::pop);
            let Some((s, peer, since)) = idle else {
                return self.connect_peer(address, timeout);
            };
            if since.elapsed() < IDLE_MAX && !s.peer_closed() && self.roster.check(&peer).is_ok() {
                return Ok((s, peer));
            }
        }
    }

    /// Keeps `s`, a connection to `address` whose last request was answered, for the next.
    pub fn keep(&self, address: &str, s: TlsStream, peer: Peer) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() >= POOLED_SERVERS && !pool.contains_key(address) {
            pool.retain(|_, v| v.iter().any(|(_, _, at)| at.elapsed() < IDLE_MAX));
            if pool.len() >= POOLED_SERVERS {
                return;
            }
        }
        let idle = pool.entry(address.to_string()).or_default();
        idle.retain(|(_, _, at)| at.elapsed() < IDLE_MAX);
        if idle.len() < IDLE_PER_SERVER {
            idle.push((s, peer, Instant::now()));
        }
    }

    /// The connector of this member.
    pub fn connector(&self) -> std::io::Result<Connector> {
        match &*self.role.read().expect("role lock") {
            Role::Member(i) => Ok(i.connector()),
            Role::Waiting(_) => Err(std::io::Error::other(
                "this server is not a member of a cluster yet: it has no certificate",
            )),
        }
    }

    /// Takes the committed state's certificates: the members' and the revoked ones.
    pub fn publish(&self, sm: &StateMachine) {
        let (members, revoked) = sm.certificates();
        let members = members
            .iter()
            .filter_map(|(id, hex)| enspeed_trust::Fingerprint::parse(hex).map(|fp| (*id, fp)));
        let revoked = revoked
            .iter()
            .filter_map(|hex| enspeed_trust::Fingerprint::parse(hex));
        self.roster.set(members, revoked);
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn a_connection_is_kept_for_the_next_request_and_one_closed_or_revoked_is_not() {
        let base = std::env::temp_dir().join(format!("enspeed-peers-pool-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (one, two) = (
            TrustDir::of(&base.join("one")),
            TrustDir::of(&base.join("two")),
        );
        one.create_cluster(1).unwrap();
        two.install(&one.enroll(2).unwrap()).unwrap();
        let server = Identity::load(&one).unwrap();
        let peers = Peers::member(&base.join("two")).unwrap();
        peers.roster().set([(1, server.fingerprint)], []);
        // Server 1 answers each line with the number of its connection; "bye" closes it.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = l.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        std::thread::spawn(move || {
            for tcp in l.incoming() {
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                let (s, _) = server.accept(tcp.unwrap()).unwrap();
                std::thread::spawn(move || {
                    let mut w = s.try_clone().unwrap();
                    for line in BufReader::new(s).lines() {
                        let line = line.unwrap_or_default();
                        if line == "bye" {
                            break;
                        }
                        writeln!(w, "{n}").unwrap();
                    }
                });
            }
        });
        let t = Duration::from_secs(5);
        let ask = |s: &mut TlsStream, what: &str| -> String {
            writeln!(s, "{what}").unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut answer = String::new();
            r.read_line(&mut answer).unwrap();
            answer.trim().to_string()
        };
        let (mut s, peer) = peers.take(&address, t).unwrap();
        assert_eq!(ask(&mut s, "a"), "1");
        peers.keep(&address, s, peer);
        // Kept: the next request goes on the same connection.
        let (mut s, peer) = peers.take(&address, t).unwrap();
        assert_eq!(ask(&mut s, "b"), "1");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // Closed by the server meanwhile: not taken again.
        writeln!(s, "bye").unwrap();
        peers.keep(&address, s, peer);
        std::thread::sleep(Duration::from_millis(200));
        let (mut s, peer) = peers.take(&address, t).unwrap();
        assert_eq!(ask(&mut s, "c"), "2");
        peers.keep(&address, s, peer);
        // The server's certificate revoked meanwhile: its kept connection is dropped, and a new
        // one is refused.
        peers
            .roster()
            .set([], [peers_fingerprint(&base.join("one"))]);
        assert!(peers.take(&address, t).is_err());
        let _ = std::fs::remove_dir_all(&base);
    }

    fn peers_fingerprint(data_dir: &Path) -> enspeed_trust::Fingerprint {
        Identity::load(&TrustDir::of(data_dir)).unwrap().fingerprint
    }
}
