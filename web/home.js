// The home page: reads /api/status every few seconds and shows it. Text only goes in through
// textContent, so nothing the server reports can add markup.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const TURN_WORDS = {
    ok: ["reachable", "ok", "coturn answers and accepts this server's credentials."],
    not_configured: ["not configured", "muted", "This server hands out no TURN credentials."],
    unknown: ["checking…", "muted", "The first check has not finished yet."],
    unreachable: ["unreachable", "bad", "The relay does not answer: calls that need it will fail."],
    timed_out: ["not answering", "bad", "The relay did not answer in time: calls that need it may fail."],
    secret_rejected: ["misconfigured", "bad", "The relay refuses this server's credentials (the shared secret differs)."],
    failed: ["failing", "bad", "The relay refused the check."],
  };
  const hour = (seconds) => new Date(seconds * 1000).toTimeString().slice(0, 5);
  let snippetsFor = null;

  function snippets(url) {
    if (snippetsFor === url) return;
    snippetsFor = url;
    $("python-snippet").textContent =
      `from hypha_rpc import login, connect_to_server\n\n` +
      `token = await login({"server_url": "${url}"})\n` +
      `server = await connect_to_server({"server_url": "${url}", "token": token})\n` +
      `ice_servers = await server.get_rtc_ice_servers()`;
    $("js-snippet").textContent =
      `const { login, connectToServer } = hyphaWebsocketClient;\n` +
      `const token = await login({ server_url: "${url}" });\n` +
      `const server = await connectToServer({ server_url: "${url}", token });\n` +
      `const iceServers = await server.getRtcIceServers();`;
  }

  function showDetails(d) {
    $("details").hidden = false;
    $("d-connections").textContent = d.connections;
    $("d-streams").textContent = `${d.http_streams} over HTTP streaming`;
    $("d-workspaces").textContent = d.workspaces;
    $("d-made").textContent = `${d.made_workspaces} made with create_workspace`;
    $("d-services").textContent = d.services;
    $("d-issued").textContent = d.credentials.issued;
    $("d-refused").textContent = `since start; ${d.credentials.refused} refused`;
    const perHour = new Map((d.credentials.per_hour || []).map(([at, n]) => [at, n]));
    const hours = [];
    for (let at = d.credentials.since, i = 0; i < 24; i++, at += 3600) {
      hours.push({ label: hour(at), value: perHour.get(at) || 0 });
    }
    window.hyphaCharts.bars($("chart-credentials"), hours, "");
    if (d.probe) {
      // One slot a minute for the last hour, each with the last verdict of its minute.
      const now = Math.floor(Date.now() / 1000);
      const points = [];
      for (let i = 59; i >= 0; i--) {
        const from = now - (i + 1) * 60, to = now - i * 60;
        const verdict = d.probe.history.filter((v) => v.at > from && v.at <= to).pop();
        points.push({
          label: hour(to),
          value: verdict && verdict.latency_ms ? Math.round(verdict.latency_ms * 10) / 10 : 0,
          bad: verdict && verdict.state !== "ok" ? verdict.state.replace("_", " ") : null,
        });
      }
      window.hyphaCharts.bars($("chart-probe"), points, " ms");
      $("d-probe").textContent = `${d.probe.address}: ${d.probe.detail || "not checked yet"}`;
    } else {
      $("d-probe").textContent = "No coturn is configured (--coturn-uri).";
    }
    const table = $("d-listeners");
    while (table.rows.length > 1) table.deleteRow(1);
    for (const l of d.listeners || []) {
      const row = table.insertRow();
      row.insertCell().textContent = l.url;
      const state = row.insertCell();
      state.textContent = l.state === "ok" ? "ok" : l.detail;
      state.className = l.state === "ok" ? "ok" : "bad";
      row.insertCell().textContent = l.latency_ms ? `${l.latency_ms.toFixed(1)} ms` : "–";
      row.insertCell().textContent = l.certificate
        ? `${l.certificate.names.join(", ")}; until ${new Date(l.certificate.expires_at * 1000).toISOString().slice(0, 10)}; ${l.certificate.trusted ? "trusted" : "not trusted here"}`
        : "";
    }
    $("d-instances").textContent = d.cluster.instances.length;
    $("d-cluster").textContent = d.cluster.shared
      ? `this one: ${d.cluster.instance}; Redis ${d.cluster.redis.replace("_", " ")}`
      : `this one alone (${d.cluster.instance}); no Redis`;
    $("d-store").textContent = d.store.kind;
    $("d-store-state").textContent = d.store.state === "ok" ? "writing fine" : "the last write failed";
    $("d-store-state").className = d.store.state === "ok" ? "note ok" : "note bad";
  }

  async function refresh() {
    let status;
    try {
      const response = await fetch("/api/status", { credentials: "same-origin", cache: "no-store" });
      status = await response.json();
    } catch (e) {
      $("turn-note").textContent = "The server does not answer right now.";
      return;
    }
    $("version").textContent = ` ${status.version}`;
    $("footer").textContent = `hypha-rtc ${status.version} · speaks the Hypha protocol of hypha-rpc ${status.hypha_version}`;
    const [word, tone, note] = TURN_WORDS[status.turn.state] || [status.turn.state, "muted", ""];
    $("turn-state").textContent = word;
    $("turn-state").className = `pill ${tone}`;
    $("turn-note").textContent = note;
    $("nav-demo").hidden = !status.demo;
    $("demo-card").hidden = !status.demo;
    const user = status.user;
    $("nav-signin").hidden = !!user;
    $("nav-signout").hidden = !user;
    $("who").textContent = user ? (user.email || user.id) : "Visitor";
    $("who-note").textContent = user
      ? (user.admin ? "Signed in as an admin." : "Signed in: your clients get TURN credentials.")
      : "Sign in to get TURN credentials.";
    snippets(status.server_url);
    if (status.details) showDetails(status.details);
    else $("details").hidden = true;
  }

  refresh();
  setInterval(refresh, 5000);
})();
