"""Where an idle tunnel's memory goes on the cloud: RSS, Python objects and OpenSSL, per tunnel.

    python -m benchmarks.idlemem [--edges 2000] [--workers 4] [--settle 5] [--trace] [--top 25]
    python -m benchmarks.idlemem --openssl    # OpenSSL's share alone, in-process (`openssl_costs`)

One tunnel-cloud process (the real `Cloud` of `kins-tunnel cloud`, with its config and its
listeners; this module's `cloud` mode only adds a SIGUSR1 handler that writes a report) and N
simulated edges from `benchmarks.scale`'s worker processes (tunnel-edge's TLS client and tunnel).
The cloud reports once before any edge and once after all N are up and have idled `settle`
seconds; every figure is the difference of the two divided by the tunnels the cloud holds:

- `rss_kib`: resident memory (VmRSS);
- `malloc_in_use_kib` / `malloc_free_kib`: glibc's heap in use and free inside it (`mallinfo2`:
  `uordblks + hblkhd` and `fordblks`). Python's own small objects live in pymalloc's arenas
  (mmap, not malloc); the C library's heap holds OpenSSL's state and Python's objects over
  512 bytes;
- `python_large_objects_kib`: Python objects over 512 bytes (`sys.getsizeof` of the objects the
  garbage collector tracks: coroutines with their frames, dicts with their tables), which
  pymalloc hands to malloc; `openssl_kib`: malloc in use minus those (untraced runs only), i.e.
  what C code holds, on an idle tunnel OpenSSL's connection state;
- `objects`: live objects per tunnel by type (those the garbage collector tracks);
- with `--trace` (tracemalloc on from the start, 12 frames; it slows the cloud and adds its own
  memory, so the RSS of a traced run is not the figure of record): `python_kib` (traced bytes:
  every Python allocation), `python_over_512_kib`, and the traced bytes per tunnel by the
  allocating line (`by_line`: the innermost frame) and by the innermost frame in `kins_tunnel`
  (`by_caller`: which of the product's lines made a trio or library object).

A report is taken after a full garbage collection (`gc.collect()`), so it counts what the tunnels
hold, not garbage waiting for the collector.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import gc
import json
import os
import signal
import ssl
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import trio

from benchmarks.scale import (
    cloud_process,
    fleet_arguments,
    fleet_certs,
    kill_all,
    metric_values,
    scrape,
    start_workers,
    wait_up,
)
from kins_tunnel.testing.support import free_port, rss_kib
from kins_tunnel.tls_contexts import client_ssl_context, server_ssl_context
from kins_tunnel.transport.tls import HANDSHAKE_PIECE, READ_PIECE, WRITE_PIECE

FRAMES = 12  # traceback depth kept by tracemalloc (`by_caller` looks through it)
PYMALLOC_MAX = 512  # blocks up to this size come from pymalloc's arenas, larger ones from malloc


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def mallinfo() -> dict[str, int]:
    """glibc's heap: bytes in use (`in_use`: heap and mmapped chunks) and free in the heap
    (`free`); empty where the C library has no `mallinfo2`."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return {}
    fn.restype = _MallInfo2
    info = fn()
    return {"in_use": info.uordblks + info.hblkhd, "free": info.fordblks}


def _ours(tb: tracemalloc.Traceback) -> str:
    """The innermost frame of `tb` in the product's code (else the innermost frame)."""
    for frame in reversed(tb):  # a traceback is ordered oldest frame first
        if f"{os.sep}kins_tunnel{os.sep}" in frame.filename:
            return _where(frame)
    return _where(tb[-1])


def _where(frame: tracemalloc.Frame) -> str:
    parts = Path(frame.filename).parts
    for root in ("kins_tunnel", "trio", "site-packages", "python3.11"):
        if root in parts:
            parts = parts[parts.index(root) :]
            break
    return f"{'/'.join(parts[-3:])}:{frame.lineno}"


def report() -> dict[str, Any]:
    """This process's memory now (see the module docstring)."""
    t0 = time.monotonic()
    gc.collect()
    out: dict[str, Any] = {"rss_kib": rss_kib(), "malloc": mallinfo()}
    objects = gc.get_objects()
    out["objects"] = dict(collections.Counter(type(o).__qualname__ for o in objects))
    sizes = (sys.getsizeof(o) for o in objects)
    out["large_objects"] = sum(size for size in sizes if size > PYMALLOC_MAX)
    del objects
    if tracemalloc.is_tracing():
        snap = tracemalloc.take_snapshot()
        large = sum(t.size for t in snap.traces if t.size > PYMALLOC_MAX)
        by_line: collections.Counter[str] = collections.Counter()
        by_caller: collections.Counter[str] = collections.Counter()
        total = 0
        for stat in snap.statistics("traceback"):  # one per distinct traceback
            total += stat.size
            by_line[_where(stat.traceback[-1])] += stat.size
            by_caller[_ours(stat.traceback)] += stat.size
        out.update(
            traced=total,
            traced_large=large,
            tracemalloc_own=tracemalloc.get_tracemalloc_memory(),
            by_line=dict(by_line),
            by_caller=dict(by_caller),
        )
    out["seconds"] = time.monotonic() - t0
    return out


async def _serve(config: str, out: Path) -> None:
    from kins_tunnel.cloud.server import Cloud
    from kins_tunnel.config import load_cloud_config
    from kins_tunnel.logs import setup_logging

    cfg = load_cloud_config(config)
    setup_logging(cfg.log)
    cloud = Cloud(cfg)
    with trio.open_signal_receiver(signal.SIGUSR1, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(cloud.run)
            n = 0
            async for sig in signals:
                if sig == signal.SIGTERM:
                    nursery.cancel_scope.cancel()
                    return
                n += 1
                tmp = out.with_suffix(".tmp")
                tmp.write_text(json.dumps(report()))
                tmp.rename(out.with_name(f"{out.name}.{n}"))


def _take(cloud_pid: int, out: Path, n: int, timeout: float = 120) -> dict[str, Any]:
    """Ask the cloud for its `n`th report and wait for it."""
    os.kill(cloud_pid, signal.SIGUSR1)
    path = out.with_name(f"{out.name}.{n}")
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no report {n} from the cloud within {timeout:g}s")
        time.sleep(0.1)
    return dict(json.loads(path.read_text()))


def _per(after: dict[str, Any], before: dict[str, Any], n: int, top: int) -> dict[str, float]:
    """(after - before) / n in KiB for the `top` keys that grew most."""
    keys = set(after) | set(before)
    diff = {k: (after.get(k, 0) - before.get(k, 0)) / n / 1024 for k in keys}
    best = sorted(diff.items(), key=lambda kv: -kv[1])[:top]
    return {k: round(v, 3) for k, v in best if v > 0}


def figures(
    before: dict[str, Any], after: dict[str, Any], tunnels: int, top: int
) -> dict[str, Any]:
    """Per-tunnel figures from two reports (see the module docstring)."""
    n = max(tunnels, 1)

    def kib(a: int, b: int) -> float:
        return round((a - b) / n / 1024, 2)

    res: dict[str, Any] = {
        "tunnels": tunnels,
        "rss_kib": round((after["rss_kib"] - before["rss_kib"]) / n, 2),
    }
    m0, m1 = before["malloc"], after["malloc"]
    if m0 and m1:
        res["malloc_in_use_kib"] = kib(m1["in_use"], m0["in_use"])
        res["malloc_free_kib"] = kib(m1["free"], m0["free"])
        if "traced" not in after:  # tracemalloc's own tables are in the C heap too
            res["openssl_kib"] = kib(
                m1["in_use"] - after["large_objects"], m0["in_use"] - before["large_objects"]
            )
    res["python_large_objects_kib"] = kib(after["large_objects"], before["large_objects"])
    if "traced" in after:
        res["python_kib"] = kib(after["traced"], before["traced"])
        res["python_over_512_kib"] = kib(after["traced_large"], before["traced_large"])
        res["by_line"] = _per(after["by_line"], before["by_line"], n, top)
        res["by_caller"] = _per(after["by_caller"], before["by_caller"], n, top)
    counts = {
        k: round((v - before["objects"].get(k, 0)) / n, 2) for k, v in after["objects"].items()
    }
    res["objects"] = dict(
        sorted(((k, v) for k, v in counts.items() if v >= 0.5), key=lambda kv: -kv[1])[:top]
    )
    return res


def _pump(src: ssl.MemoryBIO, dst: ssl.MemoryBIO) -> None:
    """What one side wrote to the other, handed over as `TLSSocket.do_handshake` does (in
    `HANDSHAKE_PIECE`s)."""
    data = src.read()
    for i in range(0, len(data), HANDSHAKE_PIECE):
        dst.write(data[i : i + HANDSHAKE_PIECE])


def _drain(obj: ssl.SSLObject) -> None:
    """Decrypt whatever `obj` has been given."""
    try:
        while obj.read(1 << 20):
            pass
    except ssl.SSLWantReadError:
        pass


def handshaken(
    server: ssl.SSLContext, client: ssl.SSLContext, ticket: ssl.SSLSession | None = None
) -> tuple[
    ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO, ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO
]:
    """A server and a client on memory BIOs (each with its incoming and outgoing BIO), after the
    handshake (the client resuming `ticket` if given) and the client's reading of its ticket."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c = client.wrap_bio(c_in, c_out, server_hostname="localhost", session=ticket)
    for _ in range(4):
        for side in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        _pump(c_out, s_in)
        _pump(s_out, c_in)
    _drain(c)  # the ticket
    return s, s_in, s_out, c, c_in, c_out


def openssl_costs(n: int = 300) -> dict[str, float]:
    """OpenSSL's memory per server connection (the cloud's side of a tunnel), in this process:
    glibc's heap in use (`mallinfo2`) over `n` connections on memory BIOs, divided by `n`, KiB.
    Each case: a bare server object (before any handshake); after a full and after a resumed
    mutual-TLS handshake (with the cloud's own contexts) and a ping's worth of records each way;
    and after a full handshake then one batch of 250,000 bytes sent or received, as a tunnel that
    once carried a bulk transfer has: encrypted `WRITE_PIECE` and decrypted `READ_PIECE` at a
    time, as `TLSSocket` moves a batch through its BIOs (fed whole, a batch stayed allocated in
    them: about 325 KiB sent, 352 KiB received)."""
    with tempfile.TemporaryDirectory(prefix="kins-idlemem-") as tmp:
        certs = fleet_certs(Path(tmp))
        server = server_ssl_context(
            certs / "ca.crt", certs / "cloud.crt", certs / "cloud.key", session_lifetime=3600
        )
        client = client_ssl_context(
            certs / "ca.crt", certs / "edge-edge1.crt", certs / "edge-edge1.key"
        )

        def connection(case: str, ticket: ssl.SSLSession | None) -> object:
            if case == "bare":
                s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
                return server.wrap_bio(s_in, s_out, server_side=True), s_in, s_out
            s, s_in, s_out, c, c_in, c_out = handshaken(server, client, ticket)
            for src, dst, dst_in, src_out in ((c, s, s_in, c_out), (s, c, c_in, s_out)):
                src.write(b"p" * 40)
                dst_in.write(src_out.read())
                _drain(dst)
            batch = memoryview(b"x" * 250_000)
            if case == "sent 250 KB":
                for i in range(0, len(batch), WRITE_PIECE):
                    s.write(batch[i : i + WRITE_PIECE])
                    s_out.read()
            elif case == "received 250 KB":
                c.write(batch)
                records = memoryview(c_out.read())
                for i in range(0, len(records), READ_PIECE):
                    s_in.write(records[i : i + READ_PIECE])
                    _drain(s)
            if case == "first":
                return c.session
            return s, s_in, s_out

        ticket = connection("first", None)
        assert isinstance(ticket, ssl.SSLSession)
        out: dict[str, float] = {}
        for case in ("bare", "full", "resumed", "sent 250 KB", "received 250 KB"):
            gc.collect()
            before = mallinfo()["in_use"]
            kept = [connection(case, ticket if case == "resumed" else None) for _ in range(n)]
            gc.collect()
            out[case] = round((mallinfo()["in_use"] - before) / n / 1024, 2)
            del kept
        return out


def run(
    edges: int,
    workers: int,
    *,
    settle: float = 5.0,
    trace: bool = False,
    top: int = 25,
    timeout: float = 300,
) -> dict[str, Any]:
    """Bring `edges` idle tunnels up on a cloud, let them idle `settle` seconds, and return the
    per-tunnel figures (see the module docstring). Bounded by `timeout` seconds."""
    with tempfile.TemporaryDirectory(prefix="kins-idlemem-") as tmp:
        base = Path(tmp)
        certs = fleet_certs(base)
        tport, aport = free_port(), free_port()
        out = base / "report"
        command = ("-m", "benchmarks.idlemem", "cloud", str(out), "trace" if trace else "-")
        procs = []
        try:
            cloud = cloud_process(
                base,
                certs,
                tport,
                aport,
                edges,
                tunnel={"max_tunnels_per_identity": 2 * edges},
                command=command,
            )
            procs.append(cloud)
            before = _take(cloud.pid, out, 1)
            t0 = time.monotonic()
            edge_procs, reports = start_workers(base, certs, tport, edges, workers, timeout)
            procs += edge_procs
            up, _retries = wait_up(reports, edges, t0 + timeout)
            if up < edges:
                raise RuntimeError(f"only {up} of {edges} tunnels up within {timeout:g}s")
            up_s = time.monotonic() - t0
            time.sleep(settle)
            held = int(metric_values(scrape(aport), "kins_tunnel_tunnels").get("", 0.0))
            after = _take(cloud.pid, out, 2, timeout)
            # a report blocks the cloud (longer with --trace): the tunnels must all be there still
            still = int(metric_values(scrape(aport), "kins_tunnel_tunnels").get("", 0.0))
            res = {
                "edges": edges,
                "traced": trace,
                "up_seconds": round(up_s, 1),
                "settle_s": settle,
                "cloud_rss_before_mib": round(before["rss_kib"] / 1024, 1),
                "cloud_rss_mib": round(after["rss_kib"] / 1024, 1),
                "tunnels_after_report": still,
                "report_seconds": round(after["seconds"], 1),
                **figures(before, after, held, top),
                "loadavg_1m": round(os.getloadavg()[0], 2),
            }
            return res
        finally:
            kill_all(procs)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "cloud":  # cloud REPORT trace|- --config FILE
        if sys.argv[3] == "trace":
            tracemalloc.start(FRAMES)
        trio.run(_serve, sys.argv[5], Path(sys.argv[2]))
        return
    ap = fleet_arguments(__doc__, 2000, 5.0, "seconds idle before the report")
    ap.add_argument("--trace", action="store_true", help="tracemalloc: Python bytes by line")
    ap.add_argument("--top", type=int, default=25, help="lines and types listed")
    ap.add_argument(
        "--openssl", action="store_true", help="OpenSSL's memory per connection, in-process"
    )
    args = ap.parse_args()
    if args.openssl:
        print(json.dumps(openssl_costs(), indent=1))
        return
    res = run(args.edges, args.workers, settle=args.settle, trace=args.trace, top=args.top)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
