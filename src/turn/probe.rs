//! Proves that coturn is reachable and shares our secret, instead of a bare TCP connect: a STUN
//! Binding over UDP, a TURN Allocate with freshly minted credentials (success proves the secrets
//! match; a 401 means they do not), then a Refresh with lifetime 0 to free the allocation.
//! The whole probe has a fixed budget; its result is cached briefly and shared by concurrent
//! callers, so a burst of requests does not hammer coturn.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use stun_rs::attributes::stun::{MessageIntegrity, Nonce, Realm, UserName};
use stun_rs::attributes::turn::{LifeTime, RequestedTrasport};
use stun_rs::methods::{ALLOCATE, BINDING, REFRESH};
use stun_rs::{
    Algorithm, AlgorithmId, HMACKey, MessageClass, MessageDecoderBuilder, MessageEncoderBuilder,
    StunMessage, StunMessageBuilder,
};
use tokio::net::UdpSocket;

use super::credentials;
use super::ice::HostPort;

/// How long one request waits before it is sent again.
const RETRANSMIT: Duration = Duration::from_millis(250);

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
    pub latency: prometheus_client::metrics::histogram::Histogram,
}

enum StepError {
    Outcome(ProbeOutcome),
}

impl From<ProbeOutcome> for StepError {
    fn from(outcome: ProbeOutcome) -> Self {
        StepError::Outcome(outcome)
    }
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
            latency: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(100e-6, 2.0, 16),
            ),
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
        self.latency.observe(started.elapsed().as_secs_f64());
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
            Ok(Err(StepError::Outcome(outcome))) => outcome,
            Err(_) => ProbeOutcome::TimedOut(step),
        }
    }

    async fn steps(&self, step: &mut &'static str) -> Result<(), StepError> {
        let target = tokio::net::lookup_host(self.address.authority())
            .await
            .map_err(|e| {
                ProbeOutcome::Unreachable(format!("cannot resolve {}: {e}", self.address.host))
            })?
            .next()
            .ok_or_else(|| {
                ProbeOutcome::Unreachable(format!("{} has no address", self.address.host))
            })?;
        let local: SocketAddr = if target.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        }
        .parse()
        .unwrap_or_else(|_| unreachable!());
        let socket = UdpSocket::bind(local)
            .await
            .map_err(|e| ProbeOutcome::Failed(format!("cannot open a UDP socket: {e}")))?;
        socket
            .connect(target)
            .await
            .map_err(|e| ProbeOutcome::Unreachable(e.to_string()))?;

        let binding = transact(
            &socket,
            StunMessageBuilder::new(BINDING, MessageClass::Request).build(),
        )
        .await?;
        if binding.class() != MessageClass::SuccessResponse {
            return Err(ProbeOutcome::Failed("the STUN binding request was refused".into()).into());
        }

        *step = "TURN allocate request";
        let credential =
            credentials::mint(&self.secret, "hypha-rtc-probe", 60, crate::auth::now_secs());
        let challenge = transact(&socket, allocate(None)).await?;
        let (realm, nonce) = match (challenge.class(), realm_and_nonce(&challenge)) {
            (MessageClass::ErrorResponse, Some(found)) => found,
            (MessageClass::SuccessResponse, _) => {
                return Err(ProbeOutcome::Failed(
                    "coturn allocated without authentication: it is not configured with use-auth-secret".into(),
                )
                .into());
            }
            _ => {
                return Err(ProbeOutcome::Failed(
                    "the allocate challenge had no realm and nonce".into(),
                )
                .into());
            }
        };
        let auth = Auth {
            username: credential.username.clone(),
            password: credential.credential.expose_secret().to_string(),
            realm,
            nonce,
        };
        let allocated = transact(&socket, allocate(Some(&auth))).await?;
        match (allocated.class(), error_code(&allocated)) {
            (MessageClass::SuccessResponse, _) => {}
            (_, Some(401)) => return Err(ProbeOutcome::SecretRejected.into()),
            (_, code) => {
                return Err(
                    ProbeOutcome::Failed(format!("allocate failed with error {code:?}")).into(),
                );
            }
        }

        *step = "TURN refresh request";
        let mut builder = StunMessageBuilder::new(REFRESH, MessageClass::Request)
            .with_attribute(LifeTime::new(0));
        for attribute in auth.attributes()? {
            builder = builder.with_attribute(attribute);
        }
        let refreshed = transact(&socket, builder.build()).await?;
        if refreshed.class() != MessageClass::SuccessResponse {
            tracing::debug!(code = ?error_code(&refreshed), "coturn refused to free the probe allocation");
        }
        Ok(())
    }
}

struct Auth {
    username: String,
    password: String,
    realm: String,
    nonce: String,
}

impl Auth {
    /// USERNAME, REALM, NONCE and MESSAGE-INTEGRITY (long-term credentials), in that order.
    fn attributes(&self) -> Result<Vec<stun_rs::StunAttribute>, StepError> {
        let bad =
            |e: stun_rs::StunError| ProbeOutcome::Failed(format!("cannot build the request: {e}"));
        let username = UserName::new(&self.username).map_err(bad)?;
        let realm = Realm::new(&self.realm).map_err(bad)?;
        let nonce = Nonce::new(&self.nonce).map_err(bad)?;
        let key = HMACKey::new_long_term(
            &username,
            &realm,
            &self.password,
            Algorithm::from(AlgorithmId::MD5),
        )
        .map_err(bad)?;
        Ok(vec![
            username.into(),
            realm.into(),
            nonce.into(),
            MessageIntegrity::new(key).into(),
        ])
    }
}

fn allocate(auth: Option<&Auth>) -> StunMessage {
    let mut builder = StunMessageBuilder::new(ALLOCATE, MessageClass::Request)
        .with_attribute(RequestedTrasport::new(stun_rs::protocols::UDP));
    if let Some(auth) = auth
        && let Ok(attributes) = auth.attributes()
    {
        for attribute in attributes {
            builder = builder.with_attribute(attribute);
        }
    }
    builder.build()
}

fn realm_and_nonce(message: &StunMessage) -> Option<(String, String)> {
    let realm = message
        .get::<Realm>()?
        .as_realm()
        .ok()?
        .as_str()
        .to_string();
    let nonce = message
        .get::<Nonce>()?
        .as_nonce()
        .ok()?
        .as_str()
        .to_string();
    Some((realm, nonce))
}

fn error_code(message: &StunMessage) -> Option<u16> {
    use stun_rs::attributes::stun::ErrorCode;
    Some(
        message
            .get::<ErrorCode>()?
            .as_error_code()
            .ok()?
            .error_code()
            .error_code(),
    )
}

/// Sends a request and waits for the response with its transaction id, retransmitting; the
/// caller's time-out bounds the whole exchange.
async fn transact(socket: &UdpSocket, request: StunMessage) -> Result<StunMessage, StepError> {
    let mut out = [0u8; 1024];
    let size = MessageEncoderBuilder::default()
        .build()
        .encode(&mut out, &request)
        .map_err(|e| ProbeOutcome::Failed(format!("cannot encode the request: {e}")))?;
    let decoder = MessageDecoderBuilder::default().build();
    let mut buffer = [0u8; 2048];
    loop {
        socket
            .send(&out[..size])
            .await
            .map_err(|e| ProbeOutcome::Unreachable(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + RETRANSMIT;
        loop {
            match tokio::time::timeout_at(deadline, socket.recv(&mut buffer)).await {
                Err(_) => break,
                Ok(Err(e)) => return Err(ProbeOutcome::Unreachable(e.to_string()).into()),
                Ok(Ok(n)) => {
                    if let Ok((response, _)) = decoder.decode(&buffer[..n])
                        && response.transaction_id() == request.transaction_id()
                    {
                        return Ok(response);
                    }
                }
            }
        }
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
