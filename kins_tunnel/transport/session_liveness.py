"""The liveness side of a `Session`: its ping settings, when it pings, when its silence is fatal.

`SessionLiveness` is a part of `Session` (a base class with slots of its own: no object more per
tunnel) that the one liveness timer of the trio run (`liveness`) sees as its `Watched`: it asks
`ping()` on the schedule `ping()` returns and ends the session (`timed_out`) at `deadline()`. The
rules themselves are `ping_policy`'s (a busy tunnel every `ping_interval`, an idle one after
`idle_ping_interval` of silence, the kernel's keepalive in between); this holds their state: the
settings, the silence after which the peer said it pings (its HELLO), when this side last pinged
and when the tunnel last went from idle to busy (`_going_busy`: it is then watched on the busy
schedule at once).
"""

from __future__ import annotations

import trio

from kins_tunnel.proto import Connection, ErrorCode, Role
from kins_tunnel.transport import liveness
from kins_tunnel.transport.isolation import ErrorReporter
from kins_tunnel.transport.opening import PendingOpens
from kins_tunnel.transport.ping_policy import deadline, idle_timeout, ping_due, quiet_after
from kins_tunnel.transport.stream import TunnelStream
from kins_tunnel.transport.writer import SessionWriter


class SessionLiveness:
    __slots__ = (
        "_ping_interval",
        "_ping_timeout",
        "_idle_ping_interval",
        "_idle_timeout",
        "_quiet_after",
        "_busy_since",
        "_liveness",
        "_pinged_at",
    )

    # the session's own, read here
    conn: Connection
    output: SessionWriter
    _streams: dict[int, TunnelStream]
    _opens: PendingOpens
    _report: ErrorReporter
    _last_rx: float

    def _init_liveness(self, role: Role, interval: float, timeout: float, idle: float) -> None:
        self._ping_interval, self._ping_timeout, self._idle_ping_interval = interval, timeout, idle
        self._quiet_after = quiet_after(role, interval, timeout, idle)
        # made again once the peer's HELLO says how long it stays silent (`_watch`)
        self._idle_timeout = idle_timeout(interval, timeout, self._quiet_after, idle)
        self._busy_since = 0.0  # clock time it last went from idle to busy (`_going_busy`)
        self._liveness: liveness.Entry | None = None
        self._pinged_at = 0.0  # clock time of our last PING

    def close(self, reason: str, code: ErrorCode = ErrorCode.NO_ERROR) -> None:
        raise NotImplementedError  # the session's

    def _watch(self) -> None:
        """The tunnel is open: time its silence by what the peer's HELLO said, ping it for a
        first RTT sample (it sizes the windows) and have the timer watch it."""
        peer_quiet = self.conn.peer_idle_ping
        self._idle_timeout = idle_timeout(
            self._ping_interval,
            self._ping_timeout,
            self._quiet_after,
            self._idle_ping_interval if peer_quiet is None else peer_quiet,
        )
        self.conn.ping()
        self._pinged_at = trio.current_time()
        self.output.kick()
        self._liveness = liveness.watch(self, self._ping_interval)

    def _unwatch(self) -> None:
        if self._liveness is not None:
            liveness.forget(self._liveness)
            self._liveness = None

    @property
    def last_rx(self) -> float:
        return self._last_rx

    def deadline(self) -> float:
        """Clock time at which this tunnel is dead if nothing more arrives (`ping_policy`)."""
        return deadline(
            busy=bool(self._streams) or bool(self._opens),
            last_rx=self._last_rx,
            busy_since=self._busy_since,
            timeout=self._ping_timeout,
            idle_after=self._idle_timeout,
        )

    def _going_busy(self) -> None:
        """A stream or an OPEN is about to be added: an idle tunnel goes on the busy schedule (a
        PING every `ping_interval`, dead after `ping_timeout` of silence) at once."""
        if self._streams or self._opens:
            return  # busy already
        now = trio.current_time()
        self._busy_since = now
        entry = self._liveness
        if entry is not None and entry.due > now + self._ping_interval:  # the idle schedule
            liveness.forget(entry)
            first = max(now, self._pinged_at + self._ping_interval)
            self._liveness = liveness.watch(self, self._ping_interval, first_ping=first)

    def ping(self) -> float | None:
        """Send a PING (the answer updates `rtt`) if one is due now by `ping_policy`; returns
        when to be asked again (`liveness.Watched.ping`). A bug here ends this tunnel only."""
        try:
            conn = self.conn
            if not conn.is_open:
                return None
            now = trio.current_time()
            due = ping_due(
                busy=bool(self._streams) or bool(self._opens),
                last_rx=self._last_rx,
                pinged_at=self._pinged_at,
                interval=self._ping_interval,
                quiet=self._quiet_after,
                idle=self._idle_ping_interval,
            )
            if now < due:
                return due
            conn.ping()
            self._pinged_at = now
            self.output.kick()
        except Exception as exc:
            self._report("session", exc)
            self.close(f"internal error: {type(exc).__name__}", ErrorCode.INTERNAL_ERROR)
        return None

    def timed_out(self, idle: float) -> None:
        self.close(f"no traffic from peer for {idle:.1f}s (ping timeout)", ErrorCode.NO_ERROR)
