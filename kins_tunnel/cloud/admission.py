"""Admission to the tunnel port: who gets to run a TLS handshake, and for how long.

Theory of operation
-------------------
The tunnel port faces the internet. Before a connection has proven anything (a client certificate),
it may only cost a bounded amount, and silent or slow connections must never starve real edges,
whether an attacker opens thousands or a fleet of edges reconnects at once. The rules, as a TLS
front end keeps working under an idle flood:

- **One deadline from accept.** Everything up to an established tunnel (waiting for the first
  byte, waiting for a handshake slot, TLS, HELLO) happens within `handshake_timeout` of accept.
- **First byte first.** A connection holds nothing but its socket until its first byte (the TLS
  ClientHello) arrives, and must send it within `first_byte_timeout`; a silent one is closed.
- **Bounded pending set, silent shed first.** At most `max_pending_handshakes` connections may be
  between accept and the end of their TLS handshake; a new arrival beyond that sheds the oldest
  one whose ClientHello is not in yet (`spoke`: silent or stalled, and the closest to its deadline
  anyway). When every pending connection has its ClientHello in (a reconnect storm, not a
  flood), the newcomer is the one refused, at once and with a hint: shedding the oldest would
  throw away the head of the queue, the edge about to be served, and the work already done for
  it, for one that would wait the longest.
- **Bounded CPU work, slow holders displaced.** Handshakes run at most `max_concurrent_handshakes`
  at a time (so in a reconnect storm some finish instead of all crawling into their deadlines). A
  slot held longer than `slow_handshake` (a real handshake needs one round trip after the
  ClientHello) is given to a newcomer whose first byte has arrived, when all slots are busy.

Every refusal has a short, fixed reason label for `kins_tunnel_handshake_failures_total`.

**A queue no longer than it is worth.** A connection that has waited half of `handshake_timeout`
for a slot is refused (reason "queued") before its edge gives up on it: the edge is told when to
come back instead of timing out (a timeout would count as a failure and lengthen its backoff).
A connection that arrives behind a queue it cannot get through by then (the connections waiting
for a slot, at `rate`) is refused so at once: in a reconnect storm a refusal with a hint costs
far less than a connection held until it is refused late or its edge gives up.

**When to come back.** A connection refused before its TLS handshake ("shed", "queued", or its
deadline missed) is told when to try again (`transport.refusal`): `retry_after()` is the time the
connections waiting now need at the rate the replica completes handshakes while it has handshakes
to do (`rate`, its service rate, on the high side), at least `MIN_RETRY_AFTER`; so refused edges come back once the queue in front of
them has gone, not at once and not after their whole backoff. The edges refused in the last
`REFUSAL_WINDOW` count as queued too (`refusal_hint` records each refusal): they are coming back,
and an edge refused after them should come back after them. So when a large fleet arrives at
once, the hints grow with the refusals and spread it out in one round, instead of every refused
edge being told the same short wait and refused again (refusals becoming the load). The record
is bounded (`MAX_REFUSALS_KEPT`), as everything here.

**The service rate, not the wall-clock rate.** `rate` counts time only while a handshake slot is
held (`busy_time`): the time the replica spends with nothing to do (its refused edges away, as
told) does not lower it. Measured over wall-clock time it did: hints sent a large fleet away, the
replica idled, the rate it measured fell, the next hints were longer still (up to the cap), and a
19,000-edge storm stalled at a few handshakes a second. So a hint is never longer than the queue
the replica knows of (waiting, in a slot, refused recently) needs at the rate it has shown it
can serve.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

RATE_SAMPLES = 256  # completion times kept to measure the handshake rate
RECENT_SAMPLES = 64  # completions before the rate is measured rather than assumed
RATE_WINDOW = 1.0  # seconds of busy time: the rate is the higher of this window's and all kept
MAX_WINDOW_SAMPLES = 8192  # completions counted in RATE_WINDOW, at most
PEAK_MEMORY = 5.0  # seconds of busy time the best RATE_WINDOW's rate is remembered
ASSUMED_HANDSHAKE = 0.1  # seconds a slot takes per handshake, until RECENT_SAMPLES have completed
MIN_RETRY_AFTER = 1.0  # the least wait a shed connection is told
MAX_RETRY_AFTER = 60.0  # and the most (an edge caps it at its own reconnect.max too)
REFUSAL_WINDOW = 2.0  # seconds: the refusals this recent count in the queue ahead of a new one
MAX_REFUSALS_KEPT = 16384  # at most this many refusal times kept (about 0.5 MiB)


@dataclass(eq=False)
class Ticket:
    """One connection on its way in. `scope` bounds all of its set-up; `shed` cancels it."""

    accepted: float
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    reason: str | None = None  # why it was shed ("shed", "slow"), None if not

    def shed(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.scope.cancel()


class Admission:
    def __init__(self, *, max_pending: int, max_concurrent: int, slow_handshake: float) -> None:
        self.max_pending = max_pending
        self.max_concurrent = max_concurrent
        self.slow_handshake = slow_handshake
        self._waiting = 0  # connections in acquire(), waiting for a slot
        self._pending: collections.OrderedDict[Ticket, None] = collections.OrderedDict()
        self._silent: collections.OrderedDict[Ticket, None] = collections.OrderedDict()  # no hello
        self._holders: collections.OrderedDict[Ticket, float] = collections.OrderedDict()
        self._lot = trio.lowlevel.ParkingLot()
        self.shed_count = 0
        # busy_time() at each completion (the service rate's samples)
        self._done: collections.deque[float] = collections.deque(maxlen=RATE_SAMPLES)
        # busy_time() of the completions within RATE_WINDOW of busy time
        self._window: collections.deque[float] = collections.deque(maxlen=MAX_WINDOW_SAMPLES)
        self._peak = 0.0  # the best RATE_WINDOW rate seen within PEAK_MEMORY
        self._peak_at = 0.0  # busy_time() it was seen at
        self._busy = 0.0  # seconds with a slot held, up to _busy_since
        self._busy_since = 0.0  # when the slots last went from none to some held
        self._refused: collections.deque[float] = collections.deque(maxlen=MAX_REFUSALS_KEPT)

    def arrive(self, deadline: float) -> Ticket:
        """Register a new connection. With the pending set full, the oldest connection without
        its ClientHello is shed; if every one has it, the newcomer is (returned shed)."""
        ticket = Ticket(trio.current_time())
        ticket.scope.deadline = deadline
        while len(self._pending) >= self.max_pending:
            if not self._silent:
                ticket.shed("shed")
                self.shed_count += 1
                return ticket
            oldest, _ = self._silent.popitem(last=False)
            del self._pending[oldest]
            oldest.shed("shed")
            self.shed_count += 1
        self._pending[ticket] = None
        self._silent[ticket] = None
        return ticket

    def spoke(self, ticket: Ticket) -> None:
        """The connection's ClientHello is in: it is shed after every silent one."""
        self._silent.pop(ticket, None)

    def leave(self, ticket: Ticket) -> None:
        """The connection's set-up is over (success or not): forget it, free its slot."""
        self._pending.pop(ticket, None)
        self._silent.pop(ticket, None)
        self.release(ticket)

    async def acquire(self, ticket: Ticket) -> None:
        """Wait for a handshake slot (displacing a holder slower than `slow_handshake`); a ticket
        behind a queue longer than half of what is left of its set-up time is shed ("queued")."""
        if len(self._holders) >= self.max_concurrent and self._waiting:
            now = trio.current_time()
            cut = ticket.accepted + (ticket.scope.deadline - ticket.accepted) / 2
            if now + self._waiting / self.rate() > cut:
                ticket.shed("queued")
                await trio.lowlevel.checkpoint()  # the ticket's scope ends the caller here
        self._waiting += 1
        try:
            await self._wait_for_slot()
        finally:
            self._waiting -= 1
        # no checkpoint between the check in _wait_for_slot and this: never more than
        # max_concurrent holders, however many connections reach this in one scheduling round
        now = trio.current_time()
        if not self._holders:
            self._busy_since = now
        self._holders[ticket] = now

    async def _wait_for_slot(self) -> None:
        """Return (without a checkpoint after the check) once a slot is free for the caller."""
        await trio.lowlevel.checkpoint()  # a schedule point first, whether or not it must wait
        while len(self._holders) >= self.max_concurrent:
            oldest, since = next(iter(self._holders.items()))
            overdue = since + self.slow_handshake - trio.current_time()
            if overdue <= 0:
                del self._holders[oldest]  # the caller takes its slot at once
                if not self._holders:  # (one slot only) close the busy period it ends
                    self._busy += trio.current_time() - self._busy_since
                oldest.shed("slow")
                self.shed_count += 1
                return
            with trio.move_on_after(overdue):
                await self._lot.park()

    def release(self, ticket: Ticket) -> None:
        if self._holders.pop(ticket, None) is not None:
            if not self._holders:
                self._busy += trio.current_time() - self._busy_since
            self._lot.unpark()

    def busy_time(self) -> float:
        """Seconds during which at least one handshake slot was held (the service rate's clock)."""
        if self._holders:
            return self._busy + trio.current_time() - self._busy_since
        return self._busy

    def completed(self) -> None:
        """A handshake succeeded (feeds `rate`)."""
        now = self.busy_time()
        self._done.append(now)
        self._window.append(now)

    def rate(self) -> float:
        """Handshakes per second of busy time (`busy_time`): the higher of the rate over the last
        `RATE_WINDOW` and over the last `RATE_SAMPLES` completions (both up to now, so a stall
        with slots held lowers it; time with none held does not); before `RECENT_SAMPLES` have
        completed, `max_concurrent / ASSUMED_HANDSHAKE`. On the high side by design: an edge told
        to come back too early costs one more cheap refusal, one told too late waits for
        nothing. A window of time, not of the last few completions: handshakes that run together
        end together, and 64 completions in one scheduling round read as thousands a second
        (hints of the 1 s minimum, and the edges refused again on their return). The best
        window's rate counts for `PEAK_MEMORY` seconds of busy time: a few seconds in which the
        slots wait on slow peers (edges busy with their own handshakes) do not turn into hints
        at the cap, which kept edges away for 30 s while the replica could have served them."""
        done = self._done
        if len(done) < RECENT_SAMPLES:
            return max(self.max_concurrent / ASSUMED_HANDSHAKE, 1.0)
        now = self.busy_time()
        window = self._window
        while window and window[0] < now - RATE_WINDOW:
            window.popleft()
        kept = len(done) / max(now - done[0], 1e-3)
        recent = len(window) / RATE_WINDOW if now >= RATE_WINDOW else 0.0
        if recent >= self._peak or now - self._peak_at > PEAK_MEMORY:
            self._peak, self._peak_at = recent, now
        return max(recent, kept, self._peak, 1.0)

    def retry_after(self) -> float:
        """Seconds a connection refused now should wait: the queue ahead of it (waiting for a slot,
        holding one, and refused within `REFUSAL_WINDOW`) at `rate`."""
        horizon = trio.current_time() - REFUSAL_WINDOW
        refused = self._refused
        while refused and refused[0] < horizon:
            refused.popleft()
        wait = (self._waiting + len(self._holders) + len(refused)) / self.rate()
        return min(max(wait, MIN_RETRY_AFTER), MAX_RETRY_AFTER)

    def refusal_hint(self) -> float:
        """`retry_after` for a connection refused now, which is recorded as refused."""
        hint = self.retry_after()
        self._refused.append(trio.current_time())
        return hint

    def room_for(self, burst: int) -> Callable[[], int]:
        """How many connections the tunnel port may accept now (`listen.accept_bursts`): up to
        `burst` while the pending set has room, one per wake-up once it is full (a newcomer then
        sheds the oldest pending connection, so a flood of silent ones cannot lock edges out; the
        rest wait in the listen backlog instead of shedding each other)."""
        return lambda: max(1, min(burst, self.max_pending - len(self._pending)))

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def recent_refusals(self) -> int:
        """Refusals recorded by `refusal_hint` (those within `REFUSAL_WINDOW` count in hints)."""
        return len(self._refused)

    @property
    def busy_slots(self) -> int:
        return len(self._holders)
