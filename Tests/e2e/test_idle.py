"""Idle connections (docs/PROTOCOL.md): a connection quiet for `idle_ping_s` gets a WebSocket
ping; one quiet for `idle_timeout_s` is closed with 1001; one that answers stays.

Pings are spread: each connection is pinged up to a quarter of `idle_ping_s` (at most
10 s) early, by an offset of its own, so a crowd that joined together and never writes is
not pinged in one tick (that was a 200 ms stall for a whole worker every 30 s under load).
"""

from __future__ import annotations

import asyncio
import time

from chatgw_e2e.raw import OP_CLOSE, OP_PING, RawWS
from chatgw_e2e.ws import connect_hello, run_async

IDLE = {"CHATGW_LIMITS_IDLE_PING_S": "4", "CHATGW_LIMITS_IDLE_TIMEOUT_S": "7"}


def test_a_quiet_connection_is_pinged_then_closed_with_1001(make_gateway):
    gw = make_gateway(workers=1, env=IDLE)

    async def scenario():
        client = await RawWS.open(gw, "quiet")
        opened = time.monotonic()
        await client.recv_frame(timeout=5)  # hello
        fin, opcode, _ = await client.recv_frame(timeout=8)
        pinged = time.monotonic() - opened
        assert opcode == OP_PING, f"expected a ping, got opcode {opcode}"
        # Up to a quarter of idle_ping_s early, never late (plus the 250 ms sweep).
        assert 2.9 <= pinged <= 4.6, f"pinged after {pinged:.2f} s (idle_ping_s 4)"
        # No pong: closed with 1001 once idle_timeout_s has passed since the last frame.
        fin, opcode, payload = await client.recv_frame(timeout=8)
        closed = time.monotonic() - opened
        assert opcode == OP_CLOSE and int.from_bytes(payload[:2], "big") == 1001, (opcode, payload[:20])
        assert 6.9 <= closed <= 7.8, f"closed after {closed:.2f} s (idle_timeout_s 7)"
        client.abort()

    run_async(scenario(), timeout=30)


def test_a_connection_that_answers_pings_stays(make_gateway):
    gw = make_gateway(workers=1, env=IDLE)

    async def scenario():
        ws, hello = await connect_hello(gw, "answers")  # the websockets library answers pings
        await asyncio.sleep(10)
        assert ws.close_code is None, f"closed with {ws.close_code} although it answered pings"
        await ws.close()

    run_async(scenario(), timeout=30)


def test_pings_of_a_crowd_that_joined_together_are_spread(make_gateway):
    gw = make_gateway(workers=1, env=IDLE)

    async def scenario():
        clients = await asyncio.gather(*(RawWS.open(gw, f"crowd{i}") for i in range(150)))
        opened = time.monotonic()

        async def ping_time(client: RawWS) -> float:
            await client.recv_frame(timeout=5)  # hello
            fin, opcode, _ = await client.recv_frame(timeout=8)
            assert opcode == OP_PING, opcode
            return time.monotonic() - opened

        try:
            times = sorted(await asyncio.gather(*(ping_time(c) for c in clients)))
        finally:
            for c in clients:
                c.abort()
        spread = times[-1] - times[0]
        print(f"150 pings between {times[0]:.2f} and {times[-1]:.2f} s after opening")
        # Offsets are uniform over the last second before idle_ping_s: they land in
        # several sweeps, not one.
        assert spread >= 0.5, f"150 pings arrived within {spread * 1000:.0f} ms of each other"
        assert times[-1] <= 4.6, f"the last ping came {times[-1]:.2f} s after opening (idle_ping_s 4)"

    run_async(scenario(), timeout=40)
