//! The per-VM control socket: a unix socket speaking one JSON object per line, the messages
//! of [`vmm_api`] (shared with the processes that drive the VMM).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

pub use vmm_api::{DiskStatus, Migrated, Request, Response, RunState, Status};

use crate::devices::serial::Console;
use crate::migration::MigrationWatch;
use crate::vm::VmEvent;

/// Longest request line accepted; anything longer is refused unread.
const MAX_LINE: u64 = vmm_api::MAX_LINE as u64;

/// Serves the control socket at `path` until the process exits.
pub fn serve(
    path: &Path,
    events: Sender<VmEvent>,
    console: Arc<Console>,
    watch: Arc<MigrationWatch>,
) -> std::io::Result<()> {
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
                let watch = watch.clone();
                let _ = std::thread::Builder::new()
                    .name("api-conn".into())
                    .spawn(move || {
                        if let Err(e) = handle(conn, events, console, &watch) {
                            tracing::debug!(error = %e, "control connection ended");
                        }
                    });
            }
        })?;
    Ok(())
}

/// Where the VM's loop answers a request: the connection's thread writes the answer, then says
/// it did, so that a loop about to end the process (a stop, a VM that moved away) can wait for
/// its answer to leave first.
pub struct Reply {
    answer: Sender<Response>,
    written: Receiver<()>,
}

/// An answer handed to its connection, which [`Written::wait`] waits to see written.
pub struct Written(Receiver<()>);

impl Reply {
    /// A reply, the end its connection reads the answer from, and the end it says "written" on
    /// (by sending, or by dropping it).
    pub fn new() -> (Reply, Receiver<Response>, Sender<()>) {
        let (answer, rx) = channel();
        let (done, written) = channel();
        (Reply { answer, written }, rx, done)
    }

    /// Hands `r` to the connection.
    pub fn send(self, r: Response) -> Written {
        let _ = self.answer.send(r);
        Written(self.written)
    }
}

impl Written {
    /// Waits, at most `max`, until the connection wrote the answer or gave up on it.
    pub fn wait(self, max: Duration) {
        let _ = self.0.recv_timeout(max);
    }
}

fn reply(w: &mut UnixStream, r: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)
}

fn handle(
    conn: UnixStream,
    events: Sender<VmEvent>,
    console: Arc<Console>,
    watch: &MigrationWatch,
) -> std::io::Result<()> {
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
        // Answered here: the VM's loop is busy with the migration they ask about.
        let done = |r: Result<(), String>| r.map_or_else(Response::err, |()| Response::ok());
        let answered = match req {
            Request::MigrationStatus {} => Some(Response {
                ok: true,
                migration: watch.progress(),
                ..Default::default()
            }),
            Request::CancelMigration {} => Some(done(watch.cancel())),
            Request::MigrationGo {} => Some(done(watch.go())),
            _ => None,
        };
        if let Some(r) = answered {
            reply(&mut writer, &r)?;
            continue;
        }
        if matches!(req, Request::Serial {}) {
            reply(&mut writer, &Response::ok())?;
            return stream_serial(reader, writer, events, console);
        }
        let (tx, rx, written) = Reply::new();
        if events.send(VmEvent::Api(req, tx)).is_err() {
            reply(&mut writer, &Response::err("the VM is gone"))?;
            return Ok(());
        }
        let r = rx
            .recv()
            .unwrap_or_else(|_| Response::err("the VM stopped before answering"));
        reply(&mut writer, &r)?;
        let _ = written.send(());
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
    fn socket_answers_bad_requests_and_forwards_good_ones() {
        let dir = std::env::temp_dir().join(format!("enspeed-api-{}", std::process::id()));
        let (tx, rx) = channel();
        serve(
            &dir,
            tx,
            Console::new(Box::new(std::io::sink())),
            Default::default(),
        )
        .unwrap();
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
