//! Who a caller is: Hypha-compatible tokens, users (including anonymous ones) and their permissions.

pub mod accounts;
pub(crate) mod first_run;
pub(crate) mod scope;
pub mod token;
pub(crate) mod user;
pub(crate) mod workspaces;

pub use token::{TokenError, TokenIssuer};
pub use user::{Permission, Purpose, TokenRef, UserInfo};

/// Seconds since the Unix epoch.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
