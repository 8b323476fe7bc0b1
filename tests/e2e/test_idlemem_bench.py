"""The idle-memory breakdown (`benchmarks.idlemem`) at a tiny N: a real cloud process asked for its
own memory before and after its tunnels; its figures are sane and name the product's lines. The
figures themselves are measured by `python -m benchmarks.idlemem`."""

from __future__ import annotations

import pytest

from benchmarks.idlemem import openssl_costs, run


@pytest.mark.slow
def test_the_breakdown_at_20_edges_reports_sane_figures_and_lines() -> None:
    r = run(20, 1, settle=0.5, trace=True, top=200, timeout=60)
    assert r["tunnels"] == 20 and r["tunnels_after_report"] == 20
    assert 0 < r["python_kib"] < 1024 and 0 < r["malloc_in_use_kib"] < 1024
    assert r["objects"]["Session"] == 1.0 and r["objects"]["EdgeTunnel"] == 1.0
    assert any(line.startswith("kins_tunnel/") for line in r["by_caller"])


def test_openssl_per_connection_grows_with_the_handshake_and_a_bulk_batch() -> None:
    c = openssl_costs(20)
    assert 0 < c["bare"] < c["resumed"] < c["full"] < c["sent 250 KB"]
    assert c["full"] < c["received 250 KB"]
