//! Passwords, session tokens, cookies, CSRF tokens and the login rate limit.
//!
//! A session token is 32 random bytes, given to the browser in an HttpOnly, SameSite=Strict
//! cookie and kept in the Raft state only as its SHA-256, so a copy of the state lets no one
//! in. Each session also has a CSRF token, returned by the login and by `GET /session`, that
//! every change must carry in the `X-CSRF-Token` header.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use sha2::{Digest, Sha256};

/// The session cookie's name.
pub const COOKIE: &str = "enspeed_session";

/// The shortest password taken.
pub const MIN_PASSWORD: usize = 8;

/// Hashes `password` with argon2id (the crate's defaults: 19 MiB, 2 passes, 1 lane), as a PHC
/// string. Slow on purpose: run it off the async threads.
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::encode_b64(&random_bytes::<16>()).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("hashing the password: {e}"))
}

/// Whether `password` matches the PHC string `hash`. With no hash (no such user) it still does
/// the work, so the answer's timing does not tell which names exist.
pub fn verify_password(password: &str, hash: Option<&str>) -> bool {
    const DUMMY: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$1TnDKK+aDHmfvr4HR28jY7yZwsIVJ1cRJqqVB8bgJwc";
    let parsed = PasswordHash::new(hash.unwrap_or(DUMMY)).or_else(|_| PasswordHash::new(DUMMY));
    let Ok(parsed) = parsed else { return false };
    let ok = Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok();
    ok && hash.is_some()
}

/// Checks a new password: long enough, not absurdly long.
pub fn check_password(password: &str) -> Result<(), String> {
    if password.chars().count() < MIN_PASSWORD {
        return Err(format!("a password has at least {MIN_PASSWORD} characters"));
    }
    if password.len() > 1024 {
        return Err("a password has at most 1024 bytes".into());
    }
    Ok(())
}

/// `N` bytes from the operating system's random source.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).expect("the OS random source works");
    b
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new random token (session or CSRF), hex.
pub fn new_token() -> String {
    hex(&random_bytes::<32>())
}

/// SHA-256 of a session token, hex: how the state knows it.
pub fn token_hash(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// The session token in a `Cookie` header, if any.
pub fn session_cookie(header: Option<&str>) -> Option<&str> {
    header?
        .split(';')
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The `Set-Cookie` value for `token` (`None`: clear it).
pub fn set_cookie(token: Option<&str>, ttl: Duration, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    match token {
        Some(t) => format!(
            "{COOKIE}={t}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
            ttl.as_secs()
        ),
        None => format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}"),
    }
}

/// Compares two strings in time that depends only on their lengths.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Failed logins allowed per name and per client address in one window.
pub const LOGIN_FAILURES: usize = 5;
/// The window.
pub const LOGIN_WINDOW: Duration = Duration::from_secs(60);

/// Counts failed logins per user name and per client address; past `LOGIN_FAILURES` in
/// `LOGIN_WINDOW`, logins from there or for that name are refused until the window moves on.
/// Per server: each server limits what it is sent.
#[derive(Default)]
pub struct RateLimit {
    failures: Mutex<HashMap<String, Vec<Instant>>>,
}

impl RateLimit {
    fn keys(name: &str, ip: IpAddr) -> [String; 2] {
        [format!("name:{name}"), format!("ip:{ip}")]
    }

    /// Seconds to wait, if logins for `name` or from `ip` are blocked now.
    pub fn blocked(&self, name: &str, ip: IpAddr) -> Option<u64> {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let mut wait = None;
        for k in Self::keys(name, ip) {
            if let Some(v) = f.get_mut(&k) {
                v.retain(|t| now.duration_since(*t) < LOGIN_WINDOW);
                if v.len() >= LOGIN_FAILURES {
                    let oldest = v[v.len() - LOGIN_FAILURES];
                    let left = LOGIN_WINDOW.saturating_sub(now.duration_since(oldest));
                    wait = Some(wait.unwrap_or(0).max(left.as_secs() + 1));
                }
            }
        }
        wait
    }

    /// Records a failed login.
    pub fn failed(&self, name: &str, ip: IpAddr) {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: forget everything stale when the map grows.
        if f.len() > 100_000 {
            let now = Instant::now();
            f.retain(|_, v| v.iter().any(|t| now.duration_since(*t) < LOGIN_WINDOW));
        }
        for k in Self::keys(name, ip) {
            f.entry(k).or_default().push(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password("correct horse", Some(&h)));
        assert!(!verify_password("wrong horse", Some(&h)));
        assert!(!verify_password("correct horse", None));
        assert!(!verify_password("x", Some("not a hash")));
    }

    #[test]
    fn cookies() {
        let t = new_token();
        let header = format!("a=b; {COOKIE}={t}; c=d");
        assert_eq!(session_cookie(Some(&header)), Some(t.as_str()));
        assert_eq!(session_cookie(Some("enspeed_session=short")), None);
        assert_eq!(session_cookie(None), None);
        let c = set_cookie(Some(&t), Duration::from_secs(60), true);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Secure"));
        assert_ne!(token_hash(&t), t);
        assert_eq!(token_hash(&t).len(), 64);
    }

    #[test]
    fn rate_limit_blocks_after_five_failures() {
        let r = RateLimit::default();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..LOGIN_FAILURES {
            assert!(r.blocked("alice", ip).is_none());
            r.failed("alice", ip);
        }
        assert!(r.blocked("alice", ip).is_some());
        assert!(r.blocked("bob", ip).is_some(), "the address is blocked too");
        let other: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(r.blocked("bob", other).is_none());
    }
}
