"""Hostile or broken input on both cloud ports, against one in-process cloud with a normal edge that
must keep serving throughout: random bytes and malformed requests on the proxy port, slowloris, a
flood of idle connections; non-TLS, certificate-less, foreign-CA and expired clients on the tunnel
port, and an edge advertising names that are not its own."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kins_tunnel.certs.directory import init_ca, issue_edge
from kins_tunnel.testing.support import read_all, wait_until
from kins_tunnel.tls_contexts import client_ssl_context
from tests.e2e.faultkit import connect, figure
from tests.e2e.harness import SVC, TunnelEnv, keep_echoing, serve_echo, slowloris, tunnel_env

ANSWERS = {200, 400, 405, 407, 408, 431, 502, 503, 504}


@asynccontextmanager
async def watched_env(
    tmp_path: Path, **cloud_over: Any
) -> AsyncIterator[tuple[TunnelEnv, dict[str, int]]]:
    """A cloud and a normal edge, plus a task doing an echo through it every 50 ms."""
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        async with tunnel_env(tmp_path, {SVC: f"127.0.0.1:{echo}"}, **cloud_over) as env:
            counts = {"ok": 0, "failed": 0, "paused": 0}
            n.start_soon(keep_echoing, env.ports.proxy, counts)
            yield env, counts
            ok = counts["ok"]  # at least one check after whatever the test did
            await wait_until(
                lambda: counts["ok"] > ok or counts["failed"] > 0, 10, "one more echo round trip"
            )
            assert counts["failed"] == 0, counts
            assert counts["ok"] >= 1, counts
        n.cancel_scope.cancel()


def _answer(data: bytes) -> int:
    if not data.startswith(b"HTTP/1.1 "):
        return 0
    try:
        return int(data[9:12])
    except ValueError:
        return 0


# ---------------------------------------------------------------- proxy port
async def test_random_bytes_on_the_proxy_port(tmp_path: Path) -> None:
    async with watched_env(tmp_path, proxy={"header_timeout": 2.0}) as (env, counts):
        port = env.ports.proxy
        seen: list[int] = []

        @settings(
            max_examples=50,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(
            st.one_of(
                st.binary(max_size=4096),
                st.binary(max_size=512).map(lambda b: b"CONNECT " + b),
                st.binary(max_size=512).map(
                    lambda b: b"CONNECT " + SVC.encode() + b" HTTP/1.1\r\n" + b
                ),
                st.text(max_size=300).map(
                    lambda t: ("CONNECT " + t + " HTTP/1.1\r\n\r\n").encode("utf-8", "replace")
                ),
            )
        )
        def fuzz(data: bytes) -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                try:
                    c.sendall(data)
                    c.shutdown(socket.SHUT_WR)
                except OSError:
                    pass  # the proxy may already have answered and closed
                answer = b""
                t0 = time.monotonic()
                try:
                    while True:
                        chunk = c.recv(65536)
                        if not chunk:
                            break
                        answer += chunk
                except ConnectionResetError:
                    pass
                assert time.monotonic() - t0 < 4.5, "the proxy kept the connection open"
            status = _answer(answer)
            seen.append(status)
            assert status in ANSWERS or (status == 0 and answer == b""), answer[:200]

        await trio.to_thread.run_sync(fuzz)
        figure("fuzz: answers seen", str({s: seen.count(s) for s in sorted(set(seen))}))
        assert len(seen) >= 50
        status, head, s = await connect(env.ports.proxy, SVC)
        await s.aclose()
        assert status == 200, head


async def test_malformed_and_oversized_requests(tmp_path: Path) -> None:
    async def exchange(data: bytes) -> bytes:
        s = await trio.open_tcp_stream("127.0.0.1", env.ports.proxy)
        async with s:
            with trio.fail_after(5):
                try:
                    await s.send_all(data)
                except trio.BrokenResourceError:
                    pass
                try:
                    return await read_all(s)  # the proxy answers and closes
                except trio.BrokenResourceError:
                    return b""

    async with watched_env(tmp_path) as (env, _counts):
        answer = await exchange(
            b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n"
        )  # absolute-form proxying
        assert _answer(answer) == 405, answer
        answer = await exchange(b"CONNECT http://x/ HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _answer(answer) == 400 and b"bad target" in answer, answer
        answer = await exchange(b"CONNECT " + b"a" * 40_000 + b".kins-system:443 HTTP/1.1\r\n\r\n")
        assert _answer(answer) in (400, 431, 414), answer[:100]
        many = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 100) for i in range(400))  # ~45 KiB
        answer = await exchange(b"CONNECT " + SVC.encode() + b" HTTP/1.1\r\n" + many + b"\r\n")
        assert _answer(answer) in (400, 431), answer[:100]
        answer = await exchange(b"CONNECT " + SVC.encode() + b" HTTP/1.1\r\nBad Header\r\n\r\n")
        assert _answer(answer) == 400, answer
        answer = await exchange(b"CONNECT " + SVC.encode() + b" HTTP/9.9\r\n\r\n")
        assert _answer(answer) == 400 and b"HTTP version" in answer, answer
        answer = await exchange(b"\x00" * 100 + b"\r\n\r\n")
        assert _answer(answer) == 400, answer


async def test_header_slowloris_gets_408_at_the_deadline(
    tmp_path: Path, virtual_clock: trio.testing.MockClock
) -> None:
    """While normal traffic goes on (on the virtual clock: the bounds are exact)."""
    async with watched_env(tmp_path, proxy={"header_timeout": 1.0}) as (env, _counts):
        request = b"CONNECT " + SVC.encode() + b" HTTP/1.1\r\nX-Slow: " + b"z" * 1000
        t0 = trio.current_time()
        with trio.fail_after(5):
            answer = await slowloris(
                env.ports.proxy, request
            )  # one byte every 20 ms: never done in time
        took = trio.current_time() - t0
        figure("slowloris: answered and closed after (header_timeout 1 s, virtual)", took, "s")
        assert _answer(answer) == 408, answer
        # answered at the deadline, then closed after at most the 1 s lingering drain
        assert 1.0 <= took <= 1.0 + 1.0 + 0.05, took


async def test_idle_connection_flood_over_max_connections(tmp_path: Path) -> None:
    async with watched_env(tmp_path, proxy={"max_connections": 20, "header_timeout": 30.0}) as (
        env,
        counts,
    ):
        idle: list[trio.SocketStream] = []
        counts["paused"] = 1  # the watcher's CONNECTs would take slots too
        try:
            await wait_until(
                lambda: not env.cloud.proxy.active, 10, "no CONNECT client left in the proxy"
            )
            for _ in range(20):
                idle.append(await trio.open_tcp_stream("127.0.0.1", env.ports.proxy))
            await wait_until(
                lambda: env.cloud.proxy.active >= 20, 10, "the 20 idle clients held by the proxy"
            )
            with trio.fail_after(10):
                answers = []
                for _ in range(5):  # over the limit: 503 at once, then close
                    async with await trio.open_tcp_stream("127.0.0.1", env.ports.proxy) as x:
                        await x.send_eof()  # so the proxy's lingering close ends at once
                        answers.append(await read_all(x))
                assert [_answer(a) for a in answers] == [503] * 5, answers
                assert b"too many client connections" in answers[0]
                assert int(env.cloud.proxy.active) == 20
        finally:
            for s in idle:
                await s.aclose()
        await wait_until(
            lambda: not env.cloud.proxy.active, 5, "no CONNECT client left in the proxy"
        )
        status, head, s = await connect(env.ports.proxy, SVC)
        await s.aclose()
        assert status == 200, head
        counts["paused"] = 0  # watched_env waits for one more echo round trip at its end


# ---------------------------------------------------------------- tunnel port
async def _tls_attempt(port: int, ctx: ssl.SSLContext) -> str:
    """Try to be an edge; returns how the cloud ended it. Never "accepted"."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    s = trio.SSLStream(tcp, ctx, server_hostname="localhost")
    try:
        with trio.fail_after(5):
            await s.do_handshake()
            await s.send_all(b"\x00" * 64)  # not a HELLO either
            data = await s.receive_some(100)
            return "closed" if not data else f"data {data[:20]!r}"
    except trio.BrokenResourceError as exc:
        return f"broken: {exc.__cause__ or exc}"
    finally:
        await trio.aclose_forcefully(s)


def _failures(env: TunnelEnv) -> dict[str, float]:
    out = {}
    for metric in env.cloud.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "kins_tunnel_handshake_failures_total":
                out[sample.labels["reason"]] = sample.value
    return out


async def test_tunnel_port_rejects_bad_clients(tmp_path: Path) -> None:
    async with watched_env(tmp_path, tunnel={"handshake_timeout": 2.0}) as (env, counts):
        certs = env.certs
        port = env.ports.tunnel
        # plain bytes
        s = await trio.open_tcp_stream("127.0.0.1", port)
        async with s:
            with trio.fail_after(5):
                try:
                    await s.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    await read_all(s)
                except trio.BrokenResourceError:
                    pass
        # TLS without a client certificate
        bare = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        outcome_bare = await _tls_attempt(port, bare)
        # a certificate from another CA (claiming the normal edge's identity)
        other = tmp_path / "other-ca"
        init_ca(other)
        issue_edge(other, "test", "edge1")
        foreign = client_ssl_context(
            certs / "ca.crt", other / "edge-edge1.crt", other / "edge-edge1.key"
        )
        outcome_foreign = await _tls_attempt(port, foreign)
        # an expired certificate from the right CA
        issue_edge(
            certs, "test", "old", days=1, _now=dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
        )
        expired = client_ssl_context(
            certs / "ca.crt", certs / "edge-old.crt", certs / "edge-old.key"
        )
        outcome_expired = await _tls_attempt(port, expired)
        for name, outcome in (
            ("no cert", outcome_bare),
            ("foreign CA", outcome_foreign),
            ("expired", outcome_expired),
        ):
            figure(f"tunnel port, {name}", outcome)
            assert not outcome.startswith("data"), (name, outcome)
        assert [(t.identity.unit, t.identity.node) for t in env.cloud.registry] == [
            ("test", "edge1")
        ]
        await wait_until(
            lambda: sum(_failures(env).values()) >= 4, 3, "four handshake failures counted"
        )
        failures = _failures(env)
        figure("tunnel port: handshake failures by reason", str(failures))
        assert failures.get("not_tls", 0) >= 1
        assert failures.get("no_certificate", 0) >= 1
        assert failures.get("expired", 0) >= 1
        assert sum(failures.values()) == 4
        ok = counts["ok"]  # the watcher gets a few rounds in after the last rejection
        await wait_until(lambda: counts["ok"] >= ok + 3, 5, "three more echo round trips")


async def test_edge_advertising_other_names_serves_only_its_own(tmp_path: Path) -> None:
    async with watched_env(tmp_path) as (env, _counts):
        async with trio.open_nursery() as n:
            echo = await n.start(serve_echo)
            mine = {
                "edge3:22": f"127.0.0.1:{echo}",
                "test-svc-kins.kins-system:6443": f"127.0.0.1:{echo}",
            }
            theirs = {
                "prod-svc-kins.kins-system:443": f"127.0.0.1:{echo}",
                "edge1:22": f"127.0.0.1:{echo}",
                "kubernetes.default:443": f"127.0.0.1:{echo}",
            }
            await env.add_edge({**mine, **theirs}, node="edge3", wait_for="edge3:22")
            edge3 = [t for t in env.cloud.registry if t.identity.node == "edge3"]
            assert len(edge3) == 1 and sorted(edge3[0].names) == sorted(mine)
            for name in theirs:
                status, head, s = await connect(env.ports.proxy, name)
                await s.aclose()
                assert status == 503, (name, head)
            for name in mine:
                status, head, s = await connect(env.ports.proxy, name)
                async with s:
                    assert status == 200, (name, head)
                    await s.send_all(b"hi")
                    assert await s.receive_some(2) == b"hi"
            n.cancel_scope.cancel()
