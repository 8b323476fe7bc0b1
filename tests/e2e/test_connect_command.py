"""`kins-tunnel connect` (the stdio CONNECT client for ssh's ProxyCommand), run as a real process.

Against a real cloud with CONNECT auth and a real edge: ssh, scp and rsync with the command as
ProxyCommand to a throw-away sshd behind the edge (`edge1:22`); every credential form; the exit
codes and one-line messages of refusals; TLS to the proxy through a socat TLS terminator in front
of the cloud's plain proxy (with a certificate from `kins_tunnel.certs`). Three small proxy test
doubles (raw sockets, named as such) cover what a real proxy does not do on demand: bytes in the
same packet as the 200 head, an answer that never comes, an answer that is not HTTP.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import trio

from kins_tunnel.certs.directory import issue_user
from kins_tunnel.testing.support import read_head, wait_listening
from tests.e2e.faultkit import procs, wait_cloud_up, wait_edges
from tests.e2e.harness import (
    echo_bytes,
    free_port,
    hanging_listener,
    make_certs,
    serve_digest,
    serve_echo,
    serve_loopback,
    tunnel_env,
)
from tests.e2e.sshd import HAVE_SSH, USER, Sshd, throwaway_sshd

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "s3cr:et x"  # a colon and a space: only the first colon separates user and password
TOKEN = "tok-3f9a1c"
needs_ssh = pytest.mark.skipif(
    not HAVE_SSH,
    reason="needs openssh-server and openssh-client (.ci/system-packages installs them)",
)


def connect_argv(target: str, proxy_url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kins_tunnel", "connect", target, "--proxy", proxy_url, *extra]


def child_env(**extra: str) -> dict[str, str]:
    """The environment of the connect process (and of ssh, which passes it on to ProxyCommand)."""
    env = {k: v for k, v in os.environ.items() if k != "KINS_TUNNEL_PROXY_PASSWORD"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return {**env, **extra}


async def run(
    argv: list[str], stdin: bytes = b"", timeout: float = 30, **env: str
) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(timeout):
        return await trio.run_process(
            argv,
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=child_env(**env),
            cwd=REPO,
        )


def write_credentials(base: Path) -> dict[str, Any]:
    (base / "users").write_text(f"u:{PASSWORD}\n")
    (base / "tokens").write_text(f"{TOKEN}\n")
    return {"auth": {"basic_file": str(base / "users"), "bearer_file": str(base / "tokens")}}


@contextlib.asynccontextmanager
async def auth_tunnel(base: Path, services: Mapping[str, str]) -> AsyncIterator[str]:
    """A cloud that requires Basic or Bearer credentials and an edge serving `services`; yields the
    proxy URL (without credentials)."""
    async with tunnel_env(base, services, proxy=write_credentials(base)) as env:
        yield f"http://127.0.0.1:{env.ports.proxy}"


def proxy_command(proxy_url: str, *extra: str) -> str:
    return " ".join(
        [sys.executable, "-m", "kins_tunnel", "connect", "%h:%p", "--proxy", proxy_url, *extra]
    )


async def ssh(
    sshd: Sshd, proxy_cmd: str, command: str, stdin: bytes = b"", timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[bytes]:
    return await run(
        sshd.ssh_argv(proxy_cmd, command),
        stdin=stdin,
        timeout=timeout,
        **env,
    )


# ---------------------------------------------------------------- through the real cloud


@needs_ssh
async def test_ssh_with_connect_command_and_basic_auth(tmp_path: Path) -> None:
    async with (
        throwaway_sshd(tmp_path) as sshd,
        auth_tunnel(tmp_path, {"edge1:22": f"127.0.0.1:{sshd.port}"}) as url,
    ):
        upload = os.urandom(8 * 1024 * 1024 + 17)
        cmd = proxy_command(url, "--proxy-user", f"'u:{PASSWORD}'")
        r = await ssh(sshd, cmd, "sha256sum; head -c 3000000 /dev/zero | wc -c", stdin=upload)
        assert r.returncode == 0, r.stderr + sshd.log_tail().encode()
        assert r.stdout.split() == [hashlib.sha256(upload).hexdigest().encode(), b"-", b"3000000"]
        # the password from the environment, not on the command line
        r = await ssh(
            sshd,
            proxy_command(url, "--proxy-user", "u"),
            "echo env-password",
            KINS_TUNNEL_PROXY_PASSWORD=PASSWORD,
        )
        assert (r.returncode, r.stdout) == (0, b"env-password\n"), r.stderr
        # wrong credentials: ssh fails and shows the proxy's reason
        r = await ssh(sshd, proxy_command(url, "--proxy-user", "u:wrong"), "true")
        assert r.returncode != 0
        assert b"kins-tunnel connect: proxy 127.0.0.1:" in r.stderr
        assert b"answered 407 Proxy Authentication Required" in r.stderr, r.stderr


@needs_ssh
@pytest.mark.skipif(
    shutil.which("rsync") is None or shutil.which("scp") is None,
    reason="needs rsync and scp (.ci/system-packages installs them)",
)
async def test_scp_and_rsync_with_connect_command(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    files = {"a.bin": os.urandom(3 * 1024 * 1024), "sub/b.txt": b"hello\n" * 1000, "empty": b""}
    for name, data in files.items():
        (src / name).write_bytes(data)
    async with (
        throwaway_sshd(tmp_path) as sshd,
        auth_tunnel(tmp_path, {"edge1:22": f"127.0.0.1:{sshd.port}"}) as url,
    ):
        cmd = proxy_command(url, "--proxy-user", "u")
        opts = [*sshd.ssh_options(), "-o", f"ProxyCommand={cmd}"]
        r = await run(
            ["scp", *opts, "-P", "22", str(src / "a.bin"), f"{USER}@edge1:{tmp_path / 'scp.bin'}"],
            KINS_TUNNEL_PROXY_PASSWORD=PASSWORD,
        )
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "scp.bin").read_bytes() == files["a.bin"]
        rsh = " ".join(["ssh", *(f"'{o}'" if " " in o else o for o in opts)])
        r = await run(
            ["rsync", "-a", "-e", rsh, f"{src}/", f"{USER}@edge1:{tmp_path / 'rsync'}/"],
            KINS_TUNNEL_PROXY_PASSWORD=PASSWORD,
        )
        assert r.returncode == 0, r.stderr
        for name, data in files.items():
            assert (tmp_path / "rsync" / name).read_bytes() == data


async def test_credential_forms_and_half_close(tmp_path: Path) -> None:
    """stdin EOF half-closes: the digest server answers only after it, then the far end closes."""
    async with trio.open_nursery() as n:
        digest = await n.start(serve_digest)
        async with auth_tunnel(tmp_path, {"edge1:7000": f"127.0.0.1:{digest}"}) as url:
            (tmp_path / "token").write_text(f"\n{TOKEN}\n")
            authority = url.removeprefix("http://")
            quoted = "s3cr%3Aet%20x"
            forms: list[tuple[list[str], bool]] = [  # (argv, password in the environment)
                (connect_argv("edge1:7000", url, "--proxy-user", f"u:{PASSWORD}"), False),
                (connect_argv("edge1:7000", url, "--proxy-user", "u"), True),
                (connect_argv("edge1:7000", f"http://u:{quoted}@{authority}"), False),
                (connect_argv("edge1:7000", f"http://u@{authority}"), True),
                (
                    connect_argv("EDGE1:7000", url, "--proxy-token-file", str(tmp_path / "token")),
                    False,
                ),
            ]
            for argv, password_in_env in forms:
                data = os.urandom(1024 * 1024 + len(argv))
                if password_in_env:
                    r = await run(argv, stdin=data, KINS_TUNNEL_PROXY_PASSWORD=PASSWORD)
                else:
                    r = await run(argv, stdin=data)
                assert (r.returncode, r.stderr) == (0, b""), argv
                assert r.stdout == f"{hashlib.sha256(data).hexdigest()} {len(data)}\n".encode(), (
                    argv
                )
        n.cancel_scope.cancel()


async def test_refusals_print_the_reason_and_exit_non_zero(tmp_path: Path) -> None:
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        services = {
            "edge1:7000": f"127.0.0.1:{echo}",
            "edge1:7001": f"127.0.0.1:{free_port()}",
        }  # nothing there
        async with auth_tunnel(tmp_path, services) as url:
            (tmp_path / "bad-token").write_text("not-the-token\n")
            cases = [  # argv extra, target, exit code, text on stderr
                (
                    [],
                    "edge1:7000",
                    5,
                    "answered 407 Proxy Authentication Required: "
                    "kins-tunnel: edge1:7000: proxy authentication required",
                ),
                (["--proxy-user", "u:wrong"], "edge1:7000", 5, "answered 407"),
                (
                    ["--proxy-token-file", str(tmp_path / "bad-token")],
                    "edge1:7000",
                    5,
                    "answered 407",
                ),
                (
                    ["--proxy-user", f"u:{PASSWORD}"],
                    "edge2:22",
                    6,
                    "answered 503 Service Unavailable: kins-tunnel: edge2:22: no connected edge serves this name",
                ),
                (
                    ["--proxy-user", f"u:{PASSWORD}"],
                    "edge1:7001",
                    6,
                    "answered 502 Bad Gateway: kins-tunnel: edge1:7001: the target refused the connection",
                ),
                (["--proxy-user", "u"], "edge1:7000", 2, "--proxy-user: no password"),
                (["--proxy-user", f"u:{PASSWORD}"], "edge1", 2, "HOST:PORT: "),
            ]
            for extra, target, code, text in cases:
                r = await run(connect_argv(target, url, *extra), stdin=b"never sent")
                assert r.returncode == code, (extra, target, r.stderr)
                assert r.stdout == b""
                assert r.stderr.count(b"\n") == 1 and r.stderr.startswith(
                    b"kins-tunnel connect: "
                ), r.stderr
                assert text.encode() in r.stderr, (text, r.stderr)
            r = await run(connect_argv("edge1:7000", "ftp://127.0.0.1:21"))
            assert r.returncode == 2 and b"--proxy: " in r.stderr
        n.cancel_scope.cancel()


# ---------------------------------------------------------------- TLS to the proxy


@contextlib.asynccontextmanager
async def socat_tls_terminator(base: Path, upstream: int) -> AsyncIterator[int]:
    """socat accepting TLS (the cloud certificate from kins_tunnel.certs) in front of a plain proxy."""
    port = free_port()
    certs = base / "certs"
    with open(base / "socat.log", "wb") as log:
        p = subprocess.Popen(
            [
                "socat",
                f"openssl-listen:{port},bind=127.0.0.1,reuseaddr,fork,"
                f"cert={certs / 'cloud.crt'},key={certs / 'cloud.key'},verify=0",
                f"tcp:127.0.0.1:{upstream}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    try:

        def alive() -> None:
            assert p.poll() is None, (base / "socat.log").read_text()

        await wait_listening(port, 10, "socat listening", alive)
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        p.wait(10)


@needs_ssh
@pytest.mark.parametrize("tls_end", ["cloud proxy.tls", "socat in front"])
async def test_https_proxy(tmp_path: Path, tls_end: str) -> None:
    """TLS to the proxy: the cloud's own TLS listener, or a socat TLS terminator in front of the
    plain proxy (a TLS-terminating load balancer)."""
    if tls_end == "socat in front" and shutil.which("socat") is None:
        pytest.skip("needs socat (.ci/system-packages installs it)")
    proxy = write_credentials(tmp_path)
    if tls_end == "cloud proxy.tls":
        proxy["tls"] = {"listen": "127.0.0.1:0"}
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        digest = await n.start(serve_digest)
        async with (
            throwaway_sshd(tmp_path) as sshd,
            tunnel_env(
                tmp_path,
                {
                    "edge1:22": f"127.0.0.1:{sshd.port}",
                    "edge1:7000": f"127.0.0.1:{echo}",
                    "edge1:7001": f"127.0.0.1:{digest}",
                },
                proxy=proxy,
            ) as env,
            contextlib.AsyncExitStack() as stack,
        ):
            if tls_end == "cloud proxy.tls":
                tls_port = env.ports.proxy_tls
            else:
                tls_port = await stack.enter_async_context(
                    socat_tls_terminator(tmp_path, env.ports.proxy)
                )
            url = f"https://127.0.0.1:{tls_port}"
            cacert = str(tmp_path / "certs" / "ca.crt")
            cmd = proxy_command(url, "--proxy-cacert", cacert, "--proxy-user", "u")
            r = await ssh(
                sshd,
                cmd,
                "echo over-tls; head -c 2000000 /dev/zero | wc -c",
                KINS_TUNNEL_PROXY_PASSWORD=PASSWORD,
            )
            assert r.returncode == 0, r.stderr
            assert r.stdout.split() == [b"over-tls", b"2000000"]
            data = os.urandom(20 * 1024 * 1024)  # 20 MiB up and back through TLS to the proxy
            r = await ssh(sshd, cmd, "cat", stdin=data, KINS_TUNNEL_PROXY_PASSWORD=PASSWORD)
            assert r.returncode == 0, r.stderr
            assert hashlib.sha256(r.stdout).digest() == hashlib.sha256(data).digest()
            if tls_end == "cloud proxy.tls":  # stdin EOF is close_notify: the far end still answers
                data = os.urandom(1024 * 1024)
                r = await run(
                    connect_argv(
                        "edge1:7001", url, "--proxy-cacert", cacert, "--proxy-user", f"u:{PASSWORD}"
                    ),
                    stdin=data,
                )
                assert (r.returncode, r.stderr) == (0, b"")
                assert r.stdout == f"{hashlib.sha256(data).hexdigest()} {len(data)}\n".encode()
            # the proxy's refusal, read over TLS
            r = await run(connect_argv("edge1:7000", url, "--proxy-cacert", cacert))
            assert r.returncode == 5 and b"answered 407" in r.stderr, r.stderr
            # the system CAs do not know our CA: no tunnel, exit 3
            r = await run(connect_argv("edge1:7000", url, "--proxy-user", f"u:{PASSWORD}"))
            assert r.returncode == 3, r.stderr
            assert b"TLS with proxy 127.0.0.1:" in r.stderr and b"certificate" in r.stderr, r.stderr
            # plain HTTP to the TLS port is not an HTTP answer
            r = await run(
                connect_argv(
                    "edge1:7000",
                    f"http://127.0.0.1:{tls_port}",
                    "--proxy-user",
                    f"u:{PASSWORD}",
                    "--answer-timeout",
                    "5",
                )
            )
            assert r.returncode == 7, r.stderr
        n.cancel_scope.cancel()


async def test_https_proxy_with_client_certificate(tmp_path: Path) -> None:
    """The cloud's proxy.tls with client_ca: the certificate is the credential."""

    async def greet(stream: trio.SocketStream) -> None:  # reads one line, answers, closes
        line = b""
        while not line.endswith(b"\n"):
            chunk = await stream.receive_some(1024)
            if not chunk:
                return
            line += chunk
        await stream.send_all(b"got " + line)

    certs = make_certs(tmp_path)
    crt, key = issue_user(certs, "ops")
    ca = str(certs / "ca.crt")
    async with trio.open_nursery() as n:
        port = await n.start(serve_loopback, greet)
        async with tunnel_env(
            tmp_path,
            {"edge1:7000": f"127.0.0.1:{port}"},
            proxy={"tls": {"listen": "127.0.0.1:0", "client_ca": ca}},
        ) as env:
            url = f"https://127.0.0.1:{env.ports.proxy_tls}"
            r = await run(
                connect_argv(
                    "edge1:7000",
                    url,
                    "--proxy-cacert",
                    ca,
                    "--proxy-cert",
                    str(crt),
                    "--proxy-key",
                    str(key),
                ),
                stdin=b"hello\n",
            )
            assert (r.returncode, r.stdout, r.stderr) == (0, b"got hello\n", b"")
            # without the certificate the proxy ends the TLS session: exit 3, not a protocol error
            r = await run(connect_argv("edge1:7000", url, "--proxy-cacert", ca), stdin=b"hello\n")
            assert r.returncode == 3, r.stderr
            assert r.stderr.startswith(b"kins-tunnel connect: TLS with proxy 127.0.0.1:"), r.stderr
            assert b"client certificate" in r.stderr or b"CERTIFICATE_REQUIRED" in r.stderr, (
                r.stderr
            )
            r = await run(
                connect_argv("edge1:7000", url, "--proxy-cacert", ca, "--proxy-cert", str(crt))
            )
            assert (
                r.returncode == 2
                and b"--proxy-cert and --proxy-key: give both or neither" in r.stderr
            )
            r = await run(
                connect_argv(
                    "edge1:7000",
                    "http://127.0.0.1:1",
                    "--proxy-cert",
                    str(crt),
                    "--proxy-key",
                    str(key),
                )
            )
            assert r.returncode == 2 and b"--proxy-cert: only for an https:// proxy" in r.stderr
        n.cancel_scope.cancel()


# ---------------------------------------------------------------- proxy test doubles


async def test_bytes_behind_the_200_head_are_forwarded(tmp_path: Path) -> None:
    """A proxy test double that sends the 200 head and a banner in one packet, then echoes."""
    seen: list[bytes] = []

    async def one_packet_proxy_double(stream: trio.SocketStream) -> None:
        head = await read_head(stream)
        if b"\r\n\r\n" not in head:
            return
        seen.append(head)
        await stream.send_all(b"HTTP/1.1 200 Connection established\r\n\r\nSSH-2.0-banner\r\n")
        await echo_bytes(stream)

    async with trio.open_nursery() as n:
        port = await n.start(serve_loopback, one_packet_proxy_double)
        r = await run(
            connect_argv("edge1:22", f"http://127.0.0.1:{port}", "--proxy-user", "u:p w"),
            stdin=b"hello",
        )
        assert (r.returncode, r.stderr) == (0, b"")
        assert r.stdout == b"SSH-2.0-banner\r\nhello"
        lines = seen[0].split(b"\r\n")
        assert lines[0] == b"CONNECT edge1:22 HTTP/1.1"
        assert b"Host: edge1:22" in lines
        assert b"Proxy-Authorization: Basic " + base64.b64encode(b"u:p w") in lines
        # ssh's %h is a bare IPv6 address
        r = await run(connect_argv("::1:22", f"http://127.0.0.1:{port}"), stdin=b"")
        assert (r.returncode, r.stdout) == (0, b"SSH-2.0-banner\r\n"), r.stderr
        assert seen[1].startswith(b"CONNECT [::1]:22 HTTP/1.1\r\nHost: [::1]:22\r\n")
        assert b"Proxy-Authorization" not in seen[1]
        n.cancel_scope.cancel()


async def test_deadlines_and_bad_answers(tmp_path: Path) -> None:
    async def silent_proxy_double(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async def not_a_proxy_double(stream: trio.SocketStream) -> None:
        await stream.send_all(b"SSH-2.0-OpenSSH_9.2\r\n")
        await stream.receive_some(4096)

    async def hang_up_proxy_double(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)

    async def short_body_proxy_double(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)
        await stream.send_all(
            b"HTTP/1.1 407 Who are you\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\n"
            b"go \x1b[31maway\nsecond line"
        )

    async with trio.open_nursery() as n:
        silent = await n.start(serve_loopback, silent_proxy_double)
        garbage = await n.start(serve_loopback, not_a_proxy_double)
        hang_up = await n.start(serve_loopback, hang_up_proxy_double)
        short_body = await n.start(serve_loopback, short_body_proxy_double)
        r = await run(connect_argv("edge1:22", f"http://127.0.0.1:{hang_up}"))
        assert r.returncode == 7 and b"closed the connection without answering" in r.stderr, (
            r.stderr
        )
        # a refusal whose body is cut short is still a refusal; control characters are not printed
        r = await run(connect_argv("edge1:22", f"http://127.0.0.1:{short_body}"))
        assert r.returncode == 5, r.stderr
        assert r.stderr.endswith(b"answered 407 Who are you: go  [31maway\n"), r.stderr
        r = await run(
            connect_argv("edge1:22", f"http://127.0.0.1:{silent}", "--answer-timeout", "0.5")
        )
        assert r.returncode == 4 and b"did not answer CONNECT edge1:22 within 0.5s" in r.stderr, (
            r.stderr
        )
        with hanging_listener() as hanging:
            r = await run(
                connect_argv("edge1:22", f"http://127.0.0.1:{hanging}", "--connect-timeout", "0.5")
            )
        assert r.returncode == 4 and b"no connection to proxy" in r.stderr, r.stderr
        r = await run(connect_argv("edge1:22", f"http://127.0.0.1:{garbage}"))
        assert (
            r.returncode == 7
            and b"answered with invalid HTTP (it sent: SSH-2.0-OpenSSH_9.2)" in r.stderr
        ), r.stderr
        refused = free_port()
        r = await run(connect_argv("edge1:22", f"http://127.0.0.1:{refused}"))
        assert r.returncode == 3 and b"cannot connect to proxy" in r.stderr, r.stderr
        n.cancel_scope.cancel()


# ---------------------------------------------------------------- 1 GiB


@pytest.mark.slow
@needs_ssh
@pytest.mark.skipif(shutil.which("scp") is None, reason="needs scp")
async def test_scp_1gib_through_the_tunnel(tmp_path: Path) -> None:
    """scp of 1 GiB to the throw-away sshd behind a real edge process, sha256 checked on both ends."""
    size = 1024**3
    src, dst = tmp_path / "big.bin", tmp_path / "big.copy"
    local = hashlib.sha256()
    with open(src, "wb") as f:
        block = os.urandom(1 << 20)
        for i in range(size >> 20):
            chunk = hashlib.sha256(i.to_bytes(8, "big")).digest() + block[32:]  # every MiB differs
            local.update(chunk)
            f.write(chunk)
    try:
        async with throwaway_sshd(tmp_path) as sshd:
            with procs(tmp_path) as ps:
                cloud = ps.cloud(proxy=write_credentials(tmp_path))
                await wait_cloud_up(cloud)
                ps.edge(cloud.tunnel, {"edge1:22": f"127.0.0.1:{sshd.port}"})
                await wait_edges(cloud, 1)
                cmd = proxy_command(f"http://127.0.0.1:{cloud.proxy}", "--proxy-user", "u")
                opts = [*sshd.ssh_options(), "-o", f"ProxyCommand={cmd}"]
                r = await run(
                    ["scp", *opts, "-P", "22", str(src), f"{USER}@edge1:{dst}"],
                    timeout=600,
                    KINS_TUNNEL_PROXY_PASSWORD=PASSWORD,
                )
                assert r.returncode == 0, r.stderr
                r = await ssh(
                    sshd, cmd, f"sha256sum {dst}", timeout=120, KINS_TUNNEL_PROXY_PASSWORD=PASSWORD
                )
                assert r.returncode == 0, r.stderr
                assert r.stdout.split()[0].decode() == local.hexdigest()
                assert dst.stat().st_size == size
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)
