//! The UI's files, built from `webui/ui` by `scripts/build-ui.sh` and embedded by `build.rs`.
//! Every path outside `/api` answers the file of that path if the UI has one, else
//! `index.html`, so the single-page app's own paths (`/vms`, `/users`) load it too. Vite's
//! content-hashed `/assets/*` files never change under their name and are cached for a year;
//! the rest is revalidated on every load, so a new binary's UI shows at once.

use bytes::Bytes;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Response, StatusCode};

use crate::http::{json_response, ApiError, Body, Request};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/assets.rs"));
}

/// What the UI's pages may load and run: only this server's own files, no inline scripts,
/// never inside a frame. Inline styles are allowed: the serial console's terminal (xterm.js)
/// sizes its grid with a style element it writes; noVNC draws its cursor from a data: image.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; base-uri 'self'; \
     form-action 'self'; object-src 'none'; frame-ancestors 'none'; \
     style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:";

/// Where the hashed, immutable files live.
const HASHED: &str = "/assets/";

/// Whether `path` is the API's (`/api` and below), not the UI's.
pub fn is_api(path: &str) -> bool {
    path == "/api" || path.starts_with("/api/")
}

/// The embedded file at URL `path`: its content type and bytes.
pub fn file(path: &str) -> Option<(&'static str, &'static [u8])> {
    let files = embedded::FILES;
    files
        .binary_search_by(|(p, _, _)| (*p).cmp(path))
        .ok()
        .map(|i| (files[i].1, files[i].2))
}

/// Answers a request for a UI path: the file, or `index.html` for the app's own paths.
pub fn serve(req: &Request) -> Result<Response<Body>, ApiError> {
    if req.method != Method::GET && req.method != Method::HEAD {
        let mut r = json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({
                "error": format!("{} is not allowed on {}: the UI's files are read with GET", req.method, req.path)
            }),
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(r);
    }
    let path = req.path.as_str();
    if let Some((ct, bytes)) = file(path).filter(|_| path != "/index.html") {
        let cache = if path.starts_with(HASHED) {
            "public, max-age=31536000, immutable"
        } else {
            "no-cache"
        };
        return Ok(answer(ct, bytes, cache));
    }
    if path.starts_with(HASHED) {
        // A stale page asking for an old build's file: say so rather than answer HTML.
        return Err(ApiError::not_found(format!("no UI file {path}")));
    }
    let (ct, bytes) = file("/index.html").expect("build.rs requires dist/index.html");
    Ok(answer(ct, bytes, "no-cache"))
}

fn answer(content_type: &'static str, bytes: &'static [u8], cache: &'static str) -> Response<Body> {
    let mut r = Response::new(crate::http::full(Bytes::from_static(bytes)));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_and_hashed_files_are_embedded() {
        let (ct, html) = file("/index.html").expect("index.html");
        assert!(ct.starts_with("text/html"));
        let html = std::str::from_utf8(html).expect("UTF-8");
        let script = html
            .split("src=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .expect("index.html loads a script");
        assert!(script.starts_with(HASHED), "{script}");
        let (ct, _) = file(script).expect("the script it loads is embedded");
        assert!(ct.starts_with("text/javascript"));
        assert!(
            !html.contains("<script>"),
            "no inline scripts: the CSP forbids them"
        );
    }

    #[test]
    fn only_api_paths_are_the_apis() {
        assert!(is_api("/api"));
        assert!(is_api("/api/v1/vms"));
        assert!(!is_api("/apiary"));
        assert!(!is_api("/vms"));
        assert!(!is_api("/"));
    }
}
