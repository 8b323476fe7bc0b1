"""Run one tunnel over an established TLS connection, the same way on the cloud and the edge.

`TunnelSide` holds what a side puts into every tunnel (role, multiplexing limits, liveness
timers, where bugs are reported); `TunnelSide.run` builds the `proto.Connection` and the
`Session`, runs the HELLO exchange within the time given, hands the open session to the caller's
`while_up`, and closes the session when that returns or the tunnel ends. The only exception it
raises of its own is `HandshakeFailed` (with its `reason`); what `while_up` raises is the caller's.

`TunnelSide.serve` does the same in the calling task, for a side whose tunnels mostly idle (the
cloud): the session's reader is that task, and the caller's code runs synchronously when the
session opens (`on_up`) and when it is over (what `on_up` returned). An idle tunnel then costs one
task and one nursery instead of two of each (about 5 KiB per tunnel, measured with tracemalloc).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from kins_tunnel.proto import Connection, Hello, MuxConfig, Role
from kins_tunnel.proto.pacer import PacingConfig
from kins_tunnel.transport.errors import HandshakeFailed
from kins_tunnel.transport.isolation import ErrorReporter
from kins_tunnel.transport.ping_policy import quiet_after
from kins_tunnel.transport.session import Session
from kins_tunnel.transport.tls import TLSSocket


@dataclass(frozen=True, slots=True)
class TunnelSide:
    """What one side (cloud or edge) puts into every tunnel it runs."""

    role: Role
    mux: MuxConfig
    ping_interval: float
    ping_timeout: float
    report: ErrorReporter
    idle_ping_interval: float = 60.0  # an idle tunnel's PINGs (the kernel watches it: `keepalive`)

    async def run(
        self,
        tls: TLSSocket,
        hello: Hello,
        *,
        label: str,
        handshake_timeout: float,
        while_up: Callable[[Session], Awaitable[object]],
        on_open: Callable[[Session, int, str], None] | None = None,
        pacing: PacingConfig = PacingConfig(),
    ) -> None:
        """Run one tunnel over `tls` (which it then owns) until it ends.

        Raises `HandshakeFailed` when the HELLO exchange fails within `handshake_timeout`;
        otherwise calls `while_up(session)` once the session is open, and returns when that has
        returned and the session is over (it is closed when `while_up` returns).
        """
        session = self._session(tls, hello, label, on_open, pacing)
        failure: HandshakeFailed | None = None
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await nursery.start(
                        functools.partial(session.serve, handshake_timeout=handshake_timeout)
                    )
                except HandshakeFailed as exc:
                    failure = exc
                else:
                    await while_up(session)
                    session.close("tunnel handler ended")
        finally:
            session.close("tunnel handler ended")
        if failure is not None:
            raise failure

    async def serve(
        self,
        tls: TLSSocket,
        hello: Hello,
        *,
        label: str,
        handshake_timeout: float,
        on_up: Callable[[Session], Callable[[], None] | None],
        on_open: Callable[[Session, int, str], None] | None = None,
        pacing: PacingConfig = PacingConfig(),
    ) -> None:
        """Run one tunnel over `tls` (which it then owns) in the calling task until it ends.

        Raises `HandshakeFailed` when the HELLO exchange fails within `handshake_timeout`;
        otherwise calls `on_up(session)` once the session is open (synchronously, before anything
        more is read; it may close the session, and a bug in it ends this tunnel only, reported),
        and, when the session is over, what `on_up` returned (if anything).
        """
        session = self._session(tls, hello, label, on_open, pacing)
        up = _OnUp(session, on_up)
        # this frame lasts as long as the tunnel: the session holds what it needs of these
        del tls, hello, on_open, pacing, on_up
        try:
            await session.serve(handshake_timeout=handshake_timeout, task_status=up)
        finally:
            session.close("tunnel handler ended")
            if up.down is not None:
                up.down()

    def _session(
        self,
        tls: TLSSocket,
        hello: Hello,
        label: str,
        on_open: Callable[[Session, int, str], None] | None,
        pacing: PacingConfig,
    ) -> Session:
        quiet = quiet_after(
            self.role, self.ping_interval, self.ping_timeout, self.idle_ping_interval
        )
        hello = dataclasses.replace(hello, idle_ping=quiet)  # the peer times its silence by it
        conn = Connection(self.role, hello, self.mux, clock=trio.current_time, pacing=pacing)
        tls.tune_keepalive(self.ping_interval, self.ping_timeout)
        return Session(
            tls,
            conn,
            on_open=on_open,
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            idle_ping_interval=self.idle_ping_interval,
            label=label,
            report=self.report,
        )


class _OnUp:
    """The task status `Session.serve` reports its open session to: calls `on_up` there."""

    __slots__ = ("session", "on_up", "down")

    def __init__(
        self, session: Session, on_up: Callable[[Session], Callable[[], None] | None]
    ) -> None:
        self.session = session
        self.on_up: Callable[[Session], Callable[[], None] | None] | None = on_up
        self.down: Callable[[], None] | None = None

    def started(self, value: object = None) -> None:
        on_up, self.on_up = self.on_up, None  # called once: what it holds goes with it
        if on_up is not None:
            self.down = on_up(self.session)
