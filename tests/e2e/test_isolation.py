"""No peer, input or setting can take a process down: regression tests, one per crash or defect
found by attacking a real cloud and edge (an edge with a valid certificate answering with codes
this version does not know, any method on the admin port, silent connections flooding the tunnel
port, a handler bug), plus the smaller promises (504 for a timed-out dial, generic 502 bodies, one
log line per CONNECT, dotted node names, exact password bytes, the ping-timeout bound).

Everything runs in-process on loopback, so a crash of the cloud or edge is an exception that fails
the test; `watched_env` keeps a normal edge serving echo traffic throughout.
"""

from __future__ import annotations

import base64
import errno
import socket
import ssl
from pathlib import Path

import pytest
import trio
import trio.testing

from kins_tunnel.certs.directory import issue_edge
from kins_tunnel.cloud import tunnel_server
from kins_tunnel.cloud.registry import Registry
from kins_tunnel.dial import code_for
from kins_tunnel.proto import ErrorCode, MuxConfig
from kins_tunnel.proto.frames import FrameType, open_result_frame, reset_frame
from kins_tunnel.testing.support import http_get, read_all, run_kins_tunnel, wait_until
from kins_tunnel.tls_contexts import client_ssl_context
from tests.e2e.harness import (
    CONNECT_LOG_FIELDS,
    SVC,
    connect,
    make_certs,
    serve_echo,
    tunnel_env,
    wait_routed,
)
from tests.e2e.rawpeer import RawPeer, hello_frame
from tests.e2e.test_bad_input import watched_env
from tests.test_observability import connect_lines, json_log, samples, value

FUZZ_SVC = "fuzz-svc-kins.kins-system:443"


def raw_edge_context(certs: Path, unit: str = "fuzz", node: str = "fuzz1") -> ssl.SSLContext:
    if not (certs / f"edge-{node}.crt").exists():
        issue_edge(certs, unit, node)
    return client_ssl_context(
        certs / "ca.crt", certs / f"edge-{node}.crt", certs / f"edge-{node}.key"
    )


async def raw_edge(port: int, certs: Path, names: tuple[str, ...] = (FUZZ_SVC,)) -> RawPeer:
    """A hand-driven edge (unit `fuzz`) that has completed TLS and HELLO."""
    peer = await RawPeer.connect(port, raw_edge_context(certs))
    await peer.send(hello_frame(names))
    await peer.wait_for(FrameType.HELLO)
    return peer


async def metrics_of(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    status, body = await http_get(port, "/metrics")
    assert status == 200
    return samples(body)


async def connect_status(proxy_port: int, target: str, headers: str = "") -> tuple[int, bytes]:
    status, head, s = await connect(proxy_port, target, headers)
    async with s:
        if status != 200:
            head += await read_all(s)
    return status, head


# ---------------------------------------------------------------- peer codes are data
@pytest.mark.parametrize("answer", ["open_result", "reset"])
async def test_unknown_error_code_from_an_edge_ends_one_connect_only(
    tmp_path: Path, answer: str
) -> None:
    """An edge answers OPEN with OPEN_RESULT code 99 (or RESET 99 on the open stream), no message:
    that CONNECT gets 502, the cloud and every other tunnel go on; the metric label is bounded."""
    async with watched_env(tmp_path) as (env, _counts):
        peer = await raw_edge(env.ports.tunnel, env.certs)
        async with trio.open_nursery() as n:
            await wait_routed(env.cloud, FUZZ_SVC)
            result: list[tuple[int, bytes]] = []

            async def client() -> None:
                result.append(await connect_status(env.ports.proxy, FUZZ_SVC))

            n.start_soon(client)
            _t, _f, sid, _p = await peer.wait_for(FrameType.OPEN)
            if answer == "open_result":
                await peer.send(open_result_frame(sid, 99, 0, ""))
            else:
                await peer.send(open_result_frame(sid, 0, 1 << 20, "") + reset_frame(sid, 99, ""))
        status, body = result[0]
        if answer == "open_result":
            assert status == 502, body
            assert b"unknown" in body
        else:  # the stream was open (200), then reset: the client's connection ends
            assert status in (200, 502), body
        m = await metrics_of(env.ports.admin)
        if answer == "open_result":
            assert value(m, "kins_tunnel_dial_failures_total", reason="unknown") == 1
        assert not any(
            lbl.get("reason") == "99" for lbl, _v in m.get("kins_tunnel_dial_failures_total", [])
        )
        # the raw edge's tunnel is still up and usable: it answers a second open normally
        async with trio.open_nursery() as n:
            n.start_soon(client)
            _t, _f, sid, _p = await peer.wait_for(FrameType.OPEN)
            await peer.send(
                open_result_frame(sid, int(ErrorCode.REFUSED), 0, "refused at 10.1.2.3:6443")
            )
        status, body = result[-1]
        assert status == 502
        assert b"10.1.2.3" not in body  # generic body: the edge's internal address stays in the log
        await peer.aclose()


async def test_a_bug_while_routing_answers_500_and_the_cloud_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handler bug injected for one target name: that CONNECT gets 500 with a one-line body,
    is counted as an internal error, logs its CONNECT line; every other CONNECT is served."""
    real = Registry.candidates

    def candidates(self: Registry, name: str) -> list[object]:
        if name.startswith("boom"):
            raise RuntimeError("injected routing bug")
        return real(self, name)  # type: ignore[return-value]

    monkeypatch.setattr(Registry, "candidates", candidates)
    async with json_log() as buf, watched_env(tmp_path) as (env, counts):
        for _ in range(3):
            status, body = await connect_status(env.ports.proxy, "boom-svc-kins.kins-system:443")
            assert status == 500, body
            assert body.rstrip().endswith(
                b"kins-tunnel: boom-svc-kins.kins-system:443: internal error in the proxy"
            )
        m = await metrics_of(env.ports.admin)
        assert value(m, "kins_tunnel_internal_errors_total", where="proxy") == 3
        assert value(m, "kins_tunnel_connect_answers_total", status="500") == 3
        before = counts["ok"]
        await wait_until(lambda: counts["ok"] >= before + 2, 10, "two more echo round trips")
    lines = [d for d in connect_lines(buf) if d["status"] == 500]
    assert len(lines) == 3 and all(d["outcome"].startswith("internal error") for d in lines)


# ---------------------------------------------------------------- limits defined once
async def test_largest_max_frame_the_config_accepts_works_with_an_edge(tmp_path: Path) -> None:
    """The bound is the core's own (16 MiB - 1): a cloud and an edge configured at it connect and
    carry data; 16 MiB itself is refused when the config is read (tests/test_config.py)."""
    big = {
        "max_frame": (1 << 24) - 1,
        "initial_window": 1 << 24,
        "max_window": 1 << 25,
        "session_budget": 1 << 26,
    }
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        async with tunnel_env(tmp_path, {SVC: f"127.0.0.1:{echo}"}, mux=big) as env:
            status, _head, s = await connect(env.ports.proxy, SVC)
            async with s:
                assert status == 200
                payload = bytes(range(256)) * 8192  # 2 MiB in one write
                await s.send_all(payload)
                got = b""
                with trio.fail_after(10):
                    while len(got) < len(payload):
                        got += await s.receive_some(1 << 20)
                assert got == payload
        n.cancel_scope.cancel()


async def test_hello_beyond_our_bounds_is_refused_and_counted(tmp_path: Path) -> None:
    """An edge whose HELLO states limits out of range (or too many names) is refused at the
    handshake with a counted reason; nothing else notices."""
    from kins_tunnel.proto.frames import HELLO_PREFIX, MAGIC, frame

    async with watched_env(tmp_path) as (env, _counts):
        bad_bodies = [
            b'{"max_frame": 16777216, "max_streams": 4}',
            b'{"max_frame": 16384, "max_streams": 4, "max_target_len": 99999}',
            b'{"max_frame": 16384, "max_streams": 0}',
            b'{"max_frame": 16384, "max_streams": 4, "names": ['
            + b",".join([b'"a:1"'] * 300)
            + b"]}",
            b'{"max_frame": "x", "max_streams": 4}',
        ]
        for body in bad_bodies:
            peer = await RawPeer.connect(env.ports.tunnel, raw_edge_context(env.certs))
            await peer.send(frame(FrameType.HELLO, 0, HELLO_PREFIX.pack(MAGIC, 1, 1) + body))
            with trio.fail_after(5):
                while await peer.read_frame() is not None:
                    pass  # the cloud answers GOAWAY and closes
            await peer.aclose()
        peer = await RawPeer.connect(env.ports.tunnel, raw_edge_context(env.certs))
        await peer.send(
            frame(
                FrameType.HELLO,
                0,
                HELLO_PREFIX.pack(MAGIC, 7, 9) + b'{"max_frame": 16384, "max_streams": 4}',
            )
        )
        with trio.fail_after(5):
            while await peer.read_frame() is not None:
                pass
        await peer.aclose()

        async def all_counted() -> bool:
            m = await metrics_of(env.ports.admin)
            return value(m, "kins_tunnel_handshake_failures_total", reason="protocol") == len(
                bad_bodies
            )

        await wait_until(all_counted, 5, "every bad HELLO counted as a protocol failure")
        m = await metrics_of(env.ports.admin)
        assert value(m, "kins_tunnel_handshake_failures_total", reason="version") == 1
        assert len(env.cloud.registry) == 1  # only the normal edge


# ---------------------------------------------------------------- admin port
METHODS = ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "PROPFIND", "X-Y"]


async def raw_exchange(port: int, request: bytes) -> bytes:
    s = await trio.open_tcp_stream("127.0.0.1", port)
    async with s:
        await s.send_all(request)
        with trio.fail_after(5):
            return await read_all(s)


async def test_admin_answers_every_method_on_every_path_and_keeps_serving(tmp_path: Path) -> None:
    """Any method other than GET/HEAD on any admin path gets 405 with `Allow` (with or without a
    body), garbage gets 400, HEAD gets headers only; both the cloud and the edge go on serving."""
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        async with tunnel_env(tmp_path) as env:
            edge = await env.add_edge(
                {SVC: f"127.0.0.1:{echo}"}, wait_for=SVC, admin={"listen": "127.0.0.1:0"}
            )
            edge_port = edge.admin_port
            assert edge_port is not None
            for port in (env.ports.admin, edge_port):
                for path in ("/healthz", "/readyz", "/metrics", "/status", "/nope"):
                    for method in METHODS:
                        for body in (b"", b"x" * 10):
                            req = (
                                f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                                + body
                            )
                            answer = await raw_exchange(port, req)
                            assert answer.startswith(b"HTTP/1.1 405 "), (method, path, answer[:100])
                            assert b"\r\nallow: GET, HEAD\r\n" in answer.lower().replace(
                                b"allow: get, head", b"allow: GET, HEAD"
                            )
                    head = await raw_exchange(
                        port, f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                    )
                    assert head.split(b"\r\n\r\n", 1)[1] == b""
                for garbage in (
                    b"\x00\x01\x02\r\n\r\n",
                    b"GET / HTTP/9.9\r\n\r\n",
                    b"G" * 10000 + b"\r\n\r\n",
                ):
                    answer = await raw_exchange(port, garbage)
                    assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:100]
                # and with real curl, as in the report
                proc = await trio.run_process(
                    [
                        "curl",
                        "-s",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                        "-X",
                        "POST",
                        f"http://127.0.0.1:{port}/healthz",
                    ],
                    capture_stdout=True,
                    check=False,
                )
                assert proc.stdout == b"405"
                status, body = await http_get(port, "/healthz")
                assert (status, body) == (200, b"ok\n")
            status, _h, s = await connect(env.ports.proxy, SVC)
            await s.aclose()
            assert status == 200
        n.cancel_scope.cancel()


# ---------------------------------------------------------------- tunnel port floods
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["silent", "slow"])
async def test_a_flood_on_the_tunnel_port_does_not_lock_a_restarting_edge_out(
    tmp_path: Path, kind: str, virtual_clock: trio.testing.MockClock
) -> None:
    """2,000 connections that never send a byte (or that send 5 bytes of a ClientHello and stall)
    hold the tunnel port while an edge (re)starts: it is serving before the flood's first deadline
    (first_byte_timeout) has let any of it go, and the flood is closed by its deadlines (first byte,
    shedding, slow-handshake displacement). On the virtual clock, so the bound is exact."""
    flood = 2000
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        async with tunnel_env(
            tmp_path, tunnel={"first_byte_timeout": 3.0, "handshake_timeout": 10.0}
        ) as env:
            socks: list[socket.socket] = []
            try:
                for _ in range(flood):
                    c = socket.socket()
                    c.setblocking(False)
                    socks.append(c)
                    try:
                        c.connect(("127.0.0.1", env.ports.tunnel))
                    except BlockingIOError:
                        pass
                await trio.sleep(0.2)
                if kind == "slow":
                    for c in socks:
                        try:
                            c.send(b"\x16\x03\x01\x02\x00")  # a TLS record header, then nothing
                        except OSError:
                            pass
                await trio.sleep(0.5)
                t0 = trio.current_time()
                await env.add_edge({SVC: f"127.0.0.1:{echo}"}, wait_for=SVC)
                took = trio.current_time() - t0
                print(f"\nFIGURE {kind} flood of {flood}: edge routed after {took:.2f} s (virtual)")
                # silent: the oldest pending is shed at once; slow: the flood never takes a
                # handshake slot (a slot is for a connection whose ClientHello record is whole),
                # so the edge's handshake starts at once; the slots themselves are bounded
                # (tests/test_admission.py). Either way, before any of the flood's own deadlines
                # (first_byte_timeout 3 s) let it go.
                assert took < (1.0 if kind == "silent" else 2.0), took
                status, _h, s = await connect(env.ports.proxy, SVC)
                await s.aclose()
                assert status == 200
                m = await metrics_of(env.ports.admin)
                refused = {
                    lbl["reason"]: v for lbl, v in m.get("kins_tunnel_handshake_failures_total", [])
                }
                print(f"FIGURE {kind} flood refusals so far: {refused}")
                if kind == "silent":  # shed silent sockets do not lengthen real edges' hints
                    assert refused.get("shed", 0) > 0, refused
                    assert env.cloud.tunnels.admission.booked == 0
            finally:
                for c in socks:
                    c.close()
            await wait_until(
                lambda: not env.cloud.tunnels.admission.pending,
                15,
                "every flood connection is let go",
            )
        n.cancel_scope.cancel()


# ---------------------------------------------------------------- liveness bound
def test_a_frozen_peer_is_dropped_after_ping_timeout_not_later(tmp_path: Path) -> None:
    """A peer that completes the handshake and then sends nothing is dropped `ping_timeout` after
    its last byte, whatever `ping_interval` (virtual clock: exact, and fast). It used to take up to
    ping_timeout + ping_interval (28.6-29.2 s with the defaults)."""
    from kins_tunnel.proto import Connection, Hello, Role
    from kins_tunnel.transport.session import Session
    from tests.transport.test_session import tls_pair

    certs = make_certs(tmp_path)

    async def main() -> float:
        stls, ctls = await tls_pair(certs)
        cloud = Session(
            stls, Connection(Role.SERVER, Hello(), MuxConfig()), ping_interval=10, ping_timeout=20
        )
        peer = Connection(Role.CLIENT, Hello(), MuxConfig())
        ctls.send_chunk(peer.data_to_send())  # HELLO, then silence: nothing more is ever sent
        async with trio.open_nursery() as n:
            n.start_soon(cloud.serve)
            await cloud.handshake_done.wait()
            last_byte = trio.current_time()
            await cloud.closed.wait()
            took = trio.current_time() - last_byte
        ctls.close()
        assert "ping timeout" in cloud.close_reason
        return took

    took = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.02))
    assert 20.0 <= took <= 20.01, took


# ---------------------------------------------------------------- smaller promises
def test_a_dial_that_times_out_in_the_kernel_is_a_504_not_a_502() -> None:
    assert code_for(TimeoutError(errno.ETIMEDOUT, "Connection timed out")) == ErrorCode.TIMEOUT
    assert code_for(OSError(errno.ETIMEDOUT, "Connection timed out")) == ErrorCode.TIMEOUT
    assert code_for(ConnectionRefusedError(errno.ECONNREFUSED, "refused")) == ErrorCode.REFUSED
    assert code_for(OSError(errno.EHOSTUNREACH, "no route")) == ErrorCode.UNREACHABLE
    assert code_for(socket.gaierror(socket.EAI_NONAME, "unknown")) == ErrorCode.UNREACHABLE


async def test_502_bodies_name_no_edge_internal_address(tmp_path: Path) -> None:
    """The edge refuses (nothing listens on its service address): the client is told the target
    refused, without the edge-internal address; the cloud's log line carries the detail."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    async with json_log() as buf, tunnel_env(tmp_path, {SVC: f"127.0.0.1:{dead_port}"}) as env:
        status, body = await connect_status(env.ports.proxy, SVC)
    assert status == 502
    assert f"127.0.0.1:{dead_port}".encode() not in body and b"127.0.0.1" not in body
    assert body.rstrip().endswith(
        f"kins-tunnel: {SVC}: the target refused the connection (refused)".encode()
    )
    line = next(d for d in connect_lines(buf) if d["status"] == 502)
    assert f"127.0.0.1:{dead_port}" in line["outcome"]


async def test_every_connect_yields_one_log_line_malformed_and_vanished_included(
    tmp_path: Path, virtual_clock: trio.testing.MockClock
) -> None:
    """On the virtual clock: the silent client's header deadline, and the 0.2 s in which no extra
    line may appear, cost no real time."""
    async with json_log() as buf, trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        async with tunnel_env(
            tmp_path, {SVC: f"127.0.0.1:{echo}"}, proxy={"header_timeout": 1.0}
        ) as env:
            port = env.ports.proxy
            await raw_exchange(port, b"CONNECT \x00\x01 HTTP/1.1\r\n\r\n")  # malformed: 400
            await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # 405
            s = await trio.open_tcp_stream("127.0.0.1", port)  # vanished before a request
            await s.aclose()
            s = await trio.open_tcp_stream("127.0.0.1", port)  # vanished mid-request
            await s.send_all(b"CONNECT " + SVC.encode())
            await s.aclose()
            s = await trio.open_tcp_stream("127.0.0.1", port)  # silent: 408
            async with s:
                with trio.fail_after(5):
                    await read_all(s)
            status, _h, s = await connect(port, SVC)  # 200
            await s.aclose()
            assert status == 200
            await wait_until(lambda: len(connect_lines(buf)) >= 6, 5, "six CONNECT log lines")
            await trio.sleep(0.2)  # and no seventh
        n.cancel_scope.cancel()
    lines = connect_lines(buf)
    assert sorted(d["status"] for d in lines) == [200, 400, 405, 408, 499, 499], lines
    for d in lines:
        assert CONNECT_LOG_FIELDS <= set(d), d
        assert d["client"].startswith("127.0.0.1:")


async def test_dotted_node_names_get_certificates_and_routes(tmp_path: Path) -> None:
    """Kubernetes node names are DNS subdomains: `certs edge --node node1.example.com` works and a
    CONNECT to `node1.example.com:22` reaches that node's edge."""
    certs = make_certs(tmp_path)
    proc = await run_kins_tunnel(
        "certs", "edge", "--dir", str(certs), "--unit", "test", "--node", "node1.example.com"
    )
    assert proc.returncode == 0, proc.stderr
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        async with tunnel_env(tmp_path) as env:
            await env.add_edge(
                {"node1.example.com:22": f"127.0.0.1:{echo}"},
                node="node1.example.com",
                wait_for="node1.example.com:22",
            )
            status, _h, s = await connect(env.ports.proxy, "Node1.Example.Com:22")
            async with s:
                assert status == 200
                await s.send_all(b"ping")
                assert await s.receive_some(4) == b"ping"
        n.cancel_scope.cancel()


async def test_a_basic_password_is_compared_byte_for_byte(tmp_path: Path) -> None:
    """A password ending in a space (or starting with one) is kept exactly as written."""
    (tmp_path / "basic").write_bytes(b"ops: lead and trail \n# a comment\nops2:plain\r\n")
    auth = {"auth": {"basic_file": str(tmp_path / "basic")}}

    def basic(cred: str) -> str:
        return f"Proxy-Authorization: Basic {base64.b64encode(cred.encode()).decode()}\r\n"

    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        async with tunnel_env(tmp_path, {SVC: f"127.0.0.1:{echo}"}, proxy=auth) as env:
            for cred, want in (
                ("ops: lead and trail ", 200),
                ("ops: lead and trail", 407),
                ("ops:lead and trail ", 407),
                ("ops2:plain", 200),
                ("ops2:plain\r", 407),
            ):
                status, _body = await connect_status(env.ports.proxy, SVC, basic(cred))
                assert status == want, (cred, status)
        n.cancel_scope.cancel()


async def test_a_bug_in_one_edge_stream_resets_that_stream_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the edge's dial for one service (injected): that CONNECT fails (502), the bug is
    counted on the edge, and the same tunnel keeps carrying the other service's streams."""
    from kins_tunnel.edge.forwarder import Forwarder

    real = Forwarder.dial

    async def dial(self: Forwarder, name: str, addrs: tuple[object, ...]) -> trio.SocketStream:
        if name.startswith("edge1:"):
            raise RuntimeError("injected dial bug")
        return await real(self, name, addrs)  # type: ignore[arg-type]

    monkeypatch.setattr(Forwarder, "dial", dial)
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        async with tunnel_env(tmp_path) as env:
            edge = await env.add_edge(
                {SVC: f"127.0.0.1:{echo}", "edge1:22": f"127.0.0.1:{echo}"}, wait_for=SVC
            )
            for _ in range(3):
                status, body = await connect_status(env.ports.proxy, "edge1:22")
                assert status == 502, body
                status, _h, s = await connect(env.ports.proxy, SVC)
                async with s:
                    assert status == 200
                    await s.send_all(b"fine")
                    assert await s.receive_some(4) == b"fine"
            assert (
                b'kins_tunnel_internal_errors_total{where="stream"} 3.0' in edge.metrics.render()[2]
            )
            assert edge.connects == 1  # one tunnel all along
        n.cancel_scope.cancel()


async def test_random_bytes_on_the_admin_port(tmp_path: Path) -> None:
    """Random and mutated requests on the admin port: each gets an answer or a close within the
    deadline, and the endpoint keeps answering GET /healthz."""
    import random

    rng = random.Random(7)
    base = b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
    async with tunnel_env(tmp_path) as env:
        port = env.ports.admin
        for _ in range(200):
            mutated = bytearray(base)
            for _ in range(rng.randrange(1, 6)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            data = rng.randbytes(rng.randrange(0, 300)) if rng.random() < 0.5 else bytes(mutated)
            s = await trio.open_tcp_stream("127.0.0.1", port)
            async with s:
                try:
                    await s.send_all(data)
                    await s.send_eof()
                    with trio.fail_after(11):
                        answer = await read_all(s)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    answer = b""
            assert answer == b"" or answer.startswith(b"HTTP/1.1 "), answer[:80]
        status, body = await http_get(port, "/healthz")
        assert (status, body) == (200, b"ok\n")


async def test_a_bug_after_a_tunnel_is_routed_leaves_no_stale_route(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the cloud between routing a tunnel and finishing its set-up (injected into the
    "edge connected" log line, once) ends that tunnel and takes its route back: the edge's next
    tunnel is the only one the registry holds, and it serves."""
    real_info = tunnel_server.log.info
    injected = [0]

    def info(msg: str, *args: object, **kwargs: object) -> None:
        if msg == "edge connected" and not injected[0]:
            injected[0] += 1
            raise RuntimeError("injected set-up bug")
        real_info(msg, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tunnel_server.log, "info", info)
    async with watched_env(tmp_path) as (env, counts):
        await wait_until(lambda: injected[0] == 1, 10, "the injected bug")
        before = counts["ok"]
        await wait_until(lambda: counts["ok"] >= before + 2, 10, "two more echo round trips")
        tunnels = list(env.cloud.registry)
        assert len(tunnels) == 1 and not tunnels[0].session.is_closed, tunnels
