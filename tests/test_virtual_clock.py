"""The virtual clock the timer tests run on (tests/conftest.py): it does not jump while a worker
thread is busy, and does jump once everything is idle."""

from __future__ import annotations

import time

import trio
import trio.testing


async def test_no_jump_while_a_worker_thread_works(virtual_clock: trio.testing.MockClock) -> None:
    t0 = trio.current_time()
    async with trio.open_nursery() as n:
        n.start_soon(trio.sleep, 5)  # the next deadline, 5 s of virtual time away
        await trio.to_thread.run_sync(time.sleep, 0.1)  # ten thresholds of real work
        assert trio.current_time() - t0 < 1  # the clock waited for the thread
    assert trio.current_time() - t0 == 5  # then jumped straight to the deadline


async def test_idle_time_is_skipped(virtual_clock: trio.testing.MockClock) -> None:
    t_real = time.monotonic()
    await trio.sleep(3600)
    assert time.monotonic() - t_real < 5
