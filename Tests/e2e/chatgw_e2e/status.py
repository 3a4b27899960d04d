"""The operator's view (test_status.py): room traffic kept up in the background while a
browser watches, the master's HTTP pages fetched raw, and the metric names that the
Grafana dashboard and the Prometheus alert rules use.

* ``BackgroundLoad(gw, clients, room, rate)`` -- a context manager: ``clients`` members
  of ``room`` and one sender at about ``rate`` messages a second, on an asyncio loop in a
  thread, for at most ``max_seconds``. ``per_slot`` is how many members each worker got;
  ``sent`` counts the messages; ``errors`` holds what went wrong.
* ``master_get(gw, path, headers)`` -> (status, headers, body) from ``metrics.listen``.
* ``DASHBOARD``, ``ALERTS`` (paths under etc/), ``dashboard_exprs()``, ``alert_exprs()``,
  ``metric_names(exprs)`` -> the ``chatgw_*`` names they use.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from chatgw_e2e.gateway import REPO_ROOT
from chatgw_e2e.rooms import Inbox
from chatgw_e2e.ws import join_room, open_many, send_json

DASHBOARD = REPO_ROOT / "etc" / "grafana" / "chatgw.json"
ALERTS = REPO_ROOT / "etc" / "prometheus" / "alerts.yml"

METRIC_RE = re.compile(r"\bchatgw_[a-z0-9_]+")


class BackgroundLoad:
    def __init__(self, gw, clients: int, room: str, rate: float, max_seconds: float = 80.0):
        self.gw, self.clients, self.room, self.rate, self.max_seconds = gw, clients, room, rate, max_seconds
        self.per_slot: Counter = Counter()
        self.sent = 0
        self.errors: list[str] = []
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"load-{room}", daemon=True)

    def __enter__(self) -> "BackgroundLoad":
        self._thread.start()
        if not self.ready.wait(20):
            self.errors.append("members not joined within 20 s")
        assert not self.errors, self.errors
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(15)

    def _run(self) -> None:
        try:
            asyncio.run(asyncio.wait_for(self._main(), self.max_seconds + 10))
        except Exception as e:  # noqa: BLE001 -- reported through errors
            self.errors.append(f"load ended: {e!r}")
            self.ready.set()

    async def _main(self) -> None:
        opened = await open_many(self.gw, self.clients, timeout=10, user_prefix="load")
        self.errors += opened.errors
        inboxes = []
        try:
            for ws, slot in zip(opened.conns, opened.slots()):
                reply, _ = await join_room(ws, self.room)
                if reply.get("type") != "joined":
                    self.errors.append(f"join refused: {reply}")
                self.per_slot[slot] += 1
            # Members only read (their workers may die under them); the sender is the first.
            inboxes = [Inbox(ws, f"load{i}") for i, ws in enumerate(opened.conns[1:])]
            self.ready.set()
            sender, deadline = opened.conns[0], time.monotonic() + self.max_seconds
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    await send_json(sender, {"type": "send", "room": self.room, "text": f"m{self.sent}"})
                except Exception:  # noqa: BLE001 -- its worker was killed: the load goes on without it
                    break
                self.sent += 1
                await asyncio.sleep(1 / self.rate)
            while not self._stop.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        finally:
            for ib in inboxes:
                ib.stop()
            for ws in opened.conns:
                try:
                    await asyncio.wait_for(ws.close(), 2)
                except Exception:  # noqa: BLE001
                    pass


def master_get(gw, path: str, headers: dict | None = None, method: str = "GET",
               timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One request to the master's HTTP listener (metrics.listen)."""
    c = http.client.HTTPConnection("127.0.0.1", gw.metrics_port, timeout=timeout)
    try:
        c.request(method, path, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def master_json(gw, path: str, headers: dict | None = None) -> Any:
    status, _, body = master_get(gw, path, headers)
    assert status == 200, f"GET {path}: {status} {body[:200]!r}"
    return json.loads(body)


def _exprs_in(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "expr" and isinstance(v, str)] + \
            [e for k, v in node.items() if k != "expr" for e in _exprs_in(v)]
    if isinstance(node, list):
        return [e for v in node for e in _exprs_in(v)]
    return []


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and annotations."""
    return _exprs_in(json.loads(DASHBOARD.read_text()))


def alert_exprs() -> list[str]:
    import yaml  # (PyYAML: a dependency of the Debian/pip tools the suite installs)

    rules = yaml.safe_load(ALERTS.read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def metric_names(exprs: list[str]) -> set[str]:
    return {m for e in exprs for m in METRIC_RE.findall(e)}
