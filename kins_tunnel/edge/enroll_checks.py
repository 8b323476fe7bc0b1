"""What the edge checks of the cloud's enrolment and renewal answers, and `EnrolError`.

Everything the cloud sends is untrusted until checked here: the CA bundle must hold the CA the edge
pinned (`pinned_ca`, by ``enroll.ca_hash``), the cloud's own TLS certificate must chain to it and
name the dialled host (`verify_cloud`), an issued certificate must carry the edge's key and an edge
identity and chain to that CA (`issued_certificate`), and a refusal's reason becomes a fixed label
(`refusal`). See `edge.enroll` for the exchange itself.
"""

import ipaddress
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from kins_tunnel.certs.identity import identity_from_der
from kins_tunnel.certs.issuing import ca_hash
from kins_tunnel.config_enroll import EnrollSettings
from kins_tunnel.tokens import TOKEN_RE

# reasons the cloud gives that the edge counts under their own label; anything else: "refused"
CLOUD_REASONS = frozenset(
    {
        "bad_request",
        "bad_token",
        "unknown_token",
        "expired_token",
        "used_token",
        "wrong_unit",
        "identity_not_allowed",
        "no_node",
        "bad_node",
        "reserved_name",
        "bad_csr",
        "revoked",
        "node_taken",
        "rate_limited",
        "no_issuing_ca",
        "tokens_file",
    }
)
MAX_SHOWN = 300  # characters of the cloud's message kept for the log


class EnrolError(Exception):
    """Enrolment or renewal failed: `reason` is a fixed label, the message says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def pinned_ca(bundle: object, want: str) -> x509.Certificate:
    """The certificate of PEM `bundle` whose public-key hash is `want`; `EnrolError` otherwise."""
    if not isinstance(bundle, str):
        raise EnrolError("bad_answer", "the cloud's CA answer has no PEM bundle")
    try:
        certs = x509.load_pem_x509_certificates(bundle.encode())
    except ValueError:
        raise EnrolError("bad_answer", "the cloud's CA bundle is not PEM") from None
    seen = []
    for cert in certs:
        try:
            got = ca_hash(cert)
        except (ValueError, UnsupportedAlgorithm):  # a key this library cannot read: not ours
            continue
        if got == want:
            return cert
        seen.append(got)
    raise EnrolError(
        "ca_hash_mismatch",
        f"no CA the cloud sent matches enroll.ca_hash {want} (it sent {', '.join(seen[:3])}): "
        "refusing this cloud (a wrong hash, or not the cloud you meant)",
    )


def verify_cloud(der: bytes | None, ca: x509.Certificate, host: str) -> None:
    """The cloud's TLS certificate chains to `ca` and names `host`; `EnrolError` otherwise."""
    if der is None:
        raise EnrolError("cloud_not_verified", "the cloud presented no certificate")
    try:
        leaf = x509.load_der_x509_certificate(der)
        subject: x509.DNSName | x509.IPAddress
        try:
            subject = x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
        except ValueError:
            subject = x509.DNSName(host)
        verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(subject)
        verifier.verify(leaf, [])
    except (VerificationError, ValueError, UnsupportedAlgorithm) as exc:
        raise EnrolError(
            "cloud_not_verified",
            f"the cloud's certificate does not verify with the pinned CA for {host!r}: "
            f"{str(exc)[:MAX_SHOWN]}",
        ) from None


def issued_certificate(
    doc: dict[str, Any], key: ec.EllipticCurvePrivateKey, ca: x509.Certificate
) -> tuple[x509.Certificate, list[x509.Certificate]]:
    """The certificate and chain of an answer, checked: our key, an edge identity, and a chain
    that leads to `ca`. `EnrolError("bad_answer")` otherwise."""
    cert_pem, chain_pem = doc.get("cert"), doc.get("chain")
    if not isinstance(cert_pem, str) or not isinstance(chain_pem, str):
        raise EnrolError("bad_answer", "the cloud's answer has no certificate")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        chain = x509.load_pem_x509_certificates(chain_pem.encode())
        identity_from_der(cert.public_bytes(serialization.Encoding.DER))
        if cert.public_key() != key.public_key():
            raise ValueError("the certificate is not for the key this edge made")
        issuer = cert
        for parent in [*chain, ca]:
            issuer.verify_directly_issued_by(parent)
            issuer = parent
            if parent == ca:
                break
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
        raise EnrolError("bad_answer", f"the issued certificate does not check: {exc}") from None
    return cert, [c for c in chain if c != ca]


def refusal(status: int, doc: dict[str, Any]) -> EnrolError:
    reason = doc.get("reason")
    label = reason if isinstance(reason, str) and reason in CLOUD_REASONS else "refused"
    error = doc.get("error")
    shown = error if isinstance(error, str) else f"HTTP {status}"
    shown = shown if shown.isascii() and shown.isprintable() else ascii(shown)[1:-1]
    return EnrolError(label, f"the cloud refused (HTTP {status}): {shown[:MAX_SHOWN]}")


def read_token(settings: EnrollSettings) -> str:
    try:
        token = settings.token_file.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise EnrolError(
            "token_file", f"cannot read enroll.token_file {settings.token_file}: {exc}"
        ) from None
    if TOKEN_RE.fullmatch(token) is None:
        raise EnrolError(
            "token_file",
            f"enroll.token_file {settings.token_file} does not hold a token (<id>.<secret>, "
            "as kins-tunnel token create prints)",
        )
    return token
