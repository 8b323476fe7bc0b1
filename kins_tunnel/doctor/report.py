"""What `kins-tunnel doctor` reports (`Check`, `Report`) and how its checks run: concurrently,
each within its deadline, a failure or an error of one never stopping the others."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import trio

from kins_tunnel.errors import UserError
from kins_tunnel.logs import escape_text

OK, WARN, FAIL = "ok", "warn", "FAIL"
DEFAULT_TIMEOUT = 5.0
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the report."""

    check: str  # what was checked, e.g. "cloud 10.0.0.5:9000 TLS"
    status: str  # OK, WARN or FAIL
    detail: str  # what was found (one printable line)
    fix: str = ""  # what to do, in words ("" when nothing is to be done)

    def line(self) -> str:
        """``<status>  <check>: <detail> -> <fix>``, one printable line whatever the texts hold."""
        fix = f" -> {self.fix}" if self.fix else ""
        return escape_text(f"{self.status:<4}  {self.check}: {self.detail}{fix}")

    def as_dict(self) -> dict[str, str]:
        return {"check": self.check, "status": self.status, "detail": self.detail, "fix": self.fix}


@dataclass(frozen=True, slots=True)
class Report:
    role: str  # "edge" or "cloud"
    config: str
    checks: tuple[Check, ...]

    @property
    def failed(self) -> bool:
        return any(c.status == FAIL for c in self.checks)

    def text(self) -> str:
        return "\n".join(c.line() for c in self.checks)

    def json(self) -> str:
        doc = {
            "role": self.role,
            "config": self.config,
            "ok": not self.failed,
            "checks": [c.as_dict() for c in self.checks],
        }
        return json.dumps(doc, indent=1)


def said(text: object) -> str:
    """Text from a peer or a file, made one printable line."""
    return escape_text(str(text))[:300]


# --- running -------------------------------------------------------------------------------------

Probe = Callable[[], Awaitable[list[Check]]]


async def _bounded(label: str, probe: Probe, timeout: float) -> list[Check]:
    """`probe()` within `timeout`; a missed deadline or an error is `label`'s FAIL line."""
    with trio.move_on_after(timeout):
        try:
            return await probe()
        except Exception as exc:  # a bug in one check must not hide the others' results
            return [Check(label, FAIL, f"the check failed: {said(exc)}")]
    return [Check(label, FAIL, f"no result within {timeout:g}s", "see the lines above or below")]


async def run_all(probes: Sequence[tuple[str, Probe]], timeout: float) -> list[Check]:
    """Run `probes` concurrently; their lines in the order given."""
    slots: list[list[Check]] = [[] for _ in probes]

    async def one(i: int, label: str, probe: Probe) -> None:
        slots[i] = await _bounded(label, probe, timeout)

    async with trio.open_nursery() as nursery:
        for i, (label, probe) in enumerate(probes):
            nursery.start_soon(one, i, label, probe)
    return [c for slot in slots for c in slot]


def load_config(
    build: Callable[[dict[str, object]], T], data: Mapping[str, object], loaded: str
) -> tuple[T | None, Check]:
    """`build(data)` (the config loader) and the config line: ok with `loaded`, or FAIL with the
    loader's one-line error."""
    try:
        cfg = build(dict(data))
    except UserError as exc:
        return None, Check("config", FAIL, str(exc), "fix the key it names")
    return cfg, Check("config", OK, loaded)
