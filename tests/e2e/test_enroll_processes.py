"""Enrolment as an operator runs it: `kins-tunnel certs init --issuing-ca`, `kins-tunnel token
create`, cloud and edge as processes (`kins-tunnel cloud|edge --config`), the edge with only a
token file and the CA hash, and real kubectl through the tunnel; a renewal with a short lifetime
while `kubectl get --watch` stays open, and the next tunnel with the renewed certificate."""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

import trio
from cryptography import x509

from kins_tunnel.demo import write_kubeconfig
from kins_tunnel.testing.k3s_standin import make_self_signed_server_context, serve_k3s_standin
from kins_tunnel.testing.support import run_kins_tunnel
from kins_tunnel.tokens import TOKEN_RE
from tests.clients import KUBECTL, needs_kubectl
from tests.e2e.faultkit import (
    cloud_status,
    edge_status,
    edges_of,
    procs,
    wait_cloud_up,
    wait_edges,
    wait_until,
)
from tests.e2e.harness import SVC
from tests.e2e.kubectl_tools import kubectl_environ, run_kubectl

LIFETIME = 15.0  # seconds: renewed after about 10


def serial_of(path: Path) -> str:
    return format(x509.load_pem_x509_certificate(path.read_bytes()).serial_number, "x")


@needs_kubectl
async def test_edge_enrols_serves_kubectl_and_renews_during_a_watch(tmp_path: Path) -> None:
    certs, tokens, home = tmp_path / "certs", tmp_path / "tokens.yaml", tmp_path / "home"
    home.mkdir()
    r = await run_kins_tunnel("certs", "init", "--dir", str(certs), "--issuing-ca")
    assert r.returncode == 0, r.stderr
    ca_hash = re.search(rb"sha256:[0-9a-f]{64}", r.stdout)
    assert ca_hash is not None, r.stdout
    r = await run_kins_tunnel("certs", "ca-hash", "--dir", str(certs))
    assert r.stdout.strip() == ca_hash.group(0)
    r = await run_kins_tunnel(
        "token", "create", "--tokens-file", str(tokens), "--unit", "test", "--node", "edge1",
        "--ttl", "10m",
    )  # fmt: skip
    token = r.stdout.decode().strip()
    assert r.returncode == 0 and TOKEN_RE.fullmatch(token), r
    ctx, k3s_ca = make_self_signed_server_context(tmp_path)
    with procs(tmp_path) as ps:
        async with trio.open_nursery() as nursery:
            k3s = await nursery.start(functools.partial(serve_k3s_standin, ctx, interval=0.5))
            cloud = ps.cloud(
                enrollment={
                    "tokens_file": str(tokens),
                    "ca": {"cert": str(certs / "issuing.crt"), "key": str(certs / "issuing.key")},
                    "lifetime_days": LIFETIME / 86400,
                },
            )
            await wait_cloud_up(cloud)
            edge_dir = tmp_path / "edge"
            edge_dir.mkdir()
            (edge_dir / "token").write_text(token + "\n")
            edge = ps.edge(
                cloud.tunnel,
                {},
                doc={
                    "cloud": [f"127.0.0.1:{cloud.tunnel}"],
                    "tls": {"ca": "edge/ca.crt", "cert": "edge/tls.crt", "key": "edge/tls.key"},
                    "services": {SVC: f"127.0.0.1:{k3s}"},
                    "reconnect": {"initial": 0.05, "max": 1.0},
                    "enroll": {
                        "token_file": "edge/token",
                        "ca_hash": ca_hash.group(0).decode(),
                        "node": "edge1",
                    },
                },
            )
            await wait_edges(cloud, 1)
            assert "enrolled with a token" in edge.log.read_text()
            assert (edge_dir / "tls.key").stat().st_mode & 0o777 == 0o600
            first = serial_of(edge_dir / "tls.crt")
            (e,) = await edges_of(cloud)
            assert e["cert_serial"] == first and e["unit"] == "test"
            kubeconfig = tmp_path / "kubeconfig"
            write_kubeconfig(kubeconfig, cloud.proxy, k3s_ca)
            r = await run_kubectl(kubeconfig, "get", "pods", home=home)
            assert r.returncode == 0 and b"test-server-kins" in r.stdout, r.stderr

            # a watch stays open while the certificate is renewed under it
            rows: list[float] = []
            watch = await trio.lowlevel.open_process(
                [KUBECTL, "--kubeconfig", str(kubeconfig), "get", "pods", "--watch"],
                stdout=subprocess.PIPE,
                env=kubectl_environ(home),
            )
            try:

                async def read_rows() -> None:
                    assert watch.stdout is not None
                    async for chunk in watch.stdout:
                        rows.extend(trio.current_time() for _ in range(chunk.count(b"kins")))

                nursery.start_soon(read_rows)
                await wait_until(lambda: len(rows) >= 3, 30, "watch rows")
                renewed = await wait_until(
                    lambda: serial_of(edge_dir / "tls.crt") != first, 3 * LIFETIME, "renewal"
                )
                assert renewed < LIFETIME, "renewed after about 2/3 of the lifetime"
                doc = await edge_status(edge)
                assert doc["certificate"]["renewals"] >= 1, doc
                at = trio.current_time()
                await wait_until(lambda: len([t for t in rows if t > at]) >= 3, 15, "rows after")
                assert watch.poll() is None, "the watch is still open"
                (e,) = await edges_of(cloud)
                assert e["cert_serial"] == first, "the live tunnel keeps its certificate"
                status = await cloud_status(cloud)
                assert status["enrollment"]["issuing_ca"] is True
            finally:
                watch.kill()
                await watch.wait()
            # the next tunnel (the cloud restarts) presents the renewed certificate
            cloud.kill()
            cloud.start()
            await wait_cloud_up(cloud)
            await wait_edges(cloud, 1)
            (e,) = await edges_of(cloud)
            assert e["cert_serial"] != first
            r = await run_kubectl(kubeconfig, "get", "pods", home=home)
            assert r.returncode == 0, r.stderr
            m = await run_kins_tunnel("status", "--admin", f"http://127.0.0.1:{cloud.admin}")
            assert b"edge1" in m.stdout, m
            nursery.cancel_scope.cancel()
