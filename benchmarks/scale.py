"""Scale axis: one tunnel-cloud process holding N idle edge tunnels (default 10,000).

    python -m benchmarks.scale [--edges 10000] [--workers 4] [--settle 15] [--idle-window 30]

Edges are simulated (this file, `worker` mode) with tunnel-edge's own pieces: its TLS client
(`transport.tls_dial.connect_tls`, mutual TLS with an edge certificate) and its tunnel
(`transport.tunnel.TunnelSide`: the `Session`, its ping policy and liveness, tunnel-edge's
default `ping_interval`, `ping_timeout` and `idle_ping_interval`, the kernel's keepalive tuned to
them), idle once up. They are spread over several worker
processes (the open-file limit here is 20,000 per process). Reported: time until all N tunnels
are up, the cloud's RSS then and after the idle window (VmRSS from /proc, per tunnel above the
cloud's own before any edge), the cloud's CPU over the idle window (after `settle` seconds, so
that every tunnel's ping rhythm is in its steady state) and the load average. An idle edge pings
once per `idle_ping_interval` (60 s) and the cloud each tunnel once per 6 of them, each at its own
phase (the edges come up over the ramp): a window of 60 s counts every edge's ping once, one of
360 s the cloud's own as well (`--idle-window 360` for the figure of record).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import trio
import trio.lowlevel

from benchmarks.procs import CLK_TCK
from kins_tunnel.certs.directory import init_ca, issue_edge
from kins_tunnel.config import EdgeConfig
from kins_tunnel.proto import Hello, MuxConfig, Role
from kins_tunnel.testing.support import free_port, rss_kib
from kins_tunnel.tls_contexts import client_ssl_context
from kins_tunnel.transport import liveness
from kins_tunnel.transport.errors import HandshakeFailed
from kins_tunnel.transport.session import Session
from kins_tunnel.transport.tls import TransportError
from kins_tunnel.transport.tls_dial import connect_tls
from kins_tunnel.transport.tunnel import TunnelSide


@dataclasses.dataclass(frozen=True)
class _EdgeDefaults:
    """tunnel-edge's defaults for what a simulated edge uses."""

    ping_interval: float
    ping_timeout: float
    idle_ping_interval: float
    handshake_timeout: float


RAMP_RATE = 400.0  # edges per second coming up, over all workers (as in `benchmarks.storm`)
_EDGE = _EdgeDefaults(
    **{
        f.name: float(f.default)  # type: ignore[arg-type]
        for f in dataclasses.fields(EdgeConfig)
        if f.name in ("ping_interval", "ping_timeout", "idle_ping_interval", "handshake_timeout")
    }
)


async def _one_edge(port: int, ctx: ssl.SSLContext, connected: list[int], stop: trio.Event) -> None:
    """One simulated edge: tunnel-edge's TLS client and tunnel (`TunnelSide` with the edge's
    defaults: its `Session`, ping policy and liveness), idle until dropped; then dial again."""
    side = TunnelSide(
        Role.CLIENT,
        MuxConfig(),
        _EDGE.ping_interval,
        _EDGE.ping_timeout,
        lambda *_: None,
        idle_ping_interval=_EDGE.idle_ping_interval,
    )
    hello = Hello(names=("scale-svc-kins.kins-system:443",))

    async def up(session: Session) -> None:
        connected[0] += 1
        try:
            await session.closed.wait()
        finally:
            connected[0] -= 1

    while not stop.is_set():
        try:
            with trio.fail_after(_EDGE.handshake_timeout):
                tls = await connect_tls("127.0.0.1", port, ctx, server_hostname="localhost")
            await side.run(
                tls,
                hello,
                label="scale",
                handshake_timeout=_EDGE.handshake_timeout,
                while_up=up,
            )
        except (TransportError, HandshakeFailed, trio.TooSlowError):
            pass
        connected[1] += 1  # attempts that ended (refused, timed out, dropped)
        await trio.sleep(random.uniform(0.1, 1.0))


async def _worker(
    port: int, n: int, workers: int, certs: Path, node: str, hold: float, report: Path
) -> None:
    ctx = client_ssl_context(
        certs / "ca.crt", certs / f"edge-{node}.crt", certs / f"edge-{node}.key"
    )
    # Each simulated edge pings on its own time, as an edge on a machine of its own does: this
    # process's liveness timer would otherwise send thousands of edges' pings together, on its
    # grid (`liveness.TICK`, the same instants in every worker), and the cloud would read them in
    # batches far cheaper than a real fleet's pings.
    liveness.TICK = 0.001
    connected = [0, 0]  # tunnels up now, attempts that ended
    stop = trio.Event()

    async with trio.open_nursery() as nursery:
        for _ in range(n):  # a fleet comes up over time (the storm benchmark's ramp)
            nursery.start_soon(_one_edge, port, ctx, connected, stop)
            await trio.sleep(workers / RAMP_RATE)
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
    command: tuple[str, ...] = ("-m", "kins_tunnel", "cloud"),
) -> subprocess.Popen[bytes]:
    """Start a tunnel-cloud for `edges` simulated edges (one identity) on ports `tport` (tunnel)
    and `aport` (admin); `tunnel` adds keys to its `tunnel:` section; `command`: the Python
    arguments that run it, given `--config FILE`. With `wait`, returns once it is ready
    (/readyz)."""
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
        [sys.executable, *command, "--config", str(config)],
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


def start_workers(
    base: Path, certs: Path, tport: int, edges: int, workers: int, hold: float
) -> tuple[list[subprocess.Popen[bytes]], list[Path]]:
    """Start `edges` simulated edges in `workers` processes (this module's `worker` mode), each
    holding its tunnels up to `hold` seconds; returns the processes and the files where each
    reports its counts (see `wait_up`)."""
    per = [edges // workers + (1 if i < edges % workers else 0) for i in range(workers)]
    reports = [base / f"worker-{i}.count" for i in range(len(per))]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.scale",
                "worker",
                str(tport),
                str(n),
                str(certs),
                str(hold),
                str(report),
                str(len(per)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for n, report in zip(per, reports, strict=True)
    ]
    return procs, reports


def kill_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGKILL every process of a run (the cloud, the workers) and reap them."""
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()


def wait_up(reports: list[Path], edges: int, deadline: float) -> tuple[int, int]:
    """Wait until the workers report `edges` tunnels up, or until `deadline` (monotonic);
    returns (tunnels up, attempts that ended: refused, timed out or dropped)."""
    done = retries = 0
    while time.monotonic() < deadline:
        counts = [r.read_text().split() for r in reports if r.exists()]
        counts = [c for c in counts if len(c) == 2]
        done = sum(int(c[0]) for c in counts)
        retries = sum(int(c[1]) for c in counts)
        if done >= edges:
            break
        time.sleep(0.1)
    return done, retries


def _softirq_seconds() -> float:
    """CPU time the whole machine spent in soft interrupts (packet processing), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[7]) / CLK_TCK  # cpu user nice system idle iowait irq softirq


def run(
    edges: int,
    workers: int,
    *,
    settle: float = 25.0,
    idle_window: float = 30.0,
    timeout: float = 600,
) -> dict[str, float]:
    """Connect `edges` simulated edges, let them idle `settle` seconds, then measure the cloud's
    CPU over `idle_window` seconds and its RSS per edge (above its own before any edge)."""
    from benchmarks.storm import _cpu_seconds  # storm imports this module

    with tempfile.TemporaryDirectory(prefix="kins-scale-") as tmp:
        base = Path(tmp)
        certs = fleet_certs(base)
        tport, aport = free_port(), free_port()
        procs: list[subprocess.Popen[bytes]] = []
        try:
            # every simulated edge presents the same identity: room for each one's tunnel and for
            # the stale ones of edges that gave up a slow handshake the cloud still completed
            # (until their ping timeout), so that no tunnel displaces another
            cloud = cloud_process(
                base, certs, tport, aport, edges, tunnel={"max_tunnels_per_identity": 2 * edges}
            )
            procs.append(cloud)
            rss_before = rss_kib(cloud.pid) / 1024
            t0 = time.monotonic()
            workers_, reports = start_workers(base, certs, tport, edges, workers, timeout)
            procs += workers_
            # The workers count completed protocol handshakes (the cloud answered HELLO, so it
            # holds the session); scraping the cloud's per-tunnel metrics while it accepts would
            # cost it more than the handshakes, so it is asked once, at the end.
            _done, retries = wait_up(reports, edges, t0 + timeout)
            accept_s = time.monotonic() - t0
            time.sleep(2)
            before = scrape(
                aport
            )  # (a scrape of 10,000 tunnels costs the cloud CPU: not in the window)
            seen = metric_values(before, "kins_tunnel_tunnels").get("", 0.0)
            rss = rss_kib(cloud.pid) / 1024
            # idle: every tunnel's ping rhythm in its steady state, then CPU over the window
            time.sleep(settle)
            cpu0, w0 = _cpu_seconds(cloud.pid), time.monotonic()
            softirq0 = _softirq_seconds()
            time.sleep(idle_window)
            window = time.monotonic() - w0
            idle_cpu = (_cpu_seconds(cloud.pid) - cpu0) / window
            softirq = (_softirq_seconds() - softirq0) / window
            rss_idle = rss_kib(cloud.pid) / 1024
            load = os.getloadavg()
            after = scrape(aport)
            still = metric_values(after, "kins_tunnel_tunnels").get("", 0.0)

            def during(name: str) -> float:  # what a counter did while settling and in the window
                return sum(metric_values(after, name).values()) - sum(
                    metric_values(before, name).values()
                )

            return {
                "edges": seen,
                "edges_after_idle": still,
                "handshakes_retried": retries,
                "accept_seconds": round(accept_s, 1),
                "cloud_rss_before_mib": round(rss_before, 1),
                "cloud_rss_mib": round(rss, 1),
                "kib_per_tunnel": round((rss - rss_before) * 1024 / max(seen, 1), 1),
                "cloud_rss_idle_mib": round(rss_idle, 1),
                "kib_per_tunnel_idle": round((rss_idle - rss_before) * 1024 / max(still, 1), 1),
                "idle_cloud_cpu_pct_of_core": round(idle_cpu * 100, 2),
                "idle_window_s": idle_window,
                # the kernel's packet work on the whole machine (both ends of every tunnel:
                # keepalive probes and their answers, pings), which no process is charged with
                "idle_machine_softirq_pct_of_core": round(softirq * 100, 2),
                # churn would be measured as idle cost: there should be none
                "tls_handshakes_while_idle": during("kins_tunnel_tunnel_tls_handshakes_total"),
                "displaced_while_idle": during("kins_tunnel_tunnels_displaced_total"),
                "loadavg_1m": round(load[0], 2),
                "loadavg_5m": round(load[1], 2),
            }
        finally:
            kill_all(procs)


def fleet_arguments(
    doc: str | None, edges: int, settle: float, settle_help: str
) -> argparse.ArgumentParser:
    """The command line of a fleet benchmark (`--edges`, `--workers`, `--settle`), described by
    the first line of `doc`; SIGTERM (e.g. from `timeout`) then unwinds through the run's
    clean-up like Ctrl-C does."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    ap.add_argument("--edges", type=int, default=edges)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--settle", type=float, default=settle, help=settle_help)
    return ap


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        port, n, certs, hold = (
            int(sys.argv[2]),
            int(sys.argv[3]),
            Path(sys.argv[4]),
            float(sys.argv[5]),
        )
        workers = int(sys.argv[7])
        trio.run(_worker, port, n, workers, certs, "edge1", hold, Path(sys.argv[6]))
        return
    if "--storm" in sys.argv[1:]:  # the reconnect storm (benchmarks.storm)
        from benchmarks.storm import main as storm_main

        storm_main()
        return
    ap = fleet_arguments(__doc__, 10_000, 25.0, "seconds idle before the CPU window")
    ap.add_argument("--idle-window", type=float, default=60.0, help="seconds of idle CPU measured")
    args = ap.parse_args()
    print(
        json.dumps(run(args.edges, args.workers, settle=args.settle, idle_window=args.idle_window))
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
