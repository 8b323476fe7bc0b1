"""Reconnect storm: N edges on one tunnel-cloud replica that is killed and restarted.

    python -m benchmarks.scale --storm [--edges 5000] [--workers 4] [--no-tickets] [--nice 10]
        [--pin]
        [--profile storm.txt] [--rtt 0.1]

Simulated edges (worker processes, this file's `worker` mode; the open-file limit here is 20,000
per process) dial with the real pieces of tunnel-edge: its reconnect policy
(`edge.reconnect.ReconnectPolicy`: full-jitter backoff, reset after `stable_after` and capped by
the outage's age after it, the cloud's retry-after hint), its TLS client (`transport.tls_dial.connect_tls`, resuming with the cloud's session
ticket; the cloud reads a `tunnel.session_ticket_key_file`, so its restart keeps the ticket key)
and the protocol state machine (`proto.Connection`); then they idle, pinging the cloud every
`idle_ping_interval` (60 s) as tunnel-edge does on an idle tunnel and answering its pings. Every 20th edge is a probe: during the storm, once
up again, it pings every `PROBE_INTERVAL`.

Timeline: the replica starts, all N edges connect; after a settle time the replica's idle cost is
measured (RSS and CPU over `idle_window`); the replica is SIGKILLed and started again at once (as a
supervisor would); the time it starts listening is `t_listen`. Reported, from `t_listen`: the time
until 50 %, 99 % and 100 % of the edges are back, the handshakes per second the replica sustained
(mean over the storm, and the best second), its CPU per handshake, sheds/timeouts (the replica's
`handshake_failures` and what the edges saw), the slowest edge's wait (from the kill), and the ping
RTT of tunnels already back while the storm goes on (p50/p99/max, and pings that went unanswered
longer than the ping timeout). Then every edge leaves, and the replica's descriptors and tasks are
compared with its baseline (leaks). The whole run is bounded by `budget` seconds.

The simulated edges share the machine's cores with the replica, unlike a real fleet (every edge
its own machine). `--nice N` runs the edge workers at a lower CPU priority (`os.nice(N)` in each),
so the replica gets the core a dedicated machine would give it and the edges the rest; a result
says which (`edge_nice`). `--pin` instead gives the replica a core of its own: the replica
(both processes) runs on CPU 0 only, the edge workers and this harness on the others
(`os.sched_setaffinity`; a result says `pinned`). `--profile FILE` records the restarted replica with py-spy from listening
until all edges are back (collapsed stacks, `py-spy record --format raw`).

`--rtt SECONDS` puts a link with that round trip between the edges and the replica: a relay
process (`benchmarks.delayrelay`: half the RTT each way, one epoll loop) that the edges dial
instead of the replica, as a real fleet's edges sit 50-300 ms away. The relay stays up
across the replica's restart (an edge dialling while the replica is down reaches the relay, which
finds nothing upstream and resets the connection: a failed dial, as without it). Its CPU is
reported (`relay_cpu_s`): it shares the cores with the replica and the edges.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import random
import select
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
import trio.lowlevel

from benchmarks.scale import _EDGE as EDGE_DEFAULTS
from benchmarks.scale import cloud_process, fleet_certs, metric_values, scrape
from kins_tunnel.config import Backoff
from kins_tunnel.edge.reconnect import ReconnectPolicy
from kins_tunnel.proto import Connection, Hello, RemoteProtocolError, Role
from kins_tunnel.proto.events import PongReceived
from kins_tunnel.testing.support import free_port, rss_kib
from kins_tunnel.tls_contexts import client_ssl_context
from kins_tunnel.tls_tickets import write_secret
from kins_tunnel.transport.tls import Refused, TLSSocket, TransportError
from kins_tunnel.transport.tls_dial import connect_tls

PROBE_EVERY = 20  # every 20th edge pings the cloud once up
PROBE_INTERVAL = 0.25  # seconds between a probe's pings
# an idle edge pings the cloud this often (tunnel-edge's idle_ping_interval; the kernel's keepalive
# watches the tunnel in between)
EDGE_PING_INTERVAL = EDGE_DEFAULTS.idle_ping_interval
RTT_WINDOW_MIN = 3.0  # RTTs count from listening until all are back, and for at least this long
PING_TIMEOUT = 20.0  # the cloud's default tunnel.ping_timeout: a ping unanswered this long failed
HANDSHAKE_TIMEOUT = 10.0  # the edge's default handshake_timeout
RAMP_RATE = 400.0  # edges per second coming up at first (the storm itself has no ramp)
# The edges' policy: tunnel-edge's defaults, except `stable_after` (60 s) shortened so that the
# run need not hold the fleet for a minute before the kill; the tunnels are older than it then.
BACKOFF = Backoff(stable_after=5.0)


# ----------------------------------------------------------------------------- worker (edges)
@dataclass
class _Record:
    """What one worker saw (monotonic times, comparable across processes)."""

    ups: list[tuple[int, float, bool]]  # (edge, when, resumed)
    downs: list[tuple[int, float]]  # (edge, when) established tunnels that ended
    failures: collections.Counter[str]
    hints: list[float]
    rtts: list[tuple[float, float]]  # (when, rtt) of probe pings
    lost_pings: list[float]  # ages of pings never answered when their tunnel ended
    last_up: dict[int, float]  # edge -> when its tunnel now up came up
    connected: int = 0
    storm: bool = False  # the cloud has been killed: probes ping from now on


async def _read(tls: TLSSocket, buf: memoryview) -> int:
    while True:
        got = tls.receive_into(buf)
        if got is not None:
            return got
        await tls.wait_readable()


async def _send(tls: TLSSocket, conn: Connection) -> None:
    out = conn.data_to_send()
    if out and not tls.send_chunk(out):
        while not tls.flush():
            await tls.wait_writable()


async def _tunnel(
    edge: int, tls: TLSSocket, rec: _Record, probe: bool, tickets: dict[int, ssl.SSLSession]
) -> None:
    """Run one tunnel (HELLO both ways, then answer pings; a probe also pings every
    `PROBE_INTERVAL`) until the cloud ends it. A tunnel that did not resume leaves the ticket the
    cloud issued in `tickets` once up (tunnel-edge keeps one ticket per cloud the same way; taken
    when the tunnel comes up, not when it ends, so that the 5,000 edges' copies of their tickets do
    not all run on the replica's cores at the moment it is killed)."""
    resumed = tls.session_reused
    hello = Hello(names=("scale-svc-kins.kins-system:443",))
    conn = Connection(Role.CLIENT, hello, clock=time.monotonic)
    buf = memoryview(bytearray(65536))
    await _send(tls, conn)
    counted = False
    sent: dict[bytes, float] = {}
    next_ping = math.inf
    try:
        while True:
            n = None
            with trio.move_on_at(trio.current_time() + next_ping - time.monotonic()):
                n = await _read(tls, buf)
            if n == 0:
                return
            if n is not None:
                for event in conn.receive_data(buf[:n]):
                    if isinstance(event, PongReceived) and event.rtt is not None:
                        if sent.pop(event.payload, None) is not None and probe and rec.storm:
                            rec.rtts.append((time.monotonic(), event.rtt))
            if not counted and conn.is_open:
                counted = True
                rec.connected += 1
                rec.ups.append((edge, time.monotonic(), resumed))
                rec.last_up[edge] = time.monotonic()
                if not resumed:  # the ticket came before the cloud's HELLO
                    issued = tls.session
                    if issued is not None and issued.has_ticket:
                        tickets[edge] = issued
                every = PROBE_INTERVAL if probe and rec.storm else EDGE_PING_INTERVAL
                next_ping = time.monotonic() + random.uniform(0, every)
            if time.monotonic() >= next_ping:
                sent[conn.ping()] = time.monotonic()
                # a probe pings often once the storm is on (idle cost is measured before it)
                next_ping += PROBE_INTERVAL if probe and rec.storm else EDGE_PING_INTERVAL
            await _send(tls, conn)
    finally:
        if counted:
            rec.connected -= 1
            rec.last_up.pop(edge, None)
            rec.downs.append((edge, time.monotonic()))
        now = time.monotonic()
        rec.lost_pings.extend(now - t for t in sent.values())


def _failure_kind(exc: BaseException) -> str:
    text = str(exc).lower()
    if "cannot connect" in text:
        return "connect_refused"
    if "handshake" in text:
        return "tls_cut"
    return "closed"


async def _edge(
    edge: int, port: int, ctx: ssl.SSLContext, rec: _Record, rng: random.Random
) -> None:
    """One simulated edge, for ever: dial, run the tunnel, wait as the real policy says."""
    policy = ReconnectPolicy(BACKOFF, rng)
    tickets: dict[int, ssl.SSLSession] = {}
    probe = edge % PROBE_EVERY == 0
    while True:
        started = time.monotonic()
        hint = None
        tls = None
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                tls = await connect_tls(
                    "127.0.0.1", port, ctx, server_hostname="localhost", session=tickets.get(edge)
                )
            await _tunnel(edge, tls, rec, probe, tickets)
        except Refused as exc:
            hint = exc.retry_after
            rec.hints.append(hint)
            rec.failures["shed_with_hint"] += 1
        except trio.TooSlowError:
            rec.failures["timeout"] += 1
        except (TransportError, RemoteProtocolError, OSError, trio.BrokenResourceError) as exc:
            rec.failures[_failure_kind(exc)] += 1
        finally:
            if tls is not None:
                tls.close()
        now = time.monotonic()
        await trio.sleep(policy.next_delay(now - started, hint, now=now))


async def _worker(args: dict[str, object]) -> None:
    certs = Path(str(args["certs"]))
    ctx = client_ssl_context(certs / "ca.crt", certs / "edge-edge1.crt", certs / "edge-edge1.key")
    rec = _Record([], [], collections.Counter(), [], [], [], {})
    status, stop, out = (Path(str(args[k])) for k in ("status", "stop", "out"))
    since = Path(str(args["since"]))  # the parent writes the kill time there
    first, n = int(str(args["first"])), int(str(args["n"]))
    port = int(str(args["port"]))
    if int(str(args.get("nice", 0))):  # the replica gets the core a dedicated machine gives it
        os.nice(int(str(args["nice"])))
    rng = random.Random(first)
    with trio.move_on_after(float(str(args["budget"]))):
        async with trio.open_nursery() as nursery:
            ramp = float(str(args["ramp"]))  # a fleet comes up over time, not in one instant
            for i in range(first, first + n):
                nursery.start_soon(_edge, i, port, ctx, rec, rng)
                await trio.sleep(ramp / n)
                if i % 100 == 0:  # progress during the ramp too (it may outlast the budget)
                    status.write_text(f"{rec.connected} 0")
            while not stop.exists():
                t = float(since.read_text() or "inf") if since.exists() else math.inf
                rec.storm = t < math.inf
                back = sum(1 for when in rec.last_up.values() if when > t)
                status.write_text(f"{rec.connected} {back}")
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    out.write_text(
        json.dumps(
            {
                "ups": rec.ups,
                "downs": rec.downs,
                "failures": rec.failures,
                "hints": rec.hints,
                "rtts": rec.rtts,
                "lost_pings": rec.lost_pings,
                "rss_kib": rss_kib(),
                "cpu_s": time.process_time(),
            }
        )
    )


# ----------------------------------------------------------------------------- parent
def _listening(port: int) -> bool:
    """Is something listening on 127.0.0.1:`port`? (read from /proc: no connection made)"""
    needle = f"0100007F:{port:04X} 00000000:0000 0A"
    return any(needle in Path(p).read_text() for p in ("/proc/net/tcp",))


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _fd_kinds(pid: int) -> list[str]:
    """What the process's descriptors are (socket/pipe/file...), for a leak report."""
    out = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}").split(":")[0])
        except OSError:
            pass
    return out


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * len(values)) - 1))]


def _wait(
    cond: Callable[[], bool],
    timeout: float,
    what: str,
    step: float = 0.05,
    progress: Callable[[], str] | None = None,
) -> float:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            got = f" ({progress()})" if progress is not None else ""
            raise RuntimeError(f"{what}: not within {timeout:g}s{got}")
        time.sleep(step)
    return time.monotonic()


def run_storm(
    edges: int,
    workers: int,
    *,
    tickets: bool = True,
    idle_window: float = 20.0,
    budget: float = 290.0,
    nice: int = 0,
    profile: Path | None = None,
    tunnel: dict[str, object] | None = None,
    rtt: float = 0.0,
    pin: bool = False,
) -> dict[str, Any]:
    """Run the whole storm once (see the module docstring); returns the figures."""
    t_start = time.monotonic()
    cores = sorted(os.sched_getaffinity(0))
    if pin and len(cores) < 2:
        raise RuntimeError("--pin needs at least two CPUs")
    others = set(cores[1:])

    def place(pid: int, replica: bool) -> None:
        if pin:
            os.sched_setaffinity(pid, {cores[0]} if replica else others)

    place(0, False)  # this harness runs beside the edges, not on the replica's core
    with tempfile.TemporaryDirectory(prefix="kins-storm-") as tmp:
        base = Path(tmp)
        certs = fleet_certs(base)
        tport, aport = free_port(), free_port()
        # the restarted cloud must read the same ticket key to resume the fleet's sessions
        key_file = base / "ticket.key"
        write_secret(key_file)
        extra: dict[str, object] = (
            {"session_ticket_key_file": str(key_file)} if tickets else {"session_tickets": False}
        )
        extra.update(tunnel or {})  # the cloud's `tunnel:` settings under test
        procs: list[subprocess.Popen[bytes]] = []
        try:
            cloud = cloud_process(base, certs, tport, aport, edges, tunnel=extra)
            place(cloud.pid, True)
            procs.append(cloud)
            relay = _relay(tport, rtt) if rtt > 0 else None
            if relay is not None:
                place(relay[0].pid, False)
            eport = tport
            if relay is not None:
                procs.append(relay[0])
                eport = relay[1]
            rss_base = rss_kib(cloud.pid)
            base_fds, base_tasks = (
                _fds(cloud.pid),
                metric_values(scrape(aport), "kins_tunnel_tasks"),
            )
            base_kinds = _fd_kinds(cloud.pid)
            per = [edges // workers + (1 if i < edges % workers else 0) for i in range(workers)]
            files = []
            worker_procs = []
            first = 0
            for i, n in enumerate(per):
                f = {k: base / f"w{i}.{k}" for k in ("status", "stop", "out")}
                f["since"] = base / "since"
                files.append(f)
                args = {
                    "port": eport,
                    "first": first,
                    "n": n,
                    "certs": str(certs),
                    "budget": budget,
                    "ramp": edges / RAMP_RATE,
                    "nice": nice,
                    **{k: str(v) for k, v in f.items()},
                }
                first += n
                worker_procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "benchmarks.storm", "worker", json.dumps(args)],
                        stdout=subprocess.DEVNULL,
                    )
                )
                place(worker_procs[-1].pid, False)
                procs.append(worker_procs[-1])

            def connected(back: bool = False) -> int:
                """Edges up now (`back`: up now and since the kill)."""
                total = 0
                for f in files:
                    try:
                        total += int(f["status"].read_text().split()[1 if back else 0])
                    except (OSError, ValueError, IndexError):
                        pass
                return total

            def left() -> float:
                return budget - (time.monotonic() - t_start)

            t0 = time.monotonic()
            t_all = _wait(
                lambda: connected() >= edges,
                left() * 0.55,
                "initial connect",
                0.1,
                lambda: f"{connected()} of {edges} connected",
            )
            initial_s = t_all - t0
            # idle: settle (longer than stable_after), then RSS and CPU over idle_window
            time.sleep(max(BACKOFF.stable_after + 1, 5.0))
            cpu0, w0 = _cpu_seconds(cloud.pid), time.monotonic()
            time.sleep(idle_window)
            idle_cpu = (_cpu_seconds(cloud.pid) - cpu0) / (time.monotonic() - w0)
            rss_idle = rss_kib(cloud.pid)
            load = os.getloadavg()
            print(  # reached even if the storm does not complete within the budget
                f"initial connect {initial_s:.1f} s; idle: {(rss_idle - rss_base) / edges:.1f} KiB"
                f" per edge, cloud CPU {idle_cpu * 100:.2f} % of a core; load {load}",
                file=sys.stderr,
                flush=True,
            )
            # the storm
            cloud.send_signal(signal.SIGKILL)
            cloud.wait()
            t_kill = time.monotonic()
            (base / "since").write_text(repr(t_kill))
            cloud = cloud_process(base, certs, tport, aport, edges, wait=False, tunnel=extra)
            place(cloud.pid, True)
            procs.append(cloud)
            t_listen = _wait(lambda: _listening(tport), 30, "restart", 0.002)
            trace = _CpuTrace(t_listen, cloud.pid, [w.pid for w in worker_procs])
            cpu_restart = _cpu_seconds(cloud.pid)
            rss_restart = rss_kib(cloud.pid)
            if profile is not None:
                procs.append(_profiler(cloud.pid, profile))
            t_back = _wait(
                lambda: trace.sample() and connected(True) >= edges,
                max(left() - 40, 10),
                "storm",
                0.02,
                lambda: (
                    f"{connected(True)} of {edges} back, "
                    f"{time.monotonic() - t_listen:.0f} s after listening; cloud refusals "
                    f"{metric_values(scrape(aport), 'kins_tunnel_handshake_failures_total', 'reason')}"
                ),
            )
            cpu_storm = _cpu_seconds(cloud.pid) - cpu_restart
            rss_back = rss_kib(cloud.pid)
            if profile is not None:  # SIGINT: py-spy writes what it recorded, then exits
                procs[-1].send_signal(signal.SIGINT)
                procs[-1].wait(timeout=30)
            time.sleep(max(2.0, t_listen + RTT_WINDOW_MIN - time.monotonic()))
            text = scrape(aport)
            failures = metric_values(text, "kins_tunnel_handshake_failures_total", "reason")
            kinds = metric_values(text, "kins_tunnel_tunnel_tls_handshakes_total", "kind")
            # everyone leaves: descriptors and tasks must come back to the baseline
            for f in files:
                f["stop"].write_text("")
            for p in worker_procs:
                p.wait(timeout=60)
            _wait(
                lambda: (
                    metric_values(scrape(aport), "kins_tunnel_tunnels", "role").get("cloud", 1) == 0
                ),
                30,
                "edges leaving",
                0.5,
            )

            # connections the edges left while pending end within the handshake timeout
            def settled() -> bool:
                tasks = metric_values(scrape(aport), "kins_tunnel_tasks").get("", 0)
                # + 1: the liveness timer, one system task started with the first tunnel
                return _fds(cloud.pid) <= base_fds and tasks <= base_tasks.get("", 0) + 1

            with contextlib.suppress(RuntimeError):
                _wait(settled, HANDSHAKE_TIMEOUT + 5, "fds and tasks back", 0.5)
            after_kinds = _fd_kinds(cloud.pid)
            after_fds, after_tasks = (
                _fds(cloud.pid),
                metric_values(scrape(aport), "kins_tunnel_tasks"),
            )
            recs = [json.loads(f["out"].read_text()) for f in files]
            relay_cpu = _cpu_seconds(relay[0].pid) if relay is not None else 0.0
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
                p.wait()
    return _figures(
        edges=edges,
        recs=recs,
        t_kill=t_kill,
        t_listen=t_listen,
        t_back=t_back,
        initial_s=initial_s,
        idle_cpu=idle_cpu,
        idle_window=idle_window,
        rss_base=rss_base,
        rss_idle=rss_idle,
        rss_restart=rss_restart,
        rss_back=rss_back,
        cpu_storm=cpu_storm,
        failures=failures,
        kinds=kinds,
        base=(base_fds, base_tasks.get("", 0)),
        after=(after_fds, after_tasks.get("", 0)),
        fds_extra=sorted(
            (collections.Counter(after_kinds) - collections.Counter(base_kinds)).elements()
        ),
        load=load,
        tickets=tickets,
        workers=workers,
        nice=nice,
        tunnel=tunnel or {},
        rtt=rtt,
        relay_cpu=relay_cpu,
        cpu_trace=trace.per_second(),
        pinned=pin,
    )


class _CpuTrace:
    """The CPU the replica and the edge workers used in each second after listening (% of one
    core), sampled while the storm is waited for: it shows who the machine's cores worked for
    (the simulated edges share them with the replica)."""

    def __init__(self, t0: float, cloud: int, workers: list[int]) -> None:
        self.t0, self.cloud, self.workers = t0, cloud, workers
        self.samples: list[tuple[float, float, float]] = [self._now()]

    def _now(self) -> tuple[float, float, float]:
        edge_cpu = 0.0
        for pid in self.workers:
            with contextlib.suppress(OSError):
                edge_cpu += _cpu_seconds(pid)
        return time.monotonic(), _cpu_seconds(self.cloud), edge_cpu

    def sample(self) -> bool:
        """Record one sample if a second has passed since the last (always True: a condition)."""
        if time.monotonic() - self.samples[-1][0] >= 1.0:
            self.samples.append(self._now())
        return True

    def per_second(self) -> dict[str, list[float]]:
        pairs = list(zip(self.samples, self.samples[1:], strict=False))
        return {
            "cloud": [round(100 * (b[1] - a[1]) / (b[0] - a[0])) for a, b in pairs],
            "edge_workers": [round(100 * (b[2] - a[2]) / (b[0] - a[0])) for a, b in pairs],
        }


RELAY_READY_TIMEOUT = 10.0  # seconds for the relay process to listen


def _relay(upstream: int, rtt: float) -> tuple[subprocess.Popen[bytes], int]:
    """A relay process playing a link of round trip `rtt` in front of `upstream`, and its port."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.delayrelay", "--upstream", str(upstream)]
        + ["--delay-ms", f"{rtt * 500:g}"],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], RELAY_READY_TIMEOUT)
        line = proc.stdout.readline().decode() if ready else ""
        proc.stdout.close()  # the relay prints nothing after READY
        if not line.startswith("READY "):
            raise RuntimeError(f"relay not listening within {RELAY_READY_TIMEOUT:g}s: {line!r}")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, int(line.split()[1])


def _profiler(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy recording `pid` into `out` (collapsed stacks) until it gets SIGINT."""
    return subprocess.Popen(
        ["py-spy", "record", "--pid", str(pid), "--format", "raw", "--output", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _figures(
    *,
    edges: int,
    recs: list[dict[str, Any]],
    t_kill: float,
    t_listen: float,
    t_back: float,
    initial_s: float,
    idle_cpu: float,
    idle_window: float,
    rss_base: int,
    rss_idle: int,
    rss_restart: int,
    rss_back: int,
    cpu_storm: float,
    failures: dict[str, float],
    kinds: dict[str, float],
    base: tuple[int, float],
    after: tuple[int, float],
    fds_extra: list[str],
    load: tuple[float, float, float],
    tickets: bool,
    workers: int,
    nice: int,
    tunnel: dict[str, object],
    rtt: float,
    relay_cpu: float,
    cpu_trace: dict[str, list[float]],
    pinned: bool = False,
) -> dict[str, Any]:
    back: dict[int, tuple[float, bool]] = {}  # edge -> first up after the kill
    rtt_until = max(t_back, t_listen + RTT_WINDOW_MIN)
    dropped = 0
    rtts: list[float] = []
    lost: list[float] = []
    edge_failures: collections.Counter[str] = collections.Counter()
    hints: list[float] = []
    for rec in recs:
        for edge, when, resumed in rec["ups"]:
            if when > t_kill and edge not in back:
                back[edge] = (when, resumed)
        edge_failures.update(rec["failures"])
        hints.extend(rec["hints"])
        rtts.extend(r for when, r in rec["rtts"] if t_listen <= when <= rtt_until)
        lost.extend(rec["lost_pings"])
    for rec in recs:
        for edge, when in rec["downs"]:
            if edge in back and back[edge][0] < when < t_back:
                dropped += 1
    # t_listen is when a 2 ms poll of /proc saw the socket listen: on a busy machine an edge may
    # get in before the poll runs, so the first edge back bounds it (never later than that)
    t_listen = min([t_listen, *(when for when, _ in back.values())])
    waits = sorted(when - t_listen for when, _ in back.values())
    buckets = collections.Counter(int(w) for w in waits)
    storm = max(waits[-1], 1e-3) if waits else float("nan")
    return {
        "edges": edges,
        "workers": workers,
        "session_tickets": tickets,
        "edge_nice": nice,
        "pinned": pinned,  # the replica alone on CPU 0, everything else on the others
        "cloud_tunnel_settings": tunnel,
        "rtt_s": rtt,
        "relay_cpu_s": round(relay_cpu, 1),
        "loadavg_at_kill": [round(x, 2) for x in load],
        "initial_connect_s": round(initial_s, 1),
        "idle": {
            "cloud_rss_mib": round(rss_idle / 1024, 1),
            "kib_per_edge": round((rss_idle - rss_base) / edges, 1),
            "cloud_cpu_pct_of_core": round(idle_cpu * 100, 2),
            "window_s": idle_window,
        },
        "restart_to_listen_s": round(t_listen - t_kill, 2),
        "back": len(back),
        "back_50pct_s": round(_pct(waits, 0.50), 2),
        "back_99pct_s": round(_pct(waits, 0.99), 2),
        "back_100pct_s": round(_pct(waits, 1.0), 2),
        "slowest_wait_from_kill_s": round(waits[-1] + (t_listen - t_kill), 2) if waits else None,
        "resumed": sum(1 for _, r in back.values() if r),
        "handshakes_per_s_mean": round(len(waits) / storm, 1),
        "handshakes_per_s_best_second": max(buckets.values()) if buckets else 0,
        "back_per_second": [buckets.get(i, 0) for i in range(int(storm) + 1)] if waits else [],
        # % of one core in each second after listening (the simulated edges share the cores)
        "cpu_pct_per_second": cpu_trace,
        "cloud_cpu_ms_per_handshake": round(cpu_storm * 1000 / max(len(waits), 1), 3),
        "cloud_cpu_s_during_storm": round(cpu_storm, 1),
        "edge_workers_cpu_s_whole_run": round(sum(r["cpu_s"] for r in recs), 1),
        "cloud_tls_handshakes": kinds,
        "cloud_refusals": failures,
        "edge_failures": dict(edge_failures),
        "retry_after_hints": {
            "count": len(hints),
            "median_s": round(_pct(hints, 0.5), 2) if hints else None,
            "max_s": max(hints) if hints else None,
        },
        "rtt_during_storm_ms": {
            "samples": len(rtts),
            "p50": round(_pct(rtts, 0.5) * 1000, 1) if rtts else None,
            "p99": round(_pct(rtts, 0.99) * 1000, 1) if rtts else None,
            "max": round(max(rtts) * 1000, 1) if rtts else None,
        },
        "pings_unanswered_over_timeout": sum(1 for a in lost if a > PING_TIMEOUT),
        "tunnels_dropped_during_storm": dropped,
        "cloud_rss_after_storm_mib": round(rss_back / 1024, 1),
        "kib_per_edge_after_storm": round((rss_back - rss_restart) / edges, 1),
        "leaks": {
            "fds_baseline": base[0],
            "fds_after": after[0],
            "tasks_baseline": base[1],
            "tasks_after": after[1],
            "fds_extra": fds_extra,
        },
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "worker":
        trio.run(_worker, json.loads(argv[1]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storm", action="store_true")
    ap.add_argument("--edges", type=int, default=5_000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--no-tickets", action="store_true", help="cloud without session tickets")
    ap.add_argument("--idle-window", type=float, default=20.0)
    ap.add_argument("--budget", type=float, default=290.0, help="seconds for the whole run")
    ap.add_argument(
        "--nice", type=int, default=0, help="the edge workers' CPU priority (os.nice increment)"
    )
    ap.add_argument(
        "--pin", action="store_true", help="the replica alone on CPU 0, the edges on the others"
    )
    ap.add_argument("--profile", type=Path, help="py-spy the restarted replica into this file")
    ap.add_argument(
        "--max-concurrent-handshakes", type=int, help="the cloud's tunnel.max_concurrent_handshakes"
    )
    ap.add_argument(
        "--rtt",
        type=float,
        default=0.0,
        help="seconds of round trip between the edges and the replica (a relay process)",
    )
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = run_storm(
        args.edges,
        args.workers,
        tickets=not args.no_tickets,
        idle_window=args.idle_window,
        budget=args.budget,
        nice=args.nice,
        profile=args.profile,
        tunnel=(
            {"max_concurrent_handshakes": args.max_concurrent_handshakes}
            if args.max_concurrent_handshakes
            else None
        ),
        rtt=args.rtt,
        pin=args.pin,
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
