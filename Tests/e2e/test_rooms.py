"""Rooms end to end: fan-out over workers, ordering, resume and gaps, history, relay
crash, slow consumers, leave, ping, scroll-back (docs/PROTOCOL.md).

Black-box: the binary (CHATGW_BIN), WebSocket clients, ps and signals.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections import Counter

import pytest

from chatgw_e2e.ops import scrape
from chatgw_e2e.placement import connect_on_slot, one_per_slot, wait_bus_ready
from chatgw_e2e.raw import RawWS, upgrade_request, ws_frame
from chatgw_e2e.rooms import (
    Inbox,
    assert_quiet_until_pong,
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
    join_room,
    open_many,
    ping_ok,
    recv_json,
    recv_until,
    run_async,
    send_json,
    send_message,
    ws_connect,
)

FAST = {"CHATGW_LIMITS_RATE_PER_S": "100000", "CHATGW_LIMITS_BURST": "100000"}


# 0 ---------------------------------------------------------------------------


def test_rooms_work_as_soon_as_gateway_is_ready(make_gateway):
    """Once every child logged `child ready`, a join on any worker succeeds (no `unavailable`)."""
    gw = make_gateway(workers=2, env=FAST)

    async def main():
        res = await open_many(gw, 16, concurrency=16, timeout=5, user_prefix="early")
        try:
            assert not res.errors, res.errors[:3]
            replies = await asyncio.gather(*(join_room(ws, "early") for ws in res.conns))
            bad = [(conn_slot(h), r) for h, (r, _) in zip(res.hellos, replies) if r.get("type") != "joined"]
            assert not bad, (
                f"{len(bad)} of 16 joins right after the gateway was ready were refused "
                f"(slot, reply): {bad[:3]}"
            )
        finally:
            await close_all(res.conns)

    run_async(main(), 20)


@pytest.mark.parametrize("wakeup", ["io_uring", "thread"])
def test_each_way_of_waking_the_epoll_loop_serves_a_room(make_gateway, wakeup):
    """`server.engine_wakeup`: the epoll loop's events wake a worker through an io_uring
    poll or a helper thread; with either, clients on two workers exchange messages, also
    after the workers went idle between them."""
    if os.environ.get("CHATGW_E2E_ENGINE", "epoll") != "epoll":
        pytest.skip("the nio engine has no epoll loop to wake")
    if wakeup == "io_uring" and open("/proc/sys/kernel/io_uring_disabled").read().strip() != "0":
        pytest.skip("io_uring is disabled on this machine")
    gw = make_gateway(workers=2, env={**FAST, "CHATGW_SERVER_ENGINE_WAKEUP": wakeup, "CHATGW_LOG_LEVEL": "debug"})

    async def main():
        await wait_bus_ready(gw)
        a, _ = await connect_on_slot(gw, 0, "wa")
        b, _ = await connect_on_slot(gw, 1, "wb")
        try:
            for ws in (a, b):
                await join_room(ws, "wake")
            for n in range(3):
                await asyncio.sleep(0.2)  # both workers asleep again
                sender, receiver = (a, b) if n % 2 == 0 else (b, a)
                await send_message(sender, "wake", f"w{n}")
                text = f"w{n}"
                got, _ = await recv_until(receiver, lambda f: f.get("type") == "message" and f.get("text") == text, timeout=5)
                assert got.get("room") == "wake", got
        finally:
            await close_all([a, b])

    run_async(main(), 30)
    woken = [l for l in gw.log_text().splitlines() if "epoll loop wake-up:" in l]
    assert len(woken) == 2 and all(l.endswith(f"wake-up: {wakeup}") for l in woken), woken


# 1 ---------------------------------------------------------------------------


def test_fanout_300_clients_3_workers_same_sequence(make_gateway):
    gw = make_gateway(workers=3, env=FAST)
    n_clients, n_senders, per_sender = 300, 20, 50
    total = n_senders * per_sender
    room = "fan"

    async def main():
        await wait_bus_ready(gw)
        res = await open_many(gw, n_clients, concurrency=100, timeout=15, user_prefix="f")
        try:
            assert not res.errors, f"{len(res.errors)} connections failed: {first_lines(res.errors)}"
            slots = Counter(res.slots())
            assert set(slots) == {0, 1, 2}, f"clients per slot: {dict(slots)}"
            users = [h["user"] for h in res.hellos]

            # everyone but the last joins, then the last one: it must count all 300
            epochs, start_seq = await join_all_then_last(res.conns, users, room, 15, f"slots {dict(slots)}")

            inboxes = [Inbox(ws, u) for ws, u in zip(res.conns, users)]
            senders = list(range(0, n_clients, n_clients // n_senders))[:n_senders]
            sender_slots = Counter(conn_slot(res.hellos[i]) for i in senders)

            t0 = time.monotonic()
            await asyncio.gather(*(send_numbered(res.conns[i], room, users[i], per_sender) for i in senders))
            await wait_all(inboxes, lambda ib: ib.counts["message"] >= total, 45, f"{total} messages")
            await wait_all([inboxes[i] for i in senders], lambda ib: ib.counts["ack"] >= per_sender, 10,
                           f"{per_sender} acks")
            took = time.monotonic() - t0
            await asyncio.sleep(0.2)  # anything extra (duplicates) would show up now
            for ib in inboxes:
                ib.stop()

            check_fanout(inboxes, room, users, senders, per_sender, total, start_seq, epochs, check_from=True)
            return took, dict(slots), dict(sender_slots)
        finally:
            await close_all(res.conns)

    took, slots, sender_slots = run_async(main(), 85)
    print(f"fan-out: {total} messages to {n_clients} clients in {took:.2f}s; clients/slot {slots}; senders/slot {sender_slots}")


# 2 ---------------------------------------------------------------------------


def _resume_test(gw, history_len: int | None):
    room = "res"
    n_missed = 100

    async def main():
        await wait_bus_ready(gw)
        b, bh = await connect_hello(gw, "bob")
        a = a2 = None
        try:
            jb, _ = await join_room(b, room)
            assert jb.get("type") == "joined", jb
            await send_many(b, room, [f"pre{i}" for i in range(3)], "p")
            a, ah = await connect_hello(gw, "alice")
            ja, before = await join_room(a, room)
            assert ja.get("type") == "joined" and not before, (ja, before)
            since, epoch = ja["seq"], ja["epoch"]
            assert since == jb["seq"] + 3, f"joined.seq {since} after 3 messages on {jb['seq']}"
            await close_all([a])
            a = None

            await send_many(b, room, [f"m{k}" for k in range(1, n_missed + 1)], "b")
            # back on the other worker than bob's (the replay must come through the bus)
            other = 1 - conn_slot(bh)
            a2, _ = await connect_on_slot(gw, other, user_prefix="alice")
            await send_json(a2, {"type": "join", "room": room, "since": since, "epoch": epoch, "ref": "rj"})
            held = n_missed if history_len is None else min(n_missed, history_len)
            n_gap = 0 if history_len is None or history_len >= n_missed + 3 else 1
            frames = await read_frames(a2, 1 + n_gap + held, timeout=10)

            joined = frames[0]
            assert joined.get("type") == "joined" and joined.get("ref") == "rj", f"first frame: {joined}"
            assert joined.get("seq") == since + n_missed and joined.get("epoch") == epoch, joined
            rest = frames[1:]
            if n_gap:
                gap = rest[0]
                assert gap == {"type": "gap", "room": room, "from": since + 1, "to": since + n_missed - held,
                               "epoch": epoch}, f"expected the gap first, got {gap}"
                rest = rest[1:]
            assert all(m.get("type") == "message" and m.get("room") == room for m in rest), (
                f"replay holds other frames: {[m for m in rest if m.get('type') != 'message'][:3]}"
            )
            seqs = [m["seq"] for m in rest]
            assert seqs == list(range(since + n_missed - held + 1, since + n_missed + 1)), f"replayed seqs {seqs}"
            assert [m["text"] for m in rest] == [f"m{k}" for k in range(n_missed - held + 1, n_missed + 1)]
            assert all(m["epoch"] == epoch and m["from"] == "bob" for m in rest)

            # then live
            await send_message(b, room, "live")
            live = await recv_json(a2, 5)
            assert live.get("type") == "message" and live.get("seq") == since + n_missed + 1 and \
                live.get("text") == "live", f"after the replay: {live}"
            await assert_quiet_until_pong(a2, "after the live message")
        finally:
            await close_all([c for c in (a, a2, b) if c is not None])

    run_async(main(), 40)


def test_resume_replays_exactly_what_was_missed(make_gateway):
    gw = make_gateway(workers=2, env=FAST)
    _resume_test(gw, None)


def test_resume_beyond_history_gets_gap_then_the_rest(make_gateway):
    # The in-memory history alone: with the archive on (the default) the resume would be
    # filled from it instead (test_archive.py covers that).
    gw = make_gateway(workers=2, env={**FAST, "CHATGW_HISTORY_MESSAGES": "50", "CHATGW_ARCHIVE_KIND": "none"})
    _resume_test(gw, 50)


# 3 ---------------------------------------------------------------------------


def test_join_with_history_replays_last_n(make_gateway):
    gw = make_gateway(workers=2, env=FAST)
    room = "hist"

    async def main():
        await wait_bus_ready(gw)
        b, _ = await connect_hello(gw, "bob")
        others = []
        try:
            jb, _ = await join_room(b, room)
            await send_many(b, room, [f"h{i}" for i in range(1, 9)], "h")
            latest = jb["seq"] + 8
            for n, expect in [(5, 5), (0, 0), (100, 8), (1, 1)]:
                c, _ = await connect_hello(gw, f"c{n}")
                others.append(c)
                await send_json(c, {"type": "join", "room": room, "history": n, "ref": f"jh{n}"})
                frames = await read_frames(c, 1 + expect, 5)
                joined, msgs = frames[0], frames[1:]
                assert joined.get("type") == "joined" and joined.get("seq") == latest, f"history {n}: {joined}"
                assert [m.get("type") for m in msgs] == ["message"] * expect, f"history {n}: {msgs}"
                assert [m["seq"] for m in msgs] == list(range(latest - expect + 1, latest + 1)), f"history {n}: {msgs}"
                assert [m["text"] for m in msgs] == [f"h{i}" for i in range(9 - expect, 9)], f"history {n}: {msgs}"
                await assert_quiet_until_pong(c, f"after history {n}")
        finally:
            await close_all([b] + others)

    run_async(main(), 40)


# 4 ---------------------------------------------------------------------------


def test_relay_kill_during_traffic(make_gateway):
    gw = make_gateway(workers=2, env=FAST)
    room = "crash"

    async def main():
        await wait_bus_ready(gw)
        placed = await one_per_slot(gw, [0, 1], user_prefix="rx")
        extra = await one_per_slot(gw, [0, 1], user_prefix="ry")
        s_ws, s_hello = await connect_on_slot(gw, 0, user_prefix="snd")
        conns = [ws for ws, _ in placed.values()] + [ws for ws, _ in extra.values()] + [s_ws]
        try:
            # base seq of a fresh room, to know where a new epoch starts
            j0, _ = await join_room(s_ws, "fresh-probe")
            base = j0["seq"] + 1
            js = []
            for ws in conns:
                j, _ = await join_room(ws, room)
                assert j.get("type") == "joined", j
                js.append(j)
            epoch0 = js[-1]["epoch"]
            receivers = [Inbox(ws, f"rx{k}") for k, ws in enumerate(conns[:-1])]
            sender = Inbox(s_ws, "sender")
            workers_before = gw.workers_by_slot()
            relay_before = gw.relay_pid()
            assert relay_before

            loop = asyncio.get_running_loop()
            sent_at: dict[str, float] = {}
            t_kill = None

            async def send_loop():
                nonlocal t_kill
                i = 0
                t_start = loop.time()
                while loop.time() - t_start < 4.0:
                    ref = f"k{i}"
                    sent_at[ref] = loop.time()
                    await send_json(s_ws, {"type": "send", "room": room, "text": ref, "ref": ref})
                    i += 1
                    if t_kill is None and loop.time() - t_start >= 1.0:
                        os.kill(relay_before, signal.SIGKILL)
                        t_kill = loop.time()
                    await asyncio.sleep(0.005)
                return i

            n_sent = await send_loop()
            # every send gets an answer: ack or error
            def answered(ib):
                refs = {m.get("ref") for m in ib.msgs if m.get("type") in ("ack", "error")}
                return len(refs & set(sent_at)) == len(sent_at)
            try:
                await sender.wait(answered, 5, "answer (ack or error) to every send")
            except AssertionError as e:
                refs = {m.get("ref") for m in sender.msgs if m.get("type") in ("ack", "error")}
                missing = sorted(set(sent_at) - refs, key=lambda r: int(r[1:]))
                raise AssertionError(
                    f"{len(missing)} of {n_sent} sends never answered, sent at "
                    f"{[round(sent_at[r] - t_kill, 3) for r in missing[:10]]}s after the kill: {missing[:10]}; {e}"
                ) from None
            acks = {m["ref"]: m for m in sender.msgs if m.get("type") == "ack"}
            errors = {m["ref"]: m for m in sender.msgs if m.get("type") == "error"}
            ack_time = {}
            for m, t in zip(sender.msgs, sender.times):
                if m.get("type") == "ack":
                    ack_time[m["ref"]] = t
            bad_codes = {m.get("code") for m in errors.values()} - {"unavailable"}
            assert not bad_codes, f"send errors other than unavailable: {[e for e in errors.values() if e.get('code') in bad_codes][:3]}"
            assert not set(acks) & set(errors), "a send got both ack and error"

            after_kill = [r for r in acks if sent_at[r] > t_kill]
            assert after_kill, f"no send after the kill was acked ({len(errors)} errors): {list(errors.values())[:3]}"
            first_ok = min(ack_time[r] for r in after_kill) - t_kill
            assert first_ok <= 2.0, f"first ack for a post-kill send came {first_ok:.2f}s after the kill"

            # receivers end with the last acked message
            own = {m["text"]: m for m in sender.of("message", room)}
            last_ref = max(acks, key=lambda r: int(r[1:]))
            last = own[last_ref]
            await wait_all(receivers, lambda ib: any(m.get("text") == last_ref for m in ib.of("message", room)), 5,
                           f"the last acked message {last_ref}")
            await asyncio.sleep(0.2)
            for ib in receivers + [sender]:
                ib.stop()

            new_epoch = last["epoch"]
            assert new_epoch != epoch0, f"epoch did not change over a relay restart without disk history: {epoch0}"
            relay_after = gw.relay_pid()
            assert relay_after and relay_after != relay_before, (relay_before, relay_after)
            assert gw.workers_by_slot() == workers_before, f"worker pids changed: {workers_before} -> {gw.workers_by_slot()}"
            assert gw.alive()

            # ack after own message with the same seq
            for j, a in enumerate(sender.msgs):
                if a.get("type") == "ack":
                    m = own.get(a["ref"])
                    assert m is not None, f"ack without own message: {a}"
                    assert sender.msgs.index(m) < j and m["seq"] == a["seq"], (a, m)

            new_epoch_acked = [own[r] for r in acks if own[r]["epoch"] == new_epoch]
            report = []
            for ib in receivers + [sender]:
                assert not [m for m in ib.msgs if m.get("type") == "error"] or ib is sender, ib.of("error")
                frames = [m for m in ib.msgs if m.get("room") == room and m.get("type") in ("message", "gap")]
                seen_epochs = []
                by_epoch: dict[str, list[int]] = {}
                gaps: dict[str, list[tuple[int, int]]] = {}
                for m in frames:
                    if m["type"] == "gap":
                        gaps.setdefault(m["epoch"], []).append((m["from"], m["to"]))
                        continue
                    e = m["epoch"]
                    if not seen_epochs or seen_epochs[-1] != e:
                        assert e not in seen_epochs, f"{ib.name}: epoch {e} came back after {seen_epochs}"
                        seen_epochs.append(e)
                    by_epoch.setdefault(e, []).append(m["seq"])
                assert seen_epochs[0] == epoch0 and seen_epochs[-1] == new_epoch, f"{ib.name}: epochs {seen_epochs}"

                def covered(a, b, e):
                    return all(any(f <= s <= t for f, t in gaps.get(e, [])) for s in range(a, b + 1))

                for e, seqs in by_epoch.items():
                    assert len(seqs) == len(set(seqs)), f"{ib.name}: duplicates in epoch {e}"
                    holes = [(x + 1, y - 1) for x, y in zip(seqs, seqs[1:]) if y != x + 1]
                    assert all(y > x for x, y in zip(seqs, seqs[1:])), f"{ib.name}: seq goes back in epoch {e}: {seqs[:20]}"
                    unexplained = [h for h in holes if not covered(h[0], h[1], e)]
                    assert not unexplained, f"{ib.name}: holes without gap in epoch {e}: {unexplained[:5]} (gaps {gaps.get(e)})"
                    if e != epoch0 and seqs[0] != base:
                        assert covered(base, seqs[0] - 1, e), (
                            f"{ib.name}: new epoch {e} starts at seq {seqs[0]} (base {base}) without a gap: gaps {gaps}"
                        )
                got = {m["text"] for m in ib.of("message", room)}
                missing = [m["text"] for m in new_epoch_acked if m["text"] not in got]
                assert not missing, f"{ib.name}: acked messages of the new epoch not delivered: {missing[:5]}"
                report.append((ib.name, len(frames), {k[:6]: len(v) for k, v in by_epoch.items()}, gaps))
            return n_sent, len(acks), len(errors), first_ok, report
        finally:
            await close_all(conns)

    n_sent, n_acks, n_err, first_ok, report = run_async(main(), 50)
    print(f"relay kill: {n_sent} sends, {n_acks} acks, {n_err} unavailable, first post-kill ack after {first_ok:.3f}s")
    for r in report:
        print("  ", r)


# 5 ---------------------------------------------------------------------------


@pytest.mark.parametrize("max_delay_ms", [0, 200])
def test_slow_consumer_is_dropped_and_room_keeps_pace(make_gateway, max_delay_ms):
    """A member that stops reading is cut off (bye slow_consumer, close 4000) while the room
    goes on: the normal member on its worker gets every message in order and is never
    dropped, and neither is the publisher. With `delivery.max_delay_ms` 200 the room (50
    msg/s) is a hot one whose frames are gathered: gathering must not let the slow member's
    backlog grow past the limit or hold the others back; with 0 every message is written
    at once.

    A correctness test, not a speed test (scripts/bench measures speed): 500 messages of
    16 KB at 50 a second, a small fraction of what even a debug build on a busy machine
    carries (the old 10,000 small messages at 1,000 a second measured the Python client and
    the debug build: p99 16 s on a busy machine). "Does not hold the room back" is therefore
    judged against references, not a latency bound: (1) the slow member is cut off while
    the room's messages are still on their way to the normal member (its socket buffers,
    some 3 MB here, and the 64 KB outbound buffer are full about 40% of the way), and (2)
    the normal member, on the slow member's worker, gets each message about when a control
    member on the other worker gets it. A server that waited for the slow member would
    stall its whole worker until it gave up on it: the normal member would fall behind the
    control member by as long as it waited (and never get everything if it waited for good).
    """
    gw = make_gateway(workers=2, env={**FAST, "CHATGW_LIMITS_OUTBOUND_BUFFER_BYTES": "65536",
                                      "CHATGW_LIMITS_MAX_TEXT_BYTES": "16384",
                                      "CHATGW_DELIVERY_MAX_DELAY_MS": str(max_delay_ms)})
    room = "slow"
    n, rate = 500, 50.0
    max_behind_s = 1.0  # normal member behind the control member, any message

    def drops(slot: int) -> float:
        return scrape(gw).value("chatgw_slow_consumer_disconnects_total", role="worker", slot=slot) or 0.0

    async def main():
        await wait_bus_ready(gw)
        normal, nh = await connect_hello(gw, "normal")
        slot = conn_slot(nh)
        other = 1 - slot
        control, _ = await connect_on_slot(gw, other, user_prefix="control")
        pub, _ = await connect_on_slot(gw, other, user_prefix="pub")
        conns = [normal, control, pub]
        slow = None
        try:
            # the slow one sits on the normal member's worker, reads its hello and joined, then never reads
            for i in range(60):
                c = await RawWS.open(gw, f"slow{i}", rcvbuf=4096, limit=1024)
                h = await c.recv_json()
                if conn_slot(h) == slot:
                    slow = c
                    break
                c.abort()
            assert slow is not None, f"no raw connection landed on slot {slot}"
            await slow.send_json({"type": "join", "room": room, "ref": "sj"})
            sj = await slow.recv_json(5)
            assert sj.get("type") == "joined", sj
            for ws in conns:
                j, _ = await join_room(ws, room)
                assert j.get("type") == "joined", j
            base = j["seq"]

            rx = Inbox(normal, "normal")
            cx = Inbox(control, "control")
            px = Inbox(pub, "pub")  # the publisher gets its own messages: keep reading them
            loop = asyncio.get_running_loop()

            # Watch the worker's slow-consumer counter (reported with each heartbeat) until the
            # normal member has every message; note how many it had when the drop showed, and
            # read what the slow one was sent from then on (its bye and close frame come last,
            # if it reads them before the server gives up the close handshake).
            dropped_at: list[int] = []  # messages the normal member had once the drop showed
            slow_end: list[asyncio.Task] = []

            async def watch():
                while not dropped_at and rx.counts["message"] < n and not rx.done:
                    try:
                        gone = await loop.run_in_executor(None, drops, slot) >= 1
                    except OSError:  # a scrape that timed out on a busy machine: ask again
                        gone = False
                    if gone:
                        dropped_at.append(rx.counts["message"])
                        slow_end.append(asyncio.create_task(slow.wait_close(15)))
                    else:
                        await asyncio.sleep(0.2)

            watcher = asyncio.create_task(watch())
            pad = "x" * 16_000
            t0 = loop.time()
            for i in range(n):
                await send_json(pub, {"type": "send", "room": room, "text": f"{i}:{loop.time():.6f}:{pad}"})
                await asyncio.sleep(max(0.0, t0 + (i + 1) / rate - loop.time()))
            publish_s = loop.time() - t0

            # correctness: every message, in order, to the normal member and the control member
            await wait_all([rx, cx], lambda ib: ib.counts["message"] >= n, 60, f"{n} messages")
            await watcher
            rx.stop()
            cx.stop()
            px.stop()
            want = list(range(base + 1, base + n + 1))
            for ib in (rx, cx):
                msgs = ib.of("message", room)
                assert [m["seq"] for m in msgs] == want, f"{ib.name}: {len(msgs)} messages, seqs not {base + 1}..{base + n}"
                assert not ib.of("bye") and not ib.of("error"), (ib.name, ib.of("bye"), ib.of("error"))
            pub_bye = px.of("bye")
            assert not pub_bye, f"the publisher was dropped: {pub_bye}"

            # the slow one: dropped as a slow consumer (and only it), while the room's messages were
            # still on their way to the normal member
            counted = {s: drops(s) for s in (0, 1)}
            for _ in range(30):
                if counted[slot] >= 1:
                    break
                await asyncio.sleep(0.2)
                counted = {s: drops(s) for s in (0, 1)}
            assert counted == {slot: 1.0, other: 0.0}, f"slow-consumer disconnects by slot: {counted} (the slow one is on {slot})"
            assert dropped_at and dropped_at[0] < n, (
                f"the slow member was still connected when the normal member had all {n} messages of 16 KB "
                f"(it had {dropped_at} when the drop showed): a server that waits for it holds the room back"
            )

            # its connection ended; if its bye and close frame could be read, slow_consumer and 4000
            end = await (slow_end[0] if slow_end else slow.wait_close(10))
            room_frames = [m for m in end.json_messages() if isinstance(m, dict) and m.get("type") == "message"]
            byes = [m for m in end.json_messages() if isinstance(m, dict) and m.get("type") == "bye"]
            assert end.error is None, (
                f"slow consumer still connected after {n} messages ({len(room_frames)} read back): {end.error}"
            )
            assert len(room_frames) < n, f"the slow consumer got all {n} messages: it was never dropped"
            if byes:
                assert byes[-1].get("reason") == "slow_consumer", byes
            if end.close_code is not None:
                assert end.close_code == 4000, f"slow consumer close code {end.close_code}"

            # kept pace: each message reached the normal member (the slow one's worker) about when it
            # reached the control member (the other worker); both are read by this one client
            seen = {}
            for m, t in zip(cx.msgs, cx.times):
                if m.get("type") == "message":
                    seen[m["seq"]] = t
            behind = [(t - seen[m["seq"]], m["seq"]) for m, t in zip(rx.msgs, rx.times) if m.get("type") == "message"]
            worst = max(behind)
            lat = sorted(t - float(m["text"].split(":")[1]) for m, t in zip(rx.msgs, rx.times) if m.get("type") == "message")
            assert worst[0] < max_behind_s, (
                f"the normal member fell {worst[0]:.2f}s behind the control member at seq {worst[1]}: the slow member "
                f"held its worker back (normal member latency p50 {lat[len(lat) // 2] * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms)"
            )
            return publish_s, lat, worst, dropped_at[0], len(room_frames), end
        finally:
            if slow is not None:
                slow.abort()
            await close_all(conns)

    publish_s, lat, worst, dropped_at, got, end = run_async(main(), 75)
    coalesced = scrape(gw).sum("chatgw_coalesced_writes_total", role="worker")
    if max_delay_ms:
        assert coalesced > 0, "the room at 50 msg/s was never coalesced: the test did not try a hot room"
    else:
        assert coalesced == 0, f"{coalesced} coalesced writes with delivery.max_delay_ms 0"
    print(f"slow consumer: published {n} in {publish_s:.2f}s; drop seen with {dropped_at} delivered; normal member "
          f"at most {worst[0] * 1000:.0f} ms behind the control member, latency p50 {lat[len(lat) // 2] * 1000:.1f} ms "
          f"max {lat[-1] * 1000:.1f} ms; slow one read {got} before its end (close {end.close_code}, eof {end.eof})")


# 6 ---------------------------------------------------------------------------


def test_leave_stops_delivery_and_lowers_members(make_gateway):
    gw = make_gateway(workers=2, env=FAST)
    room = "lv"

    async def main():
        await wait_bus_ready(gw)
        placed = await one_per_slot(gw, [0, 1], user_prefix="m")
        a, ah = placed[0]
        b, bh = placed[1]
        c, _ = await connect_hello(gw, "carol")
        conns = [a, b, c]
        try:
            ja, _ = await join_room(a, room)
            jb, _ = await join_room(b, room)
            jc, _ = await join_room(c, room)
            assert [ja["members"], jb["members"], jc["members"]] == [1, 2, 3], (ja, jb, jc)
            await send_json(a, {"type": "leave", "room": room, "ref": "bye1"})
            left = await recv_json(a, 5)
            assert left == {"type": "left", "room": room, "ref": "bye1"}, left

            d, _ = await connect_hello(gw, "dave")
            conns.append(d)
            jd, _ = await join_room(d, room)
            assert jd.get("members") == 3, f"after a leave, a new joiner sees members {jd.get('members')} (expected 3): {jd}"

            # messages after the leave reach b, c, d but not a
            await send_many(b, room, ["after1", "after2"], "al")
            for ws in (c, d):
                got = [m["text"] for m in await read_frames(ws, 2, 5)]
                assert got == ["after1", "after2"], got
            await asyncio.sleep(0.3)
            await assert_quiet_until_pong(a, "after leaving, messages of the room")

            # leave without ref: left without ref
            await send_json(c, {"type": "leave", "room": room})
            left = await recv_json(c, 5)
            assert left.get("type") == "left" and left.get("room") == room and "ref" not in left, left

            # a closed connection is no member either
            await close_all([b])
            await asyncio.sleep(0.5)
            e, _ = await connect_hello(gw, "erin")
            conns.append(e)
            je, _ = await join_room(e, room)
            assert je.get("members") == 2, f"after a leave and a disconnect: members {je.get('members')} (d and e expected)"
            # rejoin after leave works and delivers again
            ja2, _ = await join_room(a, room)
            assert ja2.get("type") == "joined" and ja2.get("members") == 3, ja2
            await send_message(d, room, "back")
            m = await recv_json(a, 5)
            assert m.get("type") == "message" and m.get("text") == "back", m
        finally:
            await close_all(conns)

    run_async(main(), 40)


async def wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Until every thread of a process sent SIGSTOP is stopped (kill(2) returns before)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        if all(state in ("T", "t") for state in states):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"process {pid} did not stop")


def test_a_burst_of_joins_of_one_room_goes_to_the_bus_as_one_request(make_gateway):
    """Joins of one room that reach a worker in one loop tick (here: sent while the worker
    is stopped, so they are all readable when it goes on) reach the bus as one request.
    Every joiner gets that answer: the same seq and epoch, and a count that includes them
    all, with its own ref or none, then the same history (the group's frames are encoded
    once and shared); then every message, and leaving still lowers the count."""
    gw = make_gateway(workers=1, env=FAST, metrics=True)
    room, n = "storm", 30
    earlier = ["before-1", "before-2", "before-3"]

    def counted(name: str) -> float:
        return scrape(gw).sum(name, role="worker")

    async def main():
        await wait_bus_ready(gw)
        pub, _ = await connect_hello(gw, "storm-pub")
        try:
            await join_room(pub, room)
            await send_many(pub, room, earlier, "e")
            await send_json(pub, {"type": "leave", "room": room})
            await recv_until(pub, lambda m: m.get("type") == "left", 5)
        finally:
            await close_all([pub])
        # The probe's join, once the worker reported it (stats come with its heartbeat).
        deadline = time.monotonic() + 10
        while counted("chatgw_joins_total") < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.2)
        joins_before, bus_joins_before = counted("chatgw_joins_total"), counted("chatgw_bus_joins_total")
        opened = await open_many(gw, n, user_prefix="s")
        conns = opened.conns
        assert len(conns) == n, opened.errors
        try:
            worker = gw.workers_by_slot()[0]
            os.kill(worker, signal.SIGSTOP)
            try:
                await wait_stopped(worker)
                # Every other joiner names a ref: the group's `joined` is shared only by those without.
                await asyncio.gather(*(send_json(ws, {"type": "join", "room": room, "history": len(earlier),
                                                      **({"ref": f"storm-{i}"} if i % 2 else {})})
                                       for i, ws in enumerate(conns)))
                await asyncio.sleep(0.3)
            finally:
                os.kill(worker, signal.SIGCONT)
            answers = [await recv_json(ws, 10) for ws in conns]
            assert all(a.get("type") == "joined" for a in answers), answers
            assert [a.get("ref") for a in answers] == [f"storm-{i}" if i % 2 else None for i in range(n)], answers
            assert {(a["seq"], a["epoch"]) for a in answers} == {(answers[0]["seq"], answers[0]["epoch"])}, answers
            assert {a["members"] for a in answers} == {n}, f"members in the answers: {sorted(a['members'] for a in answers)}"
            for ws in conns:
                history = [await recv_json(ws, 5) for _ in earlier]
                assert [(m.get("type"), m.get("text")) for m in history] == [("message", t) for t in earlier], history

            deadline = time.monotonic() + 10
            while counted("chatgw_joins_total") < joins_before + n and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert counted("chatgw_joins_total") == joins_before + n
            bus_joins = counted("chatgw_bus_joins_total") - bus_joins_before
            assert bus_joins == 1, f"{bus_joins:.0f} bus join requests for {n} joins of one room in one tick"

            await send_many(conns[0], room, ["after-the-burst"], "b")
            for ws in conns[1:]:
                m = await recv_json(ws, 5)
                assert m.get("type") == "message" and m.get("text") == "after-the-burst", m

            await asyncio.gather(*(send_json(ws, {"type": "leave", "room": room}) for ws in conns[: n // 2]))
            for ws in conns[: n // 2]:
                assert (await recv_json(ws, 5)).get("type") == "left"
            late, _ = await connect_hello(gw, "late")
            conns.append(late)
            joined, _ = await join_room(late, room)
            assert joined.get("members") == n - n // 2 + 1, f"after {n // 2} of {n} left, a new member sees {joined}"
        finally:
            await close_all(conns)

    run_async(main(), 60)


def test_rooms_in_the_url_are_joined_after_hello(make_gateway):
    """`/ws?rooms=a,b&history=N` (docs/PROTOCOL.md "Joining in the URL"): `hello`, then each
    room joined as a `join` would be (an error for a bad name, the others joined all the
    same, with their history); `resume=room/epoch/seq` resumes where a connection left off."""
    gw = make_gateway(workers=2, env=FAST)

    async def main():
        await wait_bus_ready(gw)
        pub, _ = await connect_hello(gw, "pub")
        conns = [pub]
        try:
            await join_room(pub, "url-a")
            await join_room(pub, "url-b")
            await send_many(pub, "url-a", ["a1", "a2", "a3"], "pa")
            await send_many(pub, "url-b", ["b1"], "pb")

            viewer = await ws_connect(gw, path="/ws?user=viewer&rooms=url-a,bad%20room,url-b&history=2")
            conns.append(viewer)
            hello = await recv_json(viewer)
            assert hello.get("type") == "hello" and hello.get("user") == "viewer", hello
            frames = [await recv_json(viewer) for _ in range(6)]
            errors = [f for f in frames if f.get("type") == "error"]
            assert [(e.get("code"), e.get("room")) for e in errors] == [("bad_room", "bad room")], frames
            for room, texts in (("url-a", ["a2", "a3"]), ("url-b", ["b1"])):
                mine = [f for f in frames if f.get("room") == room]
                assert mine and mine[0].get("type") == "joined" and "ref" not in mine[0], frames
                assert [f.get("text") for f in mine[1:]] == texts, f"{room}: {frames}"
            last_a = [f for f in frames if f.get("room") == "url-a"][-1]

            await send_many(viewer, "url-b", ["from the url member"], "v")
            got = await recv_json(pub, 5)
            assert got.get("type") == "message" and got.get("text") == "from the url member", got

            await close_all([viewer])
            await send_many(pub, "url-a", ["a4", "a5"], "pa2")
            back = await ws_connect(gw, path=f"/ws?user=viewer&resume=url-a/{last_a['epoch']}/{last_a['seq']}")
            conns.append(back)
            assert (await recv_json(back)).get("type") == "hello"
            joined = await recv_json(back)
            assert joined.get("type") == "joined" and joined.get("room") == "url-a" and joined.get("seq") == last_a["seq"] + 2, joined
            replay = [await recv_json(back) for _ in range(2)]
            assert [(m.get("text"), m.get("seq")) for m in replay] == [("a4", last_a["seq"] + 1), ("a5", last_a["seq"] + 2)], replay

            odd = await ws_connect(gw, path="/ws?user=odd&rooms=url-b&resume=url-a/nonsense")
            conns.append(odd)
            assert (await recv_json(odd)).get("type") == "hello"
            refused, joined = await recv_json(odd), await recv_json(odd)
            assert refused.get("type") == "error" and refused.get("code") == "bad_json" and "resume" in refused.get("message", ""), refused
            assert joined.get("type") == "joined" and joined.get("room") == "url-b", joined
        finally:
            await close_all(conns)

    run_async(main(), 40)


def test_rooms_in_the_url_come_with_the_101_on_the_epoll_engine(make_gateway):
    """With its room in the URL and the bus up, the epoll engine holds a connection's 101
    until the join is answered: 101, hello, joined and the history arrive in one write, so
    the client's first read has them all (one round trip to a room's content)."""
    if os.environ.get("CHATGW_E2E_ENGINE", "epoll") != "epoll":
        pytest.skip("the nio engine answers the 101 at once")
    gw = make_gateway(workers=1, env=FAST)

    async def main():
        await wait_bus_ready(gw)
        pub, _ = await connect_hello(gw, "pub")
        try:
            await join_room(pub, "held")
            await send_many(pub, "held", ["h1", "h2", "h3"], "h")
        finally:
            await close_all([pub])

    run_async(main(), 30)
    with socket.create_connection((gw.host, gw.port), timeout=5) as client:
        client.sendall(upgrade_request(gw, "/ws?user=raw&rooms=held&history=2"))
        first = client.recv(1 << 16)
    head, _, rest = first.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), first[:200]
    frames = []
    while rest:
        assert rest[0] == 0x81, f"not a text frame: {rest[:20]!r}"
        length, start = rest[1], 2
        if length == 126:
            length, start = int.from_bytes(rest[2:4], "big"), 4
        frames.append(json.loads(rest[start:start + length]))
        rest = rest[start + length:]
    assert [f.get("type") for f in frames] == ["hello", "joined", "message", "message"], f"the first read: {frames}"
    assert [f.get("text") for f in frames[2:]] == ["h2", "h3"], frames


def test_what_a_client_sends_behind_a_held_101_is_answered_after_it(make_gateway):
    """A client that sends a request right behind its upgrade (before its 101, which the
    engine holds for the URL's join): the request waits unread, and is answered after
    hello and joined, once the 101 has gone."""
    if os.environ.get("CHATGW_E2E_ENGINE", "epoll") != "epoll":
        pytest.skip("the nio engine answers the 101 at once")
    gw = make_gateway(workers=1, env=FAST)
    run_async(wait_bus_ready(gw), 30)
    with socket.create_connection((gw.host, gw.port), timeout=5) as client:
        early = ws_frame(0x1, json.dumps({"type": "ping", "ref": "early"}))
        client.sendall(upgrade_request(gw, "/ws?user=eager&rooms=eager-room") + early)
        data = b""
        deadline = time.monotonic() + 5
        while b'"early"' not in data and time.monotonic() < deadline:
            chunk = client.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), data[:200]
    frames = []
    while len(rest) >= 2:
        length, start = rest[1], 2
        frames.append(json.loads(rest[start:start + length]))
        rest = rest[start + length:]
    assert [f.get("type") for f in frames] == ["hello", "joined", "pong"], frames
    assert frames[1].get("room") == "eager-room" and frames[2].get("ref") == "early", frames


def test_a_held_101_does_not_wait_for_a_bus_that_does_not_answer(make_gateway):
    """The 101 of a connection with rooms in its URL waits for the joins' answers only so
    long (250 ms): with the relay stopped, hello still comes at once, and joined once the
    relay goes on."""
    gw = make_gateway(workers=1, env=FAST)

    async def main():
        await wait_bus_ready(gw)
        relay = gw.relay_pid()
        os.kill(relay, signal.SIGSTOP)
        try:
            await wait_stopped(relay)
            started = time.monotonic()
            ws = await ws_connect(gw, path="/ws?user=waiter&rooms=stalled-bus", timeout=5)
            hello = await recv_json(ws, 5)
            waited = time.monotonic() - started
            assert hello.get("type") == "hello", hello
            assert waited < 2.0, f"hello after {waited:.2f} s with the relay stopped"
        finally:
            os.kill(relay, signal.SIGCONT)
        try:
            joined = await recv_json(ws, 10)
            assert joined.get("type") == "joined" and joined.get("room") == "stalled-bus", joined
        finally:
            await close_all([ws])

    run_async(main(), 40)


# 7 ---------------------------------------------------------------------------


def test_ping_pong_and_pings_are_not_rate_limited(make_gateway):
    gw = make_gateway(workers=2, env={"CHATGW_LIMITS_RATE_PER_S": "1", "CHATGW_LIMITS_BURST": "2",
                                      "CHATGW_LIMITS_FLOOD_VIOLATIONS": "3"})

    async def main():
        await wait_bus_ready(gw)
        ws, _ = await connect_hello(gw, "pinger")
        try:
            await send_json(ws, {"type": "ping", "ref": "p-1"})
            assert await recv_json(ws) == {"type": "pong", "ref": "p-1"}
            await send_json(ws, {"type": "ping"})
            pong = await recv_json(ws)
            assert pong.get("type") == "pong" and "ref" not in pong, pong
            assert await ping_ok(ws, 3), "no pong frame for a WebSocket ping"
            # 200 application pings in a burst: all answered, in order, none limited
            for i in range(200):
                await send_json(ws, {"type": "ping", "ref": f"b{i}"})
            frames = await read_frames(ws, 200, 10)
            assert frames == [{"type": "pong", "ref": f"b{i}"} for i in range(200)], \
                [f for f in frames if f.get("type") != "pong"][:3]
            # and they took no tokens: the burst of 2 is still there
            for r in ("x1", "x2"):
                j, _ = await join_room(ws, f"room-{r}", ref=r)
                assert j.get("type") == "joined", f"join after pings: {j}"
            await send_json(ws, {"type": "join", "room": "room-x3", "ref": "x3"})
            lim = await recv_json(ws)
            assert lim.get("type") == "error" and lim.get("code") == "rate_limited" and lim.get("ref") == "x3", lim
            assert await ping_ok(ws, 3)
        finally:
            await close_all([ws])

    run_async(main(), 30)


# 8 ---------------------------------------------------------------------------


def test_history_request_pages_back(make_gateway):
    gw = make_gateway(workers=2, env=FAST)
    room = "scroll"

    async def main():
        await wait_bus_ready(gw)
        b, _ = await connect_hello(gw, "bob")
        r, _ = await connect_hello(gw, "reader")  # never joins: history needs no membership
        try:
            jb, _ = await join_room(b, room)
            frames = await send_many(b, room, [f"s{i}" for i in range(1, 31)], "s")
            own = [m for m in frames if m.get("type") == "message"]
            assert len(own) == 30
            epoch = own[0]["epoch"]
            seqs = [m["seq"] for m in own]

            async def page(ref, **kw):
                await send_json(r, {"type": "history", "room": room, "ref": ref, **kw})
                h = await recv_json(r, 5)
                assert h.get("type") == "history" and h.get("room") == room and h.get("ref") == ref, h
                return h

            h1 = await page("h1", limit=10)
            assert [m["seq"] for m in h1["messages"]] == seqs[20:], h1["messages"]
            assert h1["more"] is True, h1
            for m, o in zip(h1["messages"], own[20:]):
                assert {k: m.get(k) for k in ("epoch", "seq", "from", "text", "ts")} == \
                    {k: o.get(k) for k in ("epoch", "seq", "from", "text", "ts")}, (m, o)
            first = h1["messages"][0]
            h2 = await page("h2", limit=10, before={"epoch": first["epoch"], "seq": first["seq"]})
            assert [m["text"] for m in h2["messages"]] == [f"s{i}" for i in range(11, 21)], h2
            assert h2["more"] is True, h2
            first = h2["messages"][0]
            h3 = await page("h3", limit=10, before={"epoch": first["epoch"], "seq": first["seq"]})
            assert [m["text"] for m in h3["messages"]] == [f"s{i}" for i in range(1, 11)], h3
            assert h3["more"] is False, h3
            # default limit 50: everything, oldest first
            h4 = await page("h4")
            assert [m["seq"] for m in h4["messages"]] == seqs and h4["more"] is False, h4
            # a page that ends exactly at the oldest message
            h5 = await page("h5", limit=5, before={"epoch": epoch, "seq": seqs[5]})
            assert [m["seq"] for m in h5["messages"]] == seqs[:5] and h5["more"] is False, h5
            # an empty room
            await send_json(r, {"type": "history", "room": "empty-room", "ref": "h6"})
            h6 = await recv_json(r, 5)
            assert h6.get("type") == "history" and h6.get("messages") == [] and h6.get("more") is False, h6
            # the reader never joined: no live messages arrive
            await assert_quiet_until_pong(r, "history without joining")
        finally:
            await close_all([b, r])

    run_async(main(), 30)
