"""Uplinks, the cloud's side: serve the streams an edge opens towards cloud-side targets.

An edge may open streams too (`Session.open_stream` on its side): `uplinks` in edge.yaml maps a
local listener to a cloud-side `host:port`. The cloud dials only what `uplinks` in cloud.yaml
allows for the edge's NodeUnit (the entries of the unit plus those of `"*"`); the unit comes from
the edge's certificate, never from anything the edge says. By default nothing is allowed.

Every open is untrusted input: the target is checked and canonicalised (`dial_target`) and its
`uplink_match_name` (``.svc`` and ``.svc.<cluster_domain>`` shortened, nothing else) compared with
the allowed set before any socket is touched; the name dialled is the target as written, so
``mirror.eu.svc.example.com:443`` is never dialled as ``mirror.eu:443``; a target that does not parse or is not allowed is
refused with NOT_ALLOWED. An allowed target is dialled within `uplink_dial_timeout` (all addresses
the name resolves to together, `kins_tunnel.dial`); a failed dial is answered REFUSED, UNREACHABLE
or TIMEOUT, as the edge's forwarder answers the cloud. Each accepted stream runs as a stream task
of its session (`Session.start_stream_task`): a bug in it resets that stream only.

Every uplink stream yields one log line, "uplink done" after the stream was accepted and "uplink
refused" otherwise, with unit, node, peer, replica, target, status (`ok` or the refusal's code),
outcome, bytes each way and duration. Refusals are counted in
`kins_tunnel_uplink_refusals_total{reason}` (a wire code's name: bounded) and logged at most
`REFUSALS_LOGGED_PER_SECOND` a second: an edge sending a flood of opens must not flood the log
(the next line logged says how many were held back, `not_logged_before`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import trio

from kins_tunnel.certs.identity import EdgeIdentity
from kins_tunnel.dial import dial_first
from kins_tunnel.errors import OpenFailed
from kins_tunnel.logs import LogBudget, record_fields
from kins_tunnel.metrics import Metrics
from kins_tunnel.names import Address, dial_target, uplink_match_name
from kins_tunnel.proto import ErrorCode, LocalProtocolError, code_label
from kins_tunnel.transport.relay import relay
from kins_tunnel.transport.session import Session

log = logging.getLogger("kins_tunnel.cloud.uplinks")
MAX_LOGGED_TARGET = 256  # characters of an edge's target kept for the log line
REFUSALS_LOGGED_PER_SECOND = 20


def shown_target(target: str) -> str:
    """A target as an edge sent it, safe for a log line: printable ASCII as is, anything else
    escaped (no forged lines in plain logs), cut to `MAX_LOGGED_TARGET` characters."""
    shown = target if target.isascii() and target.isprintable() else ascii(target)[1:-1]
    return shown[:MAX_LOGGED_TARGET]


@dataclass
class UplinkRecord:
    """What the one log line of an uplink stream says."""

    unit: str
    node: str
    peer: str
    replica: str
    stream: int
    target: str  # as the edge sent it (escaped, cut)
    started: float
    normalised: str = ""  # the target in canonical form, as dialled (`dial_target`)
    status: str = ""  # "ok" once accepted, else the refusal's code label
    outcome: str = ""
    sent: int = 0  # bytes edge -> target
    received: int = 0  # bytes target -> edge

    def emit(self, not_logged_before: int = 0) -> None:
        fields = record_fields(self, not_logged_before=not_logged_before)
        log.info("uplink done" if self.status == "ok" else "uplink refused", extra=fields)


class UplinkServer:
    """Answers the opens of every edge session (the `on_open` of the cloud's sessions)."""

    def __init__(
        self,
        allowed: Mapping[str, frozenset[str]],
        dial_timeout: float,
        metrics: Metrics,
        replica: str = "",
        cluster_domain: str = "cluster.local",
    ) -> None:
        self.allowed = allowed
        self.cluster_domain = cluster_domain
        self.dial_timeout = dial_timeout
        self.metrics = metrics
        self.replica = replica
        self._refusal_log = LogBudget(REFUSALS_LOGGED_PER_SECOND)

    def allows(self, unit: str, target: str) -> bool:
        """May an edge of `unit` reach `target` (a valid target; compared by its match name)?"""
        name = uplink_match_name(target, self.cluster_domain)
        return name in self.allowed.get(unit, ()) or name in self.allowed.get("*", ())

    def on_open(
        self, identity: EdgeIdentity, peer: str, session: Session, stream_id: int, target: str
    ) -> None:
        """Session callback for a stream the edge opened: refuse at once or start dialling."""
        rec = UplinkRecord(
            identity.unit,
            identity.node,
            peer,
            self.replica,
            stream_id,
            shown_target(target),
            trio.current_time(),
        )
        try:
            rec.normalised = dial_target(target)
        except ValueError:
            self._refuse(
                session, rec, ErrorCode.NOT_ALLOWED, "not a host:port target", "bad_target"
            )
            return
        if not self.allows(identity.unit, rec.normalised):
            self._refuse(session, rec, ErrorCode.NOT_ALLOWED, "not in this unit's uplinks")
            return
        session.start_stream_task(stream_id, self._dial_and_relay, session, rec)

    def _refuse(
        self,
        session: Session,
        rec: UplinkRecord,
        code: ErrorCode | int,
        detail: str,
        label: str | None = None,
    ) -> None:
        """Answer the open with `code` (the edge is told the code's meaning, never our detail),
        count it and write the stream's log line."""
        label = label or code_label(code)
        self.metrics.uplink_refusals.labels(label).inc()
        rec.status, rec.outcome = label, detail
        session.reject(
            rec.stream, code, _MESSAGE_FOR_CODE.get(int(code), "the uplink could not be opened")
        )
        self._emit(rec)

    def _emit(self, rec: UplinkRecord) -> None:
        """The stream's log line; refusals within the log budget only (they are all counted)."""
        if rec.status == "ok":
            rec.emit()
        elif self._refusal_log.allow():
            rec.emit(self._refusal_log.take_suppressed())

    async def _dial_and_relay(self, session: Session, rec: UplinkRecord) -> None:
        emitted = False
        try:
            try:
                tcp, _ = await dial_first(
                    (Address.parse(rec.normalised, min_port=1),), self.dial_timeout
                )
            except OpenFailed as exc:
                emitted = True
                self._refuse(session, rec, exc.code, exc.message)
                return
            try:
                stream = session.accept(rec.stream)
            except LocalProtocolError:  # the edge gave up on this stream meanwhile
                await trio.aclose_forcefully(tcp)
                rec.status, rec.outcome = "cancel", "the edge gave up before the dial completed"
                return
            rec.status = "ok"
            self.metrics.uplinks.inc()
            result = await relay(stream, tcp)
            rec.sent, rec.received = result.a_to_b, result.b_to_a
            rec.outcome = result.error or "closed"
            self.metrics.uplink_bytes.labels("up").inc(rec.sent)
            self.metrics.uplink_bytes.labels("down").inc(rec.received)
        except (
            Exception
        ) as exc:  # a bug: the session's stream task reports it and resets the stream
            rec.outcome = f"internal error: {type(exc).__name__}"
            raise
        finally:
            if not rec.status:  # cancelled while dialling (the tunnel ended)
                rec.status = "cancel"
            if not rec.outcome:
                rec.outcome = "tunnel closed" if session.is_closed else "ended"
            if not emitted:
                self._emit(rec)


# What the edge is told for each code (its dial details stay in the cloud's log).
_MESSAGE_FOR_CODE: dict[int, str] = {
    ErrorCode.NOT_ALLOWED: "this target is not among the uplinks the cloud allows this unit",
    ErrorCode.REFUSED: "the cloud-side target refused the connection",
    ErrorCode.UNREACHABLE: "the cloud could not reach the target",
    ErrorCode.TIMEOUT: "the cloud-side target did not answer in time",
}
