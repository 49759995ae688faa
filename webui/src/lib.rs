//! EnSpeed's web orchestrator, served by every server: the REST API under `/api/v1` (its
//! OpenAPI document at `/api/v1/openapi.json`), sessions and roles, and the UI.
//!
//! - `http`: the hyper server, requests and JSON answers, errors;
//! - `auth`: passwords (argon2id), session tokens and cookies, CSRF, the login rate limit;
//! - `cluster`: the Raft node as the API sees it: proposals as the logged-in user, reads of
//!   this server's applied state that include the caller's own earlier writes;
//! - `routes`: the endpoints, and what each role sees of the state (`views`);
//! - `console`: the VM's serial and VNC consoles as WebSockets, relayed from its server;
//! - `cli`: `enspeed vm|user|servers|audit`, the command-line client of the API;
//! - `openapi`: the API's description;
//! - `assets`: the UI's files (built from `webui/ui`, embedded by `build.rs`), served at
//!   every path outside `/api`.
//!
//! Every change is a `Command::Act` of the logged-in user: the state machine checks the
//! user's rights when it applies it and writes the audit entry, so the API cannot grant more
//! than the roles allow. The API checks them first too, to answer 403 or 404 without a
//! Raft round trip.

pub mod assets;
pub mod auth;
pub mod bodies;
pub mod cli;
pub mod cluster;
pub mod console;
pub mod http;
pub mod imports;
pub mod openapi;
pub mod pace;
pub mod routes;
pub mod tls;
pub mod views;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use control::server::{Service, ServiceContext};

/// `enspeed server`'s web flags.
#[derive(clap::Args, Clone, Debug)]
pub struct WebArgs {
    /// Serve the UI and API over HTTPS here (a self-signed certificate is made on first start
    /// in DATA/web/tls; replace cert.pem and key.pem with your own).
    #[arg(long)]
    pub https: Option<SocketAddr>,
    /// Serve the UI and API over plain HTTP here (loopback only: the demo and tests).
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// How long a session lasts, seconds.
    #[arg(long, default_value_t = 12 * 3600)]
    pub session_ttl_secs: u64,
    /// How long a client may take to send a request's headers, or its body, or to complete
    /// the TLS handshake, and how long an upload may stay idle, seconds.
    #[arg(long, default_value_t = 30)]
    pub web_timeout_secs: u64,
    /// The kernel VMs created through the API boot (a path on every server).
    #[arg(long, default_value = "")]
    pub guest_kernel: String,
    /// Their initramfs.
    #[arg(long, default_value = "")]
    pub guest_initrd: String,
    /// Their kernel command line.
    #[arg(long, default_value = "console=ttyS0")]
    pub guest_cmdline: String,
    /// Make sure a Manager of this name exists (created on first start), its password read
    /// from --manager-password-file.
    #[arg(long, requires = "manager_password_file")]
    pub manager: Option<String>,
    /// The first Manager's password, in a file (its first line).
    #[arg(long, requires = "manager")]
    pub manager_password_file: Option<std::path::PathBuf>,
    /// Delete --manager-password-file once the cluster holds that Manager (the appliance's
    /// installer leaves the first password there; the cluster keeps only its hash); a missing
    /// file is then one already used.
    #[arg(long, requires = "manager_password_file")]
    pub forget_manager_password_file: bool,
}

/// What the web service needs beyond the node.
#[derive(Clone, Debug)]
pub struct WebConfig {
    /// HTTPS address.
    pub https: Option<SocketAddr>,
    /// Plain HTTP address (loopback).
    pub http: Option<SocketAddr>,
    /// Session lifetime.
    pub session_ttl: Duration,
    /// A request's headers, its body, a TLS handshake, an upload's silence: at most this.
    pub timeout: Duration,
    /// What API-created VMs boot.
    pub guest: GuestBoot,
    /// A Manager to create if missing.
    pub manager: Option<FirstManager>,
}

/// The Manager a server makes sure exists when it starts.
#[derive(Clone, Debug)]
pub struct FirstManager {
    /// The user's name.
    pub name: String,
    /// Its password, for a new user.
    pub password: String,
    /// The file the password came from, deleted once the cluster holds the user.
    pub forget: Option<std::path::PathBuf>,
}

/// What a VM created through the API boots, until the library brings ISOs and appliances.
#[derive(Clone, Debug, Default)]
pub struct GuestBoot {
    /// Kernel path on the servers.
    pub kernel: String,
    /// Initramfs path.
    pub initrd: String,
    /// Kernel command line.
    pub cmdline: String,
}

impl WebArgs {
    /// The service for `control::server::run`, or none when no address is given.
    pub fn service(&self) -> Result<Option<Service>, String> {
        if self.http.is_none() && self.https.is_none() {
            return Ok(None);
        }
        if let Some(http) = self.http.filter(|a| !a.ip().is_loopback()) {
            return Err(format!(
                "--http {http}: plain HTTP is for loopback only (the demo and tests); use --https"
            ));
        }
        let manager = match (&self.manager, &self.manager_password_file) {
            // Forgotten on an earlier start, once the cluster held the Manager: nothing to do.
            (Some(_), Some(file)) if self.forget_manager_password_file && !file.exists() => None,
            (Some(name), Some(file)) => {
                let text = std::fs::read_to_string(file)
                    .map_err(|e| format!("--manager-password-file {}: {e}", file.display()))?;
                let password = text.lines().next().unwrap_or("").to_string();
                auth::check_password(&password)
                    .map_err(|e| format!("--manager-password-file {}: {e}", file.display()))?;
                control::access::check_name("user", name).map_err(|e| format!("--manager: {e}"))?;
                Some(FirstManager {
                    name: name.clone(),
                    password,
                    forget: self.forget_manager_password_file.then(|| file.clone()),
                })
            }
            _ => None,
        };
        let cfg = WebConfig {
            manager,
            https: self.https,
            http: self.http,
            session_ttl: Duration::from_secs(self.session_ttl_secs.max(1)),
            timeout: Duration::from_secs(self.web_timeout_secs.max(1)),
            guest: GuestBoot {
                kernel: self.guest_kernel.clone(),
                initrd: self.guest_initrd.clone(),
                cmdline: self.guest_cmdline.clone(),
            },
        };
        Ok(Some(Service(Arc::new(move |ctx: ServiceContext| {
            start(cfg.clone(), ctx)
        }))))
    }
}

/// Starts the web server on its own thread (a tokio runtime); returns once it listens.
pub fn start(cfg: WebConfig, ctx: ServiceContext) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("web")
        .enable_all()
        .build()?;
    let bind = |addr: SocketAddr| -> std::io::Result<std::net::TcpListener> {
        let l = std::net::TcpListener::bind(addr)
            .map_err(|e| std::io::Error::new(e.kind(), format!("web address {addr}: {e}")))?;
        l.set_nonblocking(true)?;
        Ok(l)
    };
    let http = cfg.http.map(bind).transpose()?;
    let https = match cfg.https {
        Some(addr) => {
            let names = [addr.ip().to_string(), host_name()];
            let tls = tls::server_config(&ctx.data_dir.join("web/tls"), &names)
                .map_err(|e| std::io::Error::other(format!("HTTPS: {e}")))?;
            Some((bind(addr)?, tokio_rustls::TlsAcceptor::from(tls)))
        }
        None => None,
    };
    let manager = cfg.manager.clone();
    let app = Arc::new(routes::App::new(cfg, cluster::Cluster::new(ctx)));
    std::thread::Builder::new()
        .name("web".into())
        .spawn(move || {
            rt.block_on(async move {
                if let Some(m) = manager {
                    tokio::spawn(routes::ensure_manager(Arc::clone(&app), m));
                }
                tokio::spawn(imports::watch(Arc::clone(&app)));
                let mut servers = Vec::new();
                for (l, tls) in http
                    .map(|l| (l, None))
                    .into_iter()
                    .chain(https.map(|(l, a)| (l, Some(a))))
                {
                    match tokio::net::TcpListener::from_std(l) {
                        Ok(l) => servers.push(tokio::spawn(http::serve(l, Arc::clone(&app), tls))),
                        Err(e) => tracing::error!(error = %e, "web listener"),
                    }
                }
                for s in servers {
                    let _ = s.await;
                }
            })
        })?;
    Ok(())
}

/// This machine's host name, for the certificate.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
