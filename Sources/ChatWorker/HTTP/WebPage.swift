/// The built-in web chat page (`GET /`, `server.web_page`): one static page, no build
/// step, no external assets. It joins a room, shows the live messages and the member
/// count, sends, loads older messages when scrolled to the top, and on a dropped
/// connection reconnects with backoff and resumes with `since`+`epoch`, so nothing it
/// showed is lost or doubled. Query parameters preset it: `?user=&room=&token=`.
/// Where a WebSocket cannot be opened (a proxy that breaks upgrades) it falls back to
/// Server-Sent Events by itself (`/sse`, sending with `POST /sse/send`, scrolling back
/// with `/sse/history`); `?transport=sse` starts there.
enum WebPage {
    static let html = #"""
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>chatgw</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; margin: 0; display: flex; flex-direction: column; height: 100vh; }
  header { display: flex; gap: .5em; align-items: center; padding: .5em; background: #223; color: #eee; flex-wrap: wrap; }
  header input { width: 9em; }
  #status { margin-left: auto; font-size: .9em; }
  #status.up { color: #7d7; } #status.down { color: #f99; }
  #log { flex: 1; overflow-y: auto; padding: .5em; background: #fafafa; }
  .msg { margin: .15em 0; } .msg b { color: #335; } .msg .seq { color: #999; font-size: .8em; }
  .note { color: #a60; font-style: italic; margin: .3em 0; }
  form#send { display: flex; gap: .5em; padding: .5em; border-top: 1px solid #ccc; }
  form#send input { flex: 1; }
</style>
</head>
<body>
<header>
  <label>user <input id="user" autocomplete="off"></label>
  <label>room <input id="room" value="lobby" autocomplete="off"></label>
  <button id="join">join</button>
  <span>members: <span id="members">-</span></span>
  <span id="transport"></span>
  <span id="status" class="down">disconnected</span>
</header>
<div id="log"></div>
<form id="send"><input id="text" placeholder="say something" autocomplete="off" disabled><button id="sendButton" disabled>send</button></form>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
$("user").value = params.get("user") || "";
$("room").value = params.get("room") || "lobby";
const token = params.get("token");

let ws = null, room = null, epoch = null, lastSeq = null, firstSeq = null, firstEpoch = null;
let backoff = 500, reconnectTimer = null, loadingOlder = false, noOlder = false, refs = 0, retryAfter = null;
// Server-Sent Events: forced, or chosen once a WebSocket could not be opened at all.
let useSSE = params.get("transport") === "sse", wsOpened = false, es = null;
const seen = new Set();

function setStatus(text, up) { $("status").textContent = text; $("status").className = up ? "up" : "down"; }
function note(text) { const div = document.createElement("div"); div.className = "note"; div.textContent = text; $("log").appendChild(div); scrollDown(); }
function nearBottom() { const log = $("log"); return log.scrollHeight - log.scrollTop - log.clientHeight < 40; }
function scrollDown() { const log = $("log"); log.scrollTop = log.scrollHeight; }

function render(m) {
  const div = document.createElement("div");
  div.className = "msg";
  div.dataset.seq = m.seq; div.dataset.epoch = m.epoch;
  const who = document.createElement("b"); who.textContent = m.from + ": ";
  const seq = document.createElement("span"); seq.className = "seq"; seq.textContent = " #" + m.seq;
  div.append(who, document.createTextNode(m.text), seq);
  return div;
}

function show(m) {
  const key = m.epoch + ":" + m.seq;
  if (seen.has(key)) return;
  seen.add(key);
  const stick = nearBottom();
  $("log").appendChild(render(m));
  if (firstSeq === null) { firstSeq = m.seq; firstEpoch = m.epoch; }
  epoch = m.epoch; lastSeq = m.seq;
  if (stick) scrollDown();
}

function showOlder(messages, more) {
  const log = $("log"), height = log.scrollHeight;
  for (let i = messages.length - 1; i >= 0; i--) {
    const m = messages[i], key = m.epoch + ":" + m.seq;
    if (seen.has(key)) continue;
    seen.add(key);
    log.insertBefore(render(m), log.firstChild);
    firstSeq = m.seq; firstEpoch = m.epoch;
  }
  if (!more) noOlder = true;
  log.scrollTop += log.scrollHeight - height;
  loadingOlder = false;
}

function receive(m) {
  switch (m.type) {
    case "hello":
      setStatus("connected as " + m.user + " (" + m.conn + ")", true);
      $("transport").textContent = useSSE ? "SSE" : "WebSocket";
      if (!useSSE) {
        const join = { type: "join", room: room, ref: "j" + (++refs) };
        if (epoch !== null) { join.since = lastSeq; join.epoch = epoch; } else { join.history = 50; }
        ws.send(JSON.stringify(join));
      }
      break;
    case "joined":
      $("members").textContent = m.members;
      $("text").disabled = false; $("sendButton").disabled = false;
      break;
    case "message": if (m.room === room) show(m); break;
    case "history": if (m.room === room) showOlder(m.messages, m.more); break;
    case "gap": note("missed messages " + m.from + "–" + m.to + " (no longer in the history)"); break;
    case "bye": retryAfter = m.retry_ms; note("server says goodbye (" + m.reason + "), reconnecting"); break;
    case "error":
      note("error " + m.code + ": " + m.message);
      // A scroll-back refused (say `unavailable`): scrolling up asks again.
      if (m.ref && m.ref[0] === "h") loadingOlder = false;
      break;
  }
}

function disconnected() {
  $("text").disabled = true; $("sendButton").disabled = true;
  setStatus("reconnecting…", false);
  const delay = retryAfter !== null ? retryAfter : backoff * (0.5 + Math.random());
  backoff = Math.min(backoff * 2, 10000);
  reconnectTimer = setTimeout(connect, delay);
}

function connect() {
  clearTimeout(reconnectTimer);
  retryAfter = null;
  if (useSSE) return connectSSE();
  const url = new URL("ws", location.href.replace(/^http/, "ws"));
  url.pathname = "/ws";
  if ($("user").value) url.searchParams.set("user", $("user").value);
  if (token) url.searchParams.set("token", token);
  setStatus("connecting…", false);
  let socket;
  try { socket = new WebSocket(url, "chatgw.v1"); } catch (e) { return fallBack(); }
  ws = socket;
  socket.onopen = () => { backoff = 500; wsOpened = true; };
  socket.onmessage = (event) => receive(JSON.parse(event.data));
  socket.onclose = () => {
    if (ws !== socket) return;
    ws = null;
    if (!wsOpened) return fallBack();
    disconnected();
  };
}

function fallBack() {
  useSSE = true;
  note("WebSocket unavailable, using Server-Sent Events");
  connectSSE();
}

// The SSE endpoints take the identity in the query, as /ws does.
function sseURL(path) {
  const url = new URL(path, location.href);
  if ($("user").value) url.searchParams.set("user", $("user").value);
  if (token) url.searchParams.set("token", token);
  return url;
}

function connectSSE() {
  const url = sseURL("/sse");
  url.searchParams.set("rooms", room);
  // EventSource resends the last event id itself when it reconnects; this is for a new one.
  if (epoch !== null) url.searchParams.set("last_event_id", room + "/" + epoch + "/" + lastSeq); else url.searchParams.set("history", "50");
  setStatus("connecting…", false);
  const source = new EventSource(url);
  es = source;
  for (const type of ["hello", "joined", "message", "history", "gap", "bye", "left"]) {
    source.addEventListener(type, (event) => { if (es === source) receive(JSON.parse(event.data)); });
  }
  source.onopen = () => { backoff = 500; };
  // The server's `error` events and EventSource's own (a dropped stream) share the name.
  source.addEventListener("error", (event) => {
    if (es !== source) return;
    if (event.data) return receive(JSON.parse(event.data));
    $("text").disabled = true; $("sendButton").disabled = true;
    if (source.readyState !== EventSource.CLOSED) return setStatus("reconnecting…", false);
    es = null;
    disconnected();
  });
}

$("join").onclick = () => {
  room = $("room").value.trim();
  epoch = lastSeq = firstSeq = firstEpoch = null; noOlder = false; seen.clear();
  $("log").textContent = "";
  if (ws) { const old = ws; ws = null; old.close(); }
  if (es) { es.close(); es = null; }
  connect();
};

$("send").onsubmit = (event) => {
  event.preventDefault();
  const text = $("text").value;
  if (!text) return;
  if (useSSE) {
    if (!es) return;
    fetch(sseURL("/sse/send"), { method: "POST", body: JSON.stringify({ room: room, text: text, ref: "s" + (++refs) }) })
      .then((answer) => answer.json()).then((m) => { if (m.code) note("error " + m.code + ": " + m.message); })
      .catch(() => note("not sent: the server cannot be reached"));
  } else {
    if (!ws || ws.readyState !== WebSocket.OPEN) return;
    ws.send(JSON.stringify({ type: "send", room: room, text: text, ref: "s" + (++refs) }));
  }
  $("text").value = "";
};

$("log").onscroll = () => {
  if ($("log").scrollTop > 0 || loadingOlder || noOlder || firstSeq === null) return;
  if (useSSE) {
    const url = sseURL("/sse/history");
    url.searchParams.set("room", room);
    url.searchParams.set("before_epoch", firstEpoch); url.searchParams.set("before_seq", firstSeq); url.searchParams.set("limit", "50");
    loadingOlder = true;
    fetch(url).then((answer) => answer.json())
      .then((m) => { if (m.type === "history" && m.room === room) showOlder(m.messages, m.more); else loadingOlder = false; })
      .catch(() => { loadingOlder = false; });
    return;
  }
  if (!ws || ws.readyState !== WebSocket.OPEN) return;
  loadingOlder = true;
  ws.send(JSON.stringify({ type: "history", room: room, before: { epoch: firstEpoch, seq: firstSeq }, limit: 50, ref: "h" + (++refs) }));
};

if (params.get("room") || params.get("user")) $("join").onclick();
</script>
</body>
</html>
"""#
}
