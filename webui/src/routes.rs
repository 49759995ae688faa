//! The endpoints of `/api/v1`. Each finds the caller's session, checks what the caller may see
//! or do (`control::access`), and answers JSON; changes are proposed as the caller.
//!
//! ```text
//!   POST   /api/v1/session             log in {name, password}: cookie + csrf_token
//!   GET    /api/v1/session             who is logged in, the csrf_token
//!   DELETE /api/v1/session             log out
//!   GET    /api/v1/summary             counts of what the caller sees
//!   GET    /api/v1/vms                 VMs the caller sees
//!   PATCH  /api/v1/vms/{id}            change a powered-off VM {memory_mib?, vcpus?, boot?, boot_order?, disk_bus?,
//!                                        add_disks_gib? (new blank disks, up to Disk3),
//!                                        grow_disks? ([{disk, gib}]: disks it has, grown)}
//!   POST   /api/v1/vms                 create {name, memory_mib, vcpus, disk_gib, extra_disks_gib?, owner?, start?,
//!                                        boot? (kernel|bios|uefi), boot_order? (disk_first|cdrom_first),
//!                                        disk_bus? (virtio|sata, with bios or uefi), iso?,
//!                                        appliance? (its disks start as its images)}
//!   GET    /api/v1/vms/{id}            one VM
//!   POST   /api/v1/vms/{id}/power      {"action": "on" | "off" | "force-off"}
//!   POST   /api/v1/vms/{id}/migrate    move it to its backup server (Manager)
//!   POST   /api/v1/vms/{id}/migrate/cancel   give up its live migration while it copies
//!   POST   /api/v1/vms/{id}/clone      {name, owner?}: a copy of a powered-off VM
//!   POST   /api/v1/vms/{id}/copy-back  {name, description?}: a powered-off VM into a new appliance
//!   POST   /api/v1/vms/{id}/backup     {name?, description?}: a live backup into a new appliance
//!   POST   /api/v1/vms/{id}/backup-schedule  {schedule: {every_hours, keep} | null}
//!   GET    /api/v1/tasks               long operations the caller may see, with progress
//!   POST   /api/v1/tasks/{id}/cancel   stop one (a Manager, or who asked for it)
//!   DELETE /api/v1/vms/{id}            delete a powered-off VM
//!   GET    /api/v1/users               users the caller sees
//!   POST   /api/v1/users               create {name, password, role, parent?, quota?}
//!   GET    /api/v1/users/{id}          one user
//!   PATCH  /api/v1/users/{id}          {password?, quota?}
//!   DELETE /api/v1/users/{id}          delete
//!   GET    /api/v1/servers             servers (Manager)
//!   GET    /api/v1/servers/join        what a new server joins with: an address, the cluster's
//!                                        join token (Manager; the read is audited)
//!   POST   /api/v1/servers/{id}/drain  move every disk copy off it (Manager)
//!   DELETE /api/v1/servers/{id}        remove a drained server from the cluster (Manager)
//!   GET    /api/v1/appliances          the appliance library, as far as the caller may use it
//!   PUT    /api/v1/appliances/{name}   import an OVA, or a zip of images and an appliance.xml
//!                                      (Manager; the archive is the body)
//!   PATCH  /api/v1/appliances/{name}   {description?, memory_mib?, vcpus?, shared_with?} (Manager)
//!   DELETE /api/v1/appliances/{name}   delete (Manager)
//!   GET    /api/v1/appliances/{name}/ova  download as an OVA (Manager)
//!   POST   /api/v1/appliances/{name}/download  {url, sha256?}: a task downloads and imports an
//!          OVA (Manager)
//!   GET    /api/v1/appliance-directory?url=  an appliance directory's catalogue (Manager)
//!   GET    /api/v1/audit?after=&limit= the audit log (Manager), oldest first from a seq;
//!          /api/v1/audit?newest=N       or its last N entries
//!   GET    /api/v1/openapi.json        this API's OpenAPI document
//! ```
//!
//! A change needs the session's CSRF token in `X-CSRF-Token`. An object the caller may not see
//! is answered 404, as if it did not exist; one it may see but not change, 403.

use std::sync::Arc;

use control::access::{self, AuditEntry, Quota, Role, SessionRecord, UserRecord};
use control::state_machine::{self, Action, StateMachine};
use hyper::header::{HeaderValue, SET_COOKIE};
use hyper::{Method, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::{self, RateLimit};
use crate::bodies::{self, Ask, Asker, PowerAction};
use crate::cluster::{now_ms, Cluster};
use crate::http::{json_response, ok, ApiError, Body, Request};
use crate::views::{ReplicationState, VmStatus};
use crate::{console, openapi, views, WebConfig};

/// The web service's state.
pub struct App {
    pub(crate) cfg: WebConfig,
    pub(crate) cluster: Cluster,
    logins: RateLimit,
    /// The password hashes that may run at once (`auth::HASHES_AT_ONCE`).
    hashes: tokio::sync::Semaphore,
    /// The consoles open through this server, by user.
    consoles: console::Slots,
    /// Each user's requests per second on this server.
    pace: crate::pace::Pace,
    /// The imports and resumable uploads of this server.
    pub(crate) uploads: crate::imports::Uploads,
}

/// A logged-in caller.
pub(crate) struct Caller {
    pub(crate) user: UserRecord,
    pub(crate) session: SessionRecord,
    pub(crate) state: Arc<StateMachine>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    name: String,
    password: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserChange {
    #[serde(default)]
    password: Option<String>,
    /// One's own password, to change it (a session left open is not enough).
    #[serde(default)]
    current_password: Option<String>,
    #[serde(default)]
    quota: Option<Quota>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewServer {
    /// Its client address, host:port.
    address: String,
    /// The join token it shows.
    token: String,
}

/// The most VMs a page of the VM list holds (`GET /api/v1/vms?limit=N`).
pub(crate) const MAX_PAGE: u64 = 1000;

/// The largest ISO image taken: 64 GiB.
pub(crate) const MAX_ISO: u64 = 64 << 30;
/// The largest OVA taken, bytes.
pub(crate) const MAX_OVA: u64 = 256 << 30;

/// How long a server waits for what another server has just committed (a session, a user).
const ARRIVAL: std::time::Duration = std::time::Duration::from_millis(500);

impl App {
    /// The service over `cluster`.
    pub fn new(cfg: WebConfig, cluster: Cluster) -> App {
        App {
            cfg,
            cluster,
            logins: RateLimit::default(),
            hashes: tokio::sync::Semaphore::new(auth::HASHES_AT_ONCE),
            consoles: console::Slots::default(),
            pace: crate::pace::Pace::default(),
            uploads: crate::imports::Uploads::default(),
        }
    }

    /// Runs a password hash or check `f` once a hashing permit is free: 503 if none was free
    /// for 10 s (the server is busy with others).
    async fn hash<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        auth::hash_bounded(&self.hashes, std::time::Duration::from_secs(10), f)
            .await
            .ok_or_else(|| ApiError::unavailable("too many password checks at once: try again"))
    }

    /// Answers one request.
    pub async fn route(&self, mut req: Request) -> Result<Response<Body>, ApiError> {
        if !crate::assets::is_api(&req.path) {
            return crate::assets::serve(&req);
        }
        let path = req.path.trim_end_matches('/').to_string();
        let Some(rest) = path.strip_prefix("/api/v1") else {
            return Err(ApiError::not_found(format!("no page {}", req.path)));
        };
        let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
        let m = req.method.clone();
        match (m, parts.as_slice()) {
            (Method::GET, ["openapi.json"]) => Ok(ok(&openapi::document())),
            (Method::POST, ["session"]) => self.login(&req).await,
            (Method::GET, ["session"]) => {
                let c = self.caller(&req, false).await?;
                Ok(ok(&json!({
                    "user": views::user(&c.state, &c.user),
                    "csrf_token": c.session.csrf,
                    "expires_ms": c.session.expires_ms,
                })))
            }
            (Method::DELETE, ["session"]) => {
                let c = self.caller(&req, true).await?;
                self.cluster
                    .act(
                        c.user.id,
                        Action::Logout {
                            token_hash: c.session.token_hash.clone(),
                        },
                    )
                    .await?;
                let mut r = ok(&json!({ "logged_out": true }));
                self.cookie(&mut r, None, req.secure);
                Ok(r)
            }
            (Method::GET, ["summary"]) => {
                let c = self.caller(&req, false).await?;
                self.summary(&c).await
            }
            (Method::GET, ["vms"]) => {
                let c = self.caller(&req, false).await?;
                let (after, limit) = (number_param(&req, "after")?, number_param(&req, "limit")?);
                if after.is_none() && limit.is_none() {
                    return Ok(ok(&views::vms(&c.state, &c.user)));
                }
                // A page: the client asks next after the last VMID it got, until a page is
                // shorter than its limit.
                let limit = match limit.unwrap_or(100) {
                    n @ 1..=MAX_PAGE => n as usize,
                    n => {
                        return Err(ApiError::bad_request(format!(
                            "limit={n}: 1 to {MAX_PAGE} VMs a page"
                        )))
                    }
                };
                Ok(ok(&views::vms_page(
                    &c.state,
                    &c.user,
                    after.unwrap_or(0),
                    limit,
                )))
            }
            (Method::POST, ["vms"]) => {
                let c = self.caller(&req, true).await?;
                self.create_vm(&c, &req).await
            }
            (Method::GET, ["vms", id]) => {
                let c = self.caller(&req, false).await?;
                let vm = self.visible_vm(&c, id)?;
                Ok(ok(&views::vm(&c.state, vm, &c.user)))
            }
            (Method::POST, ["vms", id, "power"]) => {
                let c = self.caller(&req, true).await?;
                let vm = self.visible_vm(&c, id)?.id;
                let action = asked(&c, &req, Ask::Power { vm })?;
                let power = match &action {
                    Action::PowerVm { running, force, .. } => PowerAction::of(*running, *force),
                    _ => unreachable!("a power body asks for a power action"),
                };
                self.cluster.act(c.user.id, action).await?;
                Ok(json_response(
                    StatusCode::ACCEPTED,
                    &json!({ "id": vm, "power": power }),
                ))
            }
            (Method::POST, ["vms", id, "copy-back"]) => {
                let c = self.caller(&req, true).await?;
                let vm = self.visible_vm(&c, id)?.id;
                let action = asked(&c, &req, Ask::CopyBack { vm })?;
                let r = self.cluster.act(c.user.id, action).await?;
                let task = r.get("task").and_then(Value::as_u64).unwrap_or(0);
                let view = self.task_view(task, &c.user).await?;
                Ok(json_response(StatusCode::ACCEPTED, &view))
            }
            (Method::POST, ["vms", id, "backup"]) => {
                let c = self.caller(&req, true).await?;
                let v = self.visible_vm(&c, id)?;
                let ask = Ask::Backup {
                    vm: v.id,
                    vm_name: &v.name,
                    now_ms: now_ms(),
                };
                let action = asked(&c, &req, ask)?;
                let r = self.cluster.act(c.user.id, action).await?;
                let task = r.get("task").and_then(Value::as_u64).unwrap_or(0);
                let view = self.task_view(task, &c.user).await?;
                Ok(json_response(StatusCode::ACCEPTED, &view))
            }
            (Method::POST, ["vms", id, "backup-schedule"]) => {
                let c = self.caller(&req, true).await?;
                let vm = self.visible_vm(&c, id)?.id;
                let action = asked(&c, &req, Ask::BackupSchedule { vm })?;
                self.cluster.act(c.user.id, action).await?;
                Ok(ok(&self.vm_view(vm, &c.user).await?))
            }
            (Method::GET, ["tasks"]) => {
                let c = self.caller(&req, false).await?;
                Ok(ok(&views::tasks(&c.state, &c.user)))
            }
            (Method::POST, ["tasks", id, "cancel"]) => {
                let c = self.caller(&req, true).await?;
                let n: u64 = id
                    .parse()
                    .map_err(|_| ApiError::bad_request(format!("task {id:?}: a number")))?;
                if !views::tasks(&c.state, &c.user).iter().any(|t| t.id == n) {
                    return Err(ApiError::not_found(format!("no task {n}")));
                }
                self.cluster
                    .act(c.user.id, Action::CancelTask { id: n })
                    .await?;
                Ok(ok(&self.task_view(n, &c.user).await?))
            }
            (Method::POST, ["vms", id, "clone"]) => {
                let c = self.caller(&req, true).await?;
                let vm = self.visible_vm(&c, id)?.id;
                let action = asked(&c, &req, Ask::Clone { vm })?;
                let r = self.cluster.act(c.user.id, action).await?;
                self.created_vm(&r, &c.user).await
            }
            (Method::POST, ["vms", id, "migrate"]) => {
                let c = self.caller(&req, true).await?;
                let vm = self.visible_vm(&c, id)?.id;
                manager_only(&c)?;
                let action = asked(&c, &req, Ask::Migrate { vm })?;
                let r = self.cluster.act(c.user.id, action).await?;
                // Live (the agents carry it on), or restarted there and why.
                Ok(json_response(
                    StatusCode::ACCEPTED,
                    &json!({
                        "id": vm,
                        "server": r.get("server"),
                        "live": r.get("live"),
                        "why": r.get("why"),
                    }),
                ))
            }
            (Method::POST, ["vms", id, "migrate", "cancel"]) => {
                let c = self.caller(&req, true).await?;
                let vm = self.visible_vm(&c, id)?.id;
                manager_only(&c)?;
                self.cluster
                    .act(c.user.id, Action::CancelMigration { vm })
                    .await?;
                Ok(json_response(StatusCode::ACCEPTED, &json!({ "id": vm })))
            }
            (Method::GET, ["vms", id, "console", kind]) => {
                let kind = console::kind(kind)?;
                let c = self.caller(&req, false).await?;
                let vm = self.visible_vm(&c, id)?;
                let accept = console::check_handshake(&req)?;
                let slot = self.consoles.take(c.user.id)?;
                let (server, address) = self.vmm_server(&c.state, vm)?;
                let peers = self.cluster.peers();
                let stream = console::connect(&peers, &address, server, &vm.name, kind).await?;
                // Who opened which VM's console goes into the audit log.
                self.cluster
                    .act(
                        c.user.id,
                        Action::OpenConsole {
                            vm: vm.id,
                            console: kind.name().into(),
                        },
                    )
                    .await?;
                console::upgrade(
                    &mut req,
                    accept,
                    stream,
                    vm.name.clone(),
                    c.user.name.clone(),
                    slot,
                )
            }
            (Method::POST, ["vms", id, "cdrom"]) => {
                let c = self.caller(&req, true).await?;
                let vm = self.visible_vm(&c, id)?.id;
                let action = asked(&c, &req, Ask::Cdrom { vm })?;
                let iso = match &action {
                    Action::SetCdrom { iso, .. } => iso.clone(),
                    _ => unreachable!("a CD-ROM body asks for a CD-ROM action"),
                };
                self.cluster.act(c.user.id, action).await?;
                Ok(ok(&json!({ "id": vm, "cdrom": iso })))
            }
            (Method::GET, ["networks"]) => {
                let c = self.caller(&req, false).await?;
                Ok(ok(&views::networks(&c.state, &c.user)))
            }
            (Method::POST, ["networks"]) => {
                let c = self.caller(&req, true).await?;
                manager_only(&c)?;
                let action = asked(&c, &req, Ask::CreateNetwork)?;
                let name = match &action {
                    Action::CreateNetwork { network } => network.name.clone(),
                    _ => unreachable!("a network body asks for a new network"),
                };
                self.cluster.act(c.user.id, action).await?;
                let state = self.cluster.state().await?;
                let view = views::networks(&state, &c.user)
                    .into_iter()
                    .find(|v| v.name == name)
                    .ok_or_else(|| ApiError::unavailable(format!("network {name} is gone")))?;
                Ok(json_response(StatusCode::CREATED, &view))
            }
            (Method::DELETE, ["networks", name]) => {
                let c = self.caller(&req, true).await?;
                manager_only(&c)?;
                self.cluster
                    .act(
                        c.user.id,
                        Action::DeleteNetwork {
                            name: name.to_string(),
                        },
                    )
                    .await?;
                Ok(ok(&json!({ "deleted": name })))
            }
            (Method::GET, ["isos"]) => {
                let c = self.caller(&req, false).await?;
                Ok(ok(&views::isos(&c.state, &c.user)))
            }
            (Method::PUT, ["isos", name]) => {
                let r = self.upload_iso(&mut req, name.to_string()).await;
                if r.is_err() {
                    crate::http::drain_upload(&mut req).await;
                }
                r
            }
            (Method::DELETE, ["isos", name]) => {
                let c = self.caller(&req, true).await?;
                manager_only(&c)?;
                self.cluster
                    .act(
                        c.user.id,
                        Action::DeleteIso {
                            name: name.to_string(),
                        },
                    )
                    .await?;
                Ok(ok(&json!({ "deleted": name })))
            }
            (Method::POST, ["uploads"]) => self.open_upload(&req).await,
            (Method::GET, ["uploads", id]) => self.upload_status(&req, id).await,
            (Method::PATCH, ["uploads", id]) => {
                let r = self.upload_part(&mut req, id).await;
                if r.is_err() {
                    crate::http::drain_upload(&mut req).await;
                }
                r
            }
            (Method::DELETE, ["uploads", id]) => self.close_upload(&req, id).await,
            (Method::GET, ["appliances"]) => {
                let c = self.caller(&req, false).await?;
                Ok(ok(&views::appliances(&c.state, &c.user)))
            }
            (Method::PUT, ["appliances", name]) => {
                let r = self.import_appliance(&mut req, name.to_string()).await;
                if r.is_err() {
                    crate::http::drain_upload(&mut req).await;
                }
                r
            }
            (Method::PATCH, ["appliances", name]) => {
                let c = self.caller(&req, true).await?;
                manager_only(&c)?;
                let action = asked(&c, &req, Ask::EditAppliance { name })?;
                self.cluster.act(c.user.id, action).await?;
                self.appliance_view(name, &c.user).await
            }
            (Method::DELETE, ["appliances", name]) => {
                let c = self.caller(&req, true).await?;
                manager_only(&c)?;
                self.cluster
                    .act(
                        c.user.id,
                        Action::DeleteAppliance {
                            name: name.to_string(),
                        },
                    )
                    .await?;
                Ok(ok(&json!({ "deleted": name })))
            }
            (Method::POST, ["appliances", name, "download"]) => {
                let c = self.caller(&req, true).await?;
                manager_only(&c)?;
                let here = self.cluster.id();
                let action = asked(&c, &req, Ask::Download { name, here })?;
                let r = self.cluster.act(c.user.id, action).await?;
                let task = r.get("task").and_then(Value::as_u64).unwrap_or(0);
                let view = self.task_view(task, &c.user).await?;
                Ok(json_response(StatusCode::ACCEPTED, &view))
            }
            (Method::GET, ["appliance-directory"]) => {
                let c = self.caller(&req, false).await?;
                manager_only(&c)?;
                let url = req
                    .param("url")
                    .ok_or_else(|| ApiError::bad_request("give the directory's ?url="))?;
                state_machine::check_download_url(&url)
                    .map_err(|r| ApiError::bad_request(r.reason))?;
                let entries =
                    tokio::task::spawn_blocking(move || control::download::catalogue(&url))
                        .await
                        .map_err(|e| {
                            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}"))
                        })?
                        .map_err(|why| ApiError::new(StatusCode::BAD_GATEWAY, why))?;
                let listed: Vec<Value> = entries
                    .into_iter()
                    .map(|e| {
                        let held = c.state.appliances.contains_key(&e.name);
                        json!({
                            "name": e.name,
                            "description": e.description,
                            "size": e.size,
                            "sha256": e.sha256,
                            "url": e.url,
                            "in_library": held,
                        })
                    })
                    .collect();
                Ok(ok(&listed))
            }
            (Method::GET, ["appliances", name, "ova"]) => {
                let c = self.caller(&req, false).await?;
                manager_only(&c)?;
                self.export_appliance(&c, name).await
            }
            (Method::PATCH, ["vms", id]) => {
                let c = self.caller(&req, true).await?;
                let vm = self.visible_vm(&c, id)?.id;
                let action = asked(&c, &req, Ask::EditVm { vm })?;
                self.cluster.act(c.user.id, action).await?;
                Ok(ok(&self.vm_view(vm, &c.user).await?))
            }
            (Method::DELETE, ["vms", id]) => {
                let c = self.caller(&req, true).await?;
                let vm = self.visible_vm(&c, id)?.id;
                self.cluster.act(c.user.id, Action::DeleteVm { vm }).await?;
                Ok(ok(&json!({ "deleted": vm })))
            }
            (Method::GET, ["users"]) => {
                let c = self.caller(&req, false).await?;
                Ok(ok(&views::users(&c.state, &c.user)))
            }
            (Method::POST, ["users"]) => {
                let c = self.caller(&req, true).await?;
                self.create_user(&c, &req).await
            }
            (Method::GET, ["users", id]) => {
                let c = self.caller(&req, false).await?;
                let u = self.visible_user(&c, id)?;
                Ok(ok(&views::user(&c.state, u)))
            }
            (Method::PATCH, ["users", id]) => {
                let c = self.caller(&req, true).await?;
                self.change_user(&c, id, &req).await
            }
            (Method::DELETE, ["users", id]) => {
                let c = self.caller(&req, true).await?;
                let user = self.visible_user(&c, id)?.id;
                if c.user.role == Role::Regular {
                    return Err(ApiError::forbidden("a Regular User deletes no users"));
                }
                self.cluster
                    .act(c.user.id, Action::DeleteUser { user })
                    .await?;
                Ok(ok(&json!({ "deleted": user })))
            }
            (Method::GET, ["servers"]) => {
                let c = self.caller(&req, false).await?;
                manager_only(&c)?;
                let leader = self.cluster.status().await?.leader;
                Ok(ok(&views::servers(&c.state, leader)))
            }
            (Method::GET, ["servers", "join"]) => {
                let c = self.caller(&req, false).await?;
                manager_only(&c)?;
                let (address, token) = self.cluster.join_info().await?;
                // The token lets a machine into the cluster: who read it is on record.
                self.cluster
                    .act(
                        c.user.id,
                        Action::Note {
                            action: "server.join-info".into(),
                            target: "the cluster's join token".into(),
                        },
                    )
                    .await?;
                Ok(ok(&json!({ "address": address, "token": token })))
            }
            (Method::POST, ["servers"]) => {
                let c = self.caller(&req, true).await?;
                manager_only(&c)?;
                let body: NewServer = req.json()?;
                if body.address.trim().is_empty() || body.token.trim().is_empty() {
                    return Err(ApiError::bad_request(
                        "a new server's address and join token (its DATA/join-token)",
                    ));
                }
                let id = self
                    .cluster
                    .add_server(body.address.trim(), body.token.trim())
                    .await?;
                self.cluster
                    .act(
                        c.user.id,
                        Action::Note {
                            action: "server.add".into(),
                            target: format!("server {id} ({})", body.address.trim()),
                        },
                    )
                    .await?;
                let state = self.cluster.state().await?;
                let leader = self.cluster.status().await?.leader;
                let view = views::servers(&state, leader)
                    .into_iter()
                    .find(|s| s.id == id);
                Ok(json_response(StatusCode::CREATED, &view))
            }
            (Method::POST, ["servers", id, "drain"]) => {
                let c = self.caller(&req, true).await?;
                manager_only(&c)?;
                let id = server_id(&c, id)?;
                let r = self
                    .cluster
                    .act(c.user.id, Action::DrainServer { id })
                    .await?;
                Ok(json_response(
                    StatusCode::ACCEPTED,
                    &json!({ "id": id, "disks_moved": r.get("disks_moved") }),
                ))
            }
            (Method::DELETE, ["servers", id]) => {
                let c = self.caller(&req, true).await?;
                manager_only(&c)?;
                let id = server_id(&c, id)?;
                if let Some(d) =
                    c.state.disks.values().find(|d| {
                        d.primary == id || d.backup == Some(id) || d.pools.contains_key(&id)
                    })
                {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        format!(
                            "server {id} holds a copy of disk {}: drain it first",
                            d.name
                        ),
                    ));
                }
                if c.state.servers.len() <= 1 {
                    return Err(ApiError::new(StatusCode::CONFLICT, "the last server stays"));
                }
                let address = c.state.servers[&id].address.clone();
                self.cluster.remove_server(id).await?;
                self.cluster
                    .act(
                        c.user.id,
                        Action::Note {
                            action: "server.remove".into(),
                            target: format!("server {id} ({address})"),
                        },
                    )
                    .await?;
                Ok(ok(&json!({ "removed": id })))
            }
            (Method::GET, ["audit"]) => {
                let c = self.caller(&req, false).await?;
                manager_only(&c)?;
                let limit = number_param(&req, "limit")?.unwrap_or(100).min(1000) as usize;
                // `newest`: the last entries (a first page); `after`: what came since a seq.
                let entries: Vec<AuditEntry> = match number_param(&req, "newest")? {
                    Some(n) => {
                        let mut v: Vec<_> = c
                            .state
                            .audit
                            .values()
                            .rev()
                            .take(n.min(1000) as usize)
                            .cloned()
                            .collect();
                        v.reverse();
                        v
                    }
                    None => {
                        let after = number_param(&req, "after")?.unwrap_or(0);
                        // Entries older than the state keeps come from the archive first.
                        let kept = c.state.audit.keys().next().copied().unwrap_or(u64::MAX);
                        let mut v = Vec::new();
                        if after.saturating_add(1) < kept {
                            v = self.cluster.archived_audit(after, limit as u64).await?;
                        }
                        let after = v.last().map_or(after, |e| e.seq);
                        let left = limit - v.len();
                        v.extend(
                            c.state
                                .audit
                                .range(after.saturating_add(1)..)
                                .take(left)
                                .map(|(_, e)| e.clone()),
                        );
                        v
                    }
                };
                Ok(ok(&entries))
            }
            (
                _,
                ["openapi.json" | "session" | "summary" | "vms" | "users" | "servers" | "audit"
                | "isos" | "appliances" | "uploads" | "tasks" | "networks", ..],
            ) => {
                let known = openapi::known_path(&parts);
                if known {
                    Err(ApiError::new(
                        StatusCode::METHOD_NOT_ALLOWED,
                        format!("{} is not allowed on {}", req.method, req.path),
                    ))
                } else {
                    Err(ApiError::not_found(format!("no endpoint {}", req.path)))
                }
            }
            _ => Err(ApiError::not_found(format!("no endpoint {}", req.path))),
        }
    }

    /// Sets (or clears) the session cookie; `Secure` over HTTPS.
    fn cookie(&self, r: &mut Response<Body>, token: Option<&str>, secure: bool) {
        let v = auth::set_cookie(token, self.cfg.session_ttl, secure);
        if let Ok(v) = HeaderValue::from_str(&v) {
            r.headers_mut().insert(SET_COOKIE, v);
        }
    }

    /// How long a request's parts may take to arrive (the web timeout).
    pub fn timeout(&self) -> std::time::Duration {
        self.cfg.timeout
    }

    /// The logged-in caller, and for a change (`change`), its CSRF token checked.
    pub(crate) async fn caller(&self, req: &Request, change: bool) -> Result<Caller, ApiError> {
        let token = auth::session_cookie(req.header("cookie"))
            .ok_or_else(|| ApiError::unauthorized("not logged in"))?;
        let hash = auth::token_hash(token);
        // A session opened through another server may take a moment to arrive here.
        let state = self
            .cluster
            .state_where(ARRIVAL, |s| s.sessions.contains_key(&hash))
            .await?;
        let session = state
            .sessions
            .get(&hash)
            .cloned()
            .ok_or_else(|| ApiError::unauthorized("not logged in: no such session"))?;
        if session.expires_ms <= now_ms() {
            return Err(ApiError::unauthorized("the session expired: log in again"));
        }
        let user = state
            .users
            .get(&session.user)
            .cloned()
            .ok_or_else(|| ApiError::unauthorized("the session's user was deleted"))?;
        self.pace.take(user.id).map_err(|wait| {
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "more than {} requests a second: try again in {wait} s",
                    crate::pace::RATE
                ),
            );
            e.retry_after = Some(wait);
            e
        })?;
        if change {
            let sent = req.header("x-csrf-token").unwrap_or("");
            if sent.is_empty() {
                return Err(ApiError::forbidden("missing CSRF token (X-CSRF-Token)"));
            }
            if !auth::same(sent, &session.csrf) {
                return Err(ApiError::forbidden(
                    "stale or wrong CSRF token (X-CSRF-Token)",
                ));
            }
        }
        Ok(Caller {
            user,
            session,
            state,
        })
    }

    async fn login(&self, req: &Request) -> Result<Response<Body>, ApiError> {
        let l: Login = req.json()?;
        let ip = req.peer.ip();
        let attempt = self.logins.begin(&l.name, ip).map_err(|wait| {
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("too many failed logins: try again in {wait} s"),
            );
            e.retry_after = Some(wait);
            e
        })?;
        // A user created through another server may take a moment to arrive here.
        let user = self
            .cluster
            .state_where(ARRIVAL, |s| s.user_by_name(&l.name).is_some())
            .await?
            .user_by_name(&l.name)
            .cloned();
        let hash = user.as_ref().map(|u| u.password.clone());
        let password = l.password.clone();
        let good = self
            .hash(move || auth::verify_password(&password, hash.as_deref()))
            .await?;
        let Some(user) = user.filter(|_| good) else {
            tracing::info!(name = %l.name, %ip, "failed login");
            return Err(ApiError::unauthorized("wrong name or password"));
        };
        self.logins.succeeded(&l.name, ip, attempt);
        let token = auth::new_token();
        let now = now_ms();
        let session = SessionRecord {
            token_hash: auth::token_hash(&token),
            user: user.id,
            csrf: auth::new_token(),
            created_ms: now,
            expires_ms: now + self.cfg.session_ttl.as_millis() as u64,
        };
        let csrf = session.csrf.clone();
        let expires_ms = session.expires_ms;
        self.cluster.act(user.id, Action::Login { session }).await?;
        let state = self.cluster.state().await?;
        let mut r = ok(&json!({
            "user": views::user(&state, &user),
            "csrf_token": csrf,
            "expires_ms": expires_ms,
        }));
        self.cookie(&mut r, Some(&token), req.secure);
        Ok(r)
    }

    async fn summary(&self, c: &Caller) -> Result<Response<Body>, ApiError> {
        // Each VM's status and replication only, not its whole view.
        let vms: Vec<(VmStatus, ReplicationState)> = views::visible_vms(&c.state, &c.user)
            .map(|v| {
                (
                    views::vm_status(&c.state, v),
                    views::vm_replication(&c.state, v).state,
                )
            })
            .collect();
        let count =
            |f: &dyn Fn(&(VmStatus, ReplicationState)) -> bool| vms.iter().filter(|v| f(v)).count();
        let mut s = json!({
            "vms": {
                "total": vms.len(),
                "running": count(&|v| v.0 == VmStatus::Running),
                "stopped": count(&|v| v.0 == VmStatus::Stopped),
            },
            "replication": {
                "in_sync": count(&|v| v.1 == ReplicationState::InSync),
                "resyncing": count(&|v| v.1 == ReplicationState::Resyncing),
                "degraded": count(&|v| v.1 == ReplicationState::Degraded),
            },
        });
        if c.user.role == Role::Manager {
            let st = self.cluster.status().await?;
            let servers = &c.state.servers;
            s["servers"] = json!({
                "total": servers.len(),
                "down": servers.values().filter(|s| s.down).count(),
                "leader": st.leader,
                "serving": self.cluster.id(),
            });
            s["users"] = json!(c.state.users.len());
        }
        Ok(ok(&s))
    }

    /// The VM with VMID `id` if the caller may see it; 404 otherwise.
    fn visible_vm<'a>(
        &self,
        c: &'a Caller,
        id: &str,
    ) -> Result<&'a control::state_machine::VmRecord, ApiError> {
        let n: u64 = id
            .parse()
            .map_err(|_| ApiError::bad_request(format!("VMID {id:?}: a number")))?;
        c.state
            .vm_by_id(n)
            .filter(|vm| access::may_operate_vm(&c.state, &c.user, vm))
            .ok_or_else(|| ApiError::not_found(format!("no VM {n}")))
    }

    /// The server that runs VM `vm`'s VMM (its disks' primary) and its client address; 409
    /// when the VM is off or its server is down.
    fn vmm_server(
        &self,
        state: &StateMachine,
        vm: &control::state_machine::VmRecord,
    ) -> Result<(u64, String), ApiError> {
        let conflict = |why: String| ApiError::new(StatusCode::CONFLICT, why);
        if !vm.running {
            return Err(conflict(format!(
                "VM {} is off: power it on first",
                vm.name
            )));
        }
        let server = state
            .vm_primary(vm)
            .ok_or_else(|| conflict(format!("VM {} has no disk yet", vm.name)))?;
        match state.servers.get(&server) {
            Some(s) if !s.down => Ok((server, s.address.clone())),
            _ => Err(conflict(format!(
                "VM {}: its server {server} is down; it restarts on its backup",
                vm.name
            ))),
        }
    }

    /// Takes a Manager's ISO image upload: its body is written to this server's library as it
    /// arrives (hashed on the way), then added to the library as held here.
    async fn upload_iso(
        &self,
        req: &mut Request,
        name: String,
    ) -> Result<Response<Body>, ApiError> {
        let c = self.caller(req, true).await?;
        new_library_entry(&c, "ISO", &name, c.state.isos.contains_key(&name))?;
        let dir = self.cluster.library_dir();
        let started = std::time::Instant::now();
        let up = control::library::Upload::new(&dir, control::library::Shelf::Iso)
            .map_err(|e| storing(&format!("ISO {name}"), &dir, e))?;
        let up = self
            .receive(req, &format!("ISO {name}"), MAX_ISO, up, None)
            .await?;
        self.add_iso(&c, &name, up, started).await
    }

    /// Adds ISO `name`, whole in `up` (in this server's library), to the library as held here.
    pub(crate) async fn add_iso(
        &self,
        c: &Caller,
        name: &str,
        up: control::library::Upload,
        started: std::time::Instant,
    ) -> Result<Response<Body>, ApiError> {
        let dir = self.cluster.library_dir();
        let sealed = tokio::task::block_in_place(|| up.seal())
            .map_err(|e| storing(&format!("ISO {name}"), &dir, e))?;
        self.list_iso(c, name, &mut Some(sealed), started).await
    }

    /// Lists ISO `name`, whole and durable in `sealed` (in this server's library), as held
    /// here, and puts it in place; taken from `sealed` only once the cluster listed it.
    pub(crate) async fn list_iso(
        &self,
        c: &Caller,
        name: &str,
        sealed: &mut Option<control::library::Sealed>,
        started: std::time::Instant,
    ) -> Result<Response<Body>, ApiError> {
        let dir = self.cluster.library_dir();
        let (sha256, size) = match sealed {
            Some(s) => (s.sha256.clone(), s.size),
            None => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("ISO {name}: its file was taken"),
                ))
            }
        };
        tracing::info!(iso = %name, bytes = size, %sha256, ms = started.elapsed().as_millis() as u64, "ISO uploaded");
        self.cluster
            .act(
                c.user.id,
                Action::AddIso {
                    name: name.to_string(),
                    size,
                    sha256: sha256.clone(),
                    server: self.cluster.id(),
                },
            )
            .await?;
        // Listed now: in place, it is not taken for a deleted image's file.
        let sealed = sealed.take().expect("checked above");
        tokio::task::block_in_place(|| sealed.place())
            .map_err(|e| storing(&format!("ISO {name}"), &dir, e))?;
        Ok(json_response(
            StatusCode::CREATED,
            &json!({ "name": name, "size": size, "sha256": sha256, "server": self.cluster.id() }),
        ))
    }

    /// Task `id` as `viewer` sees it now (null when it may not).
    pub(crate) async fn task_view(
        &self,
        id: u64,
        viewer: &UserRecord,
    ) -> Result<Option<views::TaskView>, ApiError> {
        let state = self.cluster.state().await?;
        Ok(views::tasks(&state, viewer)
            .into_iter()
            .find(|t| t.id == id))
    }

    /// The view of appliance `name` as `viewer` sees it now (404 when it may not).
    pub(crate) async fn appliance_view(
        &self,
        name: &str,
        viewer: &UserRecord,
    ) -> Result<Response<Body>, ApiError> {
        let state = self.cluster.state().await?;
        views::appliances(&state, viewer)
            .into_iter()
            .find(|a| a.name == name)
            .map(|a| ok(&a))
            .ok_or_else(|| ApiError::not_found(format!("no appliance {name}")))
    }

    /// Takes a Manager's archive upload (an OVA, or the original product's zip): written to a
    /// work directory of this server's library and read as it arrives, then imported, its
    /// disks converted to raw images, by a task of this server (`imports`). Answers when the
    /// import ends: 201 with the appliance; a refused archive 422 with why, leaving nothing.
    async fn import_appliance(
        &self,
        req: &mut Request,
        name: String,
    ) -> Result<Response<Body>, ApiError> {
        let c = self.caller(req, true).await?;
        new_library_entry(
            &c,
            "appliance",
            &name,
            c.state.appliances.contains_key(&name),
        )?;
        crate::imports::imports_have_room(&c.state)?;
        let work = self.import_work()?;
        let started = std::time::Instant::now();
        let what = format!("appliance {name}");
        // The archive is read (its entries checked and hashed) as it arrives, on a thread of its
        // own, while it is written to a scratch file (neither hashed nor synced: only read, its
        // disks in place, by qemu-img); its stream-optimized VMDKs are decoded on the way.
        let packed = req
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(MAX_OVA);
        let up = control::library::Upload::scratch(work.path())
            .map_err(|e| storing(&what, work.path(), e))?;
        let reader = crate::imports::Reader::start(packed, self.unpack_into(&work, &up));
        let received = self
            .receive(req, &what, MAX_OVA, up, Some(&reader.tee))
            .await;
        let arrived = reader.finish().await;
        let up = match received {
            Ok(up) => up,
            // The reader stopped first: its reason is the upload's.
            Err(e) if e.status == StatusCode::UNPROCESSABLE_ENTITY => {
                return Err(match arrived {
                    Err(why) => crate::imports::ova_failure(&what, why),
                    Ok(_) => e,
                })
            }
            Err(e) => return Err(e),
        };
        let arrived = arrived.map_err(|e| crate::imports::ova_failure(&what, e))?;
        let archive = tokio::task::block_in_place(|| up.seal())
            .map_err(|e| storing(&what, work.path(), e))?;
        let (task, done) = self
            .start_import(&c, &name, &mut Some((work, archive, arrived)), started)
            .await?;
        // This request answers when its task ends.
        done.await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("{what}: the import stopped: {e}"),
                )
            })?
            .map_err(|e| crate::imports::ova_failure(&what, e))?;
        let state = self
            .cluster
            .state_where(std::time::Duration::from_secs(10), |s| {
                s.tasks
                    .get(&task)
                    .is_none_or(|t| t.state != control::state_machine::TaskState::Running)
            })
            .await?;
        if let Some(control::state_machine::TaskState::Failed { reason, .. }) =
            state.tasks.get(&task).map(|t| &t.state)
        {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("{what}: {reason}"),
            ));
        }
        let mut r = self.appliance_view(&name, &c.user).await?;
        *r.status_mut() = StatusCode::CREATED;
        Ok(r)
    }

    /// Answers appliance `name` as an OVA (OVF 2.0, stream-optimized VMDKs), made on this
    /// server from its copies of the disk images, streamed as it is read.
    async fn export_appliance(&self, c: &Caller, name: &str) -> Result<Response<Body>, ApiError> {
        let a = c
            .state
            .appliances
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no appliance {name}")))?;
        let dir = self.cluster.library_dir();
        let internal = |what: String| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, what);
        if !a.servers.contains(&self.cluster.id()) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("appliance {name}: this server has no copy of its disks yet; ask again shortly, or ask a server that holds them"),
            ));
        }
        let work = control::library::WorkDir::new(&dir)
            .map_err(|e| internal(format!("a work directory in {}: {e}", dir.display())))?;
        let out = work.path().join(format!("{name}.ova"));
        let (w, o, who) = (work.path().to_path_buf(), out.clone(), name.to_string());
        tokio::task::spawn_blocking(move || {
            let progress = |step: String| tracing::info!(appliance = %who, %step, "export");
            control::ova::export(&a, &dir, &w.join("parts"), &o, &progress)
        })
        .await
        .map_err(|e| internal(format!("exporting appliance {name}: {e}")))?
        .map_err(|e| internal(format!("exporting appliance {name}: {e}")))?;
        let file = std::fs::File::open(&out)
            .map_err(|e| internal(format!("exporting appliance {name}: {e}")))?;
        let length = file
            .metadata()
            .map_err(|e| internal(format!("exporting appliance {name}: {e}")))?
            .len();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let who = name.to_string();
        std::thread::Builder::new()
            .name("ova-export".into())
            .spawn(move || {
                use std::io::Read;
                // The work directory (and the archive) goes when the last chunk is sent.
                let _work = work;
                let mut file = file;
                let mut sent = 0u64;
                loop {
                    let mut buf = vec![0u8; 1 << 20];
                    let n = match file.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) => {
                            let _ = tx.blocking_send(Err(e));
                            break;
                        }
                    };
                    buf.truncate(n);
                    if tx.blocking_send(Ok(bytes::Bytes::from(buf))).is_err() {
                        tracing::info!(appliance = %who, sent, of = length, "OVA download given up by the client");
                        return;
                    }
                    sent += n as u64;
                }
                tracing::info!(appliance = %who, bytes = sent, "OVA sent");
            })
            .map_err(|e| internal(format!("exporting appliance {name}: {e}")))?;
        let mut r = Response::new(crate::http::stream(rx));
        let h = r.headers_mut();
        h.insert(
            hyper::header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-tar"),
        );
        h.insert(hyper::header::CONTENT_LENGTH, HeaderValue::from(length));
        if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}.ova\"")) {
            h.insert(hyper::header::CONTENT_DISPOSITION, v);
        }
        Ok(r)
    }

    /// Receives an upload's body (`what`, at most `max` bytes, its Content-Length exact) into
    /// new file `up`, each part also sent to `tee` if given; each part must come within the web
    /// timeout.
    async fn receive(
        &self,
        req: &mut Request,
        what: &str,
        max: u64,
        mut up: control::library::Upload,
        tee: Option<&std::sync::mpsc::SyncSender<bytes::Bytes>>,
    ) -> Result<control::library::Upload, ApiError> {
        let length = crate::imports::content_length(req)?;
        if length > max {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("{what}: {length} bytes is over the {max}-byte limit"),
            ));
        }
        if length == 0 {
            return Err(ApiError::bad_request(format!("{what} is empty")));
        }
        let mut body = req
            .stream
            .take()
            .ok_or_else(|| ApiError::bad_request("no upload body"))?;
        let mut kept = 0;
        crate::imports::pour(
            &mut body,
            what,
            length,
            &mut up,
            tee,
            self.cfg.timeout,
            &mut kept,
        )
        .await?;
        Ok(up)
    }

    /// The user `id` if the caller may see it; 404 otherwise.
    fn visible_user<'a>(&self, c: &'a Caller, id: &str) -> Result<&'a UserRecord, ApiError> {
        let n: u64 = id
            .parse()
            .map_err(|_| ApiError::bad_request(format!("user id {id:?}: a number")))?;
        c.state
            .users
            .get(&n)
            .filter(|u| access::may_see_user(&c.user, u))
            .ok_or_else(|| ApiError::not_found(format!("no user {n}")))
    }

    async fn create_vm(&self, c: &Caller, req: &Request) -> Result<Response<Body>, ApiError> {
        let ask = Ask::CreateVm {
            guest: &self.cfg.guest,
        };
        let action = asked(c, req, ask)?;
        let r = self.cluster.act(c.user.id, action).await?;
        self.created_vm(&r, &c.user).await
    }

    /// 201 with the view of the VM a create or clone answered `r` for.
    async fn created_vm(&self, r: &Value, viewer: &UserRecord) -> Result<Response<Body>, ApiError> {
        let id = r.get("id").and_then(Value::as_u64).unwrap_or(0);
        Ok(json_response(
            StatusCode::CREATED,
            &self.vm_view(id, viewer).await?,
        ))
    }

    /// The view of VM `id` as the state now is, as `viewer` sees it (just `{"id"}` if it is
    /// gone).
    async fn vm_view(&self, id: u64, viewer: &UserRecord) -> Result<Value, ApiError> {
        let state = self.cluster.state().await?;
        Ok(state
            .vm_by_id(id)
            .map(|vm| serde_json::to_value(views::vm(&state, vm, viewer)).unwrap_or(Value::Null))
            .unwrap_or(json!({ "id": id })))
    }

    async fn create_user(&self, c: &Caller, req: &Request) -> Result<Response<Body>, ApiError> {
        let u = bodies::new_user(req.json_body()?, asker(c))?;
        let password = u.password.clone();
        let hash = self
            .hash(move || auth::hash_password(&password))
            .await?
            .map_err(ApiError::unavailable)?;
        let r = self
            .cluster
            .act(
                c.user.id,
                Action::CreateUser {
                    name: u.name,
                    role: u.role,
                    password: hash,
                    parent: u.parent,
                    quota: u.quota,
                },
            )
            .await?;
        let id = r.get("id").and_then(Value::as_u64).unwrap_or(0);
        let state = self.cluster.state().await?;
        let view = state
            .users
            .get(&id)
            .map(|u| serde_json::to_value(views::user(&state, u)).unwrap_or(Value::Null))
            .unwrap_or(json!({ "id": id }));
        Ok(json_response(StatusCode::CREATED, &view))
    }

    async fn change_user(
        &self,
        c: &Caller,
        id: &str,
        req: &Request,
    ) -> Result<Response<Body>, ApiError> {
        let target = self.visible_user(c, id)?.clone();
        let ch: UserChange = req.json()?;
        if ch.password.is_none() && ch.quota.is_none() {
            return Err(ApiError::bad_request(
                "nothing to change: password or quota",
            ));
        }
        let own = target.id == c.user.id;
        if !own && !access::may_manage_user(&c.user, &target) {
            return Err(ApiError::forbidden(format!("user {}", target.id)));
        }
        if ch.quota.is_some() && c.user.role != Role::Manager {
            return Err(ApiError::forbidden("only a Manager sets quotas"));
        }
        if let Some(p) = &ch.password {
            auth::check_password(p).map_err(ApiError::bad_request)?;
        }
        if own && ch.password.is_some() {
            // As a login: counted before its check, against the name and the address.
            let current = ch.current_password.clone().ok_or_else(|| {
                ApiError::bad_request("changing your password takes your current one too")
            })?;
            let ip = req.peer.ip();
            let attempt = self.logins.begin(&target.name, ip).map_err(|wait| {
                let mut e = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("too many wrong passwords: try again in {wait} s"),
                );
                e.retry_after = Some(wait);
                e
            })?;
            let hash = target.password.clone();
            let good = self
                .hash(move || auth::verify_password(&current, Some(&hash)))
                .await?;
            if !good {
                return Err(ApiError::forbidden("your current password is not that"));
            }
            self.logins.succeeded(&target.name, ip, attempt);
        }
        if let Some(q) = ch.quota {
            self.cluster
                .act(
                    c.user.id,
                    Action::SetQuota {
                        user: target.id,
                        quota: q,
                    },
                )
                .await?;
        }
        if let Some(p) = ch.password {
            let hash = self
                .hash(move || auth::hash_password(&p))
                .await?
                .map_err(ApiError::unavailable)?;
            self.cluster
                .act(
                    c.user.id,
                    Action::SetPassword {
                        user: target.id,
                        password: hash,
                        keep_session: own.then(|| c.session.token_hash.clone()),
                    },
                )
                .await?;
        }
        let state = self.cluster.state().await?;
        let u = state
            .users
            .get(&target.id)
            .ok_or_else(|| ApiError::not_found(format!("no user {}", target.id)))?;
        Ok(ok(&views::user(&state, u)))
    }
}

/// Creates the Manager `name` (as the cluster itself) unless a user of that name exists;
/// retries until the cluster has a leader.
pub async fn ensure_manager(app: Arc<App>, first: crate::FirstManager) {
    let crate::FirstManager {
        name,
        password,
        forget,
    } = first;
    let hash = match tokio::task::spawn_blocking(move || auth::hash_password(&password)).await {
        Ok(Ok(h)) => h,
        other => {
            tracing::error!(?other, "hashing the first Manager's password");
            return;
        }
    };
    loop {
        if let Ok(state) = app.cluster.state().await {
            if state.user_by_name(&name).is_some() {
                break;
            }
        }
        let action = Action::CreateUser {
            name: name.clone(),
            role: Role::Manager,
            password: hash.clone(),
            parent: None,
            quota: None,
        };
        match app.cluster.act(0, action).await {
            Ok(_) => {
                tracing::info!(manager = %name, "created the first Manager");
                break;
            }
            Err(e) => tracing::debug!(error = %e.message, "creating the first Manager; retrying"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    // The cluster holds the user (its password's hash): the password's file has done its work.
    if let Some(file) = forget {
        match std::fs::remove_file(&file) {
            Ok(()) => {
                tracing::info!(file = %file.display(), "deleted the first Manager's password file")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::error!(file = %file.display(), error = %e, "cannot delete the first Manager's password file")
            }
        }
    }
}

/// Server `id` of the state, or 404.
fn server_id(c: &Caller, id: &str) -> Result<u64, ApiError> {
    let n: u64 = id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("server id {id:?}: a number")))?;
    c.state
        .servers
        .contains_key(&n)
        .then_some(n)
        .ok_or_else(|| ApiError::not_found(format!("no server {n}")))
}

/// Whether `c` may add `what` `name` to the library (`exists`: the name is taken): a Manager,
/// a valid name, a free one.
pub(crate) fn new_library_entry(
    c: &Caller,
    what: &str,
    name: &str,
    exists: bool,
) -> Result<(), ApiError> {
    manager_only(c)?;
    access::check_name(what, name).map_err(ApiError::bad_request)?;
    if exists {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("{what} {name} exists: delete it first"),
        ));
    }
    Ok(())
}

/// The caller as the body checks see it.
fn asker(c: &Caller) -> Asker<'_> {
    Asker {
        user: &c.user,
        state: &c.state,
    }
}

/// The action a change's JSON body asks for at `ask`, checked (`bodies::action`).
fn asked(c: &Caller, req: &Request, ask: Ask<'_>) -> Result<Action, ApiError> {
    bodies::action(ask, req.json_body()?, asker(c))
}

pub(crate) fn manager_only(c: &Caller) -> Result<(), ApiError> {
    if c.user.role == Role::Manager {
        Ok(())
    } else {
        Err(ApiError::forbidden("Managers only"))
    }
}

fn number_param(req: &Request, name: &str) -> Result<Option<u64>, ApiError> {
    req.param(name)
        .map(|v| {
            v.parse()
                .map_err(|_| ApiError::bad_request(format!("{name}={v:?}: a number")))
        })
        .transpose()
}

/// The error for an upload's file that could not be made or stored in directory `dir`.
pub(crate) fn storing(what: &str, dir: &std::path::Path, e: std::io::Error) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("storing {what} in {}: {e}", dir.display()),
    )
}
