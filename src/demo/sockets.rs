//! A viewer's media sockets: one UDP socket per address the server advertises, each read by a
//! small task into one bounded queue, so the viewer's loop waits on a single receiver however
//! many addresses there are. The tasks end with the viewer.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// Datagrams queued per viewer before the readers wait; a browser sends far fewer (RTCP,
/// ICE checks, data-channel messages) than the viewer drains.
const QUEUE: usize = 256;
/// Largest datagram read; WebRTC keeps packets under the path MTU.
const MAX_DATAGRAM: usize = 2048;

/// A datagram as it arrived: who sent it and to which of our sockets.
pub(crate) struct Datagram {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub data: Vec<u8>,
}

/// The sockets of one viewer.
pub(crate) struct Sockets {
    /// Each socket with the address it is bound to (looked up once, not per packet).
    sockets: Vec<(SocketAddr, Arc<UdpSocket>)>,
    incoming: mpsc::Receiver<Datagram>,
    _readers: JoinSet<()>,
}

impl Sockets {
    /// Binds one socket on an ephemeral port of each address.
    pub(crate) async fn bind(ips: &[IpAddr]) -> std::io::Result<Self> {
        let (tx, incoming) = mpsc::channel(QUEUE);
        let mut sockets = Vec::with_capacity(ips.len());
        let mut readers = JoinSet::new();
        for ip in ips {
            let socket = Arc::new(UdpSocket::bind(SocketAddr::new(*ip, 0)).await?);
            let local = socket.local_addr()?;
            readers.spawn(read(socket.clone(), local, tx.clone()));
            sockets.push((local, socket));
        }
        Ok(Self {
            sockets,
            incoming,
            _readers: readers,
        })
    }

    /// The addresses the sockets are bound to.
    pub(crate) fn local_addrs(&self) -> Vec<SocketAddr> {
        self.sockets.iter().map(|(local, _)| *local).collect()
    }

    /// The next datagram from any socket; `None` once every reader has stopped.
    pub(crate) async fn recv(&mut self) -> Option<Datagram> {
        self.incoming.recv().await
    }

    /// Sends from the socket bound to `source`, or the one on the same port (an address that a
    /// NAT maps onto it), or the first.
    pub(crate) async fn send(&self, source: SocketAddr, destination: SocketAddr, data: &[u8]) {
        let socket = self
            .sockets
            .iter()
            .find(|(local, _)| *local == source)
            .or_else(|| {
                self.sockets
                    .iter()
                    .find(|(local, _)| local.port() == source.port())
            })
            .or(self.sockets.first());
        if let Some((_, socket)) = socket
            && let Err(e) = socket.send_to(data, destination).await
        {
            tracing::trace!(error = %e, %destination, "demo media datagram not sent");
        }
    }
}

async fn read(socket: Arc<UdpSocket>, local: SocketAddr, tx: mpsc::Sender<Datagram>) {
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, source) = match socket.recv_from(&mut buffer).await {
            Ok(received) => received,
            // ICMP port-unreachable from an earlier send surfaces here on Linux: not fatal.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Err(_) => return,
        };
        let datagram = Datagram {
            source,
            destination: local,
            data: buffer[..n].to_vec(),
        };
        if tx.send(datagram).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn datagrams_from_every_address_reach_one_queue() {
        let ips: Vec<IpAddr> = vec![[127, 0, 0, 1].into(), [127, 0, 0, 2].into()];
        let mut sockets = Sockets::bind(&ips).await.unwrap();
        let addrs = sockets.local_addrs();
        assert_eq!(addrs.len(), 2);
        let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for (i, addr) in addrs.iter().enumerate() {
            peer.send_to(&[i as u8], addr).await.unwrap();
        }
        let mut seen = Vec::new();
        for _ in 0..2 {
            let d = tokio::time::timeout(std::time::Duration::from_secs(5), sockets.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(d.source, peer.local_addr().unwrap());
            seen.push((d.destination, d.data[0]));
        }
        seen.sort();
        assert_eq!(seen, vec![(addrs[0], 0), (addrs[1], 1)]);
        // A reply goes out from the socket the datagram came to.
        sockets
            .send(addrs[1], peer.local_addr().unwrap(), b"back")
            .await;
        let mut buf = [0u8; 8];
        let (n, from) =
            tokio::time::timeout(std::time::Duration::from_secs(5), peer.recv_from(&mut buf))
                .await
                .unwrap()
                .unwrap();
        assert_eq!((&buf[..n], from), (&b"back"[..], addrs[1]));
    }
}
