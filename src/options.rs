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
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut out = match (base.find("://"), base.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &base[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &base[..scheme + 3], &base[at..])
        }
        _ => base.to_string(),
    };
    if let Some(query) = query {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _))
                    if SECRET_PARAMETERS.contains(&key.to_ascii_lowercase().as_str()) =>
                {
                    format!("{key}=***")
                }
                _ => pair.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&pairs.join("&"));
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
        assert_eq!(
            redact_url("redis://h:6379/0?user=a@b"),
            "redis://h:6379/0?user=a@b"
        );
    }
}
