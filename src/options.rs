//! What every module's options share: the error that names the option at fault, and small
//! checks. (The options themselves live with the module they configure; `config` gathers them.)

use std::time::Duration;

/// A setting that could not be read; names the option and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("invalid settings: {0}")]
    Invalid(String),
    /// The command line itself (unknown option, bad value, `--help`): clap says it best.
    #[error("{0}")]
    Command(#[from] clap::Error),
    #[error("cannot read the settings file {file}: {source}")]
    File {
        file: String,
        source: config::ConfigError,
    },
}

/// A value of an option that does not parse: what was given and what is expected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(pub String);

impl From<String> for InvalidValue {
    fn from(message: String) -> Self {
        InvalidValue(message)
    }
}

impl From<&str> for InvalidValue {
    fn from(message: &str) -> Self {
        InvalidValue(message.to_string())
    }
}

impl SettingsError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        SettingsError::Invalid(message.into())
    }
}

/// A duration option given in seconds, refused when zero (for those that must be positive).
pub(crate) fn positive_seconds(option: &str, seconds: u64) -> Result<Duration, SettingsError> {
    if seconds == 0 {
        return Err(SettingsError::new(format!(
            "{option}: must be a positive number of seconds"
        )));
    }
    Ok(Duration::from_secs(seconds))
}

/// `--option (HYPHA_OPTION)`, for messages.
pub(crate) fn option_name(long: &str) -> String {
    format!(
        "--{long} (HYPHA_{})",
        long.replace('-', "_").to_ascii_uppercase()
    )
}

/// A URL (database, Redis) without its password, for messages and logs: the password of its
/// user part and the value of any password parameter of its query (`redis+unix://...?pass=`,
/// `postgres://...?password=`).
pub(crate) fn redact_url(url: &str) -> String {
    const SECRET_PARAMETERS: [&str; 3] = ["pass", "password", "sslpassword"];
    let authority = url.find("://").map_or(0, |i| i + 3);
    // Everything up to the last `@` may be the user part (a password may hold `?`, `/` or
    // `@` unescaped): all of it is masked but the user name, even where the `@` was in the
    // query after all.
    let (mut out, rest) = match url[authority..].rfind('@') {
        Some(at) => {
            let user = url[authority..authority + at]
                .split(':')
                .next()
                .unwrap_or("");
            (
                format!("{}{user}:***@", &url[..authority]),
                &url[authority + at + 1..],
            )
        }
        None => (url[..authority].to_string(), &url[authority..]),
    };
    // Parameters are read wherever a `?` or `&` starts one, so that none is missed.
    for piece in rest.split_inclusive(['?', '&']) {
        let (body, separator) = match piece.strip_suffix(['?', '&']) {
            Some(body) => (body, &piece[body.len()..]),
            None => (piece, ""),
        };
        match body.split_once('=') {
            Some((key, _)) if SECRET_PARAMETERS.contains(&key.to_ascii_lowercase().as_str()) => {
                out.push_str(key);
                out.push_str("=***");
            }
            _ => out.push_str(body),
        }
        out.push_str(separator);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted() {
        use super::redact_url;
        assert_eq!(
            redact_url("redis://user:secret@127.0.0.1:6379/0"),
            "redis://user:***@127.0.0.1:6379/0"
        );
        assert_eq!(redact_url("redis://:secret@h"), "redis://:***@h");
        assert_eq!(redact_url("redis://127.0.0.1"), "redis://127.0.0.1");
        assert_eq!(
            redact_url("redis+unix:///run/redis.sock?user=bus&pass=secret&db=1"),
            "redis+unix:///run/redis.sock?user=bus&pass=***&db=1"
        );
        assert_eq!(
            redact_url("postgres://u@h/db?PassWord=secret&sslmode=require"),
            "postgres://u:***@h/db?PassWord=***&sslmode=require"
        );
        // A `?`, `/` or `@` in the password still leaves none of it.
        assert_eq!(
            redact_url("redis://user:12?3/4@5@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(redact_url("no-scheme?pass=x"), "no-scheme?pass=***");
        // An `@` in the query masks more than needed, never less.
        assert_eq!(
            redact_url("redis://h:6379/0?user=a@b&pass=x"),
            "redis://h:***@b&pass=***"
        );
    }
}
