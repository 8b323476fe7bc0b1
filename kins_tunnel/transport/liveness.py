"""Liveness of tunnels: one timer per trio run pings every session and ends the silent ones.

A session pings its peer every `ping_interval` and ends `ping_timeout` after the last byte it
received. A sleeping task per session would cost every idle tunnel a task, a coroutine chain and
a cancel scope (about 3 KiB each, measured with tracemalloc); instead one system task per trio run
keeps a heap of (due time, session) entries and, when an entry is due, calls the session's
`liveness_due(now)`, which does what is due (a ping, or closing the session) and returns its next
due time, or None to be forgotten.

A session's due time only moves later as bytes arrive, so receiving costs no heap operation: an
entry that comes up early is simply pushed again with the new time. A closed session's entry is
voided at once (`forget`), so the heap never keeps a dead session alive.

`liveness_due` must not raise: it is the session's failure-isolation boundary (a bug there ends
that session). The timer still catches and reports anything that escapes, because an exception in
a system task would end the whole trio run.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Protocol

import trio

from kins_tunnel.transport.isolation import log_internal_error


class Watched(Protocol):
    def liveness_due(self, now: float) -> float | None:
        """Do what is due at `now`; return the next due time, or None when done."""


class Entry:
    """A session's place in the timer's heap; `watched` is None once it is forgotten."""

    __slots__ = ("due", "seq", "watched")

    def __init__(self, due: float, seq: int, watched: Watched) -> None:
        self.due = due
        self.seq = seq
        self.watched: Watched | None = watched

    def __lt__(self, other: Entry) -> bool:
        return self.due < other.due or (self.due == other.due and self.seq < other.seq)


class _Timer:
    __slots__ = ("_heap", "_seq", "_wakeup")

    def __init__(self) -> None:
        self._heap: list[Entry] = []
        self._seq = itertools.count()
        self._wakeup = trio.Event()

    def add(self, watched: Watched, due: float) -> Entry:
        entry = Entry(due, next(self._seq), watched)
        heapq.heappush(self._heap, entry)
        if self._heap[0] is entry:
            self._wakeup.set()  # earlier than what the timer sleeps for
        return entry

    async def run(self) -> None:
        heap = self._heap
        while True:
            if heap:
                with trio.move_on_at(heap[0].due):
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
                    due = watched.liveness_due(now)
                except Exception as exc:  # pragma: no cover - liveness_due reports its own bugs
                    log_internal_error("liveness", exc)
                    due = None
                if due is not None:
                    entry.due = due
                    heapq.heappush(heap, entry)


_TIMER: trio.lowlevel.RunVar[_Timer] = trio.lowlevel.RunVar("kins_tunnel_liveness")


def watch(watched: Watched, due: float) -> Entry:
    """Call `watched.liveness_due(now)` at `due` (then at the times it returns)."""
    try:
        timer = _TIMER.get()
    except LookupError:
        timer = _Timer()
        _TIMER.set(timer)
        trio.lowlevel.spawn_system_task(timer.run, name="kins_tunnel liveness timer")
    return timer.add(watched, due)


def forget(entry: Entry) -> None:
    """Void an entry of `watch` (the session is over); it is dropped when it comes up."""
    entry.watched = None
