"""The tunnel port's handshake slots on a link with a real round trip (`cloud.admission`): a slot
covers the replica's work up to its flight, not the wait for the edge's answer, so the rate at
which a replica takes edges back is not capped at `max_concurrent_handshakes / RTT`.

Real edges (`edge.agent.Edge`, each with a certificate of its own) dial the cloud through a relay
that delays each direction by 50 ms (`testing.linkrelay`). On the virtual clock the round trips
are exact and the CPU the handshakes take is not counted, so the bound depends on the admission
rule alone, not on how loaded the machine is."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from kins_tunnel.config import edge_config_from_dict
from kins_tunnel.edge.agent import Edge
from kins_tunnel.testing.linkrelay import LinkRelay
from kins_tunnel.testing.support import metric_value, wait_until
from tests.e2e.harness import SVC, edge_dict, make_certs, tunnel_env

ONE_WAY = 0.05  # seconds each way: a 100 ms round trip
EDGES = 40
SLOTS = 4


async def test_handshake_slots_are_not_held_across_the_edges_round_trip(
    tmp_path: Path, virtual_clock: trio.testing.MockClock
) -> None:
    """40 edges, 4 slots, 100 ms RTT: with a slot held until the edge's second flight came back
    the cloud could finish at most 4 handshakes per round trip, so the last edge needed at least
    40 / 4 × 0.1 s = 1 s; now every server flight goes out at once and all 40 are up within a few
    round trips (TLS, then the HELLO exchange)."""
    async with tunnel_env(
        tmp_path,
        tunnel={"max_concurrent_handshakes": SLOTS, "max_tunnels_per_identity": EDGES},
    ) as env:
        assert env.nursery is not None
        relay = LinkRelay(env.ports.tunnel, delay=ONE_WAY)
        relay_port = await env.nursery.start(relay.serve)
        nodes = tuple(("test", f"rtt{i}") for i in range(EDGES))
        make_certs(env.base, nodes)
        t0 = trio.current_time()
        for _, node in nodes:
            cfg = edge_config_from_dict(
                edge_dict(env.certs, [relay_port], {SVC: "127.0.0.1:1"}, node),
                base_dir=env.base,
            )
            edge = Edge(cfg)
            await env.nursery.start(edge.run)
            env.edges.append(edge)
        await wait_until(lambda: len(env.cloud.registry) == EDGES, 10, "every edge routed")
        took = trio.current_time() - t0
        print(
            f"\nFIGURE {EDGES} edges, {SLOTS} slots, RTT {2 * ONE_WAY:g} s: all up in {took:.2f} s"
        )
        # the old bound: EDGES / SLOTS round trips with the slots full
        assert took < 0.5 * EDGES / SLOTS * 2 * ONE_WAY, took
        m = env.cloud.metrics
        full = metric_value(m, "kins_tunnel_tunnel_tls_handshakes_total", kind="full")
        assert full == EDGES  # each edge once: none refused, timed out or displaced
        assert env.cloud.tunnels.admission.pending == 0
        assert env.cloud.tunnels.admission.busy_slots == 0
