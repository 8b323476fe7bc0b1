"""The admin HTTP endpoint (h11): GET /healthz, /readyz, /metrics and /status.

Small and strict: one request per connection, a deadline on every read and write, GET only.
Routes are plain callables returning (status, content type, body), so cloud and edge each plug in
their own readiness and status.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import h11
import trio

from kins_tunnel.config import Address
from kins_tunnel.transport.listen import accept_forever, open_listener_socket

log = logging.getLogger("kins_tunnel.admin")

Route = Callable[[], tuple[int, str, bytes]]
TIMEOUT = 10.0


def text(status: int, body: str) -> tuple[int, str, bytes]:
    return status, "text/plain; charset=utf-8", body.encode()


async def serve_admin(listen: Address, routes: dict[str, Route], *,
                      task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled; `task_status.started(port)` once listening."""
    sock = open_listener_socket(listen.host, listen.port, "admin.listen")
    listener = trio.SocketListener(sock)
    port = sock.getsockname()[1]
    async with listener, trio.open_nursery() as nursery:
        task_status.started(port)
        await accept_forever(listener, nursery, functools.partial(_handle, routes=routes), "admin.listen")


async def _handle(stream: trio.SocketStream, *, routes: dict[str, Route]) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=8192)
    try:
        with trio.fail_after(TIMEOUT):
            request = None
            while request is None:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(8192))
                elif isinstance(event, h11.Request):
                    request = event
                else:
                    return
            path = request.target.decode("ascii", "replace").split("?", 1)[0]
            route = routes.get(path)
            if request.method not in (b"GET", b"HEAD"):
                status, ctype, body = text(405, "only GET\n")
            elif route is None:
                status, ctype, body = text(404, f"no such endpoint: {path}\n")
            else:
                status, ctype, body = route()
            headers = [("Content-Type", ctype), ("Content-Length", str(len(body))), ("Connection", "close")]
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
            if request.method == b"GET":
                await stream.send_all(conn.send(h11.Data(data=body)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
    except (trio.TooSlowError, h11.RemoteProtocolError, trio.BrokenResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)
