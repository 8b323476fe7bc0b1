"""Direct delivery into a relay's socket (`TunnelStream.copy_to_socket`) and its ownership rule
(docs/DESIGN.md, "Transport objects and who owns what"): the session's reader task writes into the
relay's socket only while the relay holds no bytes of the stream and is not writing. In debug mode
(`proto.ownership`, on for the whole test suite) a conflict detector that both writers enter
catches a write that breaks it; the normal paths never trip it."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from kins_tunnel.proto import ownership
from kins_tunnel.transport.relay import relay
from kins_tunnel.transport.stream import TunnelStream
from tests.transport.test_session_memory import accept_into, memory_pair


@asynccontextmanager
async def relayed_stream() -> AsyncIterator[tuple[TunnelStream, TunnelStream, trio.SocketStream]]:
    """(ours, theirs, far): `ours` is a cloud stream over memory sessions; the edge's end of it,
    `theirs`, is relayed (`relay`) into one socket of a socket pair, whose other socket is `far`."""
    send, got = trio.open_memory_channel[TunnelStream](1)
    async with memory_pair(accept_into(send)) as (cloud, _edge, _a, _b):
        ours = await cloud.open_stream("x:1", timeout=5)
        theirs = await got.receive()
        near_sock, far_sock = trio.socket.socketpair()
        near_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
        far_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        near, far = trio.SocketStream(near_sock), trio.SocketStream(far_sock)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(relay, theirs, near)
                await trio.testing.wait_all_tasks_blocked()  # the relay has lent the socket
                yield ours, theirs, far
                nursery.cancel_scope.cancel()
        finally:
            await far.aclose()  # `relay` closes `near`


def fill(fd: int) -> None:
    """Write into a non-blocking socket until it takes no more."""
    with pytest.raises(BlockingIOError):
        while True:
            os.write(fd, b"f" * 65536)


async def test_bytes_relayed_both_ways_never_trip_the_check() -> None:
    """8 MiB from the tunnel into the socket (the first bytes written directly by the reader task,
    the rest by the relay once the socket was full) and 1 MiB back, with the check on."""
    down = hashlib.sha256(b"down").digest() * (8 * 1024 * 1024 // 32)
    up = hashlib.sha256(b"up").digest() * (1024 * 1024 // 32)
    received = bytearray()
    echoed = bytearray()
    async with relayed_stream() as (ours, theirs, far):
        with trio.fail_after(30):
            await ours.send_all(down[:4096])  # into an empty socket: written by the reader task
            while len(received) < 4096:
                received += await far.receive_some()
            assert theirs.direct_bytes == 4096
            async with trio.open_nursery() as nursery:

                async def send_down() -> None:
                    await ours.send_all(down[4096:])
                    await ours.send_eof()

                async def send_up() -> None:
                    await far.send_all(up)
                    await far.send_eof()

                async def read_up() -> None:
                    while data := await ours.receive_some():
                        echoed.extend(data)

                nursery.start_soon(send_down)
                nursery.start_soon(send_up)
                nursery.start_soon(read_up)
                await trio.testing.wait_all_tasks_blocked()  # the socket is full: the relay waits
                while data := await far.receive_some():
                    received.extend(data)
    assert received == down
    assert echoed == up
    assert theirs.direct_bytes >= 4096 and theirs.copied_bytes > 0  # both writers wrote
    assert theirs.direct_bytes + theirs.copied_bytes == len(down)
    assert ownership.take_violations() == []


async def test_a_direct_write_while_the_relay_writes_is_caught() -> None:
    """A deliberate violation: while the relay waits inside its write into a full socket, the
    stream is made to believe the relay holds nothing (as a relay that said so before its write
    returned would). The reader's next delivery would write into the socket under the relay's
    write; the detector raises instead, and the violation is recorded."""
    async with relayed_stream() as (ours, theirs, _far):
        with trio.fail_after(10):
            fill(_near_fd(theirs))
            await ours.send_all(b"held by the relay")  # the socket is full: queued, relay takes it
            await trio.testing.wait_all_tasks_blocked()  # the relay waits inside its write
            assert theirs.copied_bytes == 0 and theirs.direct_bytes == 0
            theirs._sink_busy = False  # noqa: SLF001  (the bug: "the relay holds nothing")
            with pytest.raises(ownership.OwnershipError, match="two writers at once"):
                theirs.deliver(b"would cut in", False)
            assert len(ownership.take_violations()) == 1
            assert theirs.direct_bytes == 0  # nothing was written


async def test_a_direct_write_while_the_relay_holds_bytes_is_caught() -> None:
    """The rule is checked where the reader writes, not only where it decides to: a write while
    the relay holds bytes it has not started to write is caught too."""
    async with relayed_stream() as (_ours, theirs, _far):
        with trio.fail_after(10):
            await trio.testing.wait_all_tasks_blocked()
            theirs._sink_busy = True  # noqa: SLF001  (as `receive_some` sets it for the relay)
            with pytest.raises(ownership.OwnershipError, match="holds bytes"):
                theirs._try_direct(_near_fd(theirs), b"x")  # noqa: SLF001  (a careless caller)
            assert len(ownership.take_violations()) == 1
            theirs._sink_busy = False  # noqa: SLF001


def _near_fd(stream: TunnelStream) -> int:
    fd = stream._sink  # noqa: SLF001  (the socket lent by the relay)
    assert fd is not None
    return fd
