// gatewayd status page: one EventSource, a snapshot on (re)connect, then merged updates.
"use strict";
(function () {
  var S = null;            // the current view (snapshot merged with updates)
  var series = {};         // "device\u0000point" -> [[t_s, value|null], ...]
  var es = null, lastMsg = 0, retryTimer = null;
  var QUALITY = ["good", "uncertain", "bad"];
  var $ = function (id) { return document.getElementById(id); };

  function h(tag, attrs) {
    var el = document.createElement(tag);
    if (attrs) for (var k in attrs) {
      if (attrs[k] === null || attrs[k] === undefined) continue;
      if (k === "text") el.textContent = attrs[k]; else el.setAttribute(k, attrs[k]);
    }
    for (var i = 2; i < arguments.length; i++) {
      var c = arguments[i];
      if (c === null || c === undefined) continue;
      el.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
    }
    return el;
  }
  function fill(el) { el.textContent = ""; for (var i = 1; i < arguments.length; i++) if (arguments[i]) el.appendChild(arguments[i]); }
  function badge(text, cls) { return h("span", { "class": "badge " + cls, text: text }); }
  function stateClass(s) {
    return (s === "ok" || s === "connected") ? "ok" : (s === "failing" || s === "disconnected" || s === "stopped" || s === "rejected") ? "bad" : "warn";
  }
  function ago(sec) {
    if (sec === null || sec === undefined || isNaN(sec)) return "";
    sec = Math.max(0, Math.round(sec));
    if (sec < 90) return sec + " s";
    if (sec < 5400) return Math.round(sec / 60) + " min";
    if (sec < 172800) return (sec / 3600).toFixed(1) + " h";
    return Math.round(sec / 86400) + " d";
  }
  function clock(ts) { return ts ? new Date(ts * 1000).toLocaleTimeString() : ""; }
  function since(ts) { return ts ? clock(ts) + " (" + ago(Date.now() / 1000 - ts) + ")" : ""; }
  function fmt(v) {
    if (v === null || v === undefined) return "—";
    if (typeof v === "number") return Math.abs(v) >= 1e6 || (v !== 0 && Math.abs(v) < 1e-3) ? v.toExponential(3) : String(+v.toFixed(3));
    if (typeof v === "boolean") return v ? "on" : "off";
    if (typeof v === "object") return JSON.stringify(v);
    return String(v);
  }
  function bytes(n) {
    if (!n) return "0 B";
    var u = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n) + " " + u[i];
  }

  // -- sparklines ---------------------------------------------------------------------------
  function addSample(key, tsMs, value) {
    var b = S.bucket_s, t = Math.floor(tsMs / 1000 / b) * b, s = series[key] || (series[key] = []);
    var v = typeof value === "number" ? value : typeof value === "boolean" ? (value ? 1 : 0) : null;
    if (s.length && s[s.length - 1][0] === t) s[s.length - 1][1] = v;
    else if (!s.length || s[s.length - 1][0] < t) s.push([t, v]);
    var first = t - S.window_s;
    while (s.length && s[0][0] <= first) s.shift();
  }
  function spark(s) {
    // x: from the first sample (or the window's start, once it is full) to now
    var W = 120, H = 28, now = Date.now() / 1000, t0 = Math.max(now - S.window_s, s.length ? s[0][0] : now);
    var tspan = Math.max(now - t0, S.bucket_s);
    var lo = Infinity, hi = -Infinity, i, v;
    for (i = 0; i < s.length; i++) { v = s[i][1]; if (v !== null) { if (v < lo) lo = v; if (v > hi) hi = v; } }
    var svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("class", "spark"); svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    svg.setAttribute("preserveAspectRatio", "none");
    if (lo === Infinity) return svg;
    var span = hi - lo || 1, d = "", pen = false;
    for (i = 0; i < s.length; i++) {
      v = s[i][1];
      if (v === null) { pen = false; continue; }
      var x = Math.max(0, (s[i][0] - t0) / tspan * W), y = H - 2 - (v - lo) / span * (H - 4);
      d += (pen ? "L" : "M") + x.toFixed(1) + " " + y.toFixed(1);
      pen = true;
    }
    if (s.length === 1 || d.indexOf("L") < 0) d += "l3 0";
    var p = document.createElementNS("http://www.w3.org/2000/svg", "path");
    p.setAttribute("d", d); svg.appendChild(p);
    var title = document.createElementNS("http://www.w3.org/2000/svg", "title");
    title.textContent = "last 10 min: min " + fmt(lo) + ", max " + fmt(hi); svg.appendChild(title);
    return svg;
  }

  // -- rendering ----------------------------------------------------------------------------
  function renderDevices() {
    var box = $("devices"), names = Object.keys(S.devices).sort();
    if (!names.length) { fill(box, h("p", { "class": "muted", text: "no devices configured" })); return; }
    var frag = document.createDocumentFragment();
    names.forEach(function (name) {
      var d = S.devices[name], failing = d.state === "failing";
      var card = h("article", { "class": "card" + (failing ? " failing" : ""), "data-device": name, "data-state": d.state },
        h("h3", null, h("span", { text: name }), badge(d.state, stateClass(d.state))),
        h("div", { "class": "muted" }, d.driver + " · every " + d.interval_s + " s · " + (failing ? "failing since " : "since ") + since(d.since)));
      if (failing) card.appendChild(h("div", { "class": "err", "data-error": name, text: d.last_error || "failing" }));
      else if (d.last_error) card.appendChild(h("div", { "class": "lasterr", text: "last error: " + d.last_error }));
      var tb = h("tbody"), pts = Object.keys(d.points).sort();
      pts.forEach(function (p) {
        var pt = d.points[p], q = QUALITY[pt.quality] || String(pt.quality);
        tb.appendChild(h("tr", null, h("td", { text: p }),
          h("td", { "class": "v", "data-point": name + "/" + p, "data-ts": pt.ts_ms }, fmt(pt.value) + (pt.unit ? " " + pt.unit : "")),
          h("td", { "class": "q" }, pt.quality ? badge(q, "warn") : q),
          h("td", null, spark(series[name + "\u0000" + p] || []))));
      });
      if (pts.length) card.appendChild(h("table", { "class": "pts" }, tb));
      else card.appendChild(h("p", { "class": "muted", text: "no readings yet" }));
      if (d.last_read_ms) card.appendChild(h("div", { "class": "muted" }, d.reads + " reads, " + d.failures + " failures · last read " + ago(Date.now() / 1000 - d.last_read_ms / 1000) + " ago"));
      frag.appendChild(card);
    });
    fill(box, frag);
  }
  function renderUplinks() {
    var tb = $("uplinks").tBodies[0], frag = document.createDocumentFragment();
    Object.keys(S.uplinks).sort().forEach(function (name) {
      var u = S.uplinks[name], b = u.backlog, dr = b.drain;
      var fillBar = h("span");
      fillBar.style.width = dr.pct + "%";  // CSSOM, not a style attribute: the CSP forbids those
      var drain = b.rows && dr.peak >= 100 ? h("span", null, h("span", { "class": "bar" }, fillBar),
        " " + dr.pct + "%" + (dr.eta_s !== null ? " · ~" + ago(dr.eta_s) : "")) : (b.rows ? "live" : "—");
      frag.appendChild(h("tr", { "data-uplink": name, "data-state": u.state },
        h("td", null, h("b", { text: name }), " ", h("span", { "class": "muted", text: u.type })),
        h("td", null, badge(u.state, stateClass(u.state))),
        h("td", { text: since(u.since) }),
        h("td", { "class": "num", text: b.rows + (b.rows && b.bytes ? " (" + bytes(b.bytes) + ")" : "") }),
        h("td", { text: b.oldest_ts_ms ? ago((Date.now() - b.oldest_ts_ms) / 1000) : "—" }),
        h("td", null, drain),
        h("td", { "class": "num", text: u.sent }),
        h("td", { "class": "num", text: u.dropped }),
        h("td", { "class": u.state === "connected" ? "lasterr" : "err", text: u.last_error || "" })));
    });
    fill(tb, frag);
  }
  function renderActuators() {
    var tb = $("actuators").tBodies[0], frag = document.createDocumentFragment();
    Object.keys(S.actuators).sort().forEach(function (name) {
      var a = S.actuators[name], c = a.last;
      frag.appendChild(h("tr", { "data-actuator": name },
        h("td", null, h("b", { text: name }), " ", h("span", { "class": "muted", text: a.driver }),
          a.error ? h("div", { "class": "err", text: a.error }) : null),
        h("td", { text: c ? c.action + (c.device ? " → " + c.device : "") + " (" + c.uplink + ")" : "none yet" }),
        h("td", null, c ? badge(c.ok ? "ok" : String(c.code), c.ok ? "ok" : "bad") : "", c && !c.ok ? " " + c.message : ""),
        h("td", { "class": "num", text: c ? c.latency_ms + " ms" : "" }),
        h("td", { text: c ? since(c.at_ms / 1000) : "" })));
    });
    if (S.actuators["(unmapped)"] === undefined && !Object.keys(S.actuators).length)
      frag.appendChild(h("tr", null, h("td", { colspan: 5, "class": "muted", text: "no actuators configured" })));
    fill(tb, frag);
  }
  function renderQueue() {
    var q = S.queue, dl = $("queue");
    if (!q) { fill(dl, h("dd", { text: "not open" })); return; }
    var c = q.caps, st = q.storage || { condition: "unknown" }, frag = document.createDocumentFragment();
    function row(k, v) { frag.appendChild(h("dt", { text: k })); frag.appendChild(h("dd", null, v)); }
    row("Storage", h("span", { "data-storage": st.condition }, badge(st.condition.replace(/_/g, " "), st.condition === "ok" ? "ok" : "bad")));
    if (st.condition !== "ok") {
      if (st.since) row("Since", since(st.since));
      if (st.detail) row("Error", h("span", { "class": "err", text: (st.where ? st.where + ": " : "") + st.detail }));
      if (st.held !== undefined) row("Held in memory", st.held + " readings" + (st.acks_pending ? ", " + st.acks_pending + " acks" : ""));
    }
    row("Rows", q.rows.toLocaleString() + " of " + c.max_rows.toLocaleString());
    row("Bytes", bytes(q.bytes) + " of " + bytes(c.max_bytes) + (c.max_file_size ? " (file cap " + bytes(c.max_file_size) + ")" : ""));
    row("Max age", ago(c.max_age_s));
    row("Dropped", String(q.dropped));
    fill(dl, frag);
  }
  function render() {
    if (!S) return;
    $("gw").textContent = S.gateway; $("ver").textContent = "gatewayd " + (S.version || "");
    document.title = (S.problems.length ? "⚠ " : "") + S.gateway + " · gatewayd";
    var pr = $("problems");
    pr.hidden = !S.problems.length;
    fill(pr, S.problems.length ? h("span", { text: "Problems: " + S.problems.join("; ") }) : null);
    renderDevices(); renderUplinks(); renderActuators(); renderQueue();
    $("updated").textContent = "Updated " + new Date().toLocaleTimeString() + ".";
  }
  function setupCommands() {
    var sec = $("cmd");
    sec.hidden = !S.commands_allowed;
    if (!S.commands_allowed) return;
    fill($("actions"), null);
    S.command_actions.forEach(function (c) { $("actions").appendChild(h("option", { value: c.action, label: c.action + " → " + c.actuator })); });
  }

  // -- the stream ---------------------------------------------------------------------------
  function onSnapshot(ev) {
    S = JSON.parse(ev.data); series = {};
    Object.keys(S.devices).forEach(function (d) {
      var pts = S.devices[d].points;
      Object.keys(pts).forEach(function (p) {
        var sr = pts[p].series, out = [];  // {t0, step, v: "1.5,,2"}: one value per bucket
        if (sr && sr.v !== "") sr.v.split(",").forEach(function (x, i) { out.push([sr.t0 + i * sr.step, x === "" ? null : +x]); });
        series[d + "\u0000" + p] = out; delete pts[p].series;
      });
    });
    setupCommands(); connState(true); render();
  }
  function onUpdate(ev) {
    if (!S) return;
    var u = JSON.parse(ev.data);
    ["gateway", "ready", "problems", "uplinks", "actuators", "queue", "seq"].forEach(function (k) { S[k] = u[k]; });
    Object.keys(u.devices).forEach(function (d) {
      var old = S.devices[d] ? S.devices[d].points : {}, nd = u.devices[d];
      Object.keys(nd.points).forEach(function (p) { old[p] = nd.points[p]; addSample(d + "\u0000" + p, nd.points[p].ts_ms, nd.points[p].value); });
      nd.points = old; S.devices[d] = nd;
    });
    connState(true); render();
  }
  function connState(live) {
    lastMsg = Date.now();
    var c = $("conn");
    c.textContent = live ? "live" : "reconnecting…"; c.className = "badge " + (live ? "ok" : "bad");
  }
  function connect() {
    clearTimeout(retryTimer);
    if (es) es.close();
    es = new EventSource("events");
    es.addEventListener("snapshot", onSnapshot);
    es.addEventListener("update", onUpdate);
    es.onopen = function () { lastMsg = Date.now(); };
    es.onerror = function () {
      $("conn").textContent = "reconnecting…"; $("conn").className = "badge bad";
      // The browser retries by itself after a dropped connection; after an HTTP error it gives
      // up (CLOSED), so start over, gently.
      if (es.readyState === EventSource.CLOSED) retryTimer = setTimeout(connect, 3000);
    };
  }
  // A silent stream (keepalives come every 15 s) means a half-open connection: start over.
  setInterval(function () { if (Date.now() - lastMsg > 40000) { lastMsg = Date.now(); connect(); } else if (S) render(); }, 5000);

  $("cmdform").addEventListener("submit", function (e) {
    e.preventDefault();
    var f = e.target, out = $("cmdresult"), params;
    try { params = JSON.parse(f.params.value || "{}"); } catch (err) { out.textContent = "params: not JSON"; return; }
    var body = { action: f.action.value, params: params };
    if (f.device.value) body.device = f.device.value;
    out.textContent = "sending…";
    fetch("commands", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) })
      .then(function (r) { return r.text().then(function (t) { out.textContent = r.status + " " + t; }); })
      .catch(function (err) { out.textContent = "failed: " + err; });
  });
  connect();
})();
