"""deploy/monitoring against real processes: every metric the alert rules and the dashboard read is
exported by a live cloud's or edge's `/metrics`, and a real Prometheus scraping a live cloud and
edge (1 s intervals, the test's copy of rules.yaml with short thresholds) answers every dashboard
query and fires "edge gone" and "unit gone" after the edge is killed.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from kins_tunnel.testing.support import http_get
from tests.e2e.faultkit import (
    CloudProc,
    EdgeProc,
    Procs,
    connect_status,
    figure,
    procs,
    wait_cloud_up,
    wait_edges,
)
from tests.e2e.harness import SVC, echo_bytes, serve_loopback
from tests.e2e.prometheus import (
    MONITORING,
    PROMETHEUS,
    alerts,
    dashboard_expressions,
    exported_names,
    load_rules,
    metric_names,
    query,
    recorded_names,
    rule_expressions,
    run_prometheus,
    tail,
)

GONE_AFTER = 2  # seconds: the test's threshold for "edge gone" and "unit gone" (300 s and 900 s)


async def live_pair(ps: Procs, echo: int) -> tuple[CloudProc, EdgeProc]:
    """A cloud (replica "r1") and an edge serving the unit name, connected, one CONNECT relayed
    (so the CONNECT and dial series have samples)."""
    cloud = ps.cloud(replica="r1", tunnel={"ping_interval": 1, "ping_timeout": 3})
    edge = ps.edge(cloud.tunnel, {SVC: f"127.0.0.1:{echo}"}, ping_interval=1, ping_timeout=3)
    await wait_cloud_up(cloud)
    await wait_edges(cloud, 1)
    assert await connect_status(cloud.proxy, SVC) == 200
    return cloud, edge


async def metrics_text(port: int | None) -> str:
    assert port is not None
    status, body = await http_get(port, "/metrics")
    assert status == 200
    return body.decode()


async def test_every_metric_the_rules_and_dashboard_read_is_exported(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        echo = await nursery.start(serve_loopback, echo_bytes)
        with procs(tmp_path) as ps:
            cloud, edge = await live_pair(ps, echo)
            cloud_names = exported_names(await metrics_text(cloud.admin))
            edge_names = exported_names(await metrics_text(edge.admin))
        nursery.cancel_scope.cancel()
    # the names the cloud-only alerts read really are the cloud's
    assert "kins_tunnel_edge_last_seen_timestamp_seconds" in cloud_names
    assert "kins_tunnel_reload_failing" in cloud_names
    assert "kins_tunnel_edge_last_seen_timestamp_seconds" not in edge_names
    exported = cloud_names | edge_names
    used = {**rule_expressions(), **dashboard_expressions()}
    missing = {
        where: sorted(metric_names(expr) - exported - recorded_names())
        for where, expr in used.items()
        if metric_names(expr) - exported - recorded_names()
    }
    assert not missing, f"names no live process exports: {missing}"
    assert len(used) >= 20


def fast_copy(rules: dict[str, Any]) -> dict[str, Any]:
    """rules.yaml with every `for:` at 1 s and the gone thresholds at `GONE_AFTER` seconds."""
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"
            if rule.get("alert") in ("KinsTunnelEdgeGone", "KinsTunnelUnitGone"):
                rule["expr"], n = re.subn(r"> \d+$", f"> {GONE_AFTER}", rule["expr"].strip())
                assert n == 1, rule["expr"]
    return rules


def firing(found: list[dict[str, Any]], name: str, **labels: str) -> list[dict[str, Any]]:
    return [
        a
        for a in found
        if a["labels"].get("alertname") == name
        and all(a["labels"].get(k) == v for k, v in labels.items())
        and a["state"] == "firing"
    ]


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian package)")
async def test_real_prometheus_fires_edge_gone_after_the_edge_is_killed(tmp_path: Path) -> None:
    rules = tmp_path / "prom" / "rules.yaml"
    rules.parent.mkdir()
    rules.write_text(yaml.safe_dump(fast_copy(load_rules())))
    assert MONITORING.is_dir()
    async with trio.open_nursery() as nursery:
        echo = await nursery.start(serve_loopback, echo_bytes)
        with procs(tmp_path) as ps:
            cloud, edge = await live_pair(ps, echo)
            config = {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(rules)],
                "scrape_configs": [
                    {
                        "job_name": "tunnel-cloud",
                        "static_configs": [{"targets": [f"127.0.0.1:{cloud.admin}"]}],
                    },
                    {
                        "job_name": "tunnel-edge",
                        "static_configs": [{"targets": [f"127.0.0.1:{edge.admin}"]}],
                    },
                ],
            }
            async with run_prometheus(tmp_path / "prom", config) as prom:
                try:
                    await scrape_and_alert(prom, cloud, edge)
                except BaseException:
                    print(f"\n----- prometheus log tail -----\n{tail(tmp_path / 'prom')}")
                    raise
        nursery.cancel_scope.cancel()


async def scrape_and_alert(prom: int, cloud: CloudProc, edge: EdgeProc) -> None:
    # both targets scraped at least 3 times (a rate needs two samples)
    scraped = 'count_over_time(kins_tunnel_tunnels{job="%s"}[1m]) >= 3'
    with trio.fail_after(30):
        while not (
            await query(prom, scraped % "tunnel-cloud")
            and await query(prom, scraped % "tunnel-edge")
        ):
            await trio.sleep(0.2)
    assert await query(prom, 'kins_tunnel_edge_last_seen_timestamp_seconds{node="edge1"}')
    assert await connect_status(cloud.proxy, SVC) == 200  # a CONNECT while Prometheus watches
    # every dashboard query is valid PromQL for this Prometheus, and the main panels have data
    empty = []
    for where, expr in dashboard_expressions().items():
        concrete = expr.replace("$__rate_interval", "1m").replace("$job", "tunnel-cloud")
        concrete = re.sub(r"\$(replica|unit)\b", ".*", concrete)
        if not await query(prom, concrete):
            empty.append(where)
    for needed in (
        "Edge tunnels per NodeUnit (all replicas) / A",
        "Edge tunnels per replica / A",
        "CONNECT answers by status / A",
        "Tunnel round trip (ping), slowest 10 edges / A",
        "Tunnel TLS handshakes: full vs resumed / A",
        "Tasks per replica / A",
        "variable replica",
        "variable unit",
    ):
        assert needed not in empty, f"{needed}: no data from a live cloud"
    # while the edge is up, no "gone" alert even after longer than the threshold
    await trio.sleep(GONE_AFTER + 2)
    now = await alerts(prom)
    assert not [a for a in now if a["labels"]["alertname"].endswith("Gone")], now
    assert not firing(now, "KinsTunnelNoReplica")

    edge.kill()
    killed = time.monotonic()
    with trio.fail_after(30):
        while not firing(await alerts(prom), "KinsTunnelEdgeGone", unit="test", node="edge1"):
            await trio.sleep(0.2)
    fired = time.monotonic() - killed
    figure(
        "edge gone alert firing after SIGKILL (threshold 2 s, for 1 s, 1 s intervals)", fired, "s"
    )
    with trio.fail_after(10):
        while not firing(await alerts(prom), "KinsTunnelUnitGone", unit="test"):
            await trio.sleep(0.2)
    assert fired > GONE_AFTER  # not before the edge was gone for the threshold

    # The replica restarts and forgets the edge: the recorded memory keeps the alert firing.
    cloud.kill()
    cloud.start()
    await wait_cloud_up(cloud)
    with trio.fail_after(30):  # the restarted replica scraped: it does not report edge1
        while not (
            await query(prom, "kins_tunnel_replica_info")
            and not await query(prom, 'kins_tunnel_edge_last_seen_timestamp_seconds{node="edge1"}')
        ):
            await trio.sleep(0.2)
    await trio.sleep(2)  # evaluations with the restarted replica's series only
    assert firing(await alerts(prom), "KinsTunnelEdgeGone", unit="test", node="edge1")
    assert firing(await alerts(prom), "KinsTunnelUnitGone", unit="test")
