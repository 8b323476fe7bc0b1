"""Uplinks, the edge's side: local listeners whose connections become streams to the cloud.

`uplinks` in edge.yaml maps a local listen address to a cloud-side target, e.g.
``{"127.0.0.1:5000": "registry.kube-system:5000"}``: an offline edge cluster reaches a registry
mirror in the cloud through the tunnel it already has. The target is sent as written (lower
case, no trailing dot: `names.dial_target`), never shortened: the cloud dials that very name. For
each connection accepted there the edge opens a stream to the target on a usable tunnel (any cloud replica: fewest open streams first,
rotating among equals); a tunnel that refuses with a retryable code (GOING_AWAY: that replica is
draining; STREAM_LIMIT: it is full) or that dies while the open is under way is followed by
another, up to `MAX_ATTEMPTS`. Then the bytes
are relayed both ways with half-close. No usable tunnel, or a refusal (the cloud allows this unit
no such target, or could not reach it): the local connection is reset, so the client sees an error
rather than an empty answer; the refusal is logged and counted with a bounded reason.

`uplink_proxy` adds a local HTTP CONNECT proxy (h11) for workloads that speak proxy: the target
comes from the request and the cloud alone decides what it allows. Answers: 200 then raw bytes;
403 when the cloud does not allow the target; 502 when it could not reach it; 504 when it did not
answer in time; 503 without a usable tunnel; 400/405/408/431 for bad requests.

Every accepted connection is a failure-isolation boundary (`serve_listener`, `where` "uplink" or
"uplink_proxy") and yields one log line ("uplink done" / "uplink refused") with the listener,
client, target, tunnel, status, outcome, bytes each way and duration; refusals are logged at most
`REFUSALS_LOGGED_PER_SECOND` a second (all counted; the next line logged says how many were held
back).

Each listener is bounded: at most `max_connections` connections at once (an uplink's long form,
`uplink_proxy.max_connections`; beyond, a new one is closed at accept), and a relay that moves no
byte either way for `idle_timeout` is closed; both counted in
`kins_tunnel_listener_limits_total{listener}`. Uplink listeners have no authentication: one on a
non-loopback address is warned about at start-up.
"""

from __future__ import annotations

import functools
import itertools
import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import h11
import trio

from kins_tunnel.config import EdgeConfig
from kins_tunnel.errors import OpenFailed
from kins_tunnel.httpanswer import ClientGone, ErrorAnswer, accept_connect, read_request, send_error
from kins_tunnel.logs import LogBudget, record_fields
from kins_tunnel.metrics import Metrics
from kins_tunnel.names import Address, dial_target
from kins_tunnel.proto import ErrorCode, code_label
from kins_tunnel.transport.errors import SetupError
from kins_tunnel.transport.listen import (
    open_listener_socket,
    peer_authority,
    serve_listener,
    warn_unauthenticated,
)
from kins_tunnel.transport.relay import abort, relay
from kins_tunnel.transport.session import Session
from kins_tunnel.transport.stream import TunnelStream

log = logging.getLogger("kins_tunnel.edge.uplinks")

MAX_ATTEMPTS = 3  # tunnels tried for one connection when one is draining or full
RETRYABLE = {ErrorCode.GOING_AWAY, ErrorCode.STREAM_LIMIT}
PROXY_HEADER_TIMEOUT = 10.0  # seconds from accept to a complete CONNECT request
PROXY_MAX_REQUEST = 16384  # request line + headers
MAX_LOGGED_TARGET = 256
REFUSALS_LOGGED_PER_SECOND = 20

# The proxy's answer for each wire code of a refused open.
_ANSWER_FOR_CODE: dict[int, tuple[int, str]] = {
    ErrorCode.NOT_ALLOWED: (403, "the cloud does not allow this target for this edge's unit"),
    ErrorCode.TIMEOUT: (504, "the target did not answer in time"),
    ErrorCode.REFUSED: (502, "the target refused the connection"),
    ErrorCode.UNREACHABLE: (502, "the cloud could not reach the target"),
}


class UplinkRefused(Exception):
    """No stream to the target: `reason` is the bounded metric label, `code` the wire code (None:
    no usable tunnel), the message the detail for the log."""

    def __init__(self, reason: str, detail: str, code: ErrorCode | int | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.code = code


@dataclass
class UplinkRecord:
    """What the one log line of an uplink connection says."""

    listen: str
    client: str
    started: float
    target: str = ""
    cloud: str = ""  # the tunnel (cloud address) tried last or used
    stream: int | None = None
    status: str = ""  # "ok" once the stream is open, else the refusal's reason
    outcome: str = ""
    answer: int | None = None  # the HTTP answer (uplink_proxy only)
    sent: int = 0  # bytes client -> cloud
    received: int = 0  # bytes cloud -> client

    def emit(self, not_logged_before: int = 0) -> None:
        fields = record_fields(self, not_logged_before=not_logged_before)
        fields["status"] = self.status or "cancel"
        fields["outcome"] = self.outcome or "ended"
        log.info("uplink done" if self.status == "ok" else "uplink refused", extra=fields)


def _tune(stream: trio.SocketStream) -> None:
    try:
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:
        pass


class Uplinks:
    """The uplink listeners and the CONNECT proxy of one edge."""

    def __init__(
        self,
        cfg: EdgeConfig,
        metrics: Metrics,
        sessions: Callable[[], Iterable[tuple[str, Session]]],
    ) -> None:
        self.targets = cfg.uplinks
        self.limits = cfg.uplink_limits
        self.proxy = cfg.uplink_proxy
        self.open_timeout = cfg.uplink_dial_timeout
        self.metrics = metrics
        self._sessions = sessions
        self._rr = itertools.count()
        self.ports: dict[str, int] = {}  # listen address as configured -> bound port
        self.proxy_port: int | None = None
        self.listener_scope = trio.CancelScope()  # cancelled to stop accepting (drain)
        self._refusal_log = LogBudget(REFUSALS_LOGGED_PER_SECOND)

    @property
    def enabled(self) -> bool:
        return bool(self.targets) or self.proxy is not None

    def status(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = [
            {"listen": str(listen), "port": self.ports[str(listen)], "target": target}
            for listen, target in self.targets.items()
            if str(listen) in self.ports
        ]
        if self.proxy is not None and self.proxy_port is not None:
            out.append(
                {"listen": str(self.proxy.listen), "port": self.proxy_port, "target": "CONNECT"}
            )
        return out

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on every uplink address (a one-line SetupError naming the key if one cannot be
        bound), `task_status.started()`, then serve until cancelled."""
        socks: list[tuple[trio.socket.SocketType, Address, str]] = []
        proxy_sock: trio.socket.SocketType | None = None
        try:
            for listen, target in self.targets.items():
                socks.append(
                    (
                        open_listener_socket(listen.host, listen.port, f'uplinks."{listen}"'),
                        listen,
                        target,
                    )
                )
            if self.proxy is not None:
                proxy_sock = open_listener_socket(
                    self.proxy.listen.host, self.proxy.listen.port, "uplink_proxy.listen"
                )
        except SetupError:
            for sock, _listen, _target in socks:
                sock.close()
            raise
        async with trio.open_nursery() as handlers:  # connections outlive the listeners (drain)
            with self.listener_scope:
                async with trio.open_nursery() as listeners:
                    report = self.metrics.report_internal_error
                    refused = self.metrics.listener_limits.labels
                    for sock, listen, target in socks:
                        self.ports[str(listen)] = port = sock.getsockname()[1]
                        limits = self.limits[listen]
                        warn_unauthenticated(
                            f'uplink listener uplinks."{listen}"',
                            listen.host,
                            port,
                            "listen on loopback unless every host that reaches it may use it",
                            reaches=target,
                        )
                        listeners.start_soon(
                            functools.partial(
                                serve_listener,
                                trio.SocketListener(sock),
                                functools.partial(
                                    self._forward, str(listen), target, limits.idle_timeout
                                ),
                                where="uplink",
                                report=report,
                                handler_nursery=handlers,
                                max_connections=limits.max_connections,
                                on_refused=refused("uplink", "max_connections").inc,
                            )
                        )
                    if proxy_sock is not None and self.proxy is not None:
                        self.proxy_port = port = proxy_sock.getsockname()[1]
                        warn_unauthenticated(
                            "uplink_proxy",
                            self.proxy.listen.host,
                            port,
                            "listen on loopback unless every host that reaches it may use it",
                            reaches="every cloud-side target the cloud allows this unit",
                        )
                        listeners.start_soon(
                            functools.partial(
                                serve_listener,
                                trio.SocketListener(proxy_sock),
                                self._proxy_client,
                                where="uplink_proxy",
                                report=report,
                                handler_nursery=handlers,
                                max_connections=self.proxy.max_connections,
                                on_refused=refused("uplink_proxy", "max_connections").inc,
                            )
                        )
                    log.info(
                        "uplinks listening",
                        extra={
                            "uplinks": ",".join(
                                f"{listen}->{target}" for listen, target in self.targets.items()
                            ),
                            "uplink_proxy": self.proxy_port or "",
                        },
                    )
                    task_status.started()

    # ------------------------------------------------------------------ opening
    def _candidates(self) -> list[tuple[str, Session]]:
        """Usable tunnels, best first: fewest open streams, rotating among equals."""
        usable = [(label, s) for label, s in self._sessions() if s.usable]
        if len(usable) > 1:
            k = next(self._rr) % len(usable)
            usable = usable[k:] + usable[:k]
            usable.sort(key=lambda item: item[1].stream_count)
        return usable

    async def open(self, target: str, rec: UplinkRecord) -> TunnelStream:
        """A stream to `target` (canonical, as written) on a usable tunnel; `UplinkRefused` if none opens."""
        last: OpenFailed | None = None
        gone = False  # the last tunnel tried was draining, full or died under the open
        for label, session in self._candidates()[:MAX_ATTEMPTS]:
            rec.cloud = label
            try:
                stream = await session.open_stream(target, self.open_timeout)
            except OpenFailed as exc:
                last = exc
                gone = exc.code in RETRYABLE or session.is_closed
                if gone:  # nothing was sent to the target yet: try another tunnel
                    continue
                break
            self.metrics.uplinks.inc()
            rec.stream = stream.stream_id
            return stream
        if last is None:
            raise UplinkRefused("no_tunnel", "no usable tunnel to the cloud")
        if gone:
            raise UplinkRefused("no_tunnel", f"no tunnel available: {last.message}", last.code)
        raise UplinkRefused(code_label(last.code), last.message, last.code)

    def _emit(self, rec: UplinkRecord) -> None:
        """The connection's log line; refusals within the log budget only (they are all counted)."""
        if rec.status == "ok":
            rec.emit()
        elif self._refusal_log.allow():
            rec.emit(self._refusal_log.take_suppressed())

    def _refused(self, rec: UplinkRecord, exc: UplinkRefused) -> None:
        self.metrics.uplink_refusals.labels(exc.reason).inc()
        rec.status, rec.outcome = exc.reason, str(exc)

    async def _relay(
        self,
        rec: UplinkRecord,
        client: trio.SocketStream,
        stream: TunnelStream,
        listener: str,
        idle_timeout: float | None,
    ) -> None:
        rec.status = "ok"
        result = await relay(
            client, stream, idle_timeout=idle_timeout, activity=lambda: stream.activity
        )
        if result.idle:
            self.metrics.listener_limits.labels(listener, "idle_timeout").inc()
        rec.sent += result.a_to_b
        rec.received += result.b_to_a
        rec.outcome = result.error or "closed"
        self.metrics.uplink_bytes.labels("up").inc(result.a_to_b)
        self.metrics.uplink_bytes.labels("down").inc(result.b_to_a)

    # ------------------------------------------------------------------ uplinks: listener -> target
    async def _forward(
        self, listen: str, target: str, idle_timeout: float, client: trio.SocketStream
    ) -> None:
        rec = UplinkRecord(
            listen, peer_authority(client.socket), trio.current_time(), target=target
        )
        try:
            _tune(client)
            try:
                stream = await self.open(target, rec)
            except UplinkRefused as exc:
                self._refused(rec, exc)
                abort(client)  # a reset: the client sees an error, not an empty answer
                return
            await self._relay(rec, client, stream, "uplink", idle_timeout)
        except Exception as exc:  # a bug: the listener's boundary reports it; this line says so
            rec.outcome = f"internal error: {type(exc).__name__}"
            raise
        finally:
            self._emit(rec)

    # ------------------------------------------------------------------ uplink_proxy: CONNECT
    async def _proxy_client(self, client: trio.SocketStream) -> None:
        assert self.proxy is not None
        rec = UplinkRecord(
            str(self.proxy.listen), peer_authority(client.socket), trio.current_time()
        )
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=PROXY_MAX_REQUEST)
        try:
            _tune(client)
            try:
                await self._proxy_exchange(client, conn, rec)
            except ErrorAnswer as ans:
                rec.answer = ans.status
                if not rec.status:
                    self.metrics.uplink_refusals.labels("bad_request").inc()
                    rec.status, rec.outcome = "bad_request", ans.reason
                await send_error(client, conn, ans, f"kins-tunnel uplink: {rec.target or '-'}")
        except Exception as exc:
            rec.outcome = f"internal error: {type(exc).__name__}"
            raise
        finally:
            self._emit(rec)

    async def _proxy_exchange(
        self, client: trio.SocketStream, conn: h11.Connection, rec: UplinkRecord
    ) -> None:
        try:
            with trio.move_on_at(rec.started + PROXY_HEADER_TIMEOUT) as scope:
                request = await read_request(client, conn)
        except ClientGone as exc:
            rec.status, rec.outcome = "client_gone", str(exc)
            return
        if scope.cancelled_caught:
            raise ErrorAnswer(408, f"request not received within {PROXY_HEADER_TIMEOUT:g}s")
        raw = request.target.decode("ascii", "replace")
        rec.target = raw[:MAX_LOGGED_TARGET]
        if request.http_version not in (b"1.0", b"1.1"):
            raise ErrorAnswer(400, "unsupported HTTP version")
        if request.method != b"CONNECT":
            raise ErrorAnswer(405, "only CONNECT is supported", [("Allow", "CONNECT")])
        try:
            target = dial_target(raw)  # as written: the cloud dials this name
        except ValueError as exc:
            raise ErrorAnswer(400, f"bad target: {exc}") from None
        rec.target = target
        try:
            stream = await self.open(target, rec)
        except UplinkRefused as exc:
            self._refused(rec, exc)
            if exc.reason == "no_tunnel" or exc.code is None:
                raise ErrorAnswer(503, "no tunnel to the cloud is available") from None
            status, reason = _ANSWER_FOR_CODE.get(
                int(exc.code), (502, "the uplink could not be opened")
            )
            raise ErrorAnswer(status, f"{reason} ({exc.reason})") from None
        rec.answer = 200
        try:
            try:
                rec.sent += await accept_connect(client, conn, stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                rec.status, rec.outcome = "ok", f"client went away: {exc}"
                return
            idle = self.proxy.idle_timeout if self.proxy is not None else None
            await self._relay(rec, client, stream, "uplink_proxy", idle)
        finally:
            stream.abort(ErrorCode.CANCEL, "client went away")  # a no-op once the relay closed it
