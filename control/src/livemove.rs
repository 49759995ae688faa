//! Live migration between servers (`LiveMove`): the source's agent has its VMM send the VM
//! over a mutual-TLS connection to the target's server, which relays it into the VMM its agent
//! started with `--incoming`.
//!
//! ```text
//!   source VMM --unix--> source agent --TLS (LIVEMOVE, Opening)--> target server --unix--> target VMM
//!        <------------------ replies: Ready, Resumed, Failed ---------------------------
//! ```
//!
//! The stream forth is the VMMs' own and passes through untouched. The replies back are
//! typed (`vmm_api::migration::Reply`), and the target's relay holds `Ready` back until the
//! VM's disks are the target's: it proposes `SwitchVm` and promotes its copies, and only then
//! lets `Ready` through, so that the source's `Go` (and with it the VM) can only reach a
//! target that owns the disks. When the cluster refused the switch, the relay answers
//! `Failed` instead and the VM runs on at the source; when it cannot tell (no quorum), it
//! answers nothing and hangs up: the source's VM stays paused and its agent decides by the
//! state, which is never ambiguous once read. After the switch the source can no longer run
//! the VM; should its go not come (its VMM or server died, or the link was cut, in the moment
//! between), the relay gives the go to its VMM itself (`migration-go` on its control socket),
//! and the VM runs on without a reboot.

use std::io::{self, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_api::migration::{read_reply, write_reply, Reply};

use enspeed_trust::TlsStream;

use crate::api::{self, Failure, Request};
use crate::node::NodeHandle;
use crate::state_machine::{Command, StateMachine};
use crate::transport::AddressBook;

/// The first bytes of a live migration's connection between servers (a client's first byte is
/// `{`, a Raft peer's `E`).
pub const PREFACE: &[u8; 8] = b"LIVEMOVE";
/// The longest opening accepted.
const MAX_OPENING: u32 = 4096;
/// How long the target's relay waits for its agent to start the incoming VMM.
const INCOMING_WAIT: Duration = Duration::from_secs(30);
/// How long the relay keeps trying to learn whether the switch committed.
const SWITCH_WAIT: Duration = Duration::from_secs(10);
/// A stream that carries nothing for this long is dead (the pre-copy sends continuously).
const IDLE: Duration = Duration::from_secs(60);
/// How long after the switch the relay waits for the source's go before giving it itself.
const GO_WAIT: Duration = Duration::from_secs(2);

/// What the source says first, after the preface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Opening {
    /// The VM.
    pub vm: String,
    /// The move (`LiveMove::id`).
    pub move_id: u64,
}

/// Writes the preface and `o`.
pub fn write_opening(w: &mut impl Write, o: &Opening) -> io::Result<()> {
    let json = serde_json::to_vec(o).map_err(io::Error::other)?;
    w.write_all(PREFACE)?;
    w.write_all(&(json.len() as u32).to_le_bytes())?;
    w.write_all(&json)?;
    w.flush()
}

/// Reads the preface and the opening.
pub fn read_opening(r: &mut impl Read) -> io::Result<Opening> {
    let bad = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
    let mut p = [0u8; 8];
    r.read_exact(&mut p)?;
    if &p != PREFACE {
        return Err(bad("not a live migration".into()));
    }
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_OPENING {
        return Err(bad(format!("an opening of {len} bytes")));
    }
    let mut json = vec![0u8; len as usize];
    r.read_exact(&mut json)?;
    serde_json::from_slice(&json).map_err(|e| bad(format!("a bad opening: {e}")))
}

/// The incoming VMM's migration socket in its VM's directory.
pub fn incoming_socket(vm_dir: &Path) -> std::path::PathBuf {
    vm_dir.join("incoming.sock")
}

/// The target's side: `r` is the connection from server `from` (its preface not read yet).
/// Relays the stream into the incoming VMM of this server's agent (`agent_dir`), and switches
/// the disks before letting its `Ready` through.
pub fn serve_target(
    mut r: BufReader<TlsStream>,
    from: u64,
    me: u64,
    node: &NodeHandle,
    book: &AddressBook,
    agent_dir: Option<&Path>,
    timeout: Duration,
) {
    let o = match read_opening(&mut r) {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(server = from, error = %e, "refused a live migration connection");
            return;
        }
    };
    let mut back = match r.get_ref().try_clone() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(vm = %o.vm, error = %e, "live migration: cannot answer the source");
            return;
        }
    };
    let refuse = |back: &mut TlsStream, why: String| {
        tracing::warn!(vm = %o.vm, server = from, why = %why, "live migration refused");
        let _ = write_reply(back, &Reply::Failed(why));
    };
    let Some(agent_dir) = agent_dir else {
        return refuse(&mut back, format!("server {me} runs no VMs"));
    };
    // Only the move the state has, from the server the VM runs on, to this one.
    let fits = |s: &StateMachine| {
        let vm = s.vms.get(&o.vm)?;
        let m = vm.moving.as_ref()?;
        (m.id == o.move_id && m.to == me && !m.switched && s.vm_primary(vm) == Some(from))
            .then_some(())
    };
    match api::read_state(node, book, timeout) {
        Some(s) if fits(&s).is_some() => {}
        Some(_) => {
            return refuse(
                &mut back,
                format!(
                    "the cluster has no move {} of {} from server {from} to server {me}",
                    o.move_id, o.vm
                ),
            )
        }
        None => return refuse(&mut back, "no quorum to check the move against".into()),
    }
    let sock = incoming_socket(&crate::console::vm_dir(agent_dir, &o.vm));
    let deadline = Instant::now() + INCOMING_WAIT;
    let vmm = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                return refuse(
                    &mut back,
                    format!("no VMM waits for {} here ({}: {e})", o.vm, sock.display()),
                )
            }
        }
    };
    let _ = r.get_ref().set_read_timeout(Some(IDLE));
    tracing::info!(vm = %o.vm, server = from, "live migration: relaying into the incoming VMM");
    // Once the VMM holds the whole VM (its Ready), the source's end no longer ends the VMM's
    // wait: this relay decides (below).
    let holding = Arc::new(AtomicBool::new(false));
    let forth_ended = Arc::new(AtomicBool::new(false));
    // Forth: the VMMs' stream, untouched.
    let forth = match vmm.try_clone() {
        Ok(mut w) => {
            let (holding, ended) = (holding.clone(), forth_ended.clone());
            std::thread::Builder::new()
                .name("move-forth".into())
                .spawn(move || {
                    let _ = io::copy(&mut r, &mut w);
                    ended.store(true, Ordering::SeqCst);
                    if !holding.load(Ordering::SeqCst) {
                        let _ = w.shutdown(std::net::Shutdown::Write);
                    }
                })
        }
        Err(e) => return refuse(&mut back, format!("the incoming VMM's socket: {e}")),
    };
    if let Err(e) = forth {
        return refuse(&mut back, format!("cannot start the relay: {e}"));
    }
    // Back: the target's replies, Ready held until the disks are here.
    let mut from_vmm = vmm;
    let hold_and_switch = || {
        holding.store(true, Ordering::SeqCst);
        switch(node, book, timeout, me, agent_dir, &o)
    };
    loop {
        let reply = match read_reply(&mut from_vmm) {
            Ok(reply) => reply,
            Err(e) => {
                tracing::info!(vm = %o.vm, error = %e, "live migration: the incoming VMM's replies ended");
                break;
            }
        };
        let pass = match reply {
            Reply::Ready => match hold_and_switch() {
                Switched::Yes => Reply::Ready,
                Switched::No(why) => {
                    // The target VMM never hears Go: it gives up when the stream closes.
                    let _ = from_vmm.shutdown(std::net::Shutdown::Both);
                    Reply::Failed(format!("the cluster did not hand the disks over: {why}"))
                }
                Switched::Unknown => {
                    tracing::error!(vm = %o.vm, "live migration: cannot tell whether the disks were handed over; hanging up (the agents decide by the state)");
                    let _ = from_vmm.shutdown(std::net::Shutdown::Both);
                    let _ = back.shutdown(std::net::Shutdown::Both);
                    return;
                }
            },
            other => other,
        };
        let end = !matches!(pass, Reply::Ready);
        if let Err(e) = write_reply(&mut back, &pass) {
            tracing::warn!(vm = %o.vm, error = %e, "live migration: cannot answer the source");
            if end {
                break;
            }
        }
        if end {
            break;
        }
        // Ready went on and the VM is this server's: the source, paused, can no longer run it.
        // Its go normally follows at once; a source that died or was cut off after the switch
        // sends none, and the VM runs here on this relay's word instead of booting again.
        let deadline = Instant::now() + GO_WAIT;
        while !readable(&from_vmm, Duration::from_millis(50)) {
            if forth_ended.load(Ordering::SeqCst) || Instant::now() >= deadline {
                let sock = crate::console::api_socket(&crate::console::vm_dir(agent_dir, &o.vm));
                match vmm_api::call(&sock, &vmm_api::Request::MigrationGo {}, timeout) {
                    Ok(_) => {
                        tracing::warn!(vm = %o.vm, server = from, source_gone = forth_ended.load(Ordering::SeqCst), "live migration: no go from the source after the switch; the VM runs here on the relay's word")
                    }
                    Err(e) => {
                        tracing::info!(vm = %o.vm, error = %e, "live migration: the incoming VMM took no go from the relay")
                    }
                }
                break;
            }
        }
    }
}

/// Whether `s` has bytes (or its end) to read within `wait`.
fn readable(s: &UnixStream, wait: Duration) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd, valid for the call.
    let n = unsafe { libc::poll(&mut p, 1, wait.as_millis() as libc::c_int) };
    n != 0
}

/// Whether the switch committed.
enum Switched {
    Yes,
    No(String),
    Unknown,
}

/// Proposes `SwitchVm` until the answer is certain, then promotes this server's copies.
fn switch(
    node: &NodeHandle,
    book: &AddressBook,
    timeout: Duration,
    me: u64,
    agent_dir: &Path,
    o: &Opening,
) -> Switched {
    let started = Instant::now();
    let deadline = started + SWITCH_WAIT;
    let mut refused = None;
    let state = loop {
        let r = api::request(
            Request::Propose {
                command: Command::SwitchVm {
                    vm: o.vm.clone(),
                    move_id: o.move_id,
                },
            },
            node,
            book,
            timeout,
        );
        if !r.ok
            && matches!(
                r.failure,
                Some(Failure::Conflict | Failure::NotFound | Failure::Forbidden)
            )
        {
            refused = r.error.clone();
        }
        // Certain only once a read after the answer says whose the VM is: an earlier attempt
        // may have committed even when this one was refused.
        if let Some(s) = api::read_state(node, book, timeout) {
            let here = s
                .vms
                .get(&o.vm)
                .is_some_and(|vm| s.vm_primary(vm) == Some(me));
            if here {
                break s;
            }
            if r.ok || refused.is_some() {
                return Switched::No(
                    refused.unwrap_or_else(|| "the VM stayed where it was".into()),
                );
            }
        }
        if Instant::now() > deadline {
            return Switched::Unknown;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // The agent's next pass would promote them too; done here, the pause is shorter. The VM is
    // this server's now whatever happens: Ready goes on once the copies serve (or after a while
    // regardless, the agent's pass then finishing the promotion).
    if let Some(vm) = state.vms.get(&o.vm) {
        let until = Instant::now() + Duration::from_secs(5);
        while !crate::agent::promote_here(agent_dir, &state, vm, me) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    tracing::info!(vm = %o.vm, took_ms = started.elapsed().as_millis() as u64, "live migration: the disks are this server's");
    Switched::Yes
}
