"""The delay-based pacer (`proto.pacer`) with the real output scheduler (`proto.output`), on a
simulated thin link in virtual time (`linksim`): the delay target is held, the link stays full,
the rate follows the link when it halves or doubles, bulk streams share, interactive streams are
never held, and a fast path never engages pacing."""

from __future__ import annotations

import pytest

from kins_tunnel.proto.output import BULK_RUN, QUIET
from kins_tunnel.proto.pacer import DelayPacer, DelayProbe, clock_us
from tests.proto.linksim import Link, keep_busy, percentile

MBIT = 1e6 / 8
KiB = 1024

PROFILES = [  # (rate bytes/s, one-way delay s, bottleneck queue bytes): the three links
    (20 * MBIT, 0.025, 256 * KiB),
    (100 * MBIT, 0.010, 1024 * KiB),
    (5 * MBIT, 0.150, 128 * KiB),
]


def bulk(link: Link) -> None:
    keep_busy(link, 1)


@pytest.mark.parametrize(("rate", "delay", "queue"), PROFILES)
def test_bulk_fills_the_link_and_holds_the_delay_target(
    rate: float, delay: float, queue: int
) -> None:
    link = Link(rate=rate, delay=delay, queue=queue)
    link.run(20.0, bulk)
    target = link.pacer.effective_target
    assert target <= link.pacer.target
    qd = link.queueing_delays(5.0, 20.0)
    assert percentile(qd, 0.5) <= 1.25 * target
    assert percentile(qd, 0.99) <= 2 * target
    assert link.delivered(5.0, 20.0) >= 0.85 * rate * 15.0
    assert link.pacer.engaged and link.pacer.engagements == 1


def test_without_pacing_the_same_link_fills_its_queue() -> None:
    """The simulation's control: the queue (256 KiB at 20 Mbit/s, 105 ms) is what pacing avoids."""
    rate, delay, queue = PROFILES[0]
    link = Link(rate=rate, delay=delay, queue=queue, pacing=False)
    link.run(10.0, bulk)
    assert percentile(link.queueing_delays(2.0, 10.0), 0.5) >= 0.9 * queue / rate


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_the_rate_follows_the_link_when_it_halves_or_doubles(factor: float) -> None:
    rate, delay, queue = PROFILES[0]
    link = Link(rate=rate, delay=delay, queue=queue)

    def change(lk: Link) -> None:
        keep_busy(lk, 1)
        if lk.now >= 10.0:
            lk.rate = rate * factor

    link.run(20.0, change)
    target = link.pacer.effective_target
    # settled within 3 s of the change: the target again, the new rate used
    qd = link.queueing_delays(13.0, 20.0)
    assert percentile(qd, 0.5) <= 1.25 * target
    assert percentile(qd, 0.99) <= 2 * target
    assert link.delivered(13.0, 20.0) >= 0.85 * rate * factor * 7.0
    # a halving overfills the queue until the delay shows it (a round trip plus the queue's own
    # delay) and the old rate ages out of the estimate (`BTL_WINDOW`); the excess is gone within
    # two seconds
    late = [at for at, d in link.stamp_delays if at >= 10.0 and d > 2 * target]
    assert not late or max(late) < 12.0


def test_two_bulk_streams_share_the_paced_rate_fairly() -> None:
    rate, delay, queue = PROFILES[0]
    link = Link(rate=rate, delay=delay, queue=queue)

    def two(lk: Link) -> None:
        keep_busy(lk, 1)
        keep_busy(lk, 3)

    link.run(15.0, two)
    a, b = link.delivered(5.0, 15.0, 1), link.delivered(5.0, 15.0, 3)
    assert min(a, b) / max(a, b) >= 0.9
    assert a + b >= 0.85 * rate * 10.0
    assert percentile(link.queueing_delays(5.0, 15.0), 0.5) <= 1.25 * link.pacer.effective_target


def test_interactive_streams_are_never_held_behind_the_pacer() -> None:
    """Pings on a stream of their own, while bulk is paced: each is written into the link the
    moment it is queued, and waits only for the (small) queue the pacer keeps."""
    rate, delay, queue = PROFILES[0]
    link = Link(rate=rate, delay=delay, queue=queue)
    pings: dict[int, float] = {}  # payload size tags the ping: n -> when it was queued

    def step(lk: Link) -> None:
        keep_busy(lk, 1)
        if lk.now >= 2.0 and int(lk.now * 10) != int((lk.now - 0.0005) * 10):  # every 100 ms
            n = 64 + len(pings)
            pings[n] = lk.now
            lk.data.add(5, bytes(n), n, 16384, False)

    link.run(12.0, step)
    assert link.pacer.engaged
    got = [a for a in link.arrivals if a.sid == 5]
    assert len(got) == len(pings) >= 90
    assert not link.data.is_bulk(5)
    for a in got:
        assert a.sent_at == pings[a.n]  # not held: written at once
    late = sorted(a.at - pings[a.n] - delay for a in got if pings[a.n] >= 4.0)
    assert percentile(late, 0.5) <= 1.5 * link.pacer.effective_target
    assert percentile(late, 0.99) <= 2.5 * link.pacer.effective_target


def test_a_bulk_stream_that_goes_quiet_turns_interactive_and_is_not_starved() -> None:
    rate, delay, queue = PROFILES[0]
    link = Link(rate=rate, delay=delay, queue=queue)
    sent: dict[int, float] = {}

    def step(lk: Link) -> None:
        keep_busy(lk, 3)  # the other bulk stream never stops
        if lk.now < 4.0:
            keep_busy(lk, 1)  # stream 1: bulk for 4 s, then quiet
        elif lk.now >= 4.0 + 2 * QUIET and int(lk.now * 10) != int((lk.now - 0.0005) * 10):
            n = 100 + len(sent)
            sent[n] = lk.now
            lk.data.add(1, bytes(n), n, 16384, False)

    link.run(4.0, step)
    assert link.data.is_bulk(1) and link.data.held > BULK_RUN  # bulk and paced while it sent
    link.run(10.0, step)
    small = [a for a in link.arrivals if a.sid == 1 and a.sent_at >= 4.0 + 2 * QUIET]
    assert len(small) == len(sent) >= 30
    for a in small:
        assert a.sent_at == sent[a.n]  # interactive again: never held
    assert link.delivered(7.0, 10.0, 3) >= 0.8 * rate * 3.0  # and the bulk stream goes on


def test_a_fast_path_never_engages_pacing() -> None:
    """Loopback-like: 1 GB/s, 50 µs, a 4 MiB queue: the queue never builds beyond the target."""
    link = Link(rate=1e9, delay=0.00005, queue=4 << 20)
    link.run(2.0, bulk)
    assert not link.pacer.engaged and link.pacer.engagements == 0
    assert link.pacer.credit(link.now) is None


def test_a_single_late_sample_does_not_engage() -> None:
    """A scheduling stall delays one answer: no queue, no pacing."""
    pacer = DelayPacer(0.025)
    t = 0.0
    rx = 0
    for i in range(400):
        t += 0.005
        rx += 50_000
        late = 0.2 if i == 200 else 0.0
        pacer.on_feedback(t, 0.01 + late, t, rx, False, 0.02)
    assert not pacer.engaged
    assert pacer.queueing_delay == 0.0


def test_max_rate_caps_bulk_from_the_start_without_feedback() -> None:
    link = Link(rate=100 * MBIT, delay=0.01, queue=1 << 20, max_rate=2 * MBIT)
    link.run(6.0, bulk)
    got = link.delivered(1.0, 6.0)
    assert 0.9 * 2 * MBIT * 5 <= got <= 1.05 * 2 * MBIT * 5


def test_wire_values_wrap_and_clock_offsets_cancel() -> None:
    """The probe reads µs mod 2**32 across a wrap, with any clock offset between the sides."""
    pacer = DelayPacer(0.025)
    probe = DelayProbe(pacer)
    offset = 4294.9  # about 2**32 µs: the receiver's clock wraps during the run
    t = 100.0
    received = 0xFFFF0000
    for i in range(200):
        t += 0.005
        echo = clock_us(t - 0.03)
        received = (received + 10_000) & 0xFFFFFFFF
        queue = 0.05 if i >= 150 else 0.0
        probe.answered(t, echo, clock_us(t - 0.015 + queue + offset), received, True)
    assert pacer.queueing_delay == pytest.approx(0.05, abs=2e-6)
    assert pacer.base_rtt == pytest.approx(0.03, abs=1e-5)


def test_a_transfer_resuming_after_a_pause_starts_at_the_links_rate() -> None:
    """Pacing stays engaged through a 3 s pause; the next transfer must not start from the
    trickle its first (ramping) delivery samples show."""
    rate, delay, queue = PROFILES[0]
    link = Link(rate=rate, delay=delay, queue=queue)

    def step(lk: Link) -> None:
        if lk.now < 5.0:
            keep_busy(lk, 1)
        elif lk.now >= 8.0:
            keep_busy(lk, 3)

    link.run(10.0, step)
    assert link.pacer.engagements == 1  # engaged all along
    assert link.delivered(8.3, 9.3, 3) >= 0.8 * rate


def test_a_stall_of_the_receiver_does_not_collapse_the_rate() -> None:
    """The receiving process is not scheduled for 1.5 s (a busy machine). Its socket buffer fills
    and the link stops (back-pressure); when it runs again it reads the buffer and answers the
    stamps at once, with its clock of that moment: a huge delay sample, and a delivery sample of
    a buffer's worth over 1.5 s (a trickle). A gap in feedback counts as a pause, so the
    bottleneck estimate from before the stall holds and the paced rate goes no lower than the
    drain's gain on it; treated as an ordinary sample, the trickle replaced the estimate (the
    rate fell to about a twentieth of the link's and the link ran part-empty after the stall).
    Then the link is full again, at the delay target."""
    rate, delay, queue = PROFILES[0]
    link = Link(rate=rate, delay=delay, queue=queue)
    after: list[tuple[float, float]] = []  # (paced rate, bottleneck estimate) after the stall

    def step(lk: Link) -> None:
        keep_busy(lk, 1)
        if 9.5 <= lk.now < 10.5:
            after.append((lk.pacer.rate or 0.0, lk.pacer.bottleneck or 0.0))

    link.run(8.0, step)
    link.frozen_until = 9.5
    link.run(12.0, step)
    assert link.delivered(8.2, 9.5) <= link.receive_buffer + queue  # the stall stopped the link
    assert after and link.pacer.engagements == 1
    assert min(r for r, _ in after) >= 0.45 * rate  # the drain's gain (0.5) at most
    assert min(b for _, b in after) >= 0.9 * rate
    assert link.delivered(9.6, 9.8) >= 0.9 * rate * 0.2
    assert link.delivered(10.5, 11.5) >= 0.8 * rate
    assert percentile(link.queueing_delays(11.0, 12.0), 0.5) <= 1.25 * link.pacer.effective_target
