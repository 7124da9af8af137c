//! The built-in video producer: scene (text animation), render (text into I420), encode
//! (H.264; VP8 with the `vp8` feature), peer (one str0m session per viewer), controls (what a viewer may change, from the
//! page's JSON or as a hypha-rpc service on the data channel). The page is served by `http::demo`.

pub(crate) mod addresses;
pub(crate) mod controls;
pub(crate) mod echo;
pub(crate) mod encode;
pub(crate) mod peer;
pub(crate) mod pipeline;
pub(crate) mod render;
pub(crate) mod scene;
pub(crate) mod sockets;
#[cfg(feature = "vp8")]
pub(crate) mod vp8;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus_client::metrics::counter::Counter;

use str0m::config::DtlsCert;

/// The demo's options.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoOptions {
    /// Turn off the built-in video producer (/demo/)
    #[arg(long, env = "HYPHA_NO_DEMO")]
    pub no_demo: bool,
    /// Size of the demo video, WIDTHxHEIGHT, even numbers
    #[arg(
        long,
        env = "HYPHA_DEMO_RESOLUTION",
        value_name = "WxH",
        default_value = "1280x720"
    )]
    pub demo_resolution: String,
    /// Frames per second of the demo video, 1 to 60
    #[arg(long, env = "HYPHA_DEMO_FPS", value_name = "FPS", default_value_t = 30)]
    pub demo_fps: u32,
    /// Most demo viewers at once; more are refused until one leaves
    #[arg(
        long,
        env = "HYPHA_DEMO_MAX_VIEWERS",
        value_name = "COUNT",
        default_value_t = 16
    )]
    pub demo_max_viewers: u32,
    /// Codec of the demo video: h264, or vp8 in builds with the vp8 feature
    #[arg(
        long,
        env = "HYPHA_DEMO_CODEC",
        value_name = "CODEC",
        default_value = "h264"
    )]
    pub demo_codec: String,
    /// Address the demo's media sockets bind to and advertise as a host candidate, repeatable (HYPHA_RTC_IP: several, separated by commas or spaces) [default: --host if it is one address; with 0.0.0.0 or ::, this machine's interface addresses]
    #[arg(long, env = "HYPHA_RTC_IP", value_name = "IP", value_delimiter = ',')]
    pub rtc_ip: Vec<String>,
    /// Public address that a 1:1 NAT maps onto the first --rtc-ip, advertised as well (cloud machines)
    #[arg(long, env = "HYPHA_RTC_PUBLIC_IP", value_name = "IP")]
    pub rtc_public_ip: Option<String>,
}

impl DemoOptions {
    /// Validates the options; `host` is where the server listens (the default media address).
    pub(crate) fn settings(
        &self,
        host: &str,
    ) -> Result<DemoSettings, crate::options::SettingsError> {
        use crate::options::{SettingsError, option_name};
        let resolution = self.demo_resolution.trim();
        let parsed = resolution
            .split_once(['x', 'X'])
            .and_then(|(w, h)| Some((w.parse::<usize>().ok()?, h.parse::<usize>().ok()?)))
            .filter(|(w, h)| {
                (160..=3840).contains(w) && (120..=2160).contains(h) && w % 2 == 0 && h % 2 == 0
            });
        let Some((width, height)) = parsed else {
            return Err(SettingsError::new(format!(
                "{}: {resolution:?} is not WIDTHxHEIGHT with even numbers from 160x120 to 3840x2160 (e.g. 1280x720)",
                option_name("demo-resolution")
            )));
        };
        if !(1..=60).contains(&self.demo_fps) {
            return Err(SettingsError::new(format!(
                "{}: must be from 1 to 60",
                option_name("demo-fps")
            )));
        }
        let codec = encode::Codec::parse(&self.demo_codec)
            .map_err(|e| SettingsError::new(format!("{}: {e}", option_name("demo-codec"))))?;
        let listed = self
            .rtc_ip
            .iter()
            .flat_map(|s| s.split([' ', ',']))
            .filter(|s| !s.is_empty())
            .map(|ip| unicast_ip(ip, "rtc-ip"))
            .collect::<Result<Vec<_>, _>>()?;
        let explicit = !listed.is_empty();
        let rtc_ips = if explicit {
            listed
        } else {
            addresses::automatic(host)
        };
        let rtc_public_ip = self
            .rtc_public_ip
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(|ip| unicast_ip(ip, "rtc-public-ip"))
            .transpose()?;
        if rtc_public_ip.is_some() && !explicit {
            return Err(SettingsError::new(format!(
                "{}: also give --rtc-ip, the private address the NAT maps it onto",
                option_name("rtc-public-ip")
            )));
        }
        if let Some(public) = rtc_public_ip
            && !rtc_ips.iter().any(|ip| ip.is_ipv4() == public.is_ipv4())
        {
            return Err(SettingsError::new(format!(
                "{}: {public} needs an --rtc-ip of the same IP version to map onto",
                option_name("rtc-public-ip")
            )));
        }
        Ok(DemoSettings {
            enabled: !self.no_demo,
            width,
            height,
            fps: self.demo_fps,
            max_viewers: self.demo_max_viewers as usize,
            codec,
            rtc_ips,
            rtc_public_ip,
        })
    }
}

/// The defaults of the demo's options (for tests).
#[cfg(test)]
pub(crate) fn default_settings() -> DemoSettings {
    use clap::Parser;
    #[derive(Parser)]
    struct Only {
        #[command(flatten)]
        demo: DemoOptions,
    }
    match Only::parse_from(["demo"]).demo.settings("127.0.0.1") {
        Ok(settings) => settings,
        Err(e) => unreachable!("the demo's defaults are valid: {e}"),
    }
}

/// A unicast address for a media option, or an error naming the option.
fn unicast_ip(text: &str, option: &str) -> Result<IpAddr, crate::options::SettingsError> {
    text.parse::<IpAddr>()
        .ok()
        .filter(|ip| !ip.is_unspecified() && !ip.is_multicast())
        .ok_or_else(|| {
            crate::options::SettingsError::new(format!(
                "{}: {text:?} is not a unicast IP address",
                crate::options::option_name(option)
            ))
        })
}

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

/// The running producer: its settings, the DTLS certificate every viewer's session shares
/// (generating one per session costs time at every Start), and live figures for `/metrics`.
pub struct Producer {
    pub settings: DemoSettings,
    /// Made on a thread of its own at start-up, so start-up does not wait for it (it takes
    /// tens of milliseconds); a session that comes before it makes its own.
    cert: Arc<std::sync::OnceLock<DtlsCert>>,
    viewers: AtomicUsize,
    /// Sessions not connected yet, by the address that asked for them.
    pending: Arc<Counts>,
    /// The connectivity doctor's echo sessions, by the address that asked for them.
    pub(crate) echoes: Arc<Counts>,
    /// Sessions alive, by the address that asked for them.
    live: std::sync::Mutex<std::collections::HashMap<Option<IpAddr>, usize>>,
    /// Frames sent to all viewers, and viewer sessions started (shared with the metrics).
    pub frames: Counter,
    pub sessions: Counter,
    /// The keyframe every viewer's stream opens with. Every session starts from the same
    /// scene with the same encoder settings, and the encoders are deterministic, so it is the
    /// same bytes each time: the first session's encoder makes it, later sessions send it the
    /// moment they connect while their own encoder makes the same frame to go on from.
    opening: std::sync::OnceLock<Arc<[u8]>>,
}

impl Producer {
    pub(crate) fn new(settings: DemoSettings) -> Arc<Self> {
        let cert = Arc::new(std::sync::OnceLock::new());
        if settings.enabled {
            let slot = cert.clone();
            let made = std::thread::Builder::new()
                .name("demo-dtls-cert".into())
                .spawn(move || {
                    if let Some(made) = str0m::crypto::from_feature_flags()
                        .dtls_provider
                        .generate_certificate()
                    {
                        let _ = slot.set(made);
                    }
                });
            if let Err(e) = made {
                tracing::warn!(error = %e, "the demo's certificate is made per session");
            }
        }
        Arc::new(Self {
            settings,
            cert,
            viewers: AtomicUsize::new(0),
            pending: Default::default(),
            echoes: Default::default(),
            live: Default::default(),
            frames: Counter::default(),
            sessions: Counter::default(),
            opening: std::sync::OnceLock::new(),
        })
    }

    /// The shared DTLS certificate, once made.
    pub(crate) fn cert(&self) -> Option<DtlsCert> {
        self.cert.get().cloned()
    }

    /// Viewers whose session is alive now.
    pub(crate) fn viewers(&self) -> usize {
        self.viewers.load(Ordering::Relaxed)
    }

    /// Frames sent to all viewers since start-up.
    #[cfg(test)]
    pub(crate) fn frames(&self) -> u64 {
        self.frames.get()
    }

    /// Viewer sessions started since start-up.
    #[cfg(test)]
    pub(crate) fn sessions(&self) -> u64 {
        self.sessions.get()
    }

    /// Counts a viewer for as long as the returned guard lives; `None` when the producer
    /// already has `max_viewers`, so a flood of offers cannot take every core and socket.
    fn viewer_guard(self: &Arc<Self>, address: Option<IpAddr>) -> Option<ViewerGuard> {
        let max = self.settings.max_viewers;
        let address = address.map(crate::net::client_addr::address_key);
        // One remote address may hold half the viewer slots, so it cannot lock others out
        // (this machine's own viewers, benchmarks and checks, are held to the total only).
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mine = live.get(&address).copied().unwrap_or(0);
        let remote = address.is_some_and(|ip| !ip.is_loopback());
        if remote && mine >= (max / 2).max(1) {
            return None;
        }
        self.viewers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        live.insert(address, mine + 1);
        Some(ViewerGuard(self.clone(), address))
    }
}

/// Advertises the sockets' addresses as host candidates of `rtc`, and the 1:1 NAT's
/// public address when one is set: behind such a NAT the public address maps onto the bound
/// one, port for port, so it goes on the port of the first socket of its family, and what
/// arrives through the NAT lands on that socket.
pub(crate) fn add_host_candidates(
    rtc: &mut str0m::Rtc,
    sockets: &sockets::Sockets,
    public_ip: Option<IpAddr>,
) -> Result<(), crate::error::Error> {
    let internal = |e: str0m::error::IceError| crate::error::Error::Internal(e.to_string());
    let locals = sockets.local_addrs();
    for local in &locals {
        rtc.add_local_candidate(str0m::Candidate::host(*local, "udp").map_err(internal)?);
    }
    if let Some(public) = public_ip
        && let Some(base) = locals.iter().find(|a| a.is_ipv4() == public.is_ipv4())
    {
        let candidate =
            str0m::Candidate::host(std::net::SocketAddr::new(public, base.port()), "udp")
                .map_err(internal)?;
        rtc.add_local_candidate(candidate);
    }
    Ok(())
}

/// Sessions one address may have waiting to connect: offers that never connect cannot take
/// every viewer slot.
pub(crate) const MAX_PENDING_PER_ADDRESS: usize = 4;

impl Producer {
    /// Counts a session waiting to connect for `address` until the returned guard is
    /// dropped; `None` when the address, or all addresses together (half the viewer slots),
    /// already have as many as they may.
    fn pending_guard(&self, address: Option<IpAddr>) -> Option<Counted> {
        self.pending.take(
            address,
            MAX_PENDING_PER_ADDRESS,
            (self.settings.max_viewers / 2).max(1),
        )
    }
}

/// Sessions counted per address (its key: IPv6 by /64), with a limit per address and in all.
#[derive(Default)]
pub(crate) struct Counts(std::sync::Mutex<std::collections::HashMap<Option<IpAddr>, usize>>);

impl Counts {
    /// Counts one for `address` until the returned guard is dropped; `None` past either limit.
    pub(crate) fn take(
        self: &Arc<Self>,
        address: Option<IpAddr>,
        per_address: usize,
        total: usize,
    ) -> Option<Counted> {
        let address = address.map(crate::net::client_addr::address_key);
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let all: usize = counts.values().sum();
        let mine = counts.entry(address).or_insert(0);
        if *mine >= per_address || all >= total {
            if *mine == 0 {
                counts.remove(&address);
            }
            return None;
        }
        *mine += 1;
        Some(Counted {
            counts: self.clone(),
            address,
        })
    }
}

/// Keeps one session counted in its [`Counts`].
pub(crate) struct Counted {
    counts: Arc<Counts>,
    address: Option<IpAddr>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.address);
            }
        }
    }
}

/// Keeps one viewer counted in [`Producer::viewers`].
struct ViewerGuard(Arc<Producer>, Option<IpAddr>);

impl ViewerGuard {
    /// Counts the session once it is set up, not offers refused on the way.
    fn session_started(&self) {
        self.0.sessions.inc();
    }

    fn frame_sent(&self) {
        self.0.frames.inc();
    }

    /// The opening keyframe, once a session made it.
    fn opening_frame(&self) -> Option<Arc<[u8]>> {
        self.0.opening.get().cloned()
    }

    /// Keeps a session's first frame as the opening keyframe (the first one kept stays).
    fn remember_opening_frame(&self, unit: &[u8]) {
        let _ = self.0.opening.set(unit.into());
    }
}

impl Drop for ViewerGuard {
    fn drop(&mut self) {
        self.0.viewers.fetch_sub(1, Ordering::Relaxed);
        let mut live = self.0.live.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = live.get_mut(&self.1) {
            *count -= 1;
            if *count == 0 {
                live.remove(&self.1);
            }
        }
    }
}
