//! The API's OpenAPI 3.0 document, served at `/api/v1/openapi.json`. The authorization matrix
//! test walks every operation listed here, so an endpoint missing from it is caught.

use serde_json::{json, Value};

/// Every operation: method, path (with `{id}`), summary, whether it changes something.
pub const OPERATIONS: &[(&str, &str, &str)] = &[
    (
        "post",
        "/session",
        "Log in: sets the session cookie, answers the CSRF token",
    ),
    (
        "get",
        "/session",
        "The logged-in user and the session's CSRF token",
    ),
    ("delete", "/session", "Log out"),
    (
        "get",
        "/summary",
        "Counts of the VMs (and, for a Manager, servers and users) the caller sees",
    ),
    (
        "get",
        "/vms",
        "The VMs the caller sees, by VMID: all of them, or a page with ?after=VMID&limit=N (those after that VMID, at most N, 1 to 1000, 100 by default; a page shorter than N is the last)",
    ),
    ("post", "/vms", "Create a VM (Manager, Power User)"),
    ("get", "/vms/{id}", "One VM"),
    (
        "delete",
        "/vms/{id}",
        "Delete a powered-off VM (Manager, Power User)",
    ),
    (
        "patch",
        "/vms/{id}",
        "Change a powered-off VM: memory, vCPUs, how it boots, what it boots first (Manager, Power User; within the quota)",
    ),
    ("post", "/vms/{id}/power", "Power a VM on or off"),
    (
        "post",
        "/vms/{id}/clone",
        "Clone a powered-off VM: its disk copied on its primary server, mirrored to another (Manager, Power User)",
    ),
    (
        "post",
        "/vms/{id}/migrate/cancel",
        "Give up a VM's live migration while its memory is still being copied (Manager): it runs on where it was",
    ),
    (
        "post",
        "/vms/{id}/migrate",
        "Move a VM to its backup server, which must be in sync (Manager): a running VM moves live (answer: live true; the audit log records its pause), a powered-off one moves its disks (live false, and why)",
    ),
    (
        "get",
        "/vms/{id}/console/serial",
        "The VM's serial console: a WebSocket (Upgrade: websocket) whose binary messages carry the serial port's bytes both ways, its recent history first; opened from any server, relayed from the VM's",
    ),
    (
        "get",
        "/vms/{id}/console/vnc",
        "The VM's graphical console: a WebSocket carrying RFB 3.8 (VNC, no authentication: the session is), for noVNC; opened from any server, relayed from the VM's",
    ),
    (
        "post",
        "/vms/{id}/cdrom",
        "Put an ISO image of the library into the VM's CD-ROM drive, or eject it (null); a running guest sees the media change",
    ),
    (
        "get",
        "/isos",
        "The ISO library: each image's size, SHA-256, the VM servers holding a checked copy, the VMs using it",
    ),
    (
        "put",
        "/isos/{name}",
        "Upload an ISO image (Manager): the raw bytes as the body (application/octet-stream, Content-Length required, up to 64 GiB); the other servers copy it from this one",
    ),
    (
        "delete",
        "/isos/{name}",
        "Delete an ISO image (Manager); refused while a VM's CD-ROM holds it",
    ),
    (
        "get",
        "/appliances",
        "The Virtual Appliance library, as far as the caller may use it (a Manager: all, with whom each is shared): each one's memory, vCPUs, firmware, disk bus, network cards, disk images (size, SHA-256), origin and the VM servers holding it",
    ),
    (
        "put",
        "/appliances/{name}",
        "Import an OVA (Manager): the archive as the body (application/octet-stream, Content-Length required, up to 256 GiB); OVF 1.x or 2.0 of any vendor, disks as VMDK, qcow2 or raw (converted to raw with qemu-img), its manifest checked; or the original product's zip of disk images and an appliance.xml (stored or deflated entries, their CRC-32 checked). The archive is read as it arrives, then imported by a task of this server (its progress and cancel in /tasks); answers when the task ends: 201 with the appliance, 422 with the reason when refused, nothing kept. /uploads sends one in resumable parts",
    ),
    (
        "post",
        "/uploads",
        "Open a resumable upload (Manager) of an ISO image or an appliance's archive, on this server: {kind: iso|appliance, name, size}. 201 with its id and the bytes this server holds (0). 503 when 8 are open on this server, or (an appliance) while the cluster imports 4 uploads already; one idle for an hour is forgotten; a server's restart loses them",
    ),
    (
        "get",
        "/uploads/{id}",
        "An open upload (who opened it): its kind, name, size and the bytes this server holds, where the next part starts",
    ),
    (
        "patch",
        "/uploads/{id}",
        "Send a part of an open upload (who opened it): the bytes as the body (application/octet-stream, Content-Length required), from the offset its Upload-Offset header names, which must be the bytes this server holds (409 otherwise). A part cut off keeps what arrived. 200 with the bytes held; with the last byte, 201 with the ISO, or 202 with the appliance's import task; an archive is read as it arrives and refused (422, the upload ended) at the part that shows it is bad",
    ),
    (
        "delete",
        "/uploads/{id}",
        "Give up an open upload (who opened it): its bytes are deleted",
    ),
    (
        "patch",
        "/appliances/{name}",
        "Change an appliance's description, memory, vCPUs, or the Power Users whose companies may use it (Manager)",
    ),
    (
        "delete",
        "/appliances/{name}",
        "Delete an appliance (Manager); refused while a VM is still being made from it",
    ),
    (
        "get",
        "/appliances/{name}/ova",
        "Download an appliance as an OVA (Manager): OVF 2.0, a SHA-256 manifest, stream-optimized VMDKs",
    ),
    (
        "post",
        "/appliances/{name}/download",
        "Download an OVA from a URL (http or https) into a new appliance (Manager): a task on a VM server (this one, if it is one), which reads the archive as it arrives, checks the SHA-256 given (an appliance directory's) and imports it as an upload is. 202 with the task",
    ),
    (
        "get",
        "/appliance-directory",
        "The appliances an appliance directory offers (Manager; ?url= its catalogue: a JSON list of name, description, size, sha256, url), each with whether the library has one of its name; 502 with why when the directory cannot be read",
    ),
    (
        "post",
        "/vms/{id}/copy-back",
        "Copy a powered-off VM back into a new appliance (who administers it): a task on its primary server, which keeps the VM off until it ends; the appliance is shared with the VM owner's company. 202 with the task",
    ),
    (
        "post",
        "/vms/{id}/backup",
        "Back a VM up, running or not, into a new appliance (who operates it; default name: the VM's and the time): a crash-consistent image of all its disks at one point, read from its in-sync backup copies so the guest never waits on it; a task on its backup server; the appliance is shared with the VM owner's company. 202 with the task",
    ),
    (
        "post",
        "/vms/{id}/backup-schedule",
        "Back a VM up on a schedule (who operates it): every every_hours, the newest keep backups kept (older ones leave the library as new ones are made); null ends it",
    ),
    (
        "get",
        "/tasks",
        "Long operations the caller may see (a Manager: all), newest first: what, progress in bytes and percent, running, done or failed and why",
    ),
    (
        "post",
        "/tasks/{id}/cancel",
        "Stop a running task (a Manager, or who asked for it): it ends, failed, leaving nothing behind",
    ),
    (
        "get",
        "/networks",
        "The networks the caller may put VMs on (a Manager: all, with their bridge, uplink, VLAN and company)",
    ),
    (
        "post",
        "/networks",
        "Define a network (Manager): a bridge of that name on every VM server, over the uplink NIC, on a VLAN; for one company's VMs when company is given",
    ),
    (
        "delete",
        "/networks/{name}",
        "Delete a network (Manager); refused while a VM has a network card on it",
    ),
    ("get", "/users", "The users the caller sees"),
    (
        "post",
        "/users",
        "Create a user (Manager; Power User: Regular Users under itself)",
    ),
    ("get", "/users/{id}", "One user"),
    ("patch", "/users/{id}", "Change a user's password or quota"),
    ("delete", "/users/{id}", "Delete a user who owns no VM"),
    ("get", "/servers", "The servers (Manager)"),
    (
        "get",
        "/servers/join",
        "What a new server joins with (Manager; audited): this server's cluster address and the cluster's join token, for enspeed server --join ADDRESS --token TOKEN or the installer's join and token",
    ),
    (
        "post",
        "/servers",
        "Add a server (Manager): one started with enspeed server --await-join, by its address and the join token it shows (DATA/join-token)",
    ),
    (
        "post",
        "/servers/{id}/drain",
        "Drain a server (Manager): its VMs move to their in-sync backups, its backup copies are replaced elsewhere, nothing new is placed there",
    ),
    (
        "delete",
        "/servers/{id}",
        "Remove a drained server from the cluster (Manager); a new server joins with enspeed server --join ADDR --token T (T: a member's DATA/tls/cluster-token)",
    ),
    (
        "get",
        "/audit",
        "The audit log (Manager), whole: ?after=SEQ&limit=N oldest first from a seq (archived entries included), or ?newest=N its last N entries",
    ),
    ("get", "/openapi.json", "This document"),
];

/// Whether `parts` (the path after /api/v1, split) names a path of `OPERATIONS`.
pub fn known_path(parts: &[&str]) -> bool {
    OPERATIONS.iter().any(|(_, p, _)| {
        let want: Vec<&str> = p.split('/').filter(|s| !s.is_empty()).collect();
        want.len() == parts.len()
            && want
                .iter()
                .zip(parts)
                .all(|(w, g)| *w == "{id}" || *w == "{name}" || w == g)
    })
}

fn schemas() -> Value {
    json!({
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "Login": {"type": "object", "required": ["name", "password"], "additionalProperties": false,
            "properties": {"name": {"type": "string"}, "password": {"type": "string"}}},
        "Session": {"type": "object", "properties": {
            "user": {"$ref": "#/components/schemas/User"},
            "csrf_token": {"type": "string"}, "expires_ms": {"type": "integer"}}},
        "Quota": {"type": "object", "required": ["vms", "memory_mib", "disk_gib"], "additionalProperties": false,
            "properties": {"vms": {"type": "integer"}, "memory_mib": {"type": "integer"}, "disk_gib": {"type": "integer"}}},
        "User": {"type": "object", "properties": {
            "id": {"type": "integer"}, "name": {"type": "string"},
            "role": {"type": "string", "enum": ["manager", "power_user", "regular"]},
            "parent": {"type": "integer", "nullable": true},
            "quota": {"type": "object"}, "vm": {"type": "integer"}}},
        "NewUser": {"type": "object", "required": ["name", "password", "role"], "additionalProperties": false,
            "properties": {"name": {"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9._-]{0,62}$"},
                "password": {"type": "string", "minLength": 8},
                "role": {"type": "string", "enum": ["manager", "power_user", "regular"]},
                "parent": {"type": "integer"}, "quota": {"$ref": "#/components/schemas/Quota"}}},
        "UserChange": {"type": "object", "additionalProperties": false, "properties": {
            "password": {"type": "string", "minLength": 8}, "quota": {"$ref": "#/components/schemas/Quota"}}},
        "Vm": {"type": "object", "properties": {
            "id": {"type": "integer"}, "name": {"type": "string"},
            "owner": {"type": "integer", "nullable": true}, "owner_name": {"type": "string", "nullable": true},
            "memory_mib": {"type": "integer"}, "vcpus": {"type": "integer"},
            "disks": {"type": "array", "items": {"type": "integer"}},
            "power": {"type": "string", "enum": ["on", "off"]},
            "status": {"type": "string", "enum": ["running", "starting", "stopping", "stopped"]},
            "primary": {"type": "object", "nullable": true}, "backup": {"type": "object", "nullable": true},
            "replication": {"type": "object", "properties": {
                "state": {"type": "string", "enum": ["in-sync", "resyncing", "degraded", "unknown"]},
                "percent": {"type": "number"}, "generation": {"type": "integer"}}},
            "cdrom": {"type": "string", "nullable": true},
            "boot": {"type": "string", "enum": ["kernel", "bios", "uefi"]},
            "boot_order": {"type": "string", "enum": ["disk_first", "cdrom_first"]},
            "disk_bus": {"type": "string", "enum": ["virtio", "sata"]},
            "nics": {"type": "array", "items": {"type": "object", "properties": {
                "network": {"type": "string"}, "mac": {"type": "string"}}}},
            "error": {"type": "string", "description": "why it does not run though it should"}}},
        "BackupSchedule": {"type": "object", "required": ["schedule"], "additionalProperties": false,
            "properties": {"schedule": {"oneOf": [{"type": "null"}, {"type": "object", "required": ["every_hours", "keep"],
                "additionalProperties": false, "properties": {"every_hours": {"type": "integer", "minimum": 1, "maximum": 8760},
                "keep": {"type": "integer", "minimum": 1, "maximum": 100}}}]}}},
        "Backup": {"type": "object", "additionalProperties": false,
            "properties": {"name": {"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9._-]{0,62}$"},
                "description": {"type": "string", "maxLength": 4096}}},
        "NewUpload": {"type": "object", "required": ["kind", "name", "size"], "additionalProperties": false,
            "properties": {"kind": {"type": "string", "enum": ["iso", "appliance"]},
                "name": {"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9._-]{0,62}$"},
                "size": {"type": "integer", "minimum": 1, "description": "its bytes in all"}}},
        "Download": {"type": "object", "required": ["url"], "additionalProperties": false,
            "properties": {"url": {"type": "string", "description": "where the OVA is: http:// or https://"},
                "sha256": {"type": "string", "description": "the OVA's SHA-256, hex: the download is refused if it differs"}}},
        "CopyBack": {"type": "object", "required": ["name"], "additionalProperties": false,
            "properties": {"name": {"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9._-]{0,62}$"},
                "description": {"type": "string", "maxLength": 4096}}},
        "ApplianceChange": {"type": "object", "additionalProperties": false,
            "properties": {"description": {"type": "string", "maxLength": 4096},
                "memory_mib": {"type": "integer", "minimum": 1}, "vcpus": {"type": "integer", "minimum": 1, "maximum": 255},
                "shared_with": {"type": "array", "items": {"type": "integer"},
                    "description": "the Power Users whose companies may make VMs from it: the whole set"}}},
        "NewVm": {"type": "object", "required": ["name"], "additionalProperties": false,
            "description": "memory_mib and disk_gib are required unless an appliance gives them",
            "properties": {"name": {"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9._-]{0,62}$"},
                "memory_mib": {"type": "integer", "minimum": 1}, "vcpus": {"type": "integer", "minimum": 1, "maximum": 64},
                "disk_gib": {"type": "integer", "minimum": 1},
                "extra_disks_gib": {"type": "array", "maxItems": 3, "items": {"type": "integer", "minimum": 1}},
                "owner": {"type": "integer"}, "start": {"type": "boolean"},
                "boot": {"type": "string", "enum": ["kernel", "bios", "uefi"]},
                "boot_order": {"type": "string", "enum": ["disk_first", "cdrom_first"]},
                "disk_bus": {"type": "string", "enum": ["virtio", "sata"]},
                "iso": {"type": "string"},
                "appliance": {"type": "string", "description": "a library appliance: its disk images are the VM's disks' first data; its memory, vCPUs, firmware and disk bus the defaults"},
                "networks": {"type": "array", "maxItems": 4, "items": {"type": "string"},
                    "description": "a network card on each, in order; the cluster gives their MACs"}}},
        "NewNetwork": {"type": "object", "required": ["name", "bridge"], "additionalProperties": false,
            "properties": {"name": {"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9._-]{0,62}$"},
                "bridge": {"type": "string", "maxLength": 15}, "uplink": {"type": "string", "maxLength": 15},
                "vlan": {"type": "integer", "minimum": 1, "maximum": 4094},
                "subnet": {"type": "string", "description": "IPv4, A.B.C.D/N: each VM card on it is leased an address by DHCP and may send from no other"},
                "gateway": {"type": "string", "format": "ipv4", "description": "the router DHCP names; default: the subnet's first address"},
                "dns": {"type": "array", "maxItems": 4, "items": {"type": "string", "format": "ipv4"}},
                "company": {"type": "integer", "description": "a Power User's id"}}},
        "VmChange": {"type": "object", "additionalProperties": false,
            "properties": {"memory_mib": {"type": "integer", "minimum": 16}, "vcpus": {"type": "integer", "minimum": 1, "maximum": 64},
                "boot": {"type": "string", "enum": ["kernel", "bios", "uefi"]},
                "boot_order": {"type": "string", "enum": ["disk_first", "cdrom_first"]},
                "disk_bus": {"type": "string", "enum": ["virtio", "sata"]},
                "add_disks_gib": {"type": "array", "maxItems": 3, "items": {"type": "integer", "minimum": 1}},
                "grow_disks": {"type": "array", "maxItems": 4, "items": {"type": "object", "required": ["disk", "gib"],
                    "additionalProperties": false, "properties": {"disk": {"type": "integer", "minimum": 0, "maximum": 3},
                    "gib": {"type": "integer", "minimum": 1}}}}}},
        "Clone": {"type": "object", "required": ["name"], "additionalProperties": false,
            "properties": {"name": {"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9._-]{0,62}$"},
                "owner": {"type": "integer"}}},
        "NewServer": {"type": "object", "required": ["address", "token"], "additionalProperties": false,
            "properties": {"address": {"type": "string", "description": "host:port of its client port (--listen)"},
                "token": {"type": "string", "description": "the join token it shows"}}},
        "Cdrom": {"type": "object", "required": ["iso"], "additionalProperties": false,
            "properties": {"iso": {"type": "string", "nullable": true,
                "description": "an ISO's name in the library; null ejects"}}},
        "Migrate": {"type": "object", "additionalProperties": false,
            "properties": {"downtime_ms": {"type": "integer", "minimum": 1, "maximum": 10000,
                "description": "the longest pause a live migration may take (50 when absent)"},
                "to": {"type": "integer", "description": "the server to move to (its disks' backup server when absent); another server first gets new copies of the disks, synced while the VM runs (a running VM booted by the kernel only)"},
                "auto_converge": {"type": "boolean",
                "description": "slow a guest whose memory changes faster than the copy goes (its vCPUs held back a growing share of the time) until it converges, instead of giving up"}}},
        "Power": {"type": "object", "required": ["action"], "additionalProperties": false,
            "properties": {"action": {"type": "string", "enum": ["on", "off", "force-off"],
                "description": "off: the guest is asked to shut down (ACPI power button) and stopped hard after the server's shutdown timeout; force-off: stopped at once"}}},
    })
}

fn body_schema(method: &str, path: &str) -> Option<&'static str> {
    match (method, path) {
        ("post", "/session") => Some("Login"),
        ("post", "/vms") => Some("NewVm"),
        ("patch", "/appliances/{name}") => Some("ApplianceChange"),
        ("post", "/vms/{id}/copy-back") => Some("CopyBack"),
        ("post", "/appliances/{name}/download") => Some("Download"),
        ("post", "/uploads") => Some("NewUpload"),
        ("post", "/vms/{id}/backup") => Some("Backup"),
        ("post", "/vms/{id}/backup-schedule") => Some("BackupSchedule"),
        ("post", "/vms/{id}/power") => Some("Power"),
        ("post", "/vms/{id}/clone") => Some("Clone"),
        ("post", "/vms/{id}/migrate") => Some("Migrate"),
        ("patch", "/vms/{id}") => Some("VmChange"),
        ("post", "/vms/{id}/cdrom") => Some("Cdrom"),
        ("post", "/servers") => Some("NewServer"),
        ("post", "/networks") => Some("NewNetwork"),
        ("post", "/users") => Some("NewUser"),
        ("patch", "/users/{id}") => Some("UserChange"),
        _ => None,
    }
}

/// The document.
pub fn document() -> Value {
    let mut paths = serde_json::Map::new();
    for (method, path, summary) in OPERATIONS {
        let mut op = json!({
            "summary": summary,
            "operationId": format!("{method}{}", path.replace(['/', '{', '}', '.'], "_")),
            "responses": {
                "200": {"description": "done"},
                "default": {"description": "an error",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            }
        });
        if path.contains("/console/") {
            op["responses"] = json!({
                "101": {"description": "switched to the WebSocket"},
                "409": {"description": "the VM is off, or its server is down"},
                "426": {"description": "not a WebSocket handshake"},
                "default": {"description": "an error",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            });
        }
        if path.contains("{id}") {
            op["parameters"] = json!([{"name": "id", "in": "path", "required": true,
                "schema": {"type": "integer"}}]);
        }
        if path.contains("{name}") {
            op["parameters"] = json!([{"name": "name", "in": "path", "required": true,
                "schema": {"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9._-]{0,62}$"}}]);
        }
        if matches!(
            (*method, *path),
            ("put", "/isos/{name}") | ("put", "/appliances/{name}")
        ) {
            op["requestBody"] = json!({"required": true, "content": {"application/octet-stream":
                {"schema": {"type": "string", "format": "binary"}}}});
        }
        if let Some(s) = body_schema(method, path) {
            op["requestBody"] = json!({"required": true, "content": {"application/json":
                {"schema": {"$ref": format!("#/components/schemas/{s}")}}}});
        }
        let public = matches!(
            (*method, *path),
            ("post", "/session") | ("get", "/openapi.json")
        );
        if public {
            op["security"] = json!([]);
        }
        if *method != "get" && !public {
            op["parameters"]
                .as_array_mut()
                .map(|a| a.push(csrf()))
                .unwrap_or_else(|| op["parameters"] = json!([csrf()]));
        }
        paths
            .entry(format!("/api/v1{path}"))
            .or_insert_with(|| json!({}))[*method] = op;
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "EnSpeed orchestrator API",
            "version": "1",
            "description": "Every server serves this API. Log in with POST /api/v1/session; the session cookie is HttpOnly and SameSite=Strict; every change carries the session's CSRF token in X-CSRF-Token. Objects the caller may not see answer 404."
        },
        "paths": paths,
        "components": {
            "schemas": schemas(),
            "securitySchemes": {"session": {"type": "apiKey", "in": "cookie", "name": crate::auth::COOKIE}}
        },
        "security": [{"session": []}]
    })
}

fn csrf() -> Value {
    json!({"name": "X-CSRF-Token", "in": "header", "required": true, "schema": {"type": "string"}})
}
