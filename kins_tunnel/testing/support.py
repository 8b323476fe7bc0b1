"""Small helpers shared by the tests and the benchmarks (loopback only), written once.

- `free_port`: a free port *below* the kernel's ephemeral range, for a process that must be
  restarted on the same port (a port from the ephemeral range may meanwhile become the local end
  of some outgoing connection: "address already in use").
- `rss_kib`, `self_rss`: resident memory of a process.
- `http_get`: one GET to a loopback port (admin endpoints).
- `read_all`, `echo_roundtrip`: read a stream to its end; send bytes and expect them back.
- `wait_until`: poll a condition under a deadline; `wait_listening`: until a port accepts.
- `metric_value`: one sample of a process's Prometheus registry (what its /metrics would show).
"""

from __future__ import annotations

import inspect
import random
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from kins_tunnel.metrics import Metrics

DEFAULT_TIMEOUT = 5.0


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port free now, taken below the ephemeral range (see the module docstring)."""
    low, _high = _ephemeral_range()
    lo, hi = max(1024, low - 12000), max(1025, low - 1)
    for _ in range(200):
        port = random.randrange(lo, hi)
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            s.close()
        return port
    raise RuntimeError("no free port below the ephemeral range")


def rss_kib(pid: int | str = "self") -> int:
    """Resident set size of a process (default: this one), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def self_rss() -> int:
    """This process's resident set size in bytes."""
    return rss_kib() * 1024


def kins_tunnel_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `python -m kins_tunnel ARGS` (this interpreter), capturing its text output."""
    return subprocess.run(
        [sys.executable, "-m", "kins_tunnel", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def run_kins_tunnel(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """`kins_tunnel_cli` without blocking the trio run: stdout and stderr captured, never raises
    for the exit status (callers assert it), `TooSlowError` after `timeout`."""
    with trio.fail_after(timeout):
        return await trio.run_process(
            [sys.executable, "-m", "kins_tunnel", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def read_all(stream: trio.abc.ReceiveStream, limit: int = 1 << 31) -> bytes:
    """Everything until EOF (or `limit` bytes)."""
    out = bytearray()
    while len(out) < limit:
        chunk = await stream.receive_some(1 << 18)
        if not chunk:
            break
        out += chunk
    return bytes(out)


async def read_head(stream: trio.abc.ReceiveStream, limit: int = 1 << 16) -> bytes:
    """Read until an HTTP head is complete (a blank line), EOF or `limit` bytes; returns all that
    was read: the head and whatever came behind it in the same reads."""
    data = b""
    while b"\r\n\r\n" not in data and len(data) < limit:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
    return data


async def http_get(
    port: int, path: str, host: str = "127.0.0.1", timeout: float = DEFAULT_TIMEOUT
) -> tuple[int, bytes]:
    """GET host:port/path; (status, body). OSError if nothing listens, TooSlowError past `timeout`."""
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(
                f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
            )
            raw = await read_all(stream)
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def echo_roundtrip(stream: trio.abc.Stream, data: bytes, timeout: float = 10) -> None:
    """Send `data` and assert the same bytes come back (the other end echoes)."""
    await stream.send_all(data)
    got = b""
    with trio.fail_after(timeout):
        while len(got) < len(data):
            chunk = await stream.receive_some(65536)
            assert chunk, "echo stream ended"
            got += chunk
    assert got == data


async def wait_until(
    pred: Callable[[], bool | Awaitable[bool]],
    timeout: float = 10,
    what: str = "",
    interval: float = 0.02,
) -> float:
    """Poll `pred` (sync or async) until true; returns the seconds it took (trio's clock).
    AssertionError naming `what` after `timeout`."""
    t0 = trio.current_time()
    while True:
        result = pred()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return trio.current_time() - t0
        if trio.current_time() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what or pred}")
        await trio.sleep(interval)


async def wait_listening(
    port: int,
    timeout: float = 10,
    what: str = "",
    check: Callable[[], object] | None = None,
    host: str = "127.0.0.1",
) -> None:
    """Until something accepts TCP connections on host:port (a process we started is up).
    `check()` runs before each attempt: it should raise at once if that process died."""

    async def accepts() -> bool:
        if check is not None:
            check()
        try:
            probe = await trio.open_tcp_stream(host, port)
        except OSError:
            return False
        await probe.aclose()
        return True

    await wait_until(accepts, timeout, what or f"{host}:{port} accepting", interval=0.05)


def metric_value(metrics: Metrics, name: str, **labels: str) -> float:
    """The sample `name{labels}` of a cloud's or edge's metrics (0 if it has none yet), read
    through the registry as /metrics renders it (`name` with its `_total` suffix for counters)."""
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


__all__ = [
    "echo_roundtrip",
    "free_port",
    "http_get",
    "metric_value",
    "read_all",
    "rss_kib",
    "self_rss",
    "wait_listening",
    "wait_until",
]
