"""The client commands fail cleanly and keep secrets out of sight, run as real processes:
`connect` refuses a target that cannot go on a request line (one line, exit 2, no traceback) and
takes Basic credentials from a file; no message shows a URL's password; `kubeconfig` warns about
a cluster it leaves unverified, makes relative paths absolute (read back by real kubectl from
another directory) and puts a password from a file or the environment into the proxy-url."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import yaml

from kins_tunnel.testing.support import read_head
from tests.clients import KUBECTL, needs_kubectl
from tests.e2e.test_connect_command import run
from tests.test_kubeconfig import SEED


async def kins(*args: str, stdin: bytes = b"", **extra: str) -> subprocess.CompletedProcess[bytes]:
    """`python -m kins_tunnel ARGS` in the repository, without $KINS_TUNNEL_PROXY_PASSWORD."""
    return await run([sys.executable, "-m", "kins_tunnel", *args], stdin, 30, **extra)


async def serve_407(
    heads: list[bytes], *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """A proxy test double: records each request head and answers 407."""

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            with trio.fail_after(10):
                heads.append(await read_head(stream))
                await stream.send_all(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n"
                )

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


@pytest.mark.parametrize("target", ["edge1\x01:22", "edge1\r\nX-Injected: 1\r\n:22", "edge 1:22"])
async def test_connect_refuses_a_target_that_cannot_go_on_a_request_line(target: str) -> None:
    heads: list[bytes] = []
    async with trio.open_nursery() as n:
        port = await n.start(serve_407, heads)
        done = await kins("connect", target, "--proxy", f"http://127.0.0.1:{port}")
        n.cancel_scope.cancel()
    err = done.stderr.decode()
    assert done.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("kins-tunnel connect: HOST:PORT:"), err
    assert heads == []  # nothing was sent


async def test_connect_takes_basic_credentials_from_a_file_and_never_shows_a_password(
    tmp_path: Path,
) -> None:
    creds = tmp_path / "proxy-credentials"
    creds.write_text("ops:s3cr:et x\n")
    heads: list[bytes] = []
    async with trio.open_nursery() as n:
        port = await n.start(serve_407, heads)
        done = await kins(
            "connect", "edge1:22", "--proxy", f"http://127.0.0.1:{port}",
            "--proxy-credentials-file", str(creds),
        )  # fmt: skip
        assert done.returncode == 5, done.stderr  # 407
        basic = base64.b64encode(b"ops:s3cr:et x")
        assert b"Proxy-Authorization: Basic " + basic + b"\r\n" in heads[0]
        # a password in the URL: never in a message, whatever goes wrong
        for url in (f"http://ops:hunter2@127.0.0.1:{port}", "http://ops:hunter2@127.0.0.1:1/x"):
            done = await kins("connect", "edge1:22", "--proxy", url)
            assert done.returncode in (2, 5), done.stderr
            assert b"hunter2" not in done.stderr, done.stderr
        n.cancel_scope.cancel()
    done = await kins("status", "--admin", "http://ops:hunter2@127.0.0.1:1")
    assert done.returncode == 2 and b"hunter2" not in done.stderr, done.stderr
    missing = await kins(
        "connect", "edge1:22", "--proxy", "http://127.0.0.1:1",
        "--proxy-credentials-file", str(tmp_path / "nope"),
    )  # fmt: skip
    assert missing.returncode == 2 and b"--proxy-credentials-file" in missing.stderr


async def test_kubeconfig_warns_about_a_cluster_it_leaves_unverified() -> None:
    done = await kins(
        "kubeconfig", "--unit", "test", "--proxy-url", "http://127.0.0.1:8080",
        stdin=SEED.encode(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["clusters"][0]["cluster"]["insecure-skip-tls-verify"]
    warning = done.stderr.decode()
    assert warning.startswith("kins-tunnel: warning: cluster 'default' keeps insecure-skip-tls")
    assert "--server-ca" in warning


RELATIVE = """\
apiVersion: v1
kind: Config
clusters:
- name: default
  cluster: {server: "https://127.0.0.1:6443", certificate-authority: pki/ca.crt}
contexts:
- {name: default, context: {cluster: default, user: default}}
current-context: default
users:
- name: default
  user: {client-certificate: pki/client.crt, client-key: pki/client.key}
- name: other
  user: {tokenFile: token}
"""


@needs_kubectl
async def test_kubeconfig_makes_relative_paths_absolute_for_kubectl_elsewhere(
    tmp_path: Path,
) -> None:
    src = tmp_path / "from"
    (src / "pki").mkdir(parents=True)
    pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    for name, data in (("ca.crt", pem), ("client.crt", pem), ("client.key", b"KEY\n")):
        (src / "pki" / name).write_bytes(data)
    (src / "token").write_text("tok\n")
    (src / "kubeconfig").write_text(RELATIVE)
    out = tmp_path / "elsewhere" / "kubeconfig"
    out.parent.mkdir()
    done = await kins(
        "kubeconfig", "--unit", "test", "--proxy-url", "http://127.0.0.1:8080",
        "-i", str(src / "kubeconfig"), "-o", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    doc = yaml.safe_load(out.read_text())
    assert doc["clusters"][0]["cluster"]["certificate-authority"] == str(src / "pki/ca.crt")
    assert doc["users"][1]["user"]["tokenFile"] == str(src / "token")
    # real kubectl, run from another directory, finds every file (--flatten inlines them)
    with trio.fail_after(30):
        view = await trio.run_process(
            [KUBECTL, "--kubeconfig", str(out), "config", "view", "--flatten", "-o", "yaml"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd="/",
        )
    assert view.returncode == 0, view.stderr
    flat = yaml.safe_load(view.stdout)
    assert base64.b64decode(flat["clusters"][0]["cluster"]["certificate-authority-data"]) == pem


async def test_kubeconfig_puts_a_password_from_a_file_or_the_environment_in_the_proxy_url(
    tmp_path: Path,
) -> None:
    creds = tmp_path / "proxy-credentials"
    creds.write_text("ops:p@ss word\n")
    for url, extra, env, written in (
        (
            "http://127.0.0.1:8080",
            ("--proxy-credentials-file", str(creds)),
            {},
            "ops:p%40ss%20word",
        ),
        (
            "http://ops@127.0.0.1:8080",
            (),
            {"KINS_TUNNEL_PROXY_PASSWORD": "from-env"},
            "ops:from-env",
        ),
    ):
        done = await kins(
            "kubeconfig", "--unit", "test", "--proxy-url", url, *extra, stdin=SEED.encode(), **env
        )
        assert done.returncode == 0, done.stderr
        cluster = yaml.safe_load(done.stdout)["clusters"][0]["cluster"]
        assert cluster["proxy-url"] == f"http://{written}@127.0.0.1:8080"
    twice = await kins(
        "kubeconfig", "--unit", "test", "--proxy-url", "http://ops:x@127.0.0.1:8080",
        "--proxy-credentials-file", str(creds), stdin=SEED.encode(),
    )  # fmt: skip
    assert twice.returncode == 2 and b"give them once" in twice.stderr, twice.stderr
    assert b"p@ss" not in twice.stderr
