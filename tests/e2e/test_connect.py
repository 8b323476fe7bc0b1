"""CONNECT through a real cloud and edge (trio tasks on 127.0.0.1, port 0): every answer of the
design's table, half-close, and hundreds of concurrent checksummed streams."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from kins_tunnel.dial import dial_first
from kins_tunnel.edge import forwarder
from kins_tunnel.names import Address
from kins_tunnel.testing.support import free_port, read_all, wait_until
from tests.e2e.harness import SVC, connect, hanging_listener, serve_digest, serve_echo, tunnel_env


async def test_echo_through_the_tunnel(tmp_path: Path) -> None:
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        async with tunnel_env(tmp_path, {SVC: f"127.0.0.1:{echo}"}) as env:
            status, head, s = await connect(env.ports.proxy, SVC)
            assert status == 200, head
            assert b"Connection established" in head
            async with s:
                await s.send_all(b"ping")
                assert await s.receive_some(10) == b"ping"
        n.cancel_scope.cancel()


async def test_status_answers_of_the_design_table(tmp_path: Path) -> None:
    refused_port = free_port()  # nothing listens there
    with hanging_listener() as hanging:
        await _status_answers(tmp_path, refused_port, hanging)


async def _status_answers(tmp_path: Path, refused_port: int, hanging: int) -> None:
    services = {
        SVC: f"127.0.0.1:{refused_port}",
        "test-svc-kins.kins-system:6443": f"127.0.0.1:{hanging}",
        "other-svc-kins.kins-system:443": "127.0.0.1:1",  # not the edge's unit: never routed
    }
    async with tunnel_env(tmp_path, proxy={"dial_timeout": 5.0}) as env:
        await env.add_edge(services, wait_for=SVC, dial_timeout=0.5)
        cases = [
            (SVC, 502, b"refused"),
            ("test-svc-kins.kins-system:6443", 504, b"test-svc-kins.kins-system:6443"),
            ("other-svc-kins.kins-system:443", 503, b"no connected edge"),
            ("nowhere-svc-kins.kins-system:443", 503, b"no connected edge"),
            ("not-a-target", 400, b"bad target"),
            ("test-svc-kins.kins-system", 400, b"bad target"),
            ("test-svc-kins.kins-system:99999", 400, b"bad target"),
        ]
        for target, want, text in cases:
            status, head, s = await connect(env.ports.proxy, target)
            await s.aclose()
            assert status == want, (target, head)
            assert text in head, (target, head)
            assert head.count(b"\n") < 12  # one line of body
        # other methods
        s = await trio.open_tcp_stream("127.0.0.1", env.ports.proxy)
        async with s:
            await s.send_all(b"GET http://example/ HTTP/1.1\r\nHost: example\r\n\r\n")
            head = await read_all(s)
        assert head.startswith(b"HTTP/1.1 405 ") and b"Allow: CONNECT" in head.replace(
            b"allow", b"Allow"
        )
        # garbage
        s = await trio.open_tcp_stream("127.0.0.1", env.ports.proxy)
        async with s:
            await s.send_all(b"\x16\x03\x01 not http at all\r\n\r\n")
            head = await read_all(s)
        assert head.startswith(b"HTTP/1.1 400 ")
        # oversized headers
        s = await trio.open_tcp_stream("127.0.0.1", env.ports.proxy)
        async with s:
            with trio.move_on_after(5):
                try:
                    await s.send_all(
                        b"CONNECT "
                        + SVC.encode()
                        + b" HTTP/1.1\r\nX: "
                        + b"a" * 40000
                        + b"\r\n\r\n"
                    )
                except trio.BrokenResourceError:
                    pass
            head = await read_all(s)
        assert head.startswith(b"HTTP/1.1 431 ") or head.startswith(b"HTTP/1.1 400 "), head[:80]


async def test_header_deadline_closes_slow_clients(tmp_path: Path) -> None:
    async with tunnel_env(tmp_path, proxy={"header_timeout": 0.3}) as env:
        s = await trio.open_tcp_stream("127.0.0.1", env.ports.proxy)
        async with s:
            await s.send_all(
                b"CONNECT test-svc-kins.kins-system:443 HTTP/1.1\r\n"
            )  # never finishes
            with trio.fail_after(5):
                head = await read_all(s)
        assert head.startswith(b"HTTP/1.1 408 ")


async def test_auth_required_when_configured(tmp_path: Path) -> None:
    basic = tmp_path / "basic"
    basic.write_text("alice:s3cret\n")
    bearer = tmp_path / "tokens"
    bearer.write_text("tok-123\n")
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        async with tunnel_env(
            tmp_path, proxy={"auth": {"basic_file": str(basic), "bearer_file": str(bearer)}}
        ) as env:
            await env.add_edge({SVC: f"127.0.0.1:{echo}"}, wait_for=SVC)
            status, head, s = await connect(env.ports.proxy, SVC)
            await s.aclose()
            assert status == 407 and b"Proxy-Authenticate" in head.replace(
                b"proxy-authenticate", b"Proxy-Authenticate"
            )
            status, _, s = await connect(
                env.ports.proxy, SVC, "Proxy-Authorization: Basic YWxpY2U6d3Jvbmc=\r\n"
            )
            await s.aclose()
            assert status == 407
            status, _, s = await connect(
                env.ports.proxy, SVC, "Proxy-Authorization: Basic YWxpY2U6czNjcmV0\r\n"
            )
            await s.aclose()
            assert status == 200
            status, _, s = await connect(
                env.ports.proxy, SVC, "Proxy-Authorization: Bearer tok-123\r\n"
            )
            await s.aclose()
            assert status == 200
            bearer.write_text("tok-456\n")  # rotated secret: picked up without restart
            status, _, s = await connect(
                env.ports.proxy, SVC, "Proxy-Authorization: Bearer tok-123\r\n"
            )
            await s.aclose()
            assert status == 407
        n.cancel_scope.cancel()


async def test_half_close_client_gets_the_whole_response(tmp_path: Path) -> None:
    async with trio.open_nursery() as n:
        digest = await n.start(serve_digest)
        async with tunnel_env(tmp_path, {SVC: f"127.0.0.1:{digest}"}) as env:
            payload = os.urandom(3 * 1024 * 1024 + 17)
            status, _, s = await connect(env.ports.proxy, SVC)
            assert status == 200
            async with s:
                await s.send_all(payload)
                await s.send_eof()  # shut our write side; the answer must still arrive
                with trio.fail_after(20):
                    answer = await read_all(s)
            assert answer == f"{hashlib.sha256(payload).hexdigest()} {len(payload)}\n".encode()
        n.cancel_scope.cancel()


async def test_hundreds_of_concurrent_streams_checksummed(tmp_path: Path) -> None:
    count = 300
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        async with tunnel_env(tmp_path, {SVC: f"127.0.0.1:{echo}"}) as env:
            results: dict[int, bool] = {}

            async def one(i: int) -> None:
                payload = hashlib.sha256(str(i).encode()).digest() * (1000 + 37 * i)
                status, _, s = await connect(env.ports.proxy, SVC)
                assert status == 200
                async with s:
                    async with trio.open_nursery() as nn:

                        async def send() -> None:
                            await s.send_all(payload)
                            await s.send_eof()

                        nn.start_soon(send)
                        got = await read_all(s)
                results[i] = got == payload

            with trio.fail_after(120):
                async with trio.open_nursery() as nn:
                    for i in range(count):
                        nn.start_soon(one, i)
            assert len(results) == count and all(results.values())
            # every stream ended and was forgotten on both sides
            await wait_until(
                lambda: (
                    not sum(t.session.statistics().streams for t in env.cloud.registry)
                    and not sum(s.statistics().streams for s in env.edges[0].sessions.values())
                ),
                5,
                "every stream forgotten on both sides",
            )
        n.cancel_scope.cancel()


async def test_target_reset_mid_stream_resets_the_client(tmp_path: Path) -> None:
    async def rude(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        async def handler(stream: trio.SocketStream) -> None:
            await stream.send_all(b"partial")
            stream.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            await stream.aclose()  # RST

        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(handler, listeners)

    async with trio.open_nursery() as n:
        port = await n.start(rude)
        async with tunnel_env(tmp_path, {SVC: f"127.0.0.1:{port}"}) as env:
            status, _, s = await connect(env.ports.proxy, SVC)
            assert status == 200
            got = b""
            async with s:
                with trio.fail_after(5):
                    try:
                        while True:
                            chunk = await s.receive_some(100)
                            if not chunk:
                                break
                            got += chunk
                        ended = "eof"
                    except trio.BrokenResourceError:
                        ended = "reset"
            # An abortive close (RST) lets the receiving kernel drop bytes not yet read, exactly as
            # on a direct TCP connection; what did arrive is a prefix of what the target sent.
            assert b"partial".startswith(got)
            assert ended == "reset"  # a truncated stream is never passed off as a clean EOF
        n.cancel_scope.cancel()


async def test_service_with_several_addresses_fails_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An L5 unit: three K3s servers behind one name; dead ones are skipped, the live one is used."""
    dead1, dead2 = free_port(), free_port()
    orders: list[list[str]] = []  # the order in which the edge tries the addresses, dial by dial

    async def recording_dial_first(
        addrs: Sequence[Address], timeout: float
    ) -> tuple[trio.SocketStream, Address]:
        orders.append([f"{a.host}:{a.port}" for a in addrs])
        return await dial_first(addrs, timeout)

    monkeypatch.setattr(forwarder, "dial_first", recording_dial_first)
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        addrs = [f"127.0.0.1:{dead1}", f"127.0.0.1:{echo}", f"127.0.0.1:{dead2}"]
        async with tunnel_env(tmp_path, {SVC: addrs}) as env:
            for _ in range(3):
                status, head, s = await connect(env.ports.proxy, SVC)
                assert status == 200, head
                async with s:
                    await s.send_all(b"hello")
                    assert await s.receive_some(10) == b"hello"
            # the forwarder now starts with the address that worked
            assert [order[0] for order in orders] == [addrs[0], addrs[1], addrs[1]], orders
        async with tunnel_env(
            tmp_path / "all-dead", {SVC: [f"127.0.0.1:{dead1}", f"127.0.0.1:{dead2}"]}
        ) as env:
            status, head, s = await connect(env.ports.proxy, SVC)
            await s.aclose()
            assert status == 502 and b"refused" in head
        n.cancel_scope.cancel()
