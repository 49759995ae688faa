//! Users, their sessions, what each role may do, and the audit log, all in the Raft state.
//!
//! Three roles, as the product has always had them:
//!
//! ```text
//!   Manager ─────────── everything: servers, every user, every VM, the audit log
//!   Power User ──────── a customer company: creates Regular Users under itself; sees and
//!      │                operates its own VMs and its users' VMs, within the quota a
//!      │                Manager set; never anything of another company
//!      └─ Regular User  exactly one VM: power it, see it, use its console; nothing else
//! ```
//!
//! Every change a person makes goes through one command, `Command::Act`, whose `actor` is
//! checked here against the state at the moment the entry is applied: two racing requests
//! cannot both squeeze under a quota, and a refused change leaves the state as it was. The
//! audit entry of an accepted change is written in the same batch as the change itself.

use serde::{Deserialize, Serialize};

use crate::state_machine::{StateMachine, VmRecord};

/// A user's privilege level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Runs the cluster.
    Manager,
    /// A customer company's administrator.
    PowerUser,
    /// Owns exactly one VM.
    Regular,
}

/// What a Power User's company may use, set by a Manager.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    /// VMs, its own and its users' together.
    pub vms: u32,
    /// Guest memory of those VMs, MiB.
    pub memory_mib: u64,
    /// Disk of those VMs and of the appliances made from them (copies back, live backups),
    /// GiB.
    pub disk_gib: u64,
}

/// A person who logs in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// Unique, never reused.
    pub id: u64,
    /// Login name, unique in the cluster.
    pub name: String,
    /// Privilege level.
    pub role: Role,
    /// The Power User a Regular User belongs to (its company); `None` for Managers, Power
    /// Users, and Regular Users a Manager created directly.
    #[serde(default)]
    pub parent: Option<u64>,
    /// The password's argon2id hash, a PHC string.
    pub password: String,
    /// A Power User's quota.
    #[serde(default)]
    pub quota: Option<Quota>,
    /// When it was created, ms since the epoch.
    #[serde(default)]
    pub created_ms: u64,
}

/// A logged-in browser or client. The token itself never enters the state: only its SHA-256.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// SHA-256 of the session token, hex.
    pub token_hash: String,
    /// Whose session.
    pub user: u64,
    /// The CSRF token every change in this session must carry.
    pub csrf: String,
    /// Created, ms since the epoch.
    pub created_ms: u64,
    /// Expires, ms since the epoch.
    pub expires_ms: u64,
}

/// One accepted change: who, what, when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Its position in the log, from 1.
    pub seq: u64,
    /// When the change was asked for, ms since the epoch.
    pub at_ms: u64,
    /// Who: the user's id (0: the cluster itself, through its own protocol).
    pub actor: u64,
    /// Who, by name at the time.
    pub actor_name: String,
    /// What: a short verb, e.g. `vm.power_on`.
    pub action: String,
    /// On what, e.g. `vm 12 (web1)`.
    pub target: String,
}

/// How many sessions one user keeps; a login beyond it ends the oldest.
pub const MAX_SESSIONS: usize = 16;

/// How many audit entries the state keeps in memory; older ones move to the archive in the
/// store (`state_machine::ARCHIVED_AUDIT_PREFIX`), still read by `GET /api/v1/audit?after=`.
pub const AUDIT_KEEP: u64 = 100_000;

/// Why an actor may not do something.
pub fn refuse(what: impl Into<String>) -> crate::state_machine::Refusal {
    crate::state_machine::Refusal::forbidden(format!("forbidden: {}", what.into()))
}

/// The company a user belongs to: a Power User's own id, its Regular Users' parent.
pub fn company(u: &UserRecord) -> Option<u64> {
    match u.role {
        Role::Manager => None,
        Role::PowerUser => Some(u.id),
        Role::Regular => u.parent,
    }
}

/// Whether user `u` may see appliance `a` and have VMs made from it: Managers any, others those
/// shared with their company.
pub fn may_use_appliance(u: &UserRecord, a: &crate::state_machine::ApplianceRecord) -> bool {
    u.role == Role::Manager || company(u).is_some_and(|c| a.shared_with.contains(&c))
}

/// Whether `actor` may see and administer user `target` (edit, delete, reset its password).
pub fn may_manage_user(actor: &UserRecord, target: &UserRecord) -> bool {
    match actor.role {
        Role::Manager => true,
        Role::PowerUser => target.role == Role::Regular && target.parent == Some(actor.id),
        Role::Regular => false,
    }
}

/// Whether `actor` may see user `target` (itself, or one it manages).
pub fn may_see_user(actor: &UserRecord, target: &UserRecord) -> bool {
    actor.id == target.id || may_manage_user(actor, target)
}

/// Whether `actor` may see and operate (power, console, CD-ROM) `vm`.
pub fn may_operate_vm(state: &StateMachine, actor: &UserRecord, vm: &VmRecord) -> bool {
    match actor.role {
        Role::Manager => true,
        Role::Regular => vm.owner == Some(actor.id),
        Role::PowerUser => vm.owner.is_some_and(|o| {
            o == actor.id
                || state
                    .users
                    .get(&o)
                    .is_some_and(|u| u.role == Role::Regular && u.parent == Some(actor.id))
        }),
    }
}

/// Whether `actor` may create, clone or delete VMs owned by `owner`.
pub fn may_administer_vms_of(actor: &UserRecord, owner: &UserRecord) -> bool {
    match actor.role {
        Role::Manager => true,
        Role::PowerUser => {
            owner.id == actor.id || (owner.role == Role::Regular && owner.parent == Some(actor.id))
        }
        Role::Regular => false,
    }
}

/// What a company uses now: VMs, memory (MiB) and disk (bytes) of every VM owned by the
/// Power User `company` or one of its users; the disk also of the appliances made from its
/// VMs (copies back and backups), and of those being made.
pub fn company_usage(state: &StateMachine, company: u64) -> (u32, u64, u64) {
    let members: Vec<u64> = state
        .users
        .values()
        .filter(|u| self::company(u) == Some(company))
        .map(|u| u.id)
        .collect();
    let mut usage = (0u32, 0u64, 0u64);
    for vm in state.vms.values() {
        if vm.owner.is_some_and(|o| members.contains(&o)) {
            usage.0 += 1;
            usage.1 += vm.memory_mib;
            usage.2 += vm
                .disks
                .iter()
                .filter_map(|d| state.disks.get(d))
                .map(|d| d.size)
                .sum::<u64>();
        }
    }
    for a in state.appliances.values() {
        if a.company == Some(company) {
            usage.2 += a.disks.iter().map(|d| d.size).sum::<u64>();
        }
    }
    for t in state.tasks.values() {
        let making =
            t.state == crate::state_machine::TaskState::Running && t.kind.appliance().is_some();
        let of_company = t
            .kind
            .vm()
            .and_then(|vm| state.vm_by_id(vm))
            .is_some_and(|v| v.owner.is_some_and(|o| members.contains(&o)));
        if making && of_company {
            usage.2 += t.total_bytes;
        }
    }
    usage
}

/// Checks that one of `owner`'s VMs can go from `was` to `now` MiB of memory within its
/// company's quota.
pub fn check_vm_memory(
    state: &StateMachine,
    owner: &UserRecord,
    was: u64,
    now: u64,
) -> Result<(), String> {
    let Some(c) = company(owner) else {
        return Ok(());
    };
    let Some(q) = state.users.get(&c).and_then(|p| p.quota) else {
        return Err(format!("company of user {}: no quota set", owner.name));
    };
    let (_, mem, _) = company_usage(state, c);
    let after = mem.saturating_sub(was) + now;
    if now > was && after > q.memory_mib {
        return Err(format!(
            "quota: {mem} MiB of {} MiB memory in use, {} MiB more asked",
            q.memory_mib,
            now - was
        ));
    }
    Ok(())
}

/// Checks that `more` bytes of disk for one of `owner`'s VMs fit its company's quota.
pub fn check_more_disk(state: &StateMachine, owner: &UserRecord, more: u64) -> Result<(), String> {
    let Some(c) = company(owner) else {
        return Ok(());
    };
    let Some(q) = state.users.get(&c).and_then(|p| p.quota) else {
        return Err(format!("company of user {}: no quota set", owner.name));
    };
    let (_, _, disk) = company_usage(state, c);
    let gib = 1u64 << 30;
    if more > 0 && disk.saturating_add(more) > q.disk_gib.saturating_mul(gib) {
        return Err(format!(
            "quota: {} GiB of {} GiB disk in use, {} GiB more asked",
            disk.div_ceil(gib),
            q.disk_gib,
            more.div_ceil(gib)
        ));
    }
    Ok(())
}

/// Checks that a new VM of `memory_mib` and `disk_size` bytes for `owner` fits: a Regular User
/// owns one VM at most; a company stays within its Power User's quota.
pub fn check_new_vm(
    state: &StateMachine,
    owner: &UserRecord,
    memory_mib: u64,
    disk_size: u64,
) -> Result<(), String> {
    if owner.role == Role::Regular && state.vms.values().any(|vm| vm.owner == Some(owner.id)) {
        return Err(format!(
            "user {} already owns a VM: a Regular User owns exactly one",
            owner.name
        ));
    }
    let Some(c) = company(owner) else {
        return Ok(());
    };
    let Some(q) = state.users.get(&c).and_then(|p| p.quota) else {
        return Err(format!("company of user {}: no quota set", owner.name));
    };
    let (vms, mem, _) = company_usage(state, c);
    if vms + 1 > q.vms {
        return Err(format!("quota: {} of {} VMs in use", vms, q.vms));
    }
    if mem + memory_mib > q.memory_mib {
        return Err(format!(
            "quota: {mem} MiB of {} MiB memory in use, {memory_mib} MiB asked",
            q.memory_mib
        ));
    }
    check_more_disk(state, owner, disk_size)
}

/// A name a person chose for a user or a VM: 1 to 63 of `A-Z a-z 0-9 . _ -`, not starting
/// with `.` or `-`. VM names become file names on the servers.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} name {name:?}: 1 to 63 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
        ))
    }
}

/// The sessions of `user`, by token hash.
pub fn sessions_of(sessions: &imbl::OrdMap<String, SessionRecord>, user: u64) -> Vec<String> {
    sessions
        .values()
        .filter(|s| s.user == user)
        .map(|s| s.token_hash.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: u64, role: Role, parent: Option<u64>) -> UserRecord {
        UserRecord {
            id,
            name: format!("u{id}"),
            role,
            parent,
            password: String::new(),
            quota: None,
            created_ms: 0,
        }
    }

    #[test]
    fn who_manages_whom() {
        let m = user(1, Role::Manager, None);
        let p = user(2, Role::PowerUser, None);
        let q = user(3, Role::PowerUser, None);
        let r = user(4, Role::Regular, Some(2));
        let s = user(5, Role::Regular, Some(3));
        assert!(may_manage_user(&m, &p) && may_manage_user(&m, &r));
        assert!(may_manage_user(&p, &r));
        assert!(!may_manage_user(&p, &s), "another company's user");
        assert!(!may_manage_user(&p, &q) && !may_manage_user(&p, &m));
        assert!(!may_manage_user(&r, &r), "a Regular User manages nobody");
        assert!(may_see_user(&r, &r) && !may_see_user(&r, &s));
    }

    #[test]
    fn names() {
        for good in ["web1", "a", "My_VM-2.test"] {
            assert!(check_name("VM", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".hidden",
            "-x",
            "a/b",
            "../etc",
            "é",
            &"x".repeat(64),
            "a b",
        ] {
            assert!(check_name("VM", bad).is_err(), "{bad:?}");
        }
    }
}
