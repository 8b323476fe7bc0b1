"""What a `TLSSocket` keeps after bulk traffic: OpenSSL's memory BIOs never shrink, so whatever
goes through them at once stays allocated for the connection's life. A tunnel that once carried
a large transfer must cost about what an idle one does (memory is bounded by configuration, never
by traffic). Measured in the C heap (glibc's `mallinfo2`), where OpenSSL's state lives, over real
TLS connections on loopback."""

from __future__ import annotations

import functools
import gc
import hashlib
import os
import sys
from pathlib import Path

import pytest
import trio

from benchmarks.idlemem import mallinfo
from kins_tunnel.transport.tls import (
    MIN_READ,
    READ_BATCH,
    READ_PIECE,
    TLSSocket,
    TransportError,
)
from tests.e2e.harness import make_certs
from tests.transport.test_session import tls_pair, unshaken_pair

PAIRS = 24
BULK = 4 * 1024 * 1024  # bytes each way per connection
# what the session's writer hands over (`writer.WRITE_BATCH` and more), and smaller pieces
CHUNKS = (256 * 1024, 300_000, 1000, 65_537, 16 * 1024)
BOUND_KIB = 80  # what one end may keep after bulk traffic, over what a handshake-only end keeps

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not mallinfo(), reason="needs glibc's mallinfo2"
)


async def send_bulk(tls: TLSSocket, data: bytes) -> None:
    """`data` through `send_chunk` in chunks of the sizes of `CHUNKS`, as the session's writer
    does (wait writable, `flush`, never offer the same plaintext twice)."""
    view = memoryview(data)
    sent = i = 0
    while sent < len(view):
        size = CHUNKS[i % len(CHUNKS)]
        i += 1
        done = tls.send_chunk(view[sent : sent + size])
        sent += min(size, len(view) - sent)
        while not done:
            await tls.wait_writable()
            done = tls.flush()


async def receive_some(tls: TLSSocket, view: memoryview) -> int:
    """One `receive_into` as the session's reader makes it: after waiting if the last call
    drained the socket, and while nothing is ready. The byte count (0: EOF)."""
    while True:
        if tls.drained:
            tls.drained = False
            await tls.wait_readable()
        n = tls.receive_into(view)
        if n is not None:
            return n
        await tls.wait_readable()


async def receive_bulk(tls: TLSSocket, view: memoryview, size: int) -> str:
    """Read `size` bytes into a `READ_BATCH` view per call; their SHA-256."""
    digest = hashlib.sha256()
    got = 0
    while got < size:
        n = await receive_some(tls, view)
        if n == 0:
            raise TransportError(f"EOF after {got} of {size} bytes")
        digest.update(view[:n])
        got += n
    return digest.hexdigest()


async def exchange(
    server: TLSSocket, client: TLSSocket, views: tuple[memoryview, memoryview]
) -> None:
    """`BULK` bytes each way at once; both arrive intact."""
    up, down = os.urandom(BULK), os.urandom(BULK)
    digests: dict[str, str] = {}

    async def receive(name: str, tls: TLSSocket, view: memoryview) -> None:
        digests[name] = await receive_bulk(tls, view, BULK)

    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            n.start_soon(send_bulk, client, up)
            n.start_soon(send_bulk, server, down)
            n.start_soon(receive, "up", server, views[0])
            n.start_soon(receive, "down", client, views[1])
    assert digests == {
        "up": hashlib.sha256(up).hexdigest(),
        "down": hashlib.sha256(down).hexdigest(),
    }
    assert server.pending == client.pending == 0


def heap_in_use() -> int:
    gc.collect()
    return mallinfo()["in_use"]


async def test_a_connection_that_carried_bulk_traffic_keeps_what_an_idle_one_keeps(
    tmp_path: Path,
) -> None:
    certs = make_certs(tmp_path)
    views = (memoryview(bytearray(READ_BATCH)), memoryview(bytearray(READ_BATCH)))
    warm = await tls_pair(certs)  # the run's shared buffers, the session cache: made once
    await exchange(*warm, views)
    for tls in warm:
        tls.close()
    del warm

    before = heap_in_use()
    idle = [await tls_pair(certs) for _ in range(PAIRS)]
    handshaken = heap_in_use()
    busy = []
    for _ in range(PAIRS):
        pair = await tls_pair(certs)
        await exchange(*pair, views)
        busy.append(pair)
    after = heap_in_use()

    idle_kib = (handshaken - before) / (2 * PAIRS) / 1024
    busy_kib = (after - handshaken) / (2 * PAIRS) / 1024
    for tls in [t for pair in idle + busy for t in pair]:
        tls.close()
    print(f"per end: handshake only {idle_kib:.1f} KiB, after bulk {busy_kib:.1f} KiB")
    assert busy_kib - idle_kib < BOUND_KIB, (idle_kib, busy_kib)


async def test_views_of_any_size_get_every_byte_and_the_incoming_bio_stays_small(
    tmp_path: Path,
) -> None:
    """Views that fill up in the middle of a read (the rest of it goes to OpenSSL), views smaller
    than a record or than `MIN_READ`: the bytes arrive in order, and OpenSSL's incoming BIO never
    holds more than a record (`READ_PIECE`) and a minimal read."""
    server, client = await tls_pair(make_certs(tmp_path))
    data = os.urandom(BULK)
    buf = memoryview(bytearray(READ_BATCH))
    sizes = (1, 1000, 20_000, 300_000, READ_BATCH, 5000)
    received = bytearray()
    most = 0
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as n:
                n.start_soon(send_bulk, client, data)
                i = 0
                while len(received) < BULK:
                    got = await receive_some(server, buf[: sizes[i % len(sizes)]])
                    most = max(most, server._in.pending)
                    assert got, "EOF"
                    received += buf[:got]
                    i += 1
    finally:
        server.close()
        client.close()
    assert received == data
    assert most <= READ_PIECE + MIN_READ, most


async def test_bulk_right_behind_the_handshake_does_not_grow_the_incoming_bio(
    tmp_path: Path,
) -> None:
    """A client that sends a batch at once behind its Finished: the server's last handshake read
    has both, and what follows the handshake goes to OpenSSL whole, so that read is bounded."""
    certs = make_certs(tmp_path)
    server, client = unshaken_pair(certs)
    sent = trio.Event()
    answers = 0

    async def after_the_clients_data() -> None:  # the server's handshake reads only then
        nonlocal answers
        answers += 1
        if answers == 2:  # the client's second flight (its certificate, Finished) is due
            await sent.wait()
            await trio.sleep(0.05)  # on loopback, in the socket by then

    async def client_side() -> None:
        await client.do_handshake()
        assert client.send_chunk(os.urandom(200_000)) or client.pending
        sent.set()
        while not client.flush():
            await client.wait_writable()

    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                n.start_soon(client_side)
                n.start_soon(
                    functools.partial(server.do_handshake, peer_answered=after_the_clients_data)
                )
        assert answers >= 2
        assert server._in.pending <= READ_PIECE, server._in.pending
        got = 0
        view = memoryview(bytearray(READ_BATCH))
        with trio.fail_after(10):
            while got < 200_000:
                got += await receive_some(server, view)
        assert got == 200_000
    finally:
        server.close()
        client.close()
