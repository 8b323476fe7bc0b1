"""The HTTP CONNECT front end (h11): parse one CONNECT, route it to an edge, then relay bytes.

Answers: 200 then raw bytes; 400 for malformed requests or bad targets (405 for other methods);
431 for oversized headers; 407 without valid credentials when auth is on; 403 when the
authorization rules (`authz`) do not let this principal reach the target; 503 when no connected
edge serves the name or an IP target is not a known ClusterIP (`aliases`: the cloud never dials an
IP, it rewrites a ClusterIP to the unit's service name first); 502 when the edge refused or could
not reach the target; 504 when the target or the edge did not answer in time; 500 when the handler
itself fails before the 200. Error bodies are one line naming the target and a generic reason: what
the edge said (its internal addresses) goes to the log, never to the client. The request must
arrive within `header_timeout` of accept; the number of client connections is capped by
`max_connections` (beyond it: 503 and close).

Every CONNECT, whatever its end (relayed, refused, malformed, client gone before the answer, a
bug), yields exactly one log line, "CONNECT done" after a 200 and "CONNECT refused" otherwise,
with the fields of `ConnectRecord`, including who asked (the principal, never a credential).

The same handler serves the TLS listener (`proxy_tls`): its streams may carry a principal from a
client certificate, which then stands in for Proxy-Authorization.
"""

from __future__ import annotations

import functools
import logging
import socket
from dataclasses import dataclass, field
from typing import TypeVar

import h11
import trio

from kins_tunnel.cloud.aliases import AliasTable, NoAlias
from kins_tunnel.cloud.auth import REALM, Authenticator, Principal
from kins_tunnel.cloud.authz import Authorizer
from kins_tunnel.cloud.proxy_tls import TLSClientStream
from kins_tunnel.cloud.registry import EdgeTunnel, Registry
from kins_tunnel.config_proxy import ProxySettings
from kins_tunnel.errors import OpenFailed
from kins_tunnel.httpanswer import ClientGone, ErrorAnswer, accept_connect, read_request, send_error
from kins_tunnel.logs import SourceBudget, record_fields
from kins_tunnel.metrics import Metrics
from kins_tunnel.names import normalise_target, source_key
from kins_tunnel.proto import ErrorCode, code_label
from kins_tunnel.transport.listen import peer_authority, serve_port, warn_unauthenticated
from kins_tunnel.transport.relay import relay
from kins_tunnel.transport.stream import TunnelStream

log = logging.getLogger("kins_tunnel.cloud.proxy")
MAX_ATTEMPTS = 3  # tunnels tried for one CONNECT when one is draining or full
CLIENT_GONE = 499  # status recorded (never sent) when the client left before the answer
MAX_LOGGED_TARGET = 512  # characters of a client's target kept for the log line
MAX_SHOWN_TOKEN = 32  # characters of a method name or reason echoed back in an error body

# What the client is told for each wire code of a failed open (the edge's own message is logged).
_ANSWER_FOR_CODE: dict[int, tuple[int, str]] = {
    ErrorCode.TIMEOUT: (504, "the target did not answer in time"),
    ErrorCode.REFUSED: (502, "the target refused the connection"),
    ErrorCode.UNREACHABLE: (502, "the edge could not reach the target"),
    ErrorCode.NOT_ALLOWED: (502, "the edge does not serve this target"),
    ErrorCode.CONNECT_ERROR: (502, "the connection to the target failed"),
}
_RETRYABLE = {ErrorCode.GOING_AWAY, ErrorCode.STREAM_LIMIT}
ClientStream = trio.SocketStream | TLSClientStream  # a client of the plain or the TLS listener
_K = TypeVar("_K")
# why a connection ended before any request (kins_tunnel_proxy_early_closes_total)
_EARLY = {CLIENT_GONE: "closed", 408: "timeout", 503: "limit", 500: "internal"}


@dataclass
class ProxyContext:
    settings: ProxySettings
    registry: Registry
    metrics: Metrics
    auth: Authenticator | None
    replica: str = ""
    active: int = 0
    listener_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    authz: Authorizer | None = None  # None: every authenticated client may reach every target
    aliases: AliasTable | None = None  # None: IP targets are routed as names (and find no edge)
    # Fair shares: connections per principal key, and streams per (tunnel id, principal key).
    # Entries exist only while counted (> 0), so their number is bounded by live connections.
    by_principal: dict[str, int] = field(default_factory=dict)
    # log lines of connections that ended before a request (shared with the TLS listener)
    early_log: SourceBudget = field(default_factory=SourceBudget)
    held: dict[tuple[int, str], int] = field(default_factory=dict)


@dataclass
class ConnectRecord:
    """What the one log line of a CONNECT says (no secrets: never a credential or a header)."""

    client: str
    replica: str
    started: float
    target: str = ""  # as the client wrote it
    name: str = ""  # normalised routing name (after a ClusterIP alias rewrite)
    principal: str = ""  # who (Basic user, token name, certificate CN); "" if unauthenticated
    via: str | None = None  # how `name` came from an IP target: "static" or "discovered" alias
    unit: str = ""
    node: str = ""
    stream: int | None = None
    status: int = 0
    outcome: str = ""
    sent: int = 0  # bytes client -> edge
    received: int = 0  # bytes edge -> client

    def emit(self, not_logged_before: int = 0) -> None:
        fields = record_fields(
            self, rename={"name": "normalised", "via": "alias"}, not_logged_before=not_logged_before
        )
        log.info("CONNECT done" if self.status == 200 else "CONNECT refused", extra=fields)


async def serve_proxy(
    ctx: ProxyContext, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    listen = ctx.settings.listen
    assert listen is not None, "the plain listener is off (proxy.listen: null)"

    def listening(port: int) -> None:
        if ctx.auth is None:
            warn_unauthenticated(
                "CONNECT proxy",
                listen.host,
                port,
                "set proxy.auth, or listen on loopback / a private network only",
            )

    await serve_port(
        listen,
        "proxy.listen",
        functools.partial(handle_client, ctx),
        where="proxy",
        report=ctx.metrics.report_internal_error,
        stop=ctx.listener_scope,  # cancelled to stop accepting (drain); open relays go on
        on_listening=listening,
        task_status=task_status,
    )


def _host(stream: ClientStream) -> str:
    """The anonymous client's share key (`names.source_key`: an IPv6 client by its /64)."""
    try:
        return source_key(str(stream.socket.getpeername()[0]))
    except OSError:
        return "?"


async def handle_client(ctx: ProxyContext, stream: ClientStream) -> None:
    """One client connection: one CONNECT. A failure-isolation boundary: a bug in here answers 500
    (if no answer went out yet), ends this connection only, and still logs the CONNECT line."""
    accepted = getattr(stream, "accepted_at", None)  # a TLS client: accepted before its handshake
    rec = ConnectRecord(
        client=peer_authority(stream.socket),
        replica=ctx.replica,
        started=trio.current_time() if accepted is None else accepted,
    )
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=ctx.settings.max_request_bytes)
    ctx.active += 1
    try:
        await _serve(ctx, stream, conn, rec)
    except ErrorAnswer as rej:
        _refused(ctx, rec, rej.status, rej.detail)
        await send_error(stream, conn, rej, _subject(rec))
    except ClientGone as exc:
        _refused(ctx, rec, CLIENT_GONE, str(exc))
    except Exception as exc:
        ctx.metrics.report_internal_error("proxy", exc)
        if rec.status == 0:  # nothing answered yet: the client still gets a clear answer
            _refused(ctx, rec, 500, f"internal error: {type(exc).__name__}")
            await send_error(
                stream, conn, ErrorAnswer(500, "internal error in the proxy"), _subject(rec)
            )
        else:
            rec.outcome = f"internal error: {type(exc).__name__}"
    finally:
        ctx.active -= 1
        if rec.target:
            rec.emit()
        else:  # no request: always counted, logged within a budget per source address
            reason = _EARLY.get(rec.status, "bad_request")
            ctx.metrics.proxy_early_closes.labels(reason).inc()
            if ctx.early_log.allow(rec.client.rpartition(":")[0]):
                rec.emit(not_logged_before=ctx.early_log.take_suppressed())


def _subject(rec: ConnectRecord) -> str:
    return f"kins-tunnel: {rec.target or '-'}"


def _refused(ctx: ProxyContext, rec: ConnectRecord, status: int, outcome: str) -> None:
    rec.status, rec.outcome = status, outcome
    if status != CLIENT_GONE:
        ctx.metrics.connect_answers.labels(str(status)).inc()


async def _serve(
    ctx: ProxyContext, stream: ClientStream, conn: h11.Connection, rec: ConnectRecord
) -> None:
    settings = ctx.settings
    try:
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:
        pass
    if ctx.active > settings.max_connections:
        ctx.metrics.proxy_limits.labels("connections").inc()
        raise ErrorAnswer(
            503, f"too many client connections (proxy.max_connections {settings.max_connections})"
        )
    with trio.move_on_at(rec.started + settings.header_timeout) as scope:  # from accept
        request = await read_request(stream, conn)
    if scope.cancelled_caught:
        raise ErrorAnswer(408, f"request not received within {settings.header_timeout:g}s")
    rec.target = request.target.decode("ascii", "replace")[:MAX_LOGGED_TARGET]
    if request.http_version not in (b"1.0", b"1.1"):  # h11 parses any digit.digit
        raise ErrorAnswer(
            400, f"unsupported HTTP version {request.http_version.decode('ascii', 'replace')}"
        )
    if request.method != b"CONNECT":
        raise ErrorAnswer(
            405,
            f"method {request.method.decode('ascii', 'replace')[:MAX_SHOWN_TOKEN]} not allowed: "
            "this is a CONNECT proxy",
            [("Allow", "CONNECT")],
        )
    principal: Principal | None = getattr(stream, "principal", None)  # a client certificate's
    if principal is None and ctx.auth is not None:
        principal = await ctx.auth.authenticate(_header(request, b"proxy-authorization"))
        if principal is None:
            raise ErrorAnswer(407, "proxy authentication required", [("Proxy-Authenticate", REALM)])
    rec.principal = principal.name if principal is not None else ""
    # Who a fair share belongs to: the principal, or the client's address when anonymous.
    key = f"principal:{principal.name}" if principal is not None else f"address:{_host(stream)}"
    count = ctx.by_principal.get(key, 0)
    if count >= settings.max_connections_per_principal:
        ctx.metrics.proxy_limits.labels("principal").inc()
        raise ErrorAnswer(
            429,
            "too many connections for this client (proxy.max_connections_per_principal "
            f"{settings.max_connections_per_principal})",
        )
    ctx.by_principal[key] = count + 1
    try:
        await _route_and_relay(ctx, stream, conn, rec, request, principal, key)
    finally:
        _uncount(ctx.by_principal, key)


def _uncount(table: dict[_K, int], key: _K) -> None:
    left = table[key] - 1
    if left:
        table[key] = left
    else:
        del table[key]


async def _route_and_relay(
    ctx: ProxyContext,
    stream: ClientStream,
    conn: h11.Connection,
    rec: ConnectRecord,
    request: h11.Request,
    principal: Principal | None,
    key: str,
) -> None:
    settings = ctx.settings
    try:
        rec.name = normalise_target(rec.target)
    except ValueError as exc:
        raise ErrorAnswer(400, f"bad target: {exc}") from None
    if ctx.aliases is not None:
        try:
            rewrite = ctx.aliases.rewrite(rec.name)
        except NoAlias as exc:
            ctx.metrics.dial_failures.labels("no_alias").inc()
            raise ErrorAnswer(503, str(exc)) from None
        rec.name, rec.via = rewrite.name, rewrite.via
    if ctx.authz is not None:
        denied = ctx.authz.check(principal, rec.name)
        if denied is not None:
            ctx.metrics.authz_denials.labels(denied).inc()
            who = f"{principal.name!r}" if principal is not None else "an anonymous client"
            raise ErrorAnswer(
                403, f"forbidden: {who} may not reach this target", detail=f"forbidden ({denied})"
            )
    tunnel, tunnel_stream = await _open(ctx, rec, key)
    share = (tunnel.id, key)
    # Tunnel open: answer 200 and become a byte pipe.
    try:
        rec.status, rec.stream = 200, tunnel_stream.stream_id
        ctx.metrics.connect_answers.labels("200").inc()
        try:
            rec.sent += await accept_connect(stream, conn, tunnel_stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            rec.outcome = f"client went away: {exc}"
            return
        result = await relay(
            stream,
            tunnel_stream,
            idle_timeout=settings.idle_timeout,
            activity=lambda: tunnel_stream.activity,
        )
    finally:
        _uncount(ctx.held, share)
        tunnel_stream.abort(
            ErrorCode.CANCEL, "client went away"
        )  # a no-op once the relay closed it
    if result.idle:
        ctx.metrics.proxy_limits.labels("idle_timeout").inc()
    rec.sent += result.a_to_b
    rec.received = result.b_to_a
    rec.outcome = result.error or "closed"
    ctx.metrics.relay_bytes.labels("to_edge").inc(rec.sent)
    ctx.metrics.relay_bytes.labels("from_edge").inc(rec.received)


def _header(request: h11.Request, name: bytes) -> bytes | None:
    for k, v in request.headers:
        if k == name:
            return v
    return None


async def _open(ctx: ProxyContext, rec: ConnectRecord, key: str) -> tuple[EdgeTunnel, TunnelStream]:
    """Open a stream to `rec.name` on the best tunnel, trying another on retryable refusals; the
    edge tried (or that served it) is recorded in `rec` (unit, node). A tunnel where the client
    `key` already holds its share (`max_stream_share` of the tunnel's streams) is skipped; the
    stream returned counts in `ctx.held` for (tunnel id, key) until the caller uncounts it."""
    t0 = trio.current_time()
    last: OpenFailed | None = None
    tried = skipped = 0
    share = ctx.settings.max_stream_share
    for tunnel in ctx.registry.candidates(rec.name):
        if tried == MAX_ATTEMPTS:
            break
        if ctx.held.get((tunnel.id, key), 0) >= max(
            1, int(share * tunnel.session.peer_max_streams)
        ):
            skipped += 1
            continue
        tried += 1
        rec.unit, rec.node = tunnel.identity.unit, tunnel.identity.node
        held = (tunnel.id, key)
        ctx.held[held] = ctx.held.get(held, 0) + 1  # taken while the open is pending, too
        try:
            stream = await tunnel.session.open_stream(rec.name, ctx.settings.dial_timeout)
        except BaseException as exc:
            _uncount(ctx.held, held)
            if not isinstance(exc, OpenFailed):
                raise
            last = exc
            if exc.code in _RETRYABLE:
                continue
            break
        ctx.metrics.streams.inc()
        ctx.metrics.dial_seconds.observe(trio.current_time() - t0)
        return tunnel, stream
    if skipped and last is None:
        ctx.metrics.proxy_limits.labels("stream_share").inc()
        raise ErrorAnswer(
            429,
            "this client holds its share of the edge's streams (proxy.max_stream_share "
            f"{share:g}); close some first",
        )
    if last is None or last.code in _RETRYABLE:
        ctx.metrics.dial_failures.labels("no_edge").inc()
        reason = "no connected edge serves this name" if last is None else "no edge available"
        raise ErrorAnswer(
            503, reason, detail=reason if last is None else f"{reason}: {last.message}"
        )
    label = code_label(last.code)
    ctx.metrics.dial_failures.labels(label).inc()
    status, reason = _ANSWER_FOR_CODE.get(
        int(last.code), (502, "the edge could not open the stream")
    )
    raise ErrorAnswer(status, f"{reason} ({label})", detail=f"{reason}: {last.message} ({label})")
