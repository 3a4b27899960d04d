"""A throw-away PostgreSQL cluster for the archive end-to-end tests (test_archive.py).

Uses the server binaries of the installed PostgreSQL (``PG_BIN``, else the newest
``/usr/lib/postgresql/*/bin``, else ``initdb`` on PATH) and ``psql``; no pip package.

* ``PgCluster`` -- one cluster in a temporary directory on a free loopback port, trust
  auth, superuser ``chatgw``. ``init()`` runs initdb (timed: ``initdb_s``), ``start()`` /
  ``stop(mode)`` / ``restart(down_s)`` use ``pg_ctl ... -w``; ``freeze()`` / ``thaw(pids)``
  SIGSTOP / SIGCONT the server and every process under it; ``create_database(name)``,
  ``url(db)`` (``postgres://chatgw@127.0.0.1:PORT/db``), ``psql(db, sql)`` -> rows (tuples
  of strings), ``scalar(db, sql)``, ``cleanup()`` (stop, delete the directory).
  initdb and the server refuse to run as root: as root every server command runs as the
  ``postgres`` user (``runuser -u postgres --``) in a directory chowned to it.
* fixtures: ``pg_cluster`` (module scope: one cluster for the module, initdb'ed and
  started once, stopped and deleted at teardown) and ``pg_db`` (function scope: a fresh
  database in it, as ``PgDatabase(cluster, name, url)``; makes sure the cluster runs
  before and after the test, so a test that stops it cannot break the next one).

If no PostgreSQL server binaries are installed the fixtures skip the test with the
reason (``./scripts/test`` installs Debian's ``postgresql``).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from chatgw_e2e.procs import free_port, process_tree

PG_USER = "chatgw"  # the cluster's superuser (initdb -U), as chatgw connects
RUN_AS = "postgres"  # OS user that owns and runs the cluster when we are root


def pg_bin_dir() -> Path | None:
    """Directory holding initdb/pg_ctl/postgres, or None if PostgreSQL is not installed."""
    env = os.environ.get("PG_BIN")
    if env:
        return Path(env)
    found = []
    for d in glob.glob("/usr/lib/postgresql/*/bin"):
        try:
            found.append((int(Path(d).parent.name), Path(d)))
        except ValueError:
            continue
    for _, d in sorted(found, reverse=True):
        if (d / "initdb").exists() and (d / "pg_ctl").exists():
            return d
    w = shutil.which("initdb")
    return Path(w).parent if w else None


def psql_bin(bin_dir: Path | None = None) -> str:
    if bin_dir and (bin_dir / "psql").exists():
        return str(bin_dir / "psql")
    return shutil.which("psql") or "/usr/bin/psql"


class PgError(AssertionError):
    pass


class PgCluster:
    """One PostgreSQL cluster in a temp dir, listening on 127.0.0.1:port (and a socket in the dir)."""

    def __init__(self, port: int | None = None, bin_dir: Path | None = None):
        self.bin_dir = bin_dir or pg_bin_dir()
        if self.bin_dir is None:
            raise PgError("PostgreSQL server binaries not found (set PG_BIN)")
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.tmp = Path(tempfile.mkdtemp(prefix="chatgw-e2e-pg-"))
        self.data = self.tmp / "data"
        self.log_path = self.tmp / "server.log"
        self.as_root = os.geteuid() == 0
        if self.as_root:
            pw = pwd.getpwnam(RUN_AS)
            os.chown(self.tmp, pw.pw_uid, pw.pw_gid)
        self.initdb_s: float | None = None
        self.starts = 0
        self.stops: list[float] = []  # seconds each stop took

    # ---- commands

    def _argv(self, tool: str, *args: str) -> list[str]:
        argv = [str(self.bin_dir / tool), *args]
        return (["runuser", "-u", RUN_AS, "--"] + argv) if self.as_root else argv

    def _run(self, tool: str, *args: str, timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess:
        try:
            r = subprocess.run(self._argv(tool, *args), capture_output=True, text=True, timeout=timeout,
                               cwd=str(self.tmp))
        except subprocess.TimeoutExpired as e:
            raise PgError(f"{tool} {' '.join(args)} timed out after {timeout}s; log tail:\n{self.log_text()[-2000:]}") from e
        if check and r.returncode != 0:
            raise PgError(f"{tool} {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}\n"
                          f"server log tail:\n{self.log_text()[-2000:]}")
        return r

    def init(self) -> "PgCluster":
        t0 = time.monotonic()
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", PG_USER, "--no-sync", "-E", "UTF8",
                  "--locale=C", timeout=120)
        self.initdb_s = time.monotonic() - t0
        return self

    def start(self, timeout: float = 30.0) -> float:
        """pg_ctl start -w; returns the seconds it took."""
        t0 = time.monotonic()
        opts = f"-p {self.port} -k {self.tmp} -c listen_addresses={self.host} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.log_path), "-t", str(int(timeout)),
                  "start", "-w", timeout=timeout + 10)
        self.starts += 1
        return time.monotonic() - t0

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> float:
        """pg_ctl stop -m mode -w (fast: disconnect clients, clean shutdown; immediate: crash-like)."""
        t0 = time.monotonic()
        if self.running():
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-t", str(int(timeout)), "stop", "-w",
                      timeout=timeout + 10)
        took = time.monotonic() - t0
        self.stops.append(took)
        return took

    def restart(self, down_s: float = 0.0, mode: str = "fast") -> None:
        self.stop(mode)
        if down_s:
            time.sleep(down_s)
        self.start()

    def server_pids(self) -> list[int]:
        """The postmaster and every process under it (backends, checkpointer, ...)."""
        root = self.postmaster_pid()
        return process_tree(root) if root is not None else []

    def freeze(self) -> list[int]:
        """SIGSTOP the whole server: connections stay open and nothing answers (a hung host
        or a partition, not a shutdown). Returns the pids stopped, for thaw().

        The postmaster first, so that it forks nothing more; then what is under it, listed
        again until nothing new turns up (a backend forked before the postmaster stopped).
        A backend may end between the listing and its signal (a client that just
        disconnected: one CI run failed so, and left the server half frozen for the tests
        after it): it has nothing left to freeze."""
        stopped: list[int] = []
        try:
            while new := [pid for pid in self.server_pids() if pid not in stopped]:
                for pid in new:
                    try:
                        os.kill(pid, signal.SIGSTOP)
                        stopped.append(pid)
                    except ProcessLookupError:
                        continue
        except BaseException:
            self.thaw(stopped)
            raise
        return stopped

    def thaw(self, pids: list[int]) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def postmaster_pid(self) -> int | None:
        try:
            first = (self.data / "postmaster.pid").read_text().splitlines()[0]
            return int(first)
        except (OSError, IndexError, ValueError):
            return None

    def running(self) -> bool:
        pid = self.postmaster_pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def ready(self) -> bool:
        r = subprocess.run([psql_bin(self.bin_dir), "-h", self.host, "-p", str(self.port), "-U", PG_USER,
                            "-d", "postgres", "-Atc", "SELECT 1"], capture_output=True, text=True, timeout=10)
        return r.returncode == 0 and r.stdout.strip() == "1"

    # ---- databases

    def url(self, db: str) -> str:
        return f"postgres://{PG_USER}@{self.host}:{self.port}/{db}"

    def create_database(self, name: str | None = None) -> str:
        name = name or f"t_{uuid.uuid4().hex[:12]}"
        self._run("createdb", "-h", self.host, "-p", str(self.port), "-U", PG_USER, name, timeout=30)
        return name

    def psql(self, db: str, sql: str, timeout: float = 10.0) -> list[tuple[str, ...]]:
        """Run sql through psql (unaligned, tuples only, tab-separated) -> rows of strings."""
        r = subprocess.run(
            [psql_bin(self.bin_dir), "-h", self.host, "-p", str(self.port), "-U", PG_USER, "-d", db,
             "-v", "ON_ERROR_STOP=1", "-X", "-A", "-t", "-F", "\t", "-c", sql],
            capture_output=True, text=True, timeout=timeout,
        )
        if r.returncode != 0:
            raise PgError(f"psql failed ({r.returncode}) on {sql!r}: {r.stderr.strip()}")
        return [tuple(line.split("\t")) for line in r.stdout.splitlines() if line != ""]

    def scalar(self, db: str, sql: str) -> str | None:
        rows = self.psql(db, sql)
        return rows[0][0] if rows else None

    def table_exists(self, db: str, table: str = "chat_messages") -> bool:
        return self.scalar(db, f"SELECT to_regclass('public.{table}') IS NOT NULL") == "t"

    # ---- housekeeping

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def cleanup(self) -> None:
        try:
            if self.running():
                self.stop("immediate", timeout=15)
        except Exception:  # noqa: BLE001 -- last resort: kill the postmaster by pid
            pid = self.postmaster_pid()
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class PgDatabase:
    cluster: PgCluster
    name: str
    url: str

    def psql(self, sql: str) -> list[tuple[str, ...]]:
        return self.cluster.psql(self.name, sql)

    def scalar(self, sql: str) -> str | None:
        return self.cluster.scalar(self.name, sql)


@pytest.fixture(scope="module")
def pg_cluster():
    """One initdb'ed and started cluster for the module; stopped and deleted at teardown."""
    if pg_bin_dir() is None:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql, or set PG_BIN)")
    c = PgCluster()
    try:
        c.init()
        c.start()
        yield c
    finally:
        c.cleanup()


@pytest.fixture
def pg_db(pg_cluster: PgCluster):
    """A fresh database in the module's cluster (which runs before and after the test)."""
    if not pg_cluster.running():
        pg_cluster.start()
    name = pg_cluster.create_database()
    yield PgDatabase(pg_cluster, name, pg_cluster.url(name))
    if not pg_cluster.running():
        pg_cluster.start()
