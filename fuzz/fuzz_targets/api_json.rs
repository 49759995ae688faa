//! The control plane's JSON on untrusted bytes: the client protocol's requests and answers
//! (`control::api::Request`, `Response`), the Raft log's commands (`state_machine::Command`)
//! and the changes people ask for (`state_machine::Action`), then the state machine applying
//! whatever parsed.
//!
//! Input: JSON documents, one a line (at most 32). Each line is tried as each type; a value
//! that parses serializes back to JSON that parses to the same value. Commands, actions (as the
//! cluster itself, actor 0, or as the actor the line before named) and the requests that carry
//! or imply a change are applied in order to one state machine, which starts as a three-server
//! cluster with room for VMs; queries are answered. Applying never panics, and at the end the
//! records the applies wrote load back into the same state.
//!
//! A line may also be a record change as a heartbeat carries it (`RecordChange`), applied to
//! a copy of the state as an agent holds it: never a panic. And the changes the applies wrote,
//! applied to the state as an agent held it at the start, make the state at the end, as a
//! heartbeat's answer shows it.

#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use control::api::{HeartbeatAnswer, Request, Response};
use control::state_machine::{Action, Command, Query, RecordChange, StateMachine};
use control::storage::RecordWrite;
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

const MAX_LINES: usize = 32;

/// A cluster state and the records it is stored as.
#[derive(Clone)]
struct Cluster {
    sm: StateMachine,
    records: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The writes a heartbeat would carry as changes, in order.
    changes: Vec<RecordChange>,
}

impl Cluster {
    fn write(&mut self, writes: Vec<RecordWrite>) {
        for write in &writes {
            if let Some(c) = RecordChange::of(write).expect("records are text") {
                self.changes.push(c);
            }
        }
        for (k, v) in writes {
            match v {
                Some(v) => self.records.insert(k, v),
                None => self.records.remove(&k),
            };
        }
    }

    fn apply(&mut self, cmd: &Command) {
        let mut writes = Vec::new();
        let _ = self.sm.apply(cmd, &mut writes);
        self.write(writes);
    }
}

/// Two servers that hold VMs and a witness, as a new cluster has them once all joined.
fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let (sm, first) = enspeed_fuzz::first_server();
        let mut c = Cluster {
            sm,
            records: first.into_iter().collect(),
            changes: Vec::new(),
        };
        for s in [
            enspeed_fuzz::server(2, false),
            enspeed_fuzz::server(3, true),
        ] {
            let mut writes = Vec::new();
            c.sm.add_server(&s, &mut writes);
            c.write(writes);
        }
        c.changes.clear();
        c
    })
}

/// The state as a heartbeat carries it whole: without users, sessions or the audit log.
fn as_carried(sm: &StateMachine) -> StateMachine {
    serde_json::from_value(serde_json::to_value(sm).expect("a state serializes"))
        .expect("a state carried reads back")
}

/// `line` as a `T`, if it is one; a value that parses round-trips through JSON.
fn parse<T>(line: &[u8]) -> Option<T>
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    let value: T = serde_json::from_slice(line).ok()?;
    let json = serde_json::to_vec(&value).expect("a parsed value serializes");
    match serde_json::from_slice::<T>(&json) {
        Ok(back) => assert_eq!(
            back,
            value,
            "{} does not read back",
            String::from_utf8_lossy(&json)
        ),
        Err(e) => panic!("{} does not parse: {e}", String::from_utf8_lossy(&json)),
    }
    Some(value)
}

fuzz_target!(|data: &[u8]| {
    let mut c = cluster().clone();
    let held = as_carried(&c.sm);
    let mut hostile = held.clone();
    let mut actor = 0;
    for line in data.split(|&b| b == b'\n').take(MAX_LINES) {
        if let Some(req) = parse::<Request>(line) {
            let mut writes = Vec::new();
            match req {
                Request::Propose { command } => c.apply(&command),
                Request::Put { key, value } => c.apply(&Command::Put { key, value }),
                Request::Get { key } => {
                    c.sm.query(&Query::Get { key });
                }
                Request::Read { query, .. } => {
                    c.sm.query(&query);
                }
                Request::AddServer { server } => c.sm.add_server(&server, &mut writes),
                Request::RemoveServer { id } => c.sm.remove_server(id, &mut writes),
                _ => {}
            }
            c.write(writes);
        }
        let _ = parse::<Response>(line);
        let _ = parse::<HeartbeatAnswer>(line);
        if let Some(change) = parse::<RecordChange>(line) {
            let _ = hostile.apply_change(&change);
        }
        if let Some(cmd) = parse::<Command>(line) {
            if let Command::Act { actor: a, .. } = &cmd {
                actor = *a;
            }
            c.apply(&cmd);
        }
        if let Some(action) = parse::<Action>(line) {
            c.apply(&Command::Act {
                actor,
                at_ms: 1_700_000_000_000,
                action,
            });
        }
    }
    let mut agent = held;
    for change in &c.changes {
        agent
            .apply_change(change)
            .unwrap_or_else(|e| panic!("{change:?} does not apply: {e}"));
    }
    assert_eq!(
        serde_json::to_value(&agent).unwrap(),
        serde_json::to_value(&c.sm).unwrap(),
        "the changes written do not make the state"
    );
    let records: Vec<_> = c.records.into_iter().collect();
    let loaded = StateMachine::load(&records).expect("the records written load");
    assert_eq!(loaded, c.sm, "the stored records load into another state");
});
