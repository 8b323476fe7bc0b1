"""`kins-tunnel kubeconfig` for an https proxy (combined CA bundle: the K3s CA and the proxy CA,
never the tunnel CA) and the Service IP form."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml

from kins_tunnel.certs.directory import init_ca
from kins_tunnel.errors import UserError
from kins_tunnel.kubeconfig import rewrite_kubeconfig
from kins_tunnel.testing.support import kins_tunnel_cli

HTTPS = "https://tunnel-cloud.example:31470"


def pems(tmp_path: Path) -> tuple[bytes, bytes]:
    """(the K3s CA, the proxy CA) as PEM."""
    init_ca(tmp_path / "k3s")
    init_ca(tmp_path / "tunnel", proxy_sans=["tunnel-cloud.example"])
    return (
        (tmp_path / "k3s" / "ca.crt").read_bytes(),
        (tmp_path / "tunnel" / "proxy-ca.crt").read_bytes(),
    )


def kubeconfig(cluster: dict[str, object]) -> str:
    text: str = yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "default", "cluster": cluster}],
            "contexts": [{"name": "default", "context": {"cluster": "default", "user": "default"}}],
            "current-context": "default",
            "users": [{"name": "default", "user": {"token": "t"}}],
        }
    )
    return text


def cluster_of(text: str) -> dict[str, object]:
    return yaml.safe_load(text)["clusters"][0]["cluster"]  # type: ignore[no-any-return]


def test_https_proxy_gets_a_bundle_of_the_k3s_ca_and_the_proxy_ca(tmp_path: Path) -> None:
    k3s, tunnel = pems(tmp_path)
    src = kubeconfig(
        {
            "server": "https://127.0.0.1:6443",
            "certificate-authority-data": base64.b64encode(k3s).decode(),
        }
    )
    out = cluster_of(rewrite_kubeconfig(src, unit="test", proxy_url=HTTPS, proxy_ca=tunnel))
    assert sorted(out) == ["certificate-authority-data", "proxy-url", "server"]
    assert out["server"] == "https://test-svc-kins.kins-system:443" and out["proxy-url"] == HTTPS
    bundle = base64.b64decode(str(out["certificate-authority-data"]))
    assert bundle == k3s + tunnel
    assert (tmp_path / "tunnel" / "ca.crt").read_bytes() not in bundle  # never the tunnel CA


def test_an_unconstrained_proxy_ca_is_refused(tmp_path: Path) -> None:
    """The tunnel CA (or any CA without name constraints) would let its certificates pose as K3s."""
    k3s, _ = pems(tmp_path)
    src = kubeconfig({"server": "https://127.0.0.1:6443"})
    tunnel_ca = (tmp_path / "tunnel" / "ca.crt").read_bytes()
    for bad in (tunnel_ca, k3s):
        with pytest.raises(UserError, match="'kins-tunnel CA' is not name-constrained.*pose as"):
            rewrite_kubeconfig(src, unit="test", proxy_url=HTTPS, proxy_ca=bad, server_ca=k3s)


def test_a_proxy_ca_that_permits_the_k3s_address_is_refused(tmp_path: Path) -> None:
    init_ca(tmp_path, proxy_sans=["10.96.12.34"])  # a ClusterIP given as a proxy address
    src = kubeconfig({"server": "https://127.0.0.1:6443", "certificate-authority-data": "QUJD"})
    with pytest.raises(UserError, match="permits '10.96.12.34', the K3s server's name"):
        rewrite_kubeconfig(
            src,
            unit="test",
            proxy_url=HTTPS,
            proxy_ca=(tmp_path / "proxy-ca.crt").read_bytes(),
            service_ip="10.96.12.34",
        )


def test_ca_file_is_read_relative_to_the_kubeconfig(tmp_path: Path) -> None:
    k3s, tunnel = pems(tmp_path)
    src = kubeconfig({"server": "https://127.0.0.1:6443", "certificate-authority": "k3s/ca.crt"})
    out = cluster_of(
        rewrite_kubeconfig(src, unit="test", proxy_url=HTTPS, proxy_ca=tunnel, base_dir=tmp_path)
    )
    assert "certificate-authority" not in out
    assert base64.b64decode(str(out["certificate-authority-data"])) == k3s + tunnel


def test_insecure_cluster_needs_the_k3s_ca_which_replaces_the_flag(tmp_path: Path) -> None:
    k3s, tunnel = pems(tmp_path)
    src = kubeconfig({"insecure-skip-tls-verify": True, "server": "https://127.0.0.1:6443"})
    with pytest.raises(
        UserError,
        match="insecure-skip-tls-verify: kubectl would verify neither K3s nor the "
        "https proxy; give --server-ca",
    ):
        rewrite_kubeconfig(src, unit="test", proxy_url=HTTPS, proxy_ca=tunnel)
    out = cluster_of(
        rewrite_kubeconfig(src, unit="test", proxy_url=HTTPS, proxy_ca=tunnel, server_ca=k3s)
    )
    assert "insecure-skip-tls-verify" not in out
    assert base64.b64decode(str(out["certificate-authority-data"])) == k3s + tunnel


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"proxy_url": "http://p:8080", "proxy_ca": b"x"},
            "--proxy-ca is only for an https proxy URL",
        ),
        ({"proxy_url": HTTPS, "proxy_ca": b"not pem"}, "--proxy-ca holds no PEM certificate"),
        (
            {"proxy_url": "http://p:8080", "service_ip": "10.96.0.300"},
            "service IP '10.96.0.300' is not an IP address",
        ),
    ],
)
def test_errors(kwargs: dict[str, object], message: str) -> None:
    src = kubeconfig({"server": "https://127.0.0.1:6443", "insecure-skip-tls-verify": True})
    with pytest.raises(UserError, match=message):
        rewrite_kubeconfig(src, unit="test", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "ip, server",
    [("10.96.12.34", "https://10.96.12.34:443"), ("fd00::0:12", "https://[fd00::12]:443")],
)
def test_service_ip_form(ip: str, server: str) -> None:
    src = kubeconfig({"server": "https://127.0.0.1:6443", "insecure-skip-tls-verify": True})
    out = cluster_of(rewrite_kubeconfig(src, unit="test", proxy_url="http://p:8080", service_ip=ip))
    assert out == {"server": server, "proxy-url": "http://p:8080", "insecure-skip-tls-verify": True}


def test_https_without_proxy_ca_keeps_the_ca_and_says_why(tmp_path: Path) -> None:
    notes: list[str] = []
    src = kubeconfig({"server": "https://127.0.0.1:6443", "certificate-authority-data": "QUJD"})
    out = cluster_of(rewrite_kubeconfig(src, unit="test", proxy_url=HTTPS, notes=notes))
    assert out["certificate-authority-data"] == "QUJD"
    assert len(notes) == 1 and "give --proxy-ca" in notes[0]


def test_tls_server_name_with_an_https_proxy(tmp_path: Path) -> None:
    """client-go checks the https proxy against tls-server-name, a K3s name no proxy certificate
    may carry: refused with a proxy CA, a note without one."""
    k3s, tunnel = pems(tmp_path)
    notes: list[str] = []
    src = kubeconfig(
        {
            "server": "https://1.2.3.4:6443",
            "tls-server-name": "k3s.local",
            "certificate-authority-data": base64.b64encode(k3s).decode(),
        }
    )
    with pytest.raises(UserError, match="tls-server-name 'k3s.local'.*remove tls-server-name"):
        rewrite_kubeconfig(src, unit="test", proxy_url=HTTPS, proxy_ca=tunnel, notes=notes)
    rewrite_kubeconfig(src, unit="test", proxy_url=HTTPS, notes=notes)
    assert len(notes) == 2 and "'k3s.local'" in notes[1] and "remove tls-server-name" in notes[1]


def test_cli_writes_the_https_form(tmp_path: Path) -> None:
    k3s, tunnel = pems(tmp_path)
    (tmp_path / "in.conf").write_text(
        kubeconfig({"server": "https://127.0.0.1:6443", "insecure-skip-tls-verify": True})
    )
    https_form = ("kubeconfig", "--unit", "test", "--proxy-url", HTTPS)
    r = kins_tunnel_cli(
        *https_form,
        "--proxy-ca",
        str(tmp_path / "tunnel" / "proxy-ca.crt"),
        "--server-ca",
        str(tmp_path / "k3s" / "ca.crt"),
        "--service-ip",
        "10.96.12.34",
        "-i",
        str(tmp_path / "in.conf"),
        "-o",
        str(tmp_path / "out"),
    )
    assert r.returncode == 0, r.stderr
    out = cluster_of((tmp_path / "out").read_text())
    assert out["server"] == "https://10.96.12.34:443" and out["proxy-url"] == HTTPS
    assert base64.b64decode(str(out["certificate-authority-data"])) == k3s + tunnel
    r = kins_tunnel_cli(
        *https_form, "--proxy-ca", str(tmp_path / "nope.crt"), "-i", str(tmp_path / "in.conf")
    )
    assert r.returncode == 2 and r.stderr.startswith("kins-tunnel: error: --proxy-ca: cannot read")
    r = kins_tunnel_cli(
        *https_form,
        "--proxy-ca",
        str(tmp_path / "tunnel" / "ca.crt"),
        "--server-ca",
        str(tmp_path / "k3s" / "ca.crt"),
        "-i",
        str(tmp_path / "in.conf"),
    )
    assert r.returncode == 2 and "is not name-constrained" in r.stderr and not r.stdout
