"""Frame level: a hand-written RFC 6455 client on raw sockets, for what the websockets
library will not do (invalid UTF-8, thousands of fragments, a client that never reads,
half a handshake), and raw HTTP requests (plain HTTP on /ws, the API, header limits).

Added for test_rooms.py / test_bad_input.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable

from chatgw_e2e.gateway import Gateway

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def ws_frame(opcode: int, payload: bytes | str = b"", fin: bool = True, mask: bool = True,
             rsv: int = 0) -> bytes:
    """Encode one WebSocket frame (client frames are masked, as RFC 6455 requires)."""
    if isinstance(payload, str):
        payload = payload.encode()
    head = bytearray([(0x80 if fin else 0) | ((rsv & 7) << 4) | (opcode & 0x0F)])
    n = len(payload)
    mbit = 0x80 if mask else 0
    if n < 126:
        head.append(mbit | n)
    elif n < 1 << 16:
        head.append(mbit | 126)
        head += n.to_bytes(2, "big")
    else:
        head.append(mbit | 127)
        head += n.to_bytes(8, "big")
    if not mask:
        return bytes(head) + payload
    key = os.urandom(4)
    if n:
        # XOR with the repeated key, fast for big payloads
        k = (key * (n // 4 + 1))[:n]
        payload = (int.from_bytes(payload, "little") ^ int.from_bytes(k, "little")).to_bytes(n, "little")
    return bytes(head) + key + payload


def close_payload(code: int, reason: str = "") -> bytes:
    return code.to_bytes(2, "big") + reason.encode()


def upgrade_request(gw: "Gateway", path: str = "/ws", headers: dict | None = None,
                    subprotocol: bool = True) -> bytes:
    """The bytes of a WebSocket upgrade request for path."""
    import base64

    h = {
        "Host": f"{gw.host}:{gw.port}",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
    }
    if subprotocol:
        h["Sec-WebSocket-Protocol"] = "chatgw.v1"
    h.update(headers or {})
    lines = [f"GET {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in h.items() if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class HTTPReply:
    status: int | None  # None: no status line before the connection ended / timed out
    headers: dict[str, str]  # lower-cased names
    body: bytes
    raw: bytes


def _parse_http_reply(data: bytes) -> HTTPReply:
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return HTTPReply(None, {}, b"", data)
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        status = None
    headers = {}
    for l in lines[1:]:
        k, _, v = l.partition(":")
        headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        try:
            rest = rest[: int(headers["content-length"])]
        except ValueError:
            pass
    return HTTPReply(status, headers, rest, data)


def raw_http(gw: "Gateway", request: bytes, timeout: float = 5.0, read_body: bool = True) -> HTTPReply:
    """Send request bytes on a fresh TCP connection, read the HTTP reply (blocking).

    Reads until the header block and Content-Length bytes of body are in (or EOF, or
    timeout). With read_body=False stops after the header block (e.g. a 101 reply).
    """
    deadline = time.monotonic() + timeout
    with socket.create_connection((gw.host, gw.port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            data += chunk
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                if not read_body:
                    break
                m = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
                if m and len(rest) >= int(m.group(1)):
                    break
                if not m and re.match(rb"HTTP/1\.1 (101|1\d\d|204|304)", head):
                    break
        return _parse_http_reply(data)


class RawClosed(Exception):
    """The server sent a close frame (code None: no code) or the TCP connection ended."""

    def __init__(self, code: int | None, reason: str = "", eof: bool = False):
        super().__init__(f"closed code={code} reason={reason!r} eof={eof}")
        self.code, self.reason, self.eof = code, reason, eof


@dataclass
class RawEnd:
    """How a RawWS ended (see RawWS.wait_close)."""

    frames: list[tuple[int, bytes]]  # (opcode, payload) of the data frames read before the end
    close_code: int | None  # code of the server's close frame (None: none seen / no code)
    close_reason: str | None
    eof: bool  # the TCP connection ended (EOF or reset)
    error: str | None = None  # timeout: still open

    def json_messages(self) -> list[Any]:
        out = []
        for op, p in self.frames:
            if op == OP_TEXT:
                try:
                    out.append(json.loads(p))
                except ValueError:
                    out.append(p)
            else:
                out.append(p)
        return out


class RawWS:
    """A minimal asyncio WebSocket client on a raw TCP stream (frame-level tests).

    ``await RawWS.open(gw, "alice")`` does the handshake (asserting 101) and returns
    the client; ``hello`` is not read. ``recv_frame`` returns (fin, opcode, payload)
    of the next frame, ``recv_json`` the next text message as JSON (answering pings,
    reassembling fragments), ``wait_close`` reads to the end. ``rcvbuf`` sets
    SO_RCVBUF before connecting and ``limit`` the asyncio reader's buffer, so a
    client that stops reading makes the server see backpressure quickly.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.handshake: HTTPReply | None = None
        self._buf = bytearray()
        self._eof = False

    @classmethod
    async def connect_tcp(cls, gw: "Gateway", timeout: float = 5.0, rcvbuf: int | None = None,
                          limit: int = 2 ** 16) -> "RawWS":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (gw.host, gw.port)), timeout)
            reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
        except BaseException:
            sock.close()
            raise
        return cls(reader, writer)

    @classmethod
    async def open(cls, gw: "Gateway", user: str | None = None, *, path: str | None = None,
                   timeout: float = 5.0, rcvbuf: int | None = None, limit: int = 2 ** 16,
                   headers: dict | None = None) -> "RawWS":
        if path is None:
            path = "/ws" if user is None else f"/ws?user={user}"
        c = await cls.connect_tcp(gw, timeout, rcvbuf, limit)
        try:
            c.writer.write(upgrade_request(gw, path, headers))
            await c.writer.drain()
            head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), timeout)
            c.handshake = _parse_http_reply(head)
            if c.handshake.status != 101:
                raise AssertionError(f"upgrade refused: {head[:300]!r}")
        except BaseException:
            c.abort()
            raise
        return c

    # -- writing
    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_frame(self, opcode: int, payload: bytes | str = b"", fin: bool = True,
                         mask: bool = True) -> None:
        await self.send_raw(ws_frame(opcode, payload, fin, mask))

    async def send_text(self, payload: bytes | str) -> None:
        await self.send_frame(OP_TEXT, payload)

    async def send_json(self, obj: dict) -> None:
        await self.send_text(json.dumps(obj, separators=(",", ":")))

    # -- reading
    async def recv_frame(self, timeout: float = 5.0) -> tuple[bool, int, bytes]:
        """Next frame: (fin, opcode, payload). Raises RawClosed(eof=True) at EOF/reset.

        Bytes are buffered in the client, so a timeout never loses part of a frame.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            f = self._take_frame()
            if f is not None:
                return f
            if self._eof:
                raise RawClosed(None, "EOF", eof=True)
            left = deadline - loop.time()
            if left <= 0:
                raise asyncio.TimeoutError(f"no complete frame within {timeout}s")
            try:
                chunk = await asyncio.wait_for(self.reader.read(1 << 16), left)
            except asyncio.TimeoutError:
                continue
            except ConnectionError:
                chunk = b""
            if not chunk:
                self._eof = True
            self._buf += chunk

    def _take_frame(self) -> tuple[bool, int, bytes] | None:
        b = self._buf
        if len(b) < 2:
            return None
        b0, b1 = b[0], b[1]
        n = b1 & 0x7F
        i = 2
        if n == 126:
            if len(b) < 4:
                return None
            n, i = int.from_bytes(b[2:4], "big"), 4
        elif n == 127:
            if len(b) < 10:
                return None
            n, i = int.from_bytes(b[2:10], "big"), 10
        key = None
        if b1 & 0x80:
            if len(b) < i + 4:
                return None
            key, i = bytes(b[i:i + 4]), i + 4
        if len(b) < i + n:
            return None
        payload = bytes(b[i:i + n])
        del b[:i + n]
        if key:
            payload = bytes(x ^ key[j % 4] for j, x in enumerate(payload))
        return bool(b0 & 0x80), b0 & 0x0F, payload

    async def recv_message(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """Next data message (opcode, payload), reassembled; pings answered.

        A close frame raises RawClosed(code, reason) (after echoing the close).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        parts: list[bytes] = []
        first_op = None
        while True:
            fin, op, payload = await self.recv_frame(max(0.01, deadline - loop.time()))
            if op == OP_PING:
                try:
                    await self.send_frame(OP_PONG, payload)
                except ConnectionError:
                    pass
                continue
            if op == OP_PONG:
                continue
            if op == OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                try:
                    await self.send_frame(OP_CLOSE, payload[:2])
                except ConnectionError:
                    pass
                raise RawClosed(code, payload[2:].decode(errors="replace"))
            if first_op is None:
                first_op = op
            parts.append(payload)
            if fin:
                return first_op, b"".join(parts)

    async def recv_json(self, timeout: float = 5.0) -> dict:
        op, payload = await self.recv_message(timeout)
        if op != OP_TEXT:
            raise AssertionError(f"expected a text message, got opcode {op}: {payload[:80]!r}")
        return json.loads(payload)

    async def recv_json_until(self, pred: Callable[[dict], bool], timeout: float = 5.0) -> tuple[dict, list[dict]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        skipped = []
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise asyncio.TimeoutError(f"no matching message within {timeout}s; got {skipped[-5:]}")
            m = await self.recv_json(left)
            if pred(m):
                return m, skipped
            skipped.append(m)

    async def wait_close(self, timeout: float = 5.0) -> RawEnd:
        """Read everything until the server's close frame or the end of the TCP stream."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        frames: list[tuple[int, bytes]] = []
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return RawEnd(frames, None, None, False, f"still open after {timeout}s")
            try:
                op, payload = await self.recv_message(left)
            except RawClosed as e:
                if e.eof:
                    return RawEnd(frames, None, None, True)
                # close frame: wait (briefly) for the TCP end as well
                eof = False
                try:
                    while True:
                        await self.recv_frame(min(1.0, max(0.01, deadline - loop.time())))
                except RawClosed:
                    eof = True
                except asyncio.TimeoutError:
                    pass
                return RawEnd(frames, e.code, e.reason, eof)
            except asyncio.TimeoutError:
                continue
            frames.append((op, payload))

    def abort(self) -> None:
        try:
            self.writer.transport.abort()
        except Exception:  # noqa: BLE001
            pass
