"""Helpers for the operations end-to-end tests (test_operations.py).

Everything is black-box: the ``chatctl`` binary (``CHATCTL_BIN``, default: ``chatctl``
next to ``CHATGW_BIN``), the control socket ``<state_dir>/chatgw.ctl`` spoken raw,
``/metrics`` over HTTP, ``ps``.

* ``chatctl_bin()``, ``chatctl(gw, *args)`` -> ``CtlResult``; ``ctl_status(gw)`` (the
  ``status`` object of ``chatctl status --json``), ``ctl_rooms(gw, top)``.
* ``ctl_raw(path, data)`` -- write raw bytes on the control socket, read the answer.
* ``scrape(gw)`` -> ``Metrics`` (``prometheus_client`` parser); ``Metrics.value``,
  ``Metrics.sum``, ``Metrics.by_slot``.
* ``copy_config(dir)`` -- a rewritable copy of etc/chatgw.yaml; ``set_yaml_key``.
* ``worker_argv(gw)`` -> {pid: argv} of the current worker children (ps).
* ``wait_until(pred, timeout)`` -- poll a (blocking) predicate.

``Inbox`` and ``wait_all`` (background reader of one WebSocket: every JSON frame, close
code) are in rooms.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from chatgw_e2e.gateway import DEFAULT_CONFIG, REPO_ROOT, chatgw_bin

try:  # scripts/test must install prometheus_client (pip)
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:  # pragma: no cover - reported by the metrics test
    text_string_to_metric_families = None


# --------------------------------------------------------------------------- chatctl


def chatctl_bin() -> Path:
    p = os.environ.get("CHATCTL_BIN")
    if p:
        path = Path(p)
        if not path.is_absolute():
            path = REPO_ROOT / path
        return path
    return chatgw_bin().parent / "chatctl"


def ctl_socket(gw) -> Path:
    return Path(gw.state_dir) / "chatgw.ctl"


@dataclass
class CtlResult:
    returncode: int | None  # None: timed out
    stdout: str
    stderr: str
    elapsed: float

    def json(self) -> Any:
        return json.loads(self.stdout)


def chatctl(gw_or_socket, *args: str, timeout: float = 15.0, env: dict | None = None) -> CtlResult:
    """Run ``chatctl ARGS --socket <gw's control socket>`` to completion."""
    sock = gw_or_socket if isinstance(gw_or_socket, (str, os.PathLike)) else ctl_socket(gw_or_socket)
    binary = chatctl_bin()
    if not binary.exists():
        raise AssertionError(f"chatctl binary not found: {binary} (set CHATCTL_BIN)")
    e = {k: v for k, v in os.environ.items() if not k.startswith("CHATGW_")}
    e.update(env or {})
    t0 = time.monotonic()
    try:
        r = subprocess.run([str(binary), *args, "--socket", str(sock)], capture_output=True, text=True,
                           timeout=timeout, env=e, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as ex:
        return CtlResult(None, ex.stdout or "", ex.stderr or "", time.monotonic() - t0)
    return CtlResult(r.returncode, r.stdout, r.stderr, time.monotonic() - t0)


def ctl_json(gw, *args: str, timeout: float = 15.0) -> dict:
    """``chatctl ARGS --json``; asserts exit 0 and ok:true; returns the whole answer."""
    r = chatctl(gw, *args, "--json", timeout=timeout)
    assert r.returncode == 0, f"chatctl {' '.join(args)} --json: exit {r.returncode}\nstdout: {r.stdout[-1500:]}\nstderr: {r.stderr[-1500:]}"
    try:
        answer = r.json()
    except ValueError:
        raise AssertionError(f"chatctl {' '.join(args)} --json printed no JSON: {r.stdout[-1500:]!r}") from None
    assert answer.get("ok") is True, answer
    return answer


def ctl_status(gw) -> dict:
    return ctl_json(gw, "status")["status"]


def ctl_rooms(gw, top: int) -> list[dict]:
    return ctl_json(gw, "rooms", "--top", str(top))["rooms"]


def worker_children(status: dict) -> list[dict]:
    return [c for c in status.get("children", []) if c.get("role") == "worker"]


def ctl_raw(path: os.PathLike | str, data: bytes, timeout: float = 5.0, shut_write: bool = False) -> bytes:
    """Connect to the control socket, write data, read until the master closes (or timeout)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(data)
        if shut_write:
            s.shutdown(socket.SHUT_WR)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                # the master closed with part of an oversized request unread: the kernel
                # reports a reset after the queued answer; keep what came before it
                break
            if not chunk:
                break
            out += chunk
        return out


# --------------------------------------------------------------------------- metrics


class Metrics:
    """Parsed /metrics: samples as (name, labels dict, value)."""

    def __init__(self, text: str):
        if text_string_to_metric_families is None:
            raise AssertionError("prometheus_client is not installed (pip install prometheus_client)")
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: list[tuple[str, dict, float]] = []
        for fam in self.families.values():
            for s in fam.samples:
                self.samples.append((s.name, dict(s.labels), s.value))

    def select(self, name: str, **labels) -> list[tuple[dict, float]]:
        want = {k: str(v) for k, v in labels.items()}
        return [(l, v) for n, l, v in self.samples if n == name and all(l.get(k) == x for k, x in want.items())]

    def sum(self, name: str, **labels) -> float:
        return sum(v for _, v in self.select(name, **labels))

    def value(self, name: str, **labels) -> float | None:
        got = self.select(name, **labels)
        if not got:
            return None
        assert len(got) == 1, f"{name}{labels}: {len(got)} samples: {got}"
        return got[0][1]

    def by_slot(self, name: str, role: str = "worker") -> dict[int, float]:
        return {int(l["slot"]): v for l, v in self.select(name, role=role) if "slot" in l}

    def lines(self, prefix: str) -> str:
        return "\n".join(l for l in self.text.splitlines() if l.startswith(prefix))


def scrape_text(gw, timeout: float = 5.0) -> str:
    assert gw.metrics_port, "gateway started without a metrics port"
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=timeout) as r:
        assert r.status == 200, r.status
        return r.read().decode()


def scrape(gw, timeout: float = 5.0) -> Metrics:
    return Metrics(scrape_text(gw, timeout))


# --------------------------------------------------------------------------- config, processes


def copy_config(directory: os.PathLike | str, name: str = "chatgw.yaml") -> Path:
    dst = Path(directory) / name
    shutil.copyfile(DEFAULT_CONFIG, dst)
    return dst


def set_yaml_key(text: str, section: str, key: str, value: str) -> str:
    """Replace `  key: ...` inside `section:` of the (flat, two-level) default config."""
    out, in_section, done = [], False, False
    for line in text.splitlines():
        if re.match(r"^\S", line):
            in_section = line.rstrip() == f"{section}:"
        elif in_section and not done and re.match(rf"^\s+{re.escape(key)}:", line):
            indent = line[: len(line) - len(line.lstrip())]
            line = f"{indent}{key}: {value}"
            done = True
        out.append(line)
    if not done:
        raise AssertionError(f"{section}.{key} not found in the config")
    return "\n".join(out) + "\n"


def worker_argv(gw) -> dict[int, list[str]]:
    """{pid: argv} of the master's current worker children (ps)."""
    r = subprocess.run(["ps", "-ww", "-o", "pid=,stat=,args=", "--ppid", str(gw.master_pid)],
                       capture_output=True, text=True)
    out = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and not parts[1].startswith("Z") and "worker" in parts[2:]:
            out[int(parts[0])] = parts[2:]
    return out


def argv_option(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def wait_until(pred: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll pred() until it returns something truthy; return it (or the last falsy value)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(interval)
