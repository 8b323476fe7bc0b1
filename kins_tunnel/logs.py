"""Logging set-up: plain lines for terminals, or one JSON object per line (`log.json: true`).

Call sites pass context as `extra={...}` (unit, node, stream, target, outcome, ...); the JSON
formatter emits those keys as fields, the plain formatter appends them as key=value. Nothing
secret is ever passed in (no tokens, no Proxy-Authorization).
"""

from __future__ import annotations

import json
import logging
import sys
import time

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


class PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = _extras(record)
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return line


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
