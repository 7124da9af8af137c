// The accounts page: users, adding and disabling them, new passwords, token revocation and the
// credential audit. Everything goes through /api/admin/..., which answers admins only.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const hour = (seconds) => new Date(seconds * 1000).toTimeString().slice(0, 5);

  function say(text, tone) {
    const m = $("message");
    m.hidden = false;
    m.textContent = text;
    m.className = `message ${tone || "muted"}`;
  }

  async function api(path, body) {
    const response = await fetch(path, {
      method: body ? "POST" : "GET", credentials: "same-origin",
      headers: body ? { "Content-Type": "application/json" } : {},
      body: body ? JSON.stringify(body) : undefined,
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) throw Object.assign(new Error(data.detail || `HTTP ${response.status}`), { status: response.status });
    return data;
  }

  async function loadUsers() {
    const users = await api("/api/admin/users");
    const table = $("users");
    while (table.rows.length > 1) table.deleteRow(1);
    for (const u of users) {
      const row = table.insertRow();
      row.insertCell().textContent = u.email;
      row.insertCell().textContent = u.roles.join(", ") || "user";
      row.insertCell().textContent = new Date(u.created_at * 1000).toISOString().slice(0, 10);
      const state = row.insertCell();
      state.textContent = u.disabled ? "disabled" : "active";
      state.className = u.disabled ? "bad" : "ok";
      const actions = row.insertCell();
      if (!u.disabled) {
        const disable = document.createElement("button");
        disable.className = "button secondary";
        disable.textContent = "Disable";
        disable.dataset.email = u.email;
        disable.onclick = async () => {
          try {
            await api("/api/admin/users/disable", { email: u.email });
            say(`${u.email} is disabled: signing in is refused and their connections close.`, "ok");
            await loadUsers();
          } catch (e) { say(e.message, "bad"); }
        };
        const reset = document.createElement("button");
        reset.className = "button secondary";
        reset.textContent = "New password";
        reset.onclick = async () => {
          const password = window.prompt(`New password for ${u.email} (at least 8 characters)`);
          if (!password) return;
          try {
            await api("/api/admin/users/password", { email: u.email, password });
            say(`${u.email} has a new password.`, "ok");
          } catch (e) { say(e.message, "bad"); }
        };
        actions.append(disable, " ", reset);
      }
    }
  }

  async function loadAudit() {
    const audit = await api("/api/admin/audit");
    const counts = new Map(audit.per_hour.map(([at, n]) => [at, n]));
    const points = [];
    for (let at = audit.since, i = 0; i < 24; i++, at += 3600) points.push({ label: hour(at), value: counts.get(at) || 0 });
    window.hyphaCharts.bars($("audit-chart"), points, "");
    const table = $("audit-users");
    while (table.rows.length > 1) table.deleteRow(1);
    for (const u of audit.by_user) {
      const row = table.insertRow();
      row.insertCell().textContent = u.email || u.user_id;
      row.insertCell().textContent = u.issued;
    }
  }

  $("add").onsubmit = async (event) => {
    event.preventDefault();
    const form = event.target;
    try {
      const user = await api("/api/admin/users", {
        email: form.email.value, password: form.password.value, admin: form.admin.checked,
      });
      form.reset();
      // The table shows the new user by the time the message says so.
      await loadUsers();
      say(`Added ${user.email}${user.roles.length ? " (" + user.roles.join(", ") + ")" : ""}.`, "ok");
    } catch (e) { say(e.message, "bad"); }
  };

  $("revoke").onsubmit = async (event) => {
    event.preventDefault();
    try {
      await api("/api/admin/revoke", { token: event.target.token.value });
      say("Revoked: that token and every token derived from it are refused, and their connections closed.", "ok");
      event.target.reset();
    } catch (e) { say(e.message, "bad"); }
  };

  (async function start() {
    try {
      await loadUsers();
      $("admin").hidden = false;
      await loadAudit();
      window.adminReady = true;
    } catch (e) {
      say(e.status === 401 ? "Sign in as an admin to manage accounts." : e.status === 403
        ? "Only admins manage accounts. You are signed in without the admin role." : e.message, "bad");
      window.adminReady = true;
    }
  })();
})();
