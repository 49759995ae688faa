//! `enspeed server` processes for the whole-system tests and tools: start one (here or in a
//! network namespace), kill it, restart it on the same data directory, form a cluster, and
//! talk to it over the JSON-lines client protocol, as `enspeed cluster` does: over mutual TLS,
//! with the certificate of the server spoken to (read from its data directory, as an operator
//! on that server would).

use std::collections::HashMap;
use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use enspeed_trust::{Connector, Identity, TlsStream, TrustDir};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::enspeed_bin;

/// A free TCP port on loopback, for a server a test starts.
///
/// Ports come from below the kernel's ephemeral range (net.ipv4.ip_local_port_range, 32768
/// and up on Linux), which the kernel never gives to outgoing connections: a port found free
/// here cannot be taken by a client's connection before the server binds it. One process
/// never hands out the same port twice; each process starts at its own place in the range.
pub fn free_port() -> u16 {
    const FIRST: u16 = 20_000;
    const COUNT: u16 = 12_000;
    static NEXT: std::sync::Mutex<Option<u16>> = std::sync::Mutex::new(None);
    let mut next = NEXT.lock().unwrap_or_else(|e| e.into_inner());
    let mut offset = next.unwrap_or((std::process::id() % u32::from(COUNT)) as u16);
    for _ in 0..COUNT {
        let port = FIRST + offset;
        offset = (offset + 1) % COUNT;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            *next = Some(offset);
            return port;
        }
    }
    panic!("no free TCP port on loopback in {FIRST}..{}", FIRST + COUNT);
}

/// Polls `f` every 50 ms until it returns something, or panics after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    wait_for_explained(what, timeout, f, String::new)
}

/// [`wait_for`], with what `explain` says (the cluster's state, its logs) in the panic message.
pub fn wait_for_explained<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
    explain: impl Fn() -> String,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() >= timeout {
            let why = explain();
            let sep = if why.is_empty() { "" } else { "\n" };
            panic!("timed out waiting for {what}{sep}{why}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The result of a server's JSON-lines answer, or its error.
pub fn parse_answer(line: &str) -> Result<Value, CallError> {
    let v: Value =
        serde_json::from_str(line).map_err(|e| CallError::NoAnswer(format!("{e}: {line:?}")))?;
    if v["ok"] == true {
        Ok(v["result"].clone())
    } else {
        Err(CallError::Refused(
            v["error"].as_str().unwrap_or("?").to_string(),
        ))
    }
}

/// Why a request got no result.
#[derive(Debug)]
pub enum CallError {
    /// The connection failed: the request was never sent, it cannot have taken effect.
    NotSent(String),
    /// Sent, but no answer could be read: it may have taken effect.
    NoAnswer(String),
    /// The server answered with this error.
    Refused(String),
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::NotSent(e) | CallError::NoAnswer(e) | CallError::Refused(e) => {
                f.write_str(e)
            }
        }
    }
}

/// How long a client waits to connect (`None`: as long as the system does) and for an answer.
#[derive(Clone, Copy, Debug)]
pub struct Client {
    /// The connect timeout, if any.
    pub connect: Option<Duration>,
    /// The read timeout of every answer.
    pub read: Duration,
}

/// The data directory of the server started at each address, for its certificate.
static DATA_DIRS: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);

/// Says that the server at `addr` keeps its data (and certificates) in `data`.
pub fn register(addr: &str, data: &Path) {
    DATA_DIRS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(addr.to_string(), data.to_path_buf());
}

/// How to reach the server at `addr`: with its own certificate if it is a member, or by the
/// certificate its join token names if it waits to be added.
pub fn connector_for(addr: &str) -> Result<Connector, String> {
    let data = DATA_DIRS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .and_then(|m| m.get(addr).cloned())
        .ok_or_else(|| format!("{addr}: no server of this test listens there"))?;
    let dir = TrustDir::of(&data);
    if dir.is_member() {
        return Identity::load(&dir)
            .map(|i| i.connector())
            .map_err(|e| format!("{addr}: {e}"));
    }
    let token = std::fs::read_to_string(data.join("join-token"))
        .map_err(|e| format!("{addr}: no certificate and no join token yet: {e}"))?;
    enspeed_trust::InviteToken::parse(&token)
        .map(|t| Connector::to_waiting(t.server))
        .map_err(|e| format!("{addr}: {e}"))
}

/// The cluster's join token, from the data directory of a member (waiting for it to be made).
pub fn cluster_token(data: &Path) -> String {
    let file = data.join("tls/cluster-token");
    wait_for(
        &format!("the cluster token in {}", file.display()),
        Duration::from_secs(30),
        || std::fs::read_to_string(&file).ok(),
    )
    .trim()
    .to_string()
}

impl Client {
    /// A kept-open connection to `addr`.
    pub fn open(&self, addr: &str) -> Result<Conn, CallError> {
        let connector = connector_for(addr).map_err(CallError::NotSent)?;
        self.open_with(&connector, addr)
    }

    /// A kept-open connection to `addr`, made with `connector` (another server's certificate,
    /// or none).
    pub fn open_with(&self, connector: &Connector, addr: &str) -> Result<Conn, CallError> {
        let not_sent = |e: std::io::Error| CallError::NotSent(format!("{addr}: {e}"));
        let tcp = match self.connect {
            Some(t) => {
                let sa: SocketAddr = addr.parse().unwrap();
                TcpStream::connect_timeout(&sa, t).map_err(not_sent)?
            }
            None => TcpStream::connect(addr).map_err(not_sent)?,
        };
        let handshake = self.connect.unwrap_or(Duration::from_secs(5));
        let (w, _) = connector.handshake(tcp, handshake).map_err(not_sent)?;
        w.set_read_timeout(Some(self.read)).unwrap();
        let r = BufReader::new(w.try_clone().unwrap());
        Ok(Conn {
            addr: addr.to_string(),
            w,
            r,
        })
    }

    /// One request on a new connection.
    pub fn call(&self, addr: &str, req: &Value) -> Result<Value, CallError> {
        self.open(addr)?.call(req)
    }

    /// One request on a new connection made with `connector`.
    pub fn call_with(
        &self,
        connector: &Connector,
        addr: &str,
        req: &Value,
    ) -> Result<Value, CallError> {
        self.open_with(connector, addr)?.call(req)
    }

    /// The server's status, if it answers.
    pub fn status(&self, addr: &str) -> Option<Value> {
        self.call(addr, &json!({"op": "status"})).ok()
    }
}

/// A kept-open client connection: one JSON line out, one back, per request.
pub struct Conn {
    addr: String,
    w: TlsStream,
    r: BufReader<TlsStream>,
}

impl Conn {
    /// Sends `req` and reads its answer.
    pub fn call(&mut self, req: &Value) -> Result<Value, CallError> {
        let addr = &self.addr;
        self.w
            .write_all(format!("{req}\n").as_bytes())
            .map_err(|e| CallError::NoAnswer(format!("{addr}: {e}")))?;
        let mut line = String::new();
        self.r
            .read_line(&mut line)
            .map_err(|e| CallError::NoAnswer(format!("{addr}: {e}")))?;
        parse_answer(&line)
    }
}

/// What of its log a [`Server`] prints when the test panics.
#[derive(Clone, Copy, Debug)]
pub enum LogOnPanic {
    /// Nothing.
    Nothing,
    /// All of it.
    All,
    /// Its last lines.
    Last(usize),
}

/// One `enspeed server` process, restartable on the same data directory and address. Its log
/// (stderr) goes to `<data>.log`. Dropping it kills the process.
pub struct Server {
    /// Its Raft id.
    pub id: u64,
    /// Where it listens.
    pub addr: String,
    /// Its data directory.
    pub data: PathBuf,
    /// The network namespace it runs in (`ip netns exec`), or `None` for this one.
    pub ns: Option<String>,
    /// Arguments given on every start, after the bootstrap ones.
    pub extra: Vec<String>,
    /// `ENSPEED_LOG` for the process, or `None` to keep this process's.
    pub log_level: Option<&'static str>,
    /// What of the log to print when the test panics.
    pub log_on_panic: LogOnPanic,
    child: Option<Child>,
}

impl Server {
    /// A server not started yet, logging at `info`, printing nothing on a panic.
    pub fn new(id: u64, addr: String, data: PathBuf, extra: &[&str]) -> Server {
        Server {
            id,
            addr,
            data,
            ns: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            log_level: Some("info"),
            log_on_panic: LogOnPanic::Nothing,
            child: None,
        }
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the process waiting to be added to a cluster (`--await-join`) and returns the
    /// join token it then shows in its data directory.
    pub fn start_awaiting_join(&mut self) -> String {
        self.start(&["--await-join"]);
        let file = self.data.join("join-token");
        wait_for(
            &format!("server {}'s join token", self.id),
            Duration::from_secs(30),
            || std::fs::read_to_string(&file).ok(),
        )
        .trim()
        .to_string()
    }

    /// Starts the process joining the cluster of `seed` (a member: its address and its data
    /// directory, for the cluster's join token), with `more` arguments.
    pub fn start_joining(&mut self, seed: &Server, more: &[&str]) {
        self.start_joining_at(&seed.addr, &seed.data, more)
    }

    /// [`Server::start_joining`] through the member at `addr`, the token read from `data`.
    pub fn start_joining_at(&mut self, addr: &str, data: &Path, more: &[&str]) {
        let token = cluster_token(data);
        let mut args = vec!["--join", addr, "--token", &token];
        args.extend_from_slice(more);
        self.start(&args);
    }

    /// Starts the process with `bootstrap` (`--init`, `--join ADDR --token T`, or nothing to
    /// restart).
    pub fn start(&mut self, bootstrap: &[&str]) {
        assert!(self.child.is_none(), "server {} already running", self.id);
        std::fs::create_dir_all(&self.data).unwrap();
        register(&self.addr, &self.data);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.with_extension("log"))
            .unwrap();
        // `ip netns exec` execs the server: the child is the server itself.
        let mut cmd = match &self.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(enspeed_bin());
                c
            }
            None => Command::new(enspeed_bin()),
        };
        cmd.args(["server", "--id", &self.id.to_string(), "--data"])
            .arg(&self.data)
            .args(["--listen", &self.addr])
            .args(bootstrap)
            .args(&self.extra);
        if let Some(level) = self.log_level {
            cmd.env("ENSPEED_LOG", level);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start enspeed server");
        self.child = Some(child);
    }

    /// SIGKILL, like a power cut of this process; also reaps it after a power cut of its
    /// namespace.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits up to `timeout` for the process to end by itself: its exit status, or `None`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.with_extension("log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
        if !std::thread::panicking() {
            return;
        }
        match self.log_on_panic {
            LogOnPanic::Nothing => {}
            LogOnPanic::All => eprintln!("---- server {} log ----\n{}", self.id, self.log()),
            LogOnPanic::Last(n) => {
                let log = self.log();
                let tail: Vec<&str> = log.lines().rev().take(n).collect();
                eprintln!("---- server {} log (last lines) ----", self.id);
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// Starts the first server with `--init`, waits (up to `timeout`) until it leads, and starts
/// the others with `--join` it.
pub fn bootstrap(servers: &mut [Server], client: &Client, timeout: Duration) {
    servers[0].start(&["--init"]);
    let seed = servers[0].addr.clone();
    wait_for("server 1 to lead", timeout, || {
        (client.status(&seed)?["leader"] == 1).then_some(())
    });
    let data = servers[0].data.clone();
    for s in servers.iter_mut().skip(1) {
        s.start_joining_at(&seed, &data, &[]);
    }
}
