"""TLS contexts for the tunnel (cloud server, edge client) and the proxy's TLS listener.

TLS 1.2 or later, forward-secret AEAD suites only (ECDSA first: every key we issue is ECDSA),
no compression, strict X.509 checks; the tunnel's contexts require mutual authentication and
announce the `ALPN_PROTOCOL`. Every problem with the files is a one-line `UserError` naming the
setting (``tls.ca``, ``tls.cert``, ``tls.key``, ``proxy.tls.*``). `failure_label` turns a failed
handshake into a bounded metric label.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path

import trio
from cryptography.hazmat.primitives import serialization

from kins_tunnel.certs.identity import ALPN_PROTOCOL, ENROLL_ALPN
from kins_tunnel.errors import UserError
from kins_tunnel.pemfiles import load_certs, load_key
from kins_tunnel.tls_tickets import TicketKeys, enable_tickets

# TLS 1.2 suites, forward secret and AEAD only; ECDSA first because every key we issue is ECDSA.
# TLS 1.3 suites are configured separately by OpenSSL and its defaults are already AEAD-only.
CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)


def server_ssl_context(
    ca: Path,
    cert: Path,
    key: Path,
    *,
    enroll: bool = False,
    session_lifetime: float = 0.0,
    ticket_keys: TicketKeys | None = None,
) -> ssl.SSLContext:
    """The cloud's context for the edge listener: mutual TLS 1.2+, trusting only `ca`.

    With `enroll` (the cloud has an ``enrollment`` section), the context also offers
    `ENROLL_ALPN` and lets a client come without a certificate (a certificate it does present must
    still verify): the tunnel server then refuses every such connection except an enrolment
    (`cloud.tunnel_server`). With `session_lifetime` > 0, one TLS 1.3 session ticket per handshake
    lets a returning edge resume (`tls_tickets`), its key from `ticket_keys` (None: a random one
    for this context only); 0: no tickets. Raises `UserError` naming the file (``tls.ca``,
    ``tls.cert``, ``tls.key`` or ``tunnel.session_ticket_key_file``) that is missing, unreadable,
    not PEM, or does not match.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = ssl.CERT_OPTIONAL if enroll else ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_ECDH_USE
    ctx.num_tickets = 0
    _configure(ctx, ca, cert, key)
    if session_lifetime > 0:
        keys = TicketKeys(None) if ticket_keys is None else ticket_keys
        enable_tickets(ctx, Path(ca), keys, session_lifetime)
    if enroll:
        ctx.set_alpn_protocols([ALPN_PROTOCOL, ENROLL_ALPN])
    return ctx


def enroll_client_ssl_context() -> ssl.SSLContext:
    """The edge's context for enrolment: TLS 1.2+ offering only `ENROLL_ALPN`, no certificate,
    and no verification by OpenSSL: the edge verifies the cloud's certificate itself against the
    CA it pinned (`edge.enroll`), before it sends anything secret."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.set_ciphers(CIPHERS)
    ctx.set_alpn_protocols([ENROLL_ALPN])
    return ctx


def proxy_server_ssl_context(client_ca: Path | None, cert: Path, key: Path) -> ssl.SSLContext:
    """The context of the CONNECT proxy's TLS listener (`proxy.tls`).

    TLS 1.2+ with the same suites as the tunnel, no ALPN (clients speak HTTP/1.1 CONNECT). With
    `client_ca`, a client certificate signed by it is required. Raises `UserError` naming
    ``proxy.tls.cert``, ``proxy.tls.key`` or ``proxy.tls.client_ca``.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_ECDH_USE
    ctx.set_ciphers(CIPHERS)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        _load_trust(ctx, Path(client_ca), "proxy.tls.client_ca")
    _load_identity(ctx, Path(cert), Path(key), "proxy.tls")
    return ctx


def client_ssl_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """The edge's context for dialling the cloud: present `cert`, verify the cloud against `ca`.

    Hostname checking is on: pass ``server_hostname`` (the host from ``cloud:``) when wrapping.
    Raises `UserError` like `server_ssl_context`.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    _configure(ctx, ca, cert, key)
    return ctx


def _configure(ctx: ssl.SSLContext, ca: Path, cert: Path, key: Path) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.set_ciphers(CIPHERS)
    ctx.set_alpn_protocols([ALPN_PROTOCOL])
    _load_trust(ctx, Path(ca), "tls.ca")
    _load_identity(ctx, Path(cert), Path(key), "tls")


def _load_trust(ctx: ssl.SSLContext, ca: Path, what: str) -> None:
    """Trust the certificates of PEM file `ca` (UserError naming `what` otherwise)."""
    pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in load_certs(ca, what))
    try:
        ctx.load_verify_locations(cadata=pem)
    except ssl.SSLError as exc:
        raise UserError(f"{what}: {ca}: rejected by OpenSSL: {exc.reason or exc}") from None


def _load_identity(ctx: ssl.SSLContext, cert: Path, key: Path, section: str) -> None:
    """Present `cert` with `key`; UserError naming `<section>.cert` / `<section>.key` otherwise."""
    leaf = load_certs(cert, f"{section}.cert")[0]
    private = load_key(key, f"{section}.key")
    if leaf.public_key() != private.public_key():
        raise UserError(f"{section}.key: {key} does not belong to {section}.cert {cert}")
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise UserError(f"{section}.cert: {cert}: rejected by OpenSSL: {exc}") from None


# OpenSSL X509_V_ERR_* codes worth their own label in the failure metrics
VERIFY_LABELS = {
    9: "not_yet_valid",
    10: "expired",
    2: "unknown_ca",
    18: "unknown_ca",
    19: "unknown_ca",
    20: "unknown_ca",
    21: "unknown_ca",
}


def failure_label(
    exc: BaseException,
    table: Sequence[tuple[str, str]],
    *,
    verify_default: str,
    default: str,
    text_of: BaseException | None = None,
) -> str:
    """A short, bounded label for a failed TLS set-up (a metric label, never the error's text):
    "timeout" for a missed deadline; for a certificate the peer's chain failed verification, the
    label of its OpenSSL code (`VERIFY_LABELS`, else `verify_default`); otherwise the label of the
    first key of `table` found in the text of `text_of` (default: `exc`), else `default`."""
    if isinstance(exc, trio.TooSlowError):
        return "timeout"
    cause = exc.__cause__ or exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        return VERIFY_LABELS.get(cause.verify_code, verify_default)
    text = str(exc if text_of is None else text_of).lower().replace("_", " ")  # OpenSSL: A_B_C
    return next((label for key, label in table if key in text), default)
