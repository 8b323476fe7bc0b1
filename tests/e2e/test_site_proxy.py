"""The edge behind a site proxy (`proxy:` in edge.yaml): its tunnel to the cloud goes through a real
tinyproxy started by the test, with and without Basic credentials.

Checked: the tunnel works and tinyproxy logged the CONNECT to the tunnel port; the tunnel dies with
the proxy and comes back with it; wrong credentials are counted failures (reason `proxy`) that are
retried, and a corrected credentials file is used by the next attempt; a proxy that never answers
is a `timeout` within handshake_timeout; a cloud name the edge cannot resolve is handed to the proxy;
with real processes, the edge reconnects after a cloud restart and detects a frozen proxy by its
ping timeout, both through the proxy.
"""

from __future__ import annotations

import base64
import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from kins_tunnel.edge.agent import Edge
from kins_tunnel.testing.support import metric_value, read_head
from tests.e2e.faultkit import (
    connect_status,
    edge_status,
    figure,
    procs,
    wait_cloud_up,
    wait_connect,
    wait_edges,
    wait_until,
)
from tests.e2e.harness import (
    SVC,
    connect,
    free_port,
    serve_echo,
    serve_loopback,
    tunnel_env,
    wait_routed,
)

TINYPROXY = shutil.which("tinyproxy") or shutil.which("tinyproxy", path="/usr/sbin:/usr/bin")
needs_tinyproxy = pytest.mark.skipif(
    TINYPROXY is None, reason="needs tinyproxy (.ci/system-packages installs it)"
)

PING = {"ping_interval": 0.5, "ping_timeout": 2.0}
CLOUD_FAST: dict[str, Any] = {
    "tunnel": {**PING, "handshake_timeout": 3.0},
    "proxy": {"dial_timeout": 3.0},
}
EDGE_FAST: dict[str, Any] = {
    **PING,
    "reconnect": {"initial": 0.1, "max": 0.5},
    "dial_timeout": 1.0,
    "handshake_timeout": 2.0,
}


@dataclass
class Tinyproxy:
    """A real tinyproxy on 127.0.0.1 that allows CONNECT only to `connect_port`."""

    base: Path
    connect_port: int
    auth: tuple[str, str] | None = None
    port: int = 0
    popen: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.port = self.port or free_port()  # below the ephemeral range: restartable on this port
        self.conf = self.base / f"tinyproxy-{self.port}.conf"
        self.log = self.base / f"tinyproxy-{self.port}.log"
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Timeout 600",
            "Allow 127.0.0.1",
            "MaxClients 100",
            "LogLevel Connect",
            f"ConnectPort {self.connect_port}",
        ]
        if self.auth is not None:
            lines.append(f"BasicAuth {self.auth[0]} {self.auth[1]}")
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen(
                [TINYPROXY or "tinyproxy", "-d", "-c", str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 10
        while True:  # until it listens
            assert self.popen.poll() is None, f"tinyproxy exited:\n{self.log.read_text()}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, (
                    f"tinyproxy did not listen:\n{self.log.read_text()}"
                )
                time.sleep(0.05)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)
            self.popen.kill()
        if self.popen is not None:
            self.popen.wait(10)

    def signal(self, sig: int) -> None:
        assert self.popen is not None
        self.popen.send_signal(sig)

    def connects(self, target: str) -> int:
        """CONNECT requests for `target` in tinyproxy's log."""
        return self.log.read_text(errors="replace").count(f": CONNECT {target} HTTP/1.1")


@contextlib.contextmanager
def tinyproxy(
    base: Path, connect_port: int, auth: tuple[str, str] | None = None
) -> Iterator[Tinyproxy]:
    tp = Tinyproxy(base, connect_port, auth)
    tp.start()
    try:
        yield tp
    finally:
        tp.stop()


async def echo_through(proxy_port: int, target: str = SVC) -> None:
    status, head, s = await connect(proxy_port, target)
    async with s:
        assert status == 200, head
        await s.send_all(b"ping")
        got = b""
        with trio.fail_after(5):
            while len(got) < 4:
                chunk = await s.receive_some(4)
                assert chunk
                got += chunk
        assert got == b"ping"


def failures(edge: Edge, reason: str) -> float:
    return metric_value(edge.metrics, "kins_tunnel_handshake_failures_total", reason=reason)


@needs_tinyproxy
async def test_edge_through_tinyproxy_without_credentials(tmp_path: Path) -> None:
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        async with tunnel_env(tmp_path, **CLOUD_FAST) as env:
            with tinyproxy(tmp_path, env.ports.tunnel) as tp:
                edge = await env.add_edge(
                    {SVC: f"127.0.0.1:{echo}"}, wait_for=SVC, proxy={"url": tp.url}, **EDGE_FAST
                )
                await echo_through(env.ports.proxy)
                assert tp.connects(f"127.0.0.1:{env.ports.tunnel}") == 1
                # the tunnel lives inside tinyproxy's connection: it dies with the proxy ...
                tp.stop()
                await wait_until(
                    lambda: not (env.cloud.registry.candidates(SVC) or edge.sessions),
                    5,
                    "the tunnel is gone",
                )
                await wait_until(
                    lambda: failures(edge, "connect") >= 2,
                    5,
                    "the edge keeps trying (the proxy refuses TCP)",
                )
                assert not edge.sessions
                # ... and comes back with it
                tp.start()
                await wait_routed(env.cloud, SVC)
                await echo_through(env.ports.proxy)
                assert tp.connects(f"127.0.0.1:{env.ports.tunnel}") == 2
        n.cancel_scope.cancel()


@needs_tinyproxy
async def test_edge_through_tinyproxy_with_credentials(tmp_path: Path) -> None:
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        async with tunnel_env(tmp_path, **CLOUD_FAST) as env:
            with tinyproxy(tmp_path, env.ports.tunnel, auth=("site-user", "pa.ss-1")) as tp:
                creds = tmp_path / "proxy-credentials"  # relative in the config: next to it
                creds.write_text("site-user:wrong\n")
                edge = await env.add_edge(
                    {SVC: f"127.0.0.1:{echo}"},
                    proxy={"url": tp.url, "credentials_file": "proxy-credentials"},
                    **EDGE_FAST,
                )
                await wait_until(
                    lambda: failures(edge, "proxy") >= 3,
                    10,
                    "refused (407), counted, retried with backoff",
                )
                assert not env.cloud.registry.candidates(SVC) and not edge.sessions
                assert failures(edge, "protocol") == failures(edge, "timeout") == 0
                # the next attempt reads the file again
                creds.write_text("site-user:pa.ss-1\n")
                await wait_routed(env.cloud, SVC)
                await echo_through(env.ports.proxy)
                assert tp.connects(f"127.0.0.1:{env.ports.tunnel}") >= 4
        n.cancel_scope.cancel()


async def test_silent_proxy_is_a_timeout_at_handshake_timeout(
    tmp_path: Path, virtual_clock: trio.testing.MockClock
) -> None:
    """A proxy test double that accepts and never answers: each set-up fails at handshake_timeout
    (virtual time, so the bounds are exact), counted as `timeout`, and is retried after backoff."""
    attempts: list[float] = []

    async def silent_proxy_double(stream: trio.SocketStream) -> None:
        attempts.append(trio.current_time())
        await trio.sleep_forever()

    async with trio.open_nursery() as n:
        silent = await n.start(serve_loopback, silent_proxy_double)
        async with tunnel_env(tmp_path, **CLOUD_FAST) as env:
            edge = await env.add_edge(
                {SVC: "127.0.0.1:9"},
                proxy={"url": f"http://127.0.0.1:{silent}"},
                **{**EDGE_FAST, "handshake_timeout": 0.5},
            )
            await wait_until(
                lambda: failures(edge, "timeout") >= 3 and len(attempts) >= 4,
                30,
                "three timeouts, four attempts",
            )
            assert failures(edge, "proxy") == failures(edge, "connect") == 0
            gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
            # each attempt: 0.5 s until the deadline, then a backoff of at most reconnect.max (0.5 s)
            assert all(0.5 <= gap <= 0.5 + 0.5 + 0.05 for gap in gaps), gaps
        n.cancel_scope.cancel()


async def test_credentials_are_sent_exactly_as_in_the_file(tmp_path: Path) -> None:
    """A proxy test double that records the edge's CONNECT and refuses it."""
    heads: list[bytes] = []

    async def recording_proxy_double(stream: trio.SocketStream) -> None:
        head = await read_head(stream)
        if b"\r\n\r\n" not in head:
            return
        heads.append(head)
        await stream.send_all(
            b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\r\n"
            b"not allowed\n"
        )

    async with trio.open_nursery() as n:
        port = await n.start(serve_loopback, recording_proxy_double)
        async with tunnel_env(tmp_path, **CLOUD_FAST) as env:
            (tmp_path / "creds").write_bytes("site-user:p\u00e4:ss  \n".encode())
            edge = await env.add_edge(
                {SVC: "127.0.0.1:9"},
                proxy={"url": f"http://127.0.0.1:{port}", "credentials_file": "creds"},
                **EDGE_FAST,
            )
            await wait_until(lambda: failures(edge, "proxy") >= 2, 10, "two refusals by the proxy")
            lines = heads[0].split(b"\r\n")
            assert lines[0] == f"CONNECT 127.0.0.1:{env.ports.tunnel} HTTP/1.1".encode()
            auth = [ln for ln in lines if ln.lower().startswith(b"proxy-authorization: basic ")]
            assert len(auth) == 1
            assert base64.b64decode(auth[0].split()[-1]) == "site-user:p\u00e4:ss  ".encode()
        n.cancel_scope.cancel()


class NoDNSResolver(trio.abc.HostnameResolver):
    """A resolver test double for this trio run: every name lookup fails, as on a site whose DNS
    does not answer for outside names (numeric addresses never reach a resolver)."""

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def getnameinfo(
        self, sockaddr: tuple[str, int] | tuple[str, int, int, int], flags: int
    ) -> tuple[str, str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


@needs_tinyproxy
async def test_unresolvable_cloud_name_is_resolved_by_the_proxy(tmp_path: Path) -> None:
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        async with tunnel_env(tmp_path, **CLOUD_FAST) as env:
            with tinyproxy(tmp_path, env.ports.tunnel) as tp:
                trio.socket.set_custom_hostname_resolver(NoDNSResolver())
                # `localhost` is a SAN of the cloud certificate; tinyproxy resolves it
                edge = await env.add_edge(
                    {SVC: f"127.0.0.1:{echo}"},
                    wait_for=SVC,
                    proxy={"url": tp.url},
                    cloud=[f"localhost:{env.ports.tunnel}"],
                    **EDGE_FAST,
                )
                await echo_through(env.ports.proxy)
                assert list(edge.sessions) == [f"localhost:{env.ports.tunnel}"]
                assert tp.connects(f"localhost:{env.ports.tunnel}") == 1
        n.cancel_scope.cancel()


@needs_tinyproxy
async def test_reconnect_and_liveness_through_tinyproxy_with_processes(tmp_path: Path) -> None:
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        with procs(tmp_path) as ps:
            cloud = ps.cloud(**CLOUD_FAST)
            await wait_cloud_up(cloud)
            with tinyproxy(tmp_path, cloud.tunnel, auth=("site-user", "pass")) as tp:
                (tmp_path / "proxy-credentials").write_text("site-user:pass\n")
                edge = ps.edge(
                    cloud.tunnel,
                    {SVC: f"127.0.0.1:{echo}"},
                    **EDGE_FAST,
                    proxy={"url": tp.url, "credentials_file": "proxy-credentials"},
                )
                await wait_edges(cloud, 1)
                await echo_through(cloud.proxy)
                target = f"127.0.0.1:{cloud.tunnel}"
                assert tp.connects(target) == 1

                # the cloud restarts: the edge reconnects through the proxy
                cloud.kill()

                async def no_tunnel() -> bool:
                    return not (await edge_status(edge))["tunnels"]

                seen = await wait_until(no_tunnel, 5, "edge noticed the cloud is gone")
                figure("site proxy, cloud kill: edge noticed after", seen, "s")
                cloud.start()
                await wait_cloud_up(cloud)
                back = await wait_connect(cloud.proxy, SVC, 200, timeout=10)
                figure(
                    "site proxy, cloud restart: edge serving again after the cloud was ready",
                    back,
                    "s",
                )
                await echo_through(cloud.proxy)
                assert tp.connects(target) >= 2

                # the proxy freezes (a half-open path): both sides detect it by the ping timeout
                before = tp.connects(target)
                stopped = time.monotonic()
                tp.signal(signal.SIGSTOP)
                try:
                    detect = await wait_edges(cloud, 0, timeout=10)
                    figure(
                        "site proxy frozen: cloud dropped the edge after",
                        detect,
                        "s (ping_timeout 2 s)",
                    )
                    assert 1.5 <= detect <= 4.0
                    edge_detect = await wait_until(no_tunnel, 5, "edge dropped its tunnel") + detect
                    figure("site proxy frozen: edge dropped its tunnel after", edge_detect, "s")
                    assert await connect_status(cloud.proxy, SVC) == 503
                finally:
                    tp.signal(signal.SIGCONT)
                figure("site proxy frozen for", time.monotonic() - stopped, "s")
                back = await wait_connect(cloud.proxy, SVC, 200, timeout=10)
                figure("site proxy: serving again after SIGCONT", back, "s")
                await echo_through(cloud.proxy)
                assert tp.connects(target) > before
                assert (await edge_status(edge))["tunnels"][0]["cloud"] == target
        n.cancel_scope.cancel()
