//! One viewer: a str0m session (ICE-lite, host candidates on the serving addresses) on its own
//! UDP socket, fed by its own render and encode pipeline, so text and speed are per viewer.
//! The session ends, and everything it holds is freed, when the browser closes the connection,
//! when nothing is heard from it for a while, when ICE fails, or when it never connects.

use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::change::SdpOffer;
use str0m::channel::ChannelId;
use str0m::media::{MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Event, IceConnectionState, Input, Output, Rtc};

use super::controls::{self, Controllable, ViewerState};
use super::encode::{Codec, VideoEncoder};
use super::render::{I420, TextMask};
use super::scene::Scene;
use super::sockets::Sockets;
use super::{Producer, ViewerGuard};
use crate::auth::UserInfo;
use crate::error::Error;

/// Why a frame did not reach a viewer.
#[derive(Debug, thiserror::Error)]
enum MediaError {
    #[error(transparent)]
    Encode(#[from] super::encode::EncodeError),
    #[error("cannot write the frame: {0}")]
    Write(String),
}

/// A session that has not connected within this time is dropped (slow relays included: ICE
/// through TURN completes within a few seconds).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A viewer from which nothing (STUN, DTLS, RTCP, data) has arrived for this long, once
/// something had, is gone: a closed tab, a connection closed before DTLS completed, or a
/// crashed browser sends no goodbye. Browsers send RTCP and ICE checks at least every few
/// seconds, also while paused.
const SILENCE_TIMEOUT: Duration = Duration::from_secs(8);
/// A keyframe at least this often, so a viewer that lost packets recovers.
const KEYFRAME_INTERVAL: Duration = Duration::from_secs(4);
/// A viewer paused this long is closed; its page starts a new session on Start.
const PAUSE_LIMIT: Duration = Duration::from_secs(600);

/// Accepts an offer and starts the viewer; returns the SDP answer. The viewer is controlled
/// over the data channel the offer opens. `user` is who asked (for the channel's RPC context).
pub(crate) async fn start(
    producer: &Arc<Producer>,
    offer: &str,
    user: Arc<UserInfo>,
    client: Option<std::net::IpAddr>,
) -> Result<String, Error> {
    let bad = Error::BadRequest;
    let offer = SdpOffer::from_sdp_string(offer).map_err(|e| {
        tracing::debug!(error = %e, "an offer that is not SDP");
        bad("the offer is not valid SDP: it must be a session description (v=0 ...) with an m=video section".into())
    })?;
    if !offer.to_sdp_string().contains("m=video") {
        return Err(bad(
            "the offer has no video: add a receive-only video transceiver".into(),
        ));
    }
    let settings = &producer.settings;
    let guard = producer.viewer_guard(client).ok_or_else(|| {
        Error::Unavailable(format!(
            "the demo already has {} viewers, the most it takes (one address may have at most {}): try again later",
            settings.max_viewers,
            (settings.max_viewers / 2).max(1)
        ))
    })?;
    let pending = producer.pending_guard(client).ok_or_else(|| {
        Error::TooManyRequests(format!(
            "too many demo sessions are waiting to connect (at most {} per address); connect or wait {} s",
            super::MAX_PENDING_PER_ADDRESS,
            CONNECT_TIMEOUT.as_secs()
        ))
    })?;
    let sockets = Sockets::bind(&settings.rtc_ips)
        .await
        .map_err(|e| Error::Internal(format!("cannot open a media socket: {e}")))?;
    let mut config = Rtc::builder().set_ice_lite(true).clear_codecs();
    config = match settings.codec {
        Codec::H264 => config.enable_h264(true),
        Codec::Vp8 => config.enable_vp8(true),
    };
    if let Some(cert) = producer.cert() {
        config = config.set_dtls_cert(cert);
    }
    let mut rtc = config.build(Instant::now());
    super::add_host_candidates(&mut rtc, &sockets, settings.rtc_public_ip)?;
    let answer = rtc
        .sdp_api()
        .accept_offer(offer)
        .map_err(|e| {
            tracing::debug!(error = %e, "an offer that cannot be answered");
            bad("cannot answer the offer: it asks for something this server does not support (it needs ICE credentials, a DTLS fingerprint and a video section)".into())
        })?;
    let answer = answer.to_sdp_string();
    let (name, wanted) = match settings.codec {
        Codec::H264 => (
            "H264/90000",
            "H.264 (Constrained Baseline, packetization-mode 1)",
        ),
        Codec::Vp8 => ("VP8/90000", "VP8"),
    };
    if !answer.contains(name) {
        return Err(bad(format!(
            "the offer has no {wanted}, which this server streams"
        )));
    }
    guard.session_started();
    let mut viewer = Viewer::new(producer, rtc, sockets, user, guard);
    viewer.pending = Some(pending);
    tokio::spawn(viewer.run());
    Ok(answer)
}

struct Viewer {
    rtc: Rtc,
    sockets: Sockets,
    /// Freed while paused, made anew (with a keyframe) on resume.
    encoder: Option<VideoEncoder>,
    codec: Codec,
    /// The first keyframe, encoded while ICE and DTLS are still under way, so it goes out the
    /// moment the session connects.
    ready: Option<Vec<u8>>,
    bitrate: u32,
    frame: I420,
    scene: Scene,
    mask: TextMask,
    fps: u32,
    mid: Option<Mid>,
    /// The data channel the viewer opened, for the controls.
    channel: Option<ChannelId>,
    /// Who asked for the session: the context of calls on its data channel.
    user: Arc<UserInfo>,
    connected: bool,
    keyframe: bool,
    /// Since when the viewer is paused; `None` while it plays.
    paused_at: Option<Instant>,
    /// When the browser was last heard from; `None` before its first packet.
    last_heard: Option<Instant>,
    frames: u64,
    /// Counts the session as waiting to connect until it connects.
    pending: Option<super::Counted>,
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
        sockets: Sockets,
        user: Arc<UserInfo>,
        guard: ViewerGuard,
    ) -> Self {
        let settings = &producer.settings;
        let scene = Scene::new("hypha-rtc", 240.0);
        Self {
            mask: TextMask::new(&scene.text, text_size(settings.height)),
            rtc,
            sockets,
            encoder: None,
            codec: settings.codec,
            ready: None,
            bitrate: bitrate(settings),
            frame: I420::new(settings.width, settings.height),
            scene,
            fps: settings.fps,
            mid: None,
            channel: None,
            user,
            connected: false,
            keyframe: true,
            paused_at: None,
            last_heard: None,
            frames: 0,
            pending: None,
            measured_fps: 0.0,
            guard,
        }
    }

    async fn run(mut self) {
        let end = self.serve().await;
        // RTCP BYE and DTLS close_notify tell the browser at once; best effort, bounded.
        if self.rtc.close().is_ok() {
            for _ in 0..4 {
                if !self.rtc.is_alive() || self.drain().await.is_err() {
                    break;
                }
                let _ = self.rtc.handle_input(Input::Timeout(Instant::now()));
            }
        }
        if let End::Failed(error) = &end {
            tracing::debug!(%error, "demo viewer session failed");
        }
        tracing::info!(frames = self.frames, reason = ?end, "demo viewer closed");
    }

    async fn serve(&mut self) -> End {
        let started = Instant::now();
        match self.encode_next(0.0) {
            Ok(unit) => self.ready = Some(unit),
            Err(e) => return End::Failed(e.to_string()),
        }
        let frame_interval = Duration::from_secs_f64(1.0 / self.fps.max(1) as f64);
        let mut ticker = tokio::time::interval(frame_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last_frame = Instant::now();
        let mut last_keyframe = Instant::now();
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
            let sending = self.connected && self.mid.is_some() && self.paused_at.is_none();
            tokio::select! {
                received = self.sockets.recv() => {
                    let Some(datagram) = received else { return End::Failed("media sockets closed".into()) };
                    let Ok(contents) = datagram.data.as_slice().try_into() else { continue };
                    let input = Input::Receive(Instant::now(), Receive { proto: Protocol::Udp, source: datagram.source, destination: datagram.destination, contents });
                    // Only this session's peer counts: a stray sender can neither keep it alive
                    // nor feed it packets that end it.
                    if !self.rtc.accepts(&input) { continue; }
                    self.last_heard = Some(Instant::now());
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
                    if let Err(e) = self.send_frame(elapsed, started) { return End::Failed(e.to_string()); }
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
        if self
            .last_heard
            .is_some_and(|heard| heard.elapsed() > SILENCE_TIMEOUT)
        {
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
                    self.sockets
                        .send(t.source, t.destination, &t.contents)
                        .await;
                }
                Ok(Output::Event(event)) => match event {
                    Event::Connected => {
                        self.connected = true;
                        self.pending = None;
                    }
                    Event::MediaAdded(added) if added.kind == MediaKind::Video => {
                        self.mid = Some(added.mid)
                    }
                    Event::KeyframeRequest(_) => self.keyframe = true,
                    Event::ChannelOpen(id, _) => self.channel = Some(id),
                    // Text frames are the page's JSON controls; binary frames are hypha-rpc
                    // calls to the `controls` service.
                    Event::ChannelData(data) => {
                        let reply = if data.binary {
                            let user = self.user.clone();
                            controls::on_rpc(self, data.data, &user).map(|b| (true, b.to_vec()))
                        } else {
                            Some((false, controls::on_json(self, &data.data).into_bytes()))
                        };
                        if let Some((binary, reply)) = reply
                            && let Some(mut channel) = self.rtc.channel(data.id)
                        {
                            match channel.write(binary, &reply) {
                                Ok(true) => {}
                                Ok(false) => tracing::debug!(
                                    "demo control reply dropped: the channel's buffer is full"
                                ),
                                Err(e) => {
                                    tracing::debug!(error = %e, "demo control reply not sent")
                                }
                            }
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

    /// Sends the next frame: the one encoded ahead, if any, or a new one.
    fn send_frame(&mut self, elapsed: f32, started: Instant) -> Result<(), MediaError> {
        let unit = match self.ready.take() {
            Some(unit) => unit,
            None => self.encode_next(elapsed)?,
        };
        self.write(unit, started)
    }

    /// Moves the scene by `elapsed` seconds, renders it and encodes it.
    fn encode_next(&mut self, elapsed: f32) -> Result<Vec<u8>, MediaError> {
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
                let encoder = VideoEncoder::new(self.codec, &self.frame, self.fps, self.bitrate)?;
                self.encoder.insert(encoder)
            }
        };
        Ok(encoder.encode(&self.frame, std::mem::take(&mut self.keyframe))?)
    }

    /// Hands an encoded frame to str0m, stamped with the wall clock.
    fn write(&mut self, unit: Vec<u8>, started: Instant) -> Result<(), MediaError> {
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
            .map_err(|e| MediaError::Write(e.to_string()))?;
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
        match (paused, self.paused_at.is_some()) {
            (true, false) => {
                // Stop frees the encoder; resume makes a new one and starts with a keyframe.
                self.encoder = None;
                self.ready = None;
                self.paused_at = Some(Instant::now());
            }
            (false, true) => {
                self.paused_at = None;
                self.keyframe = true;
            }
            _ => {}
        }
    }

    fn state(&self) -> ViewerState {
        ViewerState {
            text: self.scene.text.clone(),
            speed: self.scene.speed,
            paused: self.paused_at.is_some(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use str0m::Candidate;
    use str0m::change::SdpAnswer;
    use str0m::media::Direction;

    /// A str0m client on loopback: offers receive-only video and a data channel, reads media
    /// until `frames` packets came, then closes gracefully. Returns the media packets seen.
    async fn view(producer: &Arc<Producer>, packets: usize) -> usize {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let local = sock.local_addr().unwrap();
        let mut client = Rtc::builder()
            .clear_codecs()
            .enable_h264(true)
            .enable_vp8(true)
            .build(Instant::now());
        client.add_local_candidate(Candidate::host(local, "udp").unwrap());
        let mut api = client.sdp_api();
        api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
        api.add_channel("controls".into());
        let (offer, pending) = api.apply().unwrap();
        let user = Arc::new(UserInfo::http_anonymous());
        let answer = start(producer, &offer.to_sdp_string(), user, None)
            .await
            .unwrap();
        let answer = SdpAnswer::from_sdp_string(&answer).unwrap();
        client.sdp_api().accept_answer(pending, answer).unwrap();
        let mut media = 0;
        let mut buf = vec![0u8; 2000];
        let deadline = Instant::now() + Duration::from_secs(10);
        while media < packets && Instant::now() < deadline {
            let timeout = loop {
                match client.poll_output().unwrap() {
                    Output::Timeout(t) => break t,
                    Output::Transmit(t) => {
                        let _ = sock.send_to(&t.contents, t.destination).await;
                    }
                    Output::Event(Event::MediaData(_)) => media += 1,
                    Output::Event(_) => {}
                }
            };
            let wait = timeout
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), Duration::from_millis(50));
            tokio::select! {
                r = sock.recv_from(&mut buf) => {
                    let (n, source) = r.unwrap();
                    let contents = buf[..n].try_into().unwrap();
                    let input = Input::Receive(Instant::now(), Receive { proto: Protocol::Udp, source, destination: local, contents });
                    client.handle_input(input).unwrap();
                }
                _ = tokio::time::sleep(wait) => client.handle_input(Input::Timeout(Instant::now())).unwrap(),
            }
        }
        // close() queues the DTLS close_notify; send what it produced.
        client.close().unwrap();
        for _ in 0..4 {
            while let Ok(out) = client.poll_output() {
                match out {
                    Output::Transmit(t) => {
                        let _ = sock.send_to(&t.contents, t.destination).await;
                    }
                    Output::Timeout(_) => break,
                    Output::Event(_) => {}
                }
            }
            let _ = client.handle_input(Input::Timeout(Instant::now()));
        }
        media
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_session_streams_and_ends_when_the_client_closes() {
        str0m::crypto::from_feature_flags().install_process_default();
        let producer = Producer::new(super::super::DemoSettings {
            width: 320,
            height: 240,
            ..super::super::default_settings()
        });
        for round in 1..=3 {
            assert!(view(&producer, 10).await >= 10, "no video in round {round}");
            let t = Instant::now();
            while producer.viewers() > 0 && t.elapsed() < Duration::from_secs(3) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(
                producer.viewers(),
                0,
                "the viewer outlived its client's close"
            );
        }
        assert_eq!(producer.sessions(), 3);
        assert!(producer.frames() >= 3);
    }

    #[cfg(feature = "vp8")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_vp8_session_streams() {
        str0m::crypto::from_feature_flags().install_process_default();
        let producer = Producer::new(super::super::DemoSettings {
            width: 320,
            height: 240,
            codec: Codec::Vp8,
            ..super::super::default_settings()
        });
        assert!(view(&producer, 10).await >= 10);
    }

    #[tokio::test]
    async fn viewers_beyond_the_limit_are_refused() {
        str0m::crypto::from_feature_flags().install_process_default();
        let producer = Producer::new(super::super::DemoSettings {
            width: 160,
            height: 120,
            max_viewers: 1,
            ..super::super::default_settings()
        });
        let offer = || {
            let mut client = Rtc::builder().enable_h264(true).build(Instant::now());
            let mut api = client.sdp_api();
            api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
            api.apply().unwrap().0.to_sdp_string()
        };
        let user = Arc::new(UserInfo::http_anonymous());
        start(&producer, &offer(), user.clone(), None)
            .await
            .unwrap();
        let err = start(&producer, &offer(), user, None).await.unwrap_err();
        assert!(matches!(err, Error::Unavailable(_)), "{err}");
        assert!(err.to_string().contains("1 viewers"), "{err}");
        assert_eq!((producer.viewers(), producer.sessions()), (1, 1));
    }

    #[tokio::test]
    async fn bad_offers_are_refused_without_a_session() {
        let producer = Producer::new(super::super::default_settings());
        let user = Arc::new(UserInfo::http_anonymous());
        let err = start(&producer, "v=0 nonsense", user, None)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not valid SDP"), "{err}");
        assert_eq!(producer.sessions(), 0);
    }
}
