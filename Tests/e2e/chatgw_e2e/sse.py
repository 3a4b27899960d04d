"""Server-Sent Events on /sse (docs/PROTOCOL.md "SSE") through httpx, a client we did not
write: the event stream is read line by line and parsed as the HTML standard's
EventSource does (``event``, ``data``, ``id``, ``retry``, comments; an event is
dispatched at an empty line, only when it has data; the last event id persists).

* ``SSEStream(gw, user=..., rooms=[...], last_event_id=..., id_in_query=False, token=...,
  bearer=..., history=..., query={...}, headers={...})``: ``await s.open()`` starts the
  request and a background reader; ``s.status``, ``s.headers``, ``s.body`` (when not
  200), ``s.events`` ([Event]), ``s.comments`` (heartbeats seen), ``s.last_id``,
  ``s.ended`` (asyncio.Event), ``s.hello``, ``s.slot``, ``s.messages(room)``,
  ``await s.wait(pred, timeout, what)``, ``await s.wait_messages(room, n)``,
  ``await s.close()``.
* ``parse_id(id)`` -> {room: (epoch, seq)}.
* ``post_send(gw, body, user=..., token=..., bearer=...)`` -> (status, json) of
  ``POST /sse/send``; ``get_history(gw, room, ...)`` -> (status, json) of ``/sse/history``.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable
from urllib.parse import urlencode

import httpx

from chatgw_e2e.gateway import Gateway
from chatgw_e2e.ws import conn_slot


@dataclass
class Event:
    type: str
    data: Any  # the JSON object (or the raw text when it is not JSON)
    id: str | None  # the stream's last event id once this event was read
    has_id: bool  # the event carried an id line
    retry: int | None


def parse_id(event_id: str) -> dict[str, tuple[str, int]]:
    out = {}
    for entry in event_id.split(","):
        room, epoch, seq = entry.split("/")
        out[room] = (epoch, int(seq))
    return out


def _identity(params: dict, headers: dict, user: str | None, token: str | None, bearer: str | None) -> None:
    if user is not None:
        params["user"] = user
    if token is not None:
        params["token"] = token
    if bearer is not None:
        headers["Authorization"] = f"Bearer {bearer}"


class SSEStream:
    def __init__(self, gw: Gateway, user: str | None = None, rooms: Iterable[str] = (), *,
                 last_event_id: str | None = None, id_in_query: bool = False, token: str | None = None,
                 bearer: str | None = None, history: int | None = None, query: dict | None = None,
                 headers: dict | None = None):
        params: dict[str, Any] = {}
        self.request_headers: dict[str, str] = {"Accept": "text/event-stream"}
        _identity(params, self.request_headers, user, token, bearer)
        if rooms:
            params["rooms"] = ",".join(rooms)
        if history is not None:
            params["history"] = history
        if last_event_id is not None:
            if id_in_query:
                params["last_event_id"] = last_event_id
            else:
                self.request_headers["Last-Event-ID"] = last_event_id
        params.update(query or {})
        self.request_headers.update(headers or {})
        self.url = f"{gw.http_url}/sse" + (f"?{urlencode(params)}" if params else "")
        self.status: int | None = None
        self.headers: httpx.Headers | None = None
        self.body = b""
        self.events: list[Event] = []
        self.comments = 0
        self.last_id: str | None = None
        self.ended = asyncio.Event()
        self.end_reason = ""
        self._opened = asyncio.Event()
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task | None = None

    async def open(self, timeout: float = 10.0) -> "SSEStream":
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout, read=None))
        self._task = asyncio.create_task(self._read())
        await asyncio.wait_for(self._opened.wait(), timeout)
        return self

    async def _read(self) -> None:
        try:
            async with self._client.stream("GET", self.url, headers=self.request_headers) as r:
                self.status, self.headers = r.status_code, r.headers
                self._opened.set()
                if r.status_code != 200:
                    self.body = await r.aread()
                    return
                kind, data, has_id, retry = None, [], False, None
                async for line in r.aiter_lines():
                    if line == "":
                        if data:
                            text = "\n".join(data)
                            try:
                                parsed = json.loads(text)
                            except ValueError:
                                parsed = text
                            self.events.append(Event(kind or "message", parsed, self.last_id, has_id, retry))
                        kind, data, has_id, retry = None, [], False, None
                    elif line.startswith(":"):
                        self.comments += 1
                    else:
                        name, _, value = line.partition(":")
                        value = value[1:] if value.startswith(" ") else value
                        if name == "event":
                            kind = value
                        elif name == "data":
                            data.append(value)
                        elif name == "id":
                            self.last_id, has_id = value, True
                        elif name == "retry" and value.isdigit():
                            retry = int(value)
                self.end_reason = "closed by the server"
        except (httpx.HTTPError, OSError) as e:
            self.end_reason = repr(e)
        finally:
            self._opened.set()
            self.ended.set()

    # ---- reading

    @property
    def hello(self) -> dict | None:
        return next((e.data for e in self.events if e.type == "hello"), None)

    @property
    def slot(self) -> int | None:
        return conn_slot(self.hello or {})

    def of_type(self, kind: str, room: str | None = None) -> list[Event]:
        return [e for e in self.events if e.type == kind and (room is None or e.data.get("room") == room)]

    def messages(self, room: str) -> list[dict]:
        return [e.data for e in self.of_type("message", room)]

    async def wait(self, pred: Callable[["SSEStream"], Any], timeout: float, what: str) -> Any:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            got = pred(self)
            if got:
                return got
            if asyncio.get_running_loop().time() >= deadline:
                raise AssertionError(f"{what}: not within {timeout}s; status {self.status}, ended "
                                     f"{self.ended.is_set()} ({self.end_reason}), last events "
                                     f"{[(e.type, e.data) for e in self.events[-6:]]}")
            await asyncio.sleep(0.02)

    async def wait_event(self, kind: str, timeout: float = 10.0, room: str | None = None) -> Event:
        return (await self.wait(lambda s: s.of_type(kind, room), timeout, f"event {kind} ({room})"))[0]

    async def wait_messages(self, room: str, n: int, timeout: float = 10.0) -> list[dict]:
        await self.wait(lambda s: len(s.messages(room)) >= n, timeout, f"{n} messages in {room}")
        return self.messages(room)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except BaseException:  # noqa: BLE001 -- cancelled, or the stream failed: closing anyway
                pass
        if self._client is not None:
            await self._client.aclose()


async def _request(gw: Gateway, method: str, path: str, params: dict, headers: dict, content: bytes | None = None,
                   timeout: float = 10.0) -> tuple[int, Any]:
    async with httpx.AsyncClient(timeout=timeout) as client:
        r = await client.request(method, f"{gw.http_url}{path}", params=params, headers=headers, content=content)
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, r.text


async def post_send(gw: Gateway, body: dict | bytes, *, user: str | None = None, token: str | None = None,
                    bearer: str | None = None) -> tuple[int, Any]:
    params, headers = {}, {}
    _identity(params, headers, user, token, bearer)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await _request(gw, "POST", "/sse/send", params, headers, content)


async def get_history(gw: Gateway, room: str, *, user: str | None = None, token: str | None = None,
                      bearer: str | None = None, **query) -> tuple[int, Any]:
    params, headers = {"room": room, **query}, {}
    _identity(params, headers, user, token, bearer)
    return await _request(gw, "GET", "/sse/history", params, headers)
