// The status page: /status and /models once (and every 5 s), then the /ws feed. No framework.
"use strict";
(() => {
  const KEY = "tensorforge-key";  // sessionStorage: this tab only, gone when it closes
  const $ = (id) => document.getElementById(id);
  const key = () => sessionStorage.getItem(KEY) || "";
  const headers = () => (key() ? { Authorization: "Bearer " + key() } : {});
  let socket = null;
  let retry = null;

  function text(tag, value, cls) {
    const el = document.createElement(tag);
    if (cls) el.className = cls;
    el.textContent = value == null ? "" : String(value);
    return el;
  }

  function mib(n) { return n == null ? "?" : n >= 1024 ? (n / 1024).toFixed(1) + " GiB" : n + " MiB"; }
  function secs(s) { return s == null ? "–" : s < 1 ? (s * 1000).toFixed(0) + " ms" : s.toFixed(2) + " s"; }
  function size(b) { return b == null ? "" : b >= 1 << 30 ? (b / (1 << 30)).toFixed(2) + " GiB" : (b / (1 << 20)).toFixed(1) + " MiB"; }

  function problem(message) {
    $("problem").hidden = !message;
    $("problem").textContent = message || "";
  }

  function askForKey() {
    $("key-form").hidden = false;
    $("key").focus();
  }

  async function get(path) {
    const response = await fetch(path, { headers: headers(), cache: "no-store" });
    if (response.status === 401) { sessionStorage.removeItem(KEY); askForKey(); throw new Error("a key is needed"); }
    if (!response.ok) throw new Error(path + " answered " + response.status);
    return response.json();
  }

  function backendRow(b) {
    const tr = document.createElement("tr");
    tr.dataset.backend = b.name;
    tr.dataset.healthy = b.health.healthy ? "true" : "false";
    tr.append(text("td", b.name), text("td", b.kind), text("td", b.model));
    const health = text("td", b.health.healthy ? "healthy" : "unhealthy", "health");
    health.append(text("small", b.draining ? "draining" : b.health.detail));
    tr.append(health, text("td", b.state + (b.pid ? " (pid " + b.pid + ")" : "")),
      text("td", b.in_flight + "/" + b.limit), text("td", b.queue),
      text("td", b.circuit.open ? "open" : "closed"), text("td", b.last_error || ""));
    return tr;
  }

  function showBackend(b) {
    const body = $("backends").tBodies[0];
    const row = backendRow(b);
    const old = body.querySelector('tr[data-backend="' + CSS.escape(b.name) + '"]');
    if (old) old.replaceWith(row); else body.append(row);
  }

  function showBackends(list) {
    const body = $("backends").tBodies[0];
    body.replaceChildren(...list.map(backendRow));
  }

  function showGpus(vram) {
    const box = $("gpus");
    box.replaceChildren();
    if (!vram.gpus.length) { box.append(text("p", "No GPU: " + (vram.reason || "none found"), "muted")); return; }
    for (const g of vram.gpus) {
      const div = document.createElement("div");
      div.className = "gpu";
      div.dataset.gpu = g.index;
      div.append(text("div", "GPU " + g.index + " · " + g.name + " · " + mib(g.memory_used_mib) + " of " +
        mib(g.memory_total_mib) + (g.utilization_percent != null ? " · " + g.utilization_percent + "% busy" : "") +
        (g.temperature_c != null ? " · " + g.temperature_c + " °C" : "")));
      const bar = document.createElement("div");
      bar.className = "bar";
      let known = 0;
      for (const b of g.backends) {
        const m = b.measured_mib != null ? b.measured_mib : b.estimated_mib;
        known += m || 0;
        const part = text("span", "", "used");
        part.style.width = (100 * (m || 0) / g.memory_total_mib).toFixed(2) + "%";
        part.title = b.name + ": " + (m == null ? "not estimated yet" :
          mib(m) + (b.measured_mib != null ? " measured" : " estimated"));
        bar.append(part);
      }
      const rest = Math.max(0, g.memory_used_mib - known);
      const other = text("span", "", "other");
      other.style.width = (100 * rest / g.memory_total_mib).toFixed(2) + "%";
      other.title = "other use: " + mib(rest);
      bar.append(other);
      div.append(bar, text("small", g.backends.map((b) => b.name).join(", ") || "no backend placed here", "muted"));
      box.append(div);
    }
  }

  function showTraffic(gw) {
    const r = gw.recent || {};
    $("rate").textContent = r.per_second != null ? r.per_second.toFixed(2) : "–";
    $("p50").textContent = secs(r.latency_p50_seconds);
    $("p95").textContent = secs(r.latency_p95_seconds);
    $("errors").textContent = r.errors != null ? r.errors : "–";
    $("total").textContent = gw.requests_total + " requests, " + ((gw.tokens || {}).completion || 0) + " tokens out";
  }

  function showReconciler(rec) {
    const parts = [rec.result === "unknown" ? "No reconciler status yet." :
      "Last pass " + (rec.age_seconds != null ? rec.age_seconds + " s ago" : "?") + ": " + rec.result + "."];
    for (const p of rec.pending || []) parts.push(p.unit + ": " + p.reason);
    for (const r of rec.admin_requests || []) parts.push(r.backend + ": " + r.action + " requested by " + r.requested_by);
    $("reconciler").textContent = parts.join("  ·  ");
  }

  function showModels(models) {
    const body = $("models").tBodies[0];
    body.replaceChildren(...models.map((m) => {
      const tr = document.createElement("tr");
      tr.dataset.model = m.name;
      const g = m.gguf || {};
      const details = [g.architecture, g.parameters ? (g.parameters / 1e6).toFixed(0) + "M params" : "", g.quantization,
        g.context_length ? "ctx " + g.context_length : ""].filter(Boolean).join(" · ");
      tr.append(text("td", m.name), text("td", m.source), text("td", m.format || ""), text("td", size(m.size_bytes)),
        text("td", m.registered ? details : "not pulled yet"), text("td", m.sha256 ? m.sha256.slice(0, 12) + "…" : ""),
        text("td", m.backends.map((b) => b.backend + (b.healthy ? "" : " (down)")).join(", ")));
      return tr;
    }));
  }

  async function refresh() {
    try {
      const status = await get("/status");
      $("host").textContent = status.host;
      document.title = "TensorForge · " + status.host;
      showBackends(status.backends);
      showTraffic(status.gateway);
      showReconciler(status.reconciler);
      showModels((await get("/models")).models);
      problem("");
      $("key-form").hidden = true;
      return true;
    } catch (err) {
      problem(err.message);
      return false;
    }
  }

  function base64url(s) {
    return btoa(String.fromCharCode(...new TextEncoder().encode(s))).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function live(state, label) { $("live").dataset.state = state; $("live").textContent = label; }

  function connect() {
    clearTimeout(retry);
    const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
    socket = key() ? new WebSocket(url, ["bearer." + base64url(key())]) : new WebSocket(url);
    socket.onopen = () => live("live", "live");
    socket.onmessage = (message) => {
      const event = JSON.parse(message.data);
      if (event.type === "backend_status") showBackend(event.data);
      else if (event.type === "vram_update") showGpus(event.data);
      else if (event.type === "reconcile") showReconciler(event.data);
    };
    socket.onclose = () => { live("down", "reconnecting…"); retry = setTimeout(connect, 2000); };
  }

  $("key-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY, $("key").value.trim());
    $("key").value = "";
    if (await refresh()) { if (socket) socket.close(); else connect(); }
  });

  (async () => {
    if (document.body.dataset.keyed === "true" && !key()) { askForKey(); live("down", "no key"); return; }
    if (await refresh()) connect();
  })();
  setInterval(() => { if (!$("key-form").hidden) return; refresh(); }, 5000);
})();
