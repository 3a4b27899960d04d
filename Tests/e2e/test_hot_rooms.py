"""Hot rooms: coalesced delivery (docs/DESIGN.md "Hot rooms", README "Hot rooms").

A room whose messages come closer together than two thirds of `delivery.max_delay_ms` gathers
each member's frames and writes them together; a quiet room is written at once. Nothing
changes for clients: these tests check the protocol's rules (every message once, in seq
order, the sender's ack after its message, resume) in a room that is coalesced, and that
it is: the workers' own counts of frames per write, `chatctl rooms` and /metrics.

Black-box: the binary (CHATGW_BIN), Python `websockets` clients, chatctl, /metrics.
"""

from __future__ import annotations

import asyncio

import pytest

from chatgw_e2e.ops import ctl_rooms, scrape
from chatgw_e2e.placement import connect_on_slot, wait_bus_ready
from chatgw_e2e import redis
from chatgw_e2e.redis import redis_env
from chatgw_e2e.rooms import Inbox, wait_all
from chatgw_e2e.ws import close_all, connect_hello, join_room, run_async, send_json

# fixtures of chatgw_e2e.redis, found by pytest under these names
make_redis = redis.make_redis
redis_server = redis.redis_server

FAST = {"CHATGW_LIMITS_RATE_PER_S": "100000", "CHATGW_LIMITS_BURST": "100000"}
HOT_RATE = 50.0  # msg/s: 10 messages in a 200 ms window


async def publish(ws, room: str, n: int, rate: float, prefix: str = "h") -> None:
    """`n` sends at `rate` per second, each with a ref (so each gets an ack)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for i in range(n):
        await send_json(ws, {"type": "send", "room": room, "text": f"{prefix}{i}", "ref": f"{prefix}{i}"})
        await asyncio.sleep(max(0.0, t0 + (i + 1) / rate - loop.time()))


def seqs(inbox: Inbox, room: str) -> list[int]:
    return [m["seq"] for m in inbox.of("message", room)]


def test_hot_room_is_coalesced_in_order_and_a_quiet_room_is_not(make_gateway):
    """At 50 msg/s every member of two workers gets every message once, in seq order; the
    sender gets each `ack` after its own message; the workers report several frames per
    write for the room (chatctl rooms: `coalesced`, /metrics: coalesced deliveries well
    above coalesced writes), while a room at 2 msg/s next to it stays `immediate`."""
    gw = make_gateway(workers=2, env=FAST)
    hot, quiet, n = "show:hot", "show:quiet", 150

    async def main():
        await wait_bus_ready(gw)
        members = [(await connect_on_slot(gw, slot, user_prefix=f"m{slot}{i}"))[0] for slot in (0, 1) for i in range(2)]
        sender = members[0]
        try:
            for ws in members:
                for room in (hot, quiet):
                    reply, _ = await join_room(ws, room)
                    assert reply.get("type") == "joined", reply
            inboxes = [Inbox(ws, f"member{i}") for i, ws in enumerate(members)]
            rooms_seen: list[dict] = []

            async def quiet_sender():
                for i in range(6):
                    await send_json(members[3], {"type": "send", "room": quiet, "text": f"q{i}"})
                    await asyncio.sleep(0.5)

            async def look_while_hot():
                await asyncio.sleep(2.0)  # the pace needs a few messages to count the room busy
                loop = asyncio.get_running_loop()
                # A heartbeat (1 s) brings the workers' view to the master.
                for _ in range(20):
                    listing = await loop.run_in_executor(None, ctl_rooms, gw, 10)
                    rooms_seen[:] = listing
                    if any(r["room"] == hot and r.get("delivery") == "coalesced" for r in listing):
                        return
                    await asyncio.sleep(0.25)

            await asyncio.gather(publish(sender, hot, n, HOT_RATE), quiet_sender(), look_while_hot())
            await wait_all(inboxes, lambda ib: len(ib.of("message", hot)) >= n and len(ib.of("message", quiet)) >= 6,
                           20, f"{n} hot and 6 quiet messages")
            for ib in inboxes:
                ib.stop()
            first = inboxes[0].of("message", hot)[0]["seq"]
            for ib in inboxes:
                assert seqs(ib, hot) == list(range(first, first + n)), f"{ib.name}: hot room seqs not {first}..{first + n - 1}"
                got = seqs(ib, quiet)
                assert got == sorted(got) and len(set(got)) == 6, f"{ib.name}: quiet room seqs {got}"
                assert not ib.of("error") and not ib.of("bye"), (ib.name, ib.of("error"), ib.of("bye"))

            # the sender: each ack after its message (the ack travels behind the gathered frames)
            seen: set[int] = set()
            acks = 0
            for m in inboxes[0].msgs:
                if m.get("type") == "message" and m.get("room") == hot:
                    seen.add(m["seq"])
                elif m.get("type") == "ack":
                    acks += 1
                    assert m["seq"] in seen, f"ack for seq {m['seq']} came before the message itself"
            assert acks == n, f"{acks} acks for {n} sends"

            by_room = {r["room"]: r for r in rooms_seen}
            assert by_room.get(hot, {}).get("delivery") == "coalesced", f"chatctl rooms while the room was hot: {rooms_seen}"
            assert by_room[hot].get("framesPerWrite", 0) > 1.5, f"frames per write in the hot room: {by_room[hot]}"
            assert by_room.get(quiet, {}).get("delivery") == "immediate", f"chatctl rooms: the quiet room: {by_room.get(quiet)}"
        finally:
            await close_all(members)

    run_async(main(), 60)
    metrics = scrape(gw)
    deliveries = metrics.sum("chatgw_coalesced_deliveries_total", role="worker")
    writes = metrics.sum("chatgw_coalesced_writes_total", role="worker")
    assert writes > 0, "no coalesced writes counted: the hot room was written message by message"
    assert deliveries / writes > 2, f"{deliveries:.0f} coalesced deliveries in {writes:.0f} writes"


@pytest.mark.parametrize("bus", ["relay", "redis"])
def test_hot_room_resume_gets_every_message_once(request, make_gateway, bus):
    """A member of a room at 50 msg/s drops its connection in the middle, reconnects and
    resumes with since+epoch: what it got before and after is every message once, in order
    (on the embedded relay and on Redis)."""
    if bus == "redis":
        gw = make_gateway(workers=2, env=redis_env(request.getfixturevalue("redis_server").url))
    else:
        gw = make_gateway(workers=2, env=FAST)
    room, n = "show:resume", 250

    async def main():
        await wait_bus_ready(gw)
        sender, _ = await connect_on_slot(gw, 0, user_prefix="pub")
        other, _ = await connect_on_slot(gw, 1, user_prefix="other")
        leaver, _ = await connect_hello(gw, "leaver")
        conns = [sender, other]
        try:
            for ws in (sender, other, leaver):
                reply, _ = await join_room(ws, room)
                assert reply.get("type") == "joined", reply
            first_seq = reply["seq"] + 1
            sink = Inbox(sender, "sender")
            control = Inbox(other, "other")
            before = Inbox(leaver, "leaver")
            pub = asyncio.create_task(publish(sender, room, n, HOT_RATE, prefix="r"))
            await before.wait(lambda ib: len(ib.of("message", room)) >= 60, 15, "60 messages before leaving")
            before.stop()
            leaver.transport.abort()  # a drop, not a goodbye
            got = before.of("message", room)
            last = got[-1]
            await asyncio.sleep(0.5)  # messages go on meanwhile
            again, _ = await connect_hello(gw, "leaver")
            conns.append(again)
            reply, early = await join_room(again, room, since=last["seq"], epoch=last["epoch"])
            assert reply.get("type") == "joined", reply
            after = Inbox(again, "leaver again")
            await pub
            await wait_all([after, control], lambda ib: ib.of("message", room) and ib.of("message", room)[-1]["seq"] >= first_seq + n - 1,
                           20, "the last message")
            for ib in (after, control, sink):
                ib.stop()
            assert not [m for m in early if m.get("type") == "gap"] and not after.of("gap"), "a gap on a resume within the history"
            stream = [m["seq"] for m in got] + [m["seq"] for m in early if m.get("type") == "message"] + seqs(after, room)
            want = list(range(first_seq, first_seq + n))
            assert stream == want, (
                f"resumed member: {len(stream)} messages; missing {sorted(set(want) - set(stream))[:5]}, "
                f"duplicates {len(stream) - len(set(stream))}, first out of order "
                f"{next((b for a, b in zip(stream, stream[1:]) if b <= a), None)}")
            assert seqs(control, room) == want, "the member that stayed lost or reordered messages"
        finally:
            await close_all(conns)

    run_async(main(), 60)
    assert scrape(gw).sum("chatgw_coalesced_writes_total", role="worker") > 0, "the room was never coalesced"
