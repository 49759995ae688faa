//! A client of the orchestrator's REST API for the whole-system tests: it logs in, keeps the
//! session cookie and the CSRF token, and answers every request's status and JSON body, errors
//! included.

use std::time::Duration;

use serde_json::{json, Value};

/// One logged-in (or not) client of one server's API.
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
