//! The Virtual Appliance library: appliances added (imported) and changed by Managers, shared
//! with Power Users' companies, their disk images copied by every VM server's agent, and VMs
//! made from them.

use serde_json::Value;

use super::keys::{appliance_key, json_bytes};
use super::rights::Actor;
use super::{
    Acted, Action, ApplianceRecord, BootMode, NewAppliance, Outcome, RecordWrite, Refusal,
    StateMachine, MAX_DISK_BYTES, MAX_VM_DISKS, MAX_VM_MEMORY_MIB, MAX_VM_NICS,
};
use crate::access::{self, Role, UserRecord};
use crate::library::is_sha256;

/// The longest description kept, bytes.
pub const MAX_DESCRIPTION: usize = 4096;

impl StateMachine {
    /// Server `server`'s node agent holds a checked copy of each disk image of appliance
    /// `name`, of SHA-256s `disks` (`Command::ApplianceHeld`).
    pub(super) fn appliance_held(
        &mut self,
        name: &str,
        disks: &[String],
        server: u64,
        writes: &mut Vec<RecordWrite>,
    ) -> Outcome {
        if !self.servers.contains_key(&server) {
            return Err(Refusal::not_found(format!("no server {server}")));
        }
        let a = self
            .appliances
            .get_mut(name)
            .ok_or_else(|| Refusal::not_found(format!("no appliance {name}")))?;
        let want: Vec<&str> = a.disks.iter().map(|d| d.sha256.as_str()).collect();
        if want != disks.iter().map(String::as_str).collect::<Vec<_>>() {
            return Err(Refusal::conflict(format!(
                "appliance {name}'s disk images are {want:?}, not {disks:?}: replaced meanwhile"
            )));
        }
        if a.servers.insert(server) {
            writes.push((appliance_key(name), Some(json_bytes(a))));
        }
        Ok(Value::Null)
    }

    /// Appliance `name`, if `by` may make a VM for `owner` from it: a Manager may use any; a
    /// Power or Regular User those shared with the owner's company.
    pub(super) fn usable_appliance(
        &self,
        by: &Actor,
        owner: &UserRecord,
        name: &str,
    ) -> Result<ApplianceRecord, Refusal> {
        let a = self
            .appliances
            .get(name)
            .ok_or_else(|| Refusal::not_found(format!("no appliance {name} in the library")))?;
        let shared = |u: &UserRecord| access::may_use_appliance(u, a);
        if !by.who.as_ref().is_none_or(shared) || !(by.is_manager() || shared(owner)) {
            // Not shared: to this user it is not there.
            return Err(Refusal::not_found(format!(
                "no appliance {name} in the library"
            )));
        }
        Ok(a.clone())
    }

    /// The disk image each disk of a new VM `vm` of `sizes` starts as (by SHA-256), from
    /// `appliance`: one for each of its images, each disk at least its image's size.
    pub(super) fn appliance_images(
        &self,
        vm: &str,
        appliance: Option<&ApplianceRecord>,
        sizes: &[u64],
    ) -> Result<Vec<String>, Refusal> {
        let Some(a) = appliance else {
            return Ok(Vec::new());
        };
        if a.servers.is_empty() {
            return Err(Refusal::conflict(format!(
                "appliance {}: no server holds its disk images",
                a.name
            )));
        }
        if sizes.len() < a.disks.len() {
            return Err(Refusal::conflict(format!(
                "VM {vm}: appliance {} has {} disks, {} asked",
                a.name,
                a.disks.len(),
                sizes.len()
            )));
        }
        for (i, (d, size)) in a.disks.iter().zip(sizes).enumerate() {
            if *size < d.size {
                return Err(Refusal::conflict(format!(
                    "VM {vm}: Disk{i} of {size} bytes cannot hold appliance {}'s image of {} bytes",
                    a.name, d.size
                )));
            }
        }
        Ok(a.disks.iter().map(|d| d.sha256.clone()).collect())
    }

    /// A disk still being made from one of appliance `a`'s images, if there is one.
    pub(super) fn disk_made_from(&self, a: &ApplianceRecord) -> Option<&super::DiskRecord> {
        self.disks.values().find(|d| {
            d.image
                .as_ref()
                .is_some_and(|i| a.disks.iter().any(|x| &x.sha256 == i))
        })
    }

    /// Applies an action on the appliance library for `by` (`act` routes them here).
    pub(super) fn act_on_appliance(
        &mut self,
        by: &Actor,
        action: &Action,
        writes: &mut Vec<RecordWrite>,
    ) -> Result<Acted<'static>, Refusal> {
        if !by.is_manager() {
            return Err(access::refuse(
                "only a Manager changes the appliance library",
            ));
        }
        let (verb, name) = match action {
            Action::EditAppliance {
                name,
                description,
                memory_mib,
                vcpus,
                shared_with,
            } => {
                let mut a = self
                    .appliances
                    .get(name)
                    .cloned()
                    .ok_or_else(|| Refusal::not_found(format!("no appliance {name}")))?;
                if let Some(d) = description {
                    a.description = d.clone();
                }
                if let Some(m) = memory_mib {
                    a.memory_mib = *m;
                }
                if let Some(v) = vcpus {
                    a.vcpus = *v;
                }
                if let Some(users) = shared_with {
                    for u in users {
                        match self.users.get(u) {
                            Some(p) if p.role == Role::PowerUser => {}
                            _ => {
                                return Err(Refusal::conflict(format!(
                                    "appliance {name}: user {u} is no Power User; appliances are shared with Power Users' companies"
                                )))
                            }
                        }
                    }
                    a.shared_with = users.iter().copied().collect();
                }
                check_vm_shape(name, a.memory_mib, a.vcpus, &a.description)?;
                if self.appliances.get(name) == Some(&a) {
                    return Ok(Acted::Unchanged(
                        serde_json::json!({ "audit": self.counters.audit, "unchanged": true }),
                    ));
                }
                writes.push((appliance_key(name), Some(json_bytes(&a))));
                self.appliances.insert(name.clone(), a);
                ("appliance.edit", name.clone())
            }
            Action::DeleteAppliance { name } => {
                let a = self
                    .appliances
                    .get(name)
                    .ok_or_else(|| Refusal::not_found(format!("no appliance {name}")))?;
                if let Some(d) = self.disk_made_from(a) {
                    return Err(Refusal::conflict(format!(
                        "appliance {name}: disk {} is still being made from it: try again once its VM is created",
                        d.name
                    )));
                }
                self.appliances.remove(name);
                writes.push((appliance_key(name), None));
                ("appliance.delete", name.clone())
            }
            _ => unreachable!("act routes no other action here: {action:?}"),
        };
        Ok(Acted::Changed {
            verb,
            target: format!("appliance {name}"),
            result: Value::Null,
        })
    }
}

/// Whether a VM of `memory_mib` and `vcpus` described by `description` can be made.
fn check_vm_shape(
    name: &str,
    memory_mib: u64,
    vcpus: u32,
    description: &str,
) -> Result<(), Refusal> {
    if memory_mib == 0 || memory_mib > MAX_VM_MEMORY_MIB {
        return Err(Refusal::conflict(format!(
            "appliance {name}: {memory_mib} MiB of memory, 1 to {MAX_VM_MEMORY_MIB}"
        )));
    }
    if vcpus == 0 || vcpus > 255 {
        return Err(Refusal::conflict(format!(
            "appliance {name}: {vcpus} vCPUs, 1 to 255"
        )));
    }
    check_description(name, description)
}

/// Whether appliance `name` may have `description` (at most `MAX_DESCRIPTION` bytes).
pub(super) fn check_description(name: &str, description: &str) -> Result<(), Refusal> {
    if description.len() > MAX_DESCRIPTION {
        return Err(Refusal::conflict(format!(
            "appliance {name}: a description of {} bytes, at most {MAX_DESCRIPTION}",
            description.len()
        )));
    }
    Ok(())
}

/// Whether `a` can be added to the library: a valid name, a VM that can be made, firmware
/// boot, 1 to 4 disk images of valid sizes and hashes.
/// The record of new appliance `a`, added by user `by` at `at_ms`, held by `server`.
pub(super) fn appliance_record(
    a: &NewAppliance,
    by: u64,
    at_ms: u64,
    server: u64,
) -> ApplianceRecord {
    ApplianceRecord {
        name: a.name.clone(),
        description: a.description.clone(),
        memory_mib: a.memory_mib,
        vcpus: a.vcpus,
        boot: a.boot,
        disk_bus: a.disk_bus,
        nics: a.nics,
        disks: a
            .disks
            .iter()
            .map(|d| super::ApplianceDisk {
                size: d.size,
                sha256: d.sha256.to_ascii_lowercase(),
            })
            .collect(),
        origin: a.origin.clone(),
        created_by: by,
        created_ms: at_ms,
        servers: [server].into(),
        shared_with: Default::default(),
        backup_of: None,
        company: None,
    }
}

pub(super) fn check_new_appliance(a: &NewAppliance) -> Result<(), Refusal> {
    let name = &a.name;
    access::check_name("appliance", name)?;
    check_vm_shape(name, a.memory_mib, a.vcpus, &a.description)?;
    if a.boot == BootMode::Kernel {
        return Err(Refusal::conflict(format!(
            "appliance {name}: its VMs boot their firmware (bios or uefi), not the cluster's kernel"
        )));
    }
    if a.nics as usize > MAX_VM_NICS {
        return Err(Refusal::conflict(format!(
            "appliance {name}: {} network cards, at most {MAX_VM_NICS}",
            a.nics
        )));
    }
    if a.disks.is_empty() || a.disks.len() > MAX_VM_DISKS {
        return Err(Refusal::conflict(format!(
            "appliance {name}: {} disk images, 1 to {MAX_VM_DISKS}",
            a.disks.len()
        )));
    }
    for (i, d) in a.disks.iter().enumerate() {
        if d.size == 0 || d.size % 512 != 0 || d.size > MAX_DISK_BYTES {
            return Err(Refusal::conflict(format!(
                "appliance {name}: Disk{i} of {} bytes (a multiple of 512, at most {} GiB)",
                d.size,
                MAX_DISK_BYTES >> 30
            )));
        }
        if !is_sha256(&d.sha256) {
            return Err(Refusal::conflict(format!(
                "appliance {name}: Disk{i}: {:?} is not a SHA-256",
                d.sha256
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::access::Role;
    use crate::state_machine::fixtures::{act, new_user, new_vm, servers_with_room};
    use crate::state_machine::{
        Action, ApplianceDisk, BootMode, Command, CopyRole, DiskObservation, LinkState,
        NewAppliance, Observation, Outcome, RefusalKind, StateMachine, TaskOutcome, TaskState,
    };

    fn appliance(name: &str, sha: &str) -> NewAppliance {
        NewAppliance {
            name: name.into(),
            description: "a web server".into(),
            memory_mib: 64,
            vcpus: 1,
            boot: BootMode::Bios,
            disk_bus: Default::default(),
            nics: 0,
            disks: vec![ApplianceDisk {
                size: 1 << 20,
                sha256: sha.into(),
            }],
            origin: "import of web.ova".into(),
        }
    }

    #[test]
    fn appliances_are_the_managers_shared_with_companies_and_make_vms_on_a_holder() {
        let mut sm = StateMachine::default();
        let mut w = Vec::new();
        servers_with_room(&mut sm, 3);
        let id = |r: Outcome| r.unwrap()["id"].as_u64().unwrap();
        let m = id(act(&mut sm, 0, new_user("m", Role::Manager, None, None)));
        let quota = crate::access::Quota {
            vms: 2,
            memory_mib: 512,
            disk_gib: 10,
        };
        let p = id(act(
            &mut sm,
            0,
            new_user("p", Role::PowerUser, None, Some(quota)),
        ));
        let r = id(act(&mut sm, 0, new_user("r", Role::Regular, Some(p), None)));
        let q = id(act(
            &mut sm,
            0,
            new_user("q", Role::PowerUser, None, Some(quota)),
        ));
        let sha = "ab".repeat(32);
        // Added as an upload's import task of server 3 would: refused, or its task failed.
        let add = |sm: &mut StateMachine, by: u64, a: NewAppliance| {
            let import = Action::ImportUpload {
                name: a.name.clone(),
                upload: "u".into(),
                bytes: 1,
                server: 3,
            };
            let task = act(sm, by, import).map_err(|r| (r.kind, r.reason))?["task"]
                .as_u64()
                .unwrap();
            let ended = Command::TaskEnded {
                id: task,
                server: 3,
                at_ms: 1,
                outcome: TaskOutcome::Imported { appliance: a },
            };
            sm.apply(&ended, &mut Vec::new()).unwrap();
            match &sm.tasks[&task].state {
                TaskState::Failed { reason, .. } => Err((RefusalKind::Conflict, reason.clone())),
                _ => Ok(()),
            }
        };
        let refused = |r: Outcome| r.unwrap_err();
        assert_eq!(
            add(&mut sm, p, appliance("web", &sha)).unwrap_err().0,
            RefusalKind::Forbidden
        );
        let mut bad = appliance("web", "zz");
        assert!(add(&mut sm, m, bad.clone())
            .unwrap_err()
            .1
            .contains("SHA-256"));
        bad = appliance("web", &sha);
        bad.disks[0].size = 1000;
        assert!(add(&mut sm, m, bad.clone()).unwrap_err().1.contains("512"));
        bad = appliance("web", &sha);
        bad.boot = BootMode::Kernel;
        assert!(add(&mut sm, m, bad).unwrap_err().1.contains("firmware"));
        assert!(add(&mut sm, m, appliance("../web", &sha))
            .unwrap_err()
            .1
            .contains("name"));
        add(&mut sm, m, appliance("web", &sha)).unwrap();
        assert!(add(&mut sm, m, appliance("web", &sha))
            .unwrap_err()
            .1
            .contains("exists"));
        // Another server's agent copied it; a copy of other bytes is not taken.
        let held = |s: &str| Command::ApplianceHeld {
            name: "web".into(),
            disks: vec![s.into()],
            server: 2,
        };
        assert!(sm.apply(&held(&"cd".repeat(32)), &mut w).is_err());
        sm.apply(&held(&sha), &mut w).unwrap();
        assert_eq!(sm.appliances["web"].servers, [2, 3].into());

        // Not shared: a Power User's VM cannot be made from it (it is not there for them).
        let mut v = new_vm("v", &[]);
        v.boot = BootMode::Bios;
        v.appliance = Some("web".into());
        let create = |owner: u64, v: &crate::state_machine::NewVm| Action::CreateVm {
            owner,
            vm: v.clone(),
        };
        assert_eq!(
            refused(act(&mut sm, p, create(r, &v))).kind,
            RefusalKind::NotFound
        );
        // Shared with p's company: p makes r's VM from it; q may not; only a Power User is shared with.
        let share = |users: Vec<u64>| Action::EditAppliance {
            name: "web".into(),
            description: None,
            memory_mib: None,
            vcpus: None,
            shared_with: Some(users),
        };
        assert!(refused(act(&mut sm, m, share(vec![r])))
            .reason
            .contains("Power User"));
        act(&mut sm, m, share(vec![p])).unwrap();
        let unchanged = act(&mut sm, m, share(vec![p])).unwrap();
        assert_eq!(
            unchanged["unchanged"], true,
            "an edit changing nothing is not audited"
        );
        v.disk_size = 512;
        let small = refused(act(&mut sm, p, create(r, &v)));
        assert!(small.reason.contains("cannot hold"), "{small:?}");
        v.disk_size = 2 << 20;
        let made = act(&mut sm, p, create(r, &v)).unwrap();
        assert!(
            [2, 3].contains(&made["primary"].as_u64().unwrap()),
            "on a holder: {made}"
        );
        let disk = sm.vms["v"].disks[0].clone();
        assert_eq!(sm.disks[&disk].image.as_deref(), Some(sha.as_str()));
        let mut w2 = new_vm("w", &[]);
        w2.appliance = Some("web".into());
        assert_eq!(
            refused(act(&mut sm, q, create(q, &w2))).kind,
            RefusalKind::NotFound
        );

        // While the disk is being made from it, it stays; once the primary reports its copy,
        // the image is no longer needed and the appliance may go, by a Manager only.
        let delete = || Action::DeleteAppliance { name: "web".into() };
        assert!(refused(act(&mut sm, m, delete()))
            .reason
            .contains("being made"));
        let primary = sm.disks[&disk].primary;
        let report = Command::Observe {
            id: primary,
            observation: Observation {
                disks: [(
                    disk.clone(),
                    DiskObservation {
                        role: CopyRole::Primary,
                        generation: 1,
                        link: LinkState::Down,
                        peer: None,
                        out_of_sync_bytes: 0,
                        resync_percent: None,
                    },
                )]
                .into(),
                ..Default::default()
            },
        };
        sm.apply(&report, &mut w).unwrap();
        assert_eq!(sm.disks[&disk].image, None);
        assert_eq!(
            refused(act(&mut sm, p, delete())).kind,
            RefusalKind::Forbidden
        );
        act(&mut sm, m, delete()).unwrap();
        assert!(sm.appliances.is_empty());
        let audit: Vec<&str> = sm.audit.values().map(|a| a.action.as_str()).collect();
        for want in ["appliance.import", "appliance.edit", "appliance.delete"] {
            assert!(audit.contains(&want), "{want} in {audit:?}");
        }
    }
}
