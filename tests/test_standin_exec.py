"""The K3s API stand-in's exec: the sandboxed commands, and the remote-command protocol driven by
a wsproto client (v4 and v5, the Status JSON, refusals, bad input). Real kubectl drives the same
code through the tunnel in tests/e2e/test_remote_ops.py."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import ssl
import tarfile
from pathlib import Path
from typing import Any

import pytest
import trio
from wsproto import WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from kins_tunnel.testing.k3s_standin import make_self_signed_server_context, serve_k3s_standin
from kins_tunnel.testing.sandbox import Sandbox, SandboxError, run_command

POD = "test-server-kins-7d9f8b6c5-x2x4k"


class FakeIO:
    def __init__(self, stdin: bytes = b"") -> None:
        self.stdin = [stdin[i : i + 1000] for i in range(0, len(stdin), 1000)]
        self.out = bytearray()
        self.err = bytearray()

    async def read(self) -> bytes:
        return self.stdin.pop(0) if self.stdin else b""

    async def write(self, data: bytes) -> None:
        self.out += data

    async def write_err(self, data: bytes) -> None:
        self.err += data


async def run(sandbox: Sandbox, *argv: str, stdin: bytes = b"") -> tuple[int, bytes, bytes]:
    cio = FakeIO(stdin)
    code = await run_command(sandbox, POD, list(argv), cio)
    return code, bytes(cio.out), bytes(cio.err)


def tar_of(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            t.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


async def test_commands(tmp_path: Path) -> None:
    sb = Sandbox(tmp_path / "sb")
    assert await run(sb, "echo", "a", "b") == (0, b"a b\n", b"")
    assert await run(sb, "echo", "-n", "x") == (0, b"x", b"")
    assert await run(sb, "cat", stdin=b"z" * 5000) == (0, b"z" * 5000, b"")
    digest = hashlib.sha256(b"q" * 3000).hexdigest()
    assert await run(sb, "sha256sum", stdin=b"q" * 3000) == (0, f"{digest}  -\n".encode(), b"")
    assert (await run(sb, "test", "-d", "/tmp"))[0] == 0
    assert (await run(sb, "test", "-d", "/tmp/nothing"))[0] == 1
    code, _, err = await run(sb, "bash", "-c", "rm -rf /")
    assert code == 127 and b"bash: not available" in err
    code, _, err = await run(sb)
    assert code == 127


async def test_paths_stay_in_the_pods_directory(tmp_path: Path) -> None:
    sb = Sandbox(tmp_path / "sb")
    top = sb.pod_root(POD)
    for path in ("/../../etc/passwd", "../../../etc/passwd", "/tmp/../../../etc/passwd"):
        real = sb.path(POD, path)
        assert real == top / "etc" / "passwd"
    code, _, err = await run(sb, "cat", "/../../../../../etc/passwd")
    assert code == 1 and b"No such file" in err
    with pytest.raises(SandboxError):
        sb.path(POD, "a\0b")
    with pytest.raises(SandboxError):
        sb.pod_root("../x")
    # a link planted by someone else is not followed out of the sandbox
    (top / "tmp" / "out").symlink_to("/etc")
    with pytest.raises(SandboxError, match="outside the sandbox"):
        sb.path(POD, "/tmp/out/passwd")


async def test_tar_round_trip_and_refusals(tmp_path: Path) -> None:
    sb = Sandbox(tmp_path / "sb")
    archive = tar_of(
        (member("d", tarfile.DIRTYPE), b""),
        (member("d/f.bin"), b"x" * 70000),
        (member("g.txt"), b"gee\n"),
    )
    code, _, err = await run(sb, "tar", "-xmf", "-", "-C", "/tmp", stdin=archive)
    assert (code, err) == (0, b"")
    assert (sb.pod_root(POD) / "tmp" / "d" / "f.bin").read_bytes() == b"x" * 70000
    code, out, err = await run(sb, "tar", "cf", "-", "/tmp/d")
    assert code == 0, err
    with tarfile.open(fileobj=io.BytesIO(out)) as t:
        assert sorted(t.getnames()) == ["tmp/d", "tmp/d/f.bin"]  # as GNU tar names them
        f = t.extractfile("tmp/d/f.bin")
        assert f is not None and f.read() == b"x" * 70000
    # links, devices and names that climb out are refused; nothing lands outside
    evil = tar_of(
        (member("ln", tarfile.SYMTYPE, "/etc/passwd"), b""),
        (member("hard", tarfile.LNKTYPE, "/etc/passwd"), b""),
        (member("dev", tarfile.CHRTYPE), b""),
    )
    code, _, err = await run(sb, "tar", "xmf", "-", "-C", "/tmp", stdin=evil)
    assert code == 2 and err.count(b"skipped") == 3
    assert not any((sb.pod_root(POD) / "tmp" / n).exists() for n in ("ln", "hard", "dev"))
    code, _, err = await run(
        sb, "tar", "xmf", "-", "-C", "/tmp", stdin=tar_of((member("../../../escape"), b"no"))
    )
    assert code == 1 and b"outside" in err
    assert not list(tmp_path.rglob("escape"))
    code, _, err = await run(sb, "tar", "xmf", "-", stdin=b"not a tar archive" * 100)
    assert code == 2 and err.startswith(b"tar: ")
    for argv in (
        ["tar", "xzf", "-"],
        ["tar", "xf", "/etc/passwd"],
        ["tar", "--to-command=sh", "xf", "-"],
        ["tar", "cf", "-"],
        ["tar"],
    ):
        code, _, err = await run(sb, *argv)
        assert code != 0 and err, argv


async def test_sandbox_quota(tmp_path: Path) -> None:
    sb = Sandbox(tmp_path / "sb", max_bytes=100_000)
    code, _, err = await run(
        sb, "tar", "xmf", "-", "-C", "/tmp", stdin=tar_of((member("big"), b"b" * 200_000))
    )
    assert code == 1 and b"No space left" in err


# ---------------------------------------------------------------------------------------------
# The protocol, with a wsproto client


@pytest.fixture
async def standin(nursery: trio.Nursery, tmp_path: Path) -> tuple[int, ssl.SSLContext]:
    ctx, cert = make_self_signed_server_context(tmp_path)
    port = await nursery.start(functools.partial(serve_k3s_standin, ctx, sandbox=tmp_path / "sb"))
    return port, ssl.create_default_context(cafile=str(cert))


class WsClient:
    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.channels: dict[int, bytearray] = {}
        self.closed: int | None = None

    async def open(self, target: str, protocols: list[str]) -> Any:
        await self.stream.send_all(
            self.ws.send(Request(host="k3s", target=target, subprotocols=protocols))
        )
        while True:
            for event in await self.events():
                if isinstance(event, AcceptConnection | RejectConnection):
                    return event

    async def events(self) -> list[Any]:
        data = await self.stream.receive_some(65536)
        self.ws.receive_data(bytes(data) or None)
        return list(self.ws.events())

    async def send(self, channel: int, data: bytes) -> None:
        await self.stream.send_all(self.ws.send(BytesMessage(data=bytes([channel]) + data)))

    async def run_to_close(self) -> dict[int, bytes]:
        """Collect channel data until the server closes; answer its close."""
        current: int | None = None
        while self.closed is None:
            for event in await self.events():
                if isinstance(event, BytesMessage):
                    data = bytes(event.data)
                    if current is None:
                        current, data = data[0], data[1:]
                    self.channels.setdefault(current, bytearray()).extend(data)
                    if event.message_finished:
                        current = None
                elif isinstance(event, CloseConnection):
                    self.closed = event.code
                    await self.stream.send_all(self.ws.send(event.response()))
        return {k: bytes(v) for k, v in self.channels.items()}


async def ws_client(standin: tuple[int, ssl.SSLContext]) -> WsClient:
    port, ctx = standin
    stream = await trio.open_ssl_over_tcp_stream(
        "127.0.0.1", port, ssl_context=ctx, https_compatible=True
    )
    return WsClient(stream)


EXEC = f"/api/v1/namespaces/default/pods/{POD}/exec"


@pytest.mark.parametrize("protocol", ["v5.channel.k8s.io", "v4.channel.k8s.io"])
async def test_exec_protocol_and_exit_status(
    standin: tuple[int, ssl.SSLContext], protocol: str
) -> None:
    v5 = protocol.startswith("v5")
    # v4 has no "stdin closed" signal, so there the command reads no stdin
    client = await ws_client(standin)
    try:
        with trio.fail_after(10):
            accepted = await client.open(
                f"{EXEC}?command=cat&command=/nope&command=-&stdin={v5}&stdout=true&stderr=true",
                ["other", protocol],
            )
            assert isinstance(accepted, AcceptConnection) and accepted.subprotocol == protocol
            if v5:
                await client.send(0, b"hello ")
                await client.send(0, b"world")
                await client.stream.send_all(client.ws.send(Ping(b"hb")))
                await client.send(255, b"\x00")  # v5: stdin closed
            channels = await client.run_to_close()
    finally:
        await trio.aclose_forcefully(client.stream)
    assert channels.get(1, b"") == (b"hello world" if v5 else b"")
    assert channels[2] == b"cat: /nope: No such file or directory\n"
    status = json.loads(channels[3])
    assert status["status"] == "Failure" and status["reason"] == "NonZeroExitCode"
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "1"}]
    assert client.closed == 1000


async def test_exec_success_status_and_resize_ignored(standin: tuple[int, ssl.SSLContext]) -> None:
    client = await ws_client(standin)
    try:
        with trio.fail_after(10):
            await client.open(
                f"{EXEC}?command=echo&command=ok&stdout=true&tty=true", ["v5.channel.k8s.io"]
            )
            await client.send(4, b'{"Width":80,"Height":24}')
            channels = await client.run_to_close()
    finally:
        await trio.aclose_forcefully(client.stream)
    assert channels[1] == b"ok\r\n"  # a TTY turns \n into \r\n
    assert json.loads(channels[3])["status"] == "Success"


@pytest.mark.parametrize(
    ("query", "protocols", "status"),
    [
        (f"{EXEC}?command=echo&stdout=true", ["v3.channel.k8s.io"], 400),  # no shared subprotocol
        (f"{EXEC}?stdout=true", ["v5.channel.k8s.io"], 400),  # no command
        (f"{EXEC}?command=echo", ["v5.channel.k8s.io"], 400),  # no stream
        (
            "/api/v1/namespaces/default/pods/nope/exec?command=echo&stdout=true",
            ["v5.channel.k8s.io"],
            404,
        ),
    ],
)
async def test_exec_refusals(
    standin: tuple[int, ssl.SSLContext], query: str, protocols: list[str], status: int
) -> None:
    client = await ws_client(standin)
    try:
        with trio.fail_after(10):
            answer = await client.open(query, protocols)
            assert isinstance(answer, RejectConnection)
            assert answer.status_code == status
            body = b""
            while not body.endswith(b"}"):
                body += b"".join(
                    bytes(e.data) for e in await client.events() if isinstance(e, RejectData)
                )
            assert json.loads(body)["kind"] == "Status"
    finally:
        await trio.aclose_forcefully(client.stream)


async def raw_exchange(standin: tuple[int, ssl.SSLContext], request: bytes) -> bytes:
    port, ctx = standin
    stream = await trio.open_ssl_over_tcp_stream(
        "127.0.0.1", port, ssl_context=ctx, https_compatible=True
    )
    try:
        with trio.fail_after(10):
            await stream.send_all(request)
            out = b""
            while b"\r\n\r\n" not in out or not out.rstrip().endswith(b"}"):
                data = await stream.receive_some(65536)
                if not data:
                    break
                out += data
            return out
    finally:
        await trio.aclose_forcefully(stream)


async def test_spdy_fallback_gets_a_clear_error(standin: tuple[int, ssl.SSLContext]) -> None:
    out = await raw_exchange(
        standin,
        (
            f"POST {EXEC}?command=echo&stdout=true HTTP/1.1\r\nHost: k3s\r\nConnection: Upgrade\r\n"
            "Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode(),
    )
    assert out.startswith(b"HTTP/1.1 400 ")
    assert b"not SPDY" in out


async def test_bad_websocket_input_ends_only_that_exec(standin: tuple[int, ssl.SSLContext]) -> None:
    # a handshake without a key is refused; a text message or a garbage frame ends the exec
    out = await raw_exchange(
        standin,
        (
            f"GET {EXEC}?command=cat&stdin=true&stdout=true HTTP/1.1\r\nHost: k3s\r\n"
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: v5.channel.k8s.io\r\n\r\n"
        ).encode(),
    )
    assert out.startswith(b"HTTP/1.1 400 ")
    for bad in ("text", "garbage"):
        client = await ws_client(standin)
        try:
            with trio.fail_after(10):
                await client.open(
                    f"{EXEC}?command=cat&stdin=true&stdout=true", ["v5.channel.k8s.io"]
                )
                if bad == "text":
                    await client.stream.send_all(client.ws.send(TextMessage("hi")))
                else:
                    await client.stream.send_all(b"\xff" * 64)
                while True:  # the server closes; no hang
                    data = await client.stream.receive_some(65536)
                    if not data:
                        break
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(client.stream)
    # the stand-in still serves
    client = await ws_client(standin)
    try:
        with trio.fail_after(10):
            await client.open(
                f"{EXEC}?command=echo&command=alive&stdout=true", ["v5.channel.k8s.io"]
            )
            assert (await client.run_to_close())[1] == b"alive\n"
    finally:
        await trio.aclose_forcefully(client.stream)
