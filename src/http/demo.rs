//! `/demo/`: Start and Stop, a text box, a speed slider, the video and a line of live stats;
//! `POST /demo/offer` answers the page's offer.

use std::sync::{Arc, LazyLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use crate::AppState;

pub(crate) fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/demo/", get(page))
        .route("/demo/offer", post(offer))
}

#[derive(Deserialize)]
pub(crate) struct Offer {
    sdp: String,
    #[serde(rename = "type")]
    kind: String,
}

/// A JSON refusal with the status that goes with it.
pub(crate) fn refuse(status: StatusCode, detail: String) -> Response {
    (status, Json(serde_json::json!({ "detail": detail }))).into_response()
}

/// The SDP of a page's `{"sdp": ..., "type": "offer"}` body, or the refusal (400) that says
/// what is wrong with it.
pub(crate) fn offer_sdp(
    body: Result<Json<Offer>, axum::extract::rejection::JsonRejection>,
) -> Result<String, Box<Response>> {
    let offer = match body {
        Ok(Json(offer)) => offer,
        Err(e) => {
            return Err(Box::new(refuse(
                StatusCode::BAD_REQUEST,
                format!(
                    "the body must be JSON {{\"sdp\": ..., \"type\": \"offer\"}}: {}",
                    e.body_text()
                ),
            )));
        }
    };
    if offer.kind != "offer" {
        return Err(Box::new(refuse(
            StatusCode::BAD_REQUEST,
            "type must be \"offer\"".into(),
        )));
    }
    Ok(offer.sdp)
}

/// The answer to a page's offer: `{"sdp": ..., "type": "answer"}`, or the refusal in words.
pub(crate) fn answer(outcome: Result<String, crate::error::Error>) -> Response {
    match outcome {
        Ok(sdp) => Json(serde_json::json!({"sdp": sdp, "type": "answer"})).into_response(),
        Err(e) => refuse(super::status(&e), e.public_message()),
    }
}

async fn offer(
    State(state): State<Arc<AppState>>,
    super::ClientIp(client): super::ClientIp,
    body: Result<Json<Offer>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let sdp = match offer_sdp(body) {
        Ok(sdp) => sdp,
        Err(refused) => return *refused,
    };
    answer(
        crate::demo::peer::start(
            &state.demo,
            &sdp,
            Arc::new(crate::auth::UserInfo::http_anonymous()),
            Some(client),
        )
        .await,
    )
}

/// The page with its limits filled in, built on first use.
static PAGE_HTML: LazyLock<String> =
    LazyLock::new(|| PAGE.replace("{MAX_TEXT}", &crate::demo::controls::MAX_TEXT.to_string()));

async fn page() -> Html<&'static str> {
    Html(PAGE_HTML.as_str())
}

const PAGE: &str = r#"<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width"><title>hypha-rtc video demo</title>
<style>body{font-family:system-ui,sans-serif;margin:1rem} video{width:100%;max-width:960px;background:#000;display:block;margin:.5rem 0}
#stats{font-family:monospace}</style></head><body>
<h1>hypha-rtc video demo</h1>
<button id="start">Start</button> <button id="stop" disabled>Stop</button> <button id="disconnect" disabled>Disconnect</button>
<label>Text <input id="text" value="hypha-rtc" maxlength="{MAX_TEXT}"></label>
<label>Speed <input id="speed" type="range" min="0" max="100" value="24"></label>
<video id="video" autoplay playsinline muted></video>
<div id="stats">stopped</div>
<div id="confirm"></div>
<script>
let pc = null, channel = null, confirmed = null;
const $ = (id) => document.getElementById(id);
function send(message) { if (channel && channel.readyState === "open") channel.send(JSON.stringify(message)); }
// Signed-in users (the access_token cookie) get TURN credentials; others use host candidates.
// Nothing waits on a STUN server: the server's candidates are in its answer. The list is
// fetched when the page loads, so Start does not wait for it, and again after each use or
// when it is an hour old (the credentials live for hours).
let iceServers = null, iceFetchedAt = 0;
function fetchIceServers() {
  iceFetchedAt = performance.now();
  iceServers = fetch("/public/services/coturn/get_rtc_ice_servers", { credentials: "same-origin" })
    .then((r) => (r.ok ? r.json() : [])).catch(() => []);
}
async function iceServersForStart(relay) {
  if (!iceServers || performance.now() - iceFetchedAt > 3600e3) fetchIceServers();
  let list = await iceServers;
  // Signed in after the page loaded: relay cannot do without credentials, so ask now.
  if (relay && list.length === 0) { fetchIceServers(); list = await iceServers; }
  fetchIceServers();
  return list;
}
fetchIceServers();
// Each Start that builds a connection is an attempt; Disconnect ends the current one, also
// while it is still being set up, so no connection outlives its page's intent.
let attempt = 0;
// Start to first frame on screen, in milliseconds, for the stats line (and benchmarks).
let startedAt = 0, firstFrameMs = null;
async function start() {
  $("start").disabled = true;
  // Resume: only a live connection can; one the server has ended starts afresh.
  if (pc && channel && channel.readyState === "open") { send({ paused: false }); $("stop").disabled = false; return; }
  if (pc) disconnect();
  const mine = ++attempt;
  startedAt = performance.now(); firstFrameMs = null;
  $("disconnect").disabled = false;
  try {
    await connect(mine);
  } catch (e) {
    if (mine === attempt) { disconnect(); $("stats").textContent = "failed: " + e; }
  }
}
async function connect(mine) {
  const relay = new URLSearchParams(location.search).get("relay") === "1";
  const servers = await iceServersForStart(relay);
  if (mine !== attempt) return;
  if (relay && servers.length === 0) { disconnect(); $("stats").textContent = "relay needs a signed-in user and coturn"; return; }
  const own = pc = new RTCPeerConnection({ iceServers: servers, iceTransportPolicy: relay ? "relay" : "all" });
  // The data channel must exist before the offer, or the offer has no m=application.
  channel = own.createDataChannel("controls");
  channel.onopen = () => send({ text: $("text").value, speed: Number($("speed").value) * 10 });
  channel.onmessage = (e) => { confirmed = JSON.parse(e.data); $("confirm").textContent = JSON.stringify(confirmed); };
  // The server ended the session (closed, silent too long, paused too long): say so.
  own.onconnectionstatechange = () => {
    if (mine === attempt && ["failed", "closed"].includes(own.connectionState)) { disconnect(); $("stats").textContent = "the connection ended"; }
  };
  own.addTransceiver("video", { direction: "recvonly" });
  own.ontrack = (e) => {
    const video = $("video");
    video.srcObject = new MediaStream([e.track]);
    const first = () => { if (mine === attempt && firstFrameMs === null) firstFrameMs = Math.round(performance.now() - startedAt); };
    if (video.requestVideoFrameCallback) video.requestVideoFrameCallback(first); else video.addEventListener("loadeddata", first, { once: true });
  };
  await own.setLocalDescription(await own.createOffer());
  const response = await fetch("/demo/offer", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ sdp: own.localDescription.sdp, type: "offer" }) });
  const body = await response.json();
  if (mine !== attempt) return;  // Disconnect closed `own` meanwhile
  if (!response.ok) { disconnect(); $("stats").textContent = "refused: " + body.detail; return; }
  await own.setRemoteDescription(body);
  if (mine === attempt) $("stop").disabled = false;
}
// Stop pauses this viewer's stream; Start resumes it (with a fresh keyframe).
function stop() {
  send({ paused: true });
  $("start").disabled = false; $("stop").disabled = true;
}
// Disconnect ends the session: the server frees everything it held for this viewer at once.
function disconnect() {
  attempt++;
  if (pc) pc.close();
  pc = null; channel = null; confirmed = null;
  $("video").srcObject = null; $("stats").textContent = "stopped";
  $("start").disabled = false; $("stop").disabled = true; $("disconnect").disabled = true;
}
addEventListener("pagehide", () => { if (pc) pc.close(); });
window.demoConfirmed = () => confirmed;
window.demoSend = send;
$("text").oninput = () => send({ text: $("text").value });
$("speed").oninput = () => send({ speed: Number($("speed").value) * 10 });
async function stats() {
  if (!pc) return null;
  const report = await pc.getStats();
  let video = null, pair = null, local = null;
  report.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "video") video = s;
    if (s.type === "transport" && s.selectedCandidatePairId) pair = report.get(s.selectedCandidatePairId);
  });
  let remote = null;
  if (pair) { local = report.get(pair.localCandidateId); remote = report.get(pair.remoteCandidateId); }
  return { framesDecoded: video ? video.framesDecoded : 0, frameWidth: video && video.frameWidth, frameHeight: video && video.frameHeight,
    fps: video && video.framesPerSecond, rtt: pair && pair.currentRoundTripTime, candidate: local && local.candidateType, remoteCandidate: remote && remote.candidateType,
    codec: video && video.codecId && report.get(video.codecId) ? report.get(video.codecId).mimeType : null,
    firstFrameMs };
}
window.demoStats = stats;
window.demoFirstFrameMs = () => firstFrameMs;

setInterval(async () => {
  const s = await stats();
  if (s) $("stats").textContent = `${s.codec || "-"} ${s.frameWidth || "-"}x${s.frameHeight || "-"} ${s.fps || 0} fps, rtt ${s.rtt == null ? "-" : Math.round(s.rtt * 1000) + " ms"}, ${s.candidate || "-"} to ${s.remoteCandidate || "-"} candidate, ${s.framesDecoded} frames, first after ${s.firstFrameMs == null ? "-" : s.firstFrameMs + " ms"}`;
}, 500);
$("start").onclick = start;
$("stop").onclick = stop;
$("disconnect").onclick = disconnect;
</script></body></html>"#;
