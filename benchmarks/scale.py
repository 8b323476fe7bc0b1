"""Scale axis: one tunnel-cloud process holding N idle edge tunnels (default 10,000).

    python -m benchmarks.scale [--edges 10000] [--workers 4]

Edges are simulated by a lightweight client (this file, `worker` mode): real TCP, real mutual TLS
with an edge certificate, the real protocol handshake (HELLO both ways, `kins_tunnel.proto`), and
then idle, answering the cloud's pings. They are spread over several worker processes (the
open-file limit here is 20,000 per process). Reported: time until the cloud reports all N tunnels
(from its /metrics), the cloud's RSS then (VmRSS from /proc), and RSS per tunnel.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import trio
import trio.lowlevel

from kins_tunnel.certs.directory import init_ca, issue_edge
from kins_tunnel.proto import Connection, Hello, RemoteProtocolError, Role
from kins_tunnel.testing.support import free_port, rss_kib
from kins_tunnel.tls_contexts import client_ssl_context


async def _one_edge(port: int, ctx: object, connected: list[int], stop: trio.Event) -> None:
    """One simulated edge: connect, handshake, idle answering pings; reconnect if dropped."""
    import random

    while not stop.is_set():
        counted = False
        try:
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            stream = trio.SSLStream(tcp, ctx, server_hostname="localhost")  # type: ignore[arg-type]
            conn = Connection(Role.CLIENT, Hello(names=("scale-svc-kins.kins-system:443",)))
            try:
                await stream.send_all(bytes(conn.data_to_send()))
                while not stop.is_set():
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    conn.receive_data(data)
                    if not counted and conn.is_open:
                        connected[0] += 1
                        counted = True
                    out = conn.data_to_send()
                    if out:
                        await stream.send_all(bytes(out))
            finally:
                await trio.aclose_forcefully(stream)
        except (trio.BrokenResourceError, OSError, RemoteProtocolError):
            pass
        if counted:
            connected[0] -= 1
        connected[1] += 1  # attempts that ended (refused, timed out, dropped)
        await trio.sleep(random.uniform(0.1, 1.0))


async def _worker(port: int, n: int, certs: Path, node: str, hold: float, report: Path) -> None:
    ctx = client_ssl_context(
        certs / "ca.crt", certs / f"edge-{node}.crt", certs / f"edge-{node}.key"
    )
    connected = [0, 0]  # tunnels up now, attempts that ended
    stop = trio.Event()

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(_one_edge, port, ctx, connected, stop)
            if i % 64 == 63:
                await trio.lowlevel.checkpoint()
        with trio.move_on_after(hold):
            while True:
                report.write_text(f"{connected[0]} {connected[1]}")
                await trio.sleep(0.2)
        stop.set()
        nursery.cancel_scope.cancel()


def scrape(admin: int) -> str:
    """The cloud's /metrics text."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=30) as r:
        return str(r.read().decode())


def metric_values(text: str, name: str, label: str | None = None) -> dict[str, float]:
    """Samples of metric `name` in `text`, keyed by the value of `label` ("" without one)."""
    out: dict[str, float] = {}
    for m in re.finditer(rf"^{name}(?:{{([^}}]*)}})? ([0-9.e+-]+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        out[labels.get(label, "") if label else ""] = float(m.group(2))
    return out


def fleet_certs(base: Path) -> Path:
    """BASE/certs: a CA, the cloud's certificate and the one edge certificate (unit "scale", node
    "edge1") that every simulated edge presents."""
    certs = base / "certs"
    init_ca(certs)
    issue_edge(certs, "scale", "edge1")
    return certs


def cloud_process(
    base: Path,
    certs: Path,
    tport: int,
    aport: int,
    edges: int,
    *,
    wait: bool = True,
    tunnel: dict[str, object] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a tunnel-cloud for `edges` simulated edges (one identity) on ports `tport` (tunnel)
    and `aport` (admin); `tunnel` adds keys to its `tunnel:` section. With `wait`, returns once
    it is ready (/readyz)."""
    config = base / "cloud.yaml"
    config.write_text(
        json.dumps(
            {
                # the simulated edges share one certificate, so one identity
                "tunnel": {
                    "listen": f"127.0.0.1:{tport}",
                    "max_tunnels_per_identity": edges,
                    **(tunnel or {}),
                },
                "proxy": {"listen": f"127.0.0.1:{free_port()}"},
                "admin": {"listen": f"127.0.0.1:{aport}"},
                "log": {"level": "error"},
                "tls": {
                    "ca": str(certs / "ca.crt"),
                    "cert": str(certs / "cloud.crt"),
                    "key": str(certs / "cloud.key"),
                },
            }
        )
    )
    cloud = subprocess.Popen(
        [sys.executable, "-m", "kins_tunnel", "cloud", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while wait:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{aport}/readyz", timeout=1).read()
            break
        except OSError:
            if time.monotonic() > deadline:
                cloud.kill()
                cloud.wait()
                raise RuntimeError("cloud did not start") from None
            time.sleep(0.1)
    return cloud


def run(edges: int, workers: int, timeout: float = 600) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="kins-scale-") as tmp:
        base = Path(tmp)
        certs = fleet_certs(base)
        tport, aport = free_port(), free_port()
        procs: list[subprocess.Popen[bytes]] = []
        try:
            cloud = cloud_process(base, certs, tport, aport, edges)
            procs.append(cloud)
            rss_before = rss_kib(cloud.pid) / 1024
            per = [edges // workers + (1 if i < edges % workers else 0) for i in range(workers)]
            t0 = time.monotonic()
            reports = [base / f"worker-{i}.count" for i in range(len(per))]
            for n, report in zip(per, reports, strict=True):
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "benchmarks.scale",
                            "worker",
                            str(tport),
                            str(n),
                            str(certs),
                            str(timeout),
                            str(report),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            # The workers count completed protocol handshakes (the cloud answered HELLO, so it
            # holds the session); scraping the cloud's per-tunnel metrics while it accepts would
            # cost it more than the handshakes, so it is asked once, at the end.
            done = retries = 0
            while time.monotonic() - t0 < timeout:
                counts = [r.read_text().split() for r in reports if r.exists()]
                counts = [c for c in counts if len(c) == 2]
                done = sum(int(c[0]) for c in counts)
                retries = sum(int(c[1]) for c in counts)
                if done >= edges:
                    break
                time.sleep(0.1)
            accept_s = time.monotonic() - t0
            time.sleep(2)
            seen = metric_values(scrape(aport), "kins_tunnel_tunnels").get("", 0.0)
            rss = rss_kib(cloud.pid) / 1024
            return {
                "edges": seen,
                "handshakes_retried": retries,
                "accept_seconds": round(accept_s, 1),
                "cloud_rss_mib": round(rss, 1),
                "cloud_rss_before_mib": round(rss_before, 1),
                "kib_per_tunnel": round((rss - rss_before) * 1024 / max(seen, 1), 1),
            }
        finally:
            for p in procs:
                p.send_signal(signal.SIGKILL)
            for p in procs:
                p.wait()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        port, n, certs, hold = (
            int(sys.argv[2]),
            int(sys.argv[3]),
            Path(sys.argv[4]),
            float(sys.argv[5]),
        )
        trio.run(_worker, port, n, certs, "edge1", hold, Path(sys.argv[6]))
        return
    if "--storm" in sys.argv[1:]:  # the reconnect storm (benchmarks.storm)
        from benchmarks.storm import main as storm_main

        storm_main()
        return
    # SIGTERM (e.g. from `timeout`) unwinds through run()'s clean-up like Ctrl-C does
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edges", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()
    print(json.dumps(run(args.edges, args.workers)))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
