//! rustls configurations for the connections between servers, and who is at the other end.

use std::collections::{HashMap, HashSet};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, ServerConfig,
    ServerConnection, SignatureScheme,
};

use crate::pki::{id_of_name, Fingerprint, TrustDir, CLUSTER_NAME};
use crate::stream::TlsStream;
use crate::Error;

/// How long a TLS handshake may take.
const HANDSHAKE: Duration = Duration::from_secs(5);

fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    // AES-128-GCM first (both ends are ours): the mirror path is bound by the CPU on small
    // servers, and it costs about a third less per byte than AES-256-GCM.
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

pub(crate) fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem = |what: String| Error::Pem {
        path: path.to_path_buf(),
        what,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem("no certificate in it".into()));
    }
    Ok(certs)
}

fn pem_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| Error::Pem {
        path: path.to_path_buf(),
        what: e.to_string(),
    })
}

/// The server id a certificate names, if it is a server certificate of this code's making.
pub fn server_id(der: &CertificateDer<'_>) -> Result<u64, Error> {
    let cert = webpki::EndEntityCert::try_from(der)
        .map_err(|e| Error::Certificate(format!("does not parse: {e}")))?;
    let ids: Vec<u64> = cert.valid_dns_names().filter_map(id_of_name).collect();
    match ids[..] {
        [id] => Ok(id),
        [] => Err(Error::Certificate("names no server".into())),
        _ => Err(Error::Certificate(format!(
            "names several servers: {ids:?}"
        ))),
    }
}

/// Who is at the other end of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// A server of this cluster: its certificate chains to the cluster CA, names it, and has
    /// this fingerprint (whether it still counts is the [`Roster`]'s to say).
    Server {
        /// The id its certificate names.
        id: u64,
        /// Its certificate's fingerprint.
        fingerprint: Fingerprint,
    },
    /// A client with no certificate: a server enrolling with the cluster token, or an inviting
    /// server reaching a server that waits to be added (which has no CA to check it against).
    Anonymous,
    /// The server waiting to be added whose certificate the invitation token names.
    Waiting,
}

impl Peer {
    /// Who presented `certs` (verified by rustls already): a server, or nobody.
    pub fn of(certs: Option<&[CertificateDer<'_>]>) -> Result<Peer, Error> {
        match certs.and_then(|c| c.first()) {
            None => Ok(Peer::Anonymous),
            Some(der) => Ok(Peer::Server {
                id: server_id(der)?,
                fingerprint: Fingerprint::of(der),
            }),
        }
    }
}

/// What the committed state says about certificates: the one each member holds, and those of
/// removed servers. Servers keep it current as they apply the log.
#[derive(Clone, Debug, Default)]
pub struct Roster(Arc<RwLock<RosterInner>>);

#[derive(Debug, Default)]
struct RosterInner {
    members: HashMap<u64, Fingerprint>,
    revoked: HashSet<Fingerprint>,
}

impl Roster {
    /// Replaces what it knows: members' certificates by id, and the revoked ones.
    pub fn set(
        &self,
        members: impl IntoIterator<Item = (u64, Fingerprint)>,
        revoked: impl IntoIterator<Item = Fingerprint>,
    ) {
        let mut r = self.0.write().expect("roster lock");
        r.members = members.into_iter().collect();
        r.revoked = revoked.into_iter().collect();
    }

    /// Whether `peer` may speak for server `id`: a certificate not revoked, and the one the
    /// state records for `id` if it records one (a server not yet added has none).
    pub fn check(&self, peer: &Peer) -> Result<(), String> {
        let Peer::Server { id, fingerprint } = peer else {
            return Err("no certificate".into());
        };
        let r = self.0.read().expect("roster lock");
        if r.revoked.contains(fingerprint) {
            return Err(format!(
                "the certificate of server {id} ({fingerprint}) was revoked when it was removed"
            ));
        }
        match r.members.get(id) {
            Some(known) if known != fingerprint => Err(format!(
                "server {id} holds another certificate ({known}), not {fingerprint}"
            )),
            _ => Ok(()),
        }
    }
}

/// A member's certificate and the cluster CA, ready for both ends of a connection.
#[derive(Clone)]
pub struct Identity {
    /// This server's id, from its certificate.
    pub id: u64,
    /// Its certificate's fingerprint.
    pub fingerprint: Fingerprint,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity(server {}, {})", self.id, self.fingerprint)
    }
}

impl Identity {
    /// Loads the member certificate from `dir`.
    pub fn load(dir: &TrustDir) -> Result<Identity, Error> {
        let chain = pem_certs(&dir.file("server.pem"))?;
        let key = pem_key(&dir.file("server.key"))?;
        let ca = pem_certs(&dir.file("ca.pem"))?;
        let id = server_id(&chain[0])?;
        let fingerprint = Fingerprint::of(&chain[0]);
        let mut roots = RootCertStore::empty();
        for c in ca {
            roots.add(c)?;
        }
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| Error::Certificate(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        server.send_tls13_tickets = 0;
        let mut client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        client.resumption = rustls::client::Resumption::disabled();
        Ok(Identity {
            id,
            fingerprint,
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }

    /// Completes the server side of a connection accepted from `tcp`.
    pub fn accept(&self, tcp: TcpStream) -> Result<(TlsStream, Peer), Error> {
        accept(&self.server, tcp)
    }

    /// A connector that presents this certificate and trusts only the cluster's servers.
    pub fn connector(&self) -> Connector {
        Connector {
            config: Arc::clone(&self.client),
            waiting: false,
        }
    }
}

fn accept(config: &Arc<ServerConfig>, tcp: TcpStream) -> Result<(TlsStream, Peer), Error> {
    let conn = ServerConnection::new(Arc::clone(config))?;
    let stream = TlsStream::handshake(conn.into(), tcp, HANDSHAKE).map_err(|e| Error::File {
        path: "handshake".into(),
        source: e,
    })?;
    let peer = Peer::of(stream.peer_certificates().as_deref())?;
    Ok((stream, peer))
}

/// A server waiting to be added: it answers with its self-signed certificate and asks none of
/// its clients (it has no CA to check them against yet).
#[derive(Clone)]
pub struct Pending {
    server: Arc<ServerConfig>,
}

impl Pending {
    /// Loads the waiting server's certificate from `dir` (see [`TrustDir::pending`]).
    pub fn load(dir: &TrustDir) -> Result<Pending, Error> {
        let chain = pem_certs(&dir.file("pending.pem"))?;
        let key = pem_key(&dir.file("pending.key"))?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        server.send_tls13_tickets = 0;
        Ok(Pending {
            server: Arc::new(server),
        })
    }

    /// Completes the server side of a connection accepted from `tcp`.
    pub fn accept(&self, tcp: TcpStream) -> Result<(TlsStream, Peer), Error> {
        accept(&self.server, tcp)
    }
}

/// The client side of connections to servers.
#[derive(Clone)]
pub struct Connector {
    config: Arc<ClientConfig>,
    /// Reaches a waiting server, whose certificate names no server yet.
    waiting: bool,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connector")
    }
}

impl Connector {
    /// Trusts a server whose certificate chains to the CA with fingerprint `ca` (the joining
    /// server's view: the cluster token names the CA; the server presents it after its own
    /// certificate). Presents no certificate.
    pub fn enrolling(ca: Fingerprint) -> Connector {
        Connector::pinned(Pin::Ca(ca))
    }

    /// Trusts only the server whose certificate has fingerprint `server` (an inviting server
    /// reaching a waiting one, whose token names its certificate). Presents no certificate:
    /// the waiting server has no CA to check one against.
    pub fn to_waiting(server: Fingerprint) -> Connector {
        Connector::pinned(Pin::Leaf(server))
    }

    fn pinned(pin: Pin) -> Connector {
        let waiting = matches!(pin, Pin::Leaf(_));
        let provider = provider();
        let mut config = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned { pin, provider }))
            .with_no_client_auth();
        config.resumption = rustls::client::Resumption::disabled();
        Connector {
            config: Arc::new(config),
            waiting,
        }
    }

    /// The rustls configuration (for async clients).
    pub fn config(&self) -> Arc<ClientConfig> {
        Arc::clone(&self.config)
    }

    /// The name every server certificate holds, to verify a server by.
    pub fn server_name() -> ServerName<'static> {
        ServerName::try_from(CLUSTER_NAME).expect("a DNS name")
    }

    /// Connects to the server at `address` (waiting at most `timeout` for the connection and
    /// the handshake) and answers the stream and who the server is.
    pub fn connect(&self, address: &str, timeout: Duration) -> std::io::Result<(TlsStream, Peer)> {
        let sa = address
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::other(format!("{address} resolves to nothing")))?;
        let tcp = TcpStream::connect_timeout(&sa, timeout)?;
        self.handshake(tcp, timeout)
    }

    /// Completes the client side of a connection on `tcp`.
    pub fn handshake(
        &self,
        tcp: TcpStream,
        timeout: Duration,
    ) -> std::io::Result<(TlsStream, Peer)> {
        let conn = ClientConnection::new(Arc::clone(&self.config), Connector::server_name())
            .map_err(std::io::Error::other)?;
        let stream = TlsStream::handshake(conn.into(), tcp, timeout.min(HANDSHAKE))?;
        let peer = if self.waiting {
            Peer::Waiting
        } else {
            Peer::of(stream.peer_certificates().as_deref()).map_err(std::io::Error::other)?
        };
        Ok((stream, peer))
    }
}

#[derive(Debug)]
enum Pin {
    /// The chain's last certificate is the CA with this fingerprint, and the first chains to
    /// it and names the cluster.
    Ca(Fingerprint),
    /// The server's certificate has this fingerprint.
    Leaf(Fingerprint),
}

#[derive(Debug)]
struct Pinned {
    pin: Pin,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let refuse =
            |what: &str| rustls::Error::General(format!("the server's certificate {what}"));
        match self.pin {
            Pin::Leaf(fp) => {
                if Fingerprint::of(end_entity) != fp {
                    return Err(refuse("is not the one its token names"));
                }
                Ok(ServerCertVerified::assertion())
            }
            Pin::Ca(fp) => {
                let ca = intermediates
                    .iter()
                    .find(|c| Fingerprint::of(c) == fp)
                    .ok_or_else(|| refuse("does not come with the CA the token names"))?;
                let mut roots = RootCertStore::empty();
                roots.add(ca.clone().into_owned())?;
                let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    Arc::clone(&self.provider),
                )
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
                verifier.verify_server_cert(end_entity, &[], server_name, ocsp, now)
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
