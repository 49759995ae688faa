//! A client of the orchestrator's REST API for the whole-system tests: it logs in, keeps the
//! session cookie and the CSRF token, and answers every request's status and JSON body, errors
//! included.

use std::time::Duration;

use crate::cluster::{self, free_port, Client, LogOnPanic, Server};
use crate::{testguest, Scratch};

use serde_json::{json, Value};

/// One logged-in (or not) client of one server's API.
#[derive(Clone)]
pub struct Web {
    /// `http://host:port`.
    pub base: String,
    agent: ureq::Agent,
    /// The session cookie (`enspeed_session=...`), once logged in.
    pub cookie: Option<String>,
    /// The session's CSRF token.
    pub csrf: Option<String>,
}

/// A status and a JSON body (`null` when the body is not JSON).
pub type Answer = (u16, Value);

impl Web {
    /// A client of the API at `base`, not logged in.
    pub fn new(base: &str) -> Web {
        Web {
            base: base.trim_end_matches('/').to_string(),
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(30))
                .build(),
            cookie: None,
            csrf: None,
        }
    }

    /// Logs in as `name`; keeps the cookie and CSRF token when it works.
    pub fn login(&mut self, name: &str, password: &str) -> Answer {
        let (status, v, cookie) = self.request(
            "POST",
            "/api/v1/session",
            Some((
                "application/json",
                json!({"name": name, "password": password}).to_string(),
            )),
            false,
        );
        if status == 200 {
            self.csrf = v["csrf_token"].as_str().map(str::to_string);
            self.cookie = cookie;
        }
        (status, v)
    }

    /// Opens VM `vm`'s `kind` console ("serial" or "vnc") as a browser does: a WebSocket with
    /// the session cookie and this site's Origin (or `origin`). Answers the socket, or the
    /// refusal's status and error.
    pub fn console(
        &self,
        vm: u64,
        kind: &str,
        origin: Option<&str>,
    ) -> Result<Console, (u16, String)> {
        use tungstenite::client::IntoClientRequest;
        let hostport = self.base.trim_start_matches("http://").to_string();
        let url = format!("ws://{hostport}/api/v1/vms/{vm}/console/{kind}");
        let mut req = url.into_client_request().expect("a WebSocket request");
        let h = req.headers_mut();
        let origin = origin.map_or_else(|| self.base.clone(), str::to_string);
        h.insert("origin", origin.parse().unwrap());
        if let Some(c) = &self.cookie {
            h.insert("cookie", c.parse().unwrap());
        }
        let tcp = std::net::TcpStream::connect(&hostport).map_err(|e| (0, e.to_string()))?;
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        match tungstenite::client::client(req, tcp) {
            Ok((ws, _)) => Ok(Console { ws }),
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
                let body = r.body().as_deref().unwrap_or_default();
                let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                Err((
                    r.status().as_u16(),
                    v["error"].as_str().unwrap_or_default().to_string(),
                ))
            }
            Err(e) => Err((0, e.to_string())),
        }
    }

    /// A client of the same server logged in as `name`; panics if the login fails.
    pub fn logged_in(base: &str, name: &str, password: &str) -> Web {
        let mut w = Web::new(base);
        let r = w.login(name, password);
        assert_eq!(r.0, 200, "login as {name}: {r:?}");
        w
    }

    /// GET `path`.
    pub fn get(&self, path: &str) -> Answer {
        self.send("GET", path, None)
    }

    /// GET `path`, reading the body without parsing it (benchmarks): its status and length.
    pub fn fetch(&self, path: &str) -> (u16, usize) {
        let mut req = self.agent.get(&format!("{}{path}", self.base));
        if let Some(c) = &self.cookie {
            req = req.set("Cookie", c);
        }
        let resp = match req.call() {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(_) => return (0, 0),
        };
        let status = resp.status();
        let mut body = Vec::new();
        let n = std::io::Read::read_to_end(&mut resp.into_reader(), &mut body).unwrap_or(0);
        (status, n)
    }

    /// GET `path`, its body as bytes (a download): its status and the bytes.
    pub fn get_bytes(&self, path: &str) -> (u16, Vec<u8>) {
        let mut req = self.agent.get(&format!("{}{path}", self.base));
        if let Some(c) = &self.cookie {
            req = req.set("Cookie", c);
        }
        let resp = match req.call() {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("GET {path}: {e}"),
        };
        let status = resp.status();
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut resp.into_reader(), &mut body)
            .unwrap_or_else(|e| panic!("GET {path}: reading the body: {e}"));
        (status, body)
    }

    /// `method` `path` with a JSON `body`, the cookie and the CSRF token.
    pub fn send(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
        self.raw(
            method,
            path,
            body.map(|b| ("application/json", b.to_string())),
            true,
        )
    }

    /// `method` `path` with a body of `content_type` as is; the CSRF header when `csrf`.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, String)>,
        csrf: bool,
    ) -> Answer {
        let (status, v, _) = self.request(method, path, body, csrf);
        (status, v)
    }

    /// PUTs `bytes` (binary, application/octet-stream) to `path`, with the CSRF token.
    pub fn put_bytes(&self, path: &str, bytes: &[u8]) -> Answer {
        self.send_bytes("PUT", path, None, bytes)
    }

    /// A part of resumable upload `id` (`PATCH /api/v1/uploads/{id}`) starting at `offset`.
    pub fn upload_part(&self, id: &str, offset: u64, bytes: &[u8]) -> Answer {
        let path = format!("/api/v1/uploads/{id}");
        self.send_bytes("PATCH", &path, Some(offset), bytes)
    }

    /// A part of resumable upload `id` from `offset` that says it is `length` bytes long but
    /// breaks off after `sent`: its connection closed, as a network failure would. The
    /// server's answer, if it gave one before the close.
    pub fn upload_part_cut_off(&self, id: &str, offset: u64, length: u64, sent: &[u8]) -> String {
        use std::io::{Read, Write};
        let host = self.base.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(host).expect("connect to the API");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut head = format!(
            "PATCH /api/v1/uploads/{id} HTTP/1.1\r\nHost: {host}\r\nUpload-Offset: {offset}\r\nContent-Type: application/octet-stream\r\nContent-Length: {length}\r\n"
        );
        if let Some(c) = &self.cookie {
            head.push_str(&format!("Cookie: {c}\r\n"));
        }
        if let Some(t) = &self.csrf {
            head.push_str(&format!("X-CSRF-Token: {t}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(sent).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
    }

    /// `bytes` as the body of a `method` request to `path` (with `offset` as its
    /// Upload-Offset header, if given).
    fn send_bytes(&self, method: &str, path: &str, offset: Option<u64>, bytes: &[u8]) -> Answer {
        let mut req = self.agent.request(method, &format!("{}{path}", self.base));
        if let Some(o) = offset {
            req = req.set("Upload-Offset", &o.to_string());
        }
        if let Some(c) = &self.cookie {
            req = req.set("Cookie", c);
        }
        if let Some(t) = &self.csrf {
            req = req.set("X-CSRF-Token", t);
        }
        let r = req
            .set("Content-Type", "application/octet-stream")
            .send_bytes(bytes);
        let resp = match r {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = resp.status();
        let v = resp.into_json().unwrap_or(Value::Null);
        (status, v)
    }

    /// [`Web::raw`], with the session cookie the answer sets, if any.
    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, String)>,
        csrf: bool,
    ) -> (u16, Value, Option<String>) {
        let mut req = self.agent.request(method, &format!("{}{path}", self.base));
        if let Some(c) = &self.cookie {
            req = req.set("Cookie", c);
        }
        if let (true, Some(t)) = (csrf, &self.csrf) {
            req = req.set("X-CSRF-Token", t);
        }
        let r = match body {
            Some((ct, b)) => req.set("Content-Type", ct).send_string(&b),
            None => req.call(),
        };
        let resp = match r {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return (0, json!({ "transport": e.to_string() }), None),
        };
        let status = resp.status();
        let cookie = resp.all("set-cookie").into_iter().find_map(|c| {
            c.split(';')
                .next()
                .filter(|p| p.starts_with("enspeed_session=") && p.len() > 16)
                .map(str::to_string)
        });
        let text = resp.into_string().unwrap_or_default();
        let v = serde_json::from_str(&text).unwrap_or(Value::Null);
        (status, v, cookie)
    }
}

/// A console opened through the API: the bytes of the VM's serial port or RFB server.
pub struct Console {
    ws: tungstenite::WebSocket<std::net::TcpStream>,
}

impl Console {
    /// Sends `bytes` to the console, as keystrokes (serial) or client messages (RFB).
    pub fn send(&mut self, bytes: &[u8]) {
        self.ws
            .send(tungstenite::Message::Binary(bytes.to_vec().into()))
            .expect("send on the console");
    }

    /// The next bytes from the console; none once it closed.
    pub fn recv(&mut self) -> Option<Vec<u8>> {
        loop {
            match self.ws.read() {
                Ok(tungstenite::Message::Binary(b)) => return Some(b.to_vec()),
                Ok(tungstenite::Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    /// Reads until the text received contains `want`; panics after `within` or if the console
    /// closes first. Answers all the text received.
    pub fn read_until(&mut self, want: &str, within: Duration) -> String {
        let deadline = std::time::Instant::now() + within;
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).contains(want) {
            assert!(
                std::time::Instant::now() < deadline,
                "no {want:?} on the console in {within:?}: {:?}",
                String::from_utf8_lossy(&got)
            );
            match self.recv() {
                Some(b) => got.extend_from_slice(&b),
                None => panic!(
                    "the console closed before {want:?}: {:?}",
                    String::from_utf8_lossy(&got)
                ),
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    }
}

const WAIT: Duration = Duration::from_secs(30);
/// The first Manager's (`admin`) password in a [`WebCluster`].
pub const PASSWORD: &str = "manager-secret-1";
/// A password for the users tests create.
pub const USER_PASSWORD: &str = "user-secret-1";

/// The `enspeed server` arguments that serve the API on `http` (loopback), with the first
/// Manager `admin` (its password in `password_file`) and VMs booting `kernel`.
pub fn api_args(http: &str, password_file: &std::path::Path, kernel: &str) -> Vec<String> {
    [
        "--http",
        http,
        "--manager",
        "admin",
        "--manager-password-file",
        &password_file.display().to_string(),
        "--guest-kernel",
        kernel,
    ]
    .map(String::from)
    .to_vec()
}

/// Three `enspeed server`s on loopback, each serving the API: servers 1 and 2 run VMs (the
/// level-1 test guest) with their agents and blockd, server 3 is a witness; `admin` is the
/// first Manager. Dropping it kills them.
pub struct WebCluster {
    /// The servers.
    pub servers: Vec<Server>,
    /// Each server's API, `http://127.0.0.1:PORT`.
    pub web: Vec<String>,
    _scratch: Scratch,
}

impl WebCluster {
    /// Starts the cluster, `extra` given to every server (its `--guest-cmdline` and
    /// `--guest-kernel` replace the default ones), and waits until both VM servers
    /// registered and the Manager can log in.
    pub fn start(tag: &str, extra: &[&str]) -> WebCluster {
        let scratch = Scratch::new(&format!("webui-{tag}"));
        let pw = scratch.path("manager-password");
        std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
        let mut extra = extra.to_vec();
        let kernel = match extra.iter().position(|a| *a == "--guest-kernel") {
            Some(i) => {
                let k = extra.get(i + 1).expect("--guest-kernel PATH").to_string();
                extra.drain(i..=i + 1);
                k
            }
            None => testguest().display().to_string(),
        };
        let mut servers = Vec::new();
        let mut web = Vec::new();
        for i in 1..=3u64 {
            let http = format!("127.0.0.1:{}", free_port());
            let mut args = api_args(&http, &pw, &kernel);
            if !extra.contains(&"--guest-cmdline") {
                args.extend([
                    "--guest-cmdline".into(),
                    "console=ttyS0 tg.run=stamp tg.blocks=4 tg.ops=0 tg.ackevery=1000000 tg.flushevery=0".into(),
                ]);
            }
            if i < 3 {
                args.extend(
                    [
                        "--memory-mib",
                        "4096",
                        "--disk-gib",
                        "64",
                        "--blockd-listen",
                    ]
                    .map(String::from),
                );
                args.push(format!("127.0.0.1:{}", free_port()));
            }
            args.extend(extra.iter().map(|s| s.to_string()));
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut s = Server::new(
                i,
                format!("127.0.0.1:{}", free_port()),
                scratch.path(&format!("server{i}")),
                &argv,
            );
            s.log_on_panic = LogOnPanic::Last(40);
            servers.push(s);
            web.push(format!("http://{http}"));
        }
        let client = Client {
            connect: None,
            read: Duration::from_secs(10),
        };
        cluster::bootstrap(&mut servers[..1], &client, WAIT);
        let (seed, data) = (servers[0].addr.clone(), servers[0].data.clone());
        servers[1].start_joining_at(&seed, &data, &[]);
        servers[2].start_joining_at(&seed, &data, &["--witness"]);
        let c = WebCluster {
            servers,
            web,
            _scratch: scratch,
        };
        // Both VM servers registered, and the first Manager exists.
        cluster::wait_for(
            "the agents registered and the Manager created",
            WAIT,
            || {
                // Every server has the Manager before anyone tries to log in: failed logins
                // count against the rate limit.
                for s in &c.servers {
                    has_user(&client, s, "admin")?;
                }
                let mut w = Web::new(&c.web[0]);
                (w.login("admin", PASSWORD).0 == 200).then_some(())?;
                let servers = w.get("/api/v1/servers").1;
                let n = servers
                    .as_array()?
                    .iter()
                    .filter(|s| s["memory_mib"].as_u64() == Some(4096))
                    .count();
                let st = client.status(&c.servers[2].addr)?;
                (n == 2 && st["voters"].as_array()?.len() == 3).then_some(())
            },
        );
        c
    }

    /// A client of server `server`'s (from 0) API logged in as `admin`.
    pub fn manager(&self, server: usize) -> Web {
        Web::logged_in(&self.web[server], "admin", PASSWORD)
    }
}

/// Serves the files `files` gives (path, bytes; told the server's address first) over plain
/// HTTP on a port of 127.0.0.1, as a web server an appliance directory lives on would (404 for
/// any other path), until the process ends; answers its address (`http://127.0.0.1:PORT`).
pub fn serve_files(files: impl FnOnce(&str) -> Vec<(String, Vec<u8>)>) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a file server");
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let files = std::sync::Arc::new(files(&addr));
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let files = std::sync::Arc::clone(&files);
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                let _ = r.read_line(&mut line);
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                // The rest of the request's head.
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                let mut w = conn;
                match files.iter().find(|(p, _)| *p == path) {
                    Some((_, body)) => {
                        let _ = write!(
                            w,
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = w.write_all(body);
                    }
                    None => {
                        let _ = w.write_all(
                            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        );
                    }
                }
            });
        }
    });
    addr
}

/// Creates Managers `bench1`..`benchN` (password `PASSWORD`) through the API at `base`, logged
/// in as `admin`, and answers their names: a benchmark's clients, one user each, since every
/// user is held to its own pace of requests (`webui::pace`).
pub fn bench_users(base: &str, n: usize) -> Vec<String> {
    let m = Web::logged_in(base, "admin", PASSWORD);
    (1..=n)
        .map(|i| {
            let name = format!("bench{i}");
            let r = m.send(
                "POST",
                "/api/v1/users",
                Some(serde_json::json!({"name": name, "password": PASSWORD, "role": "manager"})),
            );
            assert!(r.0 == 201 || r.0 == 409, "create {name}: {r:?}");
            name
        })
        .collect()
}

/// Waits until every server in `servers` has applied user `name`: a login on a server that
/// has not yet counts as a failed one.
pub fn wait_for_user(client: &Client, servers: &[Server], name: &str) {
    for s in servers {
        cluster::wait_for(&format!("user {name} on server {}", s.id), WAIT, || {
            has_user(client, s, name)
        });
    }
}

/// Whether server `s` has applied user `name`.
fn has_user(client: &Client, s: &Server, name: &str) -> Option<()> {
    let users = client
        .call(
            &s.addr,
            &json!({"op": "read", "query": {"query": "users"}, "local": true}),
        )
        .ok()?;
    users
        .as_array()?
        .iter()
        .any(|u| u["name"] == name)
        .then_some(())
}

/// A benchmark's cluster on loopback: `n` servers, server `i` given `args(i)` beside the API's
/// (a Manager `admin` with `PASSWORD`, no usable guest kernel), logging warnings only, their
/// data under `dir`; started, joined and waited for until all are voters and `admin` logs
/// in. Answers the servers, their APIs' bases and a client of the cluster protocol.
pub fn bench_cluster(
    dir: &std::path::Path,
    n: u64,
    args: impl Fn(u64) -> Vec<String>,
) -> (Vec<Server>, Vec<String>, Client) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let pw = dir.join("pw");
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    let mut servers = Vec::new();
    let mut web = Vec::new();
    for i in 1..=n {
        let http = format!("127.0.0.1:{}", free_port());
        let mut argv = args(i);
        argv.extend(api_args(&http, &pw, "/nonexistent/kernel"));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let mut s = Server::new(
            i,
            format!("127.0.0.1:{}", free_port()),
            dir.join(format!("server{i}")),
            &argv,
        );
        s.log_level = Some("warn");
        servers.push(s);
        web.push(format!("http://{http}"));
    }
    let client = Client {
        connect: None,
        read: std::time::Duration::from_secs(30),
    };
    let wait = std::time::Duration::from_secs(60);
    cluster::bootstrap(&mut servers, &client, wait);
    cluster::wait_for(&format!("{n} voters and the Manager"), wait, || {
        let st = client.status(&servers[0].addr)?;
        (st["voters"].as_array()?.len() as u64 == n).then_some(())?;
        (Web::new(&web[0]).login("admin", PASSWORD).0 == 200).then_some(())
    });
    (servers, web, client)
}

/// Requests a second a benchmark's client sends at most: under the pace the API holds each
/// user to (`webui::pace::RATE`, 100), so that no request is turned away.
pub const CLIENT_RATE: f64 = 90.0;

/// Holds one client to `CLIENT_RATE` requests a second: each request starts at least
/// 1/`CLIENT_RATE` s after the one before (never in a burst to catch up after a slow one).
#[derive(Default)]
pub struct Pacer {
    last: Option<std::time::Instant>,
}

impl Pacer {
    /// Waits until the next request may start.
    pub fn wait(&mut self) {
        let gap = std::time::Duration::from_secs_f64(1.0 / CLIENT_RATE);
        if let Some(wait) = self
            .last
            .and_then(|l| (l + gap).checked_duration_since(std::time::Instant::now()))
        {
            std::thread::sleep(wait);
        }
        self.last = Some(std::time::Instant::now());
    }
}

/// Clients of the API at `base`, logged in as `users` one after the other (logins sent at once
/// from one address would count against its login limit).
pub fn bench_clients(base: &str, users: &[String]) -> Vec<Web> {
    users
        .iter()
        .map(|u| Web::logged_in(base, u, PASSWORD))
        .collect()
}

/// Runs `op` (a request, answering its status) on the first `clients` of `webs` (see
/// `bench_clients`), each on its thread and sending at most `CLIENT_RATE` requests a second,
/// for `secs`; answers (requests, per second, p50, p99). A benchmark's.
pub fn measure(
    webs: &[Web],
    clients: usize,
    secs: u64,
    op: std::sync::Arc<dyn Fn(&Web, usize, u64) -> u16 + Send + Sync>,
) -> (usize, f64, std::time::Duration, std::time::Duration) {
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(clients));
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (w, op, barrier) = (
                webs[c].clone(),
                std::sync::Arc::clone(&op),
                std::sync::Arc::clone(&barrier),
            );
            std::thread::spawn(move || {
                barrier.wait();
                let start = std::time::Instant::now();
                let mut lat = Vec::new();
                let mut n = 0u64;
                let mut pace = Pacer::default();
                while start.elapsed() < std::time::Duration::from_secs(secs) {
                    pace.wait();
                    let t = std::time::Instant::now();
                    let status = op(&w, c, n);
                    assert!((200..300).contains(&status), "a request failed: {status}");
                    lat.push(t.elapsed());
                    n += 1;
                }
                (lat, start.elapsed())
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut wall = std::time::Duration::ZERO;
    for t in threads {
        let (lat, el) = t.join().expect("client thread");
        all.extend(lat);
        wall = wall.max(el);
    }
    all.sort();
    let n = all.len();
    (
        n,
        n as f64 / wall.as_secs_f64(),
        crate::percentile(&all, 0.5),
        crate::percentile(&all, 0.99),
    )
}
