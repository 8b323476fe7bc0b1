"""Prometheus metrics (prometheus-client), one registry per process role.

Counters and histograms are updated where things happen; gauges that describe live state (edges
per unit, open streams, bytes per tunnel, RTT) are computed at scrape time from the objects that
own that state, through a custom collector, so they can never drift from the truth.

The cloud labels its process-level series with `replica` (and exports
`kins_tunnel_replica_info{replica,version}`), so the sum over replicas of
`kins_tunnel_edges_connected` is the number of edge tunnels of a unit cluster-wide, and a replica
that lost its edges stands out. On the edge `replica` is empty (a label Prometheus drops).
"""

from __future__ import annotations

import time
from collections import Counter as _Tally
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kins_tunnel import __version__
from kins_tunnel.transport.isolation import log_internal_error

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class TunnelStatistics(Protocol):
    """What the collector reads of a tunnel's `statistics()` record (`SessionStatistics`)."""

    @property
    def streams(self) -> int: ...
    @property
    def bytes_sent(self) -> int: ...
    @property
    def bytes_received(self) -> int: ...
    @property
    def rtt(self) -> float | None: ...
    @property
    def stalls(self) -> int: ...


class Tunnel(Protocol):
    """A live tunnel as metrics see it: anything with a `statistics()` record (a `Session`)."""

    def statistics(self) -> TunnelStatistics: ...


# Gauges and counters per tunnel, read from `SessionStatistics` at scrape time: family, name, help,
# the statistic's attribute.
_PER_TUNNEL: tuple[tuple[type[GaugeMetricFamily | CounterMetricFamily], str, str, str], ...] = (
    (GaugeMetricFamily, "kins_tunnel_streams_open", "Streams open now, per tunnel", "streams"),
    (
        CounterMetricFamily,
        "kins_tunnel_tunnel_bytes_sent",
        "Payload bytes sent into the tunnel",
        "bytes_sent",
    ),
    (
        CounterMetricFamily,
        "kins_tunnel_tunnel_bytes_received",
        "Payload bytes received from the tunnel",
        "bytes_received",
    ),
    (GaugeMetricFamily, "kins_tunnel_tunnel_rtt_seconds", "Last measured tunnel round trip", "rtt"),
    (
        GaugeMetricFamily,
        "kins_tunnel_qos_base_rtt_seconds",
        "Base round trip of the tunnel's delay stamps (windowed minimum; the path without queues)",
        "base_rtt",
    ),
    (
        GaugeMetricFamily,
        "kins_tunnel_qos_queueing_delay_seconds",
        "Queueing delay this side's sending direction adds (one-way, over the base delay)",
        "queueing_delay",
    ),
    (
        GaugeMetricFamily,
        "kins_tunnel_qos_paced_rate_bytes",
        "Bytes per second bulk streams may send while pacing is engaged",
        "paced_rate",
    ),
    (
        GaugeMetricFamily,
        "kins_tunnel_qos_held_bytes",
        "Bytes of bulk streams waiting for the pacer's credit",
        "paced_held",
    ),
    (
        CounterMetricFamily,
        "kins_tunnel_flow_control_stalls",
        "Times a sender on this tunnel waited for peer credit or socket space",
        "stalls",
    ),
)


def _count_tasks() -> int:
    """The trio tasks of this run (0 outside one): the root task and all it started."""
    try:
        todo = [trio.lowlevel.current_root_task()]
    except RuntimeError:
        return 0
    count = 0
    while todo:
        task = todo.pop()
        if task is None:
            continue
        count += 1
        todo.extend(t for n in task.child_nurseries for t in n.child_tasks)
    return count


class _LiveCollector(Collector):
    def __init__(
        self,
        snapshot: Callable[[], Iterable[tuple[dict[str, str], Tunnel]]],
        role: str,
        replica: str,
    ) -> None:
        self._snapshot = snapshot
        self._role = role
        self._replica = replica

    def collect(self) -> Iterator[Metric]:
        tunnels = list(self._snapshot())
        units: _Tally[str] = _Tally()
        per_tunnel = [
            (kind(name, help_text, labels=["unit", "node", "peer"]), statistic)
            for kind, name, help_text, statistic in _PER_TUNNEL
        ]
        for labels, session in tunnels:
            units[labels["unit"]] += 1
            key = [labels["unit"], labels["node"], labels["peer"]]
            st = session.statistics()
            for family, statistic in per_tunnel:
                value = getattr(st, statistic)
                if value is not None:  # no RTT measured yet
                    family.add_metric(key, value)
        total = GaugeMetricFamily(
            "kins_tunnel_tunnels",
            "Tunnels up now (on the cloud: on this replica)",
            labels=["role", "replica"],
        )
        total.add_metric([self._role, self._replica], len(tunnels))
        per_unit = GaugeMetricFamily(
            "kins_tunnel_edges_connected",
            "Tunnels up now, per NodeUnit",
            labels=["unit", "replica"],
        )
        for unit, n in sorted(units.items()):
            per_unit.add_metric([unit, self._replica], n)
        tasks = GaugeMetricFamily(
            "kins_tunnel_tasks", "Tasks alive in this process (a leak shows as growth)"
        )
        tasks.add_metric([], _count_tasks())
        yield from (total, per_unit, tasks)
        yield from (family for family, _ in per_tunnel)
        if self._replica:
            info = GaugeMetricFamily(
                "kins_tunnel_replica_info",
                "This tunnel-cloud replica",
                labels=["replica", "version"],
            )
            info.add_metric([self._replica, __version__], 1)
            yield info


# The counters every process has: attribute, metric name (after "kins_tunnel_"), help, labels.
# Label values are ours (fixed words, HTTP statuses, `code_label`s), never text from a peer.
_COUNTERS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("connect_answers", "connect_answers", "CONNECT answers by HTTP status", ("status",)),
    ("streams", "streams", "Streams opened through the tunnel", ()),
    ("dial_failures", "dial_failures", "Failed opens/dials by reason", ("reason",)),
    (
        "handshake_failures",
        "handshake_failures",
        "Tunnel handshakes that failed, by reason",
        ("reason",),
    ),
    ("relay_bytes", "relay_bytes", "Bytes relayed by direction", ("direction",)),
    (
        "internal_errors",
        "internal_errors",
        "Unexpected exceptions (bugs) caught at a failure-isolation boundary; each ended one "
        "connection or stream only",
        ("where",),
    ),
    (
        "authz_denials",
        "authz_denials",
        "CONNECTs refused by the authorization rules (403), by reason",
        ("reason",),
    ),
    (
        "proxy_tls_failures",
        "proxy_tls_failures",
        "Failed TLS handshakes on the proxy's TLS listener, by reason",
        ("reason",),
    ),
    (
        "alias_lookups",
        "alias_lookups",
        "DNS lookups of units' Service addresses (ClusterIP aliases), by result",
        ("result",),
    ),
    (
        "revoked_closed",
        "revoked_tunnels_closed",
        "Live edge tunnels closed because the edge was revoked",
        (),
    ),
    (
        "tunnels_displaced",
        "tunnels_displaced",
        "Edge tunnels closed because a newer one of the same identity went past "
        "tunnel.max_tunnels_per_identity",
        (),
    ),
    (
        "proxy_early_closes",
        "proxy_early_closes",
        "Proxy connections that ended before any request, by reason: closed (client left), "
        "timeout (408), limit (503), bad_request, internal",
        ("reason",),
    ),
    (
        "proxy_limits",
        "proxy_limits",
        "CONNECTs refused (429/503) or relays closed by a proxy limit, by reason: connections, "
        "principal, stream_share, idle_timeout",
        ("reason",),
    ),
    (
        "revoked_clients_closed",
        "revoked_proxy_clients_closed",
        "Live relays of proxy TLS clients closed because their certificate was revoked",
        (),
    ),
    (
        "listener_limits",
        "listener_limits",
        "Connections ended by a listener's limit, by listener (admin, uplink, uplink_proxy) and "
        "reason: max_connections (closed at accept), idle_timeout",
        ("listener", "reason"),
    ),
    ("uplinks", "uplinks", "Uplink streams (edge to cloud-side target) opened", ()),
    (
        "enrollments",
        "enrollments",
        "Enrolments with a token, by result: ok or the refusal's reason (a fixed label)",
        ("result",),
    ),
    (
        "renewals",
        "certificate_renewals",
        "Edge certificate renewals over the tunnel, by result: ok or the failure's reason",
        ("result",),
    ),
    (
        "uplink_refusals",
        "uplink_refusals",
        "Uplinks refused or failed before any byte moved, by reason (a bounded label)",
        ("reason",),
    ),
    (
        "uplink_bytes",
        "uplink_bytes",
        "Bytes relayed on uplinks: up (edge to target) or down (target to edge)",
        ("direction",),
    ),
    (
        "tls_handshakes",
        "tunnel_tls_handshakes",
        "Tunnel TLS handshakes completed, by kind: full (certificates exchanged) or resumed "
        "(a session ticket)",
        ("kind",),
    ),
)
_DIAL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """The metrics of one process (cloud or edge): the counters of `_COUNTERS`, `dial_seconds`,
    and the live gauges of `_LiveCollector`."""

    connect_answers: Counter
    streams: Counter
    dial_failures: Counter
    handshake_failures: Counter
    relay_bytes: Counter
    internal_errors: Counter
    authz_denials: Counter
    proxy_tls_failures: Counter
    alias_lookups: Counter
    revoked_closed: Counter
    tunnels_displaced: Counter
    proxy_limits: Counter
    proxy_early_closes: Counter
    revoked_clients_closed: Counter
    listener_limits: Counter
    uplinks: Counter
    enrollments: Counter
    renewals: Counter
    uplink_refusals: Counter
    uplink_bytes: Counter
    tls_handshakes: Counter

    def __init__(
        self,
        role: str,
        snapshot: Callable[[], Iterable[tuple[dict[str, str], Tunnel]]],
        replica: str = "",
    ) -> None:
        self.registry = r = CollectorRegistry()
        for attr, name, help_text, labels in _COUNTERS:
            setattr(self, attr, Counter(f"kins_tunnel_{name}", help_text, labels, registry=r))
        self.dial_seconds = Histogram(
            "kins_tunnel_dial_seconds",
            "Cloud: CONNECT until the stream is open; edge: dial of the target",
            registry=r,
            buckets=_DIAL_BUCKETS,
        )
        # Flow-control stalls are counted per tunnel by the session (SessionStatistics.stalls) and
        # exported by the live collector as kins_tunnel_flow_control_stalls_total.
        r.register(_LiveCollector(snapshot, role, replica))

    def report_internal_error(self, where: str, exc: BaseException) -> None:
        """An `ErrorReporter`: log the bug once with its traceback and count it. `where` is one
        of our fixed boundary names, never a value from a peer."""
        log_internal_error(where, exc)
        self.internal_errors.labels(where).inc()

    def render(self) -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE, generate_latest(self.registry)


class _FileCounts(Protocol):
    what: str  # the config key of the file: a bounded label, never peer data
    failures: int
    failing: bool  # the version on disk is not (wholly) in use: its last re-read failed


class ReloadFailures(Collector):
    """``kins_tunnel_reload_failures_total{file}``: re-reads of watched files (credentials, rules,
    revocation list) that failed, read from the files' own counts at scrape time; and
    ``kins_tunnel_reload_failing{file}``: 1 while the file's last re-read failed (so an alert
    holds while a file stays broken, not only when the count moves). Register it with
    `Metrics.registry`; the label is the file's config key (e.g. ``proxy.auth.basic_file``)."""

    def __init__(self, files: Callable[[], Iterable[_FileCounts]]) -> None:
        self._files = files

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "kins_tunnel_reload_failures",
            "Re-reads of a watched file that failed (bad line, unreadable, gone), by config key",
            labels=["file"],
        )
        failing = GaugeMetricFamily(
            "kins_tunnel_reload_failing",
            "1 while the file on disk is not (wholly) in use: its last re-read failed",
            labels=["file"],
        )
        for f in self._files():
            family.add_metric([f.what], f.failures)
            failing.add_metric([f.what], 1 if f.failing else 0)
        yield from (family, failing)


# ---------------------------------------------------------------- for the alerts (deploy/monitoring)
class EdgesLastSeen(Collector):
    """``kins_tunnel_edge_last_seen_timestamp_seconds{unit, node, replica}`` (cloud): when this
    replica last had a tunnel of the edge identity, in Unix seconds: the scrape time while it has
    one, else the time its last tunnel ended. Feeds the "edge gone" and "unit gone" alerts
    (``time() - max by (unit, node) (...)``). One series per identity connected now or remembered
    as gone (`registry.GoneEdges`: bounded in number and age); `unit` and `node` come from
    verified certificates only."""

    def __init__(
        self,
        identities: Callable[[], Iterable[tuple[str, str, float | None]]],
        replica: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._identities = identities
        self._replica = replica
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "kins_tunnel_edge_last_seen_timestamp_seconds",
            "When this replica last had a tunnel of the edge (Unix seconds; now while it has one)",
            labels=["unit", "node", "replica"],
        )
        now = self._clock()
        for unit, node, at in self._identities():
            family.add_metric([unit, node, self._replica], now if at is None else at)
        yield family
