"""Delay-based pacing of bulk data: keep the queue we add to a thin link near a target delay.

Theory of operation
-------------------
The sender stamps its output with its clock while DATA flows; the receiver answers each stamp with
its own clock at receipt and the DATA bytes it has received so far (see `mux`, frame DELAY). The
sender thus gets, per answer,

- a **one-way delay** `receipt - stamp`. The two clocks have an unknown offset, so the value is
  meaningless alone, but the offset cancels in differences (LEDBAT, RFC 6817): the **base delay**
  is the minimum over a window of `BASE_BUCKETS` buckets of `BASE_BUCKET` seconds (the path's
  propagation plus the offset), the **current delay** is the minimum of the last `CURRENT_FILTER`
  samples (a short filter against jitter), and their difference is the **queueing delay** our
  direction adds: the bottleneck's queue, the kernel's send buffer and anything between. The
  other direction's queue is not counted: the answer's own trip does not enter the value.
- a **delivery rate**: bytes received over the receiver's clock, over at least `RATE_SPAN`
  seconds. Its maximum over `BTL_WINDOW` seconds estimates the bottleneck's rate (samples taken
  while nothing was held are only accepted when they raise it: a quiet sender measures itself,
  not the link; and when bulk data waits again after a pause, or feedback resumes after a gap, the
  old maximum holds for another window while the new transfer ramps up: a stalled process or a
  burst of late samples never collapses the estimate).

While the queueing delay stays at or below the target nothing is paced (`credit` returns None):
on a fast path (loopback, LAN) pacing never engages. Once the queueing delay has stayed above the
target for `ENGAGE_AFTER` seconds (a single late sample, e.g. a scheduling stall, is not a
queue), the pacer engages and the rate of bulk data becomes

    rate = bottleneck × gain(queueing delay)

with a gain of up to 1 + PROBE (1.25) on an empty queue (less on long round trips: about one
target's worth of queue per round trip), 1 at the target, and above it a drain of the excess over
`DRAIN_RTTS` round trips (at least `MIN_GAIN`). Steady state is therefore a queue of about the
target, the link filled (the delivery rate is what the link carries, and the probing gain finds
more when it frees up: after the link's rate doubles the estimate grows by up to 25 % per
feedback round; after it halves the gain drops towards 0.5 and the old maximum ages out of the
`BTL_WINDOW`, so the excess queue is gone within about two seconds). The target is the configured
one, or a quarter of the base round trip when that is less (at least `MIN_TARGET`). The pacer
lets go again once the queueing delay has stayed below a quarter of the target for
`DISENGAGE_AFTER` seconds. A configured `max_rate` caps the rate and engages pacing from the
start.

The rate is spent as a token bucket (`credit` / `spent`): the sender writes again once
`SEND_TIME` (2 ms) of the rate has accrued, so the link sees small, even bursts; the bucket holds
up to `BURST_TIME` (20 ms) of the rate, so a wake-up that comes late (a busy machine) loses no
credit, at the price of one burst of that size after a pause. Only *bulk* data is paced (see
`output` for the classification); the connection never holds control frames or interactive
streams.

Sans-IO: every method takes `now` from the caller's clock; nothing here sleeps or reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass

BASE_BUCKET = 10.0  # seconds per bucket of the base delay's windowed minimum
BASE_BUCKETS = 6  # buckets kept: the base delay is the minimum of the last minute
CURRENT_FILTER = 4  # samples whose minimum is the current delay
ENGAGE_AFTER = 0.1  # seconds the queueing delay stays above target before pacing engages
DISENGAGE_AFTER = 5.0  # seconds below target/4 before pacing lets go (no max_rate)
RATE_SPAN = 0.05  # seconds of receiver time a delivery-rate sample spans, at least
RATE_SAMPLES = 64  # feedback points kept for the delivery rate
BTL_WINDOW = 1.0  # seconds the bottleneck estimate (max delivery rate) remembers a sample
# samples the bottleneck's monotone queue keeps: more than the answers to a window's stamps
# (STAMP_INTERVAL), so only a peer that answers more often than it is asked reaches the bound
BTL_SAMPLES = 256
FEEDBACK_GAP = 0.2  # seconds without feedback (or two base round trips) that count as a pause
PROBE = 0.25  # extra gain on an empty queue (at most; less on long round trips)
MIN_PROBE = 0.05
DRAIN_RTTS = 2.0  # an excess queue is drained over about this many round trips
MIN_GAIN = 0.5
MIN_RATE = 16 * 1024.0  # bytes/s: a paced bulk stream always moves
BURST_TIME = 0.02  # seconds of the rate the bucket holds: a late wake-up loses no credit
SEND_TIME = 0.002  # seconds of the rate the sender waits for before it writes again
MIN_BURST = 4 * 1024  # bytes: a burst may always hold this much
DEFAULT_TARGET = 0.025
MIN_TARGET = 0.005


@dataclass(frozen=True, slots=True)
class PacerStatistics:
    """A snapshot for metrics and status; delays in seconds, rates in bytes/s."""

    engaged: bool
    base_rtt: float | None  # the windowed minimum round trip of the stamps (the path's own)
    queueing_delay: float | None
    rate: float | None  # the paced rate while engaged
    bottleneck: float | None  # the estimated link rate
    samples: int
    engagements: int


def check_pacing(target: float, max_rate: float | None) -> None:
    """ValueError unless `target` and `max_rate` (when given) are positive."""
    if not target > 0:
        raise ValueError(f"target must be positive, got {target!r}")
    if max_rate is not None and not max_rate > 0:
        raise ValueError(f"max_rate must be positive, got {max_rate!r}")


class DelayPacer:
    """The rate at which bulk data may go, from one-way delay and delivery feedback."""

    def __init__(self, target: float = DEFAULT_TARGET, max_rate: float | None = None) -> None:
        check_pacing(target, max_rate)
        self.target = target
        self.max_rate = max_rate
        self.engaged = max_rate is not None
        self.rate: float | None = max_rate
        self.samples = 0
        self.engagements = 0
        self._origin: float | None = None  # the first delay sample: values are kept relative
        # (bucket, minimum delay, minimum round trip)
        # short lists, not deques: an empty deque costs ~600 bytes, and every tunnel has a pacer
        self._base: list[tuple[int, float, float]] = []
        self._qdelay: float | None = None
        self._recent: list[float] = []  # the last CURRENT_FILTER delays
        self._rx: list[tuple[float, int]] = []  # (receiver time, bytes), at most RATE_SAMPLES
        self._btl: list[tuple[float, float]] = []  # (time, rate), rates decreasing
        self._backlogged = False
        self._last_feedback = float("-inf")
        self._above_since: float | None = None
        self._calm_since: float | None = None
        self._tokens = float(MIN_BURST)
        self._last_fill: float | None = None

    # ------------------------------------------------------------------ feedback
    @property
    def base_delay(self) -> float | None:
        return min(m for _, m, _ in self._base) if self._base else None

    @property
    def queueing_delay(self) -> float | None:
        return self._qdelay

    @property
    def bottleneck(self) -> float | None:
        return self._btl[0][1] if self._btl else None  # a monotone queue: the front is the max

    @property
    def base_rtt(self) -> float | None:
        return min(r for _, _, r in self._base) if self._base else None

    def on_feedback(
        self,
        now: float,
        delay: float,
        rx_time: float,
        rx_bytes: int,
        backlogged: bool,
        rtt: float,
    ) -> None:
        """One answer to a stamp: the one-way `delay` it saw (any clock offset), the receiver's
        clock at receipt `rx_time` and its count of DATA bytes received `rx_bytes` (both
        monotonic), whether bulk data was waiting for credit here (`backlogged`), and the
        stamp's round trip `rtt` (our clock: sizes the control loop)."""
        if self._origin is None:
            self._origin = delay
        d = delay - self._origin
        self.samples += 1
        bucket = int(now // BASE_BUCKET)
        base = self._base
        if base and base[-1][0] == bucket:
            _, low, low_rtt = base[-1]
            base[-1] = (bucket, min(low, d), min(low_rtt, rtt))
        else:
            base.append((bucket, d, rtt))
            while base and base[0][0] <= bucket - BASE_BUCKETS:
                del base[0]
        recent = self._recent
        recent.append(d)
        if len(recent) > CURRENT_FILTER:
            del recent[0]
        qd = self._qdelay = max(min(self._recent) - min(m for _, m, _ in base), 0.0)
        self._delivery(now, rx_time, rx_bytes, backlogged)
        self._update(now, qd)

    def _delivery(self, now: float, rx_time: float, rx_bytes: int, backlogged: bool) -> None:
        rx = self._rx
        while len(rx) > 1 and rx_time - rx[1][0] >= 4 * RATE_SPAN:
            del rx[0]  # keep one point older than the span: a sample spans RATE_SPAN..4x
        rate = None
        if rx and rx_time - rx[0][0] >= RATE_SPAN:
            rate = (rx_bytes - rx[0][1]) / (rx_time - rx[0][0])
        rx.append((rx_time, rx_bytes))
        if len(rx) > RATE_SAMPLES:
            del rx[0]
        btl = self._btl
        gap = now - self._last_feedback > max(FEEDBACK_GAP, 2 * (self.base_rtt or 0.0))
        if backlogged and (gap or not self._backlogged) and btl:
            # bulk data waits again after a pause, or feedback resumes after a gap (a stall of
            # either process, say): what the link carried before still holds until samples of
            # the new transfer (which start low, while it ramps up) replace it
            btl[0] = (now, btl[0][1])
        self._backlogged = backlogged
        self._last_feedback = now
        while backlogged and btl and btl[0][0] < now - BTL_WINDOW:
            del btl[0]  # (only while the link is in use: a pause keeps the last maximum)
        if rate is None or rate <= 0:
            return
        if backlogged or not btl or rate > self.bottleneck:  # type: ignore[operator]
            while btl and btl[-1][1] <= rate:  # a monotone queue: the front is the maximum
                btl.pop()
            btl.append((now, rate))
            if len(btl) > BTL_SAMPLES:
                # answers come as often as the peer likes: merge the two oldest candidates
                # behind the front (the higher rate, held until the later one's time)
                btl[1] = (btl[2][0], btl[1][1])
                del btl[2]

    @property
    def effective_target(self) -> float:
        """The queueing delay aimed at: `target`, or less on a short path (a quarter of the base
        round trip, at least `MIN_TARGET`), so the added delay stays small beside the path's."""
        rtt = self.base_rtt
        if rtt is None:
            return self.target
        return min(self.target, max(MIN_TARGET, rtt / 4))

    def _update(self, now: float, qd: float) -> None:
        target = self.effective_target
        if not self.engaged:
            if qd <= target:
                self._above_since = None
                return
            if self._above_since is None:
                self._above_since = now
            if now - self._above_since < ENGAGE_AFTER or self.bottleneck is None:
                return
            self.engaged = True
            self.engagements += 1
            self._calm_since = None
            self._tokens = 0.0
            self._last_fill = now
        elif self.max_rate is None:
            if qd <= target / 4:
                if self._calm_since is None:
                    self._calm_since = now
                elif now - self._calm_since >= DISENGAGE_AFTER:
                    self.engaged = False
                    self.rate = None
                    self._above_since = None
                    return
            else:
                self._calm_since = None
        btl = self.bottleneck
        if btl is None:
            return
        # The loop reacts one round trip late: probe by at most about a target's worth of queue
        # per round trip, and drain an excess over a few round trips, not at once.
        loop = max(self.base_rtt or 0.0, target)
        if qd <= target:
            probe = min(PROBE, max(MIN_PROBE, 2 * target / loop))
            gain = 1.0 + probe * (1.0 - qd / target)
        else:
            gain = max(MIN_GAIN, 1.0 - (qd - target) / (DRAIN_RTTS * loop))
        rate = max(btl * gain, MIN_RATE)
        if self.max_rate is not None:
            rate = min(rate, self.max_rate)
        self.rate = rate

    # ------------------------------------------------------------------ spending
    @property
    def burst(self) -> float:
        return max(float(MIN_BURST), (self.rate or 0.0) * BURST_TIME)

    def credit(self, now: float) -> int | None:
        """Bulk bytes that may go now (None: not paced, anything may go)."""
        rate = self.rate
        if not self.engaged or rate is None:
            return None
        last = self._last_fill
        if last is not None and now > last:
            self._tokens = min(self._tokens + (now - last) * rate, self.burst)
        self._last_fill = now if last is None or now > last else last
        return max(int(self._tokens), 0)

    def spent(self, n: int) -> None:
        """`n` bulk bytes went out (may exceed the credit by a frame header: a small debt)."""
        if self.engaged:
            self._tokens -= n

    def next_send_at(self, now: float) -> float | None:
        """When the next piece of credit (`SEND_TIME` of the rate, at least `MIN_BURST` bytes)
        will be there; None if not paced."""
        rate = self.rate
        if not self.engaged or rate is None:
            return None
        need = max(float(MIN_BURST), rate * SEND_TIME) - self._tokens
        if need <= 0:
            return now
        last = self._last_fill if self._last_fill is not None else now
        return max(now, last + need / rate)

    def statistics(self) -> PacerStatistics:
        return PacerStatistics(
            engaged=self.engaged,
            base_rtt=self.base_rtt,
            queueing_delay=self._qdelay,
            rate=self.rate if self.engaged else None,
            bottleneck=self.bottleneck,
            samples=self.samples,
            engagements=self.engagements,
        )


_MASK = 0xFFFFFFFF
STAMP_INTERVAL = 0.005  # seconds between DELAY stamps while DATA flows


def clock_us(now: float) -> int:
    """A clock reading as the wire carries it: microseconds mod 2**32."""
    return int(now * 1e6) & _MASK


@dataclass(frozen=True, slots=True)
class PacingConfig:
    """The `qos:` settings of one tunnel and direction: the pacer's target and optional cap."""

    enabled: bool = True
    target_delay: float = DEFAULT_TARGET
    max_rate: float | None = None  # bytes/s of bulk data, at most


class DelayProbe:
    """The wire side of a `DelayPacer`: stamps out, answers in (values mod 2**32 unwrapped)."""

    __slots__ = ("pacer", "_last_stamp", "_first", "_rx_raw", "_rx_time", "_bytes_raw", "_bytes")

    def __init__(self, pacer: DelayPacer) -> None:
        self.pacer = pacer
        self._last_stamp = float("-inf")
        self._first: int | None = None  # the first raw delay: later ones are read relative to it
        self._rx_raw = 0
        self._rx_time = 0.0
        self._bytes_raw = 0
        self._bytes = 0

    def stamp_due(self, now: float) -> int | None:
        """The stamp to send now, or None (one per `STAMP_INTERVAL`)."""
        if now - self._last_stamp < STAMP_INTERVAL:
            return None
        self._last_stamp = now
        return clock_us(now)

    def answered(
        self, now: float, echo: int, received_at: int, received: int, backlogged: bool
    ) -> None:
        rtt = ((clock_us(now) - echo) & _MASK) / 1e6
        raw = (received_at - echo) & _MASK
        if self._first is None:
            self._first = raw
            self._rx_raw, self._bytes_raw = received_at, received
        rel = ((raw - self._first + (1 << 31)) & _MASK) - (1 << 31)
        self._rx_time += ((received_at - self._rx_raw) & _MASK) / 1e6
        self._bytes += (received - self._bytes_raw) & _MASK
        self._rx_raw, self._bytes_raw = received_at, received
        self.pacer.on_feedback(now, rel / 1e6, self._rx_time, self._bytes, backlogged, rtt)
