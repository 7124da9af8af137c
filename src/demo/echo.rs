//! The server's own echo peer, for the connectivity doctor: a str0m session (ICE-lite, host
//! candidates on the serving addresses) with data channels only, which sends every message
//! back as it came. It proves a path end to end (through a TURN relay, or direct) and lets the
//! page time round trips and a short burst. Sessions are few, short and bounded.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::change::SdpOffer;
use str0m::channel::ChannelId;
use str0m::net::{Protocol, Receive};
use str0m::{Event, IceConnectionState, Input, Output, Rtc};

use super::Producer;
use super::sockets::Sockets;
use crate::error::Error;

/// Echo sessions alive at once, and per address.
const MAX_SESSIONS: usize = 16;
const MAX_PER_ADDRESS: usize = 4;
/// A session that has not connected by then is dropped (relays included).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest a session lives: enough for a round-trip and throughput check.
const LIFETIME: Duration = Duration::from_secs(60);
/// Nothing heard for this long once connected: the page is gone.
const SILENCE_TIMEOUT: Duration = Duration::from_secs(8);
/// Bytes of echoes waiting for room in the channel at most.
const MAX_WAITING: usize = 1024 * 1024;
/// Bytes echoed per session at most (the throughput check sends about a megabyte).
const MAX_BYTES: usize = 16 * 1024 * 1024;

/// Accepts an offer with a data channel and starts an echo session; returns the SDP answer.
pub(crate) async fn start(
    producer: &Arc<Producer>,
    offer: &str,
    client: Option<IpAddr>,
) -> Result<String, Error> {
    let bad = Error::BadRequest;
    let offer = SdpOffer::from_sdp_string(offer).map_err(|_| {
        bad("the offer is not valid SDP: it must be a session description (v=0 ...) with a data channel".into())
    })?;
    if !offer.to_sdp_string().contains("m=application") {
        return Err(bad(
            "the offer has no data channel: create one before the offer".into(),
        ));
    }
    let slot = producer.echoes.take(client, MAX_PER_ADDRESS, MAX_SESSIONS).ok_or_else(|| {
        Error::TooManyRequests(format!(
            "too many connectivity checks at once (at most {MAX_SESSIONS}, {MAX_PER_ADDRESS} per address); try again in a minute"
        ))
    })?;
    let settings = &producer.settings;
    let sockets = Sockets::bind(&settings.rtc_ips)
        .await
        .map_err(|e| Error::Internal(format!("cannot open a socket: {e}")))?;
    let mut config = Rtc::builder().set_ice_lite(true);
    if let Some(cert) = producer.cert() {
        config = config.set_dtls_cert(cert);
    }
    let mut rtc = config.build(Instant::now());
    super::add_host_candidates(&mut rtc, &sockets, settings.rtc_public_ip)?;
    let answer = rtc.sdp_api().accept_offer(offer).map_err(|_| {
        bad("cannot answer the offer: it needs ICE credentials, a DTLS fingerprint and a data channel".into())
    })?;
    tokio::spawn(run(rtc, sockets, slot));
    Ok(answer.to_sdp_string())
}

async fn run(mut rtc: Rtc, mut sockets: Sockets, _slot: super::Counted) {
    let started = Instant::now();
    let mut connected = false;
    let mut last_heard: Option<Instant> = None;
    let mut echoed = 0usize;
    // Echoes the channel had no room for yet, oldest first.
    let mut waiting: VecDeque<(ChannelId, bool, Vec<u8>)> = VecDeque::new();
    let mut waiting_bytes = 0usize;
    let end = loop {
        while let Some((id, binary, data)) = waiting.front() {
            let Some(mut channel) = rtc.channel(*id) else {
                if let Some((_, _, data)) = waiting.pop_front() {
                    waiting_bytes -= data.len();
                }
                continue;
            };
            let sent = match channel.write(*binary, data) {
                Ok(true) => true,
                Ok(false) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "an echo was not sent");
                    true
                }
            };
            if sent && let Some((_, _, data)) = waiting.pop_front() {
                waiting_bytes -= data.len();
            }
        }
        let timeout = loop {
            match rtc.poll_output() {
                Ok(Output::Timeout(at)) => break Ok(at),
                Ok(Output::Transmit(t)) => sockets.send(t.source, t.destination, &t.contents).await,
                Ok(Output::Event(event)) => match event {
                    Event::Connected => connected = true,
                    Event::ChannelData(data) => {
                        echoed += data.data.len();
                        if echoed > MAX_BYTES {
                            break Err("the echo limit was reached");
                        }
                        waiting_bytes += data.data.len();
                        waiting.push_back((data.id, data.binary, data.data));
                        if waiting_bytes > MAX_WAITING {
                            break Err("the page sends faster than it reads its echoes");
                        }
                    }
                    Event::Closed => break Err("closed"),
                    Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                        break Err("disconnected");
                    }
                    _ => {}
                },
                Err(e) => {
                    tracing::debug!(error = %e, "echo session failed");
                    break Err("failed");
                }
            }
        };
        let timeout = match timeout {
            Ok(at) => at,
            Err(why) => break why,
        };
        if !connected && started.elapsed() > CONNECT_TIMEOUT {
            break "never connected";
        }
        if started.elapsed() > LIFETIME {
            break "lived its time";
        }
        if last_heard.is_some_and(|h| h.elapsed() > SILENCE_TIMEOUT) {
            break "silent";
        }
        // Echoes waiting for room are tried again soon (str0m frees room as data is acked).
        let longest = if waiting.is_empty() {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(2)
        };
        let wait = timeout
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(1), longest);
        tokio::select! {
            received = sockets.recv() => {
                let Some(datagram) = received else { break "sockets closed" };
                let Ok(contents) = datagram.data.as_slice().try_into() else { continue };
                let input = Input::Receive(Instant::now(), Receive { proto: Protocol::Udp, source: datagram.source, destination: datagram.destination, contents });
                if !rtc.accepts(&input) { continue; }
                last_heard = Some(Instant::now());
                if rtc.handle_input(input).is_err() { break "failed"; }
            }
            _ = tokio::time::sleep(wait) => {
                if rtc.handle_input(Input::Timeout(Instant::now())).is_err() { break "failed"; }
            }
        }
    };
    if rtc.close().is_ok() {
        // The close reaches the page at once (best effort).
        while let Ok(Output::Transmit(t)) = rtc.poll_output() {
            sockets.send(t.source, t.destination, &t.contents).await;
        }
    }
    tracing::debug!(reason = end, bytes = echoed, "echo session ended");
}
