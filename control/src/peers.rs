//! This server's side of trust between servers: its certificate (or, while it waits to be
//! added, its self-signed one), the roster of certificates the committed state admits, and
//! TLS connections to and from the other servers (see `enspeed_trust`).

use std::net::TcpStream;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

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

/// This server's certificates and the roster; shared by every part that talks to servers.
pub struct Peers {
    dir: TrustDir,
    role: RwLock<Role>,
    roster: Roster,
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
        let (stream, peer) = self.connector()?.connect(address, timeout)?;
        self.roster
            .check(&peer)
            .map_err(|e| std::io::Error::other(format!("{address}: {e}")))?;
        Ok(stream)
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
