"""Server-Sent Events as a fallback transport (docs/PROTOCOL.md "SSE"), end to end, with
httpx reading the event stream (a client we did not write; chatgw_e2e/sse.py parses the
stream as EventSource does).

* two rooms on one stream, in order; every room's position in every id; heartbeats;
* kill -9 of the worker holding the stream, then a resume with Last-Event-ID (header,
  and the ?last_event_id= fallback): every missed message exactly once;
* WebSocket and SSE members of the same rooms, on both workers, see the same messages in
  the same order;
* POST /sse/send and GET /sse/history: ack, every refusal (identity, rate, room, size);
* bad Last-Event-IDs (garbage, another epoch, far future), bad and too many rooms;
* a resume older than the bus history, filled from the archive;
* counting (chatctl status, metrics with the transport label), reload and shutdown
  drains (retry + bye), a slow SSE reader dropped without holding anyone back.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess

from chatgw_e2e.ops import chatctl, chatctl_bin, ctl_status, scrape, wait_until, worker_children
from chatgw_e2e.placement import connect_on_slot, one_per_slot, room_msgs, wait_bus_ready
from chatgw_e2e.ws import close_all, join_room, recv_until, run_async, send_json, send_message
from chatgw_e2e.sse import SSEStream, get_history, parse_id, post_send

# heartbeat_s 1: a stream hears a comment every second (and the tests see them)
FAST = {"CHATGW_LIMITS_RATE_PER_S": "100000", "CHATGW_LIMITS_BURST": "100000", "CHATGW_SERVER_HEARTBEAT_S": "1"}
SECRET = "e2e-jwt-secret-0123456789abcdef!"


async def open_on_slot(gw, slot: int, tries: int = 40, **kw) -> SSEStream:
    """An event stream whose connection landed on worker `slot` (others are closed)."""
    seen = []
    for _ in range(tries):
        s = await SSEStream(gw, **kw).open()
        await s.wait_event("hello")
        if s.slot == slot:
            return s
        seen.append(s.slot)
        await s.close()
    raise AssertionError(f"no stream landed on slot {slot} in {tries} tries ({seen})")


def seqs(messages: list[dict]) -> list[int]:
    return [m["seq"] for m in messages]


def test_stream_two_rooms_in_order(make_gateway):
    gw = make_gateway(workers=2, env=FAST)

    async def main():
        await wait_bus_ready(gw)
        s = await SSEStream(gw, "viewer", ["live:1", "live:2"]).open()
        try:
            assert s.status == 200, (s.status, s.body)
            assert s.headers["content-type"].startswith("text/event-stream"), s.headers
            assert s.headers["cache-control"] == "no-store", s.headers
            assert "content-length" not in s.headers, s.headers
            hello = (await s.wait_event("hello")).data
            assert hello["user"] == "viewer" and hello["protocol"] == 1, hello
            j1, j2 = await s.wait_event("joined", room="live:1"), await s.wait_event("joined", room="live:2")
            assert s.events[0].type == "hello" and not s.events[0].has_id, "hello carries no id"
            assert j1.has_id and parse_id(j1.id) == {"live:1": (j1.data["epoch"], 0)}, j1
            assert parse_id(j2.id) == {"live:1": (j1.data["epoch"], 0), "live:2": (j2.data["epoch"], 0)}, j2
            for i in range(1, 11):
                room = "live:1" if i % 2 else "live:2"
                status, ack = await post_send(gw, {"room": room, "text": f"m{i}", "ref": f"r{i}"}, user="poster")
                assert status == 200 and ack["type"] == "ack" and ack["ref"] == f"r{i}", (status, ack)
            one, two = await s.wait_messages("live:1", 5), await s.wait_messages("live:2", 5)
            assert seqs(one) == [1, 2, 3, 4, 5] and [m["text"] for m in one] == ["m1", "m3", "m5", "m7", "m9"], one
            assert seqs(two) == [1, 2, 3, 4, 5] and [m["text"] for m in two] == ["m2", "m4", "m6", "m8", "m10"], two
            # every message's id holds both rooms, each at its last message so far
            last = {"live:1": 0, "live:2": 0}
            for e in s.of_type("message"):
                last[e.data["room"]] = e.data["seq"]
                assert e.has_id and {r: q for r, (_, q) in parse_id(e.id).items()} == last, (e.id, last)
            await s.wait(lambda st: st.comments >= 2, 10, "two heartbeat comments (server.heartbeat_s 1)")
        finally:
            await s.close()

    run_async(main(), 60)


def test_resume_after_worker_kill_gets_missed_messages_once(make_gateway):
    gw = make_gateway(workers=2, env=FAST)

    async def main():
        await wait_bus_ready(gw)
        rooms = ["res:a", "res:b"]
        s = await SSEStream(gw, "viewer", rooms).open()
        await s.wait_event("hello")
        # hello comes before the joins are answered: a send before them may be sequenced
        # before this viewer is a member, and is then not its to receive.
        for room in rooms:
            await s.wait_event("joined", room=room)
        victim_slot = s.slot
        sender, _ = await connect_on_slot(gw, 1 - victim_slot, "sender")
        for room in rooms:
            await join_room(sender, room)
        for i in range(1, 4):
            for room in rooms:
                await send_message(sender, room, f"{room} before {i}")
        for room in rooms:
            await s.wait_messages(room, 3)
        last_id = s.last_id
        assert {r: q for r, (_, q) in parse_id(last_id).items()} == {"res:a": 3, "res:b": 3}, last_id

        victim = gw.workers_by_slot()[victim_slot]
        os.kill(victim, signal.SIGKILL)
        await asyncio.wait_for(s.ended.wait(), 10)
        await s.close()
        for i in range(4, 7):
            for room in rooms:
                await send_message(sender, room, f"{room} while away {i}")

        back = await SSEStream(gw, "viewer", rooms, last_event_id=last_id).open()
        by_query = await SSEStream(gw, "viewer", rooms, last_event_id=last_id, id_in_query=True).open()
        try:
            for stream in (back, by_query):
                for room in rooms:
                    await stream.wait_messages(room, 3)
            await send_message(sender, "res:a", "live after the resume")
            for stream in (back, by_query):
                await stream.wait(lambda st: len(st.messages("res:a")) >= 4, 10, "the live message")
            await asyncio.sleep(0.3)  # anything sent twice would have come by now
            for stream in (back, by_query):
                assert seqs(stream.messages("res:a")) == [4, 5, 6, 7], stream.messages("res:a")
                assert seqs(stream.messages("res:b")) == [4, 5, 6], stream.messages("res:b")
                assert [m["text"] for m in stream.messages("res:b")] == [f"res:b while away {i}" for i in (4, 5, 6)]
                assert not stream.of_type("gap") and not stream.of_type("error"), stream.events
                # joined precedes the replay in each room
                kinds = [(e.type, e.data.get("room")) for e in stream.events]
                assert kinds.index(("joined", "res:b")) < kinds.index(("message", "res:b")), kinds
        finally:
            await back.close()
            await by_query.close()
            await close_all([sender])

    run_async(main(), 80)


def test_websocket_and_sse_members_see_the_same_order(make_gateway):
    gw = make_gateway(workers=2, env=FAST)
    room = "mixed"
    per_sender = 15

    async def main():
        await wait_bus_ready(gw)
        placed = await one_per_slot(gw, [0, 1], "wsm")
        sockets = [ws for ws, _ in placed.values()]
        for ws in sockets:
            await join_room(ws, room)
        streams = [await open_on_slot(gw, slot, user=f"ssem{slot}", rooms=[room]) for slot in (0, 1)]
        try:
            for st in streams:
                await st.wait_event("joined", room=room)

            async def ws_sender(ws, name):
                for i in range(per_sender):
                    await send_json(ws, {"type": "send", "room": room, "text": f"{name} {i}"})

            async def http_sender():
                for i in range(per_sender):
                    status, answer = await post_send(gw, {"room": room, "text": f"poster {i}"}, user="poster")
                    assert status == 200, answer

            await asyncio.gather(ws_sender(sockets[0], "ws0"), ws_sender(sockets[1], "ws1"), http_sender())
            total = 3 * per_sender
            orders = {}
            for slot, (ws, _) in placed.items():
                _, before = await recv_until(ws, lambda m: m.get("type") == "message" and m.get("seq") == total, 15)
                got = room_msgs(before, room) + [{"seq": total}]
                orders[f"ws on slot {slot}"] = [m["seq"] for m in got]
            for st in streams:
                await st.wait_messages(room, total, 15)
                orders[f"sse on slot {st.slot}"] = seqs(st.messages(room))
            for name, order in orders.items():
                assert order == list(range(1, total + 1)), f"{name}: {order}"
            texts = [[(m["seq"], m["from"], m["text"]) for m in st.messages(room)] for st in streams]
            assert texts[0] == texts[1], texts
            assert {t for _, _, t in texts[0]} == {f"{n} {i}" for n in ("ws0", "ws1", "poster") for i in range(per_sender)}
        finally:
            for st in streams:
                await st.close()
            await close_all(sockets)

    run_async(main(), 80)


def test_post_send_ack_and_refusals(make_gateway):
    gw = make_gateway(workers=1, env={"CHATGW_AUTH_MODE": "jwt", "CHATGW_AUTH_JWT_SECRET": SECRET,
                                      "CHATGW_LIMITS_RATE_PER_S": "1", "CHATGW_LIMITS_BURST": "3",
                                      "CHATGW_LIMITS_MAX_TEXT_BYTES": "100"})

    def mint(user: str, rooms: str | None = None) -> str:
        args = [str(chatctl_bin()), "token", "--user", user, "--secret", SECRET] + (["--rooms", rooms] if rooms else [])
        r = subprocess.run(args, capture_output=True, text=True, timeout=15,
                           env={k: v for k, v in os.environ.items() if not k.startswith("CHATGW_")})
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    alice, bob = mint("alice", "ok:*"), mint("bob")

    async def main():
        # no identity: 401 for every SSE endpoint
        status, body = await post_send(gw, {"room": "ok:1", "text": "x"})
        assert status == 401 and body["code"] == "unauthorized", (status, body)
        status, body = await post_send(gw, {"room": "ok:1", "text": "x"}, user="alice")
        assert status == 401, "?user= is ignored in auth mode jwt"
        assert (await get_history(gw, "ok:1"))[0] == 401
        refused = await SSEStream(gw, rooms=["ok:1"]).open()
        assert refused.status == 401 and b"unauthorized" in refused.body, (refused.status, refused.body)
        await refused.close()

        s = await SSEStream(gw, rooms=["ok:1", "elsewhere"], bearer=alice).open()
        try:
            assert (await s.wait_event("hello")).data["user"] == "alice"
            joined = (await s.wait_event("joined", room="ok:1")).data
            forbidden = (await s.wait_event("error")).data
            assert forbidden["code"] == "forbidden" and forbidden["room"] == "elsewhere", forbidden
            status, ack = await post_send(gw, {"room": "ok:1", "text": "hello", "ref": "a1"}, token=alice)
            assert status == 200, (status, ack)
            assert ack == {"type": "ack", "room": "ok:1", "seq": ack["seq"], "epoch": joined["epoch"], "ref": "a1"}, ack
            message = (await s.wait_messages("ok:1", 1))[0]
            assert (message["seq"], message["from"], message["text"]) == (ack["seq"], "alice", "hello"), message

            cases = [
                ({"room": "elsewhere", "text": "x"}, alice, 403, "forbidden"),
                ({"room": "no way", "text": "x"}, bob, 400, "bad_room"),
                ({"room": "ok:1", "text": "x" * 101}, bob, 400, "too_large"),
                (b"x" * 2000, bob, 400, "too_large"),  # over the body limit (6 x 100 + 1024)
                ({"room": "ok:1"}, bob, 400, "bad_json"),
                (b"not json", bob, 400, "bad_json"),
            ]
            for body, token, want_status, want_code in cases:
                status, answer = await post_send(gw, body, bearer=token)
                assert (status, answer.get("code")) == (want_status, want_code), (body, status, answer)

            # rate 1/s, burst 3 per user on this worker: alice spent 1 on the ack and 1 on the forbidden post
            answers = [await post_send(gw, {"room": "ok:1", "text": f"burst {i}"}, token=alice) for i in range(6)]
            limited = [a for st, a in answers if st == 429]
            assert limited and limited[0]["code"] == "rate_limited", answers
            status, _ = await post_send(gw, {"room": "ok:1", "text": "bob is not alice"}, token=bob)
            assert status == 200, "another user's rate is his own"

            status, page = await get_history(gw, "ok:1", bearer=alice, limit=50)
            assert status == 200 and page["type"] == "history" and page["room"] == "ok:1", page
            assert page["messages"][0]["text"] == "hello" and page["messages"][-1]["text"] == "bob is not alice", page
            status, page = await get_history(gw, "ok:1", bearer=alice, before_epoch=joined["epoch"],
                                             before_seq=ack["seq"] + 1, limit=1)
            assert status == 200 and [m["seq"] for m in page["messages"]] == [ack["seq"]] and page["more"] is False, page
            assert (await get_history(gw, "elsewhere", token=alice))[1]["code"] == "forbidden"
            assert (await get_history(gw, "no way", token=alice))[1]["code"] == "bad_room"
            assert (await get_history(gw, "ok:1", token=alice, limit=0))[1]["code"] == "bad_json"
        finally:
            await s.close()

    run_async(main(), 60)


def test_bad_last_event_ids_and_rooms(make_gateway):
    gw = make_gateway(workers=1, env={**FAST, "CHATGW_LIMITS_ROOMS_PER_CONNECTION": "3"})
    room = "resume:x"

    async def main():
        await wait_bus_ready(gw)
        watcher, _ = await connect_on_slot(gw, 0, "watcher")
        joined, _ = await join_room(watcher, room)
        for i in (1, 2):
            await send_message(watcher, room, f"early {i}")
        epoch = joined["epoch"]
        streams = []
        try:
            # garbage: bad_json naming it, and the room is joined as without an id
            garbage = await SSEStream(gw, "g", [room], last_event_id="garbage,,/").open()
            streams.append(garbage)
            error = (await garbage.wait_event("error")).data
            assert error["code"] == "bad_json" and "garbage" in error["message"], error
            assert (await garbage.wait_event("joined", room=room)).data["seq"] == 2

            # another epoch: gap in the current epoch, then the current epoch from its start
            other = await SSEStream(gw, "o", [], last_event_id=f"{room}/0123456789abcdef/7").open()
            streams.append(other)
            gap = (await other.wait_event("gap", room=room))
            assert gap.data["epoch"] == epoch and (gap.data["from"], gap.data["to"]) == (0, 0), gap.data
            assert parse_id(gap.id)[room] == (epoch, 0), gap.id
            assert seqs(await other.wait_messages(room, 2)) == [1, 2]

            # far in the future: joined, nothing replayed, live messages go on
            future = await SSEStream(gw, "f", [room], last_event_id=f"{room}/{epoch}/999999").open()
            streams.append(future)
            await future.wait_event("joined", room=room)
            assert parse_id(future.of_type("joined")[0].id)[room] == (epoch, 999999), "the resume point is kept until a message"

            # a bad room name and too many rooms (limit 3): refused one by one, the rest joined
            many = await SSEStream(gw, "m", ["r1", "bad room!", "r2", "r3", "r4", "r5"]).open()
            streams.append(many)
            await many.wait(lambda st: len(st.of_type("joined")) + len(st.of_type("error")) >= 6, 10, "six answers")
            assert [e.data["room"] for e in many.of_type("joined")] == ["r1", "r2", "r3"]
            assert [(e.data["code"], e.data["room"]) for e in many.of_type("error")] == [
                ("bad_room", "bad room!"), ("too_many_rooms", "r4"), ("too_many_rooms", "r5")]

            await send_message(watcher, room, "after the bad ids")
            for st in (garbage, other, future):
                got = await st.wait(lambda s: [m for m in s.messages(room) if m["seq"] == 3], 10, "seq 3")
                assert got[0]["text"] == "after the bad ids"
            assert seqs(future.messages(room)) == [3], future.messages(room)
            assert seqs(garbage.messages(room)) == [3], garbage.messages(room)
            assert gw.http_get("/healthz")[0] == 200
            assert gw.workers_by_slot(), "the worker is alive"
        finally:
            for st in streams:
                await st.close()
            await close_all([watcher])

    run_async(main(), 60)


def test_sse_counted_and_drained_on_reload_and_shutdown(make_gateway):
    gw = make_gateway(workers=2, env={**FAST, "CHATGW_SUPERVISOR_DRAIN_TIMEOUT_S": "3"})

    async def main():
        await wait_bus_ready(gw)
        streams = [await open_on_slot(gw, slot, user=f"c{slot}", rooms=["count"]) for slot in (0, 1)]
        ws, _ = await connect_on_slot(gw, 0, "wsc")
        try:
            def counted():
                workers = worker_children(ctl_status(gw))
                return sum(c["connections"] for c in workers) == 3
            assert wait_until(counted, 10), ctl_status(gw)

            def exported():
                m = scrape(gw)
                by_transport = {t: {int(l["slot"]): v for l, v in m.select("chatgw_transport_connections", role="worker", transport=t)}
                                for t in ("sse", "websocket")}
                return by_transport == {"sse": {0: 1, 1: 1}, "websocket": {0: 1, 1: 0}} and m.sum("chatgw_connections", role="worker") == 3
            assert wait_until(exported, 10), scrape(gw).lines("chatgw_transport_connections")

            kicked = await SSEStream(gw, "kickme", ["count"]).open()
            await kicked.wait_event("joined")
            assert chatctl(gw, "kick", "kickme").returncode == 0
            await asyncio.wait_for(kicked.ended.wait(), 10)
            bye = kicked.of_type("bye")
            assert bye and bye[-1].data["reason"] == "kicked" and bye[-1].retry == bye[-1].data["retry_ms"], kicked.events[-3:]
            await kicked.close()

            gw.signal(signal.SIGHUP)
            for st in streams:
                await asyncio.wait_for(st.ended.wait(), 20)
                bye = st.of_type("bye")
                assert bye and bye[-1].data["reason"] == "reload", st.events[-3:]
                assert bye[-1].retry == bye[-1].data["retry_ms"] > 0, "retry: carries the bye's retry_ms"
        finally:
            for st in streams:
                await st.close()
            await close_all([ws])

        late = await SSEStream(gw, "late", ["count"]).open()
        await late.wait_event("joined")
        gw.signal(signal.SIGTERM)
        await asyncio.wait_for(late.ended.wait(), 15)
        bye = late.of_type("bye")
        assert bye and bye[-1].data["reason"] == "shutdown" and bye[-1].retry == bye[-1].data["retry_ms"], late.events[-3:]
        await late.close()

    run_async(main(), 80)
    assert gw.wait_exit(15) == 0


def kernel_send_buffer_max() -> int:
    """The most a TCP socket's send buffer grows to by itself (tcp_wmem's third field)."""
    with open("/proc/sys/net/ipv4/tcp_wmem") as f:
        return int(f.read().split()[2])


def test_slow_sse_reader_is_dropped_and_nobody_waits(make_gateway):
    gw = make_gateway(workers=1, env={**FAST, "CHATGW_LIMITS_OUTBOUND_BUFFER_BYTES": "65536",
                                      "CHATGW_LIMITS_MAX_TEXT_BYTES": "16000"})
    room = "slow"
    # Past its 64 KB outbound buffer the sloth is dropped, but its socket still sends what the
    # kernel took before that: on loopback the send buffer grows to tcp_wmem's maximum at once
    # (4 MB here, some 3 MB of it data). Send well past that, or "cut off" is a race.
    size = 15_000
    count = max(200, (kernel_send_buffer_max() + 65_536 + 1_048_576) // size + 1)

    async def main():
        await wait_bus_ready(gw)
        # a reader that never reads, with a small receive buffer
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect((gw.host, gw.port))
        slow.sendall(f"GET /sse?user=sloth&rooms={room} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        reader = await SSEStream(gw, "reader", [room]).open()
        sender, _ = await connect_on_slot(gw, 0, "sender")
        try:
            await join_room(sender, room)
            await reader.wait_event("joined")
            await asyncio.sleep(0.3)  # the sloth's join is answered too
            for i in range(count):
                await send_json(sender, {"type": "send", "room": room, "text": f"{i:04d} " + "x" * size})
            got = await reader.wait_messages(room, count, 30)
            assert seqs(got) == list(range(1, count + 1)), "the reading member got everything, in order"
            assert wait_until(lambda: scrape(gw).sum("chatgw_slow_consumer_disconnects_total") >= 1, 10), \
                scrape(gw).lines("chatgw_slow_consumer")
            # the server ends the sloth's stream
            slow.settimeout(10)
            received = 0
            while True:
                try:
                    chunk = slow.recv(65536)
                except ConnectionResetError:
                    break
                except socket.timeout:
                    raise AssertionError(f"the sloth's stream is still open after {received} bytes") from None
                if not chunk:
                    break
                received += len(chunk)
            assert received < count * size, f"the sloth received {received} bytes: it was not cut off"
        finally:
            slow.close()
            await reader.close()
            await close_all([sender])

    run_async(main(), 80)


def test_resume_older_than_the_history_is_filled_from_the_archive(make_gateway):
    """The bus holds the last 5 messages; a stream resuming from seq 2 gets 3.. from the
    archive, then the bus's replay, then the live messages that came meanwhile (kept for it
    while the archive was read), each once and in order, with ids that follow."""
    gw = make_gateway(workers=1, env={**FAST, "CHATGW_HISTORY_MESSAGES": "5"}, ready_roles=["relay", "archiver"])
    room = "archived"

    async def main():
        await wait_bus_ready(gw)
        sender, _ = await connect_on_slot(gw, 0, "sender")
        joined, _ = await join_room(sender, room)
        for i in range(1, 21):
            await send_message(sender, room, f"m{i}")
        await asyncio.sleep(0.5)  # the archiver's batch (archive.batch_ms 100) is written
        s = await SSEStream(gw, "late", [room], last_event_id=f"{room}/{joined['epoch']}/2").open()
        try:
            await s.wait_event("joined", room=room)
            for i in range(21, 26):
                await send_message(sender, room, f"m{i}")
            got = await s.wait_messages(room, 23, 15)
            await asyncio.sleep(0.3)
            assert seqs(s.messages(room)) == list(range(3, 26)), seqs(s.messages(room))
            assert [m["text"] for m in got[:3]] == ["m3", "m4", "m5"]
            assert not s.of_type("gap"), [e.data for e in s.of_type("gap")]
            for e in s.of_type("message"):
                assert parse_id(e.id)[room] == (joined["epoch"], e.data["seq"]), e.id
        finally:
            await s.close()
            await close_all([sender])

    run_async(main(), 60)


def test_post_send_in_auth_mode_none_needs_a_user(make_gateway):
    """Without ?user= a post would be a new guest each time, whose rate limit never holds:
    it is refused with bad_user, and nothing reaches the room; with ?user= it is sent."""
    gw = make_gateway(workers=1)

    async def main():
        s = await SSEStream(gw, rooms=["open:1"], user="reader").open()
        try:
            joined = (await s.wait_event("joined", room="open:1")).data
            status, body = await post_send(gw, {"room": "open:1", "text": "anonymous"})
            assert (status, body.get("code")) == (400, "bad_user"), (status, body)
            status, ack = await post_send(gw, {"room": "open:1", "text": "named"}, user="poster")
            assert status == 200 and ack["seq"] == joined["seq"] + 1, (status, ack)
            message = (await s.wait_messages("open:1", 1))[0]
            assert message["text"] == "named", f"the refused post reached the room: {message}"
        finally:
            await s.close()

    run_async(main(), 30)
