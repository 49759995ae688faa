//! The cluster's state machine: every committed command is applied here, in log order, on every
//! server, so every server holds the same records.
//!
//! Records are kept in memory and written to RocksDB (`sm/<kind>/<name>`, JSON) in the same
//! batch as the applied index (see `storage`). Applying is deterministic: a command that does
//! not fit the current state is rejected with a reason, identically everywhere.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::storage::{Record, RecordWrite};

/// What a server offers to VMs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Memory for guests, MiB.
    #[serde(default)]
    pub memory_mib: u64,
    /// Disk space for replicated disks, GiB.
    #[serde(default)]
    pub disk_gib: u64,
    /// vCPUs for guests.
    #[serde(default)]
    pub vcpus: u32,
}

/// A member of the Raft group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRecord {
    /// Raft id, unique in the cluster.
    pub id: u64,
    /// Address other servers and clients reach it on, host:port.
    pub address: String,
    /// A witness votes but runs no VMs (the third vote of a two-server site).
    #[serde(default)]
    pub witness: bool,
    /// What it offers to VMs (nothing for a witness).
    #[serde(default)]
    pub capacity: Capacity,
}

/// A replicated (LiveSync) disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// Name, the same on both servers.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// The server holding the primary copy.
    pub primary: u64,
    /// The server holding the backup copy, if any.
    #[serde(default)]
    pub backup: Option<u64>,
    /// Raised only by a committed command; mirror frames from an older generation are refused.
    pub generation: u64,
}

/// A virtual machine, minimal for now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// Name, unique in the cluster.
    pub name: String,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Its disks, by name.
    #[serde(default)]
    pub disks: Vec<String>,
    /// Whether it should be running.
    #[serde(default)]
    pub running: bool,
}

/// A change to the cluster's state, proposed through Raft and applied once committed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Sets a key (tests, small settings). Answers the previous value.
    Put {
        /// The key.
        key: String,
        /// The new value.
        value: String,
    },
    /// Deletes a key. Answers the previous value.
    Delete {
        /// The key.
        key: String,
    },
    /// Sets a key only if it holds `expected` (`None`: absent). Answers whether it did, and the
    /// value before.
    CompareAndSet {
        /// The key.
        key: String,
        /// The value it must hold.
        expected: Option<String>,
        /// The new value (`None` deletes).
        value: Option<String>,
    },
    /// Changes what a member offers.
    SetCapacity {
        /// The server.
        id: u64,
        /// What it now offers.
        capacity: Capacity,
    },
    /// Creates a disk record.
    CreateDisk(DiskRecord),
    /// Moves a disk's copies; the generation must rise.
    SetDiskReplicas {
        /// The disk.
        name: String,
        /// The new primary.
        primary: u64,
        /// The new backup.
        backup: Option<u64>,
        /// The new generation, above the current one.
        generation: u64,
    },
    /// Deletes a disk record.
    DeleteDisk {
        /// The disk.
        name: String,
    },
    /// Creates or replaces a VM record.
    PutVm(VmRecord),
    /// Deletes a VM record.
    DeleteVm {
        /// The VM.
        name: String,
    },
}

/// A read of the applied state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "query", rename_all = "snake_case")]
pub enum Query {
    /// One key's value (null when absent).
    Get {
        /// The key.
        key: String,
    },
    /// Every record.
    State,
}

/// The result of applying a command: a value, or a reason it was refused (the same on every
/// server, since applying is deterministic).
pub type Outcome = Result<Value, String>;

/// The applied state.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StateMachine {
    /// Key/value section.
    pub kv: BTreeMap<String, String>,
    /// Members, by Raft id.
    pub servers: BTreeMap<u64, ServerRecord>,
    /// Replicated disks, by name.
    pub disks: BTreeMap<String, DiskRecord>,
    /// VMs, by name.
    pub vms: BTreeMap<String, VmRecord>,
}

/// What went wrong loading the stored records.
#[derive(Debug, thiserror::Error)]
#[error("state machine record {key}: {what}")]
pub struct LoadError {
    key: String,
    what: String,
}

fn server_key(id: u64) -> Vec<u8> {
    format!("server/{id:020}").into_bytes()
}

fn json_bytes<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

impl StateMachine {
    /// Rebuilds the state from its stored records (`storage::RaftStore::records`).
    pub fn load(records: &[Record]) -> Result<StateMachine, LoadError> {
        let mut sm = StateMachine::default();
        for (k, v) in records {
            let key = String::from_utf8_lossy(k).into_owned();
            let err = |what: String| LoadError {
                key: key.clone(),
                what,
            };
            let (kind, name) = key.split_once('/').ok_or_else(|| err("no kind".into()))?;
            match kind {
                "kv" => {
                    let value = String::from_utf8(v.clone()).map_err(|e| err(e.to_string()))?;
                    sm.kv.insert(name.to_string(), value);
                }
                "server" => {
                    let s: ServerRecord =
                        serde_json::from_slice(v).map_err(|e| err(e.to_string()))?;
                    sm.servers.insert(s.id, s);
                }
                "disk" => {
                    let d: DiskRecord =
                        serde_json::from_slice(v).map_err(|e| err(e.to_string()))?;
                    sm.disks.insert(d.name.clone(), d);
                }
                "vm" => {
                    let vm: VmRecord = serde_json::from_slice(v).map_err(|e| err(e.to_string()))?;
                    sm.vms.insert(vm.name.clone(), vm);
                }
                _ => return Err(err("unknown kind".into())),
            }
        }
        Ok(sm)
    }

    /// The records of a new cluster's first state: its first server.
    pub fn initial_records(first: &ServerRecord) -> Vec<Record> {
        vec![(server_key(first.id), json_bytes(first))]
    }

    /// Applies one committed command; the record changes go to `writes`.
    pub fn apply(&mut self, cmd: &Command, writes: &mut Vec<RecordWrite>) -> Outcome {
        match cmd {
            Command::Put { key, value } => {
                let prev = self.kv.insert(key.clone(), value.clone());
                writes.push((
                    format!("kv/{key}").into_bytes(),
                    Some(value.clone().into_bytes()),
                ));
                Ok(json!({ "previous": prev }))
            }
            Command::Delete { key } => {
                let prev = self.kv.remove(key);
                writes.push((format!("kv/{key}").into_bytes(), None));
                Ok(json!({ "previous": prev }))
            }
            Command::CompareAndSet {
                key,
                expected,
                value,
            } => {
                let current = self.kv.get(key).cloned();
                if current != *expected {
                    return Ok(json!({ "set": false, "previous": current }));
                }
                match value {
                    Some(v) => {
                        self.kv.insert(key.clone(), v.clone());
                        writes.push((
                            format!("kv/{key}").into_bytes(),
                            Some(v.clone().into_bytes()),
                        ));
                    }
                    None => {
                        self.kv.remove(key);
                        writes.push((format!("kv/{key}").into_bytes(), None));
                    }
                }
                Ok(json!({ "set": true, "previous": current }))
            }
            Command::SetCapacity { id, capacity } => {
                let s = self
                    .servers
                    .get_mut(id)
                    .ok_or_else(|| format!("no server {id}"))?;
                if s.witness && *capacity != Capacity::default() {
                    return Err(format!("server {id} is a witness: it runs no VMs"));
                }
                s.capacity = capacity.clone();
                writes.push((server_key(*id), Some(json_bytes(s))));
                Ok(Value::Null)
            }
            Command::CreateDisk(d) => {
                if self.disks.contains_key(&d.name) {
                    return Err(format!("disk {} exists", d.name));
                }
                self.check_replicas(&d.name, d.primary, d.backup)?;
                writes.push((format!("disk/{}", d.name).into_bytes(), Some(json_bytes(d))));
                self.disks.insert(d.name.clone(), d.clone());
                Ok(Value::Null)
            }
            Command::SetDiskReplicas {
                name,
                primary,
                backup,
                generation,
            } => {
                self.check_replicas(name, *primary, *backup)?;
                let d = self
                    .disks
                    .get_mut(name)
                    .ok_or_else(|| format!("no disk {name}"))?;
                if *generation <= d.generation {
                    return Err(format!(
                        "disk {name}: generation {generation} is not above the current {}",
                        d.generation
                    ));
                }
                d.primary = *primary;
                d.backup = *backup;
                d.generation = *generation;
                writes.push((format!("disk/{name}").into_bytes(), Some(json_bytes(d))));
                Ok(json!({ "generation": generation }))
            }
            Command::DeleteDisk { name } => {
                if let Some(vm) = self.vms.values().find(|vm| vm.disks.contains(name)) {
                    return Err(format!("disk {name} belongs to VM {}", vm.name));
                }
                self.disks
                    .remove(name)
                    .ok_or_else(|| format!("no disk {name}"))?;
                writes.push((format!("disk/{name}").into_bytes(), None));
                Ok(Value::Null)
            }
            Command::PutVm(vm) => {
                if let Some(d) = vm.disks.iter().find(|d| !self.disks.contains_key(*d)) {
                    return Err(format!("VM {}: no disk {d}", vm.name));
                }
                writes.push((format!("vm/{}", vm.name).into_bytes(), Some(json_bytes(vm))));
                self.vms.insert(vm.name.clone(), vm.clone());
                Ok(Value::Null)
            }
            Command::DeleteVm { name } => {
                self.vms
                    .remove(name)
                    .ok_or_else(|| format!("no VM {name}"))?;
                writes.push((format!("vm/{name}").into_bytes(), None));
                Ok(Value::Null)
            }
        }
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

    /// Records a member added by a committed conf change.
    pub fn add_server(&mut self, s: &ServerRecord, writes: &mut Vec<RecordWrite>) {
        writes.push((server_key(s.id), Some(json_bytes(s))));
        self.servers.insert(s.id, s.clone());
    }

    /// Forgets a member removed by a committed conf change.
    pub fn remove_server(&mut self, id: u64, writes: &mut Vec<RecordWrite>) {
        if self.servers.remove(&id).is_some() {
            writes.push((server_key(id), None));
        }
    }

    /// Answers a read.
    pub fn query(&self, q: &Query) -> Value {
        match q {
            Query::Get { key } => json!({ "value": self.kv.get(key) }),
            Query::State => serde_json::to_value(self).expect("state serializes"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(id: u64, witness: bool) -> ServerRecord {
        ServerRecord {
            id,
            address: format!("127.0.0.1:{}", 7000 + id),
            witness,
            capacity: Capacity::default(),
        }
    }

    /// Applies `writes` to a record list the way storage does.
    fn replay(records: &mut BTreeMap<Vec<u8>, Vec<u8>>, writes: Vec<RecordWrite>) {
        for (k, v) in writes {
            match v {
                Some(v) => records.insert(k, v),
                None => records.remove(&k),
            };
        }
    }

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
            }),
        ];
        for c in &cmds {
            sm.apply(c, &mut w).unwrap();
        }
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
        };
        assert!(sm
            .apply(&Command::CreateDisk(disk(1, Some(3))), &mut w)
            .unwrap_err()
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
        assert!(sm.apply(&lower, &mut w).unwrap_err().contains("generation"));
        assert!(sm
            .apply(&Command::DeleteVm { name: "x".into() }, &mut w)
            .is_err());
        let cas = Command::CompareAndSet {
            key: "k".into(),
            expected: Some("x".into()),
            value: Some("y".into()),
        };
        assert_eq!(sm.apply(&cas, &mut w).unwrap()["set"], false);
        assert_eq!(w.len(), 1, "only the disk was written");
    }

    #[test]
    fn commands_round_trip_as_json() {
        let c = Command::Put {
            key: "k".into(),
            value: "v".into(),
        };
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(s, r#"{"cmd":"put","key":"k","value":"v"}"#);
        assert_eq!(serde_json::from_str::<Command>(&s).unwrap(), c);
        assert!(serde_json::from_str::<Command>(r#"{"cmd":"launch_missiles"}"#).is_err());
    }
}
