"""Signing: the X.509 building blocks every certificate of a directory is made with.

A self-signed CA (`new_ca`), a leaf signed by a CA (`sign_leaf`, and `issue_leaf` that also makes
and writes its key), the common builder (serial, validity backdated by `SKEW` for clocks that lag),
key usages, and loading a CA's certificate and key (`load_ca`). All keys are ECDSA P-256 with
SHA-256 signatures: one cloud accepts thousands of edges, and P-256 handshakes are an order of
magnitude cheaper than RSA-2048 ones. Files are written by `pemfiles` (atomic, keys 0600).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kins_tunnel.certs.identity import EdgeIdentity
from kins_tunnel.errors import UserError
from kins_tunnel.pemfiles import load_certs, load_key, write_cert, write_key

SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH

SKEW = dt.timedelta(minutes=5)  # backdate not_valid_before a little for clocks that lag


def new_ca(
    dir: Path,
    stem: str,
    common_name: str,
    now: dt.datetime,
    days: int,
    *,
    constraints: x509.NameConstraints | None = None,
    path_length: int = 0,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Create and write DIR/STEM.{crt,key}: a self-signed CA, path length `path_length` (1 leaves
    room for the issuing CA below it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = named(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        cert_builder(name, name, key.public_key(), now, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(key_usage(cert_sign=True), critical=True)
    )
    if constraints is not None:
        builder = builder.add_extension(constraints, critical=True)
    cert = (
        builder.add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    write_key(dir / f"{stem}.key", key)
    write_cert(dir / f"{stem}.crt", cert)
    return cert, key


def edge_subject(identity: EdgeIdentity) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.unit),
            x509.NameAttribute(NameOID.COMMON_NAME, identity.node),
        ]
    )


CA = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]  # a CA's certificate and key


@dataclass(frozen=True, slots=True)
class Leaf:
    """What a leaf certificate says: its subject, its SANs and its extended key usages."""

    subject: x509.Name
    sans: Sequence[x509.GeneralName]
    usages: Sequence[x509.ObjectIdentifier]


def named(common_name: str) -> x509.Name:
    """A subject of one CN."""
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def issue_leaf(ca: CA, stem: Path, leaf: Leaf, now: dt.datetime, days: int) -> tuple[Path, Path]:
    """Make a key and a certificate for it signed by `ca`, valid `days` from `now`; write
    STEM.crt and STEM.key (0600) and return those paths."""
    if days < 1:
        raise UserError(f"validity of {days} days: must be at least 1")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = sign_leaf(
        *ca,
        key.public_key(),
        now=now,
        lifetime=dt.timedelta(days=days),
        subject=leaf.subject,
        sans=leaf.sans,
        usages=leaf.usages,
    )
    crt_path, key_path = stem.with_name(stem.name + ".crt"), stem.with_name(stem.name + ".key")
    write_key(key_path, key)
    write_cert(crt_path, cert)
    return crt_path, key_path


def sign_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    public_key: ec.EllipticCurvePublicKey,
    *,
    now: dt.datetime,
    lifetime: dt.timedelta,
    subject: x509.Name,
    sans: Sequence[x509.GeneralName],
    usages: Sequence[x509.ObjectIdentifier],
) -> x509.Certificate:
    # Never outlive the CA: a chain with a leaf expiring after its issuer confuses some verifiers.
    not_after = min(now + lifetime, ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    # A short-lived certificate is backdated by a tenth of its lifetime at most, so that the share
    # of its lifetime after which it is renewed is counted from about when it was issued.
    skew = min(SKEW, lifetime / 10)
    builder = (
        cert_builder(subject, ca_cert.subject, public_key, now, 1, not_after=not_after, skew=skew)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    )
    if sans:  # a user certificate names its holder in the subject only
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return (
        builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def cert_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    now: dt.datetime,
    days: int,
    *,
    not_after: dt.datetime | None = None,
    skew: dt.timedelta = SKEW,
) -> x509.CertificateBuilder:
    if days < 1:
        raise UserError(f"validity of {days} days: must be at least 1")
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - skew)
        .not_valid_after(not_after or now + dt.timedelta(days=days))
    )


_UNUSED_KEY_USAGES = (
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "encipher_only",
    "decipher_only",
)


def key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs; a leaf signs (ECDSA) and nothing else."""
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        **dict.fromkeys(_UNUSED_KEY_USAGES, False),
    )


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def load_ca(
    dir: Path, stem: str = "ca", what: str = "CA"
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    crt_path, key_path = dir / f"{stem}.crt", dir / f"{stem}.key"
    cert = load_certs(crt_path, f"{what} certificate")[0]
    key = load_key(key_path, f"{what} key")
    if cert.public_key() != key.public_key():
        raise UserError(f"{what} key: {key_path} does not belong to {crt_path}")
    return cert, key
