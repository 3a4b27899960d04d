/// The operator's status page (`GET /status` on `metrics.listen`): one static page, no
/// external assets, that polls `/status.json` every second and draws the last 15 minutes,
/// kept in the browser only, as plain SVG. A child that dies breaks its line (a new
/// process is a new line, an unreachable master a gap in all of them) and leaves a mark on
/// the time axis, so a dead worker never looks like a quiet one. When the master is away
/// (restarting) the page keeps polling with backoff and carries on where it was.
enum StatusPage {
    static let html: [UInt8] = Array(text.utf8)

    private static let text = #"""
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>chatgw status</title>
<link rel="icon" href="data:,">
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #222; }
  header { display: flex; gap: 1.2em; align-items: baseline; padding: .6em 1em; background: #223; color: #eee; flex-wrap: wrap; }
  header h1 { font-size: 1.1em; margin: 0; }
  #conn-state.live { color: #7d7; } #conn-state.down { color: #f99; }
  main { padding: .8em 1em; display: grid; grid-template-columns: repeat(auto-fit, minmax(440px, 1fr)); gap: .8em; }
  section { background: #fff; border: 1px solid #dde; border-radius: 4px; padding: .5em .7em; min-width: 0; overflow-x: auto; }
  section h2 { font-size: .95em; margin: 0 0 .3em; color: #445; }
  .tiles { display: flex; gap: 1.4em; flex-wrap: wrap; }
  .tile b { display: block; font-size: 1.5em; font-weight: 600; }
  .tile span { color: #667; font-size: .85em; }
  svg.chart { width: 100%; height: 170px; display: block; }
  svg .axis { stroke: #bbc; stroke-width: 1; }
  svg text { font-size: 10px; fill: #778; }
  svg .line { fill: none; stroke-width: 1.6; }
  svg .mark { stroke-width: 1.5; stroke-dasharray: 3 2; }
  .mark-restart { stroke: #d33; } .mark-watchdog { stroke: #e80; } .mark-master { stroke: #90c; }
  .mark-reload { stroke: #36c; } .mark-unreachable { stroke: #888; }
  .legend { display: inline-block; margin-right: 1em; font-size: .85em; }
  .legend i { display: inline-block; width: .8em; height: .8em; margin-right: .3em; vertical-align: -1px; }
  table { border-collapse: collapse; width: 100%; font-size: .88em; }
  th, td { text-align: right; padding: .15em .5em; border-bottom: 1px solid #eee; white-space: nowrap; }
  th:first-child, td:first-child { text-align: left; }
  #events { margin: 0; padding-left: 1.2em; max-height: 12em; overflow-y: auto; font-size: .88em; }
  #events li[data-kind=restart] { color: #b22; } #events li[data-kind=watchdog] { color: #c60; }
  .note { color: #888; font-style: italic; font-size: .88em; }
  .failed { color: #b22; }
</style>
</head>
<body>
<header>
  <h1>chatgw status</h1>
  <span id="master">waiting for the master…</span>
  <span id="reload"></span>
  <span id="conn-state">connecting…</span>
</header>
<main>
  <section style="grid-column: 1 / -1">
    <div class="tiles">
      <div class="tile"><b id="total-connections">–</b><span>connections</span></div>
      <div class="tile"><b id="rate-in">–</b><span>messages in /s</span></div>
      <div class="tile"><b id="rate-out">–</b><span>frames out /s</span></div>
      <div class="tile"><b id="latency-p50">–</b><span>bus p50</span></div>
      <div class="tile"><b id="latency-p99">–</b><span>bus p99</span></div>
      <div class="tile"><b id="restarts">0</b><span>restarts (15 min)</span></div>
      <div class="tile"><b id="watchdog-kills">–</b><span>watchdog kills</span></div>
    </div>
  </section>
  <section><h2>Connections per worker</h2><svg id="chart-connections" class="chart"></svg><div id="legend-connections"></div></section>
  <section><h2>Messages per second</h2><svg id="chart-rate" class="chart"></svg><div id="legend-rate"></div></section>
  <section><h2>Bus latency (publish round trip)</h2><svg id="chart-latency" class="chart"></svg><div id="legend-latency"></div></section>
  <section><h2>Events (marks on the time axis)</h2><ol id="events"></ol></section>
  <section><h2>Top rooms</h2>
    <table id="rooms"><thead><tr><th>room</th><th>members</th><th>seq</th><th>msg/s</th></tr></thead><tbody></tbody></table>
    <div id="rooms-note" class="note"></div></section>
  <section><h2>Processes</h2>
    <table id="workers"><thead><tr><th>role</th><th>slot</th><th>pid</th><th>gen</th><th>state</th><th>uptime</th>
      <th>restarts</th><th>conns</th><th>in/s</th><th>out/s</th><th>RSS</th></tr></thead><tbody></tbody></table></section>
</main>
<script>
"use strict";
const WINDOW_MS = 15 * 60 * 1000, MIN_SPAN_MS = 60 * 1000, POLL_MS = 1000, MAX_BACKOFF_MS = 5000, FETCH_TIMEOUT_MS = 4000;
const COLORS = ["#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"];
const SVGNS = "http://www.w3.org/2000/svg";
// samples: {t, up, workers: {slot: {conns, pids}}, rateIn, rateOut, p50, p99}; events: {t, kind, text}
const kept = { samples: [], events: [], last: null, restartsBySlot: {}, failures: 0, down: false };

function $(id) { return document.getElementById(id); }
function fmt(n, digits) { return n >= 10000 ? (n / 1000).toFixed(1) + "K" : n.toFixed(digits || 0); }
function ms(s) { return s == null ? "–" : (s * 1000 >= 10 ? (s * 1000).toFixed(0) : (s * 1000).toFixed(2)) + " ms"; }
function clock(t) { return new Date(t).toLocaleTimeString(); }
function duration(s) { s = Math.floor(s); return s < 120 ? s + "s" : s < 7200 ? Math.floor(s / 60) + "m" : Math.floor(s / 3600) + "h"; }
function bytes(b) { return b >= 1 << 20 ? (b / (1 << 20)).toFixed(1) + "M" : (b / 1024).toFixed(0) + "K"; }

function statusURL() {
  const url = new URL("status.json", location.href);
  url.username = ""; url.password = "";  // fetch refuses URLs with credentials; the browser resends its own
  return url;
}

function addEvent(t, kind, text) {
  kept.events.push({ t, kind, text });
  const li = document.createElement("li");
  li.dataset.kind = kind; li.dataset.t = t;
  li.textContent = clock(t) + " " + text;
  $("events").prepend(li);
}

// What changed since the previous answer becomes marks: restarts (per slot, from the
// slot's restart count, which also covers a child that died between two polls), watchdog
// kills, reloads, a new master.
function noteEvents(t, st) {
  const prev = kept.last;
  if (prev && prev.masterPid !== st.masterPid) {
    addEvent(t, "master", "master restarted (pid " + prev.masterPid + " → " + st.masterPid + ")");
    kept.restartsBySlot = {};
  }
  const sameMaster = prev && prev.masterPid === st.masterPid;
  const restarts = {};
  for (const c of st.children) {
    const key = c.role + " " + c.slot;
    restarts[key] = Math.max(restarts[key] || 0, c.restarts);
  }
  for (const key in restarts) {
    const before = kept.restartsBySlot[key];
    if (sameMaster && before != null && restarts[key] > before) {
      addEvent(t, "restart", key + " restarted" + (restarts[key] - before > 1 ? " ×" + (restarts[key] - before) : ""));
    }
    kept.restartsBySlot[key] = restarts[key];
  }
  if (sameMaster && st.watchdogKills > prev.watchdogKills) {
    addEvent(t, "watchdog", "watchdog killed " + (st.watchdogKills - prev.watchdogKills) + " unresponsive child(ren)");
  }
  const reload = st.lastReload, before = sameMaster ? prev.lastReload : null;
  if (sameMaster && reload && (!before || before.at !== reload.at)) {
    addEvent(t, "reload", reload.ok ? "reload ok (generation " + reload.generation + ")" : "reload failed: " + reload.error);
  }
}

function record(t, answer) {
  const st = answer.status;
  noteEvents(t, st);
  const workers = {};
  let rateIn = 0, rateOut = 0;
  for (const c of st.children) {
    if (c.role !== "worker" || c.pid === 0) continue;
    const w = workers[c.slot] || (workers[c.slot] = { conns: 0, pids: [] });
    w.conns += c.connections; w.pids.push(c.pid);
    rateIn += c.messagesInPerSecond; rateOut += c.messagesOutPerSecond;
  }
  for (const slot in workers) workers[slot].pids = workers[slot].pids.sort().join(",");
  const lat = st.busLatency;
  kept.samples.push({ t, up: true, workers, rateIn, rateOut, p50: lat ? lat.p50Seconds : null, p99: lat ? lat.p99Seconds : null });
  kept.last = st;
  showNow(st, answer, workers, rateIn, rateOut);
}

function showNow(st, answer, workers, rateIn, rateOut) {
  let total = 0;
  for (const slot in workers) total += workers[slot].conns;
  $("total-connections").textContent = fmt(total);
  $("rate-in").textContent = fmt(rateIn, 1);
  $("rate-out").textContent = fmt(rateOut, 1);
  $("latency-p50").textContent = ms(st.busLatency ? st.busLatency.p50Seconds : null);
  $("latency-p99").textContent = ms(st.busLatency ? st.busLatency.p99Seconds : null);
  $("watchdog-kills").textContent = st.watchdogKills;
  $("master").textContent = "master pid " + st.masterPid + ", up " + duration(st.uptimeSeconds) + ", chatgw " + st.version
    + ", generation " + st.generation + ", " + st.listen + ", " + st.wantedWorkers + " workers wanted";
  const r = st.lastReload;
  $("reload").textContent = r ? "last reload: " + (r.ok ? "ok" : "FAILED: " + r.error) + " at " + new Date(r.at * 1000).toISOString().slice(0, 19) + "Z (generation " + r.generation + ")" : "last reload: none";
  $("reload").className = r && !r.ok ? "failed" : "";
  fillTable("workers", st.children.map(c => [c.role, c.slot, c.pid || "–", c.generation, c.state, duration(c.uptimeSeconds), c.restarts,
    c.connections, fmt(c.messagesInPerSecond, 1), fmt(c.messagesOutPerSecond, 1), bytes(c.rssBytes)]));
  fillTable("rooms", (answer.rooms || []).map(x => [x.room, x.members, x.seq, fmt(x.messagesPerSecond, 1)]));
  $("rooms-note").textContent = answer.roomsError ? answer.roomsError : answer.rooms == null ? "waiting for the relay's answer…" : answer.rooms.length ? "" : "no rooms";
}

function fillTable(id, rows) {
  const body = $(id).tBodies[0];
  body.replaceChildren(...rows.map(cells => {
    const tr = document.createElement("tr");
    for (const cell of cells) { const td = document.createElement("td"); td.textContent = cell; tr.append(td); }
    return tr;
  }));
}

function el(name, attrs, text) {
  const e = document.createElementNS(SVGNS, name);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (text != null) e.textContent = text;
  return e;
}

// series: [{name, values: [number|null per sample], breaks?: [bool per sample], missing?:
// legend text without a value}]. A null value or a break (a new process) starts a new
// segment, so a dead child leaves a gap.
function chart(id, series, unit, now) {
  const svg = $(id), W = svg.clientWidth || 600, H = svg.clientHeight || 170, L = 46, R = 8, T = 8, B = 18;
  // The axis grows with what is kept (at least a minute, at most the 15 minutes), so a
  // page opened a moment ago does not squeeze its data into the right edge.
  const span = Math.min(WINDOW_MS, Math.max(MIN_SPAN_MS, kept.samples.length ? now - kept.samples[0].t : 0));
  const t0 = now - span, x = t => L + (t - t0) / span * (W - L - R);
  let max = 0;
  for (const s of series) for (const v of s.values) if (v != null && v > max) max = v;
  max = max > 0 ? max * 1.1 : 1;
  const y = v => T + (1 - v / max) * (H - T - B);
  const parts = [el("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }), el("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }),
    el("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, unit(max)), el("text", { x: L - 4, y: H - B, "text-anchor": "end" }, unit(0))];
  for (const share of [1, 2 / 3, 1 / 3, 0]) {
    const back = Math.round(span * share / 1000);
    parts.push(el("text", { x: x(now - back * 1000), y: H - 4, "text-anchor": share === 1 ? "start" : share ? "middle" : "end" },
      share ? "-" + (back >= 120 ? Math.round(back / 60) + "m" : back + "s") : "now"));
  }
  for (const e of kept.events) {
    const mark = el("line", { class: "mark mark-" + e.kind, "data-kind": e.kind, x1: x(e.t), y1: T, x2: x(e.t), y2: H - B });
    mark.append(el("title", {}, clock(e.t) + " " + e.text));
    parts.push(mark);
  }
  const legend = [];
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    let d = "", open = false, segments = 0, last = null;
    kept.samples.forEach((sample, j) => {
      const v = s.values[j];
      if (v == null || (s.breaks && s.breaks[j])) open = false;
      if (v == null) return;
      d += (open ? "L" : "M") + x(sample.t).toFixed(1) + " " + y(v).toFixed(1);
      if (!open) segments++;
      open = true; last = v;
    });
    parts.push(el("path", { class: "line", d, stroke: color, "data-series": s.name, "data-segments": segments }));
    const up = kept.samples.length && s.values[s.values.length - 1] != null;
    legend.push('<span class="legend" data-series="' + s.name + '"><i style="background:' + color + '"></i>' + s.name + ": "
      + (up ? unit(last) : s.missing || "–") + "</span>");
  });
  svg.replaceChildren(...parts);
  $(id.replace("chart", "legend")).innerHTML = legend.join("");
}

function draw() {
  const now = Date.now(), samples = kept.samples;
  const slots = [...new Set(samples.flatMap(s => Object.keys(s.workers || {})))].sort((a, b) => a - b);
  chart("chart-connections", slots.map(slot => ({
    name: "worker " + slot, missing: "gone",
    values: samples.map(s => s.up && s.workers[slot] ? s.workers[slot].conns : null),
    breaks: samples.map((s, j) => j > 0 && s.up && s.workers[slot] && samples[j - 1].up && samples[j - 1].workers[slot]
      && samples[j - 1].workers[slot].pids !== s.workers[slot].pids),
  })), v => fmt(v), now);
  chart("chart-rate", [{ name: "in", values: samples.map(s => s.up ? s.rateIn : null) },
    { name: "out", values: samples.map(s => s.up ? s.rateOut : null) }], v => fmt(v, v < 10 ? 1 : 0) + "/s", now);
  chart("chart-latency", [{ name: "p50", values: samples.map(s => s.up ? s.p50 : null) },
    { name: "p99", values: samples.map(s => s.up ? s.p99 : null) }], ms, now);
  $("restarts").textContent = kept.events.filter(e => e.kind === "restart").length;
}

function forget(now) {
  while (kept.samples.length && kept.samples[0].t < now - WINDOW_MS) kept.samples.shift();
  while (kept.events.length && kept.events[0].t < now - WINDOW_MS) kept.events.shift();
  for (const li of [...$("events").children]) if (+li.dataset.t < now - WINDOW_MS) li.remove();
}

function connection(ok, text) {
  $("conn-state").textContent = text;
  $("conn-state").className = ok ? "live" : "down";
}

async function poll() {
  const t = Date.now();
  let delay = POLL_MS;
  try {
    const abort = new AbortController(), timer = setTimeout(() => abort.abort(), FETCH_TIMEOUT_MS);
    const response = await fetch(statusURL(), { cache: "no-store", credentials: "same-origin", signal: abort.signal });
    clearTimeout(timer);
    if (response.status === 401) throw new Error("unauthorized: reload the page and give api.key as the password");
    if (!response.ok) throw new Error("HTTP " + response.status);
    const answer = await response.json();
    if (kept.down) addEvent(t, "unreachable", "master answering again");
    kept.down = false; kept.failures = 0;
    record(t, answer);
    connection(true, "live, polled " + clock(t));
  } catch (e) {
    kept.failures++;
    if (!kept.down) addEvent(t, "unreachable", "master unreachable: " + (e.message || e));
    kept.down = true;
    kept.samples.push({ t, up: false, workers: {} });
    delay = Math.min(MAX_BACKOFF_MS, POLL_MS * 2 ** Math.min(kept.failures - 1, 3));
    connection(false, "master unreachable since " + clock(kept.events.filter(x => x.kind === "unreachable").slice(-1)[0].t)
      + " (" + (e.message || e) + "); retrying every " + delay / 1000 + " s");
  }
  forget(Date.now());
  draw();
  setTimeout(poll, delay);
}
poll();
</script>
</body>
</html>
"""#
}
