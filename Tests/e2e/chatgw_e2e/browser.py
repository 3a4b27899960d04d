"""Helpers for driving chatgw's pages in headless Chromium: the chat page (GET /,
test_browser.py) and the master's status page (GET /status, test_status.py).

Needs the Debian packages ``chromium`` and ``chromium-driver`` and the pip package
``selenium``; ``scripts/test`` installs them. ``require_browser_tools()`` fails (not
skips) with a clear message when one is missing. Selenium is imported lazily, so this
module always imports.

* ``require_browser_tools()`` -> ``BrowserTools`` (paths, selenium version).
* ``BrowserSession(tools, name)`` -- one headless Chromium: ``open(url)``, ``js(script)``,
  ``console()``, ``screenshot(stem)`` (into Tests/e2e/artifacts), ``quit()``.
* ``screenshot_and_quit(pages, stems)`` -- a test's end: screenshots, then quit.
* ``ChatPage(tools, name)`` -- a ``BrowserSession`` on the chat page: ``open(url)``,
  ``status()``, ``wait_connected(user)`` -> (conn id, worker slot), ``open_away_from(url,
  user, slot)`` (reloads until connected on another worker), ``wait_disconnected``,
  ``wait_joined()``, ``members()``, ``type_and_send(text)``, ``submit_now(texts)``
  (fills #text and submits the form from JavaScript, several times in one round trip),
  ``log()`` -> [LogEntry], ``wait_texts(texts)``, ``notes()``, ``ws_events()`` (the
  page's WebSocket traffic from Chromium's performance log), ``sse_events()`` (its
  EventSource messages, likewise), ``block_websocket()`` (every page loaded afterwards
  finds ``WebSocket`` throwing, as behind a proxy that breaks upgrades),
  ``transport()`` (the page's ``#transport``: WebSocket or SSE).
* ``StatusPage(tools, name)`` -- a ``BrowserSession`` on the status page: ``text(id)``,
  ``number(id)``, ``legend(chart)``, ``segments(chart, series)``, ``marks(chart, kind)``,
  ``events(kind)``, ``table(id)``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"  # Tests/e2e/artifacts
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL_HINT = ("scripts/test installs them: apt-get install -y chromium chromium-driver; "
                "python3 -m pip install selenium")

STATUS_RE = re.compile(r"^connected as (?P<user>\S+) \((?P<conn>w(?P<slot>\d+)-[^)]*)\)$")


@dataclass
class BrowserTools:
    chromium: str
    chromedriver: str
    selenium_version: str


def require_browser_tools() -> BrowserTools:
    """The browser, its driver and selenium, or an AssertionError naming what is missing."""
    missing = []
    chromium = shutil.which("chromium")
    if not chromium:
        missing.append("the `chromium` browser (Debian package chromium) is not on PATH")
    driver = CHROMEDRIVER if os.access(CHROMEDRIVER, os.X_OK) else shutil.which("chromedriver")
    if not driver:
        missing.append(f"`chromedriver` (Debian package chromium-driver) is not at {CHROMEDRIVER} nor on PATH")
    version = ""
    try:
        import selenium  # noqa: F401

        version = getattr(selenium, "__version__", "?")
    except ImportError as e:
        missing.append(f"the Python package selenium cannot be imported ({e})")
    if missing:
        raise AssertionError("browser tests need tools that are missing:\n  - " + "\n  - ".join(missing)
                             + f"\n{INSTALL_HINT}")
    return BrowserTools(chromium, driver, version)


def screenshot_and_quit(pages: list["ChatPage"], stems: list[str]) -> None:
    """A test's end, passed or failed: each open page's screenshot under its stem, then quit."""
    for page, stem in zip(pages, stems):
        if page.driver is not None:
            page.screenshot(stem)
    for page in pages:
        page.quit()


def open_and_scroll_back(tools: BrowserTools, gw, room: str, user: str, label: str, query: str = "") -> "ChatPage":
    """80 messages posted to `room` (POST /sse/send); then a page opened on it (`query`
    added to its URL) shows the last 50 once joined and, scrolled to the top, all 80 in
    order. Returns the page still open, for the caller's own checks; the caller quits it."""
    from chatgw_e2e.placement import wait_bus_ready
    from chatgw_e2e.sse import post_send
    from chatgw_e2e.ws import run_async

    async def fill():
        await wait_bus_ready(gw)
        for i in range(1, 81):
            status, answer = await post_send(gw, {"room": room, "text": f"old {i}"}, user="filler")
            assert status == 200, answer

    run_async(fill(), 60)
    page = ChatPage(tools, label)
    try:
        page.open(f"{gw.http_url}/?room={room}&user={user}{query}")
        page.wait_connected(user)
        page.wait_joined()
        wait_for(lambda: len(page.log()) == 50, 10, "the last 50 messages")
        assert [e.seq for e in page.log()] == list(range(31, 81))
        page.js('const log = document.getElementById("log"); log.scrollTop = 0; log.dispatchEvent(new Event("scroll"));')
        wait_for(lambda: len(page.log()) == 80, 10, "the 30 older messages after scrolling up")
        assert [e.seq for e in page.log()] == list(range(1, 81)), [e.seq for e in page.log()]
    except BaseException:
        page.quit()
        raise
    return page


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll pred until truthy; AssertionError naming what after timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = pred()
        except Exception as e:  # noqa: BLE001 -- a stale element etc.: try again
            last = e
            if time.monotonic() >= deadline:
                raise AssertionError(f"{what}: not within {timeout}s (last error {e!r})") from e
            time.sleep(interval)
            continue
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(interval)


@dataclass
class LogEntry:
    epoch: str
    seq: int
    text: str  # the div's text: "from: text #seq"


@dataclass
class BrowserSession:
    tools: BrowserTools
    name: str
    driver: Any = None
    _perf: list[dict] = field(default_factory=list)

    def __post_init__(self):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        opts = webdriver.ChromeOptions()
        opts.binary_location = self.tools.chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1000,700", "--no-first-run", "--no-default-browser-check"):
            opts.add_argument(arg)
        opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(self.tools.chromedriver), options=opts)
        self.driver.set_page_load_timeout(15)
        self.driver.set_script_timeout(10)

    # ---- page

    def open(self, url: str) -> None:
        self.driver.get(url)

    def js(self, script: str, *args) -> Any:
        return self.driver.execute_script(script, *args)

    def console(self) -> list[str]:
        try:
            return [e.get("message", "") for e in self.driver.get_log("browser")]
        except Exception:  # noqa: BLE001
            return []

    def screenshot(self, stem: str) -> Path | None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{stem}.png"
        try:
            if self.driver.save_screenshot(str(path)):
                print(f"[browser] screenshot of {self.name}: {path}")
                return path
        except Exception as e:  # noqa: BLE001
            print(f"[browser] screenshot of {self.name} failed: {e!r}")
        return None

    def quit(self) -> None:
        if self.driver is not None:
            try:
                self.driver.quit()
            except Exception:  # noqa: BLE001
                pass
            self.driver = None


@dataclass
class ChatPage(BrowserSession):
    """The chat page (GET /)."""

    def status(self) -> str:
        return self.js('return document.getElementById("status").textContent;') or ""

    def transport(self) -> str:
        return self.js('return document.getElementById("transport").textContent;') or ""

    def block_websocket(self) -> None:
        """From the next page load on, constructing a WebSocket throws (DevTools injects the
        script before any of the page's own)."""
        self.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": (
            "window.WebSocket = function () { throw new DOMException('blocked by the test', 'SecurityError'); };")})

    def wait_connected(self, user: str, timeout: float = 10.0, not_conn: str | None = None) -> tuple[str, int]:
        """Wait for `connected as USER (wN-...)` (with a conn other than not_conn)."""

        def ok():
            m = STATUS_RE.match(self.status())
            if m and m.group("user") == user and m.group("conn") != not_conn:
                return m
            return None

        try:
            m = wait_for(ok, timeout, f"{self.name}: connected as {user}", interval=0.02)
        except AssertionError as e:
            raise AssertionError(f"{e}; status is {self.status()!r}") from None
        return m.group("conn"), int(m.group("slot"))

    def open_away_from(self, url: str, user: str, slot: int, tries: int = 30) -> tuple[str, int]:
        """Load url until the page connects on another worker slot than `slot`; (conn, slot)."""
        conn = None
        for _ in range(tries):
            self.open(url)
            conn, landed = self.wait_connected(user, not_conn=conn)
            if landed != slot:
                return conn, landed
        raise AssertionError(f"{self.name}: could not get onto another worker than slot {slot} in {tries} loads")

    def wait_disconnected(self, timeout: float = 5.0) -> str:
        return wait_for(lambda: (lambda s: s if not s.startswith("connected as") else None)(self.status()),
                        timeout, f"{self.name}: status leaves 'connected'", interval=0.01)

    def joined(self) -> bool:
        """#text is enabled once `joined` arrived."""
        return bool(self.js('return !document.getElementById("text").disabled;'))

    def wait_joined(self, timeout: float = 10.0) -> None:
        wait_for(self.joined, timeout, f"{self.name}: joined (send box enabled)")

    def members(self) -> str:
        return self.js('return document.getElementById("members").textContent;') or ""

    def type_and_send(self, text: str) -> None:
        """Type into #text like a user and click the send button."""
        from selenium.webdriver.common.by import By

        self.wait_joined()
        box = self.driver.find_element(By.ID, "text")
        box.clear()
        box.send_keys(text)
        self.driver.find_element(By.ID, "sendButton").click()

    def type_and_enter(self, text: str) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        self.wait_joined()
        box = self.driver.find_element(By.ID, "text")
        box.clear()
        box.send_keys(text + Keys.ENTER)

    def submit_now(self, texts: list[str]) -> int:
        """Fill #text and submit the form for each text, in one script; returns how many
        the page took (it clears #text once it sent one)."""
        return self.js(
            """
            const texts = arguments[0]; let sent = 0;
            for (const t of texts) {
              const box = document.getElementById("text");
              box.value = t;
              document.getElementById("send").requestSubmit();
              if (box.value === "") sent++;
            }
            return sent;
            """,
            texts,
        )

    def log(self) -> list[LogEntry]:
        rows = self.js(
            """return Array.from(document.querySelectorAll("#log div.msg"))
                 .map(d => [d.dataset.epoch, d.dataset.seq, d.textContent]);"""
        )
        return [LogEntry(e, int(s), t) for e, s, t in rows]

    def notes(self) -> list[str]:
        return self.js('return Array.from(document.querySelectorAll("#log .note")).map(d => d.textContent);')

    def wait_texts(self, texts: list[str], timeout: float = 10.0) -> list[LogEntry]:
        """Wait until a div.msg contains each of texts; returns the log."""

        def ok():
            log = self.log()
            return log if all(any(t in e.text for e in log) for t in texts) else None

        try:
            return wait_for(ok, timeout, f"{self.name}: messages {texts} in #log")
        except AssertionError as e:
            raise AssertionError(f"{e}; #log has {[x.text for x in self.log()]}, status {self.status()!r}") from None

    # ---- WebSocket traffic (Chromium performance log)

    def _drain(self) -> None:
        for entry in self.driver.get_log("performance"):
            try:
                self._perf.append(json.loads(entry["message"])["message"])
            except (KeyError, ValueError):
                pass

    def ws_events(self) -> list[dict]:
        """The page's WebSocket events in order: {"kind": "created"|"sent"|"received"|"closed",
        "socket": requestId, "url"?, "data"? (parsed JSON or text)}."""
        self._drain()
        out = []
        kinds = {"Network.webSocketCreated": "created", "Network.webSocketFrameSent": "sent",
                 "Network.webSocketFrameReceived": "received", "Network.webSocketClosed": "closed"}
        for m in self._perf:
            kind = kinds.get(m.get("method"))
            if not kind:
                continue
            p = m.get("params", {})
            ev = {"kind": kind, "socket": p.get("requestId")}
            if kind == "created":
                ev["url"] = p.get("url")
            if kind in ("sent", "received"):
                data = p.get("response", {}).get("payloadData", "")
                try:
                    ev["data"] = json.loads(data)
                except ValueError:
                    ev["data"] = data
            out.append(ev)
        return out

    def sse_events(self) -> list[dict]:
        """The page's EventSource messages in order: {"request": requestId, "event": name,
        "id": event id, "data": parsed JSON}."""
        self._drain()
        out = []
        for m in self._perf:
            if m.get("method") != "Network.eventSourceMessageReceived":
                continue
            p = m.get("params", {})
            try:
                data = json.loads(p.get("data", ""))
            except ValueError:
                data = p.get("data")
            out.append({"request": p.get("requestId"), "event": p.get("eventName"), "id": p.get("eventId"), "data": data})
        return out


@dataclass
class StatusPage(BrowserSession):
    """The master's status page (GET /status): what it shows, read from the DOM."""

    def __post_init__(self):
        super().__post_init__()
        self.driver.set_window_size(1280, 1000)  # every chart and table in one screenshot

    def text(self, element_id: str) -> str:
        return self.js("const e = document.getElementById(arguments[0]); return e ? e.textContent : null;", element_id) or ""

    def number(self, element_id: str) -> float | None:
        """A tile's figure ("1.5K" -> 1500); None while it shows none."""
        t = self.text(element_id).strip()
        m = re.fullmatch(r"([0-9.]+)(K?)", t)
        return float(m.group(1)) * (1000 if m.group(2) else 1) if m else None

    def legend(self, chart: str) -> dict[str, str]:
        """{series name: its current value as shown} under chart ("connections", "rate", ...)."""
        rows = self.js(
            """return Array.from(document.querySelectorAll("#legend-" + arguments[0] + " .legend"))
                 .map(e => [e.dataset.series, e.textContent.slice(e.dataset.series.length + 2)]);""", chart)
        return dict(rows or [])

    def segments(self, chart: str, series: str) -> int:
        """How many separate pieces the series' line has (a gap splits it)."""
        n = self.js("""const p = Array.from(document.querySelectorAll("#chart-" + arguments[0] + " path.line"))
                         .find(e => e.dataset.series === arguments[1]);
                       return p ? +p.dataset.segments : -1;""", chart, series)
        return int(n)

    def marks(self, chart: str, kind: str) -> int:
        return int(self.js('return document.querySelectorAll("#chart-" + arguments[0] + " line.mark[data-kind=\'" + arguments[1] + "\']").length;',
                           chart, kind))

    def events(self, kind: str | None = None) -> list[str]:
        return self.js("""return Array.from(document.querySelectorAll("#events li"))
                            .filter(e => !arguments[0] || e.dataset.kind === arguments[0]).map(e => e.textContent);""", kind)

    def table(self, element_id: str) -> list[list[str]]:
        return self.js("""return Array.from(document.querySelectorAll("#" + arguments[0] + " tbody tr"))
                            .map(r => Array.from(r.cells).map(c => c.textContent));""", element_id)
