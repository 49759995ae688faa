//! The per-VM control socket: a unix socket speaking one JSON object per
//! line. A request names its command in `cmd`; the answer carries `ok` and
//! either the result or `error`.
//!
//! ```text
//! {"cmd":"status"}                       -> {"ok":true,"state":"running",...}
//! {"cmd":"pause"} / {"cmd":"resume"}
//! {"cmd":"shutdown","timeout_secs":30}   graceful (ACPI power button), then hard stop
//! {"cmd":"stop"}                         hard stop
//! {"cmd":"ctrl-alt-del"}
//! {"cmd":"media","disk":1,"path":"/x.iso"}   change; "path":null ejects
//! {"cmd":"serial"}                       -> {"ok":true}, then the connection is the
//!                                           console: history and live output out,
//!                                           keystrokes in
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::devices::serial::Console;
use crate::vm::VmEvent;

/// Longest request line accepted; anything longer is refused unread.
const MAX_LINE: u64 = 64 * 1024;

/// A request on the control socket.
#[derive(Debug, Deserialize, PartialEq)]
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
        #[serde(default)]
        timeout_secs: Option<u64>,
    },
    /// Power off at once.
    Stop {},
    /// Send Ctrl-Alt-Del to the keyboard.
    CtrlAltDel {},
    /// Change (`path`) or eject (`null`) removable media.
    Media {
        /// Disk index, in command-line order.
        disk: usize,
        /// New image, or none to eject.
        path: Option<PathBuf>,
    },
    /// Attach to the serial console.
    Serial {},
}

/// The answer to a request.
#[derive(Debug, Serialize, Deserialize, Default, PartialEq)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// What went wrong, when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The status report, for `status`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
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
            status: None,
        }
    }
}

/// The VM as `status` reports it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Clone)]
pub struct Status {
    /// running, paused or shutting-down.
    pub state: String,
    /// vCPU count.
    pub vcpus: u8,
    /// Guest RAM.
    pub memory_mib: u64,
    /// How many times the guest has booted (1 + reboots).
    pub boots: u64,
    /// Seconds since this boot.
    pub uptime_secs: f64,
    /// Disks in order.
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

/// Serves the control socket at `path` until the process exits.
pub fn serve(path: &Path, events: Sender<VmEvent>, console: Arc<Console>) -> std::io::Result<()> {
    // A stale socket from a crashed VMM would make bind fail.
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let events = events.clone();
                let console = console.clone();
                let _ = std::thread::Builder::new()
                    .name("api-conn".into())
                    .spawn(move || {
                        if let Err(e) = handle(conn, events, console) {
                            tracing::debug!(error = %e, "control connection ended");
                        }
                    });
            }
        })?;
    Ok(())
}

fn reply(w: &mut UnixStream, r: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)
}

fn handle(conn: UnixStream, events: Sender<VmEvent>, console: Arc<Console>) -> std::io::Result<()> {
    let mut writer = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = Vec::new();
        let n = (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') && n as u64 == MAX_LINE {
            reply(
                &mut writer,
                &Response::err(format!("request longer than {MAX_LINE} bytes")),
            )?;
            return Ok(());
        }
        let req: Request = match serde_json::from_slice(&line) {
            Ok(r) => r,
            Err(e) => {
                reply(&mut writer, &Response::err(format!("invalid request: {e}")))?;
                continue;
            }
        };
        if matches!(req, Request::Serial {}) {
            reply(&mut writer, &Response::ok())?;
            return stream_serial(reader, writer, events, console);
        }
        let (tx, rx) = channel();
        if events.send(VmEvent::Api(req, tx)).is_err() {
            reply(&mut writer, &Response::err("the VM is gone"))?;
            return Ok(());
        }
        let r = rx
            .recv()
            .unwrap_or_else(|_| Response::err("the VM stopped before answering"));
        reply(&mut writer, &r)?;
    }
}

fn stream_serial(
    mut reader: BufReader<UnixStream>,
    mut writer: UnixStream,
    events: Sender<VmEvent>,
    console: Arc<Console>,
) -> std::io::Result<()> {
    let (history, rx) = console.subscribe();
    writer.write_all(&history)?;
    std::thread::Builder::new()
        .name("api-serial-out".into())
        .spawn(move || {
            for chunk in rx {
                if writer.write_all(&chunk).is_err() {
                    return;
                }
            }
        })?;
    let mut buf = [0u8; 1024];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0
            || events
                .send(VmEvent::SerialInput(buf[..n].to_vec()))
                .is_err()
        {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_unknowns_are_refused() {
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
    }

    #[test]
    fn socket_answers_bad_requests_and_forwards_good_ones() {
        let dir = std::env::temp_dir().join(format!("enspeed-api-{}", std::process::id()));
        let (tx, rx) = channel();
        serve(&dir, tx, Console::new(Box::new(std::io::sink()))).unwrap();
        std::thread::spawn(move || {
            for ev in rx {
                if let VmEvent::Api(Request::Pause {}, r) = ev {
                    let _ = r.send(Response::ok());
                }
            }
        });
        let mut s = UnixStream::connect(&dir).unwrap();
        s.write_all(b"{\"cmd\":\"bogus\"}\n{\"cmd\":\"pause\"}\n")
            .unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        let resp: Response = serde_json::from_str(&l).unwrap();
        assert!(!resp.ok);
        assert!(resp.error.unwrap().contains("invalid request"));
        l.clear();
        r.read_line(&mut l).unwrap();
        assert!(serde_json::from_str::<Response>(&l).unwrap().ok);
        // An endless line is cut off with an error instead of filling memory.
        let mut s2 = UnixStream::connect(&dir).unwrap();
        let big = vec![b'x'; (MAX_LINE + 10) as usize];
        let _ = s2.write_all(&big);
        let mut l = String::new();
        BufReader::new(s2).read_line(&mut l).unwrap();
        assert!(l.contains("longer than"));
        std::fs::remove_file(&dir).unwrap();
    }
}
