"""Sessions over a real loopback TLS connection, in one trio run: streams, back-pressure, wake-ups."""

from __future__ import annotations

import functools
import hashlib
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.testing

from kins_tunnel.proto import Connection, Hello, MuxConfig, Role
from kins_tunnel.tls_contexts import client_ssl_context, server_ssl_context
from kins_tunnel.transport.session import RTT_REFRESH, Session
from kins_tunnel.transport.stream import TunnelStream
from kins_tunnel.transport.tls import TLSSocket
from tests.e2e.harness import make_certs


def unshaken_pair(certs: Path) -> tuple[TLSSocket, TLSSocket]:
    """A server and a client `TLSSocket` over loopback TCP, before their handshakes."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    csock = socket.create_connection(lsock.getsockname())
    ssock, _ = lsock.accept()
    lsock.close()
    server = TLSSocket.wrap(
        ssock,
        server_ssl_context(certs / "ca.crt", certs / "cloud.crt", certs / "cloud.key"),
        server_side=True,
    )
    client = TLSSocket.wrap(
        csock,
        client_ssl_context(certs / "ca.crt", certs / "edge-edge1.crt", certs / "edge-edge1.key"),
        server_side=False,
        server_hostname="localhost",
    )
    return server, client


async def tls_pair(certs: Path) -> tuple[TLSSocket, TLSSocket]:
    server, client = unshaken_pair(certs)
    async with trio.open_nursery() as n:
        n.start_soon(server.do_handshake)
        n.start_soon(client.do_handshake)
    return server, client


async def start_session_pair(
    nursery: trio.Nursery,
    certs: Path,
    on_open: Callable[[Session, int, str], None],
    cfg: MuxConfig = MuxConfig(),
) -> tuple[Session, Session]:
    """A cloud and an edge session over loopback TLS (certificates from `make_certs`), served in
    `nursery`, returned once both handshakes are done. The edge serves ``x:1`` and answers opens
    with `on_open`; the ping interval is far beyond any test, so nothing but the data path wakes
    anyone up. The caller closes both."""
    stls, ctls = await tls_pair(certs)
    cloud = Session(
        stls, Connection(Role.SERVER, Hello(), cfg), ping_interval=1000, ping_timeout=2000
    )
    edge = Session(
        ctls,
        Connection(Role.CLIENT, Hello(names=("x:1",)), cfg),
        on_open=on_open,
        ping_interval=1000,
        ping_timeout=2000,
    )
    nursery.start_soon(functools.partial(cloud.serve, handshake_timeout=5))
    nursery.start_soon(functools.partial(edge.serve, handshake_timeout=5))
    with trio.fail_after(5):
        await cloud.handshake_done.wait()
        await edge.handshake_done.wait()
    return cloud, edge


@asynccontextmanager
async def session_pair(
    tmp: Path, on_open: Callable[[Session, int, str], None], cfg: MuxConfig = MuxConfig()
) -> AsyncIterator[tuple[Session, Session]]:
    certs = make_certs(tmp)
    async with trio.open_nursery() as n:
        cloud, edge = await start_session_pair(n, certs, on_open, cfg)
        yield cloud, edge
        cloud.close("test over")
        edge.close("test over")


async def test_back_pressure_never_loses_a_wakeup(
    tmp_path: Path, virtual_clock: trio.testing.MockClock
) -> None:
    """Many senders parked on a full output queue all resume once it drains (no timer rescue).
    On the virtual clock, the sinks' 0.5 s pause ends only once every task is blocked: the queues
    and socket buffers are full by then, whatever the machine's speed."""
    streams_total = 32
    size = 2 * 1024 * 1024
    digests: dict[int, str] = {}

    async def slow_sink(stream: TunnelStream) -> None:
        await trio.sleep(0.5)  # let the sender's queue and the socket buffers fill up first
        h = hashlib.sha256()
        while True:
            data = await stream.receive_some()
            if not data:
                break
            h.update(data)
        digests[stream.stream_id] = h.hexdigest()
        await stream.send_eof()
        await stream.aclose()

    def on_open(session: Session, sid: int, target: str) -> None:
        session.start_stream_task(sid, slow_sink, session.accept(sid))

    payload = bytes(range(256)) * (size // 256)
    async with session_pair(tmp_path, on_open) as (cloud, _edge):

        async def send_one() -> None:
            stream = await cloud.open_stream("x:1", timeout=5)
            await stream.send_all(payload)
            await stream.send_eof()
            assert await stream.receive_some() == b""
            await stream.aclose()

        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                for _ in range(streams_total):
                    n.start_soon(send_one)
        assert cloud.stalls > 0  # the senders really did wait for space or credit
    assert len(digests) == streams_total
    assert set(digests.values()) == {hashlib.sha256(payload).hexdigest()}


async def test_data_right_behind_the_open_result_is_kept(
    tmp_path: Path, virtual_clock: trio.testing.MockClock
) -> None:
    """A target that speaks first: its bytes and FIN follow the open result in the same batch
    (the target keeps its end open 0.5 s of virtual time after its FIN)."""

    async def greeter(session: Session, sid: int) -> None:
        stream = session.accept(sid)
        await stream.send_all(b"SSH-2.0-banner\r\n")
        await stream.send_eof()
        await trio.sleep(0.5)
        await stream.aclose()

    def on_open(session: Session, sid: int, target: str) -> None:
        session.start_stream_task(sid, greeter, session, sid)

    async with session_pair(tmp_path, on_open) as (cloud, _edge):
        for _ in range(20):
            stream = await cloud.open_stream("x:1", timeout=5)
            got = b""
            with trio.fail_after(5):
                while chunk := await stream.receive_some():
                    got += chunk
            assert got == b"SSH-2.0-banner\r\n"
            await stream.aclose()


class BlockedTLS:
    """A TLS socket double whose writes would block until `unblock()` (white-box writer test).

    Like the real one it takes a whole batch at once (`send_chunk`) and keeps what the socket
    did not take as pending ciphertext until `flush()` gets it out."""

    def __init__(self) -> None:
        self.open = False
        self.writable = trio.Event()
        self.sent = 0
        self.pending = 0
        self.session: Session | None = None
        self.held_last = False

    def send_chunk(self, chunk: memoryview) -> bool:
        self.pending += len(chunk)  # encrypted; the socket gets it at the next flush
        return False

    def flush(self) -> bool:
        if not self.pending:
            return True
        if not self.open:
            return False
        last = self.session is not None and self.session.conn.pending_output() == 0
        if last and self.sent and not self.held_last:
            self.held_last = (
                True  # the socket fills just before the last batch: the writer sends it
            )
            return False
        self.sent += self.pending
        self.pending = 0
        return True

    async def wait_writable(self) -> None:
        await self.writable.wait()

    def unblock(self) -> None:
        self.open = True
        self.writable.set()

    def close(self) -> None:
        pass


async def test_senders_parked_on_a_full_queue_wake_when_the_writer_drains_it() -> None:
    conn = Connection(Role.SERVER, Hello())
    peer = Connection(Role.CLIENT, Hello())
    conn.receive_data(peer.data_to_send())
    peer.receive_data(conn.data_to_send())
    tls = BlockedTLS()
    session = Session(tls, conn, ping_interval=1000, ping_timeout=2000)  # type: ignore[arg-type]
    tls.session = session
    streams = []
    for _ in range(4):
        sid = conn.open_stream("x:1")
        peer.receive_data(conn.data_to_send())
        peer.accept_stream(sid)
        conn.receive_data(peer.data_to_send())
        streams.append(TunnelStream(session, sid))
    done = []

    async def sender(stream: TunnelStream) -> None:
        await stream.send_all(b"z" * (256 * 1024))  # within credit: only output space can block it
        done.append(stream.stream_id)

    async with trio.open_nursery() as n:
        n.start_soon(session.output.writer)
        for stream in streams:
            n.start_soon(sender, stream)
        await trio.testing.wait_all_tasks_blocked()
        assert len(done) < len(streams)  # some are parked on the full queue
        tls.unblock()
        await trio.testing.wait_all_tasks_blocked()  # all in memory: nothing else can wake anyone
        assert len(done) == len(streams)  # a lost wake-up would leave a sender parked for good
        n.cancel_scope.cancel()
    assert tls.held_last  # the path that used to lose the wake-up was taken
    assert tls.sent >= 4 * 256 * 1024


async def test_waiting_on_a_closed_tunnel_socket_is_a_transport_error(tmp_path: Path) -> None:
    """A session task closed the socket; another must get TransportError, not trio's fd -1 crash."""
    from kins_tunnel.transport.tls import TransportError

    server, client = await tls_pair(make_certs(tmp_path))
    server.close()
    for wait in (server.wait_readable, server.wait_writable):
        try:
            await wait()
        except TransportError:
            pass
        else:
            raise AssertionError("waiting on a closed socket returned")
    client.close()


async def test_an_idle_tunnel_is_pinged_by_the_edge_and_the_cloud_answers(
    tmp_path: Path, virtual_clock: trio.testing.MockClock
) -> None:
    """Both ends with a ping interval of a second, over loopback TLS: on an idle tunnel the edge
    pings after each second of silence and the cloud only answers, but for its RTT ping every
    `RTT_REFRESH` seconds: one ping round per second instead of two, and neither times out."""
    certs = make_certs(tmp_path)
    stls, ctls = await tls_pair(certs)
    now = trio.current_time
    cloud_conn = Connection(Role.SERVER, Hello(), clock=now)
    edge_conn = Connection(Role.CLIENT, Hello(names=("x:1",)), clock=now)
    cloud = Session(stls, cloud_conn, ping_interval=1, ping_timeout=2.5)
    edge = Session(ctls, edge_conn, ping_interval=1, ping_timeout=2.5)
    async with trio.open_nursery() as n:
        n.start_soon(functools.partial(cloud.serve, handshake_timeout=5))
        n.start_soon(functools.partial(edge.serve, handshake_timeout=5))
        await cloud.handshake_done.wait()
        await edge.handshake_done.wait()
        await trio.sleep(60.2)
        assert not cloud.closed.is_set() and not edge.closed.is_set()
        by_cloud, by_edge = edge.conn.peer_pings, cloud.conn.peer_pings
        cloud.close("test over")
        edge.close("test over")
    # 60 s: the cloud's PING at the handshake and every RTT_REFRESH s; the edge's at the
    # handshake and after each second of silence (a little less: the cloud's pings break some)
    assert by_cloud <= 1 + 60 // RTT_REFRESH, (by_cloud, by_edge)
    assert 60 - 60 // RTT_REFRESH <= by_edge <= 61, (by_cloud, by_edge)
    assert cloud.rtt is not None and edge.rtt is not None


async def test_wait_idle_returns_when_the_last_stream_leaves(tmp_path: Path) -> None:
    """`wait_idle` wakes when the last stream goes (no poll), and gives up at its deadline."""
    accepted: list[TunnelStream] = []
    opened = trio.Event()

    def on_open(session: Session, sid: int, target: str) -> None:
        accepted.append(session.accept(sid))
        opened.set()

    async with session_pair(tmp_path, on_open) as (cloud, edge):
        stream = await cloud.open_stream("x:1", timeout=5)
        with trio.fail_after(5):
            await opened.wait()
        assert not await edge.wait_idle(trio.current_time() + 0.05)  # a stream is still open
        done = trio.Event()

        async def waiter() -> None:
            assert await edge.wait_idle(trio.current_time() + 5)
            done.set()

        async with trio.open_nursery() as n:
            n.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()
            await accepted[0].aclose()
            await stream.aclose()
        assert done.is_set()
        assert edge.stream_count == 0
