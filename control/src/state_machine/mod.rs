//! The cluster's state machine: every committed command is applied here, in log order, on every
//! server, so every server holds the same records.
//!
//! Records are kept in memory and written to RocksDB (`sm/<kind>/<name>`, JSON) in the same
//! batch as the applied index (see `storage`). Applying is deterministic: a command that does
//! not fit the current state is rejected with a reason, identically everywhere.
//!
//! Its parts, one concern each:
//!
//! - `records`: what is stored (servers, disks, VMs, ISO images, id counters);
//! - `observations`: what the servers' node agents report;
//! - `commands`: the commands, the actions of people and the queries (the wire format);
//! - `refusal`: what applying answers;
//! - `keys`: where each record is stored;
//! - `rights`: who may operate or administer a VM;
//! - `kv`, `servers`, `disks`, `vms`, `users`, `isos`, `appliances`: the commands and actions
//!   on each;
//! - `audit`: the audit log every change a person makes is written to.

mod appliances;
pub use appliances::MAX_DESCRIPTION as MAX_APPLIANCE_DESCRIPTION;
mod audit;
mod commands;
mod disks;
#[cfg(test)]
mod fixtures;
mod isos;
mod keys;
pub use keys::ARCHIVED_AUDIT_PREFIX;
mod kv;
mod networks;
mod observations;
mod records;
mod refusal;
mod rights;
mod servers;
mod tasks;
pub use tasks::{
    backup_name, check_download_url, describe as describe_task, due_backups, KEEP_ENDED_TASKS,
    MAX_UPLOAD_IMPORTS, MAX_URL,
};
mod users;
mod vms;

use imbl::OrdMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::access::{self, AuditEntry, SessionRecord, UserRecord};
use crate::storage::{Record, RecordWrite};

pub use commands::{Action, Command, DiskGrowth, NewAppliance, NewVm, Query, TaskOutcome};
pub use networks::Subnet;
pub use observations::{
    CopyRole, DiskObservation, LinkState, NicAddresses, Observation, VmFault, VmObservation,
    VmPart, MAX_SEEN_ADDRESSES,
};
pub use records::{
    ApplianceDisk, ApplianceRecord, BackupSchedule, BootMode, BootOrder, Capacity, Counters,
    DiskBus, DiskRecord, IsoRecord, LiveMove, MoveOutcome, NetworkRecord, Nic, Pool, ServerRecord,
    TaskKind, TaskRecord, TaskState, VmRecord, MAX_DISK_BYTES, MAX_VM_DISKS, MAX_VM_MEMORY_MIB,
    MAX_VM_NICS,
};
pub use refusal::{Outcome, Refusal, RefusalKind};

use keys::{json_bytes, record, server_key};

/// The applied state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StateMachine {
    /// Key/value section.
    pub kv: OrdMap<String, String>,
    /// Members, by Raft id.
    pub servers: OrdMap<u64, ServerRecord>,
    /// Replicated disks, by name.
    pub disks: OrdMap<String, DiskRecord>,
    /// VMs, by name.
    pub vms: OrdMap<String, VmRecord>,
    /// What each server's node agent last reported.
    #[serde(default)]
    pub observed: OrdMap<u64, Observation>,
    /// The ISO library, by name.
    #[serde(default)]
    pub isos: OrdMap<String, IsoRecord>,
    /// The Virtual Appliance library, by name.
    #[serde(default)]
    pub appliances: OrdMap<String, ApplianceRecord>,
    /// Long operations, running and the last ended ones, by id.
    #[serde(default)]
    pub tasks: OrdMap<u64, TaskRecord>,
    /// The networks, by name.
    #[serde(default)]
    pub networks: OrdMap<String, NetworkRecord>,
    /// Certificates of removed servers (fingerprint to the server's id): refused for good.
    #[serde(default)]
    pub revoked: OrdMap<String, u64>,
    /// Users, by id (not in `Query::State`: it holds password hashes).
    #[serde(skip)]
    pub users: OrdMap<u64, UserRecord>,
    /// Sessions, by token hash.
    #[serde(skip)]
    pub sessions: OrdMap<String, SessionRecord>,
    /// The newest `access::AUDIT_KEEP` audit entries, by seq.
    #[serde(skip)]
    pub audit: OrdMap<u64, AuditEntry>,
    /// Ids handed out so far.
    #[serde(skip)]
    pub counters: Counters,
    /// Audit entries kept in the state, when a test sets fewer than `access::AUDIT_KEEP`.
    #[cfg(test)]
    #[serde(skip)]
    pub(super) audit_keep: Option<u64>,
}

/// One record of the state as a batch of applied entries left it: its key in the store
/// (`keys`) and its stored bytes (JSON, or a key/value entry's text), or none where it was
/// removed. A heartbeat that knows an earlier revision gets these instead of the whole state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordChange {
    /// The record's key, `<kind>/<name>`.
    pub key: String,
    /// Its new stored bytes, or none: removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

impl RecordChange {
    /// A record write as a heartbeat carries it: none for a record the state it carries does
    /// not show (users, sessions, the audit log, the counters); `Err` for a key or value that
    /// is not text, which no record is.
    pub fn of(write: &RecordWrite) -> Result<Option<RecordChange>, std::string::FromUtf8Error> {
        let (k, v) = write;
        let key = String::from_utf8(k.clone())?;
        if !StateMachine::shown(&key) {
            return Ok(None);
        }
        let value = v
            .as_ref()
            .map(|b| String::from_utf8(b.clone()))
            .transpose()?;
        Ok(Some(RecordChange { key, value }))
    }
}

/// What went wrong loading the stored records.
#[derive(Debug, thiserror::Error)]
#[error("state machine record {key}: {what}")]
pub struct LoadError {
    key: String,
    what: String,
}

impl StateMachine {
    /// Rebuilds the state from its stored records (`storage::RaftStore::records`).
    pub fn load(records: &[Record]) -> Result<StateMachine, LoadError> {
        let mut sm = StateMachine::default();
        for (k, v) in records {
            sm.apply_record(&String::from_utf8_lossy(k), Some(v))?;
        }
        Ok(sm)
    }

    /// Whether the record stored under `key` is part of the state `Query::State` answers (and a
    /// heartbeat carries): not users, sessions, the audit log or the counters.
    pub fn shown(key: &str) -> bool {
        matches!(
            key.split_once('/').map(|(kind, _)| kind),
            Some(
                "kv" | "server"
                    | "disk"
                    | "vm"
                    | "network"
                    | "iso"
                    | "appliance"
                    | "task"
                    | "revoked"
                    | "observed"
            )
        )
    }

    /// Applies one changed record (see `RecordChange`).
    pub fn apply_change(&mut self, c: &RecordChange) -> Result<(), LoadError> {
        self.apply_record(&c.key, c.value.as_deref().map(str::as_bytes))
    }

    /// Sets the record stored under `key` to `value` (its stored bytes), or removes it: the
    /// state a store holding it would load.
    pub fn apply_record(&mut self, key: &str, value: Option<&[u8]>) -> Result<(), LoadError> {
        let err = |what: String| LoadError {
            key: key.to_string(),
            what,
        };
        let (kind, name) = key.split_once('/').ok_or_else(|| err("no kind".into()))?;
        let id = || name.parse::<u64>().map_err(|_| err("bad id".into()));
        let Some(v) = value else {
            match kind {
                "kv" => drop(self.kv.remove(name)),
                "server" => drop(self.servers.remove(&id()?)),
                "disk" => drop(self.disks.remove(name)),
                "vm" => drop(self.vms.remove(name)),
                "network" => drop(self.networks.remove(name)),
                "iso" => drop(self.isos.remove(name)),
                "appliance" => drop(self.appliances.remove(name)),
                "task" => drop(self.tasks.remove(&id()?)),
                "revoked" => drop(self.revoked.remove(name)),
                "observed" => drop(self.observed.remove(&id()?)),
                "user" => drop(self.users.remove(&id()?)),
                "session" => drop(self.sessions.remove(name)),
                "audit" => drop(self.audit.remove(&id()?)),
                "meta" if name == "counters" => self.counters = Counters::default(),
                "archive" => {}
                _ => return Err(err("unknown kind".into())),
            }
            return Ok(());
        };
        match kind {
            "kv" => {
                let value = String::from_utf8(v.to_vec()).map_err(|e| err(e.to_string()))?;
                self.kv.insert(name.to_string(), value);
            }
            "server" => {
                let s: ServerRecord = record(v).map_err(err)?;
                self.servers.insert(s.id, s);
            }
            "disk" => {
                let d: DiskRecord = record(v).map_err(err)?;
                self.disks.insert(d.name.clone(), d);
            }
            "vm" => {
                let vm: VmRecord = record(v).map_err(err)?;
                self.vms.insert(vm.name.clone(), vm);
            }
            "network" => {
                let n: NetworkRecord = record(v).map_err(err)?;
                self.networks.insert(n.name.clone(), n);
            }
            "iso" => {
                let i: IsoRecord = record(v).map_err(err)?;
                self.isos.insert(i.name.clone(), i);
            }
            "appliance" => {
                let a: ApplianceRecord = record(v).map_err(err)?;
                self.appliances.insert(a.name.clone(), a);
            }
            "task" => {
                let t: TaskRecord = record(v).map_err(err)?;
                self.tasks.insert(t.id, t);
            }
            "revoked" => {
                let id = record(v).map_err(err)?;
                self.revoked.insert(name.to_string(), id);
            }
            "observed" => {
                let o: Observation = record(v).map_err(err)?;
                self.observed.insert(id()?, o);
            }
            "user" => {
                let u: UserRecord = record(v).map_err(err)?;
                self.users.insert(u.id, u);
            }
            "session" => {
                let s: SessionRecord = record(v).map_err(err)?;
                self.sessions.insert(s.token_hash.clone(), s);
            }
            "audit" => {
                let a: AuditEntry = record(v).map_err(err)?;
                self.audit.insert(a.seq, a);
            }
            "meta" if name == "counters" => self.counters = record(v).map_err(err)?,
            // Rotated-out audit entries: read from the store when asked, never held.
            "archive" => {}
            _ => return Err(err("unknown kind".into())),
        }
        Ok(())
    }

    /// The records of a new cluster's first state: its first server.
    pub fn initial_records(first: &ServerRecord) -> Vec<Record> {
        vec![(server_key(first.id), json_bytes(first))]
    }

    /// Applies one committed command; the record changes go to `writes`.
    pub fn apply(&mut self, cmd: &Command, writes: &mut Vec<RecordWrite>) -> Outcome {
        match cmd {
            Command::Put { key, value } => self.put(key, value, writes),
            Command::Delete { key } => self.delete(key, writes),
            Command::CompareAndSet {
                key,
                expected,
                value,
            } => self.compare_and_set(key, expected.as_deref(), value.as_deref(), writes),
            Command::SetCapacity { id, capacity } => self.set_capacity(*id, capacity, writes),
            Command::CreateDisk(d) => self.create_disk(d, writes),
            Command::SetDiskReplicas {
                name,
                primary,
                backup,
                generation,
            } => self.set_disk_replicas(name, *primary, *backup, *generation, writes),
            Command::DeleteDisk { name } => self.delete_disk(name, writes),
            Command::PutVm(vm) => self.put_vm_record(vm, writes),
            Command::DeleteVm { name } => self.delete_vm_record(name, writes),
            Command::Register {
                id,
                mirror,
                capacity,
            } => self.register(*id, mirror, capacity, writes),
            Command::CreateVm(vm) => {
                let appliance = match &vm.appliance {
                    Some(a) => Some(self.appliances.get(a).cloned().ok_or_else(|| {
                        Refusal::not_found(format!("no appliance {a} in the library"))
                    })?),
                    None => None,
                };
                self.create_vm(
                    vm.record(None),
                    &vm.disk_sizes(),
                    None,
                    appliance.as_ref(),
                    writes,
                )
            }
            Command::SetVmRunning { name, running } => self.set_vm_running(name, *running, writes),
            Command::SetServerDown { id, down } => self.set_server_down(*id, *down, writes),
            Command::SetDiskBackup {
                name,
                backup,
                pool,
                generation,
            } => self.set_disk_backup(name, *backup, pool, *generation, writes),
            Command::SwitchVm { vm, move_id } => self.switch_vm(vm, *move_id, writes),
            Command::EndMove {
                vm,
                move_id,
                at_ms,
                outcome,
            } => self.end_move(vm, *move_id, *at_ms, outcome, writes),
            Command::Observe { id, observation } => self.observe(*id, observation, writes),
            Command::IsoHeld {
                name,
                sha256,
                server,
            } => self.iso_held(name, sha256, *server, writes),
            Command::TaskProgress {
                id,
                server,
                done_bytes,
                total_bytes,
            } => self.task_progress(*id, *server, *done_bytes, *total_bytes, writes),
            Command::TaskEnded {
                id,
                server,
                at_ms,
                outcome,
            } => self.task_ended(*id, *server, *at_ms, outcome, writes),
            Command::ApplianceHeld {
                name,
                disks,
                server,
            } => self.appliance_held(name, disks, *server, writes),
            Command::Act {
                actor,
                at_ms,
                action,
            } => self.act(*actor, *at_ms, action, writes),
        }
    }

    /// Applies a person's change if `actor` may make it (see `access`), with its audit entry.
    fn act(
        &mut self,
        actor: u64,
        at_ms: u64,
        action: &Action,
        writes: &mut Vec<RecordWrite>,
    ) -> Outcome {
        let by = self.actor(actor, at_ms)?;
        let acted = match action {
            Action::CreateUser { .. }
            | Action::SetPassword { .. }
            | Action::SetQuota { .. }
            | Action::DeleteUser { .. }
            | Action::Login { .. }
            | Action::Logout { .. } => self.act_on_user(&by, action, writes)?,
            Action::CreateVm { .. }
            | Action::PowerVm { .. }
            | Action::DeleteVm { .. }
            | Action::EditVm { .. }
            | Action::CloneVm { .. }
            | Action::MigrateVm { .. }
            | Action::CancelMigration { .. }
            | Action::OpenConsole { .. } => self.act_on_vm(&by, action, writes)?,
            Action::AddIso { .. } | Action::DeleteIso { .. } | Action::SetCdrom { .. } => {
                self.act_on_iso(&by, action, writes)?
            }
            Action::EditAppliance { .. } | Action::DeleteAppliance { .. } => {
                self.act_on_appliance(&by, action, writes)?
            }
            Action::CopyBack { .. }
            | Action::BackupVm { .. }
            | Action::DownloadAppliance { .. }
            | Action::ImportUpload { .. }
            | Action::SetBackupSchedule { .. }
            | Action::CancelTask { .. } => self.act_on_task(&by, action, writes)?,
            Action::CreateNetwork { .. } | Action::DeleteNetwork { .. } => {
                self.act_on_network(&by, action, writes)?
            }
            Action::DrainServer { id } => self.drain_server(&by, *id, writes)?,
            Action::Note { action, target } => {
                if !by.is_manager() {
                    return Err(access::refuse("only a Manager changes the cluster"));
                }
                Acted::Changed {
                    verb: action.as_str(),
                    target: target.clone(),
                    result: Value::Null,
                }
            }
        };
        let (verb, target, result) = match acted {
            Acted::Changed {
                verb,
                target,
                result,
            } => (verb, target, result),
            Acted::Unchanged(answer) => return Ok(answer),
        };
        self.audit(actor, at_ms, verb, target, writes);
        // The audit seq tells the server that took the request when its own state has it.
        let mut result = match result {
            Value::Object(m) => m,
            _ => serde_json::Map::new(),
        };
        result.insert("audit".into(), json!(self.counters.audit));
        Ok(Value::Object(result))
    }

    /// Answers a read.
    pub fn query(&self, q: &Query) -> Value {
        match q {
            Query::Get { key } => json!({ "value": self.kv.get(key) }),
            Query::State => serde_json::to_value(self).expect("state serializes"),
            Query::Users => Value::Array(
                self.users
                    .values()
                    .map(|u| {
                        json!({ "id": u.id, "name": u.name, "role": u.role, "parent": u.parent, "quota": u.quota })
                    })
                    .collect(),
            ),
            // Served by the node from the store (`storage::RaftStore::state_range`).
            Query::ArchivedAudit { .. } => Value::Array(Vec::new()),
            Query::Audit { after, limit } => Value::Array(
                self.audit
                    .range(after.saturating_add(1)..)
                    .take((*limit).min(1000) as usize)
                    .map(|(_, e)| serde_json::to_value(e).expect("audit serializes"))
                    .collect(),
            ),
        }
    }
}

/// What an applied action did.
enum Acted<'a> {
    /// It changed the state: `verb` on `target` goes to the audit log, and `result` is
    /// answered with the entry's seq.
    Changed {
        /// What was done, e.g. `vm.power_on`.
        verb: &'a str,
        /// On what, for people.
        target: String,
        /// What it answers.
        result: Value,
    },
    /// It asked for what already is: answered as it is, with no audit entry (looping it pushes
    /// no entry out).
    Unchanged(Value),
}

#[cfg(test)]
mod tests {
    use super::fixtures::{replay, server};
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn stored_records_rebuild_the_same_state() {
        let mut sm = StateMachine::default();
        let mut records: BTreeMap<_, _> = StateMachine::initial_records(&server(1, false))
            .into_iter()
            .collect();
        sm.servers.insert(1, server(1, false));
        let mut w = Vec::new();
        sm.add_server(&server(2, false), &mut w);
        sm.add_server(&server(3, true), &mut w);
        let cmds = [
            Command::Put {
                key: "a".into(),
                value: "1".into(),
            },
            Command::Put {
                key: "b".into(),
                value: "2".into(),
            },
            Command::Delete { key: "a".into() },
            Command::CompareAndSet {
                key: "b".into(),
                expected: Some("2".into()),
                value: Some("3".into()),
            },
            Command::CreateDisk(DiskRecord {
                name: "d0".into(),
                size: 1 << 30,
                primary: 1,
                backup: Some(2),
                generation: 1,
                pools: Default::default(),
                backup_synced: false,
                clone_of: None,
                uid: 0,
                image: None,
            }),
            Command::SetDiskReplicas {
                name: "d0".into(),
                primary: 2,
                backup: Some(1),
                generation: 2,
            },
            Command::PutVm(VmRecord {
                name: "vm0".into(),
                memory_mib: 512,
                vcpus: 1,
                disks: vec!["d0".into()],
                running: true,
                kernel: String::new(),
                initrd: String::new(),
                cmdline: String::new(),
                id: 1,
                owner: None,
                graceful_stop: false,
                cdrom: None,
                boot: BootMode::Kernel,
                boot_order: BootOrder::DiskFirst,
                disk_bus: Default::default(),
                moving: None,
                backup_schedule: None,
                last_backup_ms: 0,
                nics: Vec::new(),
            }),
        ];
        // What an agent holds: the state as a heartbeat carried it (no users, sessions, audit).
        let mut held: StateMachine =
            serde_json::from_value(serde_json::to_value(&sm).unwrap()).unwrap();
        let from = w.len();
        for c in &cmds {
            sm.apply(c, &mut w).unwrap();
        }
        // The same writes as a heartbeat's changes make the state after them, a removal too.
        let changes: Vec<RecordChange> = w[from..]
            .iter()
            .filter_map(|write| RecordChange::of(write).unwrap())
            .collect();
        assert!(changes.iter().any(|c| c.key == "kv/a" && c.value.is_none()));
        for c in &changes {
            held.apply_change(c).unwrap();
        }
        assert_eq!(
            serde_json::to_value(&held).unwrap(),
            serde_json::to_value(&sm).unwrap()
        );
        replay(&mut records, w);
        let loaded = StateMachine::load(&records.into_iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(loaded, sm);
        assert_eq!(loaded.kv.get("b").map(String::as_str), Some("3"));
        assert_eq!(loaded.disks["d0"].generation, 2);
    }

    #[test]
    fn commands_that_do_not_fit_are_refused_without_writes() {
        let mut sm = StateMachine::default();
        let mut w = Vec::new();
        sm.add_server(&server(1, false), &mut w);
        sm.add_server(&server(2, false), &mut w);
        sm.add_server(&server(3, true), &mut w);
        w.clear();
        let disk = |primary, backup| DiskRecord {
            name: "d".into(),
            size: 1,
            primary,
            backup,
            generation: 5,
            pools: Default::default(),
            backup_synced: false,
            clone_of: None,
            uid: 0,
            image: None,
        };
        assert!(sm
            .apply(&Command::CreateDisk(disk(1, Some(3))), &mut w)
            .unwrap_err()
            .reason
            .contains("witness"));
        assert!(sm
            .apply(&Command::CreateDisk(disk(1, Some(1))), &mut w)
            .is_err());
        assert!(sm
            .apply(&Command::CreateDisk(disk(1, Some(9))), &mut w)
            .is_err());
        assert!(w.is_empty());
        sm.apply(&Command::CreateDisk(disk(1, Some(2))), &mut w)
            .unwrap();
        let lower = Command::SetDiskReplicas {
            name: "d".into(),
            primary: 2,
            backup: None,
            generation: 5,
        };
        assert!(sm
            .apply(&lower, &mut w)
            .unwrap_err()
            .reason
            .contains("generation"));
        assert!(sm
            .apply(&Command::DeleteVm { name: "x".into() }, &mut w)
            .is_err());
        let cas = Command::CompareAndSet {
            key: "k".into(),
            expected: Some("x".into()),
            value: Some("y".into()),
        };
        assert_eq!(sm.apply(&cas, &mut w).unwrap()["set"], false);
        assert_eq!(
            w.len(),
            2,
            "only the disk (and the identity counter) was written"
        );
    }
}
