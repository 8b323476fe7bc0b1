"""Flow-control policy: per-stream receive windows that grow toward the bandwidth-delay product,
bounded by a session-wide budget.

Theory of operation
-------------------
Each direction of each stream has its own credit. The *receiver* grants credit (in OPEN or
OPEN_RESULT, then in WINDOW frames); the sender never has more unacknowledged bytes in flight than
the credit it holds. Credit comes back only when the *consumer* has taken bytes out of the receive
buffer (`consumed()`), not when they arrive, so a stream nobody reads stops after one window while
every other stream goes on.

For a receiving stream, with W its current window size::

    credit_outstanding + buffered + unreturned == W

`buffered` is what arrived and waits for the consumer; `unreturned` is what was consumed but not yet
given back. Credit is returned in batches, once `unreturned` reaches half of W, which keeps WINDOW
frames rare.

Growth: when the consumer got through half a window in less than two round trips, the window was
what limited the stream, so W doubles (up to `max_window`), in the same WINDOW frame. The round
trip used is the *minimum* recently measured (the path's propagation delay), not the smoothed one:
under load, queueing inflates the smoothed RTT, and growing windows on it would only fill the
queues further (bufferbloat) and delay every other stream's frames behind bulk data. Growth draws
on the session budget: the sum of all windows never exceeds `session_budget`, except that every
stream is granted at least `MIN_WINDOW` so it can always make progress. Memory held for received,
unconsumed data is therefore at most `session_budget + max_streams * MIN_WINDOW`, whatever the
traffic.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_WINDOW = 16 * 1024


@dataclass(slots=True)
class ReceiveWindow:
    """Receive-side accounting of one stream."""

    size: int  # W
    credit: int  # what the peer may still send
    buffered: int = 0
    unreturned: int = 0
    last_return: float | None = None  # clock time of the last credit return (or the grant)

    def check_invariant(self) -> None:
        assert self.credit + self.buffered + self.unreturned == self.size, self
        assert self.credit >= 0 and self.buffered >= 0 and self.unreturned >= 0, self


class Budget:
    """The session-wide cap on the sum of receive windows."""

    __slots__ = ("limit", "granted")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.granted = 0

    def initial_grant(self, wanted: int) -> int:
        """Window for a new stream: `wanted` if the budget allows, less if not, never < MIN_WINDOW."""
        grant = max(min(wanted, self.limit - self.granted), MIN_WINDOW)
        self.granted += grant
        return grant

    def try_grow(self, amount: int) -> bool:
        if self.granted + amount > self.limit:
            return False
        self.granted += amount
        return True

    def release(self, amount: int) -> None:
        self.granted -= amount


def credit_due(win: ReceiveWindow) -> bool:
    """Credit goes back in batches: once half the window was consumed."""
    return win.unreturned >= win.size // 2


def credit_to_return(
    win: ReceiveWindow,
    *,
    budget: Budget,
    max_window: int,
    now: float | None,
    rtt: float | None,
) -> int:
    """Bytes of credit to send back now (0: not yet), growing the window when it was the limit.

    Updates `win` as if the WINDOW frame had been sent.
    """
    if not credit_due(win):
        return 0
    grow = 0
    if win.size < max_window:
        fast = (
            now is None
            or win.last_return is None
            or rtt is None
            or (now - win.last_return) < 2 * rtt
        )
        if fast:
            step = min(win.size, max_window - win.size)
            if budget.try_grow(step):
                grow = step
    increment = win.unreturned + grow
    win.size += grow
    win.credit += increment
    win.unreturned = 0
    win.last_return = now
    return increment
