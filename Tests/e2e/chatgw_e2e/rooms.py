"""Room traffic: ``Inbox`` (a background reader of one connection), waiting on many of
them, sending and reading in bulk, and the checks of a room's fan-out.

Shared by test_rooms.py, test_redis_bus.py, test_archive.py and test_operations.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any, Callable

from websockets.exceptions import ConnectionClosed

from chatgw_e2e.ws import join_room, recv_json, send_json


def first_lines(items, n: int = 5) -> str:
    """The first n items, one a line (for assertion messages)."""
    return "\n".join(str(x) for x in list(items)[:n])


class Inbox:
    """Reads every frame of one connection in the background (JSON, with loop time).

    ``msgs`` and ``times`` are the frames and when they came, ``counts`` the frames per
    type. Once the connection ended, ``ended`` is true, ``closed`` is the
    ``ConnectionClosed`` (True after a clean end), ``error`` any other exception,
    ``closed_code`` the server's close code (None when no close frame came) and
    ``closed_at`` the loop time. ``done`` is also true after ``stop()``.
    """

    def __init__(self, ws, name: str = ""):
        self.ws, self.name = ws, name
        self.msgs: list[dict] = []
        self.times: list[float] = []
        self.counts: Counter = Counter()  # frames per type
        self.closed: ConnectionClosed | bool | None = None
        self.error: str | None = None
        self.ended = False
        self.closed_code: int | None = None
        self.closed_at: float | None = None
        self._task = asyncio.create_task(self._run())

    async def _run(self):
        loop = asyncio.get_running_loop()
        try:
            async for raw in self.ws:
                self.times.append(loop.time())
                m = json.loads(raw) if isinstance(raw, str) else {"type": "<binary>", "raw": raw}
                self.msgs.append(m)
                self.counts[m.get("type")] += 1
        except ConnectionClosed as e:
            self.closed = e
        except Exception as e:  # noqa: BLE001
            self.error = f"{type(e).__name__}: {e}"
        else:
            self.closed = True
        self.ended = True
        self.closed_at = loop.time()
        rcvd = getattr(getattr(self.ws, "protocol", None), "close_rcvd", None)
        self.closed_code = rcvd.code if rcvd is not None else None

    @property
    def done(self) -> bool:
        return self._task.done()

    def end_text(self) -> str:
        """How the connection ended: close code, then the ConnectionClosed or the error."""
        return f"code {self.closed_code}, {self.closed or self.error}"

    def of(self, type_: str, room: str | None = None) -> list[dict]:
        return [m for m in self.msgs if m.get("type") == type_ and (room is None or m.get("room") == room)]

    async def wait(self, pred: Callable[["Inbox"], bool], timeout: float, what: str = "condition") -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not pred(self):
            if loop.time() >= deadline:
                raise AssertionError(f"{self.name}: no {what} within {timeout}s; last frames {self.msgs[-5:]}")
            if self.done and not pred(self):
                raise AssertionError(f"{self.name}: connection ended ({self.end_text()}) before {what}; "
                                     f"last frames {self.msgs[-5:]}")
            await asyncio.sleep(0.01)

    async def wait_end(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def stop(self):
        self._task.cancel()


async def wait_all(inboxes, pred, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        pending = [ib for ib in inboxes if not pred(ib)]
        if not pending:
            return
        dead = [ib for ib in pending if ib.done]
        if dead:
            ib = dead[0]
            raise AssertionError(f"{len(dead)} connections ended before {what}, e.g. {ib.name}: "
                                 f"{ib.end_text()}; last frames {ib.msgs[-3:]}")
        if loop.time() >= deadline:
            ib = pending[0]
            raise AssertionError(f"{len(pending)} of {len(inboxes)} connections without {what} after {timeout}s; "
                                 f"e.g. {ib.name} has {len(ib.msgs)} frames, last {ib.msgs[-3:]}")
        await asyncio.sleep(0.02)


async def read_frames(ws, n: int, timeout: float = 5.0) -> list[dict]:
    """Exactly the next n frames."""
    out = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(out) < n:
        left = deadline - loop.time()
        if left <= 0:
            raise AssertionError(f"got {len(out)} of {n} frames in {timeout}s; last {out[-3:]}")
        out.append(await recv_json(ws, left))
    return out


async def assert_quiet_until_pong(ws, what: str, timeout: float = 5.0) -> None:
    """Ping; the very next frame must be the pong (nothing else was pending)."""
    ref = f"q{time.monotonic_ns()}"
    await send_json(ws, {"type": "ping", "ref": ref})
    msg = await recv_json(ws, timeout)
    assert msg == {"type": "pong", "ref": ref}, f"{what}: expected only the pong, got {msg}"


async def send_many(ws, room: str, texts: list[str], ref_prefix: str, timeout: float = 15.0) -> list[dict]:
    """Send each text with a ref; read until every ack; return the sender's frames."""
    for i, t in enumerate(texts):
        await send_json(ws, {"type": "send", "room": room, "text": t, "ref": f"{ref_prefix}{i}"})
    want = {f"{ref_prefix}{i}" for i in range(len(texts))}
    frames = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while want:
        left = deadline - loop.time()
        if left <= 0:
            raise AssertionError(f"{len(want)} of {len(texts)} sends without ack after {timeout}s; last {frames[-3:]}")
        m = await recv_json(ws, left)
        frames.append(m)
        if m.get("type") == "error" and m.get("ref") in want:
            raise AssertionError(f"send refused: {m}")
        if m.get("type") == "ack":
            want.discard(m.get("ref"))
    return frames


def check_consecutive(seqs: list[int], what: str) -> None:
    bad = [(a, b) for a, b in zip(seqs, seqs[1:]) if b != a + 1]
    assert not bad, f"{what}: seq not rising by 1 at {bad[:5]} (of {len(seqs)} messages)"


async def join_all_then_last(conns: list[Any], names: list[str], room: str, timeout: float,
                             context: str = "") -> tuple[set, int]:
    """All but the last of conns join room at once (each within timeout), then the last one.

    Every reply must be `joined` with no frame before it, the last one must count every
    connection as a member (``context`` is added to that message), and all replies must
    name one epoch and one seq. Returns ({epoch}, seq).
    """
    replies = await asyncio.gather(*(join_room(ws, room, timeout=timeout) for ws in conns[:-1]))
    for (reply, before), name in zip(replies, names):
        assert reply.get("type") == "joined", f"{name}: {reply}"
        assert not before, f"{name}: frames before joined: {before}"
    last, _ = await join_room(conns[-1], room)
    assert last.get("type") == "joined", last
    assert last.get("members") == len(conns), (
        f"joined.members of the last joiner ({names[-1]}): {last.get('members')}, expected {len(conns)} ({context})"
    )
    epochs = {r.get("epoch") for r, _ in replies} | {last.get("epoch")}
    assert len(epochs) == 1, f"joined epochs differ: {epochs}"
    start_seq = last["seq"]
    assert all(r["seq"] == start_seq for r, _ in replies), {r["seq"] for r, _ in replies}
    return epochs, start_seq


async def send_numbered(ws, room: str, user: str, n: int) -> None:
    """Send `user:k` with ref `user-k` for k in 0..n-1, without reading."""
    for k in range(n):
        await send_json(ws, {"type": "send", "room": room, "text": f"{user}:{k}", "ref": f"{user}-{k}"})


def check_fanout(inboxes: list[Inbox], room: str, users: list[str], senders: list[int], per_sender: int,
                 total: int, start_seq: int, epochs: set, check_from: bool = False) -> None:
    """After ``send_numbered`` from each of senders (indexes into inboxes and users):

    every inbox holds exactly the total messages, no error, seqs consecutive from
    start_seq + 1 in epochs, the same order everywhere and each sender's in the order
    sent (with check_from: `from` is the sender named in the text); every sender got
    per_sender acks, each after its own message and with its seq.
    """
    expected_texts = {f"{users[i]}:{k}" for i in senders for k in range(per_sender)}
    reference = None
    for ib in inboxes:
        errors = ib.of("error")
        assert not errors, f"{ib.name}: errors {errors[:3]}"
        msgs = ib.of("message", room)
        assert len(msgs) == total, f"{ib.name}: {len(msgs)} messages, expected {total}"
        seqs = [m["seq"] for m in msgs]
        check_consecutive(seqs, ib.name)
        assert seqs[0] == start_seq + 1, f"{ib.name}: first seq {seqs[0]}, joined.seq was {start_seq}"
        assert {m["epoch"] for m in msgs} == epochs, f"{ib.name}: epochs {set(m['epoch'] for m in msgs)}"
        texts = [m["text"] for m in msgs]
        assert set(texts) == expected_texts and len(set(texts)) == total, f"{ib.name}: texts differ"
        seq_list = [(m["seq"], m["from"], m["text"]) for m in msgs]
        if reference is None:
            reference = (ib.name, seq_list)
        else:
            diff = next((x for x in zip(seq_list, reference[1]) if x[0] != x[1]), None)
            assert seq_list == reference[1], f"{ib.name}: order differs from {reference[0]}: first difference {diff}"
        if check_from:
            bad_from = [m for m in msgs if m["text"].split(":")[0] != m["from"]]
            assert not bad_from, f"{ib.name}: from does not match the sender: {bad_from[:3]}"
        # per sender, its messages arrive in the order sent
        per = {}
        for m in msgs:
            per.setdefault(m["from"], []).append(int(m["text"].split(":")[1]))
        assert all(v == list(range(per_sender)) for v in per.values()), f"{ib.name}: per-sender order broken"

    for i in senders:
        ib, u = inboxes[i], users[i]
        acks = ib.of("ack")
        assert len(acks) == per_sender, f"{ib.name}: {len(acks)} acks"
        index_of_msg = {m["text"]: (j, m) for j, m in enumerate(ib.msgs) if m.get("type") == "message"}
        for j, ack in enumerate(ib.msgs):
            if ack.get("type") != "ack":
                continue
            k = int(ack["ref"].split("-")[-1])
            mj, m = index_of_msg[f"{u}:{k}"]
            assert mj < j, f"{ib.name}: ack {ack} arrived before its message {m}"
            assert ack.get("seq") == m["seq"] and ack.get("room") == room, f"{ib.name}: ack {ack} for message {m}"
