//! What the API shows of the state, and to whom: VMs with their placement, power and
//! replication health; users without their password hashes; servers.

use control::access::{self, Role, UserRecord};
use control::state_machine::{
    ApplianceDisk, BootMode, BootOrder, DiskBus, DiskRecord, LinkState, StateMachine, VmPart,
    VmRecord,
};
use serde::Serialize;

/// A user as the API shows it.
#[derive(Debug, Serialize)]
pub struct UserView {
    /// Id.
    pub id: u64,
    /// Login name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// A Regular User's Power User.
    pub parent: Option<u64>,
    /// A Power User's quota, with what its company uses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota: Option<QuotaView>,
    /// The VM a Regular User owns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm: Option<u64>,
}

/// A quota and its use.
#[derive(Debug, Serialize)]
pub struct QuotaView {
    /// VMs allowed.
    pub vms: u32,
    /// Memory allowed, MiB.
    pub memory_mib: u64,
    /// Disk allowed, GiB.
    pub disk_gib: u64,
    /// VMs in use.
    pub used_vms: u32,
    /// Memory in use, MiB.
    pub used_memory_mib: u64,
    /// Disk in use, GiB (rounded up).
    pub used_disk_gib: u64,
}

/// A user's view.
pub fn user(state: &StateMachine, u: &UserRecord) -> UserView {
    let quota = u.quota.map(|q| {
        let (vms, mem, disk) = access::company_usage(state, u.id);
        QuotaView {
            vms: q.vms,
            memory_mib: q.memory_mib,
            disk_gib: q.disk_gib,
            used_vms: vms,
            used_memory_mib: mem,
            used_disk_gib: disk.div_ceil(1 << 30),
        }
    });
    UserView {
        id: u.id,
        name: u.name.clone(),
        role: u.role,
        parent: u.parent,
        quota,
        vm: (u.role == Role::Regular)
            .then(|| {
                state
                    .vms
                    .values()
                    .find(|vm| vm.owner == Some(u.id))
                    .map(|vm| vm.id)
            })
            .flatten(),
    }
}

/// The users `me` may see.
pub fn users(state: &StateMachine, me: &UserRecord) -> Vec<UserView> {
    state
        .users
        .values()
        .filter(|u| access::may_see_user(me, u))
        .map(|u| user(state, u))
        .collect()
}

/// Where a copy of a VM's disk lives. Its address and pool only a Manager sees.
#[derive(Debug, Serialize)]
pub struct Copy {
    /// The server.
    pub server: u64,
    /// Its address (Managers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The pool on it (Managers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The server is declared down.
    pub down: bool,
}

/// How well a VM's disks are replicated, worst first.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicationState {
    /// No usable backup: one copy only.
    Degraded,
    /// Its primary's server has not reported the disk.
    Unknown,
    /// The backup is being brought up to date.
    Resyncing,
    /// Both copies hold every acknowledged write.
    InSync,
}

/// A VM's replication health, as its owner sees it.
#[derive(Debug, Serialize)]
pub struct Replication {
    /// The worst of its disks'.
    pub state: ReplicationState,
    /// While resyncing: how much of the disk is in sync, percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    /// The disk's generation.
    pub generation: u64,
}

/// Whether a VM should run.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Power {
    /// It should run.
    On,
    /// It should not.
    Off,
}

/// What runs of a VM.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum VmStatus {
    /// Its VMM runs on its primary.
    Running,
    /// It should run and does not yet.
    Starting,
    /// It should not run and still does.
    Stopping,
    /// It does not run.
    Stopped,
}

/// A VM as the API shows it.
#[derive(Debug, Serialize)]
pub struct VmView {
    /// VMID.
    pub id: u64,
    /// Name.
    pub name: String,
    /// Owner id.
    pub owner: Option<u64>,
    /// Owner name.
    pub owner_name: Option<String>,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Its live backups on a schedule, if it has one.
    pub backup_schedule: Option<control::state_machine::BackupSchedule>,
    /// When its last live backup began, ms since the epoch (none: never).
    pub last_backup_ms: Option<u64>,
    /// Why its scheduled backup, due, waits (its company's disk quota), if it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_held: Option<String>,
    /// Disk sizes, bytes, disk 0 first.
    pub disks: Vec<u64>,
    /// Whether it should run.
    pub power: Power,
    /// What runs.
    pub status: VmStatus,
    /// Its primary copy.
    pub primary: Option<Copy>,
    /// Its backup copy.
    pub backup: Option<Copy>,
    /// Replication health of disk 0.
    pub replication: Replication,
    /// The ISO in its CD-ROM drive; none: empty.
    pub cdrom: Option<String>,
    /// How it starts: `kernel` (the cluster's guest kernel), or `bios` or `uefi` (its disks
    /// and CD, through that firmware).
    pub boot: BootMode,
    /// With `bios` or `uefi`: `disk_first` or `cdrom_first`.
    pub boot_order: BootOrder,
    /// With `bios` or `uefi`: the controller its disks are on, `virtio` or `sata`.
    pub disk_bus: DiskBus,
    /// Its network cards, in order.
    pub nics: Vec<NicView>,
    /// Why it does not run though it should (its primary server cannot start it): the
    /// details for a Manager, the gist for others.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Its live migration, while one is under way.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationView>,
}

/// A live migration under way, as the API shows it.
#[derive(Debug, Serialize)]
pub struct MigrationView {
    /// The server it moves to.
    pub to: u64,
    /// Its disks were handed over: it is the target's now.
    pub switched: bool,
    /// A Manager asked to give it up.
    pub cancel_asked: bool,
    /// It waits for its disks' new copies on the target to be in sync (a move to a server
    /// other than its disks' backup).
    pub copying_disks: bool,
    /// Where it stands, as the source's VMM last said (none before it began).
    pub progress: Option<vmm_api::MigrationProgress>,
}

/// A VM's network card as the API shows it.
#[derive(Debug, Serialize)]
pub struct NicView {
    /// Its network.
    pub network: String,
    /// Its MAC address.
    pub mac: String,
    /// The address the cluster's DHCP service leases it, on a network with a subnet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<std::net::Ipv4Addr>,
    /// The addresses its guest is seen to use, newest last: the lease once the guest took
    /// it, or what it claims in its ARP traffic (as its running server's agent saw them).
    pub addresses: Vec<std::net::Ipv4Addr>,
}

/// A network as the API shows it: where it is built only to a Manager.
#[derive(Debug, Serialize)]
pub struct NetworkView {
    /// Its name.
    pub name: String,
    /// Its IPv4 subnet, if it has one.
    pub subnet: Option<String>,
    /// The router its DHCP service names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<std::net::Ipv4Addr>,
    /// The DNS servers its DHCP service names.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<std::net::Ipv4Addr>,
    /// Whether only one company's VMs use it.
    pub private: bool,
    /// The bridge on every VM server (Managers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// The uplink NIC (Managers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uplink: Option<String>,
    /// Its VLAN (Managers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    /// The Power User whose company it is (Managers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub company: Option<u64>,
    /// How many VMs `viewer` may see have a card on it.
    pub vms: usize,
}

/// The networks `viewer` may put VMs on: a Manager sees them all, with where they are built;
/// others see the shared ones and their company's.
pub fn networks(state: &StateMachine, viewer: &UserRecord) -> Vec<NetworkView> {
    let manager = viewer.role == Role::Manager;
    let company = access::company(viewer);
    state
        .networks
        .values()
        .filter(|n| manager || n.company.is_none() || n.company == company)
        .map(|n| NetworkView {
            name: n.name.clone(),
            subnet: n.subnet.clone(),
            gateway: n.router(),
            dns: n.dns.clone(),
            private: n.company.is_some(),
            bridge: manager.then(|| n.bridge.clone()),
            uplink: if manager { n.uplink.clone() } else { None },
            vlan: if manager { n.vlan } else { None },
            company: if manager { n.company } else { None },
            vms: state
                .vms
                .values()
                .filter(|v| v.nics.iter().any(|c| c.network == n.name))
                .filter(|v| access::may_operate_vm(state, viewer, v))
                .count(),
        })
        .collect()
}

fn copy(
    state: &StateMachine,
    server: u64,
    pools: &std::collections::BTreeMap<u64, String>,
    manager: bool,
) -> Copy {
    let s = state.servers.get(&server);
    Copy {
        server,
        address: manager.then(|| s.map(|s| s.address.clone()).unwrap_or_default()),
        pool: manager.then(|| pools.get(&server).cloned().unwrap_or_default()),
        down: s.is_none_or(|s| s.down),
    }
}

/// What VM `vm` is doing: its power as asked, against what its server reports.
pub fn vm_status(state: &StateMachine, vm: &VmRecord) -> VmStatus {
    match (vm.running, state.vm_observed_running(&vm.name)) {
        (true, true) => VmStatus::Running,
        (true, false) => VmStatus::Starting,
        (false, true) => VmStatus::Stopping,
        (false, false) => VmStatus::Stopped,
    }
}

/// A VM's replication: that of its least healthy disk (degraded, then unknown, then
/// resyncing, then in sync); while resyncing, the share of all its disks' bytes in sync.
pub fn vm_replication(state: &StateMachine, vm: &VmRecord) -> Replication {
    let disks: Vec<&DiskRecord> = vm.disks.iter().filter_map(|d| state.disks.get(d)).collect();
    let each: Vec<(u64, Replication)> = disks
        .iter()
        .map(|d| (d.size, disk_replication(state, d)))
        .collect();
    let generation = disks.first().map_or(0, |d| d.generation);
    let Some(worst) = each.iter().map(|(_, r)| r.state).min() else {
        return Replication {
            state: ReplicationState::Unknown,
            percent: None,
            generation,
        };
    };
    let percent = (worst == ReplicationState::Resyncing).then(|| {
        let total: u64 = each.iter().map(|(size, _)| size).sum();
        let synced: f64 = each
            .iter()
            .map(|(size, r)| *size as f64 * r.percent.unwrap_or(100.0) / 100.0)
            .sum();
        if total == 0 {
            0.0
        } else {
            (synced * 1000.0 / total as f64).floor() / 10.0
        }
    });
    Replication {
        state: worst,
        percent,
        generation,
    }
}

/// One disk's replication, from its record and what its primary's agent reports.
fn disk_replication(state: &StateMachine, d: &DiskRecord) -> Replication {
    let seen = state
        .observed
        .get(&d.primary)
        .and_then(|o| o.disks.get(&d.name));
    use ReplicationState::*;
    let (st, percent) = match (d.backup, seen) {
        (None, _) => (Degraded, None),
        (Some(_), _) if d.backup_synced && seen.is_none_or(|o| o.link == LinkState::InSync) => {
            (InSync, None)
        }
        (Some(_), Some(o)) if o.link == LinkState::Resyncing || o.out_of_sync_bytes > 0 => {
            // The resync's own progress when one runs; else how much of the disk is not
            // marked out of sync.
            let pct = match o.resync_percent {
                Some(p) => f64::from(p),
                None if d.size == 0 => 0.0,
                None => d.size.saturating_sub(o.out_of_sync_bytes) as f64 * 100.0 / d.size as f64,
            };
            (Resyncing, Some((pct * 10.0).floor() / 10.0))
        }
        (Some(_), Some(o)) if o.link == LinkState::InSync => (InSync, None),
        (Some(_), Some(_)) => (Degraded, None),
        (Some(_), None) => (Unknown, None),
    };
    Replication {
        state: st,
        percent,
        generation: d.generation,
    }
}

/// VM `vm` as `viewer` sees it: servers' addresses and pools only for a Manager.
pub fn vm(state: &StateMachine, vm: &VmRecord, viewer: &UserRecord) -> VmView {
    let manager = viewer.role == Role::Manager;
    let disk = vm.disks.first().and_then(|d| state.disks.get(d));
    let status = vm_status(state, vm);
    let replication = vm_replication(state, vm);
    let owner = vm.owner.and_then(|o| state.users.get(&o));
    VmView {
        id: vm.id,
        name: vm.name.clone(),
        owner: vm.owner,
        owner_name: owner.map(|u| u.name.clone()),
        memory_mib: vm.memory_mib,
        vcpus: vm.vcpus,
        backup_schedule: vm.backup_schedule,
        last_backup_ms: (vm.last_backup_ms > 0).then_some(vm.last_backup_ms),
        backup_held: state.scheduled_backup_held(vm, crate::cluster::now_ms()),
        disks: vm
            .disks
            .iter()
            .filter_map(|d| state.disks.get(d))
            .map(|d| d.size)
            .collect(),
        power: if vm.running { Power::On } else { Power::Off },
        status,
        primary: disk.map(|d| copy(state, d.primary, &d.pools, manager)),
        backup: disk.and_then(|d| d.backup.map(|b| copy(state, b, &d.pools, manager))),
        replication,
        cdrom: vm.cdrom.clone(),
        boot: vm.boot,
        boot_order: vm.boot_order,
        disk_bus: vm.disk_bus,
        nics: vm
            .nics
            .iter()
            .map(|n| NicView {
                network: n.network.clone(),
                mac: n.mac.clone(),
                ip: n.ip,
                addresses: observed_addresses(state, vm, &n.mac),
            })
            .collect(),
        error: vm_error(state, vm, manager),
        migration: vm.moving.as_ref().map(|m| MigrationView {
            to: m.to,
            switched: m.switched,
            cancel_asked: m.cancel,
            copying_disks: !m.switched && !state.live_move_ready(vm),
            progress: state
                .observed
                .values()
                .find_map(|o| o.vms.get(&vm.name)?.migration.clone()),
        }),
    }
}

/// The addresses VM `vm`'s card `mac` is seen to use, as its running server's agent reports.
fn observed_addresses(state: &StateMachine, vm: &VmRecord, mac: &str) -> Vec<std::net::Ipv4Addr> {
    if !vm.running {
        return Vec::new();
    }
    state
        .vm_primary(vm)
        .and_then(|p| state.observed.get(&p))
        .and_then(|o| o.vms.get(&vm.name))
        .and_then(|o| o.addresses.iter().find(|a| a.mac == mac))
        .map(|a| a.ips.clone())
        .unwrap_or_default()
}

/// Why VM `vm` does not run though it should, as its primary server's agent reports it.
fn vm_error(state: &StateMachine, vm: &VmRecord, manager: bool) -> Option<String> {
    if !vm.running {
        return None;
    }
    let primary = state.vm_primary(vm)?;
    let fault = state
        .observed
        .get(&primary)?
        .vms
        .get(&vm.name)?
        .fault
        .clone()?;
    Some(if manager {
        format!("server {primary}: {fault}")
    } else {
        match fault.part {
            VmPart::Network => {
                "its network is not available on its server (a Manager can see why)".into()
            }
            VmPart::Vmm => "its server cannot start it (a Manager can see why)".into(),
        }
    })
}

/// An appliance of the library as the API shows it.
#[derive(Debug, Serialize)]
pub struct ApplianceView {
    /// Its name.
    pub name: String,
    /// What it is.
    pub description: String,
    /// Guest RAM of the VMs made from it, MiB.
    pub memory_mib: u64,
    /// Their vCPUs.
    pub vcpus: u32,
    /// Their firmware.
    pub boot: BootMode,
    /// The controller their disks are on.
    pub disk_bus: DiskBus,
    /// Their network cards.
    pub nics: u32,
    /// Its disk images, Disk0 first: size and SHA-256.
    pub disks: Vec<ApplianceDisk>,
    /// Where it came from.
    pub origin: String,
    /// Who added it, by name (none once deleted).
    pub created_by: Option<String>,
    /// When, ms since the epoch.
    pub created_ms: u64,
    /// The VM servers holding every disk image.
    pub servers: Vec<u64>,
    /// How many VM servers there are.
    pub vm_servers: usize,
    /// The Power Users (ids) whose companies may use it: shown to Managers only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_with: Option<Vec<u64>>,
}

/// The VM servers (not witnesses), by id.
fn vm_server_ids(state: &StateMachine) -> Vec<u64> {
    state
        .servers
        .values()
        .filter(|s| !s.witness)
        .map(|s| s.id)
        .collect()
}

/// Which of `holders` (of a library file) are VM servers.
fn holding(holders: &std::collections::BTreeSet<u64>, vm_servers: &[u64]) -> Vec<u64> {
    holders
        .iter()
        .copied()
        .filter(|s| vm_servers.contains(s))
        .collect()
}

/// The library's appliances `viewer` may use, by name.
pub fn appliances(state: &StateMachine, viewer: &UserRecord) -> Vec<ApplianceView> {
    let vm_servers = vm_server_ids(state);
    state
        .appliances
        .values()
        .filter(|a| access::may_use_appliance(viewer, a))
        .map(|a| ApplianceView {
            name: a.name.clone(),
            description: a.description.clone(),
            memory_mib: a.memory_mib,
            vcpus: a.vcpus,
            boot: a.boot,
            disk_bus: a.disk_bus,
            nics: a.nics,
            disks: a.disks.clone(),
            origin: a.origin.clone(),
            created_by: state.users.get(&a.created_by).map(|u| u.name.clone()),
            created_ms: a.created_ms,
            servers: holding(&a.servers, &vm_servers),
            vm_servers: vm_servers.len(),
            shared_with: (viewer.role == Role::Manager)
                .then(|| a.shared_with.iter().copied().collect()),
        })
        .collect()
}

/// A long operation as the API shows it.
#[derive(Debug, Serialize)]
pub struct TaskView {
    /// Its id.
    pub id: u64,
    /// What it does: `copy_back` or `backup`.
    pub kind: &'static str,
    /// In words.
    pub what: String,
    /// The VM it works on (VMID).
    pub vm: Option<u64>,
    /// The appliance it makes.
    pub appliance: Option<String>,
    /// Who asked for it, by name.
    pub by: Option<String>,
    /// When, ms since the epoch.
    pub started_ms: u64,
    /// Bytes done.
    pub done_bytes: u64,
    /// Bytes in all.
    pub total_bytes: u64,
    /// Done so far, 0 to 100.
    pub percent: u64,
    /// `running`, `done` or `failed`.
    pub state: &'static str,
    /// Why it failed.
    pub reason: Option<String>,
    /// When it ended, if known.
    pub ended_ms: Option<u64>,
    /// Someone asked to stop it.
    pub cancel: bool,
}

/// The tasks `viewer` may see: a Manager all; others those they asked for or whose VM they
/// operate. Newest first.
pub fn tasks(state: &StateMachine, viewer: &UserRecord) -> Vec<TaskView> {
    use control::state_machine::{TaskKind, TaskState};
    state
        .tasks
        .values()
        .rev()
        .filter(|t| {
            viewer.role == Role::Manager
                || t.by == viewer.id
                || t.kind
                    .vm()
                    .and_then(|vm| state.vm_by_id(vm))
                    .is_some_and(|v| access::may_operate_vm(state, viewer, v))
        })
        .map(|t| {
            let (state_name, reason, ended_ms) = match &t.state {
                TaskState::Running => ("running", None, None),
                TaskState::Done { ended_ms } => ("done", None, Some(*ended_ms)),
                TaskState::Failed { reason, ended_ms } => {
                    ("failed", Some(reason.clone()), *ended_ms)
                }
            };
            let kind = match &t.kind {
                TaskKind::CopyBack { .. } => "copy_back",
                TaskKind::Backup { .. } => "backup",
                TaskKind::Download { .. } => "download",
                TaskKind::Import { .. } => "import",
            };
            TaskView {
                id: t.id,
                kind,
                what: control::state_machine::describe_task(&t.kind),
                vm: t.kind.vm(),
                appliance: t.kind.appliance().map(str::to_string),
                by: state.users.get(&t.by).map(|u| u.name.clone()),
                started_ms: t.started_ms,
                done_bytes: t.done_bytes,
                total_bytes: t.total_bytes,
                percent: (t.done_bytes * 100).checked_div(t.total_bytes).unwrap_or(0),
                state: state_name,
                reason,
                ended_ms,
                cancel: t.cancel,
            }
        })
        .collect()
}

/// An ISO image of the library as the API shows it.
#[derive(Debug, Serialize)]
pub struct IsoView {
    /// Its name.
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// SHA-256, hex.
    pub sha256: String,
    /// Who uploaded it, by name (none once deleted).
    pub uploaded_by: Option<String>,
    /// When, ms since the epoch.
    pub uploaded_ms: u64,
    /// The VM servers holding a checked copy.
    pub servers: Vec<u64>,
    /// How many VM servers there are: once all hold it, every VM can use it anywhere.
    pub vm_servers: usize,
    /// VMIDs of the VMs whose CD-ROM holds it.
    pub in_use_by: Vec<u64>,
}

/// The library's ISO images, by name, as `viewer` sees them: in use by the VMs it may see.
pub fn isos(state: &StateMachine, viewer: &UserRecord) -> Vec<IsoView> {
    let vm_servers = vm_server_ids(state);
    state
        .isos
        .values()
        .map(|i| IsoView {
            name: i.name.clone(),
            size: i.size,
            sha256: i.sha256.clone(),
            uploaded_by: state.users.get(&i.uploaded_by).map(|u| u.name.clone()),
            uploaded_ms: i.uploaded_ms,
            servers: holding(&i.servers, &vm_servers),
            vm_servers: vm_servers.len(),
            in_use_by: state
                .vms
                .values()
                .filter(|v| v.cdrom.as_ref() == Some(&i.name))
                .filter(|v| access::may_operate_vm(state, viewer, v))
                .map(|v| v.id)
                .collect(),
        })
        .collect()
}

/// The VMs `me` may see, by VMID.
pub fn vms(state: &StateMachine, me: &UserRecord) -> Vec<VmView> {
    vms_page(state, me, 0, usize::MAX)
}

/// A page of the VMs `me` may see, by VMID: the first `limit` after VMID `after`. Only the
/// page's VMs are viewed (what each one's view costs, its replication and placement, is
/// most of a whole list's).
pub fn vms_page(state: &StateMachine, me: &UserRecord, after: u64, limit: usize) -> Vec<VmView> {
    let mut page: Vec<&VmRecord> = visible_vms(state, me).filter(|v| v.id > after).collect();
    if page.len() > limit {
        page.select_nth_unstable_by_key(limit, |v| v.id);
        page.truncate(limit);
    }
    page.sort_unstable_by_key(|v| v.id);
    page.into_iter().map(|v| vm(state, v, me)).collect()
}

/// The VMs `me` may see, unordered.
pub fn visible_vms<'a>(
    state: &'a StateMachine,
    me: &'a UserRecord,
) -> impl Iterator<Item = &'a VmRecord> {
    state
        .vms
        .values()
        .filter(move |v| access::may_operate_vm(state, me, v))
}

/// A server as the Manager sees it.
#[derive(Debug, Serialize)]
pub struct ServerView {
    /// Raft id.
    pub id: u64,
    /// Address.
    pub address: String,
    /// Votes, runs no VMs.
    pub witness: bool,
    /// Declared down.
    pub down: bool,
    /// Being emptied: nothing new is placed there.
    pub draining: bool,
    /// The Raft leader now, as this server knows.
    pub leader: bool,
    /// Its blockd answers (as last reported).
    pub blockd_up: bool,
    /// Memory for guests, MiB.
    pub memory_mib: u64,
    /// Memory of the VMs whose primary it is, MiB.
    pub used_memory_mib: u64,
    /// Storage pools: path and GiB.
    pub pools: Vec<(String, u64)>,
    /// VMs whose primary copy it holds.
    pub primary_vms: usize,
    /// VMs whose backup copy it holds.
    pub backup_vms: usize,
}

/// Every server.
pub fn servers(state: &StateMachine, leader: Option<u64>) -> Vec<ServerView> {
    state
        .servers
        .values()
        .map(|s| {
            let holds = |primary: bool| {
                state.vms.values().filter(move |vm| {
                    vm.disks
                        .first()
                        .and_then(|d| state.disks.get(d))
                        .is_some_and(|d| {
                            if primary {
                                d.primary == s.id
                            } else {
                                d.backup == Some(s.id)
                            }
                        })
                })
            };
            ServerView {
                id: s.id,
                address: s.address.clone(),
                witness: s.witness,
                down: s.down,
                draining: s.draining,
                leader: leader == Some(s.id),
                blockd_up: state.observed.get(&s.id).is_some_and(|o| o.blockd_up),
                memory_mib: s.capacity.memory_mib,
                used_memory_mib: holds(true).map(|vm| vm.memory_mib).sum(),
                pools: s
                    .capacity
                    .pools()
                    .into_iter()
                    .map(|p| (p.path, p.disk_gib))
                    .collect(),
                primary_vms: holds(true).count(),
                backup_vms: holds(false).count(),
            }
        })
        .collect()
}
