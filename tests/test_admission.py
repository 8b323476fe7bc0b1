"""The tunnel port's admission (`cloud.admission`): the slots, the pending set, the rate behind the
retry-after hint, and the hint itself, an appointment book (virtual clock: exact)."""

from __future__ import annotations

import trio
import trio.testing

from kins_tunnel.cloud.admission import (
    ASSUMED_HANDSHAKE,
    MAX_RETRY_AFTER,
    MIN_RETRY_AFTER,
    PEAK_MEMORY,
    RECENT_SAMPLES,
    Admission,
    Ticket,
)


def _admission() -> Admission:
    return Admission(max_pending=10_000, max_concurrent=64, slow_handshake=2.0)


async def _hold(a: Admission) -> Ticket:
    """A connection holding a handshake slot (the replica busy: its service-rate clock runs)."""
    ticket = a.arrive(trio.current_time() + 3600)
    await a.acquire(ticket)
    return ticket


async def _complete(a: Admission, n: int, *, per_second: float) -> None:
    """`n` handshakes completing at `per_second` with a slot held (the rate `a` then measures)."""
    busy = await _hold(a)
    clock = trio.lowlevel.current_clock()
    assert isinstance(clock, trio.testing.MockClock)
    for _ in range(n):
        clock.jump(1 / per_second)  # no task to run meanwhile: no need to wait for the autojump
        a.completed()
    a.leave(busy)


async def test_the_rate_is_assumed_until_measured_then_follows_completions(
    virtual_clock: trio.testing.MockClock,
) -> None:
    a = _admission()
    assert a.rate() == 64 / ASSUMED_HANDSHAKE  # nothing measured yet: on the high side
    await _hold(a)
    for _ in range(RECENT_SAMPLES * 2):  # 500 per second
        await trio.sleep(0.002)
        a.completed()
    # a storm's first completions measure its pipeline filling: the assumed rate stays a floor
    assert a.rate() == 64 / ASSUMED_HANDSHAKE
    clock = trio.lowlevel.current_clock()
    assert isinstance(clock, trio.testing.MockClock)
    for _ in range(300 - RECENT_SAMPLES * 2):  # past RATE_SAMPLES, not FILL_TIME (0.6 s busy)
        clock.jump(0.002)
        a.completed()
    assert a.rate() == 64 / ASSUMED_HANDSHAKE
    for _ in range(1000 - 300):  # past FILL_TIME (2 s busy): measured
        clock.jump(0.002)
        a.completed()
    assert 480 <= a.rate() <= 520
    await trio.sleep(20)  # a stall (a slot held, nothing completing) lowers it
    assert a.rate() < 20


async def test_time_with_no_handshake_to_do_does_not_lower_the_rate(
    virtual_clock: trio.testing.MockClock,
) -> None:
    """The service rate: a replica whose refused edges are away, as told, has nothing to do;
    that must not read as a slow replica (longer hints, a longer idle, a stalled storm)."""
    a = _admission()
    await _complete(a, 1000, per_second=500)
    assert 480 <= a.rate() <= 520
    await trio.sleep(30)  # no slot held: nothing to serve
    assert 480 <= a.rate() <= 520
    await _complete(a, RECENT_SAMPLES, per_second=500)  # busy again, as fast
    assert 480 <= a.rate() <= 520
    busy = (1000 + RECENT_SAMPLES) / 500
    assert busy - 0.01 <= a.busy_time() <= busy + 0.01
    # 2,000 refused edges are booked at that rate (after the minimum wait), not told 60 s
    for _ in range(2000):
        a.refusal_hint()
    assert 4.8 <= a.retry_after() <= 5.2


async def test_the_hint_is_the_queue_ahead_at_the_rate(
    virtual_clock: trio.testing.MockClock,
) -> None:
    a = _admission()
    assert a.retry_after() == MIN_RETRY_AFTER  # nothing queued
    await _complete(a, 256, per_second=100)
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


async def test_the_tunnel_port_takes_a_burst_only_while_the_pending_set_has_room(
    virtual_clock: trio.testing.MockClock,
) -> None:
    a = Admission(max_pending=100, max_concurrent=8, slow_handshake=2.0)
    room = a.room_for(64)
    assert room() == 64  # empty: a whole burst
    tickets = [a.arrive(trio.current_time() + 10) for _ in range(60)]
    assert room() == 40  # what is left
    tickets += [a.arrive(trio.current_time() + 10) for _ in range(40)]
    assert room() == 1  # full: one at a time, each newcomer shedding the oldest
    newest = a.arrive(trio.current_time() + 10)
    assert tickets[0].reason == "shed" and a.pending == 100
    for t in [*tickets, newest]:
        a.leave(t)
    assert room() == 64


async def test_a_full_pending_set_of_edges_takes_whole_bursts_to_refuse_with_appointments(
    virtual_clock: trio.testing.MockClock,
) -> None:
    """Full, with every pending connection spoken and none slow to answer, a newcomer sheds no
    one: it is refused at once with an appointment, so the port takes whole bursts from the
    backlog (where the edges waited for their own deadline) instead of one per wake-up."""
    a = Admission(max_pending=10, max_concurrent=2, slow_handshake=2.0)
    room = a.room_for(64)
    tickets = [a.arrive(trio.current_time() + 10) for _ in range(10)]
    assert room() == 1  # full with silent connections: one at a time
    for t in tickets:
        a.spoke(t)
    assert room() == 64  # every newcomer would be refused at once
    late = [a.arrive(trio.current_time() + 10) for _ in range(64)]
    assert all(t.reason == "shed" for t in late) and a.pending == 10
    await a.acquire(tickets[0])
    await a.answering(tickets[0])
    await trio.sleep(2.0)  # its edge has not answered for slow_handshake: a newcomer sheds it
    assert room() == 1
    newcomer = a.arrive(trio.current_time() + 10)
    assert tickets[0].reason == "slow" and newcomer.reason is None


async def test_hints_are_appointments_so_a_large_fleet_spreads_out_in_one_round(
    virtual_clock: trio.testing.MockClock,
) -> None:
    a = _admission()
    await _complete(a, 1000, per_second=500)
    await _hold(a)  # the replica busy throughout
    # 2,000 edges refused within 0.4 s while the replica goes on at 500/s: each is booked one
    # handshake after the one refused before it, from the minimum wait on
    hints, returns = [], []
    for i in range(2000):
        hints.append(a.refusal_hint())
        returns.append(trio.current_time() + hints[-1])
        virtual_clock.jump(0.0002)
        if i % 10 == 9:
            a.completed()
    assert hints[0] == MIN_RETRY_AFTER
    gaps = [b - a for a, b in zip(returns, returns[1:], strict=False)]
    assert all(1 / 520 <= g <= 1 / 480 for g in gaps)  # one handshake apart: no bunching
    assert 4.8 <= returns[-1] - returns[0] + 1 <= 5.2  # 1 s, then 1,999 at 500/s
    assert 4.4 <= hints[-1] <= 4.8  # refused 0.4 s after the first
    # once the whole book has come due, a refusal is told the minimum again
    await trio.sleep(returns[-1] - trio.current_time())
    assert a.retry_after() == MIN_RETRY_AFTER


async def test_a_storm_of_refusals_comes_back_evenly_at_the_rate_in_refusal_order(
    virtual_clock: trio.testing.MockClock,
) -> None:
    """3,000 edges refused within one second by a replica that serves 600 a second come back
    one handshake (1/600 s) apart over 5 s, in the order they were refused; one refused later is
    booked after all of them (a window of recent refusals forgot the older ones and told later
    edges shorter waits than earlier ones, or bunched them at the minimum)."""
    a = _admission()
    await _complete(a, 1200, per_second=600)  # the replica's measured rate: 600/s
    assert 590 <= a.rate() <= 610
    rate = a.rate()
    t0 = trio.current_time()
    hints, returns = [], []
    for _ in range(3000):
        hints.append(a.refusal_hint())
        returns.append(trio.current_time() + hints[-1])
        virtual_clock.jump(1 / 3000)
    assert all(later >= earlier for earlier, later in zip(hints, hints[1:], strict=False))
    gaps = [b - a for a, b in zip(returns, returns[1:], strict=False)]
    assert max(abs(g - 1 / rate) for g in gaps) < 1e-9  # evenly spread at the rate
    assert returns[0] == t0 + MIN_RETRY_AFTER
    assert 4.9 <= returns[-1] - returns[0] <= 5.1  # 3,000 at 600/s
    await trio.sleep(1.5)  # 2.5 s after the first refusal, most of the book still ahead
    late = a.refusal_hint()
    assert trio.current_time() + late >= returns[-1] + 1 / rate - 1e-9


async def test_the_appointment_book_is_bounded_by_the_longest_hint(
    virtual_clock: trio.testing.MockClock,
) -> None:
    a = _admission()
    await _complete(a, 256, per_second=10)  # a slow replica: 10/s
    hints = [a.refusal_hint() for _ in range(5000)]  # 500 s of appointments at that rate
    assert max(hints) == MAX_RETRY_AFTER
    assert a.next_free <= trio.current_time() + MAX_RETRY_AFTER + 1 / a.rate()
    assert a.booked == 5000


async def test_a_slot_covers_the_servers_work_not_the_wait_for_the_edges_answer(
    virtual_clock: trio.testing.MockClock,
) -> None:
    """A connection answering (its server flight written) holds no slot; it stays pending, and
    the time it waits counts as time with a handshake underway (a stall lowers the rate)."""
    a = Admission(max_pending=100, max_concurrent=2, slow_handshake=2.0)
    tickets = [a.arrive(trio.current_time() + 10) for _ in range(10)]
    for t in tickets:  # each takes a slot, writes its flight and gives the slot back
        await a.acquire(t)
        await a.answering(t)
    assert a.busy_slots == 0 and a.pending == 10 and a.underway == 10
    assert a.answering_count == 10
    t0 = a.busy_time()
    await trio.sleep(0.1)  # the round trip: the replica has handshakes underway
    assert a.busy_time() - t0 == 0.1
    for t in tickets:
        a.leave(t)
        a.completed()
    assert a.pending == 0 and a.underway == 0 and a.answering_count == 0
    await trio.sleep(5)  # nothing underway: the busy clock stands still
    assert a.busy_time() - t0 == 0.1


async def test_a_full_pending_set_sheds_an_edge_slow_to_answer_before_refusing_the_newcomer(
    virtual_clock: trio.testing.MockClock,
) -> None:
    """The pending set full of connections that have had the server's flight: one that has not
    answered within `slow_handshake` (a real edge answers within a round trip) is shed "slow"
    for a newcomer; while all answer in time, the newcomer is refused."""
    a = Admission(max_pending=3, max_concurrent=1, slow_handshake=2.0)
    tickets = [a.arrive(trio.current_time() + 10) for _ in range(3)]
    for t in tickets:
        await a.acquire(t)
        await a.answering(t)
        await trio.sleep(0.5)
    early = a.arrive(trio.current_time() + 10)  # the oldest has waited 1.5 s: in time
    assert early.reason == "shed" and [t.reason for t in tickets] == [None] * 3
    await trio.sleep(0.5)  # the oldest has now waited 2 s
    newcomer = a.arrive(trio.current_time() + 10)
    assert newcomer.reason is None
    assert [t.reason for t in tickets] == ["slow", None, None]
    assert a.pending == 3 and a.shed_count == 2


async def test_a_connection_behind_a_queue_it_cannot_get_through_is_refused_at_once(
    virtual_clock: trio.testing.MockClock,
) -> None:
    a = _admission()
    await _complete(a, 256, per_second=100)
    tickets = [a.arrive(trio.current_time() + 10) for _ in range(64 + 400)]
    async with trio.open_nursery() as n:
        for t in tickets:  # one at a time: 64 take a slot, 400 wait
            n.start_soon(a.acquire, t)
            await trio.testing.wait_all_tasks_blocked()
        assert a.busy_slots == 64 and not any(t.reason for t in tickets)
        # these arrive behind 400 (4 s at ~100/s): the cut is 5 s after accept, so ~100 more fit
        late = [a.arrive(trio.current_time() + 10) for _ in range(150)]
        for t in late:
            n.start_soon(a.acquire, t)
            await trio.testing.wait_all_tasks_blocked()
        assert [t.reason for t in late[:100]] == [None] * 100
        assert [t.reason for t in late[110:]] == ["queued"] * 40  # rate ~102/s
        n.cancel_scope.cancel()


async def test_never_more_handshakes_at_once_than_slots_even_when_all_arrive_in_one_round(
    virtual_clock: trio.testing.MockClock,
) -> None:
    """Connections reaching `acquire` in the same scheduling round used to all find the slot
    free (checked before the checkpoint) and all take it: 200 handshakes at once for 64 slots."""
    a = _admission()
    tickets = [a.arrive(trio.current_time() + 60) for _ in range(200)]
    most = 0
    async with trio.open_nursery() as n:
        for t in tickets:  # all started before any runs: one scheduling round
            n.start_soon(a.acquire, t)
        for _ in range(50):
            await trio.lowlevel.checkpoint()
            most = max(most, a.busy_slots)
        await trio.testing.wait_all_tasks_blocked()
        assert a.busy_slots == 64 and most == 64
        # each release lets exactly one more in
        holders = [t for t in tickets if t in a._holders]
        for t in holders[:10]:
            a.leave(t)
        await trio.testing.wait_all_tasks_blocked()
        assert a.busy_slots == 64
        n.cancel_scope.cancel()


async def test_a_slot_held_longer_than_slow_handshake_goes_to_a_waiter(
    virtual_clock: trio.testing.MockClock,
) -> None:
    a = Admission(max_pending=100, max_concurrent=2, slow_handshake=2.0)
    stuck = [a.arrive(trio.current_time() + 60) for _ in range(2)]
    for t in stuck:
        await a.acquire(t)
    newcomer = a.arrive(trio.current_time() + 60)
    t0 = trio.current_time()
    await a.acquire(newcomer)
    assert trio.current_time() - t0 == 2.0  # exactly when the oldest holder became slow
    assert stuck[0].reason == "slow" and stuck[1].reason is None
    assert a.busy_slots == 2


async def test_a_full_pending_set_sheds_silent_connections_first_then_refuses_the_newcomer(
    virtual_clock: trio.testing.MockClock,
) -> None:
    """A flood (no ClientHello) is shed oldest first; in a storm (every pending connection has
    its ClientHello in) the newcomer is refused instead of the head of the queue."""
    a = Admission(max_pending=4, max_concurrent=1, slow_handshake=2.0)
    tickets = [a.arrive(trio.current_time() + 10) for _ in range(4)]
    a.spoke(tickets[0])  # the oldest has its ClientHello in; the three after it are silent
    newcomer = a.arrive(trio.current_time() + 10)
    assert [t.reason for t in tickets] == [None, "shed", None, None]  # oldest *silent* one
    assert newcomer.reason is None and a.pending == 4
    for t in [tickets[2], tickets[3], newcomer]:
        a.spoke(t)
    late = a.arrive(trio.current_time() + 10)  # every pending one has spoken: the late one goes
    assert late.reason == "shed" and a.pending == 4
    assert [t.reason for t in [tickets[0], tickets[2], tickets[3], newcomer]] == [None] * 4
    a.leave(late)  # a refused newcomer leaves like any other
    assert a.pending == 4 and a.shed_count == 2


async def test_handshakes_that_end_together_do_not_read_as_thousands_a_second(
    virtual_clock: trio.testing.MockClock,
) -> None:
    """64 handshakes completing in one scheduling round every 0.2 s is 320 a second: the rate is
    measured over a window of time, not over the last 64 completions (which read as 64,000 a
    second and gave every refused edge the 1 s minimum, refused again on its return)."""
    a = _admission()
    await _hold(a)
    for _ in range(15):  # 3 s: past FILL_TIME
        await trio.sleep(0.2)
        for _ in range(64):
            a.completed()
    assert 300 <= a.rate() <= 450  # the window's 320/s, or 256 kept over 0.6 s
    for _ in range(1000):
        a.refusal_hint()
    assert 3.2 <= a.retry_after() <= 4.4  # 1 s, then 1,000 booked at that rate


async def test_a_short_stall_on_slow_peers_does_not_send_the_fleet_away_for_the_cap(
    virtual_clock: trio.testing.MockClock,
) -> None:
    """Slots held by peers slow to answer for 3 s, nothing completing: the replica is still the
    one that served 500 a second, and 1,000 refused edges are booked over about 2 s, not 60 s."""
    a = _admission()
    await _hold(a)
    for _ in range(1000):  # 500 per second for 2 s
        await trio.sleep(0.002)
        a.completed()
    assert 480 <= a.rate() <= 520
    await trio.sleep(3)  # a stall shorter than PEAK_MEMORY
    for _ in range(1000):
        a.refusal_hint()
    assert 2.8 <= a.retry_after() <= 3.2  # 1 s, then 1,000 booked at 500/s
    await trio.sleep(PEAK_MEMORY)  # a stall that lasts: the rate falls, as before
    assert a.rate() < 60


async def test_an_answered_connection_finishes_before_new_clienthellos_take_a_slot(
    virtual_clock: trio.testing.MockClock,
) -> None:
    """Finishing a handshake (the edge's answer in) takes a slot again, before connections still
    waiting for their first turn: the work done for it is not wasted behind later arrivals."""
    a = Admission(max_pending=100, max_concurrent=1, slow_handshake=60.0)
    answered, holder, newcomer = (a.arrive(trio.current_time() + 60) for _ in range(3))
    await a.acquire(answered)
    await a.answering(answered)  # its server flight is out: the slot is free again
    await a.acquire(holder)
    order: list[str] = []

    async def first_turn() -> None:
        await a.acquire(newcomer)
        order.append("newcomer")

    async def finish() -> None:
        await a.resume(answered)
        order.append("answered")
        a.leave(answered)

    async with trio.open_nursery() as n:
        n.start_soon(first_turn)  # waiting first
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(finish)  # its edge's answer comes in after
        await trio.testing.wait_all_tasks_blocked()
        assert order == [] and a.busy_slots == 1
        a.leave(holder)
        await trio.testing.wait_all_tasks_blocked()
    assert order == ["answered", "newcomer"]
    a.leave(newcomer)
    assert a.busy_slots == 0 and a.pending == 0 and a.underway == 0
