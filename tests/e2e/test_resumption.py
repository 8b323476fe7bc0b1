"""Reconnect storms, end to end on real TLS: a returning edge resumes its session (TLS 1.3 ticket)
and its identity, revocation and certificate dates are still checked; a shed connection is told
when to come back, and the edge waits that long (with jitter). The ticket key comes from
`tunnel.session_ticket_key_file` (shared across restarts) or is random per cloud process, never
from the cloud's TLS key."""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from kins_tunnel.certs.directory import init_ca, issue_edge
from kins_tunnel.cloud.server import Cloud
from kins_tunnel.config import cloud_config_from_dict, edge_config_from_dict
from kins_tunnel.edge.agent import Edge
from kins_tunnel.errors import UserError
from kins_tunnel.testing.support import free_port, wait_until
from kins_tunnel.tls_tickets import derive_ticket_key, write_secret
from kins_tunnel.transport.refusal import encode_refusal, parse_refusal
from tests.e2e.harness import cloud_dict, edge_dict, make_certs

SVC = "svc.test:80"


def _count(proc: Cloud | Edge, name: str, **labels: str) -> float:
    return proc.metrics.registry.get_sample_value(name, labels) or 0.0


def _handshakes(proc: Cloud | Edge, kind: str) -> float:
    return _count(proc, "kins_tunnel_tunnel_tls_handshakes_total", kind=kind)


def _refused(cloud: Cloud, reason: str) -> float:
    return _count(cloud, "kins_tunnel_handshake_failures_total", reason=reason)


async def _restarts(
    tmp_path: Path,
    certs: Path,
    runs: int,
    before_run: Callable[[int], None] = lambda i: None,
    node: str = "edge1",
    **tunnel: Any,
) -> list[Cloud]:
    """One real edge; a cloud started `runs` times on the same port (each start a restart), each
    run lasting until the edge's tunnel is up or the cloud refused it. `before_run(i)` runs first.
    Every cloud reads the same `tunnel.session_ticket_key_file` unless `tunnel` says otherwise."""
    port = free_port()
    if "session_ticket_key_file" not in tunnel:
        tunnel["session_ticket_key_file"] = str(_ticket_key_file(tmp_path))
    elif tunnel["session_ticket_key_file"] is None:
        del tunnel["session_ticket_key_file"]

    def cloud_cfg() -> Any:
        over = {"listen": f"127.0.0.1:{port}", **tunnel}
        return cloud_config_from_dict(cloud_dict(certs, tunnel=over), base_dir=tmp_path)

    edge_cfg = edge_dict(
        certs, [port], {SVC: "127.0.0.1:1"}, node, reconnect={"initial": 0.05, "max": 0.2}
    )
    edge = Edge(edge_config_from_dict(edge_cfg, base_dir=tmp_path))
    clouds = []
    async with trio.open_nursery() as n:
        await n.start(edge.run)
        for i in range(runs):
            before_run(i)
            cloud = Cloud(cloud_cfg())
            clouds.append(cloud)
            async with trio.open_nursery() as cn:
                await cn.start(cloud.run)
                await wait_until(
                    lambda: (
                        len(cloud.registry) == 1
                        or _refused(cloud, "revoked") + _refused(cloud, "expired") > 0
                    ),
                    10,
                    "the edge in, or refused",
                )
                await trio.sleep(0.3)  # the edge has read the cloud's ticket (with its HELLO)
                cn.cancel_scope.cancel()
            await wait_until(lambda: not edge.sessions, 5, "the edge saw the cloud go")
        n.cancel_scope.cancel()
    return clouds


def _ticket_key_file(tmp_path: Path) -> Path:
    path = tmp_path / "ticket.key"
    if not path.exists():
        write_secret(path)
    return path


async def test_a_returning_edge_resumes_across_cloud_restarts(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    first, *restarted = await _restarts(tmp_path, certs, 3)
    assert _handshakes(first, "full") == 1 and _handshakes(first, "resumed") == 0
    for cloud in restarted:  # a new cloud each time: the shared key file survives restarts
        assert _handshakes(cloud, "resumed") == 1 and _handshakes(cloud, "full") == 0


async def test_without_a_ticket_key_file_a_restart_means_a_full_handshake(tmp_path: Path) -> None:
    """No key file: each cloud process draws its own ticket key, so the edge's ticket from the
    previous process is refused and it makes a full handshake (and gets in)."""
    certs = make_certs(tmp_path)
    clouds = await _restarts(tmp_path, certs, 3, session_ticket_key_file=None)
    for cloud in clouds:
        assert _handshakes(cloud, "full") == 1 and _handshakes(cloud, "resumed") == 0


async def _cuttable_relay(nursery: trio.Nursery, port: int) -> tuple[int, Callable[[], None]]:
    """A TCP relay to 127.0.0.1:`port` on a port of its own, and a function that drops every
    connection it carries (the network cutting the tunnel, the cloud process staying up)."""
    live: list[trio.CancelScope] = []

    async def relay(down: trio.SocketStream) -> None:
        async with down, await trio.open_tcp_stream("127.0.0.1", port) as up:
            with trio.CancelScope() as scope:
                live.append(scope)
                async with trio.open_nursery() as pair:

                    async def pump(a: trio.SocketStream, b: trio.SocketStream) -> None:
                        while data := await a.receive_some(65536):
                            await b.send_all(data)
                        pair.cancel_scope.cancel()

                    pair.start_soon(pump, down, up)
                    pair.start_soon(pump, up, down)

    def cut() -> None:
        for scope in live:
            scope.cancel()

    (listener,) = await nursery.start(functools.partial(trio.serve_tcp, relay, 0, host="127.0.0.1"))
    return listener.socket.getsockname()[1], cut


async def _cut_and_come_back(tmp_path: Path, tunnel: dict[str, Any], between: Any) -> Cloud:
    """One cloud process, one edge through a cuttable relay: the edge connects (and gets its
    ticket), `between(cloud)` runs, the tunnel is cut, and the edge comes back to the same cloud."""
    certs = make_certs(tmp_path)
    cloud = Cloud(cloud_config_from_dict(cloud_dict(certs, tunnel=tunnel), base_dir=tmp_path))
    async with trio.open_nursery() as n:
        ports = await n.start(cloud.run)
        relay_port, cut = await _cuttable_relay(n, ports.tunnel)
        edge_cfg = edge_dict(certs, [relay_port], {SVC: "127.0.0.1:1"})
        edge = Edge(edge_config_from_dict(edge_cfg, base_dir=tmp_path))
        await n.start(edge.run)
        await wait_until(lambda: len(cloud.registry) == 1, 10, "edge in")
        await trio.sleep(0.3)  # the edge has read the cloud's ticket
        await between(cloud)
        cut()
        await wait_until(
            lambda: _handshakes(cloud, "full") + _handshakes(cloud, "resumed") == 2,
            10,
            "the edge's second handshake",
        )
        await wait_until(lambda: len(cloud.registry) == 1, 10, "edge back in")
        n.cancel_scope.cancel()
    return cloud


async def test_without_a_key_file_a_dropped_tunnel_resumes_on_the_same_process(
    tmp_path: Path,
) -> None:
    async def nothing(cloud: Cloud) -> None:
        assert cloud.cfg.tunnel.session_ticket_key_file is None

    cloud = await _cut_and_come_back(tmp_path, {}, nothing)
    assert _handshakes(cloud, "full") == 1 and _handshakes(cloud, "resumed") == 1


async def test_a_rotated_key_file_is_re_read_and_ends_the_old_tickets(tmp_path: Path) -> None:
    """The running cloud re-reads a new ticket key file (as it does its certificates, before a
    new handshake, at most once a second): an edge holding a ticket under the old key makes a full
    handshake."""
    key_file = _ticket_key_file(tmp_path)

    async def rotate(cloud: Cloud) -> None:
        write_secret(key_file)
        await trio.sleep(1.1)  # past the watcher's one look a second

    cloud = await _cut_and_come_back(tmp_path, {"session_ticket_key_file": str(key_file)}, rotate)
    assert _handshakes(cloud, "full") == 2 and _handshakes(cloud, "resumed") == 0
    assert cloud.tls.reloads == 1


async def test_identity_on_a_resumed_session_comes_from_the_certificate(tmp_path: Path) -> None:
    certs = make_certs(tmp_path, (("test", "edge1"),))
    identities: list[tuple[str, str, bool]] = []
    port = free_port()
    over = {"listen": f"127.0.0.1:{port}", "session_ticket_key_file": "ticket.key"}
    write_secret(tmp_path / "ticket.key")
    cfg = cloud_config_from_dict(cloud_dict(certs, tunnel=over), base_dir=tmp_path)
    edge_cfg = edge_dict(
        certs, [port], {SVC: "127.0.0.1:1"}, reconnect={"initial": 0.05, "max": 0.2}
    )
    edge = Edge(edge_config_from_dict(edge_cfg, base_dir=tmp_path))
    async with trio.open_nursery() as n:
        await n.start(edge.run)
        for _ in range(2):
            cloud = Cloud(cfg)
            async with trio.open_nursery() as cn:
                await cn.start(cloud.run)
                await wait_until(lambda: len(cloud.registry) == 1, 10, "edge in")
                await trio.sleep(0.3)
                (tunnel,) = list(cloud.registry)
                resumed = _handshakes(cloud, "resumed") == 1
                identities.append((tunnel.identity.unit, tunnel.identity.node, resumed))
                cn.cancel_scope.cancel()
            await wait_until(lambda: not edge.sessions, 5, "the edge saw the cloud go")
        n.cancel_scope.cancel()
    assert identities == [("test", "edge1", False), ("test", "edge1", True)]


async def test_a_revoked_edge_cannot_get_back_in_by_resuming(tmp_path: Path) -> None:
    certs = make_certs(tmp_path, (("test", "edge1"),))
    revoked = tmp_path / "revoked"
    revoked.write_text("")

    def revoke(i: int) -> None:
        if i == 1:  # revoked while the edge holds a ticket issued before
            revoked.write_text("test/edge1\n")

    first, second = await _restarts(tmp_path, certs, 2, revoke, revoked_file=str(revoked))
    assert _handshakes(first, "full") == 1
    # the edge did resume (the ticket was good), and was refused all the same
    assert _handshakes(second, "resumed") >= 1
    assert _refused(second, "revoked") >= 1
    assert len(second.registry) == 0


async def test_an_edge_whose_certificate_expired_since_its_ticket_cannot_resume(
    tmp_path: Path,
) -> None:
    certs = tmp_path / "certs"
    init_ca(certs)
    # valid for the next 2 seconds only: good for the first handshake, expired at the second
    now = dt.datetime.now(dt.UTC)
    issue_edge(certs, "test", "short", days=1, _now=now - dt.timedelta(days=1, seconds=-2))

    def wait_for_expiry(i: int) -> None:
        if i == 1:
            import time

            time.sleep(max(0.0, 2.5 - (dt.datetime.now(dt.UTC) - now).total_seconds()))

    first, second = await _restarts(tmp_path, certs, 2, wait_for_expiry, node="short")
    assert _handshakes(first, "full") == 1
    assert _handshakes(second, "resumed") >= 1  # the ticket itself was still good
    assert _refused(second, "expired") >= 1
    assert len(second.registry) == 0


def test_the_ticket_key_changes_with_the_trusted_cas(tmp_path: Path) -> None:
    """A ticket issued while another CA bundle was trusted does not decrypt any more."""
    certs = make_certs(tmp_path)
    secret = bytes(range(32))
    ca = (certs / "ca.crt").read_bytes()
    assert derive_ticket_key(secret, ca) == derive_ticket_key(secret, ca)
    assert derive_ticket_key(secret, ca) != derive_ticket_key(secret, ca + b"\n")
    assert derive_ticket_key(secret, ca) != derive_ticket_key(bytes(32), ca)
    assert len(derive_ticket_key(secret, ca)) == 80


async def test_a_connection_shed_before_tls_is_told_when_to_come_back(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    cfg = cloud_config_from_dict(
        cloud_dict(certs, tunnel={"max_pending_handshakes": 1}), base_dir=tmp_path
    )
    cloud = Cloud(cfg)
    async with trio.open_nursery() as n:
        ports = await n.start(cloud.run)
        silent = await trio.open_tcp_stream("127.0.0.1", ports.tunnel)
        await trio.sleep(0.2)  # accepted and pending (no byte yet)
        newcomer = await trio.open_tcp_stream("127.0.0.1", ports.tunnel)  # sheds the oldest
        got = b""
        with trio.fail_after(5):
            while chunk := await silent.receive_some(1024):
                got += chunk
        hint = parse_refusal(got)
        assert hint is not None and 1.0 <= hint <= 60.0, got
        assert _refused(cloud, "shed") == 1
        await silent.aclose()
        await newcomer.aclose()
        n.cancel_scope.cancel()


async def test_the_edge_waits_as_long_as_the_shedding_cloud_says(tmp_path: Path) -> None:
    """A stand-in cloud sheds every connection with a 1 s hint; the edge's backoff alone would
    retry within milliseconds (initial 0.01 s): its attempts come 1 to 1.5 s apart."""
    certs = make_certs(tmp_path)
    arrivals: list[float] = []

    async def shed(stream: trio.SocketStream) -> None:
        arrivals.append(trio.current_time())
        await stream.receive_some(4096)  # the ClientHello
        await stream.send_all(encode_refusal(1.0))
        await stream.aclose()

    async with trio.open_nursery() as n:
        listeners = await n.start(trio.serve_tcp, shed, 0)
        port = listeners[0].socket.getsockname()[1]
        cfg = edge_dict(
            certs, [port], {SVC: "127.0.0.1:1"}, reconnect={"initial": 0.01, "max": 10.0}
        )
        edge = Edge(edge_config_from_dict(cfg, base_dir=tmp_path))
        await n.start(edge.run)
        await wait_until(lambda: len(arrivals) >= 4, 10, "four attempts")
        n.cancel_scope.cancel()
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert all(0.95 <= g <= 1.5 + 0.3 for g in gaps), gaps
    assert _count(edge, "kins_tunnel_handshake_failures_total", reason="shed") >= 3


async def test_without_session_tickets_every_handshake_is_full(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    clouds = await _restarts(tmp_path, certs, 2, session_tickets=False)
    for cloud in clouds:
        assert _handshakes(cloud, "full") == 1 and _handshakes(cloud, "resumed") == 0


def test_session_lifetime_is_bounded_by_tls13(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    with pytest.raises(UserError, match="tunnel.session_lifetime: must be at most 604800"):
        cloud_config_from_dict(
            cloud_dict(certs, tunnel={"session_lifetime": 604801}), base_dir=tmp_path
        )
