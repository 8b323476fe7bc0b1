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


def _metric(admin: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=30) as r:
        text = r.read().decode()
    m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def run(edges: int, workers: int, timeout: float = 600) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="kins-scale-") as tmp:
        base = Path(tmp)
        certs = base / "certs"
        init_ca(certs)
        issue_edge(certs, "scale", "edge1")
        tport, pport, aport = free_port(), free_port(), free_port()
        (base / "cloud.yaml").write_text(
            json.dumps(
                {
                    # the simulated edges share one certificate, so one identity
                    "tunnel": {"listen": f"127.0.0.1:{tport}", "max_tunnels_per_identity": edges},
                    "proxy": {"listen": f"127.0.0.1:{pport}"},
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
        procs: list[subprocess.Popen[bytes]] = []
        try:
            cloud = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kins_tunnel",
                    "cloud",
                    "--config",
                    str(base / "cloud.yaml"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            procs.append(cloud)
            deadline = time.monotonic() + 20
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{aport}/readyz", timeout=1).read()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("cloud did not start") from None
                    time.sleep(0.1)
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
            seen = _metric(aport, "kins_tunnel_tunnels")
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
