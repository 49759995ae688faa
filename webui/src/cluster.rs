//! The Raft node as the API uses it. Changes are proposed as `Command::Act` of the logged-in
//! user, through this server (forwarded to the leader). Reads use this server's applied state;
//! after a change made here, they wait until this server has applied it, so a client always
//! sees its own writes, whichever server it talks to.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use control::api::{self, Failure, Request};
use control::server::ServiceContext;
use control::state_machine::{Action, Command, StateMachine};
use enspeed_trust::{Connector, InviteToken};
use hyper::StatusCode;
use serde_json::Value;

use crate::http::ApiError;

/// The node, from the API's side.
pub struct Cluster {
    ctx: ServiceContext,
    /// The highest audit seq of a change made through this server: reads wait for it.
    written: AtomicU64,
}

/// Proposes this server's own commands, from a blocking thread.
#[derive(Clone)]
pub struct Proposer {
    /// This server's Raft id.
    pub id: u64,
    node: control::node::NodeHandle,
    book: control::transport::AddressBook,
}

impl Proposer {
    /// Proposes `command` (through the leader); whether the cluster took it.
    pub fn propose(&self, command: Command) -> bool {
        self.propose_outcome(command) == api::Proposed::Taken
    }

    /// Proposes `command` (through the leader); what became of it.
    pub fn propose_outcome(&self, command: Command) -> api::Proposed {
        api::propose(command, self.id, &self.node, &self.book)
    }

    /// Task `id` as this server has applied it.
    pub fn task(&self, id: u64) -> Option<control::state_machine::TaskRecord> {
        let (_, sm) = self.node.snapshot().ok()?;
        sm.tasks.get(&id).cloned()
    }
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Cluster {
    /// Wraps the node of `ctx`.
    pub fn new(ctx: ServiceContext) -> Cluster {
        Cluster {
            ctx,
            written: AtomicU64::new(0),
        }
    }

    /// This server's Raft id.
    pub fn id(&self) -> u64 {
        self.ctx.id
    }

    /// This server's ISO library directory.
    pub fn library_dir(&self) -> std::path::PathBuf {
        control::library::dir(&self.ctx.data_dir)
    }

    /// Proposes `action` as user `actor`; answers its result. A refusal by the state machine
    /// becomes 403 (not allowed), 404 (no such thing) or 409 (does not fit the state).
    pub async fn act(&self, actor: u64, action: Action) -> Result<Value, ApiError> {
        let command = Command::Act {
            actor,
            at_ms: now_ms(),
            action,
        };
        let r = self.request(Request::Propose { command }).await?;
        if r.ok {
            let v = r.result.unwrap_or(Value::Null);
            if let Some(seq) = v.get("audit").and_then(Value::as_u64) {
                self.written.fetch_max(seq, Ordering::SeqCst);
            }
            return Ok(v);
        }
        let e = r.error.unwrap_or_default();
        let reason = e.strip_prefix("rejected: ").unwrap_or(&e);
        Err(match r.failure {
            Some(Failure::Forbidden) => ApiError::forbidden(reason),
            Some(Failure::NotFound) => ApiError::not_found(reason),
            Some(Failure::Conflict) => ApiError::new(StatusCode::CONFLICT, reason),
            Some(Failure::NotLeader) | None => {
                ApiError::unavailable(format!("the cluster cannot take it now: {e}"))
            }
        })
    }

    /// What proposes this server's own commands (a task's progress and end) from a blocking
    /// thread.
    pub fn proposer(&self) -> Proposer {
        Proposer {
            id: self.ctx.id,
            node: self.ctx.node.clone(),
            book: Arc::clone(&self.ctx.book),
        }
    }

    /// This server's certificates, for connections to the other servers.
    pub fn peers(&self) -> Arc<control::peers::Peers> {
        Arc::clone(self.ctx.node.peers())
    }

    /// Carries out `request` through this server (forwarded to the leader), off the async
    /// threads: it may wait for an election.
    async fn request(&self, request: Request) -> Result<api::Response, ApiError> {
        let (node, book, timeout) = (
            self.ctx.node.clone(),
            Arc::clone(&self.ctx.book),
            self.ctx.timeout,
        );
        tokio::task::spawn_blocking(move || api::request(request, &node, &book, timeout))
            .await
            .map_err(|e| ApiError::unavailable(format!("the request's thread: {e}")))
    }

    /// What a new server joins this cluster with (`enspeed server --join ADDRESS --token TOKEN`,
    /// or the installer's `join` and `token`): this server's cluster address and the cluster's
    /// join token.
    pub async fn join_info(&self) -> Result<(String, String), ApiError> {
        let token = self.ctx.node.peers().dir().cluster_token().map_err(|e| {
            ApiError::unavailable(format!("this server cannot enroll servers: {e}"))
        })?;
        let address = self
            .state()
            .await?
            .servers
            .get(&self.ctx.id)
            .map(|s| s.address.clone())
            .ok_or_else(|| ApiError::unavailable("this server is not in the cluster's state"))?;
        Ok((address, token.to_string()))
    }

    /// Adds the server at `address`, started with `--await-join` and showing `token`, to this
    /// cluster: checks who it is, invites it, and waits until the cluster has it. Answers its id.
    pub async fn add_server(&self, address: &str, token: &str) -> Result<u64, ApiError> {
        let invite = InviteToken::parse(token).map_err(|e| ApiError::bad_request(e.to_string()))?;
        // What the invited server joins with: this server's address and the cluster's token.
        let (me, cluster_token) = self.join_info().await?;
        // Only the server whose certificate the token names is spoken to.
        let connector = Connector::to_waiting(invite.server);
        let call = |request: Request| {
            let (address, to) = (address.to_string(), address.to_string());
            let (timeout, connector) = (self.ctx.timeout, connector.clone());
            async move {
                tokio::task::spawn_blocking(move || {
                    api::call_with(&connector, &to, &request, timeout)
                })
                .await
                .map_err(|e| ApiError::unavailable(format!("the request's thread: {e}")))?
                .map_err(|e| {
                    ApiError::new(StatusCode::BAD_GATEWAY, format!("server {address}: {e}"))
                })
            }
        };
        let refused =
            |what: &str| ApiError::new(StatusCode::CONFLICT, format!("server {address}: {what}"));
        if let Some(s) = self
            .state()
            .await?
            .servers
            .values()
            .find(|s| s.address == address)
        {
            return Err(refused(&format!("it is server {}, a member already", s.id)));
        }
        let status = call(Request::Status).await?;
        let id = status
            .result
            .as_ref()
            .and_then(|s| s.get("id"))
            .and_then(Value::as_u64)
            .ok_or_else(|| refused("it does not say who it is"))?;
        let state = self.state().await?;
        if let Some(s) = state.servers.get(&id) {
            return Err(refused(&format!(
                "its id {id} is taken by the server at {}",
                s.address
            )));
        }
        let r = call(Request::Invite {
            token: token.to_string(),
            cluster: me,
            cluster_token,
        })
        .await?;
        if !r.ok {
            let e = r.error.unwrap_or_default();
            let e = e.strip_prefix("rejected: ").unwrap_or(&e);
            return Err(match r.failure {
                Some(Failure::Forbidden) => ApiError::forbidden(format!("server {address}: {e}")),
                _ => refused(e),
            });
        }
        let joined = self
            .state_where(Duration::from_secs(20), |s| s.servers.contains_key(&id))
            .await?;
        if !joined.servers.contains_key(&id) {
            return Err(ApiError::unavailable(format!(
                "server {id} at {address} was invited but has not joined yet: see its log"
            )));
        }
        Ok(id)
    }

    /// Removes server `id` from the Raft group (forwarded to the leader).
    pub async fn remove_server(&self, id: u64) -> Result<(), ApiError> {
        let r = self.request(Request::RemoveServer { id }).await?;
        if r.ok {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("removing server {id}: {}", r.error.unwrap_or_default()),
            ))
        }
    }

    /// This server's applied state, once it holds every change made through this server.
    pub async fn state(&self) -> Result<Arc<StateMachine>, ApiError> {
        let want = self.written.load(Ordering::SeqCst);
        let deadline = Instant::now() + self.ctx.timeout;
        loop {
            let node = self.ctx.node.clone();
            let (_, sm) = tokio::task::spawn_blocking(move || node.snapshot())
                .await
                .map_err(|e| ApiError::unavailable(format!("the request's thread: {e}")))?
                .map_err(|e| ApiError::unavailable(format!("this server's state: {e}")))?;
            if sm.counters.audit >= want {
                return Ok(sm);
            }
            if Instant::now() >= deadline {
                return Err(ApiError::unavailable(
                    "this server has not caught up with the cluster",
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// This server's applied state once `found` holds in it, or as it is after `wait`: for
    /// what another server has just committed (a login, a new user) and this one may not have
    /// applied yet.
    pub async fn state_where(
        &self,
        wait: Duration,
        found: impl Fn(&StateMachine) -> bool,
    ) -> Result<Arc<StateMachine>, ApiError> {
        let deadline = Instant::now() + wait;
        loop {
            let state = self.state().await?;
            if found(&state) || Instant::now() >= deadline {
                return Ok(state);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Archived audit entries (rotated out of the state) after seq `after`, oldest first, at
    /// most `limit`: from this server's store (every server holds the same archive).
    pub async fn archived_audit(
        &self,
        after: u64,
        limit: u64,
    ) -> Result<Vec<control::access::AuditEntry>, ApiError> {
        let node = self.ctx.node.clone();
        let read = move || {
            node.read(
                control::state_machine::Query::ArchivedAudit { after, limit },
                true,
            )
        };
        let v = tokio::task::spawn_blocking(read)
            .await
            .map_err(|e| ApiError::unavailable(format!("the request's thread: {e}")))?
            .map_err(|e| ApiError::unavailable(format!("the audit archive: {e}")))?;
        serde_json::from_value(v)
            .map_err(|e| ApiError::unavailable(format!("the audit archive: {e}")))
    }

    /// This server's Raft status (leader, terms, indexes).
    pub async fn status(&self) -> Result<control::Status, ApiError> {
        let node = self.ctx.node.clone();
        tokio::task::spawn_blocking(move || node.status())
            .await
            .map_err(|e| ApiError::unavailable(format!("the request's thread: {e}")))?
            .map_err(|e| ApiError::unavailable(format!("this server's status: {e}")))
    }
}
