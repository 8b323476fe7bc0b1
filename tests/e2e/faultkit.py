"""Tools for fault-injection tests: cloud and edge as real processes on fixed loopback ports,
their admin endpoints, polling with measured times, test targets, and a relay that can partition.

Every child process is killed when the `Procs` context exits (and its log tail printed if the test
failed), so a failing assertion never leaves a tunnel running.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from kins_tunnel.testing.linkrelay import LinkRelay
from kins_tunnel.testing.support import free_port, http_get, read_all
from kins_tunnel.testing.support import wait_until as support_wait_until
from tests.e2e.harness import (
    cloud_dict,
    echo_bytes,
    edge_dict,
    make_certs,
    serve_loopback,
    spawn,
    write_yaml,
)


def figure(name: str, value: float | str, unit: str = "") -> None:
    """Print a measured figure (visible with `pytest -s`)."""
    shown = f"{value:.3f}" if isinstance(value, float) else str(value)
    print(f"\nFIGURE {name}: {shown}{(' ' + unit) if unit else ''}", flush=True)


# ---------------------------------------------------------------- processes
_WATCHED: set[Proc] = set()


@dataclass(eq=False)
class Proc:
    kind: str
    name: str
    config: Path
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    expect_alive: bool = False  # a process that dies on its own while this is set fails the test

    def start(self) -> None:
        assert self.popen is None or self.popen.poll() is not None, f"{self.name} already running"
        if self.popen is not None:
            self.popen.wait()
        self.popen = spawn(self.kind, self.config, self.log)
        self.expect_alive = True
        _WATCHED.add(self)

    def check_alive(self) -> None:
        if self.expect_alive and self.popen is not None and self.popen.poll() is not None:
            self.expect_alive = False
            raise AssertionError(
                f"{self.name} process died (exit code {self.popen.returncode}):\n{self.tail(60)}"
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        assert self.popen is not None
        if sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
            self.expect_alive = False
        self.popen.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL and reap."""
        self.expect_alive = False
        _WATCHED.discard(self)
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
        if self.popen is not None:
            self.popen.wait(10)

    async def wait_exit(self, timeout: float) -> int:
        popen = self.popen
        assert popen is not None
        await support_wait_until(lambda: popen.poll() is not None, timeout, f"{self.name} exits")
        return popen.returncode

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass(eq=False)
class CloudProc(Proc):
    tunnel: int = 0
    proxy: int = 0
    admin: int = 0


@dataclass(eq=False)
class EdgeProc(Proc):
    node: str = "edge1"
    admin: int | None = None


P = TypeVar("P", bound=Proc)


@dataclass
class Procs:
    base: Path
    procs: list[Proc] = field(default_factory=list)

    @property
    def certs(self) -> Path:
        return self.base / "certs"

    def cloud(self, name: str = "cloud", *, start: bool = True, **over: Any) -> CloudProc:
        certs = make_certs(self.base)
        tunnel, proxy, admin = free_port(), free_port(), free_port()
        doc = cloud_dict(
            certs,
            **{
                "tunnel": {"listen": f"127.0.0.1:{tunnel}"},
                "proxy": {"listen": f"127.0.0.1:{proxy}"},
                "admin": {"listen": f"127.0.0.1:{admin}"},
            },
        )
        for k, v in over.items():
            doc[k] = {**doc[k], **v} if isinstance(v, dict) and isinstance(doc.get(k), dict) else v
        return self._track(
            CloudProc(
                "cloud",
                name,
                write_yaml(self.base / f"{name}.yaml", doc),
                self.base / f"{name}.log",
                tunnel=tunnel,
                proxy=proxy,
                admin=admin,
            ),
            start,
        )

    def edge(
        self,
        cloud_tunnel: int | str,
        services: Mapping[str, Any],
        *,
        node: str = "edge1",
        unit: str = "test",
        name: str | None = None,
        admin: bool = True,
        start: bool = True,
        doc: dict[str, Any] | None = None,
        **over: Any,
    ) -> EdgeProc:
        """An edge process; `doc` replaces the config made from the other arguments (its admin
        listener is still set here)."""
        name = name or node
        admin_port = free_port() if admin else None
        if doc is None:
            make_certs(self.base, ((unit, node),))
            doc = edge_dict(self.certs, [cloud_tunnel], services, node, **over)
        if admin_port is not None:
            doc["admin"] = {"listen": f"127.0.0.1:{admin_port}"}
        return self._track(
            EdgeProc(
                "edge",
                name,
                write_yaml(self.base / f"{name}.yaml", doc),
                self.base / f"{name}.log",
                node=node,
                admin=admin_port,
            ),
            start,
        )

    def _track(self, p: P, start: bool) -> P:
        """Kill `p` with the rest at the end; start it now if `start`."""
        self.procs.append(p)
        if start:
            p.start()
        return p

    def kill_all(self) -> None:
        for p in self.procs:
            if p.popen is not None and p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGCONT)  # a stopped process must be able to die
            p.kill()


@contextlib.contextmanager
def procs(base: Path) -> Iterator[Procs]:
    ps = Procs(base)
    try:
        yield ps
    except BaseException:
        for p in ps.procs:
            print(f"\n----- {p.name} log tail -----\n{p.tail()}")
        raise
    finally:
        ps.kill_all()
        _WATCHED.difference_update(ps.procs)
    # the processes ran with the ownership checks on (tests/conftest.py): a violation is logged as
    # an internal error there, and fails the test here
    for p in ps.procs:
        with contextlib.suppress(OSError):
            assert "OwnershipError" not in p.log.read_text(errors="replace"), (
                f"{p.name} broke the ownership contract:\n{p.tail(60)}"
            )


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ---------------------------------------------------------------- HTTP to admin and proxy


async def cloud_status(cloud: CloudProc) -> dict[str, Any]:
    status, body = await http_get(cloud.admin, "/status")
    assert status == 200, body
    doc: dict[str, Any] = json.loads(body)
    return doc


async def edge_status(edge: EdgeProc) -> dict[str, Any]:
    assert edge.admin is not None
    status, body = await http_get(edge.admin, "/status")
    assert status == 200, body
    doc: dict[str, Any] = json.loads(body)
    return doc


async def wait_until(
    pred: Callable[[], bool | Awaitable[bool]], timeout: float, what: str, interval: float = 0.02
) -> float:
    """`support.wait_until` for process tests: every watched process must stay alive meanwhile, and
    a network error while asking (the process is not listening yet) counts as not yet."""

    async def check() -> bool:
        for p in list(_WATCHED):
            p.check_alive()
        try:
            result = pred()
            return await result if inspect.isawaitable(result) else result
        except (OSError, trio.TooSlowError, trio.BrokenResourceError):
            return False

    return await support_wait_until(check, timeout, what, interval)


async def wait_cloud_up(cloud: CloudProc, timeout: float = 15) -> float:
    async def up() -> bool:
        return (await http_get(cloud.admin, "/readyz"))[0] == 200

    return await wait_until(up, timeout, f"{cloud.name} ready")


async def edges_of(cloud: CloudProc, node: str | None = None) -> list[dict[str, Any]]:
    return [e for e in (await cloud_status(cloud))["edges"] if node is None or e["node"] == node]


async def wait_edges(
    cloud: CloudProc, count: int, node: str | None = None, timeout: float = 15
) -> float:
    async def ok() -> bool:
        return len(await edges_of(cloud, node)) == count

    return await wait_until(
        ok, timeout, f"{count} tunnel(s) of {node or 'any node'} at {cloud.name}"
    )


async def connect(
    proxy: int, target: str, headers: str = ""
) -> tuple[int, bytes, trio.SocketStream]:
    """CONNECT like `harness.connect`, but reads the answer head byte by byte, so a target that
    speaks first (a banner, a download) leaves its bytes in the stream. The caller closes it."""
    stream = await trio.open_tcp_stream("127.0.0.1", proxy)
    try:
        await stream.send_all(
            f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{headers}\r\n".encode()
        )
        head = b""
        with trio.fail_after(15):
            while not head.endswith(b"\r\n\r\n"):
                chunk = await stream.receive_some(1)
                if not chunk:
                    break
                head += chunk
            status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
            if status != 200:
                head += await read_all(stream, 1 << 16)
        return status, head, stream
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def connect_status(proxy: int, target: str) -> int:
    status, head, s = await connect(proxy, target)
    await trio.aclose_forcefully(s)
    assert status, f"CONNECT {target}: no HTTP answer: {head!r}"
    return status


async def wait_connect(proxy: int, target: str, want: int, timeout: float) -> float:
    async def ok() -> bool:
        return await connect_status(proxy, target) == want

    return await wait_until(ok, timeout, f"CONNECT {target} answered {want}", interval=0.05)


# ---------------------------------------------------------------- targets
async def serve_source(
    *, task_status: trio.TaskStatus[tuple[int, list[int]]] = trio.TASK_STATUS_IGNORED
) -> None:
    """Send an endless deterministic byte stream to every client; sent[i] counts bytes per client."""
    sent: list[int] = []
    block = bytes(range(256)) * 256  # 64 KiB

    async def handler(stream: trio.SocketStream) -> None:
        i = len(sent)
        sent.append(0)
        try:
            while True:
                await stream.send_all(block)
                sent[i] += len(block)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started((listeners[0].socket.getsockname()[1], sent))
    await trio.serve_listeners(handler, listeners)


async def serve_banner(
    name: str, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Answer the client's first bytes with `name` + newline, then echo (so a client learns which
    edge's target it reached). The client speaks first, like TLS or HTTP."""

    async def handler(stream: trio.SocketStream) -> None:
        if not await stream.receive_some(1):
            return
        await stream.send_all(name.encode() + b"\n")
        await echo_bytes(stream)

    await serve_loopback(handler, task_status=task_status)


def set_rst_on_close(stream: trio.SocketStream) -> None:
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def read_until_end(
    stream: trio.abc.ReceiveStream, timeout: float, progress: Callable[[int], None] | None = None
) -> tuple[str, int]:
    """Read until EOF ("eof") or an error ("reset"); returns how it ended and the bytes read
    (`progress(total)` after each chunk)."""
    n = 0
    with trio.fail_after(timeout):
        try:
            while True:
                chunk = await stream.receive_some(1 << 18)
                if not chunk:
                    return "eof", n
                n += len(chunk)
                if progress is not None:
                    progress(n)
        except trio.BrokenResourceError:
            return "reset", n


async def echo_rtts(stream: trio.abc.Stream, count: int, size: int = 64) -> list[float]:
    """Round trips of `count` small messages on an echo stream, in seconds."""
    out = []
    msg = os.urandom(size)
    for _ in range(count):
        t0 = time.perf_counter()
        await stream.send_all(msg)
        got = b""
        while len(got) < size:
            chunk = await stream.receive_some(size - len(got))
            assert chunk, "echo stream ended"
            got += chunk
        assert got == msg
        out.append(time.perf_counter() - t0)
    return out


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


# ---------------------------------------------------------------- partition relay
Relay = LinkRelay  # a link that can stop forwarding either way (see kins_tunnel.testing.linkrelay)
