//! Proves that coturn is reachable and shares our secret, instead of a bare TCP connect: a STUN
//! Binding over UDP, a TURN Allocate with freshly minted credentials (success proves the secrets
//! match; a 401 means they do not), then a Refresh with lifetime 0 to free the allocation.
//! The whole probe has a fixed budget; its result is cached briefly and shared by concurrent
//! callers, so a burst of requests does not hammer coturn.

use std::time::{Duration, Instant};

use secrecy::SecretString;

use super::ice::HostPort;
use super::stun::{self, Client, Transport};

/// The probe's verdict.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ProbeOutcome {
    Ok { latency: Duration },
    Unreachable(String),
    TimedOut(&'static str),
    SecretRejected,
    Failed(String),
}

impl ProbeOutcome {
    pub(crate) fn is_ok(&self) -> bool {
        matches!(self, ProbeOutcome::Ok { .. })
    }

    /// A sentence for users and operators; names the step that failed.
    pub(crate) fn describe(&self, address: &HostPort) -> String {
        match self {
            ProbeOutcome::Ok { latency } => format!(
                "coturn at {address} accepted a TURN allocation in {:.1} ms",
                latency.as_secs_f64() * 1e3
            ),
            ProbeOutcome::Unreachable(why) => {
                format!("The coturn server ({address}) is unreachable: {why}")
            }
            ProbeOutcome::TimedOut(step) => {
                format!("The coturn server ({address}) timed out during the {step}")
            }
            ProbeOutcome::SecretRejected => format!(
                "The coturn server ({address}) rejected credentials signed with our secret: --coturn-secret does not match its static-auth-secret"
            ),
            ProbeOutcome::Failed(why) => {
                format!("The coturn server ({address}) refused the probe: {why}")
            }
        }
    }

    /// A short word for health output and metrics.
    pub(crate) fn state(&self) -> &'static str {
        match self {
            ProbeOutcome::Ok { .. } => "ok",
            ProbeOutcome::Unreachable(_) => "unreachable",
            ProbeOutcome::TimedOut(_) => "timed_out",
            ProbeOutcome::SecretRejected => "secret_rejected",
            ProbeOutcome::Failed(_) => "failed",
        }
    }
}

/// Verdicts the probe remembers (one a minute from the periodic probe, more when asked).
pub(crate) const HISTORY: usize = 120;

/// One probe's verdict, for the home page's chart.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub(crate) struct Verdict {
    /// Seconds since the epoch.
    pub at: i64,
    pub state: &'static str,
    pub latency_ms: Option<f64>,
}

/// The coturn prober.
pub(crate) struct Probe {
    address: HostPort,
    secret: SecretString,
    budget: Duration,
    cache_for: Duration,
    /// Held while a probe runs, so concurrent callers share one.
    running: tokio::sync::Mutex<()>,
    /// The last verdict, readable at any time (also while a probe runs).
    last: std::sync::Mutex<Option<(Instant, ProbeOutcome)>>,
    /// The verdicts of the last hour or so, oldest first, at most [`HISTORY`].
    history: std::sync::Mutex<std::collections::VecDeque<Verdict>>,
    /// Seconds each probe took, whatever its verdict.
    pub latency: crate::latency::Latency,
}

impl Probe {
    pub(crate) fn new(
        address: HostPort,
        secret: SecretString,
        budget: Duration,
        cache_for: Duration,
    ) -> Self {
        Self {
            address,
            secret,
            budget,
            cache_for,
            running: tokio::sync::Mutex::new(()),
            last: std::sync::Mutex::new(None),
            history: Default::default(),
            latency: crate::latency::Latency::exponential(100e-6, 2.0, 16),
        }
    }

    pub(crate) fn address(&self) -> &HostPort {
        &self.address
    }

    /// The cached verdict, or a fresh probe; concurrent callers wait for one shared probe.
    pub(crate) async fn check(&self) -> ProbeOutcome {
        let fresh = || {
            self.last()
                .filter(|(age, _)| *age < self.cache_for)
                .map(|(_, outcome)| outcome)
        };
        if let Some(outcome) = fresh() {
            return outcome;
        }
        let _running = self.running.lock().await;
        // Another caller may have probed while this one waited.
        if let Some(outcome) = fresh() {
            return outcome;
        }
        let started = Instant::now();
        let outcome = self.run().await;
        self.latency.observe(started.elapsed());
        match &outcome {
            ProbeOutcome::Ok { .. } => tracing::debug!(address = %self.address, "coturn probe ok"),
            other => tracing::warn!(state = other.state(), "{}", other.describe(&self.address)),
        }
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), outcome.clone()));
        let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        if history.len() == HISTORY {
            history.pop_front();
        }
        history.push_back(Verdict {
            at: crate::auth::now_secs(),
            state: outcome.state(),
            latency_ms: match &outcome {
                ProbeOutcome::Ok { latency } => Some(latency.as_secs_f64() * 1e3),
                _ => None,
            },
        });
        outcome
    }

    /// The remembered verdicts, oldest first.
    pub(crate) fn history(&self) -> Vec<Verdict> {
        let history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        history.iter().cloned().collect()
    }

    /// The last verdict and its age, without probing (a probe running keeps the previous one).
    pub(crate) fn last(&self) -> Option<(Duration, ProbeOutcome)> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.as_ref().map(|(at, o)| (at.elapsed(), o.clone()))
    }

    async fn run(&self) -> ProbeOutcome {
        let started = Instant::now();
        let mut step = "STUN binding request";
        match tokio::time::timeout(self.budget, self.steps(&mut step)).await {
            Ok(Ok(())) => ProbeOutcome::Ok {
                latency: started.elapsed(),
            },
            Ok(Err(outcome)) => outcome,
            Err(_) => ProbeOutcome::TimedOut(step),
        }
    }

    async fn steps(&self, step: &mut &'static str) -> Result<(), ProbeOutcome> {
        let (mut client, _) = Client::connect(&self.address, Transport::Udp, None).await?;
        stun::binding(&mut client).await?;
        *step = "TURN allocate request";
        let (_, auth) = stun::allocate(&mut client, &self.secret, 60).await?;
        *step = "TURN refresh request";
        stun::release(&mut client, &auth).await;
        Ok(())
    }
}

/// One address and transport clients are given, as the last check saw it.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct ListenerState {
    /// The URL clients are given (`turn:...`, `turns:...`).
    pub url: String,
    pub state: &'static str,
    pub latency_ms: Option<f64>,
    /// What went wrong, in words (for operators).
    #[serde(skip)]
    pub detail: String,
    /// For TLS: the certificate's names, expiry (seconds since the epoch) and whether this
    /// machine trusts it.
    pub certificate: Option<CertificateState>,
}

/// What a `turns:` listener's certificate is.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct CertificateState {
    pub names: Vec<String>,
    pub expires_at: i64,
    pub trusted: bool,
}

/// Checks one listener clients are given: connection (and certificate), binding, allocation
/// with fresh credentials, release; within `budget`.
pub(crate) async fn check_listener(
    target: &HostPort,
    transport: Transport,
    secret: &SecretString,
    roots: Option<&stun::Roots>,
    budget: Duration,
) -> ListenerState {
    let url = transport.url(target);
    let started = Instant::now();
    let mut certificate = None;
    let attempt = async {
        let (mut client, cert) = Client::connect(target, transport, roots).await?;
        certificate = cert.map(|c| CertificateState {
            names: c.names,
            expires_at: c.not_after,
            trusted: c.trust.is_ok(),
        });
        stun::binding(&mut client).await?;
        let (_, auth) = stun::allocate(&mut client, secret, 60).await?;
        stun::release(&mut client, &auth).await;
        Ok(())
    };
    let outcome = match tokio::time::timeout(budget, attempt).await {
        Ok(Ok(())) => ProbeOutcome::Ok {
            latency: started.elapsed(),
        },
        Ok(Err(outcome)) => outcome,
        Err(_) => ProbeOutcome::TimedOut("check"),
    };
    ListenerState {
        url,
        state: outcome.state(),
        latency_ms: match &outcome {
            ProbeOutcome::Ok { latency } => Some(latency.as_secs_f64() * 1e3),
            _ => None,
        },
        detail: outcome.describe(target),
        certificate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn the_last_verdict_stays_readable_while_a_probe_runs() {
        // A coturn that never answers: the probe runs until its budget is spent.
        let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let address = HostPort::parse(&silent.local_addr().unwrap().to_string()).unwrap();
        let probe = Arc::new(Probe::new(
            address,
            SecretString::from("s".to_string()),
            Duration::from_millis(400),
            Duration::from_millis(1),
        ));
        let earlier = ProbeOutcome::Ok {
            latency: Duration::from_millis(1),
        };
        *probe.last.lock().unwrap() = Some((Instant::now(), earlier));
        tokio::time::sleep(Duration::from_millis(5)).await;
        let running = tokio::spawn({
            let probe = probe.clone();
            async move { probe.check().await }
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while probe.running.try_lock().is_ok() {
            assert!(Instant::now() < deadline, "the probe never started");
            tokio::task::yield_now().await;
        }
        assert!(matches!(probe.last(), Some((_, ProbeOutcome::Ok { .. }))));
        let outcome = running.await.unwrap();
        assert_eq!(outcome.state(), "timed_out");
        assert_eq!(probe.last().map(|(_, o)| o.state()), Some("timed_out"));
    }
}
