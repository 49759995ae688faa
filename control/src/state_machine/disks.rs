//! Replicated disks: created, moved between servers with a raised generation, given a new
//! backup, deleted; each with an identity of its own.

use serde_json::{json, Value};

use super::keys::{disk_key, json_bytes, COUNTERS_KEY};
use super::{DiskRecord, Outcome, RecordWrite, Refusal, StateMachine};

impl StateMachine {
    /// Creates disk record `d` with a new identity (`Command::CreateDisk`).
    pub(super) fn create_disk(&mut self, d: &DiskRecord, writes: &mut Vec<RecordWrite>) -> Outcome {
        if self.disks.contains_key(&d.name) {
            return Err(Refusal::conflict(format!("disk {} exists", d.name)));
        }
        self.check_replicas(&d.name, d.primary, d.backup)?;
        let mut d = d.clone();
        d.uid = self.next_disk_uid(writes);
        writes.push((disk_key(&d.name), Some(json_bytes(&d))));
        self.disks.insert(d.name.clone(), d);
        Ok(Value::Null)
    }

    /// Moves disk `name`'s copies; the generation must rise (`Command::SetDiskReplicas`).
    pub(super) fn set_disk_replicas(
        &mut self,
        name: &str,
        primary: u64,
        backup: Option<u64>,
        generation: u64,
        writes: &mut Vec<RecordWrite>,
    ) -> Outcome {
        self.check_replicas(name, primary, backup)?;
        let d = self
            .disks
            .get_mut(name)
            .ok_or_else(|| Refusal::not_found(format!("no disk {name}")))?;
        if generation <= d.generation {
            return Err(Refusal::conflict(format!(
                "disk {name}: generation {generation} is not above the current {}",
                d.generation
            )));
        }
        if d.primary != primary || d.backup != backup {
            d.backup_synced = false;
        }
        d.primary = primary;
        d.backup = backup;
        d.generation = generation;
        writes.push((disk_key(name), Some(json_bytes(d))));
        Ok(json!({ "generation": generation }))
    }

    /// Deletes disk record `name`, unless a VM has it (`Command::DeleteDisk`).
    pub(super) fn delete_disk(&mut self, name: &str, writes: &mut Vec<RecordWrite>) -> Outcome {
        if let Some(vm) = self
            .vms
            .values()
            .find(|vm| vm.disks.iter().any(|d| d == name))
        {
            return Err(Refusal::conflict(format!(
                "disk {name} belongs to VM {}",
                vm.name
            )));
        }
        self.disks
            .remove(name)
            .ok_or_else(|| Refusal::not_found(format!("no disk {name}")))?;
        writes.push((disk_key(name), None));
        Ok(Value::Null)
    }

    /// Gives disk `name`, which has no backup, a new one on server `backup` in `pool`, if it is
    /// still at `generation` (`Command::SetDiskBackup`).
    pub(super) fn set_disk_backup(
        &mut self,
        name: &str,
        backup: u64,
        pool: &str,
        generation: u64,
        writes: &mut Vec<RecordWrite>,
    ) -> Outcome {
        let d = self
            .disks
            .get(name)
            .ok_or_else(|| Refusal::not_found(format!("no disk {name}")))?;
        if d.generation != generation {
            return Err(Refusal::conflict(format!(
                "disk {name} is at generation {}, not {generation}",
                d.generation
            )));
        }
        if let Some(b) = d.backup {
            return Err(Refusal::conflict(format!(
                "disk {name} has a backup: server {b}"
            )));
        }
        self.check_replicas(name, d.primary, Some(backup))?;
        if self.servers[&backup].down {
            return Err(Refusal::conflict(format!(
                "disk {name}: server {backup} is down"
            )));
        }
        let d = self.disks.get_mut(name).expect("checked");
        d.backup = Some(backup);
        d.backup_synced = false;
        d.pools.insert(backup, pool.to_string());
        writes.push((disk_key(name), Some(json_bytes(d))));
        Ok(Value::Null)
    }

    /// A new disk identity, never given before in this cluster.
    pub(super) fn next_disk_uid(&mut self, writes: &mut Vec<RecordWrite>) -> u64 {
        self.counters.disk += 1;
        writes.push((COUNTERS_KEY.to_vec(), Some(json_bytes(&self.counters))));
        self.counters.disk
    }

    /// A disk's copies live on two different servers, neither of them a witness.
    fn check_replicas(&self, name: &str, primary: u64, backup: Option<u64>) -> Result<(), String> {
        for id in std::iter::once(primary).chain(backup) {
            match self.servers.get(&id) {
                None => return Err(format!("disk {name}: no server {id}")),
                Some(s) if s.witness => {
                    return Err(format!("disk {name}: server {id} is a witness"))
                }
                Some(_) => {}
            }
        }
        if backup == Some(primary) {
            return Err(format!(
                "disk {name}: primary and backup are both server {primary}"
            ));
        }
        Ok(())
    }
}
