"""The built-in web page over Server-Sent Events, in real headless Chromium.

1. A page whose WebSocket cannot be opened (DevTools makes ``WebSocket`` throw before the
   page's script runs, as a proxy that breaks upgrades would) falls back to SSE by itself,
   chats with a WebSocket page on the other worker, and survives a kill -9 of its worker:
   EventSource reconnects with Last-Event-ID and the page shows exactly what it missed,
   nothing twice (and the server sent nothing twice).
2. ``?transport=sse`` starts on SSE without trying a WebSocket, and scrolling to the top
   loads older messages through /sse/history.

Screenshots go to Tests/e2e/artifacts/ (sse-fallback-*.png, sse-forced.png).
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

from chatgw_e2e.browser import ChatPage, open_and_scroll_back, require_browser_tools, screenshot_and_quit, wait_for
from chatgw_e2e.placement import wait_bus_ready
from chatgw_e2e.ws import run_async

FAST = {"CHATGW_LIMITS_RATE_PER_S": "1000", "CHATGW_LIMITS_BURST": "1000"}


def test_blocked_websocket_falls_back_to_sse_and_resumes_after_worker_kill(make_gateway):
    tools = require_browser_tools()
    gw = make_gateway(workers=2, env=FAST)
    run_async(wait_bus_ready(gw), 15)
    room = "fallback-room"
    base = f"{gw.http_url}/?room={room}"
    pages: list[ChatPage] = []
    try:
        walt = ChatPage(tools, "W (walt, WebSocket)")
        pages.append(walt)
        sam = ChatPage(tools, "S (sam, WebSocket blocked)")
        pages.append(sam)
        sam.block_websocket()

        walt.open(f"{base}&user=walt")
        conn_w, slot_w = walt.wait_connected("walt")
        walt.wait_joined()
        assert walt.transport() == "WebSocket", walt.transport()
        conn_s, slot_s = sam.open_away_from(f"{base}&user=sam", "sam", slot_w)
        sam.wait_joined()
        assert sam.transport() == "SSE", f"S's transport is {sam.transport()!r}"
        assert any("WebSocket unavailable" in n for n in sam.notes()), sam.notes()
        assert wait_for(lambda: sam.members() == "2", 5, "S shows members 2"), sam.members()

        walt.type_and_send("hello from walt")
        sam.wait_texts(["hello from walt"])
        sam.type_and_enter("hi from sam")  # POST /sse/send
        walt.wait_texts(["hi from sam"])
        sam.wait_texts(["hi from sam"])
        assert [e.seq for e in sam.log()] == [1, 2], [(e.seq, e.text) for e in sam.log()]

        victim = gw.workers_by_slot()[slot_s]
        os.kill(victim, signal.SIGKILL)
        sam.wait_disconnected(5)
        missed = [f"while sam is away #{i}" for i in range(1, 4)]
        assert walt.submit_now(missed) == 3
        walt.wait_texts(missed)

        # EventSource reconnects by itself (with Last-Event-ID) onto a live worker
        sam.wait_connected("sam", timeout=25, not_conn=conn_s)
        sam.wait_texts(missed, timeout=10)
        time.sleep(0.5)  # a late duplicate would arrive by now
        log = sam.log()
        dup = {k: n for k, n in Counter((e.epoch, e.seq) for e in log).items() if n > 1}
        assert not dup, f"S shows messages more than once: {dup}"
        assert [e.seq for e in log] == [1, 2, 3, 4, 5], [(e.seq, e.text) for e in log]
        assert [(e.epoch, e.seq, e.text) for e in log] == [(e.epoch, e.seq, e.text) for e in walt.log()]
        assert not [n for n in sam.notes() if "missed" in n], sam.notes()

        # on the wire: two streams, each message sent once over both, the last id names the room
        events = sam.sse_events()
        streams = {ev["request"] for ev in events if ev["event"] == "hello"}
        assert len(streams) >= 2, f"S's page opened {len(streams)} event stream(s)"
        sent = Counter(ev["data"]["seq"] for ev in events if ev["event"] == "message")
        assert sorted(sent) == [1, 2, 3, 4, 5] and max(sent.values()) == 1, f"message events by seq: {dict(sent)}"
        assert events[-1]["id"].startswith(f"{room}/"), events[-1]
        assert walt.status() == f"connected as walt ({conn_w})", "W never noticed"
    finally:
        screenshot_and_quit(pages, ["sse-fallback-walt", "sse-fallback-sam"])


def test_forced_sse_page_scrolls_back_through_sse_history(make_gateway):
    gw = make_gateway(workers=1, env=FAST)
    page = open_and_scroll_back(require_browser_tools(), gw, "scroll-room", "fran", "F (forced SSE)", query="&transport=sse")
    try:
        assert page.transport() == "SSE" and not any("unavailable" in n for n in page.notes()), page.notes()
        assert not page.ws_events(), "a page forced to SSE opened a WebSocket"
        page.screenshot("sse-forced")
    finally:
        page.quit()
