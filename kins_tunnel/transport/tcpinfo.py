"""What the kernel knows about a connection before we read from it (Linux `TCP_INFO`).

A connection can wait in the listen backlog and then in the handshake queue before its first byte
is read; during a reconnect storm the edge that opened it may have given up meanwhile (its own
handshake deadline counts from its connect, not from our accept). Running a TLS handshake for it
is wasted work that makes the next edges wait longer still. `peer_state` tells, with one system
call and without reading, whether the peer has already closed its side and how long ago its last
bytes (the ClientHello) arrived. Where `TCP_INFO` is missing it says "open, just arrived".
"""

from __future__ import annotations

import socket
import struct
from typing import Protocol

_STATE_ESTABLISHED = 1
_LAST_DATA_RECV = struct.Struct("=I")  # tcpi_last_data_recv, milliseconds
_LAST_DATA_RECV_OFFSET = 52
_INFO_BYTES = 104


class _Socket(Protocol):
    def getsockopt(self, level: int, option: int, buflen: int) -> bytes: ...


def peer_state(sock: _Socket) -> tuple[bool, float]:
    """(the peer has closed or reset the connection, seconds since its last data arrived)."""
    option = getattr(socket, "TCP_INFO", None)
    if option is None:  # pragma: no cover - not Linux
        return False, 0.0
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, option, _INFO_BYTES)
    except OSError:
        return True, 0.0  # no such connection any more
    if len(info) < _LAST_DATA_RECV_OFFSET + _LAST_DATA_RECV.size:  # pragma: no cover
        return False, 0.0
    closed = info[0] != _STATE_ESTABLISHED
    return closed, _LAST_DATA_RECV.unpack_from(info, _LAST_DATA_RECV_OFFSET)[0] / 1000
