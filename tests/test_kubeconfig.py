"""Rewriting an edge kubeconfig to go through the tunnel; read back by real kubectl."""

from __future__ import annotations

import base64
import functools
import io
import os
import stat
import subprocess
from pathlib import Path

import pytest
import trio
import yaml

from kins_tunnel.errors import UserError
from kins_tunnel.kubeconfig import main_kubeconfig, rewrite_kubeconfig
from kins_tunnel.testing.k3s_standin import make_self_signed_server_context, serve_k3s_standin
from tests.clients import KUBECTL, needs_kubectl

PROXY = "http://tunnel-cloud.kube-system:8080"

# The kubeconfig.conf of the test-cm-kins configmap, as in SuperEdge's Kins walkthrough.
SEED = """\
apiVersion: v1
kind: Config
clusters:
- cluster:
    insecure-skip-tls-verify: true
    server: https://127.0.0.1:6443
  name: default
contexts:
- context:
    cluster: default
    namespace: default
    user: default
  name: default
current-context: default
preferences: {}
users:
- name: default
  user:
    token: rfj9s2bhpcs6fm9xxxxxxxxxxxxxxxxx
"""

CA_DATA = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nnot really\n").decode()
MULTI = f"""\
apiVersion: v1
kind: Config
clusters:
- name: cloud
  cluster: {{server: "https://10.0.0.1:6443", certificate-authority-data: {CA_DATA}}}
- name: edge-test
  cluster:
    certificate-authority-data: {CA_DATA}
    server: https://192.168.1.20:6443
    extensions:
    - name: client.authentication.k8s.io/exec
      extension: {{audience: edge}}
contexts:
- name: cloud
  context: {{cluster: cloud, user: admin}}
- name: test
  context: {{cluster: edge-test, user: edge, namespace: kins-system}}
current-context: test
users:
- name: admin
  user: {{client-certificate-data: {CA_DATA}, client-key-data: {CA_DATA}}}
- name: edge
  user: {{token: "12345"}}
extensions:
- name: local
  extension: {{note: keep me}}
"""


def test_seed_example_from_the_kins_walkthrough() -> None:
    out = yaml.safe_load(rewrite_kubeconfig(SEED, unit="test", proxy_url=PROXY))
    want = yaml.safe_load(SEED)
    want["clusters"][0]["cluster"] = {
        "insecure-skip-tls-verify": True,
        "server": "https://test-svc-kins.kins-system:443",
        "proxy-url": PROXY,
    }
    assert out == want


def test_key_order_is_kept_and_proxy_url_follows_server() -> None:
    text = rewrite_kubeconfig(SEED, unit="test", proxy_url=PROXY)
    assert text.index("insecure-skip-tls-verify") < text.index("server:") < text.index("proxy-url")
    assert text.index("clusters:") < text.index("contexts:") < text.index("users:")


def test_several_clusters_only_the_current_one_changes() -> None:
    before = yaml.safe_load(MULTI)
    out = yaml.safe_load(rewrite_kubeconfig(MULTI, unit="test", proxy_url=PROXY))
    assert out["clusters"][0] == before["clusters"][0]
    edge = out["clusters"][1]["cluster"]
    assert edge["server"] == "https://test-svc-kins.kins-system:443"
    assert edge["proxy-url"] == PROXY
    assert edge["certificate-authority-data"] == CA_DATA
    assert edge["extensions"] == before["clusters"][1]["cluster"]["extensions"]
    assert "insecure-skip-tls-verify" not in edge and "tls-server-name" not in edge
    for key in ("contexts", "users", "current-context", "extensions", "kind", "apiVersion"):
        assert out[key] == before[key], key
    assert out["users"][1]["user"]["token"] == "12345"  # still a string


def test_existing_proxy_url_is_replaced_and_single_cluster_needs_no_context() -> None:
    text = """clusters:
- name: a
  cluster: {server: "https://1.2.3.4:6443", proxy-url: "http://old:1"}
"""
    out = yaml.safe_load(
        rewrite_kubeconfig(text, unit="edge-a1", proxy_url="https://u:p%40ss@10.0.0.5:31469")
    )
    assert out["clusters"][0]["cluster"] == {
        "server": "https://edge-a1-svc-kins.kins-system:443",
        "proxy-url": "https://u:p%40ss@10.0.0.5:31469",
    }


@pytest.mark.parametrize(
    "proxy_url",
    [
        "",
        "tunnel-cloud:8080",
        "socks5://tunnel-cloud:1080",
        "ftp://x",
        "http://",
        "http://:8080",
        "http://host:99999",
        "http://host:0",
        "http://host:8080/path",
        "http://host:8080?x=1",
        "http://ho st:8080",
    ],
)
def test_bad_proxy_url(proxy_url: str) -> None:
    with pytest.raises(UserError, match="proxy URL") as err:
        rewrite_kubeconfig(SEED, unit="test", proxy_url=proxy_url)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("unit", ["", "Test", "-test", "test-", "te_st", "a.b", "x" * 60])
def test_bad_unit(unit: str) -> None:
    with pytest.raises(UserError, match="unit"):
        rewrite_kubeconfig(SEED, unit=unit, proxy_url=PROXY)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "not a kubeconfig"),
        ("just a string", "not a kubeconfig"),
        ("- a\n- b\n", "not a kubeconfig"),
        ("clusters: [\n", "not valid YAML at line"),
        ("kind: Pod\nclusters: [{name: a, cluster: {server: x}}]\n", "kind is 'Pod'"),
        ("kind: Config\nclusters: []\n", "no clusters"),
        ("kind: Config\nusers: []\n", "no clusters"),
        ("clusters: [{name: a}]\n", r"clusters\[0\]"),
        ("clusters: [{name: a, cluster: {}}, {name: b, cluster: {}}]\n", "no current-context"),
        (
            "clusters: [{name: a, cluster: {}}, {name: b, cluster: {}}]\ncurrent-context: x\n",
            "'x' is not among",
        ),
        (
            "clusters: [{name: a, cluster: {}}, {name: b, cluster: {}}]\ncurrent-context: x\n"
            "contexts: [{name: x, context: {cluster: c}}]\n",
            "'c', which is missing",
        ),
    ],
)
def test_bad_kubeconfig(text: str, match: str) -> None:
    with pytest.raises(UserError, match=match) as err:
        rewrite_kubeconfig(text, unit="test", proxy_url=PROXY)
    assert "\n" not in str(err.value)


def test_main_writes_a_private_file(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.conf", tmp_path / "out.conf"
    src.write_text(SEED)
    dst.write_text("old")
    dst.chmod(0o644)
    assert main_kubeconfig("test", PROXY, str(src), str(dst)) == 0
    assert stat.S_IMODE(dst.stat().st_mode) == 0o600
    assert dst.read_text() == rewrite_kubeconfig(SEED, unit="test", proxy_url=PROXY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.conf", "out.conf"]


def test_main_stdin_to_stdout(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(SEED))
    assert main_kubeconfig("test", PROXY, "-", None) == 0
    assert "proxy-url: " + PROXY in capsys.readouterr().out


def test_main_unreadable_input_and_unwritable_output(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read kubeconfig"):
        main_kubeconfig("test", PROXY, str(tmp_path / "missing"), None)
    (tmp_path / "in").write_text(SEED)
    with pytest.raises(UserError, match="cannot write kubeconfig"):
        main_kubeconfig("test", PROXY, str(tmp_path / "in"), str(tmp_path / "no" / "out"))


async def run_kubectl(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(kubeconfig.parent)}
    with trio.fail_after(30):
        return await trio.run_process(
            [KUBECTL, "--kubeconfig", str(kubeconfig), *args],
            capture_stdout=True,
            capture_stderr=True,
            env=env,
        )


@needs_kubectl
async def test_kubectl_reads_the_proxy_url_back(tmp_path: Path) -> None:
    out = tmp_path / "out.conf"
    (tmp_path / "in.conf").write_text(MULTI)
    main_kubeconfig(
        "test", "http://admin:s3cret@10.0.0.5:31469", str(tmp_path / "in.conf"), str(out)
    )
    jsonpath = "{.clusters[?(@.name=='edge-test')].cluster.proxy-url} {.current-context}"
    proc = await run_kubectl(out, "config", "view", "--raw", "-o", f"jsonpath={jsonpath}")
    assert proc.stdout.decode() == "http://admin:s3cret@10.0.0.5:31469 test"
    proc = await run_kubectl(
        out, "config", "view", "--minify", "--raw", "-o", "jsonpath={.clusters[0].cluster.server}"
    )
    assert proc.stdout.decode() == "https://test-svc-kins.kins-system:443"


@needs_kubectl
async def test_kubectl_goes_through_the_proxy_and_verifies_the_service_name(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The rewritten kubeconfig through the real cloud and edge (Basic auth from the proxy URL):
    kubectl verifies the K3s stand-in's certificate for the Service name it asked for."""
    from tests.e2e.harness import SVC, tunnel_env
    from tests.test_observability import connect_lines, json_log

    ctx, cert = make_self_signed_server_context(tmp_path)
    k3s_port = await nursery.start(functools.partial(serve_k3s_standin, ctx))
    (tmp_path / "basic").write_text("ops:pw\n")
    auth = {"auth": {"basic_file": str(tmp_path / "basic")}}
    edge = SEED.replace(
        "    insecure-skip-tls-verify: true\n", f"    certificate-authority: {cert}\n"
    )
    async with (
        json_log() as buf,
        tunnel_env(tmp_path, {SVC: f"127.0.0.1:{k3s_port}"}, proxy=auth) as env,
    ):
        out = tmp_path / "kubeconfig"
        out.write_text(
            rewrite_kubeconfig(
                edge, unit="test", proxy_url=f"http://ops:pw@127.0.0.1:{env.ports.proxy}"
            )
        )
        proc = await run_kubectl(out, "get", "pods", "-o", "name")
    assert b"pod/test-server-kins-" in proc.stdout
    line = next(d for d in connect_lines(buf) if d["status"] == 200)
    assert line["target"] == "test-svc-kins.kins-system:443"
    assert line["principal"] == "ops"  # client-go sent the proxy URL's user:password as Basic
