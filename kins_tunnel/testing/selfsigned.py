"""A self-signed server certificate for the K3s API stand-in (a test double's own TLS)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def make_self_signed_server_context(
    tmpdir: str | Path, *, unit: str = "test"
) -> tuple[ssl.SSLContext, Path]:
    """Write a self-signed server certificate and key into `tmpdir`; return (context, cert path).

    The certificate names 127.0.0.1, localhost and ``<unit>-svc-kins.kins-system`` (the name
    kubectl uses through the tunnel), so clients may verify it with the cert path as their CA.
    """
    tmp = Path(tmpdir)
    key = ec.generate_private_key(ec.SECP256R1())
    svc = f"{unit}-svc-kins.kins-system"
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "k3s-standin")])
    now = dt.datetime.now(dt.UTC)
    sans = [
        x509.DNSName("localhost"),
        x509.DNSName(svc),
        x509.DNSName(f"{svc}.svc"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "k3s-standin.crt", tmp / "k3s-standin.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_path, key_path)
    return ctx, cert_path
