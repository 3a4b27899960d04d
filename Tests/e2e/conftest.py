"""Black-box end-to-end harness for chatgw.

Everything here talks to the real binary (``CHATGW_BIN``, default
``.build/debug/chatgw`` under the repo root) over loopback, through signals, ``ps``
and the master's stderr log. Nothing is written into the repository: every gateway
gets its own temporary state dir (holding its log as well) and runs with that dir as
its working directory.

Helpers (import them in tests with ``from conftest import ...``):

* ``Gateway`` -- one master process; see its docstring. Created by the
  ``make_gateway`` fixture, which also kills whatever is left at teardown.
* ``run_chatgw_once(...)`` -- run the binary to completion (start-up error tests).
* ``ws_connect``, ``connect_hello``, ``open_many``, ``close_all``, ``recv_json``,
  ``recv_until``, ``collect_until_close``, ``ping_ok`` -- asyncio WebSocket helpers
  on ``websockets.asyncio.client`` with a timeout on every step.
* ``join_room``, ``send_message``, ``app_ping`` -- protocol helpers (docs/PROTOCOL.md).
* ``run_async(coro, timeout)`` -- ``asyncio.run`` with an overall timeout.
* process helpers: ``pid_alive``, ``wait_pids_dead``, ``tagged_pids``,
  ``free_port``, ``parse_log_line``.
* frame level: ``ws_frame`` (masked frame writer), ``RawWS`` (raw-socket WebSocket
  client: handshake, frames, ``wait_close`` -> ``RawEnd``), ``upgrade_request``,
  ``raw_http`` -> ``HTTPReply``.
* placement: ``connect_on_slot``, ``one_per_slot``, ``wait_bus_ready`` (a join
  succeeds on every worker slot), ``room_msgs``.
* room traffic: ``Inbox`` (background reader of one connection: frames, counts per
  type, how it ended), ``wait_all``, ``read_frames``, ``send_many``,
  ``assert_quiet_until_pong``, ``check_consecutive``; one room, many senders:
  ``join_all_then_last``, ``send_numbered``, ``check_fanout``; ``first_lines`` for messages.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

import pytest
from websockets.asyncio.client import connect as _ws_connect
from websockets.exceptions import ConnectionClosed

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "etc" / "chatgw.yaml"

# Every test gets at most this long (SIGALRM), so a hung gateway can never hang CI.
TEST_HARD_TIMEOUT_S = 90

# Marker put into the environment of every chatgw we start; children inherit it, so
# the processes we started (and only those) can be found by scanning /proc.
TAG_ENV = "E2E_GW_TAG"

CONN_RE = re.compile(r"^w([0-9]+)-")
_SIGTERM = signal.SIGTERM  # (Gateway.signal shadows the module inside the class body)


def chatgw_bin() -> Path:
    p = Path(os.environ.get("CHATGW_BIN", ".build/debug/chatgw"))
    if not p.is_absolute():
        p = REPO_ROOT / p
    return p


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # "pid (comm) S ..." -- comm may contain spaces and parentheses.
    try:
        return data[data.rindex(")") + 2]
    except (ValueError, IndexError):
        return None


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def limit_files_to(pid: int, free: int) -> tuple[int, int]:
    """Lower pid's RLIMIT_NOFILE soft limit so that exactly `free` more files fit (the limit
    caps the fd number, so the gaps below it count too); returns the old (soft, hard)."""
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    open_fds = {int(name) for name in os.listdir(f"/proc/{pid}/fd")}
    limit = 0
    while limit - sum(1 for fd in open_fds if fd < limit) < free:
        limit += 1
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, old[1]))
    return old


def pid_alive(pid: int) -> bool:
    """True if the pid exists and is not a zombie (an exited, unreaped process)."""
    state = _proc_state(pid)
    return state is not None and state not in ("Z", "X", "x")


def ps_alive(pid: int) -> bool:
    """Same question asked through ps (zombies count as dead)."""
    r = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True)
    stat = r.stdout.strip()
    return r.returncode == 0 and stat != "" and not stat.startswith("Z")


def wait_pids_dead(pids: Iterable[int], timeout: float) -> list[int]:
    """Poll until none of pids is alive; return those still alive at the timeout."""
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if pid_alive(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)


def _environ_has(pid: int, entry: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return (b"\0" + entry + b"\0") in (b"\0" + data + b"\0")


def tagged_pids(tag: str) -> list[int]:
    """Live processes whose environment carries our tag (started by us, or their children)."""
    entry = f"{TAG_ENV}={tag}".encode()
    me = os.getpid()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        if pid != me and _environ_has(pid, entry) and pid_alive(pid):
            out.append(pid)
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _is_ours(pid: int, tag: str) -> bool:
    """Guard against pid reuse before killing a recorded pid."""
    if _environ_has(pid, f"{TAG_ENV}={tag}".encode()):
        return True
    argv = _cmdline(pid)
    return bool(argv) and os.path.basename(argv[0]) == "chatgw"


def base_env(extra: dict[str, str] | None = None, tag: str | None = None) -> dict[str, str]:
    """The environment for a chatgw: ours without any CHATGW_* override, plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATGW_")}
    if tag:
        env[TAG_ENV] = tag
    env.update(extra or {})
    return env


# --------------------------------------------------------------------------- logs

_LOG_HEAD_RE = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\dT\S+)\s+(?P<level>\w+)\s+(?P<proc>[^\s\[]+)\[(?P<pid>\d+)\]\s?(?P<rest>.*)$"
)
_KV_RE = re.compile(r'(?:(?<=\s)|^)([A-Za-z_][\w.-]*)=("(?:[^"\\]|\\.)*"|\S*)')


@dataclass
class LogLine:
    raw: str
    ts: str | None = None
    level: str | None = None
    proc: str | None = None
    pid: int | None = None
    text: str = ""
    fields: dict[str, str] = field(default_factory=dict)

    def get_int(self, key: str) -> int | None:
        v = self.fields.get(key)
        try:
            return int(v) if v is not None else None
        except ValueError:
            return None


def parse_log_line(line: str) -> LogLine:
    """Parse `TS LEVEL proc[PID] text key=value key="quoted value"`.

    ``text`` is what comes before the first key=value; quoted values are unquoted.
    Lines that don't have that shape come back with only ``raw`` and ``text`` set.
    """
    line = line.rstrip("\n")
    m = _LOG_HEAD_RE.match(line)
    if not m:
        return LogLine(raw=line, text=line)
    rest = m.group("rest")
    fields: dict[str, str] = {}
    first = None
    for kv in _KV_RE.finditer(rest):
        if first is None:
            first = kv.start()
        v = kv.group(2)
        if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
            v = re.sub(r"\\(.)", r"\1", v[1:-1])
        fields[kv.group(1)] = v
    text = rest if first is None else rest[:first]
    return LogLine(
        raw=line,
        ts=m.group("ts"),
        level=m.group("level"),
        proc=m.group("proc"),
        pid=int(m.group("pid")),
        text=text.strip(),
        fields=fields,
    )


# --------------------------------------------------------------------------- gateway


@dataclass(frozen=True)
class Child:
    pid: int
    role: str
    slot: int


class GatewayError(AssertionError):
    pass


class Gateway:
    """One chatgw master started on a free loopback port with a temporary state dir.

    Attributes: ``port``, ``host``, ``url`` (ws://host:port), ``http_url``,
    ``state_dir``, ``log_path``, ``workers``, ``metrics_port``, ``proc`` (Popen),
    ``master_pid``, ``tag``.

    Methods: ``start(wait_ready=True)``, ``wait_ready(timeout)``, ``children()``,
    ``child_pids()``, ``workers_by_slot()``, ``relay_pid()``, ``wait_child(role, slot,
    not_pid, timeout)``, ``log_text()``, ``log_lines()``, ``log_mark()``,
    ``wait_for_log(substring, timeout, since=0)``, ``wait_for_log_re(regex, ...)``,
    ``find_log(substring, since=0)``, ``wait_for_line(pred, timeout, since)``,
    ``child_events(event, since=0, **fields)``, ``signal(sig)``, ``wait_exit(timeout)``,
    ``stop(timeout)``, ``alive()``, ``recorded_pids()``, ``kill_everything()``,
    ``http_get(path)``.
    """

    def __init__(
        self,
        workers: int = 2,
        env: dict[str, str] | None = None,
        config: str | os.PathLike | None = None,
        extra_args: list[str] | None = None,
        binary: str | os.PathLike | None = None,
        ready_workers: Iterable[int] | None = None,
        ready_roles: Iterable[str] | None = None,
        metrics: bool = True,
    ):
        self.workers = workers
        self.binary = Path(binary) if binary else chatgw_bin()
        self.config = Path(config) if config else DEFAULT_CONFIG
        self.extra_args = list(extra_args or [])
        self.host = "127.0.0.1"
        self.port = free_port()
        self.url = f"ws://{self.host}:{self.port}"
        self.http_url = f"http://{self.host}:{self.port}"
        self.tag = uuid.uuid4().hex
        self.tmp = Path(tempfile.mkdtemp(prefix="chatgw-e2e-"))
        self.state_dir = self.tmp / "state"
        self.log_path = self.tmp / "master.log"
        self.metrics_port = free_port() if metrics else None
        user_env = dict(env or {})
        extra = {}
        if self.metrics_port is not None and "CHATGW_METRICS_LISTEN" not in user_env:
            # keep the default 127.0.0.1:9090 free of clashes between gateways
            extra["CHATGW_METRICS_LISTEN"] = f"127.0.0.1:{self.metrics_port}"
        extra.update(user_env)
        self.env = base_env(extra, tag=self.tag)
        # which children must have logged `child ready` before start() returns
        self.ready_workers = list(range(workers)) if ready_workers is None else list(ready_workers)
        if ready_roles is None:
            ready_roles = [] if self.env.get("CHATGW_BUS_KIND", "relay") == "redis" else ["relay"]
        self.ready_roles = list(ready_roles)
        self.proc: subprocess.Popen | None = None
        self.started_at: float | None = None  # time.monotonic() at spawn
        self._log_file = None
        self._recorded: set[int] = set()

    # ---- lifecycle

    def argv(self) -> list[str]:
        return [
            str(self.binary),
            "--config", str(self.config),
            "--state-dir", str(self.state_dir),
            "--listen", f"{self.host}:{self.port}",
            "--workers", str(self.workers),
            *self.extra_args,
        ]

    def start(self, wait_ready: bool = True, timeout: float = 20.0) -> "Gateway":
        if not self.binary.exists():
            raise GatewayError(f"chatgw binary not found: {self.binary} (set CHATGW_BIN)")
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=self._log_file,
            env=self.env,
            cwd=str(self.tmp),
        )
        self.started_at = time.monotonic()
        self._recorded.add(self.proc.pid)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    @property
    def master_pid(self) -> int:
        assert self.proc is not None, "gateway not started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait for `listening on` and `child ready` of every expected worker slot and role."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.log_lines()
            listening = any("listening on" in l.text for l in lines)
            ready = {
                (l.fields.get("role"), l.get_int("slot"))
                for l in lines
                if l.text.startswith("child ready")
            }
            missing = [f"worker slot {s}" for s in self.ready_workers if ("worker", s) not in ready]
            missing += [r for r in self.ready_roles if not any(role == r for role, _ in ready)]
            if not listening:
                missing.insert(0, "listening on")
            if not missing:
                for l in lines:
                    pid = l.get_int("pid")
                    if pid and l.text.startswith("child ready"):
                        self._recorded.add(pid)
                return
            if not self.alive():
                raise GatewayError(
                    f"chatgw exited with {self.proc.returncode} before ready "
                    f"(missing: {', '.join(missing)}); log:\n{self.log_text()[-4000:]}"
                )
            if time.monotonic() >= deadline:
                raise GatewayError(
                    f"chatgw not ready after {timeout}s (missing: {', '.join(missing)}); "
                    f"log:\n{self.log_text()[-4000:]}"
                )
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        os.kill(self.master_pid, sig)

    def wait_exit(self, timeout: float) -> int:
        """Wait for the master to exit; return its exit code (negative: killed by signal)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise GatewayError(
                f"chatgw master {self.master_pid} still running after {timeout}s; "
                f"log tail:\n{self.log_text()[-3000:]}"
            ) from None

    def stop(self, timeout: float = 15.0, sig: int = _SIGTERM) -> int:
        """Graceful stop (SIGTERM by default); return the exit code."""
        if self.proc is None:
            return 0
        if self.alive():
            self.children()  # record pids before they go away
            self.signal(sig)
        return self.wait_exit(timeout)

    def recorded_pids(self) -> set[int]:
        """Every pid we have seen belong to this gateway: master, children from ps and log."""
        pids = set(self._recorded)
        for l in self.log_lines():
            if l.text.startswith("child ") and l.get_int("pid"):
                pids.add(l.get_int("pid"))
        return pids

    def kill_everything(self) -> None:
        """Finaliser: SIGKILL the master and every process of ours still alive, by pid."""
        if self.proc is not None and self.alive():
            try:
                self.children()
            except Exception:
                pass
        candidates = self.recorded_pids() | set(tagged_pids(self.tag))
        if self.proc is not None:
            candidates.discard(self.proc.pid)
            if self.proc.poll() is None:
                try:
                    self.proc.kill()
                except ProcessLookupError:
                    pass
        for pid in sorted(candidates):
            if pid_alive(pid) and _is_ours(pid, self.tag):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def cleanup(self, keep_dir: bool = False) -> None:
        self.kill_everything()
        if not keep_dir:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- children

    def children(self) -> list[Child]:
        """The master's current children, from `ps --ppid`: (pid, role, slot).

        Children are `chatgw relay` and `chatgw worker --slot N`; a child without
        `--slot` has slot 0.
        """
        if self.proc is None:
            return []
        r = subprocess.run(
            ["ps", "-ww", "-o", "pid=,stat=,args=", "--ppid", str(self.master_pid)],
            capture_output=True,
            text=True,
        )
        out = []
        for line in r.stdout.splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            pid, stat, args = int(parts[0]), parts[1], parts[2:]
            if stat.startswith("Z"):
                continue
            # `chatgw relay`, `chatgw worker --slot N` (tolerate a wrapper: `python3 .../chatgw worker`)
            words = [a for a in args[1:] if not a.startswith("-") and os.path.basename(a) != "chatgw"]
            role = words[0] if words else "?"
            slot = 0
            for i, a in enumerate(args):
                if a == "--slot" and i + 1 < len(args):
                    slot = int(args[i + 1])
                elif a.startswith("--slot="):
                    slot = int(a.split("=", 1)[1])
            out.append(Child(pid, role, slot))
            self._recorded.add(pid)
        return sorted(out, key=lambda c: (c.role, c.slot, c.pid))

    def child_pids(self) -> set[int]:
        return {c.pid for c in self.children()}

    def workers_by_slot(self) -> dict[int, int]:
        """slot -> pid of the current workers (ps)."""
        return {c.slot: c.pid for c in self.children() if c.role == "worker"}

    def relay_pid(self) -> int | None:
        for c in self.children():
            if c.role == "relay":
                return c.pid
        return None

    def wait_child(self, role: str, slot: int = 0, not_pid: int | None = None, timeout: float = 5.0) -> int | None:
        """Poll ps until a child with role/slot (and a pid other than not_pid) exists."""
        deadline = time.monotonic() + timeout
        while True:
            for c in self.children():
                if c.role == role and c.slot == slot and c.pid != not_pid:
                    return c.pid
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    # ---- logs

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_mark(self) -> int:
        """Current log length, to pass as ``since=`` (only look at what comes later)."""
        return len(self.log_text())

    def log_lines(self, since: int = 0) -> list[LogLine]:
        return [parse_log_line(l) for l in self.log_text()[since:].splitlines() if l.strip()]

    def find_log(self, substring: str, since: int = 0) -> list[LogLine]:
        return [l for l in self.log_lines(since) if substring in l.raw]

    def wait_for_log(self, substring: str, timeout: float = 10.0, since: int = 0) -> LogLine:
        """Wait for a log line containing substring (after offset since); return it parsed."""
        return self.wait_for_log_re(re.escape(substring), timeout, since)

    def wait_for_log_re(self, pattern: str, timeout: float = 10.0, since: int = 0) -> LogLine:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for l in self.log_lines(since):
                if rx.search(l.raw):
                    return l
            if time.monotonic() >= deadline:
                raise GatewayError(
                    f"no log line matching {pattern!r} within {timeout}s; log tail:\n"
                    f"{self.log_text()[-3000:]}"
                )
            time.sleep(0.02)

    def wait_for_line(self, pred: Callable[[LogLine], bool], timeout: float = 10.0, since: int = 0,
                      what: str = "matching line") -> LogLine:
        """Wait for a parsed log line with pred(line) true (after offset since)."""
        deadline = time.monotonic() + timeout
        while True:
            for l in self.log_lines(since):
                if pred(l):
                    return l
            if time.monotonic() >= deadline:
                raise GatewayError(f"no {what} in the log within {timeout}s; log tail:\n{self.log_text()[-3000:]}")
            time.sleep(0.02)

    def child_events(self, event: str, since: int = 0, **fields) -> list[LogLine]:
        """Log lines `child <event> ...` whose fields equal the given ones (compared as str)."""
        return [
            l for l in self.log_lines(since)
            if l.text.startswith(f"child {event}")
            and all(l.fields.get(k) == str(v) for k, v in fields.items())
        ]

    # ---- http

    def http_get(self, path: str, timeout: float = 5.0, headers: dict | None = None) -> tuple[int, bytes]:
        c = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            c.request("GET", path, headers=headers or {})
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()


@dataclass
class OnceResult:
    returncode: int | None  # None: timed out (and was killed)
    stdout: str
    stderr: str
    elapsed: float
    pid: int
    leftover: list[int]  # processes of this run still alive after it exited


def run_chatgw_once(
    args: list[str],
    env: dict[str, str] | None = None,
    timeout: float = 10.0,
    cwd: str | os.PathLike | None = None,
    binary: str | os.PathLike | None = None,
) -> OnceResult:
    """Run chatgw to completion (start-up error paths); kill it and its offspring after."""
    tag = uuid.uuid4().hex
    tmp = tempfile.mkdtemp(prefix="chatgw-e2e-once-")
    t0 = time.monotonic()
    p = subprocess.Popen(
        [str(binary or chatgw_bin()), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=base_env(env, tag=tag),
        cwd=str(cwd or tmp),
    )
    try:
        out, err = p.communicate(timeout=timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        rc = None
    elapsed = time.monotonic() - t0
    time.sleep(0.2)  # let any stray child show up before looking
    leftover = tagged_pids(tag)
    for pid in leftover:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(tmp, ignore_errors=True)
    return OnceResult(rc, out.decode(errors="replace"), err.decode(errors="replace"), elapsed, p.pid, leftover)


# --------------------------------------------------------------------------- websockets


def run_async(coro: Awaitable[Any], timeout: float = 55.0) -> Any:
    """asyncio.run with an overall timeout, so a test cannot hang."""

    async def main():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(main())


async def ws_connect(gw: Gateway, user: str | None = None, *, timeout: float = 10.0,
                     subprotocol: bool = True, path: str | None = None, **kw):
    """Open a WebSocket to gw (``/ws?user=...``); returns the connection (no frame read)."""
    if path is None:
        path = "/ws" if user is None else f"/ws?user={user}"
    opts = dict(
        open_timeout=timeout,
        close_timeout=2,
        ping_interval=None,
        compression=None,
        proxy=None,
        max_size=None,
        subprotocols=["chatgw.v1"] if subprotocol else None,
    )
    opts.update(kw)
    return await asyncio.wait_for(_ws_connect(gw.url + path, **opts), timeout + 1)


async def recv_json(ws, timeout: float = 5.0) -> dict:
    """Next text frame as JSON (raises TimeoutError / ConnectionClosed)."""
    raw = await asyncio.wait_for(ws.recv(), timeout)
    if isinstance(raw, bytes):
        raise AssertionError(f"expected a text frame, got binary {raw[:80]!r}")
    return json.loads(raw)


async def recv_until(ws, pred: Callable[[dict], bool], timeout: float = 5.0) -> tuple[dict, list[dict]]:
    """Receive until pred(msg); return (that message, the messages before it)."""
    deadline = asyncio.get_running_loop().time() + timeout
    skipped = []
    while True:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise asyncio.TimeoutError(f"no matching message within {timeout}s; got {skipped[-5:]}")
        msg = await recv_json(ws, left)
        if pred(msg):
            return msg, skipped
        skipped.append(msg)


def conn_slot(hello: dict) -> int | None:
    m = CONN_RE.match(str(hello.get("conn", "")))
    return int(m.group(1)) if m else None


async def connect_hello(gw: Gateway, user: str, timeout: float = 10.0, **kw):
    """Connect and read the `hello`; returns (ws, hello). Closes ws if hello is missing."""
    ws = await ws_connect(gw, user, timeout=timeout, **kw)
    try:
        hello = await recv_json(ws, timeout)
    except BaseException:
        await abort(ws)
        raise
    return ws, hello


async def abort(ws) -> None:
    try:
        ws.transport.abort()
    except Exception:
        pass


@dataclass
class OpenResult:
    conns: list[Any]  # websocket connections, parallel to hellos
    hellos: list[dict]
    errors: list[str]  # one line per failed connection

    def slots(self) -> list[int | None]:
        return [conn_slot(h) for h in self.hellos]

    def by_slot(self) -> dict[int | None, list[Any]]:
        out: dict[int | None, list[Any]] = {}
        for ws, h in zip(self.conns, self.hellos):
            out.setdefault(conn_slot(h), []).append(ws)
        return out


async def open_many(gw: Gateway, n: int, *, concurrency: int = 200, timeout: float = 10.0,
                    user_prefix: str = "u", **kw) -> OpenResult:
    """Open n connections (bounded concurrency), read each one's hello.

    Failures don't raise: they are listed in ``errors`` (the connection is dropped).
    Connections come back in the order they were requested, failures left out.
    """
    sem = asyncio.Semaphore(concurrency)
    results: list[Any] = [None] * n

    async def one(i: int):
        async with sem:
            try:
                results[i] = await connect_hello(gw, f"{user_prefix}{i}", timeout=timeout, **kw)
            except Exception as e:  # noqa: BLE001 -- report, don't raise
                results[i] = f"#{i}: {type(e).__name__}: {e}"

    await asyncio.gather(*(one(i) for i in range(n)))
    res = OpenResult([], [], [])
    for r in results:
        if isinstance(r, tuple):
            res.conns.append(r[0])
            res.hellos.append(r[1])
        else:
            res.errors.append(str(r))
    return res


async def close_all(conns: Iterable[Any], timeout: float = 5.0, concurrency: int = 200) -> None:
    """Close connections politely (bounded), then abort whatever did not finish."""
    conns = list(conns)
    sem = asyncio.Semaphore(concurrency)

    async def one(ws):
        async with sem:
            try:
                await asyncio.wait_for(ws.close(), 2)
            except Exception:  # noqa: BLE001
                await abort(ws)

    try:
        await asyncio.wait_for(asyncio.gather(*(one(ws) for ws in conns)), timeout)
    except asyncio.TimeoutError:
        pass
    for ws in conns:
        await abort(ws)


@dataclass
class CloseRecord:
    messages: list[Any]  # parsed JSON text frames (raw bytes for binary frames)
    code: int | None  # close code received from the server (None: no close frame)
    reason: str | None
    closed_at: float | None  # loop time when the connection was seen closed
    error: str | None = None  # timeout or unexpected exception


async def collect_until_close(ws, timeout: float = 15.0) -> CloseRecord:
    """Read every frame until the connection closes (or timeout)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    msgs: list[Any] = []
    while True:
        left = deadline - loop.time()
        if left <= 0:
            await abort(ws)
            return CloseRecord(msgs, None, None, None, f"not closed within {timeout}s")
        try:
            raw = await asyncio.wait_for(ws.recv(), left)
        except ConnectionClosed as e:
            rcvd = e.rcvd
            return CloseRecord(msgs, rcvd.code if rcvd else None, rcvd.reason if rcvd else None, loop.time())
        except asyncio.TimeoutError:
            continue
        except Exception as e:  # noqa: BLE001
            return CloseRecord(msgs, None, None, loop.time(), f"{type(e).__name__}: {e}")
        if isinstance(raw, bytes):
            msgs.append(raw)
        else:
            try:
                msgs.append(json.loads(raw))
            except ValueError:
                msgs.append(raw)


def check_shutdown_bye(rec: CloseRecord, reason: str = "shutdown", code: int = 1001) -> str | None:
    """None if rec ends with bye(reason, integer retry_ms) then close code; else why not."""
    if rec.error:
        return rec.error
    byes = [m for m in rec.messages if isinstance(m, dict) and m.get("type") == "bye"]
    if not byes:
        return f"no bye (messages: {rec.messages[-3:]}, close code {rec.code})"
    bye = byes[-1]
    if rec.messages[-1] is not bye:
        return f"bye is not the last message: {rec.messages[-3:]}"
    if bye.get("reason") != reason:
        return f"bye reason {bye.get('reason')!r} != {reason!r}"
    rm = bye.get("retry_ms")
    if not isinstance(rm, int) or isinstance(rm, bool) or rm < 0:
        return f"bye retry_ms not a non-negative integer: {rm!r}"
    if rec.code != code:
        return f"close code {rec.code} != {code}"
    return None


async def ping_ok(ws, timeout: float = 2.0) -> bool:
    """Send a WebSocket ping and wait for its pong."""
    try:
        waiter = await asyncio.wait_for(ws.ping(), timeout)
        await asyncio.wait_for(waiter, timeout)
        return True
    except (asyncio.TimeoutError, ConnectionClosed):
        return False


# ---- protocol helpers (rooms etc.)

_ref_counter = 0


def next_ref(prefix: str = "r") -> str:
    global _ref_counter
    _ref_counter += 1
    return f"{prefix}{_ref_counter}"


async def send_json(ws, obj: dict) -> None:
    await ws.send(json.dumps(obj, separators=(",", ":")))


async def join_room(ws, room: str, timeout: float = 5.0, **fields) -> tuple[dict, list[dict]]:
    """Send join, wait for `joined` (or an `error` for it); returns (reply, earlier msgs)."""
    ref = fields.pop("ref", None) or next_ref("j")
    await send_json(ws, {"type": "join", "room": room, "ref": ref, **fields})
    return await recv_until(
        ws,
        lambda m: (m.get("type") == "joined" and m.get("room") == room)
        or (m.get("type") == "error" and m.get("ref") == ref),
        timeout,
    )


async def send_message(ws, room: str, text: str, ref: str | None = None, wait_ack: bool = True,
                       timeout: float = 5.0) -> dict | None:
    """Send `send`; with wait_ack, return the `ack` (or `error`) for its ref."""
    ref = ref or next_ref("s")
    await send_json(ws, {"type": "send", "room": room, "text": text, "ref": ref})
    if not wait_ack:
        return None
    msg, _ = await recv_until(
        ws, lambda m: m.get("ref") == ref and m.get("type") in ("ack", "error"), timeout
    )
    return msg


async def app_ping(ws, timeout: float = 5.0) -> dict:
    """Application-level ping -> pong with the same ref."""
    ref = next_ref("p")
    await send_json(ws, {"type": "ping", "ref": ref})
    msg, _ = await recv_until(ws, lambda m: m.get("type") == "pong" and m.get("ref") == ref, timeout)
    return msg


# --------------------------------------------------------------------------- room traffic
#
# Shared by test_rooms.py, test_redis_bus.py, test_archive.py and test_operations.py.


def first_lines(items, n: int = 5) -> str:
    """The first n items, one a line (for assertion messages)."""
    return "\n".join(str(x) for x in list(items)[:n])


class Inbox:
    """Reads every frame of one connection in the background (JSON, with loop time).

    ``msgs`` and ``times`` are the frames and when they came, ``counts`` the frames per
    type. Once the connection ended, ``ended`` is true, ``closed`` is the
    ``ConnectionClosed`` (True after a clean end), ``error`` any other exception,
    ``closed_code`` the server's close code (None when no close frame came) and
    ``closed_at`` the loop time. ``done`` is also true after ``stop()``.
    """

    def __init__(self, ws, name: str = ""):
        self.ws, self.name = ws, name
        self.msgs: list[dict] = []
        self.times: list[float] = []
        self.counts: Counter = Counter()  # frames per type
        self.closed: ConnectionClosed | bool | None = None
        self.error: str | None = None
        self.ended = False
        self.closed_code: int | None = None
        self.closed_at: float | None = None
        self._task = asyncio.create_task(self._run())

    async def _run(self):
        loop = asyncio.get_running_loop()
        try:
            async for raw in self.ws:
                self.times.append(loop.time())
                m = json.loads(raw) if isinstance(raw, str) else {"type": "<binary>", "raw": raw}
                self.msgs.append(m)
                self.counts[m.get("type")] += 1
        except ConnectionClosed as e:
            self.closed = e
        except Exception as e:  # noqa: BLE001
            self.error = f"{type(e).__name__}: {e}"
        else:
            self.closed = True
        self.ended = True
        self.closed_at = loop.time()
        rcvd = getattr(getattr(self.ws, "protocol", None), "close_rcvd", None)
        self.closed_code = rcvd.code if rcvd is not None else None

    @property
    def done(self) -> bool:
        return self._task.done()

    def end_text(self) -> str:
        """How the connection ended: close code, then the ConnectionClosed or the error."""
        return f"code {self.closed_code}, {self.closed or self.error}"

    def of(self, type_: str, room: str | None = None) -> list[dict]:
        return [m for m in self.msgs if m.get("type") == type_ and (room is None or m.get("room") == room)]

    async def wait(self, pred: Callable[["Inbox"], bool], timeout: float, what: str = "condition") -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not pred(self):
            if loop.time() >= deadline:
                raise AssertionError(f"{self.name}: no {what} within {timeout}s; last frames {self.msgs[-5:]}")
            if self.done and not pred(self):
                raise AssertionError(f"{self.name}: connection ended ({self.end_text()}) before {what}; "
                                     f"last frames {self.msgs[-5:]}")
            await asyncio.sleep(0.01)

    async def wait_end(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def stop(self):
        self._task.cancel()


async def wait_all(inboxes, pred, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        pending = [ib for ib in inboxes if not pred(ib)]
        if not pending:
            return
        dead = [ib for ib in pending if ib.done]
        if dead:
            ib = dead[0]
            raise AssertionError(f"{len(dead)} connections ended before {what}, e.g. {ib.name}: "
                                 f"{ib.end_text()}; last frames {ib.msgs[-3:]}")
        if loop.time() >= deadline:
            ib = pending[0]
            raise AssertionError(f"{len(pending)} of {len(inboxes)} connections without {what} after {timeout}s; "
                                 f"e.g. {ib.name} has {len(ib.msgs)} frames, last {ib.msgs[-3:]}")
        await asyncio.sleep(0.02)


async def read_frames(ws, n: int, timeout: float = 5.0) -> list[dict]:
    """Exactly the next n frames."""
    out = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(out) < n:
        left = deadline - loop.time()
        if left <= 0:
            raise AssertionError(f"got {len(out)} of {n} frames in {timeout}s; last {out[-3:]}")
        out.append(await recv_json(ws, left))
    return out


async def assert_quiet_until_pong(ws, what: str, timeout: float = 5.0) -> None:
    """Ping; the very next frame must be the pong (nothing else was pending)."""
    ref = f"q{time.monotonic_ns()}"
    await send_json(ws, {"type": "ping", "ref": ref})
    msg = await recv_json(ws, timeout)
    assert msg == {"type": "pong", "ref": ref}, f"{what}: expected only the pong, got {msg}"


async def send_many(ws, room: str, texts: list[str], ref_prefix: str, timeout: float = 15.0) -> list[dict]:
    """Send each text with a ref; read until every ack; return the sender's frames."""
    for i, t in enumerate(texts):
        await send_json(ws, {"type": "send", "room": room, "text": t, "ref": f"{ref_prefix}{i}"})
    want = {f"{ref_prefix}{i}" for i in range(len(texts))}
    frames = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while want:
        left = deadline - loop.time()
        if left <= 0:
            raise AssertionError(f"{len(want)} of {len(texts)} sends without ack after {timeout}s; last {frames[-3:]}")
        m = await recv_json(ws, left)
        frames.append(m)
        if m.get("type") == "error" and m.get("ref") in want:
            raise AssertionError(f"send refused: {m}")
        if m.get("type") == "ack":
            want.discard(m.get("ref"))
    return frames


def check_consecutive(seqs: list[int], what: str) -> None:
    bad = [(a, b) for a, b in zip(seqs, seqs[1:]) if b != a + 1]
    assert not bad, f"{what}: seq not rising by 1 at {bad[:5]} (of {len(seqs)} messages)"


async def join_all_then_last(conns: list[Any], names: list[str], room: str, timeout: float,
                             context: str = "") -> tuple[set, int]:
    """All but the last of conns join room at once (each within timeout), then the last one.

    Every reply must be `joined` with no frame before it, the last one must count every
    connection as a member (``context`` is added to that message), and all replies must
    name one epoch and one seq. Returns ({epoch}, seq).
    """
    replies = await asyncio.gather(*(join_room(ws, room, timeout=timeout) for ws in conns[:-1]))
    for (reply, before), name in zip(replies, names):
        assert reply.get("type") == "joined", f"{name}: {reply}"
        assert not before, f"{name}: frames before joined: {before}"
    last, _ = await join_room(conns[-1], room)
    assert last.get("type") == "joined", last
    assert last.get("members") == len(conns), (
        f"joined.members of the last joiner ({names[-1]}): {last.get('members')}, expected {len(conns)} ({context})"
    )
    epochs = {r.get("epoch") for r, _ in replies} | {last.get("epoch")}
    assert len(epochs) == 1, f"joined epochs differ: {epochs}"
    start_seq = last["seq"]
    assert all(r["seq"] == start_seq for r, _ in replies), {r["seq"] for r, _ in replies}
    return epochs, start_seq


async def send_numbered(ws, room: str, user: str, n: int) -> None:
    """Send `user:k` with ref `user-k` for k in 0..n-1, without reading."""
    for k in range(n):
        await send_json(ws, {"type": "send", "room": room, "text": f"{user}:{k}", "ref": f"{user}-{k}"})


def check_fanout(inboxes: list[Inbox], room: str, users: list[str], senders: list[int], per_sender: int,
                 total: int, start_seq: int, epochs: set, check_from: bool = False) -> None:
    """After ``send_numbered`` from each of senders (indexes into inboxes and users):

    every inbox holds exactly the total messages, no error, seqs consecutive from
    start_seq + 1 in epochs, the same order everywhere and each sender's in the order
    sent (with check_from: `from` is the sender named in the text); every sender got
    per_sender acks, each after its own message and with its seq.
    """
    expected_texts = {f"{users[i]}:{k}" for i in senders for k in range(per_sender)}
    reference = None
    for ib in inboxes:
        errors = ib.of("error")
        assert not errors, f"{ib.name}: errors {errors[:3]}"
        msgs = ib.of("message", room)
        assert len(msgs) == total, f"{ib.name}: {len(msgs)} messages, expected {total}"
        seqs = [m["seq"] for m in msgs]
        check_consecutive(seqs, ib.name)
        assert seqs[0] == start_seq + 1, f"{ib.name}: first seq {seqs[0]}, joined.seq was {start_seq}"
        assert {m["epoch"] for m in msgs} == epochs, f"{ib.name}: epochs {set(m['epoch'] for m in msgs)}"
        texts = [m["text"] for m in msgs]
        assert set(texts) == expected_texts and len(set(texts)) == total, f"{ib.name}: texts differ"
        seq_list = [(m["seq"], m["from"], m["text"]) for m in msgs]
        if reference is None:
            reference = (ib.name, seq_list)
        else:
            diff = next((x for x in zip(seq_list, reference[1]) if x[0] != x[1]), None)
            assert seq_list == reference[1], f"{ib.name}: order differs from {reference[0]}: first difference {diff}"
        if check_from:
            bad_from = [m for m in msgs if m["text"].split(":")[0] != m["from"]]
            assert not bad_from, f"{ib.name}: from does not match the sender: {bad_from[:3]}"
        # per sender, its messages arrive in the order sent
        per = {}
        for m in msgs:
            per.setdefault(m["from"], []).append(int(m["text"].split(":")[1]))
        assert all(v == list(range(per_sender)) for v in per.values()), f"{ib.name}: per-sender order broken"

    for i in senders:
        ib, u = inboxes[i], users[i]
        acks = ib.of("ack")
        assert len(acks) == per_sender, f"{ib.name}: {len(acks)} acks"
        index_of_msg = {m["text"]: (j, m) for j, m in enumerate(ib.msgs) if m.get("type") == "message"}
        for j, ack in enumerate(ib.msgs):
            if ack.get("type") != "ack":
                continue
            k = int(ack["ref"].split("-")[-1])
            mj, m = index_of_msg[f"{u}:{k}"]
            assert mj < j, f"{ib.name}: ack {ack} arrived before its message {m}"
            assert ack.get("seq") == m["seq"] and ack.get("room") == room, f"{ib.name}: ack {ack} for message {m}"


# --------------------------------------------------------------------------- fixtures


class _HardTimeout(BaseException):
    pass


@pytest.fixture(autouse=True)
def _hard_timeout():
    """Fail (not hang) any test that runs longer than TEST_HARD_TIMEOUT_S."""

    def on_alarm(signum, frame):
        raise _HardTimeout(f"test exceeded {TEST_HARD_TIMEOUT_S}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, TEST_HARD_TIMEOUT_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def make_gateway(request):
    """Factory: ``gw = make_gateway(workers=2, env={...}, wait_ready=True, ...)``.

    Keyword arguments go to ``Gateway(...)`` except ``wait_ready`` and
    ``ready_timeout``, which go to ``start``. Every gateway is killed (by pid) at
    teardown; its temp dir is removed unless the test failed (then its path and log
    tail are printed).
    """
    made: list[Gateway] = []

    def factory(wait_ready: bool = True, ready_timeout: float = 20.0, **kw) -> Gateway:
        gw = Gateway(**kw)
        made.append(gw)
        gw.start(wait_ready=wait_ready, timeout=ready_timeout)
        return gw

    yield factory

    rep = getattr(request.node, "rep_call", None)
    failed = rep is None or rep.failed
    for gw in made:
        gw.kill_everything()
        if failed:
            print(f"\n[e2e] gateway state dir kept: {gw.tmp}\n[e2e] log tail:\n{gw.log_text()[-2000:]}")
        else:
            gw.cleanup()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


# --------------------------------------------------------------------------- frame-level helpers
#
# Added for test_rooms.py / test_bad_input.py. A hand-written RFC 6455 client on raw
# sockets, for what the websockets library will not do: invalid UTF-8, thousands of
# fragments, a client that never reads, half a handshake, plain HTTP on /ws.

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def ws_frame(opcode: int, payload: bytes | str = b"", fin: bool = True, mask: bool = True,
             rsv: int = 0) -> bytes:
    """Encode one WebSocket frame (client frames are masked, as RFC 6455 requires)."""
    if isinstance(payload, str):
        payload = payload.encode()
    head = bytearray([(0x80 if fin else 0) | ((rsv & 7) << 4) | (opcode & 0x0F)])
    n = len(payload)
    mbit = 0x80 if mask else 0
    if n < 126:
        head.append(mbit | n)
    elif n < 1 << 16:
        head.append(mbit | 126)
        head += n.to_bytes(2, "big")
    else:
        head.append(mbit | 127)
        head += n.to_bytes(8, "big")
    if not mask:
        return bytes(head) + payload
    key = os.urandom(4)
    if n:
        # XOR with the repeated key, fast for big payloads
        k = (key * (n // 4 + 1))[:n]
        payload = (int.from_bytes(payload, "little") ^ int.from_bytes(k, "little")).to_bytes(n, "little")
    return bytes(head) + key + payload


def close_payload(code: int, reason: str = "") -> bytes:
    return code.to_bytes(2, "big") + reason.encode()


def upgrade_request(gw: "Gateway", path: str = "/ws", headers: dict | None = None,
                    subprotocol: bool = True) -> bytes:
    """The bytes of a WebSocket upgrade request for path."""
    import base64

    h = {
        "Host": f"{gw.host}:{gw.port}",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
    }
    if subprotocol:
        h["Sec-WebSocket-Protocol"] = "chatgw.v1"
    h.update(headers or {})
    lines = [f"GET {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in h.items() if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class HTTPReply:
    status: int | None  # None: no status line before the connection ended / timed out
    headers: dict[str, str]  # lower-cased names
    body: bytes
    raw: bytes


def _parse_http_reply(data: bytes) -> HTTPReply:
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return HTTPReply(None, {}, b"", data)
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        status = None
    headers = {}
    for l in lines[1:]:
        k, _, v = l.partition(":")
        headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        try:
            rest = rest[: int(headers["content-length"])]
        except ValueError:
            pass
    return HTTPReply(status, headers, rest, data)


def raw_http(gw: "Gateway", request: bytes, timeout: float = 5.0, read_body: bool = True) -> HTTPReply:
    """Send request bytes on a fresh TCP connection, read the HTTP reply (blocking).

    Reads until the header block and Content-Length bytes of body are in (or EOF, or
    timeout). With read_body=False stops after the header block (e.g. a 101 reply).
    """
    deadline = time.monotonic() + timeout
    with socket.create_connection((gw.host, gw.port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            data += chunk
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                if not read_body:
                    break
                m = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
                if m and len(rest) >= int(m.group(1)):
                    break
                if not m and re.match(rb"HTTP/1\.1 (101|1\d\d|204|304)", head):
                    break
        return _parse_http_reply(data)


class RawClosed(Exception):
    """The server sent a close frame (code None: no code) or the TCP connection ended."""

    def __init__(self, code: int | None, reason: str = "", eof: bool = False):
        super().__init__(f"closed code={code} reason={reason!r} eof={eof}")
        self.code, self.reason, self.eof = code, reason, eof


@dataclass
class RawEnd:
    """How a RawWS ended (see RawWS.wait_close)."""

    frames: list[tuple[int, bytes]]  # (opcode, payload) of the data frames read before the end
    close_code: int | None  # code of the server's close frame (None: none seen / no code)
    close_reason: str | None
    eof: bool  # the TCP connection ended (EOF or reset)
    error: str | None = None  # timeout: still open

    def json_messages(self) -> list[Any]:
        out = []
        for op, p in self.frames:
            if op == OP_TEXT:
                try:
                    out.append(json.loads(p))
                except ValueError:
                    out.append(p)
            else:
                out.append(p)
        return out


class RawWS:
    """A minimal asyncio WebSocket client on a raw TCP stream (frame-level tests).

    ``await RawWS.open(gw, "alice")`` does the handshake (asserting 101) and returns
    the client; ``hello`` is not read. ``recv_frame`` returns (fin, opcode, payload)
    of the next frame, ``recv_json`` the next text message as JSON (answering pings,
    reassembling fragments), ``wait_close`` reads to the end. ``rcvbuf`` sets
    SO_RCVBUF before connecting and ``limit`` the asyncio reader's buffer, so a
    client that stops reading makes the server see backpressure quickly.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.handshake: HTTPReply | None = None
        self._buf = bytearray()
        self._eof = False

    @classmethod
    async def connect_tcp(cls, gw: "Gateway", timeout: float = 5.0, rcvbuf: int | None = None,
                          limit: int = 2 ** 16) -> "RawWS":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (gw.host, gw.port)), timeout)
            reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
        except BaseException:
            sock.close()
            raise
        return cls(reader, writer)

    @classmethod
    async def open(cls, gw: "Gateway", user: str | None = None, *, path: str | None = None,
                   timeout: float = 5.0, rcvbuf: int | None = None, limit: int = 2 ** 16,
                   headers: dict | None = None) -> "RawWS":
        if path is None:
            path = "/ws" if user is None else f"/ws?user={user}"
        c = await cls.connect_tcp(gw, timeout, rcvbuf, limit)
        try:
            c.writer.write(upgrade_request(gw, path, headers))
            await c.writer.drain()
            head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), timeout)
            c.handshake = _parse_http_reply(head)
            if c.handshake.status != 101:
                raise AssertionError(f"upgrade refused: {head[:300]!r}")
        except BaseException:
            c.abort()
            raise
        return c

    # -- writing
    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_frame(self, opcode: int, payload: bytes | str = b"", fin: bool = True,
                         mask: bool = True) -> None:
        await self.send_raw(ws_frame(opcode, payload, fin, mask))

    async def send_text(self, payload: bytes | str) -> None:
        await self.send_frame(OP_TEXT, payload)

    async def send_json(self, obj: dict) -> None:
        await self.send_text(json.dumps(obj, separators=(",", ":")))

    # -- reading
    async def recv_frame(self, timeout: float = 5.0) -> tuple[bool, int, bytes]:
        """Next frame: (fin, opcode, payload). Raises RawClosed(eof=True) at EOF/reset.

        Bytes are buffered in the client, so a timeout never loses part of a frame.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            f = self._take_frame()
            if f is not None:
                return f
            if self._eof:
                raise RawClosed(None, "EOF", eof=True)
            left = deadline - loop.time()
            if left <= 0:
                raise asyncio.TimeoutError(f"no complete frame within {timeout}s")
            try:
                chunk = await asyncio.wait_for(self.reader.read(1 << 16), left)
            except asyncio.TimeoutError:
                continue
            except ConnectionError:
                chunk = b""
            if not chunk:
                self._eof = True
            self._buf += chunk

    def _take_frame(self) -> tuple[bool, int, bytes] | None:
        b = self._buf
        if len(b) < 2:
            return None
        b0, b1 = b[0], b[1]
        n = b1 & 0x7F
        i = 2
        if n == 126:
            if len(b) < 4:
                return None
            n, i = int.from_bytes(b[2:4], "big"), 4
        elif n == 127:
            if len(b) < 10:
                return None
            n, i = int.from_bytes(b[2:10], "big"), 10
        key = None
        if b1 & 0x80:
            if len(b) < i + 4:
                return None
            key, i = bytes(b[i:i + 4]), i + 4
        if len(b) < i + n:
            return None
        payload = bytes(b[i:i + n])
        del b[:i + n]
        if key:
            payload = bytes(x ^ key[j % 4] for j, x in enumerate(payload))
        return bool(b0 & 0x80), b0 & 0x0F, payload

    async def recv_message(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """Next data message (opcode, payload), reassembled; pings answered.

        A close frame raises RawClosed(code, reason) (after echoing the close).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        parts: list[bytes] = []
        first_op = None
        while True:
            fin, op, payload = await self.recv_frame(max(0.01, deadline - loop.time()))
            if op == OP_PING:
                try:
                    await self.send_frame(OP_PONG, payload)
                except ConnectionError:
                    pass
                continue
            if op == OP_PONG:
                continue
            if op == OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                try:
                    await self.send_frame(OP_CLOSE, payload[:2])
                except ConnectionError:
                    pass
                raise RawClosed(code, payload[2:].decode(errors="replace"))
            if first_op is None:
                first_op = op
            parts.append(payload)
            if fin:
                return first_op, b"".join(parts)

    async def recv_json(self, timeout: float = 5.0) -> dict:
        op, payload = await self.recv_message(timeout)
        if op != OP_TEXT:
            raise AssertionError(f"expected a text message, got opcode {op}: {payload[:80]!r}")
        return json.loads(payload)

    async def recv_json_until(self, pred: Callable[[dict], bool], timeout: float = 5.0) -> tuple[dict, list[dict]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        skipped = []
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise asyncio.TimeoutError(f"no matching message within {timeout}s; got {skipped[-5:]}")
            m = await self.recv_json(left)
            if pred(m):
                return m, skipped
            skipped.append(m)

    async def wait_close(self, timeout: float = 5.0) -> RawEnd:
        """Read everything until the server's close frame or the end of the TCP stream."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        frames: list[tuple[int, bytes]] = []
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return RawEnd(frames, None, None, False, f"still open after {timeout}s")
            try:
                op, payload = await self.recv_message(left)
            except RawClosed as e:
                if e.eof:
                    return RawEnd(frames, None, None, True)
                # close frame: wait (briefly) for the TCP end as well
                eof = False
                try:
                    while True:
                        await self.recv_frame(min(1.0, max(0.01, deadline - loop.time())))
                except RawClosed:
                    eof = True
                except asyncio.TimeoutError:
                    pass
                return RawEnd(frames, e.code, e.reason, eof)
            except asyncio.TimeoutError:
                continue
            frames.append((op, payload))

    def abort(self) -> None:
        try:
            self.writer.transport.abort()
        except Exception:  # noqa: BLE001
            pass


# --------------------------------------------------------------------------- placement helpers


async def connect_on_slot(gw: "Gateway", slot: int, user_prefix: str = "s", tries: int = 60,
                          timeout: float = 5.0, **kw):
    """Connect until a connection lands on worker slot; returns (ws, hello).

    Connections that land elsewhere are closed. Raises AssertionError after tries.
    """
    seen = []
    for i in range(tries):
        ws, hello = await connect_hello(gw, f"{user_prefix}{i}", timeout=timeout, **kw)
        s = conn_slot(hello)
        if s == slot:
            return ws, hello
        seen.append(s)
        await close_all([ws])
    raise AssertionError(f"no connection landed on slot {slot} in {tries} tries (got slots {seen})")


async def one_per_slot(gw: "Gateway", slots: Iterable[int], user_prefix: str = "w", tries: int = 80,
                       timeout: float = 5.0, **kw) -> dict[int, tuple[Any, dict]]:
    """One connection on each of the given worker slots: {slot: (ws, hello)}."""
    want = set(slots)
    got: dict[int, tuple[Any, dict]] = {}
    extra = []
    for i in range(tries):
        if want <= set(got):
            break
        ws, hello = await connect_hello(gw, f"{user_prefix}{i}", timeout=timeout, **kw)
        s = conn_slot(hello)
        if s in want and s not in got:
            got[s] = (ws, hello)
        else:
            extra.append(ws)
    await close_all(extra)
    if not want <= set(got):
        await close_all([ws for ws, _ in got.values()])
        raise AssertionError(f"could not place a connection on every slot of {sorted(want)} (got {sorted(got)})")
    return got


def room_msgs(msgs: Iterable[Any], room: str, types: Iterable[str] = ("message",)) -> list[dict]:
    """The frames of the given types for room, in order."""
    types = set(types)
    return [m for m in msgs if isinstance(m, dict) and m.get("type") in types and m.get("room") == room]


async def wait_bus_ready(gw: "Gateway", slots: Iterable[int] | None = None, timeout: float = 5.0,
                         room: str = "e2e-bus-probe") -> dict[int, float]:
    """Wait until a join succeeds on every worker slot (the bus link is up there).

    A worker may report ready before its relay link is up; joins then get
    `unavailable`. Returns {slot: seconds waited}. Raises AssertionError on timeout.
    """
    slots = list(range(gw.workers)) if slots is None else list(slots)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    placed = await one_per_slot(gw, slots, user_prefix="probe", timeout=timeout)
    waited: dict[int, float] = {}
    try:
        for slot, (ws, _) in placed.items():
            last = None
            while True:
                reply, _ = await join_room(ws, room, timeout=timeout)
                if reply.get("type") == "joined":
                    await send_json(ws, {"type": "leave", "room": room})
                    await recv_until(ws, lambda m: m.get("type") in ("left", "error"), timeout)
                    waited[slot] = loop.time() - t0
                    break
                last = reply
                if loop.time() - t0 > timeout:
                    raise AssertionError(f"slot {slot}: joins still refused after {timeout}s: {last}")
                # (a refused join may cost a rate token: don't turn the probe into a flood)
                await asyncio.sleep(1.1 if reply.get("code") == "rate_limited" else 0.1)
    finally:
        await close_all([ws for ws, _ in placed.values()])
    return waited
