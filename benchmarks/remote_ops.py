"""Remote operations through the tunnel with real kubectl: `exec -it` round trips, `kubectl cp`
throughput each way, `port-forward` echo throughput, next to the same commands straight to the API.

    python -m benchmarks.remote_ops                # 3 rounds, 200 MiB cp, 500 lines, medians
    python -m benchmarks.remote_ops --quick        # 1 round, 32 MiB cp, 100 lines

Processes: the K3s API stand-in (a test double, `python -m kins_tunnel.testing.k3s_standin`), a
cloud and an edge (`python -m kins_tunnel cloud|edge`), all on 127.0.0.1, and kubectl. Two
kubeconfigs: **tunnel** (server `test-svc-kins.kins-system:443`, `proxy-url` = the cloud's CONNECT
proxy) and **direct** (server = the stand-in's address). Paths alternate within each round.

What is measured:
- `exec -it` line round trip: kubectl on a pseudo-terminal runs `exec -it POD -- cat`; a line is
  written and the clock stops when the terminal echo and cat's copy of it are both back.
- `cp` in / out: `kubectl cp` of a file of N MiB into the pod's sandbox and back; MB/s (10^6) of
  the whole command, kubectl start-up and the `test -d` exec included; checksummed.
- port-forward: `kubectl port-forward` (SPDY, kubectl 1.30's default) to the pod's echo port;
  N MiB sent and echoed back at once on one connection; MB/s of payload each way.
The stand-in (Python, wsproto, tar in a thread) is slower than a real kubelet: the direct column
shows its own limit, so compare the columns, not the absolute figures with a real cluster.
"""

from __future__ import annotations

import argparse
import hashlib
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
import yaml

from benchmarks.procs import cpu_seconds
from kins_tunnel.demo import write_kubeconfig
from kins_tunnel.testing.k3s_standin import iter_blob
from kins_tunnel.testing.support import free_port
from tests.e2e.faultkit import procs, wait_edges
from tests.e2e.harness import SVC
from tests.e2e.kubectl_tools import POD, KubectlEnv, percentile, port_forward, pty_kubectl
from tests.e2e.test_remote_ops import echo_through


async def exec_it_rtts(env: KubectlEnv, lines: int) -> list[float]:
    async with pty_kubectl(env, "exec", "-it", POD, "--", "cat") as term:
        rtts = []
        for i in range(lines + 20):
            line = b"line %05d" % i
            start = time.perf_counter()
            await term.send(line + b"\r")
            await term.expect(line + b"\r\n" + line + b"\r\n")
            if i >= 20:  # warm-up
                rtts.append(time.perf_counter() - start)
        await term.send(b"\x04")
        with trio.fail_after(30):
            await term.proc.wait()
    return rtts


async def cp_rates(
    env: KubectlEnv, src: Path, digest: str, pids: dict[str, int], cpu: dict[str, float]
) -> tuple[float, float]:
    """MB/s into and out of the pod; adds each process's CPU seconds (both copies) to `cpu`."""
    size = src.stat().st_size
    before = {name: cpu_seconds([pid]) for name, pid in pids.items()}
    start = time.perf_counter()
    r = await env.run("cp", str(src), f"{POD}:/tmp/bench.bin", timeout=900)
    up = time.perf_counter() - start
    assert r.returncode == 0, r.stderr
    back = src.with_name("back.bin")
    start = time.perf_counter()
    r = await env.run("cp", f"{POD}:/tmp/bench.bin", str(back), timeout=900)
    down = time.perf_counter() - start
    for name, pid in pids.items():
        cpu[name] = cpu_seconds([pid]) - before[name]
    assert r.returncode == 0, r.stderr
    got = hashlib.sha256()
    with open(back, "rb") as f:
        while chunk := f.read(4 << 20):
            got.update(chunk)
    assert got.hexdigest() == digest, "cp round trip corrupted the file"
    back.unlink()
    return size / up / 1e6, size / down / 1e6


async def port_forward_rate(env: KubectlEnv, size: int) -> float:
    data = os.urandom(size)
    async with port_forward(env, "7") as ports:
        start = time.perf_counter()
        with trio.fail_after(600):
            back = await echo_through(ports[7], data)
        took = time.perf_counter() - start
    assert back == data, "port-forward echo corrupted the data"
    return size / took / 1e6


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="kins-bench-remote-"))
    results: dict[str, dict[str, list[float]]] = {"direct": {}, "tunnel": {}}
    k3s_port = free_port()
    sandbox = base / "sandbox"
    sandbox.mkdir()
    (base / "home").mkdir()
    standin = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kins_tunnel.testing.k3s_standin",
            "--port",
            str(k3s_port),
            "--dir",
            str(base),
            "--sandbox",
            str(sandbox),
        ],
        stdout=open(base / "standin.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        with procs(base) as ps:
            cloud = ps.cloud()
            edge = ps.edge(cloud.tunnel, {SVC: f"127.0.0.1:{k3s_port}"}, admin=False)
            await wait_edges(cloud, 1, timeout=30)
            ca = base / "k3s-standin.crt"
            with trio.fail_after(30):
                while not ca.exists():
                    await trio.sleep(0.05)
            tunnel_kc, direct_kc = base / "tunnel.kubeconfig", base / "direct.kubeconfig"
            write_kubeconfig(tunnel_kc, cloud.proxy, ca)
            doc = yaml.safe_load(tunnel_kc.read_text())
            doc["clusters"][0]["cluster"] = {
                "server": f"https://127.0.0.1:{k3s_port}",
                "certificate-authority": str(ca),
            }
            direct_kc.write_text(yaml.safe_dump(doc))
            envs = {
                name: KubectlEnv(base, kc, sandbox, None, k3s_port)
                for name, kc in (("direct", direct_kc), ("tunnel", tunnel_kc))
            }
            src = base / "bench.bin"
            digest = hashlib.sha256()
            with open(src, "wb") as f:
                for chunk in iter_blob(args.cp_mib << 20, 5, chunk_size=4 << 20):
                    digest.update(chunk)
                    f.write(chunk)
            for env in envs.values():  # warm kubectl's discovery cache and the page cache
                r = await env.run("get", "pods")
                assert r.returncode == 0, r.stderr
            for rnd in range(args.rounds):
                order = ["direct", "tunnel"] if rnd % 2 == 0 else ["tunnel", "direct"]
                for name in order:
                    env, out = envs[name], results[name]
                    rtts = await exec_it_rtts(env, args.lines)
                    out.setdefault("exec -it p50 (ms)", []).append(percentile(rtts, 50) * 1e3)
                    out.setdefault("exec -it p99 (ms)", []).append(percentile(rtts, 99) * 1e3)
                    cpu: dict[str, float] = {}
                    watched = {"stand-in": standin.pid} | (
                        {"cloud": cloud.pid, "edge": edge.pid} if name == "tunnel" else {}
                    )
                    up, down = await cp_rates(env, src, digest.hexdigest(), watched, cpu)
                    out.setdefault(f"cp {args.cp_mib} MiB into the pod (MB/s)", []).append(up)
                    out.setdefault(f"cp {args.cp_mib} MiB out of the pod (MB/s)", []).append(down)
                    gb = 2 * (args.cp_mib << 20) / 1e9
                    out.setdefault("cp: stand-in CPU s per GB", []).append(cpu["stand-in"] / gb)
                    out.setdefault("cp: cloud + edge CPU s per GB", []).append(
                        (cpu.get("cloud", 0.0) + cpu.get("edge", 0.0)) / gb
                    )
                    rate = await port_forward_rate(env, args.pf_mib << 20)
                    out.setdefault(
                        f"port-forward echo {args.pf_mib} MiB (MB/s each way)", []
                    ).append(rate)
                    print(
                        f"round {rnd + 1} {name}: "
                        + ", ".join(f"{k} {v[-1]:.2f}" for k, v in out.items()),
                        flush=True,
                    )
    finally:
        standin.kill()
        standin.wait()
        if not args.keep:
            import shutil

            shutil.rmtree(base, ignore_errors=True)
    return {
        "rounds": args.rounds,
        "lines": args.lines,
        "cp_mib": args.cp_mib,
        "pf_mib": args.pf_mib,
        "results": results,
    }


def render(doc: dict[str, Any]) -> str:
    rows = ["| measure | direct | tunnel | tunnel/direct |", "|---|---|---|---|"]
    for key in doc["results"]["direct"]:
        d = statistics.median(doc["results"]["direct"][key])
        t = statistics.median(doc["results"]["tunnel"][key])
        if d:
            rows.append(f"| {key} | {d:.2f} | {t:.2f} | {t / d:.2f}× |")
        else:  # nothing to measure on that path (no cloud or edge on the direct path)
            rows.append(f"| {key} | — | {t:.2f} |  |")
    spread = ["| measure | direct | tunnel |", "|---|---|---|"]
    for key in doc["results"]["direct"]:
        cells = [
            f"{min(doc['results'][p][key]):.2f} – {max(doc['results'][p][key]):.2f}"
            if any(doc["results"][p][key])
            else "—"
            for p in ("direct", "tunnel")
        ]
        spread.append(f"| {key} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows) + "\n\nSpread over rounds (min – max):\n\n" + "\n".join(spread)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lines", type=int, default=500, help="exec -it round trips per round")
    parser.add_argument("--cp-mib", type=int, default=200)
    parser.add_argument("--pf-mib", type=int, default=64)
    parser.add_argument(
        "--quick", action="store_true", help="1 round, 32 MiB cp, 100 lines, 16 MiB port-forward"
    )
    parser.add_argument("--json", default="benchmarks/results/remote_ops.json")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.lines, args.cp_mib, args.pf_mib = 1, 100, 32, 16
    doc = trio.run(run, args)
    doc["machine"] = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "load": os.getloadavg(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=1))
    print()
    print(render(doc))


if __name__ == "__main__":
    main()
