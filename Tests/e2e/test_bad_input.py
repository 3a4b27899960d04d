"""Bad input from clients: every case is answered as docs/PROTOCOL.md says, and the
worker that got it keeps serving its other connections (pids unchanged, a witness connection
on every worker slot still answers application and WebSocket pings, new connections
still get their hello).

Black-box: the binary (CHATGW_BIN), WebSocket clients (the websockets library, or the
raw frame writer in chatgw_e2e.raw where the library will not send the bad thing), ps.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from chatgw_e2e.placement import one_per_slot, wait_bus_ready
from chatgw_e2e.raw import OP_CONT, OP_TEXT, RawWS, raw_http, upgrade_request, ws_frame
from chatgw_e2e.ws import (
    app_ping,
    close_all,
    collect_until_close,
    connect_hello,
    join_room,
    open_many,
    ping_ok,
    recv_json,
    recv_until,
    run_async,
    send_json,
    send_message,
)

WORKERS = 2
FAST = {"CHATGW_LIMITS_RATE_PER_S": "100000", "CHATGW_LIMITS_BURST": "100000"}


# --------------------------------------------------------------------------- helpers


class Witnesses:
    """A connection on every worker slot, opened before the bad input, plus worker pids."""

    def __init__(self, gw, conns: dict[int, tuple], pids: dict[int, int]):
        self.gw, self.conns, self.pids = gw, conns, pids

    @classmethod
    async def open(cls, gw) -> "Witnesses":
        pids = gw.workers_by_slot()
        assert sorted(pids) == list(range(WORKERS)), f"workers: {gw.children()}"
        conns = await one_per_slot(gw, range(WORKERS), user_prefix="witness")
        return cls(gw, conns, pids)

    async def check(self, what: str) -> None:
        """Every witness still answers; pids unchanged; a new connection works."""
        for slot, (ws, hello) in sorted(self.conns.items()):
            try:
                pong = await app_ping(ws, 3.0)
            except Exception as e:  # noqa: BLE001
                raise AssertionError(
                    f"after {what}: witness {hello['conn']} on slot {slot} got no pong: {type(e).__name__}: {e}"
                ) from None
            assert pong.get("type") == "pong", pong
            assert await ping_ok(ws, 3.0), f"after {what}: witness on slot {slot} answered no WebSocket ping"
        now = self.gw.workers_by_slot()
        assert now == self.pids, f"after {what}: worker pids changed: before {self.pids}, now {now}"
        assert self.gw.alive(), f"after {what}: master died"
        res = await open_many(self.gw, 8, timeout=5, user_prefix="after")
        try:
            assert not res.errors, f"after {what}: new connections failed: {res.errors[:3]}"
        finally:
            await close_all(res.conns)

    async def close(self) -> None:
        await close_all([ws for ws, _ in self.conns.values()])


def run_case(gw, body, timeout: float = 40.0, what: str = "the bad input"):
    """Open witnesses, run body(gw), check the witnesses, close them."""

    async def main():
        await wait_bus_ready(gw)
        w = await Witnesses.open(gw)
        try:
            result = await body(gw)
            await w.check(what)
            return result
        finally:
            await w.close()

    return run_async(main(), timeout)


async def expect_error(ws, code: str, ref: str | None = None, timeout: float = 5.0,
                       names: str | None = None) -> dict:
    """The next frame is `error` with code (and ref echoed when given, absent when not)."""
    msg = await recv_json(ws, timeout)
    assert msg.get("type") == "error", f"expected error {code}, got {msg}"
    assert msg.get("code") == code, f"expected error code {code}, got {msg}"
    assert isinstance(msg.get("message"), str) and msg["message"], f"error without message: {msg}"
    if ref is not None:
        assert msg.get("ref") == ref, f"error does not echo ref {ref!r}: {msg}"
    else:
        assert "ref" not in msg, f"error carries a ref although the request had none: {msg}"
    if names is not None:
        assert names in msg["message"], f"error message does not name the field {names!r}: {msg}"
    return msg


async def still_open(ws, what: str) -> None:
    """The connection that sent the bad input is still open and answers."""
    try:
        pong = await app_ping(ws, 3.0)
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"connection not usable after {what}: {type(e).__name__}: {e}") from None
    assert pong.get("type") == "pong", pong


# --------------------------------------------------------------------------- JSON


def test_malformed_json(make_gateway):
    gw = make_gateway(workers=WORKERS)

    async def body(gw):
        ws, _ = await connect_hello(gw, "mal")
        try:
            for bad in ['{bad', '{"type":"ping"', '{"type":"ping","ref":"x"}}', '', 'pong', "{'type':'ping'}"]:
                await ws.send(bad)
                msg = await expect_error(ws, "bad_json")
                assert msg.get("type") == "error", (bad, msg)
                await still_open(ws, f"text {bad!r}")
        finally:
            await close_all([ws])

    run_case(gw, body, what="malformed JSON")


def test_json_that_is_not_an_object(make_gateway):
    gw = make_gateway(workers=WORKERS)

    async def body(gw):
        ws, _ = await connect_hello(gw, "arr")
        try:
            for bad in ['[{"type":"ping","ref":"a"}]', '[]', '"ping"', '42', 'null', 'true']:
                await ws.send(bad)
                await expect_error(ws, "bad_json")
                await still_open(ws, f"text {bad!r}")
        finally:
            await close_all([ws])

    run_case(gw, body, what="JSON arrays and scalars")


def test_unknown_type(make_gateway):
    gw = make_gateway(workers=WORKERS)

    async def body(gw):
        ws, _ = await connect_hello(gw, "unk")
        try:
            await send_json(ws, {"type": "shout", "room": "r", "ref": "u1"})
            await expect_error(ws, "unknown_type", ref="u1")
            await send_json(ws, {"type": "JOIN", "room": "r"})
            await expect_error(ws, "unknown_type")
            await still_open(ws, "an unknown type")
        finally:
            await close_all([ws])

    run_case(gw, body, what="unknown types")


def test_missing_fields(make_gateway):
    gw = make_gateway(workers=WORKERS, env=FAST)

    async def body(gw):
        ws, _ = await connect_hello(gw, "miss")
        try:
            joined, _ = await join_room(ws, "mf")
            assert joined.get("type") == "joined", joined
            cases = [
                ({"ref": "m0", "room": "mf"}, "type"),
                ({"type": "join", "ref": "m1"}, "room"),
                ({"type": "leave", "ref": "m2"}, "room"),
                ({"type": "send", "text": "x", "ref": "m3"}, "room"),
                ({"type": "send", "room": "mf", "ref": "m4"}, "text"),
                ({"type": "history", "ref": "m5"}, "room"),
            ]
            for req, field in cases:
                await send_json(ws, req)
                await expect_error(ws, "bad_json", ref=req["ref"], names=field)
            await still_open(ws, "requests with missing fields")
            # and nothing was posted: a send still gets the next seq
            ack = await send_message(ws, "mf", "after")
            assert ack.get("type") == "ack" and ack.get("seq") == joined["seq"] + 1, (joined, ack)
        finally:
            await close_all([ws])

    run_case(gw, body, what="missing fields")


def test_wrong_field_types(make_gateway):
    gw = make_gateway(workers=WORKERS, env=FAST)

    async def body(gw):
        ws, _ = await connect_hello(gw, "types")
        try:
            joined, _ = await join_room(ws, "wt")
            assert joined.get("type") == "joined", joined
            e = joined["epoch"]
            cases = [
                ({"type": 5, "ref": "t0"}, "type"),
                ({"type": "join", "room": 5, "ref": "t1"}, "room"),
                ({"type": "join", "room": "wt2", "since": "5", "epoch": e, "ref": "t2"}, "since"),
                ({"type": "join", "room": "wt2", "since": 5, "epoch": 7, "ref": "t3"}, "epoch"),
                ({"type": "join", "room": "wt2", "history": "5", "ref": "t4"}, "history"),
                ({"type": "send", "room": "wt", "text": 5, "ref": "t5"}, "text"),
                ({"type": "send", "room": ["wt"], "text": "x", "ref": "t6"}, "room"),
                ({"type": "leave", "room": None, "ref": "t7"}, "room"),
                ({"type": "history", "room": "wt", "limit": "10", "ref": "t8"}, "limit"),
            ]
            for req, field in cases:
                await send_json(ws, req)
                await expect_error(ws, "bad_json", ref=req["ref"], names=field)
            await still_open(ws, "requests with wrong field types")
            # none of the bad joins joined wt2: a send there is refused as not joined
            await send_json(ws, {"type": "send", "room": "wt2", "text": "x", "ref": "t9"})
            await expect_error(ws, "not_joined", ref="t9")
        finally:
            await close_all([ws])

    run_case(gw, body, what="wrong field types")


# --------------------------------------------------------------------------- names, membership, sizes


def test_bad_room_names(make_gateway):
    gw = make_gateway(workers=WORKERS, env=FAST)

    async def body(gw):
        ws, _ = await connect_hello(gw, "rooms")
        try:
            bad = ["", "a" * 65, "a b", "a/b", "r\u00fcm", "a\nb", "a#b", "a*"]
            for i, name in enumerate(bad):
                ref = f"b{i}"
                await send_json(ws, {"type": "join", "room": name, "ref": ref})
                await expect_error(ws, "bad_room", ref=ref)
            await still_open(ws, "bad room names")
            # the limits themselves are fine
            for name in ["a" * 64, "Az09_.:-", "x"]:
                reply, _ = await join_room(ws, name)
                assert reply.get("type") == "joined" and reply.get("room") == name, (name, reply)
        finally:
            await close_all([ws])

    run_case(gw, body, what="bad room names")


def test_leave_of_a_room_not_joined(make_gateway):
    gw = make_gateway(workers=WORKERS, env=FAST)

    async def body(gw):
        ws, _ = await connect_hello(gw, "leaver")
        try:
            await send_json(ws, {"type": "leave", "room": "never", "ref": "l1"})
            await expect_error(ws, "not_joined", ref="l1")
            joined, _ = await join_room(ws, "once")
            assert joined.get("type") == "joined", joined
            await send_json(ws, {"type": "leave", "room": "once", "ref": "l2"})
            left = await recv_json(ws)
            assert left == {"type": "left", "room": "once", "ref": "l2"}, left
            await send_json(ws, {"type": "leave", "room": "once", "ref": "l3"})
            await expect_error(ws, "not_joined", ref="l3")
            await still_open(ws, "leave of rooms not joined")
        finally:
            await close_all([ws])

    run_case(gw, body, what="leave of a room not joined")


def test_send_to_a_room_not_joined(make_gateway):
    gw = make_gateway(workers=WORKERS, env=FAST)

    async def body(gw):
        ws, _ = await connect_hello(gw, "sender")
        other, _ = await connect_hello(gw, "member")
        try:
            joined, _ = await join_room(other, "nj")
            assert joined.get("type") == "joined", joined
            await send_json(ws, {"type": "send", "room": "nj", "text": "sneak", "ref": "n1"})
            await expect_error(ws, "not_joined", ref="n1")
            mine, _ = await join_room(ws, "nj")
            assert mine.get("type") == "joined", mine
            await send_json(ws, {"type": "leave", "room": "nj", "ref": "n2"})
            await recv_until(ws, lambda m: m.get("type") == "left", 5)
            await send_json(ws, {"type": "send", "room": "nj", "text": "sneak2", "ref": "n3"})
            await expect_error(ws, "not_joined", ref="n3")
            await still_open(ws, "sends to a room not joined")
            # the member of the room never saw the refused texts
            await send_message(other, "nj", "legit", wait_ack=False)
            msgs = []
            while True:
                m = await recv_json(other, 5)
                msgs.append(m)
                if m.get("type") == "ack":
                    break
            texts = [m.get("text") for m in msgs if m.get("type") == "message"]
            assert texts == ["legit"], f"member saw {msgs}"
        finally:
            await close_all([ws, other])

    run_case(gw, body, what="sends to a room not joined")


def test_text_too_large(make_gateway):
    gw = make_gateway(workers=WORKERS, env=FAST)  # max_text_bytes default 4096

    async def body(gw):
        ws, _ = await connect_hello(gw, "big")
        try:
            joined, _ = await join_room(ws, "tl")
            ok1 = await send_message(ws, "tl", "x" * 4096)
            assert ok1.get("type") == "ack", f"4096-byte text refused: {ok1}"
            ok2 = await send_message(ws, "tl", "\u00e9" * 2048)  # 4096 UTF-8 bytes
            assert ok2.get("type") == "ack", f"2048 x e-acute (4096 bytes) refused: {ok2}"
            for i, text in enumerate(["x" * 4097, "\u20ac" * 1366]):  # 4097 and 4098 UTF-8 bytes
                ref = f"big{i}"
                await send_json(ws, {"type": "send", "room": "tl", "text": text, "ref": ref})
                msg, before = await recv_until(ws, lambda m: m.get("ref") == ref, 5)
                assert msg.get("type") == "error" and msg.get("code") == "too_large", (
                    f"text of {len(text.encode())} bytes: {msg}"
                )
                assert not [m for m in before if m.get("type") == "message"], before
            await still_open(ws, "too large texts")
            ack = await send_message(ws, "tl", "small")
            assert ack.get("seq") == joined["seq"] + 3, f"refused texts took a seq: {joined} {ack}"
        finally:
            await close_all([ws])

    run_case(gw, body, what="too large texts")


def test_too_many_rooms(make_gateway):
    gw = make_gateway(workers=WORKERS, env={**FAST, "CHATGW_LIMITS_ROOMS_PER_CONNECTION": "3"})

    async def body(gw):
        ws, _ = await connect_hello(gw, "hoarder")
        try:
            for r in ["r1", "r2", "r3"]:
                reply, _ = await join_room(ws, r)
                assert reply.get("type") == "joined", reply
            await send_json(ws, {"type": "join", "room": "r4", "ref": "tm"})
            await expect_error(ws, "too_many_rooms", ref="tm")
            await send_json(ws, {"type": "leave", "room": "r1", "ref": "lv"})
            left = await recv_json(ws)
            assert left.get("type") == "left", left
            reply, _ = await join_room(ws, "r4")
            assert reply.get("type") == "joined", f"join after a leave refused: {reply}"
            await still_open(ws, "too many rooms")
        finally:
            await close_all([ws])

    run_case(gw, body, what="too many rooms")


# --------------------------------------------------------------------------- frames


def test_binary_frame_gets_bad_frame_and_stays_open(make_gateway):
    gw = make_gateway(workers=WORKERS)

    async def body(gw):
        ws, _ = await connect_hello(gw, "bin")
        try:
            await ws.send(b'{"type":"ping","ref":"b1"}')
            await expect_error(ws, "bad_frame")
            await ws.send(b"\x00\xff" * 100)
            await expect_error(ws, "bad_frame")
            await still_open(ws, "binary frames")
        finally:
            await close_all([ws])

    run_case(gw, body, what="binary frames")


def test_invalid_utf8_text_closes_1007(make_gateway):
    gw = make_gateway(workers=WORKERS)

    async def body(gw):
        ends = []
        for i, payload in enumerate([
            b'{"type":"ping","ref":"\xff\xfe"}',
            b'{"type":"ping","ref":"\xc3"}',  # truncated sequence
            b'{"type":"ping","ref":"\xed\xa0\x80"}',  # UTF-16 surrogate
        ]):
            c = await RawWS.open(gw, f"utf{i}")
            try:
                hello = await c.recv_json()
                assert hello.get("type") == "hello", hello
                await c.send_text(payload)
                ends.append((payload, await c.wait_close(5)))
            finally:
                c.abort()
        for payload, end in ends:
            assert end.error is None, f"{payload!r}: {end.error}; frames {end.json_messages()}"
            assert end.close_code == 1007, f"{payload!r}: close code {end.close_code}, frames {end.json_messages()}"

        # split over two fragments, each invalid on its own but valid together: accepted
        c = await RawWS.open(gw, "utfsplit")
        try:
            await c.recv_json()
            data = '{"type":"ping","ref":"\u00e9"}'.encode()
            cut = data.index(b"\xc3") + 1
            await c.send_raw(ws_frame(OP_TEXT, data[:cut], fin=False) + ws_frame(OP_CONT, data[cut:], fin=True))
            pong = await c.recv_json(5)
            assert pong == {"type": "pong", "ref": "\u00e9"}, pong
        finally:
            c.abort()

    run_case(gw, body, what="invalid UTF-8")


def test_message_over_frame_limit_closes_1009(make_gateway):
    gw = make_gateway(workers=WORKERS)  # max_frame_bytes default 65536
    limit = 65536

    def ping_of(n: int, ref: str) -> bytes:
        head = f'{{"type":"ping","ref":"{ref}","pad":"'.encode()
        tail = b'"}'
        return head + b"p" * (n - len(head) - len(tail)) + tail

    async def body(gw):
        # exactly at the limit: accepted
        c = await RawWS.open(gw, "atlimit")
        try:
            await c.recv_json()
            data = ping_of(limit, "at")
            assert len(data) == limit
            await c.send_text(data)
            pong = await c.recv_json(5)
            assert pong == {"type": "pong", "ref": "at"}, pong
        finally:
            c.abort()
        # one byte over, in one frame, and in two fragments
        for what, frames in [
            ("one frame", [ws_frame(OP_TEXT, ping_of(limit + 1, "one"))]),
            ("two fragments", [ws_frame(OP_TEXT, b"{" + b" " * 40000, fin=False),
                               ws_frame(OP_CONT, b" " * 30000 + b'"type":"ping"}', fin=True)]),
        ]:
            c = await RawWS.open(gw, "over")
            try:
                await c.recv_json()
                try:
                    await c.send_raw(b"".join(frames))
                except ConnectionError:
                    pass
                end = await c.wait_close(5)
            finally:
                c.abort()
            assert end.error is None, f"{what}: {end.error}; frames {end.json_messages()}"
            assert end.close_code == 1009, f"{what}: close code {end.close_code}, frames {end.json_messages()}"

    run_case(gw, body, what="messages over the frame limit")


def test_fragments(make_gateway):
    gw = make_gateway(workers=WORKERS)

    def fragmented(data: bytes, n: int) -> bytes:
        """data in n fragments (the last carries the rest)."""
        size = max(1, len(data) // n)
        chunks = [data[i * size:(i + 1) * size] for i in range(n - 1)]
        chunks.append(data[(n - 1) * size:])
        assert len(chunks) == n and all(chunks)
        out = [ws_frame(OP_TEXT if i == 0 else OP_CONT, ch, fin=(i == n - 1)) for i, ch in enumerate(chunks)]
        return b"".join(out)

    async def body(gw):
        # a few fragments, and exactly 1,000: reassembled
        for n in (5, 1000):
            c = await RawWS.open(gw, f"frag{n}")
            try:
                await c.recv_json()
                ref = f"f{n}"
                data = (f'{{"type":"ping","ref":"{ref}"}}' + " " * 1000).encode()
                await c.send_raw(fragmented(data, n))
                pong = await c.recv_json(5)
                assert pong == {"type": "pong", "ref": ref}, f"{n} fragments: {pong}"
            finally:
                c.abort()
        # 10,000 fragments of one byte: closed with 1009
        c = await RawWS.open(gw, "frag10k")
        try:
            await c.recv_json()
            data = b'{"type":"ping"}' + b" " * (10000 - 15)
            assert len(data) == 10000
            try:
                await c.send_raw(fragmented(data, 10000))
            except ConnectionError:
                pass
            end = await c.wait_close(5)
        finally:
            c.abort()
        assert end.error is None, f"10,000 fragments: {end.error}; frames {end.json_messages()}"
        assert end.close_code == 1009, f"10,000 fragments: close code {end.close_code}, frames {end.json_messages()}"
        assert not [m for m in end.json_messages() if isinstance(m, dict) and m.get("type") == "pong"], end.frames

    run_case(gw, body, what="fragmented messages")


# --------------------------------------------------------------------------- floods


async def _flood(ws, requests: list[dict], timeout: float = 15.0):
    """Send every request as fast as possible, then read to the close."""
    for r in requests:
        try:
            await send_json(ws, r)
        except Exception:  # noqa: BLE001 -- the server may close mid-flood
            break
    return await collect_until_close(ws, timeout)


def _check_flood(rec, n_sent: int, violations: int, ok_type: str, first_limited: int):
    """bye flood + 4001 after about `violations` rate_limited errors (with refs f<i>).

    Replies to requests the limiter let through may be cut off by the close (they wait
    for the bus, the rate_limited errors do not), so the successes are not required
    here; the first rate-limited request must come at least at index first_limited.
    """
    msgs = [m for m in rec.messages if isinstance(m, dict)]
    limited = [m for m in msgs if m.get("type") == "error" and m.get("code") == "rate_limited"]
    other_errors = [m for m in msgs if m.get("type") == "error" and m.get("code") != "rate_limited"]
    oks = [m for m in msgs if m.get("type") == ok_type]
    byes = [m for m in msgs if m.get("type") == "bye"]
    summary = (f"{len(oks)} {ok_type}, {len(limited)} rate_limited, other errors {other_errors[:3]}, "
               f"byes {byes}, close {rec.code}, last {msgs[-3:]}")
    assert rec.error is None, f"flood: {rec.error}; {summary}"
    assert not other_errors, summary
    assert limited, f"no rate_limited error in a flood of {n_sent}: {summary}"
    assert all(isinstance(m.get("ref"), str) and m["ref"].startswith("f") for m in limited), (
        f"rate_limited errors must echo the ref: {limited[:3]}"
    )
    limited_idx = sorted(int(m["ref"][1:]) for m in limited)
    assert limited_idx[0] >= first_limited, (
        f"request f{limited_idx[0]} was rate limited, within the burst (expected none before f{first_limited}): {summary}"
    )
    assert violations - 1 <= len(limited) <= violations, (
        f"bye flood expected after {violations} rate-limited requests: {summary}"
    )
    assert byes and msgs[-1] is byes[-1] and byes[-1].get("reason") == "flood", summary
    rm = byes[-1].get("retry_ms")
    assert isinstance(rm, int) and not isinstance(rm, bool) and rm >= 0, f"bye retry_ms: {byes[-1]}"
    assert rec.code == 4001, summary
    return oks, limited


def test_join_flood(make_gateway):
    # defaults: rate_per_s 10, burst 20, flood_violations 20
    gw = make_gateway(workers=WORKERS)

    async def body(gw):
        ws, hello = await connect_hello(gw, "joinflood")
        t0 = time.monotonic()
        reqs = [{"type": "join", "room": f"jf{i}", "ref": f"f{i}"} for i in range(500)]
        rec = await _flood(ws, reqs)
        elapsed = time.monotonic() - t0
        oks, _ = _check_flood(rec, 500, 20, "joined", first_limited=19)
        assert len(oks) <= 20 + 10 * elapsed + 1, f"{len(oks)} joins in {elapsed:.2f}s with burst 20, rate 10/s"
        return hello

    run_case(gw, body, what="a join flood")


def test_send_flood(make_gateway):
    gw = make_gateway(workers=WORKERS)

    async def body(gw):
        ws, _ = await connect_hello(gw, "sendflood")
        member, _ = await connect_hello(gw, "floodwatch")
        try:
            joined, _ = await join_room(ws, "sf")
            assert joined.get("type") == "joined", joined
            j2, _ = await join_room(member, "sf")
            assert j2.get("type") == "joined", j2
            t0 = time.monotonic()
            reqs = [{"type": "send", "room": "sf", "text": f"t{i}", "ref": f"f{i}"} for i in range(500)]
            rec = await _flood(ws, reqs)
            elapsed = time.monotonic() - t0
            acks, _ = _check_flood(rec, 500, 20, "ack", first_limited=18)
            # the room got a prefix of the flood (at least the acked sends, at most what the
            # burst allows), in order, and none of the refused
            limited_refs = {m["ref"] for m in rec.messages if isinstance(m, dict) and m.get("code") == "rate_limited"}
            seen = []
            while True:
                try:
                    m = await recv_json(member, 1.0)
                except asyncio.TimeoutError:
                    break
                if m.get("type") == "message":
                    seen.append(m)
            texts = [m["text"] for m in seen]
            acked_texts = [f"t{m['ref'][1:]}" for m in acks]
            assert texts == [f"t{i}" for i in range(len(texts))], f"member saw {texts[:40]}"
            assert texts[: len(acked_texts)] == acked_texts, f"member saw {texts[:30]}, acked {acked_texts[:30]}"
            assert len(texts) <= 19 + 10 * elapsed + 1, f"{len(texts)} of the flood posted in {elapsed:.2f}s (burst 20, rate 10/s)"
            refused = {f"t{r[1:]}" for r in limited_refs}
            assert not refused & set(texts), f"rate-limited sends were delivered: {sorted(refused & set(texts))[:5]}"
        finally:
            await close_all([ws, member])

    run_case(gw, body, what="a send flood")


# --------------------------------------------------------------------------- HTTP level


def test_plain_http_on_the_listener(make_gateway):
    gw = make_gateway(workers=WORKERS)

    async def body(gw):
        r = await asyncio.to_thread(raw_http, gw, f"GET /ws HTTP/1.1\r\nHost: {gw.host}\r\n\r\n".encode())
        assert r.status == 426, f"GET /ws without upgrade: {r.raw[:300]!r}"
        r = await asyncio.to_thread(raw_http, gw, f"GET /healthz HTTP/1.1\r\nHost: {gw.host}\r\nConnection: close\r\n\r\n".encode())
        assert r.status == 200 and r.body.strip() == b"ok", f"/healthz: {r.raw[:300]!r}"
        r = await asyncio.to_thread(raw_http, gw, f"GET /nope HTTP/1.1\r\nHost: {gw.host}\r\n\r\n".encode())
        assert r.status == 404, f"/nope: {r.raw[:300]!r}"

    run_case(gw, body, what="plain HTTP requests")


def test_bad_user_name_at_upgrade_is_400(make_gateway):
    gw = make_gateway(workers=WORKERS)

    async def body(gw):
        for user in ["a" * 33, "bad%20name", "bad%2Fname", "%C3%BCser", "bad!"]:
            r = await asyncio.to_thread(raw_http, gw, upgrade_request(gw, f"/ws?user={user}"))
            assert r.status == 400, f"user={user}: expected 400, got {r.status}; reply {r.raw[:300]!r}"
            assert b"bad_user" in r.body, f"user={user}: body {r.body[:300]!r}"
        ws, hello = await connect_hello(gw, "a" * 32)
        await close_all([ws])
        assert hello.get("user") == "a" * 32, hello
        ws, hello = await connect_hello(gw, "A.b-c_9")
        await close_all([ws])
        assert hello.get("user") == "A.b-c_9", hello

    run_case(gw, body, what="bad user names")


def test_truncated_handshakes(make_gateway):
    gw = make_gateway(workers=WORKERS)

    async def body(gw):
        req = upgrade_request(gw, "/ws?user=half")
        held = []
        try:
            for i in range(40):
                s = socket.create_connection((gw.host, gw.port), timeout=5)
                s.sendall(req[: len(req) // 2])
                if i % 2:
                    s.close()  # half a request, then gone
                else:
                    held.append(s)  # half a request, then silence
            await asyncio.sleep(0.3)
            res = await open_many(gw, 20, timeout=5, user_prefix="whole")
            try:
                assert not res.errors, f"connections failed beside truncated handshakes: {res.errors[:3]}"
                assert set(res.slots()) <= set(range(WORKERS))
                for ws in res.conns:
                    assert (await app_ping(ws, 3)).get("type") == "pong"
            finally:
                await close_all(res.conns)
        finally:
            for s in held:
                s.close()

    run_case(gw, body, what="truncated handshakes")


def test_silent_tcp_clients(make_gateway):
    gw = make_gateway(workers=WORKERS, env={"CHATGW_LIMITS_IDLE_PING_S": "1", "CHATGW_LIMITS_IDLE_TIMEOUT_S": "2"})

    async def body(gw):
        silent = []
        try:
            for _ in range(50):
                silent.append(socket.create_connection((gw.host, gw.port), timeout=5))
            await asyncio.sleep(0.5)
            t0 = time.monotonic()
            res = await open_many(gw, 20, timeout=5, user_prefix="talker")
            took = time.monotonic() - t0
            try:
                assert not res.errors, f"connections failed beside 50 silent ones: {res.errors[:3]}"
                assert took < 3, f"20 connections took {took:.2f}s beside 50 silent ones"
            finally:
                await close_all(res.conns)
        finally:
            for s in silent:
                s.close()

    run_case(gw, body, what="silent TCP clients")


# --------------------------------------------------------------------------- the relay's socket


# Relay frames are a u32 length, then a version byte (1), a type byte and the fields. Each
# kind of garbage, with what the relay must log about it.
RELAY_GARBAGE = {
    "length-over-maximum": (((64 << 20) + 1).to_bytes(4, "big") + b"\x01\x01",
                            "relay frame length 67108865 over the maximum of 67108864 bytes"),
    "unknown-frame-type": ((4).to_bytes(4, "big") + bytes([1, 99, 0, 0]), "unknown relay frame type 99"),
    "truncated-join": ((3).to_bytes(4, "big") + bytes([1, 2, 0]), "truncated relay frame"),
}


@pytest.mark.parametrize("kind", sorted(RELAY_GARBAGE))
def test_garbage_on_the_relay_socket_ends_only_that_link(make_gateway, kind):
    """Bytes that are no relay frames on the relay's Unix socket (which only the gateway's user
    can open): the relay closes that link and logs what was wrong, keeps its pid and its
    workers' links, and a message still goes from a member on one worker to one on the other."""
    gw = make_gateway(workers=WORKERS, env=FAST)
    garbage, named = RELAY_GARBAGE[kind]

    async def body(gw):
        relay = gw.relay_pid()
        mark = gw.log_mark()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(gw.state_dir / "relay.sock"))
            s.sendall(garbage)
            assert s.recv(4096) == b"", f"{kind}: the relay answered a link that sent garbage"
        line = gw.wait_for_log("worker link failed; closing it", timeout=5, since=mark)
        assert named in line.raw, line.raw
        placed = await one_per_slot(gw, range(WORKERS), user_prefix="member")
        conns = [ws for ws, _ in placed.values()]
        try:
            for ws in conns:
                reply, _ = await join_room(ws, "after-garbage")
                assert reply.get("type") == "joined", reply
            ack = await send_message(conns[0], "after-garbage", "still here")
            assert ack and ack.get("type") == "ack", ack
            got, _ = await recv_until(conns[1], lambda m: m.get("type") == "message" and m.get("text") == "still here")
            assert got["room"] == "after-garbage", got
        finally:
            await close_all(conns)
        assert gw.relay_pid() == relay, f"relay pid before {relay}, after {gw.relay_pid()}"

    run_case(gw, body, what=f"garbage on the relay socket ({kind})")
