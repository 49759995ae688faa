//! The mirror links' connections: mutual TLS under the cluster's CA (`enspeed_trust`), so a
//! backup copy hears only from a server of its cluster, and a primary sends only to one; and
//! only from or to a certificate the cluster's roster admits (the one each member holds; never
//! a removed server's), as the node agent tells blockd (`daemon::Request::Roster`).
//! Plain TCP remains for measuring what TLS costs (`enspeed blockd --plaintext-mirror`).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use enspeed_trust::{Fingerprint, Identity, Peer, Roster, TlsStream, TrustDir};

/// How a blockd's mirror links are made.
#[derive(Clone, Debug)]
pub enum MirrorNet {
    /// Mutual TLS with this server's certificate (its `DATA/tls`), checked against the roster
    /// (shared by every clone).
    Tls(Identity, Roster),
    /// Plain TCP: no peer is authenticated. For benchmarks only.
    Plain,
}

impl MirrorNet {
    /// Mutual TLS with the certificate in `dir` (a server's `DATA/tls`).
    pub fn tls(dir: &std::path::Path) -> Result<MirrorNet, enspeed_trust::Error> {
        Identity::load(&TrustDir(dir.to_path_buf())).map(|i| MirrorNet::Tls(i, Roster::default()))
    }

    /// Replaces the roster: each member's certificate by server id, and removed servers' ones.
    /// Until it is first set, any certificate of the cluster's CA is taken.
    pub fn set_roster(
        &self,
        members: impl IntoIterator<Item = (u64, Fingerprint)>,
        revoked: impl IntoIterator<Item = Fingerprint>,
    ) {
        if let MirrorNet::Tls(_, roster) = self {
            roster.set(members, revoked);
        }
    }

    /// Completes an accepted connection: the stream, and the server at the other end (`None`
    /// on plain TCP). A client without a cluster certificate is refused.
    pub fn accept(&self, tcp: TcpStream) -> Result<(MirrorStream, Option<u64>), String> {
        match self {
            MirrorNet::Plain => Ok((MirrorStream::Plain(tcp), None)),
            MirrorNet::Tls(identity, roster) => match identity.accept(tcp) {
                Ok((s, peer @ Peer::Server { id, .. })) => {
                    roster.check(&peer)?;
                    Ok((MirrorStream::Tls(s), Some(id)))
                }
                Ok(_) => Err("a primary without a cluster certificate".into()),
                Err(e) => Err(format!("TLS: {e}")),
            },
        }
    }

    /// Connects to the blockd at `addr`: the stream, and the server at the other end (`None`
    /// on plain TCP).
    pub fn connect(
        &self,
        addr: &str,
        timeout: Duration,
    ) -> io::Result<(MirrorStream, Option<u64>)> {
        match self {
            MirrorNet::Plain => {
                let sa = addr
                    .to_socket_addrs()?
                    .next()
                    .ok_or_else(|| io::Error::other(format!("{addr} resolves to nothing")))?;
                Ok((
                    MirrorStream::Plain(TcpStream::connect_timeout(&sa, timeout)?),
                    None,
                ))
            }
            MirrorNet::Tls(identity, roster) => {
                match identity.connector().connect(addr, timeout)? {
                    (s, peer @ Peer::Server { id, .. }) => {
                        roster.check(&peer).map_err(io::Error::other)?;
                        Ok((MirrorStream::Tls(s), Some(id)))
                    }
                    _ => Err(io::Error::other("the backup shows no server certificate")),
                }
            }
        }
    }
}

/// One mirror connection; clones share it (a receiver thread reads while writers write).
#[derive(Debug)]
pub enum MirrorStream {
    /// Mutual TLS.
    Tls(TlsStream),
    /// Plain TCP.
    Plain(TcpStream),
}

impl MirrorStream {
    /// Another handle on the same connection.
    pub fn try_clone(&self) -> io::Result<MirrorStream> {
        Ok(match self {
            MirrorStream::Tls(s) => MirrorStream::Tls(s.try_clone()?),
            MirrorStream::Plain(s) => MirrorStream::Plain(s.try_clone()?),
        })
    }

    /// Shuts the connection down.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            MirrorStream::Tls(s) => s.shutdown(how),
            MirrorStream::Plain(s) => s.shutdown(how),
        }
    }

    /// The read timeout.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            MirrorStream::Tls(s) => s.set_read_timeout(t),
            MirrorStream::Plain(s) => s.set_read_timeout(t),
        }
    }

    /// The write timeout.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            MirrorStream::Tls(s) => s.set_write_timeout(t),
            MirrorStream::Plain(s) => s.set_write_timeout(t),
        }
    }

    /// `TCP_NODELAY`.
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        match self {
            MirrorStream::Tls(s) => s.set_nodelay(on),
            MirrorStream::Plain(s) => s.set_nodelay(on),
        }
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        match self {
            MirrorStream::Tls(s) => s.peer_addr(),
            MirrorStream::Plain(s) => s.peer_addr(),
        }
    }
}

impl Read for MirrorStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            MirrorStream::Tls(s) => s.read(buf),
            MirrorStream::Plain(s) => s.read(buf),
        }
    }
}

impl Write for MirrorStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            MirrorStream::Tls(s) => s.write(buf),
            MirrorStream::Plain(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            MirrorStream::Tls(s) => s.flush(),
            MirrorStream::Plain(s) => s.flush(),
        }
    }
}
