//! The control socket of `enspeed vmm` (`--api-socket`): one JSON object per line each way.
//! A request names its command in `cmd`; the answer carries `ok` and either the result or
//! `error`. Both sides use these types: the VMM serves [`Request`], the agent, the console
//! relay and `enspeed vmm-api` send it with [`call`].
//!
//! ```text
//! {"cmd":"status"}                       -> {"ok":true,"status":{"state":"running",...}}
//! {"cmd":"pause"} / {"cmd":"resume"}
//! {"cmd":"shutdown","timeout_secs":30}   graceful (ACPI power button), then hard stop
//! {"cmd":"stop"}                         hard stop
//! {"cmd":"ctrl-alt-del"}
//! {"cmd":"media","disk":1,"path":"/x.iso"}   change; "path":null ejects
//! {"cmd":"migrate","to":"/run/x.sock","downtime_ms":50}
//!                                        -> {"ok":true,"migrated":{"downtime_ms":...}}
//! {"cmd":"migration-status"}             -> {"ok":true,"migration":{"phase":"copying",...}}
//! {"cmd":"cancel-migration"}             while it still copies
//! {"cmd":"serial"}                       -> {"ok":true}, then the connection is the
//!                                           console: history and live output out,
//!                                           keystrokes in
//! ```

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Longest line either side accepts; anything longer is refused unread.
pub const MAX_LINE: usize = 64 * 1024;

/// A request on the control socket.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Report the VM's state.
    Status {},
    /// Stop the vCPUs.
    Pause {},
    /// Restart the vCPUs.
    Resume {},
    /// Ask the guest to power off; force it after `timeout_secs` if given.
    Shutdown {
        /// Seconds to wait before a hard stop.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_secs: Option<u64>,
    },
    /// Power off at once.
    Stop {},
    /// Send Ctrl-Alt-Del to the keyboard.
    CtrlAltDel {},
    /// Change (`path`) or eject (`null`) removable media.
    Media {
        /// Disk index, in command-line order (the CD-ROM drive after the disks).
        disk: usize,
        /// New image, or none to eject.
        path: Option<PathBuf>,
    },
    /// Attach to the serial console.
    Serial {},
    /// Move the running VM to the VMM listening on `to` (`enspeed vmm --incoming`), live;
    /// answered when it runs there (or, on failure, with why and where it is).
    Migrate {
        /// The target VMM's migration socket.
        to: PathBuf,
        /// The longest pause allowed for the last pages and the state, milliseconds (50 if
        /// absent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        downtime_ms: Option<u64>,
        /// A guest that dirties its memory faster than the stream takes it is slowed down (its
        /// vCPUs held back a growing share of the time) until the copy converges, instead of
        /// the migration giving up.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        auto_converge: bool,
    },
    /// Where a live migration under way stands (answered while `migrate` runs).
    MigrationStatus {},
    /// Gives up a live migration under way while it still copies memory: the VM runs on here.
    CancelMigration {},
    /// On the target (`--incoming`): the VM, received whole, runs now without its source's go.
    /// Only for whoever knows the source can no longer run it (between servers, the relay once
    /// the cluster gave the VM's disks to this server); refused unless a VM waits for its go.
    MigrationGo {},
}

/// The answer to a request.
#[derive(Debug, Serialize, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// What went wrong, when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The status report, for `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// What a live migration took, for `migrate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrated: Option<Migrated>,
    /// Where a live migration under way stands, for `migration-status` (none: none is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationProgress>,
}

/// What a live migration under way is doing.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationPhase {
    /// Copying memory while the guest runs; it can still be cancelled.
    Copying,
    /// The guest is paused: the last pages and the devices' state go.
    Paused,
    /// All of it went: waiting for the target to take the disks and run it.
    Handover,
}

/// Where a live migration under way stands.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MigrationProgress {
    /// What it is doing.
    pub phase: MigrationPhase,
    /// The pre-copy round (0: all of memory).
    pub round: u32,
    /// Guest RAM, bytes.
    pub memory_bytes: u64,
    /// Bytes sent so far.
    pub transferred_bytes: u64,
    /// Bytes of guest RAM the round under way went through so far, sent or (all zero) named
    /// only: in round 0, how far the copy is through memory.
    #[serde(default)]
    pub covered_bytes: u64,
    /// What the guest dirtied during the last round: what the next one sends.
    pub remaining_bytes: u64,
    /// How fast the guest dirties memory, bytes a second.
    pub dirty_rate_bytes_per_sec: u64,
    /// The pause the remaining bytes would take now, ms.
    pub expected_downtime_ms: u64,
    /// Since the request, ms.
    pub elapsed_ms: u64,
    /// The share of time the vCPUs are held back for the copy to catch up (auto-converge),
    /// percent; 0 when they run freely.
    #[serde(default)]
    pub throttle_pct: u8,
}

/// What a live migration took.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Migrated {
    /// How long the vCPUs stood still: from the pause here to the target's word that it runs.
    pub downtime_ms: f64,
    /// From the request to the end.
    pub total_ms: f64,
    /// Pre-copy rounds.
    pub rounds: u32,
    /// Bytes of guest RAM sent.
    pub transferred_bytes: u64,
}

impl Response {
    /// Success with nothing to report.
    pub fn ok() -> Self {
        Response {
            ok: true,
            ..Default::default()
        }
    }

    /// Failure.
    pub fn err(msg: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(msg.into()),
            ..Default::default()
        }
    }
}

/// Whether the vCPUs run.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// The guest runs.
    Running,
    /// Stopped by `pause`.
    Paused,
    /// Asked to power off; stopped hard when its time is up.
    ShuttingDown,
}

/// The VM as `status` reports it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Clone)]
pub struct Status {
    /// Whether the vCPUs run.
    pub state: RunState,
    /// vCPU count.
    pub vcpus: u8,
    /// Guest RAM.
    pub memory_mib: u64,
    /// How many times the guest has booted (1 + reboots).
    pub boots: u64,
    /// Seconds since this boot.
    pub uptime_secs: f64,
    /// Disks in order, the CD-ROM drive last.
    pub disks: Vec<DiskStatus>,
    /// VMM process id.
    pub pid: u32,
}

/// One disk in a status report.
#[derive(Debug, Serialize, Deserialize, PartialEq, Clone)]
pub struct DiskStatus {
    /// Current backing file; none when ejected.
    pub path: Option<PathBuf>,
    /// Read-only removable media.
    pub readonly: bool,
}

/// Why a request got no answer, or a refusal.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The socket could not be reached, or the connection broke.
    #[error("VMM control socket {socket}: {source}")]
    Io {
        /// The socket.
        socket: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// The answer was not a response line.
    #[error("VMM control socket {socket}: unreadable answer: {reason}")]
    BadAnswer {
        /// The socket.
        socket: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// The VMM refused the request.
    #[error("the VMM refused: {0}")]
    Refused(String),
}

/// Sends `req` on the control socket at `socket` and reads its answer, waiting at most
/// `timeout` for it. A refusal is [`CallError::Refused`].
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, CallError> {
    let (_, answer) = open(socket, req, timeout)?;
    Ok(answer)
}

/// Like [`call`], but also hands back the connection: after `serial` it is the console.
pub fn open(
    socket: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<(UnixStream, Response), CallError> {
    let io_err = |source| CallError::Io {
        socket: socket.to_path_buf(),
        source,
    };
    let mut s = UnixStream::connect(socket).map_err(io_err)?;
    s.set_read_timeout(Some(timeout)).map_err(io_err)?;
    let mut line = serde_json::to_vec(req).map_err(|e| io_err(io::Error::other(e)))?;
    line.push(b'\n');
    s.write_all(&line).map_err(io_err)?;
    let line = read_line(&mut s).map_err(io_err)?;
    let answer: Response = serde_json::from_slice(&line).map_err(|e| CallError::BadAnswer {
        socket: socket.to_path_buf(),
        reason: e.to_string(),
    })?;
    if !answer.ok {
        return Err(CallError::Refused(
            answer.error.unwrap_or_else(|| "no reason given".into()),
        ));
    }
    s.set_read_timeout(None).map_err(io_err)?;
    Ok((s, answer))
}

/// Reads one line, byte by byte: what follows it (console output) stays in the socket.
pub fn read_line(s: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        if line.len() >= MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("answer longer than {MAX_LINE} bytes"),
            ));
        }
        if s.read(&mut b)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        line.push(b[0]);
    }
    Ok(line)
}

/// Parses a MAC address as the VMM's `--net ...,mac=` takes it and the cluster writes it:
/// six hex pairs separated by colons.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_unknowns_are_refused() {
        let p = |s: &str| serde_json::from_str::<Request>(s);
        assert_eq!(p(r#"{"cmd":"status"}"#).unwrap(), Request::Status {});
        assert_eq!(
            p(r#"{"cmd":"shutdown"}"#).unwrap(),
            Request::Shutdown { timeout_secs: None }
        );
        assert_eq!(
            p(r#"{"cmd":"media","disk":1,"path":null}"#).unwrap(),
            Request::Media {
                disk: 1,
                path: None
            }
        );
        assert!(p(r#"{"cmd":"format-disk"}"#).is_err());
        assert!(p(r#"{"cmd":"status","extra":1}"#).is_err());
        assert!(p(r#"{"cmd":"media","disk":-1,"path":null}"#).is_err());
        assert!(p(r#"not json"#).is_err());
        for r in [
            Request::Shutdown {
                timeout_secs: Some(30),
            },
            Request::CtrlAltDel {},
            Request::Media {
                disk: 4,
                path: Some("/x.iso".into()),
            },
        ] {
            let text = serde_json::to_string(&r).unwrap();
            assert_eq!(p(&text).unwrap(), r, "{text}");
        }
        assert_eq!(
            serde_json::to_string(&Request::CtrlAltDel {}).unwrap(),
            r#"{"cmd":"ctrl-alt-del"}"#
        );
    }

    #[test]
    fn a_status_keeps_its_wire_format() {
        let text = r#"{"ok":true,"status":{"state":"shutting-down","vcpus":2,"memory_mib":512,"boots":1,"uptime_secs":1.5,"disks":[{"path":null,"readonly":true}],"pid":7}}"#;
        let r: Response = serde_json::from_str(text).unwrap();
        assert_eq!(r.status.as_ref().unwrap().state, RunState::ShuttingDown);
        assert_eq!(serde_json::to_string(&r).unwrap(), text);
        assert!(
            serde_json::from_str::<Response>(r#"{"ok":true,"status":{"state":"melting"}}"#)
                .is_err()
        );
    }

    #[test]
    fn answers_are_read_to_their_line_only() {
        let mut r: &[u8] = b"{\"ok\":true}\nconsole bytes";
        assert_eq!(read_line(&mut r).unwrap(), b"{\"ok\":true}\n");
        assert_eq!(r, b"console bytes");
        let long = vec![b'x'; MAX_LINE + 1];
        assert!(read_line(&mut long.as_slice()).is_err());
        let mut short: &[u8] = b"{\"ok\":";
        assert!(read_line(&mut short).is_err());
    }
}

/// A live migration's stream back from the target: what the target VMM (and a relay between
/// servers) tells the source. The stream forth is the VMM's own (`vmm::migration::Message`),
/// which ends with `Done`; then the target answers [`Reply::Ready`] and resumes the VM only
/// once the source says `Go`. A relay between servers holds `Ready` back until the cluster has
/// handed the VM's disks to the target, or answers [`Reply::Failed`] in its place when it
/// could not, so that a source seeing `Ready` knows its VM is the target's to run.
pub mod migration {
    use std::io::{self, Read, Write};

    use serde::{Deserialize, Serialize};

    /// The longest reply accepted.
    const MAX_REPLY: u32 = 64 << 10;

    /// Target to source.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub enum Reply {
        /// The whole VM is here, its devices restored: it runs once the source says `Go`.
        Ready,
        /// It runs here now: the source must never run it again.
        Resumed,
        /// The target did not take the VM and never will: the source runs it on.
        Failed(String),
    }

    /// Writes one reply: a little-endian u32 length, then its JSON.
    pub fn write_reply(w: &mut impl Write, r: &Reply) -> io::Result<()> {
        let json = serde_json::to_vec(r).map_err(io::Error::other)?;
        w.write_all(&(json.len() as u32).to_le_bytes())?;
        w.write_all(&json)?;
        w.flush()
    }

    /// Reads one reply; a malformed or overlong one is an error.
    pub fn read_reply(r: &mut impl Read) -> io::Result<Reply> {
        let mut len = [0u8; 4];
        r.read_exact(&mut len)?;
        let len = u32::from_le_bytes(len);
        if len > MAX_REPLY {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a reply of {len} bytes (at most {MAX_REPLY})"),
            ));
        }
        let mut json = vec![0u8; len as usize];
        r.read_exact(&mut json)?;
        serde_json::from_slice(&json)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("a bad reply: {e}")))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn replies_round_trip_and_bad_ones_are_refused() {
            for r in [
                Reply::Ready,
                Reply::Resumed,
                Reply::Failed("no disk".into()),
            ] {
                let mut b = Vec::new();
                write_reply(&mut b, &r).unwrap();
                assert_eq!(read_reply(&mut b.as_slice()).unwrap(), r);
            }
            let mut long = (MAX_REPLY + 1).to_le_bytes().to_vec();
            long.extend([b'x'; 8]);
            assert!(read_reply(&mut long.as_slice()).is_err());
            let mut bad = 3u32.to_le_bytes().to_vec();
            bad.extend(b"Go!");
            assert!(read_reply(&mut bad.as_slice()).is_err());
        }
    }
}
