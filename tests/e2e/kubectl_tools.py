"""Real kubectl through a real tunnel to the K3s API stand-in: set-up, a runner, and an
interactive session on a pseudo-terminal (for ``exec -it``), shared by tests and benchmarks.

`kubectl_env` starts the stand-in (a test double, kins_tunnel.testing.k3s_standin, with its own
sandbox directory), a cloud and an edge serving ``test-svc-kins.kins-system:443`` → the stand-in,
and writes a kubeconfig whose ``proxy-url`` is the cloud's CONNECT proxy. kubectl's discovery
cache lives in the run's directory; proxy variables of the environment are removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import pty
import re
import struct
import subprocess
import termios
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from kins_tunnel.demo import write_kubeconfig
from kins_tunnel.testing.k3s_standin import make_self_signed_server_context, serve_k3s_standin
from tests.clients import KUBECTL
from tests.e2e.harness import SVC, TunnelEnv, tunnel_env

POD = "test-server-kins-7d9f8b6c5-x2x4k"  # the stand-in's first pod (unit "test")


def kubectl_environ(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without proxy variables or KUBECONFIG, with HOME (kubectl's
    discovery cache) at `home`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in ("https_proxy", "http_proxy", "no_proxy", "all_proxy", "kubeconfig")
    }
    env["HOME"] = str(home)
    env.update(extra or {})
    return env


async def run_kubectl(
    kubeconfig: Path,
    *args: str,
    home: Path,
    stdin: bytes | None = None,
    timeout: float = 60,
    extra_env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run real kubectl with `kubeconfig` (see `kubectl_environ`), within `timeout`."""
    with trio.fail_after(timeout):
        return await trio.run_process(
            [KUBECTL, "--kubeconfig", str(kubeconfig), *args],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=kubectl_environ(home, extra_env),
        )


async def assert_get_and_watch(kubeconfig: Path, home: Path) -> None:
    """`kubectl get pods` lists the stand-in's pods, and a watch keeps streaming rows until
    kubectl gives up (3 listed + the updates the stand-in sends)."""
    r = await run_kubectl(kubeconfig, "get", "pods", home=home)
    assert r.returncode == 0, r.stderr
    assert b"test-server-kins" in r.stdout and b"Running" in r.stdout
    r = await run_kubectl(
        kubeconfig, "get", "pods", "--watch", "--request-timeout=4s", home=home, timeout=30
    )
    rows = [ln for ln in r.stdout.splitlines() if b"kins" in ln]
    assert len(rows) >= 5, r.stdout


@dataclass
class KubectlEnv:
    base: Path
    kubeconfig: Path
    sandbox: Path
    tunnel: TunnelEnv | None  # None when cloud and edge run as processes (benchmarks)
    k3s_port: int

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return kubectl_environ(self.base / "home", extra)

    def argv(self, *args: str) -> list[str]:
        return [KUBECTL, "--kubeconfig", str(self.kubeconfig), *args]

    def pod_file(self, path: str, pod: str = POD) -> Path:
        """Where pod path `path` lives in the stand-in's sandbox."""
        return self.sandbox / pod / path.lstrip("/")

    async def run(
        self,
        *args: str,
        stdin: bytes | None = None,
        timeout: float = 60,
        extra_env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        return await run_kubectl(
            self.kubeconfig,
            *args,
            home=self.base / "home",
            stdin=stdin,
            timeout=timeout,
            extra_env=extra_env,
        )


@contextlib.asynccontextmanager
async def kubectl_env(base: Path, **standin: Any) -> AsyncIterator[KubectlEnv]:
    """Stand-in + cloud + edge on loopback, and a kubeconfig through the tunnel."""
    (base / "home").mkdir(exist_ok=True)
    sandbox = base / "sandbox"
    sandbox.mkdir(exist_ok=True)
    ctx, ca = make_self_signed_server_context(base)
    async with trio.open_nursery() as nursery:
        k3s = await nursery.start(
            functools.partial(serve_k3s_standin, ctx, sandbox=sandbox, **standin)
        )
        async with tunnel_env(base, {SVC: f"127.0.0.1:{k3s}"}) as tunnel:
            kubeconfig = base / "kubeconfig"
            write_kubeconfig(kubeconfig, tunnel.ports.proxy, ca)
            yield KubectlEnv(base, kubeconfig, sandbox, tunnel, k3s)
        nursery.cancel_scope.cancel()


class PtyKubectl:
    """kubectl on a pseudo-terminal, as a user at a terminal runs ``exec -it`` or ``attach -it``.

    kubectl puts the terminal into raw mode, so what `send` writes reaches the remote side byte for
    byte and what the remote side writes comes back unchanged.
    """

    def __init__(self, proc: trio.Process, master: trio.lowlevel.FdStream) -> None:
        self.proc = proc
        self.master = master
        self.received = bytearray()

    async def send(self, data: bytes) -> None:
        await self.master.send_all(data)

    async def expect(self, wanted: bytes, timeout: float = 30) -> bytes:
        """Read until `wanted` has arrived; return (and forget) everything up to its end."""
        with trio.fail_after(timeout):
            while (at := self.received.find(wanted)) < 0:
                try:
                    data = await self.master.receive_some(65536)
                except (OSError, trio.BrokenResourceError):
                    data = b""
                if not data:
                    raise EOFError(
                        f"kubectl's terminal closed before {wanted!r}; got "
                        f"{bytes(self.received[-500:])!r}"
                    )
                self.received += data
        end = at + len(wanted)
        head = bytes(self.received[:end])
        del self.received[:end]
        return head

    async def drain(self, timeout: float) -> bytes:
        """Read until kubectl's terminal closes (its process exited) or `timeout` passes."""
        with trio.move_on_after(timeout):
            while True:
                try:
                    data = await self.master.receive_some(65536)
                except (OSError, trio.BrokenResourceError):
                    break
                if not data:
                    break
                self.received += data
        return bytes(self.received)


@contextlib.asynccontextmanager
async def pty_kubectl(
    env: KubectlEnv, *args: str, rows: int = 24, cols: int = 80
) -> AsyncIterator[PtyKubectl]:
    """Start ``kubectl ARGS`` on a new pseudo-terminal; kill it on exit if it still runs."""
    master, slave = pty.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        proc = await trio.lowlevel.open_process(
            env.argv(*args),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env.env(),
            start_new_session=True,
        )
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    stream = trio.lowlevel.FdStream(master)
    try:
        yield PtyKubectl(proc, stream)
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.move_on_after(10) as scope:
            scope.shield = True
            await proc.wait()
        await stream.aclose()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


@contextlib.asynccontextmanager
async def port_forward(
    env: KubectlEnv, *ports: str, websockets: bool = False, timeout: float = 30
) -> AsyncIterator[dict[int, int]]:
    """Run ``kubectl port-forward pod/POD :PORT...``; yields {pod port: local port}.

    `websockets` selects kubectl's WebSocket transport (KUBECTL_PORT_FORWARD_WEBSOCKETS=true),
    otherwise SPDY/3.1 (the default of kubectl 1.30)."""
    extra = {"KUBECTL_PORT_FORWARD_WEBSOCKETS": "true" if websockets else "false"}
    proc = await trio.lowlevel.open_process(
        env.argv("port-forward", f"pod/{POD}", *(f":{p}" for p in ports)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env.env(extra),
    )
    assert proc.stdout is not None
    try:
        mapping: dict[int, int] = {}
        seen = b""
        with trio.fail_after(timeout):
            while len(mapping) < len(ports):
                data = await proc.stdout.receive_some(4096)
                if not data:
                    raise AssertionError(f"kubectl port-forward exited: {seen!r}")
                seen += data
                for m in re.finditer(rb"Forwarding from 127\.0\.0\.1:(\d+) -> (\d+)", seen):
                    mapping[int(m.group(2))] = int(m.group(1))
        yield mapping
    finally:
        proc.kill()
        with trio.move_on_after(10) as scope:
            scope.shield = True
            await proc.wait()
        await proc.stdout.aclose()
