"""When a tunnel pings: the policy `Session.ping` applies each time the liveness timer
(`transport.liveness`) asks it.

A tunnel holding streams pings every `ping_interval` (its RTT sizes the flow-control windows). An
idle one pings only when nothing has arrived for `quiet_after` (a silence the peer's ping or data
would have broken: the path is proven alive without ours) and, for its RTT, when its own last
ping is `RTT_REFRESH` intervals old. The edge's silence is one interval and the cloud's half an
interval longer, so on an idle tunnel the edge pings every interval and the cloud only answers,
but for its RTT pings every `RTT_REFRESH` intervals. The silence that ends a session
(`ping_timeout`) is not this module's: the timer ends a session silent for that long whatever
this says.
"""

from __future__ import annotations

from kins_tunnel.proto import Role

RTT_REFRESH = 6  # an idle tunnel still pings at least every 6 intervals (its RTT stays fresh)


def quiet_after(role: Role, interval: float, timeout: float) -> float:
    """How long an idle tunnel stays silent before this side pings it: `interval` on the edge
    (the client); on the cloud half an interval more (so that the edge's ping, due after one
    interval, arrives first), but leaving the answer at least half the time between the interval
    and the timeout."""
    if role is Role.CLIENT:
        return interval
    return interval + max(0.0, min(interval, timeout - interval)) / 2


def ping_due(
    *, busy: bool, last_rx: float, pinged_at: float, interval: float, quiet: float
) -> float:
    """Clock time at which this side pings next: `busy` (streams open) every `interval` from its
    last PING (`pinged_at`); idle, after `quiet` seconds without a byte from the peer (`last_rx`)
    or `RTT_REFRESH` intervals after its last PING, whichever comes first."""
    if busy:
        return pinged_at + interval
    return min(last_rx + quiet, pinged_at + RTT_REFRESH * interval)
