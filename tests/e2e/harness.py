"""Start real tunnel-cloud and tunnel-edge (as trio tasks in the test, or as processes) on 127.0.0.1.

`TunnelEnv` brings up certificates, a cloud and one or more edges with port 0 everywhere and
waits until the cloud routes the edge's names. `connect()` is a minimal CONNECT client that returns
the status line and the raw stream (a trio SocketStream) for the bytes that follow.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import yaml

from kins_tunnel.certs.directory import init_ca, issue_edge
from kins_tunnel.cloud.aliases import Resolver
from kins_tunnel.cloud.server import Cloud, CloudPorts
from kins_tunnel.config import cloud_config_from_dict, edge_config_from_dict
from kins_tunnel.edge.agent import Edge
from kins_tunnel.testing.support import (
    free_port as free_port,  # re-exported for older importers
)
from kins_tunnel.testing.support import read_all as read_all
from kins_tunnel.testing.support import read_head, wait_until
from tests.clients import CURL

SVC = "test-svc-kins.kins-system:443"
# the fields every "CONNECT done" / "CONNECT refused" log line carries
CONNECT_LOG_FIELDS = frozenset(
    ("client", "replica", "principal", "target", "normalised", "unit", "node")
    + ("status", "outcome", "sent", "received", "duration")
)


def make_certs(base: Path, nodes: tuple[tuple[str, str], ...] = (("test", "edge1"),)) -> Path:
    certs = base / "certs"
    if not (certs / "ca.crt").exists():
        init_ca(certs)
    for unit, node in nodes:
        if not (certs / f"edge-{node}.crt").exists():
            issue_edge(certs, unit, node)
    return certs


def cloud_dict(certs: Path, **over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "tunnel": {"listen": "127.0.0.1:0"},
        "proxy": {"listen": "127.0.0.1:0"},
        "admin": {"listen": "127.0.0.1:0"},
        "tls": {
            "ca": str(certs / "ca.crt"),
            "cert": str(certs / "cloud.crt"),
            "key": str(certs / "cloud.key"),
        },
        # no lookups in the test machine's DNS; tests of discovery inject a resolver
        "alias_discovery": {"enabled": False},
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    return d


def edge_dict(
    certs: Path,
    cloud_ports: Sequence[int | str],
    services: Mapping[str, Any],
    node: str = "edge1",
    **over: Any,
) -> dict[str, Any]:
    d: dict[str, Any] = {
        "cloud": [p if isinstance(p, str) else f"127.0.0.1:{p}" for p in cloud_ports],
        "tls": {
            "ca": str(certs / "ca.crt"),
            "cert": str(certs / f"edge-{node}.crt"),
            "key": str(certs / f"edge-{node}.key"),
        },
        "services": dict(services),
        "admin": None,
        "reconnect": {"initial": 0.05, "max": 1.0},
    }
    d.update(over)
    return d


@dataclass
class TunnelEnv:
    base: Path
    certs: Path
    cloud: Cloud
    ports: CloudPorts
    edges: list[Edge] = field(default_factory=list)
    nursery: trio.Nursery | None = None

    async def add_edge(
        self,
        services: Mapping[str, Any],
        node: str = "edge1",
        unit: str = "test",
        wait_for: str | None = None,
        **over: Any,
    ) -> Edge:
        make_certs(self.base, ((unit, node),))
        cfg = edge_config_from_dict(
            edge_dict(self.certs, [self.ports.tunnel], services, node, **over), base_dir=self.base
        )
        edge = Edge(cfg)
        assert self.nursery is not None
        await self.nursery.start(edge.run)
        self.edges.append(edge)
        if wait_for:
            await wait_routed(self.cloud, wait_for)
        return edge


async def wait_routed(cloud: Cloud, name: str, timeout: float = 10) -> None:
    await wait_until(lambda: bool(cloud.registry.candidates(name)), timeout, f"{name} routed")


@contextlib.asynccontextmanager
async def tunnel_env(
    base: Path,
    services: Mapping[str, Any] | None = None,
    *,
    resolver: Resolver | None = None,
    watch_clock: Callable[[], float] | None = None,
    **cloud_over: Any,
) -> AsyncIterator[TunnelEnv]:
    """A cloud (config: `cloud_dict` with `cloud_over`) and, with `services`, one edge serving them.
    `resolver` replaces DNS for ClusterIP alias discovery; `watch_clock` the clock of the cloud's
    certificate watchers."""
    certs = make_certs(base)
    cfg = cloud_config_from_dict(cloud_dict(certs, **cloud_over), base_dir=base)
    options: dict[str, Any] = {}
    if resolver is not None:
        options["resolver"] = resolver
    if watch_clock is not None:
        options["watch_clock"] = watch_clock
    cloud = Cloud(cfg, **options)
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(cloud.run)
        env = TunnelEnv(base, certs, cloud, ports, nursery=nursery)
        if services is not None:
            await env.add_edge(services, wait_for=next(iter(services)))
        yield env
        nursery.cancel_scope.cancel()


async def connect(
    proxy_port: int, target: str, headers: str = ""
) -> tuple[int, bytes, trio.SocketStream]:
    """Send a CONNECT; returns (status, head bytes, stream). The caller closes the stream."""
    stream = await trio.open_tcp_stream("127.0.0.1", proxy_port)
    try:
        await stream.send_all(
            f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{headers}\r\n".encode()
        )
        with trio.fail_after(15):
            head = await read_head(stream)
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
        head, _, rest = head.partition(b"\r\n\r\n")
        assert not rest or status != 200, "bytes after 200 before we sent anything"
        if status != 200:
            head = head + b"\r\n\r\n" + rest
        return status, head, stream
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def slowloris(port: int, request: bytes, every: float = 0.02) -> bytes:
    """Send `request` to a loopback port one byte every `every` seconds (trio's clock), then read
    the answer until the server closes; the answer (b"" if the connection broke)."""
    s = await trio.open_tcp_stream("127.0.0.1", port)
    answer = b""
    async with s:
        try:
            for i in range(len(request)):
                await s.send_all(request[i : i + 1])
                await trio.sleep(every)
        except trio.BrokenResourceError:
            pass
        try:
            answer = await read_all(s)
        except trio.BrokenResourceError:
            pass
    return answer


async def keep_echoing(proxy_port: int, counts: dict[str, int], target: str = SVC) -> None:
    """Forever: an echo round trip through the proxy every 50 ms, counted as "ok" or "failed"
    (skipped while counts["paused"] is set). The normal traffic that hostile-input tests watch."""
    while True:
        if counts["paused"]:
            await trio.sleep(0.05)
            continue
        try:
            with trio.fail_after(5):
                status, head, s = await connect(proxy_port, target)
                async with s:
                    assert status == 200, head
                    await s.send_all(b"still here")
                    got = b""
                    while len(got) < 10:
                        chunk = await s.receive_some(10)
                        assert chunk
                        got += chunk
                    assert got == b"still here"
            counts["ok"] += 1
        except (AssertionError, OSError, trio.TooSlowError, trio.BrokenResourceError):
            counts["failed"] += 1
        await trio.sleep(0.05)


# ---------------------------------------------------------------- target servers (test doubles)
async def serve_loopback(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A target server on 127.0.0.1:0: `handler` per connection, which is always closed after it;
    a client that goes away mid-way is not an error. Reports the port through `task_status`."""

    async def guarded(stream: trio.SocketStream) -> None:
        try:
            await handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(guarded, listeners)


async def echo_bytes(stream: trio.SocketStream) -> None:
    """Echo every byte back; half-close when the client half-closes."""
    while True:
        data = await stream.receive_some(1 << 18)
        if not data:
            await stream.send_eof()
            return
        await stream.send_all(data)


async def digest_bytes(stream: trio.SocketStream) -> None:
    """Read until EOF, then answer sha256 hex + the byte count (a half-close test)."""
    h = hashlib.sha256()
    n = 0
    while True:
        data = await stream.receive_some(1 << 18)
        if not data:
            break
        h.update(data)
        n += len(data)
    await stream.send_all(f"{h.hexdigest()} {n}\n".encode())


serve_echo = functools.partial(serve_loopback, echo_bytes)
serve_digest = functools.partial(serve_loopback, digest_bytes)


@contextlib.contextmanager
def hanging_listener() -> Iterator[int]:
    """A loopback port whose accept queue is full: SYNs are dropped, a dial never completes (504)."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = []
    try:
        for _ in range(8):
            c = socket.socket()
            fillers.append(c)
            c.setblocking(False)
            try:
                c.connect(full.getsockname())
            except BlockingIOError:
                pass
        yield full.getsockname()[1]
    finally:
        for c in fillers:
            c.close()
        full.close()


# ---------------------------------------------------------------- processes
def write_yaml(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def spawn(kind: str, config: Path, log: Path) -> subprocess.Popen[bytes]:
    """Run `python -m kins_tunnel KIND --config CONFIG` with its output in `log`."""
    out = open(log, "ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "kins_tunnel", kind, "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    finally:
        out.close()


async def run_curl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    """Run real curl (`-sS` and `args`) within `timeout`."""
    with trio.fail_after(timeout):
        return await trio.run_process(
            [CURL, "-sS", *args], capture_stdout=True, capture_stderr=True, check=False
        )
