//! The `enspeed` command as a client of the REST API, the way `qm` or `gnt-instance` feel:
//!
//! ```text
//!   enspeed vm list                     enspeed vm create NAME --memory 512 --disk 8 [--start]
//!   enspeed vm show ID                  enspeed vm start|stop|force-stop ID
//!   enspeed vm delete ID
//!   enspeed user list                   enspeed user create NAME --role regular
//!   enspeed user delete ID              enspeed user passwd ID
//!   enspeed servers [add ADDR --token T | drain ID | remove ID]   enspeed audit
//!   enspeed vm cdrom ID [ISO]           (no ISO: eject)
//!   enspeed vm console ID               (the serial console; Ctrl-] leaves)
//!   enspeed iso list                    enspeed iso upload FILE [--name NAME]
//!   enspeed iso delete NAME
//! ```
//!
//! Each command logs in (`--user`, the password from `ENSPEED_PASSWORD` or
//! `--password-file`), does its request with the session's CSRF token, and logs out. `--url`
//! (or `ENSPEED_URL`) names any server; over HTTPS, `--ca-cert` trusts that server's
//! certificate (DATA/web/tls/cert.pem).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

/// Where the API is and who logs in.
#[derive(Args, Debug, Clone)]
pub struct Login {
    /// Any server's API.
    #[arg(
        long,
        global = true,
        env = "ENSPEED_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub url: String,
    /// Log in as.
    #[arg(long, global = true, env = "ENSPEED_USER", default_value = "admin")]
    pub user: String,
    /// A file whose first line is the password (else ENSPEED_PASSWORD).
    #[arg(long, global = true, env = "ENSPEED_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// Trust this certificate (PEM) for HTTPS: the server's DATA/web/tls/cert.pem.
    #[arg(long, global = true)]
    pub ca_cert: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// `enspeed vm`.
#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// The VMs you see, read from the API a page at a time.
    List {
        /// VMs a request reads (1 to 1000, the API's most).
        #[arg(
            long,
            default_value_t = crate::routes::MAX_PAGE,
            value_parser = clap::value_parser!(u64).range(1..=crate::routes::MAX_PAGE)
        )]
        page: u64,
    },
    /// One VM, whole.
    Show {
        /// VMID.
        id: u64,
    },
    /// Create a VM (its disk is mirrored on two servers).
    Create {
        /// Name.
        name: String,
        /// Memory, MiB (default: 512, or the appliance's).
        #[arg(long)]
        memory: Option<u64>,
        /// vCPUs (default: 1, or the appliance's).
        #[arg(long)]
        vcpus: Option<u32>,
        /// Disk0, GiB (default: 8, or the appliance's image's size).
        #[arg(long)]
        disk: Option<u64>,
        /// An appliance of the library: its disks start as its images; its memory, vCPUs,
        /// firmware and disk bus are the defaults.
        #[arg(long, conflicts_with = "blank")]
        appliance: Option<String>,
        /// Disk1-3, GiB each: repeat it for each disk (up to three).
        #[arg(long = "extra-disk", value_name = "GIB")]
        extra_disk: Vec<u64>,
        /// Owner's user id (default: you).
        #[arg(long)]
        owner: Option<u64>,
        /// Power it on once created.
        #[arg(long)]
        start: bool,
        /// A blank PC that boots its disk or CD through its BIOS, instead of the cluster's
        /// guest kernel.
        #[arg(long)]
        blank: bool,
        /// An ISO of the library in its CD-ROM drive.
        #[arg(long)]
        iso: Option<String>,
        /// With --blank: boot the CD-ROM before the disk.
        #[arg(long, requires = "blank")]
        cdrom_first: bool,
        /// With --blank: UEFI firmware (OVMF) instead of the BIOS.
        #[arg(long, requires = "blank")]
        uefi: bool,
        /// With --blank: its disks on the SATA controller instead of virtio (for installers
        /// without virtio drivers).
        #[arg(long, requires = "blank")]
        sata: bool,
        /// A network card on this network (again for more cards, up to 4, in order).
        #[arg(long = "net", value_name = "NETWORK")]
        net: Vec<String>,
    },
    /// Change a powered-off VM: memory, vCPUs, how it boots, more disks.
    Edit {
        /// VMID.
        id: u64,
        /// Memory, MiB.
        #[arg(long)]
        memory: Option<u64>,
        /// vCPUs.
        #[arg(long)]
        vcpus: Option<u32>,
        /// Boot: kernel (the cluster's guest system), or bios or uefi (a blank PC's disk and CD
        /// through that firmware).
        #[arg(long)]
        boot: Option<String>,
        /// With bios or uefi: disk_first or cdrom_first.
        #[arg(long)]
        boot_order: Option<String>,
        /// With bios or uefi: the controller of its disks, virtio or sata.
        #[arg(long)]
        disk_bus: Option<String>,
        /// A new blank disk of this many GiB after its others (repeat it for more, up to Disk3).
        #[arg(long = "add-disk", value_name = "GIB")]
        add_disk: Vec<u64>,
        /// Grow disk N (0 for Disk0) to GIB GiB: N=GIB (repeat it for more disks).
        #[arg(long = "grow-disk", value_name = "N=GIB", value_parser = disk_growth)]
        grow_disk: Vec<(usize, u64)>,
    },
    /// Power on.
    Start {
        /// VMID.
        id: u64,
    },
    /// Power off: the guest is asked to shut down (ACPI), stopped hard after a timeout.
    Stop {
        /// VMID.
        id: u64,
    },
    /// Power off at once.
    ForceStop {
        /// VMID.
        id: u64,
    },
    /// Delete a powered-off VM and its disks.
    Delete {
        /// VMID.
        id: u64,
    },
    /// Back a VM up now, running or not, into a new appliance (a task: `enspeed task list`).
    Backup {
        /// VMID.
        id: u64,
        /// The appliance's name (default: the VM's and the time, UTC).
        #[arg(long)]
        name: Option<String>,
    },
    /// Back a VM up on a schedule: every HOURS, the newest KEEP kept; --off ends it.
    BackupSchedule {
        /// VMID.
        id: u64,
        /// Hours between backups.
        #[arg(long, required_unless_present = "off")]
        every: Option<u32>,
        /// Backups kept.
        #[arg(long, default_value_t = 7)]
        keep: u32,
        /// No more scheduled backups.
        #[arg(long, conflicts_with = "every")]
        off: bool,
    },
    /// Copy a powered-off VM (its disk's data too) into a new VM.
    Clone {
        /// The source's VMID.
        id: u64,
        /// The new VM's name.
        name: String,
        /// The new VM's owner (default: you).
        #[arg(long)]
        owner: Option<u64>,
    },
    /// Move a VM to its backup server (its disk's in-sync copy): a running VM moves live (`vm
    /// show` tells how far it is).
    Migrate {
        /// VMID.
        id: u64,
        /// The longest pause a live migration may take, ms (50 by default).
        #[arg(long)]
        downtime_ms: Option<u64>,
        /// Slow a guest whose memory changes faster than the copy goes until it converges,
        /// instead of giving up.
        #[arg(long)]
        auto_converge: bool,
        /// The server to move to (its disks' backup server by default); another server first
        /// gets new copies of the disks, synced while the VM runs.
        #[arg(long)]
        to: Option<u64>,
    },
    /// Give up a VM's live migration while its memory is still being copied: it runs on where
    /// it was.
    MigrateCancel {
        /// VMID.
        id: u64,
    },
    /// The VM's serial console in this terminal (Ctrl-] leaves it), through the API's
    /// WebSocket, like `qm terminal`.
    Console {
        /// VMID.
        id: u64,
    },
    /// Put an ISO image of the library into the VM's CD-ROM drive; without ISO, eject it.
    Cdrom {
        /// VMID.
        id: u64,
        /// The ISO's name in the library.
        iso: Option<String>,
    },
}

/// `enspeed iso`.
#[derive(Subcommand, Debug)]
pub enum IsoCommand {
    /// The ISO library.
    List,
    /// Upload an ISO image (Managers), showing its progress; every VM server then copies it.
    Upload {
        /// The image.
        file: PathBuf,
        /// Its name in the library (default: the file's name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Delete an ISO image no VM's CD-ROM holds (Managers).
    Delete {
        /// Its name.
        name: String,
    },
}

/// `enspeed appliance`.
#[derive(Subcommand, Debug)]
pub enum ApplianceCommand {
    /// The appliance library (as far as you may use it).
    List,
    /// Import an OVA (Managers), showing the upload's progress; its disks are converted to
    /// raw images, then every VM server copies them.
    Import {
        /// The OVA.
        file: PathBuf,
        /// Its name in the library (default: the file's name without .ova).
        #[arg(long)]
        name: Option<String>,
    },
    /// Download an OVA from a URL into a new appliance (Managers): a task on a VM server
    /// (`enspeed task list` shows its progress).
    Download {
        /// The new appliance's name.
        name: String,
        /// Where the OVA is (http:// or https://).
        from: String,
        /// Its SHA-256, hex: refused if the download differs.
        #[arg(long)]
        sha256: Option<String>,
    },
    /// What an appliance directory offers (Managers): its catalogue at URL, a JSON list of
    /// name, description, size, sha256, url (`appliance download NAME URL --sha256 ...` takes
    /// one).
    Directory {
        /// The catalogue's URL.
        catalogue: String,
    },
    /// Download an appliance as an OVA (Managers).
    Export {
        /// Its name.
        name: String,
        /// Where (default: NAME.ova here).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Change an appliance (Managers): its description, the VM it makes, whom it is shared
    /// with.
    Edit {
        /// Its name.
        name: String,
        /// Its description.
        #[arg(long)]
        description: Option<String>,
        /// Memory of the VMs made from it, MiB.
        #[arg(long)]
        memory: Option<u64>,
        /// Their vCPUs.
        #[arg(long)]
        vcpus: Option<u32>,
        /// Share it with these Power Users' companies (user ids, comma-separated; empty: with
        /// no one).
        #[arg(long, value_delimiter = ',', num_args = 0..)]
        share: Option<Vec<u64>>,
    },
    /// Delete an appliance (Managers).
    Delete {
        /// Its name.
        name: String,
    },
    /// Copy a powered-off VM back into a new appliance (a task: `enspeed task list`).
    CopyBack {
        /// The VM's VMID.
        vm: u64,
        /// The new appliance's name.
        name: String,
        /// Its description.
        #[arg(long, default_value = "")]
        description: String,
    },
}

/// `enspeed task`.
#[derive(Subcommand, Debug)]
pub enum TaskCommand {
    /// Long operations you may see, newest first, with their progress.
    List,
    /// Stop a running task (a Manager, or who asked for it).
    Cancel {
        /// Its id.
        id: u64,
    },
}

/// `enspeed network`.
#[derive(Subcommand, Debug)]
pub enum NetworkCommand {
    /// The networks you may put VMs on.
    List,
    /// Define a network (Managers): a bridge of that name on every VM server.
    Create {
        /// Its name.
        name: String,
        /// The bridge each VM server builds for it (at most 15 characters).
        #[arg(long)]
        bridge: String,
        /// The host NIC the bridge is built over, the same on every VM server.
        #[arg(long)]
        uplink: Option<String>,
        /// Its 802.1Q VLAN on the uplink (1-4094).
        #[arg(long)]
        vlan: Option<u16>,
        /// Its IPv4 subnet, A.B.C.D/N: the cluster leases each VM card on it an address by
        /// DHCP (and lets it send from no other).
        #[arg(long)]
        subnet: Option<String>,
        /// The router the DHCP service names (default: the subnet's first address).
        #[arg(long, requires = "subnet")]
        gateway: Option<std::net::Ipv4Addr>,
        /// A DNS server the DHCP service names. Repeat for more (at most 4).
        #[arg(long, requires = "subnet")]
        dns: Vec<std::net::Ipv4Addr>,
        /// Only this Power User's company's VMs may use it (its id).
        #[arg(long)]
        company: Option<u64>,
    },
    /// Delete a network no VM is on (Managers).
    Delete {
        /// Its name.
        name: String,
    },
}

/// `enspeed user`.
#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// The users you see.
    List,
    /// Create a user; its password is read from ENSPEED_NEW_PASSWORD or --new-password-file.
    Create {
        /// Login name.
        name: String,
        /// manager, power_user or regular.
        #[arg(long, default_value = "regular")]
        role: String,
        /// A Regular User's Power User (Managers; a Power User's users are its own).
        #[arg(long)]
        parent: Option<u64>,
        /// A Power User's quota: VMs, memory MiB, disk GiB, as VMS,MIB,GIB.
        #[arg(long)]
        quota: Option<String>,
        /// The new user's password file.
        #[arg(long, env = "ENSPEED_NEW_PASSWORD_FILE")]
        new_password_file: Option<PathBuf>,
    },
    /// Set a user's password (ENSPEED_NEW_PASSWORD or --new-password-file).
    Passwd {
        /// User id.
        id: u64,
        /// The new password's file.
        #[arg(long, env = "ENSPEED_NEW_PASSWORD_FILE")]
        new_password_file: Option<PathBuf>,
    },
    /// Delete a user who owns no VM.
    Delete {
        /// User id.
        id: u64,
    },
}

/// A logged-in API session.
struct Session {
    base: String,
    agent: ureq::Agent,
    cookie: String,
    csrf: String,
}

fn password(file: &Option<PathBuf>, env: &str, what: &str) -> Result<String, String> {
    if let Some(f) = file {
        let t = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        return Ok(t.lines().next().unwrap_or("").to_string());
    }
    std::env::var(env).map_err(|_| format!("{what}: give a password file or set {env}"))
}

impl Session {
    fn open(l: &Login) -> Result<Session, String> {
        let mut b = ureq::AgentBuilder::new().timeout(Duration::from_secs(60));
        if let Some(ca) = &l.ca_cert {
            b = b.tls_config(client_tls(ca)?);
        }
        let agent = b.build();
        let base = l.url.trim_end_matches('/').to_string();
        let pw = password(&l.password_file, "ENSPEED_PASSWORD", "logging in")?;
        let r = agent
            .post(&format!("{base}/api/v1/session"))
            .send_json(json!({"name": l.user, "password": pw}));
        let resp = answer(r, "log in")?;
        let cookie = resp
            .header("set-cookie")
            .and_then(|c| c.split(';').next())
            .map(str::to_string)
            .ok_or("the login answer set no session cookie")?;
        let v: Value = resp
            .into_json()
            .map_err(|e| format!("the login answer: {e}"))?;
        let csrf = v["csrf_token"].as_str().unwrap_or("").to_string();
        Ok(Session {
            base,
            agent,
            cookie,
            csrf,
        })
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let req = self
            .agent
            .request(method, &format!("{}/api/v1{path}", self.base))
            .set("Cookie", &self.cookie)
            .set("X-CSRF-Token", &self.csrf);
        let r = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        let what = format!("{method} {path}");
        answer(r, &what)?
            .into_json()
            .map_err(|e| format!("{what}: the answer: {e}"))
    }

    /// GETs `path` into file `out` (a download), through a `.part` file renamed when whole;
    /// answers what was written.
    fn download(&self, path: &str, out: &std::path::Path) -> Result<Value, String> {
        let what = format!("GET {path}");
        let r = self
            .agent
            .request("GET", &format!("{}/api/v1{path}", self.base))
            .timeout(Duration::from_secs(24 * 3600))
            .set("Cookie", &self.cookie)
            .call();
        let resp = answer(r, &what)?;
        let part = out.with_extension("part");
        let mut f = std::fs::File::create(&part).map_err(|e| format!("{}: {e}", part.display()))?;
        let n = std::io::copy(&mut resp.into_reader(), &mut f).map_err(|e| {
            let _ = std::fs::remove_file(&part);
            format!("{what}: {e}")
        })?;
        f.sync_all()
            .and_then(|()| std::fs::rename(&part, out))
            .map_err(|e| format!("{}: {e}", out.display()))?;
        Ok(json!({ "file": out.display().to_string(), "bytes": n }))
    }

    /// Uploads `file` into the library as ISO or appliance (`kind`) `name`: a resumable upload
    /// (`/uploads`) sent in parts of `UPLOAD_PART` bytes, its progress on stderr; a part that
    /// fails on the way is sent again from where the server says, up to `UPLOAD_RETRIES` times
    /// in a row. Answers the ISO; for an appliance, the import's task once it ended, the
    /// appliance.
    fn upload(&self, kind: &str, name: &str, file: &std::path::Path) -> Result<Value, String> {
        use std::io::{Read, Seek};
        let shown = file.display();
        let mut f = std::fs::File::open(file).map_err(|e| format!("{shown}: {e}"))?;
        let size = f.metadata().map_err(|e| format!("{shown}: {e}"))?.len();
        let opened = self.call(
            "POST",
            "/uploads",
            Some(json!({"kind": kind, "name": name, "size": size})),
        )?;
        let id = opened["id"].as_str().unwrap_or_default().to_string();
        let path = format!("/uploads/{id}");
        let (started, mut retries, mut received) = (std::time::Instant::now(), 0, 0u64);
        let end = loop {
            let length = (size - received).min(UPLOAD_PART);
            f.seek(std::io::SeekFrom::Start(received))
                .map_err(|e| format!("{shown}: {e}"))?;
            let body = Progress {
                inner: (&mut f).take(length),
                sent: received,
                size,
                started,
                told: std::time::Instant::now(),
            };
            let r = self
                .agent
                .request("PATCH", &format!("{}/api/v1{path}", self.base))
                .timeout(Duration::from_secs(24 * 3600))
                .set("Cookie", &self.cookie)
                .set("X-CSRF-Token", &self.csrf)
                .set("Content-Type", "application/octet-stream")
                .set("Content-Length", &length.to_string())
                .set("Upload-Offset", &received.to_string())
                .send(body);
            let what = format!("uploading {shown} from byte {received}");
            match r {
                Ok(r) if r.status() == 200 => {
                    let v: Value = r.into_json().map_err(|e| format!("{what}: {e}"))?;
                    received = v["received"].as_u64().unwrap_or(received);
                    retries = 0;
                }
                Ok(r) => break r.into_json::<Value>().map_err(|e| format!("{what}: {e}"))?,
                // Broken on the way (the network, a timeout, the server busy), or refused at its
                // end and kept (the name taken meanwhile, the most imports running): again from
                // where the server is (at the end, an empty part asks again), while it holds the
                // upload, up to UPLOAD_RETRIES times; once it does not (refused as it arrived),
                // that is the answer.
                Err(e) => {
                    let said = answer(Err(e), &what).map(|_| ()).unwrap_err();
                    let Ok(held) = self.call("GET", &path, None) else {
                        eprintln!();
                        return Err(said);
                    };
                    retries += 1;
                    if retries > UPLOAD_RETRIES {
                        let _ = self.call("DELETE", &path, None);
                        return Err(format!("{said} ({UPLOAD_RETRIES} times in a row)"));
                    }
                    eprintln!("\n{said}; resuming");
                    std::thread::sleep(Duration::from_secs(2));
                    received = held["received"].as_u64().unwrap_or(received);
                }
            }
        };
        eprintln!();
        if kind == "iso" {
            return Ok(end);
        }
        // An appliance's import: a task, followed to its end.
        let task = end["id"].as_u64().unwrap_or(0);
        let mut unseen = 0;
        loop {
            let tasks = self.call("GET", "/tasks", None)?;
            let t = tasks
                .as_array()
                .and_then(|l| l.iter().find(|t| t["id"] == task))
                .cloned()
                .unwrap_or(Value::Null);
            if t.is_null() {
                unseen += 1;
                if unseen > 10 {
                    return Err(format!(
                        "importing appliance {name}: its task {task} is not listed"
                    ));
                }
            }
            match t["state"].as_str() {
                Some("running") | None => {
                    eprint!("\rimporting: {:>3}% ", t["percent"].as_u64().unwrap_or(0));
                    std::thread::sleep(Duration::from_secs(1));
                }
                Some("done") => {
                    eprintln!();
                    let all = self.call("GET", "/appliances", None)?;
                    return all
                        .as_array()
                        .and_then(|l| l.iter().find(|a| a["name"] == name))
                        .cloned()
                        .ok_or_else(|| format!("appliance {name}: imported, then gone"));
                }
                Some(_) => {
                    eprintln!();
                    return Err(format!(
                        "importing appliance {name}: {}",
                        t["reason"].as_str().unwrap_or("failed")
                    ));
                }
            }
        }
    }

    fn close(self) {
        let _ = self.call("DELETE", "/session", None);
    }
}

/// The bytes of a resumable upload's part (`Session::upload`).
const UPLOAD_PART: u64 = 256 << 20;
/// How many times in a row a part is sent again.
const UPLOAD_RETRIES: u32 = 5;

/// A file being sent, its progress printed on stderr about once a second.
struct Progress<R> {
    inner: R,
    sent: u64,
    size: u64,
    started: std::time::Instant,
    told: std::time::Instant,
}

impl<R: std::io::Read> std::io::Read for Progress<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sent += n as u64;
        if self.told.elapsed() >= Duration::from_secs(1) || self.sent == self.size {
            self.told = std::time::Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            eprint!(
                "\r{:>3}%  {} of {} MiB  {:.1} MiB/s ",
                (self.sent * 100).checked_div(self.size).unwrap_or(100),
                self.sent >> 20,
                self.size >> 20,
                self.sent as f64 / secs / (1 << 20) as f64
            );
        }
        Ok(n)
    }
}

/// The answer, or what the API said went wrong.
fn answer(r: Result<ureq::Response, ureq::Error>, what: &str) -> Result<ureq::Response, String> {
    match r {
        Ok(r) => Ok(r),
        Err(ureq::Error::Status(code, r)) => {
            let v: Value = r.into_json().unwrap_or(Value::Null);
            Err(format!(
                "{what}: {code}: {}",
                v["error"].as_str().unwrap_or("no reason given")
            ))
        }
        Err(e) => Err(format!("{what}: {e}")),
    }
}

fn client_tls(ca: &std::path::Path) -> Result<Arc<tokio_rustls::rustls::ClientConfig>, String> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::{self, RootCertStore};
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))? {
        let c = c.map_err(|e| format!("{}: {e}", ca.display()))?;
        roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(cfg))
}

fn run(
    l: &Login,
    f: impl FnOnce(&Session) -> Result<Value, String>,
    table: fn(&Value),
) -> ExitCode {
    let s = match Session::open(l) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("enspeed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = f(&s);
    s.close();
    match r {
        Ok(v) if l.json => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(v) => {
            table(&v);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("enspeed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn copy(v: &Value) -> String {
    if v.is_null() {
        return "-".into();
    }
    let pool = v["pool"].as_str().filter(|p| !p.is_empty());
    format!(
        "{}{}{}",
        s(&v["address"]),
        pool.map(|p| format!(":{p}")).unwrap_or_default(),
        if v["down"] == true { " (down)" } else { "" }
    )
}

fn replication(v: &Value) -> String {
    match (v["state"].as_str(), v["percent"].as_f64()) {
        (Some("resyncing"), Some(p)) => format!("resyncing {p:.1}%"),
        (Some(st), _) => st.to_string(),
        _ => "-".into(),
    }
}

fn vm_table(v: &Value) {
    let rows = v.as_array().cloned().unwrap_or_else(|| vec![v.clone()]);
    println!(
        "{:>5}  {:<20} {:<12} {:>6} {:>4}  {:<9} {:<24} {:<24} REPLICATION",
        "VMID", "NAME", "OWNER", "MiB", "CPU", "STATUS", "PRIMARY", "BACKUP"
    );
    for r in rows {
        println!(
            "{:>5}  {:<20} {:<12} {:>6} {:>4}  {:<9} {:<24} {:<24} {}",
            s(&r["id"]),
            s(&r["name"]),
            s(&r["owner_name"]),
            s(&r["memory_mib"]),
            s(&r["vcpus"]),
            s(&r["status"]),
            copy(&r["primary"]),
            copy(&r["backup"]),
            replication(&r["replication"]),
        );
    }
}

fn user_table(v: &Value) {
    let rows = v.as_array().cloned().unwrap_or_else(|| vec![v.clone()]);
    println!(
        "{:>4}  {:<20} {:<11} {:>7}  {:<22} VM",
        "ID", "NAME", "ROLE", "PARENT", "QUOTA (USED/LIMIT)"
    );
    for r in rows {
        let q = &r["quota"];
        let quota = if q.is_null() {
            "-".to_string()
        } else {
            format!(
                "{}/{} VMs {}/{} MiB {}/{} GiB",
                q["used_vms"],
                q["vms"],
                q["used_memory_mib"],
                q["memory_mib"],
                q["used_disk_gib"],
                q["disk_gib"]
            )
        };
        println!(
            "{:>4}  {:<20} {:<11} {:>7}  {:<22} {}",
            s(&r["id"]),
            s(&r["name"]),
            s(&r["role"]),
            s(&r["parent"]),
            quota,
            s(&r["vm"])
        );
    }
}

fn done(v: &Value) {
    println!("{}", serde_json::to_string(v).unwrap_or_default());
}

fn join_info(v: &Value) {
    println!("address: {}", v["address"].as_str().unwrap_or("?"));
    println!("token:   {}", v["token"].as_str().unwrap_or("?"));
}

fn server_table(v: &Value) {
    println!(
        "{:>3}  {:<22} {:<8} {:<6} {:>12}  {:>7} {:>6}  POOLS",
        "ID", "ADDRESS", "ROLE", "STATE", "MEMORY MiB", "PRIMARY", "BACKUP"
    );
    for r in v.as_array().cloned().unwrap_or_default() {
        let role = if r["witness"] == true {
            "witness"
        } else if r["leader"] == true {
            "leader"
        } else {
            "server"
        };
        let pools: Vec<String> = r["pools"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|p| {
                let path = p[0].as_str().filter(|p| !p.is_empty()).unwrap_or("default");
                format!("{path}={}GiB", s(&p[1]))
            })
            .collect();
        println!(
            "{:>3}  {:<22} {:<8} {:<6} {:>12}  {:>7} {:>6}  {}",
            s(&r["id"]),
            s(&r["address"]),
            role,
            if r["down"] == true { "down" } else { "up" },
            format!("{}/{}", s(&r["used_memory_mib"]), s(&r["memory_mib"])),
            s(&r["primary_vms"]),
            s(&r["backup_vms"]),
            pools.join(" ")
        );
    }
}

fn audit_table(v: &Value) {
    for r in v.as_array().cloned().unwrap_or_default() {
        println!(
            "{:>6}  {}  {:<12} {:<16} {}",
            s(&r["seq"]),
            s(&r["at_ms"]),
            s(&r["actor_name"]),
            s(&r["action"]),
            s(&r["target"])
        );
    }
}

/// Every VM the caller sees, in VMID order, read `page` at a time (`?after=VMID&limit=N`): no
/// one request's answer grows with the cluster.
fn vm_pages(s: &Session, page: u64) -> Result<Value, String> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let v = s.call("GET", &format!("/vms?after={after}&limit={page}"), None)?;
        let Value::Array(rows) = v else {
            return Err(format!("GET /vms?after={after}: not a list of VMs: {v}"));
        };
        let full = rows.len() as u64 >= page;
        if let Some(last) = rows.last() {
            let id = last["id"]
                .as_u64()
                .ok_or_else(|| format!("GET /vms?after={after}: a VM without its VMID"))?;
            // A server that does not page (one of an older build) would answer the same page
            // again and again.
            if id <= after {
                return Err(format!(
                    "GET /vms?after={after}: the server answered VMs from {id} on; it does not page"
                ));
            }
            after = id;
        }
        all.extend(rows);
        if !full {
            return Ok(Value::Array(all));
        }
    }
}

/// `enspeed vm ...`.
pub fn vm(l: &Login, cmd: VmCommand) -> ExitCode {
    match cmd {
        VmCommand::List { page } => run(l, |s| vm_pages(s, page), vm_table),
        VmCommand::Show { id } => run(
            l,
            |s| s.call("GET", &format!("/vms/{id}"), None),
            |v| println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        ),
        VmCommand::Create {
            name,
            memory,
            vcpus,
            disk,
            extra_disk,
            owner,
            start,
            blank,
            iso,
            cdrom_first,
            uefi,
            sata,
            net,
            appliance,
        } => {
            let mut body = json!({"name": name, "start": start});
            let from = appliance.is_some();
            if let Some(m) = memory.or((!from).then_some(512)) {
                body["memory_mib"] = json!(m);
            }
            if let Some(v) = vcpus {
                body["vcpus"] = json!(v);
            }
            if let Some(d) = disk.or((!from).then_some(8)) {
                body["disk_gib"] = json!(d);
            }
            if let Some(a) = appliance {
                body["appliance"] = json!(a);
            }
            if !net.is_empty() {
                body["networks"] = json!(net);
            }
            if !extra_disk.is_empty() {
                body["extra_disks_gib"] = json!(extra_disk);
            }
            if let Some(o) = owner {
                body["owner"] = json!(o);
            }
            if blank {
                body["boot"] = json!(if uefi { "uefi" } else { "bios" });
                if cdrom_first {
                    body["boot_order"] = json!("cdrom_first");
                }
                if sata {
                    body["disk_bus"] = json!("sata");
                }
            }
            if let Some(iso) = iso {
                body["iso"] = json!(iso);
            }
            run(l, |s| s.call("POST", "/vms", Some(body)), vm_table)
        }
        VmCommand::Edit {
            id,
            memory,
            vcpus,
            boot,
            boot_order,
            disk_bus,
            add_disk,
            grow_disk,
        } => {
            let mut body = json!({});
            if !add_disk.is_empty() {
                body["add_disks_gib"] = json!(add_disk);
            }
            if !grow_disk.is_empty() {
                let g: Vec<_> = grow_disk
                    .iter()
                    .map(|(disk, gib)| json!({ "disk": disk, "gib": gib }))
                    .collect();
                body["grow_disks"] = json!(g);
            }
            if let Some(m) = memory {
                body["memory_mib"] = json!(m);
            }
            if let Some(v) = vcpus {
                body["vcpus"] = json!(v);
            }
            if let Some(b) = boot {
                body["boot"] = json!(b);
            }
            if let Some(o) = boot_order {
                body["boot_order"] = json!(o);
            }
            if let Some(b) = disk_bus {
                body["disk_bus"] = json!(b);
            }
            run(
                l,
                |s| s.call("PATCH", &format!("/vms/{id}"), Some(body)),
                vm_table,
            )
        }
        VmCommand::Start { id } => power(l, id, "on"),
        VmCommand::Stop { id } => power(l, id, "off"),
        VmCommand::ForceStop { id } => power(l, id, "force-off"),
        VmCommand::Delete { id } => run(l, |s| s.call("DELETE", &format!("/vms/{id}"), None), done),
        VmCommand::Backup { id, name } => {
            let body = match name {
                Some(n) => json!({ "name": n }),
                None => json!({}),
            };
            run(
                l,
                |s| s.call("POST", &format!("/vms/{id}/backup"), Some(body)),
                task_table,
            )
        }
        VmCommand::BackupSchedule {
            id,
            every,
            keep,
            off,
        } => {
            let schedule = match (off, every) {
                (false, Some(h)) => json!({ "every_hours": h, "keep": keep }),
                _ => Value::Null,
            };
            run(
                l,
                |s| {
                    s.call(
                        "POST",
                        &format!("/vms/{id}/backup-schedule"),
                        Some(json!({ "schedule": schedule })),
                    )
                },
                vm_table,
            )
        }
        VmCommand::Clone { id, name, owner } => {
            let mut body = json!({ "name": name });
            if let Some(o) = owner {
                body["owner"] = json!(o);
            }
            run(
                l,
                |s| s.call("POST", &format!("/vms/{id}/clone"), Some(body)),
                vm_table,
            )
        }
        VmCommand::Migrate {
            id,
            downtime_ms,
            auto_converge,
            to,
        } => {
            let mut body = json!({});
            if let Some(d) = downtime_ms {
                body["downtime_ms"] = json!(d);
            }
            if auto_converge {
                body["auto_converge"] = json!(true);
            }
            if let Some(t) = to {
                body["to"] = json!(t);
            }
            run(
                l,
                |s| s.call("POST", &format!("/vms/{id}/migrate"), Some(body)),
                done,
            )
        }
        VmCommand::MigrateCancel { id } => run(
            l,
            |s| {
                s.call(
                    "POST",
                    &format!("/vms/{id}/migrate/cancel"),
                    Some(json!({})),
                )
            },
            done,
        ),
        VmCommand::Console { id } => console(l, id),
        VmCommand::Cdrom { id, iso } => run(
            l,
            |s| {
                s.call(
                    "POST",
                    &format!("/vms/{id}/cdrom"),
                    Some(json!({ "iso": iso })),
                )
            },
            done,
        ),
    }
}

/// The byte that leaves the console: Ctrl-], as telnet and `virsh console` have it.
const LEAVE: u8 = 0x1d;

/// `enspeed vm console ID`: logs in, opens the serial console's WebSocket, and copies the
/// terminal (raw, when it is one) to it and it to the terminal until Ctrl-] or its end.
fn console(l: &Login, id: u64) -> ExitCode {
    let s = match Session::open(l) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("enspeed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = console_session(l, &s, id);
    s.close();
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("enspeed: VM {id}'s console: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A byte stream to the server: TCP, or TLS over it.
trait Stream: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> Stream for T {}

fn console_session(l: &Login, s: &Session, id: u64) -> Result<(), String> {
    use std::io::{Read, Write};
    use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, Message};
    let (tls, rest) = match s.base.split_once("://") {
        Some(("https", r)) => (true, r),
        Some(("http", r)) => (false, r),
        _ => return Err(format!("{}: an http:// or https:// URL", s.base)),
    };
    let hostport = rest.split('/').next().unwrap_or(rest).to_string();
    let url = format!(
        "{}://{hostport}/api/v1/vms/{id}/console/serial",
        if tls { "wss" } else { "ws" }
    );
    let mut req = url.into_client_request().map_err(|e| e.to_string())?;
    let h = req.headers_mut();
    h.insert("cookie", s.cookie.parse().map_err(|_| "a bad cookie")?);
    h.insert("origin", s.base.parse().map_err(|_| "a bad URL")?);
    let tcp = std::net::TcpStream::connect(&hostport).map_err(|e| format!("{hostport}: {e}"))?;
    // The handshake may wait for the VM's server (a TLS connection there, an audit entry);
    // after it, short reads, so that one thread both reads the socket and sends what was typed.
    tcp.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let same_socket = tcp.try_clone().map_err(|e| e.to_string())?;
    let stream: Box<dyn Stream> = if tls {
        let ca = l.ca_cert.as_ref().ok_or("HTTPS: give --ca-cert")?;
        let host = hostport.rsplit_once(':').map_or(hostport.as_str(), |h| h.0);
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| format!("{host}: {e}"))?;
        let conn = tokio_rustls::rustls::ClientConnection::new(client_tls(ca)?, name)
            .map_err(|e| e.to_string())?;
        Box::new(tokio_rustls::rustls::StreamOwned::new(conn, tcp))
    } else {
        Box::new(tcp)
    };
    let mut ws = match tungstenite::client::client(req, stream) {
        Ok((ws, _)) => ws,
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
            let v: Value = serde_json::from_slice(r.body().as_deref().unwrap_or_default())
                .unwrap_or(Value::Null);
            return Err(format!(
                "{}: {}",
                r.status(),
                v["error"].as_str().unwrap_or("refused")
            ));
        }
        Err(e) => return Err(e.to_string()),
    };
    same_socket
        .set_read_timeout(Some(Duration::from_millis(20)))
        .map_err(|e| e.to_string())?;
    let raw = RawTerminal::enter();
    if raw.is_some() {
        eprint!("[connected to VM {id}'s serial console; Ctrl-] leaves]\r\n");
    }
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        let mut stdin = std::io::stdin();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut out = std::io::stdout();
    let mut stdin_open = true;
    // Piped input that ended: what the VM answers within this long is still shown.
    let mut leave_at: Option<std::time::Instant> = None;
    loop {
        if leave_at.is_some_and(|t| t.elapsed() > Duration::ZERO) {
            let _ = ws.close(None);
            return Ok(());
        }
        match ws.read() {
            Ok(Message::Binary(b)) => {
                let _ = out.write_all(&b);
                let _ = out.flush();
            }
            Ok(Message::Close(_)) => break,
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => return Err(e.to_string()),
        }
        while stdin_open {
            match rx.try_recv() {
                Ok(mut bytes) => {
                    let leave = raw.is_some() && bytes.contains(&LEAVE);
                    if leave {
                        bytes.truncate(bytes.iter().position(|b| *b == LEAVE).unwrap_or(0));
                    }
                    if !bytes.is_empty() {
                        ws.send(Message::Binary(bytes.into()))
                            .map_err(|e| e.to_string())?;
                    }
                    if leave {
                        let _ = ws.close(None);
                        drop(raw);
                        eprintln!();
                        return Ok(());
                    }
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                // Input ended (a pipe): show the console 2 s more, then leave.
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    stdin_open = false;
                    leave_at = Some(std::time::Instant::now() + Duration::from_secs(2));
                }
            }
        }
    }
    Ok(())
}

/// The terminal in raw mode (keys as they are typed, no echo) while it lives; `None` when
/// standard input is not a terminal.
struct RawTerminal(libc::termios);

impl RawTerminal {
    fn enter() -> Option<RawTerminal> {
        // SAFETY: isatty and tcgetattr only read the terminal's state into `old`, a plain C
        // struct that lives on this stack frame.
        let mut old: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::isatty(0) } != 1 || unsafe { libc::tcgetattr(0, &mut old) } != 0 {
            return None;
        }
        let mut raw = old;
        // SAFETY: cfmakeraw edits the struct it is given; tcsetattr applies it to stdin.
        unsafe {
            libc::cfmakeraw(&mut raw);
            if libc::tcsetattr(0, libc::TCSANOW, &raw) != 0 {
                return None;
            }
        }
        Some(RawTerminal(old))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enter`.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &self.0);
        }
    }
}

/// `enspeed network`.
pub fn network(l: &Login, cmd: NetworkCommand) -> ExitCode {
    match cmd {
        NetworkCommand::List => run(l, |s| s.call("GET", "/networks", None), network_table),
        NetworkCommand::Create {
            name,
            bridge,
            uplink,
            vlan,
            subnet,
            gateway,
            dns,
            company,
        } => {
            let mut body = json!({"name": name, "bridge": bridge});
            if !dns.is_empty() {
                body["dns"] = json!(dns);
            }
            for (k, v) in [
                ("uplink", uplink.map(Value::from)),
                ("vlan", vlan.map(Value::from)),
                ("subnet", subnet.map(Value::from)),
                ("gateway", gateway.map(|g| Value::from(g.to_string()))),
                ("company", company.map(Value::from)),
            ] {
                if let Some(v) = v {
                    body[k] = v;
                }
            }
            run(
                l,
                |s| s.call("POST", "/networks", Some(body)),
                network_table,
            )
        }
        NetworkCommand::Delete { name } => run(
            l,
            |s| s.call("DELETE", &format!("/networks/{name}"), None),
            done,
        ),
    }
}

fn network_table(v: &Value) {
    let rows = v.as_array().cloned().unwrap_or_else(|| vec![v.clone()]);
    println!(
        "{:<20} {:<18} {:<15} {:<15} {:<15} {:>5} {:>4}",
        "NAME", "SUBNET", "GATEWAY", "BRIDGE", "UPLINK", "VLAN", "VMS"
    );
    for r in rows {
        println!(
            "{:<20} {:<18} {:<15} {:<15} {:<15} {:>5} {:>4}",
            s(&r["name"]),
            s(&r["subnet"]),
            s(&r["gateway"]),
            s(&r["bridge"]),
            s(&r["uplink"]),
            s(&r["vlan"]),
            s(&r["vms"]),
        );
    }
}

/// `enspeed iso ...`.
pub fn iso(l: &Login, cmd: IsoCommand) -> ExitCode {
    match cmd {
        IsoCommand::List => run(l, |s| s.call("GET", "/isos", None), iso_table),
        IsoCommand::Upload { file, name } => {
            let name = name.unwrap_or_else(|| {
                file.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
            run(l, |s| s.upload("iso", &name, &file), done)
        }
        IsoCommand::Delete { name } => run(
            l,
            |s| s.call("DELETE", &format!("/isos/{name}"), None),
            done,
        ),
    }
}

/// `enspeed appliance ...`.
pub fn appliance(l: &Login, cmd: ApplianceCommand) -> ExitCode {
    match cmd {
        ApplianceCommand::List => run(l, |s| s.call("GET", "/appliances", None), appliance_table),
        ApplianceCommand::Import { file, name } => {
            let name = name.unwrap_or_else(|| {
                file.file_stem()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
            run(l, |s| s.upload("appliance", &name, &file), appliance_table)
        }
        ApplianceCommand::Download { name, from, sha256 } => run(
            l,
            |s| {
                s.call(
                    "POST",
                    &format!("/appliances/{name}/download"),
                    Some(json!({"url": from, "sha256": sha256})),
                )
            },
            task_table,
        ),
        ApplianceCommand::Directory { catalogue } => {
            let query: String = form_urlencoded::Serializer::new(String::new())
                .append_pair("url", &catalogue)
                .finish();
            run(
                l,
                |s| s.call("GET", &format!("/appliance-directory?{query}"), None),
                directory_table,
            )
        }
        ApplianceCommand::Export { name, out } => {
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{name}.ova")));
            run(
                l,
                |s| s.download(&format!("/appliances/{name}/ova"), &out),
                done,
            )
        }
        ApplianceCommand::Edit {
            name,
            description,
            memory,
            vcpus,
            share,
        } => {
            let mut body = json!({});
            if let Some(d) = description {
                body["description"] = json!(d);
            }
            if let Some(m) = memory {
                body["memory_mib"] = json!(m);
            }
            if let Some(v) = vcpus {
                body["vcpus"] = json!(v);
            }
            if let Some(s) = share {
                body["shared_with"] = json!(s);
            }
            run(
                l,
                |s| s.call("PATCH", &format!("/appliances/{name}"), Some(body)),
                appliance_table,
            )
        }
        ApplianceCommand::Delete { name } => run(
            l,
            |s| s.call("DELETE", &format!("/appliances/{name}"), None),
            done,
        ),
        ApplianceCommand::CopyBack {
            vm,
            name,
            description,
        } => run(
            l,
            |s| {
                s.call(
                    "POST",
                    &format!("/vms/{vm}/copy-back"),
                    Some(json!({"name": name, "description": description})),
                )
            },
            task_table,
        ),
    }
}

/// `enspeed task ...`.
pub fn task(l: &Login, cmd: TaskCommand) -> ExitCode {
    match cmd {
        TaskCommand::List => run(l, |s| s.call("GET", "/tasks", None), task_table),
        TaskCommand::Cancel { id } => run(
            l,
            |s| s.call("POST", &format!("/tasks/{id}/cancel"), None),
            task_table,
        ),
    }
}

fn directory_table(v: &Value) {
    println!(
        "{:<24} {:>9} {:<8} {:<16} URL",
        "NAME", "MiB", "LIBRARY", "SHA-256"
    );
    for r in v.as_array().cloned().unwrap_or_default() {
        println!(
            "{:<24} {:>9} {:<8} {:<16} {}",
            s(&r["name"]),
            r["size"].as_u64().unwrap_or(0) >> 20,
            if r["in_library"].as_bool() == Some(true) {
                "has one"
            } else {
                "-"
            },
            s(&r["sha256"]).chars().take(16).collect::<String>(),
            s(&r["url"])
        );
        let d = s(&r["description"]);
        if !d.is_empty() {
            println!("    {d}");
        }
    }
}

fn appliance_table(v: &Value) {
    println!(
        "{:<24} {:>7} {:>5} {:<11} {:<23} {:<8} ORIGIN",
        "NAME", "MiB", "vCPU", "BOOTS", "DISKS (MiB)", "READY ON"
    );
    let rows = match v {
        Value::Array(a) => a.clone(),
        one => vec![one.clone()],
    };
    for r in rows {
        let disks: Vec<String> = r["disks"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|d| (d["size"].as_u64().unwrap_or(0) >> 20).to_string())
            .collect();
        println!(
            "{:<24} {:>7} {:>5} {:<11} {:<23} {:<8} {}",
            s(&r["name"]),
            s(&r["memory_mib"]),
            s(&r["vcpus"]),
            format!("{}/{}", s(&r["boot"]), s(&r["disk_bus"])),
            disks.join(" + "),
            format!(
                "{}/{}",
                r["servers"].as_array().map_or(0, Vec::len),
                s(&r["vm_servers"])
            ),
            s(&r["origin"])
        );
    }
}

fn task_table(v: &Value) {
    println!(
        "{:>5} {:<8} {:>4}%  {:<12} WHAT",
        "TASK", "STATE", "DONE", "BY"
    );
    let rows = match v {
        Value::Array(a) => a.clone(),
        one => vec![one.clone()],
    };
    for r in rows {
        let reason = r["reason"]
            .as_str()
            .map(|w| format!(": {w}"))
            .unwrap_or_default();
        println!(
            "{:>5} {:<8} {:>4}%  {:<12} {}{reason}",
            s(&r["id"]),
            s(&r["state"]),
            s(&r["percent"]),
            s(&r["by"]),
            s(&r["what"])
        );
    }
}

fn iso_table(v: &Value) {
    println!(
        "{:<32} {:>10}  {:<8} {:<12} SHA-256",
        "NAME", "MiB", "READY ON", "IN USE BY"
    );
    for r in v.as_array().cloned().unwrap_or_default() {
        let used: Vec<String> = r["in_use_by"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|v| format!("VM {v}"))
            .collect();
        println!(
            "{:<32} {:>10}  {:<8} {:<12} {}",
            s(&r["name"]),
            r["size"].as_u64().unwrap_or(0) >> 20,
            format!(
                "{}/{}",
                r["servers"].as_array().map_or(0, Vec::len),
                s(&r["vm_servers"])
            ),
            if used.is_empty() {
                "-".into()
            } else {
                used.join(",")
            },
            s(&r["sha256"])
        );
    }
}

fn power(l: &Login, id: u64, action: &str) -> ExitCode {
    run(
        l,
        |s| {
            s.call(
                "POST",
                &format!("/vms/{id}/power"),
                Some(json!({ "action": action })),
            )
        },
        done,
    )
}

/// `enspeed user ...`.
pub fn user(l: &Login, cmd: UserCommand) -> ExitCode {
    match cmd {
        UserCommand::List => run(l, |s| s.call("GET", "/users", None), user_table),
        UserCommand::Create {
            name,
            role,
            parent,
            quota,
            new_password_file,
        } => {
            let pw = match password(&new_password_file, "ENSPEED_NEW_PASSWORD", "the new user") {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("enspeed: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let mut body = json!({"name": name, "role": role, "password": pw});
            if let Some(p) = parent {
                body["parent"] = json!(p);
            }
            if let Some(q) = quota {
                let n: Vec<u64> = q.split(',').filter_map(|x| x.trim().parse().ok()).collect();
                let [vms, mib, gib] = n[..] else {
                    eprintln!("enspeed: --quota {q}: VMS,MIB,GIB");
                    return ExitCode::FAILURE;
                };
                body["quota"] = json!({"vms": vms, "memory_mib": mib, "disk_gib": gib});
            }
            run(l, |s| s.call("POST", "/users", Some(body)), user_table)
        }
        UserCommand::Passwd {
            id,
            new_password_file,
        } => {
            let pw = match password(
                &new_password_file,
                "ENSPEED_NEW_PASSWORD",
                "the new password",
            ) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("enspeed: {e}");
                    return ExitCode::FAILURE;
                }
            };
            // One's own password changes only with the current one: the one logged in with.
            let current = password(&l.password_file, "ENSPEED_PASSWORD", "your password").ok();
            let mut body = json!({ "password": pw });
            if let Some(c) = current {
                body["current_password"] = json!(c);
            }
            run(
                l,
                |s| s.call("PATCH", &format!("/users/{id}"), Some(body)),
                user_table,
            )
        }
        UserCommand::Delete { id } => {
            run(l, |s| s.call("DELETE", &format!("/users/{id}"), None), done)
        }
    }
}

/// `enspeed servers [drain ID | remove ID]`.
pub fn servers(l: &Login, cmd: Option<ServerCommand>) -> ExitCode {
    match cmd {
        None => run(l, |s| s.call("GET", "/servers", None), server_table),
        Some(ServerCommand::Add { address, token }) => run(
            l,
            |s| {
                s.call(
                    "POST",
                    "/servers",
                    Some(json!({ "address": address, "token": token })),
                )
            },
            |v| server_table(&Value::Array(vec![v.clone()])),
        ),
        Some(ServerCommand::JoinInfo) => {
            run(l, |s| s.call("GET", "/servers/join", None), join_info)
        }
        Some(ServerCommand::Drain { id }) => run(
            l,
            |s| s.call("POST", &format!("/servers/{id}/drain"), Some(json!({}))),
            done,
        ),
        Some(ServerCommand::Remove { id }) => run(
            l,
            |s| s.call("DELETE", &format!("/servers/{id}"), None),
            done,
        ),
    }
}

/// `enspeed servers add|join-info|drain|remove`.
#[derive(Subcommand, Debug)]
pub enum ServerCommand {
    /// Add a server started with `enspeed server --await-join`, by its address and the join
    /// token it shows (its DATA/join-token).
    Add {
        /// Its address, host:port.
        address: String,
        /// Its join token.
        #[arg(long)]
        token: String,
    },
    /// What a new server joins with: an address and the cluster's join token (for
    /// `enspeed server --join ADDRESS --token TOKEN`, or the installer's join and token).
    JoinInfo,
    /// Move a server's VMs to their backups and its backup copies elsewhere.
    Drain {
        /// Server id.
        id: u64,
    },
    /// Remove a drained server from the cluster.
    Remove {
        /// Server id.
        id: u64,
    },
}

/// `enspeed audit`.
pub fn audit(l: &Login, after: u64, limit: u64) -> ExitCode {
    run(
        l,
        |s| s.call("GET", &format!("/audit?after={after}&limit={limit}"), None),
        audit_table,
    )
}

/// `N=GIB` of `--grow-disk`.
fn disk_growth(s: &str) -> Result<(usize, u64), String> {
    let (n, gib) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: DISK=GIB, as 1=20 (Disk1 to 20 GiB)"))?;
    let n = n
        .trim()
        .parse()
        .map_err(|_| format!("{n:?} is not a disk number (0-3)"))?;
    let gib = gib
        .trim()
        .parse()
        .map_err(|_| format!("{gib:?} is not a number of GiB"))?;
    Ok((n, gib))
}
