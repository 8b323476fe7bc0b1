"""Debug checks of the zero-copy ownership contract.

The contract itself (who owns each buffer and each file descriptor of a tunnel, and what another
holder may do with it and until when) is written in one place: docs/DESIGN.md, "Transport
objects and who owns what". The code that hands out views or lends a descriptor points there.

Two of its rules cannot be checked cheaply on every chunk, so they are checked only when
`CHECKS` is on (the test suite turns it on in tests/conftest.py; in a process, the environment
variable `KINS_TUNNEL_OWNERSHIP_CHECKS=1` does, for processes the tests start too); in production
each check costs one test of a module flag:

- a `Connection.write_output` callback keeps no view of what it was handed: `expect_unshared` on
  the core's output buffer before the core writes over bytes it handed out (a split frame's new
  header) or reuses the buffer;
- the reader task writes into a relay's socket only while the relay writes nothing to it: a
  `transport.stream.ConflictDetector` per lent socket that both writers enter.

A check that fails raises `OwnershipError` (a bug here, never the peer's doing) and records it,
so that a test fails even when an isolation boundary catches the error and the tunnel goes on
(`take_violations`; in a process the tests started, the internal-error log line names it).
"""

from __future__ import annotations

import os

CHECKS: bool = os.environ.get("KINS_TUNNEL_OWNERSHIP_CHECKS", "") not in ("", "0")

_violations: list[str] = []
_MAX_KEPT = 100  # recorded violations kept (the first ones say most)


class OwnershipError(AssertionError):
    """A holder broke the ownership contract (docs/DESIGN.md, "Transport objects and who owns
    what")."""


def violation(message: str) -> OwnershipError:
    """Record a broken rule and return the error to raise."""
    if len(_violations) < _MAX_KEPT:
        _violations.append(message)
    return OwnershipError(message)


def take_violations() -> list[str]:
    """The violations recorded since the last call (and forget them)."""
    taken = _violations[:]
    _violations.clear()
    return taken


def expect_unshared(buf: bytearray, what: str) -> None:
    """Raise `OwnershipError` if a view of `buf` is still alive (a `bytearray` with exported
    views cannot be resized: the probe is a one-byte append, undone at once). Call it only with
    every view of one's own released."""
    try:
        buf.append(0)
    except BufferError:
        raise violation(
            f"{what}: a view handed out is still held after the callback returned"
        ) from None
    del buf[-1]
