"""Edge hardening, through real tunnel-cloud and tunnel-edge processes on 127.0.0.1: ordinary
refusals are warnings with a reason (never internal errors), a GOAWAY does not park the edge,
a flood at the edge's admin port leaves the tunnel up."""

from __future__ import annotations

import contextlib
import resource
import signal
import socket
import time
from pathlib import Path
from typing import Any

import trio
import yaml

from kins_tunnel.testing.linkrelay import LinkRelay
from kins_tunnel.testing.support import echo_roundtrip, http_get
from tests.e2e import faultkit as fk
from tests.e2e.harness import SVC, serve_echo
from tests.test_observability import samples, value

EDGE_FAST: dict[str, Any] = {
    "reconnect": {"initial": 0.05, "max": 0.2},
    "handshake_timeout": 2.0,
}


async def edge_metrics(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    status, body = await http_get(port, "/metrics")
    assert status == 200, body
    return samples(body)


async def test_a_revoked_edge_retries_with_a_warning_not_an_internal_error(
    tmp_path: Path,
) -> None:
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("test/edge1\n")
    with fk.procs(tmp_path) as ps:
        cloud = ps.cloud(tunnel={"revoked_file": str(revoked)})
        await fk.wait_cloud_up(cloud)
        edge = ps.edge(cloud.tunnel, {SVC: "127.0.0.1:9"}, **EDGE_FAST)
        assert edge.admin is not None
        port = edge.admin

        async def refused_thrice() -> bool:
            m = await edge_metrics(port)
            return sum(v for _, v in m.get("kins_tunnel_handshake_failures_total", [])) >= 3

        await fk.wait_until(refused_thrice, 20, "three refused tunnel set-ups")
        m = await edge_metrics(port)
        assert value(m, "kins_tunnel_internal_errors_total", where="edge_tunnel") == 0
        assert value(m, "kins_tunnel_handshake_failures_total", reason="refused") >= 3
        assert not [
            v
            for lab, v in m.get("kins_tunnel_handshake_failures_total", [])
            if lab["reason"] != "refused"
        ]
        text = edge.log.read_text()
        assert "Traceback" not in text and "ERROR" not in text, text[-3000:]
        assert "tunnel to cloud failed" in text


async def test_a_goaway_makes_the_edge_dial_a_replacement_at_once_and_close_the_old_tunnel(
    tmp_path: Path,
) -> None:
    """One `cloud:` address (a NodePort in front of the replicas: a relay here) and a rolling
    restart: replica A is told to stop (SIGTERM: GOAWAY, then it waits up to its 60 s drain for a
    stream held open through it, answering pings all along) and the address now leads to B. The
    edge must be on B at once, not after A's drain, and must close its tunnel to A after its own
    drain_timeout (3 s) although A would keep it for 60 s."""
    with fk.procs(tmp_path) as ps:
        a = ps.cloud("a", tunnel={"drain_timeout": 60.0, "ping_interval": 0.5})
        b = ps.cloud("b")
        async with trio.open_nursery() as n:
            echo = await n.start(serve_echo)
            relay = LinkRelay(a.tunnel)
            await n.start(relay.serve)
            await fk.wait_cloud_up(a)
            await fk.wait_cloud_up(b)
            edge = ps.edge(
                f"127.0.0.1:{relay.port}",
                {SVC: f"127.0.0.1:{echo}"},
                drain_timeout=3.0,
                reconnect={"initial": 0.05, "max": 1.0},
            )
            await fk.wait_edges(a, 1)
            status, _, held = await fk.connect(a.proxy, SVC)
            assert status == 200
            async with held:
                await echo_roundtrip(held, b"before")
                relay.upstream = b.tunnel  # the address leads to the new replica
                a.signal(signal.SIGTERM)
                t0 = time.monotonic()
                await fk.wait_edges(b, 1, timeout=10)
                replaced = time.monotonic() - t0
                fk.figure("edge on the new replica after GOAWAY", replaced, "s")
                assert replaced < 2.0, replaced
                await echo_roundtrip(held, b"draining")
                tunnels = (await fk.edge_status(edge))["tunnels"]
                assert sorted(t["draining"] for t in tunnels) == [False, True], (
                    tunnels
                )  # the old tunnel still carries its stream
                assert await fk.connect_status(b.proxy, SVC) == 200
                how, _ = await fk.read_until_end(held, 10)
                closed = time.monotonic() - t0
            fk.figure("draining tunnel closed by the edge after", closed, "s")
            assert 2.5 <= closed < 6.0, (how, closed)
            n.cancel_scope.cancel()


async def test_a_flood_at_the_edge_admin_port_leaves_the_tunnel_working(tmp_path: Path) -> None:
    """600 idle connections at the admin port of an edge whose open-file limit is 256: the admin
    listener serves at most `admin.max_connections` of them and closes the rest at accept, so the
    edge keeps descriptors to dial its targets and the tunnel carries CONNECTs all along."""
    with fk.procs(tmp_path) as ps:
        cloud = ps.cloud()
        async with trio.open_nursery() as n:
            echo = await n.start(serve_echo)
            await fk.wait_cloud_up(cloud)
            edge = ps.edge(
                cloud.tunnel,
                {SVC: f"127.0.0.1:{echo}"},
                max_tunnels=1,
                mux={"max_streams": 16},
                start=False,
                **EDGE_FAST,
            )
            assert edge.admin is not None
            config = yaml.safe_load(edge.config.read_text())
            config["admin"].update(max_connections=16, idle_timeout=2.0)
            edge.config.write_text(yaml.safe_dump(config))
            edge.start()
            resource.prlimit(edge.pid, resource.RLIMIT_NOFILE, (256, 256))
            await fk.wait_edges(cloud, 1)
            flood: list[socket.socket] = []
            try:
                for _ in range(600):
                    sock = socket.socket()
                    sock.setblocking(False)
                    with contextlib.suppress(BlockingIOError):
                        sock.connect(("127.0.0.1", edge.admin))
                    flood.append(sock)
                await trio.sleep(0.5)  # the edge accepts what it can
                fds = fk.fd_count(edge.pid)
                fk.figure("edge descriptors with 600 connections at its admin port", fds)
                assert fds < 200, fds
                for i in range(5):
                    status, _, s = await fk.connect(cloud.proxy, SVC)
                    async with s:
                        assert status == 200, i
                        await echo_roundtrip(s, b"during the flood")
            finally:
                for sock in flood:
                    sock.close()
            m = await edge_metrics(edge.admin)
            assert (
                value(
                    m,
                    "kins_tunnel_listener_limits_total",
                    listener="admin",
                    reason="max_connections",
                )
                > 0
            )
            assert value(m, "kins_tunnel_internal_errors_total", where="admin") == 0
            n.cancel_scope.cancel()
