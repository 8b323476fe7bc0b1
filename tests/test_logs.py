"""`LogBudget`: a flood of refusals (bad handshakes, refused opens) is counted, not all logged."""

from __future__ import annotations

import json
import logging
import sys

import trio
import trio.testing

from kins_tunnel.logs import JSONFormatter, LogBudget, PlainFormatter


async def test_at_most_rate_lines_a_second_and_the_rest_reported_with_the_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = LogBudget(20)
    allowed = [budget.allow() for _ in range(25)]
    assert allowed == [True] * 20 + [False] * 5
    await trio.sleep(1.0)
    assert budget.allow()
    assert budget.take_suppressed() == 5
    assert budget.take_suppressed() == 0


# --- Peer-supplied text cannot forge a line or a field -----------------------------------------


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("kins_tunnel.cloud", logging.WARNING, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_plain_format_escapes_a_forged_record_in_the_message_and_in_values() -> None:
    forged = "x\n2026-12-07 00:00:00 INFO    kins_tunnel.cloud: tunnel up unit=a"
    line = PlainFormatter().format(
        _record("hello from %s", forged, agent=forged, target="a b=c", node="edge1")
    )
    assert "\n" not in line
    assert "hello from x\\x0a2026-12-07" in line
    # A value with a space, "=" or a newline is one quoted field; a plain token stays bare.
    assert f"agent={json.dumps(forged)}" in line
    assert 'target="a b=c"' in line
    assert line.endswith(" node=edge1")


def test_plain_format_shows_bidi_and_look_alike_characters_escaped() -> None:
    line = PlainFormatter().format(_record("name %s", "te\u202est\u0430", node="e\u202e1"))
    assert line.isascii()
    assert "te\\u202est\\u0430" in line
    assert 'node="e\\u202e1"' in line


def test_plain_format_indents_every_traceback_line() -> None:
    try:
        raise ValueError("bad\nINFO forged: line")
    except ValueError:
        record = _record("failed")
        record.exc_info = sys.exc_info()
    first, *rest = PlainFormatter().format(record).split("\n")
    assert first.endswith("kins_tunnel.cloud: failed")
    assert rest and all(line.startswith("  | ") for line in rest)


def test_json_format_keeps_each_record_on_one_line_with_the_values_intact() -> None:
    forged = 'x\n{"level": "INFO"}\u202e'
    line = JSONFormatter().format(_record("agent %s", forged, agent=forged))
    assert "\n" not in line and line.isascii()
    doc = json.loads(line)
    assert doc["agent"] == forged
    assert doc["msg"] == f"agent {forged}"
