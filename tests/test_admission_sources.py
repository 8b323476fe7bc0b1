"""The tunnel port's pending set shared between source addresses (`cloud.admission`): silent
connections go first, and once the set is full the source holding the most pays for room."""

from __future__ import annotations

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from kins_tunnel.cloud.admission import RATE_SAMPLES, Admission, Ticket


def _full(a: Admission, source: str, n: int, *, spoke: bool) -> list[Ticket]:
    tickets = [a.arrive(trio.current_time() + 10, source) for _ in range(n)]
    if spoke:
        for t in tickets:
            a.spoke(t)
    return tickets


def _held(a: Admission, tickets: list[Ticket]) -> int:
    return sum(1 for t in tickets if t.reason is None)


async def test_a_silent_flood_from_one_address_is_shed_before_anyone_else(
    virtual_clock: trio.testing.MockClock,
) -> None:
    a = Admission(max_pending=10, max_concurrent=2, slow_handshake=2.0)
    flood = _full(a, "192.0.2.66", 10, spoke=False)
    edges = [a.arrive(trio.current_time() + 10, f"198.51.100.{i}") for i in range(6)]
    assert [t.reason for t in edges] == [None] * 6  # each took a flood socket's place
    assert [t.reason for t in flood] == ["shed"] * 6 + [None] * 4  # the flood's oldest first
    more = _full(a, "192.0.2.66", 5, spoke=False)  # the flood goes on: it sheds its own
    assert [t.reason for t in edges] == [None] * 6
    assert _held(a, flood + more) == 4 and a.pending == 10


async def test_an_address_whose_clienthellos_stall_cannot_hold_the_whole_pending_set(
    virtual_clock: trio.testing.MockClock,
) -> None:
    """Every pending connection has its ClientHello in (a peer that sends real-looking ones and
    stalls): a newcomer from elsewhere sheds the fat source's newest waiting one instead of being
    refused, until the two hold even shares; from then on each newcomer is refused."""
    a = Admission(max_pending=10, max_concurrent=2, slow_handshake=2.0)
    stalled = _full(a, "192.0.2.66", 10, spoke=True)
    async with trio.open_nursery() as n:
        for t in stalled:
            n.start_soon(a.acquire, t)
            await trio.testing.wait_all_tasks_blocked()
        assert a.busy_slots == 2  # the two oldest hold the slots, eight wait
        edges = []
        for _ in range(7):
            edge = a.arrive(trio.current_time() + 10, "198.51.100.7")
            a.spoke(edge)
            edges.append(edge)
            await trio.testing.wait_all_tasks_blocked()
        # 5 got in, each shedding the stalled address's newest waiting one, up to even shares
        # (5 and 5: one more would make the newcomer's address the fatter); then 2 refused
        assert [t.reason for t in edges] == [None] * 5 + ["shed"] * 2
        assert [t.reason for t in stalled] == [None] * 5 + ["shed"] * 5
        assert a.busy_slots == 2 and all(t.reason is None for t in stalled[:2])  # slots kept
        assert a.pending == 10
        n.cancel_scope.cancel()


async def test_one_address_alone_may_use_the_whole_pending_set(
    virtual_clock: trio.testing.MockClock,
) -> None:
    """A site's edges behind one NAT address, nobody else arriving: as with no sources at all
    (silent ones shed oldest first, a spoken-only set refuses the newcomer)."""
    a = Admission(max_pending=10, max_concurrent=2, slow_handshake=2.0)
    site = _full(a, "203.0.113.5", 10, spoke=True)
    late = a.arrive(trio.current_time() + 10, "203.0.113.5")
    assert late.reason == "shed" and _held(a, site) == 10


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["arrive", "spoke", "leave"]), st.integers(0, 3), st.integers()),
        max_size=80,
    )
)
def test_the_per_source_accounting_matches_the_pending_set(
    steps: list[tuple[str, int, int]],
) -> None:
    async def run() -> None:
        a = Admission(max_pending=6, max_concurrent=2, slow_handshake=2.0)
        live: list[Ticket] = []
        for op, src, pick in steps:
            if op == "arrive":
                t = a.arrive(trio.current_time() + 10, f"s{src}")
                if t.reason is None:
                    live.append(t)
                else:
                    a.leave(t)
            elif live:
                t = live[pick % len(live)]
                if op == "spoke":
                    a.spoke(t)
                else:
                    a.leave(t)
                    live.remove(t)
            live = [t for t in live if t.reason is None]  # shed ones left the set
            counts: dict[str, int] = {}
            for t in live:
                counts[t.source] = counts.get(t.source, 0) + 1
            assert a.pending == len(live) <= 6
            assert a._sources._max == max(counts.values(), default=0)
            assert {s: len(q) for s, q in a._sources._tickets.items()} == counts

    trio.run(run)


async def test_source_addresses_take_turns_at_the_handshake_slots(
    virtual_clock: trio.testing.MockClock,
) -> None:
    """Five connections of one address wait for the one slot, then one of another address: that
    one is served second, not sixth."""
    a = Admission(max_pending=100, max_concurrent=1, slow_handshake=60.0)
    holder = a.arrive(trio.current_time() + 60, "192.0.2.1")
    await a.acquire(holder)
    served: list[str] = []

    async def turn(source: str, i: int) -> None:
        t = a.arrive(trio.current_time() + 60, source)
        await a.acquire(t)
        served.append(f"{source}#{i}")
        await trio.sleep(1)
        a.leave(t)

    async with trio.open_nursery() as n:
        for i in range(5):
            n.start_soon(turn, "192.0.2.66", i)
            await trio.testing.wait_all_tasks_blocked()
        n.start_soon(turn, "198.51.100.7", 0)
        await trio.testing.wait_all_tasks_blocked()
        a.leave(holder)
    assert served == [
        "192.0.2.66#0",
        "198.51.100.7#0",
        "192.0.2.66#1",
        "192.0.2.66#2",
        "192.0.2.66#3",
        "192.0.2.66#4",
    ]


async def test_a_long_line_of_one_address_does_not_make_others_refused_as_queued(
    virtual_clock: trio.testing.MockClock,
) -> None:
    """600 connections of one address wait (6 s at ~100/s, beyond half of a newcomer's 10 s):
    a newcomer of that address is refused "queued", one of another address waits one turn."""
    a = Admission(max_pending=10_000, max_concurrent=64, slow_handshake=60.0)
    busy = a.arrive(trio.current_time() + 3600)
    await a.acquire(busy)
    for _ in range(RATE_SAMPLES):  # the replica has served ~100 a second
        await trio.sleep(0.01)
        a.completed()
    a.leave(busy)
    async with trio.open_nursery() as n:
        line = [a.arrive(trio.current_time() + 60, "192.0.2.66") for _ in range(64 + 600)]
        for t in line:
            n.start_soon(a.acquire, t)
        await trio.testing.wait_all_tasks_blocked()
        assert a.busy_slots == 64
        same = a.arrive(trio.current_time() + 10, "192.0.2.66")
        other = a.arrive(trio.current_time() + 10, "198.51.100.7")
        n.start_soon(a.acquire, same)
        n.start_soon(a.acquire, other)
        await trio.testing.wait_all_tasks_blocked()
        assert same.reason == "queued" and other.reason is None
        n.cancel_scope.cancel()
