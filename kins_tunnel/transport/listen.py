"""Listening sockets: open one (or a one-line SetupError), and serve it with one task per connection.

`serve_port` is the whole life of a listening port: bind (`open_listener_socket`), report the port,
serve every connection (`serve_listener`) until cancelled or until its `stop` scope is cancelled;
stopping closes the port but waits for the connections being served (a drain).

Every connection's handler runs behind a failure-isolation boundary: an exception it lets out is a
bug, reported once (log with traceback, `kins_tunnel_internal_errors_total{where}`), and ends that
connection only; the listener and every other connection go on. Accepting is `trio.serve_listeners`,
which pauses on EMFILE/ENFILE/ENOMEM/ENOBUFS (out of descriptors or memory) and retries.

`trio.serve_listeners` takes one connection per scheduling round: with hundreds of tasks runnable
(a reconnect storm's handshakes), connections wait in the kernel's listen backlog, their peers'
deadlines running. A listener given `accept_burst` (a function: how many may be taken now, at
least one) instead accepts, at each wake-up, the connections the backlog holds, up to that many,
before yielding, and pauses on the same errors. The function lets its owner take only what it
has room for: the rest waits in the backlog, which costs the process nothing.

A listener may be capped (`max_connections`): a connection accepted while that many are being
served is closed at once, before any byte is read, and `on_refused()` counts it; so a flood at
one port costs a bounded number of descriptors and tasks, whatever its size.
"""

from __future__ import annotations

import errno
import functools
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from kins_tunnel.names import Address, authority, is_loopback_host
from kins_tunnel.transport.errors import SetupError
from kins_tunnel.transport.isolation import ErrorReporter

log = logging.getLogger("kins_tunnel.listen")

LISTEN_BACKLOG = 4096
# accept() errors that are one connection's (it went before it was taken, or a firewall rule
# refused it: EPERM on Linux): skip it (the same set trio.serve_listeners skips)
_LOST_CONNECTION_ERRNOS = {
    getattr(errno, name)
    for name in (
        "EPERM",
        "ECONNRESET",
        "ETIMEDOUT",
        "ENOSR",
        "ESOCKTNOSUPPORT",
        "EPROTONOSUPPORT",
        "ECONNABORTED",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
    )
    if hasattr(errno, name)
}
# accept() errors that are the process's (out of descriptors or memory): pause, then retry
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
RESOURCE_PAUSE = 0.1  # seconds, as trio.serve_listeners


def open_listener_socket(host: str, port: int, what: str) -> trio.socket.SocketType:
    """A bound, listening trio socket, or SetupError naming `what` ("tunnel.listen") and the reason."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise SetupError(f"{what}: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return trio.socket.from_stdlib_socket(sock)


def peer_authority(sock: trio.socket.SocketType) -> str:
    """The peer of a connected socket as ``host:port`` (``[v6]:port``), or ``?`` once it is gone.

    A value from the network: escaped in logs, never a metric label."""
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "?"
    return authority(host, port)


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


@dataclass
class _Cap:
    limit: int
    on_refused: Callable[[], object] | None
    active: int = 0


async def _capped(
    cap: _Cap, serve: Callable[[trio.SocketStream], Awaitable[None]], stream: trio.SocketStream
) -> None:
    if cap.active >= cap.limit:
        if cap.on_refused is not None:
            cap.on_refused()
        await trio.aclose_forcefully(stream)
        return
    cap.active += 1
    try:
        await serve(stream)
    finally:
        cap.active -= 1


def _accept_now(raw: socket.socket) -> trio.SocketStream | None:
    """One connection from the non-blocking listening socket `raw`, or None if there is none
    (or it went before it was taken); OSError for the process's own errors."""
    try:
        conn, _ = raw.accept()
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno in _LOST_CONNECTION_ERRNOS:
            return None
        raise
    return trio.SocketStream(trio.socket.from_stdlib_socket(conn))


async def accept_bursts(
    listener: trio.SocketListener,
    serve: Callable[[trio.SocketStream], Awaitable[object]],
    nursery: trio.Nursery,
    burst: Callable[[], int],
) -> None:
    """Start `serve(stream)` in `nursery` for every connection until cancelled: at each wake-up,
    accept up to `burst()` connections (at least one; fewer if the backlog empties) before
    yielding. Closes the
    listener when it returns (as `trio.serve_listeners`)."""
    sock = listener.socket
    raw = socket.fromfd(sock.fileno(), sock.family, sock.type)  # a duplicate, closed below
    raw.setblocking(False)
    async with listener:
        try:
            while True:
                await trio.lowlevel.wait_readable(sock)
                for _ in range(max(burst(), 1)):
                    try:
                        stream = _accept_now(raw)
                    except OSError as exc:
                        if exc.errno not in _RESOURCE_ERRNOS:
                            raise
                        log.error("accept failed, pausing: %s", exc.strerror or exc)
                        await trio.sleep(RESOURCE_PAUSE)
                        break
                    if stream is None:
                        break
                    nursery.start_soon(serve, stream)
        finally:
            raw.close()


async def serve_listener(
    listener: trio.SocketListener,
    handler: Callable[[trio.SocketStream], Awaitable[object]],
    *,
    where: str,
    report: ErrorReporter,
    handler_nursery: trio.Nursery | None = None,
    max_connections: int | None = None,
    on_refused: Callable[[], object] | None = None,
    accept_burst: Callable[[], int] | None = None,
) -> None:
    """Run `handler(stream)` for every connection until cancelled, each behind an isolation
    boundary named `where` (a fixed label: "proxy", "tunnel", "admin"); with `max_connections`,
    at most that many at once (beyond: closed at once, `on_refused()` called); with
    `accept_burst`, up to `accept_burst()` accepted per wake-up (`accept_bursts`)."""
    serve: Callable[[trio.SocketStream], Awaitable[None]] = functools.partial(
        _isolated, handler, where, report
    )
    if max_connections is not None:
        serve = functools.partial(_capped, _Cap(max_connections, on_refused), serve)
    if accept_burst is None:
        await trio.serve_listeners(serve, [listener], handler_nursery=handler_nursery)
        return
    if handler_nursery is not None:
        await accept_bursts(listener, serve, handler_nursery, accept_burst)
        return
    async with trio.open_nursery() as nursery:
        await accept_bursts(listener, serve, nursery, accept_burst)


async def serve_port(
    listen: Address,
    what: str,
    handler: Callable[[trio.SocketStream], Awaitable[object]],
    *,
    where: str,
    report: ErrorReporter,
    stop: trio.CancelScope | None = None,
    on_listening: Callable[[int], object] | None = None,
    max_connections: int | None = None,
    on_refused: Callable[[], object] | None = None,
    accept_burst: Callable[[], int] | None = None,
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
                max_connections=max_connections,
                on_refused=on_refused,
                accept_burst=accept_burst,
            )


def warn_unauthenticated(
    what: str, host: str, port: int, remedy: str, reaches: str = "every edge service"
) -> None:
    """Warn that the listener `what` on a non-loopback address lets anyone reach `reaches`."""
    if not is_loopback_host(host):
        log.warning(
            "%s on %s:%d has NO authentication: anyone who can reach this port can reach %s (%s)",
            what,
            host,
            port,
            reaches,
            remedy,
        )
