//! A VM's consoles as byte streams between servers: the web server that a browser reaches
//! asks the VM's primary server, on its client port, for the serial console or the graphical
//! (RFB) console; once the answer line says yes, the connection carries the console's bytes
//! both ways until either end closes.
//!
//! ```text
//!   {"op":"console","vm":"web1","console":"serial"}  ->  {"ok":true,"result":{...}}\n  then bytes
//!   {"op":"console","vm":"web1","console":"vnc"}     ->  {"ok":false,"error":"..."}\n   and close
//! ```
//!
//! The serial stream starts with the console's recent history; the VNC stream is RFB from
//! its first byte (the VMM's server, `enspeed vmm --vnc`).

use std::io::{self, BufReader};
use std::net::Shutdown;

use enspeed_trust::TlsStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::node::NodeHandle;

/// Which console.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsoleKind {
    /// The serial port: text, history first.
    Serial,
    /// The framebuffer and keyboard, as RFB.
    Vnc,
}

impl ConsoleKind {
    /// Its name in paths and messages.
    pub fn name(self) -> &'static str {
        match self {
            ConsoleKind::Serial => "serial",
            ConsoleKind::Vnc => "vnc",
        }
    }
}

/// Why a console cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No such VM in the state.
    #[error("no VM {0}")]
    NoVm(String),
    /// The VM is not running here.
    #[error("VM {vm} does not run on server {server}")]
    NotHere {
        /// The VM.
        vm: String,
        /// This server.
        server: u64,
    },
    /// This server runs no VMs (a witness, or no agent).
    #[error("server {0} runs no VMs")]
    NoAgent(u64),
    /// The state cannot be read.
    #[error("server {server}: {reason}")]
    State {
        /// This server.
        server: u64,
        /// Why.
        reason: String,
    },
    /// The VMM's socket cannot be reached.
    #[error("VM {vm}: {console} console at {path}: {source}")]
    Vmm {
        /// The VM.
        vm: String,
        /// Which console.
        console: &'static str,
        /// The socket.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The VMM answered the serial request with a refusal.
    #[error("VM {vm}: the VMM refused the serial console: {reason}")]
    Refused {
        /// The VM.
        vm: String,
        /// What it said.
        reason: String,
    },
}

/// The directory of VM `name`'s VMM sockets and logs under the agent's directory.
pub fn vm_dir(agent_dir: &Path, name: &str) -> PathBuf {
    agent_dir.join("vms").join(name)
}

/// The VMM's control socket in `dir`.
pub fn api_socket(dir: &Path) -> PathBuf {
    dir.join("api.sock")
}

/// The VMM's RFB socket in `dir`.
pub fn vnc_socket(dir: &Path) -> PathBuf {
    dir.join("vnc.sock")
}

/// Opens VM `vm`'s console on this server: checks that its VMM runs here, connects to the
/// VMM and, for the serial console, asks for the stream. Answers the connected socket.
pub fn open(
    me: u64,
    node: &NodeHandle,
    agent_dir: Option<&Path>,
    vm: &str,
    kind: ConsoleKind,
) -> Result<UnixStream, Error> {
    let dir = agent_dir.ok_or(Error::NoAgent(me))?;
    let (_, state) = node.snapshot().map_err(|e| Error::State {
        server: me,
        reason: e.to_string(),
    })?;
    let record = state
        .vms
        .get(vm)
        .ok_or_else(|| Error::NoVm(vm.to_string()))?;
    if state.vm_primary(record) != Some(me) || !record.running {
        return Err(Error::NotHere {
            vm: vm.to_string(),
            server: me,
        });
    }
    let dir = vm_dir(dir, vm);
    let path = match kind {
        ConsoleKind::Serial => api_socket(&dir),
        ConsoleKind::Vnc => vnc_socket(&dir),
    };
    let vmm_err = |source| Error::Vmm {
        vm: vm.to_string(),
        console: kind.name(),
        path: path.clone(),
        source,
    };
    // A VMM just started (the state says running once it is spawned) makes its sockets in a
    // moment: a console opened meanwhile waits for them, up to STARTING.
    let deadline = Instant::now() + STARTING;
    let starting = |e: &io::Error| {
        matches!(
            e.kind(),
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
        ) && Instant::now() < deadline
    };
    if kind == ConsoleKind::Vnc {
        loop {
            match UnixStream::connect(&path) {
                Err(e) if starting(&e) => std::thread::sleep(Duration::from_millis(100)),
                other => return other.map_err(vmm_err),
            }
        }
    }
    let opened = loop {
        match vmm_api::open(&path, &vmm_api::Request::Serial {}, Duration::from_secs(5)) {
            Err(vmm_api::CallError::Io { source, .. }) if starting(&source) => {
                std::thread::sleep(Duration::from_millis(100))
            }
            other => break other,
        }
    };
    match opened {
        Ok((s, _)) => Ok(s),
        Err(vmm_api::CallError::Refused(reason)) => Err(Error::Refused {
            vm: vm.to_string(),
            reason,
        }),
        Err(vmm_api::CallError::Io { source, .. }) => Err(vmm_err(source)),
        Err(e @ vmm_api::CallError::BadAnswer { .. }) => Err(vmm_err(io::Error::new(
            io::ErrorKind::InvalidData,
            e.to_string(),
        ))),
    }
}

/// How long a console waits for the sockets of a VMM that is starting (what opens a console
/// through another server waits longer).
pub const STARTING: Duration = Duration::from_secs(10);

/// Serves a console request that arrived on client connection `client` (its request line
/// already read from `reader`): answers one line, then relays bytes both ways.
pub fn serve(
    client: TlsStream,
    reader: BufReader<TlsStream>,
    me: u64,
    node: &NodeHandle,
    agent_dir: Option<&Path>,
    vm: &str,
    kind: ConsoleKind,
) {
    let mut w = client;
    // A console may sit idle as long as its user likes: no client idle timeout here.
    let _ = w.set_read_timeout(None);
    let vmm = match open(me, node, agent_dir, vm, kind) {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(vm, console = kind.name(), error = %e, "console refused");
            let _ = crate::api::answer_line(&mut w, &crate::api::Response::err(e));
            return;
        }
    };
    let opened = json!({"vm": vm, "console": kind.name(), "server": me});
    if crate::api::answer_line(&mut w, &crate::api::Response::ok(opened)).is_err() {
        return;
    }
    tracing::info!(vm, console = kind.name(), "console opened");
    relay(reader, w, vmm);
    tracing::info!(vm, console = kind.name(), "console closed");
}

/// Copies bytes between the client (whose reader may hold bytes already read) and the VMM
/// until either side closes; then closes both.
fn relay(mut from_client: BufReader<TlsStream>, client: TlsStream, vmm: UnixStream) {
    let (Ok(mut to_vmm), Ok(mut from_vmm)) = (vmm.try_clone(), vmm.try_clone()) else {
        return;
    };
    let mut to_client = client;
    let up = std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            let _ = io::copy(&mut from_client, &mut to_vmm);
            let _ = to_vmm.shutdown(Shutdown::Both);
        });
    let _ = io::copy(&mut from_vmm, &mut to_client);
    let _ = to_client.shutdown(Shutdown::Both);
    let _ = vmm.shutdown(Shutdown::Both);
    if let Ok(t) = up {
        let _ = t.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_lines_stop_at_the_newline() {
        let mut r: &[u8] = b"{\"ok\":true}\nRFB 003.008\n";
        assert!(crate::api::read_answer(&mut r).unwrap().ok);
        assert_eq!(r, b"RFB 003.008\n");
        let mut short: &[u8] = b"{\"ok\":tr";
        assert!(crate::api::read_answer(&mut short).is_err());
        let long = vec![b'x'; 70 * 1024];
        assert!(crate::api::read_answer(&mut long.as_slice()).is_err());
        let mut refused: &[u8] = b"{\"ok\":false,\"error\":\"no VM x\"}\n";
        let r = crate::api::read_answer(&mut refused).unwrap();
        assert_eq!((r.ok, r.error.as_deref()), (false, Some("no VM x")));
    }

    #[test]
    fn kinds_are_named_in_requests() {
        assert_eq!(serde_json::to_string(&ConsoleKind::Vnc).unwrap(), "\"vnc\"");
        assert_eq!(
            serde_json::from_str::<ConsoleKind>("\"serial\"").unwrap(),
            ConsoleKind::Serial
        );
        assert!(serde_json::from_str::<ConsoleKind>("\"spice\"").is_err());
    }
}
