"""Listening sockets: open one (or a one-line UserError), and serve it with one task per connection.

`serve_port` is the whole life of a listening port: bind (`open_listener_socket`), report the port,
serve every connection (`serve_listener`) until cancelled or until its `stop` scope is cancelled;
stopping closes the port but waits for the connections being served (a drain).

Every connection's handler runs behind a failure-isolation boundary: an exception it lets out is a
bug, reported once (log with traceback, `kins_tunnel_internal_errors_total{where}`), and ends that
connection only; the listener and every other connection go on. Accepting is `trio.serve_listeners`,
which pauses on EMFILE/ENFILE/ENOMEM/ENOBUFS (out of descriptors or memory) and retries.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Awaitable, Callable

import trio

from kins_tunnel.errors import UserError
from kins_tunnel.names import Address, is_loopback_host
from kins_tunnel.transport.isolation import ErrorReporter

log = logging.getLogger("kins_tunnel.listen")

LISTEN_BACKLOG = 4096


def open_listener_socket(host: str, port: int, what: str) -> trio.socket.SocketType:
    """A bound, listening trio socket, or UserError naming `what` ("tunnel.listen") and the reason."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise UserError(f"{what}: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return trio.socket.from_stdlib_socket(sock)


async def _isolated(
    handler: Callable[[trio.SocketStream], Awaitable[object]],
    where: str,
    report: ErrorReporter,
    stream: trio.SocketStream,
) -> None:
    try:
        await handler(stream)
    except Exception as exc:  # a bug in the handler: this connection ends, nothing else does
        report(where, exc)
    finally:
        await trio.aclose_forcefully(stream)


async def serve_listener(
    listener: trio.SocketListener,
    handler: Callable[[trio.SocketStream], Awaitable[object]],
    *,
    where: str,
    report: ErrorReporter,
    handler_nursery: trio.Nursery | None = None,
) -> None:
    """Run `handler(stream)` for every connection until cancelled, each behind an isolation
    boundary named `where` (a fixed label: "proxy", "tunnel", "admin")."""
    await trio.serve_listeners(
        functools.partial(_isolated, handler, where, report),
        [listener],
        handler_nursery=handler_nursery,
    )


async def serve_port(
    listen: Address,
    what: str,
    handler: Callable[[trio.SocketStream], Awaitable[object]],
    *,
    where: str,
    report: ErrorReporter,
    stop: trio.CancelScope | None = None,
    on_listening: Callable[[int], object] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on `listen` (errors name the setting `what`) and serve it with `serve_listener`.

    `on_listening(port)` runs once the port is bound, then `task_status.started(port)`. Cancelling
    `stop` closes the port; the connections being served go on, and this returns after them."""
    sock = open_listener_socket(listen.host, listen.port, what)
    port = sock.getsockname()[1]
    if on_listening is not None:
        on_listening(port)
    async with trio.open_nursery() as nursery:
        with stop if stop is not None else trio.CancelScope():
            task_status.started(port)
            await serve_listener(
                trio.SocketListener(sock),
                handler,
                where=where,
                report=report,
                handler_nursery=nursery,
            )


def warn_unauthenticated(what: str, host: str, port: int, remedy: str) -> None:
    """Warn that the listener `what` on a non-loopback address lets anyone reach every edge."""
    if not is_loopback_host(host):
        log.warning(
            "%s on %s:%d has NO authentication: anyone who can reach this port can reach every "
            "edge service (%s)",
            what,
            host,
            port,
            remedy,
        )
