"""Edge hardening, through real tunnel-cloud and tunnel-edge processes on 127.0.0.1: ordinary
refusals are warnings with a reason (never internal errors), a GOAWAY does not park the edge,
a flood at the edge's admin port leaves the tunnel up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kins_tunnel.testing.support import http_get
from tests.e2e.faultkit import procs, wait_cloud_up, wait_until
from tests.e2e.harness import SVC
from tests.test_observability import samples, value

EDGE_FAST: dict[str, Any] = {
    "reconnect": {"initial": 0.05, "max": 0.2},
    "handshake_timeout": 2.0,
}


async def edge_metrics(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    status, body = await http_get(port, "/metrics")
    assert status == 200, body
    return samples(body)


async def test_a_revoked_edge_retries_with_a_warning_not_an_internal_error(
    tmp_path: Path,
) -> None:
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("test/edge1\n")
    with procs(tmp_path) as ps:
        cloud = ps.cloud(tunnel={"revoked_file": str(revoked)})
        await wait_cloud_up(cloud)
        edge = ps.edge(cloud.tunnel, {SVC: "127.0.0.1:9"}, **EDGE_FAST)
        assert edge.admin is not None
        port = edge.admin

        async def refused_thrice() -> bool:
            m = await edge_metrics(port)
            return sum(v for _, v in m.get("kins_tunnel_handshake_failures_total", [])) >= 3

        await wait_until(refused_thrice, 20, "three refused tunnel set-ups")
        m = await edge_metrics(port)
        assert value(m, "kins_tunnel_internal_errors_total", where="edge_tunnel") == 0
        assert value(m, "kins_tunnel_handshake_failures_total", reason="refused") >= 3
        assert not [
            v
            for lab, v in m.get("kins_tunnel_handshake_failures_total", [])
            if lab["reason"] != "refused"
        ]
        text = edge.log.read_text()
        assert "Traceback" not in text and "ERROR" not in text, text[-3000:]
        assert "tunnel to cloud failed" in text
