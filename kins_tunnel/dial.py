"""Dial a target within a deadline, and say on the wire why a dial failed.

Both directions of the tunnel dial through here: the edge's forwarder (the cloud opened a stream
to one of the edge's `services`) and the cloud's uplink server (an edge opened a stream to a
target its unit may reach, `uplinks`). A target may list several addresses (an L5 unit's three
K3s servers) and a name may resolve to several IPs: they are tried in turn within one overall
deadline, each address getting a fair share of the time left. Failures map to wire codes, which
the side that asked turns into its own answer: refused → REFUSED, no answer in time → TIMEOUT,
anything else (no route, DNS failure, ...) → UNREACHABLE.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence

import trio

from kins_tunnel.errors import OpenFailed
from kins_tunnel.names import Address
from kins_tunnel.proto import ErrorCode


def code_for(exc: OSError) -> ErrorCode:
    """The wire code for a failed dial: refused → REFUSED (502), timed out → TIMEOUT (504),
    anything else (no route, DNS failure, ...) → UNREACHABLE (502)."""
    if isinstance(exc, ConnectionRefusedError):
        return ErrorCode.REFUSED
    if isinstance(exc, TimeoutError) or exc.errno == errno.ETIMEDOUT:
        return ErrorCode.TIMEOUT
    return ErrorCode.UNREACHABLE


async def connect_tcp(addr: Address) -> trio.SocketStream:
    """TCP connect to every address `addr` resolves to, in turn; raises the last OSError."""
    infos = await trio.socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM)
    last: OSError = OSError(f"{addr} resolves to nothing")
    for family, type_, proto, _canon, sockaddr in infos:
        sock = trio.socket.socket(family, type_, proto)
        try:
            await sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)
    raise last


async def dial_first(addrs: Sequence[Address], timeout: float) -> tuple[trio.SocketStream, Address]:
    """Connect to the first of `addrs` that answers, in order, within `timeout` in all.

    Returns the connection (TCP_NODELAY and keep-alive on) and the address it reached; raises
    `OpenFailed` with the code of the last failure (TIMEOUT if time ran out).
    """
    deadline = trio.current_time() + timeout
    last: OpenFailed | None = None
    for i, addr in enumerate(addrs):
        left = deadline - trio.current_time()
        if left <= 0:
            break
        share = left / (len(addrs) - i)  # leave time for the others
        with trio.move_on_after(share):
            try:
                tcp = await connect_tcp(addr)
            except OSError as exc:
                last = OpenFailed(code_for(exc), f"{addr}: {exc.strerror or exc}")
                continue
            try:
                tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError:
                pass
            return tcp, addr
        last = OpenFailed(ErrorCode.TIMEOUT, f"{addr}: no answer within {share:.3g}s")
    raise last or OpenFailed(ErrorCode.TIMEOUT, f"no answer within {timeout:g}s")
