"""The tunnel port's admission (`cloud.admission`): the rate behind the retry-after hint, and the
hint itself (virtual clock: exact)."""

from __future__ import annotations

import trio
import trio.testing

from kins_tunnel.cloud.admission import (
    ASSUMED_HANDSHAKE,
    MAX_RETRY_AFTER,
    MIN_RETRY_AFTER,
    RECENT_SAMPLES,
    Admission,
)


def _admission() -> Admission:
    return Admission(max_pending=10_000, max_concurrent=64, slow_handshake=2.0)


async def test_the_rate_is_assumed_until_measured_then_follows_completions(
    virtual_clock: trio.testing.MockClock,
) -> None:
    a = _admission()
    assert a.rate() == 64 / ASSUMED_HANDSHAKE  # nothing measured yet: on the high side
    for _ in range(RECENT_SAMPLES * 2):  # 500 per second
        await trio.sleep(0.002)
        a.completed()
    assert 480 <= a.rate() <= 520
    await trio.sleep(10)  # a stall lowers it
    assert a.rate() < 20


async def test_the_hint_is_the_queue_ahead_at_the_rate(
    virtual_clock: trio.testing.MockClock,
) -> None:
    a = _admission()
    assert a.retry_after() == MIN_RETRY_AFTER  # nothing queued
    for _ in range(256):  # 100 per second
        await trio.sleep(0.01)
        a.completed()
    tickets = [a.arrive(trio.current_time() + 60) for _ in range(364)]
    async with trio.open_nursery() as n:
        for t in tickets:  # one at a time: 64 take a slot, 300 wait
            n.start_soon(a.acquire, t)
            await trio.testing.wait_all_tasks_blocked()
        assert a.busy_slots == 64
        assert 3.5 <= a.retry_after() <= 3.7  # 364 ahead at 100/s
        await trio.sleep(1000)
        assert a.retry_after() == MAX_RETRY_AFTER  # stalled for long: capped
        n.cancel_scope.cancel()
