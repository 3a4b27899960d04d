"""Processes, seen from outside: free ports, pids alive or dead (through /proc and ps),
CPU time, file limits, a process and everything under it, and the processes carrying our
tag in their environment."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterable

# Marker put into the environment of every chatgw we start; children inherit it, so
# the processes we started (and only those) can be found by scanning /proc.
TAG_ENV = "E2E_GW_TAG"


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


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after "pid (comm)": comm may hold spaces, so split after its last ')'."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (/proc/PID/stat)."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(root: int) -> list[int]:
    """root and every live process under it, parents before their children."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                parents[int(name)] = int(_stat_fields(int(name))[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
        found += frontier
    return found


def descriptor_table_size(pid: int) -> int:
    """How many descriptors pid's table holds now (FDSize in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("FDSize:"):
            return int(line.split()[1])
    raise AssertionError(f"no FDSize in /proc/{pid}/status")


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


def is_ours(pid: int, tag: str) -> bool:
    """Guard against pid reuse before killing a recorded pid."""
    if _environ_has(pid, f"{TAG_ENV}={tag}".encode()):
        return True
    argv = _cmdline(pid)
    return bool(argv) and os.path.basename(argv[0]) == "chatgw"
