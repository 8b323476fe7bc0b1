"""Interactive first on a thin link, end to end: a cloud, an edge that reaches it through a
shaped relay (`LinkRelay`: a rate, a delay, a bottleneck queue and small socket buffers), a bulk
download and pings on another stream. Checked: behaviour, not timing — the edge's pacer engages,
holds bulk data, never classifies the ping stream as bulk, every ping is answered intact; status
and metrics show it. And: `qos.enabled: false` never paces; a unit's `max_rate` caps bulk."""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from kins_tunnel.config import edge_config_from_dict
from kins_tunnel.edge.agent import Edge
from kins_tunnel.testing.linkrelay import LinkRelay
from kins_tunnel.testing.support import wait_until
from kins_tunnel.transport.session import Session
from tests.e2e.faultkit import figure
from tests.e2e.harness import (
    SVC,
    TunnelEnv,
    connect,
    echo_bytes,
    edge_dict,
    serve_loopback,
    tunnel_env,
    wait_routed,
)

Handler = Callable[[trio.SocketStream], Awaitable[None]]
SOURCE = "edge1:8080"  # the node name: a name this edge may serve
KiB = 1024


async def endless(stream: trio.SocketStream) -> None:
    """Bulk: sends until the client goes away."""
    block = bytes(64 * KiB)
    while True:
        await stream.send_all(block)


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, source: Handler, svc: Handler, **cloud_over: Any
) -> AsyncIterator[TunnelEnv]:
    """A cloud (with `cloud_over`) and an edge on loopback serving SOURCE and SVC by the two
    handlers."""
    async with trio.open_nursery() as targets:
        ports = [await targets.start(serve_loopback, handler) for handler in (source, svc)]
        services = {SOURCE: f"127.0.0.1:{ports[0]}", SVC: f"127.0.0.1:{ports[1]}"}
        async with tunnel_env(tmp_path, services, **cloud_over) as env:
            yield env
        targets.cancel_scope.cancel()


async def open_both(proxy: int) -> tuple[trio.SocketStream, trio.SocketStream]:
    """CONNECTs to SOURCE, then SVC (in this order: the edge's stream ids follow it)."""
    streams = []
    for target in (SOURCE, SVC):
        status, _, stream = await connect(proxy, target)
        assert status == 200
        streams.append(stream)
    return streams[0], streams[1]


async def drain(stream: trio.SocketStream, counted: list[int]) -> None:
    while data := await stream.receive_some(256 * KiB):
        counted[0] += len(data)


@dataclass
class ThinLinkRun:
    edge: Edge
    session: Session
    seen: dict[str, int]  # samples every 5 ms: paced, bulk held, each stream classed bulk
    rtts: list[float]
    received: int


async def thin_link_run(
    tmp_path: Path, check: Callable[[ThinLinkRun], Awaitable[None]], **edge_over: Any
) -> None:
    """A bulk download from the edge through an 8 Mbit/s, 10 ms, 256 KiB link, and 64-byte
    pings on their own stream every 50 ms; `check` runs while everything is still up."""
    async with trio.open_nursery() as targets:
        source = await targets.start(serve_loopback, endless)
        echo = await targets.start(serve_loopback, echo_bytes)
        async with tunnel_env(tmp_path) as env:
            assert env.nursery is not None
            relay = LinkRelay(
                env.ports.tunnel,
                delay=0.01,
                rate=8e6 / 8,  # 8 Mbit/s each way
                buffer=256 * KiB,  # 256 ms of queue at that rate, if the sender fills it
                sock_buffer=16 * KiB,
            )
            relay_port = await env.nursery.start(relay.serve)
            cfg = edge_config_from_dict(
                edge_dict(
                    env.certs,
                    [relay_port],
                    {SOURCE: f"127.0.0.1:{source}", SVC: f"127.0.0.1:{echo}"},
                    **edge_over,
                ),
                base_dir=tmp_path,
            )
            edge = Edge(cfg)
            await env.nursery.start(edge.run)
            await wait_routed(env.cloud, SVC)
            await wait_until(lambda: bool(edge.sessions), 10, "the edge's session")
            (session,) = edge.sessions.values()

            bulk, ping = await open_both(env.ports.proxy)
            got = [0]
            seen = {"engaged": 0, "held": 0, "ping_bulk": 0, "bulk_bulk": 0}
            rtts: list[float] = []
            async with bulk, ping, trio.open_nursery() as n:
                n.start_soon(drain, bulk, got)
                bulk_sid, ping_sid = sorted(session._streams)  # noqa: SLF001  (opened in order)

                async def watch() -> None:
                    while True:
                        st = session.statistics()
                        seen["engaged"] += st.pacing == "engaged"
                        seen["held"] += st.paced_held > 0
                        seen["ping_bulk"] += session.conn.is_bulk(ping_sid)
                        seen["bulk_bulk"] += session.conn.is_bulk(bulk_sid)
                        await trio.sleep(0.005)

                n.start_soon(watch)
                with trio.fail_after(60):
                    # until half a second was paced (or 4 s of bulk without) and 40 pings
                    t_end = trio.current_time() + 4
                    while len(rtts) < 40 or (seen["engaged"] < 100 and trio.current_time() < t_end):
                        payload = b"%08d" % len(rtts) * 8
                        t0 = trio.current_time()
                        await ping.send_all(payload)
                        echoed = b""
                        while len(echoed) < len(payload):
                            echoed += await ping.receive_some(len(payload) - len(echoed))
                        assert echoed == payload
                        rtts.append(trio.current_time() - t0)
                        await trio.sleep(0.05)
                n.cancel_scope.cancel()
            rtts.sort()
            figure("ping RTT p50 during bulk (8 Mbit/s, 10 ms, 256 KiB)", rtts[len(rtts) // 2])
            await check(ThinLinkRun(edge, session, seen, rtts, got[0]))
        targets.cancel_scope.cancel()


async def test_bulk_is_paced_and_pings_are_not_held_through_a_thin_link(tmp_path: Path) -> None:
    async def check(run: ThinLinkRun) -> None:
        seen = run.seen
        assert seen["held"] > 0  # bulk data waited for the pacer's credit
        assert seen["bulk_bulk"] > 0
        assert seen["ping_bulk"] == 0  # the ping stream was never paced
        st = run.session.statistics()
        assert st.pacing == "engaged" and st.paced_rate is not None
        assert st.queueing_delay is not None and st.base_rtt is not None
        doc = json.loads(run.edge.status()[2])
        (tunnel,) = doc["tunnels"]
        assert tunnel["pacing"] == "engaged" and tunnel["pacing_engagements"] >= 1
        assert isinstance(tunnel["queue_delay_ms"], float)
        assert tunnel["paced_rate_bps"] > 0
        metrics = run.edge.metrics.render()[2].decode()
        for name in (
            "kins_tunnel_qos_paced_rate_bytes",
            "kins_tunnel_qos_queueing_delay_seconds",
            "kins_tunnel_qos_base_rtt_seconds",
            "kins_tunnel_qos_held_bytes",
        ):
            assert f'{name}{{node="edge1",peer=' in metrics

    await thin_link_run(tmp_path, check)


async def test_pacing_off_never_holds_anything(tmp_path: Path) -> None:
    async def check(run: ThinLinkRun) -> None:
        assert run.seen["engaged"] == run.seen["held"] == 0
        st = run.session.statistics()
        assert st.pacing == "off" and st.paced_rate is None and st.pacing_engagements == 0
        # the control: without pacing the link's queue fills (a quarter second at 8 Mbit/s)
        assert run.rtts[len(run.rtts) // 2] > 0.1

    await thin_link_run(tmp_path, check, qos={"enabled": False})


async def test_a_units_max_rate_caps_bulk_towards_its_edges(tmp_path: Path) -> None:
    """`qos.units.test.max_rate` on the cloud: an upload towards the edge (loopback, no queue
    anywhere) is held to the cap, counted at the sink; a ping stream beside it is not."""
    cap = 4e6 / 8  # 4 Mbit/s
    sunk = [0]
    sink = functools.partial(drain, counted=sunk)
    async with serving(
        tmp_path, sink, echo_bytes, qos={"units": {"test": {"max_rate": "4Mbit"}}}
    ) as env:
        (tunnel,) = list(env.cloud.registry)
        up, ping = await open_both(env.ports.proxy)
        async with up, ping, trio.open_nursery() as n:

            async def upload() -> None:
                block = bytes(64 * KiB)
                while True:
                    await up.send_all(block)

            n.start_soon(upload)
            await trio.sleep(1.0)
            start, t0 = sunk[0], trio.current_time()
            with trio.fail_after(10):
                for i in range(20):  # pings pass beside the capped upload
                    await ping.send_all(b"%08d" % i)
                    echoed = b""
                    while len(echoed) < 8:
                        echoed += await ping.receive_some(8 - len(echoed))
                    assert echoed == b"%08d" % i
                    await trio.sleep(0.1)
            rate = (sunk[0] - start) / (trio.current_time() - t0)
            st = tunnel.session.statistics()
            n.cancel_scope.cancel()
        assert st.pacing == "engaged" and st.paced_rate == cap
        assert 0.5 * cap <= rate <= 1.15 * cap, rate
        figure("capped upload (4 Mbit/s cap)", rate * 8 / 1e6, "Mbit/s")


async def test_pacing_never_engages_on_loopback(tmp_path: Path) -> None:
    """A fast path: 64 MiB each way on loopback (cloud, edge, targets and client in this one
    process, so the CPU is the bottleneck, not a link): no queue builds, pacing never engages."""
    total = 64 * 1024 * 1024
    sunk = [0]
    sink = functools.partial(drain, counted=sunk)
    async with serving(tmp_path, endless, sink) as env:
        (edge,) = env.edges
        (tunnel,) = list(env.cloud.registry)
        down, up = await open_both(env.ports.proxy)
        got = 0
        block = bytes(256 * KiB)
        with trio.fail_after(120):
            async with down, up:
                while got < total:
                    got += len(await down.receive_some(256 * KiB))
                for _ in range(total // len(block)):
                    await up.send_all(block)
        (session,) = edge.sessions.values()
        for side in (session.statistics(), tunnel.session.statistics()):
            assert side.pacing == "measuring" and side.pacing_engagements == 0
            assert side.queueing_delay is not None  # measured all along
