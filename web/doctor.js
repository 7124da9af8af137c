// The connectivity doctor: what WebRTC calls through this server can use from this network.
// Every step is time-boxed; text goes in through textContent only.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const GATHER_MS = 6000, CONNECT_MS = 12000, ECHO_MS = 8000;
  const state = { signedIn: false, user: null, steps: [], verdict: "", detail: "", iceServers: [], stun: [] };

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const within = (ms, promise, what) => Promise.race([
    promise, sleep(ms).then(() => { throw new Error(`${what}: no answer within ${ms / 1000} s`); }),
  ]);

  function kindOf(url) {
    if (url.startsWith("turns:")) return "TURN over TLS";
    if (url.startsWith("turn:")) return url.includes("transport=tcp") ? "TURN over TCP" : "TURN over UDP";
    return "STUN";
  }

  function addStep(step) {
    state.steps.push(step);
    const row = $("steps").insertRow();
    row.insertCell().textContent = step.name;
    const result = row.insertCell();
    result.textContent = step.result;
    result.className = step.ok ? "ok" : "bad";
    row.insertCell().textContent = step.ms != null ? `${Math.round(step.ms)} ms` : "–";
  }

  // Gathers candidates for one ICE server URL; relay only for TURN.
  async function gather(server, url) {
    const turn = url.startsWith("turn");
    const pc = new RTCPeerConnection({
      iceServers: [{ urls: [url], username: server.username, credential: server.credential }],
      iceTransportPolicy: turn ? "relay" : "all",
    });
    const found = { url, kind: kindOf(url), candidates: [], errors: [], ms: null };
    const started = performance.now();
    const done = new Promise((resolve) => {
      pc.onicecandidate = (e) => {
        if (!e.candidate) return resolve();
        if (e.candidate.candidate) {
          found.candidates.push({ type: e.candidate.type, address: e.candidate.address, port: e.candidate.port,
            protocol: e.candidate.protocol, ms: performance.now() - started });
        }
      };
      pc.onicegatheringstatechange = () => { if (pc.iceGatheringState === "complete") resolve(); };
    });
    pc.onicecandidateerror = (e) => found.errors.push({ code: e.errorCode, text: e.errorText });
    pc.createDataChannel("probe");
    await pc.setLocalDescription(await pc.createOffer());
    await Promise.race([done, sleep(GATHER_MS)]);
    pc.close();
    const wanted = turn ? "relay" : "srflx";
    const hit = found.candidates.find((c) => c.type === wanted);
    found.ok = !!hit;
    found.ms = hit ? hit.ms : performance.now() - started;
    found.address = hit ? `${hit.address}:${hit.port}` : null;
    return found;
  }

  function describeGather(g) {
    if (g.ok) return `${g.kind === "STUN" ? "public address" : "relayed address"} ${g.address}`;
    if (g.errors.some((e) => e.code === 401)) return "refused the credentials (401)";
    const e = g.errors[0];
    return e ? `failed (${e.code}${e.text ? ": " + e.text : ""})` : "no candidate within the time limit";
  }

  // A connection to the server's echo peer; `relay`: only through the TURN servers.
  async function echoPath(relay) {
    const started = performance.now();
    const pc = new RTCPeerConnection({ iceServers: relay ? state.iceServers : [], iceTransportPolicy: relay ? "relay" : "all" });
    const result = { ok: false };
    try {
      const channel = pc.createDataChannel("echo");
      channel.binaryType = "arraybuffer";
      const gathered = new Promise((resolve) => {
        pc.onicegatheringstatechange = () => { if (pc.iceGatheringState === "complete") resolve(); };
      });
      await pc.setLocalDescription(await pc.createOffer());
      await Promise.race([gathered, sleep(GATHER_MS)]);
      const response = await within(5000, fetch("/doctor/offer", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer" }),
      }), "the server's answer");
      const answer = await response.json();
      if (!response.ok) throw new Error(answer.detail || `HTTP ${response.status}`);
      await pc.setRemoteDescription(answer);
      await within(CONNECT_MS, new Promise((resolve, reject) => {
        channel.onopen = resolve;
        pc.onconnectionstatechange = () => { if (pc.connectionState === "failed") reject(new Error("ICE failed")); };
      }), "the connection");
      result.connectMs = performance.now() - started;
      // Round trips: ten small messages, one at a time; the median.
      const times = [];
      for (let i = 0; i < 10; i++) {
        const sent = performance.now();
        await within(ECHO_MS, new Promise((resolve) => {
          channel.onmessage = (m) => { if (m.data === `ping ${i}`) resolve(); };
          channel.send(`ping ${i}`);
        }), "an echo");
        times.push(performance.now() - sent);
      }
      times.sort((a, b) => a - b);
      result.rttMs = (times[4] + times[5]) / 2;
      // A short burst: 512 KiB out and back, at most 8 pieces in flight.
      const chunk = new Uint8Array(16 * 1024), total = 32, window = 8;
      const burst = performance.now();
      let back = 0, sent = 0;
      await within(ECHO_MS, new Promise((resolve) => {
        channel.onmessage = (m) => {
          if (typeof m.data === "string") return;
          if (++back === total) return resolve();
          if (sent < total) { channel.send(chunk); sent++; }
        };
        for (; sent < Math.min(window, total); sent++) channel.send(chunk);
      }), "the burst");
      const seconds = (performance.now() - burst) / 1000;
      result.mbps = (2 * total * chunk.length * 8) / seconds / 1e6;
      const stats = await pc.getStats();
      stats.forEach((s) => {
        if (s.type === "transport" && s.selectedCandidatePairId) {
          const pair = stats.get(s.selectedCandidatePairId);
          const local = stats.get(pair.localCandidateId), remote = stats.get(pair.remoteCandidateId);
          const where = (c) => (c.address ? ` ${c.address}:${c.port}` : "");
          result.pair = `${local.candidateType}${local.relayProtocol ? "/" + local.relayProtocol : ""}${where(local)} → ${remote.candidateType}${where(remote)}`;
          result.relayProtocol = local.relayProtocol;
        }
      });
      result.ok = true;
    } catch (e) {
      result.error = e.message;
    } finally {
      result.ms = performance.now() - started;
      pc.close();
    }
    return result;
  }

  function verdict(gathers, viaRelay, direct) {
    const turn = gathers.filter((g) => g.kind !== "STUN");
    const works = (kind) => turn.some((g) => g.kind === kind && g.ok);
    const refused = turn.some((g) => g.errors.some((e) => e.code === 401));
    const words = [], detail = [];
    if (!state.signedIn) {
      words.push("Sign in to check TURN: anonymous visitors get no TURN credentials, so only STUN and the direct path were checked.");
    } else if (!turn.length) {
      words.push("This server hands out no TURN relay: calls work only where a direct path does.");
    } else if (refused && !turn.some((g) => g.ok)) {
      words.push("The TURN server refuses the credentials this server issues (401): the server's --coturn-secret and coturn's static-auth-secret differ. Tell the operator (hypha-rtc doctor names it).");
    } else if (!turn.some((g) => g.ok)) {
      words.push("TURN is unreachable from here: no relay over UDP, TCP or TLS answered in time. Calls that need a relay will fail.");
    } else {
      const ok = ["TURN over UDP", "TURN over TCP", "TURN over TLS"].filter(works);
      const offered = new Set(turn.map((g) => g.kind));
      const blocked = [...offered].filter((k) => !works(k));
      if (!works("TURN over UDP") && offered.has("TURN over UDP")) words.push("UDP is blocked here;");
      words.push(`${ok.join(", ")} ${ok.length > 1 ? "work" : "works"}.`);
      if (blocked.length && works("TURN over UDP")) detail.push(`Not reachable: ${blocked.join(", ")}.`);
    }
    if (direct && direct.ok) {
      words.push(`Direct connections work (round trip ${direct.rttMs.toFixed(1)} ms): calls connect peer to peer.`);
    } else if (viaRelay && viaRelay.ok) {
      words.push("Direct connections fail here: calls will be relayed.");
    } else if (direct) {
      words.push("No connection to this server's own peer succeeded: calls from this network will likely fail.");
    }
    if (viaRelay && viaRelay.ok) {
      detail.push(`Through the relay: round trip ${viaRelay.rttMs.toFixed(1)} ms, about ${viaRelay.mbps.toFixed(1)} Mbit/s (${viaRelay.pair}).`);
    } else if (viaRelay && viaRelay.error) {
      detail.push(`Through the relay to this server's peer: ${viaRelay.error}.`);
    }
    return { text: words.join(" "), detail: detail.join(" ") };
  }

  function report() {
    const lines = [
      `hypha-rtc connectivity report, ${new Date().toISOString()}`,
      `page: ${location.href}`,
      `browser: ${navigator.userAgent}`,
      `signed in: ${state.signedIn ? state.user : "no"}`,
      "",
      `verdict: ${state.verdict}`,
    ];
    if (state.detail) lines.push(state.detail);
    lines.push("", "steps:");
    for (const s of state.steps) lines.push(`  ${s.ok ? "ok  " : "FAIL"} ${s.name}: ${s.result}${s.ms != null ? ` (${Math.round(s.ms)} ms)` : ""}`);
    return lines.join("\n");
  }

  async function run() {
    $("run").disabled = true;
    $("copy").disabled = true;
    state.steps = [];
    while ($("steps").rows.length > 1) $("steps").deleteRow(1);
    $("verdict").textContent = "Checking…";
    $("verdict-detail").textContent = "";
    const started = performance.now();
    if (state.signedIn) {
      const t0 = performance.now();
      try {
        // Without the server's own probe: the browser tries the credentials itself.
        const response = await within(5000, fetch("/public/services/coturn/get_rtc_ice_servers?test_connectivity=false", { credentials: "same-origin" }), "the ICE servers");
        const body = await response.json();
        if (!response.ok) throw new Error(body.detail || `HTTP ${response.status}`);
        state.iceServers = body;
        addStep({ name: "TURN credentials from this server", ok: true, result: `${body.length} ICE server(s)`, ms: performance.now() - t0 });
      } catch (e) {
        state.iceServers = [];
        addStep({ name: "TURN credentials from this server", ok: false, result: e.message, ms: performance.now() - t0 });
      }
    } else {
      state.iceServers = state.stun.length ? [{ urls: state.stun }] : [];
    }
    const jobs = [];
    for (const server of state.iceServers) {
      for (const url of server.urls) {
        if (url.startsWith("stun:") && state.signedIn) continue;
        jobs.push(gather(server, url));
      }
    }
    const gathers = await Promise.all(jobs);
    for (const g of gathers) addStep({ name: `${g.kind}: ${g.url}`, ok: g.ok, result: describeGather(g), ms: g.ms });
    let viaRelay = null;
    if (state.signedIn && gathers.some((g) => g.kind !== "STUN" && g.ok)) {
      viaRelay = await echoPath(true);
      addStep({ name: "through the relay to this server's peer", ok: viaRelay.ok,
        result: viaRelay.ok ? `round trip ${viaRelay.rttMs.toFixed(1)} ms, ${viaRelay.mbps.toFixed(1)} Mbit/s` : viaRelay.error, ms: viaRelay.ms });
    }
    const direct = await echoPath(false);
    addStep({ name: "directly to this server's peer", ok: direct.ok,
      result: direct.ok ? `round trip ${direct.rttMs.toFixed(1)} ms (${direct.pair})` : direct.error, ms: direct.ms });
    const v = verdict(gathers, viaRelay, direct);
    state.verdict = v.text;
    state.detail = v.detail;
    $("verdict").textContent = v.text;
    $("verdict-detail").textContent = v.detail;
    const text = report();
    $("report").textContent = text;
    window.doctorReport = { verdict: v.text, detail: v.detail, steps: state.steps, gathers, viaRelay, direct,
      seconds: (performance.now() - started) / 1000, text };
    $("run").disabled = false;
    $("copy").disabled = false;
  }

  async function copy() {
    const text = $("report").textContent;
    try {
      await navigator.clipboard.writeText(text);
      $("copy").textContent = "Copied";
    } catch (e) {
      const range = document.createRange();
      range.selectNodeContents($("report"));
      window.getSelection().removeAllRanges();
      window.getSelection().addRange(range);
      $("copy").textContent = "Selected: press Ctrl+C";
    }
    setTimeout(() => { $("copy").textContent = "Copy report"; }, 2000);
  }

  (async function start() {
    try {
      const status = await (await fetch("/api/status", { credentials: "same-origin" })).json();
      state.signedIn = !!status.user;
      state.user = status.user ? (status.user.email || status.user.id) : null;
      state.stun = status.stun || [];
      $("who").textContent = state.signedIn
        ? `Signed in as ${state.user}: the checks use the TURN credentials this server gives you.`
        : "Not signed in: only STUN and the direct path can be checked. Sign in to check TURN.";
      $("nav-signin").hidden = state.signedIn;
    } catch (e) {
      $("who").textContent = "The server does not answer; the checks may fail.";
    }
    $("run").disabled = false;
    $("run").onclick = run;
    $("copy").onclick = copy;
  })();
})();
