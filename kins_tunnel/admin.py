"""The admin HTTP endpoint (h11): GET /healthz, /readyz, /metrics and /status.

Small and strict: one request per connection, one deadline for the whole exchange (from accept:
read, route and write), GET and HEAD only. Every other method on every path gets 405 with `Allow`,
an unknown path 404, a malformed request 400; whatever the request, the answer is complete and
the process goes on (the handler runs behind the listener's failure-isolation boundary). Cloud and
edge each plug in their own readiness and status (a callable returning status, content type and
body).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Protocol

import h11
import trio

from kins_tunnel.config import AdminSettings
from kins_tunnel.httpanswer import error_answer
from kins_tunnel.metrics import Metrics
from kins_tunnel.transport.listen import serve_port

log = logging.getLogger("kins_tunnel.admin")

Route = Callable[[], tuple[int, str, bytes]]
TIMEOUT = 10.0  # seconds for a whole exchange, from accept
MAX_REQUEST = 8192  # request line and headers
ALLOWED = (b"GET", b"HEAD")


def text(status: int, body: str) -> tuple[int, str, bytes]:
    return status, "text/plain; charset=utf-8", body.encode()


class Served(Protocol):
    """What the admin endpoint reports on: a cloud or an edge."""

    @property
    def ready(self) -> bool: ...

    not_ready: str  # the /readyz body while not ready
    metrics: Metrics

    def status(self) -> tuple[int, str, bytes]: ...


async def serve_admin(
    settings: AdminSettings,
    served: Served,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve /healthz, /readyz (200, or 503 while `served.ready` is false), /metrics and /status
    on `settings.listen` until cancelled; `task_status.started(port)` once listening. At most
    `settings.max_connections` at once (beyond: closed at accept); a connection gets
    `settings.idle_timeout` seconds for its exchange. Both are counted in
    `kins_tunnel_listener_limits_total{listener="admin"}`."""
    limits = served.metrics.listener_limits
    routes: dict[str, Route] = {
        "/healthz": lambda: text(200, "ok\n"),
        "/readyz": lambda: text(200, "ready\n") if served.ready else text(503, served.not_ready),
        "/metrics": served.metrics.render,
        "/status": served.status,
    }
    await serve_port(
        settings.listen,
        "admin.listen",
        functools.partial(
            _handle,
            routes=routes,
            timeout=settings.idle_timeout,
            on_timeout=limits.labels("admin", "idle_timeout").inc,
        ),
        where="admin",
        report=served.metrics.report_internal_error,
        max_connections=settings.max_connections,
        on_refused=limits.labels("admin", "max_connections").inc,
        task_status=task_status,
    )


def answer(
    routes: dict[str, Route], method: bytes, target: bytes
) -> tuple[int, str, bytes, list[tuple[str, str]]]:
    """(status, content type, body, extra headers) for one request."""
    path = target.decode("ascii", "replace").split("?", 1)[0]
    if method not in ALLOWED:
        return (
            *text(405, f"method {method.decode('ascii', 'replace')[:32]} not allowed: use GET\n"),
            [("Allow", "GET, HEAD")],
        )
    route = routes.get(path)
    if route is None:
        return (*text(404, f"no such endpoint: {path[:200]}\n"), [])
    return (*route(), [])


async def _handle(
    stream: trio.SocketStream,
    *,
    routes: dict[str, Route],
    timeout: float = TIMEOUT,
    on_timeout: Callable[[], object] = lambda: None,
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
    with trio.move_on_after(timeout) as scope:
        try:
            request = None
            while request is None:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(8192))
                elif isinstance(event, h11.Request):
                    request = event
                else:
                    return  # the client closed before a whole request
            status, ctype, body, extra = answer(routes, request.method, request.target)
        except h11.RemoteProtocolError as exc:
            request = None
            status, ctype, body, extra = *text(exc.error_status_hint, "malformed request\n"), []
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        headers = [
            ("Content-Type", ctype),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
            *extra,
        ]
        try:
            data = error_answer(
                conn, status, headers, body, with_body=request is None or request.method != b"HEAD"
            )
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    if scope.cancelled_caught:
        on_timeout()
