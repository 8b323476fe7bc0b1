"""Tests for kins_tunnel.certs: files, modes, SANs, identity, and real mutual-TLS handshakes."""

import datetime as dt
import ipaddress
import os
import ssl
import stat
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kins_tunnel import pemfiles, tls_contexts
from kins_tunnel.certs.directory import init_ca, issue_edge
from kins_tunnel.certs.identity import ALPN_PROTOCOL, EdgeIdentity, identity_from_der
from kins_tunnel.errors import UserError


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def sans(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, cloud certificate and edge certificate for unit `test`, node `edge1`."""
    d = tmp_path_factory.mktemp("pki")
    init_ca(d, ["tunnel-cloud.kube-system", "10.0.0.5", "::1"])
    issue_edge(d, "test", "edge1")
    return d


# --- files and contents ------------------------------------------------------------------------


def test_init_writes_files_with_modes(pki: Path) -> None:
    for name in ("ca", "cloud", "edge-edge1"):
        assert mode(pki / f"{name}.crt") == 0o644
        assert mode(pki / f"{name}.key") == 0o600
        key_pem = (pki / f"{name}.key").read_bytes()
        assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    assert not [p for p in pki.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_key_mode_ignores_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        init_ca(tmp_path)
    finally:
        os.umask(old)
    assert mode(tmp_path / "ca.key") == 0o600
    assert mode(tmp_path / "cloud.key") == 0o600


def test_ca_certificate(pki: Path) -> None:
    ca = load(pki / "ca.crt")
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    key = ca.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"
    assert ca.signature_hash_algorithm is not None
    assert ca.signature_hash_algorithm.name == "sha256"
    assert ca.not_valid_after_utc - ca.not_valid_before_utc > dt.timedelta(days=3649)


def test_cloud_certificate_sans(pki: Path) -> None:
    cloud = load(pki / "cloud.crt")
    san = sans(cloud)
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "tunnel-cloud.kube-system"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
    }
    eku = cloud.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    cn = cloud.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "kins-tunnel-cloud"
    assert cloud.issuer == load(pki / "ca.crt").subject


def test_cloud_defaults_only(tmp_path: Path) -> None:
    init_ca(tmp_path)
    san = sans(load(tmp_path / "cloud.crt"))
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_edge_certificate(pki: Path) -> None:
    edge = load(pki / "edge-edge1.crt")
    assert sans(edge).get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://kins-tunnel/unit/test/node/edge1"
    ]
    assert edge.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "edge1"
    assert edge.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "test"
    eku = edge.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_issue_edge_returns_paths(tmp_path: Path) -> None:
    init_ca(tmp_path)
    crt, key = issue_edge(tmp_path, "u-1", "n0")
    assert (crt, key) == (tmp_path / "edge-n0.crt", tmp_path / "edge-n0.key")


def test_reuses_existing_ca(tmp_path: Path) -> None:
    init_ca(tmp_path)
    ca_before = (tmp_path / "ca.crt").read_bytes(), (tmp_path / "ca.key").read_bytes()
    cloud_before = (tmp_path / "cloud.crt").read_bytes()
    init_ca(tmp_path, ["new.example"])
    assert ((tmp_path / "ca.crt").read_bytes(), (tmp_path / "ca.key").read_bytes()) == ca_before
    cloud = load(tmp_path / "cloud.crt")
    assert cloud.public_bytes(serialization.Encoding.PEM) != cloud_before
    assert "new.example" in sans(cloud).get_values_for_type(x509.DNSName)
    assert cloud.issuer == load(tmp_path / "ca.crt").subject


def test_half_present_ca_is_an_error(tmp_path: Path) -> None:
    init_ca(tmp_path)
    (tmp_path / "ca.key").unlink()
    with pytest.raises(UserError, match=r"ca\.key: No such file"):
        init_ca(tmp_path)


def test_creates_missing_directory(tmp_path: Path) -> None:
    init_ca(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b" / "ca.crt").is_file()


@pytest.mark.parametrize("san", ["", "bad name", "-x.example", "a..b", "x" * 64 + ".example"])
def test_bad_cloud_san(tmp_path: Path, san: str) -> None:
    with pytest.raises(UserError, match="--cloud-san"):
        init_ca(tmp_path, [san])
    assert not (tmp_path / "ca.key").exists()


def test_issue_edge_without_ca(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"ca\.crt: No such file or directory"):
        issue_edge(tmp_path, "test", "edge1")


def test_issue_edge_with_garbage_ca(tmp_path: Path) -> None:
    init_ca(tmp_path)
    (tmp_path / "ca.crt").write_text("hello")
    with pytest.raises(UserError, match=r"ca\.crt is not a PEM certificate"):
        issue_edge(tmp_path, "test", "edge1")


@pytest.mark.parametrize(
    ("unit", "node"),
    [
        ("Test", "edge1"),
        ("test", "-edge"),
        ("test", "edge-"),
        ("", "edge1"),
        ("test", "a" * 64),
        ("te_st", "edge1"),
        ("test", "edge..1"),
        ("test", ".edge1"),
        ("test", "edge/1"),
        ("test\n", "edge1"),
        ("test.a", "edge1"),
        ("test", "a." * 127),
        ("test", "Edge.1"),
    ],
)
def test_invalid_names(tmp_path: Path, unit: str, node: str) -> None:
    init_ca(tmp_path)
    with pytest.raises(UserError, match="must be a DNS (label|subdomain)"):
        issue_edge(tmp_path, unit, node)


def test_node_names_may_be_dns_subdomains(tmp_path: Path) -> None:
    """Kubernetes node names are DNS subdomains (e.g. node1.example.com); units stay labels."""
    init_ca(tmp_path)
    crt, _key = issue_edge(tmp_path, "test", "node1.example.com")
    assert crt.name == "edge-node1.example.com.crt"
    der = load(crt).public_bytes(serialization.Encoding.DER)
    assert identity_from_der(der) == EdgeIdentity("test", "node1.example.com")


def test_identity_round_trip(pki: Path) -> None:
    der = load(pki / "edge-edge1.crt").public_bytes(serialization.Encoding.DER)
    ident = identity_from_der(der)
    assert ident == EdgeIdentity(unit="test", node="edge1")
    assert ident.uri == "spiffe://kins-tunnel/unit/test/node/edge1"


def _der_with_uris(*uris: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), False
        )
    cert = builder.sign(key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("uris", "reason"),
    [
        ((), "no subjectAltName"),
        (("https://example.com/",), "no spiffe://kins-tunnel/ URI SAN"),
        (
            ("spiffe://kins-tunnel/unit/a/node/b", "spiffe://kins-tunnel/unit/a/node/c"),
            "expected exactly one",
        ),
        (("spiffe://kins-tunnel/unit/a/node/b/extra",), "is not spiffe"),
        (("spiffe://kins-tunnel/node/b",), "is not spiffe"),
        (("spiffe://kins-tunnel/unit/A/node/b",), "unit 'A' is not a DNS label"),
        (("spiffe://kins-tunnel/unit/a/node/-b",), "node '-b' is not a DNS subdomain"),
        (("spiffe://kins-tunnel/unit/a.b/node/b",), "unit 'a.b' is not a DNS label"),
    ],
)
def test_identity_rejects(uris: tuple[str, ...], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        identity_from_der(_der_with_uris(*uris))


def test_identity_ignores_other_uris() -> None:
    der = _der_with_uris("https://example.com/", "spiffe://kins-tunnel/unit/u/node/n")
    assert identity_from_der(der) == EdgeIdentity("u", "n")


def test_identity_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="not a DER certificate"):
        identity_from_der(b"\x30\x03abc")


def test_cert_not_after(pki: Path) -> None:
    assert (
        pemfiles.cert_not_after(pki / "edge-edge1.crt")
        == load(pki / "edge-edge1.crt").not_valid_after_utc
    )
    with pytest.raises(UserError, match="cannot read"):
        pemfiles.cert_not_after(pki / "missing.crt")


# --- TLS contexts ------------------------------------------------------------------------------


def server_ctx(d: Path) -> ssl.SSLContext:
    return tls_contexts.server_ssl_context(d / "ca.crt", d / "cloud.crt", d / "cloud.key")


def client_ctx(d: Path, node: str = "edge1") -> ssl.SSLContext:
    return tls_contexts.client_ssl_context(
        d / "ca.crt", d / f"edge-{node}.crt", d / f"edge-{node}.key"
    )


def test_context_settings(pki: Path) -> None:
    s, c = server_ctx(pki), client_ctx(pki)
    for ctx in (s, c):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.options & ssl.OP_NO_COMPRESSION
        tls12 = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
        assert tls12[0] == "ECDHE-ECDSA-AES128-GCM-SHA256"
        assert all("GCM" in name or "POLY1305" in name for name in tls12)
        # The CA file is the only trust root.
        assert [x["subject"] for x in ctx.get_ca_certs()] == [
            ((("commonName", "kins-tunnel CA"),),)
        ]
    assert c.check_hostname


@pytest.mark.parametrize("which", ["ca", "cert", "key"])
def test_context_missing_file(pki: Path, tmp_path: Path, which: str) -> None:
    paths = {"ca": pki / "ca.crt", "cert": pki / "cloud.crt", "key": pki / "cloud.key"}
    paths[which] = tmp_path / "nope.pem"
    with pytest.raises(
        UserError, match=rf"^tls\.{which}: cannot read .*nope\.pem: No such file or directory$"
    ):
        tls_contexts.server_ssl_context(paths["ca"], paths["cert"], paths["key"])


@pytest.mark.parametrize("which", ["ca", "cert", "key"])
def test_context_not_pem(pki: Path, tmp_path: Path, which: str) -> None:
    paths = {"ca": pki / "ca.crt", "cert": pki / "cloud.crt", "key": pki / "cloud.key"}
    paths[which] = tmp_path / "junk.pem"
    paths[which].write_text("not pem at all\n")
    with pytest.raises(UserError, match=rf"^tls\.{which}: .*junk\.pem is not a PEM"):
        tls_contexts.client_ssl_context(paths["ca"], paths["cert"], paths["key"])


def test_context_key_mismatch(pki: Path) -> None:
    with pytest.raises(UserError, match=r"^tls\.key: .*edge-edge1\.key does not belong"):
        tls_contexts.server_ssl_context(pki / "ca.crt", pki / "cloud.crt", pki / "edge-edge1.key")


async def handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, hostname: str = "localhost"
) -> tuple[object, object]:
    """Run a TLS handshake over a real socket pair; return (server result, client result).

    The server's result is the peer identity (or the exception); the client's is the first bytes
    it read after the handshake (or the exception). TLS 1.3 lets a client finish its handshake
    before the server has judged its certificate, so the client reads to see the verdict.
    """
    a, b = trio.socket.socketpair()
    s_stream = trio.SSLStream(trio.SocketStream(a), server, server_side=True)
    c_stream = trio.SSLStream(trio.SocketStream(b), client, server_hostname=hostname)
    results: dict[str, object] = {}

    async def run_server() -> None:
        try:
            await s_stream.do_handshake()
            assert s_stream.selected_alpn_protocol() == ALPN_PROTOCOL
            results["server"] = identity_from_der(s_stream.getpeercert(binary_form=True))
            await s_stream.send_all(b"ok")
        except trio.BrokenResourceError as exc:
            results["server"] = exc
        finally:
            await trio.aclose_forcefully(s_stream)

    async def run_client() -> None:
        try:
            await c_stream.do_handshake()
            results["client"] = await c_stream.receive_some(10)
        except trio.BrokenResourceError as exc:
            results["client"] = exc
        finally:
            await trio.aclose_forcefully(c_stream)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_server)
            nursery.start_soon(run_client)
    return results["server"], results["client"]


def _rejected(result: object, needle: str) -> bool:
    return isinstance(result, trio.BrokenResourceError) and needle in str(result.__cause__)


async def test_mutual_tls_accepts_edge(pki: Path) -> None:
    server, client = await handshake(server_ctx(pki), client_ctx(pki))
    assert server == EdgeIdentity("test", "edge1")
    assert client == b"ok"


async def test_mutual_tls_over_ip_san(pki: Path) -> None:
    server, client = await handshake(server_ctx(pki), client_ctx(pki), hostname="127.0.0.1")
    assert (server, client) == (EdgeIdentity("test", "edge1"), b"ok")


async def test_tls12_handshake(pki: Path) -> None:
    ctx = client_ctx(pki)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    server, client = await handshake(server_ctx(pki), ctx)
    assert (server, client) == (EdgeIdentity("test", "edge1"), b"ok")


async def test_mutual_tls_rejects_other_ca(pki: Path, tmp_path: Path) -> None:
    init_ca(tmp_path)
    issue_edge(tmp_path, "test", "edge1")
    # The edge trusts the real CA but presents a certificate from another CA.
    ctx = tls_contexts.client_ssl_context(
        pki / "ca.crt", tmp_path / "edge-edge1.crt", tmp_path / "edge-edge1.key"
    )
    server, client = await handshake(server_ctx(pki), ctx)
    assert _rejected(server, "CERTIFICATE_VERIFY_FAILED")
    assert isinstance(client, trio.BrokenResourceError)


async def test_edge_rejects_cloud_from_other_ca(pki: Path, tmp_path: Path) -> None:
    init_ca(tmp_path)
    server, client = await handshake(server_ctx(tmp_path), client_ctx(pki))
    assert _rejected(client, "CERTIFICATE_VERIFY_FAILED")
    assert isinstance(server, trio.BrokenResourceError)


async def test_mutual_tls_rejects_client_without_certificate(pki: Path) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki / "ca.crt")
    server, client = await handshake(server_ctx(pki), ctx)
    assert _rejected(server, "PEER_DID_NOT_RETURN_A_CERTIFICATE")
    assert isinstance(client, trio.BrokenResourceError)


async def test_mutual_tls_rejects_expired_edge(pki: Path) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    crt, _ = issue_edge(pki, "test", "old", days=1, _now=past)
    assert load(crt).not_valid_after_utc < dt.datetime.now(dt.UTC)
    server, client = await handshake(server_ctx(pki), client_ctx(pki, "old"))
    assert _rejected(server, "certificate has expired")
    assert isinstance(client, trio.BrokenResourceError)


async def test_edge_checks_cloud_hostname(pki: Path) -> None:
    server, client = await handshake(server_ctx(pki), client_ctx(pki), hostname="elsewhere.example")
    assert _rejected(client, "Hostname mismatch")
    assert isinstance(server, trio.BrokenResourceError)
