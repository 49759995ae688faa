//! The primary's side of a mirror link: connecting and the handshake, sending
//! frames with sequence numbers, and a receiver thread that matches the
//! backup's acknowledgements to what waits for them.
//!
//! A link is used once: when it fails (I/O error, timeout, a refused or
//! malformed frame) it is killed, and the connector makes a new one.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::net::MirrorStream;
use crate::proto::{Frame, Hello, Kind, Welcome, FLAG_FUA};
use crate::replica::{lock, Replica};

static NEXT_LINK: AtomicU64 = AtomicU64::new(1);

/// What an acknowledgement is for.
pub(crate) enum AckTarget {
    /// Pending guest write or flush `id` of the replica.
    Pending(u64),
    /// A resync step waits on this channel.
    Notify(mpsc::Sender<Result<(), String>>),
    /// Nothing (pings).
    Ignore,
}

struct Writer {
    out: BufWriter<MirrorStream>,
    next_seq: u64,
}

/// One connection from a primary to its backup.
pub struct Link {
    id: u64,
    generation: u64,
    writer: Mutex<Writer>,
    acks: Mutex<HashMap<u64, AckTarget>>,
    stream: MirrorStream,
    dead: AtomicBool,
    replica: Weak<Replica>,
}

impl Link {
    /// This link's identity (unique in the process).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The generation its frames carry.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether the link was killed.
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    /// Ends the link; what waited for acknowledgements stays pending (guest
    /// writes) or learns of the failure (resync steps).
    pub fn kill(&self) {
        self.kill_because("closed");
    }

    fn kill_because(&self, why: &str) {
        if self.dead.swap(true, Ordering::SeqCst) {
            return;
        }
        let _ = self.stream.shutdown(Shutdown::Both);
        lock(&self.acks).clear();
        if let Some(r) = self.replica.upgrade() {
            r.link_down(self.id, why);
        }
    }

    /// Sends `frame` (its seq assigned here) with `payload`, recording `target`
    /// for its acknowledgement.
    fn send(&self, mut frame: Frame, payload: &[u8], target: AckTarget) -> Result<u64, String> {
        if self.is_dead() {
            return Err("link is down".into());
        }
        let mut w = lock(&self.writer);
        let seq = w.next_seq;
        w.next_seq += 1;
        frame.seq = seq;
        lock(&self.acks).insert(seq, target);
        let header = frame.header_for(payload);
        let r = w
            .out
            .write_all(&header)
            .and_then(|()| w.out.write_all(payload))
            .and_then(|()| w.out.flush());
        drop(w);
        match r {
            Ok(()) => Ok(seq),
            Err(e) => {
                lock(&self.acks).remove(&seq);
                let why = format!("sending to the backup: {e}");
                self.kill_because(&why);
                Err(why)
            }
        }
    }

    /// Sends guest write `id`.
    pub(crate) fn send_write(
        &self,
        id: u64,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<(), String> {
        let mut f = Frame::new(Kind::Write, 0, self.generation);
        f.offset = offset;
        if fua {
            f.flags = FLAG_FUA;
        }
        self.send(f, data, AckTarget::Pending(id)).map(|_| ())
    }

    /// Sends guest flush `id`.
    pub(crate) fn send_flush(&self, id: u64) -> Result<(), String> {
        self.send(
            Frame::new(Kind::Flush, 0, self.generation),
            &[],
            AckTarget::Pending(id),
        )
        .map(|_| ())
    }

    /// Sends `kind` (resync steps, barriers); the receiver yields its outcome.
    pub(crate) fn send_waited(
        &self,
        kind: Kind,
        offset: u64,
        payload: &[u8],
    ) -> Result<mpsc::Receiver<Result<(), String>>, String> {
        let (tx, rx) = mpsc::channel();
        let mut f = Frame::new(kind, 0, self.generation);
        f.offset = offset;
        self.send(f, payload, AckTarget::Notify(tx))?;
        Ok(rx)
    }

    /// Sends `kind` and waits for its acknowledgement.
    pub(crate) fn call(&self, kind: Kind, payload: &[u8]) -> Result<(), String> {
        wait(self.send_waited(kind, 0, payload)?)
    }
}

/// Waits for an acknowledgement sent to `rx`.
pub(crate) fn wait(rx: mpsc::Receiver<Result<(), String>>) -> Result<(), String> {
    rx.recv()
        .unwrap_or_else(|_| Err("link went down before the backup answered".into()))
}

/// Connects to the backup at `peer`, says Hello, and returns the live link
/// and the backup's Welcome. Receiving and pinging run on their own threads.
pub(crate) fn connect(
    replica: &Arc<Replica>,
    peer: &str,
    hello: &Hello,
) -> Result<(Arc<Link>, Welcome), String> {
    let t = replica.timing;
    let (stream, server) = replica
        .net
        .connect(peer, t.link_timeout)
        .map_err(|e| format!("connecting to backup {peer}: {e}"))?;
    if let (Some(want), Some(got)) = (replica.peer_server(), server) {
        if want != got {
            return Err(format!(
                "the blockd at {peer} is server {got}'s, not the backup's (server {want})"
            ));
        }
    }
    let setup = |e: std::io::Error| format!("setting up the link to {peer}: {e}");
    stream.set_nodelay(true).map_err(setup)?;
    stream
        .set_read_timeout(Some(t.link_timeout))
        .map_err(setup)?;
    stream
        .set_write_timeout(Some(t.link_timeout))
        .map_err(setup)?;
    let mut out = BufWriter::with_capacity(64 << 10, stream.try_clone().map_err(setup)?);
    Frame::json(Kind::Hello, 1, hello.generation, hello)
        .write_to(&mut out)
        .and_then(|()| out.flush())
        .map_err(|e| format!("saying hello to backup {peer}: {e}"))?;
    let mut reader = BufReader::with_capacity(64 << 10, stream.try_clone().map_err(setup)?);
    let reply = Frame::read_from(&mut reader)
        .map_err(|e| format!("backup {peer} did not answer the hello: {e}"))?;
    let welcome: Welcome = match reply.kind {
        Kind::Welcome => reply.parse_json()?,
        Kind::Error => return Err(format!("backup {peer} refused: {}", reply.text())),
        other => return Err(format!("backup {peer} answered the hello with {other:?}")),
    };
    let link = Arc::new(Link {
        id: NEXT_LINK.fetch_add(1, Ordering::Relaxed),
        generation: hello.generation,
        writer: Mutex::new(Writer { out, next_seq: 2 }),
        acks: Mutex::new(HashMap::new()),
        stream,
        dead: AtomicBool::new(false),
        replica: Arc::downgrade(replica),
    });
    let l = link.clone();
    std::thread::Builder::new()
        .name(format!("mirror-rx-{}", replica.name()))
        .spawn(move || receive(l, reader))
        .map_err(|e| format!("starting the link receiver: {e}"))?;
    let l = link.clone();
    let interval = t.ping_interval;
    std::thread::Builder::new()
        .name(format!("mirror-ping-{}", replica.name()))
        .spawn(move || ping(l, interval))
        .map_err(|e| format!("starting the link pinger: {e}"))?;
    Ok((link, welcome))
}

fn receive(link: Arc<Link>, mut reader: BufReader<MirrorStream>) {
    loop {
        let frame = match Frame::read_from(&mut reader) {
            Ok(f) => f,
            Err(e) => {
                link.kill_because(&format!("receiving from the backup: {e}"));
                return;
            }
        };
        match frame.kind {
            Kind::Ack => {
                let target = lock(&link.acks).remove(&frame.offset);
                let result = if frame.status == 0 {
                    Ok(())
                } else {
                    Err(frame.text())
                };
                match (target, result) {
                    (Some(AckTarget::Pending(id)), Ok(())) => {
                        if let Some(r) = link.replica.upgrade() {
                            r.remote_done(id);
                        }
                    }
                    (Some(AckTarget::Notify(tx)), result) => {
                        let failed = result.is_err();
                        let _ = tx.send(result.clone());
                        if failed {
                            link.kill_because(&format!(
                                "the backup failed a request: {}",
                                result.unwrap_err()
                            ));
                            return;
                        }
                    }
                    (Some(AckTarget::Pending(_)), Err(e)) => {
                        // The backup could not write: it no longer mirrors;
                        // the write stalls like any other until resync or
                        // until the disk goes on alone.
                        link.kill_because(&format!("the backup failed a write: {e}"));
                        return;
                    }
                    (Some(AckTarget::Ignore), _) => {}
                    (None, _) => {
                        link.kill_because(&format!(
                            "the backup acknowledged unknown seq {}",
                            frame.offset
                        ));
                        return;
                    }
                }
            }
            Kind::Error => {
                link.kill_because(&format!("the backup ended the link: {}", frame.text()));
                return;
            }
            other => {
                link.kill_because(&format!("the backup sent an unexpected {other:?} frame"));
                return;
            }
        }
    }
}

fn ping(link: Arc<Link>, interval: Duration) {
    while !link.is_dead() {
        std::thread::sleep(interval);
        if link
            .send(
                Frame::new(Kind::Ping, 0, link.generation),
                &[],
                AckTarget::Ignore,
            )
            .is_err()
        {
            return;
        }
    }
}
