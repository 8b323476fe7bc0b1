"""The issuing CA: enrolment and renewal of edge certificates by the cloud.

An intermediate under ca.crt (path length 0, clientAuth only, name-constrained to
``spiffe://kins-tunnel`` URIs) with which the cloud signs edge certificates (`sign_edge_csr`), so
ca.key never has to leave the operator. The edge side: a certificate request (`edge_csr`) and the
CA hash it pins (`ca_hash`, as kubeadm's discovery hash). Requests are untrusted input
(`csr_public_key`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kins_tunnel.certs.identity import EdgeIdentity
from kins_tunnel.certs.signing import (
    CLIENT_AUTH,
    cert_builder,
    edge_subject,
    key_usage,
    named,
    sign_leaf,
    utcnow,
)
from kins_tunnel.errors import UserError
from kins_tunnel.pemfiles import load_certs, load_key, write_cert, write_key

ISSUING_CA_COMMON_NAME = "kins-tunnel issuing CA"
_IDENTITY_HOST = "kins-tunnel"  # the host part of every identity URI: the issuing CA's only name


def new_issuing_ca(
    dir: Path,
    root_cert: x509.Certificate,
    root_key: ec.EllipticCurvePrivateKey,
    now: dt.datetime,
    days: int,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Create and write DIR/issuing.{crt,key}: an intermediate CA signed by the root.

    Path length 0 (it signs leaves only), extended key usage clientAuth only (so nothing it signs
    verifies as a server: not as the cloud to an edge), and critical NameConstraints permitting
    only URIs on the host ``kins-tunnel``, i.e. edge identities ``spiffe://kins-tunnel/...``.
    The root must allow an intermediate (path length 1 or more): `UserError` otherwise.
    """
    bc = root_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    if bc.path_length is not None and bc.path_length < 1:
        raise UserError(
            f"{dir / 'ca.crt'} was made with path length 0, so it cannot sign an issuing CA: "
            "create a new CA for enrolment (certs init --issuing-ca with a new --dir) and give "
            "edges its ca.crt, or keep issuing edge certificates with certs edge"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    name = named(ISSUING_CA_COMMON_NAME)
    root_ski = root_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    not_after = min(now + dt.timedelta(days=days), root_cert.not_valid_after_utc)
    constraints = x509.NameConstraints(
        permitted_subtrees=[x509.UniformResourceIdentifier(_IDENTITY_HOST)],
        excluded_subtrees=None,
    )
    cert = (
        cert_builder(name, root_cert.subject, key.public_key(), now, days, not_after=not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(cert_sign=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([CLIENT_AUTH]), critical=False)
        .add_extension(constraints, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski),
            critical=False,
        )
        .sign(root_key, hashes.SHA256())
    )
    write_key(dir / "issuing.key", key)
    write_cert(dir / "issuing.crt", cert)
    return cert, key


def check_issuing_ca(dir: Path) -> None:
    root = load_certs(dir / "ca.crt", "CA certificate")[0]
    issuing = load_issuing_ca(dir / "issuing.crt", dir / "issuing.key", "issuing CA")
    if issuing.cert.issuer != root.subject:
        raise UserError(f"issuing CA: {dir / 'issuing.crt'} is not signed by {dir / 'ca.crt'}")


@dataclass(frozen=True, slots=True)
class IssuingCA:
    """The CA the cloud signs edge certificates with (`enrollment.ca`)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def key_id(self) -> bytes:
        """The subject key identifier: the authority key identifier of what it signs."""
        try:
            return self.cert.extensions.get_extension_for_class(
                x509.SubjectKeyIdentifier
            ).value.digest
        except x509.ExtensionNotFound:
            return x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()).digest

    @property
    def chain_pem(self) -> bytes:
        """The issuing CA's certificate (PEM): sent after an edge's certificate."""
        return self.cert.public_bytes(serialization.Encoding.PEM)


def load_issuing_ca(cert: Path, key: Path, what: str = "enrollment.ca") -> IssuingCA:
    """Load the issuing CA; `UserError` naming `what` if a file is missing, unreadable, not a CA,
    or the key does not belong to the certificate."""
    crt = load_certs(cert, f"{what}.cert")[0]
    private = load_key(key, f"{what}.key")
    if crt.public_key() != private.public_key():
        raise UserError(f"{what}.key: {key} does not belong to {what}.cert {cert}")
    try:
        bc = crt.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise UserError(f"{what}.cert: {cert} is not a CA certificate")
    return IssuingCA(crt, private)


def ca_hash(cert: x509.Certificate) -> str:
    """``sha256:<hex>`` of a CA's SubjectPublicKeyInfo (DER), as kubeadm's discovery hash."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(spki).hexdigest()


def ca_hash_of_file(path: Path) -> str:
    """`ca_hash` of the first certificate of PEM file `path` (`UserError` if unreadable)."""
    return ca_hash(load_certs(Path(path), "CA certificate")[0])


def edge_csr(key: ec.EllipticCurvePrivateKey, node: str | None) -> bytes:
    """A PEM certificate request for `node` (subject CN; None: an empty subject, the token names
    the node), signed with `key` (proof of possession). The cloud decides the identity: the
    request only says which node it asks for."""
    names = [] if node is None else [x509.NameAttribute(NameOID.COMMON_NAME, node)]
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(names))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


MAX_CSR_BYTES = 8192


def csr_public_key(pem: bytes, node: str | None) -> ec.EllipticCurvePublicKey:
    """The public key of a PEM certificate request, after checking it: it parses, its signature
    verifies (the requester holds the key), its key is ECDSA P-256, and its subject CN, if any,
    is `node`. `ValueError` with a one-line reason otherwise (the request is untrusted input)."""
    if len(pem) > MAX_CSR_BYTES:
        raise ValueError(f"certificate request larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError:
        raise ValueError("not a PEM certificate request") from None
    try:
        if not csr.is_signature_valid:
            raise ValueError("the certificate request's signature does not verify")
        key = csr.public_key()
    except UnsupportedAlgorithm:  # a key type, curve or signature algorithm unknown here
        raise ValueError("the certificate request's key must be ECDSA P-256") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("the certificate request's key must be ECDSA P-256")
    names = [str(a.value) for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if node is not None and names and names != [node]:
        raise ValueError(f"the certificate request names node {names[0]!r}, not {node!r}")
    return key


def sign_edge_csr(
    ca: IssuingCA,
    public_key: ec.EllipticCurvePublicKey,
    identity: EdgeIdentity,
    lifetime: dt.timedelta,
    *,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """An edge certificate for `identity` and `public_key` (from `csr_public_key`), signed by the
    issuing CA, valid for `lifetime` (never beyond the CA itself). The caller has checked the
    identity (`check_edge_names`, the token, tenancy, revocation)."""
    return sign_leaf(
        ca.cert,
        ca.key,
        public_key,
        now=now or utcnow(),
        lifetime=lifetime,
        subject=edge_subject(identity),
        sans=[x509.UniformResourceIdentifier(identity.uri)],
        usages=[CLIENT_AUTH],
    )
