"""`kins-tunnel demo`: cloud, one edge and a K3s-API stand-in, all on loopback, with a kubeconfig.

Everything lives in a fresh temporary directory (its own CA, issuing CA and cloud certificate).
The edge (unit `test`, node `edge1`) starts without a certificate: it enrols with a one-use token
and the CA hash, as ``kins-tunnel token create`` and ``certs init --issuing-ca`` make them, and
renews its certificate over the tunnel. It serves `test-svc-kins.kins-system:443` → the stand-in;
kubectl reaches it through the cloud's CONNECT proxy, exactly as in a real Kins set-up. `demo_examples` is the list
of commands the demo prints (tests run the non-interactive ones as printed).

Dependency: the demo runs the K3s API stand-in of `kins_tunnel.testing`, a test double that the
container image leaves out on purpose. That package is a plain, required dependency of this module; the
CLI's `demo` command checks that it is installed before it imports this module, so an import error
from anywhere else is never mistaken for its absence.
"""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import trio
import yaml

from kins_tunnel.certs.directory import init_ca
from kins_tunnel.certs.issuing import ca_hash_of_file
from kins_tunnel.cloud.server import Cloud
from kins_tunnel.config import cloud_config_from_dict, edge_config_from_dict
from kins_tunnel.config_proxy import check_exposure
from kins_tunnel.edge.agent import Edge
from kins_tunnel.testing.blob import iter_blob
from kins_tunnel.testing.k3s_standin import serve_k3s_standin
from kins_tunnel.testing.selfsigned import make_self_signed_server_context
from kins_tunnel.tokens import create_token, parse_duration

log = logging.getLogger("kins_tunnel.demo")

POD = "test-server-kins-7d9f8b6c5-x2x4k"  # the stand-in's K3s server pod of unit "test"
SAMPLE_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Example:
    command: str  # a shell command line
    note: str = ""
    interactive: bool = False  # needs a terminal, or runs until Ctrl-C


def _write_sample(path: Path) -> None:
    with open(path, "wb") as f:
        for chunk in iter_blob(SAMPLE_BYTES, 1):
            f.write(chunk)


def demo_examples(
    kubeconfig: Path, sample: Path, admin_port: int, proxy_port: int, k3s_ca: Path
) -> list[Example]:
    """The commands the demo prints, in order."""
    k = f"kubectl --kubeconfig {kubeconfig}"
    back = sample.with_name("back.bin")
    return [
        Example(f"{k} get pods"),
        Example(f"{k} get pods --watch", "Ctrl-C ends it", interactive=True),
        Example(f"{k} exec {POD} -- echo hello from the edge"),
        Example(
            f"{k} exec -it {POD} -- cat",
            "a line echo on a terminal; Ctrl-D ends it",
            interactive=True,
        ),
        Example(f"{k} cp {sample} {POD}:/tmp/upgrade.bin", "push a file to the edge"),
        Example(f"{k} exec {POD} -- sha256sum /tmp/upgrade.bin", f"compare: sha256sum {sample}"),
        Example(f"{k} cp {POD}:/tmp/upgrade.bin {back}", "and fetch it back"),
        Example(
            f"{k} port-forward pod/{POD} 7007:7",
            "pod port 7 echoes; then: socat - TCP:127.0.0.1:7007",
            interactive=True,
        ),
        Example(f"curl -s http://127.0.0.1:{admin_port}/status"),
        Example(
            f"curl -s --proxy http://127.0.0.1:{proxy_port} --cacert {k3s_ca} "
            "https://test-svc-kins.kins-system:443/version"
        ),
    ]


def write_kubeconfig(path: Path, proxy_port: int, ca: Path, unit: str = "test") -> None:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "default",
                "cluster": {
                    "server": f"https://{unit}-svc-kins.kins-system:443",
                    "proxy-url": f"http://127.0.0.1:{proxy_port}",
                    "certificate-authority": str(ca),
                },
            }
        ],
        "contexts": [
            {
                "name": "default",
                "context": {"cluster": "default", "namespace": "default", "user": "default"},
            }
        ],
        "current-context": "default",
        "users": [{"name": "default", "user": {"token": "demo-token"}}],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    path.chmod(0o600)


async def run_demo(
    workdir: Path | None = None,
    proxy_port: int = 8080,
    *,
    quiet: bool = False,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    own = workdir is None
    base = Path(tempfile.mkdtemp(prefix="kins-tunnel-demo-")) if workdir is None else workdir
    try:
        certs = base / "certs"
        init_ca(certs, issuing_ca=True)
        ca_hash = ca_hash_of_file(certs / "ca.crt")
        tokens = base / "tokens.yaml"
        token = create_token(tokens, "test", "edge1", parse_duration("1h"), 1)
        edge_dir = base / "edge"
        edge_dir.mkdir(exist_ok=True)
        (edge_dir / "token").write_text(token + "\n")
        (edge_dir / "token").chmod(0o600)
        k3s_ctx, k3s_ca = make_self_signed_server_context(base)
        tls = {
            "ca": str(certs / "ca.crt"),
            "cert": str(certs / "cloud.crt"),
            "key": str(certs / "cloud.key"),
        }
        async with trio.open_nursery() as nursery:
            (base / "sandbox").mkdir(exist_ok=True)
            k3s_port = await nursery.start(
                functools.partial(serve_k3s_standin, k3s_ctx, sandbox=base / "sandbox")
            )
            try:
                cloud_cfg = cloud_config_from_dict(
                    {
                        "tunnel": {"listen": "127.0.0.1:0"},
                        "proxy": {"listen": f"127.0.0.1:{proxy_port}"},
                        "admin": {"listen": "127.0.0.1:0"},
                        "tls": tls,
                        "enrollment": {
                            "tokens_file": str(tokens),
                            "ca": {
                                "cert": str(certs / "issuing.crt"),
                                "key": str(certs / "issuing.key"),
                            },
                        },
                    },
                    base_dir=base,
                    source="demo cloud",
                )
                check_exposure(cloud_cfg.proxy, source="demo cloud")  # loopback: anonymous is fine
                cloud = Cloud(cloud_cfg)
                ports = await nursery.start(cloud.run)
            except OSError:
                raise
            edge_cfg = edge_config_from_dict(
                {
                    "cloud": [f"127.0.0.1:{ports.tunnel}"],
                    # nothing but a token and the CA hash: the files below are written at enrolment
                    "tls": {
                        "ca": str(edge_dir / "ca.crt"),
                        "cert": str(edge_dir / "tls.crt"),
                        "key": str(edge_dir / "tls.key"),
                    },
                    "enroll": {
                        "token_file": str(edge_dir / "token"),
                        "ca_hash": ca_hash,
                        "node": "edge1",
                    },
                    "services": {"test-svc-kins.kins-system:443": f"127.0.0.1:{k3s_port}"},
                    "admin": None,
                },
                base_dir=base,
                source="demo edge",
            )
            edge = Edge(edge_cfg)
            await nursery.start(edge.run)
            with trio.fail_after(10):
                while not cloud.registry.serves("test-svc-kins.kins-system:443"):
                    await trio.sleep(0.02)
            assert edge.enrolment is not None
            not_after = edge.enrolment.status().get("not_after", "?")
            kubeconfig = base / "kubeconfig"
            write_kubeconfig(kubeconfig, ports.proxy, k3s_ca)
            sample = base / "upgrade.bin"
            await trio.to_thread.run_sync(_write_sample, sample)
            if not quiet:
                examples = demo_examples(kubeconfig, sample, ports.admin, ports.proxy, k3s_ca)
                tries = "\n".join(
                    f"  {e.command}" + (f"\n      # {e.note}" if e.note else "") for e in examples
                )
                print(
                    f"""
kins-tunnel demo is running (all on 127.0.0.1; files in {base}):
  tunnel-cloud   edges on :{ports.tunnel}, CONNECT proxy on :{ports.proxy}, admin on :{ports.admin}
  tunnel-edge    unit "test", node "edge1", serving test-svc-kins.kins-system:443
                 enrolled with token {token.split(".")[0]} and CA hash {ca_hash[:19]}...: its key
                 was made on the edge, its certificate (until {not_after}) signed by the
                 cloud's issuing CA; it renews itself over the tunnel
  K3s stand-in   :{k3s_port} (a test double of the K3s API, reached only through the tunnel;
                 exec runs only echo, cat, sha256sum, test and tar, inside {base / "sandbox"})

Try:
{tries}

Ctrl-C stops everything.""",
                    flush=True,
                )
            task_status.started(kubeconfig)
    finally:
        if own:
            shutil.rmtree(base, ignore_errors=True)
