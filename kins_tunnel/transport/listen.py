"""Listening sockets: open one (or a one-line UserError), and accept from it until cancelled."""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable

import trio

from kins_tunnel.errors import UserError

log = logging.getLogger("kins_tunnel.listen")


def open_listener_socket(host: str, port: int, what: str) -> trio.socket.SocketType:
    """A bound, listening trio socket, or UserError naming `what` ("tunnel.listen") and the reason."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(4096)
    except OSError as exc:
        sock.close()
        raise UserError(f"{what}: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return trio.socket.from_stdlib_socket(sock)


async def accept_forever(listener: trio.SocketListener, nursery: trio.Nursery,
                         handler: Callable[[trio.SocketStream], Awaitable[object]], what: str) -> None:
    """Start `handler(stream)` in `nursery` for every connection. Accept errors (e.g. out of file
    descriptors) are logged and retried after a short pause: the listener keeps serving."""
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            log.warning("%s: accept failed: %s", what, exc)
            await trio.sleep(0.05)
            continue
        nursery.start_soon(handler, stream)
