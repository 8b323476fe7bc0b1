"""Dialling a TLS tunnel connection: TCP (directly or through the edge's site proxy), then the
TLS handshake of a `tls.TLSSocket` (`connect_tls`)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Awaitable, Callable

import trio

from kins_tunnel.transport.tls import TLSSocket, TransportError, describe_error


async def connect_tls(
    host: str,
    port: int,
    context: ssl.SSLContext,
    *,
    server_hostname: str,
    open_stream: Callable[[str, int], Awaitable[trio.SocketStream]] | None = None,
    session: ssl.SSLSession | None = None,
) -> TLSSocket:
    """TCP connect (trio, happy-eyeballs over every address) then wrap; the caller sets deadlines.

    `open_stream(host, port)` replaces the direct TCP connect (the edge's site proxy); `session`
    is offered for resumption (see `TLSSocket.wrap`). Raises `TransportError` (`Refused` when the
    cloud shed the connection with a retry-after hint)."""
    try:
        stream = await (open_stream or trio.open_tcp_stream)(host, port)
    except OSError as exc:
        raise TransportError(f"cannot connect to {host}:{port}: {describe_error(exc)}") from exc
    fd = stream.socket.detach()
    sock = socket.socket(fileno=fd)
    tls = TLSSocket.wrap(
        sock, context, server_side=False, server_hostname=server_hostname, session=session
    )
    try:
        await tls.do_handshake()
    except BaseException:
        tls.close()
        raise
    return tls
