"""`TunnelStream` honours trio's stream contract: `trio.testing.check_half_closeable_stream` on pairs
of tunnel streams of two real sessions over loopback TLS (checkpoints, ValueError for
`receive_some(0)`, BusyResourceError for concurrent use, graceful close, half-close, cancellation)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.lowlevel
import trio.testing

from kins_tunnel.certs.directory import init_ca, issue_edge
from kins_tunnel.proto import Connection, Hello, MuxConfig, Role
from kins_tunnel.transport.session import Session
from kins_tunnel.transport.stream import TunnelStream
from tests.transport.test_session import tls_pair

SMALL = MuxConfig(initial_window=16 * 1024, max_window=16 * 1024, session_budget=1 << 20)


@asynccontextmanager
async def stream_factory(tmp: Path) -> AsyncIterator[tuple[object, object]]:
    """(stream_maker, clogged_stream_maker) for trio's checks; every session closes at the end."""
    certs = tmp / "certs"
    init_ca(certs)
    issue_edge(certs, "test", "edge1")
    sessions: list[Session] = []

    async with trio.open_nursery() as nursery:

        async def pair(cfg: MuxConfig) -> tuple[TunnelStream, TunnelStream]:
            server, client = await tls_pair(certs)
            accepted: trio.MemorySendChannel[TunnelStream]
            accepted, got = trio.open_memory_channel[TunnelStream](1)

            def on_open(session: Session, sid: int, target: str) -> None:
                accepted.send_nowait(session.accept(sid))

            cloud = Session(
                server, Connection(Role.SERVER, Hello(), cfg), ping_interval=1000, ping_timeout=2000
            )
            edge = Session(
                client,
                Connection(Role.CLIENT, Hello(), cfg),
                on_open=on_open,
                ping_interval=1000,
                ping_timeout=2000,
            )
            sessions.extend((cloud, edge))
            nursery.start_soon(functools.partial(cloud.serve, handshake_timeout=5))
            nursery.start_soon(functools.partial(edge.serve, handshake_timeout=5))
            await cloud.handshake_done.wait()
            opened = await cloud.open_stream("x:1", timeout=5)
            return opened, await got.receive()

        async def stream_maker() -> tuple[TunnelStream, TunnelStream]:
            return await pair(MuxConfig())

        async def clogged_stream_maker() -> tuple[TunnelStream, TunnelStream]:
            # Each side's whole window is spent on bytes nobody reads (both ways: the checks also
            # run with the pair flipped), so send_all blocks until the other side receives.
            s, r = await pair(SMALL)
            cloud, edge = sessions[-2:]  # s is the cloud's end, r the edge's
            filler = b"f" * (16 * 1024)
            for a, session in ((s, cloud), (r, edge)):
                await a.send_all(filler)
                while session.conn.send_window(a.stream_id):
                    await trio.lowlevel.checkpoint()
            return s, r

        yield stream_maker, clogged_stream_maker
        for session in sessions:
            session.close("test over")
        nursery.cancel_scope.cancel()


async def test_tunnel_streams_pass_trios_half_closeable_stream_checks(tmp_path: Path) -> None:
    async with stream_factory(tmp_path) as (maker, clogged):
        with trio.fail_after(60):
            await trio.testing.check_half_closeable_stream(maker, clogged)  # type: ignore[arg-type]
