"""Remote operation through the tunnel with real kubectl: exec, exec -i, exec -it, attach, cp,
port-forward (SPDY and WebSocket), and a raw ``Upgrade: SPDY/3.1`` exchange checked byte for byte.

kubectl ≥ 1.30 speaks the WebSocket remote-command protocol (v5.channel.k8s.io) to the K3s API
stand-in (a test double with a fixed set of sandboxed commands, kins_tunnel.testing), through the
cloud's CONNECT proxy and the edge. Figures (round trips, throughput) are printed, never asserted.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
import trio

from kins_tunnel.testing.k3s_standin import iter_blob
from tests.clients import needs_kubectl, sha256_file
from tests.e2e.faultkit import figure
from tests.e2e.harness import SVC, connect, serve_loopback, tunnel_env
from tests.e2e.kubectl_tools import (
    POD,
    kubectl_env,
    percentile,
    port_forward,
    pty_kubectl,
)

pytestmark = needs_kubectl


async def test_exec_echo_and_exit_codes(tmp_path: Path) -> None:
    async with kubectl_env(tmp_path) as env:
        r = await env.run("exec", POD, "--", "echo", "hi", "through", "the", "tunnel")
        assert (r.returncode, r.stdout) == (0, b"hi through the tunnel\n"), r.stderr
        # the exit code travels in the Status on channel 3
        r = await env.run("exec", POD, "--", "sha256sum", "/no/such/file")
        assert r.returncode == 1
        assert b"sha256sum: /no/such/file: No such file or directory" in r.stderr
        assert b"command terminated with exit code 1" in r.stderr
        r = await env.run("exec", POD, "--", "sh", "-c", "id")
        assert r.returncode == 127
        assert b"sh: not available" in r.stderr
        r = await env.run("exec", "no-such-pod", "--", "echo")
        assert r.returncode == 1 and b"not found" in r.stderr
        # the API's name resolves nowhere but through the tunnel: the cloud carried the bytes
        assert env.tunnel is not None
        assert sum(t.session.statistics().bytes_received for t in env.tunnel.cloud.registry) > 0


async def test_exec_stdin_checksummed(tmp_path: Path) -> None:
    data = os.urandom(20 * 1024 * 1024 + 7)
    async with kubectl_env(tmp_path) as env:
        start = time.perf_counter()
        r = await env.run("exec", "-i", POD, "--", "sha256sum", stdin=data, timeout=120)
        took = time.perf_counter() - start
        assert r.returncode == 0, r.stderr
        assert r.stdout == f"{hashlib.sha256(data).hexdigest()}  -\n".encode()
        figure("exec -i 20 MiB into sha256sum", len(data) / took / 1e6, "MB/s")
        # stdin and stdout at once: cat sends everything back
        r = await env.run("exec", "-i", POD, "--", "cat", stdin=data[:3_000_000], timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout == data[:3_000_000]


async def test_exec_it_interactive_round_trips(tmp_path: Path) -> None:
    lines = 200
    async with (
        kubectl_env(tmp_path) as env,
        pty_kubectl(env, "exec", "-it", POD, "--", "cat") as term,
    ):
        rtts = []
        for i in range(lines):
            line = b"line %05d" % i
            start = time.perf_counter()
            await term.send(line + b"\r")
            # the terminal's echo of the typed line, then cat's answer, each ending \r\n
            await term.expect(line + b"\r\n" + line + b"\r\n")
            rtts.append(time.perf_counter() - start)
        await term.send(b"\x04")  # ^D: end of input; cat exits 0, kubectl too
        with trio.fail_after(30):
            assert await term.proc.wait() == 0, await term.drain(1)
    figure("exec -it line round trip p50", percentile(rtts, 50) * 1e3, "ms")
    figure("exec -it line round trip p99", percentile(rtts, 99) * 1e3, "ms")
    assert len(rtts) == lines


async def test_exec_it_interrupt_ends_with_130(tmp_path: Path) -> None:
    async with (
        kubectl_env(tmp_path) as env,
        pty_kubectl(env, "exec", "-it", POD, "--", "cat") as term,
    ):
        await term.send(b"abc\r")
        await term.expect(b"abc\r\nabc\r\n")
        await term.send(b"\x03")
        with trio.fail_after(30):
            code = await term.proc.wait()
        assert code == 130, await term.drain(1)


async def test_attach_line_echo(tmp_path: Path) -> None:
    async with kubectl_env(tmp_path) as env:
        r = await env.run("attach", "-i", POD, stdin=b"one\ntwo\n", timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.endswith(b"one\ntwo\n"), r.stdout
        async with pty_kubectl(env, "attach", "-it", POD) as term:
            await term.send(b"hello\r")
            await term.expect(b"hello\r\nhello\r\n")
            await term.send(b"\x04")
            with trio.fail_after(30):
                assert await term.proc.wait() == 0


def write_blob(path: Path, size: int, seed: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in iter_blob(size, seed, chunk_size=4 << 20):
            digest.update(chunk)
            f.write(chunk)
    return digest.hexdigest()


async def test_cp_small_tree_and_refusals(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_bytes(b"alpha\n")
    (tree / "sub" / "b.bin").write_bytes(os.urandom(100_000))
    async with kubectl_env(tmp_path) as env:
        r = await env.run("cp", str(tree), f"{POD}:/tmp/tree")
        assert r.returncode == 0, r.stderr
        assert env.pod_file("/tmp/tree/a.txt").read_bytes() == b"alpha\n"
        assert (
            env.pod_file("/tmp/tree/sub/b.bin").read_bytes()
            == (tree / "sub" / "b.bin").read_bytes()
        )
        back = tmp_path / "back"
        r = await env.run("cp", f"{POD}:/tmp/tree", str(back))
        assert r.returncode == 0, r.stderr
        assert (back / "sub" / "b.bin").read_bytes() == (tree / "sub" / "b.bin").read_bytes()
        # ".." cannot leave the pod's sandbox directory: /../../x is /x
        r = await env.run("exec", POD, "--", "cat", "/../../../../etc/hostname")
        assert r.returncode == 1 and b"No such file" in r.stderr
        assert not any(p.name == "hostname" for p in env.sandbox.rglob("*"))


@pytest.mark.slow
async def test_cp_200_mib_into_the_sandbox_and_back(tmp_path: Path) -> None:
    size = 200 * 1024 * 1024
    src = tmp_path / "upgrade.bin"
    want = write_blob(src, size, seed=42)
    async with kubectl_env(tmp_path) as env:
        start = time.perf_counter()
        r = await env.run("cp", str(src), f"{POD}:/tmp/upgrade.bin", timeout=600)
        up = time.perf_counter() - start
        assert r.returncode == 0, r.stderr
        assert sha256_file(env.pod_file("/tmp/upgrade.bin")) == want
        # the stand-in's own sha256sum agrees (the file as the pod sees it)
        r = await env.run("exec", POD, "--", "sha256sum", "/tmp/upgrade.bin")
        assert r.stdout == f"{want}  /tmp/upgrade.bin\n".encode(), r.stderr
        back = tmp_path / "back.bin"
        start = time.perf_counter()
        r = await env.run("cp", f"{POD}:/tmp/upgrade.bin", str(back), timeout=600)
        down = time.perf_counter() - start
        assert r.returncode == 0, r.stderr
        assert sha256_file(back) == want
    figure("kubectl cp 200 MiB into the pod", size / up / 1e6, "MB/s")
    figure("kubectl cp 200 MiB out of the pod", size / down / 1e6, "MB/s")


async def echo_through(port: int, data: bytes) -> bytes:
    """Send `data` to a local port while reading the answer; half-close; read to the end."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = bytearray()
    try:

        async def sender() -> None:
            for i in range(0, len(data), 1 << 16):
                await stream.send_all(data[i : i + (1 << 16)])
            await stream.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            while chunk := await stream.receive_some(1 << 18):
                received += chunk
    finally:
        await stream.aclose()
    return bytes(received)


@pytest.mark.parametrize("websockets", [False, True], ids=["spdy", "websocket"])
async def test_port_forward_checksummed(tmp_path: Path, websockets: bool) -> None:
    data = os.urandom(20 * 1024 * 1024 + 3)
    async with (
        kubectl_env(tmp_path) as env,
        port_forward(env, "7", "9", websockets=websockets) as ports,
    ):
        with trio.fail_after(120):
            start = time.perf_counter()
            back = await echo_through(ports[7], data)
            took = time.perf_counter() - start
            assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
            # several connections at once, each its own pair of SPDY streams
            answers: list[bytes] = []

            async def digest(i: int) -> None:
                answers.append(
                    await echo_through(ports[9], data[i * 100_000 : (i + 1) * 3_000_000])
                )

            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(digest, i)
        want = {
            f"{hashlib.sha256(data[i * 100_000 : (i + 1) * 3_000_000]).hexdigest()} "
            f"{len(data[i * 100_000 : (i + 1) * 3_000_000])}\n".encode()
            for i in range(4)
        }
        assert set(answers) == want
    kind = "WebSocket" if websockets else "SPDY"
    figure(f"port-forward ({kind}) 20 MiB echo, each way", len(data) / took / 1e6, "MB/s")


async def test_port_forward_to_a_port_nothing_serves(tmp_path: Path) -> None:
    async with kubectl_env(tmp_path) as env, port_forward(env, "80") as ports:
        got = b"not ended"
        with trio.fail_after(30):  # the stand-in writes an error on the error stream and ends it
            try:
                got = await echo_through(ports[80], b"GET / HTTP/1.0\r\n\r\n")
            except* trio.BrokenResourceError:
                got = b""  # kubectl closed the local connection with our request unread: a reset
        assert got == b""  # ended, and not a byte came back
        r = await env.run("get", "pods", "-o", "name")  # and goes on serving
        assert r.returncode == 0


async def test_spdy_upgrade_exchange_passes_through_unchanged(tmp_path: Path) -> None:
    """101, then bytes both ways and a half-close from each side, through cloud and edge: what
    each end receives is exactly what the other sent."""
    client_body = os.urandom(2 * 1024 * 1024)
    server_body = os.urandom(3 * 1024 * 1024) + b"bye"
    seen_by_target = bytearray()
    sent_by_target = bytearray()

    async def upgrade_target(stream: trio.SocketStream) -> None:
        while b"\r\n\r\n" not in seen_by_target:
            chunk = await stream.receive_some(65536)
            assert chunk, "request cut short"
            seen_by_target.extend(chunk)
        head = (
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
            b"X-Stream-Protocol-Version: portforward.k8s.io\r\n\r\n"
        )

        async def send() -> None:
            for piece in (
                head,
                server_body[: len(server_body) // 2],
                server_body[len(server_body) // 2 :],
            ):
                await stream.send_all(piece)
                sent_by_target.extend(piece)
            await stream.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while chunk := await stream.receive_some(65536):
                seen_by_target.extend(chunk)

    request = (
        b"POST /api/v1/namespaces/default/pods/p/portforward HTTP/1.1\r\n"
        b"Host: test-svc-kins.kins-system:443\r\nConnection: Upgrade\r\n"
        b"Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: portforward.k8s.io\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_loopback, upgrade_target)
        async with tunnel_env(tmp_path, {SVC: f"127.0.0.1:{port}"}) as env:
            status, _, stream = await connect(env.ports.proxy, SVC)
            assert status == 200
            received = bytearray()
            try:
                with trio.fail_after(60):
                    await stream.send_all(request)
                    while b"\r\n\r\n" not in received:
                        received += await stream.receive_some(65536)
                    assert received.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")

                    async def send() -> None:
                        for i in range(0, len(client_body), 100_000):
                            await stream.send_all(client_body[i : i + 100_000])
                        await stream.send_eof()  # the client's half-close

                    async with trio.open_nursery() as inner:
                        inner.start_soon(send)
                        while chunk := await stream.receive_some(65536):
                            received += chunk
            finally:
                await stream.aclose()
        nursery.cancel_scope.cancel()
    assert bytes(seen_by_target) == request + client_body  # the target saw the client's half-close
    assert bytes(received) == bytes(sent_by_target)  # and the client saw the target's
    assert received.endswith(b"bye")
