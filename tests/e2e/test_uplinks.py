"""Uplinks: the edge opens streams towards cloud-side targets, through a real cloud and edge.

- A client on the edge side (curl) downloads a 200 MiB blob from an HTTP server on the cloud side
  (Python's http.server, a real HTTP server process) through the edge's uplink listener: sha256.
- The cloud dials only what `uplinks` in cloud.yaml allows the edge's unit (from its certificate):
  a target not on the list, a unit not in the map, a target that does not parse are refused
  (NOT_ALLOWED) and counted; `"*"` applies to every unit; failed dials (refused, no answer in time)
  are told to the edge and counted. The edge resets the local connection on a refusal.
- The edge's local CONNECT proxy (`uplink_proxy`) answers 200 / 403 / 502 / 503 / 400 / 405.
- With real processes: every cloud replica serves uplinks; uplinks survive a cloud restart.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from kins_tunnel.cloud import uplinks as cloud_uplinks
from kins_tunnel.dial import dial_first
from kins_tunnel.edge.agent import Edge
from kins_tunnel.names import Address
from kins_tunnel.proto import ErrorCode
from kins_tunnel.proto.frames import FrameType, frame, open_frame
from kins_tunnel.testing.support import http_get, wait_listening
from tests.clients import CURL, needs_curl, sha256_file
from tests.e2e.faultkit import (
    CloudProc,
    connect,
    edge_status,
    figure,
    procs,
    read_until_end,
    wait_cloud_up,
    wait_edges,
    wait_until,
)
from tests.e2e.harness import (
    SVC,
    echo_bytes,
    free_port,
    hanging_listener,
    read_all,
    serve_echo,
    serve_loopback,
    tunnel_env,
)
from tests.e2e.test_isolation import metrics_of, raw_edge
from tests.test_observability import samples

BLOB_MIB = 200


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of a log line (`extra=`)."""
    return vars(record)


def metric(m: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(
        v for lab, v in m.get(name, []) if all(lab.get(k) == want for k, want in labels.items())
    )


def edge_metric(edge: Edge, name: str, **labels: str) -> float:
    value = edge.metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


def listener(edge: Edge, key: str) -> tuple[str, int]:
    """Where the edge's uplink `key` ("127.0.0.2:0") listens: (host, bound port)."""
    return key.rpartition(":")[0], edge.uplinks.ports[key]


async def echo_once(addr: tuple[str, int], payload: bytes, timeout: float = 10) -> bytes:
    """Send `payload` to `addr`, half-close, read everything back."""
    with trio.fail_after(timeout):
        s = await trio.open_tcp_stream(*addr)
        async with s:
            await s.send_all(payload)
            await s.send_eof()
            return await read_all(s)


async def refused_locally(addr: tuple[str, int], timeout: float = 10) -> str:
    """Connect to an uplink listener and send a little: how the connection ended ("reset" or
    "eof") and the bytes read (none expected)."""
    with trio.fail_after(timeout):
        s = await trio.open_tcp_stream(*addr)
        async with s:
            try:
                await s.send_all(b"hello?")
            except trio.BrokenResourceError:
                return "reset"
            how, n = await read_until_end(s, timeout)
            assert n == 0, f"{n} bytes from a refused uplink"
            return how


# ---------------------------------------------------------------- 200 MiB through an uplink
@asynccontextmanager
async def http_server(directory: Path) -> AsyncIterator[int]:
    """Python's http.server (a real HTTP/1.x server) on 127.0.0.1, serving `directory`."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            "--directory",
            str(directory),
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def alive() -> None:
            assert proc.poll() is None, "http.server exited"

        await wait_listening(port, 15, "http.server listening", alive)
        yield port
    finally:
        proc.kill()
        proc.wait()


@needs_curl
async def test_a_client_on_the_edge_downloads_200_mib_from_the_cloud_through_an_uplink(
    tmp_path: Path,
) -> None:
    served = tmp_path / "www"
    served.mkdir()
    blob = served / "k3s-airgap-images.tar"
    h = hashlib.sha256()
    with open(blob, "wb") as f:
        for _ in range(BLOB_MIB):
            chunk = os.urandom(1 << 20)
            h.update(chunk)
            f.write(chunk)
    want = h.hexdigest()
    async with http_server(served) as http_port, trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        async with tunnel_env(tmp_path, uplinks={"test": [f"127.0.0.1:{http_port}"]}) as env:
            edge = await env.add_edge(
                {SVC: f"127.0.0.1:{echo}"},
                wait_for=SVC,
                uplinks={"127.0.0.1:0": f"127.0.0.1:{http_port}"},
            )
            port = edge.uplinks.ports["127.0.0.1:0"]
            out = tmp_path / "downloaded.tar"
            t0 = time.monotonic()
            result = await trio.run_process(
                [
                    CURL,
                    "-sS",
                    "--fail",
                    "--max-time",
                    "300",
                    "-o",
                    str(out),
                    f"http://127.0.0.1:{port}/k3s-airgap-images.tar",
                ],
                capture_stderr=True,
                check=False,
            )
            took = time.monotonic() - t0
            assert result.returncode == 0, result.stderr
            assert out.stat().st_size == BLOB_MIB << 20
            assert await trio.to_thread.run_sync(sha256_file, out) == want
            figure(
                f"uplink download of {BLOB_MIB} MiB with curl (cloud and edge in one process)",
                (BLOB_MIB << 20) / took / 1e6,
                "MB/s",
            )
            m = await metrics_of(env.ports.admin)
            assert metric(m, "kins_tunnel_uplinks_total") == 1
            assert metric(m, "kins_tunnel_uplink_bytes_total", direction="down") >= BLOB_MIB << 20
            assert edge_metric(edge, "kins_tunnel_uplinks_total") == 1
            assert not m.get("kins_tunnel_uplink_refusals_total")
        n.cancel_scope.cancel()


# ---------------------------------------------------------------- what the cloud allows
async def counting_echo(stream: trio.SocketStream, seen: list[int], i: int) -> None:
    seen[i] += 1
    await echo_bytes(stream)


async def test_the_cloud_dials_only_what_it_allows_the_edges_unit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kins_tunnel")
    seen = [0, 0, 0, 0]  # connections each cloud-side target received
    async with trio.open_nursery() as n:
        ports = [
            await n.start(serve_loopback, functools.partial(counting_echo, seen=seen, i=i))
            for i in range(4)
        ]
        own, everyone, others, secret = (f"127.0.0.1:{p}" for p in ports)
        async with tunnel_env(
            tmp_path, uplinks={"test": [own], "other": [others], "*": [everyone]}
        ) as env:
            echo = await n.start(serve_echo)
            uplinks = {
                "127.0.0.1:0": own,
                "127.0.0.2:0": everyone,
                "127.0.0.3:0": others,
                "127.0.0.4:0": secret,
            }
            a = await env.add_edge({SVC: f"127.0.0.1:{echo}"}, wait_for=SVC, uplinks=uplinks)
            b = await env.add_edge(
                {"b-svc-kins.kins-system:443": f"127.0.0.1:{echo}"},
                node="b1",
                unit="b",
                wait_for="b-svc-kins.kins-system:443",
                uplinks=uplinks,
            )
            # unit test: its own target and the "*" target; not unit other's, not an unlisted one
            assert await echo_once(listener(a, "127.0.0.1:0"), b"own" * 1000) == b"own" * 1000
            assert await echo_once(listener(a, "127.0.0.2:0"), b"star") == b"star"
            assert await refused_locally(listener(a, "127.0.0.3:0")) == "reset"
            assert await refused_locally(listener(a, "127.0.0.4:0")) == "reset"
            # unit b is not in the map: only "*"
            assert await refused_locally(listener(b, "127.0.0.1:0")) == "reset"
            assert await echo_once(listener(b, "127.0.0.2:0"), b"star for b") == b"star for b"
            assert await refused_locally(listener(b, "127.0.0.4:0")) == "reset"
            assert seen == [1, 2, 0, 0], seen  # refused targets were never dialled
            m = await metrics_of(env.ports.admin)
            assert metric(m, "kins_tunnel_uplink_refusals_total", reason="not_allowed") == 4
            assert metric(m, "kins_tunnel_uplinks_total") == 3
            assert metric(m, "kins_tunnel_uplink_bytes_total", direction="up") == 3000 + 4 + 10
            assert edge_metric(a, "kins_tunnel_uplink_refusals_total", reason="not_allowed") == 2
            assert edge_metric(b, "kins_tunnel_uplink_refusals_total", reason="not_allowed") == 2
            assert edge_metric(a, "kins_tunnel_uplinks_total") == 2
        n.cancel_scope.cancel()
    cloud_lines = [r for r in caplog.records if r.name == "kins_tunnel.cloud.uplinks"]
    refused = [r for r in cloud_lines if r.getMessage() == "uplink refused"]
    done = [r for r in cloud_lines if r.getMessage() == "uplink done"]
    assert len(refused) == 4 and len(done) == 3, [(r.getMessage(), vars(r)) for r in cloud_lines]
    line = next(fields(r) for r in refused if fields(r)["unit"] == "b")
    assert (line["node"], line["normalised"], line["status"]) == ("b1", own, "not_allowed")
    assert "not in this unit's uplinks" in line["outcome"]
    first = next(fields(r) for r in done if fields(r)["normalised"] == own)
    assert (first["unit"], first["status"], first["outcome"], first["sent"], first["received"]) == (
        "test",
        "ok",
        "closed",
        3000,
        3000,
    )
    assert first["duration"] >= 0 and first["replica"]
    edge_lines = [
        r
        for r in caplog.records
        if r.name == "kins_tunnel.edge.uplinks" and r.getMessage().startswith("uplink ")
    ]
    assert len(edge_lines) == 7
    assert sorted(fields(r)["status"] for r in edge_lines) == ["not_allowed"] * 4 + ["ok"] * 3


async def test_failed_dials_in_the_cloud_reach_the_edge_as_their_codes(
    tmp_path: Path, virtual_clock: trio.testing.MockClock
) -> None:
    """On the virtual clock: the dial to a target that drops SYNs ends exactly at
    uplink_dial_timeout."""
    closed = free_port()  # nothing listens: refused
    with hanging_listener() as hanging:  # SYNs dropped: no answer in time
        async with trio.open_nursery() as n:
            echo = await n.start(serve_echo)
            allowed = [f"127.0.0.1:{closed}", f"127.0.0.1:{hanging}"]
            async with tunnel_env(
                tmp_path, uplinks={"test": allowed}, uplink_dial_timeout=0.5
            ) as env:
                edge = await env.add_edge(
                    {SVC: f"127.0.0.1:{echo}"},
                    wait_for=SVC,
                    uplinks={"127.0.0.1:0": allowed[0], "127.0.0.2:0": allowed[1]},
                )
                assert await refused_locally(listener(edge, "127.0.0.1:0")) == "reset"
                t0 = trio.current_time()
                assert await refused_locally(listener(edge, "127.0.0.2:0")) == "reset"
                took = trio.current_time() - t0
                assert 0.5 <= took <= 0.5 + 0.05, took  # the cloud's dial deadline, then TIMEOUT
                m = await metrics_of(env.ports.admin)
                assert metric(m, "kins_tunnel_uplink_refusals_total", reason="refused") == 1
                assert metric(m, "kins_tunnel_uplink_refusals_total", reason="timeout") == 1
                assert edge_metric(edge, "kins_tunnel_uplink_refusals_total", reason="refused") == 1
                assert edge_metric(edge, "kins_tunnel_uplink_refusals_total", reason="timeout") == 1
                # the tunnel is unharmed
                status, _head, s = await connect(env.ports.proxy, SVC)
                async with s:
                    assert status == 200
            n.cancel_scope.cancel()


async def test_without_a_tunnel_an_uplink_connection_is_reset_and_counted(tmp_path: Path) -> None:
    async with tunnel_env(tmp_path, uplinks={"*": ["127.0.0.1:9"]}) as env:
        edge = await env.add_edge(
            {SVC: "127.0.0.1:9"},
            cloud=[f"127.0.0.1:{free_port()}"],
            uplinks={"127.0.0.1:0": "127.0.0.1:9"},
        )
        assert not edge.sessions
        assert await refused_locally(listener(edge, "127.0.0.1:0")) == "reset"
        assert edge_metric(edge, "kins_tunnel_uplink_refusals_total", reason="no_tunnel") == 1


# ---------------------------------------------------------------- the edge's CONNECT proxy
async def raw_answer(addr: tuple[str, int], request: bytes) -> bytes:
    with trio.fail_after(10):
        s = await trio.open_tcp_stream(*addr)
        async with s:
            await s.send_all(request)
            return await read_all(s)


@needs_curl
async def test_the_uplink_proxy_speaks_connect_and_the_cloud_decides(tmp_path: Path) -> None:
    served = tmp_path / "www"
    served.mkdir()
    (served / "registries.yaml").write_bytes(b"mirrors: {}\n" * 1000)
    closed = free_port()
    async with http_server(served) as http_port, trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        allowed = [f"127.0.0.1:{echo}", f"127.0.0.1:{http_port}", f"127.0.0.1:{closed}"]
        async with tunnel_env(tmp_path, uplinks={"test": allowed}) as env:
            edge = await env.add_edge(
                {SVC: f"127.0.0.1:{echo}"}, wait_for=SVC, uplink_proxy={"listen": "127.0.0.1:0"}
            )
            proxy = edge.uplinks.proxy_port
            assert proxy
            # an allowed target: 200, then a byte pipe (bytes sent with the request included)
            status, _head, s = await connect(proxy, allowed[0])
            async with s:
                assert status == 200
                await s.send_all(b"through the edge's proxy")
                await s.send_eof()
                assert await read_all(s) == b"through the edge's proxy"
            # curl tunnelling plain HTTP through CONNECT (-p) to the cloud-side web server
            result = await trio.run_process(
                [
                    CURL,
                    "-sS",
                    "--fail",
                    "--max-time",
                    "30",
                    "-p",
                    "-x",
                    f"http://127.0.0.1:{proxy}",
                    f"http://127.0.0.1:{http_port}/registries.yaml",
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert result.returncode == 0, result.stderr
            assert result.stdout == b"mirrors: {}\n" * 1000
            # refusals: the cloud does not allow it, cannot reach it; bad requests
            for target, want in (
                (f"127.0.0.1:{free_port()}", 403),
                ("10.1.2.3:5000", 403),
                (allowed[2], 502),
                ("no-port", 400),
                ("[::1:5000", 400),
            ):
                status, head, s = await connect(proxy, target)
                await s.aclose()
                assert status == want, (target, head)
                assert b"kins-tunnel uplink: " in head
            answer = await raw_answer(("127.0.0.1", proxy), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 405 ") and b"Allow: CONNECT" in answer
            answer = await raw_answer(("127.0.0.1", proxy), b"\x16\x03\x01 not http\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 400 ")
            answer = await raw_answer(
                ("127.0.0.1", proxy), b"CONNECT a:1 HTTP/1.1\r\n" + b"X: y\r\n" * 5000
            )
            assert answer.startswith(b"HTTP/1.1 431 ")
            assert edge_metric(edge, "kins_tunnel_uplink_refusals_total", reason="not_allowed") == 2
            assert edge_metric(edge, "kins_tunnel_uplink_refusals_total", reason="refused") == 1
            assert edge_metric(edge, "kins_tunnel_uplink_refusals_total", reason="bad_request") == 5
            assert edge_metric(edge, "kins_tunnel_uplinks_total") == 2
            assert not edge_metric(edge, "kins_tunnel_internal_errors_total", where="uplink_proxy")
            # no tunnel: 503
            for s_ in list(edge.sessions.values()):
                s_.goaway("test: draining")
            status, head, s = await connect(proxy, allowed[0])
            await s.aclose()
            assert status == 503, head
            assert edge_metric(edge, "kins_tunnel_uplink_refusals_total", reason="no_tunnel") == 1
        n.cancel_scope.cancel()


# ---------------------------------------------------------------- a hand-driven edge
async def test_open_results_for_a_raw_edge_follow_the_rules(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An edge speaking frames by hand (unit `fuzz`): allowed, not allowed, unparseable and
    hostile targets get the right answers, and the log line shows the target escaped."""
    caplog.set_level(logging.INFO, logger="kins_tunnel")
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        async with tunnel_env(tmp_path, uplinks={"fuzz": [f"127.0.0.1:{echo}"]}) as env:
            peer = await raw_edge(env.ports.tunnel, env.certs)
            try:
                opens = {
                    1: f"127.0.0.1:{echo}".encode(),
                    3: b"evil\n2026-01-01 INFO forged:1",
                    5: b"10.0.0.1:22",
                    7: "ünïcode:80".encode(),
                    9: b"x" * 400,
                    11: f"LOCALHOST.:{echo}".encode(),
                }
                for sid, target in opens.items():
                    await peer.send(open_frame(sid, 1 << 18, target))
                codes: dict[int, int] = {}
                with trio.fail_after(10):
                    while len(codes) < len(opens):
                        ftype, _flags, sid, payload = await peer.wait_for(FrameType.OPEN_RESULT)
                        codes[sid] = int.from_bytes(payload[:4], "big")
                assert codes == {
                    1: 0,
                    3: ErrorCode.NOT_ALLOWED,
                    5: ErrorCode.NOT_ALLOWED,
                    7: ErrorCode.NOT_ALLOWED,
                    9: ErrorCode.NOT_ALLOWED,
                    11: ErrorCode.NOT_ALLOWED,
                }
                await peer.send(frame(FrameType.DATA, 1, b"raw bytes", 1))  # with FIN
                got = b""
                with trio.fail_after(10):
                    while True:
                        ftype, flags, sid, payload = await peer.wait_for(FrameType.DATA)
                        got += payload
                        if flags & 1 or got == b"raw bytes":
                            break
                assert got == b"raw bytes"
            finally:
                await peer.aclose()
            m = await metrics_of(env.ports.admin)
            assert (
                metric(m, "kins_tunnel_uplink_refusals_total", reason="not_allowed") == 2
            )  # 5, 11
            assert (
                metric(m, "kins_tunnel_uplink_refusals_total", reason="bad_target") == 3
            )  # 3, 7, 9
            assert not m.get("kins_tunnel_internal_errors_total")
        n.cancel_scope.cancel()
    lines = {
        fields(r)["stream"]: fields(r)
        for r in caplog.records
        if r.name == "kins_tunnel.cloud.uplinks" and r.getMessage().startswith("uplink ")
    }
    assert (
        lines[3]["target"] == "evil\\n2026-01-01 INFO forged:1"
        and lines[3]["status"] == "bad_target"
    )
    assert lines[7]["target"] == "\\xfcn\\xefcode:80" and lines[7]["status"] == "bad_target"
    assert len(lines[9]["target"]) == 256 and lines[9]["status"] == "bad_target"
    assert (lines[1]["unit"], lines[1]["node"], lines[1]["status"]) == ("fuzz", "fuzz1", "ok")
    assert (lines[11]["normalised"], lines[11]["status"]) == (f"localhost:{echo}", "not_allowed")


async def test_a_flood_of_refused_uplinks_is_counted_in_full_and_logged_within_a_budget(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, virtual_clock: trio.testing.MockClock
) -> None:
    """On the virtual clock: the log budget's second is exact (and the wait for a new one free)."""
    caplog.set_level(logging.INFO, logger="kins_tunnel")
    async with tunnel_env(tmp_path, uplinks={"fuzz": ["127.0.0.1:9"]}) as env:
        peer = await raw_edge(env.ports.tunnel, env.certs)
        try:
            sids = range(1, 2 * 300, 2)
            t0 = trio.current_time()
            await peer.send(
                b"".join(open_frame(sid, 1 << 18, b"10.0.0.1:%d" % sid) for sid in sids)
            )
            with trio.fail_after(10):
                for _ in sids:
                    await peer.wait_for(FrameType.OPEN_RESULT)
            await trio.sleep(1.0)  # a new second of log budget
            await peer.send(open_frame(1001, 1 << 18, b"10.0.0.2:1"))
            with trio.fail_after(10):
                await peer.wait_for(FrameType.OPEN_RESULT)
            seconds = trio.current_time() - t0
        finally:
            await peer.aclose()
        m = await metrics_of(env.ports.admin)
        assert metric(m, "kins_tunnel_uplink_refusals_total", reason="not_allowed") == 301
    lines = [
        fields(r)
        for r in caplog.records
        if r.name == "kins_tunnel.cloud.uplinks" and r.getMessage() == "uplink refused"
    ]
    assert len(lines) <= 20 * (math.ceil(seconds) + 1), (
        len(lines),
        seconds,
    )  # 20 lines a second at most
    assert lines[-1]["target"] == "10.0.0.2:1" and lines[-1].get("not_logged_before", 0) > 0
    assert (
        len(lines) + sum(line.get("not_logged_before", 0) for line in lines) == 301
    )  # none unaccounted


# ---------------------------------------------------------------- real processes: replicas, restarts
async def uplink_echoes(port: int, count: int) -> None:
    """`count` uplink connections in turn, each echoing 64 KiB of random bytes, compared."""
    for _ in range(count):
        payload = os.urandom(64 << 10)
        assert await echo_once(("127.0.0.1", port), payload) == payload


async def uplinks_served(cloud: CloudProc) -> float:
    status, body = await http_get(cloud.admin, "/metrics")
    assert status == 200
    return metric(samples(body), "kins_tunnel_uplinks_total")


async def test_every_replica_serves_uplinks_and_they_survive_a_replica_restart(
    tmp_path: Path,
) -> None:
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        target = f"127.0.0.1:{echo}"
        with procs(tmp_path) as ps:
            clouds = [ps.cloud(name, uplinks={"test": [target]}) for name in ("cloud-a", "cloud-b")]
            a, b = clouds
            up = free_port()
            edge = ps.edge(
                a.tunnel,
                {SVC: target},
                cloud=[f"127.0.0.1:{c.tunnel}" for c in clouds],
                uplinks={f"127.0.0.1:{up}": target},
                reconnect={"initial": 0.05, "max": 0.5},
            )
            for c in clouds:
                await wait_cloud_up(c)
                await wait_edges(c, 1)

            async def tunnels() -> int:
                return len((await edge_status(edge))["tunnels"])

            assert (await edge_status(edge))["uplinks"] == [
                {"listen": f"127.0.0.1:{up}", "port": up, "target": target}
            ]
            # both replicas serve uplinks (the edge spreads them over its tunnels)
            await uplink_echoes(up, 10)
            served = [await uplinks_served(c) for c in clouds]
            assert sum(served) == 10 and min(served) >= 1, served
            # one replica dies: uplinks go on through the other at once
            a.kill()
            noticed = await wait_until(
                lambda: _eq(tunnels(), 1), 10, "the edge drops the dead tunnel"
            )
            await uplink_echoes(up, 5)
            assert await uplinks_served(b) == served[1] + 5
            # it comes back: the edge reconnects and the new process serves uplinks too
            a.start()
            await wait_cloud_up(a)
            back = await wait_edges(a, 1)
            await uplink_echoes(up, 6)
            assert await uplinks_served(a) >= 1
            # and alone: the other replica dies, every uplink goes through the restarted one
            before = await uplinks_served(a)
            b.kill()
            await wait_until(lambda: _eq(tunnels(), 1), 10, "the edge drops the second dead tunnel")
            await uplink_echoes(up, 5)
            assert await uplinks_served(a) == before + 5
            m = samples((await http_get(edge.admin or 0, "/metrics"))[1])
            assert metric(m, "kins_tunnel_uplink_refusals_total") == 0, m.get(
                "kins_tunnel_uplink_refusals_total"
            )
            assert metric(m, "kins_tunnel_uplinks_total") == 26
            figure("uplinks: edge dropped the killed replica's tunnel after", noticed, "s")
            figure("uplinks: restarted replica had the edge back after", back, "s")
        n.cancel_scope.cancel()


async def _eq(value: Awaitable[int], want: int) -> bool:
    return await value == want


async def test_a_draining_edge_stops_accepting_uplinks_and_lets_open_ones_finish(
    tmp_path: Path,
) -> None:
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        async with tunnel_env(tmp_path, uplinks={"test": [f"127.0.0.1:{echo}"]}) as env:
            edge = await env.add_edge(
                {SVC: f"127.0.0.1:{echo}"},
                wait_for=SVC,
                drain_timeout=5,
                uplinks={"127.0.0.1:0": f"127.0.0.1:{echo}"},
            )
            addr = listener(edge, "127.0.0.1:0")
            with trio.fail_after(10):
                held = await trio.open_tcp_stream(*addr)
                async with held:
                    await held.send_all(b"before")
                    assert await held.receive_some(6) == b"before"
                    drained = trio.Event()

                    async def drain() -> None:
                        await edge.drain()
                        drained.set()

                    n.start_soon(drain)

                    async def closed() -> bool:
                        try:
                            probe = await trio.open_tcp_stream(*addr)
                        except OSError:
                            return True
                        await probe.aclose()
                        return False

                    await wait_until(closed, 5, "the uplink listener closes")
                    await held.send_all(b"during the drain")  # the open uplink goes on
                    got = b""
                    while len(got) < 16:
                        got += await held.receive_some(16)
                    assert got == b"during the drain"
                    assert not drained.is_set()
                    await held.send_eof()
                    assert await read_all(held) == b""
                with trio.fail_after(
                    4
                ):  # its stream ended: the drain is over before drain_timeout (5 s)
                    await drained.wait()
            m = await metrics_of(env.ports.admin)
            assert metric(m, "kins_tunnel_uplinks_total") == 1
            assert metric(m, "kins_tunnel_uplink_bytes_total", direction="up") == 6 + 16
        n.cancel_scope.cancel()


# ---------------------------------------------------------------- the name the cloud dials
async def test_the_cloud_dials_an_uplink_target_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mirror.eu.svc.example.com:443` is dialled as written, never as `mirror.eu:443`; only
    `.svc` and `.svc.<cluster_domain>` are shortened, and only to match the allowed list. DNS
    cannot resolve these names here: the cloud's dialer records the addresses it is asked for
    and connects to a local echo server instead."""
    asked: list[list[str]] = []
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)

        async def recording_dial(
            addrs: Sequence[Address], timeout: float
        ) -> tuple[trio.SocketStream, Address]:
            asked.append([str(a) for a in addrs])
            return await dial_first((Address("127.0.0.1", echo),), timeout)

        monkeypatch.setattr(cloud_uplinks, "dial_first", recording_dial)
        allowed = [
            "mirror.eu.svc.example.com:443",
            "x.y:443",
            "p.q.svc.cluster.local:443",
            "mirror.ap:443",
        ]
        async with tunnel_env(tmp_path, uplinks={"test": allowed}) as env:
            edge = await env.add_edge(
                {SVC: f"127.0.0.1:{echo}"},
                wait_for=SVC,
                uplinks={
                    "127.0.0.1:0": "mirror.eu.svc.example.com:443",
                    "127.0.0.2:0": "X.Y.svc.cluster.local.:443",
                    "127.0.0.3:0": "p.q:443",
                    "127.0.0.4:0": "mirror.eu:443",  # not listed: another host
                    "127.0.0.5:0": "mirror.ap.svc.example.com:443",  # nor is this one
                },
                uplink_proxy={"listen": "127.0.0.1:0"},
            )
            assert await echo_once(listener(edge, "127.0.0.1:0"), b"eu") == b"eu"
            assert asked == [["mirror.eu.svc.example.com:443"]]
            assert await echo_once(listener(edge, "127.0.0.2:0"), b"xy") == b"xy"
            assert asked[-1] == ["x.y.svc.cluster.local:443"]  # matched x.y:443
            assert await echo_once(listener(edge, "127.0.0.3:0"), b"pq") == b"pq"
            assert asked[-1] == ["p.q:443"]  # matched p.q.svc.cluster.local:443
            assert await refused_locally(listener(edge, "127.0.0.4:0")) == "reset"
            assert await refused_locally(listener(edge, "127.0.0.5:0")) == "reset"
            assert len(asked) == 3  # the refused ones were never dialled
            # the edge's CONNECT proxy sends the target as written too
            assert edge.uplinks.proxy_port
            status, _head, s = await connect(
                edge.uplinks.proxy_port, "Mirror.EU.svc.example.com:443"
            )
            async with s:
                assert status == 200
                await s.send_all(b"via proxy")
                await s.send_eof()
                assert await read_all(s) == b"via proxy"
            assert asked[-1] == ["mirror.eu.svc.example.com:443"]
            status, _head, s = await connect(edge.uplinks.proxy_port, "mirror.eu:443")
            await s.aclose()
            assert status == 403
            assert len(asked) == 4
            m = await metrics_of(env.ports.admin)
            assert metric(m, "kins_tunnel_uplink_refusals_total", reason="not_allowed") == 3
            assert metric(m, "kins_tunnel_uplinks_total") == 4
        n.cancel_scope.cancel()
