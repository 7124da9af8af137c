//! Which TCP connections the server takes: at most `--max-connections` in all and
//! `--max-connections-per-address` from one address (trusted proxies count only in the
//! total), and none that stays silent: a connection that sends nothing within the first-byte
//! time-out is closed. A limit that bites is logged, at most once every few seconds.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::client_addr::{TrustedProxies, canonical};

/// How often a limit that keeps biting is logged.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The limits, as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct AdmissionSettings {
    /// Connections in all; 0 means no limit.
    pub max_connections: usize,
    /// Connections from one address; 0 means no limit.
    pub max_per_address: usize,
    /// How long a new connection may stay silent, and a request head may take.
    pub header_timeout: Duration,
    pub trusted_proxies: TrustedProxies,
}

/// Counts open connections and refuses those over a limit.
pub struct Admission {
    settings: AdmissionSettings,
    total: AtomicUsize,
    per_address: Mutex<HashMap<IpAddr, usize>>,
    /// Connections refused since start, by limit.
    pub refused_total: AtomicU64,
    pub refused_per_address: AtomicU64,
    last_log: Mutex<Option<Instant>>,
}

/// Why a connection was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    Total,
    PerAddress,
}

impl Admission {
    pub(crate) fn new(settings: AdmissionSettings) -> Arc<Self> {
        Arc::new(Self {
            settings,
            total: AtomicUsize::new(0),
            per_address: Mutex::new(HashMap::new()),
            refused_total: AtomicU64::new(0),
            refused_per_address: AtomicU64::new(0),
            last_log: Mutex::new(None),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Takes a connection from `ip`, or says which limit refuses it.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refusal> {
        let ip = canonical(ip);
        let max = self.settings.max_connections;
        let taken = self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (max == 0 || n < max).then_some(n + 1)
            });
        if taken.is_err() {
            self.refused(Refusal::Total, ip);
            return Err(Refusal::Total);
        }
        let per_address = self.settings.max_per_address;
        let counted = per_address > 0 && !self.settings.trusted_proxies.trusts(ip);
        let ip = super::client_addr::address_key(ip);
        if counted {
            let mut addresses = self.per_address.lock().unwrap_or_else(|p| p.into_inner());
            let open = addresses.entry(ip).or_insert(0);
            if *open >= per_address {
                drop(addresses);
                self.total.fetch_sub(1, Ordering::AcqRel);
                self.refused(Refusal::PerAddress, ip);
                return Err(Refusal::PerAddress);
            }
            *open += 1;
        }
        Ok(Slot {
            admission: self.clone(),
            ip: counted.then_some(ip),
        })
    }

    fn refused(&self, why: Refusal, ip: IpAddr) {
        let counter = match why {
            Refusal::Total => &self.refused_total,
            Refusal::PerAddress => &self.refused_per_address,
        };
        let refused = counter.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last_log.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
            *last = Some(Instant::now());
            match why {
                Refusal::Total => tracing::warn!(
                    limit = self.settings.max_connections,
                    refused_since_start = refused,
                    "connection refused: the server holds --max-connections connections"
                ),
                Refusal::PerAddress => tracing::warn!(
                    %ip,
                    limit = self.settings.max_per_address,
                    refused_since_start = refused,
                    "connection refused: the address holds --max-connections-per-address connections"
                ),
            }
        }
    }
}

/// One admitted connection's place in the counts, given back when it closes.
pub(crate) struct Slot {
    admission: Arc<Admission>,
    ip: Option<IpAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.admission.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.ip {
            let mut addresses = self
                .admission
                .per_address
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(open) = addresses.get_mut(&ip) {
                *open -= 1;
                if *open == 0 {
                    addresses.remove(&ip);
                }
            }
        }
    }
}

/// A connection that holds its slot, and is failed if its first byte does not come in time.
pub(crate) struct Guarded<S> {
    inner: S,
    _slot: Slot,
    first_byte: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.first_byte = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if let Some(deadline) = self.first_byte.as_mut()
                    && deadline.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "nothing was sent within the first-byte time-out",
                    )));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The acceptor that applies [`Admission`] to every TCP connection, under TLS if any.
#[derive(Clone)]
pub(crate) struct Acceptor {
    admission: Arc<Admission>,
}

impl Acceptor {
    pub(crate) fn new(admission: Arc<Admission>) -> Self {
        Self { admission }
    }
}

impl<S: Send + 'static> axum_server::accept::Accept<TcpStream, S> for Acceptor {
    type Stream = Guarded<TcpStream>;
    type Service = S;
    type Future = std::future::Ready<io::Result<(Self::Stream, S)>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let peer = stream
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let admitted = self.admission.admit(peer.ip()).map(|slot| {
            let _ = stream.set_nodelay(true);
            let timeout = self.admission.settings.header_timeout;
            let stream = Guarded {
                inner: stream,
                _slot: slot,
                first_byte: (!timeout.is_zero()).then(|| Box::pin(tokio::time::sleep(timeout))),
            };
            (stream, service)
        });
        std::future::ready(admitted.map_err(|why| {
            io::Error::other(match why {
                Refusal::Total => "too many connections",
                Refusal::PerAddress => "too many connections from this address",
            })
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_count_and_give_back() {
        let admission = Admission::new(AdmissionSettings {
            max_connections: 3,
            max_per_address: 2,
            header_timeout: Duration::from_secs(1),
            trusted_proxies: TrustedProxies::parse("10.0.0.1").unwrap(),
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let first = admission.admit(a).unwrap();
        let _second = admission.admit(a).unwrap();
        assert_eq!(admission.admit(a).err(), Some(Refusal::PerAddress));
        let _via_proxy = admission.admit(proxy).unwrap();
        assert_eq!(admission.admit(proxy).err(), Some(Refusal::Total));
        drop(first);
        assert_eq!(admission.open(), 2);
        let _again = admission.admit(a).unwrap();
        assert_eq!(admission.refused_per_address.load(Ordering::Relaxed), 1);
    }
}
