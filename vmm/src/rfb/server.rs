//! The RFB server loop: a unix socket, a thread per client.
//!
//! ```text
//!   connect -> version -> security (None) -> ClientInit -> ServerInit
//!           -> messages <-> updates, until the client leaves or misbehaves
//! ```
//!
//! Each client has its own pixel format, its own copy of the frame it was
//! last sent, and its own keyboard state; a pending incremental update
//! request is answered as soon as a tile differs from that copy (checked
//! every [`POLL`]). Bytes that are not RFB, a message we refuse, or a
//! client that stops reading what we send close that client only.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::keysym::Keyboard;
use super::update::{ClientFrame, Converter};
use super::wire::{
    ClientInit, ClientMessage, PixelFormat, Rect, RectHeader, SecurityResult, SecurityTypes,
    ServerInit, UpdateHeader, Version, WireError, ENCODING_DESKTOP_SIZE, SECURITY_NONE,
};
use crate::devices::framebuffer::Framebuffer;
use crate::devices::i8042::KeyStroke;
use crate::vm::VmEvent;

/// Clients served at once; more are closed on arrival.
pub const MAX_CLIENTS: usize = 16;
/// Time a client has for the whole handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a write may block before the client counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a pending incremental request looks for changes.
pub const POLL: Duration = Duration::from_millis(30);
/// How long a client with nothing pending waits in a read.
const IDLE_WAIT: Duration = Duration::from_millis(500);
/// Most bytes buffered from a client: well above the longest message we
/// decode whole (a SetEncodings of 1024 encodings, 4100 bytes).
const READ_BUF_MAX: usize = 16 * 1024;
/// Most clipboard text typed from one paste.
const MAX_PASTE: usize = 16 * 1024;

/// Why a client was closed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket failed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The client sent bytes we refuse.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The client closed the connection.
    #[error("the client closed the connection")]
    Closed,
    /// The handshake took too long.
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(Duration),
}

/// What every client thread shares.
struct Shared {
    fb: Arc<Framebuffer>,
    name: String,
    events: Sender<VmEvent>,
}

/// Serves RFB on a unix socket at `path` until the process exits: the
/// framebuffer `fb` to every client, under the desktop name `name`, and
/// their keys to the VM as [`VmEvent::Keys`] and their pointer as
/// [`VmEvent::Pointer`]; clipboard text a client sends is typed as keys.
/// There is no authentication (security type None): the socket is made
/// accessible to its owner only, the local server process, which
/// authenticates the people it proxies.
pub fn serve(
    path: &Path,
    fb: Arc<Framebuffer>,
    name: String,
    events: Sender<VmEvent>,
) -> std::io::Result<()> {
    // A stale socket from a crashed VMM would make bind fail.
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let shared = Arc::new(Shared { fb, name, events });
    std::thread::Builder::new()
        .name("rfb".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if shared.fb.viewer_joined() >= MAX_CLIENTS {
                    shared.fb.viewer_left();
                    tracing::warn!(vm = %shared.name, max = MAX_CLIENTS, "RFB client refused: too many clients");
                    continue;
                }
                let shared2 = shared.clone();
                let spawned = std::thread::Builder::new()
                    .name("rfb-client".into())
                    .spawn(move || serve_client(conn, &shared2));
                if spawned.is_err() {
                    shared.fb.viewer_left();
                }
            }
        })?;
    Ok(())
}

/// One client's thread, from connection to close.
fn serve_client(conn: UnixStream, shared: &Shared) {
    let vm = &shared.name;
    let mut client = Client::new(conn, shared);
    match client.run() {
        Ok(()) | Err(ClientError::Closed) => tracing::debug!(%vm, "RFB client left"),
        Err(e) => tracing::warn!(%vm, error = %e, "RFB client closed"),
    }
    client.release_keys();
    shared.fb.viewer_left();
}

type Decoder<T> = fn(&[u8]) -> Result<Option<(T, usize)>, WireError>;

/// A pending FramebufferUpdateRequest.
struct Pending {
    area: Rect,
    full: bool,
}

/// One client's connection and state.
struct Client<'a> {
    stream: UnixStream,
    shared: &'a Shared,
    buf: Vec<u8>,
    /// Bytes of a ClientCutText's text still to come.
    skip: usize,
    /// The clipboard text being received, typed into the guest once whole.
    paste: Option<Vec<u8>>,
    converter: Converter,
    frame: ClientFrame,
    keyboard: Keyboard,
    pending: Option<Pending>,
    /// The encoding of this client's updates, by name.
    encoding: &'static str,
    /// Whether the client follows size changes (the DesktopSize pseudo-encoding).
    desktop_size: bool,
    /// The framebuffer's resize count the client's frame is of.
    resizes: u64,
}

impl<'a> Client<'a> {
    fn new(stream: UnixStream, shared: &'a Shared) -> Self {
        Client {
            stream,
            shared,
            buf: Vec::with_capacity(4096),
            skip: 0,
            paste: None,
            converter: Converter::new(&PixelFormat::XRGB8888),
            frame: ClientFrame::new(&shared.fb),
            desktop_size: false,
            resizes: shared.fb.resizes(),
            keyboard: Keyboard::default(),
            pending: None,
            encoding: "raw",
        }
    }

    fn run(&mut self) -> Result<(), ClientError> {
        self.stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        self.handshake()?;
        self.serve()
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    /// Reads what the client sent, waiting at most `wait`. Returns whether
    /// bytes came; end of stream is [`ClientError::Closed`].
    fn fill(&mut self, wait: Duration) -> Result<bool, ClientError> {
        if self.buf.len() >= READ_BUF_MAX {
            // Cannot happen with the decoders' bounds; refuse rather than grow.
            return Err(ClientError::Io(std::io::Error::other(
                "client message larger than the read buffer",
            )));
        }
        self.stream
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
        let mut tmp = [0u8; 4096];
        let room = (READ_BUF_MAX - self.buf.len()).min(tmp.len());
        match self.stream.read(&mut tmp[..room]) {
            Ok(0) => Err(ClientError::Closed),
            Ok(n) => {
                self.discard_then_keep(&tmp[..n]);
                Ok(true)
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Appends new bytes, first taking out what belongs to clipboard text.
    fn discard_then_keep(&mut self, mut bytes: &[u8]) {
        let drop = self.skip.min(bytes.len());
        self.skip -= drop;
        self.collect_paste(&bytes[..drop]);
        bytes = &bytes[drop..];
        self.buf.extend_from_slice(bytes);
    }

    /// Keeps clipboard text (up to [`MAX_PASTE`] bytes; the rest is dropped)
    /// and types it into the guest once all of it came.
    fn collect_paste(&mut self, bytes: &[u8]) {
        if let Some(p) = &mut self.paste {
            let room = MAX_PASTE.saturating_sub(p.len());
            p.extend_from_slice(&bytes[..bytes.len().min(room)]);
        }
        if self.skip == 0 {
            if let Some(text) = self.paste.take() {
                self.type_text(&text);
            }
        }
    }

    /// Types clipboard text (ISO 8859-1, as RFB carries it) on the keyboard:
    /// what a console user pastes reaches the guest as keystrokes.
    fn type_text(&mut self, text: &[u8]) {
        let mut strokes = Vec::new();
        for &b in text {
            let keysym = match b {
                b'\n' => 0xff0d,
                b'\t' => 0xff09,
                b'\r' => continue,
                0x20..=0x7e | 0xa0..=0xff => u32::from(b),
                _ => continue,
            };
            strokes.extend(self.keyboard.event(keysym, true));
            strokes.extend(self.keyboard.event(keysym, false));
        }
        tracing::debug!(vm = %self.shared.name, bytes = text.len(), "RFB clipboard typed");
        self.send_keys(strokes);
    }

    /// Reads one handshake message, within the handshake's deadline.
    fn read<T>(&mut self, decode: Decoder<T>, deadline: Instant) -> Result<T, ClientError> {
        loop {
            if let Some((v, n)) = decode(&self.buf)? {
                self.buf.drain(..n);
                return Ok(v);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::HandshakeTimeout(HANDSHAKE_TIMEOUT));
            }
            self.fill(left)?;
        }
    }

    fn handshake(&mut self) -> Result<(), ClientError> {
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        self.send(&Version::V3_8.encode())?;
        let version = self.read(Version::decode, deadline)?;
        let mut out = Vec::new();
        if version == Version::V3_3 {
            // 3.3: the server decides, as a u32.
            out.extend(u32::from(SECURITY_NONE).to_be_bytes());
            self.send(&out)?;
        } else {
            SecurityTypes(vec![SECURITY_NONE]).encode(&mut out);
            self.send(&out)?;
            let chosen = self.read(|b| Ok(b.first().map(|&t| (t, 1))), deadline)?;
            if chosen != SECURITY_NONE {
                if version == Version::V3_8 {
                    let mut out = Vec::new();
                    SecurityResult::Failed("only security type None is offered".into())
                        .encode(&mut out);
                    let _ = self.send(&out);
                }
                return Err(WireError::BadSecurityType(chosen).into());
            }
            if version == Version::V3_8 {
                let mut out = Vec::new();
                SecurityResult::Ok.encode(&mut out);
                self.send(&out)?;
            }
        }
        // Sharing is always on: every client sees the same screen.
        let _: ClientInit = self.read(ClientInit::decode, deadline)?;
        let fb = &self.shared.fb;
        let mut out = Vec::new();
        ServerInit {
            width: u16::try_from(fb.width()).unwrap_or(u16::MAX),
            height: u16::try_from(fb.height()).unwrap_or(u16::MAX),
            format: PixelFormat::XRGB8888,
            name: self.shared.name.clone(),
        }
        .encode(&mut out);
        self.send(&out)?;
        tracing::info!(vm = %self.shared.name, ?version, "RFB client connected");
        Ok(())
    }

    fn serve(&mut self) -> Result<(), ClientError> {
        loop {
            while let Some((msg, n)) = ClientMessage::decode(&self.buf)? {
                self.buf.drain(..n);
                self.handle(msg)?;
            }
            if self.pending.is_some() {
                self.update()?;
            }
            let wait = if self.pending.is_some() {
                POLL
            } else {
                IDLE_WAIT
            };
            self.fill(wait)?;
        }
    }

    fn handle(&mut self, msg: ClientMessage) -> Result<(), ClientError> {
        match msg {
            ClientMessage::SetPixelFormat(f) => {
                tracing::debug!(format = ?f, "RFB client pixel format");
                self.converter = Converter::new(&f);
            }
            ClientMessage::SetEncodings(list) => {
                self.desktop_size = list.contains(&ENCODING_DESKTOP_SIZE);
                let before = self.encoding;
                self.encoding = self.frame.choose_encoding(&list);
                tracing::debug!(encodings = ?list, "RFB client encodings");
                if self.encoding != before {
                    tracing::info!(vm = %self.shared.name, encoding = self.encoding, "RFB client's updates change encoding");
                }
            }
            ClientMessage::FramebufferUpdateRequest { incremental, rect } => {
                let full = !incremental || self.pending.as_ref().is_some_and(|p| p.full);
                self.pending = Some(Pending { area: rect, full });
            }
            ClientMessage::KeyEvent { down, keysym } => {
                let strokes = self.keyboard.event(keysym, down);
                self.send_keys(strokes);
            }
            ClientMessage::PointerEvent { buttons, x, y } => {
                let _ = self.shared.events.send(VmEvent::Pointer {
                    x,
                    y,
                    buttons,
                    width: self.shared.fb.width(),
                    height: self.shared.fb.height(),
                });
            }
            ClientMessage::ClientCutText { len } => {
                let len = len as usize;
                let here = len.min(self.buf.len());
                let taken: Vec<u8> = self.buf.drain(..here).collect();
                self.skip = len - here;
                self.paste = Some(Vec::new());
                self.collect_paste(&taken);
            }
        }
        Ok(())
    }

    /// Answers the pending request if it is a full one, or if something
    /// in its area changed.
    fn update(&mut self) -> Result<(), ClientError> {
        let Some(mut p) = self.pending.take() else {
            return Ok(());
        };
        let fb = &self.shared.fb;
        let resizes = fb.resizes();
        if resizes != self.resizes {
            // The guest changed mode: tell the client the new size, then
            // send the whole new screen.
            if !self.desktop_size {
                tracing::info!(vm = %self.shared.name, "RFB client cannot follow a change of screen size; closing it");
                return Err(ClientError::Closed);
            }
            self.resizes = resizes;
            let (w, h) = (fb.width(), fb.height());
            let mut out = Vec::new();
            UpdateHeader { rects: 1 }.encode(&mut out);
            let whole = Rect {
                x: 0,
                y: 0,
                w: u16::try_from(w).unwrap_or(u16::MAX),
                h: u16::try_from(h).unwrap_or(u16::MAX),
            };
            RectHeader {
                rect: whole,
                encoding: ENCODING_DESKTOP_SIZE,
            }
            .encode(&mut out);
            self.stream.write_all(&out)?;
            self.frame.resize(fb);
            p = Pending {
                area: whole,
                full: true,
            };
        }
        let rects = self.frame.changed(&self.shared.fb, p.area, p.full);
        if rects.is_empty() && !p.full {
            self.pending = Some(p);
            return Ok(());
        }
        self.frame.send(&rects, &self.converter, &mut self.stream)?;
        Ok(())
    }

    fn send_keys(&self, strokes: Vec<KeyStroke>) {
        if !strokes.is_empty() {
            let _ = self.shared.events.send(VmEvent::Keys(strokes));
        }
    }

    /// Lets go of the keys the client held when it left.
    fn release_keys(&mut self) {
        let strokes = self.keyboard.release_all();
        self.send_keys(strokes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::i8042::ScanCode;
    use std::sync::mpsc::{channel, Receiver};

    fn server(name: &str) -> (std::path::PathBuf, Arc<Framebuffer>, Receiver<VmEvent>) {
        let path = std::env::temp_dir().join(format!("enspeed-rfb-{name}-{}", std::process::id()));
        let fb = Arc::new(Framebuffer::new(100, 70).unwrap());
        let (tx, rx) = channel();
        serve(&path, fb.clone(), "test-vm".into(), tx).unwrap();
        (path, fb, rx)
    }

    fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        s.read_exact(&mut b).unwrap();
        b
    }

    fn connect(path: &Path) -> (UnixStream, ServerInit) {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(read_n(&mut s, 12), b"RFB 003.008\n");
        s.write_all(b"RFB 003.008\n").unwrap();
        assert_eq!(read_n(&mut s, 2), [1, SECURITY_NONE]);
        s.write_all(&[SECURITY_NONE, 1]).unwrap();
        assert_eq!(read_n(&mut s, 4), [0, 0, 0, 0]);
        let mut b = read_n(&mut s, 24);
        let len = u32::from_be_bytes([b[20], b[21], b[22], b[23]]) as usize;
        b.extend(read_n(&mut s, len));
        let init = ServerInit::decode(&b).unwrap().unwrap().0;
        (s, init)
    }

    fn closed(s: &mut UnixStream) -> bool {
        let mut b = [0u8; 64];
        loop {
            match s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    #[test]
    fn handshake_update_keys_and_hostile_clients() {
        let (path, fb, rx) = server("main");
        fb.put(99, 69, 0x00ab_cdef);
        let (mut s, init) = connect(&path);
        assert_eq!(
            (init.width, init.height, init.name.as_str()),
            (100, 70, "test-vm")
        );
        assert_eq!(init.format, PixelFormat::XRGB8888);

        let mut m = Vec::new();
        ClientMessage::SetEncodings(vec![0, -223]).encode(&mut m);
        ClientMessage::FramebufferUpdateRequest {
            incremental: false,
            rect: Rect {
                x: 96,
                y: 68,
                w: 4,
                h: 2,
            },
        }
        .encode(&mut m);
        // Clipboard text, split across writes, is typed once whole.
        ClientMessage::ClientCutText { len: 5 }.encode(&mut m);
        m.extend(b"hel");
        s.write_all(&m).unwrap();
        s.write_all(b"lo").unwrap();
        let hdr = UpdateHeader::decode(&read_n(&mut s, 4)).unwrap().unwrap().0;
        assert_eq!(hdr.rects, 1);
        let r = RectHeader::decode(&read_n(&mut s, 12)).unwrap().unwrap().0;
        assert_eq!(
            (r.rect.x, r.rect.y, r.rect.w, r.rect.h, r.encoding),
            (96, 68, 4, 2, 0)
        );
        let px = read_n(&mut s, 4 * 8);
        assert_eq!(&px[28..32], &0x00ab_cdefu32.to_le_bytes());

        // An incremental request waits for a change.
        let mut m = Vec::new();
        ClientMessage::FramebufferUpdateRequest {
            incremental: true,
            rect: Rect {
                x: 0,
                y: 0,
                w: 100,
                h: 70,
            },
        }
        .encode(&mut m);
        s.write_all(&m).unwrap();
        // (The first incremental request sends every tile not sent yet.)
        let hdr = UpdateHeader::decode(&read_n(&mut s, 4)).unwrap().unwrap().0;
        for _ in 0..hdr.rects {
            let r = RectHeader::decode(&read_n(&mut s, 12)).unwrap().unwrap().0;
            read_n(&mut s, 4 * usize::from(r.rect.w) * usize::from(r.rect.h));
        }
        s.write_all(&m).unwrap();
        std::thread::sleep(POLL * 3);
        s.set_nonblocking(true).unwrap();
        assert!(s.read(&mut [0u8; 1]).is_err(), "an update without a change");
        s.set_nonblocking(false).unwrap();
        fb.put(1, 1, 0x0011_2233);
        let hdr = UpdateHeader::decode(&read_n(&mut s, 4)).unwrap().unwrap().0;
        assert_eq!(hdr.rects, 1);
        let r = RectHeader::decode(&read_n(&mut s, 12)).unwrap().unwrap().0;
        assert_eq!((r.rect.x, r.rect.y, r.rect.w, r.rect.h), (0, 0, 64, 64));
        let px = read_n(&mut s, 4 * 64 * 64);
        assert_eq!(&px[4 * 65..4 * 66], &0x0011_2233u32.to_le_bytes());

        let Ok(VmEvent::Keys(typed)) = rx.recv_timeout(Duration::from_secs(5)) else {
            panic!("the clipboard was not typed")
        };
        let downs: Vec<u8> = typed
            .iter()
            .filter(|k| !k.release)
            .map(|k| k.key.code)
            .collect();
        assert_eq!(downs, vec![0x33, 0x24, 0x4b, 0x4b, 0x44], "h e l l o");
        assert_eq!(typed.len(), 10, "each key pressed and released");

        // Keys reach the VM as set-2 strokes; held ones are released when
        // the client leaves.
        let mut m = Vec::new();
        ClientMessage::KeyEvent {
            down: true,
            keysym: u32::from(b'a'),
        }
        .encode(&mut m);
        s.write_all(&m).unwrap();
        let Ok(VmEvent::Keys(k)) = rx.recv_timeout(Duration::from_secs(5)) else {
            panic!("no key event")
        };
        let a = ScanCode::plain(0x1c);
        assert_eq!(
            k,
            vec![KeyStroke {
                key: a,
                release: false
            }]
        );

        // Hostile clients are closed; the first one still works after.
        let mut bad = UnixStream::connect(&path).unwrap();
        bad.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        bad.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        assert!(closed(&mut bad));
        for msg in [
            &[6u8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff][..],
            &[0x42],
            &[0, 0, 0, 0, 8, 8, 0, 0, 0, 7, 0, 7, 0, 3, 0, 3, 6, 0, 0, 0],
        ] {
            let (mut c, _) = connect(&path);
            c.write_all(msg).unwrap();
            assert!(closed(&mut c), "{msg:?}");
        }
        let mut m = Vec::new();
        ClientMessage::FramebufferUpdateRequest {
            incremental: false,
            rect: Rect {
                x: 0,
                y: 0,
                w: 1,
                h: 1,
            },
        }
        .encode(&mut m);
        s.write_all(&m).unwrap();
        assert_eq!(read_n(&mut s, 4), [0, 0, 0, 1]);
        read_n(&mut s, 12 + 4);
        drop(s);
        let Ok(VmEvent::Keys(k)) = rx.recv_timeout(Duration::from_secs(5)) else {
            panic!("no key release")
        };
        assert_eq!(
            k,
            vec![KeyStroke {
                key: a,
                release: true
            }]
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn old_versions_and_refused_security() {
        let (path, _fb, _rx) = server("versions");
        // 3.3: the server names the security type; no result follows.
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        read_n(&mut s, 12);
        s.write_all(b"RFB 003.003\n").unwrap();
        assert_eq!(read_n(&mut s, 4), [0, 0, 0, 1]);
        s.write_all(&[0]).unwrap();
        assert_eq!(&read_n(&mut s, 4), &[0, 100, 0, 70]);
        // 3.7: a list, and no SecurityResult for None.
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        read_n(&mut s, 12);
        s.write_all(b"RFB 003.007\n").unwrap();
        assert_eq!(read_n(&mut s, 2), [1, 1]);
        s.write_all(&[1, 1]).unwrap();
        assert_eq!(&read_n(&mut s, 4), &[0, 100, 0, 70]);
        // 3.8 choosing VNC authentication: refused with a reason.
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        read_n(&mut s, 12);
        s.write_all(b"RFB 003.008\n").unwrap();
        read_n(&mut s, 2);
        s.write_all(&[2]).unwrap();
        let mut b = Vec::new();
        s.read_to_end(&mut b).unwrap();
        assert!(matches!(
            SecurityResult::decode(&b),
            Ok(Some((SecurityResult::Failed(_), _)))
        ));
        std::fs::remove_file(&path).unwrap();
    }
}
