//! The web API's JSON request bodies on untrusted bytes, through the checks the routes run
//! (`webui::bodies`), as each kind of user, and what they let through applied by the state
//! machine as that user.
//!
//! Input: lines (at most 16). A line's first byte chooses the endpoint (its low four bits: 0 to
//! 11 as in the match below, 12 to 15 a new user), the caller (the next two: the cluster's
//! Manager, a Power User, a Regular User of that Power User's company, or another company's
//! Power User) and the VM in the path (bit 6); the rest of the line is the body. The
//! state starts as a three-server cluster with those users, a VM of the Power User's and one
//! of the other company's, and a network; each action accepted is applied to it in order.
//!
//! What must hold: no panic; a body refused is refused with a client error (4xx), never a
//! server error; a VM created through the checks has its memory and vCPUs within the API's
//! bounds, and so do its disks where it is not made from an appliance (whose images give their
//! sizes); disks added or grown are within them; and at the end the records the applies wrote
//! load back into the same state.

#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use control::access::{Quota, Role};
use control::state_machine::{Action, Command, NewVm, StateMachine, MAX_VM_DISKS};
use control::storage::RecordWrite;
use libfuzzer_sys::fuzz_target;
use webui::bodies::{self, Ask, Asker, MAX_DISK_GIB, MAX_MEMORY_MIB, MAX_VCPUS};
use webui::GuestBoot;

const MAX_LINES: usize = 16;

/// A cluster state and the records it is stored as.
#[derive(Clone)]
struct Cluster {
    sm: StateMachine,
    records: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The callers: a Manager, a Power User, a Regular User under it, another Power User.
    users: [u64; 4],
    /// A VM of the first Power User's, and one of the other's.
    vms: [u64; 2],
}

impl Cluster {
    fn write(&mut self, writes: Vec<RecordWrite>) {
        for (k, v) in writes {
            match v {
                Some(v) => self.records.insert(k, v),
                None => self.records.remove(&k),
            };
        }
    }

    fn act(&mut self, actor: u64, action: Action) {
        let mut writes = Vec::new();
        let _ = self.sm.apply(
            &Command::Act {
                actor,
                at_ms: 1_700_000_000_000,
                action,
            },
            &mut writes,
        );
        self.write(writes);
    }

    fn user(&self, name: &str) -> u64 {
        let u = self.sm.users.values().find(|u| u.name == name);
        u.unwrap_or_else(|| panic!("user {name} was made")).id
    }

    fn vm(&self, name: &str) -> u64 {
        let vm = self.sm.vms.values().find(|v| v.name == name);
        vm.unwrap_or_else(|| panic!("VM {name} was made")).id
    }
}

fn new_user(name: &str, role: Role, parent: Option<u64>, quota: Option<Quota>) -> Action {
    Action::CreateUser {
        name: name.into(),
        role,
        password: "h".into(),
        parent,
        quota,
    }
}

fn new_vm(name: &str) -> NewVm {
    NewVm {
        name: name.into(),
        memory_mib: 256,
        vcpus: 1,
        disk_size: 1 << 30,
        extra_disks: Vec::new(),
        kernel: "/boot/vmlinuz".into(),
        initrd: String::new(),
        cmdline: String::new(),
        running: false,
        boot: Default::default(),
        boot_order: Default::default(),
        disk_bus: Default::default(),
        cdrom: None,
        networks: Vec::new(),
        appliance: None,
    }
}

/// The cluster the inputs start from.
fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let (sm, first) = enspeed_fuzz::first_server();
        let mut c = Cluster {
            sm,
            records: first.into_iter().collect(),
            users: [0; 4],
            vms: [0; 2],
        };
        for s in [
            enspeed_fuzz::server(2, false),
            enspeed_fuzz::server(3, true),
        ] {
            let mut writes = Vec::new();
            c.sm.add_server(&s, &mut writes);
            c.write(writes);
        }
        let quota = Some(Quota {
            vms: 8,
            memory_mib: 16 << 10,
            disk_gib: 256,
        });
        c.act(0, new_user("boss", Role::Manager, None, None));
        c.act(0, new_user("ann", Role::PowerUser, None, quota.clone()));
        let ann = c.user("ann");
        c.act(0, new_user("bob", Role::Regular, Some(ann), None));
        c.act(0, new_user("eve", Role::PowerUser, None, quota));
        c.users = [c.user("boss"), ann, c.user("bob"), c.user("eve")];
        let boss = c.users[0];
        c.act(
            boss,
            Action::CreateNetwork {
                network: control::state_machine::NetworkRecord {
                    name: "lan".into(),
                    bridge: "br-lan".into(),
                    uplink: None,
                    vlan: None,
                    subnet: Some("10.0.0.0/24".into()),
                    gateway: None,
                    dns: Vec::new(),
                    company: None,
                },
            },
        );
        c.act(
            boss,
            Action::CreateVm {
                owner: ann,
                vm: new_vm("web"),
            },
        );
        c.act(
            boss,
            Action::CreateVm {
                owner: c.users[3],
                vm: new_vm("db"),
            },
        );
        c.vms = [c.vm("web"), c.vm("db")];
        c
    })
}

fuzz_target!(|data: &[u8]| {
    let mut c = cluster().clone();
    let guest = GuestBoot {
        kernel: "/boot/vmlinuz".into(),
        initrd: String::new(),
        cmdline: "console=ttyS0".into(),
    };
    for line in data.split(|&b| b == b'\n').take(MAX_LINES) {
        let Some((&pick, body)) = line.split_first() else {
            continue;
        };
        let actor = c.users[usize::from(pick >> 4) & 3];
        let vm = c.vms[usize::from(pick >> 6) & 1];
        let vm_name =
            c.sm.vm_by_id(vm)
                .map(|v| v.name.clone())
                .unwrap_or_default();
        let ask = match pick & 0x0f {
            0 => Ask::CreateVm { guest: &guest },
            1 => Ask::Power { vm },
            2 => Ask::CopyBack { vm },
            3 => Ask::Backup {
                vm,
                vm_name: &vm_name,
                now_ms: 1_700_000_000_000,
            },
            4 => Ask::BackupSchedule { vm },
            5 => Ask::Clone { vm },
            6 => Ask::Migrate { vm },
            7 => Ask::Cdrom { vm },
            8 => Ask::EditVm { vm },
            9 => Ask::CreateNetwork,
            10 => Ask::EditAppliance { name: "tmpl" },
            11 => Ask::Download {
                name: "tmpl",
                here: 1,
            },
            _ => {
                // A new user, its password hashed as the route would ("h" here).
                let Some(user) = c.sm.users.get(&actor).cloned() else {
                    continue;
                };
                let by = Asker {
                    user: &user,
                    state: &c.sm,
                };
                match bodies::new_user(body, by) {
                    Ok(u) => c.act(actor, new_user(&u.name, u.role, u.parent, u.quota)),
                    Err(e) => assert!(e.status.is_client_error(), "{e:?}"),
                }
                continue;
            }
        };
        let Some(user) = c.sm.users.get(&actor).cloned() else {
            continue;
        };
        let by = Asker {
            user: &user,
            state: &c.sm,
        };
        match bodies::action(ask, body, by) {
            Ok(action) => {
                check_bounds(&action);
                c.act(actor, action);
            }
            Err(e) => assert!(e.status.is_client_error(), "a body refused as {e:?}"),
        }
    }
    let records: Vec<_> = c.records.into_iter().collect();
    let loaded = StateMachine::load(&records).expect("the records written load");
    assert_eq!(loaded, c.sm, "the stored records load into another state");
});

/// What the checks let through is within the API's bounds.
fn check_bounds(action: &Action) {
    let disk = |size: u64| (1 << 30..=MAX_DISK_GIB << 30).contains(&size);
    match action {
        Action::CreateVm { vm, .. } => {
            assert!((1..=MAX_MEMORY_MIB).contains(&vm.memory_mib), "{vm:?}");
            assert!((1..=MAX_VCPUS).contains(&vm.vcpus), "{vm:?}");
            assert!(vm.extra_disks.len() < MAX_VM_DISKS, "{vm:?}");
            if vm.appliance.is_none() {
                assert!(disk(vm.disk_size), "{vm:?}");
                assert!(vm.extra_disks.iter().all(|&s| disk(s)), "{vm:?}");
            }
        }
        Action::EditVm {
            add_disks,
            grow_disks,
            ..
        } => {
            assert!(add_disks.len() < MAX_VM_DISKS, "{add_disks:?}");
            assert!(add_disks.iter().all(|&s| disk(s)), "{add_disks:?}");
            assert!(grow_disks.iter().all(|g| disk(g.size)), "{grow_disks:?}");
        }
        _ => {}
    }
}
