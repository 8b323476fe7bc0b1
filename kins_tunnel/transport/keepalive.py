"""TCP keepalive tuned to a tunnel's ping settings: the kernel watches an idle tunnel.

An idle tunnel's liveness costs a process wake-up per PING on each side (at 10,000 edges and a
PING every 10 s, a tenth of a core on the cloud). The kernel can do most of that work without
waking anyone: with keepalive on, after `ping_interval` of silence it sends a probe that the peer's
kernel answers, and resets the connection (the reader gets an error at once) when nothing answers.
`tune` sets that up so that a dead peer or path is found within about `ping_timeout`, as a missed
PING would be:

- `TCP_KEEPIDLE` = `ping_interval` (whole seconds, at least 1),
- `TCP_KEEPINTVL` = a third of the margin `ping_timeout - ping_interval` (at least 1 s),
  `TCP_KEEPCNT` = 3,
- `TCP_USER_TIMEOUT` = `ping_timeout`: the connection is reset once probes (or data we sent)
  have gone unanswered for that long. With data in flight the kernel sends no probes; this
  bound still ends a path that went dead under it.

The probes refresh NAT and firewall state like any packet. What they cannot prove, the tunnel's
own PINGs still do (`ping_policy`): a peer process that hangs while its kernel answers, and a
middlebox that terminates TCP itself (a site proxy: the probes then reach it, not the cloud).
Every value is clamped to what the kernel accepts; where an option is missing (not Linux), the
PINGs alone watch the tunnel.
"""

from __future__ import annotations

import socket
from typing import Protocol

PROBES = 3  # TCP_KEEPCNT
_MAX_SECONDS = 32767  # the kernel's limit for TCP_KEEPIDLE and TCP_KEEPINTVL
_MAX_MS = 2**31 - 1  # TCP_USER_TIMEOUT is an int of milliseconds


class _Socket(Protocol):
    def setsockopt(self, level: int, option: int, value: int, /) -> None: ...


def settings(interval: float, timeout: float) -> dict[str, int]:
    """The keepalive options (name -> value) for a tunnel with these ping settings."""
    idle = _seconds(interval)
    margin = max(0.0, timeout - interval)
    return {
        "TCP_KEEPIDLE": idle,
        "TCP_KEEPINTVL": _seconds(margin / PROBES),
        "TCP_KEEPCNT": PROBES,
        "TCP_USER_TIMEOUT": _MAX_MS
        if not timeout * 1000 < _MAX_MS
        else max(1000, int(timeout * 1000)),
    }


def tune(sock: _Socket, interval: float, timeout: float) -> None:
    """Turn keepalive on for `sock` with the timing of `settings`; options the platform lacks
    are skipped (an error from one is ignored: keepalive is a saving, the PINGs stay the rule)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:
        return
    for name, value in settings(interval, timeout).items():
        option = getattr(socket, name, None)
        if option is None:  # pragma: no cover - not Linux
            continue
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
        except OSError:  # pragma: no cover - a kernel without the option
            pass


def _seconds(value: float) -> int:
    """Whole seconds in [1, the kernel's limit] (a NaN or an infinity is the limit)."""
    if not value < _MAX_SECONDS:  # also NaN
        return _MAX_SECONDS
    return max(1, int(value))
