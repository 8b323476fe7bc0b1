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
direction of an image pull. Paths alternate within each round (the order rotates). The second
table compares uplink and CONNECT by the direction the data crosses the tunnel (an uplink read and
a CONNECT send both move data from the cloud to the edge), with the CPU of each process. MB/s are
10^6 bytes per second of the whole transfer, connection set-up included; CPU is user+sys seconds
per GB moved.
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
MODES = (("download", "source"), ("upload", "sink"))  # benchmarks.load mode, target kind
NAMES = {"source": "test-svc-kins.kins-system:9001", "sink": "test-svc-kins.kins-system:9002"}


def start_target(kind: str, base: Path) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.targets", kind],
        stdout=subprocess.PIPE,
        stderr=open(base / f"{kind}.log", "w"),
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("READY "):
        proc.kill()
        raise RuntimeError(f"target {kind} did not start: {line!r}")
    return proc, int(line.split()[1])


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="kins-bench-uplink-"))
    targets = {kind: start_target(kind, base) for kind in ("source", "sink")}
    # path -> mode ("download": the client reads, "upload": it sends) -> one sample per round
    results: dict[str, dict[str, list[dict[str, float]]]] = {
        path: {"download": [], "upload": []} for path in PATHS
    }
    nbytes = args.mib * MiB
    try:
        with procs(base) as ps:
            addr = {kind: f"127.0.0.1:{port}" for kind, (_p, port) in targets.items()}
            cloud = ps.cloud(uplinks={"test": sorted(addr.values())}, log={"level": "warning"})
            listen = {kind: free_port() for kind in addr}
            edge = ps.edge(
                cloud.tunnel,
                {NAMES[k]: addr[k] for k in addr},
                admin=False,
                log={"level": "warning"},
                uplinks={f"127.0.0.1:{listen[k]}": addr[k] for k in addr},
            )
            await wait_cloud_up(cloud)
            await wait_edges(cloud, 1, timeout=30)
            endpoints: dict[str, dict[str, dict[str, Any]]] = {
                "direct": {
                    k: {"addr": ["127.0.0.1", p], "connect": None} for k, (_x, p) in targets.items()
                },
                "uplink": {k: {"addr": ["127.0.0.1", listen[k]], "connect": None} for k in addr},
                "CONNECT": {
                    k: {"addr": ["127.0.0.1", cloud.proxy], "connect": NAMES[k]} for k in addr
                },
            }
            for path in PATHS:  # warm-up, not counted
                for mode, kind in MODES:
                    r = await trio.to_thread.run_sync(
                        run_client, mode, endpoints[path][kind], "--bytes", str(8 * MiB)
                    )
                    if "error" in r:
                        raise RuntimeError(f"{path} {mode}: {r['error']}")
            gb = nbytes / 1e9
            for rnd in range(args.rounds):
                k = rnd % len(PATHS)
                for path in PATHS[k:] + PATHS[:k]:
                    for mode, kind in MODES:
                        c0, e0 = cpu_seconds([cloud.pid]), cpu_seconds([edge.pid])
                        r = await trio.to_thread.run_sync(
                            run_client, mode, endpoints[path][kind], "--bytes", str(nbytes)
                        )
                        c1, e1 = cpu_seconds([cloud.pid]), cpu_seconds([edge.pid])
                        if "error" in r:
                            raise RuntimeError(f"{path} {mode}: {r['error']}")
                        sample = {
                            "MBps": r["MBps"],
                            "cloud_cpu": (c1 - c0) / gb,
                            "edge_cpu": (e1 - e0) / gb,
                        }
                        results[path][mode].append(sample)
                        print(
                            f"round {rnd + 1} {path} {mode}: {sample['MBps']:.1f} MB/s, CPU s/GB cloud "
                            f"{sample['cloud_cpu']:.2f} edge {sample['edge_cpu']:.2f}",
                            flush=True,
                        )
    finally:
        for proc, _port in targets.values():
            proc.kill()
            proc.wait()
        if not args.keep:
            import shutil

            shutil.rmtree(base, ignore_errors=True)
    return {"rounds": args.rounds, "mib": args.mib, "results": results}


def _stat(samples: list[dict[str, float]], key: str) -> str:
    """median (min – max) over rounds; "—" where nothing ran (no cloud or edge on the direct path)."""
    values = [sum(s[k] for k in key.split("+")) for s in samples]
    if not any(values):
        return "—"
    if len(values) == 1:
        return f"{values[0]:.1f}" if key == "MBps" else f"{values[0]:.2f}"
    spec = ".1f" if key == "MBps" else ".2f"
    return f"{statistics.median(values):{spec}} ({min(values):{spec}} – {max(values):{spec}})"


def render(doc: dict[str, Any]) -> str:
    res, mib = doc["results"], doc["mib"]
    first = [
        "| what the client does | direct TCP, MB/s | uplink, MB/s | uplink/direct |",
        "|---|---|---|---|",
    ]
    for mode, what in (
        ("download", f"reads {mib} MiB (an image pull)"),
        ("upload", f"sends {mib} MiB"),
    ):
        d = statistics.median(s["MBps"] for s in res["direct"][mode])
        u = statistics.median(s["MBps"] for s in res["uplink"][mode])
        first.append(
            f"| {what} | {_stat(res['direct'][mode], 'MBps')} | {_stat(res['uplink'][mode], 'MBps')} "
            f"| {u / d:.2f}× |"
        )
    second = [
        "| data across the tunnel | path (client) | MB/s | cloud CPU s/GB | edge CPU s/GB | cloud + edge |",
        "|---|---|---|---|---|---|",
    ]
    # an uplink's client is on the edge side, a CONNECT client on the cloud side
    for direction, rows in (
        ("cloud → edge", (("uplink", "download", "reads"), ("CONNECT", "upload", "sends"))),
        ("edge → cloud", (("uplink", "upload", "sends"), ("CONNECT", "download", "reads"))),
    ):
        for path, mode, verb in rows:
            samples = res[path][mode]
            second.append(
                f"| {direction} | {path} (client {verb}) | {_stat(samples, 'MBps')} | "
                f"{_stat(samples, 'cloud_cpu')} | {_stat(samples, 'edge_cpu')} | "
                f"{_stat(samples, 'cloud_cpu+edge_cpu')} |"
            )
    return (
        "Medians over rounds (min – max):\n\n"
        + "\n".join(first)
        + "\n\nBy the direction data crosses the "
        "tunnel:\n\n" + "\n".join(second)
    )


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
    doc["machine"] = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=1))
    print()
    print(render(doc))
    print(
        f"\nload average before {load_before[0]:.2f}, after {doc['machine']['load_after'][0]:.2f}"
    )


if __name__ == "__main__":
    main()
