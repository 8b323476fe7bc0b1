"""When an edge dials a cloud replica again: full-jitter backoff, reset once stable, and the cloud's
retry-after hint.

Theory of operation
-------------------
After a failed or ended tunnel the keeper sleeps `uniform(0, min(max, initial * multiplier**n))`,
`n` the number of consecutive failures: the first retries are fast, a fleet that lost a replica at
once spreads out instead of stampeding, and the cap keeps an absent cloud cheap. A tunnel that
stayed up `stable_after` seconds resets `n` (its end is news, not a repeated failure).

A replica that is too busy to take a tunnel may say when to come back (`retry_after`, seconds, in
its refusal). The next wait then honours the hint, with jitter so that the edges it refused at the
same moment do not all return at the same moment: `uniform(hint, hint + jitter)`, the jitter
`HINT_JITTER` of the hint but at most `MAX_HINT_JITTER` seconds (the cloud already spreads the
hints of the edges it refuses over the time its queue needs, one after another, so the jitter
only keeps two edges given the same hint apart: a tenth of the hint, at most a quarter of a
second. A larger one only keeps an edge away longer than the cloud asked: with half the hint up
to 2 s, the edges of a 5,000-edge storm came back up to 2 s after their appointments, out of the
order they were booked in, found the replica busy with later ones and were refused again, and
99 % were back 10.3 s after the replica listened (three runs); with the small jitter, 9.2 s
(five runs, `benchmarks/README.md`). The hint replaces the backoff for that one wait (a shed is the cloud's decision, not a failure of this
edge: the failure count is not raised by it), and is capped at `max`, whatever the peer says.

The backoff does not outgrow the outage
---------------------------------------
A replica that restarts is gone for a second or two, and every edge that held a tunnel to it
dials during that time: each dial is refused by the kernel at once, so within a second an edge
can count four or five failures and draw its next wait from `uniform(0, 8)` or `uniform(0, 16)`,
coming back long after the replica is listening again. So once a tunnel has stayed up
`stable_after` (the same tunnels whose end resets the count), the ceiling is also capped by how
long the edge has been without that tunnel, the outage's age:
`min(max, initial * multiplier**n, max(initial, age))`. The caller passes its clock reading
(`now`); the policy remembers when the stable tunnel ended.

- Bounded extra delay: a wait drawn at age `a` is at most `a`, so an edge whose cloud is back
  after `T` seconds dials it again by `2 T` at the latest (plus the waits the cloud itself asks
  for), not `T + max`.
- No stampede: while the age caps the ceiling, each wait is `uniform(0, a)`, so the age grows by
  half on average per attempt: an edge dials about `log1.5(T / initial)` times in an outage of
  `T` seconds until the ceiling reaches `max`, then every `max / 2` on average, as before (with
  the defaults, a median of 15 dials in the first minute instead of 8, 51 in ten minutes instead
  of 45: tests/test_reconnect.py).
  A fleet of `N` edges dials about `2 N / a` times a second at age `a`, falling as the outage
  lasts; those dials reach a closed port (a reset from the kernel, no TLS), and the ones that
  reach the restarted replica are admitted or refused before any TLS work, with a hint that
  spreads them over the time its queue needs (`cloud.admission`).
- Only after a stable tunnel: a tunnel that comes up and ends before `stable_after` neither
  resets the count nor restarts the age (a cloud that accepts and drops an edge at once gets the
  full backoff, up to `max`), and an edge that has never held a stable tunnel (first start, a
  cloud never reached) backs off as before.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from kins_tunnel.config import Backoff

HINT_JITTER = 0.1  # a hinted wait is uniform(hint, hint + min(hint * HINT_JITTER, MAX_HINT_JITTER))
MAX_HINT_JITTER = 0.25  # seconds


def backoff_ceiling(attempt: int, initial: float, maximum: float, multiplier: float) -> float:
    """The ceiling of the full-jitter wait after the `attempt`-th consecutive failure (0-based)."""
    return min(maximum, initial * (multiplier ** min(attempt, 64)))


def backoff_delay(
    attempt: int, initial: float, maximum: float, multiplier: float, rng: random.Random
) -> float:
    """Full-jitter exponential backoff for the `attempt`-th consecutive failure (0-based)."""
    return rng.uniform(0, backoff_ceiling(attempt, initial, maximum, multiplier))


@dataclass
class ReconnectPolicy:
    """The reconnect state of one keeper (one cloud address). Pure: the caller owns the clock."""

    backoff: Backoff
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0  # consecutive failures (0 after a stable tunnel)
    outage_since: float | None = None  # when the last stable tunnel ended (the caller's clock)

    def next_delay(
        self, up_for: float, retry_after: float | None = None, *, now: float | None = None
    ) -> float:
        """Seconds to wait before the next dial, after a tunnel (attempt) that lasted `up_for`
        seconds and ended with the cloud's hint `retry_after` (None: no hint), at `now` on the
        caller's monotonic clock (None: the outage's age does not cap the backoff)."""
        b = self.backoff
        stable = up_for >= b.stable_after
        if stable:
            self.outage_since = now
        hint = _valid_hint(retry_after, b.max)
        if hint is not None:
            if stable:
                self.attempt = 0
            jitter = min(hint * HINT_JITTER, MAX_HINT_JITTER)
            return self.rng.uniform(hint, min(b.max, hint + jitter))
        self.attempt = 0 if stable else self.attempt + 1
        ceiling = backoff_ceiling(self.attempt, b.initial, b.max, b.multiplier)
        if now is not None and self.outage_since is not None:
            ceiling = min(ceiling, max(b.initial, now - self.outage_since))
        return self.rng.uniform(0, ceiling)


def _valid_hint(value: float | None, cap: float) -> float | None:
    """A peer's hint as a wait in [0, cap]; None when absent or not a finite number."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return min(float(value), cap)
