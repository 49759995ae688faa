//! Appliances from elsewhere: an OVA downloaded from a URL (http or https) by a VM server's
//! agent (`state_machine::TaskKind::Download`), read as it arrives (`ova::scan`), checked
//! against the SHA-256 its appliance directory gives, and imported (`ova::import`); and an
//! appliance directory's catalogue, a JSON list of what it offers.
//!
//! What a remote server sends is untrusted like an upload: bounded in length (`MAX_OVA`, a
//! catalogue `MAX_CATALOGUE`), in time (a connection in `CONNECT`, each read in `READ`), and
//! read by the same checks.

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::library::Upload;
use crate::ova::{self, Imported, OvaError};

/// The largest OVA downloaded (as uploaded).
pub const MAX_OVA: u64 = 256 << 30;
/// The largest catalogue read.
pub const MAX_CATALOGUE: u64 = 1 << 20;
/// The most entries a catalogue may list.
pub const MAX_CATALOGUE_ENTRIES: usize = 1000;
/// How long a connection may take.
const CONNECT: Duration = Duration::from_secs(15);
/// How long each read may wait.
const READ: Duration = Duration::from_secs(60);

/// An appliance a directory offers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogueEntry {
    /// Its name (the appliance's, when downloaded).
    pub name: String,
    /// What it is.
    #[serde(default)]
    pub description: String,
    /// The OVA's bytes.
    pub size: u64,
    /// The OVA's SHA-256, hex.
    pub sha256: String,
    /// Where the OVA is (http or https).
    pub url: String,
}

/// An HTTP(S) client with the bounds above.
fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(CONNECT)
        .timeout_read(READ)
        .redirects(5)
        .user_agent(concat!("EnSpeed/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// GET `url`: the response, or why not.
fn get(url: &str) -> Result<ureq::Response, String> {
    crate::state_machine::check_download_url(url).map_err(|r| r.reason)?;
    agent().get(url).call().map_err(|e| match e {
        ureq::Error::Status(code, r) => {
            format!("{url}: the server answered {code} {}", r.status_text())
        }
        ureq::Error::Transport(t) => format!("{url}: {t}"),
    })
}

/// The catalogue of the appliance directory at `url`: its entries, each checked.
pub fn catalogue(url: &str) -> Result<Vec<CatalogueEntry>, String> {
    let r = get(url)?;
    let mut text = Vec::new();
    r.into_reader()
        .take(MAX_CATALOGUE + 1)
        .read_to_end(&mut text)
        .map_err(|e| format!("{url}: reading the catalogue: {e}"))?;
    if text.len() as u64 > MAX_CATALOGUE {
        return Err(format!(
            "{url}: a catalogue of more than {MAX_CATALOGUE} bytes"
        ));
    }
    let entries: Vec<CatalogueEntry> = serde_json::from_slice(&text).map_err(|e| {
        format!("{url}: not a catalogue (a JSON list of name, description, size, sha256, url): {e}")
    })?;
    if entries.len() > MAX_CATALOGUE_ENTRIES {
        return Err(format!(
            "{url}: {} entries, at most {MAX_CATALOGUE_ENTRIES}",
            entries.len()
        ));
    }
    for e in &entries {
        let bad = |why: String| Err(format!("{url}: entry {:.64?}: {why}", e.name));
        if let Err(r) = crate::access::check_name("appliance", &e.name) {
            return bad(r);
        }
        if !crate::library::is_sha256(&e.sha256) {
            return bad("its sha256 is not 64 hex digits".into());
        }
        if let Err(r) = crate::state_machine::check_download_url(&e.url) {
            return bad(r.reason);
        }
        if e.size == 0 || e.size > MAX_OVA || e.description.len() > 4096 {
            return bad(format!(
                "a size of 1 to {MAX_OVA} bytes and a description of at most 4096"
            ));
        }
    }
    Ok(entries)
}

/// An OVA downloaded and imported, its disks sealed in the library, waiting to be put in place.
pub struct Downloaded {
    /// What it holds.
    pub imported: Imported,
    /// The OVA's bytes.
    pub bytes: u64,
}

/// Downloads the OVA at `url` into scratch directory `work` (inside library directory
/// `library`), reading it as it arrives; checks its SHA-256 against `sha256` if given; imports
/// it. `progress` hears the bytes so far and, once known, in all; `cancel` stops it.
pub fn fetch(
    url: &str,
    sha256: Option<&str>,
    work: &Path,
    library: &Path,
    cancel: &AtomicBool,
    progress: &dyn Fn(u64, Option<u64>),
) -> Result<Downloaded, String> {
    let r = get(url)?;
    let total: Option<u64> = r.header("Content-Length").and_then(|v| v.parse().ok());
    if let Some(t) = total.filter(|t| *t > MAX_OVA) {
        return Err(format!("{url}: {t} bytes, more than {MAX_OVA}"));
    }
    std::fs::create_dir_all(work).map_err(|e| format!("creating {}: {e}", work.display()))?;
    let mut out =
        Upload::scratch(work).map_err(|e| format!("a file in {}: {e}", work.display()))?;
    let (tee, arriving) = std::sync::mpsc::sync_channel::<Vec<u8>>(16);
    let packed = total.unwrap_or(MAX_OVA);
    let scan = std::thread::Builder::new()
        .name("ova-scan".into())
        .spawn({
            let unpack = ova::Unpack {
                work: work.to_path_buf(),
                library: library.to_path_buf(),
                archive: Some(out.path().to_path_buf()),
            };
            move || ova::arrive(ova::Arriving::new(arriving), packed, Some(&unpack))
        })
        .map_err(|e| format!("starting to read the archive: {e}"))?;
    let mut body = r.into_reader().take(MAX_OVA + 1);
    let mut hash = sha2::Sha256::new();
    let (mut got, mut told) = (0u64, Instant::now());
    let mut stopped = None;
    progress(0, total);
    loop {
        if cancel.load(Ordering::Relaxed) {
            stopped = Some("cancelled".to_string());
            break;
        }
        let mut buf = vec![0u8; 1 << 20];
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                stopped = Some(format!(
                    "{url}: the download broke off after {got} bytes: {e}"
                ));
                break;
            }
        };
        buf.truncate(n);
        got += n as u64;
        if got > MAX_OVA || total.is_some_and(|t| got > t) {
            stopped = Some(format!("{url}: more bytes than it said ({got})"));
            break;
        }
        hash.update(&buf);
        if let Err(e) = out.write(&buf) {
            stopped = Some(format!("writing the download in {}: {e}", work.display()));
            break;
        }
        // The reader stopped: it refused the archive (its reason follows).
        if tee.send(buf).is_err() {
            break;
        }
        if told.elapsed() > Duration::from_secs(1) {
            told = Instant::now();
            progress(got, total);
        }
    }
    drop(tee);
    let scanned = scan
        .join()
        .map_err(|_| "reading the archive failed".to_string())?;
    let refused = |e: OvaError| match e {
        OvaError::Refused(why) => format!("{url}: refused: {why}"),
        e => format!("{url}: {e}"),
    };
    if let Some(why) = stopped {
        return Err(why);
    }
    let scanned = scanned.map_err(refused)?;
    if let Some(t) = total.filter(|t| got != *t) {
        return Err(format!(
            "{url}: the download ended after {got} of {t} bytes"
        ));
    }
    progress(got, Some(got));
    let sum: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if let Some(want) = sha256.filter(|w| !w.eq_ignore_ascii_case(&sum)) {
        return Err(format!(
            "{url}: its SHA-256 is {sum}, the directory says {want}: not imported"
        ));
    }
    let archive = out
        .seal()
        .map_err(|e| format!("storing the download: {e}"))?;
    let imported = ova::import_arrived(
        archive.path(),
        scanned,
        &work.join("disks"),
        library,
        &ova::Watch {
            step: &|step| tracing::info!(%url, %step, "download"),
            // Its progress is the download's, done by now.
            bytes: &|_, _| {},
            cancel,
        },
    )
    .map_err(refused)?;
    Ok(Downloaded {
        imported,
        bytes: got,
    })
}
