//! The console's sessions, CSRF tokens and login rate limits.
//!
//! A session is a random 256-bit id in a cookie (HttpOnly, SameSite=Strict,
//! Secure under TLS) that maps, in memory, to the user's name and the
//! session's CSRF token; it ends at logout, after [`IDLE`] without a
//! request, or when the daemon restarts. The role is not kept here: each
//! request looks the user up in the users file, so a changed role or a
//! removed user takes effect at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// A session ends after this long without a request.
pub(super) const IDLE: Duration = Duration::from_secs(30 * 60);

/// At most this many sessions are kept; the least recently used goes first.
const MAX_SESSIONS: usize = 10_000;

/// The cookie's name.
pub(super) const COOKIE: &str = "steward_session";

/// A random 256-bit token, URL-safe base64.
pub(super) fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Compares two secrets in time independent of where they differ.
pub(super) fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One logged-in person.
#[derive(Clone, Debug)]
pub(super) struct Session {
    /// The user's name in the users file.
    pub(super) user: String,
    /// Every state-changing form carries it; see [`Sessions::check_csrf`].
    pub(super) csrf: String,
    last_seen: Instant,
}

/// The open sessions, by id.
pub(super) struct Sessions {
    open: Mutex<HashMap<String, Session>>,
    idle: Duration,
}

impl Sessions {
    /// No sessions; each ends after `idle` without a request.
    pub(super) fn new(idle: Duration) -> Sessions {
        Sessions {
            open: Mutex::new(HashMap::new()),
            idle,
        }
    }

    /// Opens a session for `user`; returns its id (for the cookie).
    pub(super) fn open(&self, user: &str, now: Instant) -> String {
        let id = random_token();
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.retain(|_, s| now.saturating_duration_since(s.last_seen) < self.idle);
        if open.len() >= MAX_SESSIONS {
            if let Some(oldest) = open
                .iter()
                .min_by_key(|(_, s)| s.last_seen)
                .map(|(id, _)| id.clone())
            {
                open.remove(&oldest);
            }
        }
        open.insert(
            id.clone(),
            Session {
                user: user.to_string(),
                csrf: random_token(),
                last_seen: now,
            },
        );
        id
    }

    /// The session with `id`, if it is open and has not been idle too
    /// long; marks it used at `now`.
    pub(super) fn touch(&self, id: &str, now: Instant) -> Option<Session> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let session = open.get_mut(id)?;
        if now.saturating_duration_since(session.last_seen) >= self.idle {
            open.remove(id);
            return None;
        }
        session.last_seen = now;
        Some(session.clone())
    }

    /// Ends the session (logout).
    pub(super) fn close(&self, id: &str) {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    /// Ends every session of `user` (removed from the users file).
    pub(super) fn close_user(&self, user: &str) {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, s| s.user != user);
    }

    /// Whether `given` is the session's CSRF token.
    pub(super) fn check_csrf(session: &Session, given: Option<&str>) -> bool {
        given.is_some_and(|g| same_secret(g, &session.csrf))
    }
}

/// Login attempts allowed per user name and per client address, before
/// they are refused for a while (checked before the password, whose hash
/// is deliberately slow).
pub(super) struct LoginLimits {
    per_user: DefaultKeyedRateLimiter<String>,
    per_client: DefaultKeyedRateLimiter<IpAddr>,
}

/// A burst of this many attempts per user name, then one every
/// [`USER_REFILL`].
const USER_BURST: u32 = 5;
const USER_REFILL: Duration = Duration::from_secs(12);
/// Per client address: more, as several people may share one (a proxy).
const CLIENT_BURST: u32 = 20;
const CLIENT_REFILL: Duration = Duration::from_secs(3);

impl Default for LoginLimits {
    fn default() -> LoginLimits {
        LoginLimits::new(USER_BURST, USER_REFILL, CLIENT_BURST, CLIENT_REFILL)
    }
}

fn quota(burst: u32, refill: Duration) -> Quota {
    Quota::with_period(refill)
        .expect("a non-zero period")
        .allow_burst(NonZeroU32::new(burst.max(1)).expect("at least one"))
}

impl LoginLimits {
    fn new(
        user_burst: u32,
        user_refill: Duration,
        client_burst: u32,
        client_refill: Duration,
    ) -> Self {
        LoginLimits {
            per_user: RateLimiter::keyed(quota(user_burst, user_refill)),
            per_client: RateLimiter::keyed(quota(client_burst, client_refill)),
        }
    }

    /// Whether another attempt for `user` from `client` may be checked now;
    /// counts it.
    pub(super) fn allow(&self, user: &str, client: IpAddr) -> bool {
        let client_ok = self.per_client.check_key(&client).is_ok();
        let user_ok = self.per_user.check_key(&user.to_lowercase()).is_ok();
        self.per_user.retain_recent();
        self.per_client.retain_recent();
        client_ok && user_ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_opens_is_found_and_closes() {
        let sessions = Sessions::new(IDLE);
        let now = Instant::now();
        let id = sessions.open("alice", now);
        assert_eq!(id.len(), 43, "256 bits of URL-safe base64");
        let s = sessions.touch(&id, now).expect("open");
        assert_eq!(s.user, "alice");
        assert!(sessions.touch("forged", now).is_none());
        let other = sessions.open("alice", now);
        assert_ne!(id, other, "every session has its own id");
        assert_ne!(
            s.csrf,
            sessions.touch(&other, now).unwrap().csrf,
            "and its own CSRF token"
        );
        sessions.close(&id);
        assert!(sessions.touch(&id, now).is_none(), "logged out");
        assert!(sessions.touch(&other, now).is_some());
        sessions.close_user("alice");
        assert!(sessions.touch(&other, now).is_none(), "user removed");
    }

    #[test]
    fn an_idle_session_expires_and_use_keeps_it_open() {
        let sessions = Sessions::new(Duration::from_secs(60));
        let start = Instant::now();
        let id = sessions.open("bob", start);
        // Used every 50 s: stays open past the first minute.
        for i in 1..=3 {
            assert!(sessions
                .touch(&id, start + Duration::from_secs(50 * i))
                .is_some());
        }
        // 60 s after the last use: gone, and stays gone.
        let later = start + Duration::from_secs(150 + 60);
        assert!(sessions.touch(&id, later).is_none());
        assert!(sessions
            .touch(&id, start + Duration::from_secs(160))
            .is_none());
    }

    #[test]
    fn csrf_tokens_must_match_exactly() {
        let sessions = Sessions::new(IDLE);
        let now = Instant::now();
        let s = sessions.touch(&sessions.open("carol", now), now).unwrap();
        assert!(Sessions::check_csrf(&s, Some(&s.csrf)));
        assert!(!Sessions::check_csrf(&s, None), "missing");
        assert!(!Sessions::check_csrf(&s, Some("")), "empty");
        let mut wrong = s.csrf.clone();
        wrong.pop();
        assert!(!Sessions::check_csrf(&s, Some(&wrong)), "prefix");
        wrong.push('x');
        assert!(
            !Sessions::check_csrf(&s, Some(&wrong)) || s.csrf.ends_with('x'),
            "one character off"
        );
        assert!(same_secret("abc", "abc") && !same_secret("abc", "abd"));
    }

    #[test]
    fn logins_are_limited_per_user_and_per_client() {
        let limits = LoginLimits::new(3, Duration::from_secs(3600), 5, Duration::from_secs(3600));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            assert!(limits.allow("alice", a));
        }
        assert!(!limits.allow("alice", b), "per user, from any address");
        assert!(!limits.allow("ALICE", b), "user names compared case-blind");
        // Client a has made 3 attempts (b 2): two more for other users.
        assert!(limits.allow("bob", a));
        assert!(limits.allow("carol", a));
        assert!(!limits.allow("dave", a), "per client address, for any user");
        assert!(limits.allow("dave", b), "another client is not held back");
    }
}
