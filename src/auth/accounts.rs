//! Local accounts: argon2 password hashes, sign-in that does the same work whether the email
//! exists or not, and a lock-out after repeated failures per email and per address.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

use crate::ids::UserId;
use crate::store::{Store, StoreError, UserRecord};

/// Sign-in lock-outs.
#[derive(clap::Args, Debug, Clone)]
pub struct AccountOptions {
    /// Failed sign-ins of one account from one address before that pair is locked out (four times as many lock the address)
    #[arg(
        long,
        env = "HYPHA_LOGIN_MAX_FAILURES",
        value_name = "COUNT",
        default_value_t = 5
    )]
    pub login_max_failures: u32,
    /// How long a lock-out lasts, in seconds
    #[arg(
        long,
        env = "HYPHA_LOGIN_LOCKOUT",
        value_name = "SECONDS",
        default_value_t = 300
    )]
    pub login_lockout: u64,
}

/// Sign-in lock-outs, validated.
#[derive(Debug, Clone)]
pub struct AccountSettings {
    pub max_failures: u32,
    pub lockout: Duration,
}

impl AccountOptions {
    pub(crate) fn settings(&self) -> AccountSettings {
        AccountSettings {
            max_failures: self.login_max_failures.max(1),
            lockout: Duration::from_secs(self.login_lockout),
        }
    }
}

/// Shortest password an account may have.
pub(crate) const MIN_PASSWORD_CHARS: usize = 8;

/// Why an account was not created (the text is what the operator sees).
#[derive(Debug, thiserror::Error)]
pub(crate) enum NewAccountError {
    #[error("{0:?} is not an email address")]
    Email(String),
    #[error("the password must have at least {MIN_PASSWORD_CHARS} characters")]
    ShortPassword,
    #[error("a user with the email {0} already exists")]
    Exists(String),
    #[error("cannot hash the password: {0}")]
    Hash(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An email address as accounts take it: trimmed, at most 254 characters, `local@domain.tld`,
/// no spaces or control characters.
pub(crate) fn checked_email(email: &str) -> Result<String, NewAccountError> {
    let email = email.trim().to_string();
    let valid = email.len() <= 254
        && email
            .split_once('@')
            .is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.'))
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if valid {
        Ok(email)
    } else {
        Err(NewAccountError::Email(email.chars().take(254).collect()))
    }
}

/// Creates a local account, with the checks every way of creating one goes through (the
/// `user add` command and the first-run page).
pub(crate) async fn create_account(
    store: &Store,
    email: &str,
    password: &str,
    roles: Vec<String>,
    now: i64,
) -> Result<UserRecord, NewAccountError> {
    let email = checked_email(email)?;
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(NewAccountError::ShortPassword);
    }
    if store.user_by_email(&email).await?.is_some() {
        return Err(NewAccountError::Exists(email));
    }
    let hash = hash_off_the_workers(password).await?;
    let user = UserRecord {
        id: format!("u{}", crate::ids::random_id(15)),
        email,
        password_hash: hash,
        roles,
        created_at: now,
        disabled_at: None,
    };
    store.create_user(&user).await?;
    Ok(user)
}

/// Sets a local account's password, with the same checks as creating one; `false` when no
/// account has that email.
pub(crate) async fn set_password(
    store: &Store,
    email: &str,
    password: &str,
) -> Result<bool, NewAccountError> {
    let email = checked_email(email)?;
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(NewAccountError::ShortPassword);
    }
    let hash = hash_off_the_workers(password).await?;
    Ok(store.set_password(&email, &hash).await?)
}

/// argon2 takes tens of milliseconds of CPU: it runs off the async workers.
async fn hash_off_the_workers(password: &str) -> Result<String, NewAccountError> {
    let password = password.to_string();
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| NewAccountError::Hash(format!("the hashing task stopped: {e}")))?
        .map_err(|e| NewAccountError::Hash(e.to_string()))
}

/// Hashes a password with argon2 and a random salt.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    let hashed = Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string());
    // argon2's 19 MiB of working memory has just been freed.
    crate::memory::hand_back();
    hashed
}

fn verify_password(hash: &str, password: &str) -> bool {
    let matches = PasswordHash::new(hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false);
    crate::memory::hand_back();
    matches
}

/// Why a sign-in was refused; the text is what the user sees.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SignInError {
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

/// An address is locked out after this many times the failures that lock one account from it.
const ADDRESS_FACTOR: u32 = 4;
/// Failures older than this are forgotten.
const FAILURE_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Each earlier failure delays the next check by this much (capped), before the lock-out.
const SLOWDOWN_STEP: Duration = Duration::from_millis(200);
const SLOWDOWN_MAX: Duration = Duration::from_secs(2);

fn dummy_password_hash() -> String {
    hash_password("no such user").unwrap_or_default()
}

/// Signs users in against the store.
pub struct Accounts {
    store: Store,
    /// A hash of no account's password, verified against when the email is unknown so that
    /// an unknown email costs as long as a wrong password. Made on a thread of its own at
    /// start (an argon2 hash takes about 30 ms, which start-up would otherwise wait for).
    dummy_hash: Arc<std::sync::OnceLock<String>>,
    failures: Mutex<HashMap<String, Failures>>,
    /// When old failures were last forgotten.
    pruned: Mutex<Option<Instant>>,
    max_failures: u32,
    lockout: Duration,
    /// The disabled accounts, as last read from the store.
    disabled: std::sync::RwLock<Disabled>,
    /// Accounts recently found enabled, so token checks on the request path skip the store.
    enabled: dashmap::DashMap<String, Instant>,
}

impl Accounts {
    pub(crate) fn new(store: Store, max_failures: u32, lockout: Duration) -> Self {
        let dummy_hash = Arc::new(std::sync::OnceLock::new());
        let making = dummy_hash.clone();
        std::thread::spawn(move || {
            making.get_or_init(dummy_password_hash);
        });
        Self {
            store,
            dummy_hash,
            failures: Mutex::new(HashMap::new()),
            pruned: Mutex::new(None),
            max_failures: max_failures.max(1),
            lockout,
            disabled: Default::default(),
            enabled: dashmap::DashMap::new(),
        }
    }

    /// Checks an email and password; `address` is the client's network address (behind a
    /// trusted proxy, the one the proxy reports).
    ///
    /// Failures lock out the pair (this account from this address) and, at a higher count,
    /// the address (one address trying many accounts); they never lock the account itself,
    /// which an attacker could otherwise do to anyone from anywhere. An account that fails
    /// from many addresses is slowed instead.
    pub(crate) async fn sign_in(
        &self,
        email: &str,
        password: &str,
        address: std::net::IpAddr,
    ) -> Result<UserRecord, SignInError> {
        // Longer than any email: refused before it is counted (or kept).
        if email.len() > 254 || password.len() > 1024 {
            return Err(SignInError::Invalid);
        }
        let address = crate::net::client_addr::address_key(address);
        let email_key = email.to_ascii_lowercase();
        let pair = format!("pair:{email_key}|{address}");
        let from_address = format!("address:{address}");
        let account = format!("account:{email_key}");
        let locks = [
            (pair.clone(), Some(self.max_failures)),
            (
                from_address,
                Some(self.max_failures.saturating_mul(ADDRESS_FACTOR)),
            ),
            (account, None),
        ];
        let earlier = self.check_lock(&locks)?;
        if earlier > 0 {
            tokio::time::sleep((SLOWDOWN_STEP * earlier).min(SLOWDOWN_MAX)).await;
        }
        let user = self.store.user_by_email(email).await?;
        let known = user.as_ref().map(|u| u.password_hash.clone());
        let dummy = self.dummy_hash.clone();
        let password = password.to_string();
        let matches = tokio::task::spawn_blocking(move || {
            let hash = known.unwrap_or_else(|| dummy.get_or_init(dummy_password_hash).clone());
            verify_password(&hash, &password)
        })
        .await
        .unwrap_or(false);
        match user {
            Some(user) if matches => {
                self.forget(&pair);
                if user.disabled_at.is_some() {
                    return Err(SignInError::Disabled);
                }
                Ok(user)
            }
            _ => {
                self.record_failure(&locks);
                Err(SignInError::Invalid)
            }
        }
    }

    /// Refuses while a key is locked out; returns how many recent failures there were.
    fn check_lock(&self, keys: &[(String, Option<u32>)]) -> Result<u32, SignInError> {
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let mut earlier = 0;
        for (key, _) in keys {
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

    /// Counts a failure against each key; a key with a threshold locks when it reaches it.
    fn record_failure(&self, keys: &[(String, Option<u32>)]) {
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        // Forget old failures now and then (at most once a minute, whatever the traffic).
        let mut pruned = self.pruned.lock().unwrap_or_else(|p| p.into_inner());
        if pruned.is_none_or(|at| now.duration_since(at) > Duration::from_secs(60)) {
            *pruned = Some(now);
            failures.retain(|_, f| {
                f.locked_until.is_some_and(|u| u > now)
                    || now.duration_since(f.since) <= FAILURE_WINDOW
            });
        }
        for (key, lock_at) in keys {
            let entry = failures.entry(key.clone()).or_insert(Failures {
                count: 0,
                since: now,
                locked_until: None,
            });
            entry.count += 1;
            if lock_at.is_some_and(|at| entry.count >= at) {
                entry.locked_until = Some(now + self.lockout);
                tracing::warn!(key = ?key, "sign-in locked out after repeated failures");
            }
        }
    }

    fn forget(&self, key: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.remove(key);
    }

    /// Whether the account at the root of a token family is a disabled local account. An
    /// account not confirmed enabled within the last [`ENABLED_TTL`] is looked up in the store
    /// (so a user disabled from the command line, another process, is refused at once by a
    /// server that has not seen it lately, and within that time otherwise); when the store
    /// cannot answer, the caller is refused, since a disabled account could not be told apart.
    pub(crate) async fn is_disabled(&self, account: &UserId) -> Result<bool, AccountsUnavailable> {
        if self
            .disabled
            .read()
            .is_ok_and(|d| d.ids.contains(account.as_str()))
        {
            return Ok(true);
        }
        if self
            .enabled
            .get(account.as_str())
            .is_some_and(|at| at.elapsed() < ENABLED_TTL)
        {
            return Ok(false);
        }
        let disabled = self
            .store
            .user_by_id(account.as_str())
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "cannot check an account in the store");
                AccountsUnavailable
            })?
            .is_some_and(|u| u.disabled_at.is_some());
        if disabled {
            self.enabled.remove(account.as_str());
        } else {
            if self.enabled.len() >= ENABLED_CACHE_MAX {
                self.enabled.retain(|_, at| at.elapsed() < ENABLED_TTL);
            }
            self.enabled.insert(account.to_string(), Instant::now());
        }
        Ok(disabled)
    }

    /// Reads the disabled accounts from the store; returns those disabled since the last
    /// read, whose live connections are then closed.
    pub(crate) async fn reload_disabled(&self) -> Result<Vec<String>, StoreError> {
        let ids: HashSet<String> = self.store.disabled_user_ids().await?.into_iter().collect();
        let mut known = self.disabled.write().unwrap_or_else(|p| p.into_inner());
        let fresh: Vec<String> = ids.difference(&known.ids).cloned().collect();
        for id in &fresh {
            self.enabled.remove(id);
        }
        known.ids = ids;
        Ok(fresh)
    }
}

/// How often the disabled accounts are read from the store.
pub(crate) const DISABLED_RELOAD: Duration = Duration::from_secs(2);
/// How long an "enabled" answer is trusted on the request path.
const ENABLED_TTL: Duration = Duration::from_secs(5);
const ENABLED_CACHE_MAX: usize = 100_000;

/// The store could not be read recently enough to tell whether an account is disabled.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the account store is unavailable, so accounts cannot be checked; try again later")]
pub(crate) struct AccountsUnavailable;

#[derive(Default)]
struct Disabled {
    ids: HashSet<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_argon2_hash_hands_its_working_memory_back() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static CALLS: AtomicUsize = AtomicUsize::new(0);
        crate::memory::set_hand_back(|| {
            CALLS.fetch_add(1, Ordering::Relaxed);
        });
        let before = CALLS.load(Ordering::Relaxed);
        let hash = hash_password("a password").expect("hashes");
        assert!(hash.starts_with("$argon2"));
        assert!(
            CALLS.load(Ordering::Relaxed) > before,
            "the hook was not called"
        );
    }

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
