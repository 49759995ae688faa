//! Requests per second per user: a token bucket per logged-in user on each server. A user
//! who sends more than `RATE` requests a second for longer than `BURST` requests allow gets
//! 429 with `Retry-After` until the bucket fills again; other users are not slowed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Requests a second a user may keep up, on one server.
pub const RATE: f64 = 100.0;
/// Requests a user may send at once after a pause.
pub const BURST: f64 = 400.0;
/// Users remembered at most; full buckets are forgotten first when there are more.
const USERS: usize = 16 * 1024;

/// The buckets, by user id.
#[derive(Default)]
pub struct Pace {
    buckets: Mutex<HashMap<u64, Bucket>>,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * RATE).min(BURST);
        self.at = now;
    }
}

impl Pace {
    /// Counts one request of `user`: `Err(seconds to wait)` when it is over its pace.
    pub fn take(&self, user: u64) -> Result<(), u64> {
        self.take_at(user, Instant::now())
    }

    fn take_at(&self, user: u64, now: Instant) -> Result<(), u64> {
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if b.len() >= USERS && !b.contains_key(&user) {
            b.retain(|_, k| {
                k.refill(now);
                k.tokens < BURST
            });
            if b.len() >= USERS {
                // Every remembered user is busy: forget the one with the most tokens.
                if let Some(id) = b
                    .iter()
                    .max_by(|x, y| x.1.tokens.total_cmp(&y.1.tokens))
                    .map(|(id, _)| *id)
                {
                    b.remove(&id);
                }
            }
        }
        let k = b.entry(user).or_insert(Bucket {
            tokens: BURST,
            at: now,
        });
        k.refill(now);
        if k.tokens >= 1.0 {
            k.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - k.tokens) / RATE).ceil().max(1.0) as u64)
        }
    }

    /// Users remembered now.
    pub fn users_held(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_passes_then_the_pace_holds_and_others_go_on() {
        let p = Pace::default();
        let t0 = Instant::now();
        for _ in 0..BURST as usize {
            p.take_at(1, t0).unwrap();
        }
        assert_eq!(p.take_at(1, t0), Err(1));
        p.take_at(2, t0).expect("another user is not slowed");
        // A tenth of a second later, RATE/10 more requests pass, and no more.
        let t1 = t0 + Duration::from_millis(100);
        for _ in 0..(RATE / 10.0) as usize {
            p.take_at(1, t1).unwrap();
        }
        assert!(p.take_at(1, t1).is_err());
        // After a pause the bucket is full again, never fuller.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..BURST as usize {
            p.take_at(1, t2).unwrap();
        }
        assert!(p.take_at(1, t2).is_err());
    }

    #[test]
    fn memory_is_bounded() {
        let p = Pace::default();
        let t0 = Instant::now();
        for user in 0..(USERS as u64 + 100) {
            p.take_at(user, t0).unwrap();
        }
        assert!(p.users_held() <= USERS);
        // Busy users are kept while idle ones can be dropped.
        let t1 = t0 + Duration::from_secs(60);
        p.take_at(u64::MAX, t1).unwrap();
        assert!(p.users_held() <= 2, "{}", p.users_held());
    }
}
