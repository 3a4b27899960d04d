"""Resume under chaos (chatgw_e2e/chaos.py): every acked message at every member, exactly
once and in order, or reported lost, while processes die, reload and stall.

CI sizes: 4 rooms x 10 members (+ a sender each), 20 msg/s per room, 12 s of traffic per
case. ``scripts/chaos`` runs the same cases at full size, several times, and prints the
table.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from chatgw_e2e import chaos, pg, redis
from chatgw_e2e.placement import wait_bus_ready
from chatgw_e2e.redis import redis_env
from chatgw_e2e.rooms import Inbox, read_frames, send_many
from chatgw_e2e.ws import (
    close_all,
    connect_hello,
    join_room,
    recv_json,
    recv_until,
    run_async,
    send_json,
)

make_redis = redis.make_redis
pg_cluster, pg_db = pg.pg_cluster, pg.pg_db

ROOMS, MEMBERS, RATE, SECONDS = 4, 10, 20.0, 12.0


def _run(gw, scenario, **extra) -> chaos.Report:
    async def main():
        run = chaos.ChaosRun(gw, ROOMS, MEMBERS, RATE, SECONDS)
        for k, v in extra.items():
            setattr(run, k, v)
        return await run.run(scenario)

    report = run_async(main(), 85)
    print("\n" + report.explain())
    assert report.ok, report.explain()
    return report


@pytest.mark.parametrize("scenario", chaos.RELAY_SCENARIOS, ids=lambda s: s.slug)
def test_relay_bus(make_gateway, scenario):
    gw = make_gateway(workers=3, env=chaos.gateway_env(scenario), ready_roles=["relay", "archiver"])
    _run(gw, scenario)


@pytest.mark.parametrize("scenario", chaos.REDIS_SCENARIOS, ids=lambda s: s.slug)
def test_redis_bus(make_gateway, make_redis, scenario):
    redis = make_redis()
    env = chaos.gateway_env(scenario, redis_env(redis.url, CHATGW_ARCHIVE_KIND="sqlite"))
    gw = make_gateway(workers=3, env=env, ready_roles=["archiver"])
    _run(gw, scenario, redis=redis)


@pytest.mark.parametrize("scenario", chaos.POSTGRES_SCENARIOS, ids=lambda s: s.slug)
def test_postgres_archive(make_gateway, pg_db, scenario):
    env = chaos.gateway_env(scenario, {"CHATGW_ARCHIVE_KIND": "postgres", "CHATGW_ARCHIVE_POSTGRES_URL": pg_db.url})
    gw = make_gateway(workers=3, env=env, ready_roles=["relay", "archiver"])
    _run(gw, scenario, pg=pg_db.cluster)


def test_the_check_catches_a_silent_loss():
    """The accounting itself: a member that misses an acked message without a gap fails,
    one with a gap over it passes, a duplicate and a step back are caught."""
    acked = [("e1", s, f"t{s}") for s in range(1, 6)]

    def member(*events):
        m = chaos.Member.__new__(chaos.Member)
        m.user, m.room, m.joins, m.connects = "x", "r", 1, 1
        m.events = [chaos.Event("j", "e1", 0), *events]
        return m

    def report(m):
        r = chaos.Report("unit")
        chaos.check_member(m, acked, r)
        return r

    ms = [chaos.Event("m", "e1", s) for s in range(1, 6)]
    assert report(member(*ms)).received == 5
    assert report(member(*ms[:2], *ms[3:])).lost == 1
    assert report(member(*ms[:2], chaos.Event("g", "e1", 3, upto=3), *ms[3:])).reported == 1
    assert report(member(*ms, ms[4])).duplicates == 1
    assert report(member(ms[0], ms[2], ms[1], *ms[3:])).disorder == 1
    # an epoch change reports the rest of the old epoch lost
    r = report(member(*ms[:3], chaos.Event("g", "e2", 0, upto=0), chaos.Event("m", "e2", 1)))
    assert (r.reported, r.lost) == (2, 0)
    # ... but a message of the old epoch after the new one is out of order
    r = report(member(*ms[:3], chaos.Event("m", "e2", 1), ms[3], ms[4]))
    assert r.disorder == 2


# --------------------------------------------------------------------------- regressions


FAST = {"CHATGW_LIMITS_RATE_PER_S": "100000", "CHATGW_LIMITS_BURST": "100000"}


async def _publish_steadily(ws, room: str, rate: float, stop: asyncio.Event) -> int:
    """Sends numbered texts at `rate` until `stop`; returns how many."""
    loop = asyncio.get_running_loop()
    t, n = loop.time(), 0
    while not stop.is_set():
        n += 1
        await send_json(ws, {"type": "send", "room": room, "text": f"p{n}"})
        t += 1 / rate
        await asyncio.sleep(max(0.0, t - loop.time()))
    return n


def test_resume_from_the_archive_is_not_overtaken_by_live_messages(make_gateway):
    """A resume that reaches back past the in-memory history is filled from the archive
    while the room goes on at 200 msg/s: `joined`, then the replay, then live messages, in
    seq order, every time (on 2151a1c a live message came before the replay)."""
    gw = make_gateway(workers=2, env={**FAST, "CHATGW_HISTORY_MESSAGES": "10"}, ready_roles=["relay", "archiver"])
    room = "overtaken"
    tries = 15

    async def main():
        await wait_bus_ready(gw)
        pub, _ = await connect_hello(gw, "pub")
        drain = None
        stop = asyncio.Event()
        publisher = None
        try:
            joined, _ = await join_room(pub, room)
            epoch = joined["epoch"]
            drain = Inbox(pub, "pub")  # the publisher's own copies, read and dropped
            publisher = asyncio.create_task(_publish_steadily(pub, room, 200, stop))
            await drain.wait(lambda ib: ib.counts["message"] >= 300, 20, "300 messages")
            bad = []
            for k in range(tries):
                latest = drain.of("message")[-1]["seq"]
                since = latest - 150  # far past the 10 in memory: the archive fills it
                ws, _ = await connect_hello(gw, f"r{k}")
                try:
                    await send_json(ws, {"type": "join", "room": room, "since": since, "epoch": epoch})
                    frames = []
                    while True:
                        m = await recv_json(ws, 10)
                        if m.get("room") == room:
                            frames.append(m)
                        if frames and frames[0].get("type") == "joined" and m.get("type") == "message" \
                                and m["seq"] > frames[0]["seq"] + 5:
                            break
                        if len(frames) > 2000:
                            break
                finally:
                    await close_all([ws])
                kinds = [f["type"] for f in frames]
                seqs = [f["seq"] for f in frames if f["type"] == "message"]
                if kinds[0] != "joined" or "gap" in kinds or seqs != list(range(since + 1, since + 1 + len(seqs))):
                    first_bad = next((i for i, s in enumerate(seqs) if s != since + 1 + i), None)
                    out_of_place = seqs[max(0, first_bad - 2):first_bad + 3] if first_bad is not None else []
                    bad.append(f"try {k}: since {since}, frames {kinds[:2]}..., gaps {[f for f in frames if f['type'] == 'gap']}, first seqs {seqs[:3]}, "
                               f"out of place {out_of_place}")
            assert not bad, f"{len(bad)} of {tries} resumes out of order:\n" + "\n".join(bad[:5])
        finally:
            stop.set()
            if publisher is not None:
                await asyncio.wait_for(publisher, 5)
            if drain is not None:
                drain.stop()
            await close_all([pub])

    run_async(main(), 80)


def _relay_outage_gateway(make_gateway, **env):
    # The master restarts a dead relay only after 1.5 s: a window to join in.
    return make_gateway(workers=2, env={**FAST, "CHATGW_SUPERVISOR_RESTART_BACKOFF_INITIAL_MS": "1500",
                                        "CHATGW_SUPERVISOR_RESTART_BACKOFF_MAX_MS": "1500", **env},
                        ready_roles=["relay", "archiver"])


async def _kill_relay_and_wait_for_the_loss(gw):
    relay = gw.relay_pid()
    mark = gw.log_mark()
    os.kill(relay, signal.SIGKILL)
    # every worker saw its link go
    deadline = asyncio.get_running_loop().time() + 5
    while len([l for l in gw.find_log("relay link lost", mark) if (l.proc or "").startswith("worker")]) < gw.workers:
        assert asyncio.get_running_loop().time() < deadline, "workers did not notice the relay's death"
        await asyncio.sleep(0.02)


def test_a_resume_during_a_relay_restart_waits_for_the_relay(make_gateway):
    """A member that resumes (or joins) while the relay is restarting is answered once the
    relay is back, with everything it missed; nobody gets `unavailable` for an outage
    shorter than bus.outage_wait_ms. (On 2151a1c the join got `unavailable`, and a client
    that did not retry sat in a room-less connection: silent loss.)"""
    gw = _relay_outage_gateway(make_gateway)
    room = "outage"

    async def main():
        await wait_bus_ready(gw)
        pub, _ = await connect_hello(gw, "pub")
        a, _ = await connect_hello(gw, "alice")
        conns = [pub, a]
        try:
            for ws in conns:
                r, _ = await join_room(ws, room)
                assert r.get("type") == "joined", r
            await send_many(pub, room, [f"before{i}" for i in range(5)], "b-")
            got = [m for m in await read_frames(a, 5) if m.get("type") == "message"]
            since, epoch = got[-1]["seq"], got[-1]["epoch"]
            await close_all([a])
            conns.remove(a)

            await _kill_relay_and_wait_for_the_loss(gw)
            t0 = asyncio.get_running_loop().time()
            a2, _ = await connect_hello(gw, "alice")
            fresh, _ = await connect_hello(gw, "carol")
            conns += [a2, fresh]
            await send_json(a2, {"type": "join", "room": room, "since": since, "epoch": epoch, "ref": "resume"})
            await send_json(fresh, {"type": "join", "room": room, "ref": "fresh"})
            resumed = await recv_json(a2, 8)
            joined = await recv_json(fresh, 8)
            waited = asyncio.get_running_loop().time() - t0
            assert resumed.get("type") == "joined" and resumed.get("ref") == "resume", \
                f"the resume during the relay restart was answered {resumed}"
            assert joined.get("type") == "joined" and joined.get("ref") == "fresh", \
                f"the join during the relay restart was answered {joined}"
            assert waited > 1.0, f"answered after {waited:.2f}s, before the relay can have restarted"
            # the relay (no persisted history) came back with a new epoch: the resume is
            # told so, and the rest of its old epoch -- nothing, here -- comes from the archive
            follow = await read_frames(a2, 1)
            assert follow[0].get("type") == "gap" and follow[0].get("epoch") == resumed["epoch"] != epoch, follow
            # and both are members again: a message after the restart reaches them
            r, _ = await join_room(pub, room)
            await send_many(pub, room, ["after"], "a-")
            for ws in (a2, fresh):
                m, _ = await recv_until(ws, lambda m: m.get("type") == "message", 5)
                assert m["text"] == "after" and m["epoch"] == resumed["epoch"], m
            return waited
        finally:
            await close_all(conns)

    waited = run_async(main(), 40)
    print(f"\n[outage] resume answered {waited:.2f}s after the relay was killed")


def test_a_join_told_unavailable_once_the_outage_outlasts_the_wait(make_gateway):
    """bus.outage_wait_ms bounds the wait: with 300 ms and a relay that takes 1.5 s to come
    back, a join is told `unavailable` (with its room and ref) after about 300 ms."""
    gw = _relay_outage_gateway(make_gateway, CHATGW_BUS_OUTAGE_WAIT_MS="300")

    async def main():
        await wait_bus_ready(gw)
        await _kill_relay_and_wait_for_the_loss(gw)
        ws, _ = await connect_hello(gw, "dora")
        try:
            t0 = asyncio.get_running_loop().time()
            await send_json(ws, {"type": "join", "room": "late", "ref": "j"})
            m = await recv_json(ws, 5)
            waited = asyncio.get_running_loop().time() - t0
            assert m.get("type") == "error" and m.get("code") == "unavailable", m
            assert m.get("room") == "late" and m.get("ref") == "j", m
            assert 0.25 <= waited < 1.2, f"told after {waited:.2f}s"
        finally:
            await close_all([ws])

    run_async(main(), 30)


def test_redis_acks_follow_their_message_while_others_join(make_gateway, make_redis):
    """Redis bus: a sender's ack comes after its own message even while other members keep
    joining the room on the same worker. (A join's answer released the acks of every
    publish up to its seq, before those messages had come in live: ack before message.)"""
    redis = make_redis()
    gw = make_gateway(workers=1, env=redis_env(redis.url), ready_roles=[])
    room = "acks"
    n = 600

    async def main():
        await wait_bus_ready(gw)
        pub, _ = await connect_hello(gw, "pub")
        conns = [pub]
        try:
            j, _ = await join_room(pub, room)
            assert j.get("type") == "joined", j
            px = Inbox(pub, "pub")

            async def joiners():
                k = 0
                while px.counts["ack"] < n:
                    ws, _ = await connect_hello(gw, f"j{k}")
                    await send_json(ws, {"type": "join", "room": room})
                    await recv_until(ws, lambda m: m.get("type") == "joined", 5)
                    await close_all([ws])
                    k += 1
                return k

            joining = asyncio.create_task(joiners())
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            for i in range(n):
                await send_json(pub, {"type": "send", "room": room, "text": f"m{i}", "ref": f"r{i}"})
                await asyncio.sleep(max(0.0, t0 + (i + 1) / 300 - loop.time()))
            await px.wait(lambda ib: ib.counts["ack"] >= n, 20, f"{n} acks")
            joins = await asyncio.wait_for(joining, 10)
            px.stop()
            seen, early = set(), []
            for m in px.msgs:
                if m.get("type") == "message":
                    seen.add(m["text"])
                elif m.get("type") == "ack" and f"m{m['ref'][1:]}" not in seen:
                    early.append(m)
            assert not early, f"{len(early)} of {n} acks came before their message ({joins} joins meanwhile): {early[:3]}"
            return joins
        finally:
            await close_all(conns)

    joins = run_async(main(), 60)
    print(f"\n[acks] {n} sends, every ack after its message, {joins} joins meanwhile")
