"""Deadlines on a virtual clock: the CONNECT header deadline (408) and the edge's dial deadline
(504) fire exactly when configured, measured in trio's virtual time, so the bounds are exact and
do not depend on how loaded the machine is. The real-process tests check the same answers on the
wall clock without timing windows.

The clock jumps ahead only after 10 ms of real idleness, so the real loopback I/O and the worker
threads (file checks) of the cloud and edge complete before any deadline is reached.
"""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from tests.e2e.harness import SVC, connect, hanging_listener, serve_echo, slowloris, tunnel_env


async def test_header_slowloris_gets_408_exactly_at_the_deadline(
    tmp_path: Path, virtual_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        async with tunnel_env(
            tmp_path, {SVC: f"127.0.0.1:{echo}"}, proxy={"header_timeout": 1.0}
        ) as env:
            request = b"CONNECT " + SVC.encode() + b" HTTP/1.1\r\nX-Slow: " + b"z" * 1000
            t0 = trio.current_time()
            answer = await slowloris(
                env.ports.proxy, request
            )  # one byte every 20 ms: never done in time
            took = trio.current_time() - t0
        n.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    # answered at the deadline, then closed after at most the 1 s lingering drain
    assert 1.0 <= took <= 1.0 + 1.0 + 0.05, took


async def test_hanging_target_gets_504_exactly_at_the_edge_dial_timeout(
    tmp_path: Path, virtual_clock: trio.testing.MockClock
) -> None:
    with hanging_listener() as hanging:
        async with tunnel_env(tmp_path) as env:
            await env.add_edge({SVC: f"127.0.0.1:{hanging}"}, wait_for=SVC, dial_timeout=1.0)
            t0 = trio.current_time()
            status, head, s = await connect(env.ports.proxy, SVC)
            took = trio.current_time() - t0
            await s.aclose()
    assert status == 504, head
    assert 1.0 <= took <= 1.05, took
