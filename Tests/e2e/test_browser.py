"""The built-in web page (GET /) in real headless Chromium, end to end.

Two browser sessions chat in one room through a gateway with 2 workers; then the
worker holding one of them is killed with SIGKILL, the other sends while it is
disconnected, and the page must reconnect by itself, resume with since+epoch and show
exactly the messages it missed (no holes, no duplicates).

Needs chromium, chromium-driver (apt) and selenium (pip), which scripts/test installs;
when one is missing the tests FAIL with a message saying what to install. Screenshots
go to Tests/e2e/artifacts/ (created; not tracked by git).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter

from chatgw_e2e.browser import ChatPage, open_and_scroll_back, require_browser_tools, screenshot_and_quit, wait_for
from chatgw_e2e.placement import wait_bus_ready
from chatgw_e2e.procs import pid_alive
from chatgw_e2e.ws import run_async

FAST = {"CHATGW_LIMITS_RATE_PER_S": "1000", "CHATGW_LIMITS_BURST": "1000"}
API_KEY = "e2e-browser-api-key"
ROOM = "browser-room"


def test_browser_tools_installed():
    tools = require_browser_tools()
    print(f"chromium {tools.chromium}, chromedriver {tools.chromedriver}, selenium {tools.selenium_version}")


def test_web_page_served_and_switchable(make_gateway):
    gw = make_gateway(workers=1, env=FAST)
    status, body = gw.http_get("/")
    assert status == 200, status
    for marker in (b'id="log"', b'id="status"', b'id="members"', b'id="send"', b'id="sendButton"', b"<script>"):
        assert marker in body, f"page lacks {marker!r}"
    off = make_gateway(workers=1, env={"CHATGW_SERVER_WEB_PAGE": "false", **FAST})
    assert off.http_get("/")[0] == 404, "server.web_page false must turn GET / off"
    assert off.http_get("/healthz")[0] == 200


def _seq_counts(page: ChatPage) -> Counter:
    return Counter((e.epoch, e.seq) for e in page.log())


def test_two_browsers_chat_and_resume_after_worker_kill(make_gateway):
    tools = require_browser_tools()
    gw = make_gateway(workers=2, env={"CHATGW_API_KEY": API_KEY, **FAST})
    run_async(wait_bus_ready(gw), 15)
    base = f"{gw.http_url}/?room={ROOM}"
    pages: list[ChatPage] = []
    t0 = time.monotonic()
    try:
        b = ChatPage(tools, "B (bob)")
        pages.append(b)
        a = ChatPage(tools, "A (alice)")
        pages.append(a)
        print(f"[browser] two Chromium sessions up in {time.monotonic() - t0:.1f}s")

        b.open(f"{base}&user=bob")
        conn_b, slot_b = b.wait_connected("bob")
        b.wait_joined()
        # A must be on the other worker, so that killing B's worker leaves A connected
        conn_a, slot_a = a.open_away_from(f"{base}&user=alice", "alice", slot_b)
        a.wait_joined()
        print(f"[browser] B on {conn_b} (slot {slot_b}), A on {conn_a} (slot {slot_a})")
        # members is the gateway-wide count: one on each worker
        assert wait_for(lambda: a.members() == "2", 3, "A shows members 2"), a.members()

        # 1. typed in one, shown in the other (both ways)
        a.type_and_send("hello from alice")
        b.wait_texts(["hello from alice"])
        a.wait_texts(["hello from alice"])
        b.type_and_enter("hi from bob")
        a.wait_texts(["hi from bob"])
        b.wait_texts(["hi from bob"])
        before_kill = b.log()
        assert [e.seq for e in before_kill] == [1, 2], [(e.seq, e.text) for e in before_kill]
        last_seen = before_kill[-1]

        # 2. kill -9 the worker holding B
        pids = gw.workers_by_slot()
        victim = pids[slot_b]
        os.kill(victim, signal.SIGKILL)
        t_kill = time.monotonic()
        down = b.wait_disconnected(5)
        missed = [f"while bob is away #{i}" for i in range(1, 4)]
        took = a.submit_now(missed)
        still_down = b.status()
        assert took == 3, f"A's page sent {took} of 3 messages (status {a.status()!r})"
        assert not still_down.startswith("connected as"), \
            f"B was already back ({still_down!r}) when A sent: the resume would not be tested"
        print(f"[browser] killed worker pid {victim} (slot {slot_b}); B status {down!r}; "
              f"A sent 3 messages {time.monotonic() - t_kill:.2f}s after the kill")
        a_log = a.wait_texts(missed)

        # 3. B reconnects by itself and shows exactly what it missed
        conn_b2, slot_b2 = b.wait_connected("bob", timeout=20, not_conn=conn_b)
        print(f"[browser] B back on {conn_b2} (slot {slot_b2}) {time.monotonic() - t_kill:.2f}s after the kill")
        b_log = b.wait_texts(missed, timeout=10)
        time.sleep(0.5)  # let any late duplicate arrive before counting
        b_log, a_log = b.log(), a.log()
        dup = {k: n for k, n in _seq_counts(b).items() if n > 1}
        assert not dup, f"B shows messages more than once: {dup}"
        assert len({e.epoch for e in b_log}) == 1, f"epochs in B: {[e.epoch for e in b_log]}"
        b_seqs = [e.seq for e in b_log]
        assert b_seqs == list(range(1, 6)), f"B's seqs {b_seqs}, wanted 1..5 in order: {[e.text for e in b_log]}"
        assert [(e.epoch, e.seq, e.text) for e in b_log] == [(e.epoch, e.seq, e.text) for e in a_log], \
            f"A and B differ:\nA {[(e.seq, e.text) for e in a_log]}\nB {[(e.seq, e.text) for e in b_log]}"
        for e, text in zip(b_log[2:], missed):
            assert e.text.startswith("alice: ") and text in e.text and e.text.endswith(f"#{e.seq}"), e.text
        gaps = [n for n in b.notes() if "missed" in n]
        assert not gaps, f"B reports a gap although the room's history holds everything: {gaps}"

        # 4. on the wire: B resumed with since+epoch and the server sent nothing twice
        events = b.ws_events()
        sockets = [ev["socket"] for ev in events if ev["kind"] == "created" and "/ws" in (ev.get("url") or "")]
        assert len(sockets) >= 2, f"B's page opened {len(sockets)} WebSocket(s); events: {events[:10]}"
        joins = [ev["data"] for ev in events if ev["kind"] == "sent" and isinstance(ev.get("data"), dict)
                 and ev["data"].get("type") == "join"]
        resume = joins[-1]
        assert resume.get("since") == last_seen.seq and resume.get("epoch") == last_seen.epoch, \
            f"B's rejoin was {resume}, wanted since={last_seen.seq} epoch={last_seen.epoch}"
        got = Counter(ev["data"].get("seq") for ev in events if ev["kind"] == "received"
                      and isinstance(ev.get("data"), dict) and ev["data"].get("type") == "message"
                      and ev["data"].get("room") == ROOM)
        assert sorted(got) == list(range(1, 6)), f"message frames B received by seq: {dict(got)}"
        twice = {s: n for s, n in got.items() if n > 1}
        assert not twice, f"the server sent B these messages more than once (over its connections): {twice}"

        # the member count forgot the killed worker's connection: alice and bob, nothing stale
        assert b.members() == "2", f"B's rejoin reported members {b.members()!r}, wanted 2"
        info = {}

        def two_members():
            status, body = gw.http_get(f"/api/rooms/{ROOM}", headers={"Authorization": f"Bearer {API_KEY}"})
            info.update(json.loads(body))
            return status == 200 and info.get("members") == 2

        assert wait_for(two_members, 5, "room info says 2 members"), info
        assert info.get("seq") == 5, info

        # the killed worker was replaced; A never noticed
        assert not pid_alive(victim), f"worker {victim} still alive after SIGKILL"
        assert gw.wait_child("worker", slot_b, not_pid=victim, timeout=10), \
            f"slot {slot_b} not restarted: {gw.children()}"
        assert a.status() == f"connected as alice ({conn_a})", f"A's connection changed: {a.status()!r}"
        print(f"[browser] done in {time.monotonic() - t0:.1f}s; B log: {[e.text for e in b_log]}")
    finally:
        screenshot_and_quit(pages, ["browser-B", "browser-A"])


def test_page_scrolls_back_through_websocket_history(make_gateway):
    """Scrolled to the top, the page asks for older messages with a `history` request on its
    WebSocket (with a ref, so that a refused one lets it ask again) and shows them in order."""
    gw = make_gateway(workers=1, env=FAST)
    page = open_and_scroll_back(require_browser_tools(), gw, "ws-scroll-room", "wren", "W (WebSocket scroll-back)")
    try:
        assert page.transport() == "WebSocket", page.transport()
        assert not [n for n in page.notes() if n.startswith("error")], page.notes()
    finally:
        page.quit()
