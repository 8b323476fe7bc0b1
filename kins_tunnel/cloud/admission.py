"""Admission to the tunnel port: who gets to run a TLS handshake, and for how long.

Theory of operation
-------------------
The tunnel port faces the internet. Before a connection has proven anything (a client certificate),
it may only cost a bounded amount, and silent or slow connections must never starve real edges,
whether an attacker opens thousands or a fleet of edges reconnects at once. The rules, as a TLS
front end keeps working under an idle flood:

- **One deadline from accept.** Everything up to an established tunnel (waiting for the first
  byte, waiting for a handshake slot, TLS, the edge's answer to the server's flight, HELLO)
  happens within `handshake_timeout` of accept.
- **First byte first.** A connection holds nothing but its socket until its first byte (the TLS
  ClientHello) arrives, and must send it within `first_byte_timeout`; a silent one is closed.
- **Bounded pending set, silent shed first, the fattest source pays.** At most
  `max_pending_handshakes` connections may be between accept and the end of their TLS
  handshake; a new arrival beyond that sheds one whose ClientHello is not in yet (`spoke`:
  silent or stalled, and the closest to its deadline anyway), else one that has had the server's
  flight for longer than `slow_handshake` without answering it (`answering`: a real edge answers
  within one round trip; reason "slow"): the oldest such of the source address that holds the
  most pending connections (`names.source_key`: an IPv6 peer by its /64), or the oldest of all.
  When every pending connection has its ClientHello in and is being served or answering in time
  (a reconnect storm, not a flood), the newcomer is the one refused, at once and with a hint
  (shedding the oldest would throw away the head of the queue, the edge about to be served, and
  the work already done for it, for one that would wait the longest); unless another source
  holds more pending connections than the newcomer's would with it: then that source's newest
  connection not in a slot is shed instead. So one address, however many connections it opens
  and stalls, keeps at most an even share of the pending set once others need room, while a site
  whose edges all come from one NAT address may use the whole set when nobody else does (a
  longest-queue drop, as fair queueing does with buffers: no share to configure). The tunnel port then takes
  whole bursts from its listen backlog again (`room_for`): each newcomer costs an accept and a
  refusal with an appointment, where it used to wait in the backlog until its edge's deadline.
- **A slot bounds CPU work, not the peer's round trip.** A handshake slot
  (`max_concurrent_handshakes`) is taken once the ClientHello is whole and given back as soon as
  the server's flight (ServerHello to Finished) is written (`answering`), not when the edge's
  second flight arrives: a slot held across a round trip capped a replica at
  `max_concurrent_handshakes / RTT` handshakes a second (320 at 200 ms) however idle its CPU.
  The wait for the edge's answer is outside any slot but inside the pending set (bounded, shed
  "slow" first, above) and under the one deadline. Finishing the handshake (the edge's Finished,
  and for a full handshake its certificate chain and signature: two signature checks, as much
  CPU as the server's own flight) takes a slot again (`resume`), before any connection still
  waiting for its first turn: so every step of OpenSSL's work for a connection runs in a slot
  (also a second ClientHello after a HelloRetryRequest), and a connection that has had its
  server flight never queues behind later arrivals (its work wasted, the queue reordered). A
  step keeps its slot for one scheduling round after its work (`step_done`): the steps are
  synchronous, so a slot given back at once would bound nothing, and a storm's thousands of
  ready handshakes would all run in one round while live tunnels' pings waited behind them;
  held for a round, at most `max_concurrent_handshakes` steps run per round.
- **Slow holders displaced.** Handshake slots are strict (never more holders than slots, however
  many connections arrive in one scheduling round); a slot held longer than `slow_handshake`
  (now only a stuck write or a stalled step: holding one no longer waits on the peer) is given to
  a newcomer whose first byte has arrived, when all slots are busy.

Every refusal has a short, fixed reason label for `kins_tunnel_handshake_failures_total`.

**A queue no longer than it is worth.** A connection that has waited half of `handshake_timeout`
for a slot is refused (reason "queued") before its edge gives up on it: the edge is told when to
come back instead of timing out (a timeout would count as a failure and lengthen its backoff).
A connection that arrives behind a queue it cannot get through by then (the connections waiting
for a slot, at `rate`) is refused so at once: in a reconnect storm a refusal with a hint costs
far less than a connection held until it is refused late or its edge gives up.

**When to come back: an appointment book.** A connection refused before its TLS handshake
("shed", "queued", or its deadline missed) is told when to try again (`transport.refusal`). Each
refusal of a connection that spoke (an edge that will read the hint: `refusal_hint`) is an
appointment: the later of the book's cursor (`next_free`), the time the handshakes underway now
need at `rate`, and `MIN_RETRY_AFTER` from now; the cursor then moves on by `1 / rate`. So the
edges refused in a storm come back one after another at the rate the replica serves, in the
order they were refused (an edge refused later is never told a shorter wait than one refused
before it, which a window of recent refusals did once the older ones dropped out of it), and the
replica is neither idle while they wait nor flooded when they return. An edge refused again on
its return goes to the end of the book, which holds only the edges that are away: its length is
their number at `rate`. The book is one number (bounded memory); a hint is at most
`MAX_RETRY_AFTER`, and the cursor never runs further ahead than that. A connection shed silent
is told the book's current wait without booking (a flood of silent sockets must not lengthen
every edge's hint).

**The service rate: completions per time with handshakes underway.** `rate` counts time only
while at least one connection with its ClientHello in is pending (waiting for a slot, in one, or
answering: `busy_time`), and counts successful handshakes in it. Time with nothing to do (the
refused edges away, as told) does not lower it: measured over wall-clock time it did, hints sent
a large fleet away, the replica idled, the rate fell, the next hints were longer still, and a
19,000-edge storm stalled at a few handshakes a second. Time a slot is held no longer measures
it: slots are now held for CPU work only, and completions per slot-second would read as several
times what the replica can do (refusals, HELLO exchange and sessions share the same core). The
rate is the higher of the last `RATE_WINDOW` of busy time and the last `RATE_SAMPLES`
completions, and the best window counts for `PEAK_MEMORY` seconds of busy time; during a storm's
first `FILL_TIME` of busy time (and `RATE_SAMPLES` completions) the assumed rate is a floor, as
those seconds measure the pipeline filling (round trips, edges busy with their own ClientHellos),
not the replica: hints from them left it idle for seconds. On the high side by design (an edge
told to come back too early costs one more cheap refusal; one told too late leaves the replica
idle while it waits).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from kins_tunnel.cloud.fairness import SourceLines, SourceShares

RATE_SAMPLES = 256  # completion times kept to measure the handshake rate
RECENT_SAMPLES = 64  # completions before the rate is measured rather than assumed
RATE_WINDOW = 1.0  # seconds of busy time: the rate is the higher of this window's and all kept
MAX_WINDOW_SAMPLES = 8192  # completions counted in RATE_WINDOW, at most
PEAK_MEMORY = 5.0  # seconds of busy time the best RATE_WINDOW's rate is remembered
ASSUMED_HANDSHAKE = 0.1  # the rate assumed until measured: max_concurrent / this, per second
FILL_TIME = 2.0  # seconds of busy time during which the assumed rate is a floor (a storm's start)
MIN_RETRY_AFTER = 1.0  # the least wait a shed connection is told
MAX_RETRY_AFTER = 60.0  # and the most (an edge caps it at its own reconnect.max too)


@dataclass(eq=False)
class Ticket:
    """One connection on its way in. `scope` bounds all of its set-up; `shed` cancels it."""

    accepted: float
    source: str = ""  # the peer's `names.source_key`: whose share of the pending set it uses
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
        # had the server's flight, waiting for the edge's answer: ticket -> since when
        self._answering: collections.OrderedDict[Ticket, float] = collections.OrderedDict()
        self._holders: collections.OrderedDict[Ticket, float] = collections.OrderedDict()
        self._sources = SourceShares()  # the pending set per source address
        self._first = SourceLines()  # connections waiting for their first turn, per source
        self._resume_lot = trio.lowlevel.ParkingLot()  # answered connections: served first
        self._resuming = 0  # connections in resume(), waiting for a slot
        self.shed_count = 0
        self.booked = 0  # refusals booked in the appointment book (edges coming back)
        self.next_free = 0.0  # the appointment book's cursor (trio time)
        # busy_time() at each completion (the service rate's samples)
        self._done: collections.deque[float] = collections.deque(maxlen=RATE_SAMPLES)
        # busy_time() of the completions within RATE_WINDOW of busy time
        self._window: collections.deque[float] = collections.deque(maxlen=MAX_WINDOW_SAMPLES)
        self._peak = 0.0  # the best RATE_WINDOW rate seen within PEAK_MEMORY
        self._peak_at = 0.0  # busy_time() it was seen at
        self._busy = 0.0  # seconds with handshakes underway, up to _busy_since
        self._busy_since = 0.0  # when handshakes last went from none to some underway

    def arrive(self, deadline: float, source: str = "") -> Ticket:
        """Register a new connection from `source` (its `names.source_key`). With the pending set
        full, one is shed to make room, or the newcomer is (returned shed): see the module's
        text, "the fattest source pays"."""
        ticket = Ticket(trio.current_time(), source)
        ticket.scope.deadline = deadline
        while len(self._pending) >= self.max_pending:
            victim = self._victim(source, ticket.accepted)
            if victim is None:
                ticket.shed("shed")
                self.shed_count += 1
                return ticket
            oldest, reason = victim
            self._forget(oldest)
            oldest.shed(reason)
            self.shed_count += 1
        self._pending[ticket] = None
        self._silent[ticket] = None
        self._sources.add(ticket)
        return ticket

    def _victim(self, source: str, now: float) -> tuple[Ticket, str] | None:
        """Whom a newcomer from `source` sheds from the full pending set, and why; None: the
        newcomer. Silent connections first, then slow answerers (each: the fattest source's
        oldest, else the oldest of all); with neither, a source fatter than the newcomer's loses
        its newest connection not in a slot."""
        sources = self._sources
        fattest = sources.fattest_other_than(source)
        payer = source if fattest is None else fattest
        victim = sources.oldest_in(payer, self._silent)
        if victim is None and self._silent:
            victim = next(iter(self._silent))
        if victim is not None:
            return victim, "shed"
        late = now - self.slow_handshake  # answering since before this is slow
        victim = sources.oldest_in(payer, self._answering)
        if victim is None or self._answering[victim] > late:
            victim = next(iter(self._answering), None)
        if victim is not None and self._answering[victim] <= late:
            return victim, "slow"
        if fattest is not None:
            victim = sources.newest_outside(fattest, self._holders)
            if victim is not None:
                return victim, "shed"
        return None

    def spoke(self, ticket: Ticket) -> None:
        """The connection's ClientHello is in: it is shed after every silent one, and the
        replica has a handshake underway (its service-rate clock runs)."""
        if ticket in self._silent:
            del self._silent[ticket]
            self._underway_changed(+1)

    async def answering(self, ticket: Ticket) -> None:
        """The server's flight is written: after one scheduling round (`step_done`) the slot goes
        back; the connection waits for its edge's answer in the pending set (shed "slow" first
        when the set is full and it is late)."""
        await self.step_done()
        self.release(ticket)
        if ticket in self._pending:
            self._answering.pop(ticket, None)
            self._answering[ticket] = trio.current_time()

    @staticmethod
    async def step_done() -> None:
        """End a step of handshake work with its slot still held: one schedule point (shielded:
        the caller's deadline acts at its next wait), so that one scheduling round runs at most
        `max_concurrent` steps and the live tunnels' tasks run between them."""
        await trio.lowlevel.cancel_shielded_checkpoint()

    def leave(self, ticket: Ticket) -> None:
        """The connection's set-up is over (success or not): forget it, free its slot."""
        self._forget(ticket)
        self.release(ticket)

    def _forget(self, ticket: Ticket) -> None:
        if ticket in self._pending:
            had_spoken = ticket not in self._silent
            del self._pending[ticket]
            self._sources.remove(ticket)
            self._silent.pop(ticket, None)
            self._answering.pop(ticket, None)
            if had_spoken:
                self._underway_changed(-1)

    def _underway_changed(self, by: int) -> None:
        """Start or stop the busy clock as handshakes underway go from none to some and back
        (called after the change: `underway` is the new count)."""
        underway = self.underway
        if by > 0 and underway == 1:
            self._busy_since = trio.current_time()
        elif by < 0 and underway == 0:
            self._busy += trio.current_time() - self._busy_since

    async def acquire(self, ticket: Ticket) -> None:
        """Wait for a handshake slot (displacing a holder slower than `slow_handshake`); a ticket
        behind a queue longer than half of what is left of its set-up time is shed ("queued").
        A connection asking for a slot has its ClientHello in (`spoke`)."""
        self.spoke(ticket)
        if len(self._holders) >= self.max_concurrent and self._waiting:
            now = trio.current_time()
            cut = ticket.accepted + (ticket.scope.deadline - ticket.accepted) / 2
            if now + self._first.ahead(ticket.source, self._waiting) / self.rate() > cut:
                ticket.shed("queued")
                await trio.lowlevel.checkpoint()  # the ticket's scope ends the caller here
        self._waiting += 1
        try:
            await self._wait_for_slot(source=ticket.source)
        finally:
            self._waiting -= 1
            self._first.tidy(ticket.source)
        # no checkpoint between the check in _wait_for_slot and this: never more than
        # max_concurrent holders, however many connections reach this in one scheduling round
        self._holders[ticket] = trio.current_time()

    async def resume(self, ticket: Ticket) -> None:
        """The edge's answer to the server's flight is in: wait for a slot to finish the handshake
        with, before any connection still waiting for its first turn (its first part is done;
        it must not queue behind later arrivals)."""
        self._answering.pop(ticket, None)
        self._resuming += 1
        try:
            await self._wait_for_slot(resuming=True)
        except BaseException:
            self._resuming -= 1
            self._first.unpark()  # a slot kept for this one goes to a first turn instead
            raise
        self._resuming -= 1
        self._holders[ticket] = trio.current_time()

    async def _wait_for_slot(self, *, resuming: bool = False, source: str = "") -> None:
        """Return (without a checkpoint after the check) once a slot is free for the caller. A
        first turn also leaves free slots to the answered connections waiting (`resume`), and
        waits in its source's line (`fairness.SourceLines`: source addresses take turns)."""
        await trio.lowlevel.checkpoint()  # a schedule point first, whether or not it must wait
        lot = self._resume_lot if resuming else self._first.lot(source)
        while True:
            held = len(self._holders)
            if held + (0 if resuming else self._resuming) < self.max_concurrent:
                return
            if held < self.max_concurrent:  # the free slots are kept for answered connections
                await lot.park()
                continue
            oldest, since = next(iter(self._holders.items()))
            overdue = since + self.slow_handshake - trio.current_time()
            if overdue <= 0:
                del self._holders[oldest]  # the caller takes its slot at once
                oldest.shed("slow")
                self.shed_count += 1
                return
            with trio.move_on_after(overdue):
                await lot.park()

    def release(self, ticket: Ticket) -> None:
        if self._holders.pop(ticket, None) is not None:
            if self._resume_lot:
                self._resume_lot.unpark()
            else:
                self._first.unpark()

    def busy_time(self) -> float:
        """Seconds during which at least one connection with its ClientHello in was pending
        (the service rate's clock)."""
        if self.underway:
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
        with handshakes underway lowers it; time with none does not); before `RECENT_SAMPLES`
        have completed, `max_concurrent / ASSUMED_HANDSHAKE`, and at least that until
        `RATE_SAMPLES` have and `FILL_TIME` of busy time has passed. On the high side by design: an
        edge told to come back too early costs one more cheap refusal, one told too late waits
        for nothing. A window of time, not of the last few completions: handshakes that run
        together end together, and 64 completions in one scheduling round read as thousands a
        second. The best window's rate counts for `PEAK_MEMORY` seconds of busy time: a few
        seconds in which the pending connections wait on slow peers do not turn into hints at
        the cap."""
        done = self._done
        assumed = max(self.max_concurrent / ASSUMED_HANDSHAKE, 1.0)
        if len(done) < RECENT_SAMPLES:
            return assumed
        now = self.busy_time()
        window = self._window
        while window and window[0] < now - RATE_WINDOW:
            window.popleft()
        kept = len(done) / max(now - done[0], 1e-3)
        recent = len(window) / RATE_WINDOW if now >= RATE_WINDOW else 0.0
        if recent >= self._peak or now - self._peak_at > PEAK_MEMORY:
            self._peak, self._peak_at = recent, now
        measured = max(recent, kept, self._peak, 1.0)
        # the first completions of a storm measure the pipeline filling (a round trip, edges
        # busy with their own ClientHellos), not what the replica can do: hints from them sent
        # a whole storm away for 9 s while the replica served 400 a second
        filling = len(done) < RATE_SAMPLES or now < FILL_TIME
        return max(measured, assumed) if filling else measured

    def _appointment(self, now: float, rate: float) -> float:
        """The next free appointment (trio time): after the book's cursor, after the handshakes
        underway at `rate`, and at least `MIN_RETRY_AFTER` from now."""
        return max(self.next_free, now + self.underway / rate, now + MIN_RETRY_AFTER)

    def retry_after(self) -> float:
        """Seconds a connection refused now should wait, without booking it (see the module
        docstring): the next free appointment, at most `MAX_RETRY_AFTER`."""
        now = trio.current_time()
        return min(self._appointment(now, self.rate()) - now, MAX_RETRY_AFTER)

    def refusal_hint(self) -> float:
        """`retry_after` for a connection refused now, booked: the cursor moves on by one
        handshake at `rate` (never further than `MAX_RETRY_AFTER` ahead)."""
        now = trio.current_time()
        rate = self.rate()
        at = min(self._appointment(now, rate), now + MAX_RETRY_AFTER)
        self.next_free = at + 1 / rate
        self.booked += 1
        return at - now

    def room_for(self, burst: int) -> Callable[[], int]:
        """How many connections the tunnel port may accept now (`listen.accept_bursts`): up to
        `burst` while the pending set has room, one per wake-up once it is full and a newcomer
        would shed a pending connection (a silent one, or one slow to answer: so a flood of
        silent ones cannot lock edges out, and the rest wait in the listen backlog instead of
        shedding each other). Full with neither, a whole burst again: every newcomer is then
        refused at once with an appointment, instead of waiting in the backlog until its edge's
        deadline (a storm's edges timed out there)."""

        def room() -> int:
            free = self.max_pending - len(self._pending)
            if free <= 0 and not self._silent and not self._slow_answering():
                return burst
            return max(1, min(burst, free))

        return room

    def _slow_answering(self) -> bool:
        """A connection has had the server's flight for `slow_handshake` without answering."""
        if not self._answering:
            return False
        since = next(iter(self._answering.values()))
        return since + self.slow_handshake <= trio.current_time()

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def underway(self) -> int:
        """Pending connections with their ClientHello in (waiting for a slot, in one, answering)."""
        return len(self._pending) - len(self._silent)

    @property
    def answering_count(self) -> int:
        return len(self._answering)

    @property
    def busy_slots(self) -> int:
        return len(self._holders)
