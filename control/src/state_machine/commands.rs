//! The commands the Raft log carries (`Command`), the changes a person asks for inside them
//! (`Action`) and the reads (`Query`): the wire format every server applies alike.

use serde::{Deserialize, Serialize};

use super::observations::Observation;
use super::records::{
    ApplianceDisk, BackupSchedule, BootMode, BootOrder, Capacity, DiskBus, DiskRecord, MoveOutcome,
    NetworkRecord, Nic, VmRecord,
};
use crate::access::{Quota, Role, SessionRecord};

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
    /// A server's node agent holds a checked copy of every disk image of an appliance.
    ApplianceHeld {
        /// The appliance's name.
        name: String,
        /// The SHA-256 of each image the copies have, Disk0 first: they must be the
        /// appliance's.
        disks: Vec<String>,
        /// The server.
        server: u64,
    },
    /// A task's server says how far it got.
    TaskProgress {
        /// The task.
        id: u64,
        /// The server running it (only it reports).
        server: u64,
        /// Bytes done so far.
        done_bytes: u64,
        /// The bytes in all, once the server learns them (a download's length), if the task
        /// began without.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        total_bytes: Option<u64>,
    },
    /// A task's server says how it ended.
    TaskEnded {
        /// The task.
        id: u64,
        /// The server running it (only it reports).
        server: u64,
        /// When, ms since the epoch.
        at_ms: u64,
        /// How.
        outcome: TaskOutcome,
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
    /// A live migration's target hands VM `vm`'s disks to itself: once its VMM holds the
    /// whole VM, before it runs it (see `LiveMove`). Each disk's backup (the target) becomes
    /// its primary with a raised generation, the old primary its backup. Refused, changing
    /// nothing, unless move `move_id` is under way; the same again is done already.
    SwitchVm {
        /// The VM.
        vm: String,
        /// The move.
        move_id: u64,
    },
    /// A live migration's source says how it ended; written to the audit log.
    EndMove {
        /// The VM.
        vm: String,
        /// The move.
        move_id: u64,
        /// When, ms since the epoch.
        at_ms: u64,
        /// How.
        outcome: MoveOutcome,
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

/// How a task ended (`Command::TaskEnded`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum TaskOutcome {
    /// A copy back's or a backup's disks are in this server's library: the images, Disk0
    /// first.
    CopiedBack {
        /// Their sizes and hashes.
        disks: Vec<ApplianceDisk>,
    },
    /// A download's appliance, imported into this server's library (its name is the task's).
    Imported {
        /// What its descriptor said, and its images.
        appliance: NewAppliance,
    },
    /// It failed, or stopped when cancelled.
    Failed {
        /// Why.
        reason: String,
    },
}

/// A disk of a VM grown: which (0 for Disk0) and its new size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskGrowth {
    /// The disk's place among the VM's disks (Disk0-3).
    pub disk: usize,
    /// Its new size, bytes.
    pub size: u64,
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
    /// With firmware boot: the controller its disks are on.
    #[serde(default)]
    pub disk_bus: DiskBus,
    /// The ISO in its CD-ROM drive from the start (a library image's name).
    #[serde(default)]
    pub cdrom: Option<String>,
    /// Its network cards: the network of each, in order (the cluster gives their MACs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<String>,
    /// The library appliance whose disk images its disks start as (each disk at least its
    /// image's size); its primary is a server holding them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub appliance: Option<String>,
}

/// An appliance a task made, to add to the library (`TaskOutcome::Imported`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAppliance {
    /// Its name.
    pub name: String,
    /// What it is.
    #[serde(default)]
    pub description: String,
    /// Guest RAM of the VMs made from it, MiB.
    pub memory_mib: u64,
    /// Their vCPUs.
    pub vcpus: u32,
    /// Their firmware (`bios` or `uefi`).
    pub boot: BootMode,
    /// The controller their disks are on.
    #[serde(default)]
    pub disk_bus: DiskBus,
    /// Their network cards.
    #[serde(default)]
    pub nics: u32,
    /// Its disk images, Disk0 first.
    pub disks: Vec<ApplianceDisk>,
    /// Where it came from.
    #[serde(default)]
    pub origin: String,
}

impl NewVm {
    /// The sizes of its disks, Disk0 first.
    pub fn disk_sizes(&self) -> Vec<u64> {
        std::iter::once(self.disk_size)
            .chain(self.extra_disks.iter().copied())
            .collect()
    }

    /// Its record, owned by `owner`, before placement fills in its id and disks.
    pub(super) fn record(&self, owner: Option<u64>) -> VmRecord {
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
            disk_bus: self.disk_bus,
            moving: None,
            backup_schedule: None,
            last_backup_ms: 0,
            nics: self
                .networks
                .iter()
                .map(|n| Nic {
                    network: n.clone(),
                    mac: String::new(),
                    ip: None,
                })
                .collect(),
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
        /// The controller its disks are on.
        #[serde(default)]
        disk_bus: Option<DiskBus>,
        /// New blank disks, bytes each, after the ones it has (up to Disk3).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        add_disks: Vec<u64>,
        /// Disks it has, grown (never shrunk); each copy is grown by its server's agent.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        grow_disks: Vec<DiskGrowth>,
    },
    /// Empties a server (Managers): nothing new is placed on it; every disk whose primary is
    /// there moves to its in-sync backup (a running VM live), every backup copy there is
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
    /// primary, with a raised generation, and the old primary its backup. A running VM moves
    /// live (`LiveMove`), without a restart; a powered-off one moves its disks, and the answer
    /// says so.
    MigrateVm {
        /// VMID.
        vm: u64,
        /// The longest pause allowed, ms (1 to 10000; the VMM's 50 when absent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        downtime_ms: Option<u64>,
        /// Slow a guest that dirties memory faster than the copy goes down until it converges
        /// (auto-converge), instead of giving up.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        auto_converge: bool,
        /// The server to move to; its disks' backup server when absent. Another server (a
        /// running VM booted by the kernel only) first gets new backup copies, synced while
        /// the VM runs, then the VM moves there live as to a backup.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<u64>,
    },
    /// Gives up a VM's live migration while its memory is still being copied (Managers): the
    /// VM runs on where it was. Refused when none is under way or its disks were handed over.
    CancelMigration {
        /// VMID.
        vm: u64,
    },
    /// Defines a network (Managers).
    CreateNetwork {
        /// Its definition.
        network: NetworkRecord,
    },
    /// Deletes a network no VM is on (Managers).
    DeleteNetwork {
        /// Its name.
        name: String,
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
    /// Changes an appliance's description, the VM it makes, or whom it is shared with
    /// (Managers); what is not given stays. Its disk images never change.
    EditAppliance {
        /// Its name.
        name: String,
        /// Its new description.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        description: Option<String>,
        /// Guest RAM of the VMs made from it, MiB.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        memory_mib: Option<u64>,
        /// vCPUs of the VMs made from it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vcpus: Option<u32>,
        /// The Power Users whose companies may use it (the whole set; empty: Managers only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        shared_with: Option<Vec<u64>>,
    },
    /// Removes an appliance from the library (Managers); refused while a VM is still being
    /// made from it.
    DeleteAppliance {
        /// Its name.
        name: String,
    },
    /// "Copy back": a powered-off VM becomes a new appliance (who administers the VM), its
    /// disks copied into the library by its primary server's agent (`TaskKind::CopyBack`); the
    /// appliance is shared with the VM owner's company. Answers the task's id.
    CopyBack {
        /// VMID.
        vm: u64,
        /// The new appliance's name.
        name: String,
        /// Its description.
        #[serde(default)]
        description: String,
    },
    /// "Live backup": VM `vm`, running or not, into a new appliance (who operates the VM),
    /// from its disks' in-sync backup copies, by its backup server's agent
    /// (`TaskKind::Backup`); shared with the VM owner's company. Answers the task's id.
    BackupVm {
        /// VMID.
        vm: u64,
        /// The new appliance's name.
        name: String,
        /// Its description.
        #[serde(default)]
        description: String,
    },
    /// Downloads an OVA from `url` (http or https) into new appliance `name` (Managers): a
    /// task (`TaskKind::Download`) of VM server `server`'s agent, which checks `sha256` if
    /// given. Answers the task's id.
    DownloadAppliance {
        /// The new appliance's name.
        name: String,
        /// Where from.
        url: String,
        /// The OVA's SHA-256, hex, if known.
        #[serde(default)]
        sha256: Option<String>,
        /// The VM server to download it (the one asked, when it is one).
        server: u64,
    },
    /// Imports archive `upload` (`bytes` long), uploaded to server `server` by a Manager, into
    /// new appliance `name`: a task (`TaskKind::Import`) of that server's web service, which
    /// received it. Answers the task's id.
    ImportUpload {
        /// The new appliance's name.
        name: String,
        /// The upload's name on its server (letters, digits and `-`, at most 64).
        upload: String,
        /// The archive's bytes.
        bytes: u64,
        /// The server holding it.
        server: u64,
    },
    /// Sets (or with `None`, ends) VM `vm`'s backup schedule (who operates the VM): the leader
    /// backs it up when due (`tasks::due_backups`), and a backup past the newest `keep` leaves
    /// the library when a new one is made.
    SetBackupSchedule {
        /// VMID.
        vm: u64,
        /// The schedule.
        #[serde(default)]
        schedule: Option<BackupSchedule>,
    },
    /// Stops a running task (a Manager, or who asked for it); its server ends it, failed.
    CancelTask {
        /// The task.
        id: u64,
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
    /// Archived audit entries (rotated out of the state) after `after`, oldest first, at most
    /// `limit` (capped at 1000): read from this server's store.
    ArchivedAudit {
        /// Entries with a higher seq.
        #[serde(default)]
        after: u64,
        /// At most this many (capped at 1000).
        #[serde(default = "default_audit_limit")]
        limit: u64,
    },
}

/// `Query::Audit` and `Query::ArchivedAudit`: 100 entries unless asked.
fn default_audit_limit() -> u64 {
    100
}

#[cfg(test)]
mod tests {
    use super::*;

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
