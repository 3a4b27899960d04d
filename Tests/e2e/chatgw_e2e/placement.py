"""Placement: connections on given worker slots, and waiting until the bus is up on
every slot."""

from __future__ import annotations

import asyncio
from typing import Any, Iterable

from chatgw_e2e.gateway import Gateway
from chatgw_e2e.ws import close_all, conn_slot, connect_hello, join_room, recv_until, send_json


async def connect_on_slot(gw: "Gateway", slot: int, user_prefix: str = "s", tries: int = 60,
                          timeout: float = 5.0, **kw):
    """Connect until a connection lands on worker slot; returns (ws, hello).

    Connections that land elsewhere are closed. Raises AssertionError after tries.
    """
    seen = []
    for i in range(tries):
        ws, hello = await connect_hello(gw, f"{user_prefix}{i}", timeout=timeout, **kw)
        s = conn_slot(hello)
        if s == slot:
            return ws, hello
        seen.append(s)
        await close_all([ws])
    raise AssertionError(f"no connection landed on slot {slot} in {tries} tries (got slots {seen})")


async def one_per_slot(gw: "Gateway", slots: Iterable[int], user_prefix: str = "w", tries: int = 80,
                       timeout: float = 5.0, **kw) -> dict[int, tuple[Any, dict]]:
    """One connection on each of the given worker slots: {slot: (ws, hello)}."""
    want = set(slots)
    got: dict[int, tuple[Any, dict]] = {}
    extra = []
    for i in range(tries):
        if want <= set(got):
            break
        ws, hello = await connect_hello(gw, f"{user_prefix}{i}", timeout=timeout, **kw)
        s = conn_slot(hello)
        if s in want and s not in got:
            got[s] = (ws, hello)
        else:
            extra.append(ws)
    await close_all(extra)
    if not want <= set(got):
        await close_all([ws for ws, _ in got.values()])
        raise AssertionError(f"could not place a connection on every slot of {sorted(want)} (got {sorted(got)})")
    return got


def room_msgs(msgs: Iterable[Any], room: str, types: Iterable[str] = ("message",)) -> list[dict]:
    """The frames of the given types for room, in order."""
    types = set(types)
    return [m for m in msgs if isinstance(m, dict) and m.get("type") in types and m.get("room") == room]


async def wait_bus_ready(gw: "Gateway", slots: Iterable[int] | None = None, timeout: float = 5.0,
                         room: str = "e2e-bus-probe") -> dict[int, float]:
    """Wait until a join succeeds on every worker slot (the bus link is up there).

    A worker may report ready before its relay link is up; joins then get
    `unavailable`. Returns {slot: seconds waited}. Raises AssertionError on timeout.
    """
    slots = list(range(gw.workers)) if slots is None else list(slots)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    placed = await one_per_slot(gw, slots, user_prefix="probe", timeout=timeout)
    waited: dict[int, float] = {}
    try:
        for slot, (ws, _) in placed.items():
            last = None
            while True:
                reply, _ = await join_room(ws, room, timeout=timeout)
                if reply.get("type") == "joined":
                    await send_json(ws, {"type": "leave", "room": room})
                    await recv_until(ws, lambda m: m.get("type") in ("left", "error"), timeout)
                    waited[slot] = loop.time() - t0
                    break
                last = reply
                if loop.time() - t0 > timeout:
                    raise AssertionError(f"slot {slot}: joins still refused after {timeout}s: {last}")
                # (a refused join may cost a rate token: don't turn the probe into a flood)
                await asyncio.sleep(1.1 if reply.get("code") == "rate_limited" else 0.1)
    finally:
        await close_all([ws for ws, _ in placed.values()])
    return waited
