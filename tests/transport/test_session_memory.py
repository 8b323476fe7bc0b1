"""Sessions over an in-memory byte transport (no sockets): the handshake and its failures, streams,
the ping timeout, GOAWAY, and trio's stream contract on `TunnelStream`."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from kins_tunnel.errors import OpenFailed
from kins_tunnel.proto import Connection, Hello, MuxConfig, Role
from kins_tunnel.proto.events import StreamOpened
from kins_tunnel.proto.frames import HELLO_PREFIX, MAGIC, FrameType, frame
from kins_tunnel.testing.memory_transport import MemoryTransport, memory_transport_pair
from kins_tunnel.transport.errors import HandshakeFailed
from kins_tunnel.transport.session import RTT_REFRESH, Session, SessionState, quiet_after
from kins_tunnel.transport.stream import TunnelStream

OnOpen = Callable[[Session, int, str], None]


def make_session(
    transport: MemoryTransport, role: Role, on_open: OnOpen | None = None, **timers: float
) -> Session:
    """A session over `transport`; its pings far beyond any test unless `timers` say otherwise."""
    hello = Hello(names=("x:1",)) if role is Role.CLIENT else Hello()
    return Session(
        transport,
        Connection(role, hello, MuxConfig(), clock=trio.current_time),
        on_open=on_open,
        ping_interval=timers.get("ping_interval", 1000),
        ping_timeout=timers.get("ping_timeout", 2000),
        idle_ping_interval=timers.get("idle_ping_interval"),
    )


@asynccontextmanager
async def memory_pair(
    on_open: OnOpen | None = None, **timers: float
) -> AsyncIterator[tuple[Session, Session, MemoryTransport, MemoryTransport]]:
    """A cloud and an edge session over memory, both open; closed at the end."""
    a, b = memory_transport_pair()
    cloud = make_session(a, Role.SERVER, None, **timers)
    edge = make_session(b, Role.CLIENT, on_open, **timers)
    async with trio.open_nursery() as n:
        n.start_soon(functools.partial(cloud.serve, handshake_timeout=5))
        await n.start(functools.partial(edge.serve, handshake_timeout=5))
        with trio.fail_after(5):
            await cloud.handshake_done.wait()
        yield cloud, edge, a, b
        cloud.close("test over")
        edge.close("test over")


def accept_into(channel: trio.MemorySendChannel[TunnelStream]) -> OnOpen:
    def on_open(session: Session, sid: int, target: str) -> None:
        channel.send_nowait(session.accept(sid))

    return on_open


async def test_the_handshake_moves_through_the_states_and_exchanges_names() -> None:
    a, b = memory_transport_pair()
    cloud, edge = make_session(a, Role.SERVER), make_session(b, Role.CLIENT)
    assert cloud.state is SessionState.NEW
    async with trio.open_nursery() as n:
        n.start_soon(functools.partial(cloud.serve, handshake_timeout=5))
        await trio.testing.wait_all_tasks_blocked()
        state: SessionState = cloud.state
        assert state is SessionState.HANDSHAKING  # its HELLO is out, the edge's is not
        await n.start(functools.partial(edge.serve, handshake_timeout=5))
        with trio.fail_after(5):
            await cloud.handshake_done.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert (cloud.state, edge.state) == (SessionState.OPEN, SessionState.OPEN)
        assert cloud.peer_names == ("x:1",) and cloud.usable and edge.usable
        with pytest.raises(RuntimeError):
            await cloud.handshake(5)  # once only
        edge.close("test over")
        with trio.fail_after(5):
            await cloud.closed.wait()
    # serve returned without an exception on both sides once the tunnel was over
    assert (cloud.state, edge.state) == (SessionState.CLOSED, SessionState.CLOSED)
    assert cloud.close_reason


async def test_streams_carry_data_both_ways_and_half_close() -> None:
    send, got = trio.open_memory_channel[TunnelStream](1)
    async with memory_pair(accept_into(send)) as (cloud, edge, _a, _b):
        payload = bytes(range(256)) * 4096  # 1 MiB: more than the transport holds in flight
        mine = await cloud.open_stream("x:1", timeout=5)
        theirs = await got.receive()
        async with trio.open_nursery() as n:

            async def send_then_eof() -> None:
                await mine.send_all(payload)
                await mine.send_eof()

            n.start_soon(send_then_eof)
            received = bytearray()
            while chunk := await theirs.receive_some():
                received += chunk
        assert received == payload
        await theirs.send_all(b"back")
        await theirs.send_eof()
        assert await mine.receive_some() == b"back"
        assert await mine.receive_some() == b""
        await mine.aclose()
        await theirs.aclose()
        assert await edge.wait_idle(trio.current_time() + 5)


async def test_a_silent_peer_ends_the_session_after_the_ping_timeout(
    virtual_clock: trio.testing.MockClock,
) -> None:
    send, got = trio.open_memory_channel[TunnelStream](1)
    async with memory_pair(accept_into(send), ping_interval=1, ping_timeout=3) as (
        cloud,
        _edge,
        _a,
        b,
    ):
        stream = await cloud.open_stream("x:1", timeout=5)
        await got.receive()
        start = trio.current_time()
        b.cut()  # the edge's side of the cable: nothing more reaches the cloud
        await cloud.closed.wait()
        assert 3 <= trio.current_time() - start <= 4.5
        assert "ping timeout" in cloud.close_reason and cloud.state is SessionState.CLOSED
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_all(b"x")


async def test_goaway_stops_new_streams_and_lets_open_ones_finish() -> None:
    send, got = trio.open_memory_channel[TunnelStream](1)
    async with memory_pair(accept_into(send)) as (cloud, edge, _a, _b):
        stream = await cloud.open_stream("x:1", timeout=5)
        theirs = await got.receive()
        edge.goaway("draining")
        with trio.fail_after(5):
            await cloud.goaway_received.wait()
        assert cloud.draining and not cloud.usable and not edge.usable
        with pytest.raises(OpenFailed):
            await cloud.open_stream("x:1", timeout=5)
        await stream.send_all(b"still")
        assert await theirs.receive_some() == b"still"
        assert edge.state is SessionState.OPEN


async def _fail_handshake(feed: Callable[[MemoryTransport], object], timeout: float = 5) -> str:
    """The reason an edge session's handshake fails with when its peer does `feed`."""
    a, b = memory_transport_pair()
    edge = make_session(b, Role.CLIENT)
    feed(a)
    with pytest.raises(HandshakeFailed) as caught:  # a plain exception: no group to unwrap
        await edge.serve(handshake_timeout=timeout)
    assert edge.state is SessionState.CLOSED and edge.closed.is_set()
    return caught.value.reason


async def test_a_peer_that_closes_before_its_hello_is_refused() -> None:
    assert await _fail_handshake(lambda peer: peer.close()) == "refused"


async def test_a_silent_peer_is_a_timeout(virtual_clock: trio.testing.MockClock) -> None:
    start = trio.current_time()
    assert await _fail_handshake(lambda peer: None, timeout=7) == "timeout"
    assert trio.current_time() - start == pytest.approx(7)


async def test_a_malformed_hello_is_a_protocol_failure() -> None:
    body = b'{"max_frame": "x", "max_streams": 4}'
    hello = frame(FrameType.HELLO, 0, HELLO_PREFIX.pack(MAGIC, 1, 1) + body)
    assert await _fail_handshake(lambda peer: peer.send_chunk(hello)) == "protocol"
    assert await _fail_handshake(lambda peer: peer.send_chunk(b"GET / HTTP/1.1\r\n\r\n")) == (
        "protocol"
    )


async def test_no_version_in_common_is_a_version_failure() -> None:
    body = b'{"max_frame": 16384, "max_streams": 4}'
    hello = frame(FrameType.HELLO, 0, HELLO_PREFIX.pack(MAGIC, 7, 9) + body)
    assert await _fail_handshake(lambda peer: peer.send_chunk(hello)) == "version"


SMALL = MuxConfig(initial_window=16 * 1024, max_window=16 * 1024, session_budget=1 << 20)


async def test_tunnel_streams_over_memory_pass_trios_half_closeable_stream_checks() -> None:
    sessions: list[Session] = []
    async with trio.open_nursery() as nursery:

        async def pair(cfg: MuxConfig) -> tuple[TunnelStream, TunnelStream]:
            send, got = trio.open_memory_channel[TunnelStream](1)
            a, b = memory_transport_pair()
            cloud = Session(a, Connection(Role.SERVER, Hello(), cfg), ping_interval=1000)
            edge = Session(
                b,
                Connection(Role.CLIENT, Hello(names=("x:1",)), cfg),
                on_open=accept_into(send),
                ping_interval=1000,
            )
            nursery.start_soon(functools.partial(cloud.serve, handshake_timeout=5))
            await nursery.start(functools.partial(edge.serve, handshake_timeout=5))
            await cloud.handshake_done.wait()
            sessions.extend((cloud, edge))
            return await cloud.open_stream("x:1", timeout=5), await got.receive()

        async def maker() -> tuple[TunnelStream, TunnelStream]:
            return await pair(MuxConfig())

        async def clogged() -> tuple[TunnelStream, TunnelStream]:
            s, r = await pair(SMALL)
            cloud, edge = sessions[-2:]
            for mine, session in ((s, cloud), (r, edge)):
                await mine.send_all(b"f" * (16 * 1024))  # the whole window, never read
                while session.conn.send_window(mine.stream_id):
                    await trio.lowlevel.checkpoint()
            return s, r

        with trio.fail_after(60):
            await trio.testing.check_half_closeable_stream(maker, clogged)
        for session in sessions:
            session.close("test over")


async def test_a_stream_delivers_into_one_socket_at_a_time() -> None:
    """The direct-delivery descriptor has one lender: a second relay claiming the stream is a bug
    caught where it happens, not a byte stream split between two sockets."""
    send, got = trio.open_memory_channel[TunnelStream](1)
    async with memory_pair(accept_into(send)) as (cloud, _edge, _a, _b):
        stream = await cloud.open_stream("x:1", timeout=5)
        await got.receive()
        stream.set_direct_sink(10)
        stream.set_direct_sink(10)  # the same owner again: fine
        with pytest.raises(trio.BusyResourceError):
            stream.set_direct_sink(11)
        stream.set_direct_sink(None)
        stream.set_direct_sink(11)  # released: another owner may take it
        stream.set_direct_sink(None)


async def test_a_stream_whose_fin_arrived_reads_to_its_end_after_the_tunnel_closes() -> None:
    """A drained peer may close the tunnel as soon as its last stream is done: what that stream
    delivered before its FIN is still read in full, then a clean EOF (not a broken stream)."""
    send, got = trio.open_memory_channel[TunnelStream](1)
    async with memory_pair(accept_into(send)) as (cloud, edge, _a, _b):
        mine = await cloud.open_stream("x:1", timeout=5)
        theirs = await got.receive()
        await mine.send_eof()
        assert await theirs.receive_some() == b""
        await theirs.send_all(b"last words")
        await theirs.send_eof()
        await theirs.aclose()
        assert await edge.wait_idle(trio.current_time() + 5)  # FIN flushed, then:
        edge.close("tunnel-edge shut down")
        with trio.fail_after(5):
            await cloud.closed.wait()
        received = bytearray()
        while chunk := await mine.receive_some():
            received += chunk
        assert received == b"last words"
        await mine.aclose()


# ---------------------------------------------------------------------------- ping policy
class ScriptedPeer:
    """The other end as a bare `proto.Connection`: answers every PING and accepts every stream,
    and pings only when the test says so (`ping`), until `silent` (then it reads and says
    nothing, as a hung process whose kernel still ACKs). `pinged` counts the PINGs it received
    from the session, `ping_times` when each came; its HELLO states `idle_ping` if given."""

    def __init__(
        self, transport: MemoryTransport, role: Role, idle_ping: float | None = None
    ) -> None:
        self.transport = transport
        names = ("x:1",) if role is Role.CLIENT else ()
        hello = Hello(names=names, idle_ping=idle_ping)
        self.conn = Connection(role, hello, MuxConfig(), clock=trio.current_time)
        self.open = trio.Event()
        self.silent = False
        self.ping_times: list[float] = []

    @property
    def pinged(self) -> int:
        return self.conn.peer_pings

    def ping(self) -> None:
        self.conn.ping()
        self._send()

    def _send(self) -> None:
        out = self.conn.data_to_send()
        if out and not self.silent:
            self.transport.send_chunk(out)

    async def serve(self) -> None:
        buf = memoryview(bytearray(65536))
        self._send()  # HELLO
        while True:
            await self.transport.wait_readable()
            n = self.transport.receive_into(buf)
            if n == 0:
                return
            if not n:
                continue
            before = self.conn.peer_pings
            for event in self.conn.receive_data(bytes(buf[:n])):
                if isinstance(event, StreamOpened):
                    self.conn.accept_stream(event.stream_id)
            self.ping_times += [trio.current_time()] * (self.conn.peer_pings - before)
            self._send()
            if self.conn.is_open:
                self.open.set()


@asynccontextmanager
async def session_and_peer(
    role: Role,
    interval: float,
    timeout: float,
    on_open: OnOpen | None = None,
    *,
    idle: float | None = None,
    peer_idle_ping: float | None = None,
) -> AsyncIterator[tuple[Session, ScriptedPeer]]:
    """A session of `role` (pinging per `interval` / `timeout`, an idle tunnel per `idle`: None,
    the interval) facing a `ScriptedPeer` whose HELLO states `peer_idle_ping`."""
    a, b = memory_transport_pair()
    timers = {"ping_interval": interval, "ping_timeout": timeout}
    if idle is not None:
        timers["idle_ping_interval"] = idle
    session = make_session(a, role, on_open, **timers)
    peer = ScriptedPeer(b, Role.SERVER if role is Role.CLIENT else Role.CLIENT, peer_idle_ping)
    async with trio.open_nursery() as n:
        n.start_soon(peer.serve)
        await n.start(functools.partial(session.serve, handshake_timeout=5))
        with trio.fail_after(5):
            await peer.open.wait()
        yield session, peer
        session.close("test over")
        n.cancel_scope.cancel()


async def test_an_edge_whose_cloud_pinged_once_then_went_quiet_pings_and_stays_up(
    virtual_clock: trio.testing.MockClock,
) -> None:
    """The cloud's PING right after the handshake, then only answers (an idle cloud): the edge
    pings after each silence of one interval and the tunnel lives. A policy that skipped the
    edge's ping because the cloud had pinged, while the cloud skipped its own because the edge
    had, left both silent for two intervals, the timeout (every idle tunnel dropped)."""
    async with session_and_peer(Role.CLIENT, interval=1.0, timeout=2.0) as (edge, cloud):
        cloud.ping()
        await trio.sleep(20.5)
        assert not edge.closed.is_set(), edge.close_reason
        # one PING at the handshake, then one per interval of silence (each answered at once)
        assert 20 <= cloud.pinged <= 21, cloud.pinged
        assert edge.rtt is not None


async def test_an_idle_cloud_answers_the_edge_and_pings_only_for_its_rtt(
    virtual_clock: trio.testing.MockClock,
) -> None:
    """An edge pings the idle tunnel every interval: the cloud sends no ping of its own but its
    RTT ping every `RTT_REFRESH` intervals; it never times out."""
    async with session_and_peer(Role.SERVER, interval=1.0, timeout=2.0) as (cloud, edge):
        for _ in range(60):
            await trio.sleep(1.0)
            edge.ping()
        await trio.sleep(0.5)
        assert not cloud.closed.is_set(), cloud.close_reason
        # the handshake's PING, then one every RTT_REFRESH intervals (6, 12, ... 60)
        assert edge.pinged == 1 + 60 // RTT_REFRESH, edge.pinged
        assert cloud.rtt is not None


async def test_an_idle_cloud_pings_after_half_an_interval_more_of_silence(
    virtual_clock: trio.testing.MockClock,
) -> None:
    """An edge that never pings (only answers): the cloud pings after 1.5 intervals of silence
    (the timeout allowing), so the tunnel lives; `quiet_after` says how long each side waits."""
    assert quiet_after(Role.CLIENT, 10, 20, 10) == 10
    assert quiet_after(Role.SERVER, 10, 20, 10) == 15
    assert quiet_after(Role.SERVER, 10, 12, 10) == 11  # half the time between interval and timeout
    assert quiet_after(Role.SERVER, 10, 10, 10) == 10
    assert quiet_after(Role.CLIENT, 10, 20, 60) == 60  # idle: the edge after the idle interval
    assert quiet_after(Role.SERVER, 10, 20, 60) == 65  # the cloud half the busy margin later
    async with session_and_peer(Role.SERVER, interval=1.0, timeout=2.0) as (cloud, edge):
        t0 = trio.current_time()
        await trio.sleep(15.2)
        assert not cloud.closed.is_set(), cloud.close_reason
        assert edge.pinged == 1 + 10, edge.pinged  # at 0, then at 1.5, 3.0, ... 15.0
        assert round(trio.current_time() - t0, 1) == 15.2


async def test_an_idle_tunnel_whose_peer_stops_answering_ends_at_the_timeout(
    virtual_clock: trio.testing.MockClock,
) -> None:
    """The path goes silent (a cable cut): the session pings after one interval and ends
    `ping_timeout` after the last byte it received, as before."""
    async with session_and_peer(Role.CLIENT, interval=1.0, timeout=2.5) as (edge, cloud):
        t0 = trio.current_time()
        cloud.transport.cut()
        with trio.fail_after(10):
            await edge.closed.wait()
        assert round(trio.current_time() - t0, 3) == 2.5
        assert "ping timeout" in edge.close_reason
        assert cloud.pinged == 3  # at the handshake, then once per interval of silence


async def test_a_tunnel_holding_a_stream_pings_every_interval_though_its_peer_talks(
    virtual_clock: trio.testing.MockClock,
) -> None:
    """While a stream is open the edge pings every interval (its RTT sizes the windows), even
    though the cloud's pings keep the tunnel from ever being silent."""
    streams: list[TunnelStream] = []

    def on_open(session: Session, sid: int, target: str) -> None:
        streams.append(session.accept(sid))

    async with session_and_peer(Role.CLIENT, 1.0, 2.0, on_open) as (edge, cloud):
        sid = cloud.conn.open_stream("x:1")
        cloud._send()
        await trio.sleep(0.01)
        assert edge.stream_count == 1 and sid
        before = cloud.pinged
        for _ in range(10):
            await trio.sleep(0.5)
            cloud.ping()
        assert cloud.pinged - before == 5, (before, cloud.pinged)


async def test_an_open_session_holds_no_event_until_one_is_asked_for() -> None:
    a, b = memory_transport_pair()
    cloud, edge = make_session(a, Role.SERVER), make_session(b, Role.CLIENT)
    async with trio.open_nursery() as n:
        n.start_soon(functools.partial(edge.serve, handshake_timeout=5))
        await n.start(functools.partial(cloud.serve, handshake_timeout=5))
        await trio.testing.wait_all_tasks_blocked()
        for session in (cloud, edge):
            assert session.state is SessionState.OPEN
            assert session._handshake_done is None and session._goaway_received is None
        assert cloud.handshake_done.is_set()  # asked for after the handshake: made, and set
        waiting = cloud.goaway_received  # asked for before the GOAWAY: set when it comes
        assert not waiting.is_set()
        edge.goaway("test draining")
        with trio.fail_after(5):
            await waiting.wait()
        assert cloud.draining and cloud.goaway_received is waiting
        cloud.close("test over")
        edge.close("test over")
