"""Benchmark kins_tunnel against OpenSSH ``ssh -R`` and direct TCP, side by side, in one run.

    python -m benchmarks.run [--quick] [--rounds N] [--only AXIS,...] [--json PATH] [--markdown PATH]
                             [--ssh-ciphers LIST] [--baseline GIT-REF]

Everything (targets, sshd, ssh, cloud, edge, WAN relays) is started on 127.0.0.1 by the harness and
torn down at the end, on error and on Ctrl-C. See benchmarks/README.md for what each axis measures.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import signal
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import scale as scale_bench
from benchmarks import wan_qos
from benchmarks.paths import (
    PY_RELAY,
    PY_RELAY_TRIO,
    Direct,
    Ours,
    Path_,
    PathUnavailable,
    PyRelay,
    SshR,
    Targets,
    baseline_cmd,
)
from benchmarks.procs import REPO, Cleanup, cpu_seconds, minor_faults, rss_breakdown, rss_mib

AXES = ["throughput", "rtt", "setup", "parallel", "fairness", "cost", "scale", "wan", "wan_qos"]
MiB = 1 << 20
DEFAULT_SSH_CIPHERS = "default,aes128-gcm@openssh.com"


def ssh_path_name(cipher: str | None) -> str:
    return "ssh -R" if not cipher or cipher == "default" else f"ssh -R {cipher.split('@')[0]}"


def params(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "tput_bytes": 64 * MiB,
            "rtt_count": 1000,
            "rtt_warmup": 100,
            "setup_count": 50,
            "parallel_streams": 64,
            "parallel_bytes": 2 * MiB,
            "fair_count": 500,
            "wan_bytes": 8 * MiB,
            "wan_delay_ms": 25.0,
            "wan_rate_mbit": 100.0,
        }
    return {
        "tput_bytes": 512 * MiB,
        "rtt_count": 5000,
        "rtt_warmup": 500,
        "setup_count": 300,
        "parallel_streams": 64,
        "parallel_bytes": 16 * MiB,
        "fair_count": 2000,
        "wan_bytes": 32 * MiB,
        "wan_delay_ms": 25.0,
        "wan_rate_mbit": 100.0,
    }


# ---------------------------------------------------------------- clients


def client_argv(mode: str, ep: dict[str, Any], *extra: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.load", mode, "--endpoint", json.dumps(ep), *extra]


def parse_result(out: str, err: str, rc: int) -> dict[str, Any]:
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]))
    last = (err.strip().splitlines() or [f"exit {rc}, no output"])[-1]
    return {"error": f"client failed: {last}"}


def run_client(
    mode: str, ep: dict[str, Any], *extra: str, timeout: float = 180.0
) -> dict[str, Any]:
    try:
        r = subprocess.run(
            client_argv(mode, ep, *extra),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"{mode} client timed out after {timeout:.0f} s"}
    return parse_result(r.stdout, r.stderr, r.returncode)


def fairness_once(ep_echo: dict[str, Any], ep_source: dict[str, Any], count: int) -> dict[str, Any]:
    idle = run_client("rtt", ep_echo, "--count", str(count), "--warmup", "100", timeout=120)
    if "error" in idle:
        return {"error": "idle: " + idle["error"]}
    bulk = subprocess.Popen(
        client_argv("bulk", ep_source, "--max-seconds", "90"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert bulk.stdout is not None and bulk.stdin is not None
        first = bulk.stdout.readline().strip()  # STARTED once data flows, or RESULT with an error
        if first != "STARTED":
            out, err = bulk.communicate(timeout=30)  # closes stdin: the bulk client stops
            return {
                "error": "bulk: "
                + parse_result(first + "\n" + out, err, bulk.returncode).get("error", "?")
            }
        loaded = run_client("rtt", ep_echo, "--count", str(count), "--warmup", "100", timeout=120)
        out, err = bulk.communicate(timeout=30)  # closes stdin: the bulk client stops
        bulk_res = parse_result(out, err, bulk.returncode)
    finally:
        if bulk.poll() is None:
            bulk.kill()
            bulk.wait()
    if "error" in loaded:
        return {"error": "loaded: " + loaded["error"]}
    return {
        "idle_p99_us": idle["p99_us"],
        "loaded_p99_us": loaded["p99_us"],
        "idle_p50_us": idle["p50_us"],
        "loaded_p50_us": loaded["p50_us"],
        "ratio_p99": loaded["p99_us"] / idle["p99_us"],
        "bulk_MBps": bulk_res.get("MBps"),
    }


# ---------------------------------------------------------------- the run


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.p = params(args.quick)
        self.axes = args.axes
        self.cleanup = Cleanup(keep_dirs=args.keep_logs)
        self.paths: list[Path_] = []
        self.names: list[
            str
        ] = []  # column order: direct, the ssh -R configurations, ours, baseline
        self.skipped: dict[str, str] = {}
        self.scale: dict[str, float] | None = None
        self.samples: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self.cost_acc: dict[str, list[dict[str, float]]] = {}
        self.wan_eps: dict[str, dict[str, Any]] = {}
        self.rss: dict[str, float] = {}
        self.rss_parts: dict[str, dict[str, float]] = {}
        self.broken: set[tuple[str, str]] = set()
        self.rss_detail: dict[str, list[dict[str, object]]] = {}
        self.wan_qos: dict[str, Any] | None = None

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def record(self, axis: str, path: str, res: dict[str, Any]) -> None:
        self.samples.setdefault(axis, {}).setdefault(path, []).append(res)
        if "error" in res:
            self.log(f"  {axis:<10} {path:<7} ERROR {res['error']}")
            if "timed out" in res["error"]:
                # A stalled path would stall every later round too: stop measuring it on this axis.
                self.broken.add((axis, path))

    def skip(self, axis: str, path: str) -> bool:
        if (axis, path) in self.broken:
            self.samples.setdefault(axis, {}).setdefault(path, []).append(
                {"error": "not measured: timed out in an earlier round"}
            )
            return True
        return False

    def setup_paths(self) -> None:
        self.log("starting targets (sink, source, echo)")
        targets = Targets(self.cleanup)
        self.paths.append(Direct(self.cleanup, targets))
        makers: list[tuple[str, Any]] = []
        for cipher in self.args.ssh_ciphers:
            name = ssh_path_name(cipher)
            makers.append(
                (
                    name,
                    lambda c=cipher, n=name: SshR(
                        self.cleanup,
                        targets,
                        None if c == "default" else c,
                        self.args.ssh_interactive,
                        name=n,
                    ),
                )
            )
        for loop in self.args.py_relays:
            makers.append(
                (
                    PY_RELAY if loop == "epoll" else PY_RELAY_TRIO,
                    lambda lp=loop: PyRelay(self.cleanup, targets, loop=lp),
                )
            )
        makers.append(
            ("ours", lambda: Ours(self.cleanup, targets, shlex.split(self.args.kins_cmd) or None))
        )
        if self.args.baseline:
            ref = self.args.baseline
            makers.append(
                (
                    f"ours@{ref}",
                    lambda: Ours(
                        self.cleanup, targets, baseline_cmd(self.cleanup, ref), name=f"ours@{ref}"
                    ),
                )
            )
        self.names = ["direct"] + [name for name, _ in makers]
        for name, make in makers:
            self.log(f"starting path {name}")
            try:
                self.paths.append(make())
            except PathUnavailable as exc:
                self.skipped[name] = str(exc)
                self.log(f"SKIPPING {name}: {exc}")
        for pth in self.paths:
            extra = ""
            if isinstance(pth, SshR):
                extra = f" (cipher {pth.info.get('cipher_negotiated', '?')}, kex {pth.info.get('kex', '?')})"
            self.log(f"path ready: {pth.name}{extra}")

    def setup_wan(self) -> None:
        relay = (self.p["wan_delay_ms"], self.p["wan_rate_mbit"])
        for pth in self.paths:
            try:
                self.wan_eps[pth.name] = pth.wan_endpoint(relay)
            except PathUnavailable as exc:
                self.skipped[f"wan/{pth.name}"] = str(exc)
                self.log(f"WAN: skipping {pth.name}: {exc}")
            except RuntimeError as exc:
                self.skipped[f"wan/{pth.name}"] = str(exc)
                self.log(f"WAN: skipping {pth.name}: {exc}")

    def measure_round(self, rnd: int) -> None:
        p = self.p
        n = len(self.paths)
        order = [self.paths[(i + rnd) % n] for i in range(n)]  # rotate who goes first each round
        want = set(self.axes)
        if "throughput" in want or "cost" in want:
            for direction in ("upload", "download"):
                for pth in order:
                    if self.skip(direction, pth.name):
                        continue
                    kind = "sink" if direction == "upload" else "source"
                    parts = pth.cost_parts
                    cpu0 = {k: cpu_seconds(r, pth.cost_exclude) for k, r in parts.items()}
                    flt0 = {k: minor_faults(r, pth.cost_exclude) for k, r in parts.items()}
                    res = run_client(
                        direction, pth.endpoints[kind], "--bytes", str(p["tput_bytes"])
                    )
                    if parts and "error" not in res:
                        cpu = {
                            k: cpu_seconds(r, pth.cost_exclude) - cpu0[k] for k, r in parts.items()
                        }
                        flt = {
                            f"faults {k}": float(minor_faults(r, pth.cost_exclude) - flt0[k])
                            for k, r in parts.items()
                        }
                        res["tunnel_cpu_s"] = sum(cpu.values())
                        res["cpu_parts_s"] = cpu
                        res["minor_faults"] = flt
                        self.cost_acc.setdefault(pth.name, []).append(
                            {"cpu": sum(cpu.values()), "bytes": res["bytes"], **cpu, **flt}
                        )
                    self.record(direction, pth.name, res)
        if "rtt" in want:
            for pth in order:
                if self.skip("rtt", pth.name):
                    continue
                self.record(
                    "rtt",
                    pth.name,
                    run_client(
                        "rtt",
                        pth.endpoints["echo"],
                        "--count",
                        str(p["rtt_count"]),
                        "--warmup",
                        str(p["rtt_warmup"]),
                        "--raw",
                    ),
                )
        if "setup" in want:
            for pth in order:
                # The reference relay makes a blocking TLS handshake per connection: not a
                # setup rate anyone would ship, so it is not measured on this axis.
                if pth.name in (PY_RELAY, PY_RELAY_TRIO) or self.skip("setup", pth.name):
                    continue
                self.record(
                    "setup",
                    pth.name,
                    run_client("setup", pth.endpoints["echo"], "--count", str(p["setup_count"])),
                )
        if "parallel" in want:
            for axis, mode, kind in (
                ("parallel", "parallel", "sink"),
                ("parallel_down", "parallel-download", "source"),
            ):
                for pth in order:
                    if self.skip(axis, pth.name):
                        continue
                    self.record(
                        axis,
                        pth.name,
                        run_client(
                            mode,
                            pth.endpoints[kind],
                            "--streams",
                            str(p["parallel_streams"]),
                            "--bytes",
                            str(p["parallel_bytes"]),
                        ),
                    )
        if "fairness" in want:
            for pth in order:
                if self.skip("fairness", pth.name):
                    continue
                self.record(
                    "fairness",
                    pth.name,
                    fairness_once(pth.endpoints["echo"], pth.endpoints["source"], p["fair_count"]),
                )
        if "wan" in want:
            for pth in order:
                ep = self.wan_eps.get(pth.name)
                if ep is not None and not self.skip("wan", pth.name):
                    self.record(
                        "wan", pth.name, run_client("download", ep, "--bytes", str(p["wan_bytes"]))
                    )

    def round_summary(self, rnd: int) -> None:
        bits = []
        for axis, key, fmt in (
            ("upload", "MBps", "{:.0f} MB/s"),
            ("download", "MBps", "{:.0f} MB/s"),
            ("rtt", "p50_us", "p50 {:.0f} us"),
            ("setup", "conn_per_s", "{:.0f} conn/s"),
            ("parallel", "MBps", "{:.0f} MB/s"),
            ("parallel_down", "MBps", "{:.0f} MB/s"),
            ("fairness", "ratio_p99", "x{:.2f}"),
            ("wan", "MBps", "{:.1f} MB/s"),
        ):
            per = self.samples.get(axis, {})
            vals = []
            for name in self.names:
                runs = per.get(name) or []
                if runs:
                    last = runs[-1]
                    vals.append(f"{name}={fmt.format(last[key])}" if key in last else f"{name}=ERR")
            if vals:
                bits.append(f"{axis}: " + ", ".join(vals))
        for b in bits:
            self.log(f"  round {rnd}: {b}")

    def run(self) -> dict[str, Any]:
        started = time.time()
        self.loadavg_start = os.getloadavg()
        self.machine = machine_info()  # at the start: the commit under test, not a later one
        self.setup_paths()
        if "wan" in self.axes:
            self.log(
                "starting WAN relays ({} ms one way, {} Mbit/s)".format(
                    self.p["wan_delay_ms"], self.p["wan_rate_mbit"]
                )
            )
            self.setup_wan()
        for rnd in range(1, self.args.rounds + 1):
            self.log(f"round {rnd}/{self.args.rounds}")
            self.measure_round(rnd - 1)
            self.round_summary(rnd)
        for pth in self.paths:
            if pth.cost_roots:
                self.rss[pth.name] = rss_mib(pth.cost_roots, pth.cost_exclude)
                self.rss_detail[pth.name] = rss_breakdown(pth.cost_roots, pth.cost_exclude)
                self.rss_parts[pth.name] = {
                    k: rss_mib(r, pth.cost_exclude) for k, r in pth.cost_parts.items()
                }
        if "wan_qos" in self.axes:  # its own links and tunnels, one path at a time
            self.wan_qos = wan_qos.measure(self)
        if "scale" in self.axes:
            # Last, on its own: one more cloud process and the simulated edges would disturb
            # every other axis. ssh -R and direct have no counterpart (no edge tunnels).
            edges = 1000 if self.args.quick else 10_000
            self.log(f"scale: one cloud holding {edges:,} simulated idle edges")
            try:
                self.scale = scale_bench.run(edges, workers=4)
                self.log(f"scale: {self.scale}")
            except Exception as exc:  # noqa: BLE001 - report and go on
                self.skipped["scale"] = f"failed: {exc}"
        return self.results(time.time() - started)

    # ------------------------------------------------------------ summarising

    def med(self, axis: str, path: str, key: str) -> float | None:
        vals = [r[key] for r in self.samples.get(axis, {}).get(path, []) if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    def spread(self) -> dict[str, dict[str, list[float]]]:
        """min and max over rounds per metric and path (the table shows medians)."""
        out: dict[str, dict[str, list[float]]] = {}
        for metric, (axis, key) in SPREAD_KEYS.items():
            for name in self.names:
                vals = [
                    r[key]
                    for r in self.samples.get(axis, {}).get(name, [])
                    if r.get(key) is not None
                ]
                if vals:
                    out.setdefault(metric, {})[name] = [min(vals), max(vals)]
        return out

    def summary(self) -> dict[str, dict[str, float | None]]:
        s: dict[str, dict[str, float | None]] = {}

        def put(metric: str, axis: str, key: str) -> None:
            s[metric] = {name: self.med(axis, name, key) for name in self.names}

        put("upload_MBps", "upload", "MBps")
        put("download_MBps", "download", "MBps")
        put("rtt_p50_us", "rtt", "p50_us")
        put("rtt_p99_us", "rtt", "p99_us")
        put("setup_conn_per_s", "setup", "conn_per_s")
        put("setup_p50_ms", "setup", "p50_ms")
        put("parallel_MBps", "parallel", "MBps")
        put("parallel_down_MBps", "parallel_down", "MBps")
        put("fair_idle_p99_us", "fairness", "idle_p99_us")
        put("fair_loaded_p99_us", "fairness", "loaded_p99_us")
        put("fair_ratio", "fairness", "ratio_p99")
        put("wan_MBps", "wan", "MBps")
        for metric, part, pick in (
            ("cost_cpu_s_per_GB", "cpu", statistics.median),
            ("cost_server_cpu_s_per_GB", "server side", statistics.median),
            ("cost_client_cpu_s_per_GB", "client side", statistics.median),
            # Heap churn comes and goes between transfers: the worst transfer shows it.
            ("faults_server_per_GB", "faults server side", max),
            ("faults_client_per_GB", "faults client side", max),
        ):
            cost: dict[str, float | None] = {name: None for name in self.names}
            for name, acc in self.cost_acc.items():
                per_gb = [a[part] / (a["bytes"] / 1e9) for a in acc if part in a]
                cost[name] = pick(per_gb) if per_gb else None
            s[metric] = cost
        s["rss_MiB"] = {name: self.rss.get(name) for name in self.names}
        s["rss_server_MiB"] = {
            name: self.rss_parts.get(name, {}).get("server side") for name in self.names
        }
        s["rss_client_MiB"] = {
            name: self.rss_parts.get(name, {}).get("client side") for name in self.names
        }
        return s

    def results(self, elapsed: float) -> dict[str, Any]:
        summ = self.summary()
        machine = dict(self.machine)
        machine["loadavg_start"] = [round(x, 2) for x in self.loadavg_start]
        machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        return {
            "machine": machine,
            "args": {k: v for k, v in vars(self.args).items() if k not in ("json", "markdown")},
            "params": self.p,
            "elapsed_s": elapsed,
            "paths": {p.name: p.info for p in self.paths},
            "skipped": self.skipped,
            "summary": summ,
            "names": self.names,
            "spread": self.spread(),
            "rss_per_process": self.rss_detail,
            "table": table_rows(summ, self.axes, self.skipped, self.names, self.scale),
            "scale": self.scale,
            "wan_qos": self.wan_qos,
            "samples": self.samples,
        }


# ---------------------------------------------------------------- report

# axis, metric, label, format, rule, factor, better
#   rule "ge_ssh": ours >= factor * best ssh;  "le_ssh": ours <= factor * best ssh;
#   "le_abs": ours <= factor;  "ge_direct": ours >= factor * direct;  None: informational.
#   better: "hi" or "lo" (which ssh -R configuration is the best one to compare with), or None.
ROWS: list[tuple[str, str, str, str, str | None, float, str | None]] = [
    ("throughput", "upload_MBps", "1-stream upload (MB/s)", "{:.0f}", "ge_ssh", 1.0, "hi"),
    ("throughput", "download_MBps", "1-stream download (MB/s)", "{:.0f}", "ge_ssh", 1.0, "hi"),
    ("rtt", "rtt_p50_us", "RTT 64 B p50 (µs)", "{:.0f}", "le_ssh", 1.0, "lo"),
    ("rtt", "rtt_p99_us", "RTT 64 B p99 (µs)", "{:.0f}", None, 0, "lo"),
    ("setup", "setup_conn_per_s", "setup + 1st RTT (conn/s)", "{:.0f}", "ge_ssh", 10.0, "hi"),
    ("setup", "setup_p50_ms", "setup + 1st RTT p50 (ms)", "{:.2f}", None, 0, "lo"),
    (
        "parallel",
        "parallel_MBps",
        "64 streams upload, aggregate (MB/s)",
        "{:.0f}",
        "ge_ssh",
        1.0,
        "hi",
    ),
    (
        "parallel",
        "parallel_down_MBps",
        "64 streams download, aggregate (MB/s)",
        "{:.0f}",
        "ge_ssh",
        1.0,
        "hi",
    ),
    ("fairness", "fair_idle_p99_us", "interactive p99 idle (µs)", "{:.0f}", None, 0, "lo"),
    ("fairness", "fair_loaded_p99_us", "interactive p99 under bulk (µs)", "{:.0f}", None, 0, "lo"),
    ("fairness", "fair_ratio", "p99 under bulk / idle p99", "{:.2f}", "le_abs", 3.0, "lo"),
    (
        "cost",
        "cost_cpu_s_per_GB",
        "tunnel CPU s per GB, both processes (axis 1)",
        "{:.2f}",
        "le_ssh",
        1.0,
        "lo",
    ),
    ("cost", "cost_server_cpu_s_per_GB", "CPU s per GB: cloud / sshd", "{:.2f}", None, 0, "lo"),
    (
        "cost",
        "cost_client_cpu_s_per_GB",
        "CPU s per GB: edge / ssh client",
        "{:.2f}",
        None,
        0,
        "lo",
    ),
    (
        "cost",
        "faults_server_per_GB",
        "minor page faults per GB, worst transfer: cloud / sshd",
        "{:.0f}",
        None,
        0,
        "lo",
    ),
    (
        "cost",
        "faults_client_per_GB",
        "minor page faults per GB, worst transfer: edge / ssh client",
        "{:.0f}",
        None,
        0,
        "lo",
    ),
    ("cost", "rss_MiB", "tunnel RSS after run, both (MiB)", "{:.0f}", None, 0, "lo"),
    ("cost", "rss_server_MiB", "RSS: cloud / sshd (MiB)", "{:.0f}", None, 0, "lo"),
    ("cost", "rss_client_MiB", "RSS: edge / ssh client (MiB)", "{:.0f}", None, 0, "lo"),
    ("wan", "wan_MBps", "WAN 50 ms/100 Mbit download (MB/s)", "{:.2f}", "ge_direct", 0.8, "hi"),
]

SPREAD_KEYS = {
    "upload_MBps": ("upload", "MBps"),
    "download_MBps": ("download", "MBps"),
    "rtt_p50_us": ("rtt", "p50_us"),
    "setup_conn_per_s": ("setup", "conn_per_s"),
    "parallel_MBps": ("parallel", "MBps"),
    "parallel_down_MBps": ("parallel_down", "MBps"),
    "fair_ratio": ("fairness", "ratio_p99"),
    "wan_MBps": ("wan", "MBps"),
}

TARGET_TEXT = {
    "ge_ssh": "≥ {f:g}× best ssh -R",
    "le_ssh": "≤ best ssh -R",
    "le_abs": "≤ {f:g}",
    "ge_direct": "≥ {f:.0%} of direct",
}


def fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else spec.format(v)


def best_ssh(vals: dict[str, float | None], better: str | None) -> float | None:
    """The best value over the ssh -R configurations (the fastest, or the cheapest)."""
    got = [v for name, v in vals.items() if name.startswith("ssh -R") and v is not None]
    if not got or better is None:
        return None
    return max(got) if better == "hi" else min(got)


def table_rows(
    summ: dict[str, dict[str, float | None]],
    axes: list[str],
    skipped: dict[str, str],
    names: list[str],
    scale: dict[str, float] | None = None,
) -> list[dict[str, str]]:
    rows = []
    for axis, metric, label, spec, rule, factor, better in ROWS:
        if axis not in axes and not (axis == "cost" and "throughput" in axes):
            continue
        vals = summ.get(metric, {})
        d, o = vals.get("direct"), vals.get("ours")
        s = best_ssh(vals, better)
        ratio = f"{o / s:.2f}×" if o is not None and s else "—"
        floor = vals.get(PY_RELAY)
        floor_ratio = f"{o / floor:.2f}×" if o is not None and floor else "—"
        target = TARGET_TEXT[rule].format(f=factor) if rule else ""
        met = ""
        if rule:
            if o is None:
                met = "n/a (ours not run)" if "ours" in skipped else "n/a"
            elif rule == "ge_ssh":
                met = "n/a" if not s else ("yes" if o >= factor * s else "no")
            elif rule == "le_ssh":
                met = "n/a" if not s else ("yes" if o <= factor * s else "no")
            elif rule == "le_abs":
                met = "yes" if o <= factor else "no"
            elif rule == "ge_direct":
                met = "n/a" if not d else (f"{'yes' if o >= factor * d else 'no'} ({o / d:.0%})")
        row = {"axis": label, **{n: fmt(vals.get(n), spec) for n in names}}
        row.update(
            {"ours/best ssh": ratio, "ours/py relay": floor_ratio, "target": target, "met?": met}
        )
        rows.append(row)
    if "scale" in axes and scale:
        n = int(scale["edges"])
        rss = scale["cloud_rss_mib"]
        dash = {name: "—" for name in names}
        rows.append(
            {
                **dash,
                "axis": f"scale: cloud RSS with {n:,} idle edges (MiB)",
                "ours": f"{rss:.0f}",
                "ours/best ssh": "—",
                "target": "≤ 1024 MiB at 10,000",
                "met?": ("yes" if rss <= 1024 else "no") if n >= 10_000 else "n/a (fewer edges)",
            }
        )
        if "kib_per_tunnel" in scale:
            rows.append(
                {
                    **dash,
                    "axis": "scale: memory per idle edge (KiB)",
                    "ours": f"{scale['kib_per_tunnel']:.1f}",
                    "ours/best ssh": "—",
                    "target": "",
                    "met?": "",
                }
            )
        if "idle_cloud_cpu_pct_of_core" in scale:
            cpu = scale["idle_cloud_cpu_pct_of_core"]
            rows.append(
                {
                    **dash,
                    "axis": f"scale: cloud idle CPU with {n:,} edges (% of a core)",
                    "ours": f"{cpu:.2f}",
                    "ours/best ssh": "—",
                    "target": "< 5 % at 10,000",
                    "met?": ("yes" if cpu < 5 else "no") if n >= 10_000 else "n/a (fewer edges)",
                }
            )
        rows.append(
            {
                **dash,
                "axis": f"scale: time to accept {n:,} edges (s)",
                "ours": f"{scale['accept_seconds']:.1f}",
                "ours/best ssh": "—",
                "target": "",
                "met?": "",
            }
        )
    return rows


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    names = res["names"]
    cols = ["axis", *names, "ours/best ssh", "target", "met?"]
    if PY_RELAY in names:
        cols.insert(cols.index("target"), "ours/py relay")
    lines = [
        f"# kins_tunnel benchmark — {m['date']}, commit {m.get('git_commit', '?')}",
        "",
        f"Machine: {m['nproc']} cores, {m['cpu_model']}, Linux {m['kernel']}, Python {m['python']}, "
        f"{m['openssl']}. Mode: {'quick' if res['args']['quick'] else 'full'}, "
        f"{res['args']['rounds']} round(s), medians over rounds. "
        f"Load average (1 min) before the run {m['loadavg_start'][0]} (above ~{m['nproc'] * 0.5:g}: "
        f"other work was competing for the cores), at the end {m['loadavg_end'][0]} (includes this run).",
        "",
    ]
    for name in names:
        info = res["paths"].get(name)
        if info and name.startswith("ssh -R"):
            lines.append(
                f"{name}: {info.get('ssh_version', '?')}; client `{info.get('client_mode')}`; "
                f"cipher {info.get('cipher_negotiated', '?')} "
                f"(requested: {info.get('cipher_requested')}), kex {info.get('kex', '?')}."
            )
            lines.append("")
        elif info and name in (PY_RELAY, PY_RELAY_TRIO):
            lines.append(f"{name}: {info.get('description')}.")
            lines.append("")
        elif info and name.startswith("ours@"):
            lines.append(f"{name}: the tunnel as of git revision {name[5:]} (A/B in the same run).")
            lines.append("")
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in res["table"]:
        lines.append("| " + " | ".join(row.get(c, "—") for c in cols) + " |")
    lines.append("")
    spread = res.get("spread") or {}
    if spread and res["args"]["rounds"] > 1:
        labels = {metric: label for _a, metric, label, _s, _r, _f, _b in ROWS}
        specs = {metric: spec for _a, metric, _l, spec, _r, _f, _b in ROWS}
        lines += [
            "Spread over rounds (min – max):",
            "",
            "| axis | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for metric, per in spread.items():
            cells = [
                f"{specs[metric].format(per[n][0])} – {specs[metric].format(per[n][1])}"
                if n in per
                else "—"
                for n in names
            ]
            lines.append(f"| {labels[metric]} | " + " | ".join(cells) + " |")
        lines.append("")
    if res["skipped"]:
        lines.append("Skipped:")
        for k, v in res["skipped"].items():
            lines.append(f"- {k}: {v}")
        lines.append("")
    errors = [
        f"- {axis}/{path}: {r['error']}"
        for axis, per in res["samples"].items()
        for path, runs in per.items()
        for r in runs
        if "error" in r
    ]
    if errors:
        lines.append("Errors:")
        lines += errors[:30]
        lines.append("")
    if res.get("wan_qos"):
        lines += wan_qos.markdown(res["wan_qos"])
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = "?"
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "git_commit": commit,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.splitlines()[0]
    )
    ap.add_argument(
        "--quick", action="store_true", help="short smoke run (small transfers, 1 round)"
    )
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 5; 1 with --quick)")
    ap.add_argument("--only", default="", help="comma-separated axes: " + ",".join(AXES))
    ap.add_argument("--json", default="benchmarks/results/latest.json", help="raw results (JSON)")
    ap.add_argument("--markdown", default="benchmarks/results/latest.md", help="table (markdown)")
    ap.add_argument(
        "--render",
        metavar="JSON",
        default=None,
        help="print the table of a saved run's JSON (no measuring)",
    )
    ap.add_argument(
        "--ssh-cipher",
        default=None,
        help="measure only this one ssh -R configuration, e.g. aes128-gcm@openssh.com",
    )
    ap.add_argument(
        "--ssh-ciphers",
        default=DEFAULT_SSH_CIPHERS,
        help="ssh -R configurations side by side, one per cipher ('default' = negotiated); "
        f"default {DEFAULT_SSH_CIPHERS}",
    )
    ap.add_argument(
        "--baseline",
        default="",
        metavar="GIT-REF",
        help="also measure the tunnel as of this git revision (column ours@REF): A/B in one run",
    )
    ap.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep the temp dirs (cloud/edge/sshd/ssh logs, configs, keys) instead of deleting them",
    )
    ap.add_argument(
        "--kins-cmd",
        default="",
        help="command that runs the tunnel CLI (default: this Python's -m kins_tunnel), "
        "e.g. 'kins-tunnel' for the installed console script",
    )
    ap.add_argument(
        "--py-relays",
        default="epoll,trio",
        help="reference floors side by side (benchmarks/pyrelay.py, the leanest Python TLS relay): "
        "'epoll' (one epoll loop) and/or 'trio' (the same calls scheduled by trio); '' for none",
    )
    ap.add_argument(
        "--ssh-interactive",
        action="store_true",
        help="run the ssh -R client with a TTY session (ssh -tt ... sleep) instead of -N; "
        "OpenSSH then sets TCP_NODELAY on its connection",
    )
    ap.add_argument(
        "--wan-qos-profile",
        default="",
        help="wan_qos: only the link profiles whose name contains this (e.g. '20 Mbit')",
    )
    ap.add_argument(
        "--wan-qos-paths",
        default="ours,ssh -R",
        help="wan_qos: the paths measured, comma-separated (default 'ours,ssh -R')",
    )
    args = ap.parse_args(argv)
    args.wan_qos_paths = [x.strip() for x in args.wan_qos_paths.split(",") if x.strip()]
    args.py_relays = [x.strip() for x in args.py_relays.split(",") if x.strip()]
    if any(x not in ("epoll", "trio") for x in args.py_relays) or len(set(args.py_relays)) != len(
        args.py_relays
    ):
        ap.error("--py-relays takes 'epoll' and/or 'trio', each once")
    ciphers = [args.ssh_cipher] if args.ssh_cipher else args.ssh_ciphers.split(",")
    args.ssh_ciphers = [c.strip() for c in ciphers if c.strip()]
    if len({ssh_path_name(c) for c in args.ssh_ciphers}) != len(args.ssh_ciphers):
        ap.error("--ssh-ciphers lists a configuration twice")
    if args.rounds is None:
        args.rounds = 1 if args.quick else 5
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    axes = [a.strip() for a in args.only.split(",") if a.strip()] or list(AXES)
    bad = [a for a in axes if a not in AXES]
    if bad:
        ap.error(f"unknown axis {', '.join(bad)}; choose from {', '.join(AXES)}")
    args.axes = axes
    return args


def _sigterm(_signo: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:  # rendering is a pure function of the results: re-render a saved run
        print(markdown(json.loads(Path(args.render).read_text())))
        return 0
    signal.signal(signal.SIGTERM, _sigterm)
    bench = Bench(args)
    try:
        res = bench.run()
    except KeyboardInterrupt:
        print("\ninterrupted; tearing down", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        bench.cleanup.close()
    md = markdown(res)
    print()
    print(md)
    for target, text in ((args.json, json.dumps(res, indent=1) + "\n"), (args.markdown, md)):
        path = Path(target)
        if not path.is_absolute():
            path = REPO / path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
