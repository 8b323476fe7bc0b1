"""The edge's forwarder: answer the cloud's opens by dialling only what `services` allows.

A name not in `services` is refused with NOT_ALLOWED before any socket is touched. A service may
list several addresses (e.g. the three K3s servers of an L5 unit): they are tried in turn, the
last one that worked first, within one overall `dial_timeout` (`kins_tunnel.dial`, which the
cloud's uplink server shares). Failures map to wire codes the cloud turns into HTTP answers:
refused → REFUSED (502), no route/DNS → UNREACHABLE (502), no answer in time → TIMEOUT (504).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import trio

from kins_tunnel.dial import dial_first
from kins_tunnel.errors import OpenFailed
from kins_tunnel.logs import LogBudget
from kins_tunnel.metrics import Metrics
from kins_tunnel.names import Address, normalise_target
from kins_tunnel.proto import ErrorCode, LocalProtocolError, code_label
from kins_tunnel.transport.relay import relay
from kins_tunnel.transport.session import Session

log = logging.getLogger("kins_tunnel.edge.forwarder")
REFUSALS_LOGGED_PER_SECOND = 20
MAX_LOGGED_TARGET = 512


class Forwarder:
    def __init__(
        self, services: Mapping[str, tuple[Address, ...]], dial_timeout: float, metrics: Metrics
    ) -> None:
        self.services = services
        self.dial_timeout = dial_timeout
        self.metrics = metrics
        self._preferred: dict[str, int] = {}  # service -> index of the address that last worked
        self._refusal_log = LogBudget(REFUSALS_LOGGED_PER_SECOND)

    def on_open(self, session: Session, stream_id: int, target: str) -> None:
        """Session callback for a StreamOpened: refuse at once or start dialling."""
        try:
            name = normalise_target(target)
        except ValueError:
            name = ""
        addrs = self.services.get(name) if name else None
        if not addrs:
            self.metrics.dial_failures.labels("not_allowed").inc()
            if self._refusal_log.allow():  # a peer sending many such opens must not flood the log
                log.warning(
                    "open refused: not in services",
                    extra={
                        "target": target[:MAX_LOGGED_TARGET],
                        "stream": stream_id,
                        "not_logged_before": self._refusal_log.take_suppressed(),
                    },
                )
            session.reject(
                stream_id, ErrorCode.NOT_ALLOWED, f"{target} is not in this edge's services"
            )
            return
        session.start_stream_task(stream_id, self._dial_and_relay, session, stream_id, name, addrs)

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
            log.warning(
                "dial failed", extra={"target": name, "stream": stream_id, "outcome": str(exc)}
            )
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
