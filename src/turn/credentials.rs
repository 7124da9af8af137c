//! Time-limited TURN credentials per the TURN REST API, as coturn's `use-auth-secret` checks them:
//! username `"<unix expiry>:<user id>"`, credential `base64(HMAC-SHA1(secret, username))`.

use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha1::Sha1;

/// A username and password for coturn. The password is a secret: it never prints.
#[derive(Clone)]
pub(crate) struct TurnCredential {
    pub username: String,
    pub credential: SecretString,
    pub expires_at: i64,
}

impl std::fmt::Debug for TurnCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TurnCredential {{ username: {:?}, credential: [redacted] }}",
            self.username
        )
    }
}

/// Mints a credential for `user_id` valid for `ttl` seconds from `now`.
pub(crate) fn mint(secret: &SecretString, user_id: &str, ttl: u64, now: i64) -> TurnCredential {
    Signer::new(secret).mint(user_id, ttl, now)
}

/// HMAC-SHA1 keyed with coturn's secret once (the key's two padded blocks hashed), so each
/// credential costs only its own username's hashing. Never prints the key or its state.
#[derive(Clone)]
pub(crate) struct Signer(Hmac<Sha1>);

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer([redacted])")
    }
}

impl Signer {
    pub(crate) fn new(secret: &SecretString) -> Self {
        // HMAC accepts keys of any length.
        Self(
            <Hmac<Sha1> as KeyInit>::new_from_slice(secret.expose_secret().as_bytes())
                .unwrap_or_else(|_| unreachable!("HMAC takes any key length")),
        )
    }

    /// Mints a credential for `user_id` valid for `ttl` seconds from `now`.
    pub(crate) fn mint(&self, user_id: &str, ttl: u64, now: i64) -> TurnCredential {
        let expires_at = now + ttl as i64;
        let username = format!("{expires_at}:{user_id}");
        let mut mac = self.0.clone();
        mac.update(username.as_bytes());
        let credential =
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        TurnCredential {
            username,
            credential: SecretString::from(credential),
            expires_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_turn_rest_api() {
        // HMAC-SHA1("secret", "1700000000:alice") computed independently with Python's hmac module.
        let c = mint(
            &SecretString::from("secret".to_string()),
            "alice",
            100,
            1_699_999_900,
        );
        assert_eq!(c.username, "1700000000:alice");
        assert_eq!(c.credential.expose_secret(), "d8soP47RbdIKLDUOpnJPVQyq5Ts=");
        assert!(!format!("{c:?}").contains(c.credential.expose_secret()));
        // A signer used many times answers as a fresh one does.
        let signer = Signer::new(&SecretString::from("secret".to_string()));
        for _ in 0..3 {
            let again = signer.mint("alice", 100, 1_699_999_900);
            assert_eq!(
                again.credential.expose_secret(),
                "d8soP47RbdIKLDUOpnJPVQyq5Ts="
            );
        }
        assert!(!format!("{signer:?}").contains("secret"));
    }
}
