"""The benchmarks' reference floor (benchmarks/pyrelay.py) carries every byte of each kind of
measurement, half-close included: a floor that lost data or stalled would make every ratio
against it a lie. Real processes: the target servers, the two relay processes, the measuring
clients."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from benchmarks.paths import PyRelay, Targets
from benchmarks.procs import Cleanup
from benchmarks.run import fairness_once, run_client


@pytest.fixture(scope="module", params=["epoll", "trio"])
def relay(request: pytest.FixtureRequest) -> Iterator[PyRelay]:
    cleanup = Cleanup()
    try:
        yield PyRelay(cleanup, Targets(cleanup), loop=request.param)
    finally:
        cleanup.close()


def test_upload_reaches_the_sink_and_its_count_comes_back(relay: PyRelay) -> None:
    # The sink answers only after EOF: the client's half-close must cross as a close_notify.
    res = run_client("upload", relay.endpoints["sink"], "--bytes", str(8 << 20), timeout=60)
    assert "error" not in res, res
    assert res["bytes"] == 8 << 20


def test_download_delivers_every_byte(relay: PyRelay) -> None:
    res = run_client("download", relay.endpoints["source"], "--bytes", str(8 << 20), timeout=60)
    assert "error" not in res, res
    assert res["bytes"] == 8 << 20


def test_echo_round_trips(relay: PyRelay) -> None:
    res = run_client("rtt", relay.endpoints["echo"], "--count", "200", "--warmup", "20", timeout=60)
    assert "error" not in res, res
    assert res["count"] == 200


def test_parallel_streams_each_reach_the_sink_whole(relay: PyRelay) -> None:
    # the client checks every stream's sink count and reports any mismatch as an error
    res = run_client(
        "parallel",
        relay.endpoints["sink"],
        "--streams",
        "8",
        "--bytes",
        str(1 << 20),
        timeout=60,
    )
    assert "error" not in res, res


def test_an_echo_stream_is_served_while_a_bulk_download_runs(relay: PyRelay) -> None:
    res = fairness_once(relay.endpoints["echo"], relay.endpoints["source"], 200)
    assert "error" not in res, res
    assert res["loaded_p99_us"] > 0
