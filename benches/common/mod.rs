//! What the benchmarks share: a free loopback port, and waiting for a server to take
//! connections on it.

use std::time::{Duration, Instant};

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Waits (at most 10 s) until something takes connections on `port`.
pub async fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "hypha-rtc did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
