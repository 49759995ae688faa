//! Long operations: asked for by a person (`Action::CopyBack`), run by one server's agent,
//! which reports progress and the end (`Command::TaskProgress`, `Command::TaskEnded`); a task
//! whose server goes down fails. The VM a task works on stays as it is meanwhile.

use serde_json::{json, Value};

use super::keys::{appliance_key, json_bytes, task_key, COUNTERS_KEY};
use super::rights::Actor;
use super::{
    Acted, Action, ApplianceRecord, Outcome, RecordWrite, Refusal, StateMachine, TaskKind,
    TaskOutcome, TaskRecord, TaskState,
};
use crate::access::{self, Role};

/// Ended tasks kept in the state (the oldest go first).
pub const KEEP_ENDED_TASKS: usize = 100;

impl StateMachine {
    /// The running task that works on VM `vm` (VMID), if one does.
    pub fn vm_task(&self, vm: u64) -> Option<&TaskRecord> {
        self.tasks
            .values()
            .find(|t| t.state == TaskState::Running && t.kind.vm() == Some(vm))
    }

    /// How many tasks of a kind `of` says run now.
    pub fn running_tasks(&self, of: impl Fn(&TaskKind) -> bool) -> usize {
        self.tasks
            .values()
            .filter(|t| t.state == TaskState::Running && of(&t.kind))
            .count()
    }

    /// Refuses powering VM `vm` on while a task keeps it off (a copy back).
    pub(super) fn check_not_held_off(&self, vm: u64) -> Result<(), Refusal> {
        match self.vm_task(vm).filter(|t| t.kind.holds_vm_off()) {
            Some(_) => self.check_no_task(vm, "power it on"),
            None => Ok(()),
        }
    }

    /// Refuses a change to VM `vm` while a task works on it.
    pub(super) fn check_no_task(&self, vm: u64, what: &str) -> Result<(), Refusal> {
        match self.vm_task(vm) {
            Some(t) => Err(Refusal::conflict(format!(
                "VM {vm}: task {} is {}; {what} once it ends (or cancel it)",
                t.id,
                describe(&t.kind)
            ))),
            None => Ok(()),
        }
    }

    /// The running task `id` run by `server`.
    fn running_task(&mut self, id: u64, server: u64) -> Result<&mut TaskRecord, Refusal> {
        let t = self
            .tasks
            .get_mut(&id)
            .ok_or_else(|| Refusal::not_found(format!("no task {id}")))?;
        if t.server != server {
            return Err(Refusal::conflict(format!(
                "task {id} runs on server {}, not {server}",
                t.server
            )));
        }
        if t.state != TaskState::Running {
            return Err(Refusal::conflict(format!("task {id} has ended")));
        }
        Ok(t)
    }

    /// A task's server says how far it got (`Command::TaskProgress`).
    pub(super) fn task_progress(
        &mut self,
        id: u64,
        server: u64,
        done_bytes: u64,
        total_bytes: Option<u64>,
        writes: &mut Vec<RecordWrite>,
    ) -> Outcome {
        let t = self.running_task(id, server)?;
        let mut changed = false;
        // Learnt once, by a task that began without it.
        if let Some(total) = total_bytes.filter(|_| t.total_bytes == 0) {
            t.total_bytes = total;
            changed = true;
        }
        // Never backwards.
        if done_bytes > t.done_bytes {
            t.done_bytes = done_bytes.min(t.total_bytes);
            changed = true;
        }
        if changed {
            writes.push((task_key(id), Some(json_bytes(t))));
        }
        Ok(Value::Null)
    }

    /// A task's server says how it ended (`Command::TaskEnded`): a copy back's appliance
    /// joins the library, held by that server.
    pub(super) fn task_ended(
        &mut self,
        id: u64,
        server: u64,
        at_ms: u64,
        outcome: &TaskOutcome,
        writes: &mut Vec<RecordWrite>,
    ) -> Outcome {
        let t = self.running_task(id, server)?.clone();
        let state = match (outcome, &t.kind) {
            (TaskOutcome::Failed { reason }, _) => TaskState::Failed {
                reason: reason.clone(),
                ended_ms: Some(at_ms),
            },
            (
                TaskOutcome::CopiedBack { disks },
                TaskKind::CopyBack {
                    vm,
                    appliance,
                    description,
                }
                | TaskKind::Backup {
                    vm,
                    appliance,
                    description,
                },
            ) => match self.copied_back(&t, *vm, appliance, description, disks) {
                Ok(a) => {
                    writes.push((appliance_key(appliance), Some(json_bytes(&a))));
                    self.appliances.insert(appliance.clone(), a);
                    self.expire_backups(*vm, at_ms, writes);
                    TaskState::Done { ended_ms: at_ms }
                }
                Err(reason) => TaskState::Failed {
                    reason,
                    ended_ms: Some(at_ms),
                },
            },
            (
                TaskOutcome::Imported { appliance },
                kind @ (TaskKind::Download {
                    appliance: name, ..
                }
                | TaskKind::Import {
                    appliance: name, ..
                }),
            ) => {
                let mut a = appliance.clone();
                a.name = name.clone();
                a.origin = match kind {
                    TaskKind::Download { url, .. } => format!("downloaded from {url}"),
                    TaskKind::Import { bytes, .. } => {
                        format!("uploaded, an archive of {bytes} bytes")
                    }
                    // Not among the kinds matched.
                    TaskKind::CopyBack { .. } | TaskKind::Backup { .. } => String::new(),
                };
                match self.imported(&t, &a) {
                    Ok(record) => {
                        writes.push((appliance_key(name), Some(json_bytes(&record))));
                        self.appliances.insert(name.clone(), record);
                        TaskState::Done { ended_ms: at_ms }
                    }
                    Err(reason) => TaskState::Failed {
                        reason,
                        ended_ms: Some(at_ms),
                    },
                }
            }
            (outcome, kind) => TaskState::Failed {
                reason: format!(
                    "{} ended with {}, which it does not make",
                    describe(kind),
                    match outcome {
                        TaskOutcome::CopiedBack { .. } => "copied disks",
                        TaskOutcome::Imported { .. } => "an imported appliance",
                        TaskOutcome::Failed { .. } => "a failure",
                    }
                ),
                ended_ms: Some(at_ms),
            },
        };
        let failed = matches!(state, TaskState::Failed { .. });
        self.end_task(id, state, writes);
        Ok(json!({ "failed": failed }))
    }

    /// The backups of VM `vm` past the newest its schedule keeps leave the library (not one a
    /// VM is still being made from); audited as the cluster's own change.
    fn expire_backups(&mut self, vm: u64, at_ms: u64, writes: &mut Vec<RecordWrite>) {
        let Some(keep) = self
            .vm_by_id(vm)
            .and_then(|v| v.backup_schedule)
            .map(|s| s.keep as usize)
        else {
            return;
        };
        let mut backups: Vec<(u64, String)> = self
            .appliances
            .values()
            .filter(|a| a.backup_of == Some(vm))
            .map(|a| (a.created_ms, a.name.clone()))
            .collect();
        backups.sort();
        let old = backups.len().saturating_sub(keep);
        for (_, name) in backups.into_iter().take(old) {
            let in_use = self
                .appliances
                .get(&name)
                .is_some_and(|a| self.disk_made_from(a).is_some());
            if in_use {
                continue;
            }
            self.appliances.remove(&name);
            writes.push((appliance_key(&name), None));
            self.audit(
                0,
                at_ms,
                "appliance.expire",
                format!("appliance {name}: a backup of VM {vm} past its schedule's keep of {keep}"),
                writes,
            );
        }
    }

    /// The bytes the backups of VM `vm` past its schedule's keep free when one more is made
    /// (`expire_backups`): the oldest, not being made into a VM.
    fn backup_frees(&self, vm: u64) -> u64 {
        let Some(keep) = self
            .vm_by_id(vm)
            .and_then(|v| v.backup_schedule)
            .map(|s| s.keep as usize)
        else {
            return 0;
        };
        let mut backups: Vec<&ApplianceRecord> = self
            .appliances
            .values()
            .filter(|a| a.backup_of == Some(vm))
            .collect();
        backups.sort_by_key(|a| a.created_ms);
        let old = (backups.len() + 1).saturating_sub(keep);
        backups
            .into_iter()
            .take(old)
            .filter(|a| self.disk_made_from(a).is_none())
            .map(|a| a.disks.iter().map(|d| d.size).sum::<u64>())
            .sum()
    }

    /// Why VM `v`'s scheduled backup, due at `now_ms`, waits: its company has no disk quota
    /// left for it (`None` when it is not due, or fits).
    pub fn scheduled_backup_held(&self, v: &super::VmRecord, now_ms: u64) -> Option<String> {
        let s = v.backup_schedule?;
        let due = v.last_backup_ms + u64::from(s.every_hours) * 3_600_000 <= now_ms;
        due.then(|| self.check_appliance_quota(v, self.backup_frees(v.id)))?
            .err()
            .map(|r| r.reason)
    }

    /// Refuses an appliance of VM `v`'s disks (a copy back, or a backup freeing `frees` bytes
    /// of older ones) that its owner's company has no disk quota left for.
    pub(super) fn check_appliance_quota(
        &self,
        v: &super::VmRecord,
        frees: u64,
    ) -> Result<(), Refusal> {
        let Some(owner) = v.owner.and_then(|o| self.users.get(&o)) else {
            return Ok(());
        };
        let bytes = self.vm_disk_bytes(v).saturating_sub(frees);
        access::check_more_disk(self, owner, bytes).map_err(|why| {
            Refusal::conflict(format!(
                "VM {} ({}): its disks' images count in its company's {why}",
                v.id, v.name
            ))
        })
    }

    /// The appliance a copy back of VM `vm` into `name` with images `disks` makes, or why not.
    fn copied_back(
        &self,
        t: &TaskRecord,
        vm: u64,
        name: &str,
        description: &str,
        disks: &[super::ApplianceDisk],
    ) -> Result<ApplianceRecord, String> {
        let v = self
            .vm_by_id(vm)
            .ok_or_else(|| format!("VM {vm} was deleted meanwhile"))?;
        if self.appliances.contains_key(name) {
            return Err(format!("appliance {name} was added meanwhile"));
        }
        let sizes: Vec<u64> = v
            .disks
            .iter()
            .filter_map(|d| self.disks.get(d).map(|d| d.size))
            .collect();
        let got: Vec<u64> = disks.iter().map(|d| d.size).collect();
        if got != sizes || disks.iter().any(|d| !crate::library::is_sha256(&d.sha256)) {
            return Err(format!(
                "the copies of VM {vm}'s disks are {got:?} bytes, its disks {sizes:?}"
            ));
        }
        let company = v
            .owner
            .and_then(|o| self.users.get(&o))
            .and_then(access::company);
        Ok(ApplianceRecord {
            name: name.to_string(),
            description: description.to_string(),
            memory_mib: v.memory_mib,
            vcpus: v.vcpus,
            boot: v.boot,
            disk_bus: v.disk_bus,
            nics: v.nics.len() as u32,
            disks: disks.to_vec(),
            origin: match t.kind {
                TaskKind::Backup { .. } => format!("live backup of VM {vm} ({})", v.name),
                _ => format!("copy back of VM {vm} ({})", v.name),
            },
            created_by: t.by,
            created_ms: t.started_ms,
            servers: [t.server].into(),
            shared_with: company.into_iter().collect(),
            backup_of: matches!(t.kind, TaskKind::Backup { .. }).then_some(vm),
            company,
        })
    }

    /// The appliance a download task `t` imported as `a`, or why not.
    fn imported(&self, t: &TaskRecord, a: &super::NewAppliance) -> Result<ApplianceRecord, String> {
        super::appliances::check_new_appliance(a).map_err(|r| r.reason)?;
        if self.appliances.contains_key(&a.name) {
            return Err(format!("appliance {} was added meanwhile", a.name));
        }
        Ok(super::appliances::appliance_record(
            a,
            t.by,
            t.started_ms,
            t.server,
        ))
    }

    /// Ends task `id` in `state`, and lets the oldest ended tasks go past `KEEP_ENDED_TASKS`.
    fn end_task(&mut self, id: u64, state: TaskState, writes: &mut Vec<RecordWrite>) {
        if let Some(t) = self.tasks.get_mut(&id) {
            t.state = state;
            writes.push((task_key(id), Some(json_bytes(t))));
        }
        let ended: Vec<u64> = self
            .tasks
            .values()
            .filter(|t| t.state != TaskState::Running)
            .map(|t| t.id)
            .collect();
        for old in ended
            .iter()
            .take(ended.len().saturating_sub(KEEP_ENDED_TASKS))
        {
            self.tasks.remove(old);
            writes.push((task_key(*old), None));
        }
    }

    /// Server `id` went down: its running tasks end, failed (their partial files are its own
    /// to delete when it returns), and so do the backups of the VMs it ran (their backup
    /// copies become primaries: no longer a point in time to copy).
    pub(super) fn fail_tasks_of(&mut self, id: u64, writes: &mut Vec<RecordWrite>) {
        let running: Vec<(u64, String)> = self
            .tasks
            .values()
            .filter(|t| t.state == TaskState::Running)
            .filter_map(|t| {
                if t.server == id {
                    return Some((t.id, format!("server {id}, which ran it, went down")));
                }
                let vm = self.vm_by_id(t.kind.vm()?)?;
                (matches!(t.kind, TaskKind::Backup { .. }) && self.vm_primary(vm) == Some(id))
                    .then(|| {
                        (
                            t.id,
                            format!("server {id}, the VM's primary, went down: its backup copies took over"),
                        )
                    })
            })
            .collect();
        for (t, reason) in running {
            let state = TaskState::Failed {
                reason,
                ended_ms: None,
            };
            self.end_task(t, state, writes);
        }
    }

    /// Whether a task may make appliance `name` with `description`: a valid name no
    /// appliance has and no running task makes.
    fn check_new_task_appliance(&self, name: &str, description: &str) -> Result<(), Refusal> {
        access::check_name("appliance", name)?;
        super::appliances::check_description(name, description)?;
        let taken = self.appliances.contains_key(name)
            || self
                .tasks
                .values()
                .any(|t| t.state == TaskState::Running && t.kind.appliance() == Some(name));
        if taken {
            return Err(Refusal::conflict(format!(
                "appliance {name} exists (or is being made): choose another name"
            )));
        }
        Ok(())
    }

    /// The bytes of VM `v`'s disks.
    fn vm_disk_bytes(&self, v: &super::VmRecord) -> u64 {
        v.disks
            .iter()
            .filter_map(|d| self.disks.get(d))
            .map(|d| d.size)
            .sum()
    }

    /// Records a new running task of `kind` on `server`, asked for by `by`; answers its id.
    fn start_task(
        &mut self,
        by: &Actor,
        server: u64,
        total_bytes: u64,
        kind: TaskKind,
        writes: &mut Vec<RecordWrite>,
    ) -> u64 {
        self.counters.task += 1;
        writes.push((COUNTERS_KEY.to_vec(), Some(json_bytes(&self.counters))));
        let t = TaskRecord {
            id: self.counters.task,
            kind,
            server,
            by: by.id,
            started_ms: by.at_ms,
            done_bytes: 0,
            total_bytes,
            state: TaskState::Running,
            cancel: false,
        };
        writes.push((task_key(t.id), Some(json_bytes(&t))));
        let id = t.id;
        self.tasks.insert(id, t);
        id
    }

    /// Applies an action on tasks for `by` (`act` routes them here).
    pub(super) fn act_on_task(
        &mut self,
        by: &Actor,
        action: &Action,
        writes: &mut Vec<RecordWrite>,
    ) -> Result<Acted<'static>, Refusal> {
        match action {
            Action::CopyBack {
                vm,
                name,
                description,
            } => {
                let v = self.powered_off_vm_administered_by(by.who.as_ref(), *vm, "first")?;
                self.check_new_task_appliance(name, description)?;
                self.check_no_task(*vm, "copy it back")?;
                if v.moving.is_some() {
                    return Err(Refusal::conflict(format!("VM {vm} is moving")));
                }
                let server = self.vm_primary(&v).ok_or_else(|| {
                    Refusal::conflict(format!("VM {vm} has no disks in one place"))
                })?;
                self.check_appliance_quota(&v, 0)?;
                if self.servers.get(&server).is_none_or(|s| s.down) {
                    return Err(Refusal::conflict(format!(
                        "VM {vm}: its server {server} is down"
                    )));
                }
                let total_bytes = self.vm_disk_bytes(&v);
                let id = self.start_task(
                    by,
                    server,
                    total_bytes,
                    TaskKind::CopyBack {
                        vm: *vm,
                        appliance: name.clone(),
                        description: description.clone(),
                    },
                    writes,
                );
                Ok(Acted::Changed {
                    verb: "appliance.copy_back",
                    target: format!("vm {vm} ({}) into appliance {name}", v.name),
                    result: json!({ "task": id, "server": server }),
                })
            }
            Action::BackupVm {
                vm,
                name,
                description,
            } => {
                let v = self.operable_vm(by.who.as_ref(), *vm)?;
                self.check_new_task_appliance(name, description)?;
                self.check_no_task(*vm, "back it up")?;
                if v.moving.is_some() {
                    return Err(Refusal::conflict(format!("VM {vm} is moving")));
                }
                let server = self.move_target(&v).map_err(|r| {
                    Refusal::conflict(format!(
                        "{}: a live backup is taken from in-sync backup copies",
                        r.reason
                    ))
                })?;
                self.check_appliance_quota(&v, self.backup_frees(*vm))?;
                let total_bytes = self.vm_disk_bytes(&v);
                if let Some(r) = self.vms.get_mut(&v.name) {
                    r.last_backup_ms = by.at_ms;
                    writes.push((super::keys::vm_key(&v.name), Some(json_bytes(r))));
                }
                let id = self.start_task(
                    by,
                    server,
                    total_bytes,
                    TaskKind::Backup {
                        vm: *vm,
                        appliance: name.clone(),
                        description: description.clone(),
                    },
                    writes,
                );
                Ok(Acted::Changed {
                    verb: "appliance.backup",
                    target: format!("vm {vm} ({}) into appliance {name}", v.name),
                    result: json!({ "task": id, "server": server }),
                })
            }
            Action::DownloadAppliance {
                name,
                url,
                sha256,
                server,
            } => {
                if !by.is_manager() {
                    return Err(access::refuse("only a Manager adds to the library"));
                }
                self.check_new_task_appliance(name, "")?;
                check_download_url(url)?;
                if let Some(sha) = sha256 {
                    if !crate::library::is_sha256(sha) {
                        return Err(Refusal::conflict(format!(
                            "appliance {name}: {sha:?} is not a SHA-256 (64 hex digits)"
                        )));
                    }
                }
                let running = self.running_tasks(|k| matches!(k, TaskKind::Download { .. }));
                if running >= MAX_DOWNLOADS {
                    return Err(Refusal::conflict(format!(
                        "{running} downloads run already, the most at once: start {name} when one ends"
                    )));
                }
                match self.servers.get(server) {
                    None => return Err(Refusal::not_found(format!("no server {server}"))),
                    Some(s) if s.down || s.witness => {
                        return Err(Refusal::conflict(format!(
                            "server {server} is down or a witness: a VM server downloads"
                        )))
                    }
                    Some(_) => {}
                }
                let id = self.start_task(
                    by,
                    *server,
                    0,
                    TaskKind::Download {
                        appliance: name.clone(),
                        url: url.clone(),
                        sha256: sha256.as_ref().map(|s| s.to_ascii_lowercase()),
                    },
                    writes,
                );
                Ok(Acted::Changed {
                    verb: "appliance.download",
                    target: format!("appliance {name} from {url}"),
                    result: json!({ "task": id, "server": server }),
                })
            }
            Action::ImportUpload {
                name,
                upload,
                bytes,
                server,
            } => {
                if !by.is_manager() {
                    return Err(access::refuse("only a Manager adds to the library"));
                }
                self.check_new_task_appliance(name, "")?;
                let plain = |c: char| c.is_ascii_alphanumeric() || c == '-';
                if upload.is_empty() || upload.len() > 64 || !upload.chars().all(plain) {
                    return Err(Refusal::conflict(format!(
                        "upload {upload:.70?}: letters, digits and -, at most 64"
                    )));
                }
                if *bytes == 0 {
                    return Err(Refusal::conflict(format!(
                        "appliance {name}: an empty upload"
                    )));
                }
                let running = self.running_tasks(|k| matches!(k, TaskKind::Import { .. }));
                if running >= MAX_UPLOAD_IMPORTS {
                    return Err(Refusal::conflict(format!(
                        "{running} uploads are being imported already, the most at once: upload {name} when one ends"
                    )));
                }
                match self.servers.get(server) {
                    None => return Err(Refusal::not_found(format!("no server {server}"))),
                    Some(s) if s.down => {
                        return Err(Refusal::conflict(format!("server {server} is down")))
                    }
                    Some(_) => {}
                }
                let id = self.start_task(
                    by,
                    *server,
                    0,
                    TaskKind::Import {
                        appliance: name.clone(),
                        upload: upload.clone(),
                        bytes: *bytes,
                    },
                    writes,
                );
                Ok(Acted::Changed {
                    verb: "appliance.import",
                    target: format!("appliance {name} from an upload of {bytes} bytes"),
                    result: json!({ "task": id, "server": server }),
                })
            }
            Action::SetBackupSchedule { vm, schedule } => {
                let v = self.operable_vm(by.who.as_ref(), *vm)?;
                if let Some(s) = schedule {
                    if !(1..=8760).contains(&s.every_hours) || !(1..=100).contains(&s.keep) {
                        return Err(Refusal::conflict(format!(
                            "VM {vm}: a backup every {} hours keeping {}: every 1 to 8760 hours, 1 to 100 kept",
                            s.every_hours, s.keep
                        )));
                    }
                }
                if v.backup_schedule == *schedule {
                    return Ok(Acted::Unchanged(
                        json!({ "audit": self.counters.audit, "unchanged": true }),
                    ));
                }
                let r = self.vms.get_mut(&v.name).expect("found");
                r.backup_schedule = *schedule;
                writes.push((super::keys::vm_key(&v.name), Some(json_bytes(r))));
                let target = match schedule {
                    Some(s) => format!(
                        "vm {vm} ({}): a backup every {} hours, {} kept",
                        v.name, s.every_hours, s.keep
                    ),
                    None => format!("vm {vm} ({}): no scheduled backups", v.name),
                };
                Ok(Acted::Changed {
                    verb: "vm.backup_schedule",
                    target,
                    result: Value::Null,
                })
            }
            Action::CancelTask { id } => {
                let t = self
                    .tasks
                    .get_mut(id)
                    .ok_or_else(|| Refusal::not_found(format!("no task {id}")))?;
                let allowed = by
                    .who
                    .as_ref()
                    .is_none_or(|u| u.role == Role::Manager || u.id == t.by);
                if !allowed {
                    return Err(access::refuse(format!("task {id}")));
                }
                if t.state != TaskState::Running {
                    return Err(Refusal::conflict(format!("task {id} has ended")));
                }
                if t.cancel {
                    return Ok(Acted::Unchanged(
                        json!({ "audit": self.counters.audit, "unchanged": true }),
                    ));
                }
                t.cancel = true;
                writes.push((task_key(*id), Some(json_bytes(t))));
                Ok(Acted::Changed {
                    verb: "task.cancel",
                    target: format!("task {id} ({})", describe(&t.kind)),
                    result: Value::Null,
                })
            }
            _ => unreachable!("act routes no other action here: {action:?}"),
        }
    }
}

/// The name of a backup of VM `vm` begun at `ms` (since the epoch): the VM's name and the
/// time, UTC, `NAME-YYYYMMDD-HHMMSS`.
pub fn backup_name(vm: &str, ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (proleptic Gregorian), after Howard Hinnant's algorithm.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let stamp = format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    );
    // Within a name's 63 characters.
    let keep = 63 - stamp.len() - 1;
    let vm: String = vm.chars().take(keep).collect();
    format!("{vm}-{stamp}")
}

/// The scheduled backups due at `now_ms`: the VMs with a schedule whose last backup began an
/// interval ago (or never), with no task on them and their backups in sync, each with its
/// backup's action (the leader proposes them as the cluster's own).
pub fn due_backups(state: &StateMachine, now_ms: u64) -> Vec<Action> {
    state
        .vms
        .values()
        .filter_map(|v| {
            let s = v.backup_schedule?;
            let due = v.last_backup_ms + u64::from(s.every_hours) * 3_600_000 <= now_ms;
            // One its company's quota has no room for waits (the VM's view says why not).
            (due && state.vm_task(v.id).is_none()
                && v.moving.is_none()
                && state.move_target(v).is_ok()
                && state
                    .check_appliance_quota(v, state.backup_frees(v.id))
                    .is_ok())
            .then(|| Action::BackupVm {
                vm: v.id,
                name: backup_name(&v.name, now_ms),
                description: format!("scheduled backup of VM {} ({})", v.id, v.name),
            })
        })
        .collect()
}

/// The most downloads running at once in the cluster (each holds a connection, a thread and a
/// work directory on its server).
pub const MAX_DOWNLOADS: usize = 4;

/// The most uploads being imported at once in the cluster (each converts disks on its server,
/// beside its web service).
pub const MAX_UPLOAD_IMPORTS: usize = 4;

/// The longest download URL taken.
pub const MAX_URL: usize = 2048;

/// Refuses a download URL that is not http(s), or too long, or has spaces or controls.
pub fn check_download_url(url: &str) -> Result<(), Refusal> {
    let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
    let host_ok = url
        .split_once("://")
        .map(|(_, rest)| rest.split(['/', '?', '#']).next().unwrap_or_default())
        .is_some_and(|h| !h.is_empty());
    if !scheme_ok
        || !host_ok
        || url.len() > MAX_URL
        || url.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(Refusal::conflict(format!(
            "{url:.100?}: a download URL is http:// or https://, a host, at most {MAX_URL} characters without spaces"
        )));
    }
    Ok(())
}

/// What a task does, for messages.
pub fn describe(kind: &TaskKind) -> String {
    match kind {
        TaskKind::CopyBack { vm, appliance, .. } => {
            format!("copying VM {vm} back into appliance {appliance}")
        }
        TaskKind::Backup { vm, appliance, .. } => {
            format!("backing VM {vm} up into appliance {appliance}")
        }
        TaskKind::Download { appliance, url, .. } => {
            format!("downloading appliance {appliance} from {url}")
        }
        TaskKind::Import {
            appliance, bytes, ..
        } => format!("importing appliance {appliance} from an upload of {bytes} bytes"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_backup_s_name_carries_the_utc_time_within_63_characters() {
        assert_eq!(super::backup_name("web", 0), "web-19700101-000000");
        assert_eq!(
            super::backup_name("web", 1_709_210_096_000),
            "web-20240229-123456"
        );
        assert_eq!(
            super::backup_name("db", 1_767_225_599_999),
            "db-20251231-235959"
        );
        let long = "v".repeat(63);
        let name = super::backup_name(&long, 0);
        assert_eq!(name.len(), 63);
        assert!(crate::access::check_name("appliance", &name).is_ok());
    }

    use crate::access::Role;
    use crate::state_machine::fixtures::{act, new_user, new_vm, servers_with_room};
    use crate::state_machine::{
        Action, ApplianceDisk, BootMode, Command, Outcome, RefusalKind, StateMachine, TaskOutcome,
        TaskState,
    };

    #[test]
    fn a_download_is_a_manager_s_task_of_a_vm_server_ending_in_the_appliance_it_imported() {
        let mut sm = StateMachine::default();
        servers_with_room(&mut sm, 2);
        let mut w = Vec::new();
        sm.add_server(&crate::state_machine::fixtures::server(3, true), &mut w);
        let id = |r: Outcome| r.unwrap()["id"].as_u64().unwrap();
        let m = id(act(&mut sm, 0, new_user("m", Role::Manager, None, None)));
        let p = id(act(&mut sm, 0, new_user("p", Role::PowerUser, None, None)));
        let download =
            |name: &str, url: &str, sha: Option<&str>, server| Action::DownloadAppliance {
                name: name.into(),
                url: url.into(),
                sha256: sha.map(str::to_string),
                server,
            };
        let refused = |r: Outcome| r.unwrap_err();
        let url = "https://appliances.example/web.ova";
        assert_eq!(
            refused(act(&mut sm, p, download("web", url, None, 1))).kind,
            RefusalKind::Forbidden
        );
        for bad in [
            "ftp://x/a.ova",
            "http://",
            "https://a b/c",
            "file:///etc/passwd",
        ] {
            assert!(
                refused(act(&mut sm, m, download("web", bad, None, 1)))
                    .reason
                    .contains("URL"),
                "{bad}"
            );
        }
        assert!(
            refused(act(&mut sm, m, download("web", url, Some("zz"), 1)))
                .reason
                .contains("SHA-256")
        );
        assert!(refused(act(&mut sm, m, download("web", url, None, 3)))
            .reason
            .contains("witness"));
        assert!(refused(act(&mut sm, m, download("../web", url, None, 1)))
            .reason
            .contains("name"));
        let r = act(&mut sm, m, download("web", url, Some(&"AB".repeat(32)), 2)).unwrap();
        let task = r["task"].as_u64().unwrap();
        assert_eq!(r["server"].as_u64(), Some(2));
        assert!(refused(act(&mut sm, m, download("web", url, None, 1)))
            .reason
            .contains("being made"));
        // At most MAX_DOWNLOADS at once.
        for n in 1..super::MAX_DOWNLOADS {
            act(&mut sm, m, download(&format!("more{n}"), url, None, 1)).unwrap();
        }
        assert!(refused(act(&mut sm, m, download("one-more", url, None, 1)))
            .reason
            .contains("the most at once"));
        let t = &sm.tasks[&task];
        assert_eq!(
            (t.total_bytes, t.kind.vm(), t.kind.appliance()),
            (0, None, Some("web"))
        );
        // Its length learnt once, from its server.
        let progress = |done_bytes, total_bytes| Command::TaskProgress {
            id: task,
            server: 2,
            done_bytes,
            total_bytes,
        };
        sm.apply(&progress(10, Some(1000)), &mut w).unwrap();
        sm.apply(&progress(20, Some(5)), &mut w).unwrap();
        assert_eq!(
            (sm.tasks[&task].done_bytes, sm.tasks[&task].total_bytes),
            (20, 1000)
        );
        // Ended with what a copy back makes: not a download's; failed, nothing listed.
        let ended = |outcome| Command::TaskEnded {
            id: task,
            server: 2,
            at_ms: 9,
            outcome,
        };
        let disks = vec![ApplianceDisk {
            size: 1 << 20,
            sha256: "cd".repeat(32),
        }];
        let imported = crate::state_machine::NewAppliance {
            name: String::new(),
            description: "from a directory".into(),
            memory_mib: 256,
            vcpus: 2,
            boot: BootMode::Uefi,
            disk_bus: Default::default(),
            nics: 1,
            disks: disks.clone(),
            origin: String::new(),
        };
        sm.apply(
            &ended(TaskOutcome::Imported {
                appliance: imported.clone(),
            }),
            &mut w,
        )
        .unwrap();
        let a = &sm.appliances["web"];
        assert_eq!(
            (a.memory_mib, a.vcpus, a.boot, a.nics),
            (256, 2, BootMode::Uefi, 1)
        );
        assert_eq!(
            (&a.disks, a.created_by, &a.servers),
            (&disks, m, &[2].into())
        );
        assert_eq!(a.origin, format!("downloaded from {url}"));
        assert!(matches!(sm.tasks[&task].state, TaskState::Done { .. }));

        let r = act(&mut sm, m, download("db", url, None, 1)).unwrap();
        let task = r["task"].as_u64().unwrap();
        let wrong = Command::TaskEnded {
            id: task,
            server: 1,
            at_ms: 10,
            outcome: TaskOutcome::CopiedBack { disks },
        };
        sm.apply(&wrong, &mut w).unwrap();
        assert!(
            matches!(&sm.tasks[&task].state, TaskState::Failed { reason, .. } if reason.contains("does not make"))
        );
        assert!(!sm.appliances.contains_key("db"));
    }

    #[test]
    fn an_uploaded_archive_is_imported_by_a_task_of_the_server_that_took_it() {
        let mut sm = StateMachine::default();
        servers_with_room(&mut sm, 2);
        let mut w = Vec::new();
        // A witness takes uploads too (its web service imports them).
        sm.add_server(&crate::state_machine::fixtures::server(3, true), &mut w);
        let id = |r: Outcome| r.unwrap()["id"].as_u64().unwrap();
        let m = id(act(&mut sm, 0, new_user("m", Role::Manager, None, None)));
        let p = id(act(&mut sm, 0, new_user("p", Role::PowerUser, None, None)));
        let import = |name: &str, upload: &str, bytes, server| Action::ImportUpload {
            name: name.into(),
            upload: upload.into(),
            bytes,
            server,
        };
        let refused = |r: Outcome| r.unwrap_err();
        assert_eq!(
            refused(act(&mut sm, p, import("web", "u1", 10, 3))).kind,
            RefusalKind::Forbidden
        );
        for (upload, bytes) in [("", 10), ("../x", 10), ("u1", 0)] {
            assert_eq!(
                refused(act(&mut sm, m, import("web", upload, bytes, 3))).kind,
                RefusalKind::Conflict,
                "{upload:?} {bytes}"
            );
        }
        assert_eq!(
            refused(act(&mut sm, m, import("web", "u1", 10, 9))).kind,
            RefusalKind::NotFound
        );
        let r = act(&mut sm, m, import("web", "u1", 10, 3)).unwrap();
        let task = r["task"].as_u64().unwrap();
        assert!(refused(act(&mut sm, m, import("web", "u2", 10, 3)))
            .reason
            .contains("being made"));
        for n in 1..super::MAX_UPLOAD_IMPORTS {
            act(&mut sm, m, import(&format!("more{n}"), "u", 10, 1)).unwrap();
        }
        assert!(refused(act(&mut sm, m, import("one-more", "u", 10, 1)))
            .reason
            .contains("the most at once"));
        // Only its server reports; its end adds the appliance, held there.
        let ended = |server, outcome| Command::TaskEnded {
            id: task,
            server,
            at_ms: 9,
            outcome,
        };
        let disks = vec![ApplianceDisk {
            size: 1 << 20,
            sha256: "cd".repeat(32),
        }];
        let imported = crate::state_machine::NewAppliance {
            name: String::new(),
            description: "uploaded".into(),
            memory_mib: 256,
            vcpus: 1,
            boot: BootMode::Bios,
            disk_bus: Default::default(),
            nics: 0,
            disks: disks.clone(),
            origin: String::new(),
        };
        let outcome = TaskOutcome::Imported {
            appliance: imported,
        };
        assert!(sm.apply(&ended(1, outcome.clone()), &mut w).is_err());
        sm.apply(&ended(3, outcome), &mut w).unwrap();
        let a = &sm.appliances["web"];
        assert_eq!((&a.disks, &a.servers), (&disks, &[3].into()));
        assert_eq!(a.origin, "uploaded, an archive of 10 bytes");
        assert!(matches!(sm.tasks[&task].state, TaskState::Done { .. }));
    }

    #[test]
    fn a_copy_back_keeps_its_vm_off_ends_in_an_appliance_and_fails_with_its_server() {
        let mut sm = StateMachine::default();
        servers_with_room(&mut sm, 2);
        let id = |r: Outcome| r.unwrap()["id"].as_u64().unwrap();
        let m = id(act(&mut sm, 0, new_user("m", Role::Manager, None, None)));
        let quota = crate::access::Quota {
            vms: 2,
            memory_mib: 512,
            disk_gib: 10,
        };
        let p = id(act(
            &mut sm,
            0,
            new_user("p", Role::PowerUser, None, Some(quota)),
        ));
        let q = id(act(
            &mut sm,
            0,
            new_user("q", Role::PowerUser, None, Some(quota)),
        ));
        let mut v = new_vm("v", &[]);
        v.boot = BootMode::Bios;
        v.kernel.clear();
        let vm = id(act(&mut sm, p, Action::CreateVm { owner: p, vm: v }));
        let server = sm.vm_primary(&sm.vms["v"]).unwrap();
        let copy_back = |name: &str| Action::CopyBack {
            vm,
            name: name.into(),
            description: "v, set up".into(),
        };
        let refused = |r: Outcome| r.unwrap_err();
        assert_eq!(
            refused(act(&mut sm, q, copy_back("t"))).kind,
            RefusalKind::Forbidden
        );
        let r = act(&mut sm, p, copy_back("t")).unwrap();
        let task = r["task"].as_u64().unwrap();
        assert_eq!(r["server"].as_u64(), Some(server));
        assert!(refused(act(&mut sm, p, copy_back("t")))
            .reason
            .contains("being made"));
        // The VM stays off and whole meanwhile.
        let on = Action::PowerVm {
            vm,
            running: true,
            force: false,
        };
        assert!(refused(act(&mut sm, p, on.clone())).reason.contains("task"));
        assert!(refused(act(&mut sm, p, Action::DeleteVm { vm }))
            .reason
            .contains("task"));
        // Progress from its server only, never backwards.
        let progress = |server, done_bytes| Command::TaskProgress {
            id: task,
            server,
            done_bytes,
            total_bytes: None,
        };
        let mut w = Vec::new();
        assert!(sm.apply(&progress(server % 2 + 1, 5), &mut w).is_err());
        sm.apply(&progress(server, 600), &mut w).unwrap();
        sm.apply(&progress(server, 500), &mut w).unwrap();
        assert_eq!(sm.tasks[&task].done_bytes, 600);
        // Images of the wrong size end it failed; the right ones make the appliance, shared
        // with the owner's company.
        let ended = |size: u64| Command::TaskEnded {
            id: task,
            server,
            at_ms: 9,
            outcome: TaskOutcome::CopiedBack {
                disks: vec![ApplianceDisk {
                    size,
                    sha256: "ab".repeat(32),
                }],
            },
        };
        let mut fresh = sm.clone();
        fresh.apply(&ended(512), &mut w).unwrap();
        assert!(matches!(fresh.tasks[&task].state, TaskState::Failed { .. }));
        assert!(fresh.appliances.is_empty());
        sm.apply(&ended(1 << 20), &mut w).unwrap();
        assert_eq!(sm.tasks[&task].state, TaskState::Done { ended_ms: 9 });
        let a = &sm.appliances["t"];
        assert_eq!(
            (a.servers.clone(), a.shared_with.clone()),
            ([server].into(), [p].into())
        );
        assert_eq!(a.origin, "copy back of VM 1 (v)");
        act(&mut sm, p, on).unwrap();

        // Another, cancelled by who asked; a third fails when its server goes down.
        let off = Action::PowerVm {
            vm,
            running: false,
            force: true,
        };
        act(&mut sm, p, off).unwrap();
        let second = act(&mut sm, m, copy_back("u")).unwrap()["task"]
            .as_u64()
            .unwrap();
        assert_eq!(
            refused(act(&mut sm, p, Action::CancelTask { id: second })).kind,
            RefusalKind::Forbidden
        );
        act(&mut sm, m, Action::CancelTask { id: second }).unwrap();
        assert!(sm.tasks[&second].cancel);
        let cancelled = Command::TaskEnded {
            id: second,
            server,
            at_ms: 10,
            outcome: TaskOutcome::Failed {
                reason: "cancelled".into(),
            },
        };
        sm.apply(&cancelled, &mut w).unwrap();
        let third = act(&mut sm, p, copy_back("w")).unwrap()["task"]
            .as_u64()
            .unwrap();
        sm.apply(
            &Command::SetServerDown {
                id: server,
                down: true,
            },
            &mut w,
        )
        .unwrap();
        assert!(
            matches!(&sm.tasks[&third].state, TaskState::Failed { reason, .. } if reason.contains("went down")),
            "{:?}",
            sm.tasks[&third]
        );
        // A live backup: from the backup copies, in sync only; the VM may run meanwhile; it
        // fails when its VM's primary goes down (the backup copies take over).
        sm.apply(
            &Command::SetServerDown {
                id: server,
                down: false,
            },
            &mut w,
        )
        .unwrap();
        let backup = |name: &str| Action::BackupVm {
            vm,
            name: name.into(),
            description: String::new(),
        };
        let disk = sm.vms["v"].disks[0].clone();
        assert!(refused(act(&mut sm, p, backup("b1")))
            .reason
            .contains("not in sync"));
        let d = sm.disks.get_mut(&disk).unwrap();
        d.backup_synced = true;
        let (primary, backup_server) = (d.primary, d.backup.unwrap());
        assert_eq!(
            refused(act(&mut sm, q, backup("b1"))).kind,
            RefusalKind::Forbidden,
            "another company's VM"
        );
        let r = act(&mut sm, p, backup("b1")).unwrap();
        assert_eq!(r["server"].as_u64(), Some(backup_server));
        let b1 = r["task"].as_u64().unwrap();
        let on = Action::PowerVm {
            vm,
            running: true,
            force: false,
        };
        act(&mut sm, p, on).unwrap();
        assert!(refused(act(&mut sm, p, backup("b2")))
            .reason
            .contains("task"));
        let drain = Action::DrainServer { id: backup_server };
        assert!(
            refused(act(&mut sm, m, drain)).reason.contains("task"),
            "its disks stay where the backup reads them"
        );
        sm.apply(
            &Command::SetServerDown {
                id: primary,
                down: true,
            },
            &mut w,
        )
        .unwrap();
        assert!(
            matches!(&sm.tasks[&b1].state, TaskState::Failed { reason, .. } if reason.contains("primary")),
            "{:?}",
            sm.tasks[&b1]
        );
        let audit: Vec<&str> = sm.audit.values().map(|a| a.action.as_str()).collect();
        for want in ["appliance.copy_back", "task.cancel", "appliance.backup"] {
            assert!(audit.contains(&want), "{want} in {audit:?}");
        }
    }
}

#[cfg(test)]
mod schedule_tests {
    use crate::access::Role;
    use crate::state_machine::fixtures::{act, new_user, new_vm, servers_with_room};
    use crate::state_machine::{
        due_backups, Action, ApplianceDisk, BackupSchedule, BootMode, Command, Outcome,
        StateMachine, TaskOutcome,
    };

    #[test]
    fn a_company_s_backups_and_copies_back_count_in_its_disk_quota() {
        let mut sm = StateMachine::default();
        servers_with_room(&mut sm, 2);
        let id = |r: Outcome| r.unwrap()["id"].as_u64().unwrap();
        let quota = crate::access::Quota {
            vms: 2,
            memory_mib: 1024,
            disk_gib: 3,
        };
        let p = id(act(
            &mut sm,
            0,
            new_user("p", Role::PowerUser, None, Some(quota)),
        ));
        let mut v = new_vm("v", &[]);
        v.boot = BootMode::Bios;
        v.kernel.clear();
        v.disk_size = 1 << 30;
        let vm = id(act(&mut sm, p, Action::CreateVm { owner: p, vm: v }));
        let disk = sm.vms["v"].disks[0].clone();
        sm.disks.get_mut(&disk).unwrap().backup_synced = true;
        let hour = 3_600_000;
        let mut w = Vec::new();
        // Asked for at `at` by `actor` (0: the leader's schedule), and ended: the task.
        let mut backup = |sm: &mut StateMachine, actor, action: Action, at: u64| {
            let r = sm.apply(
                &Command::Act {
                    actor,
                    at_ms: at,
                    action,
                },
                &mut w,
            )?;
            let task = r["task"].as_u64().unwrap();
            let server = sm.tasks[&task].server;
            let ended = Command::TaskEnded {
                id: task,
                server,
                at_ms: at + 1000,
                outcome: TaskOutcome::CopiedBack {
                    disks: vec![ApplianceDisk {
                        size: 1 << 30,
                        sha256: format!("{at:064x}"),
                    }],
                },
            };
            sm.apply(&ended, &mut w).map(|_| ())
        };
        let now = |name: &str| Action::BackupVm {
            vm,
            name: name.into(),
            description: String::new(),
        };
        // The VM's GiB and two backups' fill the company's 3 GiB: a third is refused.
        backup(&mut sm, p, now("b1"), hour).unwrap();
        backup(&mut sm, p, now("b2"), 2 * hour).unwrap();
        assert_eq!(crate::access::company_usage(&sm, p).2, 3 << 30);
        let full = backup(&mut sm, p, now("b3"), 3 * hour).unwrap_err();
        assert!(full.reason.contains("quota: 3 GiB of 3 GiB"), "{full:?}");
        let copy = Action::CopyBack {
            vm,
            name: "c".into(),
            description: String::new(),
        };
        assert!(act(&mut sm, p, copy).unwrap_err().reason.contains("quota"));
        // On a schedule keeping two, the next one fits: it frees the oldest.
        let schedule = |keep| Action::SetBackupSchedule {
            vm,
            schedule: Some(BackupSchedule {
                every_hours: 1,
                keep,
            }),
        };
        act(&mut sm, p, schedule(2)).unwrap();
        let due = due_backups(&sm, 4 * hour);
        assert_eq!(due.len(), 1);
        backup(&mut sm, 0, due[0].clone(), 4 * hour).unwrap();
        assert!(!sm.appliances.contains_key("b1"), "expired");
        assert_eq!(crate::access::company_usage(&sm, p).2, 3 << 30);
        // Keeping three, nothing would go: the next waits, and the VM says why.
        act(&mut sm, p, schedule(3)).unwrap();
        assert!(due_backups(&sm, 6 * hour).is_empty());
        let held = sm.scheduled_backup_held(&sm.vms["v"], 6 * hour).unwrap();
        assert!(held.contains("quota"), "{held}");
        assert_eq!(
            sm.scheduled_backup_held(&sm.vms["v"], 4 * hour + 1),
            None,
            "not due yet"
        );
        // Deleting a backup gives its room back.
        act(&mut sm, p, Action::DeleteAppliance { name: "b2".into() }).unwrap_err();
        let m = id(act(&mut sm, 0, new_user("m", Role::Manager, None, None)));
        act(&mut sm, m, Action::DeleteAppliance { name: "b2".into() }).unwrap();
        assert_eq!(due_backups(&sm, 6 * hour).len(), 1);
    }

    #[test]
    fn scheduled_backups_come_when_due_and_keep_only_the_newest() {
        let mut sm = StateMachine::default();
        servers_with_room(&mut sm, 2);
        let id = |r: Outcome| r.unwrap()["id"].as_u64().unwrap();
        let m = id(act(&mut sm, 0, new_user("m", Role::Manager, None, None)));
        let mut v = new_vm("v", &[]);
        v.boot = BootMode::Bios;
        v.kernel.clear();
        let vm = id(act(&mut sm, m, Action::CreateVm { owner: m, vm: v }));
        let disk = sm.vms["v"].disks[0].clone();
        sm.disks.get_mut(&disk).unwrap().backup_synced = true;
        let hour = 3_600_000;
        assert!(
            due_backups(&sm, 10 * hour).is_empty(),
            "no schedule, none due"
        );
        let schedule = |s: Option<BackupSchedule>| Action::SetBackupSchedule { vm, schedule: s };
        let bad = BackupSchedule {
            every_hours: 0,
            keep: 1,
        };
        assert!(act(&mut sm, m, schedule(Some(bad))).is_err());
        let every2 = BackupSchedule {
            every_hours: 2,
            keep: 1,
        };
        act(&mut sm, m, schedule(Some(every2))).unwrap();
        let mut w = Vec::new();
        // Two backups, two hours apart; the second ends with keep 1: the first leaves.
        for (n, at) in [(1u64, 10 * hour), (2, 12 * hour + 1)] {
            let due = due_backups(&sm, at);
            assert_eq!(due.len(), 1, "due at {at}");
            let r = sm
                .apply(
                    &Command::Act {
                        actor: 0,
                        at_ms: at,
                        action: due[0].clone(),
                    },
                    &mut w,
                )
                .unwrap();
            let task = r["task"].as_u64().unwrap();
            assert!(due_backups(&sm, at + 5 * hour).is_empty(), "one at a time");
            let server = sm.tasks[&task].server;
            let ended = Command::TaskEnded {
                id: task,
                server,
                at_ms: at + 1000,
                outcome: TaskOutcome::CopiedBack {
                    disks: vec![ApplianceDisk {
                        size: 1 << 20,
                        sha256: format!("{n:064x}"),
                    }],
                },
            };
            sm.apply(&ended, &mut w).unwrap();
            assert!(
                due_backups(&sm, at + hour).is_empty(),
                "not due again for two hours"
            );
        }
        let backups: Vec<_> = sm.appliances.values().collect();
        assert_eq!(backups.len(), 1, "{backups:?}");
        assert_eq!(backups[0].backup_of, Some(vm));
        assert!(
            backups[0].name.starts_with("v-19700101-12"),
            "{}",
            backups[0].name
        );
        let audit: Vec<&str> = sm.audit.values().map(|a| a.action.as_str()).collect();
        assert!(audit.contains(&"appliance.expire"), "{audit:?}");
        act(&mut sm, m, schedule(None)).unwrap();
        assert!(due_backups(&sm, 100 * hour).is_empty());
    }
}
