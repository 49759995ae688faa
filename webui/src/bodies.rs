//! The JSON bodies of `/api/v1`'s changes, and the checks that turn each into the `Action` it
//! asks the cluster for. They are functions of the body's bytes, the caller and the state the
//! request read, nothing else: the routes call them, and so does the fuzz target
//! `api_bodies` (fuzz/), on the same code.
//!
//! What a route checks before the body (the caller's session and CSRF token, that the VM in
//! the path is one the caller may see, Managers-only endpoints) stays in the route; the state
//! machine checks the rights of every action again when it applies it.

use control::access::{self, Quota, Role, UserRecord};
use control::state_machine::{self, Action, StateMachine};
use hyper::StatusCode;
use serde::{Deserialize, Serialize};

use crate::http::ApiError;
use crate::GuestBoot;

/// The largest VM the API creates: 1 TiB of RAM, 64 vCPUs, 64 TiB of disk.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// The most vCPUs of a VM.
pub const MAX_VCPUS: u32 = 64;
/// The largest disk, GiB.
pub const MAX_DISK_GIB: u64 = state_machine::MAX_DISK_BYTES >> 30;

/// Who asks, and the state their request read.
#[derive(Clone, Copy)]
pub struct Asker<'a> {
    /// The caller.
    pub user: &'a UserRecord,
    /// The cluster's state as the request found it.
    pub state: &'a StateMachine,
}

/// A change whose body is JSON, with what the route found in its path.
#[derive(Clone, Copy, Debug)]
pub enum Ask<'a> {
    /// `POST /api/v1/vms`; `guest` is the cluster's kernel, for VMs that boot it.
    CreateVm { guest: &'a GuestBoot },
    /// `POST /api/v1/vms/{id}/power`.
    Power { vm: u64 },
    /// `POST /api/v1/vms/{id}/copy-back`.
    CopyBack { vm: u64 },
    /// `POST /api/v1/vms/{id}/backup`; the default name is the VM's and the time.
    Backup {
        vm: u64,
        vm_name: &'a str,
        now_ms: u64,
    },
    /// `POST /api/v1/vms/{id}/backup-schedule`.
    BackupSchedule { vm: u64 },
    /// `POST /api/v1/vms/{id}/clone`.
    Clone { vm: u64 },
    /// `POST /api/v1/vms/{id}/migrate`.
    Migrate { vm: u64 },
    /// `POST /api/v1/vms/{id}/cdrom`.
    Cdrom { vm: u64 },
    /// `PATCH /api/v1/vms/{id}`.
    EditVm { vm: u64 },
    /// `POST /api/v1/networks`.
    CreateNetwork,
    /// `PATCH /api/v1/appliances/{name}`.
    EditAppliance { name: &'a str },
    /// `POST /api/v1/appliances/{name}/download`; `here` is the server that was asked.
    Download { name: &'a str, here: u64 },
}

/// A new user as asked (`POST /api/v1/users`), checked; its password is still to be hashed.
pub struct NewUserAsked {
    pub name: String,
    pub role: Role,
    pub password: String,
    pub parent: Option<u64>,
    pub quota: Option<Quota>,
}

/// `body` as a `T`: no unknown fields (the types deny them), a 400 naming what is wrong.
pub fn parse<'de, T: Deserialize<'de>>(body: &'de [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("the JSON body: {e}")))
}

/// The action `body` asks for at `ask`, checked as far as the web service checks it.
pub fn action(ask: Ask<'_>, body: &[u8], by: Asker<'_>) -> Result<Action, ApiError> {
    let regular = by.user.role == Role::Regular;
    Ok(match ask {
        Ask::CreateVm { guest } => create_vm(parse(body)?, guest, by)?,
        Ask::Power { vm } => {
            let p: Power = parse(body)?;
            let (running, force) = match p.action {
                PowerAction::On => (true, false),
                PowerAction::Off => (false, false),
                PowerAction::ForceOff => (false, true),
            };
            Action::PowerVm { vm, running, force }
        }
        Ask::CopyBack { vm } => {
            let b: CopyBack = parse(body)?;
            access::check_name("appliance", &b.name).map_err(ApiError::bad_request)?;
            if regular {
                return Err(ApiError::forbidden(
                    "a Regular User copies no VM into an appliance",
                ));
            }
            Action::CopyBack {
                vm,
                name: b.name,
                description: b.description,
            }
        }
        Ask::Backup {
            vm,
            vm_name,
            now_ms,
        } => {
            let b: Backup = parse(body)?;
            let name = b
                .name
                .unwrap_or_else(|| state_machine::backup_name(vm_name, now_ms));
            access::check_name("appliance", &name).map_err(ApiError::bad_request)?;
            Action::BackupVm {
                vm,
                name,
                description: b.description,
            }
        }
        Ask::BackupSchedule { vm } => {
            let b: ScheduleBody = parse(body)?;
            Action::SetBackupSchedule {
                vm,
                schedule: b.schedule,
            }
        }
        Ask::Clone { vm } => {
            let b: Clone = parse(body)?;
            access::check_name("VM", &b.name).map_err(ApiError::bad_request)?;
            if regular {
                return Err(ApiError::forbidden("a Regular User clones no VMs"));
            }
            if let Some(o) = b.owner {
                let owner = by
                    .state
                    .users
                    .get(&o)
                    .filter(|u| access::may_see_user(by.user, u))
                    .ok_or_else(|| ApiError::not_found(format!("no user {o}")))?;
                if !access::may_administer_vms_of(by.user, owner) {
                    return Err(ApiError::forbidden(format!("VMs of user {}", owner.name)));
                }
            }
            Action::CloneVm {
                vm,
                name: b.name,
                owner: b.owner,
            }
        }
        Ask::Migrate { vm } => {
            let m: Migrate = parse(body)?;
            Action::MigrateVm {
                vm,
                downtime_ms: m.downtime_ms,
                auto_converge: m.auto_converge,
                to: m.to,
            }
        }
        Ask::Cdrom { vm } => {
            let b: Cdrom = parse(body)?;
            Action::SetCdrom { vm, iso: b.iso }
        }
        Ask::EditVm { vm } => {
            let b: VmChange = parse(body)?;
            if regular {
                return Err(ApiError::forbidden(
                    "a Regular User changes no VM's hardware",
                ));
            }
            let add_disks = disk_sizes(
                "add_disks_gib",
                &b.add_disks_gib,
                state_machine::MAX_VM_DISKS - 1,
            )?;
            let gib: Vec<u64> = b.grow_disks.iter().map(|g| g.gib).collect();
            let sizes = disk_sizes("grow_disks", &gib, state_machine::MAX_VM_DISKS)?;
            Action::EditVm {
                vm,
                memory_mib: b.memory_mib,
                vcpus: b.vcpus,
                boot: b.boot,
                boot_order: b.boot_order,
                disk_bus: b.disk_bus,
                add_disks,
                grow_disks: b
                    .grow_disks
                    .iter()
                    .zip(sizes)
                    .map(|(g, size)| state_machine::DiskGrowth { disk: g.disk, size })
                    .collect(),
            }
        }
        Ask::CreateNetwork => {
            let n: NewNetwork = parse(body)?;
            Action::CreateNetwork {
                network: state_machine::NetworkRecord {
                    name: n.name,
                    bridge: n.bridge,
                    uplink: n.uplink,
                    vlan: n.vlan,
                    subnet: n.subnet,
                    gateway: n.gateway,
                    dns: n.dns,
                    company: n.company,
                },
            }
        }
        Ask::EditAppliance { name } => {
            let b: ApplianceChange = parse(body)?;
            Action::EditAppliance {
                name: name.to_string(),
                description: b.description,
                memory_mib: b.memory_mib,
                vcpus: b.vcpus,
                shared_with: b.shared_with,
            }
        }
        Ask::Download { name, here } => {
            let b: Download = parse(body)?;
            access::check_name("appliance", name).map_err(ApiError::bad_request)?;
            state_machine::check_download_url(&b.url)
                .map_err(|r| ApiError::bad_request(r.reason))?;
            // The server asked downloads, if it is a VM server; else the first VM server up.
            let state = by.state;
            let server = std::iter::once(here)
                .chain(state.servers.keys().copied())
                .find(|id| state.servers.get(id).is_some_and(|s| !s.witness && !s.down))
                .ok_or_else(|| {
                    ApiError::new(StatusCode::CONFLICT, "no VM server is up to download")
                })?;
            Action::DownloadAppliance {
                name: name.to_string(),
                url: b.url,
                sha256: b.sha256,
                server,
            }
        }
    })
}

/// What `POST /api/v1/users` asks, checked: its name, its password's length, and that the
/// caller may create such a user.
pub fn new_user(body: &[u8], by: Asker<'_>) -> Result<NewUserAsked, ApiError> {
    let u: NewUser = parse(body)?;
    access::check_name("user", &u.name).map_err(ApiError::bad_request)?;
    crate::auth::check_password(&u.password).map_err(ApiError::bad_request)?;
    let me = by.user;
    match me.role {
        Role::Manager => {}
        Role::PowerUser if u.role == Role::Regular && u.parent.is_none_or(|p| p == me.id) => {}
        Role::PowerUser => {
            return Err(ApiError::forbidden(
                "a Power User creates Regular Users under itself",
            ))
        }
        Role::Regular => return Err(ApiError::forbidden("a Regular User creates no users")),
    }
    if u.quota.is_some() && (me.role != Role::Manager || u.role != Role::PowerUser) {
        return Err(ApiError::bad_request(
            "a quota is set by a Manager on a Power User",
        ));
    }
    let parent = match me.role {
        Role::PowerUser => Some(me.id),
        _ => u.parent,
    };
    Ok(NewUserAsked {
        name: u.name,
        role: u.role,
        password: u.password,
        parent,
        quota: u.quota,
    })
}

/// `POST /api/v1/vms`: what is not given comes from the appliance, if there is one.
fn create_vm(v: NewVm, cluster_kernel: &GuestBoot, by: Asker<'_>) -> Result<Action, ApiError> {
    access::check_name("VM", &v.name).map_err(ApiError::bad_request)?;
    if by.user.role == Role::Regular {
        return Err(ApiError::forbidden("a Regular User creates no VMs"));
    }
    let owner = v.owner.unwrap_or(by.user.id);
    let o = by
        .state
        .users
        .get(&owner)
        .filter(|u| access::may_see_user(by.user, u))
        .ok_or_else(|| ApiError::not_found(format!("no user {owner}")))?;
    if !access::may_administer_vms_of(by.user, o) {
        return Err(ApiError::forbidden(format!("VMs of user {}", o.name)));
    }
    let appliance = match &v.appliance {
        None => None,
        Some(name) => Some(
            by.state
                .appliances
                .get(name)
                .filter(|a| access::may_use_appliance(by.user, a))
                .ok_or_else(|| {
                    ApiError::not_found(format!("no appliance {name} in the library"))
                })?,
        ),
    };
    let memory_mib = v
        .memory_mib
        .or(appliance.map(|a| a.memory_mib))
        .ok_or_else(|| ApiError::bad_request("memory_mib: needed (1 to 1048576)"))?;
    if memory_mib == 0 || memory_mib > MAX_MEMORY_MIB {
        return Err(ApiError::bad_request(format!(
            "memory_mib {memory_mib}: 1 to {MAX_MEMORY_MIB}"
        )));
    }
    let vcpus = v.vcpus.or(appliance.map(|a| a.vcpus)).unwrap_or(1);
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(ApiError::bad_request(format!(
            "vcpus {vcpus}: 1 to {MAX_VCPUS}"
        )));
    }
    let images: Vec<u64> = appliance
        .map(|a| a.disks.iter().map(|d| d.size).collect())
        .unwrap_or_default();
    let disk_size = match (v.disk_gib, images.first()) {
        (Some(g), _) if g == 0 || g > MAX_DISK_GIB => {
            return Err(ApiError::bad_request(format!(
                "disk_gib {g}: 1 to {MAX_DISK_GIB}"
            )))
        }
        (Some(g), _) => g << 30,
        (None, Some(image)) => *image,
        (None, None) => return Err(ApiError::bad_request("disk_gib: needed (1 to 65536)")),
    };
    let mut extra_disks = disk_sizes("extra_disks_gib", &v.extra_disks_gib, 3)?;
    if extra_disks.is_empty() && images.len() > 1 {
        extra_disks = images[1..].to_vec();
    }
    let boot = v.boot.or(appliance.map(|a| a.boot)).unwrap_or_default();
    let disk_bus = v
        .disk_bus
        .or(appliance.map(|a| a.disk_bus))
        .unwrap_or_default();
    let kernel = boot == state_machine::BootMode::Kernel;
    if kernel && cluster_kernel.kernel.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "this cluster has no guest kernel to boot VMs from (enspeed server --guest-kernel); create a blank VM (boot: bios or uefi) instead",
        ));
    }
    // A blank VM boots from its disk and CD; it carries no kernel of the cluster's.
    let guest = |s: &String| if kernel { s.clone() } else { String::new() };
    Ok(Action::CreateVm {
        owner,
        vm: state_machine::NewVm {
            name: v.name,
            memory_mib,
            vcpus,
            disk_size,
            extra_disks,
            kernel: guest(&cluster_kernel.kernel),
            initrd: guest(&cluster_kernel.initrd),
            cmdline: guest(&cluster_kernel.cmdline),
            running: v.start,
            boot,
            boot_order: v.boot_order,
            disk_bus,
            cdrom: v.iso,
            networks: v.networks,
            appliance: v.appliance,
        },
    })
}

/// Disk sizes in bytes from `field`, a list of at most `most` sizes in GiB.
fn disk_sizes(field: &str, gib: &[u64], most: usize) -> Result<Vec<u64>, ApiError> {
    if gib.len() > most {
        return Err(ApiError::bad_request(format!(
            "{field}: {} disks, at most {most}",
            gib.len()
        )));
    }
    gib.iter()
        .map(|g| match g {
            1..=MAX_DISK_GIB => Ok(g << 30),
            _ => Err(ApiError::bad_request(format!(
                "{field}: {g} GiB, 1 to {MAX_DISK_GIB}"
            ))),
        })
        .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewVm {
    name: String,
    /// Required, unless the appliance's is taken.
    #[serde(default)]
    memory_mib: Option<u64>,
    /// 1, or the appliance's.
    #[serde(default)]
    vcpus: Option<u32>,
    /// Required, unless Disk0 is the size of the appliance's.
    #[serde(default)]
    disk_gib: Option<u64>,
    /// Disk1-3, GiB each (an appliance's other disks their images' sizes when not given).
    #[serde(default)]
    extra_disks_gib: Vec<u64>,
    #[serde(default)]
    owner: Option<u64>,
    #[serde(default)]
    start: bool,
    /// kernel (the cluster's guest kernel, the default), or bios or uefi (a blank PC; an
    /// appliance's firmware by default).
    #[serde(default)]
    boot: Option<state_machine::BootMode>,
    /// With bios or uefi: disk_first (the default) or cdrom_first.
    #[serde(default)]
    boot_order: state_machine::BootOrder,
    /// With bios or uefi: virtio (the default, or the appliance's) or sata.
    #[serde(default)]
    disk_bus: Option<state_machine::DiskBus>,
    /// A library appliance whose disk images its disks start as.
    #[serde(default)]
    appliance: Option<String>,
    /// A library ISO in the CD-ROM drive from the start.
    #[serde(default)]
    iso: Option<String>,
    /// Its network cards: each one's network, in order.
    #[serde(default)]
    networks: Vec<String>,
}

/// A live backup (`POST /api/v1/vms/{id}/backup`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Backup {
    /// The new appliance's name (default: the VM's, then the time, UTC).
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: String,
}

/// A backup schedule (`POST /api/v1/vms/{id}/backup-schedule`): none ends it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleBody {
    schedule: Option<state_machine::BackupSchedule>,
}

/// A copy back (`POST /api/v1/vms/{id}/copy-back`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CopyBack {
    /// The new appliance's name.
    name: String,
    #[serde(default)]
    description: String,
}

/// A download into a new appliance (`POST /api/v1/appliances/{name}/download`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Download {
    /// Where the OVA is (http or https).
    url: String,
    /// Its SHA-256, hex, if known.
    #[serde(default)]
    sha256: Option<String>,
}

/// A change to an appliance (`PATCH /api/v1/appliances/{name}`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplianceChange {
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    memory_mib: Option<u64>,
    #[serde(default)]
    vcpus: Option<u32>,
    /// The Power Users (ids) whose companies may use it: the whole set.
    #[serde(default)]
    shared_with: Option<Vec<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewNetwork {
    name: String,
    bridge: String,
    #[serde(default)]
    uplink: Option<String>,
    #[serde(default)]
    vlan: Option<u16>,
    #[serde(default)]
    subnet: Option<String>,
    #[serde(default)]
    gateway: Option<std::net::Ipv4Addr>,
    #[serde(default)]
    dns: Vec<std::net::Ipv4Addr>,
    /// A Power User's id: only its company's VMs may use the network.
    #[serde(default)]
    company: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmChange {
    #[serde(default)]
    memory_mib: Option<u64>,
    #[serde(default)]
    vcpus: Option<u32>,
    #[serde(default)]
    boot: Option<state_machine::BootMode>,
    #[serde(default)]
    boot_order: Option<state_machine::BootOrder>,
    #[serde(default)]
    disk_bus: Option<state_machine::DiskBus>,
    /// New blank disks, GiB each, after the VM's others.
    #[serde(default)]
    add_disks_gib: Vec<u64>,
    /// Disks it has, grown: which (0 for Disk0) and to how many GiB.
    #[serde(default)]
    grow_disks: Vec<Growth>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Growth {
    disk: usize,
    gib: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Clone {
    name: String,
    #[serde(default)]
    owner: Option<u64>,
}

/// What `POST /api/v1/vms/{id}/migrate` may ask.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Migrate {
    /// The longest pause allowed, ms.
    #[serde(default)]
    downtime_ms: Option<u64>,
    /// Slow a guest whose memory changes faster than the copy goes until it converges.
    #[serde(default)]
    auto_converge: bool,
    /// The server to move to (its disks' backup server when absent).
    #[serde(default)]
    to: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Power {
    action: PowerAction,
}

/// What `POST /api/v1/vms/{id}/power` asks.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PowerAction {
    /// Start it.
    On,
    /// Ask the guest to shut down (ACPI), stop it hard after the server's timeout.
    Off,
    /// Stop it at once.
    ForceOff,
}

impl PowerAction {
    /// What a `PowerVm` action asks, as the API names it.
    pub fn of(running: bool, force: bool) -> PowerAction {
        match (running, force) {
            (true, _) => PowerAction::On,
            (false, false) => PowerAction::Off,
            (false, true) => PowerAction::ForceOff,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    name: String,
    password: String,
    role: Role,
    #[serde(default)]
    parent: Option<u64>,
    #[serde(default)]
    quota: Option<Quota>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Cdrom {
    /// The ISO to insert; null ejects.
    iso: Option<String>,
}
