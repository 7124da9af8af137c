//! The network edge: which TCP connections are taken (caps per server and per address, a
//! first-byte deadline) and who the client behind a connection is (trusted proxies).

pub(crate) mod admission;
pub mod client_addr;
pub mod listen;

use std::time::Duration;

/// Which connections are taken, and for how long a silent or slow one is kept.
#[derive(clap::Args, Debug, Clone)]
pub struct AdmissionOptions {
    /// Most connections at once; 0 = no limit [default: the open-file limit minus 256]
    #[arg(long, env = "HYPHA_MAX_CONNECTIONS", value_name = "COUNT")]
    pub max_connections: Option<usize>,
    /// Most connections at once from one address (trusted proxies count only in the total); 0 = no limit
    #[arg(
        long,
        env = "HYPHA_MAX_CONNECTIONS_PER_ADDRESS",
        value_name = "COUNT",
        default_value_t = 256
    )]
    pub max_connections_per_address: usize,
    /// A connection that sends nothing, or no complete request head, within this many seconds is closed; request bodies get three times as long
    #[arg(
        long,
        env = "HYPHA_HEADER_TIMEOUT",
        value_name = "SECONDS",
        default_value_t = 10
    )]
    pub header_timeout: u64,
    /// Proxies (addresses or blocks such as 10.0.0.0/8, comma-separated) whose X-Forwarded-For or Forwarded headers give the client's address; nobody else's are believed
    #[arg(long, env = "HYPHA_TRUSTED_PROXIES", value_name = "CIDRS")]
    pub trusted_proxies: Option<String>,
}

impl AdmissionOptions {
    pub(crate) fn settings(
        &self,
    ) -> Result<admission::AdmissionSettings, crate::options::SettingsError> {
        use crate::options::{SettingsError, option_name, positive_seconds};
        let trusted_proxies =
            client_addr::TrustedProxies::parse(self.trusted_proxies.as_deref().unwrap_or(""))
                .map_err(|e| {
                    SettingsError::new(format!("{}: {e}", option_name("trusted-proxies")))
                })?;
        Ok(admission::AdmissionSettings {
            max_connections: self.max_connections.unwrap_or_else(default_max_connections),
            max_per_address: self.max_connections_per_address,
            header_timeout: positive_seconds(&option_name("header-timeout"), self.header_timeout)?,
            trusted_proxies,
        })
    }
}

/// How long request bodies may take in all, given the header time-out.
pub(crate) fn body_deadline(header_timeout: Duration) -> Duration {
    header_timeout * 3
}

/// The process's limit on open files, after raising the soft limit to the hard one (each
/// connection takes a file descriptor; the default soft limit is often only 1024).
pub(crate) fn raise_fd_limit() -> Option<u64> {
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
        Some(limit.rlim_cur)
    }
}

/// The default `--max-connections`: what the file limit allows, leaving room for the
/// store, the probe, the demo's media sockets and log files.
pub(crate) fn default_max_connections() -> usize {
    let files = raise_fd_limit().unwrap_or(1024);
    files.saturating_sub(256).clamp(64, 1_000_000) as usize
}
