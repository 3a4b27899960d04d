"""The Redis bus end to end (``bus.kind: redis``): several gateways on one real
redis-server share rooms; Redis going away and coming back; the history caps in Redis;
a server on the Redis port that is not Redis; member counts when a gateway stops.

Black-box: the binary (CHATGW_BIN), WebSocket clients, ps and signals, plus a real
``redis-server`` per test (chatgw_e2e.redis.RedisServer) whose keys are inspected over RESP.
Redis keys: ``chatgw:{ROOM}:seq|epoch|stream|members``, ``chatgw:alive:{worker}``; live
messages on channel ``chatgw:ROOM``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections import Counter

import pytest

from chatgw_e2e import redis
from chatgw_e2e.placement import connect_on_slot, one_per_slot, wait_bus_ready
from chatgw_e2e.procs import wait_pids_dead
from chatgw_e2e.redis import Resp, redis_env, room_key, stream_entries
from chatgw_e2e.rooms import (
    Inbox,
    assert_quiet_until_pong,
    check_consecutive,
    check_fanout,
    first_lines,
    join_all_then_last,
    read_frames,
    send_many,
    send_numbered,
    wait_all,
)
from chatgw_e2e.ws import (
    close_all,
    conn_slot,
    connect_hello,
    connect_joined,
    join_room,
    open_many,
    recv_json,
    run_async,
    send_json,
    send_message,
)

# fixtures of chatgw_e2e.redis, found by pytest under these names (used by name only)
fake_redis = redis.fake_redis
make_redis = redis.make_redis
redis_server = redis.redis_server


def _gateway(make_gateway, url: str, workers: int = 2, **env):
    return make_gateway(workers=workers, env=redis_env(url, **env))


# 1 ---------------------------------------------------------------------------


def test_two_gateways_one_room_same_order(redis_server, make_gateway):
    """40 clients over 2 gateways x 2 workers, 5 senders on both: 200 messages, one order."""
    a = _gateway(make_gateway, redis_server.url)
    b = _gateway(make_gateway, redis_server.url)
    room = "shared"
    per_gw, per_sender = 20, 40

    async def main():
        await wait_bus_ready(a)
        await wait_bus_ready(b)
        ra = await open_many(a, per_gw, concurrency=per_gw, timeout=10, user_prefix="a")
        rb = await open_many(b, per_gw, concurrency=per_gw, timeout=10, user_prefix="b")
        conns = ra.conns + rb.conns
        try:
            assert not ra.errors and not rb.errors, f"connections failed: {first_lines(ra.errors + rb.errors)}"
            slots_a, slots_b = Counter(ra.slots()), Counter(rb.slots())
            assert set(slots_a) == {0, 1} and set(slots_b) == {0, 1}, (
                f"clients per worker slot: gateway A {dict(slots_a)}, gateway B {dict(slots_b)}"
            )
            # interleave the two gateways; everyone but the last joins, then the last one
            order = [x for pair in zip(zip(ra.conns, ra.hellos, "A" * per_gw), zip(rb.conns, rb.hellos, "B" * per_gw))
                     for x in pair]
            epochs, start_seq = await join_all_then_last(
                [ws for ws, _, _ in order], [f"{g}/{h['user']}" for _, h, g in order], room, 10,
                f"A slots {dict(slots_a)}, B slots {dict(slots_b)}")

            inboxes = [Inbox(ws, f"{g}/{h['user']}/w{conn_slot(h)}") for ws, h, g in order]
            users = [h["user"] for _, h, _ in order]
            # senders: one on each (gateway, slot), plus one more on A
            senders, seen = [], set()
            for i, (_, h, g) in enumerate(order):
                if (g, conn_slot(h)) not in seen:
                    seen.add((g, conn_slot(h)))
                    senders.append(i)
            senders.append(next(i for i, (_, h, g) in enumerate(order) if g == "A" and i not in senders))
            assert len(senders) == 5 and len(seen) == 4, (senders, seen)
            total = len(senders) * per_sender

            t0 = time.monotonic()
            await asyncio.gather(*(send_numbered(order[i][0], room, users[i], per_sender) for i in senders))
            await wait_all(inboxes, lambda ib: ib.counts["message"] >= total, 30, f"{total} messages")
            await wait_all([inboxes[i] for i in senders], lambda ib: ib.counts["ack"] >= per_sender, 10,
                           f"{per_sender} acks")
            took = time.monotonic() - t0
            await asyncio.sleep(0.3)  # duplicates would show up now
            for ib in inboxes:
                ib.stop()

            check_fanout(inboxes, room, users, senders, per_sender, total, start_seq, epochs)
            xlen = redis_server.cmd("XLEN", room_key(room, "stream"))
            seq_key = int(redis_server.cmd("GET", room_key(room, "seq")))
            return took, dict(slots_a), dict(slots_b), [order[i][2] + str(conn_slot(order[i][1])) for i in senders], xlen, seq_key
        finally:
            await close_all(conns)

    took, sa, sb, sender_places, xlen, seq_key = run_async(main(), 55)
    assert seq_key == 200, f"Redis {room_key(room, 'seq')} is {seq_key} after 200 messages"
    print(f"two gateways: 200 messages to 40 clients in {took:.2f}s; A slots {sa}, B slots {sb}; "
          f"senders at {sender_places}; stream XLEN {xlen}, seq key {seq_key}")


# 2 ---------------------------------------------------------------------------


def test_resume_on_another_gateway(redis_server, make_gateway):
    """Joined on A, gone; 30 messages via B; resumed on B (each worker slot) with since+epoch."""
    a = _gateway(make_gateway, redis_server.url)
    b = _gateway(make_gateway, redis_server.url)
    room = "resume-x"
    n_missed = 30

    async def main():
        await wait_bus_ready(a)
        await wait_bus_ready(b)
        conns = await connect_joined(room, (b, "bob"), (a, "amy"))
        sb, sa = conns
        try:
            await send_many(sb, room, [f"pre{i}" for i in range(3)], "p")
            # two clients on A (one per worker) join and record where they are
            placed = await one_per_slot(a, [0, 1], user_prefix="carl")
            marks = {}
            for slot, (ws, h) in placed.items():
                j, before = await join_room(ws, room)
                assert j.get("type") == "joined" and not before, (j, before)
                marks[slot] = (j["seq"], j["epoch"])
            await close_all([ws for ws, _ in placed.values()])
            assert len({m for m in marks.values()}) == 1, marks
            since, epoch = marks[0]
            assert since >= 3, f"joined.seq {since} after 3 messages"

            await send_many(sb, room, [f"m{k}" for k in range(1, n_missed + 1)], "b")
            resumed = []
            for slot in (0, 1):
                ws, h = await connect_on_slot(b, slot, user_prefix=f"carl{slot}-")
                conns.append(ws)
                await send_json(ws, {"type": "join", "room": room, "since": since, "epoch": epoch, "ref": f"rj{slot}"})
                frames = await read_frames(ws, 1 + n_missed, timeout=10)
                joined, rest = frames[0], frames[1:]
                assert joined.get("type") == "joined" and joined.get("ref") == f"rj{slot}", f"B slot {slot}: first frame {joined}"
                assert joined.get("seq") == since + n_missed and joined.get("epoch") == epoch, f"B slot {slot}: {joined}"
                assert all(m.get("type") == "message" and m.get("room") == room for m in rest), (
                    f"B slot {slot}: replay holds other frames: {[m for m in rest if m.get('type') != 'message'][:3]}"
                )
                assert [m["seq"] for m in rest] == list(range(since + 1, since + n_missed + 1)), \
                    f"B slot {slot}: replayed seqs {[m['seq'] for m in rest]}"
                assert [m["text"] for m in rest] == [f"m{k}" for k in range(1, n_missed + 1)], f"B slot {slot}: texts"
                assert all(m["epoch"] == epoch and m["from"] == "bob" for m in rest), f"B slot {slot}: {rest[:2]}"
                resumed.append((slot, ws))

            # then a live one, sent on gateway A
            await send_message(sa, room, "live")
            for slot, ws in resumed:
                live = await recv_json(ws, 5)
                assert live.get("type") == "message" and live.get("seq") == since + n_missed + 1 and \
                    live.get("text") == "live" and live.get("from") == "amy", f"B slot {slot}: after the replay: {live}"
                await assert_quiet_until_pong(ws, f"B slot {slot}: after the live message")
            return since, epoch
        finally:
            await close_all(conns)

    since, epoch = run_async(main(), 45)
    print(f"resume across gateways: since {since} epoch {epoch}: 30 replayed + 1 live on both workers of B")


AWKWARD_TEXTS = [
    "nul \u0000 inside", "\n", "lines\nand\n\nmore\n", "tab\t, cr\r\n, quote \" and backslash \\",
    "emoji \U0001F600, rtl \u202e, é, 中文", "1\n2\n3\n4\n5", "", "\u0000",
]


def test_awkward_texts_cross_the_redis_bus_exactly(redis_server, make_gateway):
    """Texts with NUL, newlines (the bus's PUBLISH payload separates its fields with them),
    quotes, emoji and an empty one reach a member on another gateway exactly, live and as
    history replayed from the Redis stream."""
    a = _gateway(make_gateway, redis_server.url, workers=1)
    b = _gateway(make_gateway, redis_server.url, workers=1)
    room = "awkward"

    async def main():
        await wait_bus_ready(a)
        await wait_bus_ready(b)
        conns = await connect_joined(room, (a, "sender"), (b, "member"))
        sender, member = conns
        try:
            await send_many(sender, room, AWKWARD_TEXTS, "w")
            live = [m for m in await read_frames(member, len(AWKWARD_TEXTS), timeout=10)]
            assert [m.get("text") for m in live] == AWKWARD_TEXTS, live
            late, _ = await connect_hello(b, "late")
            conns.append(late)
            await send_json(late, {"type": "join", "room": room, "history": len(AWKWARD_TEXTS), "ref": "h"})
            frames = await read_frames(late, 1 + len(AWKWARD_TEXTS), timeout=10)
            assert frames[0].get("type") == "joined", frames[0]
            assert [m.get("text") for m in frames[1:]] == AWKWARD_TEXTS, frames[1:]
            assert [m.get("seq") for m in frames[1:]] == [m["seq"] for m in live]
        finally:
            await close_all(conns)

    run_async(main(), 30)


# 3 ---------------------------------------------------------------------------


@pytest.mark.parametrize("outage_wait_ms", [0, 5000])
def test_redis_restart_during_traffic(redis_server, make_gateway, outage_wait_ms):
    """Stop Redis under ~50 msg/s, keep sending ~1 s, start it again on the same port.
    With bus.outage_wait_ms 0 the sends made meanwhile are refused; with 5 s (the
    default) they wait for Redis and are acked once it is back."""
    a = _gateway(make_gateway, redis_server.url, CHATGW_BUS_OUTAGE_WAIT_MS=str(outage_wait_ms))
    b = _gateway(make_gateway, redis_server.url, CHATGW_BUS_OUTAGE_WAIT_MS=str(outage_wait_ms))
    room = "restart"

    async def main():
        await wait_bus_ready(a)
        await wait_bus_ready(b)
        pa = await one_per_slot(a, [0, 1], user_prefix="ra")
        pb = await one_per_slot(b, [0, 1], user_prefix="rb")
        s_ws, s_hello = await connect_hello(a, "pub")
        members = [(f"A/w{s}", ws) for s, (ws, _) in sorted(pa.items())] + \
                  [(f"B/w{s}", ws) for s, (ws, _) in sorted(pb.items())]
        conns = [ws for _, ws in members] + [s_ws]
        try:
            js = []
            for _, ws in members + [("pub", s_ws)]:
                j, _ = await join_room(ws, room)
                assert j.get("type") == "joined", j
                js.append(j)
            epoch0 = js[-1]["epoch"]
            assert {j["epoch"] for j in js} == {epoch0}
            receivers = [Inbox(ws, name) for name, ws in members]
            sender = Inbox(s_ws, f"pub/A/w{conn_slot(s_hello)}")
            pids_before = {"A": (a.master_pid, a.workers_by_slot()), "B": (b.master_pid, b.workers_by_slot())}
            redis_pid0 = redis_server.pid

            loop = asyncio.get_running_loop()
            sent_at: dict[str, float] = {}
            marks: dict[str, float] = {}

            async def control():
                await asyncio.sleep(1.0)
                marks["stop"] = loop.time()
                rc = await asyncio.to_thread(redis_server.stop)
                marks["down"] = loop.time()
                marks["rc"] = rc
                await asyncio.sleep(1.0)
                marks["start"] = loop.time()
                await asyncio.to_thread(redis_server.start)
                marks["up"] = loop.time()

            async def send_loop():
                i = 0
                t_start = loop.time()
                while "up" not in marks or loop.time() < marks["up"] + 3.0:
                    if loop.time() - t_start > 20:
                        raise AssertionError(f"Redis stop/start took too long: {marks}")
                    ref = f"k{i}"
                    sent_at[ref] = loop.time()
                    await send_json(s_ws, {"type": "send", "room": room, "text": ref, "ref": ref})
                    i += 1
                    await asyncio.sleep(max(0.0, t_start + i * 0.02 - loop.time()))  # ~50/s
                return i

            ctl = asyncio.create_task(control())
            n_sent = await send_loop()
            await ctl

            def answered(ib):
                refs = {m.get("ref") for m in ib.msgs if m.get("type") in ("ack", "error")}
                return set(sent_at) <= refs
            try:
                await sender.wait(answered, 5, "an answer (ack or error) to every send")
            except AssertionError as e:
                refs = {m.get("ref") for m in sender.msgs if m.get("type") in ("ack", "error")}
                missing = sorted(set(sent_at) - refs, key=lambda r: int(r[1:]))
                raise AssertionError(
                    f"{len(missing)} of {n_sent} sends never answered (sent at "
                    f"{[round(sent_at[r] - marks['down'], 3) for r in missing[:10]]}s after Redis was down): "
                    f"{missing[:10]}; {e}"
                ) from None

            acks = {m["ref"]: m for m in sender.msgs if m.get("type") == "ack"}
            errors = {m["ref"]: m for m in sender.msgs if m.get("type") == "error" and m.get("ref") in sent_at}
            ack_time = {m["ref"]: t for m, t in zip(sender.msgs, sender.times) if m.get("type") == "ack"}
            bad_codes = [e for e in errors.values() if e.get("code") != "unavailable"]
            assert not bad_codes, f"send errors other than unavailable: {bad_codes[:3]}"
            assert not set(acks) & set(errors), "a send got both ack and error"

            down = [r for r in sent_at if marks["down"] + 0.05 < sent_at[r] < marks["start"]]
            assert len(down) >= 20, f"only {len(down)} sends while Redis was down: {marks}"
            if outage_wait_ms == 0:
                # while Redis was down, sends were refused (not lost, not acked)
                acked_down = [r for r in down if r in acks]
                assert not acked_down, f"sends made while Redis was down were acked: {[acks[r] for r in acked_down[:3]]}"
            else:
                # they waited for Redis, and were acked once it was back
                refused_down = [r for r in down if r not in acks]
                assert not refused_down, (f"{len(refused_down)} sends made while Redis was down were not acked: "
                                          f"{[errors.get(r) for r in refused_down[:3]]}")
                early = [r for r in down if ack_time[r] < marks["start"]]
                assert not early, f"sends acked while Redis was down: {[acks[r] for r in early[:3]]}"

            # back: the first ack within 2 s, and from 2 s on every send is acked
            after_up = [r for r in acks if sent_at[r] > marks["up"]]
            assert after_up, f"no send after Redis came back was acked: {list(errors.values())[-3:]}"
            first_ok = min(ack_time[r] for r in after_up) - marks["up"]
            assert first_ok <= 2.0, f"first ack for a send after Redis came back: {first_ok:.2f}s after"
            late_refused = [r for r in errors if sent_at[r] > marks["up"] + 2.0]
            assert not late_refused, (
                f"{len(late_refused)} sends more than 2 s after Redis came back still refused, "
                f"e.g. {[(r, round(sent_at[r] - marks['up'], 2), errors[r]) for r in late_refused[:3]]}"
            )

            own = {m["text"]: m for m in sender.of("message", room)}
            last_ref = max(acks, key=lambda r: int(r[1:]))
            await wait_all(receivers, lambda ib: any(m.get("text") == last_ref for m in ib.of("message", room)), 5,
                           f"the last acked message {last_ref}")
            await asyncio.sleep(0.3)
            for ib in receivers + [sender]:
                ib.stop()

            assert last_ref in own, f"the sender did not get its own last acked message {last_ref}"
            new_epoch = own[last_ref]["epoch"]
            assert new_epoch != epoch0, f"epoch unchanged over a Redis restart without persistence: {epoch0}"
            # ack after own message, same seq
            for j, ack in enumerate(sender.msgs):
                if ack.get("type") == "ack":
                    m = own.get(ack["ref"])
                    assert m is not None, f"ack without the sender's own message: {ack}"
                    assert sender.msgs.index(m) < j and m["seq"] == ack["seq"] and m["epoch"] in (epoch0, new_epoch), (ack, m)

            new_acked = [own[r] for r in acks if own[r]["epoch"] == new_epoch]
            report = []
            for ib in receivers + [sender]:
                assert not ib.of("bye"), f"{ib.name}: {ib.of('bye')}"
                if ib is not sender:
                    assert not ib.of("error"), f"{ib.name}: {ib.of('error')[:3]}"
                frames = [m for m in ib.msgs if m.get("room") == room and m.get("type") in ("message", "gap")]
                old = [m["seq"] for m in frames if m["type"] == "message" and m["epoch"] == epoch0]
                check_consecutive(old, f"{ib.name} (old epoch)")
                gaps = [(k, m) for k, m in enumerate(frames) if m["type"] == "gap"]
                assert gaps, f"{ib.name}: no gap after the Redis restart (frames around: {frames[len(old)-1:len(old)+3]})"
                gk, gap = gaps[0]
                assert gap.get("epoch") == new_epoch, f"{ib.name}: gap {gap}, new epoch is {new_epoch}"
                assert all(m["type"] == "message" and m["epoch"] == epoch0 for m in frames[:gk]), (
                    f"{ib.name}: new-epoch frames before the gap: {[m for m in frames[:gk] if m['epoch'] != epoch0][:3]}"
                )
                tail = frames[gk + 1:]
                assert all(m["type"] == "message" and m["epoch"] == new_epoch for m in tail), (
                    f"{ib.name}: after the gap: {[m for m in tail if m['type'] != 'message' or m['epoch'] != new_epoch][:3]}"
                )
                new = [m["seq"] for m in tail]
                assert new, f"{ib.name}: no message of the new epoch after the gap"
                check_consecutive(new, f"{ib.name} (new epoch)")
                if new[0] != 1:
                    assert gap["from"] <= 1 and gap["to"] >= new[0] - 1, (
                        f"{ib.name}: new epoch starts at seq {new[0]} but the gap is {gap}"
                    )
                got = {m["text"] for m in ib.of("message", room)}
                missing = [m["text"] for m in new_acked if m["text"] not in got]
                assert not missing, f"{ib.name}: acked messages of the new epoch not delivered: {missing[:5]}"
                report.append((ib.name, len(old), {k: gap[k] for k in ("from", "to")}, len(new)))

            pids_after = {"A": (a.master_pid, a.workers_by_slot()), "B": (b.master_pid, b.workers_by_slot())}
            assert a.alive() and b.alive(), "a gateway master died"
            assert pids_after == pids_before, f"gateway processes changed: {pids_before} -> {pids_after}"
            for g in (a, b):
                died = g.child_events("exited")
                assert not died, f"children exited: {[l.raw for l in died][:3]}"
            assert redis_server.pid != redis_pid0
            # and the bus is back on every worker of both gateways
            await wait_bus_ready(a, timeout=3)
            await wait_bus_ready(b, timeout=3)
            return n_sent, len(acks), len(errors), len(down), first_ok, marks, report
        finally:
            await close_all(conns)

    n_sent, n_acks, n_err, n_down, first_ok, marks, report = run_async(main(), 60)
    print(f"redis restart: {n_sent} sends, {n_acks} acks, {n_err} unavailable ({n_down} sent while down); "
          f"redis down {marks['start'] - marks['down']:.2f}s (stop took {marks['down'] - marks['stop']:.3f}s, rc "
          f"{marks['rc']}), start+PING {marks['up'] - marks['start']:.3f}s; first ack {first_ok:.3f}s after back")
    for r in report:
        print("  ", r)


def test_one_connection_pair_per_worker_after_redis_restart(redis_server, make_gateway):
    """A worker holds two Redis connections (commands, subscriber). After Redis restarts it
    holds two again: not more (an extra subscriber would get every room message again)."""
    gw = _gateway(make_gateway, redis_server.url)
    room = "pairs"

    def snapshot():
        return [(c.get("addr"), c.get("sub"), c.get("cmd")) for c in redis_server.clients()]

    async def main():
        await wait_bus_ready(gw)
        placed = await one_per_slot(gw, [0, 1], user_prefix="pp")
        conns = [ws for ws, _ in placed.values()]
        try:
            for ws in conns:
                j, _ = await join_room(ws, room)
                assert j.get("type") == "joined", j
            before = snapshot()
            await asyncio.to_thread(redis_server.restart, 1.0)
            await wait_bus_ready(gw, timeout=3)
            # every member is back in the room: a message reaches both workers' members
            await send_json(conns[0], {"type": "send", "room": room, "text": "after", "ref": "af"})
            for slot, ws in zip(placed, conns):
                await recv_until_text(ws, "after", 5, f"member on slot {slot}")
            await asyncio.sleep(2.5)  # longer than the longest reconnect backoff (1 s)
            after = snapshot()
            numsub = redis_server.cmd("PUBSUB", "NUMSUB", f"chatgw:{room}")
            return before, after, numsub
        finally:
            await close_all(conns)

    before, after, numsub = run_async(main(), 30)
    subs_before = [c for c in before if c[1] not in (None, "0")]
    subs_after = [c for c in after if c[1] not in (None, "0")]
    lines = gw.log_lines()
    ups = Counter(l.proc for l in lines if "Redis bus up" in l.raw)
    losts = Counter(l.proc for l in lines if "Redis bus lost" in l.raw)
    print(f"redis connections: before restart {len(before)} ({len(subs_before)} subscribed), after {len(after)} "
          f"({len(subs_after)} subscribed); 'Redis bus up' per worker {dict(ups)}, 'Redis bus lost' {dict(losts)}")
    assert len(before) == 4 and len(subs_before) == 2, f"2 workers before the restart: {before}"
    assert len(after) == 4 and len(subs_after) == 2, (
        f"after one Redis restart the 2 workers hold {len(after)} Redis connections, {len(subs_after)} of them "
        f"subscribed to rooms (expected 4 and 2): {after}; PUBSUB NUMSUB {numsub}; "
        f"log: 'Redis bus up' per worker {dict(ups)}, "
        f"'Redis bus lost' per worker {dict(losts)}"
    )


async def recv_until_text(ws, text: str, timeout: float, who: str = "") -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen = []
    while True:
        left = deadline - loop.time()
        try:
            if left <= 0:
                raise asyncio.TimeoutError()
            m = await recv_json(ws, left)
        except asyncio.TimeoutError:
            raise AssertionError(f"{who}: no message {text!r} within {timeout}s; got {seen[-5:]}") from None
        if m.get("type") == "message" and m.get("text") == text:
            return m
        seen.append(m)


# 4 ---------------------------------------------------------------------------


def test_history_cap_in_redis_stream(redis_server, make_gateway):
    """history.messages=50: 500 messages, the stream never holds more than 50; resume gets a gap."""
    gw = _gateway(make_gateway, redis_server.url, CHATGW_HISTORY_MESSAGES="50")
    room = "cap"
    skey = room_key(room, "stream")
    n = 500
    samples: list[int] = []
    stop = threading.Event()

    def sampler():
        with Resp(redis_server.port) as r:
            while not stop.is_set():
                samples.append(int(r.command("XLEN", skey)))
                time.sleep(0.002)

    async def main():
        await wait_bus_ready(gw)
        s, _ = await connect_hello(gw, "capper")
        r = None
        conns = [s]
        try:
            j, _ = await join_room(s, room)
            assert j.get("type") == "joined" and j["seq"] == 0, j
            epoch = j["epoch"]
            th = threading.Thread(target=sampler, daemon=True)
            th.start()
            try:
                for batch in range(50):  # 50 x 10, each batch pipelined, then a sample of our own
                    await send_many(s, room, [f"c{batch * 10 + i + 1}" for i in range(10)], f"b{batch}-")
                    samples.append(int(await asyncio.to_thread(redis_server.cmd, "XLEN", skey)))
            finally:
                await asyncio.sleep(0.05)
                stop.set()
                await asyncio.to_thread(th.join, 2)
            assert samples, "no XLEN samples"
            final = redis_server.cmd("XLEN", skey)
            entries = stream_entries(redis_server.cmd("XRANGE", skey, "-", "+"))

            r, _ = await connect_hello(gw, "late")
            conns.append(r)
            await send_json(r, {"type": "join", "room": room, "since": 0, "epoch": epoch, "ref": "r0"})
            frames = await read_frames(r, 2 + 50, 10)
            await assert_quiet_until_pong(r, "after the resume")
            return epoch, final, entries, frames
        finally:
            await close_all(conns)

    epoch, final, entries, frames = run_async(main(), 50)
    over = [x for x in samples if x > 50]
    print(f"history cap: {len(samples)} XLEN samples during {n} sends, max {max(samples)}, "
          f"distinct {sorted(set(samples))[-5:]}, final {final}")
    assert not over, f"XLEN went over 50: max {max(samples)} ({len(over)} of {len(samples)} samples)"
    assert final == 50, f"XLEN after {n} messages: {final}"
    assert [int(e["s"]) for e in entries] == list(range(451, 501)), f"stream holds seqs {[e['s'] for e in entries][:5]}..."
    assert {e["e"] for e in entries} == {epoch}, {e["e"] for e in entries}
    joined, gap, msgs = frames[0], frames[1], frames[2:]
    assert joined.get("type") == "joined" and joined.get("seq") == n and joined.get("epoch") == epoch, joined
    assert gap == {"type": "gap", "room": room, "from": 1, "to": 450, "epoch": epoch}, f"expected the gap, got {gap}"
    assert [m.get("type") for m in msgs] == ["message"] * 50, [m for m in msgs if m.get("type") != "message"][:3]
    assert [m["seq"] for m in msgs] == list(range(451, 501)), [m["seq"] for m in msgs]
    assert [m["text"] for m in msgs] == [f"c{i}" for i in range(451, 501)]


def test_history_max_age_trims_stream(redis_server, make_gateway):
    """history.max_age_s=2: after 3 s idle and one more message, the stream holds 1 entry."""
    gw = _gateway(make_gateway, redis_server.url, CHATGW_HISTORY_MAX_AGE_S="2")
    room = "aged"
    skey = room_key(room, "stream")

    async def main():
        await wait_bus_ready(gw)
        s, _ = await connect_hello(gw, "ager")
        try:
            j, _ = await join_room(s, room)
            assert j.get("type") == "joined", j
            await send_many(s, room, [f"old{i}" for i in range(5)], "o")
            before = redis_server.cmd("XLEN", skey)
            await asyncio.sleep(3.0)
            mid = redis_server.cmd("XLEN", skey)
            await send_many(s, room, ["fresh"], "f")
            after = redis_server.cmd("XLEN", skey)
            entries = stream_entries(redis_server.cmd("XRANGE", skey, "-", "+"))
            return before, mid, after, entries
        finally:
            await close_all([s])

    before, mid, after, entries = run_async(main(), 30)
    print(f"history max age: XLEN {before} after 5 messages, {mid} after 3 s idle, {after} after one more")
    assert before == 5, f"XLEN after 5 messages: {before}"
    assert after == 1, f"XLEN after 3 s idle (max age 2 s) and one more message: {after}: {entries}"
    assert entries[0]["t"] == "fresh" and entries[0]["s"] == "6", entries


def test_history_max_age_bounds_resume_and_scrollback(redis_server, make_gateway):
    """history.max_age_s=2, no new message: after 3 s a resume replays nothing older than
    2 s (a gap instead) and `history` returns nothing (README: the history kept per room for
    resume and history; the relay trims by age when it answers)."""
    gw = _gateway(make_gateway, redis_server.url, CHATGW_HISTORY_MAX_AGE_S="2")
    room = "aged2"

    async def main():
        await wait_bus_ready(gw)
        s, _ = await connect_hello(gw, "ager")
        r = None
        try:
            j, _ = await join_room(s, room)
            epoch = j["epoch"]
            await send_many(s, room, [f"old{i}" for i in range(5)], "o")
            t_last = time.time()
            await asyncio.sleep(3.0)
            r, _ = await connect_hello(gw, "resumer")
            await send_json(r, {"type": "join", "room": room, "since": 0, "epoch": epoch, "ref": "r0"})
            joined = await recv_json(r, 5)
            assert joined.get("type") == "joined" and joined.get("seq") == 5, joined
            # the replay is written with `joined`: a pong sent for a later ping comes after it
            await send_json(r, {"type": "ping", "ref": "end"})
            rest = []
            while True:
                m = await recv_json(r, 5)
                if m.get("type") == "pong":
                    break
                rest.append(m)
            await send_json(r, {"type": "history", "room": room, "ref": "h"})
            h = await recv_json(r, 5)
            return epoch, t_last, rest, h
        finally:
            await close_all([c for c in (s, r) if c is not None])

    epoch, t_last, rest, h = run_async(main(), 30)
    old = [m for m in rest if m.get("type") == "message"]
    assert not old, (
        f"a resume 3 s after the last message replayed {len(old)} messages older than "
        f"history.max_age_s=2 (oldest ts {t_last - old[0]['ts'] / 1000:.1f}s before that last send + 3 s idle): "
        f"{[(m['seq'], m['text']) for m in old]}; other frames {[m for m in rest if m.get('type') != 'message']}"
    )
    assert rest == [{"type": "gap", "room": room, "from": 1, "to": 5, "epoch": epoch}], rest
    assert h.get("messages") == [], f"history returned messages older than max_age_s: {h}"


# 5 ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["garbage", "close", "ok"])
def test_not_redis_on_the_redis_port(fake_redis, make_gateway, mode):
    """A server on the Redis port that is not Redis: workers log, keep running, refuse joins
    (after bus.outage_wait_ms, here 500 ms)."""
    fake = fake_redis(mode)
    gw = _gateway(make_gateway, fake.url, CHATGW_BUS_OUTAGE_WAIT_MS="500")  # ready once the bus is up or after 3 s

    async def main():
        pids0 = gw.workers_by_slot()
        assert set(pids0) == {0, 1}, pids0
        await asyncio.sleep(1.0)
        statuses = []
        for _ in range(6):
            status, body = await asyncio.to_thread(gw.http_get, "/healthz", 3)
            statuses.append((status, body))
        placed = await one_per_slot(gw, [0, 1], user_prefix="g")
        replies: dict[int, list[dict]] = {}

        async def joins(slot, ws):
            for k in range(2):
                try:
                    reply, _ = await join_room(ws, f"room{k}", timeout=5)
                except asyncio.TimeoutError:
                    reply = {"type": "<no answer within 5 s>"}
                replies.setdefault(slot, []).append(reply)
                await asyncio.sleep(0.3)

        try:
            await asyncio.gather(*(joins(slot, ws) for slot, (ws, _) in placed.items()))
        finally:
            await close_all([ws for ws, _ in placed.values()])
        return pids0, statuses, replies

    pids0, statuses, replies = run_async(main(), 45)
    pids1 = gw.workers_by_slot()
    worker_errors = [l for l in gw.log_lines() if (l.proc or "").startswith("worker") and l.level in ("error", "fatal", "critical")]
    exits = gw.child_events("exited")
    print(f"fake redis ({mode}): {fake.accepted} connections, {len(fake.commands)} commands "
          f"{[c[:2] for c in fake.commands[:4]]}; join replies {replies}; worker error lines "
          f"{[l.raw for l in worker_errors[:2]]}")
    assert fake.accepted > 0, "the gateway never connected to the Redis port"
    assert gw.alive(), "master died"
    assert pids1 == pids0 and not exits, f"workers changed: {pids0} -> {pids1}; exits {[l.raw for l in exits]}"
    assert all(s == 200 for s, _ in statuses), f"/healthz: {statuses}"
    bad = {slot: [r for r in rs if not (r.get("type") == "error" and r.get("code") == "unavailable")]
           for slot, rs in replies.items()}
    assert not any(bad.values()), f"joins not refused with `unavailable`: {bad}"
    assert worker_errors, f"no worker logged an error about the bad Redis; log tail:\n{gw.log_text()[-1500:]}"


@pytest.mark.parametrize("mode", ["garbage", "close"])
def test_real_redis_replaces_a_bad_one(fake_redis, make_redis, make_gateway, mode):
    """After the thing on the Redis port is replaced by a real Redis, workers get the bus."""
    fake = fake_redis(mode)
    port = fake.port
    gw = _gateway(make_gateway, fake.url)
    pids0 = gw.workers_by_slot()
    time.sleep(0.5)
    assert fake.accepted > 0
    fake.stop()
    real = make_redis(port=port)
    t_up = time.monotonic()

    async def main():
        return await wait_bus_ready(gw, timeout=8)

    try:
        waited = run_async(main(), 15)
    except AssertionError as e:
        raise AssertionError(
            f"{time.monotonic() - t_up:.1f}s after a real Redis took port {port} (instead of the {mode} server), "
            f"joins are still refused: {e}; gateway connections to the real Redis: {len(real.clients())}; "
            f"connections the {mode} server got: {fake.accepted} (2 workers x 2 = one attempt each)"
        ) from None
    assert gw.workers_by_slot() == pids0
    print(f"bad redis ({mode}) -> real: bus ready on every slot {max(waited.values()):.2f}s after")
    assert max(waited.values()) <= 3.0, f"bus back after {waited}"


def test_gateway_started_before_redis(make_redis, make_gateway):
    """No Redis at start: ready after 3 s, joins refused after bus.outage_wait_ms (here 1 s);
    Redis starts: joins work within 2 s."""
    real = make_redis(start=False)
    t0 = time.monotonic()
    gw = _gateway(make_gateway, real.url, CHATGW_BUS_OUTAGE_WAIT_MS="1000")
    ready_s = time.monotonic() - t0

    async def main():
        ws, _ = await connect_hello(gw, "early")
        try:
            reply, _ = await join_room(ws, "r", timeout=5)
        finally:
            await close_all([ws])
        await asyncio.to_thread(real.start)
        waited = await wait_bus_ready(gw, timeout=5)
        return reply, waited

    reply, waited = run_async(main(), 30)
    print(f"gateway before redis: ready after {ready_s:.2f}s, join {reply}, bus ready {waited}")
    assert ready_s <= 6.0, f"gateway took {ready_s:.1f}s to be ready without Redis"
    assert reply.get("type") == "error" and reply.get("code") == "unavailable", reply
    assert max(waited.values()) <= 2.5, f"after Redis started, the bus came up only after {waited}"


# 6 ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["term", "kill9"])
def test_members_drop_when_a_gateway_stops(redis_server, make_gateway, how):
    """members counts both gateways; after B stops (TERM: its workers can clean up; kill -9 of
    master and workers: only the expiring alive keys tell), a joiner on A counts only A's
    members within 20 s."""
    a = _gateway(make_gateway, redis_server.url)
    b = _gateway(make_gateway, redis_server.url)
    room = "crowd"
    n_a, n_b = 3, 4

    async def main():
        await wait_bus_ready(a)
        await wait_bus_ready(b)
        ra = await open_many(a, n_a, user_prefix="ma")
        rb = await open_many(b, n_b, user_prefix="mb")
        probe, _ = await connect_hello(a, "probe")
        conns = ra.conns + rb.conns + [probe]
        try:
            assert not ra.errors and not rb.errors, ra.errors + rb.errors
            for ws in ra.conns + rb.conns:
                j, _ = await join_room(ws, room)
                assert j.get("type") == "joined", j

            async def probe_members():
                j, _ = await join_room(probe, room)
                assert j.get("type") == "joined", j
                await send_json(probe, {"type": "leave", "room": room, "ref": "pl"})
                left = await recv_json(probe, 5)
                assert left.get("type") == "left", left
                return j["members"]

            m0 = await probe_members()
            assert m0 == n_a + n_b + 1, f"members before B stops: {m0}, expected {n_a + n_b + 1}"
            hash0 = redis_server.cmd("HGETALL", room_key(room, "members"))

            loop = asyncio.get_running_loop()
            t_term = loop.time()
            if how == "term":
                await asyncio.to_thread(b.stop, 15)
            else:
                # no goodbyes anywhere: freeze the master (no restarts, no parent-death
                # signal), kill -9 the workers, then the master
                workers_b = list(b.workers_by_slot().values())
                b.signal(signal.SIGSTOP)
                for pid in workers_b:
                    os.kill(pid, signal.SIGKILL)
                left = await asyncio.to_thread(wait_pids_dead, workers_b, 5)
                assert not left, f"B's workers {left} still alive after kill -9"
                t_term = loop.time()
                b_master = b.master_pid
                await asyncio.to_thread(b.kill_everything)
                left = await asyncio.to_thread(wait_pids_dead, [b_master], 5)
                assert not left, f"B's processes {left} still alive after kill -9"
            t_exit = loop.time()
            seen = []
            t_ok = None
            while loop.time() - t_term < 22:
                m = await probe_members()
                seen.append((round(loop.time() - t_term, 2), m))
                if m == n_a + 1:
                    t_ok = loop.time()
                    break
                await asyncio.sleep(0.25)
            # A's own members must not vanish with B's
            later = []
            for _ in range(3):
                await asyncio.sleep(0.3)
                later.append(await probe_members())
            await asyncio.sleep(0.2)  # (the probe's last leave reaches Redis after its `left`)
            hash1 = redis_server.cmd("HGETALL", room_key(room, "members"))
            return m0, t_term, t_exit, t_ok, seen, later, hash0, hash1
        finally:
            await close_all(conns)

    m0, t_term, t_exit, t_ok, seen, later, hash0, hash1 = run_async(main(), 60)
    took = None if t_ok is None else t_ok - t_term
    print(f"members ({how}): {m0} with both; B gone in {t_exit - t_term:.2f}s; A-only count after "
          f"{'never' if took is None else f'{took:.2f}s'}; samples {seen[:3]}...{seen[-2:]}; later {later}; "
          f"members hash before {hash0}, after {hash1}")
    assert took is not None and took <= 20.0, (
        f"a joiner on A still counts B's members {seen[-1][0] if seen else '?'}s after {how} of B: {seen[-5:]}"
    )
    assert later == [n_a + 1] * 3, f"members after B was gone: {later} (expected {n_a + 1})"
