"""The operator's view: the master's /status page and /status.json (on metrics.listen),
the Grafana dashboard (etc/grafana/chatgw.json) and the alert rules
(etc/prometheus/alerts.yml).

Black-box: HTTP to the master, headless Chromium on the page (its DOM), ``kill -9`` by
pid, ``promtool`` (Debian package prometheus) and a live ``/metrics``. Needs the tools
``scripts/test`` installs; a missing one fails the test, it is never skipped.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess

from chatgw_e2e.browser import StatusPage, require_browser_tools, wait_for
from chatgw_e2e.ops import ctl_json, ctl_status, scrape, worker_children
from chatgw_e2e.placement import wait_bus_ready
from chatgw_e2e.status import (ALERTS, DASHBOARD, BackgroundLoad, alert_exprs, dashboard_exprs, master_get,
                               master_json, metric_names)
from chatgw_e2e.ws import run_async

KEY = "status-page-test-key-0123456789"
FAST = {"CHATGW_LIMITS_RATE_PER_S": "1000", "CHATGW_LIMITS_BURST": "1000"}


def bearer(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def page_url(gw, key: str = KEY) -> str:
    # The browser's own Basic login, as an operator's browser would send it after asking.
    return f"http://operator:{key}@127.0.0.1:{gw.metrics_port}/status"


def open_status_page(gw, name: str) -> StatusPage:
    page = StatusPage(require_browser_tools(), name)
    page.open(page_url(gw))
    wait_for(lambda: page.text("conn-state").startswith("live"), 15, f"{name}: page polling /status.json")
    return page


def test_status_page_shows_load_and_a_killed_worker(make_gateway):
    gw = make_gateway(workers=2, env={**FAST, "CHATGW_API_KEY": KEY})
    run_async(wait_bus_ready(gw, timeout=10))
    page = None
    with BackgroundLoad(gw, clients=24, room="status-room", rate=25) as load:
        try:
            assert load.per_slot[0] > 0 and load.per_slot[1] > 0, f"members on both workers: {dict(load.per_slot)}"
            page = open_status_page(gw, "status")
            # connections per worker, the total, the message rate, the top room
            wait_for(lambda: page.number("total-connections") == 24, 15,
                     f"24 connections shown (members per slot {dict(load.per_slot)})")
            legend = wait_for(lambda: (lambda lg: lg if lg.get("worker 0") == str(load.per_slot[0])
                                       and lg.get("worker 1") == str(load.per_slot[1]) else None)(page.legend("connections")),
                              10, "connections per worker in the legend")
            rate = wait_for(lambda: (page.number("rate-in") or 0) > 0 and page.number("rate-in"), 10, "a message rate above 0")
            wait_for(lambda: page.text("latency-p99").endswith(" ms"), 10, "a bus latency p99")
            rooms = wait_for(lambda: [r for r in page.table("rooms") if r[0] == "status-room"], 10, "status-room in the top rooms")
            assert rooms[0][1] == "24", f"members of status-room as shown: {rooms}"
            assert page.marks("connections", "restart") == 0 and page.events("restart") == [], page.events()
            print(f"\n[status] legend {legend}, rate in {rate}/s, rooms {rooms}")

            # kill -9 the slot-1 worker: a restart mark, a break in its line, its members gone
            old = gw.workers_by_slot()[1]
            os.kill(old, signal.SIGKILL)
            assert gw.wait_child("worker", 1, not_pid=old, timeout=10), "slot 1 not restarted"
            events = wait_for(lambda: [e for e in page.events("restart") if "worker 1 restarted" in e], 15,
                              "a 'worker 1 restarted' event")
            wait_for(lambda: page.marks("connections", "restart") >= 1, 5, "a restart mark on the connections chart")
            assert page.marks("rate", "restart") >= 1, "the mark is on every chart's time axis"
            wait_for(lambda: page.segments("connections", "worker 1") >= 2, 10,
                     "worker 1's line broken at the restart (a gap, not one line across)")
            wait_for(lambda: page.number("total-connections") == load.per_slot[0], 15,
                     f"only slot 0's {load.per_slot[0]} members left")
            assert page.segments("connections", "worker 0") == 1, "worker 0 kept one unbroken line"
            assert page.number("restarts") == 1, page.text("restarts")
            print(f"[status] events {events}; segments of worker 1: {page.segments('connections', 'worker 1')}")
            page.screenshot("status-page")
        finally:
            if page is not None:
                page.quit()
    assert load.sent > 0 and not [e for e in load.errors if "join" in e], load.errors


def test_status_json_is_chatctl_status_plus_top_rooms_behind_the_key(make_gateway):
    gw = make_gateway(workers=2, env={"CHATGW_API_KEY": KEY})
    # without the key, or with a wrong one: 401 and a Basic challenge
    for path in ("/status.json", "/status"):
        for headers in ({}, bearer("wrong"), {"Authorization": "Basic " + base64.b64encode(b"op:wrong").decode()}):
            status, head, body = master_get(gw, path, headers)
            assert status == 401, f"GET {path} with {headers}: {status} {body[:100]!r}"
            assert head.get("www-authenticate", "").startswith("Basic "), head
            assert json.loads(body)["code"] == "unauthorized", body
    # unknown paths and other methods stay 404; /metrics stays open to scrapers
    for method, path in (("GET", "/nope"), ("GET", "/status.json/x"), ("POST", "/status.json"), ("GET", "/")):
        assert master_get(gw, path, bearer(), method=method)[0] == 404, f"{method} {path}"
    assert master_get(gw, "/metrics")[0] == 200

    # with the key (Bearer, or Basic with the key as the password): the page, with no external asset
    status, head, body = master_get(gw, "/status", {"Authorization": "Basic " + base64.b64encode(f"x:{KEY}".encode()).decode()})
    assert status == 200 and head["content-type"].startswith("text/html"), (status, head)
    assert b"status.json" in body and b'src="http' not in body and b'href="http' not in body

    # /status.json: what chatctl status --json says, plus chatctl rooms --top
    run_async(wait_bus_ready(gw, timeout=10))
    with BackgroundLoad(gw, clients=3, room="json-room", rate=5):
        answer = master_json(gw, "/status.json", bearer())
        ctl = ctl_status(gw)
        assert answer["status"]["masterPid"] == gw.master_pid == ctl["masterPid"]
        assert set(answer["status"]) - {"busLatency"} == set(ctl) - {"busLatency"}, (sorted(answer["status"]), sorted(ctl))
        assert sorted(c["pid"] for c in worker_children(answer["status"])) == sorted(gw.workers_by_slot().values())
        # the rooms come from the relay's answer to the request `chatctl rooms --top` makes
        answer = wait_for(lambda: (lambda a: a if any(r["room"] == "json-room" for r in a.get("rooms") or []) else None)(
            master_json(gw, "/status.json", bearer())), 10, "json-room in the rooms of /status.json")
        ctl_rooms = ctl_json(gw, "rooms", "--top", "10")["rooms"]
        shown = {r["room"]: r["members"] for r in answer["rooms"]}
        assert shown == {r["room"]: r["members"] for r in ctl_rooms} and shown["json-room"] == 3, (answer["rooms"], ctl_rooms)
        assert answer.get("roomsError") is None, answer


def test_status_without_a_key_is_open(make_gateway):
    gw = make_gateway(workers=1)
    status, _, body = master_get(gw, "/status.json")
    assert status == 200 and json.loads(body)["status"]["masterPid"] == gw.master_pid


def test_status_page_survives_a_master_restart(make_gateway):
    gw = make_gateway(workers=1, env={"CHATGW_API_KEY": KEY})
    page = open_status_page(gw, "status-restart")
    try:
        first_pid = gw.master_pid
        wait_for(lambda: f"master pid {first_pid}," in page.text("master"), 10, "the first master's pid shown")
        assert gw.stop(timeout=15) == 0
        wait_for(lambda: page.text("conn-state").startswith("master unreachable"), 15, "the page notices the master is gone")
        assert page.legend("connections").get("worker 0") == "gone", page.legend("connections")

        gw.start()  # the same ports and state dir
        assert gw.master_pid != first_pid
        wait_for(lambda: page.text("conn-state").startswith("live"), 20,
                 f"the page polling again (shows {page.text('conn-state')!r})")
        wait_for(lambda: f"master pid {gw.master_pid}," in page.text("master"), 10, "the new master's pid shown")
        events = page.events("master")
        assert any(f"pid {first_pid} → {gw.master_pid}" in e for e in events), page.events()
        assert page.marks("connections", "master") == 1 and page.marks("connections", "unreachable") >= 1
        wait_for(lambda: page.segments("connections", "worker 0") == 2, 10, "the worker's line broken by the outage")
        page.screenshot("status-page-after-master-restart")
    finally:
        page.quit()


def test_alert_rules_pass_promtool():
    promtool = os.environ.get("PROMTOOL") or shutil.which("promtool")
    assert promtool, "promtool is missing: scripts/test takes it out of Debian's prometheus package (PROMTOOL=path)"
    r = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 5 rules found" in r.stdout, r.stdout


def test_dashboard_and_alerts_use_only_exported_metrics(make_gateway):
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"] and all(p["targets"] for p in dashboard["panels"]), "every panel has a query"
    used_by_dashboard, used_by_alerts = metric_names(dashboard_exprs()), metric_names(alert_exprs())
    # (so that a broken extraction cannot pass by finding nothing)
    assert {"chatgw_connections", "chatgw_messages_in_total", "chatgw_bus_latency_seconds_bucket",
            "chatgw_restarts_total", "chatgw_watchdog_kills_total", "chatgw_reloads_total"} <= used_by_dashboard
    assert {"chatgw_crash_looping", "chatgw_watchdog_kills_total", "chatgw_up",
            "chatgw_archive_backlog_messages", "chatgw_file_limit_refusals_total"} <= used_by_alerts

    gw = make_gateway(workers=2, env={"CHATGW_ARCHIVE_KIND": "sqlite"})
    run_async(wait_bus_ready(gw, timeout=10))

    def exported():
        m = scrape(gw)
        names = set(m.families) | {name for name, _, _ in m.samples}
        return names if "chatgw_bus_latency_seconds_bucket" in names else None

    names = wait_for(exported, 10, "a scrape with the bus latency histogram")
    missing = sorted((used_by_dashboard | used_by_alerts) - names)
    assert not missing, f"named in {DASHBOARD.name} or {ALERTS.name} but not in /metrics: {missing}"
