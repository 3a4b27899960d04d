"""The durable archive end to end (v1.1): the `history` request across restarts and
epochs, resume filled from the archive, the archiver child surviving `kill -9`, a fleet of
gateways on one Redis and one PostgreSQL, a database outage under traffic, bad input and
unusable archive files, and the archive turned off.

docs/PROTOCOL.md (`history`, v1.1 rows, "With the archive on ... filled from the archive");
README. Black-box: the binaries (CHATGW_BIN, chatctl next to it for `chatctl token`),
WebSocket clients, HTTP, ps and signals, plus the archive itself read from outside: the
SQLite file (read-only, WAL) or a real PostgreSQL cluster (chatgw_e2e.pg.PgCluster, one per
module) through psql. Table: ``chat_messages(room, epoch, seq, sender, body, ts)``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
import urllib.parse
from datetime import datetime
from pathlib import Path

import pytest

from chatgw_e2e import pg, redis
from chatgw_e2e.gateway import DEFAULT_CONFIG, run_chatgw_once
from chatgw_e2e.ops import chatctl_bin, scrape
from chatgw_e2e.pg import PgDatabase
from chatgw_e2e.placement import wait_bus_ready
from chatgw_e2e.procs import free_port, pid_alive, wait_pids_dead
from chatgw_e2e.redis import redis_env
from chatgw_e2e.rooms import (
    Inbox,
    assert_quiet_until_pong,
    check_consecutive,
    read_frames,
    send_many,
    wait_all,
)
from chatgw_e2e.ws import (
    app_ping,
    close_all,
    connect_hello,
    connect_joined,
    join_room,
    next_ref,
    recv_until,
    run_async,
    send_json,
)

# fixtures of the support modules, found by pytest under these names (used by name only)
pg_cluster, pg_db = pg.pg_cluster, pg.pg_db
make_redis, redis_server = redis.make_redis, redis.redis_server

FAST = {"CHATGW_LIMITS_RATE_PER_S": "100000", "CHATGW_LIMITS_BURST": "100000"}
API_KEY = "archive-e2e-api-key"
JWT_SECRET = "archive-e2e-jwt-secret-0123456789abcdef"  # 39 bytes (32+ required)
WITH_ARCHIVER = ["relay", "archiver"]  # children that must be ready before a test starts


def archive_env(**extra: str) -> dict[str, str]:
    """A relay-bus gateway with the SQLite archive (the default kind, said explicitly)."""
    env = {"CHATGW_ARCHIVE_KIND": "sqlite", **FAST}
    env.update({k: str(v) for k, v in extra.items()})
    return env


# --------------------------------------------------------------------------- archive, read from outside


def sqlite_path(gw) -> Path:
    return Path(gw.env.get("CHATGW_ARCHIVE_SQLITE_PATH") or (gw.state_dir / "archive.sqlite"))


def sqlite_query(path: Path, sql: str, args: tuple = ()) -> list[tuple]:
    """One read-only query on the archive file (raises sqlite3.Error, e.g. no table yet)."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def sqlite_counts(path: Path, room: str) -> tuple[int, int]:
    """(COUNT(*), COUNT(DISTINCT epoch, seq)) of room; (-1, -1) while unreadable/no table."""
    try:
        rows = sqlite_query(path, "SELECT COUNT(*), COUNT(DISTINCT epoch || ':' || seq) FROM chat_messages "
                                  "WHERE room = ?", (room,))
    except sqlite3.Error:
        return -1, -1
    return rows[0]


def sqlite_messages(path: Path, room: str) -> dict[tuple[str, int], tuple[str, str]]:
    """{(epoch, seq): (sender, body)} of room."""
    rows = sqlite_query(path, "SELECT epoch, seq, sender, body FROM chat_messages WHERE room = ?", (room,))
    return {(e, s): (f, b) for e, s, f, b in rows}


def pg_counts(db: PgDatabase, rooms: list[str]) -> tuple[int, int]:
    """(COUNT(*), COUNT(DISTINCT (room, epoch, seq))) over rooms; (-1, -1) before the table exists."""
    names = ",".join("'" + r.replace("'", "''") + "'" for r in rooms)
    try:
        row = db.psql(f"SELECT COUNT(*), COUNT(DISTINCT (room, epoch, seq)) FROM chat_messages WHERE room IN ({names})")
    except AssertionError:
        return -1, -1
    return int(row[0][0]), int(row[0][1])


def pg_messages(db: PgDatabase, rooms: list[str]) -> dict[tuple[str, str, int], tuple[str, str]]:
    names = ",".join("'" + r.replace("'", "''") + "'" for r in rooms)
    rows = db.psql(f"SELECT room, epoch, seq, sender, body FROM chat_messages WHERE room IN ({names})")
    return {(r, e, int(s)): (f, b) for r, e, s, f, b in rows}


def wait_value(fn, want, timeout: float, what: str, interval: float = 0.05):
    """Poll fn() until it returns want; returns seconds waited, else fails with the last value."""
    t0 = time.monotonic()
    last = None
    while True:
        last = fn()
        if last == want:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: still {last!r} (want {want!r}) after {timeout}s")
        time.sleep(interval)


async def await_value(fn, want, timeout: float, what: str, interval: float = 0.05):
    """wait_value without blocking the event loop (fn runs in a thread)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while True:
        last = await asyncio.to_thread(fn)
        if last == want:
            return loop.time() - t0
        if loop.time() - t0 > timeout:
            raise AssertionError(f"{what}: still {last!r} (want {want!r}) after {timeout}s")
        await asyncio.sleep(interval)


# --------------------------------------------------------------------------- protocol helpers


async def history(ws, room: str, limit: int | None = None, before=None, timeout: float = 5.0, **extra) -> dict:
    """Send one `history` request; return its answer (`history` or `error` with the same ref)."""
    ref = next_ref("h")
    req = {"type": "history", "room": room, "ref": ref, **extra}
    if limit is not None:
        req["limit"] = limit
    if before is not None:
        req["before"] = before
    await send_json(ws, req)
    reply, _ = await recv_until(
        ws, lambda m: m.get("ref") == ref and m.get("type") in ("history", "error"), timeout)
    return reply


def check_page(page: dict, room: str, what: str) -> list[dict]:
    assert page.get("type") == "history" and page.get("room") == room, f"{what}: {page}"
    msgs = page.get("messages")
    assert isinstance(msgs, list) and isinstance(page.get("more"), bool), f"{what}: {page}"
    for m in msgs:
        assert set(m) >= {"epoch", "seq", "from", "text", "ts"}, f"{what}: message without a field: {m}"
    ts = [m["ts"] for m in msgs]
    assert ts == sorted(ts), f"{what}: page not oldest first by ts: {ts}"
    return msgs


async def history_all(ws, room: str, limit: int, max_pages: int = 50) -> list[dict]:
    """Page back from the newest with `before` until more=false; returns the pages (newest first)."""
    pages = []
    before = None
    for _ in range(max_pages):
        page = await history(ws, room, limit=limit, before=before)
        msgs = check_page(page, room, f"page {len(pages) + 1}")
        pages.append(page)
        if not page["more"]:
            return pages
        assert msgs, f"page {len(pages)} is empty but says more=true: {page}"
        before = {"epoch": msgs[0]["epoch"], "seq": msgs[0]["seq"]}
    raise AssertionError(f"still more=true after {max_pages} pages of {limit}")


def flatten(pages: list[dict]) -> list[dict]:
    """Pages (newest first) -> every message, oldest first."""
    out = []
    for page in reversed(pages):
        out.extend(page["messages"])
    return out


def key(m: dict) -> tuple[str, int]:
    return (m["epoch"], m["seq"])


def api_history(gw, room: str, limit: int, before: tuple[str, int] | None = None) -> tuple[int, dict | bytes]:
    q = {"limit": str(limit)}
    if before:
        q["before_epoch"], q["before_seq"] = before[0], str(before[1])
    status, body = gw.http_get(f"/api/rooms/{urllib.parse.quote(room)}/messages?{urllib.parse.urlencode(q)}",
                               headers={"Authorization": f"Bearer {API_KEY}"})
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def room_messages(frames: list[dict], room: str) -> list[dict]:
    return [m for m in frames if m.get("type") == "message" and m.get("room") == room]


async def paced_sender(ws, room: str, prefix: str, rate: float, duration: float, sent: dict) -> int:
    """Send `prefix-i` at `rate` per second for `duration` s (refs = texts, sent[ref] = loop time)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    i = 0
    while True:
        elapsed = loop.time() - t0
        if elapsed >= duration:
            return i
        due = int(rate * elapsed) + 1
        while i < due:
            ref = f"{prefix}-{i}"
            sent[ref] = loop.time()
            await send_json(ws, {"type": "send", "room": room, "text": ref, "ref": ref})
            i += 1
        await asyncio.sleep(0.003)


def ack_latencies(inbox: Inbox, sent: dict) -> dict[str, float]:
    out = {}
    for m, t in zip(inbox.msgs, inbox.times):
        if m.get("type") == "ack" and m.get("ref") in sent:
            out[m["ref"]] = t - sent[m["ref"]]
    return out


def errors_of(inbox: Inbox) -> list[dict]:
    return [m for m in inbox.msgs if m.get("type") in ("error", "bye", "gap")]


def archiver_pid(gw) -> int | None:
    for c in gw.children():
        if c.role == "archiver":
            return c.pid
    return None


def wait_child_ready(gw, role: str, pid: int, timeout: float = 10.0) -> None:
    gw.wait_for_line(lambda l: l.text.startswith("child ready") and l.fields.get("role") == role
                     and l.get_int("pid") == pid, timeout, what=f"`child ready` of the new {role} {pid}")


# 1 ---------------------------------------------------------------------------


def test_history_pages_back_across_gateway_restart(make_gateway):
    """30 messages, TERM, start again on the same state dir (new epoch), 30 more: `history`
    (limit 25, paged with `before`) gives all 60 in order across the epoch change, each page
    oldest first, no duplicates; the HTTP API pages the same."""
    gw = make_gateway(workers=2, env=archive_env(CHATGW_API_KEY=API_KEY), ready_roles=WITH_ARCHIVER)
    room = "keep"

    async def phase(tag: str) -> list[dict]:
        await wait_bus_ready(gw)
        ws, _ = await connect_hello(gw, f"writer-{tag}")
        try:
            reply, _ = await join_room(ws, room)
            assert reply.get("type") == "joined", reply
            frames = await send_many(ws, room, [f"{tag}{i:02d}" for i in range(30)], f"{tag}-")
            mine = room_messages(frames, room)
            assert [m["text"] for m in mine] == [f"{tag}{i:02d}" for i in range(30)], mine[:3]
            return mine
        finally:
            await close_all([ws])

    first = run_async(phase("a"), 30)
    epoch1 = first[0]["epoch"]
    assert {m["epoch"] for m in first} == {epoch1}, first
    # TERM right after the last ack: a graceful stop must not lose what was acked
    assert gw.stop(timeout=20) == 0, gw.log_text()[-2000:]
    first_log = gw.log_text()
    left = wait_pids_dead(gw.recorded_pids(), 5)
    assert not left, f"processes left after TERM: {left}"
    assert sqlite_path(gw).exists(), f"no archive file after the first run: {list(gw.state_dir.iterdir())}"

    gw.start()  # same port, same state dir
    second = run_async(phase("b"), 30)
    epoch2 = second[0]["epoch"]
    assert epoch2 != epoch1, f"the relay restarted without history.persist but kept epoch {epoch1}"
    assert {m["epoch"] for m in second} == {epoch2}, second
    expected = [(m["epoch"], m["seq"], m["text"]) for m in first + second]

    async def read_back():
        ws, _ = await connect_hello(gw, "reader")  # never joins: history needs no membership
        try:
            return await history_all(ws, room, 25)
        finally:
            await close_all([ws])

    pages = run_async(read_back(), 30)
    sizes = [len(p["messages"]) for p in pages]
    got = [(m["epoch"], m["seq"], m["text"]) for m in flatten(pages)]
    assert len(got) == len(set(got)), f"duplicates in history: {len(got)} rows, {len(set(got))} distinct"
    assert got == expected, (
        f"history after the restart (page sizes {sizes}) differs from what was sent:\n"
        f"missing {sorted(set(expected) - set(got))[:5]}\nextra {sorted(set(got) - set(expected))[:5]}\n"
        f"first rows {got[:3]} ... last {got[-3:]}\n(first run's log tail:\n{first_log[-1500:]})"
    )
    assert sizes == [25, 25, 10] and [p["more"] for p in pages] == [True, True, False], (sizes, [p["more"] for p in pages])

    # the HTTP API pages the same way and gives the same pages
    before = None
    for i, page in enumerate(pages):
        status, body = api_history(gw, room, 25, before)
        assert status == 200, f"API page {i + 1}: {status} {body!r}"
        assert body.get("messages") == page["messages"] and body.get("more") == page["more"], (
            f"API page {i + 1} differs from the WebSocket page:\n{body}\n{page}")
        before = (page["messages"][0]["epoch"], page["messages"][0]["seq"]) if page["messages"] else None


# 2 ---------------------------------------------------------------------------


def test_archiver_kill9_under_load_archive_complete_once(make_gateway):
    """~1,000 msg/s over 4 senders in 2 rooms for 2.5 s, `kill -9` of the archiver 1 s in: once
    a new archiver is ready and has caught up, every (epoch, seq) a member received is in the
    SQLite table exactly once, with its sender and text."""
    gw = make_gateway(workers=2, env=archive_env(CHATGW_HISTORY_MESSAGES="100000"), ready_roles=WITH_ARCHIVER)
    rooms = ["flow-a", "flow-b"]
    old = archiver_pid(gw)
    assert old, f"no archiver child: {gw.children()}"
    path = sqlite_path(gw)

    async def main():
        await wait_bus_ready(gw)
        member, _ = await connect_hello(gw, "member")
        senders = []
        try:
            for room in rooms:
                r, _ = await join_room(member, room)
                assert r.get("type") == "joined", r
            for i in range(4):
                ws, _ = await connect_hello(gw, f"sender{i}")
                senders.append(ws)
                r, _ = await join_room(ws, rooms[i % 2])
                assert r.get("type") == "joined", r
            mbox = Inbox(member, "member")
            sboxes = [Inbox(ws, f"sender{i}") for i, ws in enumerate(senders)]
            sent: dict[str, float] = {}
            loop = asyncio.get_running_loop()

            async def killer():
                await asyncio.sleep(1.0)
                os.kill(old, signal.SIGKILL)
                return loop.time()

            t0 = loop.time()
            counts = await asyncio.gather(
                *(paced_sender(ws, rooms[i % 2], f"s{i}", 250, 2.5, sent) for i, ws in enumerate(senders)),
                killer())
            n_sent = sum(counts[:4])
            send_s = loop.time() - t0
            # every send acked, no error anywhere; the member got every message of both rooms
            await wait_all(sboxes, lambda ib: ib.counts["ack"] >= counts[sboxes.index(ib)], 20, "every ack")
            per_room = {room: sum(c for i, c in enumerate(counts[:4]) if i % 2 == rooms.index(room)) for room in rooms}
            await mbox.wait(lambda ib: all(len(ib.of("message", r)) >= per_room[r] for r in rooms), 20,
                            "every message at the member")
            bad = [m for ib in sboxes + [mbox] for m in errors_of(ib)]
            assert not bad, f"errors/gaps during the archiver kill: {bad[:5]}"
            received = {}
            for room in rooms:
                msgs = mbox.of("message", room)
                assert len(msgs) == per_room[room], f"{room}: member got {len(msgs)} of {per_room[room]}"
                check_consecutive([m["seq"] for m in msgs], f"member in {room}")
                assert len({m["epoch"] for m in msgs}) == 1, f"{room}: epoch changed: {({m['epoch'] for m in msgs})}"
                received[room] = {(m["epoch"], m["seq"]): (m["from"], m["text"]) for m in msgs}
            for ib in sboxes + [mbox]:
                ib.stop()
            return n_sent, send_s, received
        finally:
            await close_all([member] + senders)

    n_sent, send_s, received = run_async(main(), 45)
    rate = n_sent / send_s
    assert rate >= 700, f"the load was too light to mean anything: {n_sent} in {send_s:.1f}s"

    new = gw.wait_child("archiver", not_pid=old, timeout=10)
    assert new, f"no new archiver after kill -9 of {old}: {gw.children()}\n{gw.log_text()[-2000:]}"
    assert not pid_alive(old)
    wait_child_ready(gw, "archiver", new)
    caught = gw.wait_for_line(lambda l: l.pid == new and l.text.startswith("archive caught up"), 10,
                              what="`archive caught up` of the new archiver")
    assert caught.fields.get("lost") == "0", f"the bus held everything, yet: {caught.raw}"
    missing_logged = [l.raw for l in gw.find_log("archive is missing messages")]
    assert not missing_logged, missing_logged

    waited = {}
    for room in rooms:
        n = len(received[room])
        waited[room] = wait_value(lambda: sqlite_counts(path, room), (n, n), 10, f"archive rows of {room}")
        stored = sqlite_messages(path, room)
        assert stored == received[room], (
            f"{room}: archive differs from what the member got: missing "
            f"{sorted(set(received[room]) - set(stored))[:5]}, extra {sorted(set(stored) - set(received[room]))[:5]}")
    print(f"\n[archive] sent {n_sent} at {rate:.0f}/s; archiver {old} -> {new}; "
          f"archive complete {waited} s after the member had everything; {caught.raw.split(']', 1)[-1].strip()}")


# 3 ---------------------------------------------------------------------------


def test_resume_older_than_memory_filled_from_archive(make_gateway):
    """history.messages=10: a client that left at seq s and comes back after 50 more gets
    exactly those 50 (from the archive, no gap), then live messages."""
    gw = make_gateway(workers=2, env=archive_env(CHATGW_HISTORY_MESSAGES="10"), ready_roles=WITH_ARCHIVER)
    room = "resume-long"
    path = sqlite_path(gw)

    async def main():
        await wait_bus_ready(gw)
        a, _ = await connect_hello(gw, "alice")
        b, _ = await connect_hello(gw, "bob")
        a2 = None
        try:
            for ws in (a, b):
                r, _ = await join_room(ws, room)
                assert r.get("type") == "joined", r
            await send_many(b, room, [f"early{i}" for i in range(5)], "e-")
            early = [m for m in await read_frames(a, 5) if m.get("type") == "message"]
            assert [m["text"] for m in early] == [f"early{i}" for i in range(5)], early
            s, epoch = early[-1]["seq"], early[-1]["epoch"]
            await close_all([a])

            frames = await send_many(b, room, [f"missed{i}" for i in range(50)], "m-")
            missed = room_messages(frames, room)
            assert [m["seq"] for m in missed] == list(range(s + 1, s + 51)), [m["seq"] for m in missed][:5]
            archived = await await_value(lambda: sqlite_counts(path, room), (55, 55), 5, "archive rows")

            a2, _ = await connect_hello(gw, "alice")
            joined, before = await join_room(a2, room, since=s, epoch=epoch)
            assert joined.get("type") == "joined" and not before, (joined, before)
            assert joined.get("epoch") == epoch and joined.get("seq") == s + 50, joined
            replay = await read_frames(a2, 50, timeout=10)
            kinds = [m.get("type") for m in replay]
            assert kinds == ["message"] * 50, f"resume replay is not 50 messages: {replay[:3]} (gap? {kinds.count('gap')})"
            assert [(m["seq"], m["epoch"], m["text"]) for m in replay] == \
                   [(m["seq"], m["epoch"], m["text"]) for m in missed], replay[:3]
            await assert_quiet_until_pong(a2, "after the archive replay")
            # then live
            await send_many(b, room, ["live"], "l-")
            live = await recv_json_type(a2, "message")
            assert live["seq"] == s + 51 and live["text"] == "live" and live["epoch"] == epoch, live
            return archived
        finally:
            await close_all([ws for ws in (a, b, a2) if ws is not None])

    archived = run_async(main(), 40)
    print(f"\n[archive] 55 rows in the archive {archived:.2f}s after the last ack")


async def recv_json_type(ws, type_: str, timeout: float = 5.0) -> dict:
    msg, skipped = await recv_until(ws, lambda m: m.get("type") == type_, timeout)
    assert not skipped, f"unexpected frames before the {type_}: {skipped}"
    return msg


def test_resume_across_relay_restart_old_epoch_from_archive(make_gateway):
    """The relay restarts without persistence (new epoch): a resume with the old epoch gets the
    rest of the old epoch from the archive, then `gap` with the new epoch ({0,0}: nothing of
    it is missing), then the new epoch's messages."""
    gw = make_gateway(workers=2, env=archive_env(CHATGW_HISTORY_MESSAGES="10"), ready_roles=WITH_ARCHIVER)
    room = "resume-epoch"
    path = sqlite_path(gw)

    async def before_crash():
        await wait_bus_ready(gw)
        a, _ = await connect_hello(gw, "alice")
        b, _ = await connect_hello(gw, "bob")
        try:
            for ws in (a, b):
                r, _ = await join_room(ws, room)
                assert r.get("type") == "joined", r
            await send_many(b, room, [f"old{i}" for i in range(5)], "o-")
            seen = [m for m in await read_frames(a, 5) if m.get("type") == "message"]
            await close_all([a])
            frames = await send_many(b, room, [f"old{i}" for i in range(5, 25)], "p-")
            return seen[-1]["seq"], seen[-1]["epoch"], room_messages(frames, room)
        finally:
            await close_all([a, b])

    s, epoch1, old_tail = run_async(before_crash(), 30)
    wait_value(lambda: sqlite_counts(path, room), (25, 25), 5, "archive rows before the relay kill")
    relay = gw.relay_pid()
    os.kill(relay, signal.SIGKILL)
    new_relay = gw.wait_child("relay", not_pid=relay, timeout=10)
    assert new_relay, gw.log_text()[-2000:]
    wait_child_ready(gw, "relay", new_relay)

    async def after_crash():
        await wait_bus_ready(gw, timeout=10)
        b, _ = await connect_hello(gw, "bob")
        a2 = None
        try:
            r, _ = await join_room(b, room)
            assert r.get("type") == "joined", r
            epoch2 = r["epoch"]
            assert epoch2 != epoch1, f"epoch kept across a relay kill without persistence: {r}"
            frames = await send_many(b, room, [f"new{i}" for i in range(3)], "n-")
            new = room_messages(frames, room)
            assert [m["seq"] for m in new] == [1, 2, 3], new

            a2, _ = await connect_hello(gw, "alice")
            joined, pre = await join_room(a2, room, since=s, epoch=epoch1)
            assert joined.get("type") == "joined" and not pre, (joined, pre)
            assert joined.get("epoch") == epoch2 and joined.get("seq") == 3, joined
            frames = await read_frames(a2, len(old_tail) + 1 + 3, timeout=10)
            old_part = frames[:len(old_tail)]
            assert [(m.get("type"), m.get("epoch"), m.get("seq"), m.get("text")) for m in old_part] == \
                   [("message", epoch1, m["seq"], m["text"]) for m in old_tail], \
                f"old epoch's tail not replayed from the archive: {frames[:4]}"
            gap = frames[len(old_tail)]
            assert gap.get("type") == "gap" and gap.get("epoch") == epoch2 and gap.get("room") == room, frames
            assert (gap.get("from"), gap.get("to")) == (0, 0), f"nothing of the new epoch is missing: {gap}"
            assert [(m.get("type"), m.get("epoch"), m.get("seq")) for m in frames[-3:]] == \
                   [("message", epoch2, i) for i in (1, 2, 3)], frames[-3:]
            await assert_quiet_until_pong(a2, "after the resume across epochs")
        finally:
            await close_all([ws for ws in (b, a2) if ws is not None])

    run_async(after_crash(), 30)


# 4 ---------------------------------------------------------------------------


def test_two_gateways_redis_one_postgres_store_once(make_gateway, redis_server, pg_db):
    """Two gateways on one Redis, both archiving into one PostgreSQL: 200 messages sent
    through both are stored exactly once, and `history` from either gateway is the same
    list, which is what a member saw."""
    env = redis_env(redis_server.url, CHATGW_ARCHIVE_KIND="postgres", CHATGW_ARCHIVE_POSTGRES_URL=pg_db.url)
    gws = [make_gateway(workers=2, env=env, ready_roles=["archiver"]) for _ in range(2)]
    for gw in gws:
        assert archiver_pid(gw), f"no archiver: {gw.children()}"
    rooms = ["fleet-1", "fleet-2"]
    per_sender = 50

    async def main():
        for gw in gws:
            await wait_bus_ready(gw)
        conns = []
        try:
            members = []
            for gi, gw in enumerate(gws):
                ws, _ = await connect_hello(gw, f"member{gi}")
                conns.append(ws)
                for room in rooms:
                    r, _ = await join_room(ws, room)
                    assert r.get("type") == "joined", r
                members.append(Inbox(ws, f"member{gi}"))
            senders = []
            for gi, gw in enumerate(gws):
                for room in rooms:
                    ws, _ = await connect_hello(gw, f"s{gi}{room[-1]}")
                    conns.append(ws)
                    r, _ = await join_room(ws, room)
                    assert r.get("type") == "joined", r
                    senders.append((ws, room, f"g{gi}-{room}-"))
            await asyncio.gather(*(send_many(ws, room, [f"{p}{i}" for i in range(per_sender)], p)
                                   for ws, room, p in senders))
            per_room = per_sender * len(gws)
            await wait_all(members, lambda ib: all(len(ib.of("message", r)) >= per_room for r in rooms), 15,
                           "every message")
            seen = {}
            for room in rooms:
                lists = [[(m["epoch"], m["seq"], m["from"], m["text"]) for m in ib.of("message", room)] for ib in members]
                assert lists[0] == lists[1], f"{room}: the two gateways' members saw different orders"
                assert len(lists[0]) == per_room, len(lists[0])
                check_consecutive([x[1] for x in lists[0]], f"{room} at member0")
                seen[room] = lists[0]
            for ib in members:
                ib.stop()
            return seen
        finally:
            await close_all(conns)

    seen = run_async(main(), 40)
    total = sum(len(v) for v in seen.values())
    assert total == 200
    waited = wait_value(lambda: pg_counts(pg_db, rooms), (total, total), 15, "PostgreSQL rows (count, distinct)")
    time.sleep(1.0)  # both archivers write everything: nothing may show up twice later either
    assert pg_counts(pg_db, rooms) == (total, total)
    stored = pg_messages(pg_db, rooms)
    want = {(room, e, s): (f, t) for room, rows in seen.items() for e, s, f, t in rows}
    assert stored == want, (f"PostgreSQL rows differ from what members saw: missing {sorted(set(want) - set(stored))[:5]}, "
                            f"extra {sorted(set(stored) - set(want))[:5]}")

    async def read_back():
        out = []
        for gi, gw in enumerate(gws):
            ws, _ = await connect_hello(gw, f"reader{gi}")
            try:
                out.append({room: flatten(await history_all(ws, room, 30)) for room in rooms})
            finally:
                await close_all([ws])
        return out

    ha, hb = run_async(read_back(), 30)
    for room in rooms:
        assert ha[room] == hb[room], f"{room}: history differs between the gateways"
        got = [(m["epoch"], m["seq"], m["from"], m["text"]) for m in ha[room]]
        assert got == seen[room], f"{room}: history {got[:3]}... != what members saw {seen[room][:3]}..."
    print(f"\n[archive] 2 gateways -> PostgreSQL: {total} rows, complete {waited:.2f}s after the last delivery "
          f"(module cluster: initdb {pg_db.cluster.initdb_s:.2f}s, {pg_db.cluster.starts} start(s))")


# 5 ---------------------------------------------------------------------------


def test_postgres_outage_under_traffic(make_gateway, pg_db):
    """PostgreSQL stopped for ~6 s while a sender posts 40 msg/s: clients notice nothing (every
    message in order, every ack, quickly); within 10 s of its return the archive is complete."""
    env = archive_env(CHATGW_ARCHIVE_KIND="postgres", CHATGW_ARCHIVE_POSTGRES_URL=pg_db.url)
    gw = make_gateway(workers=2, env=env, ready_roles=WITH_ARCHIVER)
    room = "outage"
    pg = pg_db.cluster
    wait_value(lambda: pg_db.cluster.table_exists(pg_db.name), True, 10, "chat_messages created by the archiver")
    down_s = 6.0
    marks = {}

    async def main():
        await wait_bus_ready(gw)
        member, sender = await connect_joined(room, (gw, "member"), (gw, "sender"))
        try:
            mbox, sbox = Inbox(member, "member"), Inbox(sender, "sender")
            loop = asyncio.get_running_loop()
            sent: dict[str, float] = {}

            async def outage():
                await asyncio.sleep(2.0)
                marks["stop"] = loop.time()
                marks["stop_took"] = await asyncio.to_thread(pg.stop, "fast")
                await asyncio.sleep(down_s)
                marks["start"] = loop.time()
                await asyncio.to_thread(pg.start)
                marks["started"] = loop.time()

            n, _ = await asyncio.gather(paced_sender(sender, room, "o", 40, 2.0 + down_s + 2.0, sent), outage())
            await sbox.wait(lambda ib: ib.counts["ack"] >= n, 10, "every ack")
            await mbox.wait(lambda ib: len(ib.of("message", room)) >= n, 10, "every message")
            bad = errors_of(sbox) + errors_of(mbox)
            assert not bad, f"clients noticed the outage: {bad[:5]}"
            msgs = mbox.of("message", room)
            assert [m["text"] for m in msgs] == [f"o-{i}" for i in range(n)], "member: messages out of order or missing"
            check_consecutive([m["seq"] for m in msgs], "member")
            lat = ack_latencies(sbox, sent)
            assert len(lat) == n
            during = [lat[r] for r, t in sent.items() if marks["stop"] <= t <= marks["started"]]
            assert during, "no message was sent while PostgreSQL was down"
            assert max(lat.values()) < 1.5, f"acks slowed down by the outage: max {max(lat.values()):.3f}s"
            mbox.stop()
            sbox.stop()
            return n, {(m["epoch"], m["seq"]): (m["from"], m["text"]) for m in msgs}, len(during), max(lat.values())
        finally:
            await close_all([member, sender])

    n, seen, n_during, max_lat = run_async(main(), 45)
    waited = wait_value(lambda: pg_counts(pg_db, [room]), (n, n), 10, "archive after PostgreSQL returned")
    stored = {(e, s): v for (_, e, s), v in pg_messages(pg_db, [room]).items()}
    assert stored == seen, f"missing {sorted(set(seen) - set(stored))[:5]}, extra {sorted(set(stored) - set(seen))[:5]}"
    noticed = gw.find_log("archive write failed") + gw.find_log("archive database unreachable")
    print(f"\n[archive] {n} sent ({n_during} while PostgreSQL was down {down_s}s), max ack {max_lat * 1000:.0f} ms; "
          f"archive complete {waited:.2f}s after the tests saw it back; archiver logged {len(noticed)} db errors")


def test_a_postgresql_that_stops_answering_is_given_up_on_and_caught_up(make_gateway, pg_db):
    """PostgreSQL frozen (SIGSTOP: its connections stay open and nothing answers, as on a
    hung host or behind a partition) for a few seconds, with `archive.postgres_timeout_ms`
    1000: members notice nothing; the archiver logs within seconds that PostgreSQL gave no
    answer to its write; a `history` request is answered from the bus's history instead of
    waiting, and never says that nothing older exists (only the archive knows): its `more`
    stays true, and the page before the bus's oldest message is `unavailable`, with one
    warning in the log; once PostgreSQL answers again the archive is complete and the
    scroll-back ends with `more` false. The archiver, retrying every second or so, logs the
    outage once (not at every retry: an hour's outage was thousands of lines) and its end,
    with how long it lasted. Before the timeout existed, an archive query without
    an answer was awaited for good, logging nothing (one CI run: the archive stopped after a
    PostgreSQL restart)."""
    env = archive_env(CHATGW_ARCHIVE_KIND="postgres", CHATGW_ARCHIVE_POSTGRES_URL=pg_db.url,
                      CHATGW_ARCHIVE_POSTGRES_TIMEOUT_MS="1000")
    gw = make_gateway(workers=1, env=env, ready_roles=WITH_ARCHIVER)
    room = "frozen"
    pg = pg_db.cluster
    wait_value(lambda: pg.table_exists(pg_db.name), True, 10, "chat_messages created by the archiver")
    before, during = [f"f-{i}" for i in range(10)], [f"f-{i}" for i in range(10, 20)]
    frozen: list[int] = []
    marks = {}

    async def main():
        await wait_bus_ready(gw)
        member, sender, reader = await connect_joined(room, (gw, "member"), (gw, "sender"), (gw, "reader"))
        try:
            mbox = Inbox(member, "member")
            await send_many(sender, room, before, "b")
            await await_value(lambda: pg_counts(pg_db, [room]), (10, 10), 10, "the first messages archived")
            frozen.extend(pg.freeze())
            marks["frozen_at"] = asyncio.get_running_loop().time()
            await send_many(sender, room, during, "d")
            await mbox.wait(lambda ib: len(ib.of("message", room)) >= 20, 10, "every message while frozen")
            assert [m["text"] for m in mbox.of("message", room)] == before + during
            asked = asyncio.get_running_loop().time()
            page = await history(reader, room, limit=50, timeout=6)
            marks["history_s"] = asyncio.get_running_loop().time() - asked
            msgs = check_page(page, room, "history while frozen")
            assert [m["text"] for m in msgs] == before + during
            assert page["more"] is True, f"the bus alone cannot tell that nothing older exists: {page}"
            oldest = {"epoch": msgs[0]["epoch"], "seq": msgs[0]["seq"]}
            older = await history(reader, room, limit=50, before=oldest, timeout=6)
            assert older.get("type") == "error" and older.get("code") == "unavailable", older
            assert older.get("room") == room, older
            await asyncio.to_thread(gw.wait_for_log, "PostgreSQL gave no answer to the archive's write within 1000 ms", 8)
            # Frozen long enough for the archiver to retry several times (every 2-3 s here).
            await asyncio.sleep(max(0.0, marks["frozen_at"] + 8.0 - asyncio.get_running_loop().time()))
            mbox.stop()
            return {(m["epoch"], m["seq"]): (m["from"], m["text"]) for m in mbox.of("message", room)}
        finally:
            await close_all([member, sender, reader])

    try:
        seen = run_async(main(), 60)
    finally:
        pg.thaw(frozen)
    waited = wait_value(lambda: pg_counts(pg_db, [room]), (20, 20), 15, "archive after PostgreSQL answered again")
    stored = {(e, s): v for (_, e, s), v in pg_messages(pg_db, [room]).items()}
    assert stored == seen, f"missing {sorted(set(seen) - set(stored))[:5]}, extra {sorted(set(stored) - set(seen))[:5]}"
    warnings = gw.find_log("archive read failed")
    assert len(warnings) == 1, f"two failed reads within a minute, one warning: {warnings}"
    failed, unreachable = gw.find_log("archive write failed"), gw.find_log("archive database unreachable")
    assert len(failed) == 1 and len(unreachable) <= 1, f"one outage, one line: {[line.raw for line in failed + unreachable]}"
    ended = gw.find_log("archive writes resumed")
    assert ended and ended[0].get_int("after_s") is not None, f"the outage's end, with its length: {ended}"

    async def after():
        ws, _ = await connect_hello(gw, "later")
        try:
            pages = await history_all(ws, room, limit=50)
            assert [m["text"] for m in flatten(pages)] == before + during, pages
        finally:
            await close_all([ws])

    run_async(after(), 30)
    print(f"\n[archive] PostgreSQL frozen: history answered in {marks['history_s']:.2f}s; "
          f"archive writes resumed after {ended[0].get_int('after_s')} s; "
          f"archive complete {waited:.2f}s after it answered again")


def test_a_message_with_nul_is_archived_by_postgres_and_the_archive_goes_on(make_gateway, pg_db):
    """U+0000 is a valid character in a message, and PostgreSQL's TEXT cannot hold it: the
    archive keeps that message with U+FFFD in its place, members get it as it was sent, and
    the messages after it are archived too (refused, it stopped the archive for everyone)."""
    env = archive_env(CHATGW_ARCHIVE_KIND="postgres", CHATGW_ARCHIVE_POSTGRES_URL=pg_db.url)
    gw = make_gateway(workers=1, env=env, ready_roles=WITH_ARCHIVER)
    room = "nul"
    texts = ["before", "a\x00b\x00", "after"]
    wait_value(lambda: pg_db.cluster.table_exists(pg_db.name), True, 10, "chat_messages created by the archiver")

    async def main():
        await wait_bus_ready(gw)
        member, sender = await connect_joined(room, (gw, "member"), (gw, "sender"))
        try:
            await send_many(sender, room, texts, "n")
            got = [await recv_until(member, lambda m: m.get("type") == "message", 5) for _ in texts]
            assert [m["text"] for m, _ in got] == texts
        finally:
            await close_all([member, sender])

    run_async(main(), 30)
    wait_value(lambda: pg_counts(pg_db, [room]), (3, 3), 10, "all three messages archived")
    bodies = [b for _, (_, b) in sorted((s, v) for (_, _, s), v in pg_messages(pg_db, [room]).items())]
    assert bodies == ["before", "a\ufffdb\ufffd", "after"]
    assert not gw.find_log("archive write failed"), gw.find_log("archive write failed")[:2]


def test_a_message_the_database_refuses_costs_the_archive_that_message_alone(make_gateway, pg_db):
    """A message the database will not take, whatever the retry (here a CHECK constraint
    refuses its text), is logged, counted in chatgw_archive_lost_total and not archived;
    the rest of its batch and everything after it are archived."""
    env = archive_env(CHATGW_ARCHIVE_KIND="postgres", CHATGW_ARCHIVE_POSTGRES_URL=pg_db.url)
    gw = make_gateway(workers=1, env=env, ready_roles=WITH_ARCHIVER, metrics=True)
    room = "refused"
    wait_value(lambda: pg_db.cluster.table_exists(pg_db.name), True, 10, "chat_messages created by the archiver")
    pg_db.psql("ALTER TABLE chat_messages ADD CONSTRAINT no_poison CHECK (body <> 'poison')")
    texts = ["before", "poison", "after", "later-1", "later-2"]

    async def main():
        await wait_bus_ready(gw)
        (sender,) = await connect_joined(room, (gw, "sender"))
        try:
            await send_many(sender, room, texts, "p")
        finally:
            await close_all([sender])

    run_async(main(), 30)
    wait_value(lambda: pg_counts(pg_db, [room]), (4, 4), 15, "every message but the refused one archived")
    bodies = [b for _, (_, b) in sorted((s, v) for (_, _, s), v in pg_messages(pg_db, [room]).items())]
    assert bodies == ["before", "after", "later-1", "later-2"]
    refusals = gw.find_log("the archive refused a message")
    assert refusals, "the refused message was not logged"
    # The server's reason, for the operator; not its DETAIL, which quotes the row (the text).
    reason = refusals[0].fields.get("error", "")
    assert 'violates check constraint "no_poison"' in reason and "SQLSTATE 23514" in reason, refusals[0].raw
    assert "Failing row" not in refusals[0].raw and "poison)" not in refusals[0].raw, refusals[0].raw
    wait_value(lambda: scrape(gw).sum("chatgw_archive_lost_total"), 1.0, 10, "chatgw_archive_lost_total")


@pytest.mark.parametrize("outage", ["disk_full", "server_stopped"])
def test_an_outage_longer_than_the_backlog_costs_the_archive_nothing(make_gateway, pg_db, outage):
    """1,400 messages while the database takes no writes, for a backlog of 1,000: the oldest
    are dropped from memory and fetched again from the bus (which holds 1,000 per room) once
    writes resume; every message is archived and none counted lost. (They were lost without
    a count: the catch-up started after the newest archived message, which the backlog's
    newer messages had moved past.)
    disk_full: the database answers but a trigger raises SQLSTATE 53100 for every insert.
    That refuses nothing about the messages (taken for refusals, they were skipped one by
    one, each counted in chatgw_archive_lost_total), and they are not fetched again after
    every failed write. server_stopped: PostgreSQL is stopped.
    Batches of 100: the batch being written is held beside the backlog, and one of the
    default 1,000 could take a whole room's 700 when the writer woke after that room's burst,
    leaving 700 for the backlog and nothing to drop (the catch-up this test is about did not
    run; CI failed so). With 100, at least 1,300 reach the backlog of 1,000, whenever the
    writer wakes."""
    env = archive_env(CHATGW_ARCHIVE_KIND="postgres", CHATGW_ARCHIVE_POSTGRES_URL=pg_db.url,
                      CHATGW_ARCHIVE_BACKLOG_MESSAGES="1000", CHATGW_ARCHIVE_BATCH_MESSAGES="100",
                      CHATGW_HISTORY_MESSAGES="1000")
    gw = make_gateway(workers=1, env=env, ready_roles=WITH_ARCHIVER, metrics=True)
    rooms = ["full-a", "full-b"]
    texts = [f"f-{i}" for i in range(700)]
    wait_value(lambda: pg_db.cluster.table_exists(pg_db.name), True, 10, "chat_messages created by the archiver")
    gw.wait_for_log("archive caught up from the bus", timeout=10)
    if outage == "disk_full":
        pg_db.psql("CREATE FUNCTION disk_full() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                   "RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = '53100'; END $$")
        pg_db.psql("CREATE TRIGGER disk_full BEFORE INSERT ON chat_messages FOR EACH ROW EXECUTE FUNCTION disk_full()")
    else:
        pg_db.cluster.stop("fast")

    async def main():
        await wait_bus_ready(gw)
        member, sender = await connect_joined(rooms[0], (gw, "member"), (gw, "sender"))
        try:
            assert (await join_room(sender, rooms[1]))[0].get("type") == "joined"
            for room in rooms:
                await send_many(sender, room, texts, room)
            got = [await recv_until(member, lambda m: m.get("type") == "message", 5) for _ in range(3)]
            assert [m["text"] for m, _ in got] == texts[:3], "a member did not get its messages while the disk was full"
        finally:
            await close_all([member, sender])

    run_async(main(), 60)
    if outage == "disk_full":
        gw.wait_for_log("archive write failed; will retry", timeout=10)
    time.sleep(3.5)  # a few retries against the outage (a stopped server's write waits for a connection)
    assert len(gw.find_log("archive caught up from the bus")) == 1, "caught up again while writes failed"
    if outage == "disk_full":
        assert pg_counts(pg_db, rooms) == (0, 0)
        pg_db.psql("DROP TRIGGER disk_full ON chat_messages")
    else:
        pg_db.cluster.start()
    wait_value(lambda: pg_counts(pg_db, rooms), (1400, 1400), 20, "every message archived once writes resumed")
    for room in rooms:
        bodies = [b for _, (_, b) in sorted((s, v) for (_, _, s), v in pg_messages(pg_db, [room]).items())]
        assert bodies == texts, room
    # The catch-up logs its line after its last write commits: the rows can be seen first.
    wait_value(lambda: len(gw.find_log("archive caught up from the bus")), 2, 10, "the dropped caught up once")
    assert not gw.find_log("the archive refused a message"), gw.find_log("the archive refused a message")[:2]
    assert scrape(gw).sum("chatgw_archive_lost_total") == 0.0
    caught_up = gw.find_log("archive caught up from the bus")
    assert len(caught_up) == 2, "the dropped were caught up more than once"
    assert caught_up[1].get_int("messages") >= 300, caught_up[1].text  # at least the 300 dropped


# 6 ---------------------------------------------------------------------------


def mint(user: str, rooms: str) -> str:
    r = subprocess.run([str(chatctl_bin()), "token", "--user", user, "--rooms", rooms, "--secret", JWT_SECRET],
                       capture_output=True, text=True, timeout=15)
    assert r.returncode == 0, f"chatctl token failed ({r.returncode}): {r.stderr.strip()}"
    return r.stdout.strip()


def test_history_bad_requests_and_forbidden_room(make_gateway):
    """jwt mode, token for room `a` only: `history` of `b` -> forbidden; malformed `before`
    and a limit outside 1..200 -> bad_json (also 400 over HTTP); the connection stays usable."""
    env = archive_env(CHATGW_AUTH_MODE="jwt", CHATGW_AUTH_JWT_SECRET=JWT_SECRET, CHATGW_API_KEY=API_KEY)
    gw = make_gateway(workers=1, env=env, ready_roles=WITH_ARCHIVER)
    token = mint("ua", "a")

    async def main():
        ws, hello = await connect_hello(gw, "ignored", path=f"/ws?token={token}")
        try:
            assert hello.get("user") == "ua", hello
            loop = asyncio.get_running_loop()
            while True:  # the worker may be up before its bus link
                r, _ = await join_room(ws, "a")
                if r.get("type") == "joined" or loop.time() > 10 or r.get("code") != "unavailable":
                    break
                await asyncio.sleep(0.1)
            assert r.get("type") == "joined", r
            frames = await send_many(ws, "a", ["one", "two", "three"], "x-")
            msgs = room_messages(frames, "a")
            epoch = msgs[-1]["epoch"]

            ok = await history(ws, "a", limit=200)
            assert [m["text"] for m in check_page(ok, "a", "room a")] == ["one", "two", "three"], ok
            one = await history(ws, "a", limit=1, before={"epoch": epoch, "seq": msgs[-1]["seq"]})
            assert [m["text"] for m in check_page(one, "a", "limit 1")] == ["two"] and one["more"] is True, one

            forb = await history(ws, "b", limit=10)
            assert forb.get("type") == "error" and forb.get("code") == "forbidden", f"history of a forbidden room: {forb}"
            forb2 = await history(ws, "b")
            assert forb2.get("code") == "forbidden", forb2

            bad_cases = {
                "before {epoch:1}": dict(limit=10, before={"epoch": 1}),
                "before \"x\"": dict(limit=10, before="x"),
                "before without seq": dict(limit=10, before={"epoch": epoch}),
                "before seq not an int": dict(limit=10, before={"epoch": epoch, "seq": "2"}),
                "limit 0": dict(limit=0),
                "limit 201": dict(limit=201),
                "limit -1": dict(limit=-1),
            }
            wrong = {}
            for what, kw in bad_cases.items():
                reply = await history(ws, "a", **kw)
                if not (reply.get("type") == "error" and reply.get("code") == "bad_json"):
                    wrong[what] = reply
            assert not wrong, f"not refused with bad_json: {wrong}"
            assert (await app_ping(ws)).get("type") == "pong"
            again = await history(ws, "a", limit=2)
            assert [m["text"] for m in check_page(again, "a", "after the errors")] == ["two", "three"], again
        finally:
            await close_all([ws])

    run_async(main(), 30)

    for limit in (0, 201):
        status, body = api_history(gw, "a", limit)
        assert status == 400, f"HTTP limit={limit}: {status} {body!r}"
    status, body = api_history(gw, "a", 2)
    assert status == 200 and [m["text"] for m in body["messages"]] == ["two", "three"], (status, body)


def _start_once(tmp: Path, env: dict[str, str]):
    return run_chatgw_once(
        ["--config", str(DEFAULT_CONFIG), "--state-dir", str(tmp / "state"),
         "--listen", f"127.0.0.1:{free_port()}", "--workers", "1"],
        env={"CHATGW_METRICS_LISTEN": f"127.0.0.1:{free_port()}", **env},
        timeout=15,
    )


def _one_line(res, what: str) -> str:
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.returncode == 2, f"{what}: exit {res.returncode} (want 2); stderr:\n{res.stderr[-2000:]}"
    assert len(lines) == 1, f"{what}: want one stderr line, got {len(lines)}:\n{res.stderr[-2000:]}"
    assert not res.leftover, f"{what}: processes left behind: {res.leftover}"
    assert res.elapsed < 10, f"{what}: took {res.elapsed:.1f}s"
    return lines[0]


def _garbage_file(path: Path) -> bytes:
    data = (b"this is not a SQLite database \x00\xff\xfe" * 300)[:8192]
    path.write_bytes(data)
    return data


def _damaged_database(path: Path) -> bytes:
    """A real SQLite file (valid header and schema page) whose table pages are overwritten."""
    con = sqlite3.connect(path)
    con.execute("PRAGMA page_size=4096")
    con.execute("CREATE TABLE filler (k INTEGER PRIMARY KEY, v BLOB)")
    con.executemany("INSERT INTO filler VALUES (?, ?)", [(i, os.urandom(200)) for i in range(400)])
    con.commit()
    con.close()
    data = bytearray(path.read_bytes())
    assert len(data) >= 4096 * 6, len(data)
    data[4096 * 2:4096 * 5] = b"\xa5" * (4096 * 3)
    path.write_bytes(bytes(data))
    return bytes(data)


@pytest.mark.parametrize("damage", ["garbage", "damaged-pages"])
def test_corrupt_sqlite_archive_stops_startup(damage):
    """A corrupt archive file (garbage bytes; or a real database with overwritten pages): exit 2
    with one line `chatgw: the archive PATH is not usable: ...`, no process left (and the
    garbage file left as it was)."""
    tmp = Path(tempfile.mkdtemp(prefix="chatgw-e2e-arch-"))
    try:
        path = tmp / "db" / "archive.sqlite"
        path.parent.mkdir()
        before = _garbage_file(path) if damage == "garbage" else _damaged_database(path)
        res = _start_once(tmp, {"CHATGW_ARCHIVE_SQLITE_PATH": str(path)})
        line = _one_line(res, f"corrupt archive ({damage})")
        if damage == "garbage":
            assert path.read_bytes() == before, "start-up rewrote the corrupt archive file"
        assert line.startswith(f"chatgw: the archive {path} is not usable: "), line
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_unwritable_archive_location_stops_startup():
    """An archive path under a regular file: exit 2, one line naming the path, nothing left."""
    tmp = Path(tempfile.mkdtemp(prefix="chatgw-e2e-arch-"))
    try:
        blocker = tmp / "plainfile"
        blocker.write_text("x")
        path = blocker / "x.sqlite"
        res = _start_once(tmp, {"CHATGW_ARCHIVE_SQLITE_PATH": str(path)})
        line = _one_line(res, "unwritable archive")
        assert line.startswith("chatgw: ") and str(path) in line, line
        assert blocker.read_text() == "x"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# 7 ---------------------------------------------------------------------------


def test_archive_off_no_archiver_history_from_bus(make_gateway):
    """archive.kind none: no archiver child, no archive file; `history` still pages from the
    bus's in-memory history."""
    gw = make_gateway(workers=2, env=archive_env(CHATGW_ARCHIVE_KIND="none", CHATGW_API_KEY=API_KEY))
    room = "no-archive"
    time.sleep(0.5)  # an archiver would have been started with the others
    roles = sorted(c.role for c in gw.children())
    assert roles == ["relay", "worker", "worker"], f"children with the archive off: {gw.children()}"
    assert not any("role=archiver" in l.raw for l in gw.log_lines()), [l.raw for l in gw.log_lines() if "archiver" in l.raw]

    async def main():
        await wait_bus_ready(gw)
        ws, _ = await connect_hello(gw, "writer")
        try:
            r, _ = await join_room(ws, room)
            assert r.get("type") == "joined", r
            frames = await send_many(ws, room, [f"m{i:02d}" for i in range(30)], "m-")
            sent = [(m["epoch"], m["seq"], m["text"]) for m in room_messages(frames, room)]
            pages = await history_all(ws, room, 25)
            assert [len(p["messages"]) for p in pages] == [25, 5], [len(p["messages"]) for p in pages]
            got = [(m["epoch"], m["seq"], m["text"]) for m in flatten(pages)]
            assert got == sent, (got[:3], sent[:3])
            default = await history(ws, room)
            assert [m["text"] for m in check_page(default, room, "default limit")] == [x[2] for x in sent] \
                and default["more"] is False, default
        finally:
            await close_all([ws])

    run_async(main(), 30)
    status, body = api_history(gw, room, 10)
    assert status == 200 and [m["text"] for m in body["messages"]] == [f"m{i:02d}" for i in range(20, 30)], (status, body)
    assert not list(gw.state_dir.glob("archive.sqlite*")), list(gw.state_dir.iterdir())
    assert roles == sorted(c.role for c in gw.children())


# 8 ---------------------------------------------------------------------------


def test_retention_per_room_applied_at_archiver_start(make_gateway):
    """archive.retention_messages=20: after 50 messages and an archiver restart (retention runs
    at its start), the room keeps exactly its 20 newest rows; another room is trimmed too."""
    env = archive_env(CHATGW_ARCHIVE_RETENTION_MESSAGES="20")
    gw = make_gateway(workers=2, env=env, ready_roles=WITH_ARCHIVER)
    path = sqlite_path(gw)
    rooms = {"ret-big": 50, "ret-small": 12}

    async def main():
        await wait_bus_ready(gw)
        ws, _ = await connect_hello(gw, "writer")
        try:
            out = {}
            for room, n in rooms.items():
                r, _ = await join_room(ws, room)
                assert r.get("type") == "joined", r
                frames = await send_many(ws, room, [f"{room}-{i}" for i in range(n)], f"{room}-")
                out[room] = room_messages(frames, room)
            return out
        finally:
            await close_all([ws])

    sent = run_async(main(), 30)
    for room, n in rooms.items():
        wait_value(lambda: sqlite_counts(path, room), (n, n), 5, f"{room} archived before the restart")
    old = archiver_pid(gw)
    os.kill(old, signal.SIGKILL)
    new = gw.wait_child("archiver", not_pid=old, timeout=10)
    assert new, gw.log_text()[-2000:]
    wait_child_ready(gw, "archiver", new)
    waited = wait_value(lambda: sqlite_counts(path, "ret-big"), (20, 20), 10, "ret-big trimmed to 20 rows")
    stored = sqlite_messages(path, "ret-big")
    want = {(m["epoch"], m["seq"]): (m["from"], m["text"]) for m in sent["ret-big"][-20:]}
    assert stored == want, f"kept {sorted(stored)[:3]}..., want the 20 newest {sorted(want)[:3]}..."
    assert sqlite_counts(path, "ret-small") == (12, 12), "a room under the limit lost rows"
    print(f"\n[archive] retention trimmed ret-big to 20 rows {waited:.2f}s after the new archiver was ready")


# 9 ---------------------------------------------------------------------------


def test_archiver_behind_what_the_bus_holds_logs_loss_and_resume_gaps_only_that(make_gateway):
    """history.messages=10. The archiver is stopped (SIGSTOP) while 40 messages go by, then
    killed: the new one fills what the bus still holds, logs `archive is missing messages
    the bus no longer holds` with from/to of the hole, and a resume from before the hole gets
    the archive's messages, a `gap` for exactly that hole, and the bus's messages."""
    gw = make_gateway(workers=2, env=archive_env(CHATGW_HISTORY_MESSAGES="10"), ready_roles=WITH_ARCHIVER)
    path = sqlite_path(gw)
    room = "hole"
    arch = archiver_pid(gw)

    async def send(texts, prefix):
        ws, _ = await connect_hello(gw, "writer")
        try:
            r, _ = await join_room(ws, room)
            assert r.get("type") == "joined", r
            return room_messages(await send_many(ws, room, texts, prefix), room)
        finally:
            await close_all([ws])

    async def first():
        await wait_bus_ready(gw)
        return await send([f"t{i}" for i in range(5)], "a-")

    early = run_async(first(), 20)
    epoch = early[0]["epoch"]
    wait_value(lambda: sqlite_counts(path, room), (5, 5), 5, "first 5 archived")
    mark = gw.log_mark()
    os.kill(arch, signal.SIGSTOP)
    try:
        later = run_async(send([f"t{i}" for i in range(5, 45)], "b-"), 20)
    finally:
        os.kill(arch, signal.SIGKILL)
    assert [m["seq"] for m in later] == list(range(6, 46)), [m["seq"] for m in later][:3]
    new = gw.wait_child("archiver", not_pid=arch, timeout=10)
    assert new, gw.log_text()[-2000:]
    wait_child_ready(gw, "archiver", new)
    miss = gw.wait_for_line(lambda l: l.text.startswith("archive is missing messages the bus no longer holds"),
                            10, since=mark, what="the archiver's loss report")
    assert (miss.fields.get("room"), miss.fields.get("from"), miss.fields.get("to")) == (room, "6", "35"), miss.raw
    wait_value(lambda: sqlite_counts(path, room), (15, 15), 5, "archive = 5 early + the 10 the bus held")
    held = sorted(s for _, s in sqlite_messages(path, room))
    assert held == list(range(1, 6)) + list(range(36, 46)), held

    async def resume():
        ws, _ = await connect_hello(gw, "late")
        try:
            joined, pre = await join_room(ws, room, since=2, epoch=epoch)
            assert joined.get("type") == "joined" and not pre and joined.get("seq") == 45, (joined, pre)
            frames = await read_frames(ws, 3 + 1 + 10, timeout=10)
            await assert_quiet_until_pong(ws, "after the resume over the hole")
            return frames
        finally:
            await close_all([ws])

    frames = run_async(resume(), 20)
    gaps = [m for m in frames if m.get("type") == "gap"]
    assert [(g.get("from"), g.get("to"), g.get("epoch")) for g in gaps] == [(6, 35, epoch)], frames
    msgs = [m for m in frames if m.get("type") == "message"]
    assert [m["seq"] for m in msgs] == [3, 4, 5] + list(range(36, 46)), [m["seq"] for m in msgs]
    print(f"\n[archive] loss logged: {miss.raw.split(']', 1)[-1].strip()}; resume frames: "
          f"{[m.get('seq', (m.get('type'), m.get('from'), m.get('to'))) for m in frames]}")


def test_the_archiver_is_ready_only_once_it_listens_to_the_bus(make_gateway):
    """What is published between the archiver's start and its subscription reaches the
    archive only through the bus's history; so the archiver reports ready once it is
    subscribed (a fast worker once published 10 messages in that gap, beyond a history of
    5), or, with the bus unreachable, after the same 3 s a worker waits. Here the bus is a
    Redis that is not there: ready must not come at once."""
    gw = make_gateway(workers=1, env=archive_env(CHATGW_BUS_KIND="redis",
                                                 CHATGW_BUS_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"),
                      ready_roles=["archiver"])
    lines = [l for l in gw.log_text().splitlines() if "role=archiver" in l]
    started_at = next(l for l in lines if "child started" in l).split(" ")[0]
    ready_at = next(l for l in lines if "child ready" in l).split(" ")[0]
    waited = (datetime.fromisoformat(ready_at.replace("Z", "+00:00"))
              - datetime.fromisoformat(started_at.replace("Z", "+00:00"))).total_seconds()
    assert waited >= 2.5, f"the archiver was ready {waited:.2f}s after its start, without a bus"
