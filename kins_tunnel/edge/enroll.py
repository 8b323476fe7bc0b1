"""Enrolment and automatic renewal, the edge's side (`enroll` in edge.yaml; `cloud.enroll`).

Theory of operation
-------------------
**Enrolment** (no usable certificate at ``tls.cert``/``tls.key`` yet): the edge dials an address
of ``cloud:`` (through the site proxy if there is one) with TLS offering only `ENROLL_ALPN`, no
client certificate and no trust at all, then, on that one connection:

1. ``GET /v1/ca``: the cloud's CA bundle. Nothing secret has been sent. Among the certificates,
   the one whose SubjectPublicKeyInfo hashes (SHA-256) to ``enroll.ca_hash`` is the CA; none: the
   edge refuses the cloud (``ca_hash_mismatch``), as kubeadm's discovery hash does.
2. The certificate the cloud presented *in this TLS handshake* (bound to the connection by the
   handshake's signature) must chain to that CA and name the host the edge dialled (cryptography's
   X.509 verifier, server profile); otherwise ``cloud_not_verified``. Only now is the token sent.
3. A new ECDSA P-256 key is made here and never leaves the node; ``POST /v1/enroll`` sends the
   token, a certificate request signed with that key, ``enroll.node`` and ``enroll.unit`` (if set).
4. The answer's certificate must carry this key and an edge identity, and chain through the
   issuing CA to the pinned CA. The pinned CA goes to ``tls.ca``, the key to ``tls.key`` (0600),
   the certificate and the issuing CA to ``tls.cert``, each written atomically, the certificate
   last: it is the mark of a finished enrolment. A restart then uses these files, not the token.

A refusal or failure is logged with the cloud's reason, counted in
``kins_tunnel_enrollments_total{result}`` (a fixed label) and retried with the reconnect backoff:
an operator can fix the token or the cloud while the edge waits.

**Renewal**: once ``enroll.renew_at`` (default 2/3) of the certificate's lifetime has passed, the
edge opens a stream to `RENEW_TARGET` on one of its tunnels and POSTs a request for a new key; the
cloud signs it for the identity of the tunnel's certificate. The new files are written as above;
the next tunnel uses them (`certwatch.ReloadingContext`), live tunnels and streams keep theirs.
Failures are retried with backoff, counted in ``kins_tunnel_certificate_renewals_total{result}``
and logged as warnings with the time left; `/status` carries a ``warning`` while a due renewal has
not succeeded.

`enrollment_state` says in one line where an edge config stands (for ``kins-tunnel doctor``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from kins_tunnel.certs.identity import RENEW_TARGET, EdgeIdentity, identity_from_der
from kins_tunnel.certs.issuing import ca_hash, edge_csr
from kins_tunnel.config import EdgeConfig, EnrollSettings
from kins_tunnel.errors import OpenFailed, UserError
from kins_tunnel.jsonhttp import ExchangeError, TLSSocketStream, json_request
from kins_tunnel.metrics import Metrics
from kins_tunnel.names import Address
from kins_tunnel.pemfiles import load_certs, load_key, make_dir, write_atomic
from kins_tunnel.tls_contexts import enroll_client_ssl_context
from kins_tunnel.tokens import TOKEN_RE
from kins_tunnel.transport.session import Session
from kins_tunnel.transport.tls import TransportError, connect_tls

log = logging.getLogger("kins_tunnel.edge.enroll")

OpenStream = Callable[[str, int], Awaitable[trio.SocketStream]]
Delay = Callable[[int], float]  # consecutive failures -> seconds to wait

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
RENEW_OPEN_TIMEOUT = 10.0
RENEW_TIMEOUT = 30.0
MIN_RENEW_SPACING = 1.0  # seconds between two renewals at least


class EnrolError(Exception):
    """Enrolment or renewal failed: `reason` is a fixed label, the message says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Credentials:
    identity: EdgeIdentity
    not_before: dt.datetime
    not_after: dt.datetime


def current_credentials(cfg: EdgeConfig) -> Credentials | None:
    """The edge's certificate and key if they load together and the certificate is valid now;
    None if they are missing, do not match, or have expired (then the edge enrols)."""
    try:
        cert = load_certs(cfg.tls.cert, "tls.cert")[0]
        key = load_key(cfg.tls.key, "tls.key")
    except UserError:
        return None
    if cert.public_key() != key.public_key():
        return None
    try:
        identity = identity_from_der(cert.public_bytes(serialization.Encoding.DER))
    except ValueError:
        return None
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        return None
    return Credentials(identity, cert.not_valid_before_utc, cert.not_valid_after_utc)


def enrollment_state(cfg: EdgeConfig) -> tuple[bool, str]:
    """(ok, one line) on the enrolment of an edge config, e.g. ``(True, "enrolled (cert present,
    expires 2027-01-06T10:00:00+00:00)")``, ``(True, "will enrol with token /etc/...")``,
    ``(False, "token file missing: ...")``."""
    creds = current_credentials(cfg)
    if creds is not None:
        return True, (
            f"enrolled (cert present, unit {creds.identity.unit}, node {creds.identity.node}, "
            f"expires {creds.not_after.isoformat()})"
        )
    if cfg.enroll is None:
        return False, f"no usable certificate at tls.cert {cfg.tls.cert} and no enroll section"
    path = cfg.enroll.token_file
    try:
        token = path.read_text().strip()
    except OSError as exc:
        return False, f"token file missing: enroll.token_file {path}: {exc.strerror or exc}"
    if TOKEN_RE.fullmatch(token) is None:
        return False, f"enroll.token_file {path} does not hold a token (<id>.<secret>)"
    return True, f"will enrol with token {token.split('.')[0]} from {path} (ca_hash pinned)"


# --- checks on what the cloud sends ---------------------------------------------------------------


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
        got = ca_hash(cert)
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
    except (VerificationError, ValueError) as exc:
        raise EnrolError(
            "cloud_not_verified",
            f"the cloud's certificate does not verify with the pinned CA for {host!r}: "
            f"{str(exc)[:MAX_SHOWN]}",
        ) from None


def _issued(
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
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise EnrolError("bad_answer", f"the issued certificate does not check: {exc}") from None
    return cert, [c for c in chain if c != ca]


def _write(
    settings_cert: Path,
    settings_key: Path,
    settings_ca: Path | None,
    key: ec.EllipticCurvePrivateKey,
    cert: x509.Certificate,
    chain: list[x509.Certificate],
    ca: x509.Certificate | None,
) -> None:
    """CA, key, then certificate + chain: each atomically, the certificate last."""
    pem = serialization.Encoding.PEM
    for path in (settings_cert, settings_key, *((settings_ca,) if settings_ca else ())):
        make_dir(path.parent)
    if settings_ca is not None and ca is not None:
        write_atomic(settings_ca, ca.public_bytes(pem), 0o644)
    write_atomic(
        settings_key,
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        0o600,
    )
    write_atomic(settings_cert, b"".join(c.public_bytes(pem) for c in [cert, *chain]), 0o644)


async def _store(*args: Any) -> None:
    """`_write` in a worker thread; a file that cannot be written is an `EnrolError`."""
    try:
        await trio.to_thread.run_sync(_write, *args)
    except UserError as exc:
        raise EnrolError("files", f"cannot store the certificate: {exc}") from None


def _refusal(status: int, doc: dict[str, Any]) -> EnrolError:
    reason = doc.get("reason")
    label = reason if isinstance(reason, str) and reason in CLOUD_REASONS else "refused"
    error = doc.get("error")
    shown = error if isinstance(error, str) else f"HTTP {status}"
    shown = shown if shown.isascii() and shown.isprintable() else ascii(shown)[1:-1]
    return EnrolError(label, f"the cloud refused (HTTP {status}): {shown[:MAX_SHOWN]}")


def _read_token(settings: EnrollSettings) -> str:
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


# --- the edge's enrolment and renewal -------------------------------------------------------------


class Enrolment:
    """Enrols an edge (`enrol_until_done`) and keeps its certificate renewed (`renew_forever`)."""

    def __init__(self, cfg: EdgeConfig, metrics: Metrics) -> None:
        assert cfg.enroll is not None
        self.cfg = cfg
        self.settings = cfg.enroll
        self.metrics = metrics
        self.state = "enrolled" if current_credentials(cfg) is not None else "enrolling"
        self.last_error: str | None = None
        self.renewals = 0
        self.renew_failures = 0
        self._creds: Credentials | None = None

    async def _attempt(self, attempt: Awaitable[Credentials], where: str) -> Credentials:
        """A failure-isolation boundary around one attempt: a bug in it is reported and counted
        (``internal``) and the attempt retried like any failure; the edge goes on."""
        try:
            return await attempt
        except EnrolError:
            raise
        except Exception as exc:
            self.metrics.report_internal_error(where, exc)
            raise EnrolError("internal", f"internal error: {type(exc).__name__}") from None

    # ------------------------------------------------------------------ enrolment
    async def enrol_until_done(self, open_stream: OpenStream | None, delay: Delay) -> None:
        """Enrol, retrying every failure after `delay(failures)`, until the files are written."""
        failures = 0
        while True:
            try:
                creds = await self._attempt(self.enrol_once(open_stream), "edge_enrolment")
            except EnrolError as exc:
                self.metrics.enrollments.labels(exc.reason).inc()
                self.last_error = f"{exc.reason}: {exc}"
                wait = delay(failures)
                failures += 1
                log.warning(
                    "enrolment failed",
                    extra={"reason": exc.reason, "detail": str(exc), "retry_in": round(wait, 2)},
                )
                await trio.sleep(wait)
                continue
            self.metrics.enrollments.labels("ok").inc()
            self.state, self.last_error = "enrolled", None
            log.info(
                "enrolled with a token: certificate stored",
                extra={
                    "unit": creds.identity.unit,
                    "node": creds.identity.node,
                    "not_after": creds.not_after.isoformat(),
                    "cert": str(self.cfg.tls.cert),
                },
            )
            return

    async def enrol_once(self, open_stream: OpenStream | None) -> Credentials:
        """One enrolment over the first address of ``cloud:`` that answers; `EnrolError`."""
        token = _read_token(self.settings)
        last: EnrolError | None = None
        for entry in self.cfg.cloud:
            addr = Address.parse(entry, min_port=1)
            try:
                with trio.fail_after(self.cfg.handshake_timeout * 2):
                    return await self._enrol_at(addr.host, addr.port, token, open_stream)
            except (TransportError, OSError, trio.TooSlowError) as exc:
                last = EnrolError("connect", f"{entry}: {exc or 'no answer in time'}")
            except ExchangeError as exc:
                last = EnrolError("connect", f"{entry}: {exc}")
            except EnrolError as exc:
                if exc.reason in ("connect", "bad_answer"):
                    last = exc
                    continue
                raise
        assert last is not None
        raise last

    async def _enrol_at(
        self, host: str, port: int, token: str, open_stream: OpenStream | None
    ) -> Credentials:
        tls = await connect_tls(
            host,
            port,
            enroll_client_ssl_context(),
            server_hostname=host.strip("[]"),
            open_stream=open_stream,
        )
        stream = TLSSocketStream(tls)
        try:
            conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=16384)
            status, doc = await json_request(stream, conn, "GET", "/v1/ca", None, host=host)
            if status != 200:
                raise _refusal(status, doc)
            ca = pinned_ca(doc.get("ca"), self.settings.ca_hash)
            verify_cloud(tls.peer_certificate_der(), ca, host.strip("[]"))
            key = ec.generate_private_key(ec.SECP256R1())
            body = {
                "token": token,
                "csr": edge_csr(key, self.settings.node).decode(),
                "node": self.settings.node,
                "unit": self.settings.unit,
            }
            status, doc = await json_request(stream, conn, "POST", "/v1/enroll", body, host=host)
            if status != 200:
                raise _refusal(status, doc)
            cert, chain = _issued(doc, key, ca)
            identity = identity_from_der(cert.public_bytes(serialization.Encoding.DER))
            if self.settings.node and identity.node != self.settings.node:
                raise EnrolError("bad_answer", f"the cloud issued node {identity.node!r}")
            await _store(self.cfg.tls.cert, self.cfg.tls.key, self.cfg.tls.ca, key, cert, chain, ca)
            return Credentials(identity, cert.not_valid_before_utc, cert.not_valid_after_utc)
        finally:
            await stream.aclose()

    # ------------------------------------------------------------------ renewal
    def _load(self) -> Credentials | None:
        self._creds = current_credentials(self.cfg)
        return self._creds

    def renew_at(self, creds: Credentials) -> dt.datetime:
        return creds.not_before + (creds.not_after - creds.not_before) * self.settings.renew_at

    async def renew_forever(
        self,
        sessions: Callable[[], list[Session]],
        delay: Delay,
        open_stream: OpenStream | None = None,
    ) -> None:
        """Renew the certificate whenever `renew_at` of its lifetime has passed, forever; enrol
        again (`enrol_until_done`) if it expired all the same."""
        failures = 0
        while True:
            creds = await trio.to_thread.run_sync(self._load)
            if creds is None:  # expired unrenewed (or the files went bad): enrol again
                self.state = "enrolling"
                log.warning(
                    "no valid certificate at tls.cert/tls.key (expired?): enrolling again with "
                    "enroll.token_file",
                    extra={"cert": str(self.cfg.tls.cert), "last_error": self.last_error or ""},
                )
                await self.enrol_until_done(open_stream, delay)
                continue
            wait = (self.renew_at(creds) - dt.datetime.now(dt.UTC)).total_seconds()
            if wait > 0:
                self.state = "enrolled"
                await trio.sleep(min(wait, 60.0))  # wake up now and then: the wall clock may jump
                continue
            self.state = "renewing"
            try:
                new = await self._attempt(self.renew_once(sessions()), "edge_renewal")
            except EnrolError as exc:
                self.metrics.renewals.labels(exc.reason).inc()
                self.renew_failures += 1
                self.last_error = f"{exc.reason}: {exc}"
                retry = delay(failures)
                failures += 1
                log.warning(
                    "certificate renewal failed",
                    extra={
                        "reason": exc.reason,
                        "detail": str(exc),
                        "expires_in": round(self._expires_in(creds), 1),
                        "retry_in": round(retry, 2),
                    },
                )
                await trio.sleep(retry)
                continue
            failures = 0
            self.renewals += 1
            self.last_error = None
            self.metrics.renewals.labels("ok").inc()
            log.info(
                "certificate renewed: the next tunnel uses it",
                extra={
                    "unit": new.identity.unit,
                    "node": new.identity.node,
                    "not_after": new.not_after.isoformat(),
                },
            )
            await trio.sleep(MIN_RENEW_SPACING)  # however the lifetimes fall, never a busy loop

    @staticmethod
    def _expires_in(creds: Credentials) -> float:
        return (creds.not_after - dt.datetime.now(dt.UTC)).total_seconds()

    async def renew_once(self, sessions: list[Session]) -> Credentials:
        """One renewal over the first usable tunnel; `EnrolError`."""
        usable = [s for s in sessions if s.usable]
        if not usable:
            raise EnrolError("no_tunnel", "no tunnel to the cloud to renew over")
        try:
            ca_file = load_certs(self.cfg.tls.ca, "tls.ca")
        except UserError as exc:
            raise EnrolError("files", str(exc)) from None
        key = ec.generate_private_key(ec.SECP256R1())
        assert self._creds is not None
        try:
            stream = await usable[0].open_stream(RENEW_TARGET, RENEW_OPEN_TIMEOUT)
        except OpenFailed as exc:
            raise EnrolError(
                "not_offered", f"the cloud does not renew over this tunnel: {exc.message}"
            ) from None
        try:
            with trio.fail_after(RENEW_TIMEOUT):
                conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=16384)
                body = {"csr": edge_csr(key, self._creds.identity.node).decode()}
                status, doc = await json_request(
                    stream, conn, "POST", "/v1/renew", body, host="kins-tunnel"
                )
        except trio.TooSlowError:
            raise EnrolError("timeout", "the cloud did not answer the renewal in time") from None
        except ExchangeError as exc:
            raise EnrolError("connect", str(exc)) from None
        finally:
            await trio.aclose_forcefully(stream)
        if status != 200:
            raise _refusal(status, doc)
        last: EnrolError | None = None
        for ca in ca_file:
            try:
                cert, chain = _issued(doc, key, ca)
                break
            except EnrolError as exc:
                last = exc
        else:
            raise last or EnrolError("bad_answer", "tls.ca holds no CA")
        identity = identity_from_der(cert.public_bytes(serialization.Encoding.DER))
        if identity != self._creds.identity:
            raise EnrolError("bad_answer", "the renewed certificate names another identity")
        await _store(self.cfg.tls.cert, self.cfg.tls.key, None, key, cert, chain, None)
        return Credentials(identity, cert.not_valid_before_utc, cert.not_valid_after_utc)

    def status(self) -> dict[str, object]:
        """What the edge's ``/status`` shows under ``certificate``."""
        doc: dict[str, object] = {"enrollment": self.state, "renewals": self.renewals}
        creds = self._creds or current_credentials(self.cfg)
        if creds is not None:
            renew_at = self.renew_at(creds)
            doc |= {
                "not_after": creds.not_after.isoformat(),
                "expires_in_seconds": round(self._expires_in(creds), 1),
                "renew_at": renew_at.isoformat(),
            }
            if dt.datetime.now(dt.UTC) >= renew_at and self.last_error is not None:
                doc["warning"] = (
                    f"certificate expires in {max(self._expires_in(creds), 0):.0f}s and renewal "
                    f"has not succeeded: {self.last_error}"
                )
        if self.last_error is not None:
            doc["last_error"] = self.last_error
        return doc
