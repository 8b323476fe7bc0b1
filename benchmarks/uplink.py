"""Uplink throughput: an edge-side client fetching from (and sending to) a cloud-side server
through the edge's uplink listener, next to the same transfer over direct TCP and through the
tunnel's usual direction (a CONNECT), in one run.

    python -m benchmarks.uplink                 # 3 rounds of 256 MiB each way, medians
    python -m benchmarks.uplink --quick         # 1 round of 32 MiB

Processes, all on 127.0.0.1: the target servers of `benchmarks.targets` (**source** sends N bytes,
**sink** counts what it gets), standing for a registry mirror in the cloud; a cloud and an edge
(`python -m kins_tunnel cloud|edge`) where cloud.yaml allows unit `test` the two targets
(`uplinks`) and edge.yaml maps two local listeners to them; and one measuring client process per
transfer (`benchmarks.load download|upload`), connecting to the edge's listener (**uplink**:
client on the edge side, server in the cloud), straight to the target (**direct**), or through the
cloud's CONNECT proxy to the same servers listed in the edge's `services` (**CONNECT**: the
tunnel's usual direction, client in the cloud, server on the edge side). "Client reads" is the
direction of an image pull. Paths alternate within each round (the order rotates). MB/s are 10^6 bytes per second of the whole transfer, connection set-up included;
CPU is user+sys seconds of cloud and edge per GB moved.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from benchmarks.procs import cpu_seconds
from benchmarks.run import run_client
from tests.e2e.faultkit import procs, wait_cloud_up, wait_edges
from tests.e2e.harness import free_port

MiB = 1 << 20
PATHS = ("direct", "uplink", "CONNECT")
NAMES = {"source": "test-svc-kins.kins-system:9001", "sink": "test-svc-kins.kins-system:9002"}


def start_target(kind: str, base: Path) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.targets", kind], stdout=subprocess.PIPE,
                            stderr=open(base / f"{kind}.log", "w"), text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("READY "):
        proc.kill()
        raise RuntimeError(f"target {kind} did not start: {line!r}")
    return proc, int(line.split()[1])


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="kins-bench-uplink-"))
    targets = {kind: start_target(kind, base) for kind in ("source", "sink")}
    results: dict[str, dict[str, list[float]]] = {path: {} for path in PATHS}
    nbytes = args.mib * MiB
    try:
        with procs(base) as ps:
            addr = {kind: f"127.0.0.1:{port}" for kind, (_p, port) in targets.items()}
            cloud = ps.cloud(uplinks={"test": sorted(addr.values())}, log={"level": "warning"})
            listen = {kind: free_port() for kind in addr}
            edge = ps.edge(cloud.tunnel, {NAMES[k]: addr[k] for k in addr}, admin=False, log={"level": "warning"},
                           uplinks={f"127.0.0.1:{listen[k]}": addr[k] for k in addr})
            await wait_cloud_up(cloud)
            await wait_edges(cloud, 1, timeout=30)
            endpoints: dict[str, dict[str, dict[str, Any]]] = {
                "direct": {k: {"addr": ["127.0.0.1", p], "connect": None} for k, (_x, p) in targets.items()},
                "uplink": {k: {"addr": ["127.0.0.1", listen[k]], "connect": None} for k in addr},
                "CONNECT": {k: {"addr": ["127.0.0.1", cloud.proxy], "connect": NAMES[k]} for k in addr},
            }
            for path in PATHS:  # warm-up, not counted
                for mode, kind in (("download", "source"), ("upload", "sink")):
                    r = await trio.to_thread.run_sync(run_client, mode, endpoints[path][kind], "--bytes", str(8 * MiB))
                    if "error" in r:
                        raise RuntimeError(f"{path} {mode}: {r['error']}")
            for rnd in range(args.rounds):
                k = rnd % len(PATHS)
                order = list(PATHS[k:] + PATHS[:k])
                for path in order:
                    out = results[path]
                    for mode, kind in (("download", "source"), ("upload", "sink")):
                        before = cpu_seconds([cloud.pid, edge.pid])
                        r = await trio.to_thread.run_sync(run_client, mode, endpoints[path][kind], "--bytes", str(nbytes))
                        cpu = cpu_seconds([cloud.pid, edge.pid]) - before
                        if "error" in r:
                            raise RuntimeError(f"{path} {mode}: {r['error']}")
                        what = "client reads" if mode == "download" else "client sends"
                        out.setdefault(f"{what} {args.mib} MiB, MB/s", []).append(r["MBps"])
                        out.setdefault(f"{what}: cloud + edge CPU s per GB", []).append(cpu / (nbytes / 1e9))
                    print(f"round {rnd + 1} {path}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in out.items()),
                          flush=True)
    finally:
        for proc, _port in targets.values():
            proc.kill()
            proc.wait()
        if not args.keep:
            import shutil
            shutil.rmtree(base, ignore_errors=True)
    return {"rounds": args.rounds, "mib": args.mib, "results": results}


def render(doc: dict[str, Any]) -> str:
    res = doc["results"]

    def cell(path: str, key: str, spread: bool = False) -> str:
        values = res[path][key]
        if not any(values):  # nothing to measure (no cloud or edge on the direct path)
            return "—"
        return f"{min(values):.1f} – {max(values):.1f}" if spread else f"{statistics.median(values):.1f}"

    rows = ["| measure | direct TCP | uplink | CONNECT | uplink/direct |", "|---|---|---|---|---|"]
    spread = ["| measure | direct TCP | uplink | CONNECT |", "|---|---|---|---|"]
    for key in res["uplink"]:
        d, u = statistics.median(res["direct"][key]), statistics.median(res["uplink"][key])
        ratio = f"{u / d:.2f}×" if d else ""
        rows.append(f"| {key} | {cell('direct', key)} | {cell('uplink', key)} | {cell('CONNECT', key)} | {ratio} |")
        spread.append(f"| {key} | " + " | ".join(cell(p, key, True) for p in PATHS) + " |")
    return "\n".join(rows) + "\n\nSpread over rounds (min – max):\n\n" + "\n".join(spread)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mib", type=int, default=256, help="MiB per transfer")
    parser.add_argument("--quick", action="store_true", help="1 round of 32 MiB")
    parser.add_argument("--json", default="benchmarks/results/uplink.json")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.mib = 1, 32
    load_before = os.getloadavg()
    doc = trio.run(measure, args)
    doc["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "load_before": load_before,
                      "load_after": os.getloadavg(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=1))
    print()
    print(render(doc))
    print(f"\nload average before {load_before[0]:.2f}, after {doc['machine']['load_after'][0]:.2f}")


if __name__ == "__main__":
    main()
