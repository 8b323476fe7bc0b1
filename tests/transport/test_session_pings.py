"""How a session answers the peer's PINGs: a lone PING on an idle tunnel goes the direct path
(`Connection.answer_lone_ping`, `SessionWriter.send_direct`); a PING amid other frames or behind
queued output the protocol core's path. Either way the answer carries the PING's payload and keeps
the order of the session's output. The peer here is a bare `proto.Connection` over memory."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing

from kins_tunnel.proto import Connection, Hello, MuxConfig, Role
from kins_tunnel.proto.events import DataReceived, Event, PongReceived, StreamOpened
from kins_tunnel.proto.frames import ping_frame
from kins_tunnel.testing.memory_transport import MemoryTransport, memory_transport_pair
from kins_tunnel.transport.session import Session
from tests.transport.test_session_memory import make_session

PAYLOAD = b"\x00\xffping\x01\x02"


class BarePeer:
    """The edge as a bare `Connection`, driven by the test: nothing happens unless it says so."""

    def __init__(self, transport: MemoryTransport) -> None:
        self.transport = transport
        self.conn = Connection(
            Role.CLIENT, Hello(names=("x:1",)), MuxConfig(), clock=trio.current_time
        )
        self.buf = memoryview(bytearray(1 << 20))
        self.raw = bytearray()  # every byte the session sent, in order

    def send(self, data: bytes | bytearray | None = None) -> None:
        """Send `data`, or what the connection has queued."""
        out = self.conn.data_to_send() if data is None else data
        if out:
            self.transport.send_chunk(out)

    async def read(self) -> list[Event]:
        """Wait for what the session sent (within 5 s); its events."""
        with trio.fail_after(5):
            n = None
            while n is None:
                await self.transport.wait_readable()
                n = self.transport.receive_into(self.buf)
        self.raw += self.buf[:n]
        return self.conn.receive_data(bytes(self.buf[:n]))


@asynccontextmanager
async def cloud_and_peer(capacity: int = 256 * 1024) -> AsyncIterator[tuple[Session, BarePeer]]:
    a, b = memory_transport_pair(capacity)
    cloud = make_session(a, Role.SERVER)
    peer = BarePeer(b)
    async with trio.open_nursery() as n:
        n.start_soon(functools.partial(cloud.serve, handshake_timeout=5))
        peer.send()  # HELLO
        while not peer.conn.is_open:
            await peer.read()
        with trio.fail_after(5):
            await cloud.handshake_done.wait()
        while peer.conn.peer_pings == 0:  # the cloud's first RTT ping: answer it
            await peer.read()
        peer.send()
        await trio.testing.wait_all_tasks_blocked()
        peer.raw.clear()
        yield cloud, peer
        cloud.close("test over")


async def test_a_lone_ping_on_an_idle_tunnel_is_answered_with_exactly_its_pong() -> None:
    async with cloud_and_peer() as (cloud, peer):
        for i in range(3):
            payload = PAYLOAD[:-1] + bytes([i])
            peer.send(ping_frame(payload))
            events = await peer.read()
            assert bytes(peer.raw) == ping_frame(payload, ack=True)  # nothing else, nothing more
            assert [type(e) for e in events] == [PongReceived]
            assert isinstance(events[0], PongReceived) and events[0].payload == payload
            peer.raw.clear()
        assert cloud.conn.peer_pings == 3
        assert cloud.conn.pending_output() == 0 and cloud.tls.pending == 0
        assert not cloud.closed.is_set()


async def open_stream(cloud: Session, peer: BarePeer) -> tuple[int, trio.abc.Stream]:
    """The cloud opens a stream to the peer, which accepts it."""
    async with trio.open_nursery() as n:
        got: list[trio.abc.Stream] = []

        async def opener() -> None:
            got.append(await cloud.open_stream("x:1", timeout=5))

        n.start_soon(opener)
        (opened,) = [e for e in await peer.read() if isinstance(e, StreamOpened)]
        peer.conn.accept_stream(opened.stream_id)
        peer.send()
    return opened.stream_id, got[0]


async def test_a_ping_amid_data_is_answered_and_the_data_delivered_in_order() -> None:
    async with cloud_and_peer() as (cloud, peer):
        sid, stream = await open_stream(cloud, peer)
        peer.conn.send_data(sid, b"before the ping;")
        first = peer.conn.data_to_send()
        peer.conn.send_data(sid, b"after it")
        second = peer.conn.data_to_send()
        peer.send(bytes(first) + ping_frame(PAYLOAD) + bytes(second))  # one read for all three
        pongs = [e for e in await peer.read() if isinstance(e, PongReceived)]
        assert [p.payload for p in pongs] == [PAYLOAD]
        received = b""
        with trio.fail_after(5):
            while len(received) < len(b"before the ping;after it"):
                received += await stream.receive_some()
        assert received == b"before the ping;after it"
        await stream.aclose()


async def test_a_ping_behind_output_the_peer_has_not_read_is_answered_after_it() -> None:
    """The cloud's output is stuck (the peer does not read): a PING then takes the queued path,
    and its answer reaches the peer after every DATA byte the cloud had already handed over."""
    async with cloud_and_peer(capacity=4096) as (cloud, peer):
        sid, stream = await open_stream(cloud, peer)
        bulk = bytes(range(256)) * 256  # 64 KiB: far more than the 4 KiB in flight
        async with trio.open_nursery() as n:
            n.start_soon(stream.send_all, bulk)
            await trio.testing.wait_all_tasks_blocked()
            assert cloud.tls.pending  # stuck: the session's writer waits for room
            # the session's bytes the peer has not read: its input and the session's pending
            in_flight = len(peer.transport._in) + cloud.tls.pending
            peer.send(ping_frame(PAYLOAD))
            await trio.testing.wait_all_tasks_blocked()
            data = b""
            pongs: list[bytes] = []
            while not pongs or len(data) < len(bulk):
                for e in await peer.read():
                    if isinstance(e, DataReceived):
                        data += bytes(e.data)
                        peer.conn.consumed(sid, len(e.data))
                    elif isinstance(e, PongReceived):
                        pongs.append(e.payload)
                peer.send()  # credit back
        assert data == bulk and pongs == [PAYLOAD]
        assert peer.raw.find(ping_frame(PAYLOAD, ack=True)) >= in_flight
        assert cloud.conn.peer_pings == 1
        await stream.aclose()
