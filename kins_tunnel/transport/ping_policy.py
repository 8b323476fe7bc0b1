"""When a tunnel pings, and when its silence means it is dead: the policy `Session.ping` and
`Session.deadline` apply each time the liveness timer (`transport.liveness`) asks.

A busy tunnel (holding streams, or waiting for the answer to an OPEN it sent) pings every
`ping_interval` (its RTT sizes the flow-control windows) and is dead when nothing has arrived for
`ping_timeout`, counted from when it became busy if that is later: a tunnel that idled a minute
is not dead the moment it sends an OPEN, but a peer that answers neither the OPEN nor the PINGs
that now follow it is dropped `ping_timeout` later, as on a busy tunnel (so a hung edge stops
getting the unit's streams within `ping_timeout` of the first one sent to it).

An idle tunnel is watched by the kernel: both sides tune TCP keepalive to the ping settings
(`keepalive`: a probe after `ping_interval` of silence, the connection reset when nothing answers
for `ping_timeout`), so a peer or a path that dies is still noticed within `ping_timeout`, without
waking either process. The tunnel's own PINGs then only prove what the kernel cannot see: a peer
process that hangs while its kernel still answers, or a middlebox that ends TCP on its own (a site
proxy) and answers the probes itself. So an idle tunnel pings only after `idle_ping_interval` of
silence on the edge, and on the cloud half of the busy margin later (so that the edge's ping comes
first and the cloud only answers); the cloud still pings every `RTT_REFRESH` idle intervals for
its RTT. Each side states its silence before it pings in its HELLO (`idle_ping`). An idle tunnel
is dead when nothing has arrived for the shorter of the two silences plus the busy margin
(`idle_timeout`: with the defaults, `ping_timeout + idle_ping_interval - ping_interval`, 70 s).
With `idle_ping_interval` equal to `ping_interval` an idle tunnel pings and times out as a busy
one; tunnel-edge does so on its own behind a site proxy (the proxy's kernel would answer the
probes), and the cloud, told by its HELLO, drops such an edge as soon.
"""

from __future__ import annotations

from kins_tunnel.proto import Role

RTT_REFRESH = 6  # the cloud still pings an idle tunnel every 6 idle intervals (its RTT stays fresh)


def quiet_after(role: Role, interval: float, timeout: float, idle_interval: float) -> float:
    """How long an idle tunnel stays silent before this side pings it: `idle_interval` on the
    edge (the client); on the cloud half the margin between `interval` and `timeout` more (so
    that the edge's ping arrives first), at most half an interval."""
    if role is Role.CLIENT:
        return idle_interval
    return idle_interval + max(0.0, min(interval, timeout - interval)) / 2


def idle_timeout(interval: float, timeout: float, quiet: float, peer_quiet: float) -> float:
    """Seconds of silence after which an idle tunnel is dead: something from the peer is due
    after the shorter of its own silence before it pings (`peer_quiet`: what its HELLO stated,
    else this side's `idle_ping_interval`, the edge's silence with the same settings) and ours
    (`quiet`: it answers our ping), and gets the same margin as on a busy tunnel
    (`timeout - interval`). A peer that pings its idle tunnels often (an edge behind a site
    proxy, where keepalive cannot reach the cloud) is so dropped as soon after a silence as on a
    busy tunnel."""
    return min(quiet, peer_quiet) + max(0.0, timeout - interval)


def ping_due(
    *, busy: bool, last_rx: float, pinged_at: float, interval: float, quiet: float, idle: float
) -> float:
    """Clock time at which this side pings next: `busy` (streams open) every `interval` from its
    last PING (`pinged_at`); idle, after `quiet` seconds without a byte from the peer (`last_rx`)
    or `RTT_REFRESH` idle intervals (`idle`) after its last PING, whichever comes first."""
    if busy:
        return pinged_at + interval
    return min(last_rx + quiet, pinged_at + RTT_REFRESH * idle)


def deadline(
    *, busy: bool, last_rx: float, busy_since: float, timeout: float, idle_after: float
) -> float:
    """Clock time at which the tunnel is dead if nothing more arrives: busy, `timeout` after its
    last byte (`last_rx`) or after it became busy (`busy_since`), whichever is later; idle,
    `idle_after` (`idle_timeout`) after its last byte."""
    if busy:
        return max(last_rx, busy_since) + timeout
    return last_rx + idle_after
