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
    assert max(delays) - min(delays) > 0.8  # spread, so edges shed together come back apart
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
