"""The reconnect-storm benchmark (`benchmarks.storm`) at a tiny N: it runs end to end (real cloud
processes, one killed and restarted; simulated edges in a worker process) and its figures are
sane. The figures themselves are measured by `python -m benchmarks.scale --storm`."""

from __future__ import annotations

import os

import pytest

from benchmarks.storm import run_storm


@pytest.mark.slow
def test_the_storm_harness_at_20_edges_reports_sane_figures() -> None:
    r = run_storm(20, 1, idle_window=2.0, budget=90.0)
    assert r["edges"] == 20 and r["back"] == 20
    assert r["resumed"] == 20  # every edge came back with its session ticket
    assert r["cloud_tls_handshakes"] == {"resumed": 20.0}
    # the restarted replica must be listening before anyone is back, and everyone back in order
    assert 0 < r["restart_to_listen_s"] < 30
    assert 0 <= r["back_50pct_s"] <= r["back_99pct_s"] <= r["back_100pct_s"] < 30
    assert r["slowest_wait_from_kill_s"] >= r["back_100pct_s"]
    assert r["handshakes_per_s_best_second"] >= 1
    cpu = r["cpu_pct_per_second"]  # who the cores worked for, second by second
    assert len(cpu["cloud"]) == len(cpu["edge_workers"])
    assert all(0 <= x <= 250 for x in cpu["cloud"] + cpu["edge_workers"])
    assert r["tunnels_dropped_during_storm"] == 0
    assert r["pings_unanswered_over_timeout"] == 0
    rtt = r["rtt_during_storm_ms"]
    assert rtt["samples"] > 0 and 0 <= rtt["p50"] <= rtt["p99"] <= rtt["max"] < 20_000
    idle = r["idle"]
    assert 0 < idle["kib_per_edge"] < 1024 and 0 <= idle["cloud_cpu_pct_of_core"] < 100
    leaks = r["leaks"]
    # the baseline is the first cloud process's, the count after is the restarted one's (the
    # first was killed): a fresh process may hold one descriptor fewer, never one more
    assert leaks["fds_after"] <= leaks["fds_baseline"]
    # the liveness timer is one system task per process, started with its first tunnel
    assert leaks["tasks_after"] <= leaks["tasks_baseline"] + 1


@pytest.mark.slow
def test_the_storm_harness_through_a_link_with_a_round_trip() -> None:
    """`--rtt`: the edges dial a relay (`benchmarks.delayrelay`) that adds the round trip, which
    stays up across the replica's restart; the probes' pings see the round trip."""
    r = run_storm(20, 1, idle_window=2.0, budget=90.0, rtt=0.1)
    assert r["rtt_s"] == 0.1 and r["back"] == 20 and r["resumed"] == 20
    assert r["tunnels_dropped_during_storm"] == 0
    rtt = r["rtt_during_storm_ms"]
    assert rtt["samples"] > 0 and 100 <= rtt["p50"] <= rtt["max"] < 20_000
    assert r["relay_cpu_s"] >= 0
    assert r["leaks"]["fds_after"] <= r["leaks"]["fds_baseline"]


@pytest.mark.slow
def test_the_storm_harness_can_give_the_replica_a_core_of_its_own() -> None:
    """`--pin`: the replica on CPU 0 alone, the edges and the harness on the others."""
    before = os.sched_getaffinity(0)
    if len(before) < 2:
        pytest.skip("pinning needs two CPUs")
    try:
        r = run_storm(20, 1, idle_window=1.0, budget=90.0, pin=True)
    finally:
        os.sched_setaffinity(0, before)  # the harness pinned this process beside the edges
    assert r["pinned"] is True and r["back"] == 20 and r["resumed"] == 20
    assert r["tunnels_dropped_during_storm"] == 0
