"""The master's stderr log, parsed: `TS LEVEL proc[PID] text key=value ...`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


_LOG_HEAD_RE = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\dT\S+)\s+(?P<level>\w+)\s+(?P<proc>[^\s\[]+)\[(?P<pid>\d+)\]\s?(?P<rest>.*)$"
)
_KV_RE = re.compile(r'(?:(?<=\s)|^)([A-Za-z_][\w.-]*)=("(?:[^"\\]|\\.)*"|\S*)')


@dataclass
class LogLine:
    raw: str
    ts: str | None = None
    level: str | None = None
    proc: str | None = None
    pid: int | None = None
    text: str = ""
    fields: dict[str, str] = field(default_factory=dict)

    def get_int(self, key: str) -> int | None:
        v = self.fields.get(key)
        try:
            return int(v) if v is not None else None
        except ValueError:
            return None


def parse_log_line(line: str) -> LogLine:
    """Parse `TS LEVEL proc[PID] text key=value key="quoted value"`.

    ``text`` is what comes before the first key=value; quoted values are unquoted.
    Lines that don't have that shape come back with only ``raw`` and ``text`` set.
    """
    line = line.rstrip("\n")
    m = _LOG_HEAD_RE.match(line)
    if not m:
        return LogLine(raw=line, text=line)
    rest = m.group("rest")
    fields: dict[str, str] = {}
    first = None
    for kv in _KV_RE.finditer(rest):
        if first is None:
            first = kv.start()
        v = kv.group(2)
        if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
            v = re.sub(r"\\(.)", r"\1", v[1:-1])
        fields[kv.group(1)] = v
    text = rest if first is None else rest[:first]
    return LogLine(
        raw=line,
        ts=m.group("ts"),
        level=m.group("level"),
        proc=m.group("proc"),
        pid=int(m.group("pid")),
        text=text.strip(),
        fields=fields,
    )
