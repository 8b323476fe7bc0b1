"""Run one tunnel over an established TLS connection, the same way on the cloud and the edge.

`TunnelSide` holds what a side puts into every tunnel (role, multiplexing limits, liveness
timers, where bugs are reported); `TunnelSide.run` builds the `proto.Connection` and the
`Session`, runs the HELLO exchange within the time given, hands the open session to the caller's
`while_up`, and closes the session when that returns or the tunnel ends. The only exception it
raises of its own is `HandshakeFailed` (with its `reason`); what `while_up` raises is the caller's.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from kins_tunnel.proto import Connection, Hello, MuxConfig, Role
from kins_tunnel.proto.pacer import PacingConfig
from kins_tunnel.transport.errors import HandshakeFailed
from kins_tunnel.transport.isolation import ErrorReporter
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
        conn = Connection(self.role, hello, self.mux, clock=trio.current_time, pacing=pacing)
        session = Session(
            tls,
            conn,
            on_open=on_open,
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            label=label,
            report=self.report,
        )
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
