"""The idle-cost benchmark (`benchmarks.scale`) at a tiny N: real cloud process, simulated edges
running tunnel-edge's TLS client and tunnel in a worker process; its figures are sane and nothing
churns while idle. The figures themselves are measured by `python -m benchmarks.scale`."""

from __future__ import annotations

import pytest

from benchmarks.scale import run


@pytest.mark.slow
def test_the_idle_harness_at_20_edges_reports_sane_figures() -> None:
    r = run(20, 1, settle=1.0, idle_window=2.0, timeout=60)
    assert r["edges"] == 20 and r["edges_after_idle"] == 20
    assert r["tls_handshakes_while_idle"] == 0 and r["displaced_while_idle"] == 0
    assert 0 < r["kib_per_tunnel_idle"] < 1024
    assert 0 <= r["idle_cloud_cpu_pct_of_core"] < 100
    assert r["idle_window_s"] == 2.0
