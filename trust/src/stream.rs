//! A TLS connection over a blocking TCP socket that, like the socket, may be read on one
//! thread and written on another (a console relays both ways at once).
//!
//! The rustls state sits behind a mutex that is never held while the socket blocks: a reader
//! takes ciphertext from the socket first and decrypts under the lock; a writer encrypts under
//! the lock and sends after it, in the order the records were made (a ticket each), so a
//! writer stuck on a full socket never keeps the reader from draining the other direction.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::Connection;

/// The most ciphertext read from the socket at once (several full TLS records).
const READ_CHUNK: usize = 64 * 1024;

struct State {
    conn: Connection,
    /// Ciphertext read; rustls has taken it up to `taken` (moved only when all is taken: rustls
    /// takes a few KiB at a time, and moving the rest down each time cost more than the
    /// decryption).
    raw: Vec<u8>,
    taken: usize,
    /// The socket said end of file.
    eof: bool,
    /// The ticket of the next records made.
    next_ticket: u64,
}

impl State {
    /// Whether ciphertext read waits for rustls.
    fn unread(&self) -> bool {
        self.taken < self.raw.len()
    }
}

struct Shared {
    state: Mutex<State>,
    /// The ticket whose records go out next.
    sending: Mutex<u64>,
    turn: Condvar,
}

/// One end of a TLS connection; clones share it (one may read while another writes).
pub struct TlsStream {
    shared: Arc<Shared>,
    sock: TcpStream,
    /// Where this handle reads ciphertext into.
    scratch: Vec<u8>,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsStream({:?})", self.sock.peer_addr().ok())
    }
}

impl TlsStream {
    /// Runs the handshake of `conn` on `sock` (giving up after `timeout`).
    pub(crate) fn handshake(
        mut conn: Connection,
        mut sock: TcpStream,
        timeout: Duration,
    ) -> io::Result<TlsStream> {
        let (r, w) = (sock.read_timeout()?, sock.write_timeout()?);
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        // Whatever the handshake's last flight left to send.
        while conn.wants_write() {
            conn.write_tls(&mut sock)?;
        }
        sock.set_read_timeout(r)?;
        sock.set_write_timeout(w)?;
        let _ = sock.set_nodelay(true);
        Ok(TlsStream {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    conn,
                    raw: Vec::new(),
                    taken: 0,
                    eof: false,
                    next_ticket: 0,
                }),
                sending: Mutex::new(0),
                turn: Condvar::new(),
            }),
            sock,
            scratch: Vec::new(),
        })
    }

    /// The certificates the peer presented.
    pub fn peer_certificates(&self) -> Option<Vec<CertificateDer<'static>>> {
        let st = self.state();
        st.conn
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
    }

    /// Another handle on the same connection.
    pub fn try_clone(&self) -> io::Result<TlsStream> {
        Ok(TlsStream {
            shared: Arc::clone(&self.shared),
            sock: self.sock.try_clone()?,
            scratch: Vec::new(),
        })
    }

    /// The socket's read timeout (a read that times out fails with `WouldBlock`/`TimedOut`).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(t)
    }

    /// The socket's write timeout.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.sock.set_write_timeout(t)
    }

    /// `TCP_NODELAY`.
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.sock.set_nodelay(on)
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.sock.peer_addr()
    }

    /// Whether the connection can no longer carry a request and its answer: the peer closed
    /// it, or sent something unasked (an alert), or bytes wait unread here. Looks without
    /// waiting or taking anything.
    pub fn peer_closed(&self) -> bool {
        use std::os::fd::AsRawFd;
        {
            let st = self.state();
            if st.eof || st.unread() {
                return true;
            }
        }
        let mut b = [0u8; 1];
        // SAFETY: `b` is valid for one byte; MSG_PEEK | MSG_DONTWAIT neither takes nor waits.
        let got = unsafe {
            libc::recv(
                self.sock.as_raw_fd(),
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        got >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock
    }

    /// Ends the connection at once, both ways, without TLS's `close_notify`: for a peer gone
    /// silent, whose full send buffer would hold a polite close; a send blocked on it returns.
    pub fn abort(&self) -> io::Result<()> {
        self.sock.shutdown(Shutdown::Both)
    }

    /// Shuts the socket down (both handles see it); after a write shutdown, the peer reads
    /// the end of the stream.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        if matches!(how, Shutdown::Write | Shutdown::Both) {
            let out = {
                let mut st = self.state();
                st.conn.send_close_notify();
                self.take_records(&mut st)
            };
            let _ = out.and_then(|(ticket, bytes)| self.send(ticket, &bytes));
        }
        self.sock.shutdown(how)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The records rustls has ready to send, and their ticket.
    fn take_records(&self, st: &mut State) -> io::Result<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        while st.conn.wants_write() {
            st.conn.write_tls(&mut out)?;
        }
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        Ok((ticket, out))
    }

    /// Sends the records of `ticket` once every earlier ticket's are sent.
    fn send(&self, ticket: u64, bytes: &[u8]) -> io::Result<()> {
        let mut sending = self
            .shared
            .sending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        while *sending != ticket {
            sending = self
                .shared
                .turn
                .wait(sending)
                .unwrap_or_else(|e| e.into_inner());
        }
        let sent = (&self.sock).write_all(bytes);
        *sending += 1;
        self.shared.turn.notify_all();
        sent
    }

    /// Hands rustls the ciphertext read so far, as much as it takes.
    fn feed(st: &mut State) -> io::Result<()> {
        while st.unread() && st.conn.wants_read() {
            let n = st.conn.read_tls(&mut &st.raw[st.taken..])?;
            st.taken += n;
            if st.taken == st.raw.len() {
                st.raw.clear();
                st.taken = 0;
            }
            st.conn
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if n == 0 {
                break;
            }
        }
        if st.eof && !st.unread() {
            // Tell rustls the socket ended: a read then reports a truncated stream.
            let _ = st.conn.read_tls(&mut &[][..]);
            let _ = st.conn.process_new_packets();
        }
        Ok(())
    }
}

impl TlsStream {
    /// After a read got `n` bytes into `out`: as much more as is already here, decrypted or in
    /// the socket, without waiting (as a TCP read returns all the socket holds; a reader that
    /// looks at what is buffered, a backup's group commit, sees the same).
    fn read_more(&self, st: &mut State, out: &mut [u8], mut n: usize) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        while n < out.len() {
            match st.conn.reader().read(&mut out[n..]) {
                Ok(0) => break,
                Ok(m) => {
                    n += m;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => break,
            }
            if st.unread() && st.conn.wants_read() {
                TlsStream::feed(st)?;
                continue;
            }
            if st.eof || st.unread() {
                break;
            }
            use std::os::fd::AsRawFd;
            // SAFETY: `chunk` is valid for writes of its length; MSG_DONTWAIT never blocks.
            let got = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
                    chunk.as_mut_ptr().cast(),
                    chunk.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if got <= 0 {
                // Nothing more now (or the end, which the next read finds).
                break;
            }
            st.raw.extend_from_slice(&chunk[..got as usize]);
            TlsStream::feed(st)?;
        }
        Ok(n)
    }
}

impl Read for TlsStream {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let mut chunk = std::mem::take(&mut self.scratch);
        chunk.resize(READ_CHUNK, 0);
        let got = self.read_into(out, &mut chunk);
        self.scratch = chunk;
        got
    }
}

impl TlsStream {
    fn read_into(&mut self, out: &mut [u8], chunk: &mut [u8]) -> io::Result<usize> {
        loop {
            let reply = {
                let mut st = self.state();
                match st.conn.reader().read(out) {
                    Ok(0) => return Ok(0),
                    Ok(n) => return self.read_more(&mut st, out, n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if st.unread() && st.conn.wants_read() {
                    TlsStream::feed(&mut st)?;
                    continue;
                }
                if st.eof {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                // A reply the records read asked for (an alert, a key update).
                if st.conn.wants_write() {
                    Some(self.take_records(&mut st)?)
                } else {
                    None
                }
            };
            if let Some((ticket, bytes)) = reply {
                self.send(ticket, &bytes)?;
            }
            let n = (&self.sock).read(chunk)?;
            let mut st = self.state();
            if n == 0 {
                st.eof = true;
            } else {
                st.raw.extend_from_slice(&chunk[..n]);
            }
            TlsStream::feed(&mut st)?;
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (n, (ticket, bytes)) = {
            let mut st = self.state();
            let n = st.conn.writer().write(buf)?;
            (n, self.take_records(&mut st)?)
        };
        self.send(ticket, &bytes)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
