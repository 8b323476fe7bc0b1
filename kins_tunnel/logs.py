"""Logging set-up: plain lines for terminals, or one JSON object per line (`log.json: true`).

Call sites pass context as `extra={...}` (unit, node, stream, target, outcome, ...); the JSON
formatter emits those keys as fields, the plain formatter appends them as key=value. Nothing
secret is ever passed in (no tokens, no Proxy-Authorization).

Many values come from peers (targets, advertised names, HELLO agents, GOAWAY reasons, user
names), so neither format lets a value forge a line or a field: JSON escapes by construction
(`ensure_ascii`), and the plain format writes the message with control and non-ASCII characters
escaped, quotes any value that holds a space, a quote, ``=``, a backslash, a control or a
non-ASCII character (as a JSON string literal), and indents every line of a traceback with
``  | `` so that no text in an exception can start a line that looks like a record.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

import trio

from kins_tunnel.config import LogSettings

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(_extras(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


# Characters a plain log line shows escaped: controls (a newline would start a forged record),
# DEL, and everything outside ASCII (bidirectional overrides and look-alikes).
_UNSAFE = re.compile(r"[^\x20-\x7e]")
_NEEDS_QUOTES = re.compile(r'[^\x21-\x7e]|["=\\]')


def _escape_char(m: re.Match[str]) -> str:
    code = ord(m.group())
    return (
        f"\\x{code:02x}"
        if code < 0x100
        else f"\\u{code:04x}"
        if code < 0x10000
        else f"\\U{code:08x}"
    )


def escape_text(text: str) -> str:
    """`text` with control and non-ASCII characters as backslash escapes (one printable line)."""
    return _UNSAFE.sub(_escape_char, text)


def plain_value(value: object) -> str:
    """A field value for the plain format: bare if it is one printable ASCII token, else quoted."""
    text = str(value)
    if text and _NEEDS_QUOTES.search(text) is None:
        return text
    return json.dumps(text)


class PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape_text(record.getMessage())
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        extra = _extras(record)
        if extra:
            line += " " + " ".join(f"{k}={plain_value(v)}" for k, v in extra.items())
        if record.exc_info:
            trace = self.formatException(record.exc_info)
            line += "".join("\n  | " + escape_text(t) for t in trace.splitlines())
        if record.stack_info:
            line += "".join("\n  | " + escape_text(t) for t in record.stack_info.splitlines())
        return line


def record_fields(
    record: Any, *, rename: Mapping[str, str] | None = None, not_logged_before: int = 0
) -> dict[str, object]:
    """The `extra` of the one log line of a dataclass `record` (a CONNECT, an uplink): its fields
    in order, renamed by `rename`, those that are None left out; its `started` (trio time) becomes
    `duration`; `not_logged_before` (lines a `LogBudget` dropped) is added when not 0."""
    rename = rename or {}
    fields: dict[str, object] = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if f.name != "started" and value is not None:
            fields[rename.get(f.name, f.name)] = value
    fields["duration"] = round(trio.current_time() - record.started, 6)
    if not_logged_before:
        fields["not_logged_before"] = not_logged_before
    return fields


def setup_logging(settings: LogSettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if settings.json else PlainFormatter())
    root = logging.getLogger("kins_tunnel")
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
    root.propagate = False


class LogBudget:
    """At most `rate` lines per second; the number of lines held back is reported with the next."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._window = -1.0
        self._used = 0
        self._suppressed = 0

    def allow(self) -> bool:
        now = trio.current_time()
        if now - self._window >= 1.0:
            self._window, self._used = now, 0
        if self._used < self.rate:
            self._used += 1
            return True
        self._suppressed += 1
        return False

    def take_suppressed(self) -> int:
        n, self._suppressed = self._suppressed, 0
        return n


class SourceBudget:
    """Log lines of one kind per source address: at most `rate` a second for each source and
    `total` a second for all of them, so that one noisy address cannot flood the log nor crowd
    out the lines of the others. At most `max_sources` sources are tracked (the least recently
    seen is forgotten). Lines held back are counted and reported with the next line allowed."""

    def __init__(self, rate: int = 5, total: int = 50, max_sources: int = 4096) -> None:
        self.rate = rate
        self.max_sources = max_sources
        self._total = LogBudget(total)
        self._sources: collections.OrderedDict[str, LogBudget] = collections.OrderedDict()

    def allow(self, source: str) -> bool:
        budget = self._sources.pop(source, None)
        if budget is None:
            budget = LogBudget(self.rate)
            while len(self._sources) >= self.max_sources:
                self._sources.popitem(last=False)
        self._sources[source] = budget  # most recently seen last
        if not budget.allow():
            self._total._suppressed += 1
            return False
        return self._total.allow()

    def take_suppressed(self) -> int:
        return self._total.take_suppressed()
