//! The built-in video producer: scene (text animation), render (text into I420), encode
//! (H.264; VP8 with the `vp8` feature), peer (one str0m session per viewer), controls (what a viewer may change, from the
//! page's JSON or as a hypha-rpc service on the data channel), page (HTML/JS at `/demo/`).

pub mod addresses;
pub mod controls;
pub mod encode;
pub mod page;
pub mod peer;
pub mod render;
pub mod scene;
pub mod sockets;
#[cfg(feature = "vp8")]
pub mod vp8;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use str0m::config::DtlsCert;

/// What the demo produces, validated at start-up.
#[derive(Debug, Clone)]
pub struct DemoSettings {
    pub enabled: bool,
    pub width: usize,
    pub height: usize,
    pub fps: u32,
    pub codec: encode::Codec,
    /// Addresses the media sockets bind to, each advertised as a host candidate.
    pub rtc_ips: Vec<IpAddr>,
    /// An address that a 1:1 NAT maps onto the first of `rtc_ips`, advertised too.
    pub rtc_public_ip: Option<IpAddr>,
    /// Most viewer sessions alive at once; more are refused until one ends.
    pub max_viewers: usize,
}

impl Default for DemoSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            width: 1280,
            height: 720,
            fps: 30,
            codec: encode::Codec::H264,
            rtc_ips: vec![IpAddr::from([127, 0, 0, 1])],
            rtc_public_ip: None,
            max_viewers: 16,
        }
    }
}

/// The running producer: its settings, the DTLS certificate every viewer's session shares
/// (generating one per session costs time at every Start), and live figures for `/metrics`.
pub struct Producer {
    pub settings: DemoSettings,
    cert: Option<DtlsCert>,
    viewers: AtomicUsize,
    /// Sessions not connected yet, by the address that asked for them.
    pending: std::sync::Mutex<std::collections::HashMap<Option<IpAddr>, usize>>,
    frames: AtomicU64,
    sessions: AtomicU64,
}

impl Producer {
    pub fn new(settings: DemoSettings) -> Arc<Self> {
        let cert = settings
            .enabled
            .then(|| {
                str0m::crypto::from_feature_flags()
                    .dtls_provider
                    .generate_certificate()
            })
            .flatten();
        Arc::new(Self {
            settings,
            cert,
            viewers: AtomicUsize::new(0),
            pending: Default::default(),
            frames: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
        })
    }

    /// Viewers whose session is alive now.
    pub fn viewers(&self) -> usize {
        self.viewers.load(Ordering::Relaxed)
    }

    /// Frames sent to all viewers since start-up.
    pub fn frames(&self) -> u64 {
        self.frames.load(Ordering::Relaxed)
    }

    /// Viewer sessions started since start-up.
    pub fn sessions(&self) -> u64 {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Counts a viewer for as long as the returned guard lives; `None` when the producer
    /// already has `max_viewers`, so a flood of offers cannot take every core and socket.
    fn viewer_guard(self: &Arc<Self>) -> Option<ViewerGuard> {
        let max = self.settings.max_viewers;
        self.viewers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(ViewerGuard(self.clone()))
    }
}

/// Sessions one address may have waiting to connect: offers that never connect cannot take
/// every viewer slot.
pub const MAX_PENDING_PER_ADDRESS: usize = 4;

impl Producer {
    /// Counts a session waiting to connect for `address` until the returned guard is
    /// dropped; `None` when the address, or all addresses together (half the viewer slots),
    /// already have as many as they may.
    fn pending_guard(self: &Arc<Self>, address: Option<IpAddr>) -> Option<PendingGuard> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = pending.values().sum();
        let mine = pending.entry(address).or_insert(0);
        if *mine >= MAX_PENDING_PER_ADDRESS || total >= (self.settings.max_viewers / 2).max(1) {
            return None;
        }
        *mine += 1;
        Some(PendingGuard {
            producer: self.clone(),
            address,
        })
    }
}

/// Keeps one session counted as waiting to connect.
struct PendingGuard {
    producer: Arc<Producer>,
    address: Option<IpAddr>,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut pending = self
            .producer
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(count) = pending.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                pending.remove(&self.address);
            }
        }
    }
}

/// Keeps one viewer counted in [`Producer::viewers`].
struct ViewerGuard(Arc<Producer>);

impl ViewerGuard {
    /// Counts the session once it is set up, not offers refused on the way.
    fn session_started(&self) {
        self.0.sessions.fetch_add(1, Ordering::Relaxed);
    }

    fn frame_sent(&self) {
        self.0.frames.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for ViewerGuard {
    fn drop(&mut self) {
        self.0.viewers.fetch_sub(1, Ordering::Relaxed);
    }
}
