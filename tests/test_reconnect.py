"""The edge's reconnect policy (`edge.reconnect`): backoff, its reset, the cloud's retry-after hint;
and the refusal that carries the hint (`transport.refusal`)."""

from __future__ import annotations

import math
import random

import pytest

from kins_tunnel.config import Backoff
from kins_tunnel.edge.reconnect import HINT_JITTER, MAX_HINT_JITTER, ReconnectPolicy
from kins_tunnel.transport.refusal import ALERT, encode_refusal, parse_refusal

B = Backoff(initial=0.5, max=30.0, multiplier=2.0, stable_after=60.0)


def test_failures_grow_the_ceiling_and_a_stable_tunnel_resets_it() -> None:
    policy = ReconnectPolicy(B, random.Random(1))
    ceilings = []
    for _ in range(8):
        delays = [ReconnectPolicy(B, random.Random(i), policy.attempt) for i in range(200)]
        ceilings.append(max(p.next_delay(0.1) for p in delays))
        policy.next_delay(0.1)  # one more failure
    # attempts 1..8 after a failure: ceilings 1, 2, 4, 8, 16, 30, 30, 30 (full jitter below them)
    for got, ceiling in zip(ceilings, (1, 2, 4, 8, 16, 30, 30, 30), strict=True):
        assert ceiling * 0.8 <= got <= ceiling
    assert policy.attempt == 8
    assert policy.next_delay(60.0) <= B.initial  # up stable_after: the count starts again
    assert policy.attempt == 0


def test_the_hint_replaces_the_backoff_with_jitter_and_does_not_count_as_a_failure() -> None:
    policy = ReconnectPolicy(B, random.Random(7), attempt=5)  # backoff would be up to 30 s
    delays = [policy.next_delay(0.01, retry_after=2.0) for _ in range(500)]
    assert all(2.0 <= d <= 2.0 * (1 + HINT_JITTER) for d in delays)
    # spread over the jitter window, so edges shed together come back apart
    assert max(delays) - min(delays) > 0.8 * 2.0 * HINT_JITTER
    assert policy.attempt == 5  # a shed is the cloud's decision, not this edge's failure
    # capped at reconnect.max whatever the cloud says
    assert all(30.0 == policy.next_delay(0.01, retry_after=1000.0) for _ in range(20))


def test_a_long_hint_is_not_stretched_by_more_than_the_jitter_cap() -> None:
    """The cloud spreads its hints over the time its queue needs: an edge told 20 s comes back
    within 20-22 s (it used to be 20-30 s: up to 10 s longer than the cloud asked)."""
    policy = ReconnectPolicy(B, random.Random(11))
    delays = [policy.next_delay(0.01, retry_after=20.0) for _ in range(500)]
    assert all(20.0 <= d <= 20.0 + MAX_HINT_JITTER for d in delays)
    assert max(delays) - min(delays) > 0.8 * MAX_HINT_JITTER  # still spread


def _outage(policy: ReconnectPolicy, start: float, back_at: float) -> list[float]:
    """Dial times of an edge whose cloud went away at `start` (its stable tunnel ended then) and
    refuses every dial at once until `back_at`; the last one is the first dial that finds it."""
    dials = []
    now = start + policy.next_delay(B.stable_after, now=start)
    while True:
        dials.append(now)
        if now >= back_at:
            return dials
        now += policy.next_delay(0.0, now=now)  # refused at once: a failure


def test_after_a_stable_tunnel_the_wait_is_capped_by_the_outage_age() -> None:
    policy = ReconnectPolicy(B, random.Random(5))
    policy.next_delay(B.stable_after, now=100.0)  # the stable tunnel ended at 100
    for _ in range(6):  # six instant failures: the exponential ceiling alone would be 30 s
        policy.next_delay(0.0, now=100.2)
    assert policy.attempt == 6
    waits = [
        ReconnectPolicy(B, random.Random(i), 6, 100.0).next_delay(0.0, now=101.0)
        for i in range(300)
    ]
    assert max(waits) <= 1.0 and max(waits) > 0.9  # uniform(0, age) at age 1 s
    young = [
        ReconnectPolicy(B, random.Random(i), 6, 100.0).next_delay(0.0, now=100.1)
        for i in range(300)
    ]
    assert max(young) <= B.initial and max(young) > 0.45  # never below `initial`
    old = [
        ReconnectPolicy(B, random.Random(i), 20, 100.0).next_delay(0.0, now=1100.0)
        for i in range(300)
    ]
    assert max(old) <= B.max and max(old) > 0.9 * B.max  # a long outage backs off to `max`


def test_an_edge_finds_a_restarted_cloud_within_twice_the_outage() -> None:
    for outage in (0.5, 1.0, 2.0, 5.0):
        late = []
        for seed in range(500):
            dials = _outage(ReconnectPolicy(B, random.Random(seed)), 0.0, outage)
            late.append(dials[-1] - outage)  # how long after the cloud was back
        assert max(late) <= max(B.initial, outage), (outage, max(late))
    # the backoff alone: the same edges could come back up to `max` late
    policy = ReconnectPolicy(B, random.Random(1))
    assert max(_outage_without_age(policy, 1.0) for _ in range(500)) > 4.0


def _outage_without_age(policy: ReconnectPolicy, back_at: float) -> float:
    policy.attempt, now = 0, policy.next_delay(B.stable_after)
    while now < back_at:
        now += policy.next_delay(0.0)
    return now - back_at


def _median_dials(length: float, age_cap: bool) -> int:
    counts = []
    for seed in range(300):
        policy = ReconnectPolicy(B, random.Random(seed))
        if age_cap:
            counts.append(len(_outage(policy, 0.0, length)))
            continue
        now, n = 0.0, 0
        while now < length:
            now += policy.next_delay(0.0)
            n += 1
        counts.append(n)
    return sorted(counts)[len(counts) // 2]


def test_the_outage_cap_does_not_make_a_stampede() -> None:
    """Dials per edge grow with the logarithm of the outage (its age grows by half per wait), then
    come every `max` at most, as with the backoff alone: about twice its dials in the first
    minute, the same rate after."""
    for length in (10.0, 60.0):
        assert _median_dials(length, True) <= math.log(length / B.initial, 1.5) + 4
        assert _median_dials(length, True) <= 2 * _median_dials(length, False) + 1
    assert _median_dials(600.0, True) - _median_dials(600.0, False) <= 10


def test_only_a_stable_tunnel_starts_the_outage_clock() -> None:
    # never a stable tunnel: the backoff as before, whatever the clock says
    fresh = [ReconnectPolicy(B, random.Random(i), 5).next_delay(0.0, now=1.0) for i in range(300)]
    assert max(fresh) > 20.0
    # a tunnel that comes up and drops at once (short of stable_after) neither resets the count
    # nor restarts the age: a cloud that accepts and drops the edge gets the full backoff
    policy = ReconnectPolicy(B, random.Random(2))
    policy.next_delay(B.stable_after, now=0.0)
    for t in range(1, 9):
        policy.next_delay(1.0, now=t * 100.0)  # up 1 s, then dropped
    assert policy.attempt == 8 and policy.outage_since == 0.0
    flapping = [
        ReconnectPolicy(B, random.Random(i), 8, 0.0).next_delay(1.0, now=900.0) for i in range(300)
    ]
    assert max(flapping) > 0.9 * B.max
    # a hint after a stable tunnel starts the clock too
    hinted = ReconnectPolicy(B, random.Random(3))
    hinted.next_delay(B.stable_after, retry_after=1.0, now=50.0)
    assert hinted.outage_since == 50.0 and hinted.attempt == 0


@pytest.mark.parametrize("hint", [math.nan, math.inf, -1.0, True])
def test_a_hint_that_is_no_wait_is_ignored(hint: float) -> None:
    policy = ReconnectPolicy(B, random.Random(3))
    policy.next_delay(0.01, retry_after=hint)
    assert policy.attempt == 1  # counted as an ordinary failure: backoff applied


def test_refusal_round_trip_and_what_an_old_client_sees() -> None:
    wire = encode_refusal(2.345)
    assert wire.startswith(ALERT)  # a TLS fatal alert first: any TLS client stops there
    assert wire == ALERT + b"KINS-RETRY-AFTER 2.3\n"
    assert parse_refusal(wire) == pytest.approx(2.3)
    assert parse_refusal(encode_refusal(1e9)) == 3600.0  # clamped when written


@pytest.mark.parametrize(
    "data",
    [
        b"",
        ALERT,
        b"\x16\x03\x03\x00\x7a",  # a ServerHello record: a handshake, not a refusal
        ALERT + b"KINS-RETRY-AFTER \n",
        ALERT + b"KINS-RETRY-AFTER 1e5\n",
        ALERT + b"KINS-RETRY-AFTER -1\n",
        ALERT + b"KINS-RETRY-AFTER 1.2.3\n",
        ALERT + b"KINS-RETRY-AFTER 99999\n",
        ALERT + b"KINS-RETRY-AFTER 5",  # no newline: cut short
        ALERT + b"KINS-RETRY-AFTER " + b"1" * 40 + b"\n",
    ],
)
def test_malformed_refusals_are_no_hint(data: bytes) -> None:
    assert parse_refusal(data) is None
