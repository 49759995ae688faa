//! `enspeed server`: one Raft member per physical server. One listen address serves both the
//! other servers (Raft messages, see `transport`) and clients (JSON lines, see `api`), told
//! apart by the first byte of a connection.
//!
//! A cluster starts with one server run with `--init`, which makes the cluster's CA; every
//! other server is started with `--join ADDR --token TOKEN` (any member, and the cluster's join
//! token from a member's DATA/tls/cluster-token): it enrolls for its certificate, asks the
//! leader to add it as a voter, and catches up from the leader's log or a snapshot. Or it waits
//! (`--await-join`) until a Manager adds it with the token it shows. Membership, addresses and
//! certificates then live in the committed state, so a restart needs no flag (they are ignored
//! once the data directory holds a Raft state).
//!
//! Every connection, from servers and clients alike, is TLS (see `peers`).

use std::collections::HashMap;
use std::io::BufRead;
use std::net::{TcpListener, TcpStream};

use enspeed_trust::{ClusterToken, Connector, Enrollment, InviteToken, Peer, TrustDir};
use std::path::PathBuf;
use std::sync::mpsc::channel;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::agent::{self, AgentConfig};
use crate::api::{self, Request};
use crate::failover::{self, FailoverTiming};
use crate::node::{Node, NodeConfig, NodeHandle};
use crate::peers::Peers;
use crate::raft_log;
use crate::state_machine::{Capacity, ServerRecord, StateMachine};
use crate::storage::RaftStore;
use crate::transport::{AddressBook, Transport};

/// How a server comes up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bootstrap {
    /// Start a new cluster with this server as its only voter (if the data directory is empty).
    Init,
    /// Join the cluster that the server at `address` belongs to, enrolling with the cluster's
    /// join token (if the data directory is empty).
    Join {
        /// Any member's address.
        address: String,
        /// The cluster's join token.
        token: String,
    },
    /// Restart from the data directory, which must hold a Raft state.
    Restart,
    /// Wait (with an empty data directory) until a Manager adds this server to a cluster
    /// through the API, showing this token (`{"op":"invite"}`); then join it.
    Await,
}

/// A server waiting to be added: the token an invitation must carry, and who it is.
#[derive(Debug)]
pub struct Awaiting {
    /// The token, as the operator read it on this server (DATA/join-token).
    pub token: InviteToken,
    me: ServerRecord,
    peers: Arc<Peers>,
    timeout: Duration,
    invited: Arc<std::sync::atomic::AtomicBool>,
}

impl Awaiting {
    /// Answers an invitation into the cluster at `cluster` carrying `token`: if the token is
    /// this server's and no invitation came before, enrolls there with `cluster_token` and
    /// joins, in the background.
    pub fn invite(
        &self,
        token: &str,
        cluster: &str,
        cluster_token: &str,
    ) -> Result<u64, crate::state_machine::Refusal> {
        use crate::state_machine::Refusal;
        let token = InviteToken::parse(token).map_err(|e| Refusal::forbidden(e.to_string()))?;
        if !self.token.matches(&token) {
            return Err(Refusal::forbidden("wrong join token"));
        }
        let cluster_token =
            ClusterToken::parse(cluster_token).map_err(|e| Refusal::conflict(e.to_string()))?;
        if self.invited.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(Refusal::conflict("already joining a cluster"));
        }
        let (cluster, mut me, timeout) = (cluster.to_string(), self.me.clone(), self.timeout);
        let (peers, invited) = (Arc::clone(&self.peers), Arc::clone(&self.invited));
        tracing::info!(server = me.id, via = %cluster, "invited into a cluster: joining");
        std::thread::Builder::new()
            .name("join".into())
            .spawn(move || match enroll(&peers, &cluster, &cluster_token, &mut me, timeout) {
                Ok(()) => join(&peers, &cluster, &me, timeout),
                Err(e) => {
                    tracing::error!(server = me.id, error = %e, "not joining; waiting for another invitation");
                    invited.store(false, std::sync::atomic::Ordering::SeqCst);
                }
            })
            .map_err(|e| crate::state_machine::Refusal::conflict(e.to_string()))?;
        Ok(self.me.id)
    }
}

/// Gets this server's certificate from the cluster at `addr` with the cluster's join `token`
/// (retrying while the cluster cannot be reached); records its fingerprint in `me`. Answers
/// why not if the cluster refused (a wrong token, an id taken): retrying cannot change that.
fn enroll(
    peers: &Peers,
    addr: &str,
    token: &ClusterToken,
    me: &mut ServerRecord,
    timeout: Duration,
) -> Result<(), String> {
    let req = Request::Enroll {
        id: me.id,
        token: token.to_string(),
    };
    let connector = Connector::enrolling(token.ca);
    let r = loop {
        match api::call_with(&connector, addr, &req, timeout) {
            Ok(r) => break r,
            Err(e) => {
                tracing::warn!(server = me.id, via = addr, error = %e, "cannot reach the cluster to enroll; retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    };
    let refused = |what: String| format!("enrolling with the cluster at {addr}: {what}");
    let enrollment = match (r.ok, r.result) {
        (true, Some(v)) => serde_json::from_value::<Enrollment>(v)
            .map_err(|e| refused(format!("a bad answer: {e}")))?,
        _ => return Err(refused(r.error.unwrap_or_else(|| "refused".into()))),
    };
    peers
        .dir()
        .install(&enrollment)
        .and_then(|()| peers.become_member())
        .map_err(|e| refused(e.to_string()))?;
    me.cert = peers.fingerprint().unwrap_or_default();
    tracing::info!(server = me.id, via = addr, cert = %me.cert, "enrolled: this server holds a certificate of the cluster");
    Ok(())
}

/// The join token of a waiting server with data directory `data`: made on first use with its
/// self-signed certificate, kept in `DATA/join-token` (owner-only) for the operator to read.
pub fn join_token(data: &std::path::Path) -> Result<InviteToken, enspeed_trust::Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let token = TrustDir::of(data).pending()?;
    let path = data.join("join-token");
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{token}\n").as_bytes()));
    written.map_err(|source| enspeed_trust::Error::File { path, source })?;
    Ok(token)
}

/// Everything `enspeed server` is told.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Raft id and timing.
    pub node: NodeConfig,
    /// Data directory (the RocksDB database lives in `raft/` under it).
    pub data_dir: PathBuf,
    /// host:port for servers and clients; also the address this server is known by.
    pub listen: String,
    /// Init, join or restart.
    pub bootstrap: Bootstrap,
    /// Join as a witness: it votes and runs no VMs.
    pub witness: bool,
    /// What this server offers to VMs.
    pub capacity: Capacity,
    /// The node agent (blockd, VMMs); none on a witness.
    pub agent: Option<AgentConfig>,
    /// The failure detector's timings (used while this server leads).
    pub failover: FailoverTiming,
    /// More services this server runs beside the Raft node (the web orchestrator), started
    /// once the node runs.
    pub services: Vec<Service>,
}

/// What a service started by `run` gets: the node and how to reach the other servers.
#[derive(Clone)]
pub struct ServiceContext {
    /// This server's Raft id.
    pub id: u64,
    /// The Raft node.
    pub node: NodeHandle,
    /// The other servers' addresses.
    pub book: AddressBook,
    /// How long a request may wait for the leader.
    pub timeout: Duration,
    /// The server's data directory.
    pub data_dir: PathBuf,
}

/// A service `run` starts; an error stops the server from starting.
#[derive(Clone)]
pub struct Service(pub Arc<dyn Fn(ServiceContext) -> std::io::Result<()> + Send + Sync>);

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Service")
    }
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The data directory cannot be created.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Restarting from an empty data directory.
    #[error(
        "{0} holds no Raft state: start the first server with --init, the others with --join ADDR"
    )]
    Empty(PathBuf),
    /// The listen address cannot be bound.
    #[error("listen on {address}: {source}")]
    Listen {
        /// The address.
        address: String,
        /// Why.
        source: std::io::Error,
    },
    /// Storage failed.
    #[error("{0}")]
    Storage(#[from] crate::storage::Error),
    /// The node failed.
    #[error("{0}")]
    Node(#[from] crate::node::Error),
    /// A thread (agent, failure detector) cannot start.
    #[error("starting a thread: {0}")]
    Thread(std::io::Error),
    /// The server's certificates cannot be made or read.
    #[error("certificates: {0}")]
    Trust(#[from] enspeed_trust::Error),
    /// The data directory holds a Raft state but no certificate to reach the others with.
    #[error("{0} holds no server certificate: this server cannot reach its cluster")]
    NoCertificate(PathBuf),
    /// The cluster refused to enroll this server.
    #[error("{0}")]
    Enroll(String),
    /// The join token given is not a cluster token.
    #[error("--token: {0}")]
    Token(enspeed_trust::Error),
}

/// Runs the server until its node stops (on a storage failure).
pub fn run(cfg: ServerConfig) -> Result<(), Error> {
    let id = cfg.node.id;
    std::fs::create_dir_all(&cfg.data_dir).map_err(|source| Error::DataDir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    let mut store = RaftStore::open(&cfg.data_dir.join("raft"))?;
    let me = ServerRecord {
        id,
        address: cfg.listen.clone(),
        witness: cfg.witness,
        capacity: cfg.capacity.clone(),
        mirror: cfg
            .agent
            .as_ref()
            .map(|a| a.blockd_listen.clone())
            .unwrap_or_default(),
        down: false,
        draining: false,
        cert: String::new(),
    };
    let mut me = me;
    let trust = TrustDir::of(&cfg.data_dir);
    let must_join = match (&cfg.bootstrap, store.is_initialized()) {
        (_, true) if !trust.is_member() => return Err(Error::NoCertificate(trust.0.clone())),
        (_, true) => None,
        (Bootstrap::Init, false) => {
            if !trust.is_member() {
                trust.create_cluster(id)?;
            }
            me.cert = enspeed_trust::Identity::load(&trust)?.fingerprint.hex();
            store.bootstrap(id, &StateMachine::initial_records(&me))?;
            tracing::info!(server = id, "new cluster");
            None
        }
        (Bootstrap::Join { address, token }, false) => Some((
            address.clone(),
            ClusterToken::parse(token).map_err(Error::Token)?,
        )),
        (Bootstrap::Restart, false) => return Err(Error::Empty(store.path().to_path_buf())),
        (Bootstrap::Await, false) => None,
    };
    // A member, or a server that has yet to become one.
    let peers = if trust.is_member() {
        Peers::member(&cfg.data_dir)?
    } else {
        Peers::waiting(&cfg.data_dir)?
    };
    let awaiting = match (&cfg.bootstrap, store.is_initialized()) {
        (Bootstrap::Await, false) if !peers.is_member() => {
            let token = join_token(&cfg.data_dir)?;
            tracing::info!(
                server = id,
                listen = %cfg.listen,
                token = %token,
                "waiting to be added to a cluster: a Manager adds this address with this token (DATA/join-token)"
            );
            Some(Arc::new(Awaiting {
                token,
                me: me.clone(),
                peers: Arc::clone(&peers),
                timeout: cfg.node.request_timeout,
                invited: Default::default(),
            }))
        }
        _ => None,
    };
    let listener = TcpListener::bind(&cfg.listen).map_err(|source| Error::Listen {
        address: cfg.listen.clone(),
        source,
    })?;

    let book: AddressBook = Arc::new(RwLock::new(HashMap::new()));
    let (tx, rx) = channel();
    let transport = Transport::new(
        id,
        cfg.listen.clone(),
        Arc::clone(&book),
        Arc::clone(&peers),
        tx.clone(),
    );
    let (node, handle) = Node::new(
        cfg.node.clone(),
        store,
        Arc::clone(&transport),
        Arc::clone(&book),
        (tx, rx),
        &raft_log::logger(),
    )?;
    let node_thread = std::thread::Builder::new()
        .name("raft".into())
        .spawn(move || node.run())
        .expect("spawn raft thread");

    let timeout = cfg.node.request_timeout;
    {
        let handle = handle.clone();
        let book = Arc::clone(&book);
        let local = api::Local {
            id,
            agent_dir: cfg
                .agent
                .as_ref()
                .filter(|_| !cfg.witness)
                .map(|a| a.dir.clone()),
            // Every server keeps the uploads it takes (a witness too, for the others to copy).
            library_dir: Some(crate::library::dir(&cfg.data_dir)),
            awaiting,
        };
        std::thread::Builder::new()
            .name("accept".into())
            .spawn(move || accept(listener, transport, handle, book, local, timeout))
            .expect("spawn accept thread");
    }
    failover::start(cfg.failover, handle.clone(), Arc::clone(&book)).map_err(Error::Thread)?;
    if let Some(a) = cfg.agent.clone().filter(|_| !cfg.witness) {
        agent::start(a, handle.clone(), Arc::clone(&book)).map_err(Error::Thread)?;
    } else {
        // No agent to keep the library here: still delete the images deleted from it (this
        // server may have taken their uploads).
        // A linearizable read: this server's own applied state may lag a commit it just made.
        let (node, book, dir) = (
            handle.clone(),
            Arc::clone(&book),
            crate::library::dir(&cfg.data_dir),
        );
        std::thread::Builder::new()
            .name("library-clean".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(5));
                let read_at = std::time::SystemTime::now();
                if let Some(state) = api::read_state(&node, &book, timeout) {
                    crate::library::delete_unlisted(&state, read_at, &dir);
                }
            })
            .map_err(Error::Thread)?;
    }
    for service in cfg.services {
        (service.0)(ServiceContext {
            id,
            node: handle.clone(),
            book: Arc::clone(&book),
            timeout,
            data_dir: cfg.data_dir.clone(),
        })
        .map_err(Error::Thread)?;
    }
    tracing::info!(server = id, listen = %cfg.listen, "server up");

    if let Some((addr, token)) = must_join {
        if !peers.is_member() {
            enroll(&peers, &addr, &token, &mut me, timeout).map_err(Error::Enroll)?;
        } else {
            me.cert = peers.fingerprint().unwrap_or_default();
        }
        join(&peers, &addr, &me, timeout);
    }
    drop(handle);
    node_thread.join().expect("raft thread panicked")?;
    Ok(())
}

/// Asks the cluster at `addr` to add this server, until it answers yes.
fn join(peers: &Peers, addr: &str, me: &ServerRecord, timeout: Duration) {
    let req = Request::AddServer { server: me.clone() };
    loop {
        match api::call(peers, addr, &req, timeout) {
            Ok(r) if r.ok => {
                tracing::info!(server = me.id, via = addr, "joined the cluster");
                return;
            }
            Ok(r) => tracing::warn!(
                server = me.id,
                via = addr,
                error = r.error.unwrap_or_default(),
                "join refused; retrying"
            ),
            Err(e) => {
                tracing::warn!(server = me.id, via = addr, error = %e, "join failed; retrying")
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Refused connections, logged a kind at a time.
static REFUSALS: std::sync::LazyLock<crate::peers::RefusalLog> =
    std::sync::LazyLock::new(Default::default);

/// The most connections the cluster port serves at once (each has a thread); more are closed
/// at once. Servers keep a few each (Raft, forwarded requests, consoles, copies).
pub const MAX_CONNECTIONS: usize = 1024;

fn accept(
    listener: TcpListener,
    transport: Arc<Transport>,
    node: NodeHandle,
    book: AddressBook,
    local: api::Local,
    timeout: Duration,
) {
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        use std::sync::atomic::Ordering::SeqCst;
        if open.fetch_add(1, SeqCst) >= MAX_CONNECTIONS {
            open.fetch_sub(1, SeqCst);
            tracing::warn!(peer = ?stream.peer_addr().ok(), max = MAX_CONNECTIONS, "connection refused: too many open");
            continue;
        }
        let (transport, node, book) = (Arc::clone(&transport), node.clone(), Arc::clone(&book));
        let (local, count) = (local.clone(), Arc::clone(&open));
        let spawned = std::thread::Builder::new()
            .name("conn".into())
            .spawn(move || {
                serve(stream, &transport, &node, &book, &local, timeout);
                count.fetch_sub(1, SeqCst);
            });
        if let Err(e) = spawned {
            open.fetch_sub(1, SeqCst);
            tracing::warn!(error = %e, "cannot start a connection thread");
        }
    }
}

/// Completes the TLS handshake, then tells a client (`{`) from a peer (the transport's
/// preface) by the first byte.
fn serve(
    stream: TcpStream,
    transport: &Transport,
    node: &NodeHandle,
    book: &AddressBook,
    local: &api::Local,
    timeout: Duration,
) {
    let (stream, peer) = match node.peers().accept(stream) {
        Ok(s) => s,
        Err(e) => {
            REFUSALS.log(&e);
            return;
        }
    };
    let mut r = std::io::BufReader::with_capacity(64 << 10, stream);
    let first = match r.fill_buf() {
        Ok([first, ..]) => *first,
        _ => return,
    };
    match peer {
        _ if first == b'{' => api::serve_client(r, peer, node, book, local, timeout),
        Peer::Server { id, .. } if first == crate::livemove::PREFACE[0] => {
            crate::livemove::serve_target(
                r,
                id,
                local.id,
                node,
                book,
                local.agent_dir.as_deref(),
                timeout,
            )
        }
        Peer::Server { id, .. } => transport.serve_peer(r, id),
        Peer::Anonymous | Peer::Waiting => {
            tracing::warn!("refused a Raft connection from a client without a certificate")
        }
    }
}
