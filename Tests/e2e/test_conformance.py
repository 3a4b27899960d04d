"""RFC 6455 behaviour of /ws itself (the Autobahn suite covers /echo, scripts/autobahn).

Each protocol violation on /ws gets the close code the RFC asks for, while another client
of the same worker keeps getting its room's messages; pings are answered in the middle of
a fragmented message; a client's close is answered and the server closes TCP, leaving no
half-open socket behind; frames that arrive in the same packet as the upgrade request are
answered at once, in one packet with the 101 when they fit; an upgrade asked with another
method than GET is refused; accepted sockets have TCP_NODELAY (Nagle would hold a small
frame for up to 40 ms behind an unacknowledged one).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
import socket
import subprocess

import pytest

from chatgw_e2e.raw import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RawWS,
    close_payload,
    raw_http,
    upgrade_request,
    ws_frame,
)
from chatgw_e2e.ws import connect_hello, join_room, recv_until, run_async, send_json

FAST = {"CHATGW_LIMITS_RATE_PER_S": "100000", "CHATGW_LIMITS_BURST": "100000"}

VIOLATIONS = {
    # name: (frame bytes, expected close code)
    "invalid UTF-8 text": (lambda: ws_frame(OP_TEXT, b'{"type":"ping","ref":"\xff\xfe"}'), 1007),
    "reserved opcode 0x3": (lambda: ws_frame(0x3, b"x"), 1002),
    "ping with 126 bytes": (lambda: ws_frame(OP_PING, b"p" * 126), 1002),
    "unmasked client frame": (lambda: ws_frame(OP_TEXT, b'{"type":"ping"}', mask=False), 1002),
    "close with code 1005": (lambda: ws_frame(OP_CLOSE, close_payload(1005)), 1002),
    "reserved bit set": (lambda: ws_frame(OP_TEXT, b'{"type":"ping"}', rsv=4), 1002),
}


@pytest.mark.parametrize("name", list(VIOLATIONS))
def test_violation_gets_the_rfc_close_code_and_others_keep_their_messages(make_gateway, name):
    gw = make_gateway(workers=1, env=FAST)
    frame, expected = VIOLATIONS[name]

    async def scenario():
        bystander, _ = await connect_hello(gw, "bystander")
        sender, _ = await connect_hello(gw, "sender")
        await join_room(bystander, "conf")
        await join_room(sender, "conf")

        offender = await RawWS.open(gw, "offender")
        await offender.recv_json()  # hello
        await offender.send_raw(frame())
        end = await offender.wait_close(timeout=5)
        assert end.close_code == expected, f"{name}: expected close {expected}, got {end.close_code} (eof={end.eof})"
        assert end.eof, f"{name}: the server must close the TCP connection after failing it"

        await send_json(sender, {"type": "send", "room": "conf", "text": f"after {name}", "ref": "a"})
        message, _ = await recv_until(bystander, lambda m: m.get("type") == "message", timeout=5)
        assert message["text"] == f"after {name}"
        await bystander.close()
        await sender.close()

    run_async(scenario(), timeout=30)


def test_pings_are_answered_while_a_fragmented_message_is_in_flight(make_gateway):
    gw = make_gateway(workers=1, env=FAST)

    async def scenario():
        client = await RawWS.open(gw, "frag")
        await client.recv_json()  # hello
        request = ('{"type":"ping","ref":"big","pad":"' + "x" * 30_000 + '"}').encode()
        parts = [request[:10_000], request[10_000:20_000], request[20_000:]]
        await client.send_raw(ws_frame(OP_TEXT, parts[0], fin=False))
        for index, payload in enumerate([b"p1", b"p2"]):
            await client.send_raw(ws_frame(OP_PING, payload))
            fin, opcode, data = await client.recv_frame(timeout=5)
            assert (opcode, data) == (OP_PONG, payload), f"pong {index} carried {data!r}"
            await client.send_raw(ws_frame(0x0, parts[index + 1], fin=index == 1))
        answer = await client.recv_json(timeout=5)
        assert answer == {"type": "pong", "ref": "big"}
        client.abort()

    run_async(scenario(), timeout=30)


def test_frames_in_the_same_packet_as_the_upgrade_are_answered(make_gateway):
    """A client may send its first frames right behind the request, before the 101: they
    are handed on to the WebSocket pipeline and answered without waiting for more input."""
    gw = make_gateway(workers=1, env=FAST)

    async def scenario():
        client = await RawWS.connect_tcp(gw)
        first = [ws_frame(OP_TEXT, '{"type":"ping","ref":"same-packet-%d"}' % i) for i in range(3)]
        await client.send_raw(upgrade_request(gw, "/ws?user=eager") + ws_frame(OP_PING, b"early") + b"".join(first))
        head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101"), head[:200]
        hello = await client.recv_json(timeout=5)
        assert hello["type"] == "hello", hello
        fin, opcode, data = await client.recv_frame(timeout=5)
        assert (opcode, data) == (OP_PONG, b"early")
        # Nothing else is sent: these must come without any further input from us.
        for i in range(3):
            assert await client.recv_json(timeout=3) == {"type": "pong", "ref": f"same-packet-{i}"}
        client.abort()

    run_async(scenario(), timeout=30)


def test_accepted_sockets_have_tcp_nodelay(make_gateway):
    gw = make_gateway(workers=1, env=FAST)
    client = socket.create_connection((gw.host, gw.port), timeout=5)
    try:
        client.sendall(upgrade_request(gw, "/ws?user=nodelay"))
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += client.recv(4096)
        assert reply.startswith(b"HTTP/1.1 101"), reply[:100]
        # The server's end of this connection, borrowed from the worker with pidfd_getfd(2).
        local_port = client.getsockname()[1]
        out = subprocess.run(["ss", "-tnpH", "state", "established", f"dport = :{local_port}"],
                             capture_output=True, text=True, timeout=10).stdout
        found = re.search(r"pid=(\d+),fd=(\d+)", out)
        assert found, f"no server socket for port {local_port} in ss: {out!r}"
        libc = ctypes.CDLL(None, use_errno=True)
        pidfd = libc.syscall(434, int(found.group(1)), 0)  # pidfd_open
        theirs = libc.syscall(438, pidfd, int(found.group(2)), 0) if pidfd >= 0 else -1  # pidfd_getfd
        if theirs < 0:
            pytest.skip(f"pidfd_getfd not permitted here (errno {ctypes.get_errno()})")
        borrowed = socket.socket(fileno=theirs)
        try:
            assert borrowed.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        finally:
            borrowed.detach()
            os.close(theirs)
            os.close(pidfd)
    finally:
        client.close()


def test_upgrade_with_another_method_than_get_is_refused(make_gateway):
    gw = make_gateway(workers=1, env=FAST)
    request = upgrade_request(gw, "/ws?user=poster").replace(b"GET ", b"POST ", 1)
    reply = raw_http(gw, request.replace(b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n", 1))
    assert reply.status == 426, reply.raw[:300]


def _half_open(port: int) -> list[str]:
    """Server-side sockets of the gateway's port left in CLOSE-WAIT or FIN-WAIT."""
    out = subprocess.run(["ss", "-tanH", "sport", "=", f":{port}"], capture_output=True, text=True, timeout=10).stdout
    return [line for line in out.splitlines() if line.split() and line.split()[0] in ("CLOSE-WAIT", "FIN-WAIT-1", "FIN-WAIT-2", "LAST-ACK")]


def test_client_close_is_answered_and_no_half_open_socket_remains(make_gateway):
    gw = make_gateway(workers=2, env=FAST)

    async def scenario():
        clients = []
        for i in range(20):
            c = await RawWS.open(gw, f"closer{i}")
            await c.recv_json()
            clients.append(c)
        for c in clients:
            await c.send_raw(ws_frame(OP_CLOSE, close_payload(1000, "bye")))
        for c in clients:
            end = await c.wait_close(timeout=5)
            assert end.close_code == 1000, f"the server must echo the close code, got {end.close_code}"
            assert end.eof, "the server must close TCP after the close handshake"
            c.abort()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while _half_open(gw.port) and loop.time() < deadline:
            await asyncio.sleep(0.1)
        assert not _half_open(gw.port), f"half-open sockets left: {_half_open(gw.port)}"

    run_async(scenario(), timeout=40)
