//! HTTPS: a self-signed certificate made on a server's first start (rcgen) and kept in its
//! data directory, served with rustls (ring). An operator may replace the two files with a
//! certificate of their own and restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};

/// Why HTTPS cannot start.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate or key file cannot be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The files hold no usable certificate or key.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Making the certificate failed.
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the certificate and key.
    #[error("the certificate and key: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The certificate (`cert.pem`) and key (`key.pem`) in `dir`, made first if missing, for
/// the names `names` (host names and addresses the server is reached by).
pub fn server_config(dir: &Path, names: &[String]) -> Result<Arc<ServerConfig>, TlsError> {
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    // Missing, or empty (what a power cut during an older server's first start could leave):
    // made anew. Anything else in them is the administrator's and is used, or refused.
    let blank = |p: &Path| std::fs::metadata(p).map_or(true, |m| m.len() == 0);
    if blank(&cert_path) || blank(&key_path) {
        generate(dir, &cert_path, &key_path, names)?;
    }
    let pem = |path: &Path, what: String| TlsError::Pem {
        path: path.to_path_buf(),
        what,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .map_err(|e| pem(&cert_path, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem(&cert_path, e.to_string()))?;
    if certs.is_empty() {
        return Err(pem(&cert_path, "no certificate in it".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| pem(&key_path, e.to_string()))?;
    let cfg =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
    Ok(Arc::new(cfg))
}

fn generate(dir: &Path, cert: &Path, key: &Path, names: &[String]) -> Result<(), TlsError> {
    let file = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::File { path, source }
    };
    std::fs::create_dir_all(dir).map_err(file(dir))?;
    let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    sans.extend(names.iter().filter(|n| !n.is_empty()).cloned());
    sans.sort();
    sans.dedup();
    let made = rcgen::generate_simple_self_signed(sans.clone())?;
    // The key first, readable by its owner only; the certificate last: it marks the pair done.
    // Each whole or not at all, even across a power cut.
    enspeed_trust::write_durably(key, made.key_pair.serialize_pem().as_bytes(), 0o600)
        .map_err(file(key))?;
    enspeed_trust::write_durably(cert, made.cert.pem().as_bytes(), 0o644).map_err(file(cert))?;
    tracing::info!(cert = %cert.display(), names = ?sans, "made a self-signed HTTPS certificate");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_is_made_once_and_reused() {
        let dir = std::env::temp_dir().join(format!("enspeed-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        server_config(&dir, &["server1.example".into()]).unwrap();
        let first = std::fs::read(dir.join("cert.pem")).unwrap();
        server_config(&dir, &[]).unwrap();
        assert_eq!(
            std::fs::read(dir.join("cert.pem")).unwrap(),
            first,
            "reused"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the key is private");
        std::fs::write(dir.join("cert.pem"), "garbage").unwrap();
        assert!(
            server_config(&dir, &[]).is_err(),
            "a broken certificate is refused"
        );
        // An empty one (a power cut during an older server's first start) is made anew.
        std::fs::write(dir.join("cert.pem"), "").unwrap();
        server_config(&dir, &[]).unwrap();
        assert_ne!(std::fs::read(dir.join("cert.pem")).unwrap(), first);
        assert!(
            !dir.join(".cert.pem.tmp").exists(),
            "no temporary file left"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
