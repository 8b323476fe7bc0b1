"""Logs cannot be forged or flooded by peers: real cloud (trio tasks) on 127.0.0.1, real clients
and a hand-driven edge over real TLS, the cloud's real log handler in the plain format."""

from __future__ import annotations

import io
from contextlib import AbstractContextManager
from pathlib import Path

import trio

from kins_tunnel.logs import PlainFormatter
from kins_tunnel.proto import Hello, MuxConfig
from kins_tunnel.proto.frames import FrameType, frame
from kins_tunnel.proto.handshake import encode_hello
from kins_tunnel.testing.support import wait_until
from tests.e2e.harness import tunnel_env
from tests.e2e.rawpeer import RawPeer
from tests.e2e.test_isolation import metrics_of, raw_edge_context
from tests.test_observability import captured_log, value

FORGED = "evil\n2026-12-07 00:00:00,000 INFO    kins_tunnel.cloud: edge connected unit=prod"


def plain_log() -> AbstractContextManager[io.StringIO]:
    return captured_log(PlainFormatter())


async def test_a_hello_agent_and_names_with_newlines_cannot_forge_log_lines(tmp_path: Path) -> None:
    with plain_log() as buf:
        async with tunnel_env(tmp_path) as env:
            peer = await RawPeer.connect(env.ports.tunnel, raw_edge_context(env.certs))
            hello = Hello(names=("fuzz1:22", "x\n" + FORGED[:40] + ":22"), agent=FORGED)
            await peer.send(frame(FrameType.HELLO, 0, encode_hello(hello, MuxConfig())))
            await peer.wait_for(FrameType.HELLO)
            await wait_until(lambda: "edge connected" in buf.getvalue(), 10, "logged")
            await peer.aclose()
    lines = buf.getvalue().splitlines()
    assert not any(line.startswith("2026-12-07 00:00:00,000") for line in lines), lines
    connected = [line for line in lines if "edge connected" in line and "unit=fuzz" in line]
    assert len(connected) == 1 and "evil\\n2026" in connected[0], lines


async def _close_without_request(port: int, source: str) -> None:
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    sock.close()  # a FIN, no request


async def test_connections_closed_before_a_request_are_counted_and_logged_within_a_budget(
    tmp_path: Path,
) -> None:
    with plain_log() as buf:
        async with tunnel_env(tmp_path) as env:
            for _ in range(200):
                await _close_without_request(env.ports.proxy, "127.0.0.1")
            await _close_without_request(env.ports.proxy, "127.0.0.2")  # another source
            m = {}

            async def all_counted() -> bool:
                nonlocal m
                m = await metrics_of(env.ports.admin)
                return value(m, "kins_tunnel_proxy_early_closes_total", reason="closed") >= 201

            with trio.fail_after(10):
                while not await all_counted():
                    await trio.sleep(0.05)
            assert value(m, "kins_tunnel_proxy_early_closes_total", reason="closed") == 201
    refused = [line for line in buf.getvalue().splitlines() if "CONNECT refused" in line]
    from_flood = [line for line in refused if "client=127.0.0.1:" in line]
    from_other = [line for line in refused if "client=127.0.0.2:" in line]
    assert 1 <= len(from_flood) <= 15, len(from_flood)  # 5 a second from one source
    assert len(from_other) == 1  # the flood did not crowd the other source out
