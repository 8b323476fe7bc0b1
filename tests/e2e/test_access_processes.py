"""Access governance with cloud and edge as real processes (`kins-tunnel cloud|edge --config`):
only the TLS proxy listener, the README's rules file, curl over https, revocation of the running
edge, `kins-tunnel status`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import trio

from kins_tunnel.testing.k3s_standin import make_self_signed_server_context, serve_k3s_standin
from kins_tunnel.testing.support import free_port, http_get, run_kins_tunnel
from tests.clients import CURL, needs_curl
from tests.e2e.faultkit import cloud_status, procs, wait_cloud_up, wait_edges, wait_until

EXAMPLE = Path(__file__).resolve().parent.parent.parent / "examples" / "authz-multi-team.yaml"
A_SVC = "a-svc-kins.kins-system:443"


@needs_curl
async def test_tls_proxy_rules_and_revocation_with_processes(tmp_path: Path) -> None:
    ctx, k3s_ca = make_self_signed_server_context(tmp_path, unit="a")
    (tmp_path / "basic").write_text("alice:pw-alice\ncarol:pw-carol\n")
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("")
    tls_port = free_port()
    with procs(tmp_path) as ps:
        async with trio.open_nursery() as n:
            k3s = await n.start(serve_k3s_standin, ctx)
            cloud = ps.cloud(
                proxy={
                    "listen": None,
                    "auth": {"basic_file": str(tmp_path / "basic")},
                    "authz_file": str(EXAMPLE),
                    "tls": {"listen": f"127.0.0.1:{tls_port}"},
                },
                tunnel={"revoked_file": str(revoked)},
                log={"json": True},
            )
            await wait_cloud_up(cloud)
            ps.edge(cloud.tunnel, {A_SVC: f"127.0.0.1:{k3s}"}, node="a-edge1", unit="a")
            await wait_edges(cloud, 1)

            async def curl(user: str, target: str) -> tuple[int, bytes]:
                with trio.fail_after(30):
                    r = await trio.run_process(
                        [
                            CURL,
                            "-sS",
                            "--fail",
                            "--proxy",
                            f"https://127.0.0.1:{tls_port}",
                            "--proxy-cacert",
                            str(ps.certs / "ca.crt"),
                            "--proxy-user",
                            user,
                            "--cacert",
                            str(k3s_ca),
                            f"https://{target}/version",
                        ],
                        capture_stdout=True,
                        capture_stderr=True,
                        check=False,
                    )
                return r.returncode, r.stdout + r.stderr

            code, out = await curl("alice:pw-alice", A_SVC)
            assert code == 0 and b"k3s" in out, out
            code, out = await curl("alice:pw-alice", "b-svc-kins.kins-system:443")
            assert code != 0 and b"403" in out, out
            code, out = await curl("carol:pw-carol", "a-edge1:10250")
            assert code != 0 and b"403" in out, out
            # status: the edge and its certificate's expiry, the cloud's own certificate
            r = await run_kins_tunnel(
                "status", "--admin", f"http://127.0.0.1:{cloud.admin}", timeout=30
            )
            assert r.returncode == 0, r.stderr
            lines = r.stdout.decode().splitlines()
            header, row = lines[0].split(), lines[1].split()
            assert row[:2] == ["a", "a-edge1"] and row[header.index("EXPIRES")].endswith("d")
            assert "cloud certificate expires" in lines[-1]
            # revoke the running edge: its tunnel goes, its reconnects are refused
            tmp = revoked.with_name("revoked.new")
            tmp.write_text("a/a-edge1\n")
            os.replace(tmp, revoked)

            async def gone() -> bool:
                return not (await cloud_status(cloud))["edges"]

            closed_in = await wait_until(gone, 10, "revoked edge's tunnel closed")
            print(f"\nFIGURE revoked edge gone from the cloud after: {closed_in:.3f} s", flush=True)

            async def refused() -> bool:
                _, body = await http_get(cloud.admin, "/metrics")
                return b'kins_tunnel_handshake_failures_total{reason="revoked"}' in body

            await wait_until(refused, 10, "a refused reconnect")
            code, out = await curl("alice:pw-alice", A_SVC)
            assert code != 0 and b"503" in out, out
            doc = await cloud_status(cloud)
            assert doc["revoked_file"]["reloads"] == 1 and doc["authz_file"]["failures"] == 0
            n.cancel_scope.cancel()
    docs = [json.loads(ln) for ln in cloud.log.read_text().splitlines() if ln.startswith("{")]
    audit = [d for d in docs if d.get("msg") in ("CONNECT done", "CONNECT refused")]
    assert sorted((d["principal"], d["status"]) for d in audit) == [
        ("alice", 200),
        ("alice", 403),
        ("alice", 503),
        ("carol", 403),
    ]
    assert "pw-alice" not in cloud.log.read_text()
