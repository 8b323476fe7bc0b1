"""`TunnelStream` honours trio's stream contract: `trio.testing.check_half_closeable_stream` on pairs
of tunnel streams of two real sessions over loopback TLS (checkpoints, ValueError for
`receive_some(0)`, BusyResourceError for concurrent use, graceful close, half-close, cancellation)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.lowlevel
import trio.testing

from kins_tunnel.proto import MuxConfig
from kins_tunnel.transport.session import Session
from kins_tunnel.transport.stream import TunnelStream
from tests.e2e.harness import make_certs
from tests.transport.test_session import start_session_pair

SMALL = MuxConfig(initial_window=16 * 1024, max_window=16 * 1024, session_budget=1 << 20)


@asynccontextmanager
async def stream_factory(tmp: Path) -> AsyncIterator[tuple[object, object]]:
    """(stream_maker, clogged_stream_maker) for trio's checks; every session closes at the end."""
    certs = make_certs(tmp)
    sessions: list[Session] = []

    async with trio.open_nursery() as nursery:

        async def pair(cfg: MuxConfig) -> tuple[TunnelStream, TunnelStream]:
            accepted: trio.MemorySendChannel[TunnelStream]
            accepted, got = trio.open_memory_channel[TunnelStream](1)

            def on_open(session: Session, sid: int, target: str) -> None:
                accepted.send_nowait(session.accept(sid))

            cloud, edge = await start_session_pair(nursery, certs, on_open, cfg)
            sessions.extend((cloud, edge))
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
