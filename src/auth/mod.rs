//! Who a caller is: Hypha-compatible tokens, users (including anonymous ones) and their permissions.

pub mod accounts;
pub mod login;
pub mod scope;
pub mod token;
pub mod user;

pub use token::{TokenError, TokenIssuer};
pub use user::{Permission, Purpose, TokenRef, UserInfo};

/// A random lower-case alphanumeric string, for ids, keys and sessions.
pub fn random_id(len: usize) -> String {
    use rand::RngExt;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
