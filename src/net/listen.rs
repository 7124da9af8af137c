//! The server's listening sockets, with an accept queue deep enough for bursts. tokio's
//! `TcpListener::bind` asks for 1,024; a burst of connects beyond what the workers accept in
//! time (a reconnect storm after a restart, a thousand clients at once) overflowed it, and each
//! dropped handshake cost its client a 1 s retransmit.

use std::io;

use tokio::net::{TcpListener, TcpSocket};

/// Connections the kernel may queue before they are accepted; it caps this at
/// `net.core.somaxconn` (4,096 on current Linux).
const BACKLOG: u32 = 4096;

/// Binds `addr` (`host:port`, the host a name or an address) on the first of its addresses
/// that takes it, as `TcpListener::bind` does, with the deeper queue.
pub async fn bind(addr: &str) -> io::Result<TcpListener> {
    let mut last = None;
    for address in tokio::net::lookup_host(addr).await? {
        let socket = if address.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        // As std and tokio do on Unix: a restart can bind while old connections linger.
        #[cfg(unix)]
        socket.set_reuseaddr(true)?;
        match socket.bind(address).and_then(|()| socket.listen(BACKLOG)) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{addr} resolves to no address"),
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_burst_beyond_tokios_default_queue_is_queued_not_dropped() {
        let files = super::super::raise_fd_limit().unwrap_or(1024) as usize;
        // The kernel caps the queue at net.core.somaxconn (4,096 on current Linux; older
        // kernels had 128, where no queue can hold more).
        let cap = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(128);
        let burst = 1100.min(cap).min(files.saturating_sub(100));
        let listener = bind("127.0.0.1:0").await.unwrap();
        let local = listener.local_addr().unwrap();
        // More connections than tokio's default queue (1,024), none accepted yet: with that
        // queue the kernel drops the handshakes past it and these connects hang.
        let mut clients = Vec::new();
        for n in 0..burst {
            let connect = tokio::net::TcpStream::connect(local);
            match tokio::time::timeout(Duration::from_secs(2), connect).await {
                Ok(Ok(client)) => clients.push(client),
                other => panic!("connection {n} was not queued: {other:?}"),
            }
        }
        assert_eq!(clients.len(), burst);
    }
}
