"""Resume under chaos: rooms under steady traffic while processes die, reload and stall.

Used by test_chaos.py (CI sizes) and scripts/chaos (full sizes, several runs, a table).

The model is a user's: R rooms with M members each and one sender per room. Every client
is a ``websockets`` connection that follows docs/PROTOCOL.md the way a careful client
would:

* it reconnects after ``bye.retry_ms``, or at once after a drop (a short pause when the
  connect itself fails), and resumes its room with ``since`` + ``epoch``;
* its resume position is the last message it got in the epoch it is in; a ``gap``
  moves it past the range the gap reports, or into the gap's epoch.

Senders post numbered texts with a ``ref``; a message counts as *acked* when its ``ack``
came. The sender is a member too, so it sees its own message (with the epoch, which the
``ack`` lacks) before the ack.

At the end every acked message is checked at every member: received exactly once, in
order, or reported lost (a ``gap`` over it, or an epoch change while the member was
behind it). ``Report`` counts what is not: unreported losses, duplicates and frames out of
order, plus acks that came before their message. Any of them fails the run.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from chatgw_e2e.gateway import Gateway
from chatgw_e2e.placement import wait_bus_ready


# --------------------------------------------------------------------------- clients


@dataclass
class Event:
    kind: str  # "m" message, "g" gap, "j" joined
    epoch: str
    seq: int = 0
    upto: int = 0  # for gaps: the range's end
    text: str = ""


class Member:
    """One client in one room: connects, joins or resumes, records what it gets."""

    def __init__(self, url: str, user: str, room: str):
        self.url, self.user, self.room = url, user, room
        self.events: list[Event] = []
        self.epoch: str | None = None  # resume position: epoch and last seq in it
        self.last = 0
        self.joins = 0
        self.joins_refused = 0
        self.connects = 0
        self.byes: list[dict] = []
        self.protocol_errors: list[str] = []
        self.ws = None
        self.joined = asyncio.Event()
        self._stop = False
        self._task: asyncio.Task | None = None

    # -- what the client does with each frame

    def on_frame(self, m: dict) -> None:
        kind = m.get("type")
        if m.get("room") not in (None, self.room):
            return
        if kind == "message":
            epoch, seq = str(m["epoch"]), int(m["seq"])
            self.events.append(Event("m", epoch, seq, text=str(m.get("text", ""))))
            if epoch != self.epoch or seq > self.last:
                self.epoch, self.last = epoch, seq
        elif kind == "gap":
            epoch, lo, hi = str(m["epoch"]), int(m["from"]), int(m["to"])
            self.events.append(Event("g", epoch, lo, upto=hi))
            if epoch != self.epoch:
                self.epoch, self.last = epoch, max(0, lo - 1) if lo > 0 else 0
            if lo > 0:
                self.last = max(self.last, hi)
        elif kind == "joined":
            self.events.append(Event("j", str(m["epoch"]), int(m["seq"])))
            self.joins += 1
            if self.epoch is None:
                # A fresh member starts at the room's current seq.
                self.epoch, self.last = str(m["epoch"]), int(m["seq"])
            self.joined.set()
        elif kind == "bye":
            self.byes.append(m)

    def join_request(self) -> dict:
        req = {"type": "join", "room": self.room}
        if self.epoch is not None:
            req.update(since=self.last, epoch=self.epoch)
        return req

    # -- the connection loop

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stop = True
        if self.ws is not None:
            try:
                await asyncio.wait_for(self.ws.close(), 2)
            except Exception:  # noqa: BLE001
                pass
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass

    async def _run(self) -> None:
        while not self._stop:
            retry_s = await self._session()
            if self._stop:
                return
            await asyncio.sleep(retry_s)

    async def _session(self) -> float:
        """One connection: returns how long to wait before the next."""
        try:
            ws = await asyncio.wait_for(
                ws_connect(f"{self.url}/ws?user={self.user}", open_timeout=5, close_timeout=1,
                           ping_interval=None, compression=None, proxy=None, max_size=None,
                           subprotocols=["chatgw.v1"]), 6)
        except (OSError, asyncio.TimeoutError, InvalidHandshake, InvalidStatus):
            return 0.2
        self.ws = ws
        self.connects += 1
        bye: dict | None = None
        try:
            await ws.send(json.dumps(self.join_request()))
            async for raw in ws:
                m = json.loads(raw)
                kind = m.get("type")
                if kind == "bye":
                    bye = m
                if kind == "error" and m.get("room") == self.room and m.get("code") == "unavailable" and "ref" not in m:
                    # docs/PROTOCOL.md: `unavailable` means retry. The gateway waits out a
                    # short bus outage itself, so every one of these is counted.
                    self.joins_refused += 1
                    await asyncio.sleep(0.3)
                    await ws.send(json.dumps(self.join_request()))
                    continue
                if kind == "error":
                    self.protocol_errors.append(json.dumps(m))
                self.on_frame(m)
                await self.after_frame(ws, m)
        except ConnectionClosed:
            pass
        finally:
            self.ws = None
        if bye is not None:
            return min(int(bye.get("retry_ms", 0)), 60_000) / 1000
        return 0.05

    async def after_frame(self, ws, m: dict) -> None:
        pass


class Sender(Member):
    """A member that also posts numbered texts with refs at a steady rate once joined."""

    def __init__(self, url: str, user: str, room: str, rate: float):
        super().__init__(url, user, room)
        self.rate = rate
        self.sending = asyncio.Event()
        self.next = 0
        self.refs: dict[str, str] = {}  # ref -> text
        self.seen: dict[str, tuple[str, int]] = {}  # text -> (epoch, seq) of its own message
        self.acked: list[tuple[str, int, str]] = []  # (epoch, seq, text)
        self.ack_before_message = 0
        self.refused = 0
        self._pump: asyncio.Task | None = None

    async def stop(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
        await super().stop()

    def on_frame(self, m: dict) -> None:
        super().on_frame(m)
        if m.get("type") == "message" and m.get("room") == self.room and m.get("from") == self.user:
            self.seen[str(m["text"])] = (str(m["epoch"]), int(m["seq"]))
        elif m.get("type") == "ack":
            text = self.refs.pop(str(m.get("ref")), None)
            if text is None:
                return
            place = self.seen.get(text)
            if place is None or place[1] != int(m["seq"]):
                self.ack_before_message += 1
                if len(self.protocol_errors) < 20:
                    self.protocol_errors.append(f"ack {m} for {text!r} before its message (seen as {place})")
                return
            self.acked.append((place[0], place[1], text))
        elif m.get("type") == "error" and m.get("ref") in self.refs:
            self.refs.pop(m["ref"])
            self.refused += 1

    async def after_frame(self, ws, m: dict) -> None:
        if m.get("type") == "joined" and (self._pump is None or self._pump.done()):
            self._pump = asyncio.create_task(self._send_loop(ws))

    async def _send_loop(self, ws) -> None:
        await self.sending.wait()
        interval = 1.0 / self.rate
        loop = asyncio.get_running_loop()
        t = loop.time()
        try:
            while self.sending.is_set() and not self._stop:
                self.next += 1
                text = f"{self.room}#{self.next}"
                ref = f"r{self.next}"
                self.refs[ref] = text
                await ws.send(json.dumps({"type": "send", "room": self.room, "text": text, "ref": ref}))
                t += interval
                await asyncio.sleep(max(0.0, t - loop.time()))
        except ConnectionClosed:
            pass


# --------------------------------------------------------------------------- accounting


@dataclass
class Report:
    name: str
    acked: int = 0
    members: int = 0
    checked: int = 0  # acked messages x members that had to get them
    received: int = 0
    reported: int = 0  # lost, but covered by a gap or an epoch change
    lost: int = 0  # lost without a gap
    duplicates: int = 0
    disorder: int = 0
    ack_before_message: int = 0
    joins_refused: int = 0
    examples: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicates or self.disorder or self.ack_before_message
                    or self.joins_refused) and self.acked > 0

    def row(self) -> str:
        return (f"{self.name:<44} acked {self.acked:>5} x members {self.checked:>7}: received {self.received:>7}, "
                f"reported lost {self.reported:>5} | lost without a gap {self.lost:>5}, duplicates {self.duplicates:>4}, "
                f"out of order {self.disorder:>4}, ack before message {self.ack_before_message}, "
                f"joins refused {self.joins_refused}")

    def explain(self) -> str:
        lines = [self.row()] + [f"  note: {n}" for n in self.notes] + [f"  e.g. {e}" for e in self.examples[:12]]
        return "\n".join(lines)


def check_member(member: Member, acked: list[tuple[str, int, str]], report: Report) -> None:
    """Every acked message of the member's room, at this member (see the module doc)."""
    seen: dict[tuple[str, int], int] = {}
    last_in: dict[str, int] = {}
    order: list[str] = []  # epochs in the order the member moved through them
    gaps: list[tuple[str, int, int]] = []
    abandoned: dict[str, int] = {}  # epoch -> last seq held when the member moved on
    first: tuple[str, int] | None = None

    def move_to(epoch: str) -> bool:
        """The member is now in `epoch`; False when that epoch was left before (disorder)."""
        if order and order[-1] == epoch:
            return True
        if epoch in order:
            return False
        if order:
            abandoned[order[-1]] = last_in.get(order[-1], 0)
        order.append(epoch)
        return True

    for ev in member.events:
        if ev.kind == "j":
            if first is None:
                first = (ev.epoch, ev.seq)
                last_in[ev.epoch] = ev.seq
                move_to(ev.epoch)
            continue
        if ev.kind == "g":
            gaps.append((ev.epoch, ev.seq, ev.upto))
            if ev.epoch != (order[-1] if order else None) and ev.epoch not in order:
                move_to(ev.epoch)
            continue
        key = (ev.epoch, ev.seq)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            report.duplicates += 1
            report.examples.append(f"{member.user}: duplicate {key}")
            continue
        if not move_to(ev.epoch) or ev.seq <= last_in.get(ev.epoch, 0):
            report.disorder += 1
            report.examples.append(f"{member.user}: {key} after {order[-1]}:{last_in.get(order[-1])}")
            continue
        last_in[ev.epoch] = ev.seq

    if first is None:
        report.notes.append(f"{member.user} never joined")
        first = ("", 0)
    for epoch, seq, text in acked:
        if epoch == first[0] and seq <= first[1]:
            continue  # before this member's first join
        report.checked += 1
        if seen.get((epoch, seq)):
            report.received += 1
        elif any(g[0] == epoch and g[1] <= seq <= g[2] for g in gaps) or abandoned.get(epoch, seq) < seq:
            report.reported += 1
        else:
            report.lost += 1
            if len(report.examples) < 40:
                report.examples.append(f"{member.user}: lost {epoch}:{seq} ({text}); last held {last_in}, "
                                       f"gaps {gaps[-3:]}, joins {member.joins}, connects {member.connects}")


def settled(members: list[Member], acked: dict[str, list[tuple[str, int, str]]]) -> int:
    """How many (member, acked message) pairs are still neither received nor reported."""
    missing = 0
    for m in members:
        r = Report("probe")
        check_member(m, acked[m.room], r)
        missing += r.lost
    return missing


# --------------------------------------------------------------------------- one run


@dataclass
class Scenario:
    """What to do to the gateway while traffic runs: ``action(run)`` is a coroutine."""
    name: str
    action: Callable[["ChaosRun"], Awaitable[None]]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


class ChaosRun:
    """One gateway under traffic; ``chaos`` actions use its helpers."""

    def __init__(self, gw: Gateway, rooms: int, members: int, rate: float, seconds: float):
        self.gw = gw
        self.rooms = [f"chaos-{k}" for k in range(rooms)]
        self.n_members, self.rate, self.seconds = members, rate, seconds
        self.members: list[Member] = []
        self.senders: list[Sender] = []
        self.actions: list[str] = []
        self.t0 = 0.0
        self.redis = None  # RedisServer, for the Redis bus scenarios
        self.pg = None  # PgCluster, for the PostgreSQL archive scenarios

    def log(self, what: str) -> None:
        self.actions.append(f"{time.monotonic() - self.t0:6.2f}s {what}")

    def kill(self, pid: int | None, sig: int = signal.SIGKILL, what: str = "") -> None:
        if pid is None:
            self.log(f"no {what} to signal")
            return
        try:
            os.kill(pid, sig)
            self.log(f"{signal.Signals(sig).name} {what} {pid}")
        except ProcessLookupError:
            self.log(f"{what} {pid} already gone")

    def child_pid(self, role: str, slot: int = 0) -> int | None:
        for c in self.gw.children():
            if c.role == role and c.slot == slot:
                return c.pid
        return None

    async def sleep_until(self, t: float) -> None:
        await asyncio.sleep(max(0.0, self.t0 + t - time.monotonic()))

    async def run(self, scenario: Scenario) -> Report:
        url = self.gw.url
        await wait_bus_ready(self.gw, timeout=15)
        for r in self.rooms:
            for k in range(self.n_members):
                self.members.append(Member(url, f"m{self.rooms.index(r)}x{k}", r))
            self.senders.append(Sender(url, f"s{self.rooms.index(r)}", r, self.rate))
        everyone = self.members + self.senders
        for m in everyone:
            m.start()
        try:
            await asyncio.wait_for(asyncio.gather(*(m.joined.wait() for m in everyone)), 30)
        except asyncio.TimeoutError:
            raise AssertionError(f"{sum(not m.joined.is_set() for m in everyone)} of {len(everyone)} clients "
                                 f"not joined after 30 s") from None
        self.t0 = time.monotonic()
        for s in self.senders:
            s.sending.set()
        chaos = asyncio.create_task(scenario.action(self))
        await asyncio.sleep(self.seconds)
        for s in self.senders:
            s.sending.clear()
        await asyncio.wait_for(chaos, 60)
        self.log("traffic stopped")
        # Whatever is in flight settles: every member either has each acked message or
        # a report of its loss (reconnects after a bye wait up to its retry_ms).
        await asyncio.sleep(0.5)
        acked = {s.room: sorted(s.acked) for s in self.senders}
        deadline = time.monotonic() + 30
        while settled(everyone, acked) and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
        self.log("settled" if not settled(everyone, acked) else "gave up waiting to settle")
        for m in everyone:
            await m.stop()

        report = Report(scenario.name, acked=sum(len(a) for a in acked.values()), members=len(everyone))
        for m in everyone:
            check_member(m, acked[m.room], report)
            report.ack_before_message += getattr(m, "ack_before_message", 0)
            report.joins_refused += m.joins_refused
        errors = [e for m in everyone for e in m.protocol_errors]
        if errors:
            report.notes.append(f"{len(errors)} errors, e.g. {errors[:3]}")
        refused = sum(s.refused for s in self.senders)
        report.notes.append(f"sends refused {refused}; reconnects {sum(m.connects for m in everyone) - len(everyone)}")
        report.notes.extend(self.actions)
        return report


# --------------------------------------------------------------------------- the chaos


async def nothing(run: ChaosRun) -> None:
    pass


async def kill_relay(run: ChaosRun) -> None:
    await run.sleep_until(run.seconds * 0.4)
    run.kill(run.gw.relay_pid(), what="relay")


def kill_workers_and_hup(every_s: float = 4.0) -> Callable[[ChaosRun], Awaitable[None]]:
    async def action(run: ChaosRun) -> None:
        t, k, hup_at = every_s / 2, 0, run.seconds / 2
        hupped = False
        while t < run.seconds - 1:
            if not hupped and t >= hup_at:
                run.gw.signal(signal.SIGHUP)
                run.log("HUP")
                hupped = True
            await run.sleep_until(t)
            workers = run.gw.workers_by_slot()
            if workers:
                slot = sorted(workers)[k % len(workers)]
                run.kill(workers[slot], what=f"worker {slot}")
            k += 1
            t += every_s
    return action


async def hup(run: ChaosRun) -> None:
    await run.sleep_until(run.seconds * 0.3)
    run.gw.signal(signal.SIGHUP)
    run.log("HUP")


def hup_then_kill_relay(after_s: float) -> Callable[[ChaosRun], Awaitable[None]]:
    async def action(run: ChaosRun) -> None:
        await run.sleep_until(run.seconds * 0.25)
        run.gw.signal(signal.SIGHUP)
        run.log("HUP")
        await asyncio.sleep(after_s)
        run.kill(run.gw.relay_pid(), what="relay (draining workers still up)")
    return action


async def stop_worker_past_watchdog(run: ChaosRun) -> None:
    await run.sleep_until(run.seconds * 0.25)
    pid = run.child_pid("worker", 0)
    run.kill(pid, signal.SIGSTOP, what="worker 0")
    # The master's watchdog kills it after heartbeat_timeout_s; wait for a new slot-0 worker.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = run.child_pid("worker", 0)
        if now and now != pid:
            run.log(f"watchdog replaced worker 0 with {now}")
            break
        await asyncio.sleep(0.1)
    else:
        run.log("worker 0 was not replaced within 20 s")
        run.kill(pid, signal.SIGCONT, what="worker 0")


async def ttin_ttou(run: ChaosRun) -> None:
    for frac, sig in ((0.2, signal.SIGTTIN), (0.45, signal.SIGTTIN), (0.7, signal.SIGTTOU)):
        await run.sleep_until(run.seconds * frac)
        run.gw.signal(sig)
        run.log(signal.Signals(sig).name)


async def kill_archiver(run: ChaosRun) -> None:
    await run.sleep_until(run.seconds * 0.3)
    run.kill(run.child_pid("archiver"), what="archiver")
    # ... and a reload while it restarts, so that long resumes read the archive.
    await asyncio.sleep(0.5)
    run.gw.signal(signal.SIGHUP)
    run.log("HUP")


async def restart_redis(run: ChaosRun) -> None:
    await run.sleep_until(run.seconds * 0.3)
    run.log("redis-server stopped")
    await asyncio.to_thread(run.redis.restart, 1.0)
    run.log("redis-server started again")


async def restart_postgres(run: ChaosRun) -> None:
    await run.sleep_until(run.seconds * 0.25)
    run.log("PostgreSQL stopped")
    await asyncio.to_thread(run.pg.restart, 1.0)
    run.log("PostgreSQL started again")
    await asyncio.sleep(0.5)
    run.gw.signal(signal.SIGHUP)
    run.log("HUP")


# Chaos on a gateway whose history is short, so that a resume after any pause longer than
# a second or two is filled from the archive (the path that had the replay overtaken).
BASE_ENV = {
    "CHATGW_LIMITS_RATE_PER_S": "100000",
    "CHATGW_LIMITS_BURST": "100000",
    "CHATGW_HISTORY_MESSAGES": "20",
    "CHATGW_SUPERVISOR_HEARTBEAT_TIMEOUT_S": "3",
    "CHATGW_SUPERVISOR_RESTART_RESET_AFTER_S": "1",
    "CHATGW_SUPERVISOR_CRASH_LOOP_RESTARTS": "1000",
}

RELAY_SCENARIOS = [
    Scenario("nothing (the check of the check)", nothing),
    Scenario("kill -9 of the relay", kill_relay),
    Scenario("kill -9 of a worker every 4 s, one HUP", kill_workers_and_hup()),
    Scenario("one HUP", hup),
    Scenario("HUP, kill -9 of the relay in the drain", hup_then_kill_relay(3.0),
             env={"CHATGW_SUPERVISOR_DRAIN_TIMEOUT_S": "6"}),
    Scenario("worker SIGSTOPped past the watchdog", stop_worker_past_watchdog),
    Scenario("TTIN, TTIN, TTOU under traffic", ttin_ttou),
    Scenario("kill -9 of the archiver, then HUP", kill_archiver),
]

REDIS_SCENARIOS = [
    Scenario("redis: kill -9 of a worker every 4 s, one HUP", kill_workers_and_hup()),
    Scenario("redis: one HUP", hup),
    Scenario("redis: redis-server restarted", restart_redis),
]

POSTGRES_SCENARIOS = [
    Scenario("postgres archive: PostgreSQL restarted, then HUP", restart_postgres),
]


def gateway_env(scenario: Scenario, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**BASE_ENV, **(extra or {}), **scenario.env}
