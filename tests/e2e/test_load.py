"""Load through real cloud and edge processes: 1,000 concurrent checksummed streams of 1 MiB, and a
soak of mixed traffic while the edge flaps, after which nothing may be left behind."""

from __future__ import annotations

import hashlib
import random
import signal
import time
from pathlib import Path

import pytest
import trio

from kins_tunnel.testing.support import read_all, rss_kib
from tests.e2e.faultkit import (
    connect,
    edges_of,
    fd_count,
    figure,
    procs,
    wait_cloud_up,
    wait_connect,
    wait_edges,
    wait_until,
)
from tests.e2e.harness import SVC, serve_digest, serve_echo

MiB = 1 << 20
BLOCK = random.Random(7).randbytes(MiB + 4096)
UP = "test-svc-kins.kins-system:443"  # digest: the client uploads, the target answers sha256 and count
DOWN = (
    "test-svc-kins.kins-system:8443"  # blob: the client names a stream, the target sends its bytes
)


def payload(i: int) -> bytes:
    k = (i * 4099) % 4096
    return BLOCK[k : k + MiB]


async def serve_blob(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Read "<i>\\n", send payload(i), close."""

    async def handler(stream: trio.SocketStream) -> None:
        try:
            line = b""
            while not line.endswith(b"\n"):
                chunk = await stream.receive_some(16)
                if not chunk:
                    return
                line += chunk
            data = payload(int(line))
            for off in range(0, len(data), 1 << 16):
                await stream.send_all(data[off : off + (1 << 16)])
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=4096)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


async def test_thousand_concurrent_streams_of_one_mib_checksummed(tmp_path: Path) -> None:
    count = 1000
    results: dict[int, str] = {}
    async with trio.open_nursery() as n:
        digest = await n.start(serve_digest)
        blob = await n.start(serve_blob)
        with procs(tmp_path) as ps:
            # one client address opens all 1,000 streams: lift its fair-share limits
            cloud = ps.cloud(
                proxy={
                    "dial_timeout": 60.0,
                    "max_connections_per_principal": 2000,
                    "max_stream_share": 1.0,
                }
            )
            edge = ps.edge(
                cloud.tunnel,
                {UP: f"127.0.0.1:{digest}", DOWN: f"127.0.0.1:{blob}"},
                dial_timeout=60.0,
            )
            await wait_cloud_up(cloud)
            await wait_edges(cloud, 1)
            start = trio.Event()
            waiting = [0]  # tasks parked on `start`

            async def one(i: int) -> None:
                waiting[0] += 1
                await start.wait()
                target = UP if i % 2 == 0 else DOWN
                status, head, s = await connect(cloud.proxy, target)
                async with s:
                    if status != 200:
                        results[i] = f"status {status}: {head[:80]!r}"
                        return
                    if target == UP:
                        data = payload(i)
                        for off in range(0, len(data), 1 << 16):
                            await s.send_all(data[off : off + (1 << 16)])
                        await s.send_eof()
                        answer = await read_all(s)
                        want = f"{hashlib.sha256(data).hexdigest()} {len(data)}\n".encode()
                        results[i] = "ok" if answer == want else f"upload digest {answer[:80]!r}"
                    else:
                        await s.send_all(f"{i}\n".encode())
                        got = await read_all(s)
                        ok = (
                            len(got) == MiB
                            and hashlib.sha256(got).digest() == hashlib.sha256(payload(i)).digest()
                        )
                        results[i] = "ok" if ok else f"download {len(got)} bytes, sha mismatch"

            peak = {"cloud": 0, "edge": 0}

            async def sample_rss() -> None:
                while True:
                    peak["cloud"] = max(peak["cloud"], rss_kib(cloud.pid))
                    peak["edge"] = max(peak["edge"], rss_kib(edge.pid))
                    await trio.sleep(0.2)

            t0 = time.monotonic()
            with trio.fail_after(240):
                async with trio.open_nursery() as nn:
                    for i in range(count):
                        nn.start_soon(one, i)
                    await wait_until(lambda: waiting[0] == count, 10, "every client task ready")
                    t0 = time.monotonic()
                    start.set()
                    async with trio.open_nursery() as sampler:
                        sampler.start_soon(sample_rss)
                        await wait_until(lambda: len(results) == count, 240, "every stream done")
                        sampler.cancel_scope.cancel()
            took = time.monotonic() - t0
            bad = {i: r for i, r in results.items() if r != "ok"}
            figure("load: 1000 x 1 MiB streams (half up, half down) took", took, "s")
            figure("load: aggregate throughput", count * MiB / took / MiB, "MiB/s")
            figure("load: failed or corrupt streams", len(bad))
            figure("load: peak RSS cloud/edge (KiB)", f"{peak['cloud']}/{peak['edge']}")
            assert not bad, dict(list(bad.items())[:10])

            async def settled() -> bool:
                return [e["streams"] for e in await edges_of(cloud)] == [0]

            await wait_until(settled, 10, "every stream forgotten")
        n.cancel_scope.cancel()


@pytest.mark.slow  # 30 s; still part of `make test`
async def test_soak_while_the_edge_flaps(tmp_path: Path) -> None:
    duration = 30.0
    stats = {"ok": 0, "refused": 0, "broken": 0, "corrupt": 0, "bytes": 0}
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        with procs(tmp_path) as ps:
            cloud = ps.cloud(
                tunnel={"ping_interval": 0.5, "ping_timeout": 2.0}, proxy={"dial_timeout": 2.0}
            )
            edge = ps.edge(
                cloud.tunnel,
                {SVC: f"127.0.0.1:{echo}"},
                ping_interval=0.5,
                ping_timeout=2.0,
                reconnect={"initial": 0.05, "max": 0.5},
                drain_timeout=1.0,
            )
            await wait_cloud_up(cloud)
            await wait_edges(cloud, 1)
            await trio.sleep(0.5)
            baseline = fd_count(cloud.pid)
            rss0 = rss_kib(cloud.pid)
            stop = trio.Event()
            corrupt: list[tuple[float, int, int, bool, str]] = []
            last_flap = ["none"]
            t_start = time.monotonic()

            async def client(k: int) -> None:
                rng = random.Random(k)
                while not stop.is_set():
                    size = rng.choice((10, 1000, 64_000, 700_000))
                    data = rng.randbytes(size)
                    try:
                        with trio.fail_after(10):
                            status, _, s = await connect(cloud.proxy, SVC)
                            async with s:
                                if status != 200:
                                    stats["refused"] += 1
                                    await trio.sleep(0.05)
                                    continue
                                got: bytes | None = None
                                send_failed = False

                                async def send() -> None:
                                    # A reset reported to the sender is consumed there (the
                                    # kernel reports it once): a later read then sees EOF.
                                    nonlocal send_failed
                                    try:
                                        await s.send_all(data)
                                        await s.send_eof()
                                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                                        send_failed = True

                                async def receive() -> None:
                                    nonlocal got
                                    try:
                                        got = await read_all(
                                            s
                                        )  # a clean EOF: the whole echo or a bug
                                    except trio.BrokenResourceError:
                                        pass

                                async with trio.open_nursery() as nn:
                                    nn.start_soon(send)
                                    nn.start_soon(receive)
                                if got is None or (send_failed and got != data):
                                    stats["broken"] += 1  # reset by a flap: allowed, never silent
                                    continue
                        if got == data:
                            stats["ok"] += 1
                            stats["bytes"] += size
                        else:
                            stats["corrupt"] += 1
                            corrupt.append(
                                (
                                    round(time.monotonic() - t_start, 2),
                                    size,
                                    len(got),
                                    data.startswith(got),
                                    last_flap[0],
                                )
                            )
                    except (trio.BrokenResourceError, OSError):
                        stats["broken"] += 1  # reset by a flap: allowed, never silent

            flaps = 0
            t_end = time.monotonic() + duration
            with trio.fail_after(duration + 60):
                async with trio.open_nursery() as nn:
                    for k in range(16):
                        nn.start_soon(client, k)
                    rng = random.Random(99)
                    while time.monotonic() < t_end - 3:
                        await trio.sleep(rng.uniform(1.5, 3.5))
                        if flaps % 3 == 2:
                            last_flap[0] = f"term@{time.monotonic() - t_start:.2f}"
                            edge.signal(signal.SIGTERM)  # now and then a graceful stop
                            await edge.wait_exit(5)
                        else:
                            last_flap[0] = f"kill@{time.monotonic() - t_start:.2f}"
                            edge.kill()
                        flaps += 1
                        await trio.sleep(rng.uniform(0.0, 0.5))
                        edge.start()
                    await wait_connect(cloud.proxy, SVC, 200, timeout=15)
                    await trio.sleep(1.0)
                    stop.set()
            figure("soak: edge flaps", flaps)
            figure(
                "soak: round trips ok/refused/broken/corrupt",
                f"{stats['ok']}/{stats['refused']}/{stats['broken']}/{stats['corrupt']}",
            )
            figure("soak: bytes echoed intact", stats["bytes"])
            assert stats["corrupt"] == 0, (stats, corrupt[:10])
            assert stats["ok"] >= 100, stats
            assert flaps >= 6

            async def clean() -> bool:
                edges = await edges_of(cloud)
                return [e["streams"] for e in edges] == [0] and fd_count(cloud.pid) == baseline

            try:
                settle = await wait_until(
                    clean, 15, "one edge, no streams, cloud fds back to baseline"
                )
            finally:
                figure("soak: cloud fds baseline/after", f"{baseline}/{fd_count(cloud.pid)}")
                figure("soak: cloud RSS before/after (KiB)", f"{rss0}/{rss_kib(cloud.pid)}")
            figure("soak: settled after traffic stopped", settle, "s")
        n.cancel_scope.cancel()
