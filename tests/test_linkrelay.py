"""The link relay used by the partition tests and the WAN benchmark: delay each way, rate cap,
order and half-close kept (on trio's virtual clock: the delays are exact)."""

from __future__ import annotations

import trio
import trio.testing

from kins_tunnel.testing.linkrelay import CHUNK, LinkRelay
from kins_tunnel.testing.support import read_all
from tests.e2e.harness import serve_echo


async def test_delay_rate_order_and_half_close(virtual_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        # 25 ms each way, 1 MB/s; whole chunks per write (each write is a jump of the clock)
        relay = LinkRelay(echo, delay=0.025, rate=1_000_000, piece=CHUNK)
        port = await n.start(relay.serve)
        s = await trio.open_tcp_stream("127.0.0.1", port)
        async with s:
            t0 = trio.current_time()
            await s.send_all(b"ping")
            assert await s.receive_some(4) == b"ping"
            rtt = trio.current_time() - t0
            payload = bytes(range(256)) * 2000  # 512,000 bytes: about 0.5 s at 1 MB/s each way
            t0 = trio.current_time()
            await s.send_all(payload)
            await s.send_eof()  # half-close: the echo answers everything, then ends
            got = await read_all(s)
            took = trio.current_time() - t0
        n.cancel_scope.cancel()
    assert 0.05 <= rtt < 0.06, rtt
    assert got == payload
    # both one-way delays, the whole payload at the rate, and at most one chunk of pacing between
    # the two directions (each is paced on its own, in chunks of up to CHUNK bytes)
    assert 0.5 <= took <= 2 * 0.025 + (len(payload) + CHUNK) / 1_000_000, took
