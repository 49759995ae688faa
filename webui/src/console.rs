//! A VM's consoles in the browser: `GET /api/v1/vms/{id}/console/serial` and `.../vnc` are
//! WebSocket endpoints. The server the browser reached checks the user, asks the VM's primary
//! server for the console on its client port (`control::console`), and only then answers
//! 101; from there, binary WebSocket messages carry the console's bytes both ways (the serial
//! port's text, or RFB for noVNC).

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hyper::header::{HeaderValue, CONNECTION, UPGRADE};
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use control::api::Request as ControlRequest;
use control::console::ConsoleKind;
use control::peers::Peers;
use enspeed_trust::{Connector, Peer};

use crate::http::{ApiError, Body, Request};

/// How long reaching the VM's server and its VMM may take: longer than that server waits for
/// the sockets of a VMM that is starting, so that its own answer, not this limit, says why.
const OPEN_TIMEOUT: Duration = Duration::from_secs(control::console::STARTING.as_secs() + 5);

/// How many consoles one user keeps open through one server at once.
pub const MAX_PER_USER: usize = 8;

/// The consoles open through this server, by user; a slot is given back when its console ends.
#[derive(Clone, Default)]
pub struct Slots(Arc<std::sync::Mutex<std::collections::HashMap<u64, usize>>>);

/// One open console's place in [`Slots`].
pub struct Slot {
    slots: Slots,
    user: u64,
}

impl Slots {
    /// A slot for `user`, unless it has `MAX_PER_USER` consoles open already (429).
    pub fn take(&self, user: u64) -> Result<Slot, ApiError> {
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(user).or_insert(0);
        if *n >= MAX_PER_USER {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("{MAX_PER_USER} consoles open already: close one first"),
            ));
        }
        *n += 1;
        Ok(Slot {
            slots: self.clone(),
            user,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.user);
            }
        }
    }
}

/// The largest message taken from the browser: keystrokes and RFB client messages are small.
const MAX_MESSAGE: usize = 256 * 1024;

/// The console named by the last part of the path.
pub fn kind(name: &str) -> Result<ConsoleKind, ApiError> {
    match name {
        "serial" => Ok(ConsoleKind::Serial),
        "vnc" => Ok(ConsoleKind::Vnc),
        other => Err(ApiError::not_found(format!(
            "no console {other:?}: \"serial\" or \"vnc\""
        ))),
    }
}

/// Checks that `req` is a WebSocket handshake from this site's own pages; answers the
/// `Sec-WebSocket-Accept` value.
pub fn check_handshake(req: &Request) -> Result<String, ApiError> {
    let upgrade = req.header("upgrade").unwrap_or("");
    if !upgrade.eq_ignore_ascii_case("websocket") {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "a console is a WebSocket: send Upgrade: websocket",
        ));
    }
    if req.header("sec-websocket-version") != Some("13") {
        return Err(ApiError::bad_request("WebSocket version 13 only"));
    }
    let key = req
        .header("sec-websocket-key")
        .filter(|k| !k.is_empty())
        .ok_or_else(|| ApiError::bad_request("missing Sec-WebSocket-Key"))?;
    // Cookies ride along on a cross-site WebSocket too: only this site's pages may open one.
    if let Some(origin) = req.header("origin") {
        let host = req.header("host").unwrap_or("");
        let origin_host = origin
            .strip_prefix("https://")
            .or_else(|| origin.strip_prefix("http://"))
            .unwrap_or("");
        if origin_host.is_empty() || !origin_host.eq_ignore_ascii_case(host) {
            return Err(ApiError::forbidden(format!(
                "a console opened from another site ({origin})"
            )));
        }
    }
    Ok(derive_accept_key(key.as_bytes()))
}

/// A console's connection to the server its VMM runs on (mutual TLS, as between all servers).
pub type ConsoleStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Opens VM `vm`'s `kind` console on the server at `address` (its primary), as this server
/// (`peers`): answers the connection, now carrying the console's bytes.
pub async fn connect(
    peers: &Peers,
    address: &str,
    server: u64,
    vm: &str,
    kind: ConsoleKind,
) -> Result<ConsoleStream, ApiError> {
    let fail = |what: String| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!(
                "the {} console of VM {vm} on server {server} ({address}): {what}",
                kind.name()
            ),
        )
    };
    let connector = peers.connector().map_err(|e| fail(e.to_string()))?;
    let open = async {
        let tcp = TcpStream::connect(address)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let mut s = tokio_rustls::TlsConnector::from(connector.config())
            .connect(Connector::server_name(), tcp)
            .await
            .map_err(|e| fail(format!("TLS: {e}")))?;
        let peer = Peer::of(s.get_ref().1.peer_certificates()).map_err(|e| fail(e.to_string()))?;
        peers.roster().check(&peer).map_err(fail)?;
        let request = ControlRequest::Console {
            vm: vm.to_string(),
            console: kind,
        };
        let mut line = serde_json::to_vec(&request).expect("requests serialize");
        line.push(b'\n');
        s.write_all(&line).await.map_err(|e| fail(e.to_string()))?;
        // Byte by byte: what follows the answer is the console's own bytes.
        let mut answer = Vec::new();
        while answer.last() != Some(&b'\n') {
            if answer.len() > 64 * 1024 {
                return Err(fail("answer line too long".into()));
            }
            let b = s.read_u8().await.map_err(|e| fail(e.to_string()))?;
            answer.push(b);
        }
        let v: control::api::Response =
            serde_json::from_slice(&answer).map_err(|e| fail(e.to_string()))?;
        if !v.ok {
            return Err(fail(v.error.unwrap_or_else(|| "refused".into())));
        }
        Ok(s)
    };
    tokio::time::timeout(OPEN_TIMEOUT, open)
        .await
        .map_err(|_| fail(format!("no answer in {OPEN_TIMEOUT:?}")))?
}

/// Answers the handshake with 101 and, once hyper hands the connection over, relays between
/// the browser's WebSocket and `console`.
pub fn upgrade(
    req: &mut Request,
    accept: String,
    console: ConsoleStream,
    vm: String,
    user: String,
    slot: Slot,
) -> Result<Response<Body>, ApiError> {
    let on_upgrade = req
        .upgrade
        .take()
        .ok_or_else(|| ApiError::bad_request("this connection cannot be upgraded"))?;
    // noVNC asks for the "binary" subprotocol; answer it when offered.
    let binary = req
        .header("sec-websocket-protocol")
        .is_some_and(|p| p.split(',').any(|p| p.trim() == "binary"));
    tokio::spawn(async move {
        let _slot = slot;
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(%vm, error = %e, "console upgrade failed");
                return;
            }
        };
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_MESSAGE))
            .max_frame_size(Some(MAX_MESSAGE));
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        tracing::info!(%vm, %user, "console attached");
        relay(ws, console).await;
        tracing::info!(%vm, %user, "console detached");
    });
    let mut r = Response::new(crate::http::full(bytes::Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(
        "sec-websocket-accept",
        HeaderValue::from_str(&accept).expect("base64 is a header value"),
    );
    if binary {
        h.insert("sec-websocket-protocol", HeaderValue::from_static("binary"));
    }
    Ok(r)
}

/// Copies until either side ends: browser messages (binary or text) to the console, the
/// console's bytes to the browser as binary messages.
async fn relay<S>(ws: WebSocketStream<S>, console: ConsoleStream)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut ws_tx, mut ws_rx) = ws.split();
    let (mut con_rx, mut con_tx) = tokio::io::split(console);
    let inbound = async {
        while let Some(m) = ws_rx.next().await {
            let bytes = match m {
                Ok(Message::Binary(b)) => b.to_vec(),
                Ok(Message::Text(t)) => t.as_bytes().to_vec(),
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => continue,
            };
            if con_tx.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = con_tx.shutdown().await;
    };
    let outbound = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match con_rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if ws_tx
                        .send(Message::Binary(buf[..n].to_vec().into()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        let _ = ws_tx.send(Message::Close(None)).await;
    };
    // Either direction ending ends the console.
    tokio::select! {
        _ = inbound => {}
        _ = outbound => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_names() {
        assert_eq!(kind("serial").unwrap(), ConsoleKind::Serial);
        assert_eq!(kind("vnc").unwrap(), ConsoleKind::Vnc);
        assert_eq!(kind("spice").unwrap_err().status, StatusCode::NOT_FOUND);
    }
}
