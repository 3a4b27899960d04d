"""The chatgw master under test: ``Gateway`` (one master on free loopback ports with a
temporary state dir) and ``run_chatgw_once`` (run the binary to completion)."""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from chatgw_e2e.logs import LogLine, parse_log_line
from chatgw_e2e.procs import TAG_ENV, free_port, is_ours, pid_alive, tagged_pids

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_CONFIG = REPO_ROOT / "etc" / "chatgw.yaml"

_SIGTERM = signal.SIGTERM  # (Gateway.signal shadows the module inside the class body)


def chatgw_bin() -> Path:
    p = Path(os.environ.get("CHATGW_BIN", ".build/debug/chatgw"))
    if not p.is_absolute():
        p = REPO_ROOT / p
    return p


def base_env(extra: dict[str, str] | None = None, tag: str | None = None) -> dict[str, str]:
    """The environment for a chatgw: ours without any CHATGW_* override, plus extra.

    ``CHATGW_E2E_ENGINE`` (nio or epoll), when set, picks the workers' client engine
    (``server.engine``) for every gateway a test starts that does not pick one itself:
    ``scripts/test`` runs the suite with each.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATGW_")}
    if os.environ.get("CHATGW_E2E_ENGINE"):
        env["CHATGW_SERVER_ENGINE"] = os.environ["CHATGW_E2E_ENGINE"]
    if tag:
        env[TAG_ENV] = tag
    env.update(extra or {})
    return env


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
        # Ports free_port() picked: free when picked, but another process (a client's
        # ephemeral port, another test's server) may take one before chatgw binds it.
        self._picked_metrics = self.metrics_port is not None and "CHATGW_METRICS_LISTEN" not in user_env
        if self._picked_metrics:
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
            try:
                self.wait_ready(timeout)
            except GatewayError:
                if not self._lost_a_port_race(tries_left=3):
                    raise
                return self.start(wait_ready, timeout)
        return self

    def _lost_a_port_race(self, tries_left: int) -> bool:
        """The master exited because a port we picked was taken meanwhile: pick new ones."""
        self._tries = getattr(self, "_tries", tries_left)
        if self.alive() or "address already in use" not in self.log_text() or self._tries <= 0:
            return False
        self._tries -= 1
        self._log_file.close()
        self.port = free_port()
        self.url = f"ws://{self.host}:{self.port}"
        self.http_url = f"http://{self.host}:{self.port}"
        if self._picked_metrics:
            self.metrics_port = free_port()
            self.env["CHATGW_METRICS_LISTEN"] = f"127.0.0.1:{self.metrics_port}"
        return True

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
            if pid_alive(pid) and is_ours(pid, self.tag):
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
