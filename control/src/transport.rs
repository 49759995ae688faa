//! Raft messages between servers over mutual TLS (see `peers`).
//!
//! A connection opens with the preface `ENSPRAFT`, then a hello (sender's id, u64 BE; its
//! address, u16 BE length and bytes), then frames: a u32 BE length and that many bytes of a
//! raft-rs protobuf `Message`. Connections are one-way: each server dials every peer it sends
//! to, and reads what peers send on the connections they dialled.
//!
//! The sender is the server its certificate names: a hello naming another id is refused, and
//! the address a hello gives only fills a gap in the address book (committed server records
//! are what it holds).
//!
//! Sending never blocks the Raft thread: each peer has a bounded queue and a thread that
//! (re)connects and writes. Raft tolerates lost messages, so a full queue or a broken link drops
//! them and tells the node (`report_unreachable`, and `report_snapshot` for snapshots).

use std::collections::HashMap;
use std::io::{self, BufRead, BufWriter, Read, Write};
use std::sync::mpsc::{sync_channel, Receiver, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::prelude::{Message, MessageType};

use enspeed_trust::TlsStream;

use crate::node::Event;
use crate::peers::Peers;

/// The first bytes of a peer connection (a client's first byte is `{`).
pub const PREFACE: &[u8; 8] = b"ENSPRAFT";
/// The largest frame accepted: a snapshot of the whole state machine must fit.
pub const MAX_FRAME: usize = 64 << 20;
/// The longest address in a hello.
const MAX_ADDRESS: usize = 256;
/// Messages waiting for one peer before new ones are dropped.
const QUEUE: usize = 4096;
/// How long to wait before dialling a peer that refused again.
const REDIAL: Duration = Duration::from_millis(200);

/// Where each server listens, by Raft id: from committed server records, hellos and joins.
pub type AddressBook = Arc<RwLock<HashMap<u64, String>>>;

/// Why a frame or hello was refused.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The connection failed or closed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The length prefix is zero or beyond `MAX_FRAME`.
    #[error("frame length {0} out of range")]
    Length(usize),
    /// The bytes are not a raft message.
    #[error("not a raft message: {0}")]
    Decode(String),
    /// The connection does not start with the preface and a sane hello.
    #[error("bad hello: {0}")]
    Hello(String),
}

/// Writes one message as a frame.
pub fn write_frame(w: &mut impl Write, m: &Message) -> io::Result<()> {
    let body = m.write_to_bytes().map_err(io::Error::other)?;
    if body.is_empty() || body.len() > MAX_FRAME {
        return Err(io::Error::other(format!(
            "message of {} bytes cannot be framed",
            body.len()
        )));
    }
    w.write_all(&(body.len() as u32).to_be_bytes())?;
    w.write_all(&body)
}

/// Reads one frame and decodes its message.
pub fn read_frame(r: &mut impl Read) -> Result<Message, FrameError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(FrameError::Length(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Message::parse_from_bytes(&body).map_err(|e| FrameError::Decode(e.to_string()))
}

/// Writes the preface and hello.
pub fn write_hello(w: &mut impl Write, id: u64, address: &str) -> io::Result<()> {
    if address.len() > MAX_ADDRESS {
        return Err(io::Error::other(format!("address {address:?} too long")));
    }
    w.write_all(PREFACE)?;
    w.write_all(&id.to_be_bytes())?;
    w.write_all(&(address.len() as u16).to_be_bytes())?;
    w.write_all(address.as_bytes())
}

/// Reads the preface and hello: the sender's id and address.
pub fn read_hello(r: &mut impl Read) -> Result<(u64, String), FrameError> {
    let mut preface = [0u8; 8];
    r.read_exact(&mut preface)?;
    if &preface != PREFACE {
        return Err(FrameError::Hello("no preface".into()));
    }
    let mut id = [0u8; 8];
    r.read_exact(&mut id)?;
    let id = u64::from_be_bytes(id);
    let mut len = [0u8; 2];
    r.read_exact(&mut len)?;
    let len = u16::from_be_bytes(len) as usize;
    if id == 0 || len == 0 || len > MAX_ADDRESS {
        return Err(FrameError::Hello(format!(
            "id {id}, address of {len} bytes"
        )));
    }
    let mut addr = vec![0u8; len];
    r.read_exact(&mut addr)?;
    let addr =
        String::from_utf8(addr).map_err(|_| FrameError::Hello("address is not UTF-8".into()))?;
    Ok((id, addr))
}

/// The sending side for every peer, and the receiving side of each accepted peer connection.
pub struct Transport {
    id: u64,
    address: String,
    book: AddressBook,
    trust: Arc<Peers>,
    events: Sender<Event>,
    peers: Mutex<HashMap<u64, SyncSender<Message>>>,
}

impl Transport {
    /// A transport for server `id`, listening on `address`, connecting with `peers`, feeding
    /// received messages to `events`.
    pub fn new(
        id: u64,
        address: String,
        book: AddressBook,
        peers: Arc<Peers>,
        events: Sender<Event>,
    ) -> Arc<Transport> {
        Arc::new(Transport {
            id,
            address,
            book,
            trust: peers,
            events,
            peers: Mutex::new(HashMap::new()),
        })
    }

    /// This server's certificates and the roster.
    pub fn peers(&self) -> &Arc<Peers> {
        &self.trust
    }

    /// Queues a message for its peer; drops it (and says so to the node) if the queue is full.
    pub fn send(self: &Arc<Self>, m: Message) {
        let to = m.to;
        let mut peers = self.peers.lock().expect("peers lock");
        let tx = peers.entry(to).or_insert_with(|| {
            let (tx, rx) = sync_channel(QUEUE);
            let me = Arc::clone(self);
            std::thread::Builder::new()
                .name(format!("raft-to-{to}"))
                .spawn(move || me.peer_loop(to, rx))
                .expect("spawn peer thread");
            tx
        });
        match tx.try_send(m) {
            Ok(()) => {}
            Err(TrySendError::Full(m)) | Err(TrySendError::Disconnected(m)) => {
                tracing::debug!(server = to, "send queue full; message dropped");
                self.failed(&[m]);
            }
        }
    }

    /// Tells the node its messages to a peer were lost.
    fn failed(&self, batch: &[Message]) {
        let Some(first) = batch.first() else { return };
        let _ = self.events.send(Event::Unreachable(first.to));
        for m in batch
            .iter()
            .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
        {
            let _ = self.events.send(Event::SnapshotSent {
                to: m.to,
                ok: false,
            });
        }
    }

    fn dial(&self, to: u64) -> io::Result<BufWriter<TlsStream>> {
        let addr = self
            .book
            .read()
            .expect("address book lock")
            .get(&to)
            .cloned()
            .ok_or_else(|| io::Error::other(format!("no address for server {to}")))?;
        let s = self.trust.connect(&addr, Duration::from_millis(500))?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        let mut w = BufWriter::with_capacity(64 << 10, s);
        write_hello(&mut w, self.id, &self.address)?;
        Ok(w)
    }

    fn peer_loop(&self, to: u64, rx: Receiver<Message>) {
        let mut conn: Option<BufWriter<TlsStream>> = None;
        let mut redial_at = Instant::now();
        let mut logged_down = false;
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < 256 {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            // The peer only reads this connection: anything it shows (its end closed by a
            // restart, a reset) means it is gone, and a message written into it would be
            // lost without an error (an election's vote answers among them).
            if conn.as_ref().is_some_and(|c| c.get_ref().peer_closed()) {
                tracing::info!(
                    server = to,
                    "raft link closed by the peer; connecting again"
                );
                conn = None;
            }
            if conn.is_none() {
                if Instant::now() < redial_at {
                    self.failed(&batch);
                    continue;
                }
                match self.dial(to) {
                    Ok(c) => {
                        if logged_down {
                            tracing::info!(server = to, "raft link up");
                        }
                        logged_down = false;
                        conn = Some(c);
                    }
                    Err(e) => {
                        if !logged_down {
                            tracing::warn!(server = to, error = %e, "raft link down");
                            logged_down = true;
                        }
                        redial_at = Instant::now() + REDIAL;
                        self.failed(&batch);
                        continue;
                    }
                }
            }
            let w = conn.as_mut().expect("connected");
            let sent = batch
                .iter()
                .try_for_each(|m| write_frame(w, m))
                .and_then(|()| w.flush());
            match sent {
                Ok(()) => {
                    for m in batch
                        .iter()
                        .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
                    {
                        let _ = self.events.send(Event::SnapshotSent { to: m.to, ok: true });
                    }
                }
                Err(e) => {
                    tracing::warn!(server = to, error = %e, "raft link broke");
                    logged_down = true;
                    conn = None;
                    self.failed(&batch);
                }
            }
        }
    }

    /// Reads an accepted connection from server `id` (as its certificate says) until it
    /// closes or sends something malformed.
    pub fn serve_peer(&self, mut r: impl BufRead, id: u64) {
        let (from, address) = match read_hello(&mut r) {
            Ok((from, _)) if from != id => {
                tracing::warn!(server = id, claims = from, "refused a peer connection: its hello names another server than its certificate");
                return;
            }
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(server = id, error = %e, "refused a peer connection");
                return;
            }
        };
        self.book
            .write()
            .expect("address book lock")
            .entry(from)
            .or_insert(address);
        loop {
            match read_frame(&mut r) {
                Ok(m) if m.to != self.id || m.from != from => {
                    tracing::warn!(
                        server = from,
                        to = m.to,
                        msg_from = m.from,
                        "message for someone else; closing"
                    );
                    return;
                }
                Ok(m) => {
                    if self.events.send(Event::Raft(Box::new(m))).is_err() {
                        return;
                    }
                }
                Err(FrameError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return,
                Err(e) => {
                    tracing::warn!(server = from, error = %e, "closing a peer connection");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::prelude::{Entry, Snapshot};

    fn message() -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        m.from = 1;
        m.to = 2;
        m.term = 7;
        m.index = 41;
        let e = Entry {
            index: 42,
            term: 7,
            data: b"{\"cmd\":\"put\"}".to_vec().into(),
            ..Default::default()
        };
        m.mut_entries().push(e);
        m
    }

    /// Server 2's side of the transport on `listener`: accepts and serves peer connections;
    /// answers the sockets it accepted (to close them as a restart would).
    fn serve_on(
        listener: std::net::TcpListener,
        peers: Arc<Peers>,
        transport: Arc<Transport>,
    ) -> Arc<Mutex<Vec<std::net::TcpStream>>> {
        let accepted: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
        let list = Arc::clone(&accepted);
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { return };
                list.lock().unwrap().push(tcp.try_clone().unwrap());
                let (peers, transport) = (Arc::clone(&peers), Arc::clone(&transport));
                std::thread::spawn(move || {
                    if let Ok((s, enspeed_trust::Peer::Server { id, .. })) = peers.accept(tcp) {
                        transport.serve_peer(std::io::BufReader::new(s), id);
                    }
                });
            }
        });
        accepted
    }

    /// The next Raft message server 2 received, within a second.
    fn received(events: &std::sync::mpsc::Receiver<Event>) -> Option<Message> {
        let deadline = Instant::now() + Duration::from_secs(1);
        while let Ok(e) = events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            if let Event::Raft(m) = e {
                return Some(*m);
            }
        }
        None
    }

    #[test]
    fn the_first_message_to_a_restarted_peer_is_not_lost() {
        let base = std::env::temp_dir().join(format!("transport-restart-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (d1, d2) = (base.join("1"), base.join("2"));
        let one = enspeed_trust::TrustDir::of(&d1);
        one.create_cluster(1).unwrap();
        enspeed_trust::TrustDir::of(&d2)
            .install(&one.enroll(2).unwrap())
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let book: AddressBook = Arc::new(RwLock::new(HashMap::from([(2, addr.clone())])));
        let (tx1, _rx1) = std::sync::mpsc::channel();
        let t1 = Transport::new(
            1,
            "127.0.0.1:1".into(),
            book.clone(),
            Peers::member(&d1).unwrap(),
            tx1,
        );
        let p2 = Peers::member(&d2).unwrap();
        let (tx2, rx2) = std::sync::mpsc::channel();
        let t2 = Transport::new(2, addr, book.clone(), Arc::clone(&p2), tx2);
        let accepted = serve_on(listener, Arc::clone(&p2), Arc::clone(&t2));
        let mut m = message();
        t1.send(m.clone());
        assert_eq!(received(&rx2).map(|r| r.index), Some(41));
        // Server 2 restarts: its sockets close, a new process listens (on another port here,
        // which the address book then names).
        for s in accepted.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        book.write()
            .unwrap()
            .insert(2, listener.local_addr().unwrap().to_string());
        serve_on(listener, p2, t2);
        std::thread::sleep(Duration::from_millis(100));
        m.index = 42;
        t1.send(m);
        assert_eq!(
            received(&rx2).map(|r| r.index),
            Some(42),
            "the first message after the restart was lost"
        );
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn frames_and_hellos_round_trip() {
        let mut buf = Vec::new();
        write_hello(&mut buf, 3, "127.0.0.1:7003").unwrap();
        write_frame(&mut buf, &message()).unwrap();
        let mut snap = Message::default();
        snap.set_msg_type(MessageType::MsgSnapshot);
        snap.from = 1;
        snap.to = 2;
        let mut s = Snapshot::default();
        s.mut_metadata().index = 9;
        s.data = vec![7u8; 100_000].into();
        snap.set_snapshot(s);
        write_frame(&mut buf, &snap).unwrap();
        let mut r = &buf[..];
        assert_eq!(
            read_hello(&mut r).unwrap(),
            (3, "127.0.0.1:7003".to_string())
        );
        assert_eq!(read_frame(&mut r).unwrap(), message());
        assert_eq!(read_frame(&mut r).unwrap(), snap);
        assert!(matches!(read_frame(&mut r), Err(FrameError::Io(_))));
    }

    #[test]
    fn malformed_bytes_are_refused() {
        let mut good = Vec::new();
        write_frame(&mut good, &message()).unwrap();
        // Truncated anywhere: an error, never a message.
        for cut in 0..good.len() {
            assert!(read_frame(&mut &good[..cut]).is_err(), "cut at {cut}");
        }
        assert!(matches!(
            read_frame(&mut &[0u8, 0, 0, 0][..]),
            Err(FrameError::Length(0))
        ));
        let huge = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert!(matches!(
            read_frame(&mut &huge[..]),
            Err(FrameError::Length(_))
        ));
        let mut garbage = 8u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(&[0xff; 8]);
        assert!(matches!(
            read_frame(&mut &garbage[..]),
            Err(FrameError::Decode(_))
        ));
        assert!(read_hello(&mut &b"GET / HTTP/1.1\r\n\r\n"[..]).is_err());
        let mut zero_id = Vec::new();
        write_hello(&mut zero_id, 0, "x:1").unwrap();
        assert!(read_hello(&mut &zero_id[..]).is_err());
        let mut long = PREFACE.to_vec();
        long.extend_from_slice(&1u64.to_be_bytes());
        long.extend_from_slice(&u16::MAX.to_be_bytes());
        assert!(read_hello(&mut &long[..]).is_err());
    }
}
