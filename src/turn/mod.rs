//! TURN credentials that coturn provably accepts: credentials (TURN REST API HMAC), ice (ICE
//! server lists and `--ice-server` syntax), probe (STUN binding and TURN allocate, cached).

pub(crate) mod credentials;
pub mod doctor;
pub mod ice;
pub(crate) mod probe;
pub(crate) mod stun;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use prometheus_client::metrics::counter::Counter;
use secrecy::{ExposeSecret, SecretString};

use crate::auth::UserInfo;
use crate::store::{IceIssuance, Store};
use ice::{HostPort, StaticIceServer};
use probe::Probe;

/// The refusal Hypha gives anonymous callers, word for word.
pub(crate) const ANONYMOUS_REFUSED: &str = "Anonymous users are not allowed to get RTC ICE servers";
/// The default credential lifetime (Hypha's).
pub(crate) const DEFAULT_TTL: u64 = 43_200;

/// The coturn this server issues credentials for.
#[derive(Debug, Clone)]
pub struct CoturnSettings {
    pub secret: SecretString,
    /// Where the probe reaches coturn.
    pub internal: HostPort,
    /// What clients are given; one entry per TURN server.
    pub public: Vec<HostPort>,
    /// With a TLS port, `turns:` URLs are offered too.
    pub tls_port: Option<u16>,
}

impl CoturnSettings {
    /// Every address and transport clients are given: UDP and TCP on each public coturn, and
    /// TLS on the TLS port when there is one.
    pub(crate) fn listeners(&self) -> Vec<(HostPort, stun::Transport)> {
        let mut found = Vec::new();
        for host in &self.public {
            found.push((host.clone(), stun::Transport::Udp));
            found.push((host.clone(), stun::Transport::Tcp));
            if let Some(port) = self.tls_port {
                let tls = HostPort {
                    host: host.host.clone(),
                    port,
                };
                found.push((tls, stun::Transport::Tls));
            }
        }
        found
    }
}

/// The TURN and ICE options.
#[derive(clap::Args, Debug, Clone)]
pub struct TurnOptions {
    /// coturn's static-auth-secret; with --coturn-uri it turns on get_rtc_ice_servers
    #[arg(
        long,
        env = "HYPHA_COTURN_SECRET",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub coturn_secret: Option<String>,
    /// Where this server reaches coturn for its probe: host:port, IPv6 as [::1]:3478
    #[arg(long, env = "HYPHA_COTURN_URI", value_name = "HOST:PORT")]
    pub coturn_uri: Option<String>,
    /// What clients are given: host:port, or a comma-separated list for several TURN servers [default: --coturn-uri]
    #[arg(long, env = "HYPHA_PUBLIC_COTURN_URI", value_name = "HOST:PORT[,...]")]
    pub public_coturn_uri: Option<String>,
    /// Offer turns: URLs on this TLS port of the public coturn hosts
    #[arg(long, env = "HYPHA_COTURN_TLS_PORT", value_name = "PORT")]
    pub coturn_tls_port: Option<u16>,
    /// Longest credential lifetime handed out, in seconds; longer requests are clamped
    #[arg(
        long,
        env = "HYPHA_COTURN_MAX_TTL",
        value_name = "SECONDS",
        default_value_t = 86_400
    )]
    pub coturn_max_ttl: u64,
    /// Extra static ICE server, repeatable: turn:<host>:<port>[<user>:<password>] or stun:<host>:<port> (HYPHA_ICE_SERVER: several, separated by spaces)
    #[arg(
        long,
        env = "HYPHA_ICE_SERVER",
        value_name = "URI",
        value_delimiter = ' ',
        hide_env_values = true,
        hide_default_value = true
    )]
    pub ice_server: Vec<String>,
    /// get_rtc_ice_servers calls per minute per account; 0 turns the limit off
    #[arg(
        long,
        env = "HYPHA_ICE_RATE_LIMIT",
        value_name = "PER_MINUTE",
        default_value_t = 60
    )]
    pub ice_rate_limit: u32,
    /// Refuse TURN credentials while the audit store refuses writes or its queue is full
    #[arg(long, env = "HYPHA_AUDIT_REQUIRED", value_name = "BOOL", action = clap::ArgAction::Set, default_value_t = true)]
    pub audit_required: bool,
}

impl TurnOptions {
    /// Validates the options; every error names the option and the expected form.
    pub(crate) fn settings(&self) -> Result<TurnSettings, crate::options::SettingsError> {
        use crate::options::{SettingsError, option_name};
        let option = |name: &str, e: crate::options::InvalidValue| {
            SettingsError::new(format!("{}: {e}", option_name(name)))
        };
        let secret = self.coturn_secret.clone().filter(|s| !s.is_empty());
        let uri = self.coturn_uri.clone().filter(|s| !s.is_empty());
        let public_list = self.public_coturn_uri.as_deref().filter(|s| !s.is_empty());
        let coturn = match (secret, uri) {
            (Some(secret), Some(uri)) => {
                let internal = HostPort::parse(&uri).map_err(|e| option("coturn-uri", e))?;
                let public = match public_list {
                    Some(list) => list
                        .split(',')
                        .map(|u| HostPort::parse(u).map_err(|e| option("public-coturn-uri", e)))
                        .collect::<Result<Vec<_>, _>>()?,
                    None => vec![internal.clone()],
                };
                if self.coturn_tls_port == Some(0) {
                    return Err(option(
                        "coturn-tls-port",
                        "must be a port number from 1 to 65535".into(),
                    ));
                }
                Some(CoturnSettings {
                    secret: SecretString::from(secret),
                    internal,
                    public,
                    tls_port: self.coturn_tls_port,
                })
            }
            (None, None) if public_list.is_some() => {
                return Err(option(
                    "public-coturn-uri",
                    "needs --coturn-secret and --coturn-uri".into(),
                ));
            }
            (None, None) => None,
            (Some(_), None) => {
                return Err(option(
                    "coturn-uri",
                    "is required with --coturn-secret (expected host:port)".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(option(
                    "coturn-secret",
                    "is required with --coturn-uri".into(),
                ));
            }
        };
        let static_servers = self
            .ice_server
            .iter()
            .flat_map(|s| s.split_whitespace())
            .map(|s| StaticIceServer::parse(s).map_err(|e| option("ice-server", e)))
            .collect::<Result<Vec<_>, _>>()?;
        if self.coturn_max_ttl == 0 {
            return Err(option(
                "coturn-max-ttl",
                "must be a positive number of seconds".into(),
            ));
        }
        Ok(TurnSettings {
            coturn,
            static_servers,
            max_ttl: self.coturn_max_ttl,
            rate_limit: self.ice_rate_limit,
            audit_required: self.audit_required,
        })
    }
}

/// Everything about ICE servers, validated at start-up.
#[derive(Debug, Clone, Default)]
pub struct TurnSettings {
    pub coturn: Option<CoturnSettings>,
    pub static_servers: Vec<StaticIceServer>,
    pub max_ttl: u64,
    /// Calls per minute per account; 0 turns the limit off.
    pub rate_limit: u32,
    /// No credential is handed out whose issuance the audit could not record.
    pub audit_required: bool,
}

/// Hands out ICE server lists.
pub struct IceService {
    settings: TurnSettings,
    probe: Option<Probe>,
    /// Keyed by the account at the root of the token family, so child tokens share it.
    limiter: Option<DefaultKeyedRateLimiter<crate::ids::UserId>>,
    store: Store,
    /// No credential is handed out whose issuance the audit could not record.
    audit_required: bool,
    /// Credentials handed out, and calls refused, since start.
    pub issued: Counter,
    pub refused: Counter,
    /// Seconds to answer a request for ICE servers (the probe included when asked).
    pub latency: crate::latency::Latency,
    /// Every address and transport clients are given, as last checked (once a minute).
    listeners: std::sync::Mutex<Vec<probe::ListenerState>>,
    /// The system's trust anchors for the `turns:` check, read at its first run.
    roots: std::sync::OnceLock<Option<stun::Roots>>,
    /// The `urls` of each public coturn address, made once (they are in every answer).
    coturn_urls: Vec<rmpv::Value>,
    /// The static servers' entries, made once.
    static_entries: Vec<rmpv::Value>,
    /// HMAC-SHA1 keyed with coturn's secret, made once (each credential starts from a copy).
    signer: Option<credentials::Signer>,
}

impl IceService {
    pub(crate) fn new(settings: TurnSettings, store: Store) -> Arc<Self> {
        let audit_required = settings.audit_required;
        let probe = settings.coturn.as_ref().map(|c| {
            Probe::new(
                c.internal.clone(),
                c.secret.clone(),
                Duration::from_secs(2),
                Duration::from_secs(5),
            )
        });
        let limiter =
            NonZeroU32::new(settings.rate_limit).map(|n| RateLimiter::keyed(Quota::per_minute(n)));
        let coturn_urls = settings
            .coturn
            .iter()
            .flat_map(|c| {
                c.public.iter().map(|a| {
                    rmpv::Value::Array(
                        ice::coturn_urls(a, c.tls_port)
                            .into_iter()
                            .map(rmpv::Value::from)
                            .collect(),
                    )
                })
            })
            .collect();
        let static_entries = settings
            .static_servers
            .iter()
            .map(StaticIceServer::to_value)
            .collect();
        let signer = settings
            .coturn
            .as_ref()
            .map(|c| credentials::Signer::new(&c.secret));
        Arc::new(Self {
            coturn_urls,
            static_entries,
            signer,
            settings,
            probe,
            limiter,
            store,
            audit_required,
            issued: Counter::default(),
            refused: Counter::default(),
            latency: crate::latency::Latency::exponential(50e-6, 2.0, 18),
            listeners: Default::default(),
            roots: Default::default(),
        })
    }

    /// Forgets rate-limit state of accounts that have not asked for a while (call it now
    /// and then, so the limiter's map does not grow with every account ever seen).
    pub(crate) fn prune(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    pub(crate) fn probe(&self) -> Option<&Probe> {
        self.probe.as_ref()
    }

    /// Checks every address and transport clients are given (UDP and TCP on each public
    /// coturn, TLS where a TLS port is set), one after the other, and keeps the results.
    pub(crate) async fn check_listeners(&self) {
        let Some(coturn) = &self.settings.coturn else {
            return;
        };
        let roots = self.roots.get_or_init(|| stun::roots(&[]).ok());
        let mut found = Vec::new();
        for (target, transport) in coturn.listeners() {
            let state = probe::check_listener(
                &target,
                transport,
                &coturn.secret,
                roots.as_ref(),
                Duration::from_secs(2),
            )
            .await;
            if state.state != "ok" {
                tracing::warn!(url = %state.url, "{}", state.detail);
            }
            found.push(state);
        }
        if let Ok(mut listeners) = self.listeners.lock() {
            *listeners = found;
        }
    }

    /// The last check of every address and transport clients are given.
    pub(crate) fn listeners(&self) -> Vec<probe::ListenerState> {
        self.listeners.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// ICE servers for `user`: coturn credentials (after the probe, when asked) and the
    /// static servers, as a list each entry of which holds `urls`, and `username` and
    /// `credential` for TURN (keys in that order: `credential`, `urls`, `username`).
    pub(crate) async fn ice_servers(
        &self,
        user: &UserInfo,
        request: IceRequest,
    ) -> Result<rmpv::Value, IceError> {
        let started = std::time::Instant::now();
        let outcome = self.issue(user, request).await;
        self.latency.observe(started.elapsed());
        let counter = if outcome.is_ok() {
            &self.issued
        } else {
            &self.refused
        };
        counter.inc();
        outcome
    }

    async fn issue(&self, user: &UserInfo, request: IceRequest) -> Result<rmpv::Value, IceError> {
        if user.is_anonymous() {
            return Err(IceError::Anonymous);
        }
        let Some(signer) = &self.signer else {
            return Err(IceError::NotConfigured);
        };
        let now = crate::auth::now_secs();
        // Credentials never outlive the token that asked for them.
        let token_left = user
            .expires_at
            .map(|at| u64::try_from(at.saturating_sub(now)).unwrap_or(0).max(1))
            .unwrap_or(u64::MAX);
        let ttl = request
            .ttl
            .unwrap_or(DEFAULT_TTL)
            .min(self.settings.max_ttl)
            .min(token_left);
        if let Some(limiter) = &self.limiter
            && limiter.check_key(user.account()).is_err()
        {
            return Err(IceError::RateLimited(self.settings.rate_limit));
        }
        if request.test_connectivity
            && let Some(probe) = &self.probe
        {
            let outcome = probe.check().await;
            if !outcome.is_ok() {
                return Err(IceError::Probe(outcome.describe(probe.address())));
            }
        }
        let credential = signer.mint(user.id.as_str(), ttl, now);
        // Queued for the audit's writer, not awaited: the request never waits on the database.
        let recorded = self.store.record_ice_issuance(
            IceIssuance {
                user_id: user.id.to_string(),
                issued_at: now,
                ttl: ttl as i64,
                expires_at: credential.expires_at,
            },
            self.audit_required,
        );
        if let Err(e) = recorded {
            // While the store is down every request comes here: one line a second, with a count.
            static UNRECORDED: crate::logging::Sampled =
                crate::logging::Sampled::new(std::time::Duration::from_secs(1));
            let left_out = UNRECORDED.take();
            if self.audit_required {
                if let Some(left_out) = left_out {
                    tracing::warn!(error = %e, user = %user.id, left_out, "TURN credentials refused: the audit cannot record them");
                }
                return Err(IceError::AuditUnavailable);
            }
            if let Some(left_out) = left_out {
                tracing::warn!(error = %e, user = %user.id, left_out, "TURN credentials issued without an audit row (--audit-required false)");
            }
        }
        let mut servers: Vec<rmpv::Value> =
            Vec::with_capacity(self.coturn_urls.len() + self.static_entries.len());
        servers.extend(self.coturn_urls.iter().map(|urls| {
            ice::turn_entry(
                credential.credential.expose_secret(),
                urls.clone(),
                &credential.username,
            )
        }));
        servers.extend(self.static_entries.iter().cloned());
        tracing::debug!(user = %user.id, ttl, expires_at = credential.expires_at, "issued TURN credentials");
        Ok(rmpv::Value::Array(servers))
    }
}

/// What `get_rtc_ice_servers` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IceRequest {
    /// Credential lifetime in seconds (clamped to `--coturn-max-ttl`); `None`: 12 hours.
    pub ttl: Option<u64>,
    /// Probe coturn before handing out credentials.
    pub test_connectivity: bool,
}

/// Why no ICE servers were handed out.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum IceError {
    #[error("{ANONYMOUS_REFUSED}")]
    Anonymous,
    #[error(
        "WebRTC ICE servers are not configured on this server: start it with --coturn-secret and --coturn-uri (HYPHA_COTURN_SECRET, HYPHA_COTURN_URI)"
    )]
    NotConfigured,
    #[error("Too many ICE server requests: at most {0} a minute per account")]
    RateLimited(u32),
    /// The probe found coturn unusable; says how.
    #[error("{0}")]
    Probe(String),
    #[error(
        "the credential audit store is unavailable, and credentials are only issued when they can be recorded; try again later"
    )]
    AuditUnavailable,
}
