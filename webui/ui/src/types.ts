// The JSON the API answers (webui/src/views.rs and routes.rs).

export type Role = "manager" | "power_user" | "regular";

/** A Power User's quota and what its company uses of it. */
export interface Quota {
  vms: number;
  memory_mib: number;
  disk_gib: number;
  used_vms: number;
  used_memory_mib: number;
  used_disk_gib: number;
}

export interface User {
  id: number;
  name: string;
  role: Role;
  /** A Regular User's Power User. */
  parent: number | null;
  quota?: Quota;
  /** The VM a Regular User owns. */
  vm?: number;
}

/** Where one copy of a VM's disk lives. */
export interface Copy {
  server: number;
  /** A Manager's view only. */
  address?: string;
  pool?: string;
  down: boolean;
}

export interface Replication {
  state: "in-sync" | "resyncing" | "degraded" | "unknown";
  percent?: number;
  generation: number;
}

export type VmStatus = "running" | "starting" | "stopping" | "stopped";

export interface Vm {
  id: number;
  name: string;
  owner: number | null;
  owner_name: string | null;
  memory_mib: number;
  vcpus: number;
  /** Its live backups on a schedule. */
  backup_schedule: { every_hours: number; keep: number } | null;
  /** Why its scheduled backup, due, waits (its company's disk quota), if it does. */
  backup_held?: string;
  /** When its last live backup began. */
  last_backup_ms: number | null;
  /** Disk sizes in bytes, disk 0 first. */
  disks: number[];
  power: "on" | "off";
  status: VmStatus;
  primary: Copy | null;
  backup: Copy | null;
  replication: Replication;
  /** The ISO in its CD-ROM drive. */
  cdrom?: string | null;
  /** How it starts: the cluster's guest kernel, or a blank PC's BIOS or UEFI firmware. */
  boot: "kernel" | "bios" | "uefi";
  /** With firmware boot: what it boots first. */
  boot_order: "disk_first" | "cdrom_first";
  disk_bus: "virtio" | "sata";
  /** Its network cards, in order. */
  nics: Nic[];
  /** Why it does not run though it should (details for a Manager). */
  error?: string;
  /** Its live migration, while one is under way. */
  migration?: Migration;
}

/** A live migration under way. */
export interface Migration {
  /** The server it moves to. */
  to: number;
  /** Its disks were handed over: it is the target's now. */
  switched: boolean;
  /** A Manager asked to give it up. */
  cancel_asked: boolean;
  /** It waits for its disks' new copies on the target to be in sync. */
  copying_disks: boolean;
  /** Where it stands, as the source's VMM last said. */
  progress: MigrationProgress | null;
}

/** Where a live migration stands. */
export interface MigrationProgress {
  phase: "copying" | "paused" | "handover";
  round: number;
  memory_bytes: number;
  transferred_bytes: number;
  /** Guest RAM the round under way went through (pages of zeros are named, not sent). */
  covered_bytes: number;
  remaining_bytes: number;
  dirty_rate_bytes_per_sec: number;
  expected_downtime_ms: number;
  elapsed_ms: number;
  /** The share of the time the guest is held back for the copy to converge, percent. */
  throttle_pct: number;
}

/** A network (the bridge, uplink, VLAN and company are shown to Managers only). */
export interface Network {
  name: string;
  subnet: string | null;
  /** The router its DHCP service names. */
  gateway?: string;
  /** The DNS servers its DHCP service names. */
  dns?: string[];
  private: boolean;
  bridge?: string;
  uplink?: string;
  vlan?: number;
  company?: number;
  /** VMs (that the viewer sees) with a card on it. */
  vms: number;
}

/** A VM's network card: its network and the MAC the cluster gave it. */
export interface Nic {
  network: string;
  mac: string;
  /** The address the cluster's DHCP service leases it, on a network with a subnet. */
  ip?: string;
  /** The addresses its guest is seen to use, newest last. */
  addresses: string[];
}

/** An ISO image of the library. */
export interface Iso {
  name: string;
  size: number;
  sha256: string;
  uploaded_by: string | null;
  uploaded_ms: number;
  /** The VM servers holding a checked copy. */
  servers: number[];
  vm_servers: number;
  /** VMIDs whose CD-ROM holds it. */
  in_use_by: number[];
}

/** A disk image of an appliance. */
export interface ApplianceDisk {
  size: number;
  sha256: string;
}

/** A Virtual Appliance of the library. */
export interface Appliance {
  name: string;
  description: string;
  memory_mib: number;
  vcpus: number;
  boot: "bios" | "uefi" | "kernel";
  disk_bus: "virtio" | "sata";
  nics: number;
  /** Its disk images, Disk0 first. */
  disks: ApplianceDisk[];
  origin: string;
  created_by: string | null;
  created_ms: number;
  /** The VM servers holding every disk image. */
  servers: number[];
  vm_servers: number;
  /** The Power Users whose companies may use it (Managers see it). */
  shared_with?: number[];
}

/** A long operation (copy back, live backup, download), with its progress. */
/** A resumable upload open on a server (`/api/v1/uploads/{id}`). */
export interface OpenUpload {
  id: string;
  kind: "iso" | "appliance";
  name: string;
  size: number;
  /** The bytes the server holds: the next part starts there. */
  received: number;
  server: number;
}

export interface Task {
  id: number;
  kind: "copy_back" | "backup" | "download" | "import";
  what: string;
  vm: number | null;
  appliance: string | null;
  by: string | null;
  started_ms: number;
  done_bytes: number;
  total_bytes: number;
  percent: number;
  state: "running" | "done" | "failed";
  reason: string | null;
  ended_ms: number | null;
  cancel: boolean;
}

export interface Server {
  id: number;
  address: string;
  witness: boolean;
  down: boolean;
  /** Being emptied: nothing new is placed there. */
  draining: boolean;
  leader: boolean;
  blockd_up: boolean;
  memory_mib: number;
  used_memory_mib: number;
  /** Storage pools: path and GiB. */
  pools: [string, number][];
  primary_vms: number;
  backup_vms: number;
}

export interface Summary {
  vms: { total: number; running: number; stopped: number };
  replication: { in_sync: number; resyncing: number; degraded: number };
  /** A Manager's only. */
  servers?: { total: number; down: number; leader: number | null; serving: number };
  users?: number;
}

export interface AuditEntry {
  seq: number;
  at_ms: number;
  actor: number;
  actor_name: string;
  action: string;
  target: string;
}

export interface Session {
  user: User;
  csrf_token: string;
  expires_ms: number;
}
