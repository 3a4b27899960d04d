"""Process model of chatgw: spread over workers, restarts, crash loops, drain, start-up errors.

Black-box: the binary (CHATGW_BIN), signals, ps, /proc and the master's log.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import socket
import time
from collections import Counter
from pathlib import Path

from websockets.exceptions import InvalidStatus

from chatgw_e2e.gateway import DEFAULT_CONFIG, run_chatgw_once
from chatgw_e2e.ops import scrape, wait_until
from chatgw_e2e.procs import (
    cpu_seconds,
    descriptor_table_size,
    free_port,
    limit_files_to,
    pid_alive,
    ps_alive,
    wait_pids_dead,
)
from chatgw_e2e.rooms import first_lines
from chatgw_e2e.ws import (
    CONN_RE,
    OpenResult,
    check_shutdown_bye,
    close_all,
    collect_until_close,
    conn_slot,
    connect_hello,
    open_many,
    ping_ok,
    run_async,
    ws_connect,
)


# 1 ---------------------------------------------------------------------------


def test_connections_spread_evenly_over_two_workers(make_gateway):
    """...over two workers, whose descriptor tables were grown at start to hold what their file
    limit lets them open (up to 65,536): a table grown connection by connection stalls a
    multi-threaded process in accept() each time it doubles."""
    gw = make_gateway(workers=2)
    before = set(gw.children())
    assert sorted(c.slot for c in before if c.role == "worker") == [0, 1], before
    for c in before:
        if c.role == "worker":
            soft_limit = resource.prlimit(c.pid, resource.RLIMIT_NOFILE)[0]
            wanted = min(soft_limit, 65536)
            assert descriptor_table_size(c.pid) >= wanted, f"worker {c.slot}: table {descriptor_table_size(c.pid)}, limit {soft_limit}"
    n = 2000

    async def main():
        res = await open_many(gw, n, concurrency=200, timeout=15)
        try:
            assert not res.errors, f"{len(res.errors)} of {n} connections failed:\n{first_lines(res.errors)}"
            bad = [
                h for h in res.hellos
                if h.get("type") != "hello" or h.get("protocol") != 1 or not CONN_RE.match(str(h.get("conn", "")))
            ]
            assert not bad, f"{len(bad)} bad hellos, e.g. {bad[:3]}"
            assert {h.get("user") for h in res.hellos} == {f"u{i}" for i in range(n)}
            return Counter(res.slots())
        finally:
            await close_all(res.conns)

    per_slot = run_async(main(), 50)
    assert set(per_slot) == {0, 1}, f"connections per slot: {dict(per_slot)}"
    for slot in (0, 1):
        share = per_slot[slot] / n
        assert 0.45 <= share <= 0.55, f"slot {slot} got {share:.1%} of {n} connections ({dict(per_slot)})"

    after = set(gw.children())
    assert after == before, f"children changed: before {sorted(before)} after {sorted(after)}"
    assert not gw.find_log("child exited"), gw.find_log("child exited")
    assert gw.alive()


# 2 ---------------------------------------------------------------------------


def test_killed_worker_is_replaced_and_other_worker_unaffected(make_gateway):
    gw = make_gateway(workers=2)
    victim_slot = 1
    old_pid = gw.workers_by_slot()[victim_slot]
    mark = gw.log_mark()

    async def main():
        # clients on both workers (batches until each slot has a few; spread is test 1's job)
        res = OpenResult([], [], [])
        for batch in range(20):
            r = await open_many(gw, 20, timeout=10, user_prefix=f"pre{batch}_")
            res.conns += r.conns
            res.hellos += r.hellos
            res.errors += r.errors
            assert not res.errors, first_lines(res.errors)
            by_slot = res.by_slot()
            if len(by_slot.get(0, [])) >= 5 and len(by_slot.get(victim_slot, [])) >= 5:
                break
        survivors, doomed = by_slot.get(0, []), by_slot.get(victim_slot, [])
        assert survivors and doomed, f"need clients on both workers, got { {k: len(v) for k, v in by_slot.items()} }"
        new_conns = []
        try:
            loop = asyncio.get_running_loop()
            t_kill = loop.time()
            os.kill(old_pid, signal.SIGKILL)

            async def new_pid_seen():
                while loop.time() - t_kill < 3.0:
                    pid = (await asyncio.to_thread(gw.workers_by_slot)).get(victim_slot)
                    if pid is not None and pid != old_pid:
                        return pid, loop.time() - t_kill
                    await asyncio.sleep(0.02)
                return None, None

            async def slot_served():
                # with a shared socket a connection lands on either worker: open
                # small batches until one hello comes from the restarted slot
                i = 0
                while loop.time() - t_kill < 3.0:
                    batch = [connect_hello(gw, f"post{i}_{k}", timeout=1.0) for k in range(6)]
                    i += 1
                    for r in await asyncio.gather(*batch, return_exceptions=True):
                        if isinstance(r, tuple):
                            new_conns.append(r[0])
                            if conn_slot(r[1]) == victim_slot:
                                return loop.time() - t_kill
                    await asyncio.sleep(0.03)
                return None

            (new_pid, pid_after), served_after = await asyncio.gather(new_pid_seen(), slot_served())
            assert new_pid is not None, f"no new worker pid for slot {victim_slot} within 3 s of the kill"
            assert pid_after <= 1.0, f"new worker pid for slot {victim_slot} appeared {pid_after:.2f}s after the kill"
            assert served_after is not None, f"slot {victim_slot} served no connection within 3 s of the kill"
            assert served_after <= 1.0, f"slot {victim_slot} served again only {served_after:.2f}s after the kill"

            # the killed worker's clients lost their connection
            recs = await asyncio.gather(*(collect_until_close(ws, 3.0) for ws in doomed))
            still_open = [r for r in recs if r.error]
            assert not still_open, f"{len(still_open)} clients of the killed worker still open"

            # the other worker's clients are untouched and still answer pings
            pings = await asyncio.gather(*(ping_ok(ws, 3.0) for ws in survivors))
            assert all(pings), f"{pings.count(False)} of {len(survivors)} clients of slot 0 lost or silent"
        finally:
            await close_all(res.conns + new_conns)

    run_async(main(), 40)

    line = gw.wait_for_line(
        lambda l: l.text.startswith("child exited") and l.get_int("pid") == old_pid,
        timeout=3, since=mark, what=f"`child exited ... pid={old_pid}` line",
    )
    assert "SIGKILL" in line.raw, line.raw
    assert line.fields.get("role") == "worker" and line.get_int("slot") == victim_slot, line.raw
    assert gw.alive()


# 3 ---------------------------------------------------------------------------


def test_killed_relay_is_replaced(make_gateway):
    gw = make_gateway(workers=2)
    old = gw.relay_pid()
    assert old is not None, f"no relay among children: {gw.children()}"
    mark = gw.log_mark()
    t_kill = time.monotonic()
    os.kill(old, signal.SIGKILL)
    line = gw.wait_for_line(
        lambda l: l.text.startswith("child ready") and l.fields.get("role") == "relay",
        timeout=3, since=mark, what="`child ready role=relay` after the kill",
    )
    ready_after = time.monotonic() - t_kill
    new = gw.relay_pid()
    assert new is not None and new != old, f"relay pid before {old}, after {new}"
    assert line.get_int("pid") == new, line.raw
    assert ready_after <= 1.0, f"relay ready again only {ready_after:.2f}s after the kill"
    assert gw.child_events("exited", since=mark, role="relay", pid=old), gw.log_text()[mark:]

    async def main():
        ws, hello = await connect_hello(gw, "after_relay", timeout=5)
        await close_all([ws])
        return hello

    assert run_async(main(), 15).get("type") == "hello"
    assert gw.alive()


# 4 ---------------------------------------------------------------------------


def test_crash_looping_slot_is_reported_and_others_serve(make_gateway):
    gw = make_gateway(workers=2, env={"CHATGW_TEST_CRASH_SLOT": "1"}, ready_workers=[0])
    left = 15.0 - (time.monotonic() - gw.started_at)
    gw.wait_for_line(
        lambda l: l.text.startswith("child crash-looping")
        and l.fields.get("role") == "worker" and l.get_int("slot") == 1,
        timeout=max(left, 0.1), what="`child crash-looping role=worker slot=1` within 15 s of start",
    )
    assert gw.alive(), f"master died: {gw.proc.returncode}"
    exits = gw.child_events("exited", role="worker", slot=1)
    assert exits and all("exited with code 70" in l.raw for l in exits), first_lines(l.raw for l in exits)
    assert not gw.child_events("exited", role="worker", slot=0)

    async def main():
        res = await open_many(gw, 50, timeout=5, user_prefix="c")
        try:
            assert not res.errors, f"{len(res.errors)} of 50 failed:\n{first_lines(res.errors)}"
            return Counter(res.slots())
        finally:
            await close_all(res.conns)

    per_slot = run_async(main(), 30)
    assert per_slot == Counter({0: 50}), f"hellos per slot: {dict(per_slot)}"
    assert gw.alive()


# 5 ---------------------------------------------------------------------------


def _drain_test(gw, n_conns: int, sig: int, drain_s: float):
    """Open n connections, send sig to the master, collect every client's end."""

    async def main():
        res = await open_many(gw, n_conns, timeout=15)
        try:
            assert not res.errors, f"{len(res.errors)} of {n_conns} failed:\n{first_lines(res.errors)}"
            pids = {gw.master_pid} | gw.child_pids()
            readers = [asyncio.create_task(collect_until_close(ws, drain_s + 5)) for ws in res.conns]
            await asyncio.sleep(0.2)
            loop = asyncio.get_running_loop()
            t_sig = loop.time()
            gw.signal(sig)
            rc_task = asyncio.create_task(asyncio.to_thread(_wait_rc, gw, drain_s + 4))
            recs = await asyncio.gather(*readers)
            rc, exit_after = await rc_task
            return pids, recs, rc, exit_after, [r.closed_at - t_sig for r in recs if r.closed_at]
        finally:
            await close_all(res.conns)

    return run_async(main(), drain_s + 40)


def _wait_rc(gw, timeout):
    t0 = time.monotonic()
    try:
        rc = gw.proc.wait(timeout=timeout)
    except Exception:
        return None, None
    return rc, time.monotonic() - t0


def _assert_drained(gw, pids, recs, rc, exit_after, drain_s):
    bad = [(i, why) for i, why in ((i, check_shutdown_bye(r)) for i, r in enumerate(recs)) if why]
    assert not bad, f"{len(bad)} of {len(recs)} clients without bye(shutdown)+1001, e.g.:\n{first_lines(bad)}"
    assert rc is not None, f"master still running {drain_s + 4}s after the signal"
    assert rc == 0, f"master exit code {rc}; log tail:\n{gw.log_text()[-2000:]}"
    assert exit_after <= drain_s + 2, f"master exited {exit_after:.2f}s after the signal (drain {drain_s}s)"
    alive = wait_pids_dead(pids, 0.5)
    assert not alive, f"still alive after the master exited: {alive} (of {sorted(pids)})"
    assert not [p for p in pids if ps_alive(p)]
    master_lines = [l for l in gw.log_lines() if l.proc == "master" and l.pid == gw.master_pid]
    assert master_lines and master_lines[-1].text == "stopped", (
        f"last master line: {master_lines[-1].raw if master_lines else None}"
    )


def test_sigterm_drains_every_client_and_exits_clean(make_gateway):
    drain_s = 10.0
    gw = make_gateway(workers=2, env={"CHATGW_SUPERVISOR_DRAIN_TIMEOUT_S": "10"})
    pids, recs, rc, exit_after, _ = _drain_test(gw, 1000, signal.SIGTERM, drain_s)
    assert len(pids) >= 4, f"expected master, 2 workers and relay: {pids}"
    _assert_drained(gw, pids, recs, rc, exit_after, drain_s)


# 6 ---------------------------------------------------------------------------


def test_bad_config_exits_2_with_one_line(tmp_path: Path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("server:\n  workers: abc\n")
    state = tmp_path / "state"
    r = run_chatgw_once(
        ["--config", str(cfg), "--state-dir", str(state), "--listen", f"127.0.0.1:{free_port()}"],
        timeout=10,
    )
    assert r.returncode is not None, f"chatgw still running after 10 s; stderr: {r.stderr[-500:]}"
    assert r.returncode == 2, f"exit code {r.returncode}; stderr: {r.stderr[-500:]}"
    lines = r.stderr.splitlines()
    assert len(lines) == 1, f"stderr has {len(lines)} lines:\n{r.stderr[-1000:]}"
    assert lines[0].startswith("chatgw: invalid config: server.workers:"), lines[0]
    assert not r.leftover, f"processes left running: {r.leftover}"
    pid_file = state / "chatgw.pid"
    if pid_file.exists():
        text = pid_file.read_text().strip()
        assert not (text.isdigit() and pid_alive(int(text))), f"pid file names a live process: {text}"


# 7 ---------------------------------------------------------------------------


def test_busy_port_exits_2_with_one_line(tmp_path: Path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        port = s.getsockname()[1]
        r = run_chatgw_once(
            [
                "--config", str(DEFAULT_CONFIG), "--state-dir", str(tmp_path / "state"),
                "--listen", f"127.0.0.1:{port}", "--workers", "2",
            ],
            env={"CHATGW_METRICS_LISTEN": f"127.0.0.1:{free_port()}"},
            timeout=10,
        )
    assert r.returncode == 2, f"exit code {r.returncode}; stderr: {r.stderr[-500:]}"
    lines = r.stderr.splitlines()
    assert lines == [f"chatgw: cannot listen on 127.0.0.1:{port}: address already in use"], r.stderr[-1000:]
    assert not r.leftover, f"processes left running: {r.leftover}"


# 8 ---------------------------------------------------------------------------


def test_sigkill_master_leaves_no_orphans(make_gateway):
    gw = make_gateway(workers=2)
    kids = gw.child_pids()
    assert len(kids) >= 3, f"expected 2 workers and a relay: {gw.children()}"
    t_kill = time.monotonic()
    gw.signal(signal.SIGKILL)
    gw.proc.wait(timeout=5)
    alive = wait_pids_dead(kids, 3.0 - (time.monotonic() - t_kill))
    assert not alive, f"children still alive 3 s after the master was SIGKILLed: {alive}"


# 9 ---------------------------------------------------------------------------


def test_sigquit_drains_over_window_and_exits_clean(make_gateway):
    drain_s = 3.0
    gw = make_gateway(workers=2, env={"CHATGW_SUPERVISOR_DRAIN_TIMEOUT_S": "3"})
    pids, recs, rc, exit_after, closed_after = _drain_test(gw, 200, signal.SIGQUIT, drain_s)
    _assert_drained(gw, pids, recs, rc, exit_after, drain_s)
    spread = max(closed_after) - min(closed_after)
    assert spread >= 0.25 * drain_s, (
        f"SIGQUIT closed all 200 clients within {spread:.2f}s; expected them spread over the "
        f"{drain_s}s drain window"
    )


def test_master_sleeps_through_a_drain_begun_while_a_crashed_worker_waits_to_restart(make_gateway):
    """A worker dies and the master is told to drain before the worker's restart is due.
    No restart comes while the master stops, and the master must not wait for one by
    polling: it used to spin at a whole core until the drain ended."""
    gw = make_gateway(workers=2, env={"CHATGW_SUPERVISOR_DRAIN_TIMEOUT_S": "3",
                                      "CHATGW_SUPERVISOR_RESTART_BACKOFF_INITIAL_MS": "1000"})

    async def main():
        res = await open_many(gw, 40, timeout=15)
        try:
            assert not res.errors, f"{len(res.errors)} of 40 failed:\n{first_lines(res.errors)}"
            crashed = gw.workers_by_slot()[0]
            os.kill(crashed, signal.SIGKILL)
            await asyncio.to_thread(gw.wait_for_log, "child restarting", 5)
            gw.signal(signal.SIGQUIT)
            cpu_before, t0 = cpu_seconds(gw.master_pid), time.monotonic()
            # Past the restart's due time (1 s), inside the drain (3 s): the survivor still says goodbye.
            await asyncio.sleep(2.0)
            busy = (cpu_seconds(gw.master_pid) - cpu_before) / (time.monotonic() - t0)
            assert busy < 0.2, f"the master used {busy:.0%} of a core while draining (polling for a restart)"
            assert 0 not in gw.workers_by_slot(), "the crashed worker was restarted while the master stopped"
        finally:
            await close_all(res.conns)

    run_async(main(), 40)
    assert gw.wait_exit(10) == 0


# 10 --------------------------------------------------------------------------


def test_worker_out_of_files_answers_503_at_once_and_recovers(make_gateway):
    """A worker at its open-file limit: accept() fails with EMFILE. Connections beyond the
    limit must get a 503 at once (the worker keeps a file in reserve for it) rather than
    wait in its queue; the worker must not spin, must say why in the log, keep serving the
    connections it has, and take new ones as soon as files free up."""
    gw = make_gateway(workers=1)
    worker = gw.workers_by_slot()[0]
    spare = 6
    limit_files_to(worker, spare)

    async def refused(user: str) -> tuple[float, int, dict]:
        t0 = time.monotonic()
        try:
            ws = await ws_connect(gw, user, timeout=5)
        except InvalidStatus as e:
            return time.monotonic() - t0, e.response.status_code, json.loads(e.response.body or b"{}")
        await close_all([ws])
        raise AssertionError(f"{user} was served beyond the file limit")

    async def main():
        held = []
        for i in range(spare):
            held.append((await connect_hello(gw, f"held{i}", timeout=5))[0])
        cpu_before, t0 = cpu_seconds(worker), time.monotonic()
        answers = await asyncio.gather(*(refused(f"over{i}") for i in range(5)))
        for took, status, body in answers:
            assert status == 503 and body.get("code") == "unavailable", (status, body)
            assert took < 2.0, f"the 503 took {took:.2f}s"
        await asyncio.sleep(1.0)
        busy = (cpu_seconds(worker) - cpu_before) / (time.monotonic() - t0)
        assert busy < 0.2, f"worker used {busy:.0%} of a core while out of files (spinning on accept)"
        assert await ping_ok(held[0]), "a held connection stopped answering while the worker was full"
        line = gw.wait_for_log("connections beyond the limit are answered 503", timeout=2)
        assert "Too many open files" in line.raw, line.raw
        # what an operator's alert sees (etc/prometheus/alerts.yml: ChatgwWorkerAtFileLimit)
        counted = lambda: scrape(gw).value("chatgw_file_limit_refusals_total", role="worker", slot=0)  # noqa: E731
        assert await asyncio.to_thread(wait_until, lambda: counted() == 5, 5), \
            f"chatgw_file_limit_refusals_total is {counted()} after 5 connections answered 503"

        for ws in held[:3]:
            await ws.close()
        await asyncio.sleep(0.3)
        late = [await connect_hello(gw, f"late{i}", timeout=5) for i in range(3)]
        assert [hello.get("user") for _, hello in late] == ["late0", "late1", "late2"], late
        await close_all([ws for ws, _ in late] + held[3:])

    run_async(main(), 40)
    assert gw.workers_by_slot()[0] == worker, "the worker was replaced"
    assert not gw.find_log("child exited"), gw.find_log("child exited")
