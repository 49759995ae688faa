//! `enspeed server`: one Raft member per physical server. One listen address serves both the
//! other servers (Raft messages, see `transport`) and clients (JSON lines, see `api`), told
//! apart by the first byte of a connection.
//!
//! A cluster starts with one server run with `--init`; every other server is started with
//! `--join ADDR` (any member), asks the leader to add it as a voter, and catches up from the
//! leader's log or a snapshot. Membership and addresses then live in the committed state, so a
//! restart needs neither flag (they are ignored once the data directory holds a Raft state).

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::mpsc::channel;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::agent::{self, AgentConfig};
use crate::api::{self, Request};
use crate::failover::{self, FailoverTiming};
use crate::node::{Node, NodeConfig, NodeHandle};
use crate::raft_log;
use crate::state_machine::{Capacity, ServerRecord, StateMachine};
use crate::storage::RaftStore;
use crate::transport::{AddressBook, Transport};

/// How a server comes up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bootstrap {
    /// Start a new cluster with this server as its only voter (if the data directory is empty).
    Init,
    /// Join the cluster that the server at this address belongs to (if the data directory is
    /// empty).
    Join(String),
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
    pub token: String,
    me: ServerRecord,
    timeout: Duration,
    invited: std::sync::atomic::AtomicBool,
}

impl Awaiting {
    /// Answers an invitation into the cluster at `cluster` carrying `token`: joins it in the
    /// background if the token is this server's and no invitation came before.
    pub fn invite(&self, token: &str, cluster: &str) -> Result<u64, String> {
        let same = token.len() == self.token.len()
            && token
                .bytes()
                .zip(self.token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if !same {
            return Err("wrong join token".into());
        }
        if self.invited.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err("already joining a cluster".into());
        }
        let (cluster, me, timeout) = (cluster.to_string(), self.me.clone(), self.timeout);
        tracing::info!(server = me.id, via = %cluster, "invited into a cluster: joining");
        std::thread::Builder::new()
            .name("join".into())
            .spawn(move || join(&cluster, &me, timeout))
            .map_err(|e| e.to_string())?;
        Ok(self.me.id)
    }
}

/// The join token of the server with data directory `data`: made on first use, kept in
/// `DATA/join-token` (owner-only).
pub fn join_token(data: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read;
    let path = data.join("join-token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        if !t.trim().is_empty() {
            return Ok(t.trim().to_string());
        }
    }
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    std::io::Write::write_all(&mut f, format!("{token}\n").as_bytes())?;
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
    };
    let must_join = match (&cfg.bootstrap, store.is_initialized()) {
        (_, true) => None,
        (Bootstrap::Init, false) => {
            store.bootstrap(id, &StateMachine::initial_records(&me))?;
            tracing::info!(server = id, "new cluster");
            None
        }
        (Bootstrap::Join(addr), false) => Some(addr.clone()),
        (Bootstrap::Restart, false) => return Err(Error::Empty(store.path().to_path_buf())),
        (Bootstrap::Await, false) => None,
    };
    let awaiting = match (&cfg.bootstrap, store.is_initialized()) {
        (Bootstrap::Await, false) => {
            let token = join_token(&cfg.data_dir).map_err(|source| Error::DataDir {
                path: cfg.data_dir.join("join-token"),
                source,
            })?;
            tracing::info!(
                server = id,
                listen = %cfg.listen,
                token = %token,
                "waiting to be added to a cluster: a Manager adds this address with this token (DATA/join-token)"
            );
            Some(Arc::new(Awaiting {
                token,
                me: me.clone(),
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
    let transport = Transport::new(id, cfg.listen.clone(), Arc::clone(&book), tx.clone());
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
                let read = Request::Read {
                    query: crate::state_machine::Query::State,
                    local: false,
                };
                let r = api::request(read, &node, &book, timeout);
                let state = r
                    .result
                    .filter(|_| r.ok)
                    .and_then(|v| serde_json::from_value::<StateMachine>(v).ok());
                if let Some(state) = state {
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

    if let Some(addr) = must_join {
        join(&addr, &me, timeout);
    }
    drop(handle);
    node_thread.join().expect("raft thread panicked")?;
    Ok(())
}

/// Asks the cluster at `addr` to add this server, until it answers yes.
fn join(addr: &str, me: &ServerRecord, timeout: Duration) {
    let req = Request::AddServer { server: me.clone() };
    loop {
        match api::call(addr, &req, timeout) {
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

fn accept(
    listener: TcpListener,
    transport: Arc<Transport>,
    node: NodeHandle,
    book: AddressBook,
    local: api::Local,
    timeout: Duration,
) {
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let (transport, node, book) = (Arc::clone(&transport), node.clone(), Arc::clone(&book));
        let local = local.clone();
        let spawned = std::thread::Builder::new()
            .name("conn".into())
            .spawn(move || serve(stream, &transport, &node, &book, &local, timeout));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a connection thread");
        }
    }
}

/// Tells a client (`{`) from a peer (the transport's preface) by the first byte.
fn serve(
    stream: TcpStream,
    transport: &Transport,
    node: &NodeHandle,
    book: &AddressBook,
    local: &api::Local,
    timeout: Duration,
) {
    let mut first = [0u8; 1];
    match stream.peek(&mut first) {
        Ok(1) if first[0] == b'{' => api::serve_client(stream, node, book, local, timeout),
        Ok(1) => transport.serve_peer(stream),
        _ => {}
    }
}
