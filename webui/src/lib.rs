//! EnSpeed's web orchestrator, served by every server: the REST API under `/api/v1` (its
//! OpenAPI document at `/api/v1/openapi.json`), sessions and roles, and the UI.
//!
//! - `http`: the hyper server, requests and JSON answers, errors;
//! - `auth`: passwords (argon2id), session tokens and cookies, CSRF, the login rate limit;
//! - `cluster`: the Raft node as the API sees it: proposals as the logged-in user, reads of
//!   this server's applied state that include the caller's own earlier writes;
//! - `routes`: the endpoints, and what each role sees of the state (`views`);
//! - `openapi`: the API's description.
//!
//! Every change is a `Command::Act` of the logged-in user: the state machine checks the
//! user's rights when it applies it and writes the audit entry, so the API cannot grant more
//! than the roles allow. The API checks them first too, to answer 403 or 404 without a
//! Raft round trip.

pub mod auth;
pub mod cluster;
pub mod http;
pub mod openapi;
pub mod routes;
pub mod views;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use control::server::{Service, ServiceContext};

/// `enspeed server`'s web flags.
#[derive(clap::Args, Clone, Debug)]
pub struct WebArgs {
    /// Serve the UI and API over plain HTTP here (loopback only: the demo and tests).
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// How long a session lasts, seconds.
    #[arg(long, default_value_t = 12 * 3600)]
    pub session_ttl_secs: u64,
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
}

/// What the web service needs beyond the node.
#[derive(Clone, Debug)]
pub struct WebConfig {
    /// Plain HTTP address (loopback).
    pub http: Option<SocketAddr>,
    /// Session lifetime.
    pub session_ttl: Duration,
    /// What API-created VMs boot.
    pub guest: GuestBoot,
    /// A Manager to create if missing: name and password.
    pub manager: Option<(String, String)>,
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
        let Some(http) = self.http else {
            return Ok(None);
        };
        if !http.ip().is_loopback() {
            return Err(format!(
                "--http {http}: plain HTTP is for loopback only (the demo and tests)"
            ));
        }
        let manager = match (&self.manager, &self.manager_password_file) {
            (Some(name), Some(file)) => {
                let text = std::fs::read_to_string(file)
                    .map_err(|e| format!("--manager-password-file {}: {e}", file.display()))?;
                let password = text.lines().next().unwrap_or("").to_string();
                auth::check_password(&password)
                    .map_err(|e| format!("--manager-password-file {}: {e}", file.display()))?;
                control::access::check_name("user", name).map_err(|e| format!("--manager: {e}"))?;
                Some((name.clone(), password))
            }
            _ => None,
        };
        let cfg = WebConfig {
            manager,
            http: Some(http),
            session_ttl: Duration::from_secs(self.session_ttl_secs.max(1)),
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
    let listener = match cfg.http {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Some(l)
        }
        None => None,
    };
    let manager = cfg.manager.clone();
    let app = Arc::new(routes::App::new(cfg, cluster::Cluster::new(ctx)));
    std::thread::Builder::new()
        .name("web".into())
        .spawn(move || {
            rt.block_on(async move {
                if let Some((name, password)) = manager {
                    tokio::spawn(routes::ensure_manager(Arc::clone(&app), name, password));
                }
                if let Some(l) = listener {
                    match tokio::net::TcpListener::from_std(l) {
                        Ok(l) => http::serve(l, app).await,
                        Err(e) => tracing::error!(error = %e, "web listener"),
                    }
                }
            })
        })?;
    Ok(())
}
