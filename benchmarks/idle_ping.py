"""Idle-ping axis: tunnel-cloud's CPU per ping answered on an idle tunnel.

    python -m benchmarks.idle_ping [--tunnels 1000] [--rate 500] [--windows 5] [--window 4]
        [--warmup 4] [--profile cloud.txt] [--server cloud|session|bare]

What an idle fleet costs a replica is almost all pings: every idle edge pings after
`ping_interval` of silence and the cloud answers (and pings each idle tunnel once every
`ping_policy.RTT_REFRESH` intervals for its RTT). This measures that cost alone, per ping:

- the real `kins-tunnel cloud` process (`benchmarks.scale.cloud_process`: mutual TLS on
  127.0.0.1, the same `TunnelSide`/`Session`/`TLSSocket` stack it runs in production) holds
  `--tunnels` idle tunnels;
- this process (a separate one: the cloud's CPU is its own) opens them with tunnel-edge's TLS
  client (`transport.tls_dial.connect_tls`) and the protocol core (`proto.Connection`), answers the
  cloud's pings, and sends PINGs at a fixed aggregate `--rate`, one tunnel after the other, evenly
  spaced (each tunnel pings every `tunnels / rate` seconds, so the cloud never pings of its own
  but for the RTT refresh, as on an idle fleet where the edges ping first);
- after `--warmup` seconds, `--windows` windows of `--window` seconds each: the cloud's CPU time
  (utime + stime from /proc/<pid>/stat, read by this process at the window's edges, so it does
  not depend on what else runs on the machine) divided by the PONGs this process received in the
  window. Reported: the median and range over the windows, in µs of cloud CPU per ping answered,
  the idle CPU that implies at 10,000 edges (7/6 of a ping per edge per `idle_ping_interval`, 60 s:
  `benchmarks/README.md`), the pings unanswered at the end, and the load average.

`--server` says what answers (the same driver and measure for each): `cloud` (the default) the
real tunnel-cloud; `session` the cloud's tunnel code alone (`TunnelSide.serve`: `Session`,
`TLSSocket`, the liveness timer, tunnel-cloud's ping defaults) in a trio process of its own,
without the rest of tunnel-cloud; `bare` the floor under it: per connection a trio task that
reads (`TLSSocket.receive_into`) and answers each PING with its PONG, with no session, protocol
dispatch or timer (what trio, OpenSSL and the kernel cost per wake-up).

The spacing matters: the rate is low enough (2 ms apart at 500/s) that the cloud sleeps between
two pings, so each one is a wake-up of the process, as in a real fleet where every edge pings on
its own clock. `--profile FILE` records the cloud with py-spy during the windows
(`py-spy record --rate 1000 --format raw`, collapsed stacks; on this machine py-spy counts the
waits in `epoll_wait` and the time the process is preempted inside `write` as busy, so compare its
Python frames with each other only; `perf record -g -p PID` gives the true split between the
interpreter, OpenSSL and the kernel).

Bounded: every connect and handshake has a deadline and the whole run ends after warm-up and
windows (plus at most 60 s to connect); the cloud is killed at the end whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio
import trio.lowlevel

from benchmarks.procs import CLK_TCK, wait_port
from benchmarks.scale import cloud_process, fleet_certs
from kins_tunnel.config import TunnelListen
from kins_tunnel.proto import Connection, Hello, MuxConfig, Role
from kins_tunnel.proto.events import PongReceived
from kins_tunnel.testing.support import free_port
from kins_tunnel.tls_contexts import client_ssl_context, server_ssl_context
from kins_tunnel.transport.errors import HandshakeFailed
from kins_tunnel.transport.tls import READ_BATCH, TLSSocket, TransportError
from kins_tunnel.transport.tls_dial import connect_tls
from kins_tunnel.transport.tunnel import TunnelSide

CONNECT_TIMEOUT = 10.0  # seconds for one tunnel's TLS and HELLO exchange
CONNECT_BUDGET = 60.0  # seconds for all of them
CONCURRENT_CONNECTS = 32
CONNECT_ATTEMPTS = 3
CONNECT_LIMIT = 9_000  # tunnels at most: this process holds one descriptor each (limit 20,000)
EDGES_AT_SCALE = 10_000  # the fleet the target is stated for
# an idle edge's ping each idle_ping_interval (60 s), the cloud's own each RTT_REFRESH (6) of them
PINGS_PER_EDGE_PER_S = 7 / 6 / 60.0


@dataclass
class _Counts:
    sent: int = 0
    answered: int = 0
    dropped: int = 0  # tunnels the cloud ended
    retried: int = 0  # connects tried again after a refusal or a timeout
    tunnels: list[tuple[TLSSocket, Connection]] = field(default_factory=list)


def _flush(tls: TLSSocket, conn: Connection) -> None:
    """Hand the connection's output to the socket (a few dozen bytes: the socket takes them)."""
    out = conn.data_to_send()
    if out and not tls.send_chunk(out):
        raise TransportError("socket full while idle")


def _cpu(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of process `pid` so far (/proc/<pid>/stat utime, stime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


async def _tunnel(
    port: int,
    ctx: ssl.SSLContext,
    counts: _Counts,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """One idle edge tunnel: HELLO both ways (then `started`), then answer the cloud and count
    PONGs until it ends. The caller sets the deadline of the start."""
    buf = memoryview(bytearray(65536))
    tls = await connect_tls("127.0.0.1", port, ctx, server_hostname="localhost")
    conn = Connection(
        Role.CLIENT, Hello(names=("idle-ping.kins-system:443",)), clock=time.monotonic
    )
    started = False
    try:
        _flush(tls, conn)
        while True:
            n = tls.receive_into(buf)
            if n is None:
                await tls.wait_readable()
                continue
            if n == 0:
                counts.dropped += started
                return
            for event in conn.receive_data(buf[:n]):
                if isinstance(event, PongReceived):
                    counts.answered += 1
            _flush(tls, conn)
            if conn.is_open and not started:
                started = True
                counts.tunnels.append((tls, conn))
                task_status.started()
    finally:
        tls.close()


async def _connect(
    nursery: trio.Nursery, port: int, ctx: ssl.SSLContext, counts: _Counts, limit: trio.Semaphore
) -> None:
    """Open one tunnel (started in `nursery`), trying again after a refusal (the cloud sheds
    handshakes beyond its bound) up to `CONNECT_ATTEMPTS` times."""
    for attempt in range(CONNECT_ATTEMPTS):
        try:
            async with limit:
                with trio.fail_after(CONNECT_TIMEOUT):
                    await nursery.start(_tunnel, port, ctx, counts)
            return
        except (TransportError, trio.TooSlowError):
            if attempt == CONNECT_ATTEMPTS - 1:
                raise
            counts.retried += 1
            await trio.sleep(0.5)


async def drive(
    port: int,
    cloud_pid: int,
    certs: Path,
    *,
    tunnels: int,
    rate: float,
    warmup: float,
    windows: int,
    window: float,
    profile: Path | None,
) -> dict[str, object]:
    """Open `tunnels` tunnels to the cloud on `port`, ping at `rate`, measure the cloud's CPU
    per ping answered over `windows` windows after `warmup` (see the module)."""
    ctx = client_ssl_context(certs / "ca.crt", certs / "edge-edge1.crt", certs / "edge-edge1.key")
    counts = _Counts()
    limit = trio.Semaphore(CONCURRENT_CONNECTS)
    per_window: list[float] = []
    pinged_per_s: list[float] = []
    user_share: list[float] = []  # of the cloud's CPU in each window, the share in user space
    spy: subprocess.Popen[bytes] | None = None
    async with trio.open_nursery() as nursery:
        t0 = time.monotonic()
        with trio.fail_after(CONNECT_BUDGET):
            async with trio.open_nursery() as connecting:
                for _ in range(tunnels):
                    connecting.start_soon(_connect, nursery, port, ctx, counts, limit)
                    await trio.lowlevel.checkpoint()
        connect_s = time.monotonic() - t0

        async def pinger() -> None:
            i = 0
            start = trio.current_time()
            while True:
                await trio.sleep_until(start + i / rate)
                tls, conn = counts.tunnels[i % len(counts.tunnels)]
                i += 1
                if conn.is_open:
                    conn.ping()
                    counts.sent += 1
                    try:
                        _flush(tls, conn)
                    except TransportError:
                        counts.dropped += 1

        nursery.start_soon(pinger)
        await trio.sleep(warmup)
        if profile is not None:
            spy = subprocess.Popen(
                ["py-spy", "record", "--rate", "1000", "--format", "raw"]
                + ["--pid", str(cloud_pid), "--output", str(profile)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            await trio.sleep(1)  # py-spy attaches
        for _ in range(windows):
            (user0, sys0), a0, w0 = _cpu(cloud_pid), counts.answered, time.monotonic()
            await trio.sleep(window)
            (user, sys_), answered = _cpu(cloud_pid), max(counts.answered - a0, 1)
            pinged_per_s.append(answered / (time.monotonic() - w0))
            per_window.append((user - user0 + sys_ - sys0) / answered * 1e6)
            user_share.append((user - user0) / max(user - user0 + sys_ - sys0, 1e-9))
        if spy is not None:
            spy.send_signal(signal.SIGINT)
        nursery.cancel_scope.cancel()
    if spy is not None:
        spy.wait(30)
    unanswered = counts.sent - counts.answered
    median = statistics.median(per_window)
    return {
        "tunnels": len(counts.tunnels),
        "connect_s": round(connect_s, 1),
        "pings_answered_per_s": round(statistics.median(pinged_per_s), 1),
        "cloud_us_per_ping_median": round(median, 1),
        "cloud_us_per_ping_min_max": [round(min(per_window), 1), round(max(per_window), 1)],
        "cloud_us_per_ping_windows": [round(v, 1) for v in per_window],
        "cloud_user_share": round(statistics.median(user_share), 2),
        # a ping still in flight when the run stopped counts here too: a handful at most
        "pings_unanswered_at_end": unanswered,
        "tunnels_dropped": counts.dropped,
        "connects_retried": counts.retried,
        "implied_idle_cpu_pct_at_10k": round(
            median * 1e-6 * EDGES_AT_SCALE * PINGS_PER_EDGE_PER_S * 100, 2
        ),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


# ----------------------------------------------------------------------------- other servers
async def _bare_tunnel(sock: socket.socket, ctx: ssl.SSLContext, buf: memoryview) -> None:
    """The floor under the cloud's tunnel code: TLS (`TLSSocket`), the HELLO exchange, then per
    wake-up one read and, for a PING, its PONG written back; no session, no liveness timer.
    `buf`: the read buffer every connection shares (as sessions share theirs)."""
    tls = TLSSocket.wrap(sock, ctx, server_side=True)
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            await tls.do_handshake()
            conn = Connection(Role.SERVER, Hello())
            _flush(tls, conn)
            while not conn.is_open:
                n = tls.receive_into(buf)
                if n is None:
                    await tls.wait_readable()
                    continue
                if n == 0:
                    return
                conn.receive_data(buf[:n])
            _flush(tls, conn)
        while True:
            await tls.wait_readable()
            n = tls.receive_into(buf)
            if n == 0:
                return
            if n is not None and (pong := conn.answer_lone_ping(buf[:n])) is not None:
                tls.send_chunk(pong)
    except TransportError:
        return
    finally:
        tls.close()


async def _serve(kind: str, port: int, certs: Path) -> None:
    """Tunnels of `kind` on 127.0.0.1:`port`: `session` runs the cloud's own tunnel
    (`TunnelSide.serve` with tunnel-cloud's ping defaults) without the rest of tunnel-cloud;
    `bare` runs `_bare_tunnel`. Until killed."""
    ctx = server_ssl_context(certs / "ca.crt", certs / "cloud.crt", certs / "cloud.key")
    defaults = TunnelListen()  # tunnel-cloud's `tunnel:` section as shipped
    side = TunnelSide(
        Role.SERVER, MuxConfig(), defaults.ping_interval, defaults.ping_timeout, lambda *_: None
    )

    shared = memoryview(bytearray(READ_BATCH))

    async def one(sock: socket.socket) -> None:
        if kind == "bare":
            await _bare_tunnel(sock, ctx, shared)
            return
        tls = TLSSocket.wrap(sock, ctx, server_side=True)
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                await tls.do_handshake()
            await side.serve(
                tls,
                Hello(),
                label="idle-ping",
                handshake_timeout=CONNECT_TIMEOUT,
                on_up=lambda _: None,
            )
        except (TransportError, HandshakeFailed, trio.TooSlowError):
            pass
        finally:
            tls.close()

    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", port))
    listener.listen(1024)
    async with trio.open_nursery() as nursery:
        while True:
            accepted, _ = await listener.accept()
            nursery.start_soon(one, socket.socket(fileno=accepted.detach()))


def _server_process(kind: str, base: Path, certs: Path, port: int) -> subprocess.Popen[bytes]:
    """The server under test, in a process of its own, listening on `port` when this returns."""
    if kind == "cloud":
        return cloud_process(base, certs, port, free_port(), 2 * CONNECT_LIMIT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.idle_ping", "serve", kind, str(port), str(certs)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if not wait_port(port, 20, proc):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the {kind} server did not start")
    return proc


def run(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="kins-idle-ping-") as tmp:
        base = Path(tmp)
        certs = fleet_certs(base)
        tport = free_port()
        server = _server_process(args.server, base, certs, tport)
        try:
            return {"server": args.server} | trio.run(
                lambda: drive(
                    tport,
                    server.pid,
                    certs,
                    tunnels=args.tunnels,
                    rate=args.rate,
                    warmup=args.warmup,
                    windows=args.windows,
                    window=args.window,
                    profile=args.profile,
                )
            )
        finally:
            server.send_signal(signal.SIGKILL)
            server.wait()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        trio.run(_serve, argv[1], int(argv[2]), Path(argv[3]))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--tunnels", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=500.0, help="pings per second, all tunnels")
    ap.add_argument("--warmup", type=float, default=4.0, help="seconds pinging before measuring")
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--window", type=float, default=4.0, help="seconds per window")
    ap.add_argument("--profile", type=Path, default=None, help="py-spy the server into FILE")
    ap.add_argument(
        "--server",
        choices=("cloud", "session", "bare"),
        default="cloud",
        help="what answers: tunnel-cloud, its tunnel code alone, or TLS alone (see the module)",
    )
    args = ap.parse_args(argv)
    if args.tunnels > CONNECT_LIMIT:
        ap.error(f"--tunnels: at most {CONNECT_LIMIT} (the open-file limit)")
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
