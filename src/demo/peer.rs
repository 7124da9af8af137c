//! One viewer: a str0m session (ICE-lite, host candidates on the serving addresses) on its own
//! UDP socket, fed by its own render and encode pipeline, so text and speed are per viewer.
//! The session ends, and everything it holds is freed, when the browser closes the connection,
//! when nothing is heard from it for a while, when ICE fails, or when it never connects.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::change::SdpOffer;
use str0m::channel::ChannelId;
use str0m::media::{MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};
use tokio::net::UdpSocket;

use super::controls::{self, ChannelPeer, Controllable, ViewerState};
use super::encode::H264;
use super::render::{I420, TextMask};
use super::scene::Scene;
use super::{Producer, ViewerGuard};
use crate::auth::UserInfo;

/// A viewer that has not connected within this time is dropped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A connected viewer from which nothing (STUN, RTCP, data) arrives for this long is gone: a
/// closed tab or a crashed browser sends no goodbye. Browsers send RTCP and ICE checks at
/// least every few seconds, also while paused.
const SILENCE_TIMEOUT: Duration = Duration::from_secs(8);
/// A keyframe at least this often, so a viewer that lost packets recovers.
const KEYFRAME_INTERVAL: Duration = Duration::from_secs(4);
/// A viewer paused this long is closed; its page starts a new session on Start.
const PAUSE_LIMIT: Duration = Duration::from_secs(600);

/// Accepts an offer and starts the viewer; returns the SDP answer. The viewer is controlled
/// over the data channel the offer opens. `user` is who asked (for the channel's RPC context).
pub async fn start(
    producer: &Arc<Producer>,
    offer: &str,
    user: Arc<UserInfo>,
) -> Result<String, String> {
    let offer =
        SdpOffer::from_sdp_string(offer).map_err(|e| format!("the offer is not valid SDP: {e}"))?;
    if !offer.to_sdp_string().contains("m=video") {
        return Err("the offer has no video: add a receive-only video transceiver".into());
    }
    let settings = &producer.settings;
    let ip = settings
        .rtc_ips
        .first()
        .copied()
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let socket = UdpSocket::bind(SocketAddr::new(ip, 0))
        .await
        .map_err(|e| format!("cannot open a media socket: {e}"))?;
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    let mut config = Rtc::builder()
        .set_ice_lite(true)
        .clear_codecs()
        .enable_h264(true);
    if let Some(cert) = &producer.cert {
        config = config.set_dtls_cert(cert.clone());
    }
    let mut rtc = config.build(Instant::now());
    rtc.add_local_candidate(Candidate::host(local, "udp").map_err(|e| e.to_string())?);
    let answer = rtc
        .sdp_api()
        .accept_offer(offer)
        .map_err(|e| format!("cannot answer the offer: {e}"))?;
    let viewer = Viewer::new(producer, rtc, socket, local, user);
    tokio::spawn(viewer.run());
    Ok(answer.to_sdp_string())
}

struct Viewer {
    rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
    /// Freed while paused, made anew (with a keyframe) on resume.
    encoder: Option<H264>,
    bitrate: u32,
    frame: I420,
    scene: Scene,
    mask: TextMask,
    fps: u32,
    mid: Option<Mid>,
    /// The data channel the viewer opened, for the controls.
    channel: Option<ChannelId>,
    channel_peer: ChannelPeer,
    connected: bool,
    keyframe: bool,
    paused: bool,
    paused_at: Option<Instant>,
    last_heard: Instant,
    frames: u64,
    /// Frames per second actually produced, smoothed, for the overlay.
    measured_fps: f32,
    guard: ViewerGuard,
}

/// Why a viewer's session ended, for the log.
#[derive(Debug)]
enum End {
    Closed,
    IceDisconnected,
    Silent,
    NeverConnected,
    PausedTooLong,
    Failed(String),
}

impl Viewer {
    fn new(
        producer: &Arc<Producer>,
        rtc: Rtc,
        socket: UdpSocket,
        local: SocketAddr,
        user: Arc<UserInfo>,
    ) -> Self {
        let settings = &producer.settings;
        let scene = Scene::new("hypha-rtc", 240.0);
        Self {
            mask: TextMask::new(&scene.text, text_size(settings.height)),
            rtc,
            socket,
            local,
            encoder: None,
            bitrate: bitrate(settings),
            frame: I420::new(settings.width, settings.height),
            scene,
            fps: settings.fps,
            mid: None,
            channel: None,
            channel_peer: ChannelPeer::new(user),
            connected: false,
            keyframe: true,
            paused: false,
            paused_at: None,
            last_heard: Instant::now(),
            frames: 0,
            measured_fps: 0.0,
            guard: producer.viewer_guard(),
        }
    }

    async fn run(mut self) {
        let end = self.serve().await;
        self.rtc.disconnect();
        // Let the close output (DTLS close_notify) go out; best effort.
        let _ = self.drain().await;
        if let End::Failed(error) = &end {
            tracing::debug!(%error, "demo viewer session failed");
        }
        tracing::info!(frames = self.frames, reason = ?end, "demo viewer closed");
    }

    async fn serve(&mut self) -> End {
        let started = Instant::now();
        let frame_interval = Duration::from_secs_f64(1.0 / self.fps.max(1) as f64);
        let mut ticker = tokio::time::interval(frame_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last_frame = Instant::now();
        let mut last_keyframe = Instant::now();
        let mut buffer = vec![0u8; 2000];
        loop {
            let was_connected = self.connected;
            let timeout = match self.drain().await {
                Ok(timeout) => timeout,
                Err(end) => return end,
            };
            if self.connected && !was_connected {
                // The first frame goes out now, not at the next tick.
                ticker.reset_immediately();
            }
            if let Some(end) = self.expired(started) {
                return end;
            }
            let wait = timeout
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), Duration::from_secs(1));
            let sending = self.connected && self.mid.is_some() && !self.paused;
            tokio::select! {
                received = self.socket.recv_from(&mut buffer) => {
                    let Ok((n, source)) = received else { return End::Failed("socket closed".into()) };
                    let Ok(contents) = buffer[..n].try_into() else { continue };
                    self.last_heard = Instant::now();
                    let input = Input::Receive(Instant::now(), Receive { proto: Protocol::Udp, source, destination: self.local, contents });
                    if let Err(e) = self.rtc.handle_input(input) { return End::Failed(e.to_string()); }
                }
                _ = tokio::time::sleep(wait) => {
                    if let Err(e) = self.rtc.handle_input(Input::Timeout(Instant::now())) { return End::Failed(e.to_string()); }
                }
                _ = ticker.tick(), if sending => {
                    let now = Instant::now();
                    let elapsed = now.duration_since(last_frame).as_secs_f32();
                    last_frame = now;
                    if now.duration_since(last_keyframe) > KEYFRAME_INTERVAL {
                        self.keyframe = true;
                    }
                    if self.keyframe {
                        last_keyframe = now;
                    }
                    if let Err(e) = self.send_frame(elapsed, started) { return End::Failed(e); }
                    // str0m packetises written media when it next handles an input: drain after
                    // the write (one mutation at a time), then let it release the frame now
                    // rather than at its next timer, which held the stream near 18 fps.
                    if let Err(end) = self.drain().await { return end; }
                    if let Err(e) = self.rtc.handle_input(Input::Timeout(Instant::now())) { return End::Failed(e.to_string()); }
                }
            }
        }
    }

    /// Whether the session has outlived one of its limits.
    fn expired(&self, started: Instant) -> Option<End> {
        if !self.connected && started.elapsed() > CONNECT_TIMEOUT {
            return Some(End::NeverConnected);
        }
        if self.connected && self.last_heard.elapsed() > SILENCE_TIMEOUT {
            return Some(End::Silent);
        }
        if self.paused_at.is_some_and(|at| at.elapsed() > PAUSE_LIMIT) {
            return Some(End::PausedTooLong);
        }
        None
    }

    /// Drains str0m's output; returns when it next wants time, or why the session is over.
    async fn drain(&mut self) -> Result<Instant, End> {
        loop {
            match self.rtc.poll_output() {
                Ok(Output::Timeout(at)) => return Ok(at),
                Ok(Output::Transmit(t)) => {
                    let _ = self.socket.send_to(&t.contents, t.destination).await;
                }
                Ok(Output::Event(event)) => match event {
                    Event::Connected => self.connected = true,
                    Event::MediaAdded(added) if added.kind == MediaKind::Video => {
                        self.mid = Some(added.mid)
                    }
                    Event::KeyframeRequest(_) => self.keyframe = true,
                    Event::ChannelOpen(id, _) => self.channel = Some(id),
                    // Text frames are the page's JSON controls; binary frames are hypha-rpc
                    // calls to the `controls` service.
                    Event::ChannelData(data) => {
                        let reply = if data.binary {
                            controls::on_rpc(self, data.data, &self.channel_peer.clone())
                                .map(|b| (true, b.to_vec()))
                        } else {
                            Some((false, controls::on_json(self, &data.data).into_bytes()))
                        };
                        if let Some((binary, reply)) = reply
                            && let Some(mut channel) = self.rtc.channel(data.id)
                            && let Err(e) = channel.write(binary, &reply)
                        {
                            tracing::debug!(error = %e, "demo control reply not sent");
                        }
                    }
                    // The page's controls channel closing means the page is gone.
                    Event::ChannelClose(id) if Some(id) == self.channel => return Err(End::Closed),
                    Event::Closed => return Err(End::Closed),
                    Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                        return Err(End::IceDisconnected);
                    }
                    _ => {}
                },
                Err(e) => return Err(End::Failed(e.to_string())),
            }
        }
    }

    fn send_frame(&mut self, elapsed: f32, started: Instant) -> Result<(), String> {
        let room = (
            (self.frame.width.saturating_sub(self.mask.width)) as f32,
            (self.frame.height.saturating_sub(self.mask.height)) as f32,
        );
        self.scene.advance(elapsed, room);
        self.frames += 1;
        if elapsed > 0.0 {
            let rate = 1.0 / elapsed;
            self.measured_fps = if self.measured_fps == 0.0 {
                rate
            } else {
                self.measured_fps * 0.9 + rate * 0.1
            };
        }
        let overlay = TextMask::new(
            &format!(
                "#{} {}x{} {:.1} fps",
                self.frames, self.frame.width, self.frame.height, self.measured_fps
            ),
            20.0,
        );
        self.frame.draw(
            &self.mask,
            self.scene.x as usize,
            self.scene.y as usize,
            &overlay,
        );
        let encoder = match &mut self.encoder {
            Some(encoder) => encoder,
            None => {
                self.keyframe = true;
                self.encoder.insert(H264::new(self.fps, self.bitrate)?)
            }
        };
        let unit = encoder.encode(&self.frame, std::mem::take(&mut self.keyframe))?;
        let Some(mid) = self.mid else { return Ok(()) };
        let Some(writer) = self.rtc.writer(mid) else {
            return Ok(());
        };
        let Some(pt) = writer.payload_params().next().map(|p| p.pt()) else {
            return Ok(());
        };
        // RTP time from the wall clock, so pauses keep the timeline right.
        let rtp = MediaTime::new(
            (started.elapsed().as_secs_f64() * 90_000.0) as u64,
            str0m::media::Frequency::NINETY_KHZ,
        );
        writer
            .write(pt, Instant::now(), rtp, unit)
            .map_err(|e| e.to_string())?;
        self.guard.frame_sent();
        Ok(())
    }
}

impl Controllable for Viewer {
    fn set_text(&mut self, text: String) {
        self.mask = TextMask::new(&text, text_size(self.frame.height));
        self.scene.text = text;
    }

    fn set_speed(&mut self, pixels_per_second: f32) {
        self.scene.speed = pixels_per_second;
    }

    fn set_paused(&mut self, paused: bool) {
        if paused && !self.paused {
            // Stop frees the encoder; resume makes a new one and starts with a keyframe.
            self.encoder = None;
            self.paused_at = Some(Instant::now());
        }
        if !paused {
            self.paused_at = None;
            if self.paused {
                self.keyframe = true;
            }
        }
        self.paused = paused;
    }

    fn state(&self) -> ViewerState {
        ViewerState {
            text: self.scene.text.clone(),
            speed: self.scene.speed,
            paused: self.paused,
            width: self.frame.width,
            height: self.frame.height,
            frames: self.frames,
            fps: self.measured_fps,
        }
    }
}

fn text_size(height: usize) -> f32 {
    (height as f32 / 8.0).max(16.0)
}

fn bitrate(settings: &super::DemoSettings) -> u32 {
    // About 0.1 bit per pixel per frame: 2.8 Mb/s at 720p30.
    ((settings.width * settings.height) as f64 * settings.fps as f64 * 0.1) as u32
}
