"""Liveness of tunnels: one timer per trio run pings every session and ends the silent ones.

A session is asked to ping every `interval` (or when its `ping()` said to ask again) and ends at
its `deadline()` (`timeout` after the last byte it received, in the session's policy), to the
scheduler's precision, whatever the interval. Whether a ping goes out and when silence is fatal is
the session's policy (`Session.ping`, `Session.deadline`: an idle tunnel pings only after a
silence, see `ping_policy`). A sleeping task per session
would cost every idle tunnel a task, a coroutine chain and a cancel scope (about 3 KiB, measured
with tracemalloc); instead one system task per trio run keeps a heap of entries (due time, the
session and its ping schedule) and, when one is due, pings the session (`ping()`) or ends it
(`timed_out(idle)`).

A session's due time only moves later as bytes arrive, so receiving costs no heap operation: an
entry that comes up early is pushed again with its new time. A session whose schedule moves
earlier (an idle tunnel that takes a stream: it pings every `interval` from then on) voids its
entry and is watched again (`forget`, `watch` with `first_ping`). The timer wakes only on a grid of `TICK` seconds
(finer for short intervals: an eighth of the interval), running every entry due by then: with
thousands of idle tunnels, each due at its own time, one wake-up then serves hundreds of entries
instead of one (every wake-up of the process costs far more than an entry); a ping or a timeout
comes at most one tick late. A closed session's entry is voided at
once (`forget`), so the heap never keeps a dead session alive.

`ping` and `timed_out` must not raise: they are the session's failure-isolation boundary (a bug
there ends that session). The timer still catches and reports anything that escapes, because an
exception in a system task would end the whole trio run.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Protocol

import trio

from kins_tunnel.transport.isolation import log_internal_error

TICK = 0.25  # seconds: the grid the timer wakes on (see the module docstring)


def wake_time(due: float, interval: float) -> float:
    """When the timer wakes for an entry due at `due`: the next point of its grid (`due` itself
    when that is beyond the grid's reach: a setting of 1e308 seconds must not end the timer)."""
    tick = min(TICK, interval / 8)
    slot = due / tick if tick > 0 else math.inf
    if not math.isfinite(slot):
        return due
    return math.ceil(slot) * tick


class Watched(Protocol):
    @property
    def last_rx(self) -> float:
        """Clock time of the last byte received."""

    def deadline(self) -> float:
        """Clock time at which the session is dead if nothing more arrives (it only moves later
        as bytes arrive, or earlier when the session is watched again)."""

    def ping(self) -> float | None:
        """Ping now, or not; returns when to be asked next (clock time; None: `interval` from
        now)."""

    def timed_out(self, idle: float) -> None:
        """Nothing arrived for `idle` seconds (at least the timeout): end the session."""


class Entry:
    """A session's place in the timer's heap; `watched` is None once it is forgotten."""

    __slots__ = ("due", "seq", "watched", "interval", "next_ping")

    def __init__(self, watched: Watched, interval: float, next_ping: float) -> None:
        self.watched: Watched | None = watched
        self.interval = max(interval, 0.01)
        self.next_ping = next_ping
        self.due = min(self.next_ping, watched.deadline())
        self.seq = 0

    def __lt__(self, other: Entry) -> bool:
        return self.due < other.due or (self.due == other.due and self.seq < other.seq)

    def run(self, watched: Watched, now: float) -> bool:
        """Do what is due at `now`; False: the session timed out (forget the entry)."""
        deadline = watched.deadline()
        if now >= deadline:
            watched.timed_out(now - watched.last_rx)
            return False
        if now >= self.next_ping:
            again = watched.ping()
            self.next_ping = again if again is not None and again > now else now + self.interval
        self.due = min(self.next_ping, deadline)
        return True


class _Timer:
    __slots__ = ("_heap", "_seq", "_wakeup")

    def __init__(self) -> None:
        self._heap: list[Entry] = []
        self._seq = itertools.count()
        self._wakeup = trio.Event()

    def add(self, entry: Entry) -> None:
        entry.seq = next(self._seq)
        heapq.heappush(self._heap, entry)
        if self._heap[0] is entry:
            self._wakeup.set()  # earlier than what the timer sleeps for

    async def run(self) -> None:
        heap = self._heap
        while True:
            if heap:
                with trio.move_on_at(wake_time(heap[0].due, heap[0].interval)):
                    await self._wakeup.wait()
            else:
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            now = trio.current_time()
            while heap and heap[0].due <= now:
                entry = heapq.heappop(heap)
                watched = entry.watched
                if watched is None:
                    continue  # forgotten
                try:
                    again = entry.run(watched, now)
                except Exception as exc:  # the session reports its own bugs; this is the backstop
                    log_internal_error("liveness", exc)
                    again = False
                if again:
                    heapq.heappush(heap, entry)


_TIMER: trio.lowlevel.RunVar[_Timer] = trio.lowlevel.RunVar("kins_tunnel_liveness")


def watch(watched: Watched, interval: float, *, first_ping: float | None = None) -> Entry:
    """Ask `watched` to ping at `first_ping` (clock time; None: `interval` from now), then on the
    schedule its `ping()` returns; end it at its `deadline()`."""
    try:
        timer = _TIMER.get()
    except LookupError:
        timer = _Timer()
        _TIMER.set(timer)
        trio.lowlevel.spawn_system_task(timer.run, name="kins_tunnel liveness timer")
    now = trio.current_time()
    entry = Entry(
        watched, interval, now + max(interval, 0.01) if first_ping is None else first_ping
    )
    timer.add(entry)
    return entry


def forget(entry: Entry) -> None:
    """Void an entry of `watch` (the session is over); it is dropped when it comes up."""
    entry.watched = None
