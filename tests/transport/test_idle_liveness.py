"""Liveness of an idle tunnel (`ping_policy`, `Session.deadline`): with `idle_ping_interval` longer
than `ping_interval`, an idle tunnel pings only after the idle interval of silence and dies only
after the idle timeout, while a tunnel holding streams keeps the busy schedule, also right after it
takes its first stream. Over an in-memory transport on the virtual clock, so every bound is exact.
(What watches an idle tunnel in between, the kernel's keepalive, is tested over real sockets in
`test_keepalive.py`.)"""

from __future__ import annotations

import contextlib
from contextlib import AbstractAsyncContextManager

import trio
import trio.testing

from kins_tunnel.errors import OpenFailed
from kins_tunnel.proto import ErrorCode, Role
from kins_tunnel.transport.ping_policy import RTT_REFRESH, deadline, idle_timeout, ping_due
from kins_tunnel.transport.session import Session
from tests.transport.test_session_memory import ScriptedPeer, session_and_peer

INTERVAL, TIMEOUT, IDLE = 1.0, 2.0, 6.0  # idle timeout: 2 + (6 - 1) = 7 s


def idle_session(
    role: Role, peer_idle_ping: float | None = None
) -> AbstractAsyncContextManager[tuple[Session, ScriptedPeer]]:
    """A session with this file's ping settings facing a `ScriptedPeer` whose HELLO states
    `peer_idle_ping` (None: says nothing, as an older peer)."""
    return session_and_peer(role, INTERVAL, TIMEOUT, idle=IDLE, peer_idle_ping=peer_idle_ping)


def _gaps(times: list[float]) -> list[float]:
    return [round(b - a, 3) for a, b in zip(times, times[1:], strict=False)]


def test_policy_figures() -> None:
    assert idle_timeout(10, 20, 60, 65) == 70  # the edge: it pings first
    assert idle_timeout(10, 20, 65, 60) == 70  # the cloud
    assert idle_timeout(10, 20, 15, 10) == 20  # equal intervals: the busy timeout, as before
    assert idle_timeout(0.5, 2, 30.75, 0.5) == 2.0  # an edge that pings its idle tunnel often
    assert ping_due(busy=True, last_rx=5, pinged_at=3, interval=10, quiet=60, idle=60) == 13
    assert ping_due(busy=False, last_rx=5, pinged_at=3, interval=10, quiet=60, idle=60) == 65
    assert ping_due(busy=False, last_rx=500, pinged_at=3, interval=10, quiet=60, idle=60) == (
        3 + RTT_REFRESH * 60
    )
    # busy: from the last byte or from when it became busy, whichever is later
    assert deadline(busy=True, last_rx=100, busy_since=150, timeout=20, idle_after=70) == 170
    assert deadline(busy=True, last_rx=160, busy_since=150, timeout=20, idle_after=70) == 180
    assert deadline(busy=False, last_rx=100, busy_since=150, timeout=20, idle_after=70) == 170


async def test_an_idle_edge_pings_every_idle_interval_and_outlives_the_busy_timeout(
    virtual_clock: trio.testing.MockClock,
) -> None:
    """Idle for 60 s with a peer that only answers: the edge pings after each 6 s of silence
    (not every second), and the tunnel lives though it is silent far longer than `ping_timeout`."""
    async with idle_session(Role.CLIENT) as (edge, cloud):
        t0 = trio.current_time()
        await trio.sleep(60.5)
        assert not edge.closed.is_set(), edge.close_reason
        gaps = _gaps(cloud.ping_times)
        assert cloud.ping_times[0] - t0 < 0.01  # the handshake's PING (first RTT)
        assert len(cloud.ping_times) == 1 + 10, gaps  # then at 6, 12, ... 60
        assert all(5.99 <= gap <= 6.3 for gap in gaps), gaps


async def test_an_idle_cloud_waits_longer_than_the_edge_before_pinging(
    virtual_clock: trio.testing.MockClock,
) -> None:
    """A peer that never pings: the idle cloud pings after 6.5 s of silence (the idle interval
    and half the busy margin), so that a live edge's ping, due after 6 s, comes first."""
    async with idle_session(Role.SERVER) as (cloud, edge):
        await trio.sleep(40)
        assert not cloud.closed.is_set(), cloud.close_reason
        gaps = _gaps(edge.ping_times)
        assert gaps and all(6.49 <= gap <= 6.8 for gap in gaps), gaps


async def test_a_hung_idle_peer_is_dropped_at_the_idle_timeout(
    virtual_clock: trio.testing.MockClock,
) -> None:
    """The peer stops answering (its kernel would still ACK keepalive probes): the idle tunnel
    ends when nothing has arrived for the idle timeout, 7 s, not at `ping_timeout`."""
    async with idle_session(Role.CLIENT) as (edge, cloud):
        await trio.sleep(0.5)  # the handshake's PONG is in
        cloud.silent = True
        last = edge.last_rx
        await trio.sleep(6.0)
        assert not edge.closed.is_set(), edge.close_reason  # 3x ping_timeout, alive
        with trio.fail_after(1.0):
            await edge.closed.wait()
        assert 7.0 <= trio.current_time() - last <= 7.3
        assert "ping timeout" in edge.close_reason


async def test_a_tunnel_taking_its_first_stream_goes_on_the_busy_schedule_at_once(
    virtual_clock: trio.testing.MockClock,
) -> None:
    """Idle for 5 s (no byte for 5 s: past `ping_timeout`), then a stream opens: the tunnel is not
    dropped for the old silence, pings within a busy interval, and once the peer goes silent it
    is dropped `ping_timeout` after its last byte, not after the idle timeout."""
    async with idle_session(Role.SERVER) as (cloud, edge):
        await trio.sleep(5.0)
        n_pings = len(edge.ping_times)
        with trio.fail_after(1):
            stream = await cloud.open_stream("x:1", timeout=1)
        opened = trio.current_time()
        await trio.sleep(2.5)
        assert not cloud.closed.is_set(), cloud.close_reason
        assert len(edge.ping_times) >= n_pings + 2, edge.ping_times  # every interval now
        assert edge.ping_times[n_pings] - opened <= INTERVAL + 0.3
        edge.silent = True
        last = cloud.last_rx
        with trio.fail_after(TIMEOUT + 1):
            await cloud.closed.wait()
        assert TIMEOUT <= trio.current_time() - last <= TIMEOUT + 0.3
        del stream


async def test_a_stream_that_leaves_gives_the_tunnel_back_its_idle_schedule(
    virtual_clock: trio.testing.MockClock,
) -> None:
    """Busy, then idle again: the PINGs go back to one per idle interval (and a half)."""
    async with idle_session(Role.SERVER) as (cloud, edge):
        with trio.fail_after(1):
            stream = await cloud.open_stream("x:1", timeout=1)
        await trio.sleep(3.2)
        assert len(edge.ping_times) >= 4, edge.ping_times  # the handshake's, then every second
        edge.conn.reset_stream(stream.stream_id, ErrorCode.CANCEL, "done")
        edge._send()
        await trio.sleep(0.5)
        assert not cloud._streams
        start = len(edge.ping_times)
        await trio.sleep(26.5)
        assert not cloud.closed.is_set(), cloud.close_reason
        assert len(edge.ping_times) - start == 4, edge.ping_times  # every 6.5 s, not every 1 s


async def test_a_hung_peer_sent_an_open_after_a_long_idle_is_dropped_a_ping_timeout_later(
    virtual_clock: trio.testing.MockClock,
) -> None:
    """Idle for 5 s, then the peer hangs (its kernel would still answer keepalive probes) and an
    OPEN is sent to it: the tunnel is not dropped for the old silence, pings at once, and is
    dropped `ping_timeout` after the OPEN (not after the 7 s idle timeout), so the cloud stops
    routing streams to a hung edge."""
    async with idle_session(Role.SERVER) as (cloud, edge):
        await trio.sleep(5.0)
        edge.silent = True
        n_pings = len(edge.ping_times)
        sent = trio.current_time()
        async with trio.open_nursery() as n:

            async def open_it() -> None:
                with contextlib.suppress(OpenFailed):
                    await cloud.open_stream("x:1", timeout=30)

            n.start_soon(open_it)
            await trio.sleep(0.5)
            assert not cloud.closed.is_set(), cloud.close_reason
            with trio.fail_after(TIMEOUT + 1):
                await cloud.closed.wait()
        assert TIMEOUT <= trio.current_time() - sent <= TIMEOUT + 0.3
        assert len(edge.ping_times) >= n_pings + 1  # it pinged the hung peer at once
        assert edge.ping_times[n_pings] - sent <= 0.3


async def test_a_peer_that_pings_its_idle_tunnel_often_is_dropped_as_soon_as_a_busy_one(
    virtual_clock: trio.testing.MockClock,
) -> None:
    """An edge behind a site proxy pings its idle tunnel every second and says so in its HELLO
    (`idle_ping` 1): when it goes silent (a frozen proxy, whose kernel answers keepalive probes
    for it) the cloud drops the idle tunnel `ping_timeout` after its last byte, not after 7.5 s."""
    async with idle_session(Role.SERVER, peer_idle_ping=INTERVAL) as (cloud, edge):
        await trio.sleep(0.5)
        edge.silent = True
        last = cloud.last_rx
        with trio.fail_after(TIMEOUT + 1):
            await cloud.closed.wait()
        assert TIMEOUT <= trio.current_time() - last <= TIMEOUT + 0.3
