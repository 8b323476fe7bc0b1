"""How the edge names what it learnt while setting a tunnel up: the label of a failed set-up (the
`handshake_failures` metric; a failed HELLO exchange is named by the session itself:
`transport.session_state.hello_failure_reason`) and the cloud certificate it validated (/status)."""

from cryptography import x509

from kins_tunnel.tls_contexts import failure_label
from kins_tunnel.transport.http_proxy import ProxyError

_SETUP_FAILURES = (  # text in the error -> label
    ("shed by the cloud", "shed"),  # transport.tls.Refused: the cloud said when to come back
    ("cannot connect", "connect"),
    ("certificate verify failed", "verify_failed"),
    ("hostname mismatch", "verify_failed"),
    ("unknown ca", "unknown_ca"),
    ("certificate", "tls_error"),
    ("tls handshake", "tls_error"),
)


def failure_reason(exc: BaseException) -> str:
    """A short label for a failed tunnel set-up (the edge's handshake_failures metric)."""
    if isinstance(exc, ProxyError):  # the site proxy refused or garbled its answer
        return "proxy"
    return failure_label(exc, _SETUP_FAILURES, verify_default="verify_failed", default="protocol")


def cert_summary(der: bytes | None) -> dict[str, object]:
    """What the edge shows in /status about the cloud certificate it validated."""
    if der is None:
        return {}
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return {}
    return {
        "cloud_cert_serial": format(cert.serial_number, "x"),
        "cloud_cert_not_after": cert.not_valid_after_utc.isoformat(),
    }
