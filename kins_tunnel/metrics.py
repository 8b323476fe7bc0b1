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

from collections import Counter as _Tally
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kins_tunnel import __version__
from kins_tunnel.transport.isolation import log_internal_error
from kins_tunnel.transport.session import Session

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _LiveCollector(Collector):
    def __init__(
        self,
        snapshot: Callable[[], Iterable[tuple[dict[str, str], Session]]],
        role: str,
        replica: str,
    ) -> None:
        self._snapshot = snapshot
        self._role = role
        self._replica = replica

    def collect(self) -> Iterator[Metric]:
        tunnels = list(self._snapshot())
        units: _Tally[str] = _Tally()
        streams = GaugeMetricFamily(
            "kins_tunnel_streams_open",
            "Streams open now, per tunnel",
            labels=["unit", "node", "peer"],
        )
        sent = CounterMetricFamily(
            "kins_tunnel_tunnel_bytes_sent",
            "Payload bytes sent into the tunnel",
            labels=["unit", "node", "peer"],
        )
        received = CounterMetricFamily(
            "kins_tunnel_tunnel_bytes_received",
            "Payload bytes received from the tunnel",
            labels=["unit", "node", "peer"],
        )
        rtt = GaugeMetricFamily(
            "kins_tunnel_tunnel_rtt_seconds",
            "Last measured tunnel round trip",
            labels=["unit", "node", "peer"],
        )
        stalls = CounterMetricFamily(
            "kins_tunnel_flow_control_stalls",
            "Times a sender on this tunnel waited for peer credit or socket space",
            labels=["unit", "node", "peer"],
        )
        for labels, session in tunnels:
            units[labels["unit"]] += 1
            key = [labels["unit"], labels["node"], labels["peer"]]
            st = session.statistics()
            streams.add_metric(key, st.streams)
            sent.add_metric(key, st.bytes_sent)
            received.add_metric(key, st.bytes_received)
            stalls.add_metric(key, st.stalls)
            if st.rtt is not None:
                rtt.add_metric(key, st.rtt)
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
        yield from (total, per_unit, streams, sent, received, rtt, stalls)
        if self._replica:
            info = GaugeMetricFamily(
                "kins_tunnel_replica_info",
                "This tunnel-cloud replica",
                labels=["replica", "version"],
            )
            info.add_metric([self._replica, __version__], 1)
            yield info


class Metrics:
    """The metrics of one process (cloud or edge)."""

    def __init__(
        self,
        role: str,
        snapshot: Callable[[], Iterable[tuple[dict[str, str], Session]]],
        replica: str = "",
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connect_answers = Counter(
            "kins_tunnel_connect_answers", "CONNECT answers by HTTP status", ["status"], registry=r
        )
        self.streams = Counter(
            "kins_tunnel_streams", "Streams opened through the tunnel", registry=r
        )
        self.dial_failures = Counter(
            "kins_tunnel_dial_failures", "Failed opens/dials by reason", ["reason"], registry=r
        )
        self.dial_seconds = Histogram(
            "kins_tunnel_dial_seconds",
            "Cloud: CONNECT until the stream is open; edge: dial of the target",
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.handshake_failures = Counter(
            "kins_tunnel_handshake_failures",
            "Tunnel handshakes that failed, by reason",
            ["reason"],
            registry=r,
        )
        self.relay_bytes = Counter(
            "kins_tunnel_relay_bytes", "Bytes relayed by direction", ["direction"], registry=r
        )
        self.internal_errors = Counter(
            "kins_tunnel_internal_errors",
            "Unexpected exceptions (bugs) caught at a failure-isolation boundary; each ended one "
            "connection or stream only",
            ["where"],
            registry=r,
        )
        self.authz_denials = Counter(
            "kins_tunnel_authz_denials",
            "CONNECTs refused by the authorization rules (403), by reason",
            ["reason"],
            registry=r,
        )
        self.proxy_tls_failures = Counter(
            "kins_tunnel_proxy_tls_failures",
            "Failed TLS handshakes on the proxy's TLS listener, by reason",
            ["reason"],
            registry=r,
        )
        self.alias_lookups = Counter(
            "kins_tunnel_alias_lookups",
            "DNS lookups of units' Service addresses (ClusterIP aliases), by result",
            ["result"],
            registry=r,
        )
        self.revoked_closed = Counter(
            "kins_tunnel_revoked_tunnels_closed",
            "Live edge tunnels closed because the edge was revoked",
            registry=r,
        )
        self.uplinks = Counter(
            "kins_tunnel_uplinks", "Uplink streams (edge to cloud-side target) opened", registry=r
        )
        self.uplink_refusals = Counter(
            "kins_tunnel_uplink_refusals",
            "Uplinks refused or failed before any byte moved, by reason (a bounded label)",
            ["reason"],
            registry=r,
        )
        self.uplink_bytes = Counter(
            "kins_tunnel_uplink_bytes",
            "Bytes relayed on uplinks: up (edge to target) or down (target to edge)",
            ["direction"],
            registry=r,
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
