//! The records the cluster stores: servers and their capacity, disks, VMs and how they boot,
//! ISO images, and the id counters.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a server offers to VMs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Memory for guests, MiB.
    #[serde(default)]
    pub memory_mib: u64,
    /// Disk space for replicated disks, GiB.
    #[serde(default)]
    pub disk_gib: u64,
    /// vCPUs for guests.
    #[serde(default)]
    pub vcpus: u32,
    /// Storage pools (e.g. /vms1, /vms2) that disk copies are placed in; when empty, one pool
    /// named "" of `disk_gib`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<Pool>,
}

/// A storage pool of a server: a file system that holds disk copies.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    /// Its path on the server, e.g. /vms1.
    pub path: String,
    /// Space for disk copies, GiB.
    pub disk_gib: u64,
}

impl Capacity {
    /// The pools disk copies go to: the listed ones, or one pool "" of `disk_gib`.
    pub fn pools(&self) -> Vec<Pool> {
        if self.pools.is_empty() {
            vec![Pool {
                path: String::new(),
                disk_gib: self.disk_gib,
            }]
        } else {
            self.pools.clone()
        }
    }
}

/// A member of the Raft group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRecord {
    /// Raft id, unique in the cluster.
    pub id: u64,
    /// Address other servers and clients reach it on, host:port.
    pub address: String,
    /// A witness votes but runs no VMs (the third vote of a two-server site).
    #[serde(default)]
    pub witness: bool,
    /// What it offers to VMs (nothing for a witness).
    #[serde(default)]
    pub capacity: Capacity,
    /// Its blockd's mirror address (host:port), where primaries reach its backup copies.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mirror: String,
    /// Declared down by the leader when its lease ran out; its VMs moved to their backups.
    #[serde(default)]
    pub down: bool,
    /// Being emptied by a Manager: nothing new is placed here.
    #[serde(default)]
    pub draining: bool,
    /// The SHA-256 fingerprint (hex) of the certificate it joined with: the one other servers
    /// accept from it. Revoked when it is removed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cert: String,
}

/// A replicated (LiveSync) disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// Name, the same on both servers.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// The server holding the primary copy.
    pub primary: u64,
    /// The server holding the backup copy, if any.
    #[serde(default)]
    pub backup: Option<u64>,
    /// Raised only by a committed command; mirror frames from an older generation are refused.
    pub generation: u64,
    /// The pool each copy lives in, by server.
    #[serde(default)]
    pub pools: BTreeMap<u64, String>,
    /// The primary reported its link to this backup in sync at this generation: the backup
    /// holds every acknowledged write and may be promoted.
    #[serde(default)]
    pub backup_synced: bool,
    /// A clone's disk: the disk whose data its primary copy is first filled with (on the same
    /// server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_of: Option<String>,
    /// The disk's identity: a number the cluster never gives another disk, so a copy left by a
    /// deleted disk of the same name is never taken for this one's. 0 on a record from before.
    #[serde(default)]
    pub uid: u64,
    /// A disk made from an appliance: the SHA-256 of the library's disk image its primary copy
    /// is first filled with. Cleared once the primary reports its copy made (the image may
    /// then go with its appliance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

impl DiskRecord {
    /// The identity its copies carry in blockd (`disk_id`), if it has one.
    pub fn copy_id(&self) -> Option<String> {
        (self.uid != 0).then(|| format!("{:032x}", self.uid))
    }

    /// Whether a copy with blockd's `disk_id` is a copy of this disk (a copy or a record from
    /// before identities is taken at its name).
    pub fn holds(&self, disk_id: &str) -> bool {
        match self.copy_id() {
            Some(id) => disk_id.is_empty() || disk_id == id,
            None => true,
        }
    }
}

/// A virtual machine, minimal for now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// Name, unique in the cluster.
    pub name: String,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Its disks, by name.
    #[serde(default)]
    pub disks: Vec<String>,
    /// Whether it should be running.
    #[serde(default)]
    pub running: bool,
    /// The kernel (path on every server) it boots.
    #[serde(default)]
    pub kernel: String,
    /// Its initramfs (path on every server), or empty for none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub initrd: String,
    /// Its kernel command line; `{generation}` is replaced by its first disk's generation at
    /// each boot, so a guest can tell boots on different copies apart.
    #[serde(default)]
    pub cmdline: String,
    /// Its VMID, unique in the cluster and never reused (0 for VMs made before VMIDs).
    #[serde(default)]
    pub id: u64,
    /// The user who owns it; `None`: the cluster's own, seen by Managers only.
    #[serde(default)]
    pub owner: Option<u64>,
    /// While it should be stopped: the guest is asked first (ACPI power button) and stopped
    /// hard only after the agent's shutdown timeout; when false, stopped at once.
    #[serde(default)]
    pub graceful_stop: bool,
    /// The ISO image in its CD-ROM drive (an `IsoRecord`'s name); none: empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cdrom: Option<String>,
    /// How it starts: the cluster's guest kernel, or its firmware from its disks and CD.
    #[serde(default)]
    pub boot: BootMode,
    /// With firmware boot: what the firmware boots first.
    #[serde(default)]
    pub boot_order: BootOrder,
    /// With firmware boot: the controller its disks are on.
    #[serde(default)]
    pub disk_bus: DiskBus,
    /// Its network cards, in order (the guest's first NIC first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<Nic>,
    /// A live migration under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving: Option<LiveMove>,
    /// Its live backups on a schedule, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_schedule: Option<BackupSchedule>,
    /// When its last live backup began, ms since the epoch (0: never).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub last_backup_ms: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A VM's live backups on a schedule: one every `every_hours`, the newest `keep` kept (older
/// backups of the VM go from the library as new ones are made).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupSchedule {
    /// Hours between backups (1 to 8760).
    pub every_hours: u32,
    /// Backups of the VM kept (1 to 100).
    pub keep: u32,
}

/// A running VM moving live to its disks' backup server: its memory copied there while it runs
/// at its disks' primary, then, in one committed entry, its disks handed over
/// (`Command::SwitchVm`), and it runs there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveMove {
    /// Which move (the audit number of the request that began it): the commands that carry it
    /// on name it, so that one for an older move changes nothing.
    pub id: u64,
    /// Where it goes.
    pub to: u64,
    /// The disks were handed over: the VM is the target's to run.
    #[serde(default)]
    pub switched: bool,
    /// A Manager asked to give it up (honoured while memory is still being copied).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel: bool,
    /// The longest pause allowed, ms (the VMM's default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// A guest dirtying memory faster than the copy goes is slowed down until it converges.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto_converge: bool,
}

/// How a live migration ended, as its source's agent saw it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum MoveOutcome {
    /// It runs at the target.
    Done {
        /// How long the guest was paused, ms.
        downtime_ms: f64,
        /// From the request to the end, ms.
        total_ms: f64,
        /// Bytes sent.
        transferred_bytes: u64,
        /// Pre-copy rounds.
        rounds: u32,
    },
    /// It did not move (or, if its disks were handed over already, it runs at the target
    /// anyway).
    Failed {
        /// Why.
        why: String,
    },
}

/// A VM's network card: the network it is on and the MAC the cluster gave it (kept across
/// reboots, failovers and migrations; a clone gets new ones).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// The network's name.
    pub network: String,
    /// Its MAC address, `02:45:53:xx:xx:xx` (locally administered, unique in the cluster).
    pub mac: String,
    /// On a network with a subnet: the address the cluster's DHCP service leases it (the
    /// only one it may send from), kept like its MAC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<std::net::Ipv4Addr>,
}

/// Network cards a VM has at most.
pub const MAX_VM_NICS: usize = 4;

/// A network the VMs' NICs attach to, defined by a Manager: on every VM server, a Linux bridge
/// of the same name over the same uplink NIC, optionally on an 802.1Q VLAN.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// Its name, unique in the cluster.
    pub name: String,
    /// The bridge each VM server builds (and the VMs' taps join), e.g. `br-lan`.
    pub bridge: String,
    /// The host NIC the bridge is built over, the same name on every VM server; none: a
    /// bridge with no uplink (its VMs reach only VMs of the same server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink: Option<String>,
    /// The VLAN its frames carry on the uplink (1-4094); none: untagged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    /// Its IPv4 subnet (`10.20.0.0/24`), served by the cluster's DHCP service when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    /// The router the DHCP service names (in the subnet); none: the subnet's first address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<std::net::Ipv4Addr>,
    /// The DNS servers the DHCP service names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<std::net::Ipv4Addr>,
    /// The company (its Power User's id) whose VMs alone may use it; none: every tenant's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub company: Option<u64>,
}

/// Most guest RAM a VM is given, MiB (1 TiB, what the VMM maps).
pub const MAX_VM_MEMORY_MIB: u64 = 1 << 20;

/// Disks a VM has at most (Disk0-3, as the VMM takes them).
pub const MAX_VM_DISKS: usize = 4;

/// The largest disk, bytes (64 TiB).
pub const MAX_DISK_BYTES: u64 = 64 << 40;

/// How a VM starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BootMode {
    /// The cluster's guest kernel, entered directly (`enspeed server --guest-kernel`).
    #[default]
    Kernel,
    /// A blank PC: SeaBIOS boots its disks or the ISO in its CD-ROM drive.
    Bios,
    /// A blank PC with UEFI firmware: OVMF boots its disks or the ISO in its CD-ROM drive.
    Uefi,
}

impl BootMode {
    /// The firmware that starts the VM (`enspeed vmm --firmware`), or none for the
    /// cluster's guest kernel.
    pub fn firmware(self) -> Option<&'static str> {
        match self {
            BootMode::Kernel => None,
            BootMode::Bios => Some("bios"),
            BootMode::Uefi => Some("uefi"),
        }
    }
}

/// What the firmware boots first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BootOrder {
    /// The disks, then the CD-ROM.
    #[default]
    DiskFirst,
    /// The CD-ROM, then the disks.
    CdromFirst,
}

/// The controller a firmware-booted VM's disks are on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskBus {
    /// virtio-blk (virtio-pci): every modern OS has its driver.
    #[default]
    Virtio,
    /// The SATA (AHCI) controller beside the CD-ROM drive: for installers without virtio
    /// drivers (Windows setup).
    Sata,
}

/// An ISO image of the library: a file every VM server keeps a copy of, named by its
/// SHA-256, so that a VM finds its CD-ROM on whichever server it runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsoRecord {
    /// Its name in the library, e.g. `debian-12.iso`.
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// SHA-256 of its content, hex.
    pub sha256: String,
    /// Who uploaded it.
    pub uploaded_by: u64,
    /// When, ms since the epoch.
    pub uploaded_ms: u64,
    /// The servers holding a checked copy.
    #[serde(default)]
    pub servers: std::collections::BTreeSet<u64>,
}

/// A Virtual Appliance of the library: a VM's description and the images of its disks, from
/// which VMs are created. Each disk image is a raw file every VM server keeps a copy of, named
/// by its SHA-256, as ISO images are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplianceRecord {
    /// Its name in the library.
    pub name: String,
    /// What it is, for the people choosing one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Guest RAM of a VM made from it, MiB.
    pub memory_mib: u64,
    /// vCPUs of a VM made from it.
    pub vcpus: u32,
    /// How a VM made from it starts: its firmware (the cluster's guest kernel only for a copy
    /// back of a VM that boots it).
    pub boot: BootMode,
    /// The controller its disks are on.
    #[serde(default)]
    pub disk_bus: DiskBus,
    /// Network cards a VM made from it has.
    #[serde(default)]
    pub nics: u32,
    /// Its disk images, Disk0 first.
    pub disks: Vec<ApplianceDisk>,
    /// Where it came from, e.g. `import of web.ova`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub origin: String,
    /// Who added it.
    pub created_by: u64,
    /// When, ms since the epoch.
    pub created_ms: u64,
    /// The servers holding a checked copy of every one of its disk images.
    #[serde(default)]
    pub servers: std::collections::BTreeSet<u64>,
    /// The Power Users whose companies may create VMs from it (Managers always may).
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub shared_with: std::collections::BTreeSet<u64>,
    /// A live backup's: the VM (VMID) it is a backup of (its schedule's retention counts it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_of: Option<u64>,
    /// A copy back's or a backup's: the company (its Power User) whose VM it was made from;
    /// its disk images count in that company's disk quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub company: Option<u64>,
}

/// One disk image of an appliance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplianceDisk {
    /// Bytes (the disk's size; a multiple of 512).
    pub size: u64,
    /// SHA-256 of the raw image, hex: its file's name in every server's library.
    pub sha256: String,
}

/// Ids handed out so far: never reused, even after a delete.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// The last VMID.
    pub vm: u64,
    /// The last user id.
    pub user: u64,
    /// The last audit seq.
    pub audit: u64,
    /// The last disk identity (`DiskRecord::uid`).
    #[serde(default)]
    pub disk: u64,
    /// The last MAC address handed out (its low 24 bits).
    #[serde(default)]
    pub mac: u64,
    /// The last task id.
    #[serde(default)]
    pub task: u64,
}

/// A long operation run by one server's agent (`Command::TaskProgress`, `Command::TaskEnded`),
/// kept in the state so that every server shows it and its progress, a person may cancel it,
/// and it ends, failed, if its server goes down: never half done without anyone knowing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// Its id, never reused.
    pub id: u64,
    /// What it does.
    pub kind: TaskKind,
    /// The server running it.
    pub server: u64,
    /// Who asked for it.
    pub by: u64,
    /// When, ms since the epoch.
    pub started_ms: u64,
    /// Bytes done so far, as its server last said.
    #[serde(default)]
    pub done_bytes: u64,
    /// Bytes in all.
    pub total_bytes: u64,
    /// Running, done or failed.
    pub state: TaskState,
    /// A person asked to stop it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel: bool,
}

/// What a task does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TaskKind {
    /// "Copy back": a powered-off VM's disks copied into a new appliance, on the VM's primary
    /// server; the VM stays off meanwhile.
    CopyBack {
        /// The VM (VMID).
        vm: u64,
        /// The appliance it becomes.
        appliance: String,
        /// The appliance's description.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        description: String,
    },
    /// "Live backup": a VM's disks, running or not, copied into a new appliance as they were
    /// at one point (crash-consistent across them), from their backup copies on the backup
    /// server (`blockd snapshot`), so that the guest never waits on the copying.
    Backup {
        /// The VM (VMID).
        vm: u64,
        /// The appliance it becomes.
        appliance: String,
        /// The appliance's description.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        description: String,
    },
    /// An OVA downloaded from a URL (an appliance directory's entry, or any) and imported into
    /// a new appliance, by a VM server's agent.
    Download {
        /// The appliance it becomes.
        appliance: String,
        /// Where from (http or https).
        url: String,
        /// The SHA-256 the OVA must have, hex, if known (a directory says it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
    },
    /// An archive (an OVA, or the original product's zip) uploaded to server `server`'s web
    /// service and imported there into a new appliance: its disks checked and converted.
    Import {
        /// The appliance it becomes.
        appliance: String,
        /// The upload it imports: a random name the receiving server gave it, which tells the
        /// import it runs from one a restart left without its server.
        upload: String,
        /// The archive's bytes.
        bytes: u64,
    },
}

impl TaskKind {
    /// The VM it works on, if any.
    pub fn vm(&self) -> Option<u64> {
        match self {
            TaskKind::CopyBack { vm, .. } | TaskKind::Backup { vm, .. } => Some(*vm),
            TaskKind::Download { .. } | TaskKind::Import { .. } => None,
        }
    }

    /// The appliance it makes, if any.
    pub fn appliance(&self) -> Option<&str> {
        match self {
            TaskKind::CopyBack { appliance, .. }
            | TaskKind::Backup { appliance, .. }
            | TaskKind::Download { appliance, .. }
            | TaskKind::Import { appliance, .. } => Some(appliance),
        }
    }

    /// Whether its VM must stay powered off while it runs.
    pub fn holds_vm_off(&self) -> bool {
        matches!(self, TaskKind::CopyBack { .. })
    }
}

/// Where a task is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum TaskState {
    /// Under way.
    Running,
    /// Done, at this time (ms since the epoch).
    Done {
        /// When.
        ended_ms: u64,
    },
    /// Failed or cancelled: why, and when (unknown when its server went down).
    Failed {
        /// Why.
        reason: String,
        /// When.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ended_ms: Option<u64>,
    },
}
