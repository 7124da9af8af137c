//! One viewer: a str0m session (ICE-lite, host candidates on the serving addresses) on its own
//! UDP socket, fed by its own render and encode pipeline, so text and speed are per viewer.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use str0m::change::SdpOffer;
use str0m::media::{MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};
use tokio::net::UdpSocket;

use super::DemoSettings;
use super::encode::H264;
use super::render::{I420, TextMask};
use super::scene::Scene;

/// A viewer that has not connected within this time is dropped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A keyframe at least this often, so a viewer that lost packets recovers.
const KEYFRAME_INTERVAL: Duration = Duration::from_secs(4);

/// Accepts a browser's offer and starts the viewer; returns the SDP answer. The viewer is
/// controlled over the data channel the browser opens.
pub async fn start(settings: &DemoSettings, offer: &str) -> Result<String, String> {
    let offer =
        SdpOffer::from_sdp_string(offer).map_err(|e| format!("the offer is not valid SDP: {e}"))?;
    if !offer.to_sdp_string().contains("m=video") {
        return Err("the offer has no video: add a receive-only video transceiver".into());
    }
    let ip = settings
        .rtc_ips
        .first()
        .copied()
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let socket = UdpSocket::bind(SocketAddr::new(ip, 0))
        .await
        .map_err(|e| format!("cannot open a media socket: {e}"))?;
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    let mut rtc = Rtc::builder()
        .set_ice_lite(true)
        .clear_codecs()
        .enable_h264(true)
        .build(Instant::now());
    rtc.add_local_candidate(Candidate::host(local, "udp").map_err(|e| e.to_string())?);
    let answer = rtc
        .sdp_api()
        .accept_offer(offer)
        .map_err(|e| format!("cannot answer the offer: {e}"))?;
    let viewer = Viewer::new(settings, rtc, socket, local)?;
    tokio::spawn(viewer.run());
    Ok(answer.to_sdp_string())
}

struct Viewer {
    rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
    encoder: H264,
    frame: I420,
    scene: Scene,
    mask: TextMask,
    fps: u32,
    mid: Option<Mid>,
    connected: bool,
    keyframe: bool,
    paused: bool,
    frames: u64,
    /// Frames per second actually produced, smoothed, for the overlay.
    measured_fps: f32,
}

/// Longest text accepted from a viewer.
pub const MAX_TEXT: usize = 200;

/// A control message on the viewer's data channel: any of text, speed (pixels per second),
/// paused. The server answers each with the viewer's whole state, or an error.
#[derive(serde::Deserialize)]
struct ControlMessage {
    text: Option<String>,
    speed: Option<f64>,
    paused: Option<bool>,
}

impl Viewer {
    fn new(
        settings: &DemoSettings,
        rtc: Rtc,
        socket: UdpSocket,
        local: SocketAddr,
    ) -> Result<Self, String> {
        let scene = Scene::new("hypha-rtc", 240.0);
        Ok(Self {
            mask: TextMask::new(&scene.text, (settings.height as f32 / 8.0).max(16.0)),
            rtc,
            socket,
            local,
            encoder: H264::new(settings.fps, bitrate(settings))?,
            frame: I420::new(settings.width, settings.height),
            scene,
            fps: settings.fps,
            mid: None,
            connected: false,
            keyframe: true,
            paused: false,
            frames: 0,
            measured_fps: 0.0,
        })
    }

    async fn run(mut self) {
        let started = Instant::now();
        let frame_interval = Duration::from_secs_f64(1.0 / self.fps.max(1) as f64);
        let mut ticker = tokio::time::interval(frame_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last_frame = Instant::now();
        let mut last_keyframe = Instant::now();
        let mut buffer = vec![0u8; 2000];
        loop {
            let Some(timeout) = self.drain().await else {
                break;
            };
            if !self.connected && started.elapsed() > CONNECT_TIMEOUT {
                tracing::info!("demo viewer never connected; dropped");
                break;
            }
            let wait = timeout
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            tokio::select! {
                received = self.socket.recv_from(&mut buffer) => {
                    let Ok((n, source)) = received else { break };
                    let Ok(contents) = buffer[..n].try_into() else { continue };
                    let input = Input::Receive(Instant::now(), Receive { proto: Protocol::Udp, source, destination: self.local, contents });
                    if self.rtc.handle_input(input).is_err() { break; }
                }
                _ = tokio::time::sleep(wait) => {
                    if self.rtc.handle_input(Input::Timeout(Instant::now())).is_err() { break; }
                }
                _ = ticker.tick(), if self.connected && self.mid.is_some() && !self.paused => {
                    let now = Instant::now();
                    let elapsed = now.duration_since(last_frame).as_secs_f32();
                    last_frame = now;
                    if now.duration_since(last_keyframe) > KEYFRAME_INTERVAL {
                        self.keyframe = true;
                    }
                    if self.keyframe {
                        last_keyframe = now;
                    }
                    if self.send_frame(elapsed, started).is_err() { break; }
                    // str0m packetises written media when it next handles an input: drain after
                    // the write (one mutation at a time), then let it release the frame now
                    // rather than at its next timer, which held the stream near 18 fps.
                    if self.drain().await.is_none() { break; }
                    if self.rtc.handle_input(Input::Timeout(Instant::now())).is_err() { break; }
                }
            }
        }
        self.rtc.disconnect();
        tracing::info!(frames = self.frames, "demo viewer closed");
    }

    /// Drains str0m's output; `None` when the session is over.
    async fn drain(&mut self) -> Option<Instant> {
        loop {
            match self.rtc.poll_output() {
                Ok(Output::Timeout(at)) => return Some(at),
                Ok(Output::Transmit(t)) => {
                    let _ = self.socket.send_to(&t.contents, t.destination).await;
                }
                Ok(Output::Event(event)) => match event {
                    Event::Connected => self.connected = true,
                    Event::MediaAdded(added) if added.kind == MediaKind::Video => {
                        self.mid = Some(added.mid)
                    }
                    Event::KeyframeRequest(_) => self.keyframe = true,
                    // Text frames are controls; binary ones are the hypha-rpc client's own RPC
                    // frames, which this server does not answer on the channel yet.
                    Event::ChannelData(data) if !data.binary => {
                        let reply = self.apply(&data.data);
                        if let Some(mut channel) = self.rtc.channel(data.id) {
                            let _ = channel.write(false, reply.as_bytes());
                        }
                    }
                    Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                        return None;
                    }
                    _ => {}
                },
                Err(e) => {
                    tracing::debug!(error = %e, "demo viewer session failed");
                    return None;
                }
            }
        }
    }

    /// Applies a control message; returns the reply for the data channel.
    fn apply(&mut self, data: &[u8]) -> String {
        let message: ControlMessage = match serde_json::from_slice(data) {
            Ok(m) => m,
            Err(e) => return serde_json::json!({"ok": false, "error": format!("a control message is JSON with text, speed or paused: {e}")}).to_string(),
        };
        if let Some(text) = message.text {
            if text.chars().count() > MAX_TEXT {
                return serde_json::json!({"ok": false, "error": format!("the text has more than {MAX_TEXT} characters")}).to_string();
            }
            self.scene.text = text;
            self.mask = TextMask::new(&self.scene.text, (self.frame.height as f32 / 8.0).max(16.0));
        }
        if let Some(speed) = message.speed {
            if !speed.is_finite() {
                return serde_json::json!({"ok": false, "error": "the speed must be a number"})
                    .to_string();
            }
            self.scene.speed = (speed as f32).clamp(0.0, super::scene::MAX_SPEED);
        }
        if let Some(paused) = message.paused {
            if self.paused && !paused {
                self.keyframe = true;
            }
            self.paused = paused;
        }
        serde_json::json!({"ok": true, "text": self.scene.text, "speed": self.scene.speed, "paused": self.paused}).to_string()
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
        let unit = self
            .encoder
            .encode(&self.frame, std::mem::take(&mut self.keyframe))?;
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
            .map_err(|e| e.to_string())
    }
}

fn bitrate(settings: &DemoSettings) -> u32 {
    // About 0.1 bit per pixel per frame: 2.8 Mb/s at 720p30.
    ((settings.width * settings.height) as f64 * settings.fps as f64 * 0.1) as u32
}
