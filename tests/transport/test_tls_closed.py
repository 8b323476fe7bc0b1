"""A closed `TLSSocket` never touches its descriptor number again.

The number of a closed socket is the next one the kernel hands out (the lowest free), often to a
connection accepted in the same scheduling round: a proxy client's, another edge's. A session's
reader task that was already woken for readability when another task of the session closed the
tunnel resumes without a checkpoint in between and calls `receive_into`; a writer may still call
`send_chunk`/`flush`. Had they used the number, the reader would have swallowed the new
connection's first bytes (a client's CONNECT request never seen by the proxy, which then waits for
it until the client gives up) and the writer would have put tunnel ciphertext into someone else's
connection. Here the number is taken over on purpose (`dup2`) to make the reuse certain.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from kins_tunnel.transport.tls import TransportError
from tests.e2e.harness import make_certs
from tests.transport.test_session import tls_pair


@contextmanager
def takeover(number: int) -> Iterator[socket.socket]:
    """A fresh connected socket pair one end of which now has descriptor `number` (closed at the
    end); yields the other end (what a peer of the newcomer writes into and reads from)."""
    a, b = socket.socketpair()
    if b.fileno() == number:  # the kernel handed the freed number out again by itself
        a, b = b, a
    if a.fileno() != number:
        os.dup2(a.fileno(), number)
        a.close()
        a = socket.socket(fileno=number)
    try:
        yield b
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("side", ["cloud", "edge"])
async def test_a_closed_socket_reads_nothing_from_a_descriptor_reused_by_another(
    tmp_path: Path, side: str
) -> None:
    server, client = await tls_pair(make_certs(tmp_path))
    closed, other = (server, client) if side == "cloud" else (client, server)
    number = closed.fileno()
    closed.close()
    with takeover(number) as peer:
        peer.sendall(b"CONNECT x:1 HTTP/1.1\r\n\r\n")
        with pytest.raises(TransportError, match="closed"):
            closed.receive_into(memoryview(bytearray(4096)))
        newcomer = socket.socket(fileno=os.dup(number))
        newcomer.setblocking(False)
        try:  # the newcomer's bytes are all still there for its own reader
            assert newcomer.recv(4096) == b"CONNECT x:1 HTTP/1.1\r\n\r\n"
        finally:
            newcomer.close()
    other.close()
    await trio.lowlevel.checkpoint()


async def test_a_closed_socket_writes_nothing_into_a_descriptor_reused_by_another(
    tmp_path: Path,
) -> None:
    server, client = await tls_pair(make_certs(tmp_path))
    number = server.fileno()
    server.close()
    with takeover(number) as peer:
        with pytest.raises(TransportError, match="closed"):
            server.send_chunk(b"a frame for the edge that is gone")
        with pytest.raises(TransportError, match="closed"):
            server.flush()
        peer.setblocking(False)
        with pytest.raises(BlockingIOError):  # nothing reached the newcomer's connection
            peer.recv(4096)
    client.close()
