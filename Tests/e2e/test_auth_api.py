"""JWT authentication at the upgrade, the server-side HTTP API, Origin checks and
oversized request heads, end to end.

docs/PROTOCOL.md "Identity" and "Server-side HTTP API"; README. Black-box: the binaries
(CHATGW_BIN, and chatctl next to it or CHATCTL_BIN for ``chatctl token``), raw HTTP on
sockets, ``http.client``, WebSocket clients, ps.

* auth.mode jwt (HS256): every refused token is answered 401 with a JSON body
  ``{"code":"unauthorized","message":<reason>}`` and no WebSocket -- for the token in
  ``?token=`` and in ``Authorization: Bearer``, seen raw and through the websockets
  library (InvalidStatus 401). Valid tokens name the user (``sub``), whatever ``?user=``
  says; the ``rooms`` claim allows exact names and ``prefix*`` and refuses the rest
  with ``error forbidden`` (join and history), keeping the connection open.
* A JWT secret under 32 bytes stops start-up (exit 2, one line, secret not echoed).
* The API (``api.key``): publish reaches members on every worker with the room's next
  seq; room info counts members gateway-wide; message paging; every 400/401/404 with
  its JSON body; a refused request publishes nothing; API off -> 404.
* ``server.allowed_origins``: listed origins upgrade, others get 403 ``forbidden``.
* A request head over 80 KiB gets 400 and the connection is closed; the worker keeps
  serving.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http.client
import json
import os
import socket
import subprocess
import time

import pytest
from websockets.exceptions import InvalidStatus

from chatgw_e2e.gateway import DEFAULT_CONFIG, Gateway, run_chatgw_once
from chatgw_e2e.ops import chatctl_bin
from chatgw_e2e.placement import connect_on_slot, one_per_slot, wait_bus_ready
from chatgw_e2e.procs import free_port
from chatgw_e2e.raw import raw_http, upgrade_request
from chatgw_e2e.ws import (
    app_ping,
    close_all,
    connect_hello,
    join_room,
    next_ref,
    recv_until,
    run_async,
    send_json,
    send_message,
    ws_connect,
)

FAST = {"CHATGW_LIMITS_RATE_PER_S": "100000", "CHATGW_LIMITS_BURST": "100000"}

# Exactly the minimum length (32 bytes): the boundary must be accepted.
SECRET = "e2e-jwt-secret-0123456789abcdef!"
assert len(SECRET.encode()) == 32
OTHER_SECRET = "another-secret-0123456789abcdef!!"

API_KEY = "e2e-api-key-5f0c9d2e7b"
MAX_TEXT = 300  # limits.max_text_bytes of the API gateways


# --------------------------------------------------------------------------- tokens


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def craft_token(claims: dict, key: bytes | None = SECRET.encode(), alg: str = "HS256",
                digest=hashlib.sha256, header: dict | None = None) -> str:
    """A JWT signed here (HMAC with digest; key None: empty signature)."""
    head = header if header is not None else {"alg": alg, "typ": "JWT"}
    signing_input = b64url(json.dumps(head).encode()) + "." + b64url(json.dumps(claims).encode())
    sig = "" if key is None else b64url(hmac.new(key, signing_input.encode(), digest).digest())
    return f"{signing_input}.{sig}"


def mint(user: str, secret: str = SECRET, ttl: int | None = None, rooms: str | None = None) -> str:
    """``chatctl token --user U [--ttl=N] [--rooms R] --secret S`` -> the token."""
    binary = chatctl_bin()
    assert binary.exists(), f"chatctl binary not found: {binary} (set CHATCTL_BIN)"
    args = [str(binary), "token", "--user", user, "--secret", secret]
    if ttl is not None:
        args.append(f"--ttl={ttl}")
    if rooms is not None:
        args += ["--rooms", rooms]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATGW_")}
    r = subprocess.run(args, capture_output=True, text=True, timeout=15, env=env)
    assert r.returncode == 0, f"chatctl token failed ({r.returncode}): {r.stderr.strip()}"
    tok = r.stdout.strip()
    assert tok.count(".") == 2, f"chatctl token printed {r.stdout!r}"
    return tok


def claims_of(token: str) -> dict:
    return json.loads(b64url_decode(token.split(".")[1]))


def _exp(delta: int) -> int:
    return int(time.time()) + delta


def _tampered() -> str:
    """A real token whose payload names someone else, with the original signature."""
    h, p, s = mint("alice").split(".")
    claims = json.loads(b64url_decode(p))
    claims["sub"] = "mallory"
    return f"{h}.{b64url(json.dumps(claims).encode())}.{s}"


def _truncated_signature() -> str:
    tok = mint("alice")
    return tok[:-4]


def _none_with_hs256_signature() -> str:
    """alg none in the header, but carrying a valid HMAC: still refused by algorithm."""
    return craft_token({"sub": "alice", "exp": _exp(600)}, alg="none")


# (id, token factory -> token or None for "no token", expected substring of the 401 message)
REFUSALS = [
    ("missing", lambda: None, "a token is required"),
    ("empty", lambda: "", "a token is required"),
    ("expired-chatctl", lambda: mint("alice", ttl=-5), "token expired"),
    ("expired-crafted", lambda: craft_token({"sub": "alice", "exp": _exp(-60)}), "token expired"),
    ("wrong-secret", lambda: mint("alice", secret=OTHER_SECRET), "invalid token"),
    ("tampered-payload", _tampered, "invalid token"),
    ("truncated-signature", _truncated_signature, "invalid token"),
    ("hs256-header-garbage-rest", lambda: b64url(b'{"alg":"HS256","typ":"JWT"}') + ".garbage.garbage",
     "invalid token"),
    ("garbage-not-a-jwt", lambda: "this-is-not-a-jwt", "invalid token"),
    ("alg-none-unsigned", lambda: craft_token({"sub": "alice", "exp": _exp(600)}, key=None, alg="none"),
     "tokens must be signed with HS256"),
    ("alg-none-signed", _none_with_hs256_signature, "tokens must be signed with HS256"),
    ("hs512", lambda: craft_token({"sub": "alice", "exp": _exp(600)}, alg="HS512", digest=hashlib.sha512),
     "tokens must be signed with HS256"),
    ("hs384", lambda: craft_token({"sub": "alice", "exp": _exp(600)}, alg="HS384", digest=hashlib.sha384),
     "tokens must be signed with HS256"),
    # docs/PROTOCOL.md: sub and exp are required claims
    ("no-exp", lambda: craft_token({"sub": "alice"}), None),
    ("no-sub", lambda: craft_token({"exp": _exp(600)}), None),
]


# --------------------------------------------------------------------------- HTTP helpers


def json_body(reply_body: bytes, what: str) -> dict:
    try:
        obj = json.loads(reply_body)
    except ValueError:
        raise AssertionError(f"{what}: body is not JSON: {reply_body[:300]!r}") from None
    assert isinstance(obj, dict), f"{what}: body is not a JSON object: {obj!r}"
    return obj


def check_refusal(reply, status: int, code: str, message_part: str | None, what: str) -> dict:
    """An HTTP refusal: status, no upgrade, JSON {"code","message"} with message_part."""
    assert reply.status == status, f"{what}: status {reply.status}, wanted {status}; reply {reply.raw[:400]!r}"
    assert b"101 Switching" not in reply.raw and "sec-websocket-accept" not in reply.headers, \
        f"{what}: refused request still upgraded: {reply.raw[:300]!r}"
    assert reply.headers.get("content-type", "").startswith("application/json"), \
        f"{what}: content-type {reply.headers.get('content-type')!r}"
    body = json_body(reply.body, what)
    assert body.get("code") == code, f"{what}: code {body.get('code')!r}, wanted {code!r}: {body}"
    msg = body.get("message")
    assert isinstance(msg, str) and msg, f"{what}: no message: {body}"
    if message_part is not None:
        assert message_part in msg, f"{what}: message {msg!r} does not say {message_part!r}"
    return body


def api_call(gw: Gateway, method: str, path: str, body=None, *, key: str | None = API_KEY,
             raw: bytes | None = None, headers: dict | None = None, timeout: float = 5.0):
    """One HTTP request -> (status, headers (lower-case), parsed JSON or raw bytes)."""
    h = {}
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    data = None
    if raw is not None:
        data = raw
    elif body is not None:
        data = json.dumps(body).encode()
    if data is not None:
        h["Content-Type"] = "application/json"
    h.update(headers or {})
    c = http.client.HTTPConnection(gw.host, gw.port, timeout=timeout)
    try:
        c.request(method, path, body=data, headers=h)
        r = c.getresponse()
        payload = r.read()
        rh = {k.lower(): v for k, v in r.getheaders()}
    finally:
        c.close()
    try:
        parsed = json.loads(payload)
    except ValueError:
        parsed = payload
    return r.status, rh, parsed


def publish(gw: Gateway, room: str, text: str, sender: str | None = None) -> dict:
    body = {"text": text}
    if sender is not None:
        body["from"] = sender
    status, _, reply = api_call(gw, "POST", f"/api/rooms/{room}/messages", body)
    assert status == 200, f"publish to {room}: {status} {reply!r}"
    assert isinstance(reply, dict) and set(reply) == {"room", "seq", "epoch"}, f"publish reply {reply!r}"
    assert reply["room"] == room and isinstance(reply["seq"], int) and isinstance(reply["epoch"], str), reply
    return reply


def room_info(gw: Gateway, room: str) -> dict:
    status, _, reply = api_call(gw, "GET", f"/api/rooms/{room}")
    assert status == 200, f"room info {room}: {status} {reply!r}"
    assert isinstance(reply, dict) and set(reply) == {"room", "seq", "epoch", "members"}, f"room info {reply!r}"
    return reply


async def expect_ws_refused(gw: Gateway, path: str, status: int, what: str, **kw):
    """websockets.connect must raise InvalidStatus with status; returns the response."""
    try:
        ws = await ws_connect(gw, path=path, timeout=5, **kw)
    except InvalidStatus as e:
        assert e.response.status_code == status, f"{what}: websockets got {e.response.status_code}, wanted {status}"
        return e.response
    await close_all([ws])
    raise AssertionError(f"{what}: websockets.connect succeeded, wanted HTTP {status}")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def jwt_gw():
    """One jwt-mode gateway (2 workers, 32-byte secret) shared by the token matrix."""
    gw = Gateway(workers=2, env={"CHATGW_AUTH_MODE": "jwt", "CHATGW_AUTH_JWT_SECRET": SECRET, **FAST})
    try:
        gw.start()
        yield gw
    finally:
        gw.kill_everything()
        print(f"\n[e2e] jwt gateway log tail:\n{gw.log_text()[-1500:]}")
        gw.cleanup()


async def wait_bus_ready_jwt(gw: Gateway, timeout: float = 5.0) -> None:
    """wait_bus_ready for a jwt gateway: a join succeeds on every worker slot."""
    placed = await one_per_slot(gw, range(gw.workers), user_prefix="probe", path=f"/ws?token={mint('probe')}")
    try:
        deadline = time.monotonic() + timeout
        for slot, (ws, _) in placed.items():
            while True:
                reply, _ = await join_room(ws, "e2e-bus-probe")
                if reply.get("type") == "joined":
                    break
                assert time.monotonic() < deadline, f"slot {slot}: joins refused: {reply}"
                await asyncio.sleep(0.1)
    finally:
        await close_all([ws for ws, _ in placed.values()])


async def send_collect(ws, room: str, text: str, inbox: list, timeout: float = 5.0) -> dict:
    """send with a ref; return its ack (or error), appending every frame read to inbox."""
    ref = next_ref("s")
    await send_json(ws, {"type": "send", "room": room, "text": text, "ref": ref})
    reply, before = await recv_until(ws, lambda m: m.get("ref") == ref and m.get("type") in ("ack", "error"),
                                     timeout)
    inbox.extend(before)
    return reply


def jwt_env(**extra) -> dict:
    return {"CHATGW_AUTH_MODE": "jwt", "CHATGW_AUTH_JWT_SECRET": SECRET, **FAST, **extra}


def api_env(**extra) -> dict:
    return {"CHATGW_API_KEY": API_KEY, "CHATGW_LIMITS_MAX_TEXT_BYTES": str(MAX_TEXT), **FAST, **extra}


# --------------------------------------------------------------------------- JWT at the upgrade


@pytest.mark.parametrize("transport", ["query", "header"])
@pytest.mark.parametrize("case,factory,reason", REFUSALS, ids=[c[0] for c in REFUSALS])
def test_jwt_refused_with_401_and_no_websocket(jwt_gw, case, factory, reason, transport):
    gw = jwt_gw
    token = factory()
    if token is None:
        path, headers = "/ws?user=alice", {}
    elif transport == "query":
        path, headers = f"/ws?token={token}", {}
    else:
        path, headers = "/ws", {"Authorization": f"Bearer {token}"}
    what = f"{case} via {transport}"

    reply = raw_http(gw, upgrade_request(gw, path, headers), timeout=5)
    body = check_refusal(reply, 401, "unauthorized", reason, what)
    assert reply.headers.get("connection", "").lower() == "close", f"{what}: connection header {reply.headers}"

    async def main():
        await expect_ws_refused(gw, path, 401, what, additional_headers=headers or None)

    run_async(main(), 20)
    # the refusal happened at the upgrade: the workers are unharmed
    assert gw.http_get("/healthz")[0] == 200
    print(f"{what}: 401 {body}")


def test_jwt_valid_token_in_query_and_header(make_gateway):
    gw = make_gateway(workers=2, env=jwt_env())
    alice = mint("alice")
    assert claims_of(alice)["sub"] == "alice" and claims_of(alice)["exp"] > time.time()
    bob = mint("bob")
    carol = craft_token({"sub": "carol", "exp": _exp(600)})  # made here, integer exp

    async def main():
        opened = []
        try:
            ws, hello = await connect_hello(gw, "ignored", path=f"/ws?token={alice}")
            opened.append(ws)
            assert hello.get("type") == "hello" and hello.get("user") == "alice", hello
            # ?user= cannot override the token's subject
            ws, hello = await connect_hello(gw, "ignored", path=f"/ws?user=mallory&token={alice}")
            opened.append(ws)
            assert hello.get("user") == "alice", f"?user= overrode sub: {hello}"
            # Authorization: Bearer
            ws, hello = await connect_hello(gw, "ignored", path="/ws?user=mallory",
                                            additional_headers={"Authorization": f"Bearer {bob}"})
            opened.append(ws)
            assert hello.get("user") == "bob", hello
            ws, hello = await connect_hello(gw, "ignored", path="/ws",
                                            additional_headers={"Authorization": f"Bearer {carol}"})
            opened.append(ws)
            assert hello.get("user") == "carol", hello
            # an authorized connection works: join, send, ack
            reply, _ = await join_room(opened[0], "jwt-room")
            assert reply.get("type") == "joined", reply
            ack = await send_message(opened[0], "jwt-room", "hi")
            assert ack.get("type") == "ack" and ack.get("seq") == 1, ack
            # no token: ?user= alone is not enough in jwt mode; nor is a valid token under
            # another scheme than Bearer
            await expect_ws_refused(gw, "/ws?user=alice", 401, "user without token")
            await expect_ws_refused(gw, "/ws", 401, "Basic scheme",
                                    additional_headers={"Authorization": f"Basic {alice}"})
        finally:
            await close_all(opened)

    run_async(main(), 40)
    # plain endpoints need no token
    assert gw.http_get("/healthz")[0] == 200


def test_jwt_rooms_claim_allows_exact_and_prefix_and_forbids_the_rest(make_gateway):
    gw = make_gateway(workers=2, env=jwt_env())
    restricted = mint("rita", rooms="a,live:*")
    assert claims_of(restricted).get("rooms") == ["a", "live:*"], claims_of(restricted)
    anyroom = mint("uma")
    forbidden = ["ab", "b", "live", "LIVE:1", "xlive:1", "a:1", "lobby"]

    async def main():
        await wait_bus_ready_jwt(gw)
        r, hello = await connect_hello(gw, "x", path=f"/ws?token={restricted}")
        u, _ = await connect_hello(gw, "x", path=f"/ws?token={anyroom}")
        try:
            assert hello.get("user") == "rita", hello
            for room in ["a", "live:7", "live:"]:
                reply, _ = await join_room(r, room)
                assert reply.get("type") == "joined", f"join {room!r} with rooms a,live:* -> {reply}"
            for room in forbidden:
                ref = next_ref("jf")
                reply, _ = await join_room(r, room, ref=ref)
                assert reply.get("type") == "error" and reply.get("code") == "forbidden", \
                    f"join {room!r} with rooms a,live:* -> {reply}"
                assert reply.get("ref") == ref and reply.get("room") == room, reply
                pong = await app_ping(r)  # the connection stays open
                assert pong.get("type") == "pong"
            # the refused join did not make it a member
            err = await send_message(r, "b", "sneaky")
            assert err.get("type") == "error" and err.get("code") == "not_joined", err
            # history: allowed room answers, other rooms are forbidden
            for room, want in [("live:7", "history"), ("a", "history"), ("b", "forbidden"), ("live", "forbidden")]:
                ref = next_ref("h")
                await send_json(r, {"type": "history", "room": room, "ref": ref})
                m, _ = await recv_until(r, lambda m: m.get("ref") == ref, 5)
                got = m.get("type") if m.get("type") == "history" else m.get("code")
                assert got == want, f"history {room!r} with rooms a,live:* -> {m}"
            # an unrestricted token may join anything
            for room in ["b", "live:7"]:
                reply, _ = await join_room(u, room)
                assert reply.get("type") == "joined", f"uma join {room} -> {reply}"
            ack_b = await send_message(u, "b", "for b only")
            ack_live = await send_message(u, "live:7", "for live:7")
            assert ack_b.get("type") == "ack" and ack_live.get("type") == "ack", (ack_b, ack_live)
            m, before = await recv_until(r, lambda m: m.get("type") == "message" and m.get("room") == "live:7", 5)
            assert m.get("text") == "for live:7" and m.get("from") == "uma", m
            await app_ping(r)
            leaked = [x for x in before if x.get("room") == "b"]
            assert not leaked, f"rita got messages of a room her token forbids: {leaked}"
        finally:
            await close_all([r, u])

    run_async(main(), 50)


@pytest.mark.parametrize("secret", ["x" * 31, "", "short"], ids=["31-bytes", "empty", "5-bytes"])
def test_jwt_secret_under_32_bytes_stops_start_up(secret):
    env = {"CHATGW_AUTH_MODE": "jwt", "CHATGW_AUTH_JWT_SECRET": secret, "CHATGW_METRICS_LISTEN": ""}
    r = run_chatgw_once(["--config", str(DEFAULT_CONFIG), "--state-dir", "state",
                         "--listen", f"127.0.0.1:{free_port()}", "--workers", "1"], env=env, timeout=15)
    assert r.returncode == 2, f"exit {r.returncode} (wanted 2); stderr:\n{r.stderr[-1500:]}"
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    want = "chatgw: invalid config: auth.jwt_secret: must be at least 32 bytes when auth.mode is jwt"
    assert any(l.startswith(want) for l in lines), f"no line starting {want!r}; stderr:\n{r.stderr[-1500:]}"
    if len(secret) >= 4:
        assert secret not in r.stderr + r.stdout, "the secret was echoed in the error output"
    assert not r.leftover, f"processes left behind: {r.leftover}"
    assert r.elapsed < 10, f"start-up error took {r.elapsed:.1f}s"


# --------------------------------------------------------------------------- HTTP API


def test_api_publish_reaches_members_on_both_workers(make_gateway):
    gw = make_gateway(workers=2, env=api_env())
    room = "api-fanout"

    async def main():
        await wait_bus_ready(gw)
        first = await one_per_slot(gw, [0, 1], user_prefix="ma")
        second = await one_per_slot(gw, [0, 1], user_prefix="mb")
        outsiders = await one_per_slot(gw, [0, 1], user_prefix="out")
        members = [first[0][0], first[1][0], second[0][0], second[1][0]]
        slots = [0, 1, 0, 1]
        names = [first[0][1]["user"], first[1][1]["user"], second[0][1]["user"], second[1][1]["user"]]
        try:
            epochs = set()
            for ws in members:
                reply, _ = await join_room(ws, room)
                assert reply.get("type") == "joined", reply
                epochs.add(reply["epoch"])
            assert len(epochs) == 1, f"members joined different epochs: {epochs}"
            epoch = epochs.pop()
            inboxes = [[] for _ in members]
            ack = await send_collect(members[0], room, "ws first", inboxes[0])
            assert ack.get("type") == "ack", ack
            s0 = ack["seq"]
            expected = [(s0, names[0], "ws first")]
            for i in range(6):
                sender = f"bot-{i}" if i % 2 else None
                rep = await asyncio.to_thread(publish, gw, room, f"api {i}", sender)
                assert rep["seq"] == s0 + 1 + i, f"API publish #{i} got seq {rep['seq']}, wanted {s0 + 1 + i}"
                assert rep["epoch"] == epoch, f"API publish epoch {rep['epoch']} != joined epoch {epoch}"
                expected.append((rep["seq"], sender or "system", f"api {i}"))
            ack = await send_collect(members[1], room, "ws last", inboxes[1])
            assert ack.get("seq") == s0 + 7, f"a WebSocket send after the API got seq {ack.get('seq')}"
            expected.append((s0 + 7, names[1], "ws last"))

            got = []
            for ws, slot, inbox in zip(members, slots, inboxes):
                if not any(m.get("type") == "message" and m.get("seq") == s0 + 7 for m in inbox):
                    last, before = await recv_until(
                        ws, lambda m: m.get("type") == "message" and m.get("room") == room and m.get("seq") == s0 + 7,
                        10)
                    inbox.extend(before + [last])
                msgs = [m for m in inbox if m.get("type") == "message" and m.get("room") == room]
                seen = [(m["seq"], m["from"], m["text"]) for m in msgs]
                assert seen == expected, f"member on slot {slot} saw\n{seen}\nwanted\n{expected}"
                assert {m["epoch"] for m in msgs} == {epoch}, f"slot {slot}: epochs {[m['epoch'] for m in msgs]}"
                got.append([(m["seq"], m["from"], m["text"], m["ts"], m["epoch"]) for m in msgs])
            assert all(g == got[0] for g in got), "members on different workers saw different messages"
            for slot, (ws, _) in outsiders.items():
                ref = next_ref("p")
                await send_json(ws, {"type": "ping", "ref": ref})
                _, before = await recv_until(ws, lambda m: m.get("type") == "pong" and m.get("ref") == ref, 5)
                stray = [m for m in before if m.get("room") == room]
                assert not stray, f"a non-member on slot {slot} received {stray}"
        finally:
            await close_all(members + [ws for ws, _ in outsiders.values()])

    run_async(main(), 50)


def test_api_room_info_counts_members_across_workers(make_gateway):
    gw = make_gateway(workers=2, env=api_env())
    room = "api-info"

    async def main():
        await wait_bus_ready(gw)
        info = await asyncio.to_thread(room_info, gw, room)
        assert info["room"] == room and info["seq"] == 0 and info["members"] == 0, f"fresh room: {info}"
        a, _ = await connect_on_slot(gw, 0, user_prefix="ia")
        b, _ = await connect_on_slot(gw, 0, user_prefix="ib")
        c, _ = await connect_on_slot(gw, 1, user_prefix="ic")
        try:
            epoch = None
            for ws in (a, b, c):
                reply, _ = await join_room(ws, room)
                assert reply.get("type") == "joined", reply
                epoch = reply["epoch"]

            async def members_become(n: int, what: str) -> dict:
                deadline = time.monotonic() + 5
                seen = []
                while True:
                    info = await asyncio.to_thread(room_info, gw, room)
                    seen.append(info["members"])
                    if info["members"] == n:
                        return info
                    assert info["members"] <= 3, f"{what}: members {info['members']} > clients joined (3)"
                    if time.monotonic() > deadline:
                        raise AssertionError(f"{what}: members {seen[-10:]}, wanted {n}")
                    await asyncio.sleep(0.05)

            await members_become(3, "2 members on worker 0 and 1 on worker 1")
            for t in ("one", "two"):
                ack = await send_message(c, room, t)
                assert ack.get("type") == "ack", ack
            info = await members_become(3, "after two messages")
            assert info["seq"] == 2 and info["epoch"] == epoch, f"room info {info}, wanted seq 2 epoch {epoch}"
            await send_json(c, {"type": "leave", "room": room})
            await recv_until(c, lambda m: m.get("type") == "left", 5)
            await close_all([a])
            await members_become(1, "after a leave on worker 1 and a disconnect on worker 0")
        finally:
            await close_all([a, b, c])

    run_async(main(), 50)


def test_api_message_paging(make_gateway):
    gw = make_gateway(workers=2, env=api_env())
    room = "api-pages"

    async def main():
        await wait_bus_ready(gw)
        sent = []
        for i in range(1, 8):
            rep = await asyncio.to_thread(publish, gw, room, f"m{i}", "pager" if i % 2 else None)
            sent.append(rep)
        assert [r["seq"] for r in sent] == list(range(1, 8)), sent
        epoch = sent[0]["epoch"]

        def page(query: str) -> dict:
            status, headers, body = api_call(gw, "GET", f"/api/rooms/{room}/messages{query}")
            assert status == 200, f"GET messages{query}: {status} {body!r}"
            assert headers.get("content-type", "").startswith("application/json"), headers
            assert isinstance(body, dict) and body.get("type") == "history" and body.get("room") == room, body
            assert isinstance(body.get("more"), bool), body
            for m in body["messages"]:
                assert {"epoch", "seq", "from", "text", "ts"} <= set(m), m
                assert m["epoch"] == epoch and isinstance(m["ts"], int), m
                assert m["from"] == ("pager" if m["seq"] % 2 else "system") and m["text"] == f"m{m['seq']}", m
            return body

        p1 = await asyncio.to_thread(page, "?limit=3")
        assert [m["seq"] for m in p1["messages"]] == [5, 6, 7] and p1["more"] is True, p1
        p2 = await asyncio.to_thread(page, f"?before_epoch={epoch}&before_seq=5&limit=3")
        assert [m["seq"] for m in p2["messages"]] == [2, 3, 4] and p2["more"] is True, p2
        p3 = await asyncio.to_thread(page, f"?before_epoch={epoch}&before_seq=2&limit=3")
        assert [m["seq"] for m in p3["messages"]] == [1] and p3["more"] is False, p3
        everything = await asyncio.to_thread(page, "")
        assert [m["seq"] for m in everything["messages"]] == list(range(1, 8)) and everything["more"] is False, \
            everything
        # the API page is the same as the WebSocket `history` answer
        ws, _ = await connect_hello(gw, "reader")
        try:
            await send_json(ws, {"type": "history", "room": room, "before": {"epoch": epoch, "seq": 5},
                                 "limit": 3, "ref": "h1"})
            h, _ = await recv_until(ws, lambda m: m.get("ref") == "h1", 5)
            assert h.get("type") == "history", h
            assert h["messages"] == p2["messages"] and h["more"] == p2["more"], f"WS {h}\nAPI {p2}"
        finally:
            await close_all([ws])
        for bad in ("0", "201", "-1"):
            status, _, body = await asyncio.to_thread(api_call, gw, "GET", f"/api/rooms/{room}/messages?limit={bad}")
            assert status == 400, f"limit={bad}: {status} {body!r}"
            assert isinstance(body, dict) and isinstance(body.get("code"), str) and body.get("message"), body

    run_async(main(), 50)


WEIRD_TEXT = 'quote " backslash \\ newline \n tab \t nul \u0000 emoji \U0001F600 rtl \u202e </script> é'


def test_api_text_round_trips_exactly_over_keep_alive(make_gateway):
    """JSON escaping end to end (API -> relay -> members and history), several requests on
    one keep-alive connection, and a chunked body."""
    gw = make_gateway(workers=2, env=api_env())
    room = "api-text"

    async def main():
        await wait_bus_ready(gw)
        placed = await one_per_slot(gw, [0, 1], user_prefix="rt")
        try:
            for ws, _ in placed.values():
                reply, _ = await join_room(ws, room)
                assert reply.get("type") == "joined", reply

            def requests() -> list:
                c = http.client.HTTPConnection(gw.host, gw.port, timeout=5)
                out = []
                try:
                    h = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
                    c.request("POST", f"/api/rooms/{room}/messages", body=json.dumps({"text": WEIRD_TEXT}), headers=h)
                    r = c.getresponse()
                    out.append((r.status, json.loads(r.read())))
                    c.request("POST", f"/api/rooms/{room}/messages",
                              body=iter([b'{"text":', json.dumps("chunked " + WEIRD_TEXT).encode() + b"}"]),
                              headers=h, encode_chunked=True)
                    r = c.getresponse()
                    out.append((r.status, json.loads(r.read())))
                    c.request("GET", f"/api/rooms/{room}/messages", headers=h)
                    r = c.getresponse()
                    out.append((r.status, json.loads(r.read())))
                finally:
                    c.close()
                return out

            (s1, p1), (s2, p2), (s3, page) = await asyncio.to_thread(requests)
            assert (s1, p1.get("seq")) == (200, 1), p1
            assert (s2, p2.get("seq")) == (200, 2), f"second request on a keep-alive connection (chunked): {s2} {p2}"
            assert s3 == 200 and [m["text"] for m in page["messages"]] == [WEIRD_TEXT, "chunked " + WEIRD_TEXT], \
                f"history text differs: {page}"
            for slot, (ws, _) in placed.items():
                got = []
                while len(got) < 2:
                    m, _ = await recv_until(ws, lambda m: m.get("type") == "message" and m.get("room") == room, 5)
                    got.append(m["text"])
                assert got == [WEIRD_TEXT, "chunked " + WEIRD_TEXT], f"slot {slot} got {got!r}"
        finally:
            await close_all([ws for ws, _ in placed.values()])

    run_async(main(), 40)


# (id, method, path, kwargs for api_call, status, code)
_P = "/api/rooms/api-errors/messages"
API_ERRORS = [
    ("no-key", "POST", _P, dict(body={"text": "x"}, key=None), 401, "unauthorized"),
    ("wrong-key", "POST", _P, dict(body={"text": "x"}, key="wrong"), 401, "unauthorized"),
    ("key-prefix", "POST", _P, dict(body={"text": "x"}, key=API_KEY[:-1]), 401, "unauthorized"),
    ("key-longer", "POST", _P, dict(body={"text": "x"}, key=API_KEY + "x"), 401, "unauthorized"),
    ("basic-scheme", "POST", _P, dict(body={"text": "x"}, key=None,
                                      headers={"Authorization": f"Basic {API_KEY}"}), 401, "unauthorized"),
    ("bare-key", "POST", _P, dict(body={"text": "x"}, key=None, headers={"Authorization": API_KEY}),
     401, "unauthorized"),
    ("info-no-key", "GET", "/api/rooms/api-errors", dict(key=None), 401, "unauthorized"),
    ("page-wrong-key", "GET", _P, dict(key="nope"), 401, "unauthorized"),
    ("not-json", "POST", _P, dict(raw=b"this is not json"), 400, "bad_json"),
    ("empty-body", "POST", _P, dict(raw=b""), 400, "bad_json"),
    ("json-array", "POST", _P, dict(raw=b'["text"]'), 400, "bad_json"),
    ("no-text", "POST", _P, dict(body={"from": "bot"}), 400, "bad_json"),
    ("text-not-string", "POST", _P, dict(body={"text": 5}), 400, "bad_json"),
    ("text-over-limit", "POST", _P, dict(body={"text": "x" * (MAX_TEXT + 1)}), 400, "too_large"),
    ("text-over-limit-utf8", "POST", _P, dict(body={"text": "é" * (MAX_TEXT // 2 + 1)}), 400, "too_large"),
    ("huge-body", "POST", _P, dict(body={"text": "x", "pad": "y" * 200_000}), 400, "too_large"),
    ("room-too-long", "POST", "/api/rooms/" + "r" * 65 + "/messages", dict(body={"text": "x"}), 400, "bad_room"),
    ("room-space", "POST", "/api/rooms/a%20b/messages", dict(body={"text": "x"}), 400, "bad_room"),
    ("room-bang", "POST", "/api/rooms/a!b/messages", dict(body={"text": "x"}), 400, "bad_room"),
    ("info-bad-room", "GET", "/api/rooms/a!b", dict(), 400, "bad_room"),
    ("page-bad-room", "GET", "/api/rooms/a!b/messages", dict(), 400, "bad_room"),
    ("from-space", "POST", _P, dict(body={"text": "x", "from": "a b"}), 400, "bad_user"),
    ("from-empty", "POST", _P, dict(body={"text": "x", "from": ""}), 400, "bad_user"),
    ("from-too-long", "POST", _P, dict(body={"text": "x", "from": "f" * 33}), 400, "bad_user"),
    ("unknown-endpoint", "GET", "/api/nope", dict(), 404, "not_found"),
]


def test_api_errors_have_status_and_json_body(make_gateway):
    gw = make_gateway(workers=2, env=api_env())
    failures = []
    for case, method, path, kw, status, code in API_ERRORS:
        got_status, headers, body = api_call(gw, method, path, **kw)
        problem = None
        if got_status != status:
            problem = f"status {got_status}, wanted {status}"
        elif not headers.get("content-type", "").startswith("application/json"):
            problem = f"content-type {headers.get('content-type')!r}"
        elif not isinstance(body, dict) or body.get("code") != code or not isinstance(body.get("message"), str) \
                or not body.get("message"):
            problem = f"body {body!r}, wanted code {code!r} and a message"
        if problem:
            failures.append(f"{case}: {method} {path[:60]}: {problem} (body {str(body)[:200]})")
        else:
            print(f"{case}: {got_status} {body}")
    assert not failures, "API error answers wrong:\n" + "\n".join(failures)
    # nothing above was published; the gateway still serves
    info = room_info(gw, "api-errors")
    assert info["seq"] == 0, f"refused requests published messages: {info}"
    # the limits are inclusive: exactly max_text_bytes is accepted (also counted in UTF-8 bytes)
    assert publish(gw, "api-errors", "x" * MAX_TEXT)["seq"] == 1
    assert publish(gw, "api-errors", "é" * (MAX_TEXT // 2), "bot")["seq"] == 2
    assert gw.http_get("/healthz")[0] == 200


def test_api_from_that_is_not_a_string_is_refused(make_gateway):
    """`from` must be a valid user name: a number, list, object or boolean is bad input, not
    a reason to publish silently as "system"."""
    gw = make_gateway(workers=1, env=api_env())
    accepted = []
    for sender in [5, ["alice"], {"name": "alice"}, True]:
        status, _, body = api_call(gw, "POST", "/api/rooms/api-from/messages", {"text": "x", "from": sender})
        if status != 400 or not isinstance(body, dict) or body.get("code") not in ("bad_user", "bad_json"):
            accepted.append(f'"from": {json.dumps(sender)} -> {status} {body}')
    info = room_info(gw, "api-from")
    assert not accepted, ("non-string `from` not refused with 400 bad_user/bad_json:\n" + "\n".join(accepted)
                          + f"\nroom now at seq {info['seq']}; history: "
                          + str(api_call(gw, "GET", "/api/rooms/api-from/messages")[2]))
    assert info["seq"] == 0, info


def test_api_off_is_404(make_gateway):
    gw = make_gateway(workers=1, env=FAST)  # api.key "" (the default)
    for method, path, kw in [
        ("POST", "/api/rooms/r/messages", dict(body={"text": "x"}, key="anything")),
        ("POST", "/api/rooms/r/messages", dict(body={"text": "x"}, key=None)),
        ("GET", "/api/rooms/r", dict(key="")),
        ("GET", "/api/rooms/r/messages", dict(key=None)),
    ]:
        status, headers, body = api_call(gw, method, path, **kw)
        assert status == 404, f"API off: {method} {path} -> {status} {body!r}"
        assert isinstance(body, dict) and body.get("code") == "not_found" and body.get("message"), body
    assert gw.http_get("/healthz")[0] == 200


# --------------------------------------------------------------------------- Origin


def test_allowed_origins(make_gateway):
    allowed = ["http://a.example", "http://b.example"]
    gw = make_gateway(workers=2, env={"CHATGW_SERVER_ALLOWED_ORIGINS": ",".join(allowed), **FAST})

    for origin in allowed:
        reply = raw_http(gw, upgrade_request(gw, "/ws?user=ok", {"Origin": origin}), read_body=False)
        assert reply.status == 101, f"Origin {origin} (listed) refused: {reply.raw[:300]!r}"
    for origin in ["http://c.example", "http://a.example.evil.test", "http://a.example:8080",
                   "https://a.example", "null"]:
        reply = raw_http(gw, upgrade_request(gw, "/ws?user=no", {"Origin": origin}))
        check_refusal(reply, 403, "forbidden", None, f"Origin {origin}")

    async def main():
        opened = []
        try:
            for origin in allowed:
                ws, hello = await connect_hello(gw, "web", origin=origin)
                opened.append(ws)
                assert hello.get("type") == "hello" and hello.get("user") == "web", hello
            await expect_ws_refused(gw, "/ws?user=evil", 403, "Origin http://evil.example", origin="http://evil.example")
        finally:
            await close_all(opened)

    run_async(main(), 30)
    assert gw.http_get("/healthz", headers={"Origin": "http://evil.example"})[0] == 200


def test_no_origin_restriction_by_default(make_gateway):
    gw = make_gateway(workers=1, env=FAST)
    reply = raw_http(gw, upgrade_request(gw, "/ws?user=any", {"Origin": "http://anything.example"}), read_body=False)
    assert reply.status == 101, f"allowed_origins \"\" must allow any origin: {reply.raw[:300]!r}"


# --------------------------------------------------------------------------- oversized request heads


def _oversized_exchange(gw: Gateway, request: bytes, timeout: float = 5.0) -> tuple[bytes, str]:
    """Send request; read the reply until the server ends the connection.

    Returns (bytes read, how it ended: "eof", "reset" or "open").
    """
    deadline = time.monotonic() + timeout
    data = b""
    with socket.create_connection((gw.host, gw.port), timeout=timeout) as s:
        try:
            s.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass
        while time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                return data, "reset"
            if not chunk:
                return data, "eof"
            data += chunk
    return data, "open"


def test_oversized_request_head_gets_400_and_worker_keeps_serving(make_gateway):
    gw = make_gateway(workers=2, env=FAST)
    pids = gw.workers_by_slot()
    assert sorted(pids) == [0, 1], gw.children()
    mark = gw.log_mark()
    big = b"a" * (81 * 1024)
    requests = {
        "healthz, one huge header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + big + b"\r\n\r\n",
        "upgrade, one huge header": upgrade_request(gw, "/ws?user=big", {"X-Big": big.decode()}),
        "many headers": b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                        + b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 1000) for i in range(90)) + b"\r\n",
        "huge target": b"GET /healthz?" + big + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    }
    # several rounds, so that (with the kernel spreading connections) both workers get some
    for rnd in range(3):
        for what, req in requests.items():
            data, end = _oversized_exchange(gw, req)
            status_line = data.split(b"\r\n", 1)[0]
            assert status_line.startswith(b"HTTP/1.1 400"), \
                f"{what} (round {rnd}): wanted 400, got {data[:200]!r} (connection {end})"
            assert end in ("eof", "reset"), f"{what} (round {rnd}): connection still open after the 400"
    # a head just under the limit is still served
    ok = raw_http(gw, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n")
    assert ok.status == 200 and ok.body == b"ok\n", ok.raw[:200]
    for _ in range(10):
        assert gw.http_get("/healthz") == (200, b"ok\n")
    assert gw.workers_by_slot() == pids, f"workers changed: {pids} -> {gw.workers_by_slot()}"
    exits = gw.child_events("exited", since=mark)
    assert not exits, f"children exited: {[l.raw for l in exits]}"

    async def main():
        placed = await one_per_slot(gw, [0, 1], user_prefix="after")
        try:
            for slot, (ws, hello) in placed.items():
                assert (await app_ping(ws)).get("type") == "pong"
        finally:
            await close_all([ws for ws, _ in placed.values()])

    run_async(main(), 30)
