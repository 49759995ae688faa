//! Virtual machines: created (or cloned) with their disks placed, powered on and off, edited
//! while powered off, migrated to their backup server, deleted; and where each runs.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::keys::{disk_key, json_bytes, vm_key, COUNTERS_KEY};
use super::rights::Actor;
use super::{
    Acted, Action, ApplianceRecord, BootMode, DiskBus, DiskGrowth, DiskRecord, LiveMove,
    MoveOutcome, Nic, Outcome, RecordWrite, Refusal, StateMachine, VmRecord, MAX_DISK_BYTES,
    MAX_VM_DISKS, MAX_VM_MEMORY_MIB,
};
use crate::access;

impl StateMachine {
    /// Creates or replaces VM record `vm`, whose disks must exist (`Command::PutVm`).
    pub(super) fn put_vm_record(
        &mut self,
        vm: &VmRecord,
        writes: &mut Vec<RecordWrite>,
    ) -> Outcome {
        if let Some(d) = vm.disks.iter().find(|d| !self.disks.contains_key(*d)) {
            return Err(Refusal::conflict(format!("VM {}: no disk {d}", vm.name)));
        }
        writes.push((vm_key(&vm.name), Some(json_bytes(vm))));
        self.vms.insert(vm.name.clone(), vm.clone());
        Ok(Value::Null)
    }

    /// Deletes VM record `name`, leaving its disks (`Command::DeleteVm`).
    pub(super) fn delete_vm_record(
        &mut self,
        name: &str,
        writes: &mut Vec<RecordWrite>,
    ) -> Outcome {
        self.vms
            .remove(name)
            .ok_or_else(|| Refusal::not_found(format!("no VM {name}")))?;
        writes.push((vm_key(name), None));
        Ok(Value::Null)
    }

    /// Sets VM `name`'s desired power state (`Command::SetVmRunning`).
    pub(super) fn set_vm_running(
        &mut self,
        name: &str,
        running: bool,
        writes: &mut Vec<RecordWrite>,
    ) -> Outcome {
        let vm = self
            .vms
            .get_mut(name)
            .ok_or_else(|| Refusal::not_found(format!("no VM {name}")))?;
        vm.running = running;
        writes.push((vm_key(name), Some(json_bytes(vm))));
        Ok(Value::Null)
    }

    /// Creates `vm` (its id and disks filled in here) with a disk of each of `sizes` bytes,
    /// `NAME-0` to `NAME-3`, all placed on the same two servers with room (the VM moves as
    /// one). A clone's disks (`clone_of`, the source's, one for each size) are filled with the
    /// sources' data; a VM made from an appliance starts with its disk images, on a server
    /// holding them. Answers its VMID and placement.
    pub(super) fn create_vm(
        &mut self,
        mut vm: VmRecord,
        sizes: &[u64],
        clone_of: Option<&[DiskRecord]>,
        appliance: Option<&ApplianceRecord>,
        writes: &mut Vec<RecordWrite>,
    ) -> Outcome {
        let name = vm.name.clone();
        access::check_name("VM", &name)?;
        if self.vms.contains_key(&name) {
            return Err(Refusal::conflict(format!("VM {name} exists")));
        }
        if sizes.is_empty() || sizes.len() > MAX_VM_DISKS {
            return Err(Refusal::conflict(format!(
                "VM {name}: {} disks asked, 1 to {MAX_VM_DISKS}",
                sizes.len()
            )));
        }
        if let Some(i) = sizes.iter().position(|s| *s == 0) {
            return Err(Refusal::conflict(format!("VM {name}: Disk{i} has no size")));
        }
        let names: Vec<String> = (0..sizes.len()).map(|i| format!("{name}-{i}")).collect();
        if let Some(d) = names.iter().find(|d| self.disks.contains_key(*d)) {
            return Err(Refusal::conflict(format!("disk {d} exists")));
        }
        if let Some(iso) = &vm.cdrom {
            if !self.isos.contains_key(iso) {
                return Err(Refusal::not_found(format!("no ISO {iso} in the library")));
            }
        }
        if vm.boot == BootMode::Kernel && vm.kernel.is_empty() {
            return Err(Refusal::conflict(format!(
                "VM {name} boots the guest kernel, but none is given"
            )));
        }
        check_disk_bus(&vm)?;
        self.check_nics(&vm)?;
        self.lease_addresses(&mut vm)?;
        let images = self.appliance_images(&name, appliance, sizes)?;
        let total: u64 = sizes.iter().sum();
        let p = match (clone_of.and_then(|c| c.first()), appliance) {
            (Some(src), _) => {
                crate::placement::place_on(self, &[src.primary], vm.memory_mib, total)?
            }
            (None, Some(a)) => {
                let holders: Vec<u64> = a.servers.iter().copied().collect();
                crate::placement::place_on(self, &holders, vm.memory_mib, total)?
            }
            (None, None) => crate::placement::place(self, vm.memory_mib, total)?,
        };
        let mut pools = BTreeMap::new();
        pools.insert(p.primary.0, p.primary.1.clone());
        pools.insert(p.backup.0, p.backup.1.clone());
        self.counters.vm += 1;
        vm.id = self.counters.vm;
        vm.disks = names.clone();
        for nic in &mut vm.nics {
            nic.mac = self.next_mac();
        }
        writes.push((COUNTERS_KEY.to_vec(), Some(json_bytes(&self.counters))));
        for (i, (disk_name, size)) in names.iter().zip(sizes).enumerate() {
            let disk = DiskRecord {
                name: disk_name.clone(),
                size: *size,
                primary: p.primary.0,
                backup: Some(p.backup.0),
                generation: 1,
                pools: pools.clone(),
                backup_synced: false,
                clone_of: clone_of.and_then(|c| c.get(i)).map(|d| d.name.clone()),
                uid: self.next_disk_uid(writes),
                image: images.get(i).cloned(),
            };
            writes.push((disk_key(disk_name), Some(json_bytes(&disk))));
            self.disks.insert(disk_name.clone(), disk);
        }
        writes.push((vm_key(&name), Some(json_bytes(&vm))));
        let id = vm.id;
        self.vms.insert(name.clone(), vm);
        Ok(json!({
            "id": id,
            "disk": names[0],
            "disks": names,
            "primary": p.primary.0,
            "primary_pool": p.primary.1,
            "backup": p.backup.0,
            "backup_pool": p.backup.1,
        }))
    }

    /// The disk records of VM `v` that `growth` names, each with its new size, checked: each
    /// a disk it has, named once, growing (not shrinking) to at most MAX_DISK_BYTES, with room
    /// in every copy's pool. Changes nothing.
    fn disks_grown(
        &self,
        v: &VmRecord,
        growth: &[DiskGrowth],
    ) -> Result<Vec<(DiskRecord, u64)>, Refusal> {
        let (id, name) = (v.id, &v.name);
        let mut out: Vec<(DiskRecord, u64)> = Vec::new();
        for g in growth {
            let disk = v.disks.get(g.disk).ok_or_else(|| {
                Refusal::conflict(format!("VM {id} ({name}) has no Disk{}", g.disk))
            })?;
            let d = self
                .disks
                .get(disk)
                .ok_or_else(|| format!("VM {id} ({name}): no record of its disk {disk}"))?;
            if out.iter().any(|(o, _)| o.name == d.name) {
                return Err(Refusal::conflict(format!(
                    "VM {id} ({name}): Disk{} is grown twice",
                    g.disk
                )));
            }
            if g.size <= d.size || g.size > MAX_DISK_BYTES || g.size % 512 != 0 {
                return Err(Refusal::conflict(format!(
                    "VM {id} ({name}): Disk{} holds {} bytes; a disk only grows, to at most {} GiB ({} bytes asked)",
                    g.disk,
                    d.size,
                    MAX_DISK_BYTES >> 30,
                    g.size
                )));
            }
            out.push((d.clone(), g.size));
        }
        let growth: Vec<(&DiskRecord, u64)> =
            out.iter().map(|(d, size)| (d, size - d.size)).collect();
        crate::placement::check_room_to_grow(self, &growth)?;
        Ok(out)
    }

    /// Adds blank disks of `sizes` bytes to powered-off VM `vm` (its record `new`, changed in
    /// place), beside its first disk: on the same primary and backup, in the same pools.
    pub(crate) fn add_disks(
        &mut self,
        new: &mut VmRecord,
        sizes: &[u64],
        writes: &mut Vec<RecordWrite>,
    ) -> Result<(), Refusal> {
        let (id, name) = (new.id, new.name.clone());
        if new.disks.len() + sizes.len() > MAX_VM_DISKS {
            return Err(Refusal::conflict(format!(
                "VM {id} ({name}) has {} disks: {} more would pass Disk{}",
                new.disks.len(),
                sizes.len(),
                MAX_VM_DISKS - 1
            )));
        }
        if let Some(s) = sizes.iter().find(|s| **s == 0) {
            return Err(Refusal::conflict(format!(
                "VM {id} ({name}): a new disk of {s} bytes"
            )));
        }
        let first = new
            .disks
            .first()
            .and_then(|d| self.disks.get(d))
            .cloned()
            .ok_or_else(|| format!("VM {id} ({name}) has no disk to add others beside"))?;
        if first.backup.is_none() {
            return Err(Refusal::conflict(format!(
                "VM {id} ({name}): its disk {} has no backup now; disks are added while it is mirrored",
                first.name
            )));
        }
        crate::placement::check_room_beside(self, &first, sizes.iter().sum())?;
        let free: Vec<String> = (0..MAX_VM_DISKS)
            .map(|i| format!("{name}-{i}"))
            .filter(|d| !new.disks.contains(d) && !self.disks.contains_key(d))
            .take(sizes.len())
            .collect();
        if free.len() < sizes.len() {
            return Err(Refusal::conflict(format!(
                "VM {id} ({name}): no free disk names"
            )));
        }
        for (size, disk_name) in sizes.iter().zip(free) {
            let disk = DiskRecord {
                name: disk_name.clone(),
                size: *size,
                primary: first.primary,
                backup: first.backup,
                generation: 1,
                pools: first.pools.clone(),
                backup_synced: false,
                clone_of: None,
                uid: self.next_disk_uid(writes),
                image: None,
            };
            writes.push((disk_key(&disk_name), Some(json_bytes(&disk))));
            self.disks.insert(disk_name.clone(), disk);
            new.disks.push(disk_name);
        }
        Ok(())
    }

    /// The VM with VMID `id`.
    pub fn vm_by_id(&self, id: u64) -> Option<&VmRecord> {
        self.vms.values().find(|vm| vm.id == id && id != 0)
    }

    /// The server that runs VM `vm`'s VMM: the primary of its disks, when they all have the
    /// same one.
    pub fn vm_primary(&self, vm: &VmRecord) -> Option<u64> {
        let mut primaries = vm
            .disks
            .iter()
            .map(|d| self.disks.get(d).map(|d| d.primary));
        let first = primaries.next()??;
        primaries.all(|p| p == Some(first)).then_some(first)
    }

    /// Where VM `vm`'s first disk has its backup, if it has one.
    pub fn vm_backup(&self, vm: &VmRecord) -> Option<u64> {
        vm.disks.first().and_then(|d| self.disks.get(d))?.backup
    }

    /// Where VM `v` can move: the server holding every one of its disks' backup copies, in
    /// sync and up.
    pub(super) fn move_target(&self, v: &VmRecord) -> Result<u64, Refusal> {
        let vm = v.id;
        let mut to = None;
        for name in &v.disks {
            let d = self
                .disks
                .get(name)
                .ok_or_else(|| format!("VM {vm}: no disk {name}"))?;
            let b = d
                .backup
                .ok_or_else(|| format!("VM {vm}: disk {name} has no backup to move to"))?;
            if !d.backup_synced {
                return Err(Refusal::conflict(format!(
                    "VM {vm}: disk {name}'s backup on server {b} is not in sync yet"
                )));
            }
            if self.servers.get(&b).is_none_or(|s| s.down) {
                return Err(Refusal::conflict(format!("VM {vm}: server {b} is down")));
            }
            if to.is_some_and(|t| t != b) {
                return Err(Refusal::conflict(format!(
                    "VM {vm}: its disks' backups are on different servers"
                )));
            }
            to = Some(b);
        }
        to.ok_or_else(|| Refusal::conflict(format!("VM {vm} has no disk to move with")))
    }

    /// Whether VM `v`'s live move may begin: its disks' backups, in sync, are on the server it
    /// moves to (a move to another server first waits for new copies there).
    pub fn live_move_ready(&self, v: &VmRecord) -> bool {
        v.moving
            .as_ref()
            .is_some_and(|m| self.move_target(v).ok() == Some(m.to))
    }

    /// Gives every disk of VM `v` a new backup on server `to` (its pools chosen by placement;
    /// the old backups' records dropped, their copies kept where they are, as copies of disks
    /// the state still has are): each in sync only once its primary's link says so.
    fn rebackup(
        &mut self,
        v: &VmRecord,
        to: u64,
        writes: &mut Vec<RecordWrite>,
    ) -> Result<(), Refusal> {
        let disks: Vec<&DiskRecord> = v
            .disks
            .iter()
            .map(|n| {
                self.disks
                    .get(n)
                    .ok_or_else(|| format!("VM {}: no disk {n}", v.id))
            })
            .collect::<Result<_, _>>()?;
        if let Some(d) = disks.iter().find(|d| d.primary == to) {
            return Err(Refusal::conflict(format!(
                "VM {} runs on server {to} already (disk {})",
                v.id, d.name
            )));
        }
        let pools = crate::placement::place_copies_on(self, to, v.memory_mib, &disks)
            .map_err(Refusal::conflict)?;
        for (name, pool) in v.disks.iter().zip(pools) {
            let d = self.disks.get_mut(name).expect("found above");
            if let Some(old) = d.backup.take() {
                d.pools.remove(&old);
            }
            d.backup = Some(to);
            d.backup_synced = false;
            d.pools.insert(to, pool);
            writes.push((disk_key(name), Some(json_bytes(d))));
        }
        Ok(())
    }

    /// Hands VM `v`'s disks to their backup server: each backup becomes the primary with a
    /// raised generation, the old primary its backup (resynced before it counts as in sync).
    fn hand_over(&mut self, v: &VmRecord, writes: &mut Vec<RecordWrite>) -> Result<u64, Refusal> {
        let to = self.move_target(v)?;
        for name in &v.disks {
            let d = self.disks.get_mut(name).expect("move_target found it");
            let from = d.primary;
            // A server being drained keeps no copy: the leader gives the disk a new backup.
            if self.servers.get(&from).is_some_and(|s| s.draining) {
                d.backup = None;
                d.pools.remove(&from);
            } else {
                d.backup = Some(from);
            }
            d.primary = to;
            d.generation += 1;
            d.backup_synced = false;
            writes.push((disk_key(name), Some(json_bytes(d))));
        }
        Ok(to)
    }

    /// `Command::SwitchVm`: a live migration's target takes the VM's disks.
    pub(super) fn switch_vm(
        &mut self,
        name: &str,
        move_id: u64,
        writes: &mut Vec<RecordWrite>,
    ) -> Outcome {
        let v = self
            .vms
            .get(name)
            .cloned()
            .ok_or_else(|| Refusal::not_found(format!("no VM {name}")))?;
        let m = match &v.moving {
            Some(m) if m.id == move_id => m.clone(),
            _ => {
                return Err(Refusal::conflict(format!(
                    "VM {name} is not moving live as move {move_id}"
                )))
            }
        };
        if m.switched {
            return Ok(json!({ "server": m.to, "changed": false }));
        }
        if self.move_target(&v)? != m.to {
            return Err(Refusal::conflict(format!(
                "VM {name}: its disks' backups are no longer on server {}",
                m.to
            )));
        }
        self.hand_over(&v, writes)?;
        let r = self.vms.get_mut(name).expect("found above");
        r.moving = Some(LiveMove {
            switched: true,
            ..m.clone()
        });
        writes.push((vm_key(name), Some(json_bytes(r))));
        Ok(json!({ "server": m.to, "changed": true }))
    }

    /// `Command::EndMove`: a live migration's source says how it ended; audited.
    pub(super) fn end_move(
        &mut self,
        name: &str,
        move_id: u64,
        at_ms: u64,
        outcome: &MoveOutcome,
        writes: &mut Vec<RecordWrite>,
    ) -> Outcome {
        let r = self
            .vms
            .get_mut(name)
            .ok_or_else(|| Refusal::not_found(format!("no VM {name}")))?;
        let Some(m) = r.moving.clone().filter(|m| m.id == move_id) else {
            return Ok(json!({ "changed": false }));
        };
        r.moving = None;
        writes.push((vm_key(name), Some(json_bytes(r))));
        let (id, to) = (r.id, m.to);
        let (verb, target) = match outcome {
            MoveOutcome::Done {
                downtime_ms,
                total_ms,
                transferred_bytes,
                rounds,
            } => (
                "vm.migrated",
                format!(
                    "vm {id} ({name}) runs on server {to}: paused {downtime_ms:.1} ms, moved in {:.2} s, {} MiB in {rounds} rounds",
                    total_ms / 1e3,
                    transferred_bytes >> 20
                ),
            ),
            MoveOutcome::Failed { why } if m.switched => (
                "vm.migrated",
                format!("vm {id} ({name}) runs on server {to}; its source said: {why}"),
            ),
            MoveOutcome::Failed { why } => (
                "vm.migrate.failed",
                format!("vm {id} ({name}) stays where it runs: {why}"),
            ),
        };
        self.audit(0, at_ms, verb, target, writes);
        Ok(json!({ "changed": true }))
    }

    /// Whether some server's agent reports the VMM of VM `name` running.
    pub fn vm_observed_running(&self, name: &str) -> bool {
        self.observed
            .values()
            .any(|o| o.vms.get(name).is_some_and(|v| v.running))
    }

    /// Applies an action on VMs for `by` (`act` routes them here).
    pub(super) fn act_on_vm(
        &mut self,
        by: &Actor,
        action: &Action,
        writes: &mut Vec<RecordWrite>,
    ) -> Result<Acted<'static>, Refusal> {
        let (verb, target, result) = match action {
            Action::CreateVm { owner, vm } => {
                let o = self
                    .users
                    .get(owner)
                    .cloned()
                    .ok_or_else(|| Refusal::not_found(format!("no user {owner}")))?;
                if let Some(u) = &by.who {
                    if !access::may_administer_vms_of(u, &o) {
                        return Err(access::refuse(format!("VMs of user {}", o.name)));
                    }
                }
                let appliance = match &vm.appliance {
                    Some(a) => Some(self.usable_appliance(by, &o, a)?),
                    None => None,
                };
                let sizes = vm.disk_sizes();
                access::check_new_vm(self, &o, vm.memory_mib, sizes.iter().sum())?;
                let r = self.create_vm(
                    vm.record(Some(*owner)),
                    &sizes,
                    None,
                    appliance.as_ref(),
                    writes,
                )?;
                let target = format!("vm {} ({}) of user {}", r["id"], vm.name, o.name);
                ("vm.create", target, r)
            }
            Action::PowerVm { vm, running, force } => {
                let v = self.operable_vm(by.who.as_ref(), *vm)?;
                if *running {
                    self.check_not_held_off(*vm)?;
                }
                if let Some(m) = v.moving.as_ref().filter(|_| !*running) {
                    return Err(Refusal::conflict(format!(
                        "VM {vm} is moving live to server {}: power it off once it is there",
                        m.to
                    )));
                }
                if v.running == *running && (*running || v.graceful_stop != *force) {
                    // Asked for what it is already asked to be: nothing changes, and nothing
                    // is written to the audit log (looping it pushes no entry out).
                    return Ok(Acted::Unchanged(
                        json!({ "audit": self.counters.audit, "unchanged": true }),
                    ));
                }
                let r = self.vms.get_mut(&v.name).expect("found");
                r.running = *running;
                if !*running {
                    r.graceful_stop = !*force;
                }
                writes.push((vm_key(&v.name), Some(json_bytes(r))));
                let verb = match (*running, *force) {
                    (true, _) => "vm.power_on",
                    (false, false) => "vm.power_off",
                    (false, true) => "vm.force_off",
                };
                (verb, format!("vm {vm} ({})", v.name), Value::Null)
            }
            Action::DeleteVm { vm } => {
                let v = self.powered_off_vm_administered_by(by.who.as_ref(), *vm, "first")?;
                self.check_no_task(*vm, "delete it")?;
                self.vms.remove(&v.name);
                writes.push((vm_key(&v.name), None));
                for d in &v.disks {
                    if self.disks.remove(d).is_some() {
                        writes.push((disk_key(d), None));
                    }
                }
                ("vm.delete", format!("vm {vm} ({})", v.name), Value::Null)
            }
            Action::EditVm {
                vm,
                memory_mib,
                vcpus,
                boot,
                boot_order,
                disk_bus,
                add_disks,
                grow_disks,
            } => {
                let v =
                    self.powered_off_vm_administered_by(by.who.as_ref(), *vm, "to change it")?;
                self.check_no_task(*vm, "change it")?;
                let owner = v.owner.and_then(|o| self.users.get(&o)).cloned();
                let mut new = v.clone();
                if let Some(m) = memory_mib {
                    if !(16..=MAX_VM_MEMORY_MIB).contains(m) {
                        return Err(Refusal::conflict(format!(
                            "memory {m} MiB: 16 to {MAX_VM_MEMORY_MIB} MiB"
                        )));
                    }
                    new.memory_mib = *m;
                }
                if let Some(n) = vcpus {
                    if !(1..=64).contains(n) {
                        return Err(Refusal::conflict(format!("{n} vCPUs: 1 to 64")));
                    }
                    new.vcpus = *n;
                }
                if let Some(b) = boot {
                    if *b == BootMode::Kernel && v.kernel.is_empty() {
                        return Err(Refusal::conflict(format!(
                            "VM {vm} ({}) was made blank: it has no guest kernel to boot",
                            v.name
                        )));
                    }
                    new.boot = *b;
                }
                if let Some(o) = boot_order {
                    new.boot_order = *o;
                }
                if let Some(b) = disk_bus {
                    new.disk_bus = *b;
                }
                check_disk_bus(&new)?;
                if new == v && add_disks.is_empty() && grow_disks.is_empty() {
                    return Err(Refusal::conflict(format!(
                        "VM {vm} ({}): nothing changes",
                        v.name
                    )));
                }
                let grown = self.disks_grown(&v, grow_disks)?;
                let more: u64 = grown.iter().map(|(d, size)| size - d.size).sum();
                if let Some(o) = &owner {
                    access::check_vm_memory(self, o, v.memory_mib, new.memory_mib)?;
                    access::check_more_disk(self, o, add_disks.iter().sum::<u64>() + more)?;
                }
                let mut what = format!(
                    "vm {vm} ({}): {} MiB, {} vCPUs, boots {:?} ({:?}), disks on {:?}",
                    v.name, new.memory_mib, new.vcpus, new.boot, new.boot_order, new.disk_bus
                );
                if !add_disks.is_empty() {
                    let gib: Vec<String> = add_disks
                        .iter()
                        .map(|s| format!("{}", s.div_ceil(1 << 30)))
                        .collect();
                    what += &format!(", disks added: {} GiB", gib.join(", "));
                    // Last: it writes the new disks' records once everything else passed.
                    self.add_disks(&mut new, add_disks, writes)?;
                }
                for (d, size) in grown {
                    let i = v
                        .disks
                        .iter()
                        .position(|n| *n == d.name)
                        .unwrap_or_default();
                    what += &format!(", Disk{i} grown to {} GiB", size.div_ceil(1 << 30));
                    let record = DiskRecord { size, ..d };
                    writes.push((disk_key(&record.name), Some(json_bytes(&record))));
                    self.disks.insert(record.name.clone(), record);
                }
                writes.push((vm_key(&v.name), Some(json_bytes(&new))));
                self.vms.insert(v.name.clone(), new);
                ("vm.edit", what, Value::Null)
            }
            Action::CloneVm { vm, name, owner } => {
                let src = self
                    .vm_by_id(*vm)
                    .cloned()
                    .ok_or_else(|| Refusal::not_found(format!("no VM {vm}")))?;
                let owner = owner.or(by.who.as_ref().map(|u| u.id)).or(src.owner);
                let o = match owner {
                    Some(id) => Some(
                        self.users
                            .get(&id)
                            .cloned()
                            .ok_or_else(|| Refusal::not_found(format!("no user {id}")))?,
                    ),
                    None => None,
                };
                if let Some(u) = &by.who {
                    let allowed = access::may_operate_vm(self, u, &src)
                        && o.as_ref()
                            .is_some_and(|o| access::may_administer_vms_of(u, o));
                    if !allowed {
                        return Err(access::refuse(format!("cloning VM {vm}")));
                    }
                }
                if src.running || self.vm_observed_running(&src.name) {
                    return Err(Refusal::conflict(format!(
                        "VM {vm} ({}) is powered on: power it off to clone it",
                        src.name
                    )));
                }
                let disks = src
                    .disks
                    .iter()
                    .map(|d| {
                        self.disks
                            .get(d)
                            .cloned()
                            .ok_or_else(|| format!("VM {vm}: no disk {d}"))
                    })
                    .collect::<Result<Vec<DiskRecord>, String>>()?;
                if disks.is_empty() {
                    return Err(Refusal::conflict(format!("VM {vm} has no disk")));
                }
                if disks.iter().any(|d| d.primary != disks[0].primary) {
                    return Err(Refusal::conflict(format!(
                        "VM {vm}: its disks' primaries are on different servers"
                    )));
                }
                let sizes: Vec<u64> = disks.iter().map(|d| d.size).collect();
                if let Some(o) = &o {
                    access::check_new_vm(self, o, src.memory_mib, sizes.iter().sum())?;
                }
                let copy = VmRecord {
                    name: name.clone(),
                    memory_mib: src.memory_mib,
                    vcpus: src.vcpus,
                    disks: Vec::new(),
                    running: false,
                    kernel: src.kernel.clone(),
                    initrd: src.initrd.clone(),
                    cmdline: src.cmdline.clone(),
                    id: 0,
                    owner,
                    graceful_stop: false,
                    // The same ISO, if any: the library is the same everywhere.
                    cdrom: src.cdrom.clone(),
                    // It boots as its source does.
                    boot: src.boot,
                    boot_order: src.boot_order,
                    disk_bus: src.disk_bus,
                    // On the same networks, with MACs of its own (`create_vm` gives them).
                    moving: None,
                    backup_schedule: None,
                    last_backup_ms: 0,
                    nics: src
                        .nics
                        .iter()
                        .map(|n| Nic {
                            network: n.network.clone(),
                            mac: String::new(),
                            ip: None,
                        })
                        .collect(),
                };
                let r = self.create_vm(copy, &sizes, Some(&disks), None, writes)?;
                let target = format!("vm {} ({name}) from vm {vm} ({})", r["id"], src.name);
                ("vm.clone", target, r)
            }
            Action::MigrateVm {
                vm,
                downtime_ms,
                auto_converge,
                to: wanted,
            } => {
                if !by.is_manager() {
                    return Err(access::refuse("only a Manager migrates VMs"));
                }
                self.check_no_task(*vm, "move it")?;
                if downtime_ms.is_some_and(|d| !(1..=10_000).contains(&d)) {
                    return Err(Refusal::conflict(format!(
                        "a pause of {} ms: the budget is 1 to 10000 ms",
                        downtime_ms.unwrap_or_default()
                    )));
                }
                let v = self
                    .vm_by_id(*vm)
                    .cloned()
                    .ok_or_else(|| Refusal::not_found(format!("no VM {vm}")))?;
                if v.moving.is_some() {
                    return Err(Refusal::conflict(format!("VM {vm} is moving live already")));
                }
                let live = v.running;
                let backups = self.move_target(&v);
                let (to, placed) = match *wanted {
                    Some(t) if backups.as_ref().ok() != Some(&t) => {
                        if !live {
                            return Err(Refusal::conflict(format!(
                                "VM {vm} moves to a server other than its disks' backup only live (running); {}",
                                match &backups {
                                    Ok(b) => format!("it can move to server {b}"),
                                    Err(e) => e.reason.clone(),
                                }
                            )));
                        }
                        // New backups there first (synced while it runs); the agents carry
                        // the move once they are in sync.
                        self.rebackup(&v, t, writes)?;
                        (t, true)
                    }
                    _ => (backups?, false),
                };
                if live {
                    // Live: the agents carry it (`LiveMove`); the audit number of this
                    // request names the move.
                    let id = self.counters.audit + 1;
                    let r = self.vms.get_mut(&v.name).expect("found above");
                    r.moving = Some(LiveMove {
                        id,
                        to,
                        switched: false,
                        cancel: false,
                        downtime_ms: *downtime_ms,
                        auto_converge: *auto_converge,
                    });
                    writes.push((vm_key(&v.name), Some(json_bytes(r))));
                    let how = if placed {
                        ", live once its disks' new copies there are in sync"
                    } else {
                        ", live"
                    };
                    (
                        "vm.migrate",
                        format!("vm {vm} ({}) to server {to}{how}", v.name),
                        json!({ "server": to, "live": true, "move": id, "copying_disks": placed }),
                    )
                } else {
                    self.hand_over(&v, writes)?;
                    let why = "powered off: nothing to carry but its disks";
                    (
                        "vm.migrate",
                        format!("vm {vm} ({}) to server {to}, restarted", v.name),
                        json!({ "server": to, "live": false, "why": why }),
                    )
                }
            }
            Action::CancelMigration { vm } => {
                if !by.is_manager() {
                    return Err(access::refuse("only a Manager cancels migrations"));
                }
                let v = self
                    .vm_by_id(*vm)
                    .cloned()
                    .ok_or_else(|| Refusal::not_found(format!("no VM {vm}")))?;
                let Some(m) = v.moving.clone() else {
                    return Err(Refusal::conflict(format!("VM {vm} is not moving")));
                };
                if m.switched {
                    return Err(Refusal::conflict(format!(
                        "VM {vm} is server {}'s already",
                        m.to
                    )));
                }
                // Still waiting for its disks' new copies, nothing under way yet: it ends here
                // (the copies stay the disks' backups).
                let waiting = !self.live_move_ready(&v);
                let r = self.vms.get_mut(&v.name).expect("found above");
                r.moving = if waiting {
                    None
                } else {
                    Some(LiveMove { cancel: true, ..m })
                };
                writes.push((vm_key(&v.name), Some(json_bytes(r))));
                (
                    "vm.migrate.cancel",
                    format!("vm {vm} ({})", v.name),
                    Value::Null,
                )
            }
            Action::OpenConsole { vm, console } => {
                let v = self.operable_vm(by.who.as_ref(), *vm)?;
                if console != "serial" && console != "vnc" {
                    return Err(Refusal::not_found(format!("no console {console:?}")));
                }
                (
                    "vm.console",
                    format!("vm {vm} ({}): {console}", v.name),
                    Value::Null,
                )
            }
            _ => unreachable!("act routes no other action here: {action:?}"),
        };
        Ok(Acted::Changed {
            verb,
            target,
            result,
        })
    }
}

/// SATA disks need a firmware to boot from them: a VM started with the guest kernel has its
/// disks on virtio.
fn check_disk_bus(vm: &VmRecord) -> Result<(), Refusal> {
    if vm.disk_bus == DiskBus::Sata && vm.boot == BootMode::Kernel {
        return Err(Refusal::conflict(format!(
            "VM {}: SATA disks are for a VM booted by its firmware (BIOS or UEFI), not the guest kernel",
            vm.name
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::access::{Quota, Role};
    use crate::state_machine::fixtures::{
        act, new_user, new_vm, servers_with_room, two_servers_with_room,
    };
    use crate::state_machine::{
        Action, BootMode, BootOrder, DiskBus, DiskGrowth, NewVm, Outcome, RefusalKind, StateMachine,
    };

    /// A Manager and a running VM `v` placed on `servers` servers with room: (manager, VMID,
    /// its disk).
    fn running_vm(sm: &mut StateMachine, servers: u64) -> (u64, u64, String) {
        servers_with_room(sm, servers);
        let id = |r: Outcome| r.unwrap()["id"].as_u64().unwrap();
        let m = id(act(sm, 0, new_user("m", Role::Manager, None, None)));
        let mut v = new_vm("v", &[]);
        v.running = true;
        let vm = id(act(sm, m, Action::CreateVm { owner: m, vm: v }));
        (m, vm, sm.vms["v"].disks[0].clone())
    }

    /// A running VM booted by its firmware moves live like one booted by the kernel (its
    /// chipset's and display's state travel with it), and a drain moves it live.
    #[test]
    fn a_running_vm_booted_by_its_firmware_moves_live_and_a_drain_moves_it_live() {
        let mut sm = StateMachine::default();
        servers_with_room(&mut sm, 2);
        let id = |r: Outcome| r.unwrap()["id"].as_u64().unwrap();
        let m = id(act(&mut sm, 0, new_user("m", Role::Manager, None, None)));
        let mut v = new_vm("v", &[]);
        v.running = true;
        v.boot = BootMode::Bios;
        let vm = id(act(&mut sm, m, Action::CreateVm { owner: m, vm: v }));
        let disk = sm.vms["v"].disks[0].clone();
        sm.disks.get_mut(&disk).unwrap().backup_synced = true;
        let (from, to) = (sm.disks[&disk].primary, sm.disks[&disk].backup.unwrap());
        let migrate = Action::MigrateVm {
            vm,
            downtime_ms: None,
            auto_converge: false,
            to: None,
        };
        let r = act(&mut sm, m, migrate.clone()).unwrap();
        assert_eq!(
            (r["live"].as_bool(), r["server"].as_u64()),
            (Some(true), Some(to)),
            "{r}"
        );
        assert_eq!(
            sm.disks[&disk].primary, from,
            "the disks switch only with the VM"
        );
        act(&mut sm, m, Action::CancelMigration { vm }).unwrap();
        let cancelled = sm.vms["v"].moving.as_ref().map(|mv| mv.cancel);
        assert_eq!(cancelled, Some(true));
        sm.vms.get_mut("v").unwrap().moving = None;
        act(&mut sm, m, Action::DrainServer { id: from }).unwrap();
        let moving = sm.vms["v"].moving.as_ref().map(|mv| mv.to);
        assert_eq!(moving, Some(to), "the drain moves it live");
    }

    /// A running VM moves live to a server other than its disks' backup: new backups there
    /// first, the move waiting until they are in sync; a cancel meanwhile ends it at once; a
    /// powered-off VM moves to its disks' backup server only.
    #[test]
    fn a_running_vm_moves_live_to_a_third_server_once_its_new_copies_there_are_in_sync() {
        use crate::state_machine::Command;
        let mut sm = StateMachine::default();
        let (m, vm, disk) = running_vm(&mut sm, 3);
        let (from, old) = (sm.disks[&disk].primary, sm.disks[&disk].backup.unwrap());
        let third = 6 - from - old;
        sm.disks.get_mut(&disk).unwrap().backup_synced = true;
        let refused = |r: Outcome| r.unwrap_err().reason;
        let to = |t| Action::MigrateVm {
            vm,
            downtime_ms: None,
            auto_converge: false,
            to: Some(t),
        };
        assert!(refused(act(&mut sm, m, to(from))).contains("runs on server"));
        assert!(refused(act(&mut sm, m, to(9))).contains("no server 9"));

        // There: new backups on the third server, not in sync; the move waits for them.
        let r = act(&mut sm, m, to(third)).unwrap();
        assert_eq!(
            (r["server"].as_u64(), r["copying_disks"].as_bool()),
            (Some(third), Some(true)),
            "{r}"
        );
        let d = &sm.disks[&disk];
        assert_eq!(
            (d.primary, d.backup, d.backup_synced),
            (from, Some(third), false)
        );
        assert!(
            d.pools.contains_key(&third) && !d.pools.contains_key(&old),
            "{:?}",
            d.pools
        );
        assert!(!sm.live_move_ready(&sm.vms["v"]));
        let move_id = sm.vms["v"].moving.as_ref().unwrap().id;
        let apply = |sm: &mut StateMachine, c: Command| sm.apply(&c, &mut Vec::new());
        let switch = |move_id| Command::SwitchVm {
            vm: "v".into(),
            move_id,
        };
        assert!(
            apply(&mut sm, switch(move_id)).is_err(),
            "no switch before the copies are in sync"
        );
        // In sync: the move goes on as to a backup.
        sm.disks.get_mut(&disk).unwrap().backup_synced = true;
        assert!(sm.live_move_ready(&sm.vms["v"]));
        apply(&mut sm, switch(move_id)).unwrap();
        let d = &sm.disks[&disk];
        assert_eq!((d.primary, d.backup), (third, Some(from)));
        sm.vms.get_mut("v").unwrap().moving = None;

        // Cancelled while its new copies sync: it ends at once, the copies stay its backups.
        sm.disks.get_mut(&disk).unwrap().backup_synced = true;
        act(&mut sm, m, to(old)).unwrap();
        assert_eq!(sm.disks[&disk].backup, Some(old));
        act(&mut sm, m, Action::CancelMigration { vm }).unwrap();
        assert!(sm.vms["v"].moving.is_none());
        assert_eq!(sm.disks[&disk].backup, Some(old));

        // A powered-off VM moves to its disks' backup server only.
        let off = Action::PowerVm {
            vm,
            running: false,
            force: true,
        };
        act(&mut sm, m, off).unwrap();
        let e = refused(act(&mut sm, m, to(from)));
        assert!(e.contains("only live"), "{e}");
    }

    /// A running VM's migration is live: the move is recorded and nothing else changes until
    /// its target switches the disks (once; a switch of another move, or after the move ended,
    /// is refused); its end is audited with the pause; the VM cannot be powered off or moved
    /// again meanwhile; a server declared down ends the moves it takes part in.
    #[test]
    fn a_running_vm_moves_live_switch_then_end_and_a_stopped_one_moves_at_once() {
        use crate::state_machine::{Command, MoveOutcome};
        let mut sm = StateMachine::default();
        let (m, vm, disk) = running_vm(&mut sm, 2);
        let (from, to) = (sm.disks[&disk].primary, sm.disks[&disk].backup.unwrap());
        let refused = |r: Outcome| r.unwrap_err();
        let migrate = || Action::MigrateVm {
            vm,
            downtime_ms: None,
            auto_converge: false,
            to: None,
        };
        assert_eq!(
            refused(act(&mut sm, m, migrate())).kind,
            RefusalKind::Conflict,
            "a backup not yet in sync"
        );
        sm.disks.get_mut(&disk).unwrap().backup_synced = true;
        let gen = sm.disks[&disk].generation;
        let budget = |ms| Action::MigrateVm {
            vm,
            downtime_ms: Some(ms),
            auto_converge: ms == 200,
            to: None,
        };
        assert!(refused(act(&mut sm, m, budget(0)))
            .reason
            .contains("1 to 10000"));
        assert!(refused(act(&mut sm, m, budget(10_001)))
            .reason
            .contains("1 to 10000"));
        let r = act(&mut sm, m, budget(200)).unwrap();
        assert_eq!(sm.vms["v"].moving.as_ref().unwrap().downtime_ms, Some(200));
        assert!(sm.vms["v"].moving.as_ref().unwrap().auto_converge);
        assert_eq!(r["live"], true, "{r}");
        let move_id = r["move"].as_u64().unwrap();
        assert_eq!(
            sm.disks[&disk].primary, from,
            "nothing moves before the switch"
        );
        assert_eq!(sm.vms["v"].moving.as_ref().unwrap().to, to);
        assert!(refused(act(&mut sm, m, migrate()))
            .reason
            .contains("already"));
        let off = Action::PowerVm {
            vm,
            running: false,
            force: true,
        };
        assert!(refused(act(&mut sm, m, off.clone()))
            .reason
            .contains("moving live"));

        let apply = |sm: &mut StateMachine, c: Command| sm.apply(&c, &mut Vec::new());
        let switch = |move_id| Command::SwitchVm {
            vm: "v".into(),
            move_id,
        };
        assert!(
            apply(&mut sm, switch(move_id + 1)).is_err(),
            "another move's"
        );
        assert_eq!(apply(&mut sm, switch(move_id)).unwrap()["changed"], true);
        let d = &sm.disks[&disk];
        assert_eq!(
            (d.primary, d.backup, d.generation),
            (to, Some(from), gen + 1)
        );
        assert_eq!(apply(&mut sm, switch(move_id)).unwrap()["changed"], false);
        assert_eq!(
            sm.disks[&disk].generation,
            gen + 1,
            "the same switch again changes nothing"
        );
        let server_down = |id, down| Command::SetServerDown { id, down };
        let end = |move_id, outcome| Command::EndMove {
            vm: "v".into(),
            move_id,
            at_ms: 9,
            outcome,
        };
        let done = MoveOutcome::Done {
            downtime_ms: 12.5,
            total_ms: 800.0,
            transferred_bytes: 64 << 20,
            rounds: 2,
        };
        assert_eq!(
            apply(&mut sm, end(move_id + 1, done.clone())).unwrap()["changed"],
            false
        );
        apply(&mut sm, end(move_id, done)).unwrap();
        assert!(sm.vms["v"].moving.is_none());
        let last = sm.audit.values().last().unwrap();
        assert_eq!(last.action, "vm.migrated");
        assert!(
            last.target
                .contains(&format!("runs on server {to}: paused 12.5 ms")),
            "{}",
            last.target
        );
        assert!(
            apply(&mut sm, switch(move_id)).is_err(),
            "no switch after the end"
        );

        // Back, and the target declared down during the move: the move ends, nothing moved.
        sm.disks.get_mut(&disk).unwrap().backup_synced = true;
        let r = act(&mut sm, m, migrate()).unwrap();
        assert_eq!(sm.vms["v"].moving.as_ref().unwrap().to, from, "{r}");
        apply(&mut sm, server_down(from, true)).unwrap();
        assert!(sm.vms["v"].moving.is_none());
        assert_eq!(sm.disks[&disk].primary, to);

        // A stopped VM moves at once: nothing to carry but its disks.
        act(&mut sm, m, off).unwrap();
        apply(&mut sm, server_down(from, false)).unwrap();
        let d = sm.disks.get_mut(&disk).unwrap();
        d.backup = Some(from);
        d.backup_synced = true;
        let r = act(&mut sm, m, migrate()).unwrap();
        assert_eq!(r["live"], false, "{r}");
        assert_eq!(sm.disks[&disk].primary, from);
        assert!(sm.vms["v"].moving.is_none());
    }

    #[test]
    fn a_powered_off_vm_s_disks_grow_within_its_quota_and_its_servers_room() {
        const GIB: u64 = 1 << 30;
        let mut sm = StateMachine::default();
        two_servers_with_room(&mut sm);
        let id = |r: Outcome| r.unwrap()["id"].as_u64().unwrap();
        let quota = |disk_gib| Quota {
            vms: 2,
            memory_mib: 1024,
            disk_gib,
        };
        let p = id(act(
            &mut sm,
            0,
            new_user("p", Role::PowerUser, None, Some(quota(8))),
        ));
        let m = id(act(&mut sm, 0, new_user("m", Role::Manager, None, None)));
        let mut v = new_vm("v", &[]);
        v.disk_size = GIB;
        v.extra_disks = vec![GIB];
        let vm = id(act(&mut sm, p, Action::CreateVm { owner: p, vm: v }));
        let grow = |disks: &[(usize, u64)]| Action::EditVm {
            vm,
            memory_mib: None,
            vcpus: None,
            boot: None,
            boot_order: None,
            disk_bus: None,
            add_disks: Vec::new(),
            grow_disks: disks
                .iter()
                .map(|&(disk, gib)| DiskGrowth {
                    disk,
                    size: gib * GIB,
                })
                .collect(),
        };
        let refused = |r: Outcome| r.unwrap_err().reason;
        assert!(refused(act(&mut sm, p, grow(&[(2, 4)]))).contains("no Disk2"));
        assert!(refused(act(&mut sm, p, grow(&[(0, 1)]))).contains("only grows"));
        assert!(refused(act(&mut sm, p, grow(&[(0, 3), (0, 4)]))).contains("twice"));
        // 1 + 1 GiB used of the company's 8: 7 more do not fit.
        assert!(refused(act(&mut sm, p, grow(&[(0, 5), (1, 4)]))).contains("quota"));
        // The Manager has no quota, but each server's 12 GiB hold at most 10 more.
        assert!(refused(act(&mut sm, m, grow(&[(0, 7), (1, 6)]))).contains("bytes free"));
        let sizes = |sm: &StateMachine| -> Vec<u64> {
            sm.vms["v"].disks.iter().map(|d| sm.disks[d].size).collect()
        };
        assert_eq!(sizes(&sm), [GIB, GIB], "a refusal changes nothing");
        act(&mut sm, p, grow(&[(1, 3), (0, 2)])).unwrap();
        assert_eq!(sizes(&sm), [2 * GIB, 3 * GIB]);
        let last = sm.audit.values().last().unwrap();
        assert!(
            last.target.contains("Disk1 grown to 3 GiB")
                && last.target.contains("Disk0 grown to 2 GiB"),
            "{}",
            last.target
        );
        sm.vms.get_mut("v").unwrap().running = true;
        assert!(refused(act(&mut sm, p, grow(&[(0, 4)]))).contains("powered on"));
    }

    #[test]
    fn a_powered_off_vm_is_changed_by_who_administers_it_within_the_quota() {
        let mut sm = StateMachine::default();
        let user = new_user;
        let id = |r: Outcome| r.unwrap()["id"].as_u64().unwrap();
        let quota = Quota {
            vms: 2,
            memory_mib: 512,
            disk_gib: 10,
        };
        let p = id(act(
            &mut sm,
            0,
            user("p", Role::PowerUser, None, Some(quota)),
        ));
        let r = id(act(&mut sm, 0, user("r", Role::Regular, Some(p), None)));
        let other = id(act(
            &mut sm,
            0,
            user("o", Role::PowerUser, None, Some(quota)),
        ));
        let mut vm = NewVm {
            name: "v".into(),
            memory_mib: 256,
            vcpus: 1,
            disk_size: 1,
            extra_disks: Vec::new(),
            kernel: String::new(),
            initrd: String::new(),
            cmdline: String::new(),
            running: false,
            boot: BootMode::Bios,
            boot_order: BootOrder::DiskFirst,
            disk_bus: DiskBus::Virtio,
            cdrom: None,
            networks: Vec::new(),
            appliance: None,
        }
        .record(Some(r));
        vm.id = 7;
        sm.vms.insert("v".into(), vm);
        let edit = |memory_mib: Option<u64>, boot: Option<BootMode>| Action::EditVm {
            vm: 7,
            memory_mib,
            vcpus: Some(2),
            boot,
            boot_order: Some(BootOrder::CdromFirst),
            disk_bus: None,
            add_disks: Vec::new(),
            grow_disks: Vec::new(),
        };
        let refused = |r: Outcome| r.unwrap_err();
        assert!(refused(act(&mut sm, other, edit(None, None))).kind == RefusalKind::Forbidden);
        assert!(refused(act(&mut sm, r, edit(None, None))).kind == RefusalKind::Forbidden);
        assert!(refused(act(&mut sm, p, edit(Some(1024), None)))
            .reason
            .contains("quota"));
        assert!(refused(act(&mut sm, p, edit(None, Some(BootMode::Kernel))))
            .reason
            .contains("blank"));
        let add = |gib: u64| Action::EditVm {
            vm: 7,
            memory_mib: None,
            vcpus: None,
            boot: None,
            boot_order: None,
            disk_bus: None,
            add_disks: vec![gib << 30],
            grow_disks: Vec::new(),
        };
        assert!(refused(act(&mut sm, p, add(11))).reason.contains("quota"));
        assert!(refused(act(&mut sm, p, add(1))).reason.contains("no disk"));
        act(&mut sm, p, edit(Some(512), None)).unwrap();
        let v = &sm.vms["v"];
        assert_eq!(
            (v.memory_mib, v.vcpus, v.boot_order),
            (512, 2, BootOrder::CdromFirst)
        );
        assert!(refused(act(&mut sm, p, edit(Some(512), None)))
            .reason
            .contains("nothing changes"));
        act(&mut sm, p, edit(None, Some(BootMode::Uefi))).unwrap();
        assert_eq!(sm.vms["v"].boot.firmware(), Some("uefi"));
        // Its disks onto the SATA controller; the guest kernel never has them there.
        let bus = |boot: Option<BootMode>| Action::EditVm {
            vm: 7,
            memory_mib: None,
            vcpus: None,
            boot,
            boot_order: None,
            disk_bus: Some(DiskBus::Sata),
            add_disks: Vec::new(),
            grow_disks: Vec::new(),
        };
        act(&mut sm, p, bus(None)).unwrap();
        assert_eq!(sm.vms["v"].disk_bus, DiskBus::Sata);
        sm.vms.get_mut("v").unwrap().kernel = "/boot/vmlinuz".into();
        assert!(refused(act(&mut sm, p, bus(Some(BootMode::Kernel))))
            .reason
            .contains("SATA disks are for a VM booted by its firmware"));
        assert_eq!(sm.vms["v"].boot, BootMode::Uefi, "nothing changed");
        sm.vms.get_mut("v").unwrap().running = true;
        assert!(refused(act(&mut sm, p, edit(Some(256), None)))
            .reason
            .contains("powered on"));
        let audit: Vec<&str> = sm.audit.values().map(|a| a.action.as_str()).collect();
        assert_eq!(
            audit.iter().filter(|a| **a == "vm.edit").count(),
            3,
            "{audit:?}"
        );
        assert!(
            sm.audit
                .values()
                .any(|a| a.target.contains("disks on Sata")),
            "the audit says where the disks went"
        );
    }
}
