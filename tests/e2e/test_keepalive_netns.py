"""An idle tunnel whose path dies is still dropped within about `ping_timeout`, by the kernel.

An idle tunnel pings only every `idle_ping_interval` (60 s here); what notices a dead path in
between is TCP keepalive, tuned to `ping_interval` / `ping_timeout` (`transport.keepalive`). To
show that with real processes, the path must die without either kernel knowing (no FIN, no RST, no
ICMP): tunnel-cloud and tunnel-edge run in network namespaces of their own, joined through a third
one that routes between them; cutting the path makes that router drop every packet it forwards
(a `tbf` qdisc whose bucket is smaller than any packet: loss in the middle of the network, as when
an edge's uplink goes away). Both ends must drop the tunnel within a few seconds of
`ping_timeout`, with the kernel's "timed out" as the reason, long before the idle PINGs (which
would take the idle timeout, 62 s) could.

Needs root (namespaces, veth pairs); skipped elsewhere with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from kins_tunnel.certs.directory import init_ca
from tests.e2e.harness import cloud_dict, edge_dict, make_certs, write_yaml

IP = shutil.which("ip")
PING_INTERVAL, PING_TIMEOUT, IDLE_PING_INTERVAL = 1, 3, 60  # idle timeout: 3 + 59 = 62 s
CLOUD_ADDR, EDGE_ADDR = "10.203.0.1", "10.203.0.6"

pytestmark = pytest.mark.skipif(
    IP is None or os.geteuid() != 0, reason="needs root and iproute2 (network namespaces)"
)


def _ip(*args: str) -> None:
    assert IP is not None
    subprocess.run([IP, *args], check=True, capture_output=True, timeout=10)


@contextmanager
def three_namespaces() -> Iterator[tuple[str, str, str]]:
    """cloud <-> router <-> edge: /30 links, routes through the router; removed at the end."""
    tag = f"kt{os.getpid() % 100000}"
    cloud, router, edge = f"{tag}c", f"{tag}r", f"{tag}e"
    try:
        for ns in (cloud, router, edge):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", f"{tag}c0", "netns", cloud, "type", "veth", "peer", "name", f"{tag}r0",
            "netns", router)  # fmt: skip
        _ip("link", "add", f"{tag}r1", "netns", router, "type", "veth", "peer", "name", f"{tag}e0",
            "netns", edge)  # fmt: skip
        for ns, dev, addr in (
            (cloud, f"{tag}c0", f"{CLOUD_ADDR}/30"),
            (router, f"{tag}r0", "10.203.0.2/30"),
            (router, f"{tag}r1", "10.203.0.5/30"),
            (edge, f"{tag}e0", f"{EDGE_ADDR}/30"),
        ):
            _ip("-n", ns, "addr", "add", addr, "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", cloud, "route", "add", "10.203.0.4/30", "via", "10.203.0.2")
        _ip("-n", edge, "route", "add", "10.203.0.0/30", "via", "10.203.0.5")
        subprocess.run(
            [IP or "ip", "netns", "exec", router, "sh", "-c",
             "echo 1 > /proc/sys/net/ipv4/ip_forward"],
            check=True, timeout=10,
        )  # fmt: skip
        yield cloud, router, edge
    finally:
        for ns in (cloud, router, edge):
            subprocess.run([IP or "ip", "netns", "del", ns], capture_output=True, timeout=10)


def _spawn(ns: str, kind: str, config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [IP or "ip", "netns", "exec", ns, sys.executable, "-m", "kins_tunnel", kind,
             "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip


def _line(log: Path, needle: str) -> str | None:
    for line in log.read_text(errors="replace").splitlines():
        if needle in line:
            return line
    return None


async def _wait_line(log: Path, needle: str, timeout: float) -> str:
    """The first line of `log` with `needle`, once there is one."""
    with trio.fail_after(timeout):
        while (line := _line(log, needle)) is None:
            await trio.sleep(0.05)
    return line


async def test_an_idle_tunnel_on_a_dead_path_is_dropped_by_keepalive(tmp_path: Path) -> None:
    init_ca(tmp_path / "certs", cloud_sans=(CLOUD_ADDR,))  # the edge checks the address it dials
    certs = make_certs(tmp_path)
    timers = {
        "ping_interval": PING_INTERVAL,
        "ping_timeout": PING_TIMEOUT,
        "idle_ping_interval": IDLE_PING_INTERVAL,
    }
    cloud_cfg = write_yaml(
        tmp_path / "cloud.yaml",
        cloud_dict(certs, tunnel={"listen": f"{CLOUD_ADDR}:9000", **timers}),
    )
    edge_doc = edge_dict(
        certs, [f"{CLOUD_ADDR}:9000"], {"test-svc-kins.kins-system:443": "127.0.0.1:6443"}
    )
    edge_doc.update(timers)
    edge_doc["admin"] = None
    edge_cfg = write_yaml(tmp_path / "edge.yaml", edge_doc)
    cloud_log, edge_log = tmp_path / "cloud.log", tmp_path / "edge.log"
    procs: list[subprocess.Popen[bytes]] = []
    with three_namespaces() as (cloud_ns, router_ns, edge_ns):
        try:
            procs.append(_spawn(cloud_ns, "cloud", cloud_cfg, cloud_log))
            procs.append(_spawn(edge_ns, "edge", edge_cfg, edge_log))
            await _wait_line(cloud_log, "edge connected", 30)
            await _wait_line(edge_log, "tunnel up", 30)
            # idle for twice the ping timeout: the probes keep it, nothing is dropped
            await trio.sleep(2 * PING_TIMEOUT)
            assert _line(cloud_log, "edge disconnected") is None, cloud_log.read_text()
            assert _line(edge_log, "tunnel down") is None, edge_log.read_text()
            tag = router_ns[:-1]
            for dev in (f"{tag}r0", f"{tag}r1"):  # every forwarded packet dropped from now on
                _ip("netns", "exec", router_ns, "tc", "qdisc", "replace", "dev", dev, "root",
                    "tbf", "rate", "8kbit", "burst", "10", "limit", "1")  # fmt: skip
            cut = time.monotonic()
            cloud_line = await _wait_line(cloud_log, "edge disconnected", 30)
            cloud_s = time.monotonic() - cut
            edge_line = await _wait_line(edge_log, "tunnel down", 30)
            edge_s = time.monotonic() - cut  # at most: it may have come before the cloud's
            for took, line in ((cloud_s, cloud_line), (edge_s, edge_line)):
                assert took <= PING_TIMEOUT + 3, (took, line)  # not the 62 s of the idle PINGs
                assert "timed out" in line.lower() and "ping timeout" not in line, line
            for p in procs:
                assert p.poll() is None, "a process died"
        finally:
            for p in procs:
                p.kill()
                p.wait(10)
