"""The ``wan_qos`` axis: interactive latency while bulk traffic fills a thin link, ours and
OpenSSH ``ssh -R`` side by side through the same kind of link.

Each profile is a link (`kins_tunnel.testing.linkrelay` in front of the tunnel's port: a rate and
a one-way delay each way, a bottleneck queue of the given size, and 32 KiB socket buffers on the
relay itself, so that its queue is the one configured and the kernel adds little of its own).
Per path and profile, in phases of a few seconds each:

- **idle**: 64-byte pings on their own stream every 100 ms (`pings` worker), nothing else;
- **down**: the same pings while one bulk download runs (source → client; counted at the client);
- **up**: the same while one bulk upload runs (client → sink; counted *at the sink*, which keeps a
  time series of what it received, so bytes a tunnel buffered are not counted as delivered);
- **both**: a download and an upload at once.

The first seconds of a phase are a warm-up (TCP and the pacer find the link); RTT percentiles and
throughputs are taken over the rest. Throughput is a share of the link's rate. Targets (issue
"Interactive first on thin links"): RTT p50 during bulk ≤ 1.5 × idle p50, p99 ≤ 2 × idle p50, bulk
≥ 85 % of the link (≥ 70 % each way in the two-way phase).

The workers run as separate processes (``python -m benchmarks.wan_qos pings|download|upload|sink``)
so that no GIL is shared between a ping and a bulk transfer; their timestamps are the system's
monotonic clock, common to all processes.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from typing import TYPE_CHECKING, Any

from benchmarks.load import COUNT, PING, open_stream
from benchmarks.procs import REPO

if TYPE_CHECKING:
    from benchmarks.run import Bench

PROFILES: tuple[dict[str, Any], ...] = (
    {"name": "20 Mbit/s, 25 ms, 256 KiB", "rate_mbit": 20.0, "delay_ms": 25.0, "queue_kib": 256},
    {"name": "100 Mbit/s, 10 ms, 1 MiB", "rate_mbit": 100.0, "delay_ms": 10.0, "queue_kib": 1024},
    {"name": "5 Mbit/s, 150 ms, 128 KiB", "rate_mbit": 5.0, "delay_ms": 150.0, "queue_kib": 128},
)
RELAY_SOCK_KIB = 32
PING_INTERVAL = 0.1
SERIES_STEP = 0.05  # seconds between the points of a byte-count series
PATHS = ("ours", "ssh -R")
TARGET_P50, TARGET_P99, TARGET_SHARE, TARGET_SHARE_BOTH = 1.5, 2.0, 0.85, 0.70


# ---------------------------------------------------------------- workers (separate processes)


def _series_point(series: list[tuple[float, int]], total: int, last: float) -> float:
    now = time.monotonic()
    if now - last >= SERIES_STEP:
        series.append((now, total))
        return now
    return last


def work_pings(ep: dict[str, Any], seconds: float) -> dict[str, Any]:
    """A 64-byte ping every `PING_INTERVAL` whatever the answers do (a slow path gets as many
    pings as a fast one); the echo keeps their order, so the n-th answer is the n-th ping's."""
    sock = open_stream(ep, timeout=30)
    sent: list[float] = []
    samples: list[tuple[float, float]] = []
    with sock:
        start = time.monotonic()
        count = int(seconds / PING_INTERVAL)

        def sender() -> None:
            for i in range(count):
                time.sleep(max(0.0, start + i * PING_INTERVAL - time.monotonic()))
                sent.append(time.monotonic())
                sock.sendall(PING)

        thread = threading.Thread(target=sender, daemon=True)
        thread.start()
        for i in range(count):
            got = 0
            while got < len(PING):
                b = sock.recv(len(PING) - got)
                if not b:
                    raise OSError("echo closed")
                got += len(b)
            samples.append((sent[i], time.monotonic() - sent[i]))
        thread.join(timeout=30)
    return {"start": start, "end": start + seconds, "samples": samples}


def work_download(ep: dict[str, Any], seconds: float) -> dict[str, Any]:
    sock = open_stream(ep, timeout=30)
    buf = bytearray(256 * 1024)
    total = 0
    series: list[tuple[float, int]] = []
    with sock:
        sock.sendall(COUNT.pack(1 << 62))
        start = last = time.monotonic()
        series.append((start, 0))
        while time.monotonic() < start + seconds:
            n = sock.recv_into(buf)
            if not n:
                raise OSError("source closed")
            total += n
            last = _series_point(series, total, last)
    return {"start": start, "end": time.monotonic(), "series": series}


def work_upload(ep: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Upload for `seconds`, half-close, and return the sink's own series of received bytes."""
    sock = open_stream(ep, timeout=120)
    block = bytes(64 * 1024)
    with sock:
        start = time.monotonic()
        while time.monotonic() < start + seconds:
            sock.sendall(block)
        end = time.monotonic()
        sock.shutdown(socket.SHUT_WR)
        reply = bytearray()
        while chunk := sock.recv(65536):
            reply += chunk
    return {"start": start, "end": end, "series": json.loads(reply)}


def serve_sink(port: int) -> None:
    """The timestamping sink: per connection, reads until EOF while keeping a series of the
    bytes received, then answers the series (JSON) and closes. READY <port> once listening."""
    lst = socket.create_server(("127.0.0.1", port))
    print(f"READY {lst.getsockname()[1]}", flush=True)

    def one(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(600)
            buf = bytearray(256 * 1024)
            total = 0
            series: list[tuple[float, int]] = [(time.monotonic(), 0)]
            last = series[0][0]
            while n := conn.recv_into(buf):
                total += n
                if len(series) < 200_000:
                    last = _series_point(series, total, last)
            series.append((time.monotonic(), total))
            conn.sendall(json.dumps(series).encode())

    while True:
        conn, _ = lst.accept()
        threading.Thread(target=one, args=(conn,), daemon=True).start()


def worker_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.wan_qos")
    ap.add_argument("mode", choices=["pings", "download", "upload", "sink"])
    ap.add_argument("--endpoint", default="{}")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    if args.mode == "sink":
        serve_sink(args.port)
        return 0
    work = {"pings": work_pings, "download": work_download, "upload": work_upload}[args.mode]
    try:
        res = work(json.loads(args.endpoint), args.seconds)
    except OSError as exc:
        res = {"error": f"{args.mode}: {exc}"}
    print("RESULT " + json.dumps(res), flush=True)
    return 0


# ---------------------------------------------------------------- one phase


def _run_workers(jobs: dict[str, tuple[dict[str, Any], float]]) -> dict[str, dict[str, Any]]:
    procs = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.wan_qos",
                name,
                "--endpoint",
                json.dumps(ep),
                "--seconds",
                str(seconds),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=REPO,
        )
        for name, (ep, seconds) in jobs.items()
    }
    out: dict[str, dict[str, Any]] = {}
    for name, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=jobs[name][1] + 180)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            out[name] = {"error": f"{name} timed out"}
            continue
        line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
        out[name] = (
            json.loads(line[7:])
            if line
            else {"error": f"{name}: {(stderr.strip().splitlines() or ['no output'])[-1]}"}
        )
    return out


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))]


def _rate(series: list[list[float]], t0: float, t1: float) -> float | None:
    """Bytes per second of a (time, total) series between t0 and t1 (nearest points inside)."""
    inside = [(t, b) for t, b in series if t0 <= t <= t1]
    if len(inside) < 2 or inside[-1][0] - inside[0][0] < 0.5:
        return None
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def pacing_status(admin: dict[str, int]) -> dict[str, Any]:
    """The pacing fields of each side's `/status` (ours only): state, queueing delay, rate."""
    out: dict[str, Any] = {}
    for side, port in admin.items():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as resp:
                doc = json.load(resp)
        except (OSError, ValueError) as exc:
            out[side] = {"error": str(exc)}
            continue
        (tunnel,) = doc.get("tunnels") or doc.get("edges") or [{}]
        out[side] = {
            k: tunnel.get(k) for k in ("pacing", "queue_delay_ms", "paced_rate_bps", "base_rtt_ms")
        }
    return out


def phase(
    eps: dict[str, dict[str, Any]],
    down: bool,
    up: bool,
    seconds: float,
    warm: float,
    admin: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One phase; with `admin` (ours), the sides' pacing status near its end is kept too."""
    jobs: dict[str, tuple[dict[str, Any], float]] = {"pings": (eps["echo"], seconds)}
    if down:
        jobs["download"] = (eps["source"], seconds + 0.5)
    if up:
        jobs["upload"] = (eps["sink"], seconds + 0.5)
    status: dict[str, Any] = {}
    timer = None
    if admin:
        timer = threading.Timer(seconds - 1.0, lambda: status.update(pacing_status(admin)))
        timer.start()
    res = _run_workers(jobs)
    if timer is not None:
        timer.join()
    errors = [r["error"] for r in res.values() if "error" in r]
    if errors:
        return {"error": "; ".join(errors)}
    t0 = max(r["start"] for r in res.values()) + warm
    t1 = min(r["end"] for r in res.values()) - 0.2
    rtts = [rtt for t, rtt in res["pings"]["samples"] if t0 <= t <= t1]
    if len(rtts) < 10:
        return {"error": f"only {len(rtts)} pings in the measured window"}
    out: dict[str, Any] = {
        "rtt_p50_ms": _pct(rtts, 0.5) * 1000,
        "rtt_p99_ms": _pct(rtts, 0.99) * 1000,
        "pings": len(rtts),
        "window_s": t1 - t0,
    }
    if status:
        out["pacing"] = status
    for name in ("download", "upload"):
        if name in res:
            rate = _rate(res[name]["series"], t0, t1)
            out[f"{name}_MBps"] = None if rate is None else rate / 1e6
    return out


# ---------------------------------------------------------------- the axis


def measure(bench: Bench) -> dict[str, Any]:
    """Every profile, each path in turn (never at once: they would share the CPU), rounds as
    the run's; the links and the WAN variants of the paths are torn down after each profile."""
    from benchmarks.paths import (  # noqa: PLC0415  (no cycle at import)
        Link,
        Ours,
        PathUnavailable,
        SshR,
    )

    cleanup = bench.cleanup
    d = cleanup.tempdir("wan-qos")
    _, sink_port = cleanup.spawn_ready(
        "wan-qos-sink", [sys.executable, "-m", "benchmarks.wan_qos", "sink"], d / "sink.log"
    )
    paths = {
        "ours": next((p for p in bench.paths if isinstance(p, Ours) and p.name == "ours"), None),
        "ssh -R": next((p for p in bench.paths if isinstance(p, SshR)), None),
    }
    chosen = [p for p in PROFILES if bench.args.wan_qos_profile.lower() in p["name"].lower()]
    quick = bench.args.quick
    rounds = bench.args.rounds
    results: dict[str, Any] = {"profiles": [], "rounds": rounds, "quick": quick}
    for prof in chosen:
        long_path = prof["delay_ms"] >= 100
        seconds = (8.0 if quick else 12.0) + (4.0 if long_path else 0.0)
        warm = 3.0 + (3.0 if long_path else 0.0)
        entry: dict[str, Any] = {**prof, "link_MBps": prof["rate_mbit"] / 8, "paths": {}}
        for name, pth in paths.items():
            if name not in bench.args.wan_qos_paths:
                continue
            if pth is None:
                entry["paths"][name] = {"error": "path not available"}
                continue
            bench.log(f"wan_qos: {prof['name']}: {name}")
            try:
                link = Link(prof["delay_ms"], prof["rate_mbit"], prof["queue_kib"], RELAY_SOCK_KIB)
                eps, procs = pth.wan_qos_endpoints(link, {"sink": sink_port})
            except (PathUnavailable, RuntimeError) as exc:
                entry["paths"][name] = {"error": str(exc)}
                continue
            samples: dict[str, list[dict[str, Any]]] = {}
            try:
                for rnd in range(rounds):
                    for ph, down, up, secs in (
                        ("idle", False, False, 6.0),
                        ("down", True, False, seconds),
                        ("up", False, True, seconds),
                        ("both", True, True, seconds),
                    ):
                        r = phase(
                            eps,
                            down,
                            up,
                            secs,
                            1.0 if ph == "idle" else warm,
                            getattr(pth, "qos_admin", None) if name == "ours" else None,
                        )
                        samples.setdefault(ph, []).append(r)
                        bench.log(f"  round {rnd + 1} {ph:<4} {_brief(r)}")
            finally:
                for proc in reversed(procs):
                    cleanup.stop(proc)
            entry["paths"][name] = summarise(samples, entry["link_MBps"])
        results["profiles"].append(entry)
    return results


def _brief(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"ERROR {r['error']}"
    parts = [f"rtt p50 {r['rtt_p50_ms']:.1f} p99 {r['rtt_p99_ms']:.1f} ms"]
    parts += [
        f"{k.split('_')[0]} {r[k]:.2f} MB/s"
        for k in ("download_MBps", "upload_MBps")
        if r.get(k) is not None
    ]
    for side, st in r.get("pacing", {}).items():
        parts.append(f"{side} {st.get('pacing')} qd {st.get('queue_delay_ms')} ms")
    return ", ".join(parts)


def summarise(samples: dict[str, list[dict[str, Any]]], link: float) -> dict[str, Any]:
    """Medians over rounds per phase and the targets' verdicts."""

    def med(ph: str, key: str) -> float | None:
        vals = [r[key] for r in samples.get(ph, []) if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    out: dict[str, Any] = {"idle_p50_ms": med("idle", "rtt_p50_ms")}
    errors = [r["error"] for rs in samples.values() for r in rs if "error" in r]
    if errors:
        out["errors"] = errors
    idle = out["idle_p50_ms"]
    for ph in ("down", "up", "both"):
        p50, p99 = med(ph, "rtt_p50_ms"), med(ph, "rtt_p99_ms")
        row: dict[str, Any] = {"rtt_p50_ms": p50, "rtt_p99_ms": p99}
        share_target = TARGET_SHARE_BOTH if ph == "both" else TARGET_SHARE
        for key in ("download_MBps", "upload_MBps"):
            if (ph, key) in (("down", "upload_MBps"), ("up", "download_MBps")):
                continue
            v = med(ph, key)
            row[key] = v
            row[key.replace("MBps", "share")] = None if v is None else v / link
        met = {}
        if idle and p50 is not None and p99 is not None and ph != "both":
            # (the two-way phase's target is throughput only; its RTT crosses two queues)
            met["p50"] = p50 <= TARGET_P50 * idle
            met["p99"] = p99 <= TARGET_P99 * idle
        shares = [row[k] for k in ("download_share", "upload_share") if row.get(k) is not None]
        if shares:
            met["share"] = all(s >= share_target for s in shares)
        row["met"] = met
        out[ph] = row
    return out


def markdown(res: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## wan_qos: interactive latency while bulk fills a thin link",
        "",
        f"Medians over {res['rounds']} round(s). Pings: 64 bytes every 100 ms on their own "
        "stream. Shares: bytes delivered at the receiver over the link's rate. Targets: p50 ≤ "
        f"{TARGET_P50}× idle p50, p99 ≤ {TARGET_P99}× idle p50, bulk ≥ {TARGET_SHARE:.0%} "
        f"(two-way: ≥ {TARGET_SHARE_BOTH:.0%} each way; its RTT is shown, not judged).",
        "",
        "| link | path | idle p50 | down p50 / p99 | down share | up p50 / p99 | up share "
        "| both p50 / p99 | both down / up share | targets met |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def ms(v: float | None) -> str:
        return "—" if v is None else f"{v:.0f}"

    def pc(v: float | None) -> str:
        return "—" if v is None else f"{v:.0%}"

    for prof in res["profiles"]:
        for name in PATHS:
            e = prof["paths"].get(name, {})
            if "idle_p50_ms" not in e:
                lines.append(f"| {prof['name']} | {name} | {e.get('error', '—')} |||||||| |")
                continue
            dn, up, both = e["down"], e["up"], e["both"]
            verdicts = [
                f"{ph} {k}" for ph in ("down", "up", "both") for k, ok in e[ph]["met"].items() if ok
            ]
            missed = [
                f"{ph} {k}"
                for ph in ("down", "up", "both")
                for k, ok in e[ph]["met"].items()
                if not ok
            ]
            met = f"{len(verdicts)}/{len(verdicts) + len(missed)}" + (
                f" (missed: {', '.join(missed)})" if missed else ""
            )
            lines.append(
                f"| {prof['name']} | {name} | {ms(e['idle_p50_ms'])} ms "
                f"| {ms(dn['rtt_p50_ms'])} / {ms(dn['rtt_p99_ms'])} ms | {pc(dn['download_share'])} "
                f"| {ms(up['rtt_p50_ms'])} / {ms(up['rtt_p99_ms'])} ms | {pc(up['upload_share'])} "
                f"| {ms(both['rtt_p50_ms'])} / {ms(both['rtt_p99_ms'])} ms "
                f"| {pc(both['download_share'])} / {pc(both['upload_share'])} | {met} |"
            )
    return lines


if __name__ == "__main__":
    sys.exit(worker_main())
