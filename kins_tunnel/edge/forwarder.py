"""The edge's forwarder: answer the cloud's opens by dialling only what `services` allows.

A name not in `services` is refused with NOT_ALLOWED before any socket is touched. A service may
list several addresses (e.g. the three K3s servers of an L5 unit): they are tried in turn, the
last one that worked first, within one overall `dial_timeout` (`kins_tunnel.dial`, which the
cloud's uplink server shares). Failures map to wire codes the cloud turns into HTTP answers:
refused → REFUSED (502), no route/DNS → UNREACHABLE (502), no answer in time → TIMEOUT (504).

Refusals and failed dials are always counted (`kins_tunnel_dial_failures_total{reason}`) but
logged within one budget (`logs.SourceBudget`, per target name and in all): streams opened in a
loop at a stopped target must not fill a small edge disk. The next line logged says how many
were held back (`not_logged_before`). Targets come from the cloud: logged cut to
`MAX_LOGGED_TARGET` characters (and escaped, as every logged value).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import trio

from kins_tunnel.dial import dial_first
from kins_tunnel.errors import OpenFailed
from kins_tunnel.logs import SourceBudget
from kins_tunnel.metrics import Metrics
from kins_tunnel.names import Address, normalise_target
from kins_tunnel.proto import ErrorCode, LocalProtocolError, code_label
from kins_tunnel.transport.relay import relay
from kins_tunnel.transport.session import Session

log = logging.getLogger("kins_tunnel.edge.forwarder")
LOGGED_PER_TARGET_PER_SECOND = 5  # refusals and failed dials logged per target name
LOGGED_PER_SECOND = 20  # ... and in all
MAX_LOGGED_TARGET = 512


class Forwarder:
    def __init__(
        self, services: Mapping[str, tuple[Address, ...]], dial_timeout: float, metrics: Metrics
    ) -> None:
        self.services = services
        self.dial_timeout = dial_timeout
        self.metrics = metrics
        self._preferred: dict[str, int] = {}  # service -> index of the address that last worked
        self._log_budget = SourceBudget(LOGGED_PER_TARGET_PER_SECOND, LOGGED_PER_SECOND)

    def on_open(self, session: Session, stream_id: int, target: str) -> None:
        """Session callback for a StreamOpened: refuse at once or start dialling."""
        try:
            name = normalise_target(target)
        except ValueError:
            name = ""
        addrs = self.services.get(name) if name else None
        if not addrs:
            self.metrics.dial_failures.labels("not_allowed").inc()
            self._warn("open refused: not in services", target, stream_id)
            session.reject(
                stream_id, ErrorCode.NOT_ALLOWED, f"{target} is not in this edge's services"
            )
            return
        session.start_stream_task(stream_id, self._dial_and_relay, session, stream_id, name, addrs)

    def _warn(self, message: str, target: str, stream_id: int, **extra: object) -> None:
        """A warning about one stream, within the budget of its target (the caller counts it)."""
        shown = target[:MAX_LOGGED_TARGET]
        if self._log_budget.allow(shown):  # a peer sending many such opens must not flood the log
            log.warning(
                message,
                extra={
                    "target": shown,
                    "stream": stream_id,
                    **extra,
                    "not_logged_before": self._log_budget.take_suppressed(),
                },
            )

    async def dial(self, name: str, addrs: tuple[Address, ...]) -> trio.SocketStream:
        """Connect to the first address of `name` that answers, within `dial_timeout` in all."""
        start = self._preferred.get(name, 0)
        order = [addrs[(start + i) % len(addrs)] for i in range(len(addrs))]
        tcp, reached = await dial_first(order, self.dial_timeout)
        self._preferred[name] = addrs.index(reached)
        return tcp

    async def _dial_and_relay(
        self, session: Session, stream_id: int, name: str, addrs: tuple[Address, ...]
    ) -> None:
        t0 = trio.current_time()
        try:
            tcp = await self.dial(name, addrs)
            self.metrics.dial_seconds.observe(trio.current_time() - t0)
        except OpenFailed as exc:
            self.metrics.dial_failures.labels(code_label(exc.code)).inc()
            self._warn("dial failed", name, stream_id, outcome=str(exc))
            session.reject(stream_id, exc.code, str(exc))
            return
        try:
            stream = session.accept(stream_id)
        except LocalProtocolError:  # the cloud gave up on this stream meanwhile
            await trio.aclose_forcefully(tcp)
            return
        self.metrics.streams.inc()
        result = await relay(stream, tcp)
        self.metrics.relay_bytes.labels("to_target").inc(result.a_to_b)
        self.metrics.relay_bytes.labels("from_target").inc(result.b_to_a)
        log.debug(
            "stream done",
            extra={"target": name, "stream": stream_id, "outcome": result.error or "closed"},
        )
