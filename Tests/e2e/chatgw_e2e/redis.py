"""Helpers for the Redis bus end-to-end tests (test_redis_bus.py).

Nothing here needs a pip package: Redis is inspected through a tiny RESP2 client on a
plain socket (``Resp``) or ``redis-cli``.

* ``RedisServer`` -- one real ``redis-server`` (``REDIS_SERVER``, default from PATH or
  /usr/bin/redis-server) on a free loopback port with a temporary ``--dir``, no
  persistence (``--save '' --appendonly no``). ``start()`` waits for PING; ``stop()``
  sends SIGTERM to its pid, then SIGKILL; ``restart()`` starts it again on the same port
  (a restart without persistence loses every key, as a real Redis crash would).
  ``cmd(*args)`` runs one command (a fresh ``Resp`` connection), ``cli(*args)`` runs
  ``redis-cli -p PORT``, ``clients()`` is CLIENT LIST (without the asking connection).
* fixtures ``redis_server`` (one started server) and ``make_redis`` (factory); both
  stop what they started, by pid, at teardown.
* ``FakeRedis`` -- a TCP server on a free loopback port that is not Redis: it answers
  every command with garbage (``garbage``), with ``+OK`` (``ok``), or closes each
  connection at once (``close``); ``fake_redis`` fixture factory.
* ``redis_env(url, **extra)`` -- the gateway environment for ``bus.kind: redis`` (no rate
  limits to speak of, archive off).
* ``pids_alive(pids)`` -- {pid: alive}.

The WebSocket helpers these tests share with test_rooms.py (``Inbox``, ``wait_all``,
``read_frames``, ``send_many``, ``assert_quiet_until_pong``, ``check_consecutive``) live
in rooms.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import pytest

from chatgw_e2e.procs import free_port, pid_alive

FAST = {"CHATGW_LIMITS_RATE_PER_S": "100000", "CHATGW_LIMITS_BURST": "100000"}

# These tests are about the bus: the archive (v1.1, where the binary has it) stays off, so
# resume and gaps come from the Redis history alone. Binaries without an archive ignore it.
NO_ARCHIVE = {"CHATGW_ARCHIVE_KIND": "none"}


def redis_server_bin() -> str:
    return os.environ.get("REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"


def redis_cli_bin() -> str:
    return os.environ.get("REDIS_CLI") or shutil.which("redis-cli") or "/usr/bin/redis-cli"


def redis_env(url: str, **extra: str) -> dict[str, str]:
    """Environment for a gateway on the Redis bus at url (plus FAST rate limits)."""
    env = {"CHATGW_BUS_KIND": "redis", "CHATGW_BUS_REDIS_URL": url, **FAST, **NO_ARCHIVE}
    env.update({k: str(v) for k, v in extra.items()})
    return env


# --------------------------------------------------------------------------- RESP client


class RespError(Exception):
    """An error reply (-ERR ...) from Redis."""


class Resp:
    """A minimal blocking RESP2 client: ``Resp(port).command("XLEN", key)``.

    Replies: bulk -> bytes, status -> str, integer -> int, array -> list, nil -> None;
    an error reply raises RespError.
    """

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 3.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")

    @staticmethod
    def encode(args: Iterable[Any]) -> bytes:
        parts = []
        args = list(args)
        parts.append(b"*%d\r\n" % len(args))
        for a in args:
            if isinstance(a, str):
                a = a.encode()
            elif isinstance(a, int):
                a = str(a).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
        return b"".join(parts)

    def _line(self) -> bytes:
        line = self.file.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError(f"connection to Redis ended (read {line!r})")
        return line[:-2]

    def _reply(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RespError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.file.read(n + 2)
            return data[:-2]
        if kind == b"*":
            n = int(rest)
            if n < 0:
                return None
            out = []
            for _ in range(n):
                try:
                    out.append(self._reply())
                except RespError as e:  # an error inside an array (EXEC): keep it as a value
                    out.append(e)
            return out
        raise ConnectionError(f"unexpected RESP line {line[:80]!r}")

    def command(self, *args: Any) -> Any:
        self.sock.sendall(self.encode(args))
        return self._reply()

    def close(self) -> None:
        try:
            self.file.close()
        finally:
            self.sock.close()

    def __enter__(self) -> "Resp":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stream_entries(entries: list) -> list[dict[str, str]]:
    """XRANGE reply -> [{"id": ..., field: value, ...}] (decoded)."""
    out = []
    for eid, fields in entries or []:
        d = {"id": eid.decode()}
        for k, v in zip(fields[0::2], fields[1::2]):
            d[k.decode()] = v.decode(errors="replace")
        out.append(d)
    return out


def room_key(room: str, suffix: str) -> str:
    """The Redis key of a room: chatgw:{ROOM}:seq|epoch|stream|members."""
    return f"chatgw:{{{room}}}:{suffix}"


# --------------------------------------------------------------------------- redis-server


class RedisServer:
    """A real redis-server on a free loopback port with a temporary dir (no persistence)."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.tmp = Path(tempfile.mkdtemp(prefix="chatgw-e2e-redis-"))
        self.log_path = self.tmp / "redis.log"
        self.proc: subprocess.Popen | None = None
        self._log = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def argv(self) -> list[str]:
        return [
            redis_server_bin(),
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.tmp),
            "--daemonize", "no",
        ]

    def start(self, timeout: float = 10.0) -> "RedisServer":
        assert not self.alive(), f"redis-server already running (pid {self.pid})"
        if self._log is None:
            self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=self._log, cwd=str(self.tmp))
        self.starts += 1
        self.wait_ping(timeout)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ping(self, timeout: float = 0.5) -> bool:
        try:
            with Resp(self.port, self.host, timeout=timeout) as r:
                return r.command("PING") == "PONG"
        except (OSError, ConnectionError, RespError, ValueError):
            return False

    def wait_ping(self, timeout: float = 10.0) -> float:
        """Poll PING until PONG; returns the seconds waited."""
        t0 = time.monotonic()
        while True:
            if self.ping():
                return time.monotonic() - t0
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited with {self.proc.returncode}; log:\n{self.log_text()[-2000:]}")
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"redis-server on port {self.port} not answering PING after {timeout}s; "
                                     f"log:\n{self.log_text()[-2000:]}")
            time.sleep(0.02)

    def stop(self, timeout: float = 5.0, sig: int = signal.SIGTERM) -> int | None:
        """Stop by pid: sig (SIGTERM), then SIGKILL after timeout. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=5)
        return self.proc.returncode

    def restart(self, down_s: float = 0.0, timeout: float = 10.0) -> None:
        """Stop, stay down for down_s, start again on the same port."""
        self.stop()
        if down_s:
            time.sleep(down_s)
        self.start(timeout)

    def cmd(self, *args: Any, timeout: float = 3.0) -> Any:
        with Resp(self.port, self.host, timeout=timeout) as r:
            return r.command(*args)

    def clients(self) -> list[dict[str, str]]:
        """CLIENT LIST as dicts (addr, sub, cmd, age, ...), without the asking connection."""
        with Resp(self.port, self.host) as r:
            text = r.command("CLIENT", "LIST").decode()
        out = []
        for line in text.splitlines():
            d = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            if d.get("cmd") != "client|list":
                out.append(d)
        return out

    def cli(self, *args: str, timeout: float = 5.0) -> str:
        r = subprocess.run([redis_cli_bin(), "-h", self.host, "-p", str(self.port), *args],
                           capture_output=True, text=True, timeout=timeout)
        return r.stdout

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def cleanup(self, keep_dir: bool = False) -> None:
        self.stop(timeout=3.0)
        if self._log is not None:
            self._log.close()
            self._log = None
        if not keep_dir:
            shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def make_redis():
    """Factory: ``r = make_redis(port=None, start=True)``; every server is stopped by pid at teardown."""
    made: list[RedisServer] = []

    def factory(port: int | None = None, start: bool = True) -> RedisServer:
        r = RedisServer(port)
        made.append(r)
        if start:
            r.start()
        return r

    yield factory
    for r in made:
        r.cleanup()


@pytest.fixture
def redis_server(make_redis) -> RedisServer:
    """One redis-server, started (PING answered)."""
    return make_redis()


# --------------------------------------------------------------------------- fake Redis


class FakeRedis:
    """A TCP server on a loopback port that is not Redis.

    Modes: ``garbage`` answers every command with ``%%%garbage``; ``ok`` answers every
    command with ``+OK`` (well-formed, but not what Redis would say: no script SHA, no
    subscribe confirmation); ``close`` closes every connection as soon as it is accepted.
    ``accepted`` counts connections, ``commands`` the commands it parsed.
    """

    def __init__(self, mode: str, port: int | None = None):
        assert mode in ("garbage", "ok", "close"), mode
        self.mode = mode
        self.host = "127.0.0.1"
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((self.host, port or 0))
        self.port = self.lsock.getsockname()[1]
        self.lsock.listen(64)
        self.lsock.settimeout(0.1)
        self.accepted = 0
        self.commands: list[list[bytes]] = []
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept_loop, daemon=True)
        t.start()
        self._threads.append(t)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self.accepted += 1
            if self.mode == "close":
                c.close()
                continue
            with self._lock:
                self._conns.append(c)
            t = threading.Thread(target=self._serve, args=(c,), daemon=True)
            t.start()
            self._threads.append(t)

    @staticmethod
    def _parse(buf: bytearray) -> list[bytes] | None:
        """One RESP command (array of bulk strings, or an inline line) off buf, or None."""
        if not buf:
            return None
        if buf[:1] != b"*":
            i = buf.find(b"\r\n")
            if i < 0:
                return None
            line = bytes(buf[:i])
            del buf[:i + 2]
            return line.split()
        i = buf.find(b"\r\n")
        if i < 0:
            return None
        n = int(buf[1:i])
        pos = i + 2
        args = []
        for _ in range(max(n, 0)):
            j = buf.find(b"\r\n", pos)
            if j < 0 or buf[pos:pos + 1] != b"$":
                return None
            ln = int(buf[pos + 1:j])
            if len(buf) < j + 2 + ln + 2:
                return None
            args.append(bytes(buf[j + 2:j + 2 + ln]))
            pos = j + 2 + ln + 2
        del buf[:pos]
        return args

    def _serve(self, c: socket.socket) -> None:
        buf = bytearray()
        c.settimeout(0.2)
        while not self._stop.is_set():
            try:
                data = c.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not data:
                break
            buf += data
            out = b""
            while True:
                try:
                    cmd = self._parse(buf)
                except ValueError:
                    buf.clear()
                    cmd = [b"?"]
                if cmd is None:
                    break
                with self._lock:
                    self.commands.append(cmd)
                out += b"%%%garbage\r\n" if self.mode == "garbage" else b"+OK\r\n"
            if out:
                try:
                    c.sendall(out)
                except OSError:
                    break
        try:
            c.close()
        except OSError:
            pass

    def stop(self) -> None:
        self._stop.set()
        try:
            self.lsock.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                c.close()
            except OSError:
                pass
        for t in self._threads:
            t.join(timeout=2)


@pytest.fixture
def fake_redis():
    """Factory: ``f = fake_redis(mode, port=None)``; stopped at teardown."""
    made: list[FakeRedis] = []

    def factory(mode: str, port: int | None = None) -> FakeRedis:
        f = FakeRedis(mode, port)
        made.append(f)
        return f

    yield factory
    for f in made:
        f.stop()


# --------------------------------------------------------------------------- processes


def pids_alive(pids: Iterable[int]) -> dict[int, bool]:
    return {p: pid_alive(p) for p in pids}
