"""deploy/monitoring: the alert rules pass `promtool check rules` and their unit tests (`promtool
test rules`, input series in tests.yaml), the PrometheusRule holds the same groups, the dashboard
is well formed; and the cloud metrics the alerts need (edges last seen, files failing) behave.

That every name the rules and the dashboard read is exported by a live cloud and edge, and that a
real Prometheus fires "edge gone", is `tests/e2e/test_monitoring.py`.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from kins_tunnel.cloud.registry import GoneEdges
from tests.e2e.harness import SVC, echo_bytes, serve_loopback, tunnel_env
from tests.e2e.prometheus import (
    MONITORING,
    PROMTOOL,
    dashboard_expressions,
    dashboard_panels,
    load_dashboard,
    load_rules,
    metric_names,
    recorded_names,
    rule_expressions,
)

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package prometheus)"
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=MONITORING
    )


def operator_rule_groups() -> list[dict[str, Any]]:
    doc = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    assert doc["metadata"]["name"] and doc["metadata"]["namespace"] == "kube-system"
    groups: list[dict[str, Any]] = doc["spec"]["groups"]
    return groups


# ---------------------------------------------------------------- the rule files


@needs_promtool
def test_promtool_checks_the_rule_file() -> None:
    done = promtool("check", "rules", "rules.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 12 rules found" in done.stdout, done.stdout


@needs_promtool
def test_promtool_checks_the_prometheusrule_groups(tmp_path: Path) -> None:
    plain = tmp_path / "from-prometheusrule.yaml"
    plain.write_text(yaml.safe_dump({"groups": operator_rule_groups()}))
    done = promtool("check", "rules", str(plain))
    assert done.returncode == 0, done.stdout + done.stderr


def test_prometheusrule_holds_the_same_groups_as_rules_yaml() -> None:
    assert operator_rule_groups() == load_rules()["groups"]


@needs_promtool
def test_alert_unit_tests_pass() -> None:
    done = promtool("test", "rules", "tests.yaml", "tests-memory.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("SUCCESS") == 2, done.stdout


@needs_promtool
def test_alert_unit_tests_fail_when_a_threshold_moves(tmp_path: Path) -> None:
    """The unit tests pin the thresholds: the edge-gone alert 100 s later breaks them."""
    rules = (MONITORING / "rules.yaml").read_text()
    gone = "unit_node:kins_tunnel_edge_last_seen_timestamp_seconds:max > "
    moved = rules.replace(gone + "300", gone + "400")
    assert moved != rules
    (tmp_path / "rules.yaml").write_text(moved)
    (tmp_path / "tests.yaml").write_text((MONITORING / "tests.yaml").read_text())
    done = subprocess.run(
        [PROMTOOL or "promtool", "test", "rules", "tests.yaml"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "alertname: KinsTunnelEdgeGone, time: 12m" in out, out


def test_every_alert_the_issue_names_exists_and_is_tested() -> None:
    alerts = {r["alert"] for g in load_rules()["groups"] for r in g["rules"] if "alert" in r}
    assert alerts >= {
        "KinsTunnelInternalError",
        "KinsTunnelEdgeGone",
        "KinsTunnelUnitGone",
        "KinsTunnelCertificateExpiring",
        "KinsTunnelHandshakeFailures",
        "KinsTunnelHandshakesShed",
        "KinsTunnelReloadFailed",
        "KinsTunnelReplicaFewerEdges",
        "KinsTunnelRenewalsFailing",
        "KinsTunnelQueueingDelayHigh",
    }
    tests = yaml.safe_load((MONITORING / "tests.yaml").read_text())
    tested = {
        case["alertname"]
        for t in tests["tests"]
        for case in t.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    for name in ("tests.yaml", "tests-memory.yaml"):
        assert yaml.safe_load((MONITORING / name).read_text())["rule_files"] == ["rules.yaml"]
    assert tested == alerts, f"alerts without a firing case in tests.yaml: {alerts - tested}"
    for group in load_rules()["groups"]:
        for rule in (r for r in group["rules"] if "alert" in r):
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]


# ---------------------------------------------------------------- expressions and dashboard


def test_metric_names_are_read_from_expressions() -> None:
    expr = (
        'sum without (reason) (rate(a_total{reason!~"x|y"}[5m])) > 0.2 or b unless c offset 15m '
        '< on () group_left () (0.9 * max(d{role="cloud"})) and '
        'histogram_quantile(0.9, sum by (le) (rate(e_bucket{job=~"$job"}[$__rate_interval])))'
    )
    assert metric_names(expr) == {"a_total", "b", "c", "d", "e_bucket"}
    assert metric_names("absent(f) and time() - max by (unit) (g) > 14 * 86400") == {"f", "g"}


def test_every_expression_reads_only_kins_tunnel_metrics() -> None:
    recorded = recorded_names()
    assert recorded == {"unit_node:kins_tunnel_edge_last_seen_timestamp_seconds:max"}
    for where, expr in {**rule_expressions(), **dashboard_expressions()}.items():
        assert metric_names(expr), f"{where}: no metric in {expr!r}"
        names = metric_names(expr) - recorded
        assert all(n.startswith("kins_tunnel_") for n in names), f"{where}: {names}"


def test_dashboard_is_well_formed() -> None:
    doc = load_dashboard()
    assert doc["uid"] and doc["title"] and doc["schemaVersion"] >= 30
    ids = [p["id"] for p in dashboard_panels(doc)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in doc["templating"]["list"]}
    assert {"datasource", "job", "replica", "unit"} <= variables
    cells: set[tuple[int, int]] = set()
    for panel in dashboard_panels(doc):
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        mine = {(g["x"] + dx, g["y"] + dy) for dx in range(g["w"]) for dy in range(g["h"])}
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            used = set()
            for v in variables - {"datasource"}:
                if f"${v}" in t["expr"]:
                    used.add(v)
            assert "job" in used, f"{panel['title']}: every selector names the cloud's job"
    titles = " ".join(p["title"] for p in dashboard_panels(doc)).lower()
    for needed in ("per nodeunit", "per replica", "connect answers", "dial latency", "bytes"):
        assert needed in titles, needed
    assert "round trip" in titles
    for needed in ("full vs resumed", "tasks", "enrolments", "renewals", "paced rate", "held"):
        assert needed in titles, needed
    rows = [p["title"] for p in dashboard_panels(doc) if p["type"] == "row"]
    assert "Queueing delay (QoS)" in rows
    exprs = " ".join(dashboard_expressions().values())
    for family in (
        "kins_tunnel_tunnel_tls_handshakes_total",
        "kins_tunnel_tasks",
        "kins_tunnel_enrollments_total",
        "kins_tunnel_certificate_renewals_total",
        "kins_tunnel_qos_queueing_delay_seconds",
        "kins_tunnel_qos_paced_rate_bytes",
        "kins_tunnel_qos_held_bytes",
    ):
        assert family in exprs, family


# ---------------------------------------------------------------- what the cloud exports for them


def test_gone_edges_are_bounded_in_number_and_age() -> None:
    now = [1000.0]
    gone = GoneEdges(clock=lambda: now[0], max_kept=3, kept_for=60)
    for i in range(5):
        gone.left("u", f"n{i}")
        now[0] += 1
    assert [n for _, n, _ in gone.items()] == ["n2", "n3", "n4"]  # the oldest forgotten
    gone.left("u", "n2")  # left again: now the newest
    assert [(n, at) for _, n, at in gone.items()][-1] == ("n2", 1005.0)
    gone.back("u", "n3")
    assert [n for _, n, _ in gone.items()] == ["n4", "n2"]
    now[0] += 59.5
    assert [n for _, n, _ in gone.items()] == ["n2"]  # n4 left at 1004, older than 60 s
    now[0] += 1
    assert gone.items() == [] and len(gone) == 0


async def test_cloud_exports_when_each_edge_was_last_seen(tmp_path: Path) -> None:
    name = "kins_tunnel_edge_last_seen_timestamp_seconds"
    async with trio.open_nursery() as nursery:
        echo = await nursery.start(serve_loopback, echo_bytes)
        async with tunnel_env(tmp_path) as env:
            cloud = env.cloud

            def seen(node: str) -> float | None:
                labels = {"unit": "test", "node": node, "replica": cloud.replica}
                return cloud.metrics.registry.get_sample_value(name, labels)

            await env.add_edge({"edge2:22": f"127.0.0.1:{echo}"}, node="edge2", wait_for="edge2:22")
            async with trio.open_nursery() as edge1_nursery:  # edge1 alone, to stop it alone
                shared, env.nursery = env.nursery, edge1_nursery
                await env.add_edge({SVC: f"127.0.0.1:{echo}"}, wait_for=SVC)
                env.nursery = shared
                before = seen("edge1")
                assert before is not None and abs(before - time.time()) < 5
                await trio.sleep(0.2)
                assert (seen("edge1") or 0) >= before + 0.2  # "now" while connected
                edge1_nursery.cancel_scope.cancel()
            stopped = time.time()
            with trio.fail_after(10):
                while len(cloud.registry) != 1:
                    await trio.sleep(0.02)
            ended = seen("edge1")
            assert ended is not None and stopped - 1 < ended <= time.time()
            await trio.sleep(0.3)
            assert seen("edge1") == ended  # frozen at the time its last tunnel ended
            assert (seen("edge2") or 0) >= ended + 0.3  # still connected: now
        nursery.cancel_scope.cancel()
