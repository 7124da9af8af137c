// The demo page: Start, Stop, Disconnect, text and speed (confirmed by the server over the data
// channel), the video, the connection's figures as labelled fields, a minute of frame rate and
// bitrate, and the phases of the connection. Text goes in through textContent only.
"use strict";
(function () {
  let pc = null, channel = null, confirmed = null;
  const $ = (id) => document.getElementById(id);
  const relayOnly = new URLSearchParams(location.search).get("relay") === "1";
  function send(message) { if (channel && channel.readyState === "open") channel.send(JSON.stringify(message)); }
  function showError(text) { $("error").hidden = !text; $("error").textContent = text || ""; }
  function setState(text) { $("state").textContent = text; }

  // Signed-in users (the access_token cookie) get TURN credentials; others use host candidates.
  // Nothing waits on a STUN server: the server's candidates are in its answer. The list is
  // fetched when the page loads (for a signed-in visitor), so Start does not wait for it, and
  // again after each use or when it is an hour old (the credentials live for hours).
  let iceServers = Promise.resolve([]), iceFetchedAt = 0;
  const signedIn = fetch("/api/status", { credentials: "same-origin" })
    .then((r) => r.json()).then((status) => status.user || null).catch(() => null);
  function fetchIceServers() {
    iceFetchedAt = performance.now();
    iceServers = fetch("/public/services/coturn/get_rtc_ice_servers", { credentials: "same-origin" })
      .then((r) => (r.ok ? r.json() : [])).catch(() => []);
  }
  async function iceServersForStart() {
    if (!(await signedIn)) return [];
    if (!iceFetchedAt || performance.now() - iceFetchedAt > 3600e3) fetchIceServers();
    const list = await iceServers;
    fetchIceServers();
    return list;
  }

  // Each Start that builds a connection is an attempt; Disconnect ends the current one, also
  // while it is still being set up, so no connection outlives its page's intent.
  let attempt = 0, startedAt = 0, firstFrameMs = null, phases = [];
  const history = [];
  function phase(name) {
    if (phases.some((p) => p.name === name)) return;
    phases.push({ name, ms: Math.round(performance.now() - startedAt) });
    const table = $("phases");
    while (table.rows.length > 1) table.deleteRow(1);
    for (const p of phases) {
      const row = table.insertRow();
      row.insertCell().textContent = p.name;
      row.insertCell().textContent = `${p.ms} ms`;
    }
  }

  async function start() {
    $("start").disabled = true;
    showError("");
    // Resume: only a live connection can; one the server has ended starts afresh.
    if (pc && channel && channel.readyState === "open") { send({ paused: false }); $("stop").disabled = false; setState("Playing."); return; }
    if (pc) disconnect();
    const mine = ++attempt;
    startedAt = performance.now(); firstFrameMs = null; phases = []; history.length = 0;
    $("disconnect").disabled = false;
    setState("Connecting…");
    try {
      await connect(mine);
    } catch (e) {
      if (mine === attempt) { disconnect(); showError(`The connection could not be set up: ${e.message || e}`); }
    }
  }

  // The next connection is prepared while the page waits for Start: the peer connection, its
  // data channel and video transceiver, and its offer (together tens of milliseconds in the
  // browser), so Start only sends the offer. Nothing goes on the network before Start: ICE
  // gathering begins with setLocalDescription, after Start has set the current ICE servers.
  let prepared = null;
  function prepare() {
    const made = (async () => {
      const own = new RTCPeerConnection();
      // The data channel must exist before the offer, or the offer has no m=application.
      const controls = own.createDataChannel("controls");
      own.addTransceiver("video", { direction: "recvonly" });
      return { own, controls, offer: await own.createOffer() };
    })();
    made.catch(() => {});
    prepared = made;
  }
  function takePrepared() {
    if (!prepared) prepare();
    const next = prepared;
    prepared = null;
    return next;
  }

  async function connect(mine) {
    const [servers, { own, controls, offer }] = await Promise.all([iceServersForStart(), takePrepared()]);
    if (mine !== attempt) { own.close(); return; }
    if (relayOnly && servers.length === 0) {
      own.close();
      disconnect();
      showError("Relay only (?relay=1) needs TURN credentials: sign in, and the server needs a coturn.");
      return;
    }
    own.setConfiguration({ iceServers: servers, iceTransportPolicy: relayOnly ? "relay" : "all" });
    pc = own;
    channel = controls;
    channel.onopen = () => send({ text: $("text").value, speed: Number($("speed").value) * 10 });
    channel.onmessage = (e) => {
      confirmed = JSON.parse(e.data);
      $("confirm").textContent = confirmed.ok === false
        ? `The server refused the change: ${confirmed.error}`
        : `The server shows “${confirmed.text}” at ${confirmed.speed} px/s${confirmed.paused ? " (paused)" : ""}.`;
    };
    own.oniceconnectionstatechange = () => {
      if (["connected", "completed"].includes(own.iceConnectionState)) phase("ICE: a path was found");
    };
    // The server ended the session (closed, silent too long, paused too long): say so.
    own.onconnectionstatechange = () => {
      if (own.connectionState === "connected") phase("DTLS: encrypted");
      if (mine === attempt && ["failed", "closed"].includes(own.connectionState)) {
        const failed = own.connectionState === "failed";
        disconnect();
        if (failed) showError("The connection failed: no network path to the server worked. The connectivity doctor tells why.");
        else setState("The server ended the session.");
      }
    };
    own.ontrack = (e) => {
      const video = $("video");
      video.srcObject = new MediaStream([e.track]);
      const first = () => {
        if (mine === attempt && firstFrameMs === null) {
          firstFrameMs = Math.round(performance.now() - startedAt);
          phase("first frame on screen");
          setState("Playing.");
        }
      };
      if (video.requestVideoFrameCallback) video.requestVideoFrameCallback(first); else video.addEventListener("loadeddata", first, { once: true });
    };
    // The offer goes out while the browser applies it (the same SDP either way): the server
    // answers while the browser sets itself up, instead of after it (about 15 ms sooner).
    const posted = fetch("/demo/offer", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sdp: offer.sdp, type: "offer" }) });
    posted.catch(() => {}); // read below; left unread only when setLocalDescription failed
    await own.setLocalDescription(offer);
    const response = await posted;
    const body = await response.json();
    if (mine !== attempt) return; // Disconnect closed `own` meanwhile
    if (!response.ok) { disconnect(); showError(`The server refused: ${body.detail}`); return; }
    phase("signaling: the server answered");
    await own.setRemoteDescription(body);
    if (mine === attempt) $("stop").disabled = false;
  }

  // Stop pauses this viewer's stream; Start resumes it (with a fresh keyframe).
  function stop() {
    send({ paused: true });
    $("start").disabled = false; $("stop").disabled = true;
    setState("Paused: Start resumes.");
  }

  // Disconnect ends the session: the server frees everything it held for this viewer at once
  // (an offer still on its way is freed by the server's 10 s connect timeout instead).
  function disconnect() {
    attempt++;
    if (pc) pc.close();
    pc = null; channel = null; confirmed = null;
    $("video").srcObject = null;
    setState("Stopped.");
    $("start").disabled = false; $("stop").disabled = true; $("disconnect").disabled = true;
    if (!prepared) prepare();
  }

  let lastBytes = null;
  async function stats() {
    if (!pc) return null;
    const report = await pc.getStats();
    let video = null, pair = null, local = null, remote = null;
    report.forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "video") video = s;
      if (s.type === "transport" && s.selectedCandidatePairId) pair = report.get(s.selectedCandidatePairId);
    });
    if (pair) { local = report.get(pair.localCandidateId); remote = report.get(pair.remoteCandidateId); }
    const codec = video && video.codecId && report.get(video.codecId);
    return {
      framesDecoded: video ? video.framesDecoded : 0, frameWidth: video && video.frameWidth, frameHeight: video && video.frameHeight,
      fps: video && video.framesPerSecond, rtt: pair && pair.currentRoundTripTime, candidate: local && local.candidateType,
      remoteCandidate: remote && remote.candidateType, codec: codec ? codec.mimeType : null, firstFrameMs,
      bytes: video ? video.bytesReceived : 0, at: performance.now(),
      localAddress: local && local.address ? `${local.address}:${local.port}` : null,
      remoteAddress: remote && remote.address ? `${remote.address}:${remote.port}` : null,
      relayProtocol: local && local.relayProtocol,
    };
  }

  async function show() {
    const s = await stats();
    if (!s) return;
    let mbps = null;
    if (lastBytes && s.bytes >= lastBytes.bytes) mbps = ((s.bytes - lastBytes.bytes) * 8) / ((s.at - lastBytes.at) / 1000) / 1e6;
    lastBytes = { bytes: s.bytes, at: s.at };
    $("s-codec").textContent = s.codec ? s.codec.replace("video/", "") : "–";
    $("s-resolution").textContent = s.frameWidth ? `${s.frameWidth}x${s.frameHeight}` : "–";
    $("s-fps").textContent = s.fps != null ? `${s.fps} fps` : "–";
    $("s-bitrate").textContent = mbps != null ? `${mbps.toFixed(2)} Mbit/s` : "–";
    $("s-rtt").textContent = s.rtt != null ? `${Math.round(s.rtt * 1000)} ms` : "–";
    $("s-first").textContent = s.firstFrameMs != null ? `${s.firstFrameMs} ms` : "–";
    if (s.candidate) {
      const mine = `${s.candidate}${s.relayProtocol ? " over " + s.relayProtocol.toUpperCase() : ""}${s.localAddress ? " " + s.localAddress : ""}`;
      $("s-pair").textContent = `${mine} → ${s.remoteCandidate}${s.remoteAddress ? " " + s.remoteAddress : ""}`;
    }
    history.push({ fps: s.fps || 0, mbps: mbps || 0 });
    if (history.length > 60) history.shift();
    window.hyphaCharts.bars($("chart-fps"), history.map((h, i) => ({ label: `${i - history.length + 1} s`, value: h.fps })), "");
    window.hyphaCharts.bars($("chart-bitrate"), history.map((h, i) => ({ label: `${i - history.length + 1} s`, value: Math.round(h.mbps * 100) / 100 })), "");
  }

  async function whoAmI() {
    const user = await signedIn;
    if (!user) {
      $("signin").textContent = "Not signed in: direct connections only. Sign in to use TURN, which gets through firewalls.";
      return;
    }
    fetchIceServers();
    const servers = await iceServers;
    const turn = servers.some((s) => s.urls.some((u) => u.startsWith("turn")));
    const who = user.email || user.id;
    $("signin").textContent = turn
      ? `Signed in as ${who}, using TURN when a direct path fails.`
      : `Signed in as ${who}; this server hands out no TURN relay.`;
    $("nav-signin").hidden = true;
  }

  whoAmI();
  prepare();
  addEventListener("pagehide", () => {
    if (pc) pc.close();
    if (prepared) prepared.then((next) => next.own.close(), () => {});
  });
  window.demoConfirmed = () => confirmed;
  window.demoSend = send;
  window.demoStats = stats;
  window.demoFirstFrameMs = () => firstFrameMs;
  window.demoPhases = () => phases;
  $("text").oninput = () => send({ text: $("text").value });
  $("speed").oninput = () => send({ speed: Number($("speed").value) * 10 });
  $("controls").onsubmit = (e) => e.preventDefault();
  $("start").onclick = start;
  $("stop").onclick = stop;
  $("disconnect").onclick = disconnect;
  setInterval(show, 1000);
})();
