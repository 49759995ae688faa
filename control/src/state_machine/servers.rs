//! The members: what each offers, added and removed by conf changes, declared down (and the
//! hand-over of its disks that follows) or drained by a Manager.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::{json, Value};

use super::keys::{disk_key, json_bytes, revoked_key, server_key, vm_key};
use super::rights::Actor;
use super::{
    Acted, Capacity, DiskRecord, LiveMove, Outcome, RecordWrite, Refusal, ServerRecord,
    StateMachine, TaskState,
};
use crate::access;

impl StateMachine {
    /// The certificates the cluster admits and refuses (hex SHA-256): each member's, by server
    /// id (a member with none recorded yet left out), and removed servers'. Both the cluster
    /// port's roster and blockd's take them from here.
    pub fn certificates(&self) -> (BTreeMap<u64, String>, Vec<String>) {
        let members = self
            .servers
            .values()
            .filter(|s| !s.cert.is_empty())
            .map(|s| (s.id, s.cert.clone()))
            .collect();
        (members, self.revoked.keys().cloned().collect())
    }

    /// Changes what server `id` offers (`Command::SetCapacity`).
    pub(super) fn set_capacity(
        &mut self,
        id: u64,
        capacity: &Capacity,
        writes: &mut Vec<RecordWrite>,
    ) -> Outcome {
        let s = self
            .servers
            .get_mut(&id)
            .ok_or_else(|| Refusal::not_found(format!("no server {id}")))?;
        if s.witness && *capacity != Capacity::default() {
            return Err(Refusal::conflict(format!(
                "server {id} is a witness: it runs no VMs"
            )));
        }
        s.capacity = capacity.clone();
        writes.push((server_key(id), Some(json_bytes(s))));
        Ok(Value::Null)
    }

    /// Server `id`'s node agent says where its blockd listens and what it offers
    /// (`Command::Register`).
    pub(super) fn register(
        &mut self,
        id: u64,
        mirror: &str,
        capacity: &Capacity,
        writes: &mut Vec<RecordWrite>,
    ) -> Outcome {
        let s = self
            .servers
            .get_mut(&id)
            .ok_or_else(|| Refusal::not_found(format!("no server {id}")))?;
        if s.witness && *capacity != Capacity::default() {
            return Err(Refusal::conflict(format!(
                "server {id} is a witness: it runs no VMs"
            )));
        }
        s.mirror = mirror.to_string();
        s.capacity = capacity.clone();
        writes.push((server_key(id), Some(json_bytes(s))));
        Ok(Value::Null)
    }

    /// The leader declares server `id` down or up again (`Command::SetServerDown`).
    pub(super) fn set_server_down(
        &mut self,
        id: u64,
        down: bool,
        writes: &mut Vec<RecordWrite>,
    ) -> Outcome {
        let s = self
            .servers
            .get_mut(&id)
            .ok_or_else(|| Refusal::not_found(format!("no server {id}")))?;
        if s.down == down {
            return Ok(json!({ "changed": false }));
        }
        s.down = down;
        writes.push((server_key(id), Some(json_bytes(s))));
        if !down {
            return Ok(json!({ "changed": true }));
        }
        Ok(self.server_down(id, writes))
    }

    /// Server `id` was declared down: its lease ran out, so it has stopped its VMs itself.
    /// Every disk it held changes in this one committed entry:
    ///
    /// ```text
    ///   primary here, backup synced and up ──> the backup becomes primary, generation + 1,
    ///                                          no backup (the leader picks one later)
    ///   primary here, no usable backup     ──> unchanged: the VM waits for this server
    ///   backup here                        ──> no backup, generation + 1: the primary goes
    ///                                          on alone (its blockd bitmap keeps what changed)
    /// ```
    ///
    /// Answers the disks that moved and those that wait.
    pub(crate) fn server_down(&mut self, id: u64, writes: &mut Vec<RecordWrite>) -> Value {
        self.fail_tasks_of(id, writes);
        // A live migration from or to it ends here: its source's agent finds the move gone
        // (and its VM, if still paused there, runs on where its disks are).
        let ended: Vec<String> = self
            .vms
            .values()
            .filter(|vm| {
                vm.moving
                    .as_ref()
                    .is_some_and(|m| m.to == id || self.vm_primary(vm) == Some(id))
            })
            .map(|vm| vm.name.clone())
            .collect();
        for name in ended {
            let vm = self.vms.get_mut(&name).expect("listed above");
            vm.moving = None;
            writes.push((vm_key(&name), Some(json_bytes(vm))));
        }
        let mut promoted = Vec::new();
        let mut alone = Vec::new();
        let mut stranded = Vec::new();
        let usable = |d: &DiskRecord| {
            d.backup
                .filter(|b| d.backup_synced && self.servers.get(b).is_some_and(|s| !s.down))
        };
        // A VM's disks move together or not at all: one of them without a usable backup holds
        // back the others, which would otherwise leave the VM split over two servers.
        let held: HashSet<String> = self
            .vms
            .values()
            .filter(|vm| {
                vm.disks.iter().filter_map(|d| self.disks.get(d)).any(|d| {
                    d.primary == id && usable(d).is_none_or(|b| Some(b) != self.vm_backup(vm))
                })
            })
            .flat_map(|vm| vm.disks.iter().cloned())
            .collect();
        let moves: HashMap<String, u64> = self
            .disks
            .values()
            .filter(|d| d.primary == id && !held.contains(&d.name))
            .filter_map(|d| Some((d.name.clone(), usable(d)?)))
            .collect();
        let on_it: Vec<String> = (self.disks.values())
            .filter(|d| d.primary == id || d.backup == Some(id))
            .map(|d| d.name.clone())
            .collect();
        for name in &on_it {
            let Some(d) = self.disks.get_mut(name) else {
                continue;
            };
            if d.primary == id {
                let Some(&b) = moves.get(&d.name) else {
                    stranded.push(d.name.clone());
                    continue;
                };
                d.primary = b;
                d.backup = None;
                d.generation += 1;
                d.backup_synced = false;
                d.pools.remove(&id);
                promoted.push(json!({ "disk": d.name, "primary": b, "generation": d.generation }));
            } else if d.backup == Some(id) {
                d.backup = None;
                d.generation += 1;
                d.backup_synced = false;
                d.pools.remove(&id);
                alone.push(json!({ "disk": d.name, "generation": d.generation }));
            } else {
                continue;
            }
            writes.push((disk_key(&d.name), Some(json_bytes(d))));
        }
        json!({ "changed": true, "promoted": promoted, "alone": alone, "stranded": stranded })
    }

    /// Records a member added by a committed conf change.
    pub fn add_server(&mut self, s: &ServerRecord, writes: &mut Vec<RecordWrite>) {
        writes.push((server_key(s.id), Some(json_bytes(s))));
        self.servers.insert(s.id, s.clone());
    }

    /// Forgets a member removed by a committed conf change, and revokes its certificate.
    pub fn remove_server(&mut self, id: u64, writes: &mut Vec<RecordWrite>) {
        if let Some(s) = self.servers.remove(&id) {
            writes.push((server_key(id), None));
            if !s.cert.is_empty() {
                writes.push((revoked_key(&s.cert), Some(json_bytes(&id))));
                self.revoked.insert(s.cert, id);
            }
        }
    }

    /// Empties server `id`, if `by` is a Manager (`Action::DrainServer`): its primaries move to
    /// their in-sync backups, its backup copies are dropped.
    pub(super) fn drain_server(
        &mut self,
        by: &Actor,
        id: u64,
        writes: &mut Vec<RecordWrite>,
    ) -> Result<Acted<'static>, Refusal> {
        if !by.is_manager() {
            return Err(access::refuse("only a Manager drains servers"));
        }
        let s = self
            .servers
            .get(&id)
            .ok_or_else(|| Refusal::not_found(format!("no server {id}")))?;
        if s.witness {
            return Err(Refusal::conflict(format!(
                "server {id} is a witness: it holds no disks"
            )));
        }
        // A task copying a VM's disks (a copy back, a backup) needs them where they are.
        for t in self
            .tasks
            .values()
            .filter(|t| t.state == TaskState::Running)
        {
            let Some(vm) = t.kind.vm().and_then(|vm| self.vm_by_id(vm)) else {
                continue;
            };
            let here = vm
                .disks
                .iter()
                .filter_map(|d| self.disks.get(d))
                .any(|d| d.primary == id || d.backup == Some(id));
            if here {
                return Err(Refusal::conflict(format!(
                    "server {id}: task {} is {} there: wait for it or cancel it, then drain",
                    t.id,
                    super::describe_task(&t.kind)
                )));
            }
        }
        // Its running VMs move live, their disks at their switch; the others' disks move now.
        let live: Vec<String> = self
            .vms
            .values()
            .filter(|vm| vm.running && vm.moving.is_none() && self.vm_primary(vm) == Some(id))
            .map(|vm| vm.name.clone())
            .collect();
        let mut carried = HashSet::new();
        let mut targets = Vec::new();
        for name in &live {
            let to = self.move_target(&self.vms[name])?;
            carried.extend(self.vms[name].disks.iter().cloned());
            targets.push((name.clone(), to));
        }
        let mut moves = Vec::new();
        for d in self.disks.values() {
            if carried.contains(&d.name) {
                continue;
            }
            if d.primary == id {
                let b = d
                    .backup
                    .filter(|b| d.backup_synced && self.servers.get(b).is_some_and(|s| !s.down))
                    .ok_or_else(|| {
                        format!("disk {} has no in-sync backup to move to; wait for it or delete its VM", d.name)
                    })?;
                moves.push((d.name.clone(), Some(b)));
            } else if d.backup == Some(id) {
                moves.push((d.name.clone(), None));
            }
        }
        let s = self.servers.get_mut(&id).expect("checked");
        s.draining = true;
        writes.push((server_key(id), Some(json_bytes(s))));
        let n = moves.len();
        for (name, new_primary) in moves {
            let d = self.disks.get_mut(&name).expect("listed");
            if let Some(b) = new_primary {
                d.primary = b;
            }
            d.backup = None;
            d.backup_synced = false;
            d.generation += 1;
            d.pools.remove(&id);
            writes.push((disk_key(&name), Some(json_bytes(d))));
        }
        // Each move is named by the audit number this drain gets.
        let move_id = self.counters.audit + 1;
        for (name, to) in &targets {
            let vm = self.vms.get_mut(name).expect("listed");
            vm.moving = Some(LiveMove {
                id: move_id,
                to: *to,
                switched: false,
                cancel: false,
                downtime_ms: None,
                auto_converge: false,
            });
            writes.push((vm_key(name), Some(json_bytes(vm))));
        }
        Ok(Acted::Changed {
            verb: "server.drain",
            target: format!(
                "server {id}: {} VMs moving live, {n} disks moved",
                targets.len()
            ),
            result: json!({ "disks_moved": n, "moving_live": targets.len() }),
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::state_machine::fixtures::server;
    use crate::state_machine::{Command, DiskRecord, StateMachine};

    #[test]
    fn a_server_declared_down_hands_its_disks_over_in_one_entry() {
        let mut sm = StateMachine::default();
        let mut w = Vec::new();
        for id in 1..=3 {
            sm.add_server(&server(id, false), &mut w);
        }
        let disk = |name: &str, primary, backup, synced| DiskRecord {
            name: name.into(),
            size: 1,
            primary,
            backup: Some(backup),
            generation: 3,
            pools: Default::default(),
            backup_synced: synced,
            clone_of: None,
            uid: 0,
            image: None,
        };
        sm.disks.insert("a".into(), disk("a", 1, 2, true));
        sm.disks.insert("b".into(), disk("b", 2, 1, true));
        sm.disks.insert("c".into(), disk("c", 1, 3, false));
        let r = sm
            .apply(&Command::SetServerDown { id: 1, down: true }, &mut w)
            .unwrap();
        assert!(sm.servers[&1].down);
        // Primary here, backup in sync: promoted with a raised generation.
        let a = &sm.disks["a"];
        assert_eq!((a.primary, a.backup, a.generation), (2, None, 4));
        // Backup here: the primary goes on alone, with a raised generation.
        let b = &sm.disks["b"];
        assert_eq!((b.primary, b.backup, b.generation), (2, None, 4));
        // Primary here, backup never synced: it waits.
        let c = &sm.disks["c"];
        assert_eq!((c.primary, c.backup, c.generation), (1, Some(3), 3));
        assert_eq!(r["stranded"][0], "c");
        // Declaring it again changes nothing; up again leaves the disks where they are.
        let again = sm
            .apply(&Command::SetServerDown { id: 1, down: true }, &mut w)
            .unwrap();
        assert_eq!(again["changed"], false);
        sm.apply(&Command::SetServerDown { id: 1, down: false }, &mut w)
            .unwrap();
        assert_eq!(sm.disks["a"].primary, 2);
        // A new backup only on the current generation, never the primary.
        let stale = Command::SetDiskBackup {
            name: "a".into(),
            backup: 1,
            pool: String::new(),
            generation: 3,
        };
        assert!(sm.apply(&stale, &mut w).is_err());
        let own = Command::SetDiskBackup {
            name: "a".into(),
            backup: 2,
            pool: String::new(),
            generation: 4,
        };
        assert!(sm.apply(&own, &mut w).is_err());
        let ok = Command::SetDiskBackup {
            name: "a".into(),
            backup: 1,
            pool: String::new(),
            generation: 4,
        };
        sm.apply(&ok, &mut w).unwrap();
        assert_eq!(sm.disks["a"].backup, Some(1));
        assert!(!sm.disks["a"].backup_synced);
    }
}
