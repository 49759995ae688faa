//! The command lines of `enspeed server` and `enspeed cluster`, kept beside what they drive so
//! the binary only dispatches.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::agent::{AgentConfig, AgentTiming};
use crate::api::{self, Request};
use crate::failover::FailoverTiming;
use crate::node::NodeConfig;
use crate::server::{self, Bootstrap, ServerConfig};
use crate::state_machine::{Capacity, Command, Pool, Query};

/// What a lease must keep, beyond the fence timeout and a new leader's quiet, for the server to
/// have fenced itself: the watchdog's period (20 ms), killing every VMM and blockd, and a
/// scheduling stall.
const FENCING_TAKES: Duration = Duration::from_millis(250);

/// `enspeed server`.
#[derive(Args, Debug)]
pub struct ServerArgs {
    /// Raft id of this server, unique in the cluster, above 0.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    id: u64,
    /// Data directory.
    #[arg(long)]
    data: PathBuf,
    /// host:port for other servers and clients; also the address this server is known by.
    #[arg(long)]
    listen: String,
    /// Start a new cluster with this server as its only voter (ignored once DATA holds a state).
    #[arg(long, conflicts_with = "join")]
    init: bool,
    /// Join the cluster of the server at this address (ignored once DATA holds a state), with
    /// the cluster's join token (--token).
    #[arg(long, value_name = "ADDR", requires = "token")]
    join: Option<String>,
    /// The cluster's join token, for --join: any member's DATA/tls/cluster-token.
    #[arg(
        long,
        env = "ENSPEED_CLUSTER_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// Wait to be added to a cluster by a Manager (VM Servers, Add server: this server's
    /// address and the token in DATA/join-token, also in the log); ignored once DATA holds a
    /// state.
    #[arg(long, conflicts_with_all = ["init", "join"])]
    await_join: bool,
    /// Join as a witness: a voter that runs no VMs.
    #[arg(long)]
    witness: bool,
    /// Memory offered to VMs, MiB.
    #[arg(long, default_value_t = 0)]
    memory_mib: u64,
    /// Disk space offered to VMs, GiB.
    #[arg(long, default_value_t = 0)]
    disk_gib: u64,
    /// vCPUs offered to VMs.
    #[arg(long, default_value_t = 0)]
    vcpus: u32,
    /// Raft tick, milliseconds.
    #[arg(long, default_value_t = 50)]
    tick_ms: u64,
    /// Ticks after its leader fell silent before a server votes for another. A VM server
    /// stands for election N + 1 to 2N ticks after, a witness 2N to 3N (see
    /// `NodeConfig::election_range`). Short, so that two election rounds (a split vote after a
    /// leader's death) fit inside the fence timeout.
    #[arg(long, default_value_t = 6)]
    election_ticks: usize,
    /// Ticks between heartbeats.
    #[arg(long, default_value_t = 1)]
    heartbeat_ticks: usize,
    /// Compact the log every this many applied entries.
    #[arg(long, default_value_t = 1000)]
    snapshot_every: u64,
    /// How long a request may wait to be applied, milliseconds.
    #[arg(long, default_value_t = 5000)]
    request_timeout_ms: u64,
    /// A storage pool for disk copies, PATH=GiB (e.g. /vms1=500); repeat for more. Without
    /// one, --disk-gib is one pool.
    #[arg(long = "pool", value_parser = parse_pool)]
    pools: Vec<Pool>,
    /// This server's blockd mirror address (default: the listen host, port + 100).
    #[arg(long, value_name = "ADDR")]
    blockd_listen: Option<String>,
    /// blockd's data directory (default: DATA/disks).
    #[arg(long)]
    blockd_dir: Option<PathBuf>,
    /// blockd declares a mirror link down after this long without traffic, milliseconds.
    #[arg(long, default_value_t = 1000)]
    link_timeout_ms: u64,
    /// The leader declares a server down after this long without its heartbeat, milliseconds.
    #[arg(long, default_value_t = 2500)]
    lease_ms: u64,
    /// A server without a quorum answer this long fences itself (kills its VMMs and blockd),
    /// milliseconds; default 70% of the lease. Must be below the lease (the margin covers
    /// killing them) and above the longest election (a witness's latest: 3 x election
    /// ticks), or a leader's death fences every server.
    #[arg(long)]
    fence_ms: Option<u64>,
    /// Between a node agent's heartbeats, milliseconds.
    #[arg(long, default_value_t = 100)]
    heartbeat_ms: u64,
    /// Run no node agent (no blockd, no VMMs): a control-plane-only server.
    #[arg(long)]
    no_agent: bool,
    /// A VM powered off gracefully is stopped hard if its guest has not shut down after this
    /// many seconds.
    #[arg(long, default_value_t = 60)]
    shutdown_timeout_secs: u64,
}

fn parse_pool(s: &str) -> Result<Pool, String> {
    let (path, gib) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not PATH=GiB"))?;
    let disk_gib = gib
        .parse()
        .map_err(|_| format!("{gib:?} is not a number of GiB"))?;
    Ok(Pool {
        path: path.to_string(),
        disk_gib,
    })
}

/// The listen address's host with the port plus 100.
fn default_blockd_listen(listen: &str) -> String {
    match listen.rsplit_once(':') {
        Some((host, port)) => match port.parse::<u16>() {
            Ok(p) => format!("{host}:{}", p.wrapping_add(100)),
            Err(_) => format!("{host}:7400"),
        },
        None => format!("{listen}:7400"),
    }
}

/// Runs `enspeed server`.
pub fn server(a: ServerArgs) -> ExitCode {
    server_with(a, Vec::new())
}

/// `enspeed server` with more services beside the Raft node (the web orchestrator).
pub fn server_with(a: ServerArgs, services: Vec<crate::server::Service>) -> ExitCode {
    let mut node = NodeConfig::new(a.id);
    node.tick = Duration::from_millis(a.tick_ms.max(1));
    node.election_ticks = a.election_ticks;
    node.heartbeat_ticks = a.heartbeat_ticks;
    node.witness = a.witness;
    node.snapshot_every = a.snapshot_every.max(1);
    node.request_timeout = Duration::from_millis(a.request_timeout_ms);
    let bootstrap = match (a.init, a.join, a.await_join) {
        (true, _, _) => Bootstrap::Init,
        (false, Some(address), _) => Bootstrap::Join {
            address,
            token: a.token.unwrap_or_default(),
        },
        (false, None, true) => Bootstrap::Await,
        (false, None, false) => Bootstrap::Restart,
    };
    let capacity = if a.witness {
        Capacity::default()
    } else {
        Capacity {
            memory_mib: a.memory_mib,
            disk_gib: a.disk_gib,
            vcpus: a.vcpus,
            pools: a.pools,
        }
    };
    let lease = Duration::from_millis(a.lease_ms.max(1));
    let mut timing = AgentTiming::for_lease(lease);
    timing.heartbeat = Duration::from_millis(a.heartbeat_ms.max(1));
    timing.shutdown_timeout = Duration::from_secs(a.shutdown_timeout_secs.max(1));
    if let Some(f) = a.fence_ms {
        timing.fence_timeout = Duration::from_millis(f);
    }
    // The longest election: one the witness stands in, at its latest (whatever this server
    // is, the servers that fence are the VM servers).
    let witness = NodeConfig {
        witness: true,
        ..node.clone()
    };
    let longest_election = node.tick * (witness.election_range().1 as u32);
    if timing.fence_timeout <= longest_election + timing.heartbeat {
        eprintln!(
            "enspeed server {}: warning: the fence timeout ({:?}) is not above the longest election ({longest_election:?}) plus a heartbeat: a leader's death may fence every server",
            a.id, timing.fence_timeout
        );
    }
    // A new leader counts every lease from `vote_quiet` before its election (see `node`), which
    // is not a bound: the lease's margin over the fence timeout covers that, the watchdog's
    // period and the time killing the VMMs takes.
    if timing.fence_timeout + node.vote_quiet() + FENCING_TAKES > lease {
        eprintln!(
            "enspeed server {}: --lease-ms must be at least --fence-ms plus {} ms (the quiet a new leader's election counts on, from --tick-ms and --election-ticks) plus {} ms (to fence)",
            a.id,
            node.vote_quiet().as_millis(),
            FENCING_TAKES.as_millis()
        );
        return ExitCode::FAILURE;
    }
    let binary = match std::env::current_exe() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("enspeed server {}: cannot find its own binary: {e}", a.id);
            return ExitCode::FAILURE;
        }
    };
    let agent = (!a.witness && !a.no_agent).then(|| AgentConfig {
        id: a.id,
        dir: a.data.join("agent"),
        library_dir: crate::library::dir(&a.data),
        blockd_dir: a.blockd_dir.clone().unwrap_or_else(|| a.data.join("disks")),
        blockd_listen: a
            .blockd_listen
            .clone()
            .unwrap_or_else(|| default_blockd_listen(&a.listen)),
        link_timeout: Duration::from_millis(a.link_timeout_ms),
        tls_dir: a.data.join("tls"),
        binary,
        capacity: capacity.clone(),
        timing,
    });
    let cfg = ServerConfig {
        node,
        data_dir: a.data,
        listen: a.listen,
        bootstrap,
        witness: a.witness,
        capacity,
        agent,
        failover: FailoverTiming {
            lease,
            ..FailoverTiming::default()
        },
        services,
    };
    match server::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("enspeed server {}: {e}", a.id);
            ExitCode::FAILURE
        }
    }
}

/// `enspeed cluster`: run on a server, as that server (its certificate, from its data
/// directory).
#[derive(Args, Debug)]
pub struct ClusterArgs {
    /// Any server of the cluster.
    #[arg(long, default_value = "127.0.0.1:7400")]
    server: String,
    /// The data directory of the server this runs on: its certificate is the one presented.
    #[arg(long, default_value = "/var/lib/enspeed")]
    data: PathBuf,
    /// How long to wait for an answer, milliseconds.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    #[command(subcommand)]
    op: ClusterOp,
}

#[derive(Subcommand, Debug)]
enum ClusterOp {
    /// This server's view: id, role, leader, term, commit, applied, last index, voters.
    Status,
    /// Set a key.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Read a key (linearizable).
    Get {
        /// The key.
        key: String,
    },
    /// Print every record (linearizable, or with --local this server's applied state).
    State {
        /// This server's applied state, without asking the leader.
        #[arg(long)]
        local: bool,
    },
    /// Apply a state machine command given as JSON, e.g. '{"cmd":"delete","key":"k"}'.
    Propose {
        /// The command.
        command: String,
    },
    /// Remove a voter.
    RemoveServer {
        /// Its Raft id.
        id: u64,
    },
}

/// Runs `enspeed cluster`: prints the result as JSON; exits 1 if refused.
pub fn cluster(a: ClusterArgs) -> ExitCode {
    let request = match a.op {
        ClusterOp::Status => Request::Status,
        ClusterOp::Put { key, value } => Request::Put { key, value },
        ClusterOp::Get { key } => Request::Get { key },
        ClusterOp::State { local } => Request::Read {
            query: Query::State,
            local,
        },
        ClusterOp::Propose { command } => match serde_json::from_str::<Command>(&command) {
            Ok(command) => Request::Propose { command },
            Err(e) => {
                eprintln!("enspeed cluster: not a command: {e}");
                return ExitCode::FAILURE;
            }
        },
        ClusterOp::RemoveServer { id } => Request::RemoveServer { id },
    };
    let peers = match crate::peers::Peers::member(&a.data) {
        Ok(p) => p,
        Err(e) => {
            eprintln!(
                "enspeed cluster: this server's certificate (--data {}): {e}",
                a.data.display()
            );
            return ExitCode::FAILURE;
        }
    };
    match api::call(
        &peers,
        &a.server,
        &request,
        Duration::from_millis(a.timeout_ms),
    ) {
        Ok(r) if r.ok => {
            let result = r.result.unwrap_or_default();
            println!(
                "{}",
                serde_json::to_string_pretty(&result).expect("JSON prints")
            );
            ExitCode::SUCCESS
        }
        Ok(r) => {
            eprintln!("enspeed cluster: {}", r.error.unwrap_or_default());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("enspeed cluster: {}: {e}", a.server);
            ExitCode::FAILURE
        }
    }
}
