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
hints of the edges it refuses over the time its queue needs, one after another; a jitter
proportional to a long hint, 10 s on 20, would only keep an edge away longer than the cloud
asked). The hint replaces the backoff for that one wait (a shed is the cloud's decision, not a failure of this
edge: the failure count is not raised by it), and is capped at `max`, whatever the peer says.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from kins_tunnel.config import Backoff

HINT_JITTER = 0.5  # a hinted wait is uniform(hint, hint + min(hint * HINT_JITTER, MAX_HINT_JITTER))
MAX_HINT_JITTER = 2.0  # seconds


def backoff_delay(
    attempt: int, initial: float, maximum: float, multiplier: float, rng: random.Random
) -> float:
    """Full-jitter exponential backoff for the `attempt`-th consecutive failure (0-based)."""
    ceiling = min(maximum, initial * (multiplier ** min(attempt, 64)))
    return rng.uniform(0, ceiling)


@dataclass
class ReconnectPolicy:
    """The reconnect state of one keeper (one cloud address). Pure: the caller owns the clock."""

    backoff: Backoff
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0  # consecutive failures (0 after a stable tunnel)

    def next_delay(self, up_for: float, retry_after: float | None = None) -> float:
        """Seconds to wait before the next dial, after a tunnel (attempt) that lasted `up_for`
        seconds and ended with the cloud's hint `retry_after` (None: no hint)."""
        b = self.backoff
        hint = _valid_hint(retry_after, b.max)
        if hint is not None:
            if up_for >= b.stable_after:
                self.attempt = 0
            jitter = min(hint * HINT_JITTER, MAX_HINT_JITTER)
            return self.rng.uniform(hint, min(b.max, hint + jitter))
        self.attempt = 0 if up_for >= b.stable_after else self.attempt + 1
        return backoff_delay(self.attempt, b.initial, b.max, b.multiplier, self.rng)


def _valid_hint(value: float | None, cap: float) -> float | None:
    """A peer's hint as a wait in [0, cap]; None when absent or not a finite number."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return min(float(value), cap)
