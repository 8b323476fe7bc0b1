"""The liveness timer (`transport.liveness`): one system task per trio run pings every watched
session on its schedule and ends the silent ones; a bug in one session's ping reaches neither the
others nor the run. On the virtual clock, so every bound is exact."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from kins_tunnel.transport import liveness


class Watched:
    """A session as the timer sees it: when its last byte came, what a ping and a timeout do."""

    def __init__(self, name: str, *, broken: bool = False) -> None:
        self.name = name
        self.broken = broken
        self.last_rx = trio.current_time()
        self.timeout = 3.5
        self.pings: list[float] = []
        self.ended: list[float] = []

    def ping(self) -> float | None:
        self.pings.append(trio.current_time())
        if self.broken:
            raise RuntimeError(f"bug in {self.name}'s ping")
        return None

    def deadline(self) -> float:
        return self.last_rx + self.timeout

    def timed_out(self, idle: float) -> None:
        self.ended.append(idle)


def watch(watched: Watched, interval: float, timeout: float) -> liveness.Entry:
    """Watch `watched`, which ends `timeout` after its last byte."""
    watched.timeout = timeout
    return liveness.watch(watched, interval)


async def test_pings_on_schedule_and_ends_exactly_at_the_timeout(
    virtual_clock: trio.testing.MockClock,
) -> None:
    t0 = trio.current_time()
    quiet = Watched("quiet")
    talking = Watched("talking")
    watch(quiet, 1.0, 3.5)
    watch(talking, 1.0, 3.5)
    for _ in range(6):  # bytes arrive from `talking` every 0.5 s
        await trio.sleep(0.5)
        talking.last_rx = trio.current_time()
    # to 4.25, not 4.0: at a deadline both tasks share, trio may run either first
    await trio.sleep(1.25)
    assert [round(t - t0, 6) for t in quiet.pings] == [1.0, 2.0, 3.0]
    assert quiet.ended == [3.5]  # 3.5 s after its last byte, not at the next ping
    assert [round(t - t0, 6) for t in talking.pings] == [1.0, 2.0, 3.0, 4.0]
    assert talking.ended == []


async def test_a_bug_in_one_ping_ends_that_entry_only(
    virtual_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    t0 = trio.current_time()
    broken = Watched("broken", broken=True)
    healthy = Watched("healthy")
    watch(broken, 1.0, 100.0)
    watch(healthy, 1.0, 100.0)
    with caplog.at_level(logging.ERROR):
        await trio.sleep(3.5)
    assert len(broken.pings) == 1  # its entry is dropped after the bug
    assert [round(t - t0, 6) for t in healthy.pings] == [1.0, 2.0, 3.0]
    reported = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert reported == ["internal error in liveness: RuntimeError: bug in broken's ping"]


async def test_a_forgotten_entry_is_never_run_again(virtual_clock: trio.testing.MockClock) -> None:
    gone = Watched("gone")
    entry = watch(gone, 1.0, 2.0)
    await trio.sleep(1.5)
    liveness.forget(entry)
    await trio.sleep(5.0)
    assert len(gone.pings) == 1 and gone.ended == []


class Deferring(Watched):
    """A session whose ping policy says when it wants to be asked again."""

    def __init__(self, name: str, again: list[float | None]) -> None:
        super().__init__(name)
        self.again = again

    def ping(self) -> float | None:
        super().ping()
        step = self.again.pop(0) if self.again else None
        return None if step is None else trio.current_time() + step


async def test_a_session_is_asked_again_when_its_ping_says(
    virtual_clock: trio.testing.MockClock,
) -> None:
    """`ping()` returning a time moves the next ask there (later or earlier than the interval);
    None, or a time already past, means one interval from now."""
    t0 = trio.current_time()
    w = Deferring("deferring", [2.5, 0.25, None, -1.0])
    w.last_rx = t0 + 1000  # never times out here
    watch(w, 1.0, 5.0)
    await trio.sleep(6.0)
    assert [round(t - t0, 6) for t in w.pings] == [1.0, 3.5, 3.75, 4.75, 5.75]


async def test_entries_due_close_together_are_run_in_one_wake_up(
    virtual_clock: trio.testing.MockClock,
) -> None:
    """The timer wakes on a grid (`TICK`, an eighth of the interval for short ones): sessions
    due at slightly different times are pinged at the same instant, never early and at most one
    tick late."""
    tick = min(liveness.TICK, 1.0 / 8)
    watched = []
    for i in range(5):
        await trio.sleep(0.01)
        w = Watched(f"w{i}")
        w.last_rx = trio.current_time() + 1000  # never times out here
        watched.append((trio.current_time() + 1.0, w))
        watch(w, 1.0, 5.0)
    await trio.sleep(1.5)
    firsts = {w.pings[0] for _, w in watched}
    assert len(firsts) == 1, firsts
    (at,) = firsts
    for due, _ in watched:
        assert due <= at < due + tick
    assert liveness.wake_time(10.01, 10.0) == 10.25 and liveness.wake_time(10.0, 10.0) == 10.0


async def test_absurd_settings_do_not_end_the_timer(virtual_clock: trio.testing.MockClock) -> None:
    # a ping interval or timeout of about 1e308 s (finite, so a config file can state it) made the
    # grid's arithmetic overflow in the timer task, which would end the whole trio run
    assert liveness.wake_time(1e308, 1e308) == 1e308
    assert liveness.wake_time(5.0, 1e-307) == 5.0
    t0 = trio.current_time()
    absurd = Watched("absurd")
    normal = Watched("normal")
    watch(absurd, 1e308, 1.7e308)
    watch(normal, 1.0, 3.5)
    await trio.sleep(2.25)
    assert [round(t - t0, 6) for t in normal.pings] == [1.0, 2.0]
    assert absurd.pings == [] and absurd.ended == []
