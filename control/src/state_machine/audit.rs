//! The audit log: every action a person (or the cluster) takes that changes something is
//! appended here, in the same batch as the change; the newest `access::AUDIT_KEEP` are kept.

use super::keys::{audit_key, json_bytes, COUNTERS_KEY};
use super::{RecordWrite, StateMachine};
use crate::access::{self, AuditEntry};

impl StateMachine {
    /// Appends an audit entry, dropping the oldest beyond `access::AUDIT_KEEP`.
    pub(super) fn audit(
        &mut self,
        actor: u64,
        at_ms: u64,
        action: &str,
        target: String,
        writes: &mut Vec<RecordWrite>,
    ) {
        self.counters.audit += 1;
        let e = AuditEntry {
            seq: self.counters.audit,
            at_ms,
            actor,
            actor_name: match actor {
                0 => "cluster".into(),
                id => self
                    .users
                    .get(&id)
                    .map_or_else(|| format!("user {id}"), |u| u.name.clone()),
            },
            action: action.to_string(),
            target,
        };
        writes.push((COUNTERS_KEY.to_vec(), Some(json_bytes(&self.counters))));
        writes.push((audit_key(e.seq), Some(json_bytes(&e))));
        self.audit.insert(e.seq, e);
        while self.audit.len() as u64 > access::AUDIT_KEEP {
            let (&oldest, _) = self.audit.iter().next().expect("not empty");
            self.audit.remove(&oldest);
            writes.push((audit_key(oldest), None));
        }
    }
}
