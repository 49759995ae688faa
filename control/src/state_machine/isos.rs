//! The ISO library: images added and deleted by Managers, copied by every VM server's agent,
//! and put into (or ejected from) VMs' CD-ROM drives.

use serde_json::Value;

use super::keys::{iso_key, json_bytes, vm_key};
use super::rights::Actor;
use super::{Acted, Action, IsoRecord, Outcome, RecordWrite, Refusal, StateMachine};
use crate::access;

impl StateMachine {
    /// Server `server`'s node agent holds a checked copy of ISO `name`, of SHA-256 `sha256`
    /// (`Command::IsoHeld`).
    pub(super) fn iso_held(
        &mut self,
        name: &str,
        sha256: &str,
        server: u64,
        writes: &mut Vec<RecordWrite>,
    ) -> Outcome {
        if !self.servers.contains_key(&server) {
            return Err(Refusal::not_found(format!("no server {server}")));
        }
        let iso = self
            .isos
            .get_mut(name)
            .ok_or_else(|| Refusal::not_found(format!("no ISO {name}")))?;
        if iso.sha256 != sha256 {
            return Err(Refusal::conflict(format!(
                "ISO {name} is {}, not {sha256}: replaced meanwhile",
                iso.sha256
            )));
        }
        if iso.servers.insert(server) {
            writes.push((iso_key(name), Some(json_bytes(iso))));
        }
        Ok(Value::Null)
    }

    /// Applies an action on the ISO library or a CD-ROM drive for `by` (`act` routes them here).
    pub(super) fn act_on_iso(
        &mut self,
        by: &Actor,
        action: &Action,
        writes: &mut Vec<RecordWrite>,
    ) -> Result<Acted<'static>, Refusal> {
        let (verb, target, result) = match action {
            Action::AddIso {
                name,
                size,
                sha256,
                server,
            } => {
                if !by.is_manager() {
                    return Err(access::refuse("only a Manager adds to the library"));
                }
                access::check_name("ISO", name)?;
                if self.isos.contains_key(name) {
                    return Err(Refusal::conflict(format!(
                        "ISO {name} exists: delete it first"
                    )));
                }
                if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(Refusal::conflict(format!(
                        "ISO {name}: {sha256:?} is not a SHA-256"
                    )));
                }
                if !self.servers.contains_key(server) {
                    return Err(Refusal::not_found(format!("no server {server}")));
                }
                let iso = IsoRecord {
                    name: name.clone(),
                    size: *size,
                    sha256: sha256.to_ascii_lowercase(),
                    uploaded_by: by.id,
                    uploaded_ms: by.at_ms,
                    servers: [*server].into(),
                };
                writes.push((iso_key(name), Some(json_bytes(&iso))));
                self.isos.insert(name.clone(), iso);
                ("iso.add", format!("iso {name}"), Value::Null)
            }
            Action::DeleteIso { name } => {
                if !by.is_manager() {
                    return Err(access::refuse("only a Manager deletes from the library"));
                }
                if !self.isos.contains_key(name) {
                    return Err(Refusal::not_found(format!("no ISO {name}")));
                }
                if let Some(v) = self.vms.values().find(|v| v.cdrom.as_ref() == Some(name)) {
                    return Err(Refusal::conflict(format!(
                        "ISO {name} is in the CD-ROM drive of VM {} ({}): eject it first",
                        v.id, v.name
                    )));
                }
                self.isos.remove(name);
                writes.push((iso_key(name), None));
                ("iso.delete", format!("iso {name}"), Value::Null)
            }
            Action::SetCdrom { vm, iso } => {
                let v = self.operable_vm(by.who.as_ref(), *vm)?;
                if let Some(name) = iso {
                    if !self.isos.contains_key(name) {
                        return Err(Refusal::not_found(format!("no ISO {name}")));
                    }
                }
                let r = self.vms.get_mut(&v.name).expect("found");
                r.cdrom = iso.clone();
                writes.push((vm_key(&v.name), Some(json_bytes(r))));
                let verb = if iso.is_some() {
                    "vm.cdrom_insert"
                } else {
                    "vm.cdrom_eject"
                };
                let target = match iso {
                    Some(i) => format!("vm {vm} ({}): {i}", v.name),
                    None => format!("vm {vm} ({})", v.name),
                };
                (verb, target, Value::Null)
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

#[cfg(test)]
mod tests {
    use crate::access::Role;
    use crate::state_machine::fixtures::{act, new_user, new_vm, server};
    use crate::state_machine::{Action, Command, Outcome, RefusalKind, StateMachine};

    #[test]
    fn the_iso_library_is_the_managers_and_a_cdrom_takes_only_its_images() {
        let mut sm = StateMachine::default();
        let mut w = Vec::new();
        for id in 1..=2 {
            sm.add_server(&server(id, false), &mut w);
        }
        let user = |name: &str, role: Role, parent: Option<u64>| new_user(name, role, parent, None);
        let id = |r: Outcome| r.unwrap()["id"].as_u64().unwrap();
        let m = id(act(&mut sm, 0, user("m", Role::Manager, None)));
        let p = id(act(&mut sm, 0, user("p", Role::PowerUser, None)));
        let r = id(act(&mut sm, 0, user("r", Role::Regular, Some(p))));
        let other = id(act(&mut sm, 0, user("o", Role::Regular, None)));
        let mut vm = new_vm("v", &[]).record(Some(r));
        vm.id = 7;
        sm.vms.insert("v".into(), vm);
        let sha = "ab".repeat(32);
        let add = |name: &str, sha: &str| Action::AddIso {
            name: name.into(),
            size: 10,
            sha256: sha.into(),
            server: 1,
        };
        let refused = |r: Outcome| r.unwrap_err();
        assert!(refused(act(&mut sm, p, add("a.iso", &sha))).kind == RefusalKind::Forbidden);
        assert!(refused(act(&mut sm, m, add("../a", &sha)))
            .reason
            .contains("name"));
        assert!(refused(act(&mut sm, m, add("a.iso", "zz")))
            .reason
            .contains("SHA-256"));
        act(&mut sm, m, add("a.iso", &sha)).unwrap();
        assert!(refused(act(&mut sm, m, add("a.iso", &sha)))
            .reason
            .contains("exists"));
        assert_eq!(sm.isos["a.iso"].servers, [1].into());
        // Server 2's agent copied it; a copy of other bytes is not taken.
        let held = |sha: &str| Command::IsoHeld {
            name: "a.iso".into(),
            sha256: sha.into(),
            server: 2,
        };
        assert!(sm.apply(&held(&"cd".repeat(32)), &mut w).is_err());
        sm.apply(&held(&sha), &mut w).unwrap();
        assert_eq!(sm.isos["a.iso"].servers, [1, 2].into());
        // The VM's Regular User and its Power User change its CD-ROM; another user cannot.
        let cdrom = |iso: Option<&str>| Action::SetCdrom {
            vm: 7,
            iso: iso.map(str::to_string),
        };
        assert!(refused(act(&mut sm, other, cdrom(Some("a.iso")))).kind == RefusalKind::Forbidden);
        assert!(refused(act(&mut sm, r, cdrom(Some("b.iso"))))
            .reason
            .contains("no ISO"));
        act(&mut sm, r, cdrom(Some("a.iso"))).unwrap();
        assert_eq!(sm.vms["v"].cdrom.as_deref(), Some("a.iso"));
        // In a drive, it cannot be deleted; ejected, it can, by a Manager only.
        let delete = || Action::DeleteIso {
            name: "a.iso".into(),
        };
        assert!(refused(act(&mut sm, m, delete())).reason.contains("eject"));
        act(&mut sm, p, cdrom(None)).unwrap();
        assert_eq!(sm.vms["v"].cdrom, None);
        assert!(refused(act(&mut sm, p, delete())).kind == RefusalKind::Forbidden);
        act(&mut sm, m, delete()).unwrap();
        assert!(sm.isos.is_empty());
        let audit: Vec<&str> = sm.audit.values().map(|a| a.action.as_str()).collect();
        for want in ["iso.add", "vm.cdrom_insert", "vm.cdrom_eject", "iso.delete"] {
            assert!(audit.contains(&want), "{want} in {audit:?}");
        }
    }
}
