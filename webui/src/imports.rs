//! Uploads into the library: resumable uploads (`/api/v1/uploads`), and the import of an
//! uploaded archive into an appliance, a task of the server that received it
//! (`TaskKind::Import`).
//!
//! A resumable upload is opened with its kind, name and size (`POST /api/v1/uploads`), then
//! sent in parts, each a `PATCH /api/v1/uploads/{id}` whose `Upload-Offset` header says where
//! it starts: the bytes this server holds, which `GET` tells. A part cut off keeps what
//! arrived, and the next starts there. An appliance's archive is read as it arrives, as a
//! single upload's is (`ova::arrive`), so a bad one is refused by the part that shows it. With
//! its last byte an ISO joins the library (201) and an archive's import begins (202, its
//! task). An upload lives on the server it was opened on, in memory and a file there: at most
//! `MAX_OPEN` at once, each forgotten after `IDLE` without a part, lost if that server
//! restarts.
//!
//! An import runs on the server that received the archive, beside its web service (every
//! server keeps the uploads it takes, a witness too): its progress (its disks' bytes
//! converted), its cancel (which stops qemu-img) and its end are its task's. A task left
//! running by a process that ended is failed by its server when it sees it again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use control::library::{Upload, WorkDir};
use control::ova::{Arrived, OvaError};
use control::state_machine::{Action, Command, TaskKind, TaskOutcome, TaskState};
use hyper::{Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cluster::{now_ms, Proposer};
use crate::http::{json_response, ok, ApiError, Body, Request};
use crate::routes::{new_library_entry, App, Caller, MAX_ISO, MAX_OVA};

/// The most resumable uploads open on a server at once.
pub const MAX_OPEN: usize = 8;
/// How long an open upload waits for its next part before it is forgotten.
pub const IDLE: Duration = Duration::from_secs(3600);

/// What an upload becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UploadKind {
    /// An ISO image of the library.
    Iso,
    /// A Virtual Appliance: an OVA, or the original product's zip.
    Appliance,
}

impl UploadKind {
    /// Its name in messages.
    fn word(self) -> &'static str {
        match self {
            UploadKind::Iso => "ISO",
            UploadKind::Appliance => "appliance",
        }
    }
}

/// `POST /api/v1/uploads`: a resumable upload to open.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUpload {
    kind: UploadKind,
    name: String,
    size: u64,
}

/// An open upload as the API shows it.
#[derive(Debug, Serialize)]
pub struct UploadView {
    /// Its id.
    pub id: String,
    /// What it becomes.
    pub kind: UploadKind,
    /// The ISO's or appliance's name.
    pub name: String,
    /// Its bytes in all.
    pub size: u64,
    /// The bytes this server holds: the next part starts there.
    pub received: u64,
    /// The server it is open on.
    pub server: u64,
}

/// The imports and resumable uploads of this server.
#[derive(Default)]
pub struct Uploads {
    /// Imports running here, by their upload's name: their cancels.
    running: Arc<Mutex<HashMap<String, Arc<AtomicBool>>>>,
    /// Resumable uploads open here, by id: who opened each (it never changes), and the upload.
    open: Mutex<HashMap<String, (u64, Shared)>>,
}

/// An open upload, locked by the request sending a part of it.
type Shared = Arc<tokio::sync::Mutex<Open>>;

/// A resumable upload open on this server.
struct Open {
    id: String,
    kind: UploadKind,
    name: String,
    size: u64,
    received: u64,
    touched: Instant,
    started: Instant,
    /// The file being written (taken when it is whole).
    file: Option<Upload>,
    /// An archive's work directory (the archive, then its converted disks).
    work: Option<WorkDir>,
    /// An archive's reader, fed as it arrives.
    reader: Option<Reader>,
    /// Once its last byte is in: what it became, until the cluster takes it.
    whole: Option<Whole>,
}

/// An upload whose last byte is in, durable, waiting for the cluster to take it. A refusal
/// (its name taken meanwhile, the most imports running, no leader for now) keeps it here, and
/// an empty part at its end asks again; taken, it is `None`.
enum Whole {
    /// An ISO, to list.
    Iso(Option<control::library::Sealed>),
    /// An archive to import: its work directory, its file, what it was read as.
    Archive(Option<(WorkDir, control::library::Sealed, Arrived)>),
}

impl Whole {
    fn taken(&self) -> bool {
        matches!(self, Whole::Iso(None) | Whole::Archive(None))
    }
}

impl Open {
    fn view(&self, server: u64) -> UploadView {
        UploadView {
            id: self.id.clone(),
            kind: self.kind,
            name: self.name.clone(),
            size: self.size,
            received: self.received,
            server,
        }
    }
}

/// An archive read as it arrives (`ova::arrive`), on a thread of its own.
pub struct Reader {
    /// Where its bytes go; closed, the reader ends.
    pub tee: SyncSender<Bytes>,
    read: tokio::task::JoinHandle<Result<Arrived, OvaError>>,
}

impl Reader {
    /// Starts reading an archive of `packed` bytes, its stream-optimized VMDKs decoded into
    /// `unpack` on the way.
    pub fn start(packed: u64, unpack: control::ova::Unpack) -> Reader {
        let (tee, arriving) = std::sync::mpsc::sync_channel(64);
        let read = tokio::task::spawn_blocking(move || {
            control::ova::arrive(control::ova::Arriving::new(arriving), packed, Some(&unpack))
        });
        Reader { tee, read }
    }

    /// What it read, once every byte was given (or what stopped it).
    pub async fn finish(self) -> Result<Arrived, OvaError> {
        drop(self.tee);
        self.read.await.map_err(|e| OvaError::Io {
            what: "reading the archive".into(),
            source: std::io::Error::other(e.to_string()),
        })?
    }
}

/// The API's error for an import that failed: a refused archive 422, a cancel 409, this
/// server's own failure 500.
pub fn ova_failure(what: &str, e: OvaError) -> ApiError {
    match e {
        OvaError::Refused(why) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{what}: refused: {why}"),
        ),
        OvaError::Cancelled => ApiError::new(StatusCode::CONFLICT, format!("{what}: cancelled")),
        e @ OvaError::Io { .. } => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{what}: {e}"))
        }
    }
}

/// Reads `length` bytes of an upload's body (`what`) into `up` as they arrive, each part also
/// given to `tee` if there is one; `kept` counts the bytes written (those of a body that broke
/// off stay). Each part must come within `timeout`. Once `tee`'s reader has stopped (it
/// refused the archive) the rest is read and dropped, so the client hears why, and the answer
/// is 422.
pub async fn pour(
    body: &mut hyper::body::Incoming,
    what: &str,
    length: u64,
    up: &mut Upload,
    tee: Option<&SyncSender<Bytes>>,
    timeout: Duration,
    kept: &mut u64,
) -> Result<(), ApiError> {
    use http_body_util::BodyExt;
    let store = |e: std::io::Error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("storing {what}: {e}"),
        )
    };
    let mut told = Instant::now();
    // Bytes of this body; once `tee`'s reader has refused the upload, they are no longer kept.
    let (mut seen, mut refused) = (0u64, false);
    loop {
        let frame = tokio::time::timeout(timeout, body.frame())
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "{what}: nothing arrived for {} s after {seen} of {length} bytes",
                        timeout.as_secs(),
                    ),
                )
            })?;
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| {
            ApiError::bad_request(format!(
                "{what}: the upload broke off after {seen} of {length} bytes: {e}"
            ))
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len() as u64;
        if seen > length {
            return Err(ApiError::bad_request(format!(
                "{what}: more bytes than its Content-Length of {length}"
            )));
        }
        if refused {
            continue;
        }
        let n = data.len() as u64;
        tokio::task::block_in_place(|| up.write(&data)).map_err(store)?;
        *kept += n;
        // A reader of the upload as it arrives that has stopped refused it: so does this.
        if let Some(tee) = tee {
            refused = tokio::task::block_in_place(|| tee.send(data)).is_err();
        }
        if told.elapsed() > Duration::from_secs(2) {
            told = Instant::now();
            tracing::info!(upload = %what, bytes = seen, of = length, "upload progress");
        }
    }
    if seen != length {
        return Err(ApiError::bad_request(format!(
            "{what}: the upload ended after {seen} of {length} bytes"
        )));
    }
    if refused {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{what}: refused as it arrived"),
        ));
    }
    Ok(())
}

/// The answer when `MAX_OPEN` uploads are open.
fn too_many_open() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("{MAX_OPEN} uploads are open on this server, the most at once: finish or delete one first"),
    )
}

/// 503 when the cluster imports the most uploads it does at once already: an archive is not
/// taken (its bytes sent for nothing) when its import could not begin.
pub fn imports_have_room(state: &control::state_machine::StateMachine) -> Result<(), ApiError> {
    let running = state.running_tasks(|k| matches!(k, TaskKind::Import { .. }));
    if running >= control::state_machine::MAX_UPLOAD_IMPORTS {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{running} uploads are being imported, the most at once: send this one when one ends"),
        ));
    }
    Ok(())
}

/// A request's Content-Length, which an upload needs.
pub fn content_length(req: &Request) -> Result<u64, ApiError> {
    req.header("content-length")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::LENGTH_REQUIRED,
                "an upload needs its Content-Length",
            )
        })
}

impl App {
    /// A new work directory in this server's library, for an archive and its disks.
    pub(crate) fn import_work(&self) -> Result<WorkDir, ApiError> {
        let dir = self.cluster.library_dir();
        let internal = |what: String| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, what);
        std::fs::create_dir_all(&dir)
            .map_err(|e| internal(format!("creating {}: {e}", dir.display())))?;
        WorkDir::new(&dir)
            .map_err(|e| internal(format!("a work directory in {}: {e}", dir.display())))
    }

    /// Where an archive arriving in `work`, into file `up`, has its stream-optimized VMDKs
    /// decoded.
    pub(crate) fn unpack_into(&self, work: &WorkDir, up: &Upload) -> control::ova::Unpack {
        control::ova::Unpack {
            work: work.path().to_path_buf(),
            library: self.cluster.library_dir(),
            archive: Some(up.path().to_path_buf()),
        }
    }

    /// `POST /api/v1/uploads`: opens a resumable upload (Managers).
    pub(crate) async fn open_upload(&self, req: &Request) -> Result<Response<Body>, ApiError> {
        let c = self.caller(req, true).await?;
        let n: NewUpload = req.json()?;
        let (exists, max) = match n.kind {
            UploadKind::Iso => (c.state.isos.contains_key(&n.name), MAX_ISO),
            UploadKind::Appliance => (c.state.appliances.contains_key(&n.name), MAX_OVA),
        };
        new_library_entry(&c, n.kind.word(), &n.name, exists)?;
        let what = format!("{} {}", n.kind.word(), n.name);
        if n.size == 0 {
            return Err(ApiError::bad_request(format!("{what} is empty")));
        }
        if n.size > max {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("{what}: {} bytes is over the {max}-byte limit", n.size),
            ));
        }
        let open_now = self
            .uploads
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        if open_now >= MAX_OPEN {
            return Err(too_many_open());
        }
        if n.kind == UploadKind::Appliance {
            imports_have_room(&c.state)?;
        }
        let internal = |e: std::io::Error| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("opening the upload of {what}: {e}"),
            )
        };
        let (file, work, reader) = match n.kind {
            UploadKind::Iso => {
                let dir = self.cluster.library_dir();
                std::fs::create_dir_all(&dir).map_err(internal)?;
                let f = Upload::new(&dir, control::library::Shelf::Iso).map_err(internal)?;
                (f, None, None)
            }
            UploadKind::Appliance => {
                let work = self.import_work()?;
                let f = Upload::scratch(work.path()).map_err(internal)?;
                let reader = Reader::start(n.size, self.unpack_into(&work, &f));
                (f, Some(work), Some(reader))
            }
        };
        let id = crate::auth::hex(&crate::auth::random_bytes::<16>());
        let open = Open {
            id: id.clone(),
            kind: n.kind,
            name: n.name,
            size: n.size,
            received: 0,
            touched: Instant::now(),
            started: Instant::now(),
            file: Some(file),
            work,
            reader,
            whole: None,
        };
        let view = open.view(self.cluster.id());
        {
            let mut all = self.uploads.open.lock().unwrap_or_else(|p| p.into_inner());
            if all.len() >= MAX_OPEN {
                return Err(too_many_open());
            }
            all.insert(
                id.clone(),
                (c.user.id, Arc::new(tokio::sync::Mutex::new(open))),
            );
        }
        tracing::info!(upload = %id, %what, bytes = view.size, "upload opened");
        Ok(json_response(StatusCode::CREATED, &view))
    }

    /// Open upload `id` if the caller opened it; 404 otherwise.
    fn open_of(&self, c: &Caller, id: &str) -> Result<Shared, ApiError> {
        let all = self.uploads.open.lock().unwrap_or_else(|p| p.into_inner());
        match all.get(id) {
            Some((owner, o)) if *owner == c.user.id => Ok(Arc::clone(o)),
            _ => Err(ApiError::not_found(format!(
                "no open upload {id:.40} on this server"
            ))),
        }
    }

    /// `GET /api/v1/uploads/{id}`: how much of it this server holds.
    pub(crate) async fn upload_status(
        &self,
        req: &Request,
        id: &str,
    ) -> Result<Response<Body>, ApiError> {
        let c = self.caller(req, false).await?;
        let open = self.open_of(&c, id)?;
        let o = open.lock().await;
        Ok(ok(&o.view(self.cluster.id())))
    }

    /// `DELETE /api/v1/uploads/{id}`: gives it up; its bytes are deleted.
    pub(crate) async fn close_upload(
        &self,
        req: &Request,
        id: &str,
    ) -> Result<Response<Body>, ApiError> {
        let c = self.caller(req, true).await?;
        let open = self.open_of(&c, id)?;
        let o = open.try_lock().map_err(|_| {
            ApiError::new(
                StatusCode::CONFLICT,
                format!("upload {id:.40}: a part is arriving; delete it once that ends"),
            )
        })?;
        drop(o);
        self.forget(id);
        tracing::info!(upload = %id, "upload given up");
        Ok(ok(&serde_json::json!({ "deleted": id })))
    }

    /// `PATCH /api/v1/uploads/{id}`: the part of the upload starting at its `Upload-Offset`.
    /// Answers 200 with what this server now holds; with the last byte, 201 with the ISO or
    /// 202 with the appliance's import task.
    pub(crate) async fn upload_part(
        &self,
        req: &mut Request,
        id: &str,
    ) -> Result<Response<Body>, ApiError> {
        let c = self.caller(req, true).await?;
        let open = self.open_of(&c, id)?;
        let mut o = open.try_lock_owned().map_err(|_| {
            ApiError::new(
                StatusCode::CONFLICT,
                format!("upload {id:.40}: another part is arriving; send this one after it"),
            )
        })?;
        let what = format!("{} {}", o.kind.word(), o.name);
        let offset: u64 = req
            .header("upload-offset")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                ApiError::bad_request(format!("{what}: a part needs its Upload-Offset header"))
            })?;
        if offset != o.received {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "{what}: this server holds {} bytes of it: send the part from there (Upload-Offset: {})",
                    o.received, o.received
                ),
            ));
        }
        let length = content_length(req)?;
        let left = o.size - o.received;
        // An empty part at the end asks again for what a refusal left waiting.
        let again = left == 0 && length == 0;
        if !again && (length == 0 || length > left) {
            return Err(ApiError::bad_request(format!(
                "{what}: a part of {length} bytes from {offset}: 1 to the {left} bytes left"
            )));
        }
        if !again {
            if let Some(r) = self.take_part(req, &what, id, &mut o, length).await? {
                return Ok(r);
            }
        }
        let (name, started, size) = (o.name.clone(), o.started, o.size);
        let answer = match o.whole.as_mut() {
            Some(w) if w.taken() => Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("{what}: it was taken already: see its task, or the library"),
            )),
            Some(Whole::Archive(parts)) => {
                match self.start_import(&c, &name, parts, started).await {
                    Ok((task, _done)) => self
                        .task_view(task, &c.user)
                        .await
                        .map(|view| json_response(StatusCode::ACCEPTED, &view)),
                    Err(e) => Err(e),
                }
            }
            Some(Whole::Iso(sealed)) => self.list_iso(&c, &name, sealed, started).await,
            // Its last part's request was dropped while the upload was being made whole.
            None => Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("{what}: its end was cut short as it was being stored: upload it again"),
            )),
        };
        match answer {
            Err(e) if o.whole.as_ref().is_some_and(|w| !w.taken()) => {
                o.touched = Instant::now();
                Err(ApiError {
                    message: format!(
                        "{} (the upload is kept: send an empty part with Upload-Offset: {size} to ask again, or delete it)",
                        e.message
                    ),
                    ..e
                })
            }
            answer => {
                self.forget(id);
                answer
            }
        }
    }

    /// Pours the part of `req` (`length` bytes) into open upload `o` (`what`, `id`). Answers
    /// what to say when the upload is not whole yet; with its last byte, makes it whole
    /// (`Open::whole`) and answers nothing.
    async fn take_part(
        &self,
        req: &mut Request,
        what: &str,
        id: &str,
        o: &mut Open,
        length: u64,
    ) -> Result<Option<Response<Body>>, ApiError> {
        let mut body = req
            .stream
            .take()
            .ok_or_else(|| ApiError::bad_request("no upload body"))?;
        let tee = o.reader.as_ref().map(|r| r.tee.clone());
        let Some(file) = o.file.as_mut() else {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("{what}: it has ended"),
            ));
        };
        let mut kept = 0;
        let poured = pour(
            &mut body,
            what,
            length,
            file,
            tee.as_ref(),
            self.cfg.timeout,
            &mut kept,
        )
        .await;
        drop(tee);
        o.received += kept;
        o.touched = Instant::now();
        // Its work directory is in use (the library's clean-up takes old ones for leftovers).
        if let Some(w) = &o.work {
            if let Ok(d) = std::fs::File::open(w.path()) {
                let _ = d.set_modified(std::time::SystemTime::now());
            }
        }
        match poured {
            Ok(()) => {}
            // This server could not store it: what it holds is no longer whole; it ends.
            Err(e) if e.status == StatusCode::INTERNAL_SERVER_ERROR => {
                self.forget(id);
                return Err(e);
            }
            Err(e) if e.status == StatusCode::UNPROCESSABLE_ENTITY => {
                // The archive's reader refused it: the upload ends here, with its reason.
                self.forget(id);
                return Err(match o.reader.take() {
                    Some(r) => match r.finish().await {
                        Err(why) => ova_failure(what, why),
                        Ok(_) => e,
                    },
                    None => e,
                });
            }
            // What arrived is kept: the next part starts after it.
            Err(e) => return Err(e),
        }
        if o.received < o.size {
            return Ok(Some(ok(&o.view(self.cluster.id()))));
        }
        // Its last byte: made whole and durable (an archive read to its end), or it ends.
        let made = match (o.file.take(), o.work.take(), o.reader.take()) {
            (Some(file), Some(work), Some(reader)) => match reader.finish().await {
                Ok(arrived) => match tokio::task::block_in_place(|| file.seal()) {
                    Ok(archive) => Ok(Whole::Archive(Some((work, archive, arrived)))),
                    Err(e) => Err(crate::routes::storing(what, work.path(), e)),
                },
                Err(why) => Err(ova_failure(what, why)),
            },
            (Some(file), None, None) => {
                let dir = self.cluster.library_dir();
                tokio::task::block_in_place(|| file.seal())
                    .map(|sealed| Whole::Iso(Some(sealed)))
                    .map_err(|e| crate::routes::storing(what, &dir, e))
            }
            _ => Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{what}: its parts were taken"),
            )),
        };
        match made {
            Ok(whole) => {
                o.whole = Some(whole);
                Ok(None)
            }
            Err(e) => {
                self.forget(id);
                Err(e)
            }
        }
    }

    /// Forgets open upload `id` (its lock may still be held by the request ending it).
    fn forget(&self, id: &str) {
        self.uploads
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Begins the import of archive `parts` (in its work directory, the archive, what it was
    /// read as) into appliance `name`, for `c`: a task of this server, run on a thread of its
    /// own. Answers the task's id and the import's end. `parts` is taken only once the cluster
    /// took the task: refused, it is left for another attempt.
    pub(crate) async fn start_import(
        &self,
        c: &Caller,
        name: &str,
        parts: &mut Option<(WorkDir, control::library::Sealed, Arrived)>,
        started: Instant,
    ) -> Result<(u64, tokio::task::JoinHandle<Result<(), OvaError>>), ApiError> {
        let Some(bytes) = parts.as_ref().map(|p| p.1.size) else {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("appliance {name}: its archive was taken"),
            ));
        };
        // Known as running here before its task exists, until its import ends (or this request
        // is dropped before it began, or the import panics): a task of this server whose upload
        // is not known here is one no import runs for, failed by `watch`.
        let upload = crate::auth::hex(&crate::auth::random_bytes::<16>());
        let running = Running::register(&self.uploads.running, &upload);
        let cancel = Arc::clone(&running.cancel);
        let acted = self
            .cluster
            .act(
                c.user.id,
                Action::ImportUpload {
                    name: name.to_string(),
                    upload: upload.clone(),
                    bytes,
                    server: self.cluster.id(),
                },
            )
            .await;
        let task = acted?.get("task").and_then(Value::as_u64).unwrap_or(0);
        let (work, archive, arrived) = parts.take().expect("checked above");
        tracing::info!(appliance = %name, task, bytes, ms = started.elapsed().as_millis() as u64, "archive received and read; importing");
        let proposer = self.cluster.proposer();
        let library = self.cluster.library_dir();
        let who = name.to_string();
        let done = tokio::task::spawn_blocking(move || {
            let r = run_import(
                &proposer, task, &who, &archive, arrived, &work, &library, &cancel,
            );
            drop(archive);
            drop(work);
            drop(running);
            tracing::info!(appliance = %who, task, ms = started.elapsed().as_millis() as u64, ok = r.is_ok(), "import ended");
            r
        });
        Ok((task, done))
    }
}

/// An import known to run on this server (`Uploads::running`) for as long as this lives.
struct Running {
    all: Arc<Mutex<HashMap<String, Arc<AtomicBool>>>>,
    upload: String,
    cancel: Arc<AtomicBool>,
}

impl Running {
    fn register(all: &Arc<Mutex<HashMap<String, Arc<AtomicBool>>>>, upload: &str) -> Running {
        let cancel = Arc::new(AtomicBool::new(false));
        all.lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(upload.to_string(), Arc::clone(&cancel));
        Running {
            all: Arc::clone(all),
            upload: upload.to_string(),
            cancel,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.all
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.upload);
    }
}

/// Imports archive `archive` (read as `arrived`) into this server's `library`, converting in
/// `work`, as task `id`: tells its progress (at most once a second) and its end, its disks
/// put in place first (kept from the library's clean-up until the cluster has answered).
#[allow(clippy::too_many_arguments)]
fn run_import(
    p: &Proposer,
    id: u64,
    name: &str,
    archive: &control::library::Sealed,
    arrived: Arrived,
    work: &WorkDir,
    library: &std::path::Path,
    cancel: &AtomicBool,
) -> Result<(), OvaError> {
    let told = std::cell::Cell::new(None::<Instant>);
    let bytes = |done: u64, total: u64| {
        let due = told
            .get()
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1) || done == total);
        if due {
            told.set(Some(Instant::now()));
            p.propose(Command::TaskProgress {
                id,
                server: p.id,
                done_bytes: done,
                total_bytes: Some(total),
            });
        }
    };
    let step = |step: String| tracing::info!(appliance = %name, task = id, %step, "import");
    let watch = control::ova::Watch {
        step: &step,
        bytes: &bytes,
        cancel,
    };
    let imported = control::ova::import_arrived(
        archive.path(),
        arrived,
        &work.path().join("disks"),
        library,
        &watch,
    );
    let imported = imported.and_then(|i| {
        // Its name and origin are the task's.
        let appliance = i.appliance("", String::new());
        let placed = control::library::Sealed::place_all(i.disks).map_err(|e| OvaError::Io {
            what: "putting the disks in place".into(),
            source: e,
        })?;
        Ok((appliance, placed))
    });
    let outcome = match &imported {
        Ok((appliance, _)) => TaskOutcome::Imported {
            appliance: appliance.clone(),
        },
        Err(OvaError::Refused(why)) => TaskOutcome::Failed {
            reason: format!("refused: {why}"),
        },
        Err(e) => TaskOutcome::Failed {
            reason: e.to_string(),
        },
    };
    let ended = Command::TaskEnded {
        id,
        server: p.id,
        at_ms: now_ms(),
        outcome,
    };
    // Told until the cluster takes it (a task left running is no one's) or refuses it (it
    // ended otherwise: failed with its server, or told by an attempt whose answer was lost),
    // for ten minutes at most.
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut told = loop {
        match p.propose_outcome(ended.clone()) {
            control::api::Proposed::Taken => break true,
            control::api::Proposed::Refused => break false,
            control::api::Proposed::Unknown if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_secs(1))
            }
            control::api::Proposed::Unknown => break false,
        }
    };
    if !told {
        told = p
            .task(id)
            .is_some_and(|t| matches!(t.state, TaskState::Done { .. }));
    }
    // Listed now (or refused, and then deleted as unlisted files).
    let (_, _placed) = imported?;
    if !told {
        tracing::warn!(appliance = %name, task = id, "import ended, but the cluster did not take its end (cancelled or failed meanwhile)");
    }
    Ok(())
}

/// Watches this server's imports and open uploads, every two seconds: passes a task's cancel
/// on to its import; fails a task of this server whose import no longer runs here (its process
/// ended); forgets the uploads idle for `IDLE`.
pub async fn watch(app: Arc<App>) {
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let Ok(state) = app.cluster.state().await else {
            continue;
        };
        let me = app.cluster.id();
        let running = app
            .uploads
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut orphans = Vec::new();
        for t in state.tasks.values().filter(|t| t.server == me) {
            let TaskKind::Import { upload, .. } = &t.kind else {
                continue;
            };
            match (running.get(upload), &t.state) {
                (Some(cancel), TaskState::Running) if t.cancel => {
                    cancel.store(true, Ordering::Relaxed)
                }
                // Failed by the cluster meanwhile: it stops too.
                (Some(cancel), TaskState::Failed { .. }) => cancel.store(true, Ordering::Relaxed),
                (None, TaskState::Running) => orphans.push(t.id),
                _ => {}
            }
        }
        for id in orphans {
            tracing::warn!(
                task = id,
                "an import of this server no longer runs: failing its task"
            );
            let p = app.cluster.proposer();
            let _ = tokio::task::spawn_blocking(move || {
                p.propose(Command::TaskEnded {
                    id,
                    server: p.id,
                    at_ms: now_ms(),
                    outcome: TaskOutcome::Failed {
                        reason: format!(
                            "server {} restarted during the import: upload the archive again",
                            p.id
                        ),
                    },
                })
            })
            .await;
        }
        let idle: Vec<String> = {
            let open = app.uploads.open.lock().unwrap_or_else(|p| p.into_inner());
            open.iter()
                .filter(|(_, (_, o))| o.try_lock().is_ok_and(|o| o.touched.elapsed() > IDLE))
                .map(|(id, _)| id.clone())
                .collect()
        };
        for id in idle {
            tracing::info!(upload = %id, "upload idle too long: forgotten");
            app.forget(&id);
        }
    }
}
