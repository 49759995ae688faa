//! The HTTP side: hyper 1 connections, reading a request whole (bounded), JSON answers, and
//! the one error type every handler returns.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;

use crate::routes::App;

/// The largest request body taken.
pub const MAX_BODY: usize = 64 * 1024;

/// Bodies up to this size that are too large are read and dropped before the refusal.
const DRAIN_BODY: usize = 1 << 20;

/// A response body: bytes in memory (`full`), or a stream (`stream`) for a download.
pub type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// A body of `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// A body of the chunks `rx` delivers, until it closes; an error ends it broken (the client
/// sees the transfer cut, not a whole file).
pub fn stream(rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>) -> Body {
    let mut rx = rx;
    let chunks = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
        .map(|r| r.map(hyper::body::Frame::data));
    BodyExt::boxed(http_body_util::StreamBody::new(chunks))
}

/// A request, read whole.
pub struct Request {
    /// The method.
    pub method: Method,
    /// The path, without the query.
    pub path: String,
    /// The query string.
    pub query: String,
    /// The headers.
    pub headers: hyper::HeaderMap,
    /// The body.
    pub body: Bytes,
    /// The client's address.
    pub peer: SocketAddr,
    /// Whether it came over HTTPS.
    pub secure: bool,
    /// The connection, once answered with 101, for a WebSocket handshake.
    pub upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// An upload's body, not read yet (`body` is then empty): see `is_upload`.
    pub stream: Option<Incoming>,
}

/// Reads and drops what is left of a refused upload's body, up to `DRAIN_BODY` times 64 bytes
/// and 10 s, so that a client still sending it reads the refusal rather than a broken pipe.
pub async fn drain_upload(req: &mut Request) {
    let Some(mut body) = req.stream.take() else {
        return;
    };
    let drain = async {
        let mut left = DRAIN_BODY as u64 * 64;
        while let Some(Ok(frame)) = body.frame().await {
            let n = frame.data_ref().map_or(0, |d| d.len() as u64);
            if n >= left {
                break;
            }
            left -= n;
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), drain).await;
}

/// Whether a request's body is an upload, streamed to its handler rather than read whole:
/// an ISO image (`PUT /api/v1/isos/{name}`), an appliance (`PUT /api/v1/appliances/{name}`),
/// or a part of a resumable upload (`PATCH /api/v1/uploads/{id}`).
fn is_upload(method: &Method, path: &str) -> bool {
    (*method == Method::PUT
        && (path.starts_with("/api/v1/isos/") || path.starts_with("/api/v1/appliances/")))
        || (*method == Method::PATCH && path.starts_with("/api/v1/uploads/"))
}

impl Request {
    /// A header's value, if it is there and readable.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as `T`: JSON, `application/json`, no unknown fields (the types deny them).
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        crate::bodies::parse(self.json_body()?)
    }

    /// The body's bytes, if it says it is JSON (`application/json`).
    pub fn json_body(&self) -> Result<&[u8], ApiError> {
        let ct = self.header("content-type").unwrap_or("");
        if !ct.starts_with("application/json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the body must be JSON, with Content-Type: application/json",
            ));
        }
        Ok(&self.body)
    }

    /// A query parameter, percent-decoded.
    pub fn param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

/// An error answer: its status and what to tell the client.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// The message.
    pub message: String,
    /// Seconds to wait before trying again (429).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with `status`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 400.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    /// 403.
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, message)
    }

    /// 503: the cluster could not take it now (no leader, a timeout).
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
}

/// A JSON answer with `status`.
pub fn json_response<T: Serialize>(status: StatusCode, v: &T) -> Response<Body> {
    let body = serde_json::to_vec(v).expect("answers serialize");
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// 200 with `v`.
pub fn ok<T: Serialize>(v: &T) -> Response<Body> {
    json_response(StatusCode::OK, v)
}

fn error_response(e: &ApiError) -> Response<Body> {
    let mut r = json_response(e.status, &json!({ "error": e.message }));
    if let Some(s) = e.retry_after {
        r.headers_mut().insert("retry-after", HeaderValue::from(s));
    }
    r
}

/// Headers every answer carries: no caching of API answers, no framing, no sniffing.
fn harden(r: &mut Response<Body>) {
    let h = r.headers_mut();
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    h.entry("cache-control")
        .or_insert(HeaderValue::from_static("no-store"));
}

/// The most connections one listener serves at once; more are closed as they come.
pub const MAX_CONNECTIONS: usize = 4096;

/// Accepts connections on `listener` and serves `app` on each, HTTP/1.1; over TLS when `tls`
/// is given.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    tracing::info!(address = ?listener.local_addr().ok(), https = tls.is_some(), "web server listening");
    let open = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "web accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
            tracing::debug!(%peer, max = MAX_CONNECTIONS, "web connection refused: too many open");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = Arc::clone(&app);
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => connection(stream, peer, app, false).await,
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(app.timeout(), acceptor.accept(stream));
                    match handshake.await {
                        Ok(Ok(s)) => connection(s, peer, app, true).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

/// Serves one connection's requests.
async fn connection<S>(stream: S, peer: SocketAddr, app: Arc<App>, secure: bool)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let timeout = app.timeout();
    let svc = hyper::service::service_fn(move |req| {
        let app = Arc::clone(&app);
        async move { Ok::<_, Infallible>(handle(app, req, peer, secure).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(timeout)
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "web connection ended");
    }
}

async fn handle(
    app: Arc<App>,
    mut req: hyper::Request<Incoming>,
    peer: SocketAddr,
    secure: bool,
) -> Response<Body> {
    let upgrade = req
        .headers()
        .contains_key(hyper::header::UPGRADE)
        .then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let mut req = Request {
        method: parts.method,
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or("").to_string(),
        headers: parts.headers,
        body: Bytes::new(),
        peer,
        secure,
        upgrade,
        stream: None,
    };
    if is_upload(&req.method, &req.path) {
        req.stream = Some(body);
        return finish(answer(&app, req).await, secure);
    }
    let declared = req
        .headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_big = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is over {MAX_BODY} bytes"),
        )
    };
    let r = if declared.is_some_and(|n| n > MAX_BODY as u64) {
        // Read (and drop) a bounded part of it first, so that a client still sending sees the
        // answer rather than a reset connection.
        if declared.is_some_and(|n| n <= DRAIN_BODY as u64) {
            let _ = Limited::new(body, DRAIN_BODY).collect().await;
        }
        error_response(&too_big())
    } else {
        let timeout = app.timeout();
        match tokio::time::timeout(timeout, Limited::new(body, MAX_BODY).collect()).await {
            Err(_) => error_response(&ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s",
                    timeout.as_secs()
                ),
            )),
            Ok(Err(_)) => error_response(&too_big()),
            Ok(Ok(b)) => {
                req.body = b.to_bytes();
                answer(&app, req).await
            }
        }
    };
    finish(r, secure)
}

/// `app`'s answer to `req`; a server-side failure is logged.
async fn answer(app: &App, req: Request) -> Response<Body> {
    let method = req.method.clone();
    let path = req.path.clone();
    match app.route(req).await {
        Ok(r) => r,
        Err(e) => {
            if e.status.is_server_error() {
                tracing::warn!(%method, %path, status = %e.status, error = %e.message, "API request failed");
            }
            error_response(&e)
        }
    }
}

/// The headers every answer gets.
fn finish(mut r: Response<Body>, secure: bool) -> Response<Body> {
    harden(&mut r);
    if secure {
        r.headers_mut().insert(
            "strict-transport-security",
            HeaderValue::from_static("max-age=31536000"),
        );
    }
    r
}
