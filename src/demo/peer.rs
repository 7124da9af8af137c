//! One viewer: a str0m session (full ICE, host candidates on the serving addresses) on its own
//! UDP socket, fed by its own render and encode pipeline on a thread of its own, so text and
//! speed are per viewer and encoding never holds up the packets of any session.
//!
//! Full ICE rather than ICE-lite: Chromium nominates a pair with a lite peer only on a later
//! check of a selected, writable pair (about 50 ms after the first), but at once, on its first
//! check, with a full one; DTLS, and so the first frame, waits for that nomination. A full agent
//! probes the candidates it knows, so it is told none: the offer's are dropped, and the browser's
//! addresses are learnt from the checks that reach the server.
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
use super::encode::{Codec, EncodeError};
use super::pipeline::{EncoderSettings, FrameJob, Pipeline};
use super::render::TextMask;
use super::scene::Scene;
use super::sockets::{Datagram, Sockets};
use super::{Producer, ViewerGuard};
use crate::auth::UserInfo;
use crate::error::Error;

/// Why a frame did not reach a viewer.
#[derive(Debug, thiserror::Error)]
enum MediaError {
    #[error(transparent)]
    Encode(#[from] EncodeError),
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
/// Datagrams held while connecting because ICE did not know their sender yet. Chromium sends
/// its DTLS ClientHello as soon as our answer to its check arrives, which can be before its
/// answer to our own check: dropped, the hello came again only after DTLS's 50 ms retransmit.
const MAX_EARLY: usize = 8;
/// How long an early datagram is held before it is dropped.
const EARLY_LIMIT: Duration = Duration::from_secs(2);

/// Accepts an offer and starts the viewer; returns the SDP answer. The viewer is controlled
/// over the data channel the offer opens. `user` is who asked (for the channel's RPC context).
pub(crate) async fn start(
    producer: &Arc<Producer>,
    offer: &str,
    user: Arc<UserInfo>,
    client: Option<std::net::IpAddr>,
) -> Result<String, Error> {
    let bad = Error::BadRequest;
    let offer = SdpOffer::from_sdp_string(&without_candidates(offer)).map_err(|e| {
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
    // 5 is the id browsers offer the playout-delay extension under.
    let mut config = Rtc::builder()
        .clear_codecs()
        .set_extension(5, str0m::rtp::Extension::PlayoutDelay);
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

/// The offer without its candidates. The server learns the browser's addresses only from the
/// checks that reach it (authenticated by ICE's credentials), so it never sends a packet to an
/// address an offer merely names: with full ICE it would otherwise probe any host and port a
/// caller writes into an offer.
fn without_candidates(sdp: &str) -> String {
    sdp.split_inclusive('\n')
        .filter(|line| {
            !(line.starts_with("a=candidate:") || line.starts_with("a=end-of-candidates"))
        })
        .collect()
}

struct Viewer {
    rtc: Rtc,
    sockets: Sockets,
    /// The encoder thread; ended while paused, started anew (with a keyframe) on resume.
    pipeline: Option<Pipeline>,
    encoder: EncoderSettings,
    /// The first keyframe, made (or taken from the producer) while ICE and DTLS are still under
    /// way, so it goes out the moment the session connects.
    ready: Option<Vec<u8>>,
    /// The producer's opening keyframe this session started with, until its own encoder made
    /// its first frame (the same bytes, which are then not sent twice).
    opening: Option<Arc<[u8]>>,
    scene: Scene,
    /// The text's coverage, made once per text and shared with the encoder thread.
    mask: Arc<TextMask>,
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
    /// Frames not made because the encoder was still busy with the one before.
    skipped: u64,
    /// When the last frame was asked for: the scene moves by the time since.
    last_frame: Option<Instant>,
    /// Datagrams from senders ICE did not know yet, held (while connecting) until it does.
    early: std::collections::VecDeque<(Instant, Datagram)>,
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
            mask: Arc::new(TextMask::new(&scene.text, text_size(settings.height))),
            rtc,
            sockets,
            pipeline: None,
            encoder: EncoderSettings {
                codec: settings.codec,
                width: settings.width,
                height: settings.height,
                fps: settings.fps,
                bitrate: bitrate(settings),
            },
            ready: None,
            opening: None,
            scene,
            mid: None,
            channel: None,
            user,
            connected: false,
            keyframe: true,
            paused_at: None,
            last_heard: None,
            frames: 0,
            skipped: 0,
            last_frame: None,
            early: std::collections::VecDeque::new(),
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
        tracing::info!(frames = self.frames, skipped = self.skipped, reason = ?end, "demo viewer closed");
    }

    async fn serve(&mut self) -> End {
        let started = Instant::now();
        // The first keyframe is the producer's opening frame, if a session made it before; the
        // encoder makes it (again) while ICE and DTLS are under way.
        self.opening = self.guard.opening_frame();
        self.ready = self.opening.as_deref().map(<[u8]>::to_vec);
        if let Err(e) = self.request_frame() {
            return End::Failed(e.to_string());
        }
        let frame_interval = Duration::from_secs_f64(1.0 / self.encoder.fps.max(1) as f64);
        let mut ticker = tokio::time::interval(frame_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
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
            let encoding = self.pipeline.as_ref().is_some_and(Pipeline::busy);
            tokio::select! {
                received = self.sockets.recv() => {
                    let Some(datagram) = received else { return End::Failed("media sockets closed".into()) };
                    match self.receive(&datagram) {
                        Ok(true) => {
                            if let Err(e) = self.receive_early() { return End::Failed(e.to_string()); }
                        }
                        Ok(false) => self.hold_early(datagram),
                        Err(e) => return End::Failed(e.to_string()),
                    }
                }
                _ = tokio::time::sleep(wait) => {
                    if let Err(e) = self.rtc.handle_input(Input::Timeout(Instant::now())) { return End::Failed(e.to_string()); }
                }
                finished = finished(&mut self.pipeline), if encoding => {
                    let unit = match finished {
                        Ok(unit) => unit,
                        Err(e) => return End::Failed(e.to_string()),
                    };
                    if let Some(opening) = self.opening.take() {
                        // This encoder's first frame. The same bytes as the opening frame sent
                        // (or about to be): nothing to send. Should it ever differ, it goes
                        // out too, so the frames after it refer to a frame the browser has.
                        if *opening == *unit { continue; }
                    } else if self.frames == 1 {
                        self.guard.remember_opening_frame(&unit);
                    }
                    if sending {
                        if let Err(end) = self.send(unit, started).await { return end; }
                    } else {
                        // Made before the session connected: it goes out when it does.
                        self.ready = Some(unit);
                    }
                }
                _ = ticker.tick(), if sending => {
                    let now = Instant::now();
                    if now.duration_since(last_keyframe) > KEYFRAME_INTERVAL {
                        self.keyframe = true;
                    }
                    if self.keyframe {
                        last_keyframe = now;
                    }
                    let sent = match self.ready.take() {
                        Some(unit) => self.send(unit, started).await,
                        None => self.request_frame().map_err(|e| End::Failed(e.to_string())),
                    };
                    if let Err(end) = sent { return end; }
                }
            }
        }
    }

    /// Hands an encoded frame to str0m and lets it go out at once.
    async fn send(&mut self, unit: Vec<u8>, started: Instant) -> Result<(), End> {
        self.write(unit, started)
            .map_err(|e| End::Failed(e.to_string()))?;
        // str0m packetises written media when it next handles an input: drain after the
        // write (one mutation at a time), then let it release the frame now rather than at
        // its next timer, which held the stream near 18 fps.
        self.drain().await?;
        self.rtc
            .handle_input(Input::Timeout(Instant::now()))
            .map_err(|e| End::Failed(e.to_string()))
    }

    /// Hands a datagram to str0m if it is this session's peer's; false if ICE does not know
    /// the sender. Only this session's peer counts: a stray sender can neither keep the session
    /// alive nor feed it packets that end it.
    fn receive(&mut self, datagram: &Datagram) -> Result<bool, str0m::RtcError> {
        let Ok(contents) = datagram.data.as_slice().try_into() else {
            // Not STUN, DTLS, RTP or RTCP: nothing to hold either.
            return Ok(true);
        };
        let input = Input::Receive(
            Instant::now(),
            Receive {
                proto: Protocol::Udp,
                source: datagram.source,
                destination: datagram.destination,
                contents,
            },
        );
        if !self.rtc.accepts(&input) {
            return Ok(false);
        }
        self.last_heard = Some(Instant::now());
        self.rtc.handle_input(input)?;
        Ok(true)
    }

    /// Holds a datagram from an unknown sender while the session connects (bounded: the
    /// oldest goes first); once connected, such datagrams are dropped at once.
    fn hold_early(&mut self, datagram: Datagram) {
        if self.connected {
            return;
        }
        if self.early.len() == MAX_EARLY {
            self.early.pop_front();
        }
        self.early.push_back((Instant::now(), datagram));
    }

    /// Offers the held datagrams again, now that str0m took one that may have taught ICE
    /// their sender; those it still does not know stay, until they are too old.
    fn receive_early(&mut self) -> Result<(), str0m::RtcError> {
        if self.early.is_empty() {
            return Ok(());
        }
        for _ in 0..self.early.len() {
            let Some((held_at, datagram)) = self.early.pop_front() else {
                break;
            };
            if !self.receive(&datagram)? && held_at.elapsed() < EARLY_LIMIT && !self.connected {
                self.early.push_back((held_at, datagram));
            }
        }
        Ok(())
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

    /// Moves the scene by the time since the last frame and asks the encoder thread for the
    /// next one. A frame asked for while the last is unfinished is skipped (and counted): the
    /// stream slows down rather than queueing stale frames.
    fn request_frame(&mut self) -> Result<(), MediaError> {
        if self.pipeline.as_ref().is_some_and(Pipeline::busy) {
            self.skipped += 1;
            return Ok(());
        }
        let now = Instant::now();
        let elapsed = self
            .last_frame
            .map_or(0.0, |last| now.duration_since(last).as_secs_f32());
        self.last_frame = Some(now);
        let room = (
            (self.encoder.width.saturating_sub(self.mask.width)) as f32,
            (self.encoder.height.saturating_sub(self.mask.height)) as f32,
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
        let job = FrameJob {
            mask: self.mask.clone(),
            x: self.scene.x as usize,
            y: self.scene.y as usize,
            overlay: format!(
                "#{} {}x{} {:.1} fps",
                self.frames, self.encoder.width, self.encoder.height, self.measured_fps
            ),
            keyframe: std::mem::take(&mut self.keyframe),
        };
        let pipeline = match &mut self.pipeline {
            Some(pipeline) => pipeline,
            // A new encoder starts with a keyframe anyway.
            None => self.pipeline.insert(Pipeline::start(self.encoder)?),
        };
        pipeline.submit(job)?;
        Ok(())
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
            // Show each frame as soon as it is decoded, as remote desktops and game streaming
            // do: a live instrument's view wants the newest frame, not a smoothing buffer
            // (Chromium otherwise holds frames for its render delay, also the first one).
            .playout_delay(MediaTime::from_millis(0), MediaTime::from_millis(0))
            .write(pt, Instant::now(), rtp, unit)
            .map_err(|e| MediaError::Write(e.to_string()))?;
        self.guard.frame_sent();
        Ok(())
    }
}

impl Controllable for Viewer {
    fn set_text(&mut self, text: String) {
        self.mask = Arc::new(TextMask::new(&text, text_size(self.encoder.height)));
        self.scene.text = text;
    }

    fn set_speed(&mut self, pixels_per_second: f32) {
        self.scene.speed = pixels_per_second;
    }

    fn set_paused(&mut self, paused: bool) {
        match (paused, self.paused_at.is_some()) {
            (true, false) => {
                // Stop ends the encoder thread; resume starts a new one, with a keyframe.
                self.pipeline = None;
                self.ready = None;
                self.opening = None;
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
            width: self.encoder.width,
            height: self.encoder.height,
            frames: self.frames,
            fps: self.measured_fps,
        }
    }
}

/// The frame the encoder thread is making, once it is made; never while none is asked for.
async fn finished(pipeline: &mut Option<Pipeline>) -> Result<Vec<u8>, EncodeError> {
    match pipeline {
        Some(pipeline) => pipeline.finished().await,
        None => std::future::pending().await,
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

    /// The default settings at 160x120, for tests that need a session but hardly its video.
    fn small() -> super::super::DemoSettings {
        super::super::DemoSettings {
            width: 160,
            height: 120,
            ..super::super::default_settings()
        }
    }

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
    async fn datagrams_from_unknown_senders_are_held_only_while_connecting_and_only_a_few() {
        let producer = Producer::new(small());
        let sockets = Sockets::bind(&["127.0.0.1".parse().unwrap()])
            .await
            .unwrap();
        let guard = producer.viewer_guard(None).unwrap();
        let rtc = Rtc::builder().build(Instant::now());
        let user = Arc::new(UserInfo::http_anonymous());
        let mut viewer = Viewer::new(&producer, rtc, sockets, user, guard);
        // A DTLS record (content type 22) from a sender no ICE check came from.
        let stray = |n: u8| Datagram {
            source: "127.0.0.1:9".parse().unwrap(),
            destination: "127.0.0.1:10".parse().unwrap(),
            data: vec![22, 254, 253, 0, 0, 0, 0, 0, 0, 0, n, 0, 0],
        };
        assert!(
            !viewer.receive(&stray(0)).unwrap(),
            "a stranger's DTLS was taken"
        );
        for n in 0..100 {
            viewer.hold_early(stray(n));
        }
        assert_eq!(viewer.early.len(), MAX_EARLY);
        // The newest are kept; offered again, strangers stay strangers and stay held.
        assert_eq!(viewer.early.back().unwrap().1.data[10], 99);
        viewer.receive_early().unwrap();
        assert_eq!(viewer.early.len(), MAX_EARLY);
        // Once connected nothing is held, and what was held goes.
        viewer.connected = true;
        viewer.hold_early(stray(1));
        viewer.receive_early().unwrap();
        assert!(viewer.early.is_empty());
    }

    #[tokio::test]
    async fn the_server_sends_nothing_to_candidates_named_in_an_offer() {
        str0m::crypto::from_feature_flags().install_process_default();
        let producer = Producer::new(small());
        // A socket the offer names as the browser's candidate but that never sends a check:
        // full ICE would probe it (its first check came after about 1.3 s when the offer's
        // candidates were kept), which would let anyone aim the server's packets anywhere.
        let trap = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let named = trap.local_addr().unwrap();
        let mut client = Rtc::builder().enable_h264(true).build(Instant::now());
        client.add_local_candidate(Candidate::host(named, "udp").unwrap());
        let mut api = client.sdp_api();
        api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
        let offer = api.apply().unwrap().0.to_sdp_string();
        assert!(offer.contains("a=candidate:"), "{offer}");
        let user = Arc::new(UserInfo::http_anonymous());
        start(&producer, &offer, user, None).await.unwrap();
        let mut buf = [0u8; 1500];
        let heard = tokio::time::timeout(Duration::from_secs(3), trap.recv_from(&mut buf)).await;
        assert!(
            heard.is_err(),
            "the server sent a packet to a candidate it was only told of"
        );
    }

    #[tokio::test]
    async fn viewers_beyond_the_limit_are_refused() {
        str0m::crypto::from_feature_flags().install_process_default();
        let producer = Producer::new(super::super::DemoSettings {
            max_viewers: 1,
            ..small()
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
