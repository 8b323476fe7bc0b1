"""The pacer under hostile DELAY answers: whatever a peer puts in them (values of any size, clocks
that wrap, run backwards or stand still, byte counts that jump, answers faster than any stamp
went), its state stays bounded and sane: no exception, the rate is finite and at least
`MIN_RATE` while engaged, the credit is a non-negative integer, the next send time is finite, and
every list it keeps stays within its bound (`test_session_fuzz.py` sends such answers over real
TLS)."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kins_tunnel.proto.pacer import (
    BASE_BUCKETS,
    BTL_SAMPLES,
    CURRENT_FILTER,
    MIN_RATE,
    RATE_SAMPLES,
    DelayPacer,
    DelayProbe,
)
from tests.proto.test_mux_properties import SCALE

U32 = st.one_of(
    st.integers(0, 0xFFFFFFFF), st.sampled_from([0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF])
)
ANSWER = st.tuples(
    st.one_of(st.just(0.0), st.floats(0, 0.01), st.floats(0, 100)),  # time since the last one
    U32,  # echo
    U32,  # receiver's clock at receipt
    U32,  # bytes received
    st.booleans(),  # bulk data held here
    st.integers(0, 1 << 20),  # bytes written since
)


def check(pacer: DelayPacer, now: float) -> None:
    if pacer.rate is not None:
        assert math.isfinite(pacer.rate) and pacer.rate >= 0
        if pacer.engaged:
            assert pacer.rate >= min(MIN_RATE, pacer.max_rate or MIN_RATE)
    credit = pacer.credit(now)
    assert credit is None or (isinstance(credit, int) and credit >= 0)
    at = pacer.next_send_at(now)
    assert at is None or (math.isfinite(at) and at >= now)
    stats = pacer.statistics()
    for value in (stats.base_rtt, stats.queueing_delay, stats.bottleneck):
        assert value is None or (math.isfinite(value) and value >= 0), stats
    assert len(pacer._base) <= BASE_BUCKETS + 1
    assert len(pacer._recent) <= CURRENT_FILTER
    assert len(pacer._rx) <= RATE_SAMPLES
    assert len(pacer._btl) <= BTL_SAMPLES, len(pacer._btl)


@settings(max_examples=300 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    start=st.one_of(st.just(0.0), st.floats(0, 1e6)),
    target=st.sampled_from([0.001, 0.025, 1.0]),
    max_rate=st.sampled_from([None, 1.0, 1e6]),
    answers=st.lists(ANSWER, max_size=300),
)
def test_hostile_delay_answers_keep_the_pacer_bounded_and_sane(
    start: float,
    target: float,
    max_rate: float | None,
    answers: list[tuple[float, int, int, int, bool, int]],
) -> None:
    pacer = DelayPacer(target, max_rate)
    probe = DelayProbe(pacer)
    now = start
    for step, echo, received_at, received, held, written in answers:
        now += step
        probe.stamp_due(now)
        probe.answered(now, echo, received_at, received, held)
        check(pacer, now)
        pacer.spent(written)
        check(pacer, now)


def test_a_flood_of_answers_keeps_the_bottleneck_queue_bounded() -> None:
    """Answers as fast as a peer can send them, each reporting a lower delivery rate than the
    one before, while bulk data is held: the bottleneck's queue must not grow with them (it did:
    one entry per answer within the window, and a linear scan of them per answer)."""
    pacer = DelayPacer()
    probe = DelayProbe(pacer)
    now, rx_us, got = 100.0, 0, 0
    for i in range(20000):
        now += 1e-5  # 100,000 answers a second: all within one BTL_WINDOW
        rx_us += 60_000  # 60 ms of receiver time each: every answer is a rate sample
        got += max(10_000_000 - i * 400, 1)  # ever less per sample
        probe.answered(now, 0, rx_us & 0xFFFFFFFF, got & 0xFFFFFFFF, True)
    check(pacer, now)
