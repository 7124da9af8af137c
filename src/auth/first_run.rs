//! The first run: while no account exists, a one-time link lets the person at the console
//! create the first admin in the browser. The key is random (about 220 bits), kept only as
//! its SHA-256 in this process's memory, expires, and works once.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// How long a setup link works.
pub(crate) const LIFETIME: Duration = Duration::from_secs(3600);

struct Pending {
    digest: [u8; 32],
    expires: Instant,
}

/// The pending setup key, if any.
#[derive(Default)]
pub(crate) struct FirstRun {
    pending: Mutex<Option<Pending>>,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Compares two digests in time that does not depend on where they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl FirstRun {
    /// Makes a new key (replacing any other) and returns it, to be shown once.
    pub(crate) fn open(&self, lifetime: Duration) -> String {
        let key = crate::ids::random_id(43);
        if let Ok(mut pending) = self.pending.lock() {
            *pending = Some(Pending {
                digest: digest(&key),
                expires: Instant::now() + lifetime,
            });
        }
        key
    }

    /// Whether `key` is the pending key and has not expired.
    pub(crate) fn valid(&self, key: &str) -> bool {
        let wanted = digest(key);
        self.pending.lock().is_ok_and(|p| {
            p.as_ref()
                .is_some_and(|p| p.expires > Instant::now() && same(&p.digest, &wanted))
        })
    }

    /// Takes the key if it is the pending one: true once, whoever asks.
    pub(crate) fn take(&self, key: &str) -> bool {
        let wanted = digest(key);
        let Ok(mut pending) = self.pending.lock() else {
            return false;
        };
        let matches = pending
            .as_ref()
            .is_some_and(|p| p.expires > Instant::now() && same(&p.digest, &wanted));
        if matches {
            *pending = None;
        }
        matches
    }

    /// Forgets the key (an account exists now).
    pub(crate) fn close(&self) {
        if let Ok(mut pending) = self.pending.lock() {
            *pending = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_works_once_and_only_itself() {
        let first = FirstRun::default();
        assert!(!first.valid("anything"));
        let key = first.open(LIFETIME);
        assert!(key.len() >= 40);
        assert!(first.valid(&key));
        assert!(!first.valid(&key[1..]));
        assert!(!first.take("wrong"));
        assert!(first.take(&key));
        assert!(!first.take(&key), "works once");
        assert!(!first.valid(&key));
    }

    #[test]
    fn a_key_expires() {
        let first = FirstRun::default();
        let key = first.open(Duration::ZERO);
        assert!(!first.valid(&key));
        assert!(!first.take(&key));
    }
}
