//! What clients write to the server's log (`log(msg)` on the manager): control characters
//! escaped so a message cannot forge a log line, long messages shortened, and a rate per
//! client (lower for anonymous users), so no client can flood the log.

use std::num::NonZeroU32;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::error::Error;

/// Longest message written, in characters; the rest is counted, not written.
pub(crate) const MAX_CHARS: usize = 1000;
/// Messages per second one client may log, and the burst it may save up.
const RATE: u32 = 5;
const BURST: u32 = 20;
const RATE_ANONYMOUS: u32 = 1;
const BURST_ANONYMOUS: u32 = 5;

/// Text from a client, safe to put in a log line: control and bidirectional-formatting
/// characters escaped, at most `max` characters kept.
pub(crate) fn sanitize(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max * 2));
    for (kept, c) in text.chars().enumerate() {
        if kept == max {
            let rest = text.chars().count() - max;
            out.push_str(&format!("… ({rest} more characters)"));
            break;
        }
        let formatting = matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if c.is_control() || formatting {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Rate limits of the client log, keyed by client address.
pub struct ClientLog {
    signed_in: DefaultKeyedRateLimiter<String>,
    anonymous: DefaultKeyedRateLimiter<String>,
}

impl Default for ClientLog {
    fn default() -> Self {
        let quota = |rate: u32, burst: u32| {
            Quota::per_second(NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN))
                .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN))
        };
        Self {
            signed_in: RateLimiter::keyed(quota(RATE, BURST)),
            anonymous: RateLimiter::keyed(quota(RATE_ANONYMOUS, BURST_ANONYMOUS)),
        }
    }
}

impl ClientLog {
    /// Writes a client's message, or refuses it when it logs too fast. `who` is what the rate
    /// is counted against: the account for users with a token, the address for anonymous
    /// ones (so new client ids do not bring a new allowance).
    pub(crate) fn write(
        &self,
        client: &str,
        who: &str,
        anonymous: bool,
        message: &str,
    ) -> Result<(), Error> {
        let (limiter, rate) = if anonymous {
            (&self.anonymous, RATE_ANONYMOUS)
        } else {
            (&self.signed_in, RATE)
        };
        if limiter.check_key(&who.to_string()).is_err() {
            return Err(Error::TooManyRequests(format!(
                "too many log messages: at most {rate} a second"
            )));
        }
        tracing::info!(client, message = %sanitize(message, MAX_CHARS), "client log");
        Ok(())
    }

    /// Forgets clients that have not logged for a while.
    pub(crate) fn prune(&self) {
        for limiter in [&self.signed_in, &self.anonymous] {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forged_lines_and_floods_are_defused() {
        let forged = "ok\n2026-12-02T00:00:00Z ERROR forged\r\u{1b}[31m\u{202e}";
        let clean = sanitize(forged, 100);
        assert!(
            !clean.contains(['\n', '\r', '\u{1b}', '\u{202e}']),
            "{clean}"
        );
        assert!(clean.contains("\\n2026"), "{clean}");
        let long = sanitize(&"x".repeat(5000), MAX_CHARS);
        assert!(long.starts_with(&"x".repeat(MAX_CHARS)));
        assert!(long.ends_with("(4000 more characters)"), "{long}");
        let log = ClientLog::default();
        let allowed = (0..100)
            .filter(|_| log.write("ws/anon", "192.0.2.1", true, "hi").is_ok())
            .count();
        assert!((BURST_ANONYMOUS as usize..=BURST_ANONYMOUS as usize + 1).contains(&allowed));
        assert!(log.write("ws/other", "192.0.2.1", true, "hi").is_err());
        assert!(log.write("ws/other", "192.0.2.2", true, "hi").is_ok());
    }
}
