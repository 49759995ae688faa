//! The client protocol: one JSON object per line each way, on the server's listen address (a
//! connection whose first byte, after the TLS handshake, is `{`).
//!
//! Only servers speak it: a client is a server whose certificate the roster admits (the web
//! server, the node agent, `enspeed cluster` run on a server with its data directory), with
//! two exceptions for a client with no certificate: a server joining with the cluster token
//! (`enroll`), and, on a server waiting to be added, the server inviting it (`status`,
//! `invite`).
//!
//! ```text
//!   {"op":"status"}                                    this server's view
//!   {"op":"put","key":K,"value":V}                     sugar for propose put
//!   {"op":"get","key":K}                               linearizable read of one key
//!   {"op":"propose","command":{"cmd":...}}             any state machine command
//!   {"op":"read","query":{"query":"state"}}            linearizable read
//!   {"op":"read","query":...,"local":true}             this server's applied state, maybe stale
//!   {"op":"add_server","server":{"id":N,"address":A,"witness":false}}
//!   {"op":"remove_server","id":N}
//!   {"op":"heartbeat","server":N,"known":R}            a node agent's heartbeat: the state's
//!                                                      revision, and what changed since R,
//!                                                      or the whole state (`HeartbeatAnswer`)
//!   {"op":"console","vm":NAME,"console":"serial"|"vnc"}  then the VM's console bytes (see
//!                                                      `console`), on its primary server only
//!   {"op":"iso_file","sha256":HASH}                    then the ISO image's bytes (`library`)
//!   {"op":"invite","token":T,"cluster":ADDR,"cluster_token":C}
//!                                                      a server started with --await-join
//!                                                      joins the cluster at ADDR
//!   {"op":"enroll","id":N,"token":C}                   a joining server's certificate
//! answers
//!   {"ok":true,"result":...}   {"ok":false,"error":"..."}
//! ```
//!
//! Any server takes any request: what needs the leader is forwarded to it (one hop, retried
//! while an election runs, until the request timeout).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::time::{Duration, Instant};

use enspeed_trust::{Connector, Peer, TlsStream};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::console::{self, ConsoleKind};
use crate::node::{NodeError, NodeHandle};
use crate::peers::Peers;
use crate::state_machine::{Command, Query, ServerRecord};
use crate::transport::AddressBook;

/// The longest request line accepted.
const MAX_LINE: u64 = 1 << 20;
/// How long a client connection may wait between requests.
const CLIENT_IDLE: Duration = Duration::from_secs(300);

/// A client request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// This server's status.
    Status,
    /// Set a key.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Read a key, linearizably.
    Get {
        /// The key.
        key: String,
    },
    /// Apply a command.
    Propose {
        /// The command.
        command: Command,
    },
    /// Read the state.
    Read {
        /// What to read.
        query: Query,
        /// This server's applied state instead of a linearizable read.
        #[serde(default)]
        local: bool,
    },
    /// Add a voter.
    AddServer {
        /// The new server.
        server: ServerRecord,
    },
    /// Remove a voter.
    RemoveServer {
        /// Its id.
        id: u64,
    },
    /// A node agent's heartbeat; answers a `HeartbeatAnswer` (linearizable).
    Heartbeat {
        /// The server whose agent sends it.
        server: u64,
        /// The revision of the state the agent holds: the answer leaves the state out while
        /// it is still that one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        known: Option<u64>,
    },
    /// Asks a server waiting to be added (`enspeed server --await-join`) to join the cluster
    /// of the server at `cluster`; `token` must be the one it shows.
    Invite {
        /// Its join token.
        token: String,
        /// Any server of the cluster to join.
        cluster: String,
        /// The cluster's join token, to enroll with there.
        cluster_token: String,
    },
    /// A joining server asks for its certificate, showing the cluster's join token; answers an
    /// `enspeed_trust::Enrollment`.
    Enroll {
        /// The id it joins as.
        id: u64,
        /// The cluster's join token.
        token: String,
    },
    /// Answers one line with the size of the library's `shelf` file with `sha256`, then its
    /// bytes.
    LibraryFile {
        /// An ISO image or an appliance's disk image.
        shelf: crate::library::Shelf,
        /// The file's SHA-256.
        sha256: String,
    },
    /// Turns the connection into VM `vm`'s console, on the server its VMM runs on.
    Console {
        /// The VM's name.
        vm: String,
        /// Which console.
        console: ConsoleKind,
    },
}

impl Request {
    /// The server this request speaks for, where it names one: a server's heartbeat, and its
    /// agent's reports (registration, observations, ISO copies held).
    pub fn speaks_for(&self) -> Option<u64> {
        match self {
            Request::Heartbeat { server, .. } => Some(*server),
            Request::Propose { command } => match command {
                Command::Register { id, .. } | Command::Observe { id, .. } => Some(*id),
                Command::IsoHeld { server, .. } | Command::ApplianceHeld { server, .. } => {
                    Some(*server)
                }
                _ => None,
            },
            _ => None,
        }
    }
}

/// What a heartbeat answers: the state as the leader applied it when it answered, read
/// linearizably (so the answer also proves that leader still had a quorum after the heartbeat
/// arrived). With neither `state` nor `changes`, it is still the revision the heartbeat knew.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatAnswer {
    /// The state's revision: the Raft index it was applied to. The same revision is the same
    /// state on every server.
    pub revision: u64,
    /// The whole state, when the heartbeat knew no revision, or one older than the changes
    /// the leader keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<std::sync::Arc<crate::state_machine::StateMachine>>,
    /// The records changed since the revision the heartbeat knew: applied to that state, they
    /// make this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<Vec<crate::state_machine::RecordChange>>,
}

/// A request as sent on the wire: `forwarded` is set by the server that forwards it, so the
/// leader does not forward it again.
#[derive(Serialize, Deserialize)]
struct Envelope {
    #[serde(flatten)]
    request: Request,
    #[serde(default)]
    forwarded: bool,
}

impl Envelope {
    fn new(request: Request) -> Envelope {
        Envelope {
            request,
            forwarded: false,
        }
    }
}

/// An answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Whether it succeeded.
    pub ok: bool,
    /// The result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What kind of failure, where it has one: the state machine's refusal, or a server that
    /// is not the leader. Callers decide by this, never by the text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
}

/// What kind of failure an answer reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// The state machine refused it: the actor may not.
    Forbidden,
    /// The state machine refused it: what it names does not exist.
    NotFound,
    /// The state machine refused it: it does not fit the state.
    Conflict,
    /// The server is not the leader (forwarding goes on elsewhere).
    NotLeader,
}

impl Response {
    /// Success with `result`.
    pub fn ok(result: Value) -> Response {
        Response {
            ok: true,
            result: Some(result),
            error: None,
            failure: None,
        }
    }
    /// Failure, with why.
    pub fn err(error: impl ToString) -> Response {
        Response {
            ok: false,
            result: None,
            error: Some(error.to_string()),
            failure: None,
        }
    }
    fn failed(error: impl ToString, failure: Failure) -> Response {
        Response {
            failure: Some(failure),
            ..Response::err(error)
        }
    }
    fn refused(r: crate::state_machine::Refusal) -> Response {
        use crate::state_machine::RefusalKind;
        let failure = match r.kind {
            RefusalKind::Forbidden => Failure::Forbidden,
            RefusalKind::NotFound => Failure::NotFound,
            RefusalKind::Conflict => Failure::Conflict,
        };
        Response::failed(format!("rejected: {}", r.reason), failure)
    }
    fn node_error(e: NodeError) -> Response {
        match e {
            e @ NodeError::NotLeader { .. } => Response::failed(e, Failure::NotLeader),
            e => Response::err(e),
        }
    }
}

/// Writes `response` as one line on `w` (the answer before a stream: an ISO's bytes, a console).
pub fn answer_line(w: &mut impl Write, response: &Response) -> io::Result<()> {
    let mut line = serde_json::to_vec(response).expect("answers serialize");
    line.push(b'\n');
    w.write_all(&line)
}

/// Sends `request` (one that turns the connection into a stream: `LibraryFile`, `Console`), as
/// this member, to the server at `address`; its answer line, read byte by byte so that the
/// stream after it stays in the connection, and the connection. A refusal is an error.
pub fn open_stream(
    peers: &Peers,
    address: &str,
    request: &Request,
    timeout: Duration,
) -> io::Result<(TlsStream, Value)> {
    let mut s = peers.connect(address, timeout.min(Duration::from_secs(5)))?;
    s.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(&Envelope::new(request.clone())).expect("requests serialize");
    line.push(b'\n');
    s.write_all(&line)?;
    let answer = read_answer(&mut s)?;
    if !answer.ok {
        return Err(io::Error::other(
            answer.error.unwrap_or_else(|| "refused".into()),
        ));
    }
    Ok((s, answer.result.unwrap_or(Value::Null)))
}

/// Reads one answer line from `s`, byte by byte: what follows it is the stream.
pub fn read_answer(s: &mut impl Read) -> io::Result<Response> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        if line.len() as u64 > MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "answer line too long",
            ));
        }
        if s.read(&mut b)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        line.push(b[0]);
    }
    serde_json::from_slice(&line)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad answer: {e}")))
}

/// Sends one request, as this member, to the server at `address` and waits up to `timeout`
/// for its answer.
pub fn call(
    peers: &Peers,
    address: &str,
    request: &Request,
    timeout: Duration,
) -> io::Result<Response> {
    call_envelope(peers, address, &Envelope::new(request.clone()), timeout)
}

/// Sends one request to the server at `address` through `connector` (a joining server's, or
/// one that reaches a waiting server) and waits up to `timeout` for its answer.
pub fn call_with(
    connector: &Connector,
    address: &str,
    request: &Request,
    timeout: Duration,
) -> io::Result<Response> {
    let (s, _) = connector.connect(address, timeout.min(Duration::from_secs(2)))?;
    exchange(s, address, &Envelope::new(request.clone()), timeout).map(|(r, _)| r)
}

/// One request and its answer on a connection of the pool (kept for the next one after).
fn call_envelope(
    peers: &Peers,
    address: &str,
    env: &Envelope,
    timeout: Duration,
) -> io::Result<Response> {
    let (s, peer) = peers.take(address, timeout.min(Duration::from_secs(2)))?;
    let (answer, s) = exchange(s, address, env, timeout)?;
    if let Some(s) = s {
        peers.keep(address, s, peer);
    }
    Ok(answer)
}

/// A request that reached the other end's socket before the error: it may have been carried out.
#[derive(Debug)]
struct Sent(io::Error);

impl std::fmt::Display for Sent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sent, then {}", self.0)
    }
}

impl std::error::Error for Sent {}

/// Sends the request on a connection made; a failure from here on is [`Sent`]. Answers the
/// answer, and the connection when it may carry another request (its answer line read whole,
/// nothing after it).
fn exchange(
    mut s: TlsStream,
    address: &str,
    env: &Envelope,
    timeout: Duration,
) -> io::Result<(Response, Option<TlsStream>)> {
    let sent = |e: io::Error| io::Error::other(Sent(e));
    s.set_read_timeout(Some(timeout)).map_err(sent)?;
    let mut line = serde_json::to_vec(env).expect("request serializes");
    line.push(b'\n');
    s.write_all(&line).map_err(sent)?;
    let mut answer = String::new();
    let mut r = BufReader::new(s);
    (&mut r)
        .take(MAX_LINE)
        .read_line(&mut answer)
        .map_err(sent)?;
    let again = (answer.ends_with('\n') && r.buffer().is_empty()).then(|| r.into_inner());
    let answer = serde_json::from_str(&answer)
        .map_err(|e| sent(io::Error::other(format!("bad answer from {address}: {e}"))))?;
    Ok((answer, again))
}

/// What a server's client port needs beyond the node: who it is and where its VMMs live.
#[derive(Clone, Debug)]
pub struct Local {
    /// This server's id.
    pub id: u64,
    /// Its node agent's directory; none on a witness.
    pub agent_dir: Option<std::path::PathBuf>,
    /// Its ISO library's directory.
    pub library_dir: Option<std::path::PathBuf>,
    /// Set while it waits to be added to a cluster.
    pub awaiting: Option<std::sync::Arc<crate::server::Awaiting>>,
}

/// Serves one client connection from `peer`: a request per line, an answer per line, until it
/// closes; or, after a console or ISO request, that stream's bytes.
pub fn serve_client(
    mut r: BufReader<TlsStream>,
    peer: Peer,
    node: &NodeHandle,
    book: &AddressBook,
    local: &Local,
    timeout: Duration,
) {
    let Ok(mut w) = r.get_ref().try_clone() else {
        return;
    };
    // An idle client is let go; a stream (console, ISO) sets its own timeouts.
    let _ = r.get_ref().set_read_timeout(Some(CLIENT_IDLE));
    loop {
        let mut line = String::new();
        match (&mut r).take(MAX_LINE).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with('\n') {
            let _ = writeln!(
                w,
                "{}",
                json!({"ok": false, "error": "request line too long"})
            );
            return;
        }
        let env = match serde_json::from_str::<Envelope>(&line) {
            Ok(env) => env,
            Err(e) => {
                let answer = Response::err(format!("bad request: {e}"));
                if write_answer(&mut w, &answer).is_err() {
                    return;
                }
                continue;
            }
        };
        let answer = match (peer, env.request) {
            (Peer::Server { .. }, Request::Console { vm, console }) => {
                let agent_dir = local.agent_dir.as_deref();
                return console::serve(w, r, local.id, node, agent_dir, &vm, console);
            }
            (Peer::Server { .. }, Request::LibraryFile { shelf, sha256 }) => {
                return crate::library::serve_file(w, local.library_dir.as_deref(), shelf, &sha256)
            }
            (
                _,
                Request::Invite {
                    token,
                    cluster,
                    cluster_token,
                },
            ) => match &local.awaiting {
                None => Response::err(
                    "this server was not started to wait for a cluster (--await-join)",
                ),
                Some(a) => match a.invite(&token, &cluster, &cluster_token) {
                    Ok(id) => Response::ok(json!({ "joining": cluster, "id": id })),
                    Err(r) => Response::refused(r),
                },
            },
            (Peer::Anonymous, Request::Status) if local.awaiting.is_some() => {
                handle(Envelope::new(Request::Status), node, book, timeout)
            }
            (Peer::Anonymous, Request::Enroll { id, token }) => enroll(node, id, &token),
            (Peer::Anonymous | Peer::Waiting, request) => {
                let from = r
                    .get_ref()
                    .peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                tracing::info!(%from, "refused a request from a client without a certificate");
                drop(request);
                let _ = write_answer(
                    &mut w,
                    &Response::err(
                        "refused: a client without a cluster certificate may only enroll",
                    ),
                );
                return;
            }
            (Peer::Server { id, fingerprint }, Request::AddServer { mut server })
                if !env.forwarded =>
            {
                if server.id != id {
                    Response::err(format!(
                        "refused: server {id} may add only itself, not server {}",
                        server.id
                    ))
                } else {
                    server.cert = fingerprint.hex();
                    handle(
                        Envelope::new(Request::AddServer { server }),
                        node,
                        book,
                        timeout,
                    )
                }
            }
            // A server speaks for itself only (one that forwards checked it already).
            (Peer::Server { id, .. }, request)
                if !env.forwarded && request.speaks_for().is_some_and(|s| s != id) =>
            {
                Response::err(format!(
                    "refused: server {id} speaks for itself only, not for server {}",
                    request.speaks_for().unwrap_or_default()
                ))
            }
            (Peer::Server { .. }, request) => handle(
                Envelope {
                    request,
                    forwarded: env.forwarded,
                },
                node,
                book,
                timeout,
            ),
        };
        if write_answer(&mut w, &answer).is_err() {
            return;
        }
    }
}

fn write_answer(w: &mut impl Write, answer: &Response) -> io::Result<()> {
    let mut out = serde_json::to_vec(answer).expect("response serializes");
    out.push(b'\n');
    w.write_all(&out)
}

/// A joining server's certificate, if it shows the cluster's join token and its id is free.
fn enroll(node: &NodeHandle, id: u64, token: &str) -> Response {
    let peers = node.peers();
    let token = match enspeed_trust::ClusterToken::parse(token) {
        Ok(t) => t,
        Err(e) => return Response::err(e),
    };
    match peers.dir().admits(&token) {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(server = id, "refused an enrollment: wrong cluster token");
            return Response::err("refused: not this cluster's join token");
        }
        Err(e) => return Response::err(format!("this server cannot enroll servers: {e}")),
    }
    if id == 0 {
        return Response::err("server ids start at 1");
    }
    let state = node
        .read(Query::State, true)
        .ok()
        .and_then(|v| serde_json::from_value::<crate::state_machine::StateMachine>(v).ok());
    if let Some(s) = state.as_ref().and_then(|st| st.servers.get(&id)) {
        return Response::err(format!(
            "refused: server id {id} belongs to the member at {}",
            s.address
        ));
    }
    match peers.dir().enroll(id) {
        Ok(e) => {
            tracing::info!(server = id, "enrolled a joining server");
            Response::ok(serde_json::to_value(e).expect("enrollment serializes"))
        }
        Err(e) => Response::err(format!("issuing a certificate: {e}")),
    }
}

/// Carries out `request` in this process (the node agent's way in): here, or forwarded to the
/// leader, giving up after `timeout`.
pub fn request(
    request: Request,
    node: &NodeHandle,
    book: &AddressBook,
    timeout: Duration,
) -> Response {
    handle(
        Envelope {
            request,
            forwarded: false,
        },
        node,
        book,
        timeout,
    )
}

/// What became of a proposal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proposed {
    /// The cluster took it.
    Taken,
    /// The state machine refused it.
    Refused,
    /// Not known (no leader, or the leader changed before it answered).
    Unknown,
}

/// Proposes `command`, one of server `server`'s own (a task's progress, an observation),
/// through [`request`] with 2 s to wait; a failure is logged. What became of it.
pub fn propose(command: Command, server: u64, node: &NodeHandle, book: &AddressBook) -> Proposed {
    let what = format!("{command:?}");
    let r = request(
        Request::Propose { command },
        node,
        book,
        Duration::from_secs(2),
    );
    if r.ok {
        return Proposed::Taken;
    }
    tracing::warn!(server, command = %what.chars().take(120).collect::<String>(), error = ?r.error, "proposal failed");
    match r.failure {
        Some(Failure::Forbidden | Failure::NotFound | Failure::Conflict) => Proposed::Refused,
        Some(Failure::NotLeader) | None => Proposed::Unknown,
    }
}

/// The cluster's state, read linearizably through [`request`]; none when no quorum answered
/// in `timeout`.
pub fn read_state(
    node: &NodeHandle,
    book: &AddressBook,
    timeout: Duration,
) -> Option<crate::state_machine::StateMachine> {
    let read = Request::Read {
        query: Query::State,
        local: false,
    };
    let r = request(read, node, book, timeout);
    r.result
        .filter(|_| r.ok)
        .and_then(|v| serde_json::from_value(v).ok())
}

/// Answers a request here, or forwards it to the leader; retries while there is none.
fn handle(env: Envelope, node: &NodeHandle, book: &AddressBook, timeout: Duration) -> Response {
    let deadline = Instant::now() + timeout;
    loop {
        let local = match &env.request {
            Request::Status => {
                return match node.status() {
                    Ok(s) => Response::ok(serde_json::to_value(s).expect("status serializes")),
                    Err(e) => Response::err(e),
                }
            }
            Request::Put { key, value } => node
                .propose(Command::Put {
                    key: key.clone(),
                    value: value.clone(),
                })
                .map(outcome),
            Request::Get { key } => node
                .read(Query::Get { key: key.clone() }, false)
                .map(Response::ok),
            Request::Propose { command } => node.propose(command.clone()).map(outcome),
            Request::Read { query, local } => node.read(query.clone(), *local).map(Response::ok),
            Request::AddServer { server } => node.add_server(server.clone()).map(outcome),
            Request::RemoveServer { id } => node.remove_server(*id).map(outcome),
            Request::Heartbeat { server, known } => node.heartbeat(*server, *known).map(|read| {
                let (state, changes) = if *known == Some(read.revision) {
                    (None, None)
                } else {
                    match read.changes() {
                        Some(changes) => (None, Some(changes)),
                        None => (Some(read.state), None),
                    }
                };
                let answer = HeartbeatAnswer {
                    revision: read.revision,
                    state,
                    changes,
                };
                Response::ok(serde_json::to_value(answer).expect("a state serializes"))
            }),
            Request::Console { .. } | Request::LibraryFile { .. } => {
                return Response::err("a stream is asked for as the first line of a connection")
            }
            Request::Invite { .. } => {
                return Response::err("an invitation goes to the invited server itself")
            }
            Request::Enroll { .. } => {
                return Response::err("a server enrolls on a connection without a certificate")
            }
        };
        let leader = match local {
            Ok(r) => return r,
            // The server that forwarded it knows better where to go next.
            Err(e @ NodeError::NotLeader { .. }) if env.forwarded => {
                return Response::node_error(e)
            }
            Err(NodeError::NotLeader { leader }) => leader,
            Err(e) => return Response::node_error(e),
        };
        if let Some(leader) = leader {
            let address = book
                .read()
                .expect("address book lock")
                .get(&leader)
                .cloned();
            if let Some(address) = address {
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(100));
                let fwd = Envelope {
                    request: env.request.clone(),
                    forwarded: true,
                };
                match call_envelope(node.peers(), &address, &fwd, left) {
                    // The leader stepped down meanwhile: look again.
                    Ok(r) if r.failure == Some(Failure::NotLeader) => {}
                    Ok(r) => return r,
                    // Sent and unanswered: the leader may have committed it. Forwarding it
                    // again could apply it twice (a put over a later write, a compare-and-set
                    // that succeeds twice); the client learns the outcome is unknown instead.
                    Err(e) if e.get_ref().is_some_and(|e| e.is::<Sent>()) => {
                        return Response::err(format!(
                            "outcome unknown: forwarded to leader {leader} at {address}, no answer: {e}"
                        ))
                    }
                    Err(e) => {
                        tracing::debug!(leader, error = %e, "forwarding to the leader failed")
                    }
                }
            }
        }
        if Instant::now() >= deadline {
            return Response::node_error(NodeError::NotLeader { leader });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn outcome(o: crate::state_machine::Outcome) -> Response {
    match o {
        Ok(v) => Response::ok(v),
        Err(r) => Response::refused(r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_json_lines() {
        let reqs = [
            Request::Status,
            Request::Put {
                key: "k".into(),
                value: "v".into(),
            },
            Request::Get { key: "k".into() },
            Request::Read {
                query: Query::State,
                local: true,
            },
            Request::AddServer {
                server: ServerRecord {
                    id: 4,
                    address: "127.0.0.1:1".into(),
                    witness: true,
                    capacity: Default::default(),
                    mirror: String::new(),
                    down: false,
                    draining: false,
                    cert: String::new(),
                },
            },
            Request::RemoveServer { id: 4 },
            Request::Propose {
                command: Command::Delete { key: "k".into() },
            },
        ];
        for r in reqs {
            let env = Envelope {
                request: r.clone(),
                forwarded: true,
            };
            let s = serde_json::to_string(&env).unwrap();
            assert!(!s.contains('\n'));
            let back: Envelope = serde_json::from_str(&s).unwrap();
            assert_eq!(back.request, r);
            assert!(back.forwarded);
        }
        let plain: Envelope = serde_json::from_str(r#"{"op":"get","key":"a"}"#).unwrap();
        assert!(!plain.forwarded);
        assert!(serde_json::from_str::<Envelope>(r#"{"op":"format_disks"}"#).is_err());
        assert!(serde_json::from_str::<Envelope>(r#"{"op":"put","key":"a"}"#).is_err());
    }
}
