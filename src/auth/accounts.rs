//! Local accounts: argon2 password hashes, sign-in that does the same work whether the email
//! exists or not, and a lock-out after repeated failures per email and per address.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

use crate::store::{Store, StoreError, UserRecord};

/// Hashes a password with argon2 and a random salt.
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

/// Why a sign-in was refused; the text is what the user sees.
#[derive(Debug, thiserror::Error)]
pub enum SignInError {
    /// Unknown email and wrong password read the same, so accounts cannot be enumerated.
    #[error("Invalid email or password")]
    Invalid,
    #[error("This account is disabled")]
    Disabled,
    #[error("Too many failed sign-ins; try again in {0} seconds")]
    LockedOut(u64),
    #[error("sign-in is unavailable: {0}")]
    Store(#[from] StoreError),
}

struct Failures {
    count: u32,
    since: Instant,
    locked_until: Option<Instant>,
}

/// Failures older than this are forgotten.
const FAILURE_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Each earlier failure delays the next check by this much (capped), before the lock-out.
const SLOWDOWN_STEP: Duration = Duration::from_millis(200);
const SLOWDOWN_MAX: Duration = Duration::from_secs(2);

/// Signs users in against the store.
pub struct Accounts {
    store: Store,
    dummy_hash: String,
    failures: Mutex<HashMap<String, Failures>>,
    max_failures: u32,
    lockout: Duration,
    /// Users recently found enabled, so token checks on the request path skip the store.
    enabled: dashmap::DashMap<String, Instant>,
}

/// How long an "enabled" answer is trusted: a user disabled from the command line (another
/// process) is refused within this time, also with a token in use.
const ENABLED_TTL: Duration = Duration::from_secs(5);
const ENABLED_CACHE_MAX: usize = 100_000;

impl Accounts {
    pub fn new(store: Store, max_failures: u32, lockout: Duration) -> Self {
        Self {
            store,
            dummy_hash: hash_password("no such user").unwrap_or_default(),
            failures: Mutex::new(HashMap::new()),
            max_failures: max_failures.max(1),
            lockout,
            enabled: dashmap::DashMap::new(),
        }
    }

    /// Checks an email and password; `address` is the client's network address.
    pub async fn sign_in(
        &self,
        email: &str,
        password: &str,
        address: &str,
    ) -> Result<UserRecord, SignInError> {
        let keys = [
            format!("email:{}", email.to_ascii_lowercase()),
            format!("address:{address}"),
        ];
        let earlier = self.check_lock(&keys)?;
        if earlier > 0 {
            tokio::time::sleep((SLOWDOWN_STEP * earlier).min(SLOWDOWN_MAX)).await;
        }
        let user = self.store.user_by_email(email).await?;
        let hash = user
            .as_ref()
            .map(|u| u.password_hash.clone())
            .unwrap_or_else(|| self.dummy_hash.clone());
        let password = password.to_string();
        let matches = tokio::task::spawn_blocking(move || verify_password(&hash, &password))
            .await
            .unwrap_or(false);
        match user {
            Some(user) if matches => {
                self.forget(&keys[..1]);
                if user.disabled_at.is_some() {
                    return Err(SignInError::Disabled);
                }
                Ok(user)
            }
            _ => {
                self.record_failure(&keys);
                Err(SignInError::Invalid)
            }
        }
    }

    /// Refuses while locked out; returns how many recent failures there were.
    fn check_lock(&self, keys: &[String]) -> Result<u32, SignInError> {
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let mut earlier = 0;
        for key in keys {
            if let Some(entry) = failures.get(key) {
                if let Some(until) = entry.locked_until {
                    if until > now {
                        return Err(SignInError::LockedOut((until - now).as_secs().max(1)));
                    }
                    failures.remove(key);
                } else if now.duration_since(entry.since) > FAILURE_WINDOW {
                    failures.remove(key);
                } else {
                    earlier = earlier.max(entry.count);
                }
            }
        }
        Ok(earlier)
    }

    fn record_failure(&self, keys: &[String]) {
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failures.len() > 100_000 {
            failures.retain(|_, f| f.locked_until.is_some_and(|u| u > now));
        }
        for key in keys {
            let entry = failures.entry(key.clone()).or_insert(Failures {
                count: 0,
                since: now,
                locked_until: None,
            });
            entry.count += 1;
            if entry.count >= self.max_failures {
                entry.locked_until = Some(now + self.lockout);
                tracing::warn!(key = %key, "sign-in locked out after repeated failures");
            }
        }
    }

    fn forget(&self, keys: &[String]) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        for key in keys {
            failures.remove(key);
        }
    }

    /// Whether a user id belongs to a disabled local account. "Enabled" answers are cached
    /// for a few seconds: this runs for every request that carries a token.
    pub async fn is_disabled(&self, user_id: &str) -> Result<bool, StoreError> {
        if self
            .enabled
            .get(user_id)
            .is_some_and(|at| at.elapsed() < ENABLED_TTL)
        {
            return Ok(false);
        }
        let disabled = self
            .store
            .user_by_id(user_id)
            .await?
            .is_some_and(|u| u.disabled_at.is_some());
        if disabled {
            self.enabled.remove(user_id);
        } else {
            if self.enabled.len() >= ENABLED_CACHE_MAX {
                self.enabled.retain(|_, at| at.elapsed() < ENABLED_TTL);
            }
            self.enabled.insert(user_id.to_string(), Instant::now());
        }
        Ok(disabled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_salted_and_verify() {
        let a = hash_password("pw").unwrap();
        let b = hash_password("pw").unwrap();
        assert_ne!(a, b);
        assert!(verify_password(&a, "pw"));
        assert!(!verify_password(&a, "other"));
        assert!(!verify_password("not a hash", "pw"));
    }
}
