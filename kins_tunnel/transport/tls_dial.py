"""Dialling a TLS tunnel connection: TCP (directly or through the edge's site proxy), then the
TLS handshake of a `tls.TLSSocket` (`connect_tls`).

A numeric address (what tunnel-edge's keepers dial: they resolve the cloud's name themselves, one
keeper per address) is connected with one non-blocking `connect` and a wait until the socket is
writable (`connect_ip`): no resolver call, no happy-eyeballs nursery, no trio stream to take the
socket back out of. After a replica restart every edge of the fleet dials it again, most of them
more than once (refused while it is down, shed while it is busy), so the cost of a dial is paid
thousands of times in a few seconds on the edges' side. A name (and the site-proxy path) keeps
`trio.open_tcp_stream`, which resolves it and tries every address.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
from collections.abc import Awaitable, Callable

import trio
import trio.lowlevel

from kins_tunnel.transport.tls import TLSSocket, TransportError, describe_error


def numeric_address(host: str, port: int) -> tuple[socket.AddressFamily, tuple[object, ...]] | None:
    """`(family, sockaddr)` when `host` is an IPv4 or IPv6 literal (a scoped one too), else None.
    Never touches a resolver (`AI_NUMERICHOST`)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError, ValueError):
        return None
    if not infos:  # pragma: no cover - getaddrinfo answers an address or raises
        return None
    family, _type, _proto, _name, sockaddr = infos[0]
    return family, sockaddr


async def connect_ip(family: socket.AddressFamily, sockaddr: tuple[object, ...]) -> socket.socket:
    """A TCP connection to a numeric `sockaddr` (from `numeric_address`): non-blocking connect,
    then wait until writable and read the outcome (`SO_ERROR`). The caller owns the socket
    returned; on any error or cancellation the socket is closed here. Raises `OSError`."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        err = sock.connect_ex(sockaddr)
        if err in (errno.EINPROGRESS, errno.EAGAIN):
            await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        else:
            await trio.lowlevel.checkpoint()  # an await that may yield, as its name promises
        if err:
            raise OSError(err, os.strerror(err))
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_tls(
    host: str,
    port: int,
    context: ssl.SSLContext,
    *,
    server_hostname: str,
    open_stream: Callable[[str, int], Awaitable[trio.SocketStream]] | None = None,
    session: ssl.SSLSession | None = None,
) -> TLSSocket:
    """TCP connect then wrap; the caller sets deadlines. A numeric `host` is connected directly
    (`connect_ip`); a name through trio (happy-eyeballs over every address it resolves to).

    `open_stream(host, port)` replaces the direct TCP connect (the edge's site proxy); `session`
    is offered for resumption (see `TLSSocket.wrap`). Raises `TransportError` (`Refused` when the
    cloud shed the connection with a retry-after hint)."""
    numeric = None if open_stream is not None else numeric_address(host, port)
    try:
        if numeric is not None:
            sock = await connect_ip(*numeric)
        else:
            stream = await (open_stream or trio.open_tcp_stream)(host, port)
            sock = socket.socket(fileno=stream.socket.detach())
    except OSError as exc:
        raise TransportError(f"cannot connect to {host}:{port}: {describe_error(exc)}") from exc
    tls = TLSSocket.wrap(
        sock, context, server_side=False, server_hostname=server_hostname, session=session
    )
    try:
        await tls.do_handshake()
    except BaseException:
        tls.close()
        raise
    return tls
