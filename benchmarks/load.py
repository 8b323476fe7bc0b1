"""Measuring clients, one measurement per process (so a client never shares a GIL with a server).

    python -m benchmarks.load MODE --endpoint JSON [options]

``--endpoint`` is ``{"addr": [host, port], "connect": "name:port" | null}``: with ``connect`` set,
the client speaks HTTP CONNECT to ``addr`` first (``CONNECT name:port HTTP/1.1``, reads up to the
blank line, requires `` 200 ``) and then uses the socket as a byte pipe. The result is one JSON
object on stdout. Blocking sockets with 256 KiB buffers, ``sendall`` / ``recv_into``.

Modes:
- ``upload``    send ``--bytes`` to the sink, half-close, wait for the sink's byte count.
- ``download``  ask the source for ``--bytes`` and read them all.
- ``rtt``       ``--count`` 64-byte ping-pongs on one echo stream after ``--warmup`` ones.
- ``setup``     ``--count`` times: new connection (+ CONNECT) + one 64-byte round trip, sequentially.
- ``parallel``  ``--streams`` connections, all established first, then each uploads ``--bytes``.
- ``parallel-download``  the same, each downloading ``--bytes`` from the source.
- ``bulk``      download from the source until stdin closes (or ``--max-seconds``), printing
                ``STARTED`` once data flows; used as background load for the fairness axis.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

BUF = 256 * 1024
COUNT = struct.Struct("!Q")
PING = b"p" * 64
TIMEOUT = 60.0  # per blocking socket operation: a stalled path fails, it does not hang


class ProxyError(Exception):
    pass


def open_stream(endpoint: dict[str, Any], timeout: float = TIMEOUT) -> socket.socket:
    host, port = endpoint["addr"]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUF)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUF)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
        sock.connect((host, port))
        target = endpoint.get("connect")
        if target:
            sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                # Byte by byte: nothing after the header may be consumed from the pipe.
                b = sock.recv(1)
                if not b:
                    raise ProxyError(f"proxy closed during CONNECT {target}: {head!r}")
                head += b
                if len(head) > 16384:
                    raise ProxyError("CONNECT answer header too long")
            status = head.split(b"\r\n", 1)[0]
            if b" 200 " not in status + b" ":
                raise ProxyError(f"CONNECT {target}: {status.decode(errors='replace')}")
        return sock
    except BaseException:
        sock.close()
        raise


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    n = len(view)
    while got < n:
        r = sock.recv_into(view[got:])
        if r == 0:
            raise EOFError(f"EOF after {got} of {n} bytes")
        got += r


CHUNK = memoryview(b"\xa5" * BUF)


def upload_to_sink(sock: socket.socket, nbytes: int) -> None:
    """Send `nbytes`, half-close, and require the sink's count to be `nbytes`."""
    left = nbytes
    while left > 0:
        n = min(left, BUF)
        sock.sendall(CHUNK[:n])
        left -= n
    sock.shutdown(socket.SHUT_WR)
    ack = bytearray(COUNT.size)
    recv_exact_into(sock, memoryview(ack))
    (got,) = COUNT.unpack(ack)
    if got != nbytes:
        raise RuntimeError(f"sink counted {got} bytes, sent {nbytes}")


def download_from_source(sock: socket.socket, nbytes: int) -> None:
    """Ask the source for `nbytes` and read exactly that many."""
    buf = bytearray(BUF)
    sock.sendall(COUNT.pack(nbytes))
    got = 0
    while got < nbytes:
        r = sock.recv_into(buf)
        if r == 0:
            raise EOFError(f"source EOF after {got} of {nbytes} bytes")
        got += r


def do_upload(ep: dict[str, Any], nbytes: int) -> dict[str, Any]:
    return _timed(ep, nbytes, upload_to_sink)


def do_download(ep: dict[str, Any], nbytes: int) -> dict[str, Any]:
    return _timed(ep, nbytes, download_from_source)


def _timed(
    ep: dict[str, Any], nbytes: int, transfer: Callable[[socket.socket, int], None]
) -> dict[str, Any]:
    with open_stream(ep) as sock:
        t0 = time.perf_counter()
        transfer(sock, nbytes)
        dt = time.perf_counter() - t0
    return {"bytes": nbytes, "seconds": dt, "MBps": nbytes / dt / 1e6}


def pct(sorted_vals: list[float], p: float) -> float:
    if not sorted_vals:
        return float("nan")
    k = min(len(sorted_vals) - 1, max(0, round(p / 100 * (len(sorted_vals) - 1))))
    return sorted_vals[k]


def ping(sock: socket.socket, view: memoryview) -> None:
    sock.sendall(PING)
    recv_exact_into(sock, view)


def do_rtt(ep: dict[str, Any], count: int, warmup: int, raw: bool) -> dict[str, Any]:
    back = memoryview(bytearray(64))
    samples: list[float] = []
    sock = open_stream(ep)
    with sock:
        for _ in range(warmup):
            ping(sock, back)
        clock = time.perf_counter_ns
        for _ in range(count):
            t0 = clock()
            ping(sock, back)
            samples.append((clock() - t0) / 1000.0)
    s = sorted(samples)
    out: dict[str, Any] = {
        "count": count,
        "p50_us": pct(s, 50),
        "p99_us": pct(s, 99),
        "mean_us": statistics.fmean(s),
        "max_us": s[-1],
    }
    if raw:
        out["samples_us"] = [round(x, 1) for x in samples]
    return out


def do_setup(ep: dict[str, Any], count: int) -> dict[str, Any]:
    back = memoryview(bytearray(64))
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(count):
        t0 = time.perf_counter()
        sock = open_stream(ep, timeout=30.0)
        with sock:
            ping(sock, back)
        times.append((time.perf_counter() - t0) * 1000.0)
    total = time.perf_counter() - start
    s = sorted(times)
    return {
        "count": count,
        "seconds": total,
        "conn_per_s": count / total,
        "p50_ms": pct(s, 50),
        "p99_ms": pct(s, 99),
        "samples_ms": [round(x, 3) for x in times],
    }


def do_parallel(
    ep: dict[str, Any], streams: int, nbytes: int, download: bool = False
) -> dict[str, Any]:
    socks = [open_stream(ep) for _ in range(streams)]
    barrier = threading.Barrier(streams + 1)
    ends: list[float] = [0.0] * streams
    errors: list[str] = []

    def worker(i: int, sock: socket.socket) -> None:
        try:
            barrier.wait()
            (download_from_source if download else upload_to_sink)(sock, nbytes)
            ends[i] = time.perf_counter()
        except Exception as exc:  # reported below, the run goes on
            errors.append(f"stream {i}: {exc!r}")
        finally:
            sock.close()

    threads = [threading.Thread(target=worker, args=(i, s)) for i, s in enumerate(socks)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(
            "; ".join(errors[:3]) + (f" (+{len(errors) - 3} more)" if len(errors) > 3 else "")
        )
    total = nbytes * streams
    dt = max(ends) - t0
    per = sorted(e - t0 for e in ends)
    return {
        "streams": streams,
        "bytes": total,
        "seconds": dt,
        "MBps": total / dt / 1e6,
        "first_done_s": per[0],
        "last_done_s": per[-1],
    }


def do_bulk(ep: dict[str, Any], max_seconds: float) -> dict[str, Any]:
    stop = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    buf = bytearray(BUF)
    sock = open_stream(ep)
    got = 0
    announced = False
    with sock:
        t0 = time.perf_counter()
        sock.sendall(COUNT.pack(1 << 50))
        while not stop.is_set() and time.perf_counter() - t0 < max_seconds:
            r = sock.recv_into(buf)
            if r == 0:
                break
            got += r
            if not announced and got >= 4 * BUF:
                print("STARTED", flush=True)
                announced = True
        dt = time.perf_counter() - t0
    return {"bytes": got, "seconds": dt, "MBps": got / dt / 1e6}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "mode",
        choices=["upload", "download", "rtt", "setup", "parallel", "parallel-download", "bulk"],
    )
    ap.add_argument("--endpoint", required=True, help="JSON endpoint description")
    ap.add_argument("--bytes", type=int, default=64 << 20)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--max-seconds", type=float, default=60.0)
    ap.add_argument("--raw", action="store_true", help="include every RTT sample")
    args = ap.parse_args(argv)
    ep = json.loads(args.endpoint)
    try:
        if args.mode == "upload":
            res = do_upload(ep, args.bytes)
        elif args.mode == "download":
            res = do_download(ep, args.bytes)
        elif args.mode == "rtt":
            res = do_rtt(ep, args.count, args.warmup, args.raw)
        elif args.mode == "setup":
            res = do_setup(ep, args.count)
        elif args.mode in ("parallel", "parallel-download"):
            res = do_parallel(
                ep, args.streams, args.bytes, download=args.mode == "parallel-download"
            )
        else:
            res = do_bulk(ep, args.max_seconds)
    except (OSError, EOFError, ProxyError, RuntimeError) as exc:
        res = {"error": f"{type(exc).__name__}: {exc}"}
    print("RESULT " + json.dumps(res), flush=True)
    return 0 if "error" not in res else 1


if __name__ == "__main__":
    sys.exit(main())
