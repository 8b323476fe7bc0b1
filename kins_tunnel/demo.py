"""`kins-tunnel demo`: cloud, one edge and a K3s-API stand-in, all on loopback, with a kubeconfig.

Everything lives in a fresh temporary directory (its own CA and certificates). The edge (unit
`test`, node `edge1`) serves `test-svc-kins.kins-system:443` → the stand-in; kubectl reaches it
through the cloud's CONNECT proxy, exactly as in a real Kins set-up.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import trio
import yaml

from kins_tunnel.certs import init_ca, issue_edge
from kins_tunnel.cloud.server import Cloud
from kins_tunnel.config import cloud_config_from_dict, edge_config_from_dict
from kins_tunnel.edge.agent import Edge
from kins_tunnel.testing.k3s_standin import make_self_signed_server_context, serve_k3s_standin

log = logging.getLogger("kins_tunnel.demo")


def write_kubeconfig(path: Path, proxy_port: int, ca: Path, unit: str = "test") -> None:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "default", "cluster": {
            "server": f"https://{unit}-svc-kins.kins-system:443",
            "proxy-url": f"http://127.0.0.1:{proxy_port}",
            "certificate-authority": str(ca)}}],
        "contexts": [{"name": "default", "context": {"cluster": "default", "namespace": "default",
                                                     "user": "default"}}],
        "current-context": "default",
        "users": [{"name": "default", "user": {"token": "demo-token"}}],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    path.chmod(0o600)


async def run_demo(workdir: Path | None = None, proxy_port: int = 8080, *, quiet: bool = False,
                   task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
    own = workdir is None
    base = Path(tempfile.mkdtemp(prefix="kins-tunnel-demo-")) if workdir is None else workdir
    try:
        certs = base / "certs"
        init_ca(certs)
        issue_edge(certs, "test", "edge1")
        k3s_ctx, k3s_ca = make_self_signed_server_context(base)
        tls = {"ca": str(certs / "ca.crt"), "cert": str(certs / "cloud.crt"), "key": str(certs / "cloud.key")}
        async with trio.open_nursery() as nursery:
            k3s_port = await nursery.start(serve_k3s_standin, k3s_ctx)
            try:
                cloud_cfg = cloud_config_from_dict(
                    {"tunnel": {"listen": "127.0.0.1:0"}, "proxy": {"listen": f"127.0.0.1:{proxy_port}"},
                     "admin": {"listen": "127.0.0.1:0"}, "tls": tls}, base_dir=base, source="demo cloud")
                cloud = Cloud(cloud_cfg)
                ports = await nursery.start(cloud.run)
            except OSError:
                raise
            edge_cfg = edge_config_from_dict(
                {"cloud": [f"127.0.0.1:{ports.tunnel}"],
                 "tls": {"ca": str(certs / "ca.crt"), "cert": str(certs / "edge-edge1.crt"),
                         "key": str(certs / "edge-edge1.key")},
                 "services": {"test-svc-kins.kins-system:443": f"127.0.0.1:{k3s_port}"},
                 "admin": None}, base_dir=base, source="demo edge")
            edge = Edge(edge_cfg)
            await nursery.start(edge.run)
            with trio.fail_after(10):
                while not cloud.registry.serves("test-svc-kins.kins-system:443"):
                    await trio.sleep(0.02)
            kubeconfig = base / "kubeconfig"
            write_kubeconfig(kubeconfig, ports.proxy, k3s_ca)
            if not quiet:
                print(f"""
kins-tunnel demo is running (all on 127.0.0.1; files in {base}):
  tunnel-cloud   edges on :{ports.tunnel}, CONNECT proxy on :{ports.proxy}, admin on :{ports.admin}
  tunnel-edge    unit "test", node "edge1", serving test-svc-kins.kins-system:443
  K3s stand-in   :{k3s_port} (a test double of the K3s API, reached only through the tunnel)

Try:
  kubectl --kubeconfig {kubeconfig} get pods
  kubectl --kubeconfig {kubeconfig} get pods --watch
  curl -s http://127.0.0.1:{ports.admin}/status
  curl -s --proxy http://127.0.0.1:{ports.proxy} --cacert {k3s_ca} https://test-svc-kins.kins-system:443/version

Ctrl-C stops everything.""", flush=True)
            task_status.started(kubeconfig)
    finally:
        if own:
            shutil.rmtree(base, ignore_errors=True)
