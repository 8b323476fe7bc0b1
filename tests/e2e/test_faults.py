"""Faults injected into real tunnel-cloud and tunnel-edge processes (127.0.0.1, fixed ports):
an edge killed or frozen, the cloud restarted, a network partition, a slow reader, failing targets,
one identity connected twice, graceful drain. Measured times are printed as `FIGURE` lines
(`pytest -s`)."""

from __future__ import annotations

import os
import random
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from kins_tunnel.cloud.server import Cloud
from kins_tunnel.config import cloud_config_from_dict, edge_config_from_dict
from kins_tunnel.edge.agent import Edge
from kins_tunnel.edge.reconnect import backoff_delay
from kins_tunnel.testing.support import free_port, http_get, read_all, rss_kib
from tests.e2e.faultkit import (
    CloudProc,
    Relay,
    cloud_status,
    connect,
    connect_status,
    echo_rtts,
    edge_status,
    edges_of,
    figure,
    percentile,
    procs,
    read_until_end,
    serve_banner,
    serve_source,
    set_rst_on_close,
    wait_cloud_up,
    wait_connect,
    wait_edges,
    wait_until,
)
from tests.e2e.harness import SVC, cloud_dict, edge_dict, hanging_listener, make_certs, serve_echo
from tests.test_observability import samples as metric_samples
from tests.test_observability import value

PING = {"ping_interval": 0.5, "ping_timeout": 2.0}
CLOUD_FAST: dict[str, Any] = {
    "tunnel": {**PING, "drain_timeout": 3.0, "handshake_timeout": 3.0},
    "proxy": {"dial_timeout": 3.0},
}
EDGE_FAST: dict[str, Any] = {
    **PING,
    "reconnect": {"initial": 0.1, "max": 1.0},
    "dial_timeout": 1.0,
    "drain_timeout": 3.0,
    "handshake_timeout": 2.0,
}


async def open_ok(proxy: int, target: str = SVC) -> trio.SocketStream:
    status, head, s = await connect(proxy, target)
    if status != 200:
        await s.aclose()
        raise AssertionError(f"CONNECT {target}: {head!r}")
    return s


async def read_line(s: trio.SocketStream) -> bytes:
    """Ask a `serve_banner` target who it is."""
    await s.send_all(b"?")
    got = b""
    with trio.fail_after(5):
        while not got.endswith(b"\n"):
            chunk = await s.receive_some(1)
            assert chunk, f"stream ended before a line: {got!r}"
            got += chunk
    return got.strip()


async def echo_once(s: trio.SocketStream, data: bytes = b"ping") -> None:
    await s.send_all(data)
    got = b""
    with trio.fail_after(5):
        while len(got) < len(data):
            chunk = await s.receive_some(len(data) - len(got))
            assert chunk, "echo stream ended"
            got += chunk
    assert got == data


async def stream_counts(cloud: CloudProc) -> list[int]:
    return [e["streams"] for e in (await cloud_status(cloud))["edges"]]


# ---------------------------------------------------------------- 1. edge SIGKILL
async def test_edge_sigkill_mid_transfer(tmp_path: Path) -> None:
    async with trio.open_nursery() as n:
        src, _sent = await n.start(serve_source)
        with procs(tmp_path) as ps:
            cloud = ps.cloud(**CLOUD_FAST)
            edge = ps.edge(cloud.tunnel, {SVC: f"127.0.0.1:{src}"}, **EDGE_FAST)
            await wait_cloud_up(cloud)
            await wait_edges(cloud, 1)
            streams = [await open_ok(cloud.proxy) for _ in range(3)]
            ends: list[tuple[str, int, float]] = []
            killed_at = [0.0]
            received = [0] * len(streams)

            async def download(i: int, s: trio.SocketStream) -> None:
                how, count = await read_until_end(s, 10, lambda n: received.__setitem__(i, n))
                ends.append((how, count, time.monotonic() - killed_at[0]))

            try:
                async with trio.open_nursery() as nn:
                    for i, s in enumerate(streams):
                        nn.start_soon(download, i, s)
                    # mid-transfer: every stream past 1 MiB
                    await wait_until(lambda: min(received) > 1 << 20, 10, "every stream past 1 MiB")
                    killed_at[0] = time.monotonic()
                    edge.kill()
                await wait_edges(cloud, 0, timeout=5)
                forget = time.monotonic() - killed_at[0]
            finally:
                for s in streams:
                    await trio.aclose_forcefully(s)
            worst = max(e[2] for e in ends)
            figure("sigkill: client streams ended after", worst, "s")
            figure(
                "sigkill: bytes received before the kill (per stream)", str([e[1] for e in ends])
            )
            assert len(ends) == 3
            assert all(count > 1 << 20 for _, count, _ in ends), ends  # they were transferring
            assert all(how == "reset" for how, _, _ in ends), ends  # truncated, never a clean EOF
            assert worst <= 2.0
            figure("sigkill: registry forgot the edge within", forget, "s")
            assert forget <= 2.0
            assert await connect_status(cloud.proxy, SVC) == 503
            restarted = time.monotonic()
            edge.start()
            back = await wait_connect(cloud.proxy, SVC, 200, timeout=15)
            figure(
                "sigkill: restarted edge serving after (incl. process start)",
                time.monotonic() - restarted,
                "s",
            )
            assert back < 15
            s = await open_ok(cloud.proxy)
            async with s:
                assert len(await s.receive_some(1 << 16)) > 0
        n.cancel_scope.cancel()


# ---------------------------------------------------------------- 2. edge SIGSTOP (half-open)
async def test_edge_sigstop_detected_by_ping_timeout_and_recovers(tmp_path: Path) -> None:
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        with procs(tmp_path) as ps:
            cloud = ps.cloud(**CLOUD_FAST)
            edge = ps.edge(cloud.tunnel, {SVC: f"127.0.0.1:{echo}"}, **EDGE_FAST)
            await wait_cloud_up(cloud)
            await wait_edges(cloud, 1)
            s = await open_ok(cloud.proxy)
            try:
                await echo_once(s)
                stopped = time.monotonic()
                edge.signal(signal.SIGSTOP)
                try:
                    detect = await wait_edges(cloud, 0, timeout=10, node="edge1")
                    figure(
                        "sigstop: cloud detected the dead tunnel after",
                        detect,
                        "s (ping_timeout 2 s)",
                    )
                    assert 1.5 <= detect <= 4.0  # by the ping timeout: not before, not much after
                    how, _ = await read_until_end(s, 3)
                    assert how == "reset"  # the stream on the dead tunnel broke
                    assert await connect_status(cloud.proxy, SVC) == 503
                finally:
                    resumed = time.monotonic()
                    edge.signal(signal.SIGCONT)
                figure("sigstop: edge frozen for", resumed - stopped, "s")
                back = await wait_connect(cloud.proxy, SVC, 200, timeout=10)
                figure("sigstop: serving again after SIGCONT", back, "s")
                assert back <= 3.0
            finally:
                await trio.aclose_forcefully(s)

            async def one_idle_tunnel() -> bool:
                return (
                    await stream_counts(cloud) == [0]
                    and len((await edge_status(edge))["tunnels"]) == 1
                )

            await wait_until(one_idle_tunnel, 3, "one tunnel, no streams")
        n.cancel_scope.cancel()


# ---------------------------------------------------------------- 3. cloud restart, reconnect spread
async def test_cloud_restart_on_same_ports_edge_reconnects(tmp_path: Path) -> None:
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        with procs(tmp_path) as ps:
            cloud = ps.cloud(**CLOUD_FAST)
            edge = ps.edge(cloud.tunnel, {SVC: f"127.0.0.1:{echo}"}, **EDGE_FAST)
            await wait_cloud_up(cloud)
            await wait_edges(cloud, 1)
            s = await open_ok(cloud.proxy)
            killed = time.monotonic()
            cloud.kill()
            try:
                how, _ = await read_until_end(s, 3)
            finally:
                await trio.aclose_forcefully(s)
            assert how in ("reset", "eof")  # the client's own connection died with the cloud

            async def edge_saw_it() -> bool:
                return not (await edge_status(edge))["tunnels"]

            seen = await wait_until(edge_saw_it, 5, "edge noticed the cloud is gone")
            figure("cloud kill: edge noticed after", seen, "s")
            assert seen <= 2.0

            async def failed_attempts() -> float:
                assert edge.admin is not None
                status, body = await http_get(edge.admin, "/metrics")
                assert status == 200
                return value(
                    metric_samples(body), "kins_tunnel_handshake_failures_total", reason="connect"
                )

            before = await failed_attempts()  # the edge keeps retrying while the cloud is away

            async def retried() -> bool:
                return await failed_attempts() >= before + 3

            await wait_until(retried, 10, "three more failed tunnel attempts")
            assert edge.running()
            cloud.start()
            ready = await wait_cloud_up(cloud)
            back = await wait_connect(cloud.proxy, SVC, 200, timeout=10)
            figure("cloud restart: cloud process ready after", ready, "s")
            figure("cloud restart: edge serving again after the cloud was ready", back, "s")
            figure("cloud restart: outage from kill to serving", time.monotonic() - killed, "s")
            assert back <= 3.0  # reconnect.max is 1 s
            s = await open_ok(cloud.proxy)
            async with s:
                await echo_once(s)
        n.cancel_scope.cancel()


def test_backoff_is_full_jitter_over_the_ceiling() -> None:
    rng = random.Random(20240601)
    initial, maximum, mult = 0.5, 30.0, 2.0
    # the ceiling grows exponentially from `initial`, then stays at `maximum`
    for attempt, ceiling in (
        (0, 0.5),
        (1, 1.0),
        (3, 4.0),
        (5, 16.0),
        (6, 30.0),
        (40, 30.0),
        (10_000, 30.0),
    ):
        samples = [backoff_delay(attempt, initial, maximum, mult, rng) for _ in range(200)]
        assert all(0 <= x <= ceiling for x in samples), (attempt, max(samples))
        assert max(samples) > 0.9 * ceiling, (attempt, max(samples))  # reaches the ceiling...
        assert min(samples) < 0.1 * ceiling, (attempt, min(samples))  # ...and goes down to ~0
    # 100 edges failing at once at the cap: spread uniformly over [0, ceiling]
    samples = [backoff_delay(20, initial, maximum, mult, rng) for _ in range(100)]
    bins = [0] * 10
    for x in samples:
        bins[min(9, int(x / maximum * 10))] += 1
    figure("backoff: 100 samples per 3 s bin", str(bins))
    assert all(b >= 3 for b in bins), bins  # no empty tenth (uniform: ~10 each)
    assert max(bins) <= 20, bins  # no pile-up
    assert 0.4 * maximum < statistics.mean(samples) < 0.6 * maximum
    assert statistics.pstdev(samples) > 0.2 * maximum  # uniform: 0.289 * ceiling
    assert len({round(x, 6) for x in samples}) == 100  # every edge its own delay
    # two edges with independent generators do not march in step
    a, b = random.Random(1), random.Random(2)
    pairs = [
        (backoff_delay(k, initial, maximum, mult, a), backoff_delay(k, initial, maximum, mult, b))
        for k in range(10)
    ]
    assert sum(abs(x - y) for x, y in pairs) > 1.0


async def _restart_under_edges(
    tmp_path: Path, count: int, reconnect: dict[str, float], *, up: float, outage: float
) -> list[float]:
    """`count` edges (one identity, `reconnect` settings) hold tunnels to an in-process cloud
    for `up` seconds; the cloud goes away (every tunnel drops at once) and comes back on the same
    port `outage` seconds after the edges saw it go. Returns when each edge was back, in seconds
    after the new cloud started, sorted."""
    certs = make_certs(tmp_path)
    tunnel_port = free_port()
    cfg = cloud_config_from_dict(
        # the edges share one certificate (one identity): let each keep its tunnel
        cloud_dict(
            certs,
            tunnel={"listen": f"127.0.0.1:{tunnel_port}", "max_tunnels_per_identity": count},
        ),
        base_dir=tmp_path,
    )
    edge_cfg = edge_config_from_dict(
        edge_dict(certs, [tunnel_port], {SVC: "127.0.0.1:1"}, reconnect=reconnect),
        base_dir=tmp_path,
    )
    async with trio.open_nursery() as n:
        with trio.fail_after(60):
            async with trio.open_nursery() as cn:
                cloud = Cloud(cfg)
                await cn.start(cloud.run)
                edges = [Edge(edge_cfg, rng=random.Random(i)) for i in range(count)]
                for e in edges:
                    await n.start(e.run)
                await wait_until(lambda: len(cloud.registry) == count, 10, "every edge connected")
                await trio.sleep(up)
                cn.cancel_scope.cancel()  # the cloud goes away: every tunnel drops at once
            await wait_until(
                lambda: not any(e.sessions for e in edges), 5, "every edge lost its tunnel"
            )
            await trio.sleep(outage)  # edges retry (and are refused at once) meanwhile
            async with trio.open_nursery() as cn:
                cloud = Cloud(cfg)
                restart = trio.current_time()
                await cn.start(cloud.run)
                await wait_until(lambda: len(cloud.registry) == count, 40, "every edge back")
                times = sorted(t.connected_at - restart for t in cloud.registry)
                cn.cancel_scope.cancel()
        n.cancel_scope.cancel()
    return times


async def test_twenty_edges_reconnect_spread_out_after_cloud_restart(
    tmp_path: Path, virtual_clock: trio.testing.MockClock
) -> None:
    """In-process, on the virtual clock: the back-off delays (and the 3 s outage) are exact and
    cost no real time."""
    count = 20
    times = await _restart_under_edges(
        tmp_path, count, {"initial": 0.2, "max": 2.0}, up=0.0, outage=3.0
    )
    windows = [sum(1 for t in times if lo <= t < lo + 0.1) for lo in times]
    figure("20 edges: reconnect times after cloud restart (s)", str([round(t, 2) for t in times]))
    figure("20 edges: most reconnects within one 100 ms window", max(windows))
    # everyone back within the backoff cap (virtual time: the handshakes themselves take none)
    assert times[-1] <= 2.0 + 0.1, times
    assert times[-1] - times[0] >= 0.5  # spread out...
    assert max(windows) <= count // 2  # ...not a stampede


async def test_edges_return_to_a_restarted_cloud_within_the_outage(
    tmp_path: Path, virtual_clock: trio.testing.MockClock
) -> None:
    """In-process, on the virtual clock: edges whose tunnels were stable (up 2 s, longer than
    `stable_after`) lose their cloud for 3 s and fail fast meanwhile (their backoff alone would
    reach 6.4-12.8 s); each wait is capped by the outage's age, so every edge is back within 3 s
    of the cloud listening again."""
    outage = 3.0
    reconnect = {"initial": 0.2, "max": 30.0, "stable_after": 1.0}
    times = await _restart_under_edges(tmp_path, 20, reconnect, up=2.0, outage=outage)
    figure("20 edges after a 3 s outage: back after restart (s)", str([round(t, 2) for t in times]))
    assert times[-1] <= outage + 0.2, times  # a wait drawn at age a is at most a
    assert times[-1] - times[0] >= 0.5  # still spread out


# ---------------------------------------------------------------- 4. partition
@pytest.mark.parametrize("cut", ["both", "edge_to_cloud", "cloud_to_edge"])
async def test_partition_detected_on_both_sides_and_heals(tmp_path: Path, cut: str) -> None:
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        with procs(tmp_path) as ps:
            cloud = ps.cloud(**CLOUD_FAST)
            relay = Relay(cloud.tunnel)
            await n.start(relay.serve)
            edge = ps.edge(f"localhost:{relay.port}", {SVC: f"127.0.0.1:{echo}"}, **EDGE_FAST)
            await wait_cloud_up(cloud)
            await wait_edges(cloud, 1)
            s = await open_ok(cloud.proxy)
            try:
                await echo_once(s)
                await s.send_all(b"in flight while the network is cut")  # never answered
                t0 = time.monotonic()
                relay.stop(
                    up=cut in ("both", "edge_to_cloud"), down=cut in ("both", "cloud_to_edge")
                )

                async def cloud_lost() -> bool:
                    return not await edges_of(cloud)

                async def edge_lost() -> bool:
                    return not (await edge_status(edge))["tunnels"]

                async with trio.open_nursery() as nn:
                    seen: dict[str, float] = {}

                    async def watch(name: str, pred: Any) -> None:
                        seen[name] = await wait_until(pred, 10, f"{name} detects the partition")

                    nn.start_soon(watch, "cloud", cloud_lost)
                    nn.start_soon(watch, "edge", edge_lost)
                figure(f"partition {cut}: cloud detected after", seen["cloud"], "s")
                figure(f"partition {cut}: edge detected after", seen["edge"], "s")
                assert max(seen.values()) <= 4.0  # ping_timeout 2 s (+ interval, + the peer's FIN)
                if cut == "both":  # each side on its own ping timeout
                    assert min(seen.values()) >= 1.5
                how, _ = await read_until_end(s, 3)
                assert how == "reset"
                assert await connect_status(cloud.proxy, SVC) == 503
                await trio.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))
                healed = time.monotonic()
                relay.heal()
                back = await wait_connect(cloud.proxy, SVC, 200, timeout=10)
                figure(f"partition {cut}: serving again after heal", back, "s")
                figure(f"partition {cut}: total outage", time.monotonic() - t0, "s")
                assert time.monotonic() - healed <= 4.0
            finally:
                await trio.aclose_forcefully(s)
            s = await open_ok(cloud.proxy)
            async with s:
                await echo_once(s, os.urandom(100_000))

            async def no_stuck_streams() -> bool:
                edges = await edges_of(cloud)
                tunnels = (await edge_status(edge))["tunnels"]
                return [e["streams"] for e in edges] == [0] and [t["streams"] for t in tunnels] == [
                    0
                ]

            await wait_until(no_stuck_streams, 5, "one tunnel each side, no streams left")
        n.cancel_scope.cancel()


# ---------------------------------------------------------------- 5. slow reader
async def test_slow_reader_does_not_stall_others_and_memory_is_bounded(tmp_path: Path) -> None:
    mux = {"max_window": 1 << 20, "session_budget": 4 << 20}
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        src, sent = await n.start(serve_source)
        with procs(tmp_path) as ps:
            cloud = ps.cloud(**CLOUD_FAST, mux=mux)
            edge = ps.edge(
                cloud.tunnel,
                {SVC: f"127.0.0.1:{echo}", "test-svc-kins.kins-system:8080": f"127.0.0.1:{src}"},
                **EDGE_FAST,
                mux=mux,
            )
            await wait_cloud_up(cloud)
            await wait_edges(cloud, 1)
            e = await open_ok(cloud.proxy)
            slow = await open_ok(cloud.proxy, "test-svc-kins.kins-system:8080")
            try:
                await echo_rtts(e, 100)  # warm up
                before = await echo_rtts(e, 300)
                rss0 = {p.name: rss_kib(p.pid) for p in (cloud, edge)}
                read = 0
                with trio.fail_after(20):
                    while read < 32 << 20:  # a fast download first: windows grow to the max
                        read += len(await slow.receive_some(1 << 18))
                # now the reader stops reading, for good
                await trio.sleep(2.0)
                stuck_at = sent[0]
                during = await echo_rtts(e, 300)
                await trio.sleep(1.0)
                rss1 = {p.name: rss_kib(p.pid) for p in (cloud, edge)}
                in_flight = sent[0] - read
                grew_after_stall = sent[0] - stuck_at
            finally:
                await trio.aclose_forcefully(slow)
                await trio.aclose_forcefully(e)
            p99b, p99d = percentile(before, 99) * 1000, percentile(during, 99) * 1000
            figure(
                "slow reader: echo RTT p50/p99 before (ms)",
                f"{percentile(before, 50) * 1000:.2f}/{p99b:.2f}",
            )
            figure(
                "slow reader: echo RTT p50/p99 during (ms)",
                f"{percentile(during, 50) * 1000:.2f}/{p99d:.2f}",
            )
            figure("slow reader: bytes sent by the target but not read by the client", in_flight)
            figure("slow reader: target bytes sent after the stall settled", grew_after_stall)
            for name in rss0:
                figure(f"slow reader: {name} RSS before/after (KiB)", f"{rss0[name]}/{rss1[name]}")
            assert p99d < 100, during
            # Flow control holds the target back: what is in flight is the window plus kernel
            # socket buffers on loopback (a few MiB each), not the target's unbounded output.
            assert grew_after_stall <= 1 << 20, grew_after_stall
            assert in_flight <= 40 << 20, in_flight
            for name in rss0:  # window (1 MiB) + budget (4 MiB) + output queue (4 MiB) + slack
                assert rss1[name] - rss0[name] <= 24 * 1024, (name, rss0, rss1)

            async def settled() -> bool:
                return await stream_counts(cloud) == [0]

            await wait_until(settled, 5, "streams forgotten")
        n.cancel_scope.cancel()


# ---------------------------------------------------------------- 6. failing targets
async def test_targets_that_refuse_hang_or_reset(tmp_path: Path) -> None:
    refused = free_port()
    ended: list[str] = []
    received = [0]  # bytes the recording target has read

    async def rude(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        async def handler(stream: trio.SocketStream) -> None:
            await stream.send_all(os.urandom(1 << 20))
            set_rst_on_close(stream)
            await stream.aclose()

        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(handler, listeners)

    async def recorder(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        async def handler(stream: trio.SocketStream) -> None:
            try:
                while chunk := await stream.receive_some(1 << 16):
                    received[0] += len(chunk)
                ended.append("eof")
            except trio.BrokenResourceError:
                ended.append("reset")
            finally:
                await trio.aclose_forcefully(stream)

        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(handler, listeners)

    with hanging_listener() as hanging:
        async with trio.open_nursery() as n:
            rude_port = await n.start(rude)
            rec_port = await n.start(recorder)
            services = {
                SVC: f"127.0.0.1:{refused}",
                "test-svc-kins.kins-system:6443": f"127.0.0.1:{hanging}",
                "test-svc-kins.kins-system:8443": f"127.0.0.1:{rude_port}",
                "test-svc-kins.kins-system:9443": f"127.0.0.1:{rec_port}",
            }
            with procs(tmp_path) as ps:
                cloud = ps.cloud(**CLOUD_FAST)
                ps.edge(cloud.tunnel, services, **EDGE_FAST)  # dial_timeout 1 s
                await wait_cloud_up(cloud)
                await wait_edges(cloud, 1)
                t0 = time.monotonic()
                status, head, s = await connect(cloud.proxy, SVC)
                await s.aclose()
                figure("refused target: 502 after", time.monotonic() - t0, "s")
                assert status == 502 and b"refused" in head, head
                t0 = time.monotonic()
                status, head, s = await connect(cloud.proxy, "test-svc-kins.kins-system:6443")
                await s.aclose()
                took = time.monotonic() - t0
                figure("hanging target: 504 after (edge dial_timeout 1 s)", took, "s")
                assert status == 504, head
                # not before the dial timeout (a lower bound only: the wall clock of a loaded
                # machine can only add to it); the exact bound: tests/e2e/test_deadlines.py
                assert took >= 1.0, took
                # a target that resets mid-stream: the client sees a reset, not a clean EOF
                s = await open_ok(cloud.proxy, "test-svc-kins.kins-system:8443")
                async with s:
                    how, got = await read_until_end(s, 5)
                figure("resetting target: bytes before the reset", got)
                assert how == "reset", (how, got)
                assert got <= 1 << 20
                # and the other way: a client that resets makes the target see a reset
                s = await open_ok(cloud.proxy, "test-svc-kins.kins-system:9443")
                await s.send_all(b"x" * 100_000)
                await wait_until(lambda: received[0] == 100_000, 5, "the target read the bytes")
                set_rst_on_close(s)
                await s.aclose()
                await wait_until(lambda: bool(ended), 3, "the target saw its connection end")
                assert ended == ["reset"]
                assert await stream_counts(cloud) == [0]
            n.cancel_scope.cancel()


# ---------------------------------------------------------------- 7. one identity twice
async def test_same_edge_identity_twice_both_serve(tmp_path: Path) -> None:
    """Two edge processes with the same certificate (unit test, node edge1): the cloud keeps both
    tunnels (an edge restarted before its old tunnel timed out looks like this) and spreads
    CONNECTs over both; when one dies, the other goes on serving."""
    async with trio.open_nursery() as n:
        a_port = await n.start(serve_banner, "A")
        b_port = await n.start(serve_banner, "B")
        with procs(tmp_path) as ps:
            cloud = ps.cloud(**CLOUD_FAST)
            a = ps.edge(cloud.tunnel, {SVC: f"127.0.0.1:{a_port}"}, name="edge1-a", **EDGE_FAST)
            ps.edge(cloud.tunnel, {SVC: f"127.0.0.1:{b_port}"}, name="edge1-b", **EDGE_FAST)
            await wait_cloud_up(cloud)
            await wait_edges(cloud, 2, node="edge1")
            held = [await open_ok(cloud.proxy) for _ in range(10)]
            try:
                banners = [await read_line(s) for s in held]
                assert sorted(await stream_counts(cloud)) == [5, 5]
            finally:
                for s in held:
                    await s.aclose()
            assert sorted(banners) == [b"A"] * 5 + [b"B"] * 5  # fewest streams first
            a.kill()
            forget = await wait_edges(cloud, 1, node="edge1")
            figure("same identity: killed twin forgotten after", forget, "s")
            for _ in range(10):
                s = await open_ok(cloud.proxy)
                async with s:
                    assert await read_line(s) == b"B"
        n.cancel_scope.cancel()


# ---------------------------------------------------------------- 8. graceful drain
async def test_edge_sigterm_drains_to_the_other_edge_of_the_unit(tmp_path: Path) -> None:
    async with trio.open_nursery() as n:
        ports = {node: await n.start(serve_banner, node) for node in ("edge1", "edge2")}
        with procs(tmp_path) as ps:
            make_certs(tmp_path, (("test", "edge2"),))
            cloud = ps.cloud(**CLOUD_FAST)
            edges = {
                node: ps.edge(
                    cloud.tunnel, {SVC: f"127.0.0.1:{ports[node]}"}, node=node, **EDGE_FAST
                )
                for node in ("edge1", "edge2")
            }
            await wait_cloud_up(cloud)
            await wait_edges(cloud, 1, node="edge1")
            await wait_edges(cloud, 1, node="edge2")
            s = await open_ok(cloud.proxy)
            try:
                which = (await read_line(s)).decode()
                other = "edge2" if which == "edge1" else "edge1"
                payload = os.urandom(2 << 20)
                term = time.monotonic()
                edges[which].signal(signal.SIGTERM)

                async def draining() -> bool:
                    return all(e["draining"] for e in await edges_of(cloud, which))

                figure(
                    "edge drain: cloud saw GOAWAY after",
                    await wait_until(draining, 3, "GOAWAY seen"),
                    "s",
                )
                for _ in range(10):  # new CONNECTs go to the other edge of the unit
                    t = await open_ok(cloud.proxy)
                    async with t:
                        assert (await read_line(t)).decode() == other
                # the in-flight stream goes on, with its full payload, and ends cleanly
                async with trio.open_nursery() as nn:

                    async def send() -> None:
                        for i in range(0, len(payload), 1 << 16):
                            await s.send_all(payload[i : i + (1 << 16)])
                            await trio.sleep(0.01)
                        await s.send_eof()

                    nn.start_soon(send)
                    with trio.fail_after(10):
                        got = await read_all(s)
                done = time.monotonic()
                assert got == payload
                assert edges[which].running()  # it waited for the stream
            finally:
                await trio.aclose_forcefully(s)
            code = await edges[which].wait_exit(5)
            figure("edge drain: in-flight stream lasted after SIGTERM", done - term, "s")
            figure("edge drain: process exited after its last stream", time.monotonic() - done, "s")
            assert code == 0
            assert time.monotonic() - done <= 1.0
            # drain deadline: a stream that never ends is cut at drain_timeout (3 s)
            edges[which].start()
            await wait_edges(cloud, 1, node=which)
            for _ in range(20):
                s = await open_ok(cloud.proxy)
                if (await read_line(s)).decode() == which:
                    break
                await s.aclose()
            else:
                raise AssertionError(f"no stream landed on {which}")
            try:
                term = time.monotonic()
                edges[which].signal(signal.SIGTERM)
                how, _ = await read_until_end(s, 8)
                cut = time.monotonic() - term
            finally:
                await s.aclose()
            code = await edges[which].wait_exit(5)
            figure("edge drain: idle stream cut after (drain_timeout 3 s)", cut, "s")
            assert how == "reset"
            assert 2.8 <= cut <= 4.5
            assert code == 0
            assert await edges_of(cloud, which) == []
        n.cancel_scope.cancel()


async def test_cloud_sigterm_closes_listeners_first_then_drains(tmp_path: Path) -> None:
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        with procs(tmp_path) as ps:
            cloud = ps.cloud(**CLOUD_FAST)
            ps.edge(cloud.tunnel, {SVC: f"127.0.0.1:{echo}"}, **EDGE_FAST)
            await wait_cloud_up(cloud)
            await wait_edges(cloud, 1)
            s = await open_ok(cloud.proxy)
            try:
                await echo_once(s)
                term = time.monotonic()
                cloud.signal(signal.SIGTERM)

                async def refused(port: int) -> bool:
                    try:
                        c = await trio.open_tcp_stream("127.0.0.1", port)
                    except OSError:
                        return True
                    await c.aclose()
                    return False

                async def listeners_closed() -> bool:
                    return await refused(cloud.proxy) and await refused(cloud.tunnel)

                closed = await wait_until(listeners_closed, 2, "proxy and tunnel listeners closed")
                figure("cloud drain: listeners closed after SIGTERM", closed, "s")
                status, _ = await http_get(cloud.admin, "/readyz")
                assert status == 503
                assert cloud.running()
                await echo_once(s, os.urandom(50_000))  # the open stream still works
                await s.send_eof()
                with trio.fail_after(3):
                    assert await read_all(s) == b""
                done = time.monotonic()
            finally:
                await trio.aclose_forcefully(s)
            code = await cloud.wait_exit(5)
            figure("cloud drain: exited after its last stream", time.monotonic() - done, "s")
            figure("cloud drain: SIGTERM to exit", time.monotonic() - term, "s")
            assert code == 0
            assert time.monotonic() - done <= 1.5
        n.cancel_scope.cancel()
