"""A thin link in virtual time, driving the real output scheduler and delay pacer (no I/O).

The sender is a `DataQueues` (the connection's DATA scheduler) with a `DelayPacer` and its
`DelayProbe`; what it writes enters the link's bottleneck queue, which drains at `rate` bytes/s;
a frame arrives `delay` seconds after its last byte left the queue. The sender writes only what
the queue has room for (TCP's back-pressure), so without pacing the queue fills up. Every
`STAMP_INTERVAL` while DATA is queued a stamp goes through the same queue; the receiver answers it
with its own clock (offset by `CLOCK_OFFSET`: the pacer must not depend on synchronised clocks)
and its count of DATA bytes, and the answer comes back after `delay` on an uncongested reverse
path, exactly as `mux` feeds `DelayProbe.answered`. A stall of the receiving process
(`frozen_until`) is what a real one is: what arrives meanwhile waits in its socket's buffer
(`receive_buffer`; once that is full the link stops, TCP's back-pressure), and when it runs again
it reads all of it and answers the stamps with its clock of that moment.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field

from kins_tunnel.proto.frames import HEADER_SIZE, unpack_header
from kins_tunnel.proto.output import DataQueues
from kins_tunnel.proto.pacer import DelayPacer, DelayProbe, clock_us

CLOCK_OFFSET = 3_000.123  # the receiver's clock runs this far ahead (seconds; wraps in µs)
STEP = 0.0005
STAMP_SIZE = HEADER_SIZE + 4


@dataclass
class Arrival:
    at: float
    sid: int
    n: int
    sent_at: float  # when the frame was written into the link


@dataclass
class Link:
    rate: float  # bytes/s
    delay: float  # one-way propagation, seconds
    queue: int  # bottleneck queue, bytes
    target: float = 0.025
    pacing: bool = True
    max_rate: float | None = None
    now: float = 0.0
    data: DataQueues = field(init=False)
    pacer: DelayPacer = field(init=False)
    probe: DelayProbe = field(init=False)
    arrivals: list[Arrival] = field(default_factory=list)
    stamp_delays: list[tuple[float, float]] = field(default_factory=list)  # (at, queueing delay)
    _q: collections.deque[list[float]] = field(default_factory=collections.deque)
    _q_bytes: float = 0.0
    _flight: collections.deque[tuple[float, int, int, float]] = field(
        default_factory=collections.deque
    )
    _answers: collections.deque[tuple[float, int, int, int]] = field(
        default_factory=collections.deque
    )
    _rx_bytes: int = 0
    frozen_until: float = 0.0  # the receiving process does not run before this (a stall)
    receive_buffer: int = 256 * 1024  # bytes the receiver's socket holds unread (back-pressure)
    _unread: int = 0  # bytes arrived while the receiver was stalled

    def __post_init__(self) -> None:
        self.data = DataQueues(lambda: self.now)
        self.pacer = DelayPacer(self.target, self.max_rate)
        self.probe = DelayProbe(self.pacer)

    # ---------------------------------------------------------------- sender
    def _write(self, view: memoryview) -> None:
        pos = 0
        while pos < len(view):  # each write is whole frames
            length, _t, _f, sid = unpack_header(view, pos)
            self._enqueue(HEADER_SIZE + length, sid, length)
            pos += HEADER_SIZE + length

    def _enqueue(self, size: int, sid: int, n: int) -> None:
        # [bytes left to serve, sid (0 = stamp), payload bytes, write time, stamp]
        self._q.append([float(size), sid, n, self.now, clock_us(self.now)])
        self._q_bytes += size

    def _send(self) -> None:
        room = int(self.queue - self._q_bytes)
        if not self.data or room <= 0:
            return
        if True:  # stamps flow either way: without pacing they only measure
            stamp = self.probe.stamp_due(self.now)
            if stamp is not None:
                self._enqueue(STAMP_SIZE, 0, 0)
                room -= STAMP_SIZE
        if self.pacing and self.pacer.engaged:
            credit = self.pacer.credit(self.now) or 0
            _n, paced = self.data.write_paced(self._write, room, credit)
            self.pacer.spent(paced)
        else:
            self.data.held = 0
            self.data.write(self._write, room)

    # ---------------------------------------------------------------- link and receiver
    def _serve(self, dt: float) -> None:
        budget = self.rate * dt
        while self._q and budget > 0 and self._unread < self.receive_buffer:
            head = self._q[0]
            take = min(head[0], budget)
            head[0] -= take
            budget -= take
            self._q_bytes -= take
            if head[0] <= 0:
                self._q.popleft()
                _left, sid, n, sent_at, stamp = head
                self._flight.append((self.now + self.delay, int(sid), int(n), sent_at))
                if sid == 0:
                    self._flight[-1] = (self.now + self.delay, 0, int(stamp), sent_at)

    def _receive(self) -> None:
        if self.now < self.frozen_until:  # stalled: what arrives fills the socket's buffer
            self._unread = sum(n for at, sid, n, _ in self._flight if at <= self.now and sid)
        else:
            self._unread = 0
        while self.now >= self.frozen_until and self._flight and self._flight[0][0] <= self.now:
            at, sid, n, sent_at = self._flight.popleft()
            if at < self.frozen_until:  # held by the stall: read (and answered) only now
                at = self.now
            if sid == 0:  # a stamp: answer it (n is the stamp)
                self.stamp_delays.append((at, at - sent_at - self.delay))
                rx_clock = clock_us(at + CLOCK_OFFSET)
                self._answers.append((at + self.delay, n, rx_clock, self._rx_bytes & 0xFFFFFFFF))
            else:
                self._rx_bytes += n
                self.arrivals.append(Arrival(at, sid, n, sent_at))
        while self._answers and self._answers[0][0] <= self.now:
            _at, echo, rx_clock, rx_bytes = self._answers.popleft()
            self.probe.answered(self.now, echo, rx_clock, rx_bytes, self.data.held > 0)

    def run(self, until: float, each_step: Callable[[Link], None] | None = None) -> None:
        while self.now < until:
            if each_step is not None:
                each_step(self)
            self._send()
            self._serve(STEP)
            self.now += STEP
            self._receive()

    # ---------------------------------------------------------------- what happened
    def delivered(self, start: float, end: float, sid: int | None = None) -> int:
        return sum(
            a.n for a in self.arrivals if start <= a.at < end and (sid is None or a.sid == sid)
        )

    def queueing_delays(self, start: float, end: float) -> list[float]:
        return sorted(d for at, d in self.stamp_delays if start <= at < end)


def keep_busy(link: Link, sid: int, backlog: int = 512 * 1024, max_frame: int = 16384) -> None:
    """A bulk source: keeps `backlog` bytes queued on `sid` (the peer's credit is ample)."""
    q = link.data._queues.get(sid)  # noqa: SLF001  (the simulated application's view)
    queued = 0 if q is None else len(q.buf) - q.off
    if queued < backlog // 2:
        link.data.add(sid, bytes(backlog - queued), backlog - queued, max_frame, False)


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))]
