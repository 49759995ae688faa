//! What the state machine's tests share: a person's change as the API sends it, a new user, a
//! new VM, a server, and writes replayed the way storage does.

use std::collections::BTreeMap;

use super::{Action, Capacity, Command, NewVm, Outcome, ServerRecord, StateMachine};
use crate::access::{Quota, Role};
use crate::storage::RecordWrite;

/// A person's change, as a Raft command from the API would carry it.
pub(super) fn act(sm: &mut StateMachine, actor: u64, action: Action) -> Outcome {
    let mut w = Vec::new();
    sm.apply(
        &Command::Act {
            actor,
            at_ms: 5,
            action,
        },
        &mut w,
    )
}

/// Creating a user (password hash "h").
pub(super) fn new_user(
    name: &str,
    role: Role,
    parent: Option<u64>,
    quota: Option<Quota>,
) -> Action {
    Action::CreateUser {
        name: name.into(),
        role,
        password: "h".into(),
        parent,
        quota,
    }
}

/// A small stopped VM that boots the kernel `/k`, with a card on each of `networks`.
pub(super) fn new_vm(name: &str, networks: &[&str]) -> NewVm {
    NewVm {
        name: name.into(),
        memory_mib: 64,
        vcpus: 1,
        disk_size: 1 << 20,
        extra_disks: Vec::new(),
        kernel: "/k".into(),
        initrd: String::new(),
        cmdline: String::new(),
        running: false,
        boot: Default::default(),
        boot_order: Default::default(),
        disk_bus: Default::default(),
        cdrom: None,
        networks: networks.iter().map(|n| n.to_string()).collect(),
        appliance: None,
    }
}

/// Server `id` (a witness or not), offering nothing yet.
pub(super) fn server(id: u64, witness: bool) -> ServerRecord {
    ServerRecord {
        id,
        address: format!("127.0.0.1:{}", 7000 + id),
        witness,
        capacity: Capacity::default(),
        mirror: String::new(),
        down: false,
        draining: false,
        cert: String::new(),
    }
}

/// Servers 1 and 2, each offering 4 GiB of memory, 12 GiB of disk and 4 vCPUs.
pub(super) fn two_servers_with_room(sm: &mut StateMachine) {
    servers_with_room(sm, 2);
}

/// Servers 1 to `n`, each with room for a few VMs.
pub(super) fn servers_with_room(sm: &mut StateMachine, n: u64) {
    let mut w = Vec::new();
    for id in 1..=n {
        let mut s = server(id, false);
        s.capacity = Capacity {
            memory_mib: 4096,
            disk_gib: 12,
            vcpus: 4,
            pools: Vec::new(),
        };
        sm.add_server(&s, &mut w);
    }
}

/// Applies `writes` to a record list the way storage does.
pub(super) fn replay(records: &mut BTreeMap<Vec<u8>, Vec<u8>>, writes: Vec<RecordWrite>) {
    for (k, v) in writes {
        match v {
            Some(v) => records.insert(k, v),
            None => records.remove(&k),
        };
    }
}
