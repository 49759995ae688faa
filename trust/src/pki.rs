//! The cluster CA, server certificates, the tokens that admit a server, and their files.

use std::fmt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Error;

/// The common name of the cluster CA.
pub const ISSUER_NAME: &str = "EnSpeed cluster CA";
/// The DNS name every server certificate holds: the name clients verify a server by (a
/// server's address may change; its certificate stays).
pub(crate) const CLUSTER_NAME: &str = "enspeed";

/// The name in a server certificate that carries its id.
pub(crate) fn server_name(id: u64) -> String {
    format!("server-{id}.{CLUSTER_NAME}")
}

/// The id in a certificate name made by [`server_name`].
pub(crate) fn id_of_name(name: &str) -> Option<u64> {
    let id = name
        .strip_prefix("server-")?
        .strip_suffix(&format!(".{CLUSTER_NAME}"))?;
    id.parse().ok().filter(|&id| id > 0)
}

/// The SHA-256 of a certificate's DER bytes: what the state records of a server's certificate.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of `der`.
    pub fn of(der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(der).into())
    }

    /// Lowercase hex, as records and logs show it.
    pub fn hex(&self) -> String {
        hex(&self.0)
    }

    /// Parses [`Fingerprint::hex`].
    pub fn parse(s: &str) -> Option<Fingerprint> {
        let bytes = unhex(s)?;
        Some(Fingerprint(bytes.try_into().ok()?))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).expect("the system's random numbers");
    b
}

/// Equal in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The cluster's join token: `K1.<CA fingerprint>.<secret>`. The fingerprint lets a joining
/// server verify it talks to this cluster; the secret, derived from the CA key (so every
/// member can check it), proves the joiner was given it by an operator.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterToken {
    /// The CA certificate's fingerprint.
    pub ca: Fingerprint,
    secret: [u8; 16],
}

impl ClusterToken {
    /// Parses a token as [`ClusterToken::to_string`] writes it.
    pub fn parse(s: &str) -> Result<ClusterToken, Error> {
        let (ca, secret) = parse_token(s, "K1", "a cluster token")?;
        Ok(ClusterToken { ca, secret })
    }
}

/// The fingerprint and secret of a token `<tag>.<64 hex digits>.<32 hex digits>`.
fn parse_token(s: &str, tag: &str, what: &str) -> Result<(Fingerprint, [u8; 16]), Error> {
    let bad = || Error::Token(format!("{what} is {tag}.<64 hex digits>.<32 hex digits>"));
    let mut parts = s.trim().split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(t), Some(fp), Some(secret), None) if t == tag => Ok((
            Fingerprint::parse(fp).ok_or_else(bad)?,
            unhex(secret)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(bad)?,
        )),
        _ => Err(bad()),
    }
}

impl fmt::Display for ClusterToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "K1.{}.{}", self.ca.hex(), hex(&self.secret))
    }
}

impl fmt::Debug for ClusterToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterToken(ca {}, secret hidden)", self.ca)
    }
}

/// The token of a server waiting to be added (`--await-join`): `W1.<its certificate's
/// fingerprint>.<secret>`. The fingerprint lets the inviting server verify it reached that
/// server and no other; the secret proves to the waiting server that the invitation comes from
/// someone who read its token.
#[derive(Clone, PartialEq, Eq)]
pub struct InviteToken {
    /// The waiting server's self-signed certificate's fingerprint.
    pub server: Fingerprint,
    secret: [u8; 16],
}

impl InviteToken {
    /// Parses a token as [`InviteToken::to_string`] writes it.
    pub fn parse(s: &str) -> Result<InviteToken, Error> {
        let (server, secret) = parse_token(s, "W1", "a server's join token")?;
        Ok(InviteToken { server, secret })
    }

    /// Whether `other` is this token.
    pub fn matches(&self, other: &InviteToken) -> bool {
        same(&self.server.0, &other.server.0) && same(&self.secret, &other.secret)
    }
}

impl fmt::Display for InviteToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "W1.{}.{}", self.server.hex(), hex(&self.secret))
    }
}

impl fmt::Debug for InviteToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InviteToken(server {}, secret hidden)", self.server)
    }
}

/// What a joining server is given: the CA (certificate and key, so it can enroll others in
/// turn) and its own certificate and key.
#[derive(Clone, Serialize, Deserialize)]
pub struct Enrollment {
    /// The CA certificate, PEM.
    pub ca_pem: String,
    /// The CA key, PEM.
    pub ca_key_pem: String,
    /// The server's certificate and then the CA's, PEM.
    pub cert_pem: String,
    /// The server's key, PEM.
    pub key_pem: String,
}

impl fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Enrollment(keys hidden)")
    }
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, ISSUER_NAME);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.use_authority_key_identifier_extension = false;
    p
}

fn server_params(id: u64) -> Result<CertificateParams, Error> {
    let mut p = CertificateParams::new(vec![CLUSTER_NAME.to_string(), server_name(id)])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("EnSpeed server {id}"));
    p.distinguished_name = dn;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

/// A server's `DATA/tls` directory.
#[derive(Clone, Debug)]
pub struct TrustDir(pub PathBuf);

impl TrustDir {
    /// The directory under a server's data directory.
    pub fn of(data_dir: &Path) -> TrustDir {
        TrustDir(data_dir.join("tls"))
    }

    pub(crate) fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Whether this server holds a certificate of its cluster.
    pub fn is_member(&self) -> bool {
        self.file("server.pem").exists() && self.file("server.key").exists()
    }

    /// Makes a new cluster CA and this server's (`id`) certificate under it.
    pub fn create_cluster(&self, id: u64) -> Result<(), Error> {
        let ca_key = KeyPair::generate()?;
        let ca = ca_params().self_signed(&ca_key)?;
        let (cert_pem, key_pem) = issue(&ca_key, &ca.pem(), id)?;
        self.install(&Enrollment {
            ca_pem: ca.pem(),
            ca_key_pem: ca_key.serialize_pem(),
            cert_pem,
            key_pem,
        })?;
        tracing::info!(server = id, ca = %self.ca_fingerprint()?, "made the cluster's CA");
        Ok(())
    }

    /// Issues a certificate for server `id` with this server's copy of the CA.
    pub fn enroll(&self, id: u64) -> Result<Enrollment, Error> {
        let ca_pem = self.read("ca.pem")?;
        let ca_key_pem = self.read("ca.key")?;
        let ca_key = KeyPair::from_pem(&ca_key_pem)?;
        let (cert_pem, key_pem) = issue(&ca_key, &ca_pem, id)?;
        Ok(Enrollment {
            ca_pem,
            ca_key_pem,
            cert_pem,
            key_pem,
        })
    }

    /// Writes what this server was given when it joined (keys first, certificates last: the
    /// server certificate marks the set complete).
    pub fn install(&self, e: &Enrollment) -> Result<(), Error> {
        std::fs::create_dir_all(&self.0).map_err(|source| Error::File {
            path: self.0.clone(),
            source,
        })?;
        self.write("ca.key", &e.ca_key_pem, true)?;
        self.write("ca.pem", &e.ca_pem, false)?;
        self.write("server.key", &e.key_pem, true)?;
        self.write("server.pem", &e.cert_pem, false)?;
        let token = self.cluster_token()?;
        self.write("cluster-token", &format!("{token}\n"), true)
    }

    /// The CA certificate's fingerprint.
    pub fn ca_fingerprint(&self) -> Result<Fingerprint, Error> {
        Ok(Fingerprint::of(
            &crate::tls::pem_certs(&self.file("ca.pem"))?[0],
        ))
    }

    /// The cluster's join token, from this server's copy of the CA key.
    pub fn cluster_token(&self) -> Result<ClusterToken, Error> {
        Ok(ClusterToken {
            ca: self.ca_fingerprint()?,
            secret: self.secret()?,
        })
    }

    /// Whether `token` is this cluster's join token.
    pub fn admits(&self, token: &ClusterToken) -> Result<bool, Error> {
        let ours = self.cluster_token()?;
        Ok(same(&ours.ca.0, &token.ca.0) && same(&ours.secret, &token.secret))
    }

    fn secret(&self) -> Result<[u8; 16], Error> {
        let key = KeyPair::from_pem(&self.read("ca.key")?)?;
        let mut h = Sha256::new();
        h.update(b"enspeed cluster join token\0");
        h.update(key.serialize_der());
        Ok(h.finalize()[..16].try_into().expect("16 bytes"))
    }

    /// The waiting server's self-signed certificate and its token, made on first use.
    pub fn pending(&self) -> Result<InviteToken, Error> {
        if !self.file("pending.pem").exists() || !self.file("pending.key").exists() {
            std::fs::create_dir_all(&self.0).map_err(|source| Error::File {
                path: self.0.clone(),
                source,
            })?;
            let key = KeyPair::generate()?;
            let cert = server_params(0)?.self_signed(&key)?;
            let secret: [u8; 16] = random();
            self.write("pending.key", &key.serialize_pem(), true)?;
            self.write("pending.secret", &hex(&secret), true)?;
            self.write("pending.pem", &cert.pem(), false)?;
        }
        let der = crate::tls::pem_certs(&self.file("pending.pem"))?;
        let secret = unhex(self.read("pending.secret")?.trim())
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| Error::Pem {
                path: self.file("pending.secret"),
                what: "not 32 hex digits".into(),
            })?;
        Ok(InviteToken {
            server: Fingerprint::of(&der[0]),
            secret,
        })
    }

    pub(crate) fn read(&self, name: &str) -> Result<String, Error> {
        let path = self.file(name);
        std::fs::read_to_string(&path).map_err(|source| Error::File { path, source })
    }

    fn write(&self, name: &str, text: &str, private: bool) -> Result<(), Error> {
        let path = self.file(name);
        write_durably(&path, text.as_bytes(), if private { 0o600 } else { 0o644 })
            .map_err(|source| Error::File { path, source })
    }
}

/// Writes `bytes` to `path` (mode `mode`) so that a power cut leaves either the old file or
/// the whole new one: a temporary file beside it, synced, renamed over it, the directory
/// synced.
pub fn write_durably(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    })?
    .sync_all()
}

/// A certificate for server `id` under the CA (`ca_pem`, `ca_key`), with a new key: the
/// certificate then the CA's (the chain a server presents), and the key.
fn issue(ca_key: &KeyPair, ca_pem: &str, id: u64) -> Result<(String, String), Error> {
    // rcgen signs with an issuer certificate made from the same parameters and key: the
    // issuer's name and key identifier are all a signature takes from it.
    let issuer = ca_params().self_signed(ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = server_params(id)?;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&random::<16>()));
    let cert = params.signed_by(&key, &issuer, ca_key)?;
    Ok((format!("{}{}", cert.pem(), ca_pem), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_refuse_garbage() {
        let t = ClusterToken {
            ca: Fingerprint([7; 32]),
            secret: [9; 16],
        };
        assert_eq!(ClusterToken::parse(&t.to_string()).unwrap(), t);
        assert!(!format!("{t:?}").contains("0909"), "Debug hides the secret");
        for bad in [
            "",
            "K1",
            "K1.00.11",
            "W1.aa.bb",
            &t.to_string().replace("K1", "K2"),
        ] {
            assert!(ClusterToken::parse(bad).is_err(), "{bad:?}");
        }
        let w = InviteToken {
            server: Fingerprint([1; 32]),
            secret: [2; 16],
        };
        assert!(InviteToken::parse(&w.to_string()).unwrap().matches(&w));
        assert!(InviteToken::parse(&t.to_string()).is_err());
        let mut other = w.clone();
        other.secret[15] ^= 1;
        assert!(!w.matches(&other));
    }

    #[test]
    fn server_names_carry_ids() {
        assert_eq!(id_of_name(&server_name(42)), Some(42));
        assert_eq!(id_of_name("server-0.enspeed"), None);
        assert_eq!(id_of_name("server-x.enspeed"), None);
        assert_eq!(id_of_name("enspeed"), None);
        assert_eq!(id_of_name("server-4.evil"), None);
    }
}
