"""The HTTP CONNECT front end (h11): parse one CONNECT, route it to an edge, then relay bytes.

Answers follow DESIGN.md: 200 then raw bytes; 400 for malformed requests or bad targets (405 for
other methods); 431 for oversized headers; 407 without valid credentials when auth is on; 503 when
no connected edge serves the name; 502 when the edge refused or could not reach the target; 504
when the edge did not answer the open in time. Error bodies are one line naming the target and
the reason. The request must arrive within `header_timeout`; the number of client connections is
capped by `max_connections` (beyond it: 503 and close).
"""

from __future__ import annotations

import functools
import logging
import socket
from dataclasses import dataclass, field

import h11
import trio

from kins_tunnel.cloud.auth import REALM, Authenticator
from kins_tunnel.cloud.registry import Registry
from kins_tunnel.config import ProxySettings, normalise_target
from kins_tunnel.metrics import Metrics
from kins_tunnel.proto import ErrorCode
from kins_tunnel.transport.listen import accept_forever, open_listener_socket
from kins_tunnel.transport.relay import relay
from kins_tunnel.transport.session import OpenError
from kins_tunnel.transport.stream import TunnelStream

log = logging.getLogger("kins_tunnel.cloud.proxy")
MAX_ATTEMPTS = 3  # tunnels tried for one CONNECT when one is draining or full

_STATUS_FOR_CODE = {
    ErrorCode.TIMEOUT: 504,
    ErrorCode.REFUSED: 502,
    ErrorCode.UNREACHABLE: 502,
    ErrorCode.NOT_ALLOWED: 502,
    ErrorCode.CONNECT_ERROR: 502,
}
_RETRYABLE = {ErrorCode.GOING_AWAY, ErrorCode.STREAM_LIMIT}
_REASONS = {400: "Bad Request", 405: "Method Not Allowed", 407: "Proxy Authentication Required",
            431: "Request Header Fields Too Large", 502: "Bad Gateway", 503: "Service Unavailable",
            504: "Gateway Timeout", 408: "Request Timeout"}


@dataclass
class ProxyContext:
    settings: ProxySettings
    registry: Registry
    metrics: Metrics
    auth: Authenticator | None
    active: int = 0
    listener_scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class _Reject(Exception):
    def __init__(self, status: int, target: str, reason: str, headers: list[tuple[str, str]] | None = None,
                 route: tuple[str, str] | None = None) -> None:
        super().__init__(reason)
        self.route = route  # (unit, node) of the edge that answered, if one did
        self.status = status
        self.target = target
        self.reason = reason
        self.headers = headers or []


async def serve_proxy(ctx: ProxyContext, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    listen = ctx.settings.listen
    sock = open_listener_socket(listen.host, listen.port, "proxy.listen")
    port = sock.getsockname()[1]
    if ctx.auth is None and listen.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("CONNECT proxy on %s:%d has NO authentication: anyone who can reach this port can reach "
                    "every edge service (set proxy.auth, or listen on loopback / a private network only)",
                    listen.host, port)
    async with trio.open_nursery() as nursery:
        with ctx.listener_scope:  # cancelled to stop accepting (drain); open relays go on
            async with trio.SocketListener(sock) as listener:
                task_status.started(port)
                await accept_forever(listener, nursery, functools.partial(handle_client, ctx), "proxy.listen")


async def _send_error(stream: trio.SocketStream, conn: h11.Connection, rej: _Reject, metrics: Metrics) -> None:
    metrics.connect_answers.labels(str(rej.status)).inc()
    body = f"kins-tunnel: {rej.target or '-'}: {rej.reason}\n".encode()
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
               ("Connection", "close"), *rej.headers]
    try:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            data = conn.send(h11.Response(status_code=rej.status, headers=headers,
                                          reason=_REASONS.get(rej.status, "").encode()))
            data += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
        else:  # h11 refuses to answer (e.g. it could not parse a request line): answer raw
            data = (f"HTTP/1.1 {rej.status} {_REASONS.get(rej.status, '')}\r\n"
                    + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode() + body
        with trio.move_on_after(5):
            await stream.send_all(data)
            # Lingering close: closing with unread input would send RST and could destroy the
            # answer before the client reads it. Half-close, then discard input for a moment.
            await stream.send_eof()
        with trio.move_on_after(1):
            discarded = 0
            while discarded < (1 << 20):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                discarded += len(chunk)
    except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def _read_request(stream: trio.SocketStream, conn: h11.Connection) -> h11.Request:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(16384)
            conn.receive_data(data)  # b"" = EOF; h11 then raises or reports ConnectionClosed
            continue
        if isinstance(event, h11.Request):
            return event
        raise _Reject(400, "", "connection closed before a complete request")


def _header(request: h11.Request, name: bytes) -> bytes | None:
    for k, v in request.headers:
        if k == name:
            return v
    return None


async def handle_client(ctx: ProxyContext, stream: trio.SocketStream) -> None:
    settings = ctx.settings
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=settings.max_request_bytes)
    ctx.active += 1
    tunnel_stream: TunnelStream | None = None
    target = ""
    try:
        try:
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        except OSError:
            pass
        try:
            if ctx.active > settings.max_connections:
                raise _Reject(503, "", f"too many client connections (limit {settings.max_connections})")
            with trio.move_on_after(settings.header_timeout) as scope:
                request = await _read_request(stream, conn)
            if scope.cancelled_caught:
                raise _Reject(408, "", f"request not received within {settings.header_timeout:g}s")
            target = request.target.decode("ascii", "replace")
            if request.http_version not in (b"1.0", b"1.1"):  # h11 parses any digit.digit
                raise _Reject(400, target, f"unsupported HTTP version {request.http_version.decode()}")
            if request.method != b"CONNECT":
                raise _Reject(405, target, f"method {request.method.decode('ascii', 'replace')} not allowed: "
                              "this is a CONNECT proxy", [("Allow", "CONNECT")])
            if ctx.auth is not None and not ctx.auth.check(_header(request, b"proxy-authorization")):
                raise _Reject(407, target, "proxy authentication required", [("Proxy-Authenticate", REALM)])
            try:
                name = normalise_target(target)
            except ValueError as exc:
                raise _Reject(400, target, f"bad target: {exc}") from None
            tunnel_stream = await _open(ctx, name, target)
        except h11.RemoteProtocolError as exc:
            await _send_error(stream, conn, _Reject(exc.error_status_hint, target,
                                                     f"malformed request: {str(exc).split(':')[0][:100]}"),
                              ctx.metrics)
            return
        except _Reject as rej:
            extra = {"target": rej.target, "status": rej.status, "outcome": rej.reason}
            if rej.route is not None:
                extra["unit"], extra["node"] = rej.route
            log.info("CONNECT refused", extra=extra)
            await _send_error(stream, conn, rej, ctx.metrics)
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        # Tunnel open: answer 200 and become a byte pipe.
        ctx.metrics.connect_answers.labels("200").inc()
        try:
            await stream.send_all(conn.send(h11.Response(status_code=200, headers=[],
                                                         reason=b"Connection established")))
            leftover, _closed = conn.trailing_data
            if leftover:
                await tunnel_stream.send_all(leftover)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            tunnel_stream.abort(ErrorCode.CANCEL, "client went away")
            return
        stream_ref, tunnel_stream = tunnel_stream, None
        result = await relay(stream, stream_ref)
        ctx.metrics.relay_bytes.labels("to_edge").inc(result.a_to_b + len(leftover))
        ctx.metrics.relay_bytes.labels("from_edge").inc(result.b_to_a)
        unit, node = getattr(stream_ref, "route", ("", ""))
        log.info("CONNECT done", extra={"target": target, "unit": unit, "node": node,
                                        "stream": stream_ref.stream_id,
                                        "sent": result.a_to_b + len(leftover), "received": result.b_to_a,
                                        "outcome": result.error or "closed"})
    finally:
        ctx.active -= 1
        if tunnel_stream is not None:
            tunnel_stream.abort(ErrorCode.CANCEL, "client went away")
        await trio.aclose_forcefully(stream)


async def _open(ctx: ProxyContext, name: str, target: str) -> TunnelStream:
    """Open a stream to `name` on the best tunnel, trying another on retryable refusals."""
    t0 = trio.current_time()
    last: OpenError | None = None
    route: tuple[str, str] | None = None
    tried = 0
    for tunnel in ctx.registry.candidates(name):
        if tried == MAX_ATTEMPTS:
            break
        tried += 1
        route = (tunnel.identity.unit, tunnel.identity.node)
        try:
            stream = await tunnel.session.open_stream(name, ctx.settings.dial_timeout)
        except OpenError as exc:
            last = exc
            if exc.code in _RETRYABLE:
                continue
            break
        ctx.metrics.streams.inc()
        ctx.metrics.dial_seconds.observe(trio.current_time() - t0)
        stream.route = (tunnel.identity.unit, tunnel.identity.node)  # type: ignore[attr-defined]
        return stream
    if last is None or last.code in _RETRYABLE:
        ctx.metrics.dial_failures.labels("no_edge").inc()
        reason = "no connected edge serves this name" if last is None else f"no edge available ({last.message})"
        raise _Reject(503, target, reason)
    code = ErrorCode.from_wire(int(last.code))
    label = code.name.lower() if isinstance(code, ErrorCode) else str(code)
    ctx.metrics.dial_failures.labels(label).inc()
    status = _STATUS_FOR_CODE.get(code, 502) if isinstance(code, ErrorCode) else 502
    raise _Reject(status, target, f"edge could not open the stream: {last.message} ({label})", route=route)
