//! The cluster's state machine: every committed command is applied here, in log order, on every
//! server, so every server holds the same records.
//!
//! Records are kept in memory and written to RocksDB (`sm/<kind>/<name>`, JSON) in the same
//! batch as the applied index (see `storage`). Applying is deterministic: a command that does
//! not fit the current state is rejected with a reason, identically everywhere.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::access::{self, AuditEntry, Quota, Role, SessionRecord, UserRecord};
use crate::storage::{Record, RecordWrite};

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
}

/// Most guest RAM a VM is given, MiB (1 TiB, what the VMM maps).
pub const MAX_VM_MEMORY_MIB: u64 = 1 << 20;

/// Disks a VM has at most (Disk0-3, as the VMM takes them).
pub const MAX_VM_DISKS: usize = 4;

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

/// What a server's node agent saw of one VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmObservation {
    /// Its VMM process runs here.
    pub running: bool,
    /// The VMM's process id.
    #[serde(default)]
    pub pid: Option<u32>,
    /// The disk generation it booted on.
    #[serde(default)]
    pub generation: u64,
}

/// What a server's node agent saw of one disk copy (from its blockd).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskObservation {
    /// primary, backup or standalone.
    pub role: String,
    /// The copy's generation.
    pub generation: u64,
    /// down, resyncing, in-sync or serving.
    pub link: String,
    /// The backup it mirrors to (primary side).
    #[serde(default)]
    pub peer: Option<String>,
    /// Bytes marked out of sync.
    #[serde(default)]
    pub out_of_sync_bytes: u64,
    /// While a resync runs: how much of it is done, whole percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_percent: Option<u8>,
}

/// A server's report of what runs there.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    /// VMs whose VMM runs (or ran) here, by name.
    #[serde(default)]
    pub vms: BTreeMap<String, VmObservation>,
    /// Disk copies in its blockd, by name.
    #[serde(default)]
    pub disks: BTreeMap<String, DiskObservation>,
    /// Its blockd answers.
    #[serde(default)]
    pub blockd_up: bool,
}

/// A change to the cluster's state, proposed through Raft and applied once committed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Sets a key (tests, small settings). Answers the previous value.
    Put {
        /// The key.
        key: String,
        /// The new value.
        value: String,
    },
    /// Deletes a key. Answers the previous value.
    Delete {
        /// The key.
        key: String,
    },
    /// Sets a key only if it holds `expected` (`None`: absent). Answers whether it did, and the
    /// value before.
    CompareAndSet {
        /// The key.
        key: String,
        /// The value it must hold.
        expected: Option<String>,
        /// The new value (`None` deletes).
        value: Option<String>,
    },
    /// Changes what a member offers.
    SetCapacity {
        /// The server.
        id: u64,
        /// What it now offers.
        capacity: Capacity,
    },
    /// Creates a disk record.
    CreateDisk(DiskRecord),
    /// Moves a disk's copies; the generation must rise.
    SetDiskReplicas {
        /// The disk.
        name: String,
        /// The new primary.
        primary: u64,
        /// The new backup.
        backup: Option<u64>,
        /// The new generation, above the current one.
        generation: u64,
    },
    /// Deletes a disk record.
    DeleteDisk {
        /// The disk.
        name: String,
    },
    /// A server's node agent holds a checked copy of an ISO image.
    IsoHeld {
        /// The ISO's name.
        name: String,
        /// The SHA-256 the copy has: it must be the ISO's.
        sha256: String,
        /// The server.
        server: u64,
    },
    /// Creates or replaces a VM record.
    PutVm(VmRecord),
    /// Deletes a VM record.
    DeleteVm {
        /// The VM.
        name: String,
    },
    /// A server's node agent says where its blockd listens and what it offers.
    Register {
        /// The server.
        id: u64,
        /// Its blockd's mirror address.
        mirror: String,
        /// What it offers to VMs.
        capacity: Capacity,
    },
    /// Creates a VM and its disk (`NAME-0`), placed by `placement`: a primary and a backup on
    /// two different servers with room.
    CreateVm(NewVm),
    /// Sets a VM's desired power state.
    SetVmRunning {
        /// The VM.
        name: String,
        /// Whether it should run.
        running: bool,
    },
    /// The leader declares a server down (its lease ran out) or up again. Down moves every
    /// disk it held, in this one entry (see `StateMachine::server_down`).
    SetServerDown {
        /// The server.
        id: u64,
        /// Down, or up again.
        down: bool,
    },
    /// Gives a disk without a backup a new one (the leader, once a server has room).
    SetDiskBackup {
        /// The disk.
        name: String,
        /// The new backup server.
        backup: u64,
        /// The pool there.
        pool: String,
        /// The disk's current generation: a decision taken on an older state is refused.
        generation: u64,
    },
    /// A server's node agent reports what runs there.
    Observe {
        /// The server.
        id: u64,
        /// What it saw.
        observation: Observation,
    },
    /// A change a person asked for: checked against what `actor` may do, applied, and
    /// written to the audit log in the same batch (see `access`).
    Act {
        /// The user (0: the cluster itself, through its own protocol: may do anything).
        actor: u64,
        /// When it was asked for, ms since the epoch (set by the server that took it).
        at_ms: u64,
        /// What.
        action: Action,
    },
}

/// A VM to create with one disk (`NAME-0`), placed by `placement`: a primary and a backup on
/// two different servers with room.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewVm {
    /// Name, unique in the cluster.
    pub name: String,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Its disk's size (Disk0), bytes.
    pub disk_size: u64,
    /// Its other disks' sizes (Disk1-3), bytes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_disks: Vec<u64>,
    /// The kernel it boots.
    pub kernel: String,
    /// Its initramfs, if any.
    #[serde(default)]
    pub initrd: String,
    /// Its kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// Start it once placed.
    #[serde(default)]
    pub running: bool,
    /// How it starts.
    #[serde(default)]
    pub boot: BootMode,
    /// With firmware boot: what the firmware boots first.
    #[serde(default)]
    pub boot_order: BootOrder,
    /// The ISO in its CD-ROM drive from the start (a library image's name).
    #[serde(default)]
    pub cdrom: Option<String>,
}

impl NewVm {
    /// The sizes of its disks, Disk0 first.
    pub fn disk_sizes(&self) -> Vec<u64> {
        std::iter::once(self.disk_size)
            .chain(self.extra_disks.iter().copied())
            .collect()
    }

    /// Its record, owned by `owner`, before placement fills in its id and disks.
    fn record(&self, owner: Option<u64>) -> VmRecord {
        VmRecord {
            name: self.name.clone(),
            memory_mib: self.memory_mib,
            vcpus: self.vcpus,
            disks: Vec::new(),
            running: self.running,
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            id: 0,
            owner,
            graceful_stop: false,
            cdrom: self.cdrom.clone(),
            boot: self.boot,
            boot_order: self.boot_order,
        }
    }
}

/// What a person can change (inside `Command::Act`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Action {
    /// Creates a user. Answers `{"id": N}`.
    CreateUser {
        /// Login name.
        name: String,
        /// Privilege level.
        role: Role,
        /// argon2id PHC string.
        password: String,
        /// A Regular User's Power User.
        #[serde(default)]
        parent: Option<u64>,
        /// A Power User's quota.
        #[serde(default)]
        quota: Option<Quota>,
    },
    /// Sets a user's password (its own, or one the actor manages); ends its other sessions.
    SetPassword {
        /// The user.
        user: u64,
        /// argon2id PHC string.
        password: String,
        /// The session to keep (the one asking), by token hash.
        #[serde(default)]
        keep_session: Option<String>,
    },
    /// Sets a Power User's quota (Managers).
    SetQuota {
        /// The Power User.
        user: u64,
        /// The quota.
        quota: Quota,
    },
    /// Deletes a user who owns no VM and has no users under it; ends its sessions.
    DeleteUser {
        /// The user.
        user: u64,
    },
    /// Opens a session for `actor`, whose password the server taking the request checked.
    Login {
        /// The session.
        session: SessionRecord,
    },
    /// Ends a session.
    Logout {
        /// SHA-256 of its token, hex.
        token_hash: String,
    },
    /// Creates a VM for `owner`, placed like `Command::CreateVm`. Answers its VMID.
    CreateVm {
        /// Owner.
        owner: u64,
        /// The VM.
        #[serde(flatten)]
        vm: NewVm,
    },
    /// Powers a VM on or off.
    PowerVm {
        /// VMID.
        vm: u64,
        /// On or off.
        running: bool,
        /// Off at once, without asking the guest.
        #[serde(default)]
        force: bool,
    },
    /// Deletes a powered-off VM and its disks.
    DeleteVm {
        /// VMID.
        vm: u64,
    },
    /// Changes a powered-off VM: its memory, vCPUs, how it boots and what it boots first
    /// (what is not given stays). Within its company's quota; refused when nothing changes.
    EditVm {
        /// VMID.
        vm: u64,
        /// Guest RAM, MiB.
        #[serde(default)]
        memory_mib: Option<u64>,
        /// vCPUs.
        #[serde(default)]
        vcpus: Option<u32>,
        /// How it boots.
        #[serde(default)]
        boot: Option<BootMode>,
        /// What its firmware boots first.
        #[serde(default)]
        boot_order: Option<BootOrder>,
        /// New blank disks, bytes each, after the ones it has (up to Disk3).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        add_disks: Vec<u64>,
    },
    /// Empties a server (Managers): nothing new is placed on it; every disk whose primary is
    /// there moves to its in-sync backup (its VM restarts there), every backup copy there is
    /// dropped, and the leader gives those disks new backups elsewhere. Refused, changing
    /// nothing, when a primary there has no in-sync backup to move to.
    DrainServer {
        /// The server.
        id: u64,
    },
    /// Creates a copy of a powered-off VM: same memory, vCPUs and boot, its disk filled with
    /// the source's data on the source's primary server, mirrored to another. Answers its
    /// VMID.
    CloneVm {
        /// The source's VMID.
        vm: u64,
        /// The new VM's name.
        name: String,
        /// Its owner (default: the actor; for the cluster itself, the source's owner).
        #[serde(default)]
        owner: Option<u64>,
    },
    /// Moves a VM to its backup server (Managers): every disk's in-sync backup becomes its
    /// primary, with a raised generation, and the old primary its backup; a running VM
    /// restarts there.
    MigrateVm {
        /// VMID.
        vm: u64,
    },
    /// Adds an uploaded ISO image to the library (Managers), held so far by the server that
    /// took the upload; the other servers' agents copy it from there.
    AddIso {
        /// Its name.
        name: String,
        /// Bytes.
        size: u64,
        /// SHA-256, hex.
        sha256: String,
        /// The server holding it.
        server: u64,
    },
    /// Removes an ISO image from the library (Managers); refused while a VM's CD-ROM holds it.
    DeleteIso {
        /// Its name.
        name: String,
    },
    /// Puts an ISO image of the library into a VM's CD-ROM drive, or ejects it (`None`).
    SetCdrom {
        /// VMID.
        vm: u64,
        /// The ISO's name.
        #[serde(default)]
        iso: Option<String>,
    },
    /// Records that the actor opened a VM's console (`serial` or `vnc`): who saw or typed
    /// into which VM belongs in the audit log, though nothing changes.
    OpenConsole {
        /// VMID.
        vm: u64,
        /// Which console.
        console: String,
    },
    /// Records a change made outside the state machine (a membership change).
    Note {
        /// What, e.g. `server.add`.
        action: String,
        /// On what.
        target: String,
    },
}

/// A read of the applied state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "query", rename_all = "snake_case")]
pub enum Query {
    /// One key's value (null when absent).
    Get {
        /// The key.
        key: String,
    },
    /// Every record but users, sessions and the audit log.
    State,
    /// The users, without their password hashes.
    Users,
    /// Audit entries after `after` (a seq), oldest first, at most `limit`.
    Audit {
        /// Entries with a higher seq.
        #[serde(default)]
        after: u64,
        /// At most this many (capped at 1000).
        #[serde(default = "default_audit_limit")]
        limit: u64,
    },
}

fn default_audit_limit() -> u64 {
    100
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
}

/// The result of applying a command: a value, or why it was refused (the same on every server,
/// since applying is deterministic).
pub type Outcome = Result<Value, Refusal>;

/// What kind of refusal: the API answers 403, 404 or 409 by it, never by the text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalKind {
    /// The actor may not do it.
    Forbidden,
    /// What it names does not exist.
    NotFound,
    /// It does not fit the state as it is.
    Conflict,
}

/// Why a command was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// What kind.
    pub kind: RefusalKind,
    /// What it says, for people.
    pub reason: String,
}

impl Refusal {
    /// The actor may not do it.
    pub fn forbidden(reason: impl Into<String>) -> Refusal {
        Refusal {
            kind: RefusalKind::Forbidden,
            reason: reason.into(),
        }
    }

    /// What it names does not exist.
    pub fn not_found(reason: impl Into<String>) -> Refusal {
        Refusal {
            kind: RefusalKind::NotFound,
            reason: reason.into(),
        }
    }

    /// It does not fit the state.
    pub fn conflict(reason: impl Into<String>) -> Refusal {
        Refusal {
            kind: RefusalKind::Conflict,
            reason: reason.into(),
        }
    }
}

/// A check's reason: it does not fit the state.
impl From<String> for Refusal {
    fn from(reason: String) -> Refusal {
        Refusal::conflict(reason)
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// The applied state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StateMachine {
    /// Key/value section.
    pub kv: BTreeMap<String, String>,
    /// Members, by Raft id.
    pub servers: BTreeMap<u64, ServerRecord>,
    /// Replicated disks, by name.
    pub disks: BTreeMap<String, DiskRecord>,
    /// VMs, by name.
    pub vms: BTreeMap<String, VmRecord>,
    /// What each server's node agent last reported.
    #[serde(default)]
    pub observed: BTreeMap<u64, Observation>,
    /// The ISO library, by name.
    #[serde(default)]
    pub isos: BTreeMap<String, IsoRecord>,
    /// Certificates of removed servers (fingerprint to the server's id): refused for good.
    #[serde(default)]
    pub revoked: BTreeMap<String, u64>,
    /// Users, by id (not in `Query::State`: it holds password hashes).
    #[serde(skip)]
    pub users: BTreeMap<u64, UserRecord>,
    /// Sessions, by token hash.
    #[serde(skip)]
    pub sessions: BTreeMap<String, SessionRecord>,
    /// The newest `access::AUDIT_KEEP` audit entries, by seq.
    #[serde(skip)]
    pub audit: BTreeMap<u64, AuditEntry>,
    /// Ids handed out so far.
    #[serde(skip)]
    pub counters: Counters,
}

/// What went wrong loading the stored records.
#[derive(Debug, thiserror::Error)]
#[error("state machine record {key}: {what}")]
pub struct LoadError {
    key: String,
    what: String,
}

fn server_key(id: u64) -> Vec<u8> {
    format!("server/{id:020}").into_bytes()
}

fn observed_key(id: u64) -> Vec<u8> {
    format!("observed/{id:020}").into_bytes()
}

fn disk_key(name: &str) -> Vec<u8> {
    format!("disk/{name}").into_bytes()
}

fn iso_key(name: &str) -> Vec<u8> {
    format!("iso/{name}").into_bytes()
}

fn user_key(id: u64) -> Vec<u8> {
    format!("user/{id:020}").into_bytes()
}

fn session_key(hash: &str) -> Vec<u8> {
    format!("session/{hash}").into_bytes()
}

fn audit_key(seq: u64) -> Vec<u8> {
    format!("audit/{seq:020}").into_bytes()
}

const COUNTERS_KEY: &[u8] = b"meta/counters";

/// A stored record's JSON, or why it does not parse.
fn record<T: serde::de::DeserializeOwned>(v: &[u8]) -> Result<T, String> {
    serde_json::from_slice(v).map_err(|e| e.to_string())
}

fn json_bytes<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

impl StateMachine {
    /// Rebuilds the state from its stored records (`storage::RaftStore::records`).
    pub fn load(records: &[Record]) -> Result<StateMachine, LoadError> {
        let mut sm = StateMachine::default();
        for (k, v) in records {
            let key = String::from_utf8_lossy(k).into_owned();
            let err = |what: String| LoadError {
                key: key.clone(),
                what,
            };
            let (kind, name) = key.split_once('/').ok_or_else(|| err("no kind".into()))?;
            match kind {
                "kv" => {
                    let value = String::from_utf8(v.clone()).map_err(|e| err(e.to_string()))?;
                    sm.kv.insert(name.to_string(), value);
                }
                "server" => {
                    let s: ServerRecord = record(v).map_err(err)?;
                    sm.servers.insert(s.id, s);
                }
                "disk" => {
                    let d: DiskRecord = record(v).map_err(err)?;
                    sm.disks.insert(d.name.clone(), d);
                }
                "vm" => {
                    let vm: VmRecord = record(v).map_err(err)?;
                    sm.vms.insert(vm.name.clone(), vm);
                }
                "iso" => {
                    let i: IsoRecord = record(v).map_err(err)?;
                    sm.isos.insert(i.name.clone(), i);
                }
                "revoked" => {
                    let id = record(v).map_err(err)?;
                    sm.revoked.insert(name.to_string(), id);
                }
                "observed" => {
                    let id = name.parse().map_err(|_| err("bad server id".into()))?;
                    let o: Observation = record(v).map_err(err)?;
                    sm.observed.insert(id, o);
                }
                "user" => {
                    let u: UserRecord = record(v).map_err(err)?;
                    sm.users.insert(u.id, u);
                }
                "session" => {
                    let s: SessionRecord = record(v).map_err(err)?;
                    sm.sessions.insert(s.token_hash.clone(), s);
                }
                "audit" => {
                    let a: AuditEntry = record(v).map_err(err)?;
                    sm.audit.insert(a.seq, a);
                }
                "meta" if name == "counters" => sm.counters = record(v).map_err(err)?,
                _ => return Err(err("unknown kind".into())),
            }
        }
        Ok(sm)
    }

    /// The records of a new cluster's first state: its first server.
    pub fn initial_records(first: &ServerRecord) -> Vec<Record> {
        vec![(server_key(first.id), json_bytes(first))]
    }

    /// Applies one committed command; the record changes go to `writes`.
    pub fn apply(&mut self, cmd: &Command, writes: &mut Vec<RecordWrite>) -> Outcome {
        match cmd {
            Command::Put { key, value } => {
                let prev = self.kv.insert(key.clone(), value.clone());
                writes.push((
                    format!("kv/{key}").into_bytes(),
                    Some(value.clone().into_bytes()),
                ));
                Ok(json!({ "previous": prev }))
            }
            Command::Delete { key } => {
                let prev = self.kv.remove(key);
                writes.push((format!("kv/{key}").into_bytes(), None));
                Ok(json!({ "previous": prev }))
            }
            Command::CompareAndSet {
                key,
                expected,
                value,
            } => {
                let current = self.kv.get(key).cloned();
                if current != *expected {
                    return Ok(json!({ "set": false, "previous": current }));
                }
                match value {
                    Some(v) => {
                        self.kv.insert(key.clone(), v.clone());
                        writes.push((
                            format!("kv/{key}").into_bytes(),
                            Some(v.clone().into_bytes()),
                        ));
                    }
                    None => {
                        self.kv.remove(key);
                        writes.push((format!("kv/{key}").into_bytes(), None));
                    }
                }
                Ok(json!({ "set": true, "previous": current }))
            }
            Command::SetCapacity { id, capacity } => {
                let s = self
                    .servers
                    .get_mut(id)
                    .ok_or_else(|| Refusal::not_found(format!("no server {id}")))?;
                if s.witness && *capacity != Capacity::default() {
                    return Err(Refusal::conflict(format!(
                        "server {id} is a witness: it runs no VMs"
                    )));
                }
                s.capacity = capacity.clone();
                writes.push((server_key(*id), Some(json_bytes(s))));
                Ok(Value::Null)
            }
            Command::CreateDisk(d) => {
                if self.disks.contains_key(&d.name) {
                    return Err(Refusal::conflict(format!("disk {} exists", d.name)));
                }
                self.check_replicas(&d.name, d.primary, d.backup)?;
                let mut d = d.clone();
                d.uid = self.next_disk_uid(writes);
                writes.push((
                    format!("disk/{}", d.name).into_bytes(),
                    Some(json_bytes(&d)),
                ));
                self.disks.insert(d.name.clone(), d);
                Ok(Value::Null)
            }
            Command::SetDiskReplicas {
                name,
                primary,
                backup,
                generation,
            } => {
                self.check_replicas(name, *primary, *backup)?;
                let d = self
                    .disks
                    .get_mut(name)
                    .ok_or_else(|| Refusal::not_found(format!("no disk {name}")))?;
                if *generation <= d.generation {
                    return Err(Refusal::conflict(format!(
                        "disk {name}: generation {generation} is not above the current {}",
                        d.generation
                    )));
                }
                if d.primary != *primary || d.backup != *backup {
                    d.backup_synced = false;
                }
                d.primary = *primary;
                d.backup = *backup;
                d.generation = *generation;
                writes.push((format!("disk/{name}").into_bytes(), Some(json_bytes(d))));
                Ok(json!({ "generation": generation }))
            }
            Command::DeleteDisk { name } => {
                if let Some(vm) = self.vms.values().find(|vm| vm.disks.contains(name)) {
                    return Err(Refusal::conflict(format!(
                        "disk {name} belongs to VM {}",
                        vm.name
                    )));
                }
                self.disks
                    .remove(name)
                    .ok_or_else(|| Refusal::not_found(format!("no disk {name}")))?;
                writes.push((format!("disk/{name}").into_bytes(), None));
                Ok(Value::Null)
            }
            Command::PutVm(vm) => {
                if let Some(d) = vm.disks.iter().find(|d| !self.disks.contains_key(*d)) {
                    return Err(Refusal::conflict(format!("VM {}: no disk {d}", vm.name)));
                }
                writes.push((format!("vm/{}", vm.name).into_bytes(), Some(json_bytes(vm))));
                self.vms.insert(vm.name.clone(), vm.clone());
                Ok(Value::Null)
            }
            Command::DeleteVm { name } => {
                self.vms
                    .remove(name)
                    .ok_or_else(|| Refusal::not_found(format!("no VM {name}")))?;
                writes.push((format!("vm/{name}").into_bytes(), None));
                Ok(Value::Null)
            }
            Command::Register {
                id,
                mirror,
                capacity,
            } => {
                let s = self
                    .servers
                    .get_mut(id)
                    .ok_or_else(|| Refusal::not_found(format!("no server {id}")))?;
                if s.witness && *capacity != Capacity::default() {
                    return Err(Refusal::conflict(format!(
                        "server {id} is a witness: it runs no VMs"
                    )));
                }
                s.mirror = mirror.clone();
                s.capacity = capacity.clone();
                writes.push((server_key(*id), Some(json_bytes(s))));
                Ok(Value::Null)
            }
            Command::CreateVm(vm) => {
                self.create_vm(vm.record(None), &vm.disk_sizes(), None, writes)
            }
            Command::SetVmRunning { name, running } => {
                let vm = self
                    .vms
                    .get_mut(name)
                    .ok_or_else(|| Refusal::not_found(format!("no VM {name}")))?;
                vm.running = *running;
                writes.push((format!("vm/{name}").into_bytes(), Some(json_bytes(vm))));
                Ok(Value::Null)
            }
            Command::SetServerDown { id, down } => {
                let s = self
                    .servers
                    .get_mut(id)
                    .ok_or_else(|| Refusal::not_found(format!("no server {id}")))?;
                if s.down == *down {
                    return Ok(json!({ "changed": false }));
                }
                s.down = *down;
                writes.push((server_key(*id), Some(json_bytes(s))));
                if !*down {
                    return Ok(json!({ "changed": true }));
                }
                Ok(self.server_down(*id, writes))
            }
            Command::SetDiskBackup {
                name,
                backup,
                pool,
                generation,
            } => {
                let d = self
                    .disks
                    .get(name)
                    .ok_or_else(|| Refusal::not_found(format!("no disk {name}")))?;
                if d.generation != *generation {
                    return Err(Refusal::conflict(format!(
                        "disk {name} is at generation {}, not {generation}",
                        d.generation
                    )));
                }
                if let Some(b) = d.backup {
                    return Err(Refusal::conflict(format!(
                        "disk {name} has a backup: server {b}"
                    )));
                }
                self.check_replicas(name, d.primary, Some(*backup))?;
                if self.servers[backup].down {
                    return Err(Refusal::conflict(format!(
                        "disk {name}: server {backup} is down"
                    )));
                }
                let d = self.disks.get_mut(name).expect("checked");
                d.backup = Some(*backup);
                d.backup_synced = false;
                d.pools.insert(*backup, pool.clone());
                writes.push((disk_key(name), Some(json_bytes(d))));
                Ok(Value::Null)
            }
            Command::Observe { id, observation } => {
                if !self.servers.contains_key(id) {
                    return Err(Refusal::not_found(format!("no server {id}")));
                }
                for d in self.disks.values_mut().filter(|d| d.primary == *id) {
                    let Some(o) = observation.disks.get(&d.name) else {
                        continue;
                    };
                    let backup_mirror = d
                        .backup
                        .and_then(|b| self.servers.get(&b))
                        .map(|s| s.mirror.as_str());
                    let synced = o.generation == d.generation
                        && o.link == "in-sync"
                        && backup_mirror.is_some()
                        && o.peer.as_deref() == backup_mirror;
                    if synced != d.backup_synced && (synced || o.link == "resyncing") {
                        d.backup_synced = synced;
                        writes.push((disk_key(&d.name), Some(json_bytes(d))));
                    }
                }
                writes.push((observed_key(*id), Some(json_bytes(observation))));
                self.observed.insert(*id, observation.clone());
                Ok(Value::Null)
            }
            Command::IsoHeld {
                name,
                sha256,
                server,
            } => {
                if !self.servers.contains_key(server) {
                    return Err(Refusal::not_found(format!("no server {server}")));
                }
                let iso = self
                    .isos
                    .get_mut(name)
                    .ok_or_else(|| Refusal::not_found(format!("no ISO {name}")))?;
                if iso.sha256 != *sha256 {
                    return Err(Refusal::conflict(format!(
                        "ISO {name} is {}, not {sha256}: replaced meanwhile",
                        iso.sha256
                    )));
                }
                if iso.servers.insert(*server) {
                    writes.push((iso_key(name), Some(json_bytes(iso))));
                }
                Ok(Value::Null)
            }
            Command::Act {
                actor,
                at_ms,
                action,
            } => self.act(*actor, *at_ms, action, writes),
        }
    }

    /// Creates `vm` (its id and disks filled in here) with a disk of each of `sizes` bytes,
    /// `NAME-0` to `NAME-3`, all placed on the same two servers with room (the VM moves as
    /// one). A clone's disks (`clone_of`, the source's, one for each size) are filled with the
    /// sources' data. Answers its VMID and placement.
    fn create_vm(
        &mut self,
        mut vm: VmRecord,
        sizes: &[u64],
        clone_of: Option<&[DiskRecord]>,
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
        let total: u64 = sizes.iter().sum();
        let p = match clone_of.and_then(|c| c.first()) {
            None => crate::placement::place(self, vm.memory_mib, total)?,
            Some(src) => crate::placement::place_on(self, src.primary, vm.memory_mib, total)?,
        };
        let mut pools = BTreeMap::new();
        pools.insert(p.primary.0, p.primary.1.clone());
        pools.insert(p.backup.0, p.backup.1.clone());
        self.counters.vm += 1;
        vm.id = self.counters.vm;
        vm.disks = names.clone();
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
            };
            writes.push((disk_key(disk_name), Some(json_bytes(&disk))));
            self.disks.insert(disk_name.clone(), disk);
        }
        writes.push((format!("vm/{name}").into_bytes(), Some(json_bytes(&vm))));
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
            };
            writes.push((disk_key(&disk_name), Some(json_bytes(&disk))));
            self.disks.insert(disk_name.clone(), disk);
            new.disks.push(disk_name);
        }
        Ok(())
    }

    /// A new disk identity, never given before in this cluster.
    fn next_disk_uid(&mut self, writes: &mut Vec<RecordWrite>) -> u64 {
        self.counters.disk += 1;
        writes.push((COUNTERS_KEY.to_vec(), Some(json_bytes(&self.counters))));
        self.counters.disk
    }

    /// The VM with VMID `id`.
    pub fn vm_by_id(&self, id: u64) -> Option<&VmRecord> {
        self.vms.values().find(|vm| vm.id == id && id != 0)
    }

    /// VM `vm` (VMID), if `who` may operate it (the cluster itself, `None`, may).
    fn operable_vm(&self, who: Option<&UserRecord>, vm: u64) -> Result<VmRecord, Refusal> {
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

    /// Whether some server's agent reports the VMM of VM `name` running.
    pub fn vm_observed_running(&self, name: &str) -> bool {
        self.observed
            .values()
            .any(|o| o.vms.get(name).is_some_and(|v| v.running))
    }

    /// The user named `name`.
    pub fn user_by_name(&self, name: &str) -> Option<&UserRecord> {
        self.users.values().find(|u| u.name == name)
    }

    /// VM `vm`, if `who` (none: the cluster itself) administers it (its owner's administrators,
    /// or a Manager for the cluster's own VMs) and it is powered off; else why not, ending
    /// "power it off {then}".
    fn powered_off_vm_administered_by(
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

    /// Applies a person's change if `actor` may make it (see `access`), with its audit entry.
    fn act(
        &mut self,
        actor: u64,
        at_ms: u64,
        action: &Action,
        writes: &mut Vec<RecordWrite>,
    ) -> Outcome {
        // The cluster itself (actor 0) may do anything; a person must exist.
        let who = match actor {
            0 => None,
            id => Some(
                self.users
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| access::refuse(format!("no user {id}")))?,
            ),
        };
        let manager = who.as_ref().is_none_or(|u| u.role == Role::Manager);
        let (verb, target, result) = match action {
            Action::CreateUser {
                name,
                role,
                password,
                parent,
                quota,
            } => {
                access::check_name("user", name)?;
                if self.user_by_name(name).is_some() {
                    return Err(Refusal::conflict(format!("user {name} exists")));
                }
                // A Power User creates Regular Users under itself, and nothing else.
                let parent = match &who {
                    Some(u) if u.role == Role::PowerUser => {
                        if *role != Role::Regular || parent.is_some_and(|p| p != u.id) {
                            return Err(access::refuse(
                                "a Power User creates Regular Users under itself",
                            ));
                        }
                        Some(u.id)
                    }
                    Some(u) if u.role == Role::Regular => {
                        return Err(access::refuse("a Regular User creates no users"));
                    }
                    _ => *parent,
                };
                if let Some(p) = parent {
                    if *role != Role::Regular {
                        return Err(Refusal::conflict(
                            "only a Regular User has a Power User above it",
                        ));
                    }
                    if self.users.get(&p).is_none_or(|u| u.role != Role::PowerUser) {
                        return Err(Refusal::conflict(format!("user {p} is not a Power User")));
                    }
                }
                let quota = match (role, &who) {
                    (Role::PowerUser, Some(u)) if u.role != Role::Manager => None,
                    (Role::PowerUser, _) => Some(quota.unwrap_or_default()),
                    _ => None,
                };
                if password.is_empty() {
                    return Err(Refusal::conflict("a user needs a password"));
                }
                self.counters.user += 1;
                let u = UserRecord {
                    id: self.counters.user,
                    name: name.clone(),
                    role: *role,
                    parent,
                    password: password.clone(),
                    quota,
                    created_ms: at_ms,
                };
                writes.push((COUNTERS_KEY.to_vec(), Some(json_bytes(&self.counters))));
                writes.push((user_key(u.id), Some(json_bytes(&u))));
                let target = format!("user {} ({})", u.id, u.name);
                let id = u.id;
                self.users.insert(id, u);
                ("user.create", target, json!({ "id": id }))
            }
            Action::SetPassword {
                user,
                password,
                keep_session,
            } => {
                let target = self
                    .users
                    .get(user)
                    .cloned()
                    .ok_or_else(|| Refusal::not_found(format!("no user {user}")))?;
                if let Some(u) = &who {
                    if u.id != *user && !access::may_manage_user(u, &target) {
                        return Err(access::refuse(format!("user {user}")));
                    }
                }
                if password.is_empty() {
                    return Err(Refusal::conflict("a user needs a password"));
                }
                let u = self.users.get_mut(user).expect("checked");
                u.password = password.clone();
                writes.push((user_key(*user), Some(json_bytes(u))));
                for hash in access::sessions_of(&self.sessions, *user) {
                    if keep_session.as_ref() != Some(&hash) {
                        self.sessions.remove(&hash);
                        writes.push((session_key(&hash), None));
                    }
                }
                (
                    "user.password",
                    format!("user {user} ({})", target.name),
                    Value::Null,
                )
            }
            Action::SetQuota { user, quota } => {
                if !manager {
                    return Err(access::refuse("only a Manager sets quotas"));
                }
                let u = self
                    .users
                    .get_mut(user)
                    .ok_or_else(|| Refusal::not_found(format!("no user {user}")))?;
                if u.role != Role::PowerUser {
                    return Err(Refusal::conflict(format!(
                        "user {user} is not a Power User"
                    )));
                }
                u.quota = Some(*quota);
                writes.push((user_key(*user), Some(json_bytes(u))));
                (
                    "user.quota",
                    format!("user {user} ({})", u.name),
                    Value::Null,
                )
            }
            Action::DeleteUser { user } => {
                let target = self
                    .users
                    .get(user)
                    .cloned()
                    .ok_or_else(|| Refusal::not_found(format!("no user {user}")))?;
                if let Some(u) = &who {
                    if u.id == *user {
                        return Err(Refusal::conflict("a user cannot delete itself"));
                    }
                    if !access::may_manage_user(u, &target) {
                        return Err(access::refuse(format!("user {user}")));
                    }
                }
                if let Some(vm) = self.vms.values().find(|vm| vm.owner == Some(*user)) {
                    return Err(Refusal::conflict(format!(
                        "user {} owns VM {} ({}): delete it first",
                        target.name, vm.id, vm.name
                    )));
                }
                if self.users.values().any(|u| u.parent == Some(*user)) {
                    return Err(Refusal::conflict(format!(
                        "user {} has users under it: delete them first",
                        target.name
                    )));
                }
                if target.role == Role::Manager
                    && self
                        .users
                        .values()
                        .filter(|u| u.role == Role::Manager)
                        .count()
                        == 1
                {
                    return Err(Refusal::conflict("the last Manager cannot be deleted"));
                }
                self.users.remove(user);
                writes.push((user_key(*user), None));
                for hash in access::sessions_of(&self.sessions, *user) {
                    self.sessions.remove(&hash);
                    writes.push((session_key(&hash), None));
                }
                (
                    "user.delete",
                    format!("user {user} ({})", target.name),
                    Value::Null,
                )
            }
            Action::Login { session } => {
                if who.as_ref().is_none_or(|u| u.id != session.user) {
                    return Err(access::refuse("a session is opened by its own user"));
                }
                // Sessions that ran out go as new ones come.
                let expired: Vec<String> = self
                    .sessions
                    .values()
                    .filter(|s| s.expires_ms <= at_ms)
                    .map(|s| s.token_hash.clone())
                    .collect();
                for hash in expired {
                    self.sessions.remove(&hash);
                    writes.push((session_key(&hash), None));
                }
                // A user keeps at most `access::MAX_SESSIONS`: the oldest ones end first.
                let mut mine: Vec<(u64, String)> = self
                    .sessions
                    .values()
                    .filter(|s| s.user == session.user)
                    .map(|s| (s.created_ms, s.token_hash.clone()))
                    .collect();
                mine.sort();
                let over = (mine.len() + 1).saturating_sub(access::MAX_SESSIONS);
                for (_, hash) in mine.into_iter().take(over) {
                    self.sessions.remove(&hash);
                    writes.push((session_key(&hash), None));
                }
                writes.push((session_key(&session.token_hash), Some(json_bytes(session))));
                self.sessions
                    .insert(session.token_hash.clone(), session.clone());
                (
                    "session.login",
                    format!("user {}", session.user),
                    Value::Null,
                )
            }
            Action::Logout { token_hash } => {
                let s = self
                    .sessions
                    .get(token_hash)
                    .ok_or_else(|| Refusal::not_found("no such session"))?;
                if who.as_ref().is_some_and(|u| u.id != s.user) {
                    return Err(access::refuse("another user's session"));
                }
                let user = s.user;
                self.sessions.remove(token_hash);
                writes.push((session_key(token_hash), None));
                ("session.logout", format!("user {user}"), Value::Null)
            }
            Action::CreateVm { owner, vm } => {
                let o = self
                    .users
                    .get(owner)
                    .cloned()
                    .ok_or_else(|| Refusal::not_found(format!("no user {owner}")))?;
                if let Some(u) = &who {
                    if !access::may_administer_vms_of(u, &o) {
                        return Err(access::refuse(format!("VMs of user {}", o.name)));
                    }
                }
                let sizes = vm.disk_sizes();
                access::check_new_vm(self, &o, vm.memory_mib, sizes.iter().sum())?;
                let r = self.create_vm(vm.record(Some(*owner)), &sizes, None, writes)?;
                let target = format!("vm {} ({}) of user {}", r["id"], vm.name, o.name);
                ("vm.create", target, r)
            }
            Action::PowerVm { vm, running, force } => {
                let v = self.operable_vm(who.as_ref(), *vm)?;
                if v.running == *running && (*running || v.graceful_stop == !*force) {
                    // Asked for what it is already asked to be: nothing changes, and nothing
                    // is written to the audit log (looping it pushes no entry out).
                    return Ok(json!({ "audit": self.counters.audit, "unchanged": true }));
                }
                let r = self.vms.get_mut(&v.name).expect("found");
                r.running = *running;
                if !*running {
                    r.graceful_stop = !*force;
                }
                writes.push((format!("vm/{}", v.name).into_bytes(), Some(json_bytes(r))));
                let verb = match (*running, *force) {
                    (true, _) => "vm.power_on",
                    (false, false) => "vm.power_off",
                    (false, true) => "vm.force_off",
                };
                (verb, format!("vm {vm} ({})", v.name), Value::Null)
            }
            Action::AddIso {
                name,
                size,
                sha256,
                server,
            } => {
                if !manager {
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
                    uploaded_by: actor,
                    uploaded_ms: at_ms,
                    servers: [*server].into(),
                };
                writes.push((iso_key(name), Some(json_bytes(&iso))));
                self.isos.insert(name.clone(), iso);
                ("iso.add", format!("iso {name}"), Value::Null)
            }
            Action::DeleteIso { name } => {
                if !manager {
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
                let v = self.operable_vm(who.as_ref(), *vm)?;
                if let Some(name) = iso {
                    if !self.isos.contains_key(name) {
                        return Err(Refusal::not_found(format!("no ISO {name}")));
                    }
                }
                let r = self.vms.get_mut(&v.name).expect("found");
                r.cdrom = iso.clone();
                writes.push((format!("vm/{}", v.name).into_bytes(), Some(json_bytes(r))));
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
            Action::DeleteVm { vm } => {
                let v = self.powered_off_vm_administered_by(who.as_ref(), *vm, "first")?;
                self.vms.remove(&v.name);
                writes.push((format!("vm/{}", v.name).into_bytes(), None));
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
                add_disks,
            } => {
                let v = self.powered_off_vm_administered_by(who.as_ref(), *vm, "to change it")?;
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
                if new == v && add_disks.is_empty() {
                    return Err(Refusal::conflict(format!(
                        "VM {vm} ({}): nothing changes",
                        v.name
                    )));
                }
                if let Some(o) = &owner {
                    access::check_vm_memory(self, o, v.memory_mib, new.memory_mib)?;
                    access::check_more_disk(self, o, add_disks.iter().sum())?;
                }
                let mut what = format!(
                    "vm {vm} ({}): {} MiB, {} vCPUs, boots {:?} ({:?})",
                    v.name, new.memory_mib, new.vcpus, new.boot, new.boot_order
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
                writes.push((
                    format!("vm/{}", v.name).into_bytes(),
                    Some(json_bytes(&new)),
                ));
                self.vms.insert(v.name.clone(), new);
                ("vm.edit", what, Value::Null)
            }
            Action::DrainServer { id } => {
                if !manager {
                    return Err(access::refuse("only a Manager drains servers"));
                }
                let s = self
                    .servers
                    .get(id)
                    .ok_or_else(|| Refusal::not_found(format!("no server {id}")))?;
                if s.witness {
                    return Err(Refusal::conflict(format!(
                        "server {id} is a witness: it holds no disks"
                    )));
                }
                let mut moves = Vec::new();
                for d in self.disks.values() {
                    if d.primary == *id {
                        let b = d
                            .backup
                            .filter(|b| d.backup_synced && self.servers.get(b).is_some_and(|s| !s.down))
                            .ok_or_else(|| {
                                format!("disk {} has no in-sync backup to move to; wait for it or delete its VM", d.name)
                            })?;
                        moves.push((d.name.clone(), Some(b)));
                    } else if d.backup == Some(*id) {
                        moves.push((d.name.clone(), None));
                    }
                }
                let s = self.servers.get_mut(id).expect("checked");
                s.draining = true;
                writes.push((server_key(*id), Some(json_bytes(s))));
                let n = moves.len();
                for (name, new_primary) in moves {
                    let d = self.disks.get_mut(&name).expect("listed");
                    if let Some(b) = new_primary {
                        d.primary = b;
                    }
                    d.backup = None;
                    d.backup_synced = false;
                    d.generation += 1;
                    d.pools.remove(id);
                    writes.push((disk_key(&name), Some(json_bytes(d))));
                }
                (
                    "server.drain",
                    format!("server {id}"),
                    json!({ "disks_moved": n }),
                )
            }
            Action::CloneVm { vm, name, owner } => {
                let src = self
                    .vm_by_id(*vm)
                    .cloned()
                    .ok_or_else(|| Refusal::not_found(format!("no VM {vm}")))?;
                let owner = owner.or(who.as_ref().map(|u| u.id)).or(src.owner);
                let o = match owner {
                    Some(id) => Some(
                        self.users
                            .get(&id)
                            .cloned()
                            .ok_or_else(|| Refusal::not_found(format!("no user {id}")))?,
                    ),
                    None => None,
                };
                if let Some(u) = &who {
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
                };
                let r = self.create_vm(copy, &sizes, Some(&disks), writes)?;
                let target = format!("vm {} ({name}) from vm {vm} ({})", r["id"], src.name);
                ("vm.clone", target, r)
            }
            Action::MigrateVm { vm } => {
                if !manager {
                    return Err(access::refuse("only a Manager migrates VMs"));
                }
                let v = self
                    .vm_by_id(*vm)
                    .cloned()
                    .ok_or_else(|| Refusal::not_found(format!("no VM {vm}")))?;
                let mut moves = Vec::new();
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
                    moves.push((name.clone(), d.primary, b));
                }
                let mut to = 0;
                for (name, from, b) in moves {
                    let d = self.disks.get_mut(&name).expect("checked");
                    d.primary = b;
                    d.backup = Some(from);
                    d.generation += 1;
                    d.backup_synced = false;
                    writes.push((disk_key(&name), Some(json_bytes(d))));
                    to = b;
                }
                (
                    "vm.migrate",
                    format!("vm {vm} ({}) to server {to}", v.name),
                    json!({ "server": to }),
                )
            }
            Action::OpenConsole { vm, console } => {
                let v = self.operable_vm(who.as_ref(), *vm)?;
                if console != "serial" && console != "vnc" {
                    return Err(Refusal::not_found(format!("no console {console:?}")));
                }
                (
                    "vm.console",
                    format!("vm {vm} ({}): {console}", v.name),
                    Value::Null,
                )
            }
            Action::Note { action, target } => {
                if !manager {
                    return Err(access::refuse("only a Manager changes the cluster"));
                }
                (action.as_str(), target.clone(), Value::Null)
            }
        };
        self.audit(actor, at_ms, verb, target, writes);
        // The audit seq tells the server that took the request when its own state has it.
        let mut result = match result {
            Value::Object(m) => m,
            _ => serde_json::Map::new(),
        };
        result.insert("audit".into(), json!(self.counters.audit));
        Ok(Value::Object(result))
    }

    /// Appends an audit entry, dropping the oldest beyond `access::AUDIT_KEEP`.
    fn audit(
        &mut self,
        actor: u64,
        at_ms: u64,
        action: &str,
        target: String,
        writes: &mut Vec<RecordWrite>,
    ) {
        self.counters.audit += 1;
        let e = AuditEntry {
            seq: self.counters.audit,
            at_ms,
            actor,
            actor_name: match actor {
                0 => "cluster".into(),
                id => self
                    .users
                    .get(&id)
                    .map_or_else(|| format!("user {id}"), |u| u.name.clone()),
            },
            action: action.to_string(),
            target,
        };
        writes.push((COUNTERS_KEY.to_vec(), Some(json_bytes(&self.counters))));
        writes.push((audit_key(e.seq), Some(json_bytes(&e))));
        self.audit.insert(e.seq, e);
        while self.audit.len() as u64 > access::AUDIT_KEEP {
            let (&oldest, _) = self.audit.iter().next().expect("not empty");
            self.audit.remove(&oldest);
            writes.push((audit_key(oldest), None));
        }
    }

    /// Server `id` was declared down: its lease ran out, so it has stopped its VMs itself.
    /// Every disk it held changes in this one committed entry:
    ///
    /// ```text
    ///   primary here, backup synced and up ──> the backup becomes primary, generation + 1,
    ///                                          no backup (the leader picks one later)
    ///   primary here, no usable backup     ──> unchanged: the VM waits for this server
    ///   backup here                        ──> no backup, generation + 1: the primary goes
    ///                                          on alone (its blockd bitmap keeps what changed)
    /// ```
    ///
    /// Answers the disks that moved and those that wait.
    pub(crate) fn server_down(&mut self, id: u64, writes: &mut Vec<RecordWrite>) -> Value {
        let mut promoted = Vec::new();
        let mut alone = Vec::new();
        let mut stranded = Vec::new();
        let usable = |d: &DiskRecord| {
            d.backup
                .filter(|b| d.backup_synced && self.servers.get(b).is_some_and(|s| !s.down))
        };
        // A VM's disks move together or not at all: one of them without a usable backup holds
        // back the others, which would otherwise leave the VM split over two servers.
        let held: HashSet<String> = self
            .vms
            .values()
            .filter(|vm| {
                vm.disks.iter().filter_map(|d| self.disks.get(d)).any(|d| {
                    d.primary == id && usable(d).is_none_or(|b| Some(b) != self.vm_backup(vm))
                })
            })
            .flat_map(|vm| vm.disks.iter().cloned())
            .collect();
        let moves: HashMap<String, u64> = self
            .disks
            .values()
            .filter(|d| d.primary == id && !held.contains(&d.name))
            .filter_map(|d| Some((d.name.clone(), usable(d)?)))
            .collect();
        for d in self.disks.values_mut() {
            if d.primary == id {
                let Some(&b) = moves.get(&d.name) else {
                    stranded.push(d.name.clone());
                    continue;
                };
                d.primary = b;
                d.backup = None;
                d.generation += 1;
                d.backup_synced = false;
                d.pools.remove(&id);
                promoted.push(json!({ "disk": d.name, "primary": b, "generation": d.generation }));
            } else if d.backup == Some(id) {
                d.backup = None;
                d.generation += 1;
                d.backup_synced = false;
                d.pools.remove(&id);
                alone.push(json!({ "disk": d.name, "generation": d.generation }));
            } else {
                continue;
            }
            writes.push((disk_key(&d.name), Some(json_bytes(d))));
        }
        json!({ "changed": true, "promoted": promoted, "alone": alone, "stranded": stranded })
    }

    /// A disk's copies live on two different servers, neither of them a witness.
    fn check_replicas(&self, name: &str, primary: u64, backup: Option<u64>) -> Result<(), String> {
        for id in std::iter::once(primary).chain(backup) {
            match self.servers.get(&id) {
                None => return Err(format!("disk {name}: no server {id}")),
                Some(s) if s.witness => {
                    return Err(format!("disk {name}: server {id} is a witness"))
                }
                Some(_) => {}
            }
        }
        if backup == Some(primary) {
            return Err(format!(
                "disk {name}: primary and backup are both server {primary}"
            ));
        }
        Ok(())
    }

    /// Records a member added by a committed conf change.
    pub fn add_server(&mut self, s: &ServerRecord, writes: &mut Vec<RecordWrite>) {
        writes.push((server_key(s.id), Some(json_bytes(s))));
        self.servers.insert(s.id, s.clone());
    }

    /// Forgets a member removed by a committed conf change, and revokes its certificate.
    pub fn remove_server(&mut self, id: u64, writes: &mut Vec<RecordWrite>) {
        if let Some(s) = self.servers.remove(&id) {
            writes.push((server_key(id), None));
            if !s.cert.is_empty() {
                writes.push((
                    format!("revoked/{}", s.cert).into_bytes(),
                    Some(json_bytes(&id)),
                ));
                self.revoked.insert(s.cert, id);
            }
        }
    }

    /// Answers a read.
    pub fn query(&self, q: &Query) -> Value {
        match q {
            Query::Get { key } => json!({ "value": self.kv.get(key) }),
            Query::State => serde_json::to_value(self).expect("state serializes"),
            Query::Users => Value::Array(
                self.users
                    .values()
                    .map(|u| {
                        json!({ "id": u.id, "name": u.name, "role": u.role, "parent": u.parent, "quota": u.quota })
                    })
                    .collect(),
            ),
            Query::Audit { after, limit } => Value::Array(
                self.audit
                    .range(after.saturating_add(1)..)
                    .take((*limit).min(1000) as usize)
                    .map(|(_, e)| serde_json::to_value(e).expect("audit serializes"))
                    .collect(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A person's change, as a Raft command from the API would carry it.
    fn act(sm: &mut StateMachine, actor: u64, action: Action) -> Outcome {
        let mut w = Vec::new();
        sm.apply(
            &Command::Act {
                actor,
                at_ms: 5,
                action,
            },
            &mut w,
        )
    }

    /// Creating a user (password hash "h").
    fn new_user(name: &str, role: Role, parent: Option<u64>, quota: Option<Quota>) -> Action {
        Action::CreateUser {
            name: name.into(),
            role,
            password: "h".into(),
            parent,
            quota,
        }
    }

    #[test]
    fn vm_creations_keep_their_wire_format() {
        let c: Command = serde_json::from_str(
            r#"{"cmd":"create_vm","name":"a","memory_mib":64,"vcpus":1,"disk_size":512,"kernel":"/k"}"#,
        )
        .unwrap();
        assert!(matches!(&c, Command::CreateVm(v) if v.name == "a" && v.initrd.is_empty()));
        let a: Command = serde_json::from_str(
            r#"{"cmd":"act","actor":0,"at_ms":1,"action":{"kind":"create_vm","owner":2,"name":"b","memory_mib":64,"vcpus":1,"disk_size":512,"kernel":"/k","running":true}}"#,
        )
        .unwrap();
        assert!(
            matches!(&a, Command::Act { action: Action::CreateVm { owner: 2, vm }, .. } if vm.name == "b" && vm.running)
        );
        let back = serde_json::to_value(&a).unwrap();
        assert_eq!(back["action"]["name"], "b", "flattened: {back}");
    }

    fn server(id: u64, witness: bool) -> ServerRecord {
        ServerRecord {
            id,
            address: format!("127.0.0.1:{}", 7000 + id),
            witness,
            capacity: Capacity::default(),
            mirror: String::new(),
            down: false,
            draining: false,
            cert: String::new(),
        }
    }

    /// Applies `writes` to a record list the way storage does.
    fn replay(records: &mut BTreeMap<Vec<u8>, Vec<u8>>, writes: Vec<RecordWrite>) {
        for (k, v) in writes {
            match v {
                Some(v) => records.insert(k, v),
                None => records.remove(&k),
            };
        }
    }

    #[test]
    fn stored_records_rebuild_the_same_state() {
        let mut sm = StateMachine::default();
        let mut records: BTreeMap<_, _> = StateMachine::initial_records(&server(1, false))
            .into_iter()
            .collect();
        sm.servers.insert(1, server(1, false));
        let mut w = Vec::new();
        sm.add_server(&server(2, false), &mut w);
        sm.add_server(&server(3, true), &mut w);
        let cmds = [
            Command::Put {
                key: "a".into(),
                value: "1".into(),
            },
            Command::Put {
                key: "b".into(),
                value: "2".into(),
            },
            Command::Delete { key: "a".into() },
            Command::CompareAndSet {
                key: "b".into(),
                expected: Some("2".into()),
                value: Some("3".into()),
            },
            Command::CreateDisk(DiskRecord {
                name: "d0".into(),
                size: 1 << 30,
                primary: 1,
                backup: Some(2),
                generation: 1,
                pools: Default::default(),
                backup_synced: false,
                clone_of: None,
                uid: 0,
            }),
            Command::SetDiskReplicas {
                name: "d0".into(),
                primary: 2,
                backup: Some(1),
                generation: 2,
            },
            Command::PutVm(VmRecord {
                name: "vm0".into(),
                memory_mib: 512,
                vcpus: 1,
                disks: vec!["d0".into()],
                running: true,
                kernel: String::new(),
                initrd: String::new(),
                cmdline: String::new(),
                id: 1,
                owner: None,
                graceful_stop: false,
                cdrom: None,
                boot: BootMode::Kernel,
                boot_order: BootOrder::DiskFirst,
            }),
        ];
        for c in &cmds {
            sm.apply(c, &mut w).unwrap();
        }
        replay(&mut records, w);
        let loaded = StateMachine::load(&records.into_iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(loaded, sm);
        assert_eq!(loaded.kv.get("b").map(String::as_str), Some("3"));
        assert_eq!(loaded.disks["d0"].generation, 2);
    }

    #[test]
    fn commands_that_do_not_fit_are_refused_without_writes() {
        let mut sm = StateMachine::default();
        let mut w = Vec::new();
        sm.add_server(&server(1, false), &mut w);
        sm.add_server(&server(2, false), &mut w);
        sm.add_server(&server(3, true), &mut w);
        w.clear();
        let disk = |primary, backup| DiskRecord {
            name: "d".into(),
            size: 1,
            primary,
            backup,
            generation: 5,
            pools: Default::default(),
            backup_synced: false,
            clone_of: None,
            uid: 0,
        };
        assert!(sm
            .apply(&Command::CreateDisk(disk(1, Some(3))), &mut w)
            .unwrap_err()
            .reason
            .contains("witness"));
        assert!(sm
            .apply(&Command::CreateDisk(disk(1, Some(1))), &mut w)
            .is_err());
        assert!(sm
            .apply(&Command::CreateDisk(disk(1, Some(9))), &mut w)
            .is_err());
        assert!(w.is_empty());
        sm.apply(&Command::CreateDisk(disk(1, Some(2))), &mut w)
            .unwrap();
        let lower = Command::SetDiskReplicas {
            name: "d".into(),
            primary: 2,
            backup: None,
            generation: 5,
        };
        assert!(sm
            .apply(&lower, &mut w)
            .unwrap_err()
            .reason
            .contains("generation"));
        assert!(sm
            .apply(&Command::DeleteVm { name: "x".into() }, &mut w)
            .is_err());
        let cas = Command::CompareAndSet {
            key: "k".into(),
            expected: Some("x".into()),
            value: Some("y".into()),
        };
        assert_eq!(sm.apply(&cas, &mut w).unwrap()["set"], false);
        assert_eq!(
            w.len(),
            2,
            "only the disk (and the identity counter) was written"
        );
    }

    #[test]
    fn a_server_declared_down_hands_its_disks_over_in_one_entry() {
        let mut sm = StateMachine::default();
        let mut w = Vec::new();
        for id in 1..=3 {
            sm.add_server(&server(id, false), &mut w);
        }
        let disk = |name: &str, primary, backup, synced| DiskRecord {
            name: name.into(),
            size: 1,
            primary,
            backup: Some(backup),
            generation: 3,
            pools: Default::default(),
            backup_synced: synced,
            clone_of: None,
            uid: 0,
        };
        sm.disks.insert("a".into(), disk("a", 1, 2, true));
        sm.disks.insert("b".into(), disk("b", 2, 1, true));
        sm.disks.insert("c".into(), disk("c", 1, 3, false));
        let r = sm
            .apply(&Command::SetServerDown { id: 1, down: true }, &mut w)
            .unwrap();
        assert!(sm.servers[&1].down);
        // Primary here, backup in sync: promoted with a raised generation.
        let a = &sm.disks["a"];
        assert_eq!((a.primary, a.backup, a.generation), (2, None, 4));
        // Backup here: the primary goes on alone, with a raised generation.
        let b = &sm.disks["b"];
        assert_eq!((b.primary, b.backup, b.generation), (2, None, 4));
        // Primary here, backup never synced: it waits.
        let c = &sm.disks["c"];
        assert_eq!((c.primary, c.backup, c.generation), (1, Some(3), 3));
        assert_eq!(r["stranded"][0], "c");
        // Declaring it again changes nothing; up again leaves the disks where they are.
        let again = sm
            .apply(&Command::SetServerDown { id: 1, down: true }, &mut w)
            .unwrap();
        assert_eq!(again["changed"], false);
        sm.apply(&Command::SetServerDown { id: 1, down: false }, &mut w)
            .unwrap();
        assert_eq!(sm.disks["a"].primary, 2);
        // A new backup only on the current generation, never the primary.
        let stale = Command::SetDiskBackup {
            name: "a".into(),
            backup: 1,
            pool: String::new(),
            generation: 3,
        };
        assert!(sm.apply(&stale, &mut w).is_err());
        let own = Command::SetDiskBackup {
            name: "a".into(),
            backup: 2,
            pool: String::new(),
            generation: 4,
        };
        assert!(sm.apply(&own, &mut w).is_err());
        let ok = Command::SetDiskBackup {
            name: "a".into(),
            backup: 1,
            pool: String::new(),
            generation: 4,
        };
        sm.apply(&ok, &mut w).unwrap();
        assert_eq!(sm.disks["a"].backup, Some(1));
        assert!(!sm.disks["a"].backup_synced);
    }

    #[test]
    fn the_primary_reports_its_backup_in_sync() {
        let mut sm = StateMachine::default();
        let mut w = Vec::new();
        for id in 1..=2 {
            let mut s = server(id, false);
            s.mirror = format!("10.0.0.{id}:7400");
            sm.add_server(&s, &mut w);
        }
        sm.disks.insert(
            "a".into(),
            DiskRecord {
                name: "a".into(),
                size: 1,
                primary: 1,
                backup: Some(2),
                generation: 2,
                pools: Default::default(),
                backup_synced: false,
                clone_of: None,
                uid: 0,
            },
        );
        let report = |link: &str, generation, peer: &str| Command::Observe {
            id: 1,
            observation: Observation {
                disks: [(
                    "a".to_string(),
                    DiskObservation {
                        role: "primary".into(),
                        generation,
                        link: link.into(),
                        peer: Some(peer.into()),
                        out_of_sync_bytes: 0,
                        resync_percent: None,
                    },
                )]
                .into(),
                ..Default::default()
            },
        };
        sm.apply(&report("in-sync", 1, "10.0.0.2:7400"), &mut w)
            .unwrap();
        assert!(!sm.disks["a"].backup_synced, "an older generation");
        sm.apply(&report("in-sync", 2, "10.0.0.9:7400"), &mut w)
            .unwrap();
        assert!(!sm.disks["a"].backup_synced, "another peer");
        sm.apply(&report("in-sync", 2, "10.0.0.2:7400"), &mut w)
            .unwrap();
        assert!(sm.disks["a"].backup_synced);
        sm.apply(&report("down", 2, "10.0.0.2:7400"), &mut w)
            .unwrap();
        assert!(
            sm.disks["a"].backup_synced,
            "a link down keeps the backup's data"
        );
        sm.apply(&report("resyncing", 2, "10.0.0.2:7400"), &mut w)
            .unwrap();
        assert!(!sm.disks["a"].backup_synced);
        assert!(sm.observed.contains_key(&1));
    }

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
        let mut vm = NewVm {
            name: "v".into(),
            memory_mib: 64,
            vcpus: 1,
            disk_size: 1,
            extra_disks: Vec::new(),
            kernel: String::new(),
            initrd: String::new(),
            cmdline: String::new(),
            running: false,
            boot: Default::default(),
            boot_order: Default::default(),
            cdrom: None,
        }
        .record(Some(r));
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
            cdrom: None,
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
            add_disks: Vec::new(),
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
            add_disks: vec![gib << 30],
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
        sm.vms.get_mut("v").unwrap().running = true;
        assert!(refused(act(&mut sm, p, edit(Some(256), None)))
            .reason
            .contains("powered on"));
        let audit: Vec<&str> = sm.audit.values().map(|a| a.action.as_str()).collect();
        assert_eq!(
            audit.iter().filter(|a| **a == "vm.edit").count(),
            2,
            "{audit:?}"
        );
    }

    #[test]
    fn commands_round_trip_as_json() {
        let c = Command::Put {
            key: "k".into(),
            value: "v".into(),
        };
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(s, r#"{"cmd":"put","key":"k","value":"v"}"#);
        assert_eq!(serde_json::from_str::<Command>(&s).unwrap(), c);
        assert!(serde_json::from_str::<Command>(r#"{"cmd":"launch_missiles"}"#).is_err());
    }
}
