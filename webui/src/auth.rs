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

/// Keys (names and addresses) the rate limit remembers at most: past it, stale ones are
/// dropped, then those with the fewest attempts (one each, what an attacker spraying names or
/// addresses leaves), so the ones close to their limit still count.
pub const LOGIN_KEYS: usize = 100_000;

/// Counts login attempts per user name and per client address; past `LOGIN_FAILURES` in
/// `LOGIN_WINDOW`, logins from there or for that name are refused until the window moves on.
/// An attempt counts from before its password is checked (`begin`), so guesses sent at once
/// all count, and stops counting only once it succeeded (`succeeded`). Per server: each
/// server limits what it is sent.
#[derive(Default)]
pub struct RateLimit {
    attempts: Mutex<HashMap<String, Vec<Instant>>>,
}

impl RateLimit {
    fn keys(name: &str, ip: IpAddr) -> [String; 2] {
        [format!("name:{name}"), format!("ip:{ip}")]
    }

    /// Starts a login attempt for `name` from `ip`: `Err(seconds to wait)` if they are blocked
    /// now; else it is counted, until `succeeded` takes it back, and `Ok(its time)`.
    pub fn begin(&self, name: &str, ip: IpAddr) -> Result<Instant, u64> {
        let mut f = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
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
        if let Some(w) = wait {
            return Err(w);
        }
        if f.len() + 2 > LOGIN_KEYS {
            f.retain(|_, v| v.iter().any(|t| now.duration_since(*t) < LOGIN_WINDOW));
            let mut fewest = 1;
            while f.len() + 2 > LOGIN_KEYS && fewest <= LOGIN_FAILURES {
                f.retain(|_, v| v.len() > fewest);
                fewest += 1;
            }
        }
        for k in Self::keys(name, ip) {
            f.entry(k).or_default().push(now);
        }
        Ok(now)
    }

    /// The attempt `begin` answered `at` for succeeded: it no longer counts.
    pub fn succeeded(&self, name: &str, ip: IpAddr, at: Instant) {
        let mut f = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        for k in Self::keys(name, ip) {
            if let Some(v) = f.get_mut(&k) {
                if let Some(i) = v.iter().position(|t| *t == at) {
                    v.remove(i);
                }
                if v.is_empty() {
                    f.remove(&k);
                }
            }
        }
    }

    /// Keys remembered now.
    pub fn keys_held(&self) -> usize {
        self.attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

/// Password hashes (argon2id, 19 MiB each) that run at once in this process at most: the
/// server also runs Raft and the VMs' agent. Logins and password changes wait their turn.
pub const HASHES_AT_ONCE: usize = 2;

/// Runs `f` (a password hash or check) on the blocking pool once one of `permits` is free, or
/// `None` if none was within `patience`.
pub async fn hash_bounded<T: Send + 'static>(
    permits: &tokio::sync::Semaphore,
    patience: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let _permit = tokio::time::timeout(patience, permits.acquire())
        .await
        .ok()?
        .ok()?;
    tokio::task::spawn_blocking(f).await.ok()
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
    fn rate_limit_counts_attempts_before_their_check_and_forgives_successes() {
        let r = RateLimit::default();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        // Successes do not count.
        for _ in 0..2 * LOGIN_FAILURES {
            let at = r.begin("alice", ip).unwrap();
            r.succeeded("alice", ip, at);
        }
        assert_eq!(r.keys_held(), 0);
        // Five attempts begun at once, none finished yet: the sixth is refused already.
        for _ in 0..LOGIN_FAILURES {
            r.begin("alice", ip).unwrap();
        }
        let wait = r.begin("alice", ip).unwrap_err();
        assert!((1..=LOGIN_WINDOW.as_secs() + 1).contains(&wait), "{wait}");
        assert!(r.begin("bob", ip).is_err(), "the address is blocked too");
        let other: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(r.begin("bob", other).is_ok());
    }

    #[test]
    fn rate_limit_keys_are_bounded_and_keep_the_addresses() {
        let r = RateLimit::default();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        for _ in 0..LOGIN_FAILURES {
            r.begin("alice", ip).unwrap();
        }
        // Sprayed: a new name from a new address each time.
        for i in 0..LOGIN_KEYS as u32 {
            let _ = r.begin(&format!("n{i}"), IpAddr::from((10 << 24 | i).to_be_bytes()));
            assert!(r.keys_held() <= LOGIN_KEYS, "{}", r.keys_held());
        }
        assert!(
            r.begin("alice", ip).is_err(),
            "alice or her guesser is still counted"
        );
    }

    #[tokio::test]
    async fn hashes_wait_for_a_permit_and_give_up_after_their_patience() {
        let permits = tokio::sync::Semaphore::new(1);
        let held = permits.acquire().await.unwrap();
        assert_eq!(
            hash_bounded(&permits, Duration::from_millis(50), || 1).await,
            None
        );
        drop(held);
        assert_eq!(
            hash_bounded(&permits, Duration::from_millis(50), || 2).await,
            Some(2)
        );
    }
}
