"""WebSocket clients on ``websockets.asyncio.client``, with a timeout on every step, and
the protocol's requests (docs/PROTOCOL.md): join, send, ping."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable

from websockets.asyncio.client import connect as _ws_connect
from websockets.exceptions import ConnectionClosed

from chatgw_e2e.gateway import Gateway

CONN_RE = re.compile(r"^w([0-9]+)-")


def run_async(coro: Awaitable[Any], timeout: float = 55.0) -> Any:
    """asyncio.run with an overall timeout, so a test cannot hang."""

    async def main():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(main())


async def ws_connect(gw: Gateway, user: str | None = None, *, timeout: float = 10.0,
                     subprotocol: bool = True, path: str | None = None, **kw):
    """Open a WebSocket to gw (``/ws?user=...``); returns the connection (no frame read)."""
    if path is None:
        path = "/ws" if user is None else f"/ws?user={user}"
    opts = dict(
        open_timeout=timeout,
        close_timeout=2,
        ping_interval=None,
        compression=None,
        proxy=None,
        max_size=None,
        subprotocols=["chatgw.v1"] if subprotocol else None,
    )
    opts.update(kw)
    return await asyncio.wait_for(_ws_connect(gw.url + path, **opts), timeout + 1)


async def recv_json(ws, timeout: float = 5.0) -> dict:
    """Next text frame as JSON (raises TimeoutError / ConnectionClosed)."""
    raw = await asyncio.wait_for(ws.recv(), timeout)
    if isinstance(raw, bytes):
        raise AssertionError(f"expected a text frame, got binary {raw[:80]!r}")
    return json.loads(raw)


async def recv_until(ws, pred: Callable[[dict], bool], timeout: float = 5.0) -> tuple[dict, list[dict]]:
    """Receive until pred(msg); return (that message, the messages before it)."""
    deadline = asyncio.get_running_loop().time() + timeout
    skipped = []
    while True:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise asyncio.TimeoutError(f"no matching message within {timeout}s; got {skipped[-5:]}")
        msg = await recv_json(ws, left)
        if pred(msg):
            return msg, skipped
        skipped.append(msg)


def conn_slot(hello: dict) -> int | None:
    m = CONN_RE.match(str(hello.get("conn", "")))
    return int(m.group(1)) if m else None


async def connect_hello(gw: Gateway, user: str, timeout: float = 10.0, **kw):
    """Connect and read the `hello`; returns (ws, hello). Closes ws if hello is missing."""
    ws = await ws_connect(gw, user, timeout=timeout, **kw)
    try:
        hello = await recv_json(ws, timeout)
    except BaseException:
        await abort(ws)
        raise
    return ws, hello


async def abort(ws) -> None:
    try:
        ws.transport.abort()
    except Exception:
        pass


@dataclass
class OpenResult:
    conns: list[Any]  # websocket connections, parallel to hellos
    hellos: list[dict]
    errors: list[str]  # one line per failed connection

    def slots(self) -> list[int | None]:
        return [conn_slot(h) for h in self.hellos]

    def by_slot(self) -> dict[int | None, list[Any]]:
        out: dict[int | None, list[Any]] = {}
        for ws, h in zip(self.conns, self.hellos):
            out.setdefault(conn_slot(h), []).append(ws)
        return out


async def open_many(gw: Gateway, n: int, *, concurrency: int = 200, timeout: float = 10.0,
                    user_prefix: str = "u", **kw) -> OpenResult:
    """Open n connections (bounded concurrency), read each one's hello.

    Failures don't raise: they are listed in ``errors`` (the connection is dropped).
    Connections come back in the order they were requested, failures left out.
    """
    sem = asyncio.Semaphore(concurrency)
    results: list[Any] = [None] * n

    async def one(i: int):
        async with sem:
            try:
                results[i] = await connect_hello(gw, f"{user_prefix}{i}", timeout=timeout, **kw)
            except Exception as e:  # noqa: BLE001 -- report, don't raise
                results[i] = f"#{i}: {type(e).__name__}: {e}"

    await asyncio.gather(*(one(i) for i in range(n)))
    res = OpenResult([], [], [])
    for r in results:
        if isinstance(r, tuple):
            res.conns.append(r[0])
            res.hellos.append(r[1])
        else:
            res.errors.append(str(r))
    return res


async def close_all(conns: Iterable[Any], timeout: float = 5.0, concurrency: int = 200) -> None:
    """Close connections politely (bounded), then abort whatever did not finish."""
    conns = list(conns)
    sem = asyncio.Semaphore(concurrency)

    async def one(ws):
        async with sem:
            try:
                await asyncio.wait_for(ws.close(), 2)
            except Exception:  # noqa: BLE001
                await abort(ws)

    try:
        await asyncio.wait_for(asyncio.gather(*(one(ws) for ws in conns)), timeout)
    except asyncio.TimeoutError:
        pass
    for ws in conns:
        await abort(ws)


@dataclass
class CloseRecord:
    messages: list[Any]  # parsed JSON text frames (raw bytes for binary frames)
    code: int | None  # close code received from the server (None: no close frame)
    reason: str | None
    closed_at: float | None  # loop time when the connection was seen closed
    error: str | None = None  # timeout or unexpected exception


async def collect_until_close(ws, timeout: float = 15.0) -> CloseRecord:
    """Read every frame until the connection closes (or timeout)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    msgs: list[Any] = []
    while True:
        left = deadline - loop.time()
        if left <= 0:
            await abort(ws)
            return CloseRecord(msgs, None, None, None, f"not closed within {timeout}s")
        try:
            raw = await asyncio.wait_for(ws.recv(), left)
        except ConnectionClosed as e:
            rcvd = e.rcvd
            return CloseRecord(msgs, rcvd.code if rcvd else None, rcvd.reason if rcvd else None, loop.time())
        except asyncio.TimeoutError:
            continue
        except Exception as e:  # noqa: BLE001
            return CloseRecord(msgs, None, None, loop.time(), f"{type(e).__name__}: {e}")
        if isinstance(raw, bytes):
            msgs.append(raw)
        else:
            try:
                msgs.append(json.loads(raw))
            except ValueError:
                msgs.append(raw)


def check_shutdown_bye(rec: CloseRecord, reason: str = "shutdown", code: int = 1001) -> str | None:
    """None if rec ends with bye(reason, integer retry_ms) then close code; else why not."""
    if rec.error:
        return rec.error
    byes = [m for m in rec.messages if isinstance(m, dict) and m.get("type") == "bye"]
    if not byes:
        return f"no bye (messages: {rec.messages[-3:]}, close code {rec.code})"
    bye = byes[-1]
    if rec.messages[-1] is not bye:
        return f"bye is not the last message: {rec.messages[-3:]}"
    if bye.get("reason") != reason:
        return f"bye reason {bye.get('reason')!r} != {reason!r}"
    rm = bye.get("retry_ms")
    if not isinstance(rm, int) or isinstance(rm, bool) or rm < 0:
        return f"bye retry_ms not a non-negative integer: {rm!r}"
    if rec.code != code:
        return f"close code {rec.code} != {code}"
    return None


async def ping_ok(ws, timeout: float = 2.0) -> bool:
    """Send a WebSocket ping and wait for its pong."""
    try:
        waiter = await asyncio.wait_for(ws.ping(), timeout)
        await asyncio.wait_for(waiter, timeout)
        return True
    except (asyncio.TimeoutError, ConnectionClosed):
        return False


# ---- protocol helpers (rooms etc.)

_ref_counter = 0


def next_ref(prefix: str = "r") -> str:
    global _ref_counter
    _ref_counter += 1
    return f"{prefix}{_ref_counter}"


async def send_json(ws, obj: dict) -> None:
    await ws.send(json.dumps(obj, separators=(",", ":")))


async def join_room(ws, room: str, timeout: float = 5.0, **fields) -> tuple[dict, list[dict]]:
    """Send join, wait for `joined` (or an `error` for it); returns (reply, earlier msgs)."""
    ref = fields.pop("ref", None) or next_ref("j")
    await send_json(ws, {"type": "join", "room": room, "ref": ref, **fields})
    return await recv_until(
        ws,
        lambda m: (m.get("type") == "joined" and m.get("room") == room)
        or (m.get("type") == "error" and m.get("ref") == ref),
        timeout,
    )


async def connect_joined(room: str, *members: tuple[Gateway, str]) -> list:
    """A connection per (gateway, user), in order, each joined to room (all closed again if
    one fails)."""
    conns = []
    try:
        for gw, user in members:
            ws, _ = await connect_hello(gw, user)
            conns.append(ws)
            reply, _ = await join_room(ws, room)
            assert reply.get("type") == "joined", reply
    except BaseException:
        await close_all(conns)
        raise
    return conns


async def send_message(ws, room: str, text: str, ref: str | None = None, wait_ack: bool = True,
                       timeout: float = 5.0) -> dict | None:
    """Send `send`; with wait_ack, return the `ack` (or `error`) for its ref."""
    ref = ref or next_ref("s")
    await send_json(ws, {"type": "send", "room": room, "text": text, "ref": ref})
    if not wait_ack:
        return None
    msg, _ = await recv_until(
        ws, lambda m: m.get("ref") == ref and m.get("type") in ("ack", "error"), timeout
    )
    return msg


async def app_ping(ws, timeout: float = 5.0) -> dict:
    """Application-level ping -> pong with the same ref."""
    ref = next_ref("p")
    await send_json(ws, {"type": "ping", "ref": ref})
    msg, _ = await recv_until(ws, lambda m: m.get("type") == "pong" and m.get("ref") == ref, timeout)
    return msg
