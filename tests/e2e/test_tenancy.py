"""Tenancy on one shared cloud: an edge certificate of one unit reaches only that unit's names.

Real cloud and edges (trio tasks) on 127.0.0.1 over real mutual TLS; hand-driven edges
(`RawPeer`) where a test needs a certificate that `kins-tunnel certs edge` would not issue (it
refuses reserved node names), forged here with the tunnel CA itself: the cloud must refuse such an
identity whatever CA issued it. The targets are marker servers (test doubles) that say which
unit's edge dialled them.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kins_tunnel.certs.directory import init_ca, issue_edge
from kins_tunnel.certs.identity import edge_identity_uri, reserved_node
from kins_tunnel.certs.signing import Leaf, issue_leaf, load_ca, utcnow
from kins_tunnel.cloud.server import Cloud
from kins_tunnel.config import edge_config_from_dict
from kins_tunnel.edge.agent import Edge
from kins_tunnel.errors import UserError
from kins_tunnel.proto.frames import FrameType
from kins_tunnel.testing.support import http_get, read_all, wait_until
from kins_tunnel.tls_contexts import client_ssl_context
from tests.e2e.harness import connect, edge_dict, serve_loopback, tunnel_env
from tests.e2e.rawpeer import RawPeer, hello_frame
from tests.e2e.test_isolation import metrics_of
from tests.test_observability import value

SVC_A = "a-svc-kins.kins-system:443"


def marker(text: bytes) -> Callable[[trio.SocketStream], Awaitable[None]]:
    async def handler(stream: trio.SocketStream) -> None:
        await stream.send_all(text)

    return handler


def forge_edge_cert(certs: Path, unit: str, node: str, name: str) -> tuple[Path, Path]:
    """An edge certificate for (unit, node) signed by the tunnel CA, issued without the checks of
    `certs edge` (as an old release, or another tool, could have issued it)."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
            x509.NameAttribute(NameOID.COMMON_NAME, node[:64]),
        ]
    )
    uri = x509.UniformResourceIdentifier(edge_identity_uri(unit, node))
    forged = Leaf(subject, [uri], [ExtendedKeyUsageOID.CLIENT_AUTH])
    return issue_leaf(load_ca(certs), certs / f"forged-{name}", forged, utcnow(), 30)


async def raw_edge(
    port: int, certs: Path, paths: tuple[Path, Path], names: tuple[str, ...]
) -> RawPeer:
    """A hand-driven edge that has sent its HELLO (whether the cloud took it or not)."""
    peer = await RawPeer.connect(port, client_ssl_context(certs / "ca.crt", *paths))
    try:
        await peer.send(hello_frame(names))
    except trio.BrokenResourceError:
        pass  # refused at once: the test looks at what the cloud routes
    return peer


async def read_or_eof(peer: RawPeer) -> tuple[int, int, int, bytes] | None:
    try:
        return await peer.read_frame()
    except trio.BrokenResourceError:
        return None


async def read_marker(proxy_port: int, target: str) -> bytes:
    status, head, stream = await connect(proxy_port, target)
    async with stream:
        assert status == 200, head
        with trio.fail_after(10):
            return await read_all(stream)


async def status_doc(cloud_admin: int) -> dict[str, Any]:
    code, body = await http_get(cloud_admin, "/status")
    assert code == 200
    doc: dict[str, Any] = json.loads(body)
    return doc


# --------------------------------------------------------------------- reserved node names
@pytest.mark.parametrize(
    "node",
    [
        "a-svc-kins.kins-system",
        "a-svc-kins.kins-system.svc.cluster.local",
        "a-svc-kins",
        "api.default.svc",
        "api.default.svc.example.org",
    ],
)
def test_certs_edge_refuses_a_node_name_that_reads_as_a_service(tmp_path: Path, node: str) -> None:
    init_ca(tmp_path)
    with pytest.raises(UserError, match="reserved"):
        issue_edge(tmp_path, "b", node)
    assert not (tmp_path / f"edge-{node}.crt").exists()


@pytest.mark.parametrize("node", ["edge1", "edge1.site-a", "edge1.unit-b", "svc.a.b", "a.svc"])
def test_dotted_node_names_that_are_not_service_names_stay_allowed(
    tmp_path: Path, node: str
) -> None:
    assert reserved_node(node) is None
    init_ca(tmp_path)
    issue_edge(tmp_path, "b", node)


@pytest.mark.parametrize(
    "node", ["a-svc-kins.kins-system", "a-svc-kins.kins-system.svc.cluster.local"]
)
async def test_an_impostor_edge_of_another_unit_cannot_serve_a_units_k3s_name(
    tmp_path: Path, node: str
) -> None:
    async with tunnel_env(tmp_path) as env, trio.open_nursery() as nursery:
        port_a = await nursery.start(serve_loopback, marker(b"unit-a"))
        await env.add_edge({SVC_A: f"127.0.0.1:{port_a}"}, node="a1", unit="a", wait_for=SVC_A)
        forged = forge_edge_cert(env.certs, "b", node, "impostor")
        impostor = await raw_edge(env.ports.tunnel, env.certs, forged, (SVC_A,))
        try:
            with trio.fail_after(10):  # the cloud closes the tunnel without a HELLO back
                while (f := await read_or_eof(impostor)) is not None:
                    assert f[0] != FrameType.HELLO, "the cloud accepted a reserved node name"
        finally:
            await impostor.aclose()
        m = await metrics_of(env.ports.admin)
        assert value(m, "kins_tunnel_handshake_failures_total", reason="reserved_name") == 1
        assert {t.identity.unit for t in env.cloud.registry.candidates(SVC_A)} == {"a"}
        for _ in range(10):  # every CONNECT for unit a reaches unit a's edge
            assert await read_marker(env.ports.proxy, SVC_A) == b"unit-a"
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------- one node, one unit
def unit_b_certs(env_certs: Path, base: Path) -> Path:
    """A second directory with the same CA, so that unit b can have a node named like a's."""
    other = base / "certs-b"
    other.mkdir()
    for f in ("ca.crt", "ca.key"):
        shutil.copy(env_certs / f, other / f)
    return other


async def test_a_node_name_held_by_one_unit_is_refused_to_another(tmp_path: Path) -> None:
    async with tunnel_env(tmp_path) as env, trio.open_nursery() as nursery:
        port_a = await nursery.start(serve_loopback, marker(b"unit-a"))
        port_b = await nursery.start(serve_loopback, marker(b"unit-b"))
        # unit "test" (the environment's own certificate for edge1) plays unit a
        cfg_a = edge_config_from_dict(
            edge_dict(env.certs, [env.ports.tunnel], {"edge1:7000": f"127.0.0.1:{port_a}"}),
            base_dir=tmp_path,
        )
        edge_a_scope = trio.CancelScope()

        async def run_edge_a() -> None:
            with edge_a_scope:
                await Edge(cfg_a).run()

        nursery.start_soon(run_edge_a)
        await wait_until(lambda: env.cloud.registry.serves("edge1:7000"), 10, "edge a routed")

        certs_b = unit_b_certs(env.certs, tmp_path)
        issue_edge(certs_b, "b", "edge1")
        cfg_b = edge_config_from_dict(
            edge_dict(
                certs_b,
                [env.ports.tunnel],
                {"edge1:7000": f"127.0.0.1:{port_b}"},
                tls={
                    "ca": str(certs_b / "ca.crt"),
                    "cert": str(certs_b / "edge-edge1.crt"),
                    "key": str(certs_b / "edge-edge1.key"),
                },
            ),
            base_dir=tmp_path,
        )
        await nursery.start(Edge(cfg_b).run)

        async def refused() -> bool:
            m = await metrics_of(env.ports.admin)
            return value(m, "kins_tunnel_handshake_failures_total", reason="node_taken") >= 1

        with trio.fail_after(10):
            while not await refused():
                await trio.sleep(0.05)
        doc = await status_doc(env.ports.admin)
        seen = [(r["unit"], r["node"], r["reason"]) for r in doc["refused_tunnels"]]
        assert ("b", "edge1", "node_taken") in seen
        assert {(e["unit"], e["node"]) for e in doc["edges"]} == {("test", "edge1")}
        for _ in range(10):
            assert await read_marker(env.ports.proxy, "edge1:7000") == b"unit-a"

        edge_a_scope.cancel()  # unit a's edge goes away: the node name is free again
        await wait_until(
            lambda: {t.identity.unit for t in env.cloud.registry.candidates("edge1:7000")} == {"b"},
            15,
            "unit b's edge took the free node name",
        )
        assert await read_marker(env.ports.proxy, "edge1:7000") == b"unit-b"
        nursery.cancel_scope.cancel()


async def test_a_new_tunnel_past_the_identity_limit_displaces_the_oldest(tmp_path: Path) -> None:
    async with tunnel_env(tmp_path, tunnel={"max_tunnels_per_identity": 2}) as env:
        issue_edge(env.certs, "test", "edge7")
        paths = (env.certs / "edge-edge7.crt", env.certs / "edge-edge7.key")
        peers = []
        for _ in range(3):
            peer = await raw_edge(env.ports.tunnel, env.certs, paths, ("edge7:22",))
            await peer.wait_for(FrameType.HELLO)
            peers.append(peer)
            n = len(peers)
            await wait_until(
                lambda: (
                    env.cloud.registry.serves("edge7:22")
                    and sum(1 for t in env.cloud.registry if t.identity.node == "edge7")
                    == min(n, 2)
                ),
                10,
                "tunnels routed",
            )
        first = peers[0]
        with trio.fail_after(10):  # the oldest is told (GOAWAY) and closed
            while await read_or_eof(first) is not None:
                pass
        assert len([t for t in env.cloud.registry if t.identity.node == "edge7"]) == 2
        m = await metrics_of(env.ports.admin)
        assert value(m, "kins_tunnel_tunnels_displaced_total") == 1
        for peer in peers:
            await peer.aclose()


# --------------------------------------------------------------------- random identities
UNITS = ("a", "b", "c")
NODE_POOL = (
    "edge1",
    "edge1.site-a",
    "edge2",
    "a-svc-kins.kins-system",
    "b-svc-kins.kins-system.svc.cluster.local",
    "x.kins-system.svc",
    "edge1.a",
)


def random_names(rng: random.Random) -> tuple[str, ...]:
    pool = [f"{u}-svc-kins.kins-system:443" for u in UNITS]
    pool += [f"{u}-svc-kins.kins-system.svc.cluster.local:443" for u in UNITS]
    pool += [f"{n}:{p}" for n in NODE_POOL for p in (22, 443)]
    pool += ["A-SVC-KINS.KINS-SYSTEM:443", "edge1.:22", "edge1:022"]
    return tuple(rng.sample(pool, rng.randint(1, 6)))


async def test_random_identities_from_random_edges_never_route_a_name_to_another_unit(
    tmp_path: Path,
) -> None:
    """Seeded rounds of edges with random (unit, node) pairs from a pool with duplicates, dotted
    and service-like names, each advertising random names of every unit, connect at once over
    real TLS; whatever the cloud accepts, every routed name leads to edges of one unit, a unit's
    service name only to that unit, and a node name only to that node."""
    rng = random.Random(20261207)
    async with tunnel_env(tmp_path) as env:
        for round_ in range(3):
            peers: list[RawPeer] = []
            for i in range(8):
                unit, node = rng.choice(UNITS), rng.choice(NODE_POOL)
                paths = forge_edge_cert(env.certs, unit, node, f"r{round_}-{i}")
                peers.append(await raw_edge(env.ports.tunnel, env.certs, paths, random_names(rng)))
            await trio.sleep(0.5)  # every peer's HELLO handled (accepted or refused)
            check_registry(env.cloud)
            for peer in peers:
                await peer.aclose()
            await wait_until(lambda: len(env.cloud.registry) == 0, 10, "tunnels gone")


def check_registry(cloud: Cloud) -> None:
    routed = 0
    nodes: dict[str, set[str]] = {}
    for tunnel in cloud.registry:
        nodes.setdefault(tunnel.identity.node, set()).add(tunnel.identity.unit)
        for name in tunnel.names:
            routed += 1
            host = name.rpartition(":")[0]
            units = {t.identity.unit for t in cloud.registry.candidates(name)}
            assert len(units) <= 1, (name, units)
            if host.endswith("-svc-kins.kins-system"):
                assert host == f"{tunnel.identity.unit}-svc-kins.kins-system", name
            else:
                assert host == tunnel.identity.node, name
                assert reserved_node(host) is None, name
    assert all(len(units) == 1 for units in nodes.values()), nodes
    assert routed > 0  # the seed gives accepted tunnels, not only refusals
