/// The built-in web chat page (`GET /`, `server.web_page`): one static page, no build
/// step, no external assets. It joins a room, shows the live messages and the member
/// count, sends, loads older messages when scrolled to the top, and on a dropped
/// connection reconnects with backoff and resumes with `since`+`epoch`, so nothing it
/// showed is lost or doubled. Query parameters preset it: `?user=&room=&token=`.
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
let backoff = 500, reconnectTimer = null, loadingOlder = false, noOlder = false, refs = 0;
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

function connect() {
  clearTimeout(reconnectTimer);
  const url = new URL("ws", location.href.replace(/^http/, "ws"));
  url.pathname = "/ws";
  if ($("user").value) url.searchParams.set("user", $("user").value);
  if (token) url.searchParams.set("token", token);
  setStatus("connecting…", false);
  const socket = new WebSocket(url, "chatgw.v1");
  ws = socket;
  let retryAfter = null;
  socket.onopen = () => { backoff = 500; };
  socket.onmessage = (event) => {
    const m = JSON.parse(event.data);
    switch (m.type) {
      case "hello":
        setStatus("connected as " + m.user + " (" + m.conn + ")", true);
        const join = { type: "join", room: room, ref: "j" + (++refs) };
        if (epoch !== null) { join.since = lastSeq; join.epoch = epoch; } else { join.history = 50; }
        socket.send(JSON.stringify(join));
        break;
      case "joined":
        $("members").textContent = m.members;
        $("text").disabled = false; $("sendButton").disabled = false;
        break;
      case "message": if (m.room === room) show(m); break;
      case "history": if (m.room === room) showOlder(m.messages, m.more); break;
      case "gap": note("missed messages " + m.from + "–" + m.to + " (no longer in the history)"); break;
      case "bye": retryAfter = m.retry_ms; note("server says goodbye (" + m.reason + "), reconnecting"); break;
      case "error": note("error " + m.code + ": " + m.message); break;
    }
  };
  socket.onclose = () => {
    if (ws !== socket) return;
    $("text").disabled = true; $("sendButton").disabled = true;
    setStatus("reconnecting…", false);
    const delay = retryAfter !== null ? retryAfter : backoff * (0.5 + Math.random());
    backoff = Math.min(backoff * 2, 10000);
    reconnectTimer = setTimeout(connect, delay);
  };
}

$("join").onclick = () => {
  room = $("room").value.trim();
  epoch = lastSeq = firstSeq = firstEpoch = null; noOlder = false; seen.clear();
  $("log").textContent = "";
  if (ws) { const old = ws; ws = null; old.close(); }
  connect();
};

$("send").onsubmit = (event) => {
  event.preventDefault();
  const text = $("text").value;
  if (!text || !ws || ws.readyState !== WebSocket.OPEN) return;
  ws.send(JSON.stringify({ type: "send", room: room, text: text, ref: "s" + (++refs) }));
  $("text").value = "";
};

$("log").onscroll = () => {
  if ($("log").scrollTop > 0 || loadingOlder || noOlder || firstSeq === null || !ws || ws.readyState !== WebSocket.OPEN) return;
  loadingOlder = true;
  ws.send(JSON.stringify({ type: "history", room: room, before: { epoch: firstEpoch, seq: firstSeq }, limit: 50 }));
};

if (params.get("room") || params.get("user")) $("join").onclick();
</script>
</body>
</html>
"""#
}
