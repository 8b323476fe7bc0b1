"""Real clients through the tunnel: kubectl via `proxy-url`, curl `--proxy`, ssh via a CONNECT
ProxyCommand. The K3s API is the stand-in test double (kins_tunnel.testing.k3s_standin)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import trio

from kins_tunnel.demo import write_kubeconfig
from kins_tunnel.testing.k3s_standin import (
    blob_bytes,
    make_self_signed_server_context,
    serve_k3s_standin,
)
from tests.clients import needs_curl, needs_kubectl
from tests.e2e.harness import SVC, run_curl, tunnel_env
from tests.e2e.kubectl_tools import assert_get_and_watch, run_kubectl
from tests.e2e.sshd import HAVE_SSH, throwaway_sshd

pytestmark = needs_kubectl


async def test_kubectl_through_proxy_url(tmp_path: Path) -> None:
    ctx, ca = make_self_signed_server_context(tmp_path)
    async with trio.open_nursery() as n:
        k3s = await n.start(serve_k3s_standin, ctx)
        async with tunnel_env(tmp_path, {SVC: f"127.0.0.1:{k3s}"}) as env:
            kc = tmp_path / "kubeconfig"
            write_kubeconfig(kc, env.ports.proxy, ca)
            home = tmp_path / "home"
            home.mkdir()
            r = await run_kubectl(kc, "version", "-o", "json", home=home)
            assert r.returncode == 0, r.stderr
            assert b"v1.30.6+k3s1" in r.stdout
            await assert_get_and_watch(kc, home)
            # >= 50 MiB response compared byte for byte
            size = 50 * 1024 * 1024 + 12345
            r = await run_kubectl(
                kc,
                "get",
                "--raw",
                f"/kins-standin/blob?bytes={size}&seed=7",
                home=home,
                timeout=120,
            )
            assert r.returncode == 0, r.stderr[-500:]
            assert len(r.stdout) == size
            assert hashlib.sha256(r.stdout).digest() == hashlib.sha256(blob_bytes(size, 7)).digest()
            # the cloud counted it
            assert sum(t.session.statistics().bytes_received for t in env.cloud.registry) >= size
        n.cancel_scope.cancel()


@needs_curl
async def test_curl_https_through_the_tunnel(tmp_path: Path) -> None:
    ctx, ca = make_self_signed_server_context(tmp_path)
    upload = tmp_path / "upload.bin"
    data = os.urandom(5 * 1024 * 1024)
    upload.write_bytes(data)
    async with trio.open_nursery() as n:
        k3s = await n.start(serve_k3s_standin, ctx)
        async with tunnel_env(tmp_path, {SVC: f"127.0.0.1:{k3s}"}) as env:
            proxy = f"http://127.0.0.1:{env.ports.proxy}"
            r = await run_curl(
                "--fail",
                "--proxy",
                proxy,
                "--cacert",
                str(ca),
                "https://test-svc-kins.kins-system:443/version",
                timeout=30,
            )
            assert r.returncode == 0, r.stderr
            assert b"k3s" in r.stdout
            r = await run_curl(
                "--fail",
                "--proxy",
                proxy,
                "--cacert",
                str(ca),
                "--data-binary",
                f"@{upload}",
                "https://test-svc-kins.kins-system:443/kins-standin/upload",
                timeout=60,
            )
            assert r.returncode == 0, r.stderr
            assert hashlib.sha256(data).hexdigest().encode() in r.stdout
            # curl sees the proxy's own answers too
            r = await run_curl(
                "--proxy",
                proxy,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "https://nowhere-svc-kins.kins-system:443/",
                timeout=30,
            )
            assert b"503" in r.stderr + r.stdout
        n.cancel_scope.cancel()


@pytest.mark.skipif(
    not HAVE_SSH or shutil.which("socat") is None,
    reason="needs openssh-server, openssh-client and socat (.ci/system-packages installs them)",
)
async def test_ssh_through_connect_proxycommand(tmp_path: Path) -> None:
    async with (
        throwaway_sshd(tmp_path) as sshd,
        tunnel_env(tmp_path, {"edge1:22": f"127.0.0.1:{sshd.port}"}) as env,
    ):
        proxy_cmd = f"socat - PROXY:127.0.0.1:%h:%p,proxyport={env.ports.proxy}"
        with trio.fail_after(30):
            r = await trio.run_process(
                sshd.ssh_argv(
                    proxy_cmd, "echo through-the-tunnel; head -c 2000000 /dev/zero | wc -c"
                ),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == [b"through-the-tunnel", b"2000000"]
