//! Failure detection and failover, run by whichever server leads.
//!
//! Each server's node agent heartbeats to the leader (see `agent`). The leader gives every
//! server a lease: the time since its last heartbeat, counted at the earliest from the start
//! of this leadership less the quiet its election usually needed (`NodeConfig::vote_quiet`: a
//! heartbeat an earlier leader answered was sent before that; where it was not, the lease's
//! margin over the fence timeout covers it). When a lease runs out, the server has fenced
//! itself already (its agent fences at `fence_timeout`, shorter), and the leader commits
//! `SetServerDown`, which in the same entry promotes the backups of the disks whose primary
//! was there, with a raised generation (`StateMachine::server_down`). The agents on the new
//! primaries promote their copies and boot the VMs.
//!
//! ```text
//!            lease runs out                      heartbeat heard again
//!   up ─────────────────────────> down ─────────────────────────────────> up
//!       SetServerDown{down:true}       SetServerDown{down:false}
//!       (its disks move in the same entry)     (its stale copies may become backups)
//! ```
//!
//! A disk left without a backup gets a new one (`SetDiskBackup`) as soon as a server has room
//! (`placement::pick_backup`); its agent creates the copy, or demotes a returning old primary's,
//! and the primary's blockd resyncs it.

use std::time::{Duration, Instant};

use crate::api::{self, Request};
use crate::node::{LeaderView, NodeHandle};
use crate::placement;
use crate::state_machine::Command;
use crate::transport::AddressBook;

/// The failure detector's timings.
#[derive(Clone, Copy, Debug)]
pub struct FailoverTiming {
    /// A server not heard from for this long is declared down.
    pub lease: Duration,
    /// How often the leader looks.
    pub check_every: Duration,
}

impl Default for FailoverTiming {
    fn default() -> Self {
        FailoverTiming {
            lease: Duration::from_secs(2),
            check_every: Duration::from_millis(50),
        }
    }
}

/// Starts the failure detector's thread.
pub fn start(timing: FailoverTiming, node: NodeHandle, book: AddressBook) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("failover".into())
        .spawn(move || loop {
            std::thread::sleep(timing.check_every);
            match node.leader_view() {
                Ok(Some(view)) => check(&timing, &view, &node, &book),
                Ok(None) => {}
                Err(_) => return,
            }
        })?;
    Ok(())
}

/// What the leader decides from one view at `now` (`now_ms` on the wall clock, for backup
/// schedules): the commands to propose, in order.
pub fn decide(
    timing: &FailoverTiming,
    view: &LeaderView,
    now: Instant,
    now_ms: u64,
) -> Vec<Command> {
    let state = &view.state;
    let mut out = Vec::new();
    for s in state.servers.values().filter(|s| !s.witness) {
        let last = view
            .heard
            .get(&s.id)
            .copied()
            .unwrap_or(view.since)
            .max(view.since);
        let silent = now.saturating_duration_since(last);
        if !s.down && silent > timing.lease {
            out.push(Command::SetServerDown {
                id: s.id,
                down: true,
            });
        } else if s.down && view.heard.contains_key(&s.id) && silent < timing.lease / 4 {
            out.push(Command::SetServerDown {
                id: s.id,
                down: false,
            });
        }
    }
    if !out.is_empty() {
        // Backups are chosen on the state these changes produce, next time round.
        return out;
    }
    for d in state.disks.values().filter(|d| d.backup.is_none()) {
        if state.servers.get(&d.primary).is_none_or(|s| s.down) {
            continue;
        }
        if let Some((backup, pool)) = placement::pick_backup(state, d) {
            out.push(Command::SetDiskBackup {
                name: d.name.clone(),
                backup,
                pool,
                generation: d.generation,
            });
        }
    }
    // Scheduled backups that are due, as the cluster's own actions.
    for action in crate::state_machine::due_backups(state, now_ms) {
        out.push(Command::Act {
            actor: 0,
            at_ms: now_ms,
            action,
        });
    }
    out
}

fn check(timing: &FailoverTiming, view: &LeaderView, node: &NodeHandle, book: &AddressBook) {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    for command in decide(timing, view, Instant::now(), now_ms) {
        let what = format!("{command:?}");
        let r = api::request(
            Request::Propose { command },
            node,
            book,
            Duration::from_secs(2),
        );
        if r.ok {
            tracing::warn!(decision = %what, result = %r.result.unwrap_or_default(), "failover");
        } else {
            tracing::warn!(decision = %what, error = ?r.error, "failover proposal failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    use crate::state_machine::{Capacity, ServerRecord, StateMachine};

    fn view(since: Instant, heard: &[(u64, Instant)]) -> LeaderView {
        let mut state = StateMachine::default();
        for (id, witness) in [(1, false), (2, false), (3, true)] {
            state.servers.insert(
                id,
                ServerRecord {
                    id,
                    address: String::new(),
                    witness,
                    capacity: Capacity::default(),
                    mirror: String::new(),
                    down: false,
                    draining: false,
                    cert: String::new(),
                },
            );
        }
        LeaderView {
            since,
            heard: heard.iter().copied().collect::<HashMap<_, _>>(),
            state: std::sync::Arc::new(state),
        }
    }

    #[test]
    fn a_server_gets_a_whole_lease_from_the_start_of_a_leadership() {
        let t = FailoverTiming::default();
        let since = Instant::now();
        let v = view(since, &[(1, since + Duration::from_millis(500))]);
        // Nothing before the lease from `since` ran out, for anyone.
        assert!(decide(&t, &v, since + Duration::from_millis(1900), 0).is_empty());
        // Server 2 never heard: down after the lease; server 1 heard later: still up; 3 is a
        // witness: never declared down.
        let d = decide(&t, &v, since + Duration::from_millis(2100), 0);
        assert_eq!(d, vec![Command::SetServerDown { id: 2, down: true }]);
        let d = decide(&t, &v, since + Duration::from_millis(2600), 0);
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn a_new_leader_counts_the_leases_from_the_quiet_its_election_needed() {
        // What the node does with `since`, with the default timings: the lease of a server
        // it never heard from runs out `vote_quiet` sooner than a whole lease after it won.
        let cfg = crate::node::NodeConfig::new(1);
        assert_eq!(cfg.vote_quiet(), Duration::from_millis(200));
        let t = FailoverTiming::default();
        let won = Instant::now() + Duration::from_secs(5);
        assert_eq!(cfg.lease_start(won), won - cfg.vote_quiet());
        let v = view(
            cfg.lease_start(won),
            &[(1, won + Duration::from_millis(100))],
        );
        assert!(decide(&t, &v, won + t.lease - cfg.vote_quiet(), 0).is_empty());
        let d = decide(
            &t,
            &v,
            won + t.lease - cfg.vote_quiet() + Duration::from_millis(10),
            0,
        );
        assert_eq!(d, vec![Command::SetServerDown { id: 2, down: true }]);
    }

    #[test]
    fn a_down_server_heard_again_is_up() {
        let t = FailoverTiming::default();
        let since = Instant::now();
        let now = since + Duration::from_secs(10);
        let mut v = view(since, &[(1, now), (2, now - Duration::from_millis(100))]);
        std::sync::Arc::make_mut(&mut v.state)
            .servers
            .get_mut(&2)
            .unwrap()
            .down = true;
        assert_eq!(
            decide(&t, &v, now, 0),
            vec![Command::SetServerDown { id: 2, down: false }]
        );
    }
}
