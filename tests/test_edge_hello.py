"""The edge's HELLO exchange against clouds that misbehave (test doubles speaking real TLS with the
cloud's certificate): each failure is counted under its own reason, logged as one warning line,
and never reported as an internal error."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from kins_tunnel.config import edge_config_from_dict
from kins_tunnel.edge.agent import Edge
from kins_tunnel.logs import JSONFormatter, PlainFormatter
from kins_tunnel.proto import ErrorCode
from kins_tunnel.proto.frames import (
    HELLO_PREFIX,
    MAGIC,
    FrameType,
    frame,
    goaway_frame,
    open_frame,
    open_result_frame,
)
from kins_tunnel.testing.support import free_port, metric_value, wait_until
from kins_tunnel.tls_contexts import server_ssl_context
from tests.e2e.faultkit import read_until_end
from tests.e2e.harness import SVC, edge_dict, make_certs, serve_loopback
from tests.e2e.rawpeer import RawPeer, hello_frame
from tests.test_observability import captured_log, json_log

Behaviour = Callable[[trio.SSLStream[trio.SocketStream]], Awaitable[None]]


async def silent(tls: trio.SSLStream[trio.SocketStream]) -> None:
    await trio.sleep_forever()


async def future_version(tls: trio.SSLStream[trio.SocketStream]) -> None:
    body = b'{"max_frame": 16384, "max_streams": 4}'
    await tls.send_all(frame(FrameType.HELLO, 0, HELLO_PREFIX.pack(MAGIC, 7, 9) + body))
    await trio.sleep(5)


async def garbage(tls: trio.SSLStream[trio.SocketStream]) -> None:
    await tls.send_all(b"\xff" * 64)
    await trio.sleep(5)


async def serve_fake_cloud(
    certs: Path,
    behaviour: Behaviour,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A cloud test double on 127.0.0.1:0: TLS with the cloud's certificate from `certs`, then
    `behaviour` for each connection."""
    ctx = server_ssl_context(certs / "ca.crt", certs / "cloud.crt", certs / "cloud.key")

    async def handler(tcp: trio.SocketStream) -> None:
        tls = trio.SSLStream(tcp, ctx, server_side=True)
        await tls.do_handshake()
        await behaviour(tls)

    await serve_loopback(handler, task_status=task_status)


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [(silent, "timeout"), (future_version, "version"), (garbage, "protocol")],
)
async def test_a_failed_hello_is_counted_by_reason_not_as_an_internal_error(
    tmp_path: Path, behaviour: Behaviour, reason: str
) -> None:
    certs = make_certs(tmp_path)
    async with json_log() as buf, trio.open_nursery() as n:
        port = await n.start(serve_fake_cloud, certs, behaviour)
        doc = edge_dict(certs, [port], {SVC: "127.0.0.1:9"}, handshake_timeout=0.3)
        doc["reconnect"] = {"initial": 0.01, "max": 0.05}
        edge = Edge(edge_config_from_dict(doc, base_dir=tmp_path))
        await n.start(edge.run)
        await wait_until(
            lambda: (
                metric_value(edge.metrics, "kins_tunnel_handshake_failures_total", reason=reason)
                >= 2
            ),
            10,
            f"two set-ups failed with {reason}",
        )
        n.cancel_scope.cancel()
    assert metric_value(edge.metrics, "kins_tunnel_internal_errors_total", where="edge_tunnel") == 0
    lines = buf.getvalue().splitlines()
    assert not [line for line in lines if '"level": "error"' in line]
    assert any(
        f'"label": "{reason}"' in line and "tunnel to cloud failed" in line for line in lines
    )


# ---------------------------------------------------------------- what the cloud sends, in the log
WEIRD = "\x1b[31mred\n2026-01-01 00:00:00 ERROR forged line\u202e"


async def hostile_opens(tls: trio.SSLStream[trio.SocketStream]) -> None:
    """A cloud double: HELLO, 300 opens of a name the edge does not serve and 300 of a target it
    serves whose port is closed (streams opened in a loop), then GOAWAY with a forged reason."""
    await tls.send_all(hello_frame())
    await trio.sleep(0.2)
    for i in range(300):
        await tls.send_all(open_frame(2 + 4 * i, 65536, f"{WEIRD}{i}:22".encode()))
        await tls.send_all(open_frame(4 + 4 * i, 65536, SVC.encode()))
    await tls.send_all(goaway_frame(0, 0, WEIRD))
    await trio.sleep(30)


@pytest.mark.parametrize("formatter", [PlainFormatter, JSONFormatter])
async def test_opens_in_a_loop_are_counted_in_full_and_logged_within_a_budget_escaped(
    tmp_path: Path, formatter: type[logging.Formatter]
) -> None:
    certs = make_certs(tmp_path)
    closed = free_port()
    with captured_log(formatter()) as buf:
        async with trio.open_nursery() as n:
            port = await n.start(serve_fake_cloud, certs, hostile_opens)
            doc = edge_dict(certs, [port], {SVC: f"127.0.0.1:{closed}"})
            edge = Edge(edge_config_from_dict(doc, base_dir=tmp_path))
            t0 = trio.current_time()
            await n.start(edge.run)

            def failures(reason: str) -> float:
                return metric_value(edge.metrics, "kins_tunnel_dial_failures_total", reason=reason)

            await wait_until(
                lambda: failures("not_allowed") == 300 and failures("refused") == 300,
                20,
                "every open counted",
            )
            await wait_until(lambda: "draining" in buf.getvalue(), 10, "GOAWAY logged")
            elapsed = trio.current_time() - t0
            n.cancel_scope.cancel()
    text = buf.getvalue()
    lines = text.splitlines()
    refused = [ln for ln in lines if "open refused" in ln]
    dials = [ln for ln in lines if "dial failed" in ln]
    # 5 a second per target (each refused name is a target of its own), 20 a second in all
    assert 1 <= len(refused) + len(dials) <= 20 * (elapsed + 1), (len(refused), len(dials))
    assert 1 <= len(dials) <= 5 * (elapsed + 1), len(dials)
    assert "not_logged_before" in text
    for line in lines:  # every record one printable line: nothing forged, no terminal escapes
        assert line.isascii() and line.isprintable(), line
        assert not line.startswith("2026-01-01"), line
        if formatter is JSONFormatter:
            json.loads(line)


async def test_a_cloud_that_sends_goaway_on_every_tunnel_gets_bounded_redials(
    tmp_path: Path,
) -> None:
    """HELLO then GOAWAY at once, and the connection kept open: the edge redials (at once at most
    once per reconnect.max, else after backoff) and holds at most two tunnels to the address, the
    live one and one draining; the draining one it closes itself."""
    certs = make_certs(tmp_path)
    open_now, most, total = [0], [0], [0]

    async def goaway_at_once(tls: trio.SSLStream[trio.SocketStream]) -> None:
        total[0] += 1
        open_now[0] += 1
        most[0] = max(most[0], open_now[0])
        try:
            await tls.send_all(hello_frame() + goaway_frame(0, 0, "draining"))
            while await tls.receive_some(
                65536
            ):  # answer nothing; keep it open until the edge ends it
                pass
        finally:
            open_now[0] -= 1

    async with trio.open_nursery() as n:
        port = await n.start(serve_fake_cloud, certs, goaway_at_once)
        doc = edge_dict(certs, [port], {SVC: "127.0.0.1:9"}, drain_timeout=30.0)
        doc["reconnect"] = {"initial": 0.1, "max": 0.5}
        edge = Edge(edge_config_from_dict(doc, base_dir=tmp_path))
        await n.start(edge.run)
        await trio.sleep(3)
        n.cancel_scope.cancel()
    print(f"\nGOAWAY loop: {total[0]} tunnels in 3 s, at most {most[0]} at once")
    assert total[0] >= 3  # it did redial
    assert most[0] <= 2, most[0]  # never more than the live tunnel and one draining
    # at once at most every 0.5 s (6 in 3 s), otherwise backoff whose ceiling doubles from 0.1 s
    assert total[0] <= 40, total[0]
    assert metric_value(edge.metrics, "kins_tunnel_internal_errors_total", where="edge_tunnel") == 0


async def refuses_uplinks(tls: trio.SSLStream[trio.SocketStream]) -> None:
    """A cloud double that refuses every stream the edge opens, with a forged message."""
    peer = RawPeer(tls)
    await peer.send(hello_frame())
    while (f := await peer.read_frame()) is not None:
        ftype, _flags, sid, _payload = f
        if ftype == FrameType.OPEN:
            await peer.send(open_result_frame(sid, ErrorCode.NOT_ALLOWED, 0, WEIRD))


@pytest.mark.parametrize("formatter", [PlainFormatter, JSONFormatter])
async def test_an_uplink_refusal_message_from_the_cloud_is_logged_escaped(
    tmp_path: Path, formatter: type[logging.Formatter]
) -> None:
    certs = make_certs(tmp_path)
    with captured_log(formatter()) as buf:
        async with trio.open_nursery() as n:
            port = await n.start(serve_fake_cloud, certs, refuses_uplinks)
            doc = edge_dict(
                certs, [port], {SVC: "127.0.0.1:9"}, uplinks={"127.0.0.1:0": "registry:5000"}
            )
            edge = Edge(edge_config_from_dict(doc, base_dir=tmp_path))
            await n.start(edge.run)
            await wait_until(lambda: edge.ready, 10, "tunnel up")
            async with await trio.open_tcp_stream(
                "127.0.0.1", edge.uplinks.ports["127.0.0.1:0"]
            ) as client:
                assert (await read_until_end(client, 10))[1] == 0  # refused: reset, no byte
            await wait_until(lambda: "uplink refused" in buf.getvalue(), 10, "refusal logged")
            n.cancel_scope.cancel()
    (line,) = [ln for ln in buf.getvalue().splitlines() if "uplink refused" in ln]
    assert line.isascii() and line.isprintable(), line
    assert "forged line" in line  # the message is there, escaped
    if formatter is JSONFormatter:
        assert WEIRD in json.loads(line)["outcome"]
