//! Settings: defaults < optional file (`--config`) < `HYPHA_*` environment < command line.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use secrecy::SecretString;
use serde::Deserialize;

const AFTER_HELP: &str = "\
Every option can also be set in the environment as HYPHA_<OPTION>, with dashes turned into
underscores (--public-base-url -> HYPHA_PUBLIC_BASE_URL), or in a TOML/YAML/JSON file given
with --config. The command line beats the environment, which beats the file, which beats the
defaults. --jwt-secret also falls back to JWT_SECRET. An unknown HYPHA_* variable is reported
at start-up.";

/// The command line.
#[derive(Parser, Debug, Default, Clone)]
#[command(name = "hypha-rtc", version, about = "WebRTC signaling and TURN-credential server, compatible with hypha-rpc clients.", after_help = AFTER_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Address to listen on [default: 127.0.0.1]
    #[arg(long)]
    pub host: Option<String>,
    /// Port to listen on; 0 picks a free one [default: 9527]
    #[arg(long)]
    pub port: Option<u16>,
    /// The URL clients reach this server at, e.g. https://rtc.example.org [default: http://HOST:PORT]
    #[arg(long)]
    pub public_base_url: Option<String>,
    /// Secret for HS256 tokens; share it with a Hypha deployment to interoperate [default: random, tokens die with the process]
    #[arg(long, global = true)]
    pub jwt_secret: Option<String>,
    /// Settings file (TOML, YAML or JSON) with the same keys as the long options (underscores)
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// Accepted for compatibility with Hypha; the environment is always read
    #[arg(long)]
    pub from_env: bool,
    /// Server id; the manager is `manager-<id>` [default: random]
    #[arg(long)]
    pub server_id: Option<String>,
    /// Close a websocket that sent no message for this many seconds [default: 600]
    #[arg(long, value_name = "SECONDS")]
    pub ws_idle_timeout: Option<u64>,
    /// Send a protocol ping this often [default: 20]
    #[arg(long, value_name = "SECONDS")]
    pub ws_ping_interval: Option<u64>,
    /// Close a websocket that does not answer a ping within this time [default: 20]
    #[arg(long, value_name = "SECONDS")]
    pub ws_ping_timeout: Option<u64>,
    /// Largest websocket frame accepted [default: 2097152]
    #[arg(long, value_name = "BYTES")]
    pub max_frame_size: Option<usize>,
    /// Frames queued for one client before it counts as slow [default: 256]
    #[arg(long, value_name = "FRAMES")]
    pub connection_queue: Option<usize>,
    /// How long a full queue may block before its slow client is disconnected [default: 5]
    #[arg(long, value_name = "SECONDS")]
    pub slow_consumer_timeout: Option<u64>,
    /// Messages per second one connection may send (bursts of twice that); 0 = unlimited [default: 20000]
    #[arg(long, value_name = "PER_SECOND")]
    pub ws_rate_limit: Option<u32>,
    /// Lifetime of reconnection tokens [default: 172800]
    #[arg(long, value_name = "SECONDS")]
    pub reconnection_token_life_time: Option<i64>,
    /// Time-out of calls the server makes to clients [default: 30]
    #[arg(long, value_name = "SECONDS")]
    pub method_timeout: Option<u64>,
    /// coturn's static-auth-secret; with --coturn-uri it turns on get_rtc_ice_servers
    #[arg(long)]
    pub coturn_secret: Option<String>,
    /// Where this server reaches coturn for its probe: host:port, IPv6 as [::1]:3478
    #[arg(long, value_name = "HOST:PORT")]
    pub coturn_uri: Option<String>,
    /// What clients are given: host:port, or a comma-separated list for several TURN servers [default: --coturn-uri]
    #[arg(long, value_name = "HOST:PORT[,...]")]
    pub public_coturn_uri: Option<String>,
    /// Offer turns: URLs on this TLS port of the public coturn hosts
    #[arg(long, value_name = "PORT")]
    pub coturn_tls_port: Option<u16>,
    /// Longest credential lifetime handed out; longer requests are clamped [default: 86400]
    #[arg(long, value_name = "SECONDS")]
    pub coturn_max_ttl: Option<u64>,
    /// Extra static ICE server, repeatable: turn:<host>:<port>[<user>:<password>] or stun:<host>:<port> (HYPHA_ICE_SERVER: several, separated by spaces)
    #[arg(long, value_name = "URI")]
    pub ice_server: Vec<String>,
    /// get_rtc_ice_servers calls per minute per user; 0 turns the limit off [default: 60]
    #[arg(long, value_name = "PER_MINUTE")]
    pub ice_rate_limit: Option<u32>,
    /// Directory for the embedded database and other state [default: hypha-rtc-data]
    #[arg(long, value_name = "DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Database URL [default: sqlite://<data-dir>/hypha-rtc.db]
    #[arg(long, value_name = "URL", global = true)]
    pub database_url: Option<String>,
    /// Redis for several instances behind one address: routing between them and the shared service registry, e.g. redis://127.0.0.1:6379/0 [default: none, everything in-process]
    #[arg(long, value_name = "URL")]
    pub redis_uri: Option<String>,
    /// Failed sign-ins (per email, and per address) before a lock-out [default: 5]
    #[arg(long, value_name = "COUNT")]
    pub login_max_failures: Option<u32>,
    /// How long a lock-out lasts [default: 300]
    #[arg(long, value_name = "SECONDS")]
    pub login_lockout: Option<u64>,
    /// Turn off the built-in video producer (/demo/)
    #[arg(long)]
    pub no_demo: bool,
    /// Size of the demo video, WIDTHxHEIGHT, even numbers [default: 1280x720]
    #[arg(long, value_name = "WxH")]
    pub demo_resolution: Option<String>,
    /// Frames per second of the demo video, 1 to 60 [default: 30]
    #[arg(long, value_name = "FPS")]
    pub demo_fps: Option<u32>,
    /// Most demo viewers at once; more are refused until one leaves [default: 16]
    #[arg(long, value_name = "COUNT")]
    pub demo_max_viewers: Option<u32>,
    /// Codec of the demo video: h264, or vp8 in builds with the vp8 feature [default: h264]
    #[arg(long, value_name = "CODEC")]
    pub demo_codec: Option<String>,
    /// Address the demo's media sockets bind to and advertise as a host candidate, repeatable (HYPHA_RTC_IP: several, separated by spaces or commas) [default: --host if it is one address; with 0.0.0.0 or ::, this machine's interface addresses]
    #[arg(long, value_name = "IP")]
    pub rtc_ip: Vec<std::net::IpAddr>,
    /// Public address that a 1:1 NAT maps onto the first --rtc-ip, advertised as well (cloud machines)
    #[arg(long, value_name = "IP")]
    pub rtc_public_ip: Option<std::net::IpAddr>,
    /// PEM certificate chain: serve HTTPS and WSS directly (with --key-file)
    #[arg(long, value_name = "FILE")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of --cert-file
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Serve /metrics on this port only (plain HTTP, same --host), not on the main one
    #[arg(long, value_name = "PORT")]
    pub metrics_port: Option<u16>,
    /// On SIGTERM, how long calls in flight may take to finish before clients are closed [default: 20]
    #[arg(long, value_name = "SECONDS")]
    pub shutdown_timeout: Option<u64>,
    /// Origins whose pages may call this server from a browser with the visitor's cookie, comma-separated; * lets any origin call without cookies [default: any origin, without cookies; cookies only from this server's own pages]
    #[arg(long, value_name = "ORIGINS")]
    pub allow_origins: Option<String>,
    /// Proxies (addresses or blocks such as 10.0.0.0/8, comma-separated) whose X-Forwarded-For or Forwarded headers give the client's address; nobody else's are believed [default: none]
    #[arg(long, value_name = "CIDRS")]
    pub trusted_proxies: Option<String>,
    /// Most connections at once; 0 = no limit [default: the open-file limit minus 256]
    #[arg(long, value_name = "COUNT")]
    pub max_connections: Option<usize>,
    /// Most connections at once from one address (trusted proxies count only in the total); 0 = no limit [default: 256]
    #[arg(long, value_name = "COUNT")]
    pub max_connections_per_address: Option<usize>,
    /// A connection that sends nothing, or no complete request head, within this time is closed; request bodies get three times as long [default: 10]
    #[arg(long, value_name = "SECONDS")]
    pub header_timeout: Option<u64>,
    /// Refuse TURN credentials whose issuance cannot be written to the audit: true or false [default: true]
    #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set)]
    pub audit_required: Option<bool>,
    /// Log format: text or json [default: text]
    #[arg(long)]
    pub log_format: Option<String>,
    /// More log output (-v info, -vv debug); RUST_LOG overrides
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// Administration commands; without one, the server runs.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Command {
    /// Manage local users, in the database the server uses (also while it runs)
    User {
        #[command(subcommand)]
        action: UserAction,
    },
    /// Print a token for a local user, for scripts (needs the server's --jwt-secret)
    Token {
        #[arg(long)]
        email: String,
        /// Lifetime of the token in seconds
        #[arg(long, default_value_t = 3600)]
        expires_in: i64,
    },
}

/// `hypha-rtc user ...`
#[derive(clap::Subcommand, Debug, Clone)]
pub enum UserAction {
    /// Add a user; the password is read from standard input
    Add {
        email: String,
        /// A role such as admin (repeatable)
        #[arg(long)]
        role: Vec<String>,
        /// Read the password from standard input (required: passwords never go on a command line)
        #[arg(long)]
        password_stdin: bool,
    },
    /// List users
    List,
    /// Disable a user: sign-in is refused at once, tokens in use within 5 seconds
    Disable { email: String },
    /// Set a new password, read from standard input
    Passwd {
        email: String,
        #[arg(long)]
        password_stdin: bool,
    },
}

/// Keys known in files and as `HYPHA_<KEY>` variables.
pub const KNOWN_KEYS: &[&str] = &[
    "host",
    "port",
    "public_base_url",
    "jwt_secret",
    "from_env",
    "server_id",
    "ws_idle_timeout",
    "ws_ping_interval",
    "ws_ping_timeout",
    "max_frame_size",
    "connection_queue",
    "slow_consumer_timeout",
    "ws_rate_limit",
    "reconnection_token_life_time",
    "method_timeout",
    "log_format",
    "allow_origins",
    "trusted_proxies",
    "max_connections",
    "max_connections_per_address",
    "header_timeout",
    "audit_required",
    "cert_file",
    "key_file",
    "metrics_port",
    "shutdown_timeout",
    "coturn_secret",
    "coturn_uri",
    "public_coturn_uri",
    "coturn_tls_port",
    "coturn_max_ttl",
    "ice_server",
    "ice_rate_limit",
    "data_dir",
    "database_url",
    "redis_uri",
    "login_max_failures",
    "login_lockout",
    "no_demo",
    "demo_resolution",
    "demo_fps",
    "demo_max_viewers",
    "demo_codec",
    "rtc_ip",
    "rtc_public_ip",
];

#[derive(Deserialize)]
struct Raw {
    host: String,
    port: u16,
    public_base_url: Option<String>,
    jwt_secret: Option<String>,
    server_id: Option<String>,
    ws_idle_timeout: u64,
    ws_ping_interval: u64,
    ws_ping_timeout: u64,
    max_frame_size: usize,
    connection_queue: usize,
    slow_consumer_timeout: u64,
    ws_rate_limit: u32,
    reconnection_token_life_time: i64,
    method_timeout: u64,
    log_format: String,
    allow_origins: Option<String>,
    trusted_proxies: Option<String>,
    max_connections: Option<usize>,
    max_connections_per_address: usize,
    header_timeout: u64,
    audit_required: bool,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    metrics_port: Option<u16>,
    shutdown_timeout: u64,
    coturn_secret: Option<String>,
    coturn_uri: Option<String>,
    public_coturn_uri: Option<String>,
    coturn_tls_port: Option<u16>,
    coturn_max_ttl: u64,
    ice_server: Option<String>,
    ice_rate_limit: u32,
    data_dir: PathBuf,
    database_url: Option<String>,
    redis_uri: Option<String>,
    login_max_failures: u32,
    login_lockout: u64,
    #[serde(default)]
    no_demo: bool,
    demo_resolution: String,
    demo_fps: u32,
    demo_max_viewers: u32,
    demo_codec: Option<String>,
    rtc_ip: Option<String>,
    rtc_public_ip: Option<String>,
}

/// Everything the server needs to start, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub host: String,
    pub port: u16,
    pub public_base_url: Option<String>,
    pub jwt_secret: Option<SecretString>,
    pub server_id: Option<String>,
    pub ws_idle_timeout: Duration,
    pub ws_ping_interval: Duration,
    pub ws_ping_timeout: Duration,
    pub handshake_timeout: Duration,
    pub max_frame_size: usize,
    pub connection_queue: usize,
    pub slow_consumer_timeout: Duration,
    pub ws_rate_limit: u32,
    pub reconnection_token_life_time: i64,
    pub method_timeout: Duration,
    pub log_format: String,
    /// Which browser origins may call with credentials (`--allow-origins`).
    pub allow_origins: crate::http::cors::AllowOrigins,
    /// Connection caps, the first-byte deadline and the trusted proxies.
    pub admission: crate::net::admission::AdmissionSettings,
    /// How long a request head may take (the body gets three times as long).
    pub header_timeout: Duration,
    /// No TURN credential is issued that the audit cannot record.
    pub audit_required: bool,
    /// Certificate chain and key (PEM): the server speaks TLS itself.
    pub tls: Option<TlsFiles>,
    pub metrics_port: Option<u16>,
    pub shutdown_timeout: Duration,
    pub verbose: u8,
    pub turn: crate::turn::TurnSettings,
    pub data_dir: PathBuf,
    /// `None`: a SQLite file in `data_dir`.
    pub database_url: Option<String>,
    /// `None`: one instance, bus and registry in-process. May hold a password.
    pub redis_uri: Option<SecretString>,
    pub login_max_failures: u32,
    pub login_lockout: Duration,
    pub demo: crate::demo::DemoSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 9527,
            public_base_url: None,
            jwt_secret: None,
            server_id: None,
            ws_idle_timeout: Duration::from_secs(600),
            ws_ping_interval: Duration::from_secs(20),
            ws_ping_timeout: Duration::from_secs(20),
            handshake_timeout: Duration::from_secs(5),
            max_frame_size: 2 * 1024 * 1024,
            connection_queue: 256,
            slow_consumer_timeout: Duration::from_secs(5),
            ws_rate_limit: 20_000,
            reconnection_token_life_time: 172_800,
            method_timeout: Duration::from_secs(30),
            log_format: "text".into(),
            allow_origins: Default::default(),
            admission: crate::net::admission::AdmissionSettings {
                max_connections: crate::net::default_max_connections(),
                max_per_address: DEFAULT_PER_ADDRESS,
                first_byte_timeout: Duration::from_secs(DEFAULT_HEADER_TIMEOUT),
                trusted_proxies: Default::default(),
            },
            header_timeout: Duration::from_secs(DEFAULT_HEADER_TIMEOUT),
            audit_required: true,
            tls: None,
            metrics_port: None,
            shutdown_timeout: Duration::from_secs(20),
            verbose: 0,
            turn: crate::turn::TurnSettings {
                max_ttl: 86_400,
                rate_limit: 60,
                ..Default::default()
            },
            data_dir: PathBuf::from("hypha-rtc-data"),
            database_url: None,
            redis_uri: None,
            login_max_failures: 5,
            login_lockout: Duration::from_secs(300),
            demo: crate::demo::DemoSettings::default(),
        }
    }
}

/// `--max-connections-per-address` unless set.
const DEFAULT_PER_ADDRESS: usize = 256;
/// `--header-timeout` unless set, in seconds.
const DEFAULT_HEADER_TIMEOUT: u64 = 10;

/// The PEM files of `--cert-file` and `--key-file`.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A setting that could not be read; names the key and what was expected.
#[derive(Debug, thiserror::Error)]
#[error("invalid settings: {0}")]
pub struct SettingsError(String);

impl Settings {
    /// Layers the sources; returns the settings and warnings (unknown `HYPHA_*` variables).
    pub fn load(
        cli: &Cli,
        env: &HashMap<String, String>,
    ) -> Result<(Settings, Vec<String>), SettingsError> {
        use config::{Config, Environment, File};
        let d = Settings::default();
        let err = |e: config::ConfigError| SettingsError(e.to_string());
        let mut builder = Config::builder()
            .set_default("host", d.host.clone())
            .and_then(|b| b.set_default("port", d.port as i64))
            .and_then(|b| b.set_default("ws_idle_timeout", 600))
            .and_then(|b| b.set_default("ws_ping_interval", 20))
            .and_then(|b| b.set_default("ws_ping_timeout", 20))
            .and_then(|b| b.set_default("max_frame_size", d.max_frame_size as i64))
            .and_then(|b| b.set_default("connection_queue", d.connection_queue as i64))
            .and_then(|b| b.set_default("slow_consumer_timeout", 5))
            .and_then(|b| b.set_default("ws_rate_limit", d.ws_rate_limit as i64))
            .and_then(|b| {
                b.set_default(
                    "reconnection_token_life_time",
                    d.reconnection_token_life_time,
                )
            })
            .and_then(|b| b.set_default("method_timeout", 30))
            .and_then(|b| b.set_default("log_format", d.log_format.clone()))
            .and_then(|b| b.set_default("max_connections_per_address", DEFAULT_PER_ADDRESS as i64))
            .and_then(|b| b.set_default("header_timeout", DEFAULT_HEADER_TIMEOUT as i64))
            .and_then(|b| b.set_default("audit_required", true))
            .and_then(|b| b.set_default("shutdown_timeout", 20))
            .and_then(|b| b.set_default("coturn_max_ttl", 86_400))
            .and_then(|b| b.set_default("ice_rate_limit", 60))
            .and_then(|b| b.set_default("data_dir", "hypha-rtc-data"))
            .and_then(|b| b.set_default("login_max_failures", 5))
            .and_then(|b| b.set_default("login_lockout", 300))
            .and_then(|b| b.set_default("demo_resolution", "1280x720"))
            .and_then(|b| b.set_default("demo_fps", 30))
            .and_then(|b| b.set_default("demo_max_viewers", 16))
            .map_err(err)?;
        if let Some(path) = &cli.config {
            builder = builder.add_source(File::from(path.as_path()).required(true));
        }
        let hypha_env: HashMap<String, String> = env
            .iter()
            .filter(|(k, _)| k.starts_with("HYPHA_"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            Environment::with_prefix("HYPHA")
                .prefix_separator("_")
                .source(Some(hypha_env.clone().into_iter().collect())),
        );
        macro_rules! cli_override {
            ($($field:ident),*) => {$(
                if let Some(v) = &cli.$field {
                    builder = builder.set_override(stringify!($field), v.clone()).map_err(err)?;
                }
            )*};
        }
        cli_override!(
            host,
            public_base_url,
            jwt_secret,
            server_id,
            log_format,
            coturn_secret,
            coturn_uri,
            public_coturn_uri,
            database_url,
            redis_uri,
            allow_origins,
            trusted_proxies
        );
        for (key, path) in [("cert_file", &cli.cert_file), ("key_file", &cli.key_file)] {
            if let Some(path) = path {
                builder = builder
                    .set_override(key, path.to_string_lossy().to_string())
                    .map_err(err)?;
            }
        }
        if let Some(dir) = &cli.data_dir {
            builder = builder
                .set_override("data_dir", dir.to_string_lossy().to_string())
                .map_err(err)?;
        }
        macro_rules! cli_override_num {
            ($($field:ident),*) => {$(
                if let Some(v) = cli.$field {
                    builder = builder.set_override(stringify!($field), v as i64).map_err(err)?;
                }
            )*};
        }
        cli_override_num!(
            port,
            ws_idle_timeout,
            ws_ping_interval,
            ws_ping_timeout,
            max_frame_size,
            connection_queue,
            slow_consumer_timeout,
            ws_rate_limit,
            reconnection_token_life_time,
            method_timeout,
            coturn_tls_port,
            coturn_max_ttl,
            ice_rate_limit,
            metrics_port,
            shutdown_timeout,
            login_max_failures,
            login_lockout,
            demo_fps,
            demo_max_viewers,
            max_connections,
            max_connections_per_address,
            header_timeout
        );
        if let Some(required) = cli.audit_required {
            builder = builder
                .set_override("audit_required", required)
                .map_err(err)?;
        }
        if let Some(codec) = &cli.demo_codec {
            builder = builder
                .set_override("demo_codec", codec.clone())
                .map_err(err)?;
        }
        if let Some(resolution) = &cli.demo_resolution {
            builder = builder
                .set_override("demo_resolution", resolution.clone())
                .map_err(err)?;
        }
        if !cli.rtc_ip.is_empty() {
            let ips: Vec<String> = cli.rtc_ip.iter().map(ToString::to_string).collect();
            builder = builder.set_override("rtc_ip", ips.join(" ")).map_err(err)?;
        }
        if let Some(ip) = cli.rtc_public_ip {
            builder = builder
                .set_override("rtc_public_ip", ip.to_string())
                .map_err(err)?;
        }
        if cli.no_demo {
            builder = builder.set_override("no_demo", true).map_err(err)?;
        }
        if !cli.ice_server.is_empty() {
            builder = builder
                .set_override("ice_server", cli.ice_server.join(" "))
                .map_err(err)?;
        }
        let raw: Raw = builder
            .build()
            .map_err(err)?
            .try_deserialize()
            .map_err(err)?;

        let turn = turn_settings(&raw)?;
        let demo = demo_settings(&raw)?;
        let mut warnings = Vec::new();
        let mut unknown: Vec<&String> = hypha_env
            .keys()
            .filter(|k| !KNOWN_KEYS.contains(&k["HYPHA_".len()..].to_ascii_lowercase().as_str()))
            .collect();
        unknown.sort();
        for key in unknown {
            warnings.push(format!(
                "unknown environment variable {key} is ignored (check its spelling; known: HYPHA_{})",
                KNOWN_KEYS.join(", HYPHA_").to_ascii_uppercase()
            ));
        }
        let jwt_secret = raw
            .jwt_secret
            .or_else(|| env.get("JWT_SECRET").cloned())
            .filter(|s| !s.is_empty())
            .map(SecretString::from);
        if !matches!(raw.log_format.as_str(), "text" | "json") {
            return Err(SettingsError(format!(
                "log_format must be 'text' or 'json', not {:?}",
                raw.log_format
            )));
        }
        if raw.max_frame_size < 1024 {
            return Err(SettingsError(
                "max_frame_size must be at least 1024 bytes".into(),
            ));
        }
        if raw.connection_queue == 0 || raw.ws_ping_interval == 0 {
            return Err(SettingsError(
                "connection_queue and ws_ping_interval must be positive".into(),
            ));
        }
        if let Some(url) = &raw.public_base_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(SettingsError(format!(
                "public_base_url must start with http:// or https://, got {url:?}"
            )));
        }
        if let Some(uri) = raw.redis_uri.as_deref().filter(|u| !u.is_empty())
            && !(uri.starts_with("redis://")
                || uri.starts_with("redis+unix://")
                || uri.starts_with("unix://"))
        {
            return Err(SettingsError(format!(
                "redis_uri must start with redis://, redis+unix:// or unix://, got {:?}",
                crate::hub::redis_bus::redact(uri)
            )));
        }
        let tls = match (raw.cert_file, raw.key_file) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            _ => {
                return Err(SettingsError(
                    "cert_file and key_file go together: give both, or neither".into(),
                ));
            }
        };
        let allow_origins =
            crate::http::cors::AllowOrigins::parse(raw.allow_origins.as_deref().unwrap_or("*"))
                .map_err(|e| {
                    SettingsError(format!("--allow-origins (HYPHA_ALLOW_ORIGINS): {e}"))
                })?;
        let trusted_proxies = crate::net::client_addr::TrustedProxies::parse(
            raw.trusted_proxies.as_deref().unwrap_or(""),
        )
        .map_err(|e| SettingsError(format!("--trusted-proxies (HYPHA_TRUSTED_PROXIES): {e}")))?;
        if raw.header_timeout == 0 {
            return Err(SettingsError(
                "--header-timeout (HYPHA_HEADER_TIMEOUT): must be a positive number of seconds"
                    .into(),
            ));
        }
        if raw.metrics_port.is_some_and(|p| p == raw.port && p != 0) {
            return Err(SettingsError("metrics_port must differ from port".into()));
        }
        let settings = Settings {
            host: raw.host,
            port: raw.port,
            public_base_url: raw
                .public_base_url
                .map(|u| u.trim_end_matches('/').to_string()),
            jwt_secret,
            server_id: raw.server_id,
            ws_idle_timeout: Duration::from_secs(raw.ws_idle_timeout),
            ws_ping_interval: Duration::from_secs(raw.ws_ping_interval),
            ws_ping_timeout: Duration::from_secs(raw.ws_ping_timeout),
            handshake_timeout: d.handshake_timeout,
            max_frame_size: raw.max_frame_size,
            connection_queue: raw.connection_queue,
            slow_consumer_timeout: Duration::from_secs(raw.slow_consumer_timeout),
            ws_rate_limit: raw.ws_rate_limit,
            reconnection_token_life_time: raw.reconnection_token_life_time,
            method_timeout: Duration::from_secs(raw.method_timeout.max(1)),
            log_format: raw.log_format,
            allow_origins,
            admission: crate::net::admission::AdmissionSettings {
                max_connections: raw.max_connections.unwrap_or(d.admission.max_connections),
                max_per_address: raw.max_connections_per_address,
                first_byte_timeout: Duration::from_secs(raw.header_timeout),
                trusted_proxies,
            },
            header_timeout: Duration::from_secs(raw.header_timeout),
            audit_required: raw.audit_required,
            tls,
            metrics_port: raw.metrics_port,
            shutdown_timeout: Duration::from_secs(raw.shutdown_timeout),
            verbose: cli.verbose,
            turn,
            data_dir: raw.data_dir,
            database_url: raw.database_url.filter(|u| !u.is_empty()),
            redis_uri: raw
                .redis_uri
                .filter(|u| !u.is_empty())
                .map(SecretString::from),
            login_max_failures: raw.login_max_failures.max(1),
            login_lockout: Duration::from_secs(raw.login_lockout),
            demo,
        };
        Ok((settings, warnings))
    }
}

/// Validates the demo options.
fn demo_settings(raw: &Raw) -> Result<crate::demo::DemoSettings, SettingsError> {
    let resolution = raw.demo_resolution.trim();
    let parsed = resolution
        .split_once(['x', 'X'])
        .and_then(|(w, h)| Some((w.parse::<usize>().ok()?, h.parse::<usize>().ok()?)))
        .filter(|(w, h)| {
            (160..=3840).contains(w) && (120..=2160).contains(h) && w % 2 == 0 && h % 2 == 0
        });
    let Some((width, height)) = parsed else {
        return Err(SettingsError(format!(
            "--demo-resolution (HYPHA_DEMO_RESOLUTION): {resolution:?} is not WIDTHxHEIGHT with even numbers from 160x120 to 3840x2160 (e.g. 1280x720)"
        )));
    };
    if !(1..=60).contains(&raw.demo_fps) {
        return Err(SettingsError(
            "--demo-fps (HYPHA_DEMO_FPS): must be from 1 to 60".into(),
        ));
    }
    let codec = crate::demo::encode::Codec::parse(raw.demo_codec.as_deref().unwrap_or("h264"))
        .map_err(|e| SettingsError(format!("--demo-codec (HYPHA_DEMO_CODEC): {e}")))?;
    let listed = raw
        .rtc_ip
        .as_deref()
        .unwrap_or("")
        .split([' ', ','])
        .filter(|s| !s.is_empty())
        .map(|ip| unicast_ip(ip, "--rtc-ip (HYPHA_RTC_IP)"))
        .collect::<Result<Vec<_>, _>>()?;
    let explicit = !listed.is_empty();
    let rtc_ips = if explicit {
        listed
    } else {
        crate::demo::addresses::automatic(&raw.host)
    };
    let rtc_public_ip = raw
        .rtc_public_ip
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(|ip| unicast_ip(ip, "--rtc-public-ip (HYPHA_RTC_PUBLIC_IP)"))
        .transpose()?;
    if rtc_public_ip.is_some() && !explicit {
        return Err(SettingsError(
            "--rtc-public-ip (HYPHA_RTC_PUBLIC_IP): also give --rtc-ip, the private address the NAT maps it onto".into(),
        ));
    }
    if let Some(public) = rtc_public_ip
        && !rtc_ips.iter().any(|ip| ip.is_ipv4() == public.is_ipv4())
    {
        return Err(SettingsError(format!(
            "--rtc-public-ip (HYPHA_RTC_PUBLIC_IP): {public} needs an --rtc-ip of the same IP version to map onto"
        )));
    }
    Ok(crate::demo::DemoSettings {
        enabled: !raw.no_demo,
        width,
        height,
        fps: raw.demo_fps,
        max_viewers: raw.demo_max_viewers as usize,
        codec,
        rtc_ips,
        rtc_public_ip,
    })
}

/// A unicast address for a media option, or an error naming the option.
fn unicast_ip(text: &str, option: &str) -> Result<IpAddr, SettingsError> {
    text.parse::<IpAddr>()
        .ok()
        .filter(|ip| !ip.is_unspecified() && !ip.is_multicast())
        .ok_or_else(|| SettingsError(format!("{option}: {text:?} is not a unicast IP address")))
}

/// Validates the TURN options; every error names the option and the expected form.
fn turn_settings(raw: &Raw) -> Result<crate::turn::TurnSettings, SettingsError> {
    use crate::turn::ice::{HostPort, StaticIceServer};
    let option = |name: &str, e: String| {
        SettingsError(format!(
            "--{name} (HYPHA_{}): {e}",
            name.replace('-', "_").to_ascii_uppercase()
        ))
    };
    let secret = raw.coturn_secret.clone().filter(|s| !s.is_empty());
    let uri = raw.coturn_uri.clone().filter(|s| !s.is_empty());
    let coturn = match (secret, uri) {
        (Some(secret), Some(uri)) => {
            let internal = HostPort::parse(&uri).map_err(|e| option("coturn-uri", e))?;
            let public = match raw.public_coturn_uri.as_deref().filter(|s| !s.is_empty()) {
                Some(list) => list
                    .split(',')
                    .map(|u| HostPort::parse(u).map_err(|e| option("public-coturn-uri", e)))
                    .collect::<Result<Vec<_>, _>>()?,
                None => vec![internal.clone()],
            };
            if raw.coturn_tls_port == Some(0) {
                return Err(option(
                    "coturn-tls-port",
                    "must be a port number from 1 to 65535".into(),
                ));
            }
            Some(crate::turn::CoturnSettings {
                secret: SecretString::from(secret),
                internal,
                public,
                tls_port: raw.coturn_tls_port,
            })
        }
        (None, None) => {
            if raw.public_coturn_uri.is_some() {
                return Err(option(
                    "public-coturn-uri",
                    "needs --coturn-secret and --coturn-uri".into(),
                ));
            }
            None
        }
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
    let static_servers = raw
        .ice_server
        .as_deref()
        .unwrap_or("")
        .split_whitespace()
        .map(|s| StaticIceServer::parse(s).map_err(|e| option("ice-server", e)))
        .collect::<Result<Vec<_>, _>>()?;
    if raw.coturn_max_ttl == 0 {
        return Err(option(
            "coturn-max-ttl",
            "must be a positive number of seconds".into(),
        ));
    }
    Ok(crate::turn::TurnSettings {
        coturn,
        static_servers,
        max_ttl: raw.coturn_max_ttl,
        rate_limit: raw.ice_rate_limit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn layers_in_order() {
        let cli = Cli::parse_from(["hypha-rtc", "--port", "1234"]);
        let (s, warnings) = Settings::load(
            &cli,
            &env(&[
                ("HYPHA_PORT", "999"),
                ("HYPHA_PUBLIC_BASE_URL", "https://x.org/"),
                ("JWT_SECRET", "j"),
            ]),
        )
        .unwrap();
        assert_eq!(s.port, 1234);
        assert_eq!(s.public_base_url.as_deref(), Some("https://x.org"));
        assert_eq!(s.jwt_secret.unwrap().expose_secret(), "j");
        assert!(warnings.is_empty());
        let (s, _) = Settings::load(
            &Cli::parse_from(["x"]),
            &env(&[
                ("HYPHA_PORT", "999"),
                ("HYPHA_JWT_SECRET", "h"),
                ("JWT_SECRET", "j"),
            ]),
        )
        .unwrap();
        assert_eq!(s.port, 999);
        assert_eq!(s.jwt_secret.unwrap().expose_secret(), "h");
    }

    #[test]
    fn turn_options_are_validated_with_the_option_named() {
        let load = |args: &[&str]| {
            let mut argv = vec!["hypha-rtc"];
            argv.extend_from_slice(args);
            Settings::load(&Cli::parse_from(argv), &HashMap::new())
        };
        let (s, _) = load(&[
            "--coturn-secret",
            "s",
            "--coturn-uri",
            "[::1]:3478",
            "--public-coturn-uri",
            "a.org:3478,b.org",
        ])
        .unwrap();
        let coturn = s.turn.coturn.unwrap();
        assert_eq!(coturn.internal.authority(), "[::1]:3478");
        assert_eq!(coturn.public.len(), 2);
        let e = load(&["--coturn-secret", "s", "--coturn-uri", "host:port"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--coturn-uri (HYPHA_COTURN_URI)") && e.contains("host:port"),
            "{e}"
        );
        let e = load(&["--coturn-secret", "s"]).unwrap_err().to_string();
        assert!(e.contains("--coturn-uri"), "{e}");
        let e = load(&["--ice-server", "turn:1.2.3.4:3478"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--ice-server") && e.contains("expected turn:"),
            "{e}"
        );
        let (s, _) = load(&[
            "--ice-server",
            "turn:1.2.3.4:3478[u:p:w]",
            "--ice-server",
            "stun:[::1]:3478",
        ])
        .unwrap();
        assert_eq!(s.turn.static_servers.len(), 2);
    }

    #[test]
    fn unknown_variables_warn_and_bad_values_fail() {
        let cli = Cli::parse_from(["hypha-rtc"]);
        let (_, warnings) = Settings::load(&cli, &env(&[("HYPHA_COTURN_SECRT", "x")])).unwrap();
        assert!(warnings[0].contains("HYPHA_COTURN_SECRT"));
        let e = Settings::load(&cli, &env(&[("HYPHA_PORT", "eighty")])).unwrap_err();
        assert!(e.to_string().contains("port"), "{e}");
    }
}
