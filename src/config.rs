//! Settings: defaults < optional file (`--config`) < `HYPHA_*` environment < command line.
//!
//! Each option is written once: a field of a clap struct owned by the module it configures
//! (its doc comment is its `--help`, its `env` its variable, its default written there), and
//! the struct's `settings()` turns it into validated, typed settings. The file layer feeds
//! the same arguments (its keys are the option names with underscores; an unknown key stops
//! start-up), and the list of known `HYPHA_*` variables is read off the command itself.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser};
use secrecy::SecretString;

const AFTER_HELP: &str = "\
Every option can also be set in the environment as HYPHA_<OPTION> (shown with each option),
or in a TOML/YAML/JSON file given with --config, whose keys are the long options with
underscores (public_base_url = \"https://...\"). The command line beats the environment, which
beats the file, which beats the defaults. --jwt-secret also falls back to JWT_SECRET. An
unknown HYPHA_* variable is reported at start-up; an unknown key in the file stops it.";

/// The command line.
#[derive(Parser, Debug, Clone)]
#[command(name = "hypha-rtc", version, about = "WebRTC signaling and TURN-credential server, compatible with hypha-rpc clients.", after_help = AFTER_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Settings file (TOML, YAML or JSON) with the same keys as the long options (underscores)
    #[arg(long, value_name = "FILE", global = true, env = "HYPHA_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub server: ServerOptions,
    #[command(flatten)]
    pub connections: crate::http::ws::connection::ConnectionOptions,
    #[command(flatten)]
    pub admission: crate::net::AdmissionOptions,
    #[command(flatten)]
    pub http: crate::http::HttpOptions,
    #[command(flatten)]
    pub turn: crate::turn::TurnOptions,
    #[command(flatten)]
    pub store: crate::store::StoreOptions,
    #[command(flatten)]
    pub cluster: crate::cluster::ClusterOptions,
    #[command(flatten)]
    pub accounts: crate::auth::accounts::AccountOptions,
    #[command(flatten)]
    pub demo: crate::demo::DemoOptions,
}

/// Administration commands; without one, the server runs.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Command {
    /// Manage local users, in the database the server uses (also while it runs)
    User {
        #[command(subcommand)]
        action: UserAction,
    },
    /// Check the TURN setup from this machine (coturn, and every address and transport clients are given), naming what to change; exit 0 when all is well
    Doctor(crate::turn::doctor::DoctorOptions),
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

/// Log lines as text or as one JSON object each.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The server itself: where it listens, who it says it is, its secret.
#[derive(clap::Args, Debug, Clone)]
pub struct ServerOptions {
    /// Address to listen on
    #[arg(long, env = "HYPHA_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on; 0 picks a free one
    #[arg(long, env = "HYPHA_PORT", default_value_t = 9527)]
    pub port: u16,
    /// The URL clients reach this server at, e.g. https://rtc.example.org [default: http://HOST:PORT]
    #[arg(long, env = "HYPHA_PUBLIC_BASE_URL")]
    pub public_base_url: Option<String>,
    /// Secret for HS256 tokens; share it with a Hypha deployment to interoperate; falls back to JWT_SECRET [default: random, tokens die with the process]
    #[arg(
        long,
        global = true,
        env = "HYPHA_JWT_SECRET",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub jwt_secret: Option<String>,
    /// Accepted for compatibility with Hypha; the environment is always read
    #[arg(long, env = "HYPHA_FROM_ENV")]
    pub from_env: bool,
    /// Server id; the manager is `manager-<id>` [default: random]
    #[arg(long, env = "HYPHA_SERVER_ID")]
    pub server_id: Option<String>,
    /// On SIGTERM, how long calls in flight may take to finish before clients are closed, in seconds
    #[arg(
        long,
        env = "HYPHA_SHUTDOWN_TIMEOUT",
        value_name = "SECONDS",
        default_value_t = 20
    )]
    pub shutdown_timeout: u64,
    /// Log format
    #[arg(long, env = "HYPHA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// More log output (-v info, -vv debug); RUST_LOG overrides
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// The server's own settings, validated.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub host: String,
    pub port: u16,
    pub public_base_url: Option<String>,
    pub jwt_secret: Option<SecretString>,
    pub server_id: Option<String>,
    pub shutdown_timeout: Duration,
    pub log_format: LogFormat,
    pub verbose: u8,
}

impl ServerOptions {
    fn settings(&self, env: &HashMap<String, String>) -> Result<ServerSettings, SettingsError> {
        if let Some(url) = &self.public_base_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(SettingsError::new(format!(
                "--public-base-url (HYPHA_PUBLIC_BASE_URL): public_base_url must start with http:// or https://, got {url:?}"
            )));
        }
        Ok(ServerSettings {
            host: self.host.clone(),
            port: self.port,
            public_base_url: self
                .public_base_url
                .as_ref()
                .map(|u| u.trim_end_matches('/').to_string()),
            jwt_secret: self
                .jwt_secret
                .clone()
                .or_else(|| env.get("JWT_SECRET").cloned())
                .filter(|s| !s.is_empty())
                .map(SecretString::from),
            server_id: self.server_id.clone().filter(|s| !s.is_empty()),
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout),
            log_format: self.log_format,
            verbose: self.verbose,
        })
    }
}

/// Everything the server needs to start, validated, one part per concern.
#[derive(Debug, Clone)]
pub struct Settings {
    pub server: ServerSettings,
    pub connections: crate::http::ws::connection::ConnectionSettings,
    pub admission: crate::net::admission::AdmissionSettings,
    pub http: crate::http::HttpSettings,
    pub turn: crate::turn::TurnSettings,
    pub store: crate::store::StoreSettings,
    pub cluster: crate::cluster::ClusterSettings,
    pub accounts: crate::auth::accounts::AccountSettings,
    pub demo: crate::demo::DemoSettings,
}

impl Default for Settings {
    /// The defaults of every option (what a command line without options gives).
    fn default() -> Self {
        match load(["hypha-rtc"], &HashMap::new()) {
            Ok((_, settings, _)) => settings,
            Err(e) => unreachable!("the defaults are valid settings: {e}"),
        }
    }
}

pub use crate::options::SettingsError;

/// Hypha's names for variables the command reads under another: (Hypha's, ours).
const ENV_ALIASES: &[(&str, &str)] = &[
    ("HYPHA_DATABASE_URI", "HYPHA_DATABASE_URL"),
    (
        "RECONNECTION_TOKEN_LIFE_TIME",
        "HYPHA_RECONNECTION_TOKEN_LIFE_TIME",
    ),
];

/// Every `HYPHA_*` variable the command reads, from its own definition.
pub(crate) fn known_variables(command: &clap::Command) -> Vec<String> {
    let mut names: Vec<String> = command
        .get_arguments()
        .filter_map(|arg| arg.get_env())
        .map(|env| env.to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The values of a settings file, by option id; an unknown key is an error.
fn file_values(
    path: &std::path::Path,
    command: &clap::Command,
) -> Result<Vec<(String, Vec<String>)>, SettingsError> {
    let file_error = |source| SettingsError::File {
        file: path.display().to_string(),
        source,
    };
    let table: HashMap<String, config::Value> = config::Config::builder()
        .add_source(config::File::from(path).required(true))
        .build()
        .map_err(file_error)?
        .try_deserialize()
        .map_err(file_error)?;
    let known: Vec<String> = command
        .get_arguments()
        .filter(|a| a.get_long().is_some() && a.get_id() != "config")
        .map(|a| a.get_id().to_string())
        .collect();
    let mut values = Vec::new();
    for (key, value) in table {
        if !known.contains(&key) {
            let mut known = known.clone();
            known.sort();
            return Err(SettingsError::new(format!(
                "{}: unknown setting {key:?} (check its spelling; known: {})",
                path.display(),
                known.join(", ")
            )));
        }
        let texts = match value.clone().into_array() {
            Ok(items) => items.into_iter().map(|v| v.to_string()).collect(),
            Err(_) => vec![value.to_string()],
        };
        values.push((key, texts));
    }
    Ok(values)
}

/// Reads the command line, the environment (`env`, `HYPHA_*` and `JWT_SECRET`) and the
/// settings file into validated settings; returns the parsed command line too (for its
/// subcommand) and warnings (unknown `HYPHA_*` variables).
pub fn load<I, T>(
    args: I,
    env: &HashMap<String, String>,
) -> Result<(Cli, Settings, Vec<String>), SettingsError>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    // Hypha's names count where ours are not set.
    let mut env = env.clone();
    for (theirs, ours) in ENV_ALIASES {
        if let Some(value) = env.get(*theirs).cloned() {
            env.entry(ours.to_string()).or_insert(value);
        }
    }
    let env = &env;
    let mut command = Cli::command();
    // The file sits under the environment: its values become the arguments' defaults, and
    // the environment (given as `env`, so tests need not touch the process's) above them.
    let file = config_path(&args).or_else(|| env.get("HYPHA_CONFIG").map(PathBuf::from));
    if let Some(path) = file {
        for (id, values) in file_values(&path, &command)? {
            command = command.mut_arg(id, |arg| arg.default_values(values));
        }
    }
    let ids: Vec<(String, String)> = command
        .get_arguments()
        .filter_map(|a| {
            a.get_env()
                .map(|e| (a.get_id().to_string(), e.to_string_lossy().into_owned()))
        })
        .collect();
    for (id, name) in &ids {
        if let Some(value) = env.get(name) {
            let value = value.clone();
            command = command.mut_arg(id, |arg| {
                let delimited = arg.get_value_delimiter();
                match delimited {
                    Some(d) => arg.default_values(value.split(d).map(str::to_string)),
                    None => arg.default_value(value),
                }
            });
        }
    }
    let known = known_variables(&command);
    let matches = command.try_get_matches_from(args)?;
    let cli = Cli::from_arg_matches(&matches)?;
    let settings = Settings {
        server: cli.server.settings(env)?,
        connections: cli.connections.settings()?,
        admission: cli.admission.settings()?,
        http: cli.http.settings(cli.server.port)?,
        turn: cli.turn.settings()?,
        store: cli.store.settings(),
        cluster: cli.cluster.settings()?,
        accounts: cli.accounts.settings(),
        demo: cli.demo.settings(&cli.server.host)?,
    };
    if settings.cluster.instance_link.is_some() && settings.server.jwt_secret.is_none() {
        // The link's key comes from the secret all instances share; a random one per process
        // would leave every link refused.
        return Err(crate::options::SettingsError::new(format!(
            "{} needs --jwt-secret (HYPHA_JWT_SECRET), the same on every instance: the instances prove themselves to each other with it",
            crate::options::option_name("instance-link")
        )));
    }
    let mut unknown: Vec<&String> = env
        .keys()
        .filter(|k| {
            k.starts_with("HYPHA_")
                && !known.contains(k)
                && !ENV_ALIASES.iter().any(|(theirs, _)| theirs == k)
        })
        .collect();
    unknown.sort();
    let warnings = unknown
        .into_iter()
        .map(|key| {
            format!(
                "unknown environment variable {key} is ignored (check its spelling; known: {})",
                known.join(", ")
            )
        })
        .collect();
    Ok((cli, settings, warnings))
}

/// The value of `--config` on a command line, before it is parsed.
fn config_path(args: &[std::ffi::OsString]) -> Option<PathBuf> {
    let mut args = args.iter().skip(1);
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        if text == "--config" {
            return args.next().map(PathBuf::from);
        }
        if let Some(path) = text.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    None
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
    fn an_instance_link_is_checked_before_the_start() {
        let refused = |args: &[&str], vars: &[(&str, &str)]| {
            let mut all = vec!["hypha-rtc"];
            all.extend_from_slice(args);
            match load(all, &env(vars)) {
                Ok(_) => panic!("accepted {args:?}"),
                Err(e) => e.to_string(),
            }
        };
        let redis = ["--redis-uri", "redis://127.0.0.1:6379/0"];
        let secret = [("HYPHA_JWT_SECRET", "s")];
        let with = |link: &'static str| [&redis[..], &["--instance-link", link][..]].concat();
        assert!(refused(&with("10.0.0.1:9600"), &[]).contains("needs --jwt-secret"));
        assert!(refused(&["--instance-link", "10.0.0.1:9600"], &secret).contains("--redis-uri"));
        assert!(refused(&with("0.0.0.0:9600"), &secret).contains("no address another instance"));
        assert!(refused(&with("[::]:9600"), &secret).contains("no address another instance"));
        assert!(refused(&with("::1:9600"), &secret).contains("brackets"));
        assert!(refused(&with("10.0.0.1"), &secret).contains("HOST:PORT"));
        assert!(refused(&with("h:99999"), &secret).contains("not a port"));
        let (_, s, _) = load(
            [
                "hypha-rtc",
                redis[0],
                redis[1],
                "--instance-link",
                "[::1]:0",
            ],
            &env(&secret),
        )
        .unwrap();
        let link = s.cluster.instance_link.unwrap();
        assert_eq!(
            (link.bind.as_str(), link.advertised(9600).as_str()),
            ("[::1]:0", "[::1]:9600")
        );
    }

    #[test]
    fn layers_in_order() {
        let (_, s, warnings) = load(
            ["hypha-rtc", "--port", "1234"],
            &env(&[
                ("HYPHA_PORT", "999"),
                ("HYPHA_PUBLIC_BASE_URL", "https://x.org/"),
                ("JWT_SECRET", "j"),
            ]),
        )
        .unwrap();
        assert_eq!(s.server.port, 1234);
        assert_eq!(s.server.public_base_url.as_deref(), Some("https://x.org"));
        assert_eq!(s.server.jwt_secret.unwrap().expose_secret(), "j");
        assert!(warnings.is_empty());
        let (_, s, _) = load(
            ["x"],
            &env(&[
                ("HYPHA_PORT", "999"),
                ("HYPHA_JWT_SECRET", "h"),
                ("JWT_SECRET", "j"),
            ]),
        )
        .unwrap();
        assert_eq!(s.server.port, 999);
        assert_eq!(s.server.jwt_secret.unwrap().expose_secret(), "h");
    }

    #[test]
    fn hyphas_names_for_settings_are_understood() {
        let (_, s, warnings) = load(
            ["x"],
            &env(&[
                (
                    "HYPHA_DATABASE_URI",
                    "postgresql+asyncpg://u:p@db:5432/hypha",
                ),
                ("RECONNECTION_TOKEN_LIFE_TIME", "600"),
            ]),
        )
        .unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            s.store.database_url.as_deref(),
            Some("postgres://u:p@db:5432/hypha")
        );
        assert_eq!(s.connections.reconnection_token_life_time, 600);
        for (given, meant) in [
            ("sqlite+aiosqlite:///rel.db", "sqlite://rel.db"),
            ("sqlite+aiosqlite:////abs/h.db", "sqlite:///abs/h.db"),
            ("sqlite:///abs/h.db", "sqlite:///abs/h.db"),
        ] {
            let (_, s, _) = load(["x", "--database-uri", given], &env(&[])).unwrap();
            assert_eq!(s.store.database_url.as_deref(), Some(meant), "{given}");
        }
        // Ours wins over Hypha's.
        let (_, s, _) = load(
            ["x"],
            &env(&[
                ("HYPHA_DATABASE_URI", "sqlite://a.db"),
                ("HYPHA_DATABASE_URL", "sqlite://b.db"),
            ]),
        )
        .unwrap();
        assert_eq!(s.store.database_url.as_deref(), Some("sqlite://b.db"));
    }

    #[test]
    fn the_file_sits_under_the_environment_and_refuses_unknown_keys() {
        let dir = std::env::temp_dir().join(format!("hypha-rtc-cfg-{}", crate::ids::random_id(8)));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("settings.toml");
        std::fs::write(
            &file,
            "port = 1111\nws_rate_limit = 7\nice_server = [\"stun:[::1]:3478\", \"stun:1.2.3.4:3478\"]\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let (_, s, _) = load(
            ["hypha-rtc", "--config", path],
            &env(&[("HYPHA_WS_RATE_LIMIT", "9")]),
        )
        .unwrap();
        assert_eq!(s.server.port, 1111);
        assert_eq!(s.connections.rate_limit, 9);
        assert_eq!(s.turn.static_servers.len(), 2);
        std::fs::write(&file, "prot = 1\n").unwrap();
        let e = load(["hypha-rtc", "--config", path], &HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown setting \"prot\"") && e.contains("port"),
            "{e}"
        );
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn turn_options_are_validated_with_the_option_named() {
        let load_args = |args: &[&str]| {
            let mut argv = vec!["hypha-rtc"];
            argv.extend_from_slice(args);
            load(argv, &HashMap::new()).map(|(_, s, _)| s)
        };
        let s = load_args(&[
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
        let e = load_args(&["--coturn-secret", "s", "--coturn-uri", "host:port"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--coturn-uri (HYPHA_COTURN_URI)") && e.contains("host:port"),
            "{e}"
        );
        let e = load_args(&["--coturn-secret", "s"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--coturn-uri"), "{e}");
        let e = load_args(&["--ice-server", "turn:1.2.3.4:3478"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--ice-server") && e.contains("expected turn:"),
            "{e}"
        );
        let s = load_args(&[
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
        let (_, _, warnings) = load(["hypha-rtc"], &env(&[("HYPHA_COTURN_SECRT", "x")])).unwrap();
        assert!(warnings[0].contains("HYPHA_COTURN_SECRT"));
        let e = load(["hypha-rtc"], &env(&[("HYPHA_PORT", "eighty")])).unwrap_err();
        assert!(e.to_string().contains("port"), "{e}");
        assert!(known_variables(&Cli::command()).contains(&"HYPHA_COTURN_SECRET".to_string()));
    }
}
