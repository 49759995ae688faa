//! Trust between the servers of a cluster: the cluster's own certificate authority, made when
//! the cluster is created (`enspeed server --init`); each server's certificate, issued when it
//! joins; and mutual TLS on every connection between servers.
//!
//! A server's identity is its certificate: the id in it (`server-N.enspeed`) and its SHA-256
//! fingerprint, never a number a peer states. Whether a certificate still counts (its server
//! was not removed) is the cluster state's to say: see [`Roster`].
//!
//! Files, in a server's `DATA/tls/` (keys readable by their owner only):
//!
//! ```text
//!   ca.pem  ca.key          the cluster CA (every member holds it, so any member can enroll)
//!   server.pem server.key   this server's certificate (then the CA's) and key
//!   pending.pem pending.key a server waiting to be added: its self-signed certificate
//!   cluster-token           the cluster's join token (members)
//!   pending.secret          the secret of a waiting server's join token
//! ```

mod pki;
mod stream;
mod tls;

pub use pki::{
    write_durably, ClusterToken, Enrollment, Fingerprint, InviteToken, TrustDir, ISSUER_NAME,
};
pub use stream::TlsStream;
pub use tls::{Connector, Identity, Peer, Pending, Roster};

/// Why trust material cannot be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file cannot be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds no usable certificate or key.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Making a key or certificate failed.
    #[error("making a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the certificates or keys.
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// A token is not one this code makes.
    #[error("not a join token: {0}")]
    Token(String),
    /// A certificate does not name a server.
    #[error("certificate: {0}")]
    Certificate(String),
}

#[cfg(test)]
mod tests;
