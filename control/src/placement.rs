//! Placement: which servers hold a new VM's disk copies, and which server becomes a disk's
//! backup when it has none. Pure functions of the applied state, so the state machine can run
//! them while applying a command and get the same answer on every server.
//!
//! A VM runs where its disk's primary is and fails over to its backup, so both servers reserve
//! its memory; each copy reserves the disk's size in one pool of its server.

use std::collections::BTreeMap;

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

/// Places a VM whose disks start from data already on some servers (a clone's source, an
/// appliance's images): its primary on the roomiest of `primaries` with room, so the copy is
/// local; its backup on the roomiest other server.
pub fn place_on(
    sm: &StateMachine,
    primaries: &[u64],
    memory_mib: u64,
    size: u64,
) -> Result<Placement, String> {
    let c = candidates(sm, memory_mib, size);
    let p = c
        .iter()
        .find(|(id, _)| primaries.contains(id))
        .ok_or_else(|| {
            format!(
                "no server of {primaries:?} (where its data is) has room for {memory_mib} MiB and a {size}-byte disk"
            )
        })?;
    let b = c.iter().find(|(id, _)| *id != p.0).ok_or_else(|| {
        format!("no other server has room for {memory_mib} MiB and a {size}-byte disk")
    })?;
    Ok(Placement {
        primary: p.clone(),
        backup: b.clone(),
    })
}

/// The pools of server `server` for new copies of `disks` (one each, in order) of a VM of
/// `memory_mib`: the server must take copies (a member, up, not a witness, not draining) and have
/// room for the VM's memory and every copy, the roomiest pool first.
pub fn place_copies_on(
    sm: &StateMachine,
    server: u64,
    memory_mib: u64,
    disks: &[&DiskRecord],
) -> Result<Vec<String>, String> {
    let s = sm
        .servers
        .get(&server)
        .ok_or_else(|| format!("no server {server}"))?;
    if !eligible(s) {
        return Err(format!(
            "server {server} takes no copies ({})",
            if s.witness {
                "a witness"
            } else if s.down {
                "down"
            } else {
                "being drained"
            }
        ));
    }
    let free = s
        .capacity
        .memory_mib
        .saturating_sub(memory_used(sm, server));
    if free < memory_mib {
        return Err(format!(
            "server {server} has {free} MiB free for VMs; this one takes {memory_mib}"
        ));
    }
    // Each pool's free space, less what the copies placed before took.
    let mut taken: BTreeMap<String, u64> = BTreeMap::new();
    let mut out = Vec::new();
    for d in disks {
        let pool = s
            .capacity
            .pools()
            .into_iter()
            .filter_map(|p| {
                let free = (p.disk_gib * GIB)
                    .checked_sub(pool_used(sm, server, &p.path))?
                    .checked_sub(taken.get(&p.path).copied().unwrap_or(0))?;
                (free >= d.size).then_some((p.path, free))
            })
            .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0)))
            .map(|(p, _)| p)
            .ok_or_else(|| {
                format!(
                    "server {server} has no pool with room for disk {} ({} bytes)",
                    d.name, d.size
                )
            })?;
        *taken.entry(pool.clone()).or_default() += d.size;
        out.push(pool);
    }
    Ok(out)
}

/// Checks that every copy of the disks in `growth` (a disk and the bytes it grows by) has
/// room in its pool for what they grow by together.
pub fn check_room_to_grow(sm: &StateMachine, growth: &[(&DiskRecord, u64)]) -> Result<(), String> {
    let mut wanted: BTreeMap<(u64, &str), u64> = BTreeMap::new();
    for (d, more) in growth {
        for id in std::iter::once(d.primary).chain(d.backup) {
            let pool = d
                .pools
                .get(&id)
                .ok_or_else(|| format!("disk {}: no pool recorded on server {id}", d.name))?;
            *wanted.entry((id, pool.as_str())).or_default() += more;
        }
    }
    for ((id, pool), more) in wanted {
        let capacity = sm
            .servers
            .get(&id)
            .and_then(|s| s.capacity.pools().into_iter().find(|p| p.path == pool))
            .map_or(0, |p| p.disk_gib * GIB);
        let free = capacity.saturating_sub(pool_used(sm, id, pool));
        if free < more {
            return Err(format!(
                "server {id}'s pool {pool} has {free} bytes free; growing the disks takes {more}"
            ));
        }
    }
    Ok(())
}

/// Checks that the servers and pools of `first` (a VM's first disk) hold `size` more bytes
/// on each copy, for a disk added beside it.
pub fn check_room_beside(sm: &StateMachine, first: &DiskRecord, size: u64) -> Result<(), String> {
    for id in std::iter::once(first.primary).chain(first.backup) {
        let pool = first
            .pools
            .get(&id)
            .ok_or_else(|| format!("disk {}: no pool recorded on server {id}", first.name))?;
        let capacity = sm
            .servers
            .get(&id)
            .and_then(|s| s.capacity.pools().into_iter().find(|p| &p.path == pool))
            .map_or(0, |p| p.disk_gib * GIB);
        let free = capacity.saturating_sub(pool_used(sm, id, pool));
        if free < size {
            return Err(format!(
                "server {id}'s pool {pool} has {free} bytes free, {size} asked beside disk {}",
                first.name
            ));
        }
    }
    Ok(())
}

/// A new backup for `disk` (which has none): the roomiest server other than its primary, or
/// None while no server has room. A VM's other disks follow its first: theirs goes where the
/// first disk's backup is (None until it has one), so the VM's disks fail over together.
pub fn pick_backup(sm: &StateMachine, disk: &DiskRecord) -> Option<(u64, String)> {
    let vm = sm.vms.values().find(|vm| vm.disks.contains(&disk.name));
    if let Some(vm) = vm.filter(|vm| vm.disks.first() != Some(&disk.name)) {
        let first = vm.disks.first().and_then(|d| sm.disks.get(d))?;
        let b = first.backup.filter(|b| *b != disk.primary)?;
        let s = sm.servers.get(&b).filter(|s| eligible(s))?;
        return best_pool(sm, s, disk.size).map(|(pool, _)| (b, pool));
    }
    let memory = vm.map_or(0, |vm| vm.memory_mib);
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
                    cert: String::new(),
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
        create_with(sm, name, memory_mib, &[gib])
    }

    /// Creates VM `name` with a disk of each of `gib`.
    fn create_with(
        sm: &mut StateMachine,
        name: &str,
        memory_mib: u64,
        gib: &[u64],
    ) -> Result<serde_json::Value, String> {
        sm.apply(
            &Command::CreateVm(NewVm {
                name: name.into(),
                memory_mib,
                vcpus: 1,
                disk_size: gib[0] * GIB,
                extra_disks: gib[1..].iter().map(|g| g * GIB).collect(),
                kernel: "/k".into(),
                initrd: String::new(),
                cmdline: String::new(),
                running: true,
                boot: Default::default(),
                boot_order: Default::default(),
                disk_bus: Default::default(),
                cdrom: None,
                networks: Vec::new(),
                appliance: None,
            }),
            &mut Vec::new(),
        )
        .map_err(|r| r.reason)
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
        for id in 1..=3 {
            sm.servers.get_mut(&id).unwrap().capacity.disk_gib = 10;
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

    #[test]
    fn a_vms_disks_share_two_servers_and_move_together() {
        let mut sm = cluster(&[
            (1, false, 4096, &[("/vms", 40)]),
            (2, false, 4096, &[("/vms", 40)]),
            (3, false, 4096, &[("/vms", 40)]),
        ]);
        // Four disks of 10 GiB fit one pool of 40 only all together; a fifth is refused.
        assert!(create_with(&mut sm, "x", 64, &[1; 5])
            .unwrap_err()
            .contains("1 to 4"));
        assert!(create_with(&mut sm, "x", 64, &[1, 0])
            .unwrap_err()
            .contains("Disk1"));
        let r = create_with(&mut sm, "a", 1024, &[10, 20]).unwrap();
        assert_eq!(r["disks"], serde_json::json!(["a-0", "a-1"]));
        let (d0, d1) = (sm.disks["a-0"].clone(), sm.disks["a-1"].clone());
        assert_eq!(
            (d1.size, d1.primary, d1.backup),
            (20 * GIB, d0.primary, d0.backup)
        );
        assert_eq!(sm.vm_primary(&sm.vms["a"]), Some(d0.primary));

        // A disk added beside them: same servers; no more than the pools hold, nor past Disk3.
        let vm = sm.vms["a"].clone();
        let mut new = vm.clone();
        let mut w = Vec::new();
        assert!(sm
            .add_disks(&mut new, &[11 * GIB], &mut w)
            .unwrap_err()
            .reason
            .contains("free"));
        assert!(sm
            .add_disks(&mut new, &[GIB; 3], &mut w)
            .unwrap_err()
            .reason
            .contains("Disk3"));
        assert!(
            w.is_empty() && new == vm,
            "a refused addition changes nothing"
        );
        sm.add_disks(&mut new, &[5 * GIB], &mut w).unwrap();
        assert_eq!(new.disks, ["a-0", "a-1", "a-2"]);
        let d2 = &sm.disks["a-2"];
        assert_eq!(
            (d2.primary, d2.backup, &d2.pools),
            (d0.primary, d0.backup, &d0.pools)
        );
        sm.vms.insert("a".into(), new);

        // The primary fails while Disk2 is still syncing: no disk of the VM moves (it would be
        // split over two servers), the VM waits for its server.
        for d in ["a-0", "a-1"] {
            sm.disks.get_mut(d).unwrap().backup_synced = true;
        }
        let mut down = sm.clone();
        let r = down.server_down(d0.primary, &mut Vec::new());
        assert_eq!(r["stranded"].as_array().unwrap().len(), 3, "{r}");
        assert_eq!(down.vm_primary(&down.vms["a"]), Some(d0.primary));
        // Once all three are in sync, all three move, to the same server.
        sm.disks.get_mut("a-2").unwrap().backup_synced = true;
        let r = sm.server_down(d0.primary, &mut Vec::new());
        assert_eq!(r["promoted"].as_array().unwrap().len(), 3, "{r}");
        assert_eq!(sm.vm_primary(&sm.vms["a"]), d0.backup);

        // Their new backups: the first disk's is picked; the others wait for it, then follow.
        sm.servers.get_mut(&d0.primary).unwrap().down = true;
        assert_eq!(pick_backup(&sm, &sm.disks["a-1"]), None);
        let (b, pool) = pick_backup(&sm, &sm.disks["a-0"]).unwrap();
        assert!(b != d0.primary && Some(b) != d0.backup);
        sm.apply(
            &Command::SetDiskBackup {
                name: "a-0".into(),
                backup: b,
                pool,
                generation: sm.disks["a-0"].generation,
            },
            &mut Vec::new(),
        )
        .unwrap();
        assert_eq!(pick_backup(&sm, &sm.disks["a-1"]).map(|x| x.0), Some(b));
        assert_eq!(pick_backup(&sm, &sm.disks["a-2"]).map(|x| x.0), Some(b));
    }
}
