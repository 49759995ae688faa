//! The audit log: every action a person (or the cluster) takes that changes something is
//! appended here, in the same batch as the change. The newest `access::AUDIT_KEEP` are kept in
//! the state; older ones move, in the same batch, to the archive (`keys::ARCHIVED_AUDIT_PREFIX`),
//! which stays in the store and is never loaded: nothing is ever dropped.

use super::keys::{archived_audit_key, audit_key, json_bytes, COUNTERS_KEY};
use super::{RecordWrite, StateMachine};
use crate::access::{self, AuditEntry};

impl StateMachine {
    /// Appends an audit entry, archiving the oldest beyond `access::AUDIT_KEEP`.
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
        while self.audit.len() as u64 > self.audit_keep() {
            let Some(seq) = self.audit.keys().next().copied() else {
                break;
            };
            let Some(oldest) = self.audit.remove(&seq) else {
                break;
            };
            writes.push((audit_key(seq), None));
            writes.push((archived_audit_key(seq), Some(json_bytes(&oldest))));
        }
    }

    /// How many audit entries the state keeps (fewer in tests).
    fn audit_keep(&self) -> u64 {
        #[cfg(test)]
        if let Some(keep) = self.audit_keep {
            return keep;
        }
        access::AUDIT_KEEP
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{act, new_user, replay};
    use super::super::keys::ARCHIVED_AUDIT_PREFIX;
    use super::super::{Command, StateMachine};
    use crate::access::{AuditEntry, Role};
    use std::collections::BTreeMap;

    #[test]
    fn entries_rotated_out_of_the_state_are_archived_whole_and_not_loaded() {
        let mut sm = StateMachine {
            audit_keep: Some(3),
            ..Default::default()
        };
        let mut records = BTreeMap::new();
        for i in 0..8 {
            let mut w = Vec::new();
            let create = Command::Act {
                actor: 0,
                at_ms: 5,
                action: new_user(&format!("u{i}"), Role::Regular, None, None),
            };
            sm.apply(&create, &mut w).unwrap();
            replay(&mut records, w);
        }
        // A refused change writes no entry, so archives none.
        assert!(act(&mut sm, 0, new_user("u0", Role::Regular, None, None)).is_err());
        assert_eq!(sm.audit.keys().copied().collect::<Vec<_>>(), [6, 7, 8]);
        let archived: Vec<AuditEntry> = records
            .iter()
            .filter(|(k, _)| k.starts_with(ARCHIVED_AUDIT_PREFIX.as_bytes()))
            .map(|(_, v)| serde_json::from_slice(v).unwrap())
            .collect();
        assert_eq!(
            archived.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5],
            "every rotated entry, in order"
        );
        assert!(
            archived.iter().all(|e| e.action == "user.create"),
            "{archived:?}"
        );
        // Loading the records keeps the newest only: the archive stays in the store.
        let records: Vec<_> = records.into_iter().collect();
        let loaded = StateMachine::load(&records).unwrap();
        assert_eq!(loaded.audit.keys().copied().collect::<Vec<_>>(), [6, 7, 8]);
        assert_eq!(loaded.users.len(), 8);
    }
}
