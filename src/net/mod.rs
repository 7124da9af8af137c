//! The network edge: which TCP connections are taken (caps per server and per address, a
//! first-byte deadline) and who the client behind a connection is (trusted proxies).

pub mod admission;
pub mod client_addr;

/// The process's limit on open files, after raising the soft limit to the hard one (each
/// connection takes a file descriptor; the default soft limit is often only 1024).
pub fn raise_fd_limit() -> Option<u64> {
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
pub fn default_max_connections() -> usize {
    let files = raise_fd_limit().unwrap_or(1024);
    files.saturating_sub(256).clamp(64, 1_000_000) as usize
}
