//! Placement: which servers hold a new VM's disk copies, and which server becomes a disk's
//! backup when it has none. Pure functions of the applied state, so the state machine can run
//! them while applying a command and get the same answer on every server.
//!
//! A VM runs where its disk's primary is and fails over to its backup, so both servers reserve
//! its memory; each copy reserves the disk's size in one pool of its server.

use crate::state_machine::{DiskRecord, ServerRecord, StateMachine};

const GIB: u64 = 1 << 30;

/// Where a new VM's disk copies go: (server, pool) for each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The primary copy; the VM runs here.
    pub primary: (u64, String),
    /// The backup copy.
    pub backup: (u64, String),
}

/// Memory (MiB) the VMs with a copy on `server` reserve there.
fn memory_used(sm: &StateMachine, server: u64) -> u64 {
    sm.vms
        .values()
        .filter(|vm| {
            vm.disks
                .first()
                .and_then(|d| sm.disks.get(d))
                .is_some_and(|d| d.primary == server || d.backup == Some(server))
        })
        .map(|vm| vm.memory_mib)
        .sum()
}

/// Bytes the disk copies in `pool` of `server` reserve.
fn pool_used(sm: &StateMachine, server: u64, pool: &str) -> u64 {
    sm.disks
        .values()
        .filter(|d| d.pools.get(&server).is_some_and(|p| p == pool))
        .filter(|d| d.primary == server || d.backup == Some(server))
        .map(|d| d.size)
        .sum()
}

/// A server that may take a copy: a member that is not a witness and not down.
fn eligible(s: &ServerRecord) -> bool {
    !s.witness && !s.down && !s.draining
}

/// The pool of `s` with the most free space that holds `size` more bytes, and its free space.
fn best_pool(sm: &StateMachine, s: &ServerRecord, size: u64) -> Option<(String, u64)> {
    s.capacity
        .pools()
        .into_iter()
        .filter_map(|p| {
            let free = (p.disk_gib * GIB).checked_sub(pool_used(sm, s.id, &p.path))?;
            (free >= size).then_some((p.path, free))
        })
        .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0)))
}

/// Servers with room for `memory_mib` and a `size`-byte copy, the roomiest first (memory, then
/// pool space, then the lower id).
fn candidates(sm: &StateMachine, memory_mib: u64, size: u64) -> Vec<(u64, String)> {
    let mut c: Vec<(u64, u64, u64, String)> = sm
        .servers
        .values()
        .filter(|s| eligible(s))
        .filter_map(|s| {
            let free_mem = s.capacity.memory_mib.checked_sub(memory_used(sm, s.id))?;
            if free_mem < memory_mib {
                return None;
            }
            let (pool, free_disk) = best_pool(sm, s, size)?;
            Some((s.id, free_mem, free_disk, pool))
        })
        .collect();
    c.sort_by(|a, b| b.1.cmp(&a.1).then(b.2.cmp(&a.2)).then(a.0.cmp(&b.0)));
    c.into_iter().map(|(id, _, _, pool)| (id, pool)).collect()
}

/// Places a new VM of `memory_mib` with one disk of `size` bytes: the two roomiest servers.
pub fn place(sm: &StateMachine, memory_mib: u64, size: u64) -> Result<Placement, String> {
    let c = candidates(sm, memory_mib, size);
    match c.as_slice() {
        [p, b, ..] => Ok(Placement {
            primary: p.clone(),
            backup: b.clone(),
        }),
        _ => Err(format!(
            "no two servers (up, not witnesses) have room for {memory_mib} MiB and a {size}-byte disk; with room: {:?}",
            c.iter().map(|x| x.0).collect::<Vec<_>>()
        )),
    }
}

/// Places a clone's disk: its primary on `primary` (where the source's data is, so the copy is
/// local), if it has room; its backup on the roomiest other server.
pub fn place_on(
    sm: &StateMachine,
    primary: u64,
    memory_mib: u64,
    size: u64,
) -> Result<Placement, String> {
    let c = candidates(sm, memory_mib, size);
    let p = c.iter().find(|(id, _)| *id == primary).ok_or_else(|| {
        format!("server {primary} has no room for {memory_mib} MiB and a {size}-byte disk")
    })?;
    let b = c.iter().find(|(id, _)| *id != primary).ok_or_else(|| {
        format!("no other server has room for {memory_mib} MiB and a {size}-byte disk")
    })?;
    Ok(Placement {
        primary: p.clone(),
        backup: b.clone(),
    })
}

/// A new backup for `disk` (which has none): the roomiest server other than its primary, or
/// None while no server has room.
pub fn pick_backup(sm: &StateMachine, disk: &DiskRecord) -> Option<(u64, String)> {
    let memory = sm
        .vms
        .values()
        .filter(|vm| vm.disks.first() == Some(&disk.name))
        .map(|vm| vm.memory_mib)
        .sum();
    candidates(sm, memory, disk.size)
        .into_iter()
        .find(|(id, _)| *id != disk.primary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_machine::{Capacity, Command, NewVm, Pool};

    /// (id, witness, memory MiB, pools as (path, GiB)).
    type Spec<'a> = (u64, bool, u64, &'a [(&'a str, u64)]);

    fn cluster(servers: &[Spec]) -> StateMachine {
        let mut sm = StateMachine::default();
        let mut w = Vec::new();
        for &(id, witness, memory_mib, pools) in servers {
            sm.add_server(
                &ServerRecord {
                    id,
                    address: format!("10.0.0.{id}:7300"),
                    witness,
                    capacity: Capacity::default(),
                    mirror: String::new(),
                    down: false,
                    draining: false,
                },
                &mut w,
            );
            if !witness {
                let capacity = Capacity {
                    memory_mib,
                    disk_gib: 0,
                    vcpus: 4,
                    pools: pools
                        .iter()
                        .map(|(p, g)| Pool {
                            path: p.to_string(),
                            disk_gib: *g,
                        })
                        .collect(),
                };
                sm.apply(
                    &Command::Register {
                        id,
                        mirror: format!("10.0.0.{id}:7400"),
                        capacity,
                    },
                    &mut w,
                )
                .unwrap();
            }
        }
        sm
    }

    fn create(
        sm: &mut StateMachine,
        name: &str,
        memory_mib: u64,
        gib: u64,
    ) -> Result<serde_json::Value, String> {
        sm.apply(
            &Command::CreateVm(NewVm {
                name: name.into(),
                memory_mib,
                vcpus: 1,
                disk_size: gib * GIB,
                kernel: "/k".into(),
                initrd: String::new(),
                cmdline: String::new(),
                running: true,
                boot: Default::default(),
                boot_order: Default::default(),
                cdrom: None,
            }),
            &mut Vec::new(),
        )
    }

    #[test]
    fn copies_go_to_two_servers_with_room_never_a_witness() {
        let mut sm = cluster(&[
            (1, false, 4096, &[("/vms1", 100), ("/vms2", 50)]),
            (2, false, 8192, &[("/vms1", 200)]),
            (3, true, 0, &[]),
        ]);
        let r = create(&mut sm, "a", 2048, 60).unwrap();
        assert_eq!(
            (r["primary"].as_u64(), r["backup"].as_u64()),
            (Some(2), Some(1))
        );
        assert_eq!(r["backup_pool"], "/vms1");
        // Server 1's /vms1 holds 40 GiB more, /vms2 50: a 45 GiB copy goes to /vms2.
        let r = create(&mut sm, "b", 1024, 45).unwrap();
        assert_eq!(r["backup_pool"], "/vms2", "{r}");
        // Server 1 has 1024 MiB left: a VM of 2048 fits nowhere twice.
        assert!(create(&mut sm, "c", 2048, 1)
            .unwrap_err()
            .contains("no two servers"));
        // Nor does a disk larger than any pool.
        assert!(create(&mut sm, "d", 10, 101).is_err());
    }

    #[test]
    fn a_new_backup_is_never_the_primary_nor_a_down_server() {
        let mut sm = cluster(&[
            (1, false, 4096, &[]),
            (2, false, 4096, &[]),
            (3, false, 4096, &[]),
        ]);
        for s in sm.servers.values_mut() {
            s.capacity.disk_gib = 10;
        }
        create(&mut sm, "a", 1024, 1).unwrap();
        let mut d = sm.disks["a-0"].clone();
        d.backup = None;
        let b = pick_backup(&sm, &d).unwrap();
        assert_ne!(b.0, d.primary);
        sm.servers.get_mut(&b.0).unwrap().down = true;
        let b2 = pick_backup(&sm, &d).unwrap();
        assert!(b2.0 != b.0 && b2.0 != d.primary);
    }
}
