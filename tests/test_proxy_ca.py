"""The proxy CA: `certs init --proxy-san` issues the proxy certificate from a second,
name-constrained CA, so a proxy certificate can pose neither as a unit's K3s (client-go trusts
the proxy CA for K3s too) nor as the cloud (edges trust only the tunnel CA)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import subprocess
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from kins_tunnel.certs.directory import init_ca
from kins_tunnel.certs.proxy_ca import name_permitted
from kins_tunnel.config import edge_config_from_dict
from kins_tunnel.edge.agent import Edge
from kins_tunnel.errors import UserError
from kins_tunnel.testing.support import wait_until
from tests.e2e.harness import SVC, edge_dict, make_certs, tunnel_env

PROXY_NAMES = ["tunnel-cloud.example.com", "*.proxy.example.net", "203.0.113.7"]


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def verify(ca: Path, leaf: x509.Certificate, name: str) -> None:
    """Verify `leaf` for server `name` against `ca` (cryptography's RFC 5280 verifier)."""
    try:
        subject: x509.verification.Subject = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        subject = x509.DNSName(name)
    verifier = (
        PolicyBuilder()
        .store(Store([load(ca)]))
        .time(dt.datetime.now(dt.UTC))
        .build_server_verifier(subject)
    )
    verifier.verify(leaf, [])


def forge(certs: Path, names: list[str]) -> Path:
    """What a holder of the proxy CA key could sign: a server certificate for `names`."""
    key = ec.generate_private_key(ec.SECP256R1())
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    ca_key = load_pem_private_key((certs / "proxy-ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = load(certs / "proxy-ca.crt")
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forged")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    from cryptography.hazmat.primitives import serialization

    out = certs / "forged.crt"
    out.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (certs / "forged.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return out


def test_proxy_certificate_comes_from_a_name_constrained_proxy_ca(tmp_path: Path) -> None:
    init_ca(tmp_path, proxy_sans=PROXY_NAMES)
    ca, pca, proxy = (load(tmp_path / f) for f in ("ca.crt", "proxy-ca.crt", "proxy.crt"))
    assert proxy.issuer == pca.subject != ca.subject
    ext = pca.extensions.get_extension_for_class(x509.NameConstraints)
    assert ext.critical
    assert set(ext.value.permitted_subtrees or ()) == {
        x509.DNSName("localhost"),
        x509.DNSName("tunnel-cloud.example.com"),
        x509.DNSName("proxy.example.net"),
        x509.IPAddress(ipaddress.ip_network("127.0.0.1/32")),
        x509.IPAddress(ipaddress.ip_network("203.0.113.7/32")),
    }
    for name in ("tunnel-cloud.example.com", "a.proxy.example.net", "203.0.113.7", "127.0.0.1"):
        verify(tmp_path / "proxy-ca.crt", proxy, name)
    with pytest.raises(VerificationError):  # the tunnel CA does not vouch for the proxy
        verify(tmp_path / "ca.crt", proxy, "tunnel-cloud.example.com")


@pytest.mark.parametrize(
    "names",
    [["test-svc-kins.kins-system"], ["a.example.com", "test-svc-kins.kins-system.svc"]],
)
def test_a_proxy_ca_certificate_outside_the_constraint_fails_verification(
    tmp_path: Path, names: list[str]
) -> None:
    init_ca(tmp_path, proxy_sans=PROXY_NAMES)
    forged = load(forge(tmp_path, names))
    with pytest.raises(VerificationError, match="(?i)constraint"):
        verify(tmp_path / "proxy-ca.crt", forged, names[-1])
    r = subprocess.run(  # OpenSSL agrees
        [
            "openssl",
            "verify",
            "-CAfile",
            str(tmp_path / "proxy-ca.crt"),
            str(tmp_path / "forged.crt"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "permitted subtree violation" in r.stdout + r.stderr, (
        r.stdout + r.stderr
    )


@pytest.mark.parametrize(
    "bad", ["*.kins-system", "kins-system", "test-svc-kins.kins-system", "x-svc-kins.example.com"]
)
def test_kins_service_names_are_never_proxy_names(tmp_path: Path, bad: str) -> None:
    with pytest.raises(UserError, match=rf"--proxy-san '{re.escape(bad)}'.*K3s"):
        init_ca(tmp_path, proxy_sans=["proxy.example.com", bad])
    assert not (tmp_path / "proxy-ca.crt").exists()


def test_reissue_keeps_the_proxy_ca_and_refuses_names_it_does_not_permit(tmp_path: Path) -> None:
    init_ca(tmp_path, proxy_sans=PROXY_NAMES)
    before = (tmp_path / "proxy-ca.crt").read_bytes()
    init_ca(tmp_path, proxy_sans=["tunnel-cloud.example.com", "x.proxy.example.net"])
    assert (tmp_path / "proxy-ca.crt").read_bytes() == before
    verify(tmp_path / "proxy-ca.crt", load(tmp_path / "proxy.crt"), "x.proxy.example.net")
    with pytest.raises(UserError, match="permits only .*remove proxy-ca.crt and proxy-ca.key"):
        init_ca(tmp_path, proxy_sans=["other.example.org"])
    with pytest.raises(UserError, match="permits only"):
        init_ca(tmp_path, proxy_sans=["198.51.100.1"])


def test_init_without_proxy_names_makes_no_proxy_ca(tmp_path: Path) -> None:
    init_ca(tmp_path)
    assert not (tmp_path / "proxy-ca.crt").exists() and not (tmp_path / "proxy.crt").exists()


def test_name_permitted_follows_rfc5280() -> None:
    c = x509.NameConstraints(
        permitted_subtrees=[
            x509.DNSName("example.com"),
            x509.DNSName(".only-below.org"),
            x509.IPAddress(ipaddress.ip_network("10.0.0.0/8")),
        ],
        excluded_subtrees=None,
    )
    assert name_permitted(c, "example.com") and name_permitted(c, "A.Example.com.")
    assert not name_permitted(c, "badexample.com")
    assert name_permitted(c, "x.only-below.org") and not name_permitted(c, "only-below.org")
    assert name_permitted(c, "10.1.2.3") and not name_permitted(c, "11.0.0.1")
    dns_only = x509.NameConstraints([x509.DNSName("example.com")], None)
    assert name_permitted(dns_only, "10.1.2.3")  # no IP subtree: IPs are not constrained


async def test_an_edge_refuses_a_cloud_that_presents_the_proxy_certificate(
    tmp_path: Path,
) -> None:
    """A real handshake: the edge trusts only the tunnel CA, so the proxy's certificate (which
    names 127.0.0.1 too) is no cloud's; the same edge connects to the cloud's own certificate."""
    certs = make_certs(tmp_path)
    init_ca(certs, proxy_sans=[])
    for cert, accepted in (("proxy", False), ("cloud", True)):
        tls = {"cert": str(certs / f"{cert}.crt"), "key": str(certs / f"{cert}.key")}
        async with tunnel_env(tmp_path, tls=tls) as env:
            cfg = edge_config_from_dict(
                edge_dict(certs, [env.ports.tunnel], {SVC: "127.0.0.1:9"}),
                base_dir=tmp_path,
            )
            edge = Edge(cfg)
            assert env.nursery is not None
            await env.nursery.start(edge.run)
            failures = edge.metrics.handshake_failures
            if accepted:
                await wait_until(lambda: bool(env.cloud.registry.candidates(SVC)), 10)
            else:
                await wait_until(lambda: failures.labels("unknown_ca")._value.get() >= 2, 10)
                assert not edge.sessions and not list(env.cloud.registry)
            await trio.lowlevel.checkpoint()
