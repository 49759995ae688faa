//! Who may do what to a VM, as `act` asks before it changes anything (the rules themselves are
//! `access`'s): the actor of an action, a VM it may operate, a powered-off VM it administers.

use super::{Refusal, StateMachine, VmRecord};
use crate::access::{self, Role, UserRecord};

/// Who asks for an action (`Command::Act`), and when.
pub(super) struct Actor {
    /// Their user id; 0: the cluster itself, through its own protocol.
    pub(super) id: u64,
    /// Their record; none for the cluster itself, which may do anything.
    pub(super) who: Option<UserRecord>,
    /// When they asked, ms since the epoch (set by the server that took it).
    pub(super) at_ms: u64,
}

impl Actor {
    /// Whether it may do what only a Manager does (the cluster itself may).
    pub(super) fn is_manager(&self) -> bool {
        self.who.as_ref().is_none_or(|u| u.role == Role::Manager)
    }
}

impl StateMachine {
    /// The actor `id` of an action asked for at `at_ms`. The cluster itself (actor 0) may do
    /// anything; a person must exist.
    pub(super) fn actor(&self, id: u64, at_ms: u64) -> Result<Actor, Refusal> {
        let who = match id {
            0 => None,
            id => Some(
                self.users
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| access::refuse(format!("no user {id}")))?,
            ),
        };
        Ok(Actor { id, who, at_ms })
    }

    /// VM `vm` (VMID), if `who` may operate it (the cluster itself, `None`, may).
    pub(super) fn operable_vm(
        &self,
        who: Option<&UserRecord>,
        vm: u64,
    ) -> Result<VmRecord, Refusal> {
        let v = self
            .vm_by_id(vm)
            .cloned()
            .ok_or_else(|| Refusal::not_found(format!("no VM {vm}")))?;
        match who {
            Some(u) if !access::may_operate_vm(self, u, &v) => {
                Err(access::refuse(format!("VM {vm}")))
            }
            _ => Ok(v),
        }
    }

    /// VM `vm`, if `who` (none: the cluster itself) administers it (its owner's administrators,
    /// or a Manager for the cluster's own VMs) and it is powered off; else why not, ending
    /// "power it off {then}".
    pub(super) fn powered_off_vm_administered_by(
        &self,
        who: Option<&UserRecord>,
        vm: u64,
        then: &str,
    ) -> Result<VmRecord, Refusal> {
        let v = self
            .vm_by_id(vm)
            .cloned()
            .ok_or_else(|| Refusal::not_found(format!("no VM {vm}")))?;
        if let Some(u) = who {
            let allowed = match v.owner.and_then(|o| self.users.get(&o)) {
                Some(o) => access::may_administer_vms_of(u, o),
                None => u.role == Role::Manager,
            };
            if !allowed || !access::may_operate_vm(self, u, &v) {
                return Err(access::refuse(format!("VM {vm}")));
            }
        }
        if v.running || self.vm_observed_running(&v.name) {
            return Err(Refusal::conflict(format!(
                "VM {vm} ({}) is powered on: power it off {then}",
                v.name
            )));
        }
        Ok(v)
    }
}
