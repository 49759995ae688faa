//! The Raft node: one thread owns the raft-rs `RawNode`, its RocksDB storage and the state
//! machine, and handles everything through one channel of `Event`s.
//!
//! Each `Ready` is handled in the order raft-rs requires (see `RawNode::ready`):
//!
//! ```text
//!   leader's messages ──> send at once (they do not depend on our own log)
//!   snapshot          ──> install atomically (records, log base, applied, conf state), fsync
//!   entries + hard state ──> one WriteBatch, fsync when raft says must_sync
//!   persisted messages ──> send (votes and acks: only now are they true)
//!   committed entries ──> apply: records + applied index (+ conf state) in one WriteBatch,
//!                         then answer the waiting proposals
//!   advance ──> LightReady: commit index written, messages sent, committed entries applied
//!   read states ──> answer each read once applied >= its read index
//! ```

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::prelude::{ConfChange, ConfChangeType, ConfChangeV2, Entry, EntryType, Message};
use raft::{RawNode, SnapshotStatus, StateRole};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::state_machine::{Command, Outcome, Query, RecordChange, ServerRecord, StateMachine};
use crate::storage::{RaftStore, RecordWrite};
use crate::transport::{AddressBook, Transport};

/// Raft timing and log compaction.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This server's Raft id.
    pub id: u64,
    /// One Raft tick.
    pub tick: Duration,
    /// Ticks after its leader fell silent before a server votes for another (its own
    /// election timeout is drawn from `election_range`).
    pub election_ticks: usize,
    /// Ticks between the leader's heartbeats.
    pub heartbeat_ticks: usize,
    /// Compact the log every this many applied entries; servers further behind get a snapshot.
    pub snapshot_every: u64,
    /// How long a request waits to be applied.
    pub request_timeout: Duration,
    /// A witness (a voter that runs no VMs) stands for election only once a VM server would
    /// have (see `election_range`), so that the VM server that survives a leader of three
    /// stands alone instead of splitting the vote with the witness.
    pub witness: bool,
}

impl NodeConfig {
    /// How long before a leader's election, in the usual case, every server's last heartbeat
    /// answered by an earlier leader was sent: such an answer needed a quorum of that
    /// leader's followers to have heard from it after the heartbeat was sent, a quorum voted
    /// for the new leader, and a follower (raft-rs with `check_quorum`) ignores votes until it
    /// has not heard from its leader for `election_ticks` ticks: at least that many, less two
    /// (a late tick runs right before the next), tick intervals. Not a bound: the old leader
    /// itself, stepped down by a newer term, votes at once; so do a voter that restarted and
    /// every voter of a handed-over leadership. There the gap can be one round trip, and the
    /// lease's margin over the fence timeout must cover this much besides the fencing itself
    /// (`enspeed server` checks it).
    pub fn vote_quiet(&self) -> Duration {
        self.tick * (self.election_ticks.saturating_sub(2) as u32)
    }

    /// Where the leases a leadership won at `won` gives every server start.
    pub fn lease_start(&self, won: Instant) -> Instant {
        won.checked_sub(self.vote_quiet()).unwrap_or(won)
    }

    /// The ticks an election timeout is randomized in: [n + 1, 2n) for a VM server, [2n, 3n)
    /// for a witness (n: `election_ticks`).
    ///
    /// Not raft-rs's [n, 2n): its voters (with `check_quorum`) ignore a vote request until
    /// `election_ticks` have passed since they heard their leader, and a server that stood
    /// right then, on a clock a tick ahead of a voter's, was ignored and stood again only a
    /// whole timeout later. Meanwhile another survivor stood too, and the two split the vote:
    /// each round another 0.3 to 0.6 s. In the test host (QEMU's emulated CPU, where a vote
    /// took up to 0.5 s) the VM server that survived its leader fenced itself after two such
    /// rounds (2026-12-08). A tick later, a vote request finds its voters out of their
    /// leader's lease; the witness, standing after every VM server's latest draw, finds the
    /// election over. (A first version, [n + 2, 2n + 2) and [2n + 2, 3n + 2), made a leader's
    /// death 0.2 s slower to replace than raft-rs's ranges; this one, 0.05 s: BENCHMARKS.md.)
    pub fn election_range(&self) -> (usize, usize) {
        let n = self.election_ticks;
        if self.witness {
            (2 * n, 3 * n)
        } else {
            (n + 1, 2 * n)
        }
    }

    /// Defaults: 50 ms ticks, elections 0.35 to 0.6 s after the leader fell silent (a witness:
    /// 0.6 to 0.9 s), heartbeats every 50 ms. An election must end well within the node
    /// agents' fence timeout, or every server fences itself while a dead leader is replaced
    /// (see `agent`).
    pub fn new(id: u64) -> NodeConfig {
        NodeConfig {
            id,
            tick: Duration::from_millis(50),
            election_ticks: 6,
            heartbeat_ticks: 1,
            snapshot_every: 1000,
            request_timeout: Duration::from_secs(5),
            witness: false,
        }
    }
}

/// Why a request did not complete.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "error", rename_all = "snake_case")]
pub enum NodeError {
    /// Only the leader proposes and serves linearizable reads.
    #[error("server is not the leader (leader: {leader:?})")]
    NotLeader {
        /// The leader this server knows of.
        leader: Option<u64>,
    },
    /// Not applied in time: it may still take effect.
    #[error("timed out before the request was applied; it may still take effect")]
    Timeout,
    /// The leader stepped down with the request in flight: it may or may not take effect.
    #[error("leadership changed before the request was applied; it may or may not take effect")]
    LeadershipLost,
    /// Raft or the membership rules refused it.
    #[error("refused: {reason}")]
    Refused {
        /// Why.
        reason: String,
    },
    /// The node's thread is gone.
    #[error("the raft node has stopped")]
    Stopped,
    /// This server's store could not be read.
    #[error("the store: {0}")]
    Store(String),
}

/// One server's view of the group. `commit`, `applied` and `last_index` are what is on disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// This server.
    pub id: u64,
    /// Follower, PreCandidate, Candidate or Leader.
    pub role: String,
    /// The leader it knows of.
    pub leader: Option<u64>,
    /// Current term.
    pub term: u64,
    /// Commit index (hard state).
    pub commit: u64,
    /// Last applied index.
    pub applied: u64,
    /// Index of the last log entry.
    pub last_index: u64,
    /// Index of the first log entry kept (the log before it was compacted into the state).
    pub first_index: u64,
    /// Voters, as of the applied index.
    pub voters: Vec<u64>,
    /// Whether this server was removed from the group.
    pub removed: bool,
    /// How long after its leader fell silent this server stands for election, as last drawn
    /// (randomized at every election and change of leader; a witness's comes later, see
    /// `NodeConfig::witness`).
    #[serde(default)]
    pub election_timeout_ms: u64,
}

/// Everything the node thread reacts to.
pub enum Event {
    /// A message from a peer.
    Raft(Box<Message>),
    /// Propose a command; answered once applied.
    Propose(Command, Sender<Result<Outcome, NodeError>>),
    /// Add a voter; answered once the conf change is applied.
    AddServer(ServerRecord, Sender<Result<Outcome, NodeError>>),
    /// Remove a voter; answered once the conf change is applied.
    RemoveServer(u64, Sender<Result<Outcome, NodeError>>),
    /// Read the state: linearizable (ReadIndex on the leader) or, when `local`, this server's
    /// applied state as it is.
    Read {
        query: Query,
        local: bool,
        reply: Sender<Result<Value, NodeError>>,
    },
    /// A server's node agent says it is alive, holding the state of revision `known`;
    /// answered like a linearizable read of the whole state, so the answer also proves this
    /// leader still had a quorum after it arrived.
    Heartbeat {
        server: u64,
        known: Option<u64>,
        reply: Sender<Result<HeartbeatRead, NodeError>>,
    },
    /// What the failure detector needs, if this server leads.
    LeaderView(Sender<Option<LeaderView>>),
    /// Report the status.
    Status(Sender<Status>),
    /// Share the applied state as it is now, with its applied index.
    Snapshot(Sender<(u64, Arc<StateMachine>)>),
    /// Messages to this peer were lost.
    Unreachable(u64),
    /// A snapshot message was written to the peer's connection, or lost.
    SnapshotSent { to: u64, ok: bool },
}

/// The leader's view for failure detection: since when it leads, when it last heard each
/// server's heartbeat (in this leadership), and its applied state.
#[derive(Clone, Debug)]
pub struct LeaderView {
    /// Where the lease this leadership gives every server starts: when this server became the
    /// leader (or rather: first saw it had), less [`NodeConfig::vote_quiet`].
    pub since: Instant,
    /// The last heartbeat received from each server since then.
    pub heard: HashMap<u64, Instant>,
    /// The applied state, shared.
    pub state: Arc<StateMachine>,
}

/// What a heartbeat reads: the state at `revision` (the index it was applied to), and where
/// the heartbeat's known revision is recent enough, the batches of records changed since.
pub struct HeartbeatRead {
    /// The index the state was applied to.
    pub revision: u64,
    /// The state, shared.
    pub state: Arc<StateMachine>,
    /// The batches applied between the known revision and `revision`, in order; none when
    /// that revision is older than the changes kept.
    batches: Option<Vec<Arc<Vec<RecordChange>>>>,
}

impl HeartbeatRead {
    /// The records changed between the known revision and `revision`, the last value of
    /// each; none when they are not kept, or too many changed for them to be worth sending.
    pub fn changes(&self) -> Option<Vec<RecordChange>> {
        let mut last: std::collections::BTreeMap<&str, &Option<String>> = Default::default();
        for batch in self.batches.as_ref()? {
            for c in batch.iter() {
                last.insert(&c.key, &c.value);
            }
            if last.len() > CHANGES_AT_MOST {
                return None;
            }
        }
        Some(
            last.into_iter()
                .map(|(key, value)| RecordChange {
                    key: key.to_string(),
                    value: value.clone(),
                })
                .collect(),
        )
    }
}

/// Changes of applied batches kept for heartbeats at most.
const HISTORY_CHANGES: usize = 16 * 1024;
/// Changes answered to one heartbeat at most: past it the whole state is as cheap.
const CHANGES_AT_MOST: usize = 4 * 1024;

/// A normal entry's data.
#[derive(Serialize, Deserialize)]
struct Proposal {
    /// The server that proposed it: only it has someone waiting.
    origin: u64,
    /// Its request id there.
    request: u64,
    command: Command,
}

/// A conf change entry's context.
#[derive(Serialize, Deserialize)]
struct ConfContext {
    origin: u64,
    request: u64,
    /// The record of a server being added.
    server: Option<ServerRecord>,
}

struct Waiter<T> {
    reply: Sender<Result<T, NodeError>>,
    deadline: Instant,
}

struct PendingRead {
    reply: ReadReply,
    /// Known once the leader confirmed it still leads (ReadState).
    index: Option<u64>,
}

/// Who waits for a read, and for what.
enum ReadReply {
    /// A query's answer.
    Query(Query, Waiter<Value>),
    /// The whole state, shared, with the index it was applied to and the changes since the
    /// revision known (a heartbeat).
    State(Option<u64>, Waiter<HeartbeatRead>),
}

impl PendingRead {
    fn new(reply: ReadReply) -> PendingRead {
        PendingRead { reply, index: None }
    }

    fn deadline(&self) -> Instant {
        match &self.reply {
            ReadReply::Query(_, w) => w.deadline,
            ReadReply::State(_, w) => w.deadline,
        }
    }

    fn fail(self, e: NodeError) {
        match self.reply {
            ReadReply::Query(_, w) => drop(w.reply.send(Err(e))),
            ReadReply::State(_, w) => drop(w.reply.send(Err(e))),
        }
    }
}

/// A handle to the node thread, cheap to clone.
#[derive(Clone)]
pub struct NodeHandle {
    tx: Sender<Event>,
    timeout: Duration,
    peers: Arc<crate::peers::Peers>,
}

impl NodeHandle {
    /// This server's certificates, for connections to the other servers.
    pub fn peers(&self) -> &Arc<crate::peers::Peers> {
        &self.peers
    }

    fn call<T>(
        &self,
        make: impl FnOnce(Sender<Result<T, NodeError>>) -> Event,
    ) -> Result<T, NodeError> {
        let (tx, rx) = channel();
        self.tx.send(make(tx)).map_err(|_| NodeError::Stopped)?;
        match rx.recv_timeout(self.timeout + Duration::from_millis(100)) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(NodeError::Timeout),
            Err(RecvTimeoutError::Disconnected) => Err(NodeError::Stopped),
        }
    }

    /// Proposes a command (leader only); returns its outcome once applied.
    pub fn propose(&self, command: Command) -> Result<Outcome, NodeError> {
        self.call(|tx| Event::Propose(command, tx))
    }

    /// Adds a voter (leader only); returns once the change is applied.
    pub fn add_server(&self, server: ServerRecord) -> Result<Outcome, NodeError> {
        self.call(|tx| Event::AddServer(server, tx))
    }

    /// Removes a voter (leader only); returns once the change is applied.
    pub fn remove_server(&self, id: u64) -> Result<Outcome, NodeError> {
        self.call(|tx| Event::RemoveServer(id, tx))
    }

    /// Reads the state: linearizable (leader only) or, with `local`, this server's as it is.
    pub fn read(&self, query: Query, local: bool) -> Result<Value, NodeError> {
        self.call(|reply| Event::Read {
            query,
            local,
            reply,
        })
    }

    /// Sends server `server`'s heartbeat (leader only), its agent holding the state of
    /// revision `known`; answers the state, linearizably, and the changes since `known`.
    pub fn heartbeat(&self, server: u64, known: Option<u64>) -> Result<HeartbeatRead, NodeError> {
        self.call(|reply| Event::Heartbeat {
            server,
            known,
            reply,
        })
    }

    /// The failure detector's view, if this server leads and has committed in its term.
    pub fn leader_view(&self) -> Result<Option<LeaderView>, NodeError> {
        let (tx, rx) = channel();
        self.tx
            .send(Event::LeaderView(tx))
            .map_err(|_| NodeError::Stopped)?;
        rx.recv_timeout(self.timeout)
            .map_err(|_| NodeError::Stopped)
    }

    /// This server's applied state as it is now (maybe behind the leader's), and the index it
    /// was applied to. Cheap: shared until the next entry is applied.
    pub fn snapshot(&self) -> Result<(u64, Arc<StateMachine>), NodeError> {
        let (tx, rx) = channel();
        self.tx
            .send(Event::Snapshot(tx))
            .map_err(|_| NodeError::Stopped)?;
        rx.recv_timeout(self.timeout)
            .map_err(|_| NodeError::Stopped)
    }

    /// This server's status.
    pub fn status(&self) -> Result<Status, NodeError> {
        let (tx, rx) = channel();
        self.tx
            .send(Event::Status(tx))
            .map_err(|_| NodeError::Stopped)?;
        rx.recv_timeout(self.timeout)
            .map_err(|_| NodeError::Stopped)
    }
}

/// The node: run it on its own thread with `run`.
pub struct Node {
    cfg: NodeConfig,
    raw: RawNode<RaftStore>,
    sm: StateMachine,
    /// `sm` as last shared by `Event::Snapshot`; dropped whenever `sm` changes.
    shared: Option<Arc<StateMachine>>,
    /// What the latest batches of applied entries changed in the state heartbeats carry: the
    /// revision each batch ended at, and its changes (`remember`).
    history: std::collections::VecDeque<(u64, Arc<Vec<RecordChange>>)>,
    /// The revision before the oldest batch in `history`.
    history_base: u64,
    /// Changes held in `history`.
    history_len: usize,
    transport: Arc<Transport>,
    book: AddressBook,
    rx: Receiver<Event>,
    next_request: u64,
    proposals: HashMap<u64, Waiter<Outcome>>,
    /// Reads waiting for the leader to commit an entry of its term (raft-rs drops ReadIndex
    /// requests before that).
    reads_queued: Vec<(u64, PendingRead)>,
    reads: HashMap<u64, PendingRead>,
    role: StateRole,
    /// Where the lease this leadership gives every server starts: its election, less
    /// [`NodeConfig::vote_quiet`] (None while it does not lead).
    leading_since: Option<Instant>,
    /// Heartbeats heard in this leadership.
    heard: HashMap<u64, Instant>,
}

/// What went wrong starting or running the node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Storage failed: the node stops rather than go on with a state it cannot persist.
    #[error("storage: {0}")]
    Storage(#[from] crate::storage::Error),
    /// The stored state machine does not load.
    #[error("{0}")]
    Load(#[from] crate::state_machine::LoadError),
    /// raft-rs refused the configuration or the stored state.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
}

impl Node {
    /// Creates the node over `store`; `events` is the channel whose sender `handle` and the
    /// transport use.
    pub fn new(
        cfg: NodeConfig,
        store: RaftStore,
        transport: Arc<Transport>,
        book: AddressBook,
        events: (Sender<Event>, Receiver<Event>),
        logger: &slog::Logger,
    ) -> Result<(Node, NodeHandle), Error> {
        let sm = StateMachine::load(&store.records()?)?;
        let history_base = store.applied();
        let (min_election_tick, max_election_tick) = cfg.election_range();
        let raft_cfg = raft::Config {
            id: cfg.id,
            election_tick: cfg.election_ticks,
            min_election_tick,
            max_election_tick,
            heartbeat_tick: cfg.heartbeat_ticks,
            applied: store.applied(),
            pre_vote: true,
            check_quorum: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            ..Default::default()
        };
        raft_cfg.validate()?;
        let raw = RawNode::new(&raft_cfg, store, logger)?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let handle = NodeHandle {
            tx: events.0,
            timeout: cfg.request_timeout,
            peers: Arc::clone(transport.peers()),
        };
        let node = Node {
            cfg,
            raw,
            sm,
            shared: None,
            history: Default::default(),
            history_base,
            history_len: 0,
            transport,
            book,
            rx: events.1,
            next_request: seed,
            proposals: HashMap::new(),
            reads_queued: Vec::new(),
            reads: HashMap::new(),
            role: StateRole::Follower,
            leading_since: None,
            heard: HashMap::new(),
        };
        node.publish_addresses();
        Ok((node, handle))
    }

    /// Runs until every handle is dropped or storage fails.
    pub fn run(mut self) -> Result<(), Error> {
        let mut next_tick = Instant::now() + self.cfg.tick;
        loop {
            let now = Instant::now();
            match self
                .rx
                .recv_timeout(next_tick.saturating_duration_since(now))
            {
                Ok(ev) => {
                    self.handle(ev);
                    // Take whatever else is queued so one Ready (one fsync) covers it all.
                    for _ in 0..1024 {
                        match self.rx.try_recv() {
                            Ok(ev) => self.handle(ev),
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
            if Instant::now() >= next_tick {
                self.raw.tick();
                next_tick += self.cfg.tick;
                if next_tick < Instant::now() {
                    next_tick = Instant::now() + self.cfg.tick;
                }
                self.expire();
            }
            self.start_reads();
            self.on_ready()?;
        }
    }

    fn leader(&self) -> Option<u64> {
        Some(self.raw.raft.leader_id).filter(|&l| l != 0)
    }

    fn not_leader(&self) -> Option<NodeError> {
        (self.raw.raft.state != StateRole::Leader).then(|| NodeError::NotLeader {
            leader: self.leader(),
        })
    }

    fn waiter<T>(&self, reply: Sender<Result<T, NodeError>>) -> Waiter<T> {
        Waiter {
            reply,
            deadline: Instant::now() + self.cfg.request_timeout,
        }
    }

    /// Waits for proposal `request` to be applied, or answers at once that
    /// raft-rs refused it.
    fn track(
        &mut self,
        request: u64,
        reply: Sender<Result<Outcome, NodeError>>,
        proposed: raft::Result<()>,
    ) {
        match proposed {
            Ok(()) => {
                let w = self.waiter(reply);
                self.proposals.insert(request, w);
            }
            Err(e) => {
                let _ = reply.send(Err(NodeError::Refused {
                    reason: e.to_string(),
                }));
            }
        }
    }

    fn request_id(&mut self) -> u64 {
        self.next_request = self.next_request.wrapping_add(1);
        self.next_request
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Raft(m) => {
                if let Err(e) = self.raw.step(*m) {
                    tracing::debug!(error = %e, "raft message ignored");
                }
            }
            Event::Propose(command, reply) => {
                if let Some(e) = self.not_leader() {
                    let _ = reply.send(Err(e));
                    return;
                }
                let request = self.request_id();
                let data = serde_json::to_vec(&Proposal {
                    origin: self.cfg.id,
                    request,
                    command,
                })
                .expect("proposal serializes");
                let proposed = self.raw.propose(vec![], data);
                self.track(request, reply, proposed);
            }
            Event::AddServer(server, reply) => {
                let id = server.id;
                let member = self.raw.store().conf_state().voters.contains(&id);
                if member && self.sm.servers.get(&id) == Some(&server) {
                    let _ = reply.send(Ok(Ok(
                        json!({ "voters": self.raw.store().conf_state().voters }),
                    )));
                    return;
                }
                self.conf_change(ConfChangeType::AddNode, id, Some(server), reply);
            }
            Event::RemoveServer(id, reply) => {
                if !self.raw.store().conf_state().voters.contains(&id) {
                    let _ = reply.send(Err(NodeError::Refused {
                        reason: format!("server {id} is not a voter"),
                    }));
                    return;
                }
                if id == self.cfg.id && self.raw.raft.state == StateRole::Leader {
                    // A leader does not remove itself: it hands leadership to the most
                    // up-to-date follower, and the request is retried there.
                    let to = self
                        .raw
                        .raft
                        .prs()
                        .iter()
                        .filter(|(&p, _)| p != id)
                        .max_by_key(|(_, pr)| pr.matched)
                        .map(|(&p, _)| p);
                    if let Some(to) = to {
                        tracing::info!(to, "handing leadership over before removing this server");
                        self.raw.transfer_leader(to);
                    }
                    let _ = reply.send(Err(NodeError::NotLeader { leader: None }));
                    return;
                }
                self.conf_change(ConfChangeType::RemoveNode, id, None, reply);
            }
            Event::Read {
                query,
                local,
                reply,
            } => {
                if local {
                    let _ = reply.send(self.answer(&query));
                    return;
                }
                if let Some(e) = self.not_leader() {
                    let _ = reply.send(Err(e));
                    return;
                }
                let id = self.request_id();
                let read = PendingRead::new(ReadReply::Query(query, self.waiter(reply)));
                self.reads_queued.push((id, read));
            }
            Event::Heartbeat {
                server,
                known,
                reply,
            } => {
                if let Some(e) = self.not_leader() {
                    let _ = reply.send(Err(e));
                    return;
                }
                self.heard.insert(server, Instant::now());
                let id = self.request_id();
                let read = PendingRead::new(ReadReply::State(known, self.waiter(reply)));
                self.reads_queued.push((id, read));
            }
            Event::LeaderView(reply) => {
                let view = self
                    .leading_since
                    .filter(|_| {
                        self.raw.raft.state == StateRole::Leader
                            && self.raw.raft.commit_to_current_term()
                    })
                    .map(|since| LeaderView {
                        since,
                        heard: self.heard.clone(),
                        state: self.share(),
                    });
                let _ = reply.send(view);
            }
            Event::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Event::Snapshot(reply) => {
                let _ = reply.send((self.raw.store().applied(), self.share()));
            }
            Event::Unreachable(id) => self.raw.report_unreachable(id),
            Event::SnapshotSent { to, ok } => {
                let status = if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw.report_snapshot(to, status);
            }
        }
    }

    fn conf_change(
        &mut self,
        kind: ConfChangeType,
        id: u64,
        server: Option<ServerRecord>,
        reply: Sender<Result<Outcome, NodeError>>,
    ) {
        if let Some(e) = self.not_leader() {
            let _ = reply.send(Err(e));
            return;
        }
        if self.raw.raft.has_pending_conf() {
            let _ = reply.send(Err(NodeError::Refused {
                reason: "another membership change is in progress".into(),
            }));
            return;
        }
        let request = self.request_id();
        let mut cc = ConfChange::default();
        cc.set_change_type(kind);
        cc.node_id = id;
        let ctx = serde_json::to_vec(&ConfContext {
            origin: self.cfg.id,
            request,
            server,
        })
        .expect("context serializes");
        let proposed = self.raw.propose_conf_change(ctx, cc);
        self.track(request, reply, proposed);
    }

    fn status(&self) -> Status {
        let store = self.raw.store();
        let cs = store.conf_state();
        let mut voters = cs.voters.clone();
        voters.sort_unstable();
        let id = self.cfg.id;
        Status {
            id,
            role: format!("{:?}", self.raw.raft.state),
            leader: self.leader(),
            term: self.raw.raft.term,
            commit: store.hard_state().commit,
            applied: store.applied(),
            last_index: store.last(),
            first_index: store.log_base() + 1,
            removed: !voters.is_empty() && !voters.contains(&id) && !cs.learners.contains(&id),
            voters,
            election_timeout_ms: (self.cfg.tick
                * self.raw.raft.randomized_election_timeout() as u32)
                .as_millis() as u64,
        }
    }

    /// Issues ReadIndex for queued reads once this leader has committed in its term.
    fn start_reads(&mut self) {
        if self.reads_queued.is_empty()
            || self.raw.raft.state != StateRole::Leader
            || !self.raw.raft.commit_to_current_term()
        {
            return;
        }
        for (id, read) in std::mem::take(&mut self.reads_queued) {
            self.raw.read_index(id.to_be_bytes().to_vec());
            self.reads.insert(id, read);
        }
    }

    fn expire(&mut self) {
        let now = Instant::now();
        self.proposals.retain(|_, w| w.deadline > now);
        self.reads.retain(|_, r| r.deadline() > now);
        self.reads_queued.retain(|(_, r)| r.deadline() > now);
    }

    fn send(&self, msgs: Vec<Message>) {
        for m in msgs {
            self.transport.send(m);
        }
    }

    /// Publishes the committed servers' addresses to the transport, and their certificates
    /// (and the revoked ones) to the roster.
    fn publish_addresses(&self) {
        let mut book = self.book.write().expect("address book lock");
        for s in self.sm.servers.values() {
            book.insert(s.id, s.address.clone());
        }
        self.transport.peers().publish(&self.sm);
    }

    fn on_ready(&mut self) -> Result<(), Error> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut rd = self.raw.ready();
        if let Some(ss) = rd.ss() {
            let was_leader = self.role == StateRole::Leader;
            self.role = ss.raft_state;
            if ss.raft_state == StateRole::Leader && !was_leader {
                // Every server gets a whole lease from here: a heartbeat an earlier leader
                // answered was sent at least `vote_quiet` before this leadership began.
                self.leading_since = Some(self.cfg.lease_start(Instant::now()));
                self.heard.clear();
            } else if ss.raft_state != StateRole::Leader {
                self.leading_since = None;
                self.heard.clear();
            }
            tracing::info!(role = ?ss.raft_state, leader = ss.leader_id, term = self.raw.raft.term, "raft role");
            if was_leader && ss.raft_state != StateRole::Leader {
                for (_, w) in self.proposals.drain() {
                    let _ = w.reply.send(Err(NodeError::LeadershipLost));
                }
                for (_, r) in self.reads.drain().chain(self.reads_queued.drain(..)) {
                    r.fail(NodeError::LeadershipLost);
                }
            }
        }
        self.send(rd.take_messages());
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            self.raw.mut_store().apply_snapshot(&snap)?;
            self.sm = StateMachine::load(&self.raw.store().records()?)?;
            self.shared = None;
            self.forget_changes(snap.get_metadata().index);
            self.publish_addresses();
            tracing::info!(
                index = snap.get_metadata().index,
                term = snap.get_metadata().term,
                "installed a snapshot"
            );
        }
        self.raw
            .mut_store()
            .append(rd.entries(), rd.hs(), rd.must_sync())?;
        self.send(rd.take_persisted_messages());
        for rs in rd.take_read_states() {
            let id = rs
                .request_ctx
                .as_slice()
                .try_into()
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            if let Some(r) = self.reads.get_mut(&id) {
                r.index = Some(rs.index);
            }
        }
        self.apply(rd.take_committed_entries())?;
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit)?;
        }
        self.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.serve_reads();
        self.maybe_compact()?;
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), Error> {
        let Some(last) = entries.last().map(|e| e.index) else {
            return Ok(());
        };
        let mut writes = Vec::new();
        let mut conf_state = None;
        let mut replies: Vec<(u64, Outcome)> = Vec::new();
        self.shared = None;
        for e in &entries {
            match e.get_entry_type() {
                EntryType::EntryNormal if e.data.is_empty() => {}
                EntryType::EntryNormal => match serde_json::from_slice::<Proposal>(&e.data) {
                    Ok(p) => {
                        let outcome = self.sm.apply(&p.command, &mut writes);
                        if p.origin == self.cfg.id {
                            replies.push((p.request, outcome));
                        }
                    }
                    Err(err) => {
                        tracing::error!(index = e.index, error = %err, "committed entry does not decode; skipped")
                    }
                },
                EntryType::EntryConfChange => {
                    let cc = match ConfChange::parse_from_bytes(&e.data) {
                        Ok(cc) => cc,
                        Err(err) => {
                            tracing::error!(index = e.index, error = %err, "committed conf change does not decode; skipped");
                            continue;
                        }
                    };
                    let ctx: Option<ConfContext> = serde_json::from_slice(&e.context).ok();
                    let cs = self.raw.apply_conf_change(&cc)?;
                    match cc.get_change_type() {
                        ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                            if let Some(s) = ctx.as_ref().and_then(|c| c.server.as_ref()) {
                                self.sm.add_server(s, &mut writes);
                                self.book
                                    .write()
                                    .expect("address book lock")
                                    .insert(s.id, s.address.clone());
                            }
                        }
                        ConfChangeType::RemoveNode => {
                            self.sm.remove_server(cc.node_id, &mut writes)
                        }
                    }
                    self.transport.peers().publish(&self.sm);
                    tracing::info!(change = ?cc.get_change_type(), server = cc.node_id, voters = ?cs.voters, "membership changed");
                    if let Some(c) = ctx.filter(|c| c.origin == self.cfg.id) {
                        replies.push((c.request, Ok(json!({ "voters": cs.voters }))));
                    }
                    conf_state = Some(cs);
                }
                EntryType::EntryConfChangeV2 => match ConfChangeV2::parse_from_bytes(&e.data) {
                    Ok(cc) => conf_state = Some(self.raw.apply_conf_change(&cc)?),
                    Err(err) => {
                        tracing::error!(index = e.index, error = %err, "committed conf change does not decode; skipped")
                    }
                },
            }
        }
        self.raw
            .mut_store()
            .apply(&writes, last, conf_state.as_ref())?;
        self.remember(last, &writes);
        for (request, outcome) in replies {
            if let Some(w) = self.proposals.remove(&request) {
                let _ = w.reply.send(Ok(outcome));
            }
        }
        Ok(())
    }

    fn serve_reads(&mut self) {
        let applied = self.raw.store().applied();
        let ready: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| r.index.is_some_and(|i| i <= applied))
            .map(|(&id, _)| id)
            .collect();
        for id in ready {
            match self.reads.remove(&id).expect("listed").reply {
                ReadReply::Query(q, w) => drop(w.reply.send(self.answer(&q))),
                ReadReply::State(known, w) => {
                    let read = HeartbeatRead {
                        revision: applied,
                        state: self.share(),
                        batches: known.and_then(|k| self.changes_since(k, applied)),
                    };
                    drop(w.reply.send(Ok(read)))
                }
            }
        }
    }

    /// Keeps what a batch of entries applied up to `revision` changed in the state heartbeats
    /// carry, dropping the oldest batches past `HISTORY_CHANGES`.
    fn remember(&mut self, revision: u64, writes: &[RecordWrite]) {
        let mut changes = Vec::new();
        for write in writes {
            match RecordChange::of(write) {
                Ok(Some(c)) => changes.push(c),
                Ok(None) => {}
                Err(_) => return self.forget_changes(revision),
            }
        }
        // A batch that changed nothing shown (an election's empty entry, a login) adds nothing
        // a heartbeat needs.
        if changes.is_empty() {
            return;
        }
        self.history_len += changes.len();
        self.history.push_back((revision, Arc::new(changes)));
        while self.history_len > HISTORY_CHANGES {
            let Some((rev, dropped)) = self.history.pop_front() else {
                break;
            };
            self.history_len -= dropped.len();
            self.history_base = rev;
        }
    }

    /// Keeps no changes before `revision`: a heartbeat that knows an earlier one gets the
    /// whole state.
    fn forget_changes(&mut self, revision: u64) {
        self.history.clear();
        self.history_len = 0;
        self.history_base = revision;
    }

    /// The batches of changes applied after revision `known` up to `applied` (shared: merged
    /// by `HeartbeatRead::changes`, off this thread); none when those from `known` on are no
    /// longer kept.
    fn changes_since(&self, known: u64, applied: u64) -> Option<Vec<Arc<Vec<RecordChange>>>> {
        if known < self.history_base || known > applied {
            return None;
        }
        // A batch may end past `known` and begin before it: its changes from before `known`
        // are already in the state known, and setting them again leaves it the same.
        let from = self.history.partition_point(|(rev, _)| *rev <= known);
        Some(
            self.history
                .range(from..)
                .map(|(_, c)| Arc::clone(c))
                .collect(),
        )
    }

    /// The applied state as it is now, shared until the next entry changes it.
    fn share(&mut self) -> Arc<StateMachine> {
        self.shared
            .get_or_insert_with(|| Arc::new(self.sm.clone()))
            .clone()
    }

    /// The answer to a read: from the state, or for the audit archive, from the store.
    fn answer(&self, query: &Query) -> Result<Value, NodeError> {
        let Query::ArchivedAudit { after, limit } = query else {
            return Ok(self.sm.query(query));
        };
        let prefix = crate::state_machine::ARCHIVED_AUDIT_PREFIX;
        let start = format!("{prefix}{:020}", after.saturating_add(1));
        let records = self
            .raw
            .store()
            .state_range(
                prefix.as_bytes(),
                start.as_bytes(),
                (*limit).min(1000) as usize,
            )
            .map_err(|e| NodeError::Store(e.to_string()))?;
        let entries = records
            .iter()
            .map(|(_, v)| serde_json::from_slice::<Value>(v))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| NodeError::Store(format!("an archived audit entry: {e}")))?;
        Ok(Value::Array(entries))
    }

    fn maybe_compact(&mut self) -> Result<(), Error> {
        let store = self.raw.store();
        let applied = store.applied();
        if applied.saturating_sub(store.log_base()) < self.cfg.snapshot_every {
            return Ok(());
        }
        let from = store.log_base();
        self.raw.mut_store().compact(applied)?;
        tracing::info!(from, to = applied, "log compacted into the applied state");
        Ok(())
    }
}
