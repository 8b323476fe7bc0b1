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

The checks of what the cloud sends are in `enroll_checks`, the credential files in `credentials`
(with `enrollment_state`, where an edge config stands in one line, for ``kins-tunnel doctor``).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kins_tunnel.certs.identity import RENEW_TARGET, identity_from_der
from kins_tunnel.certs.issuing import edge_csr
from kins_tunnel.config import EdgeConfig
from kins_tunnel.edge.credentials import (
    Credentials,
    current_credentials,
    finish_interrupted_write,
    write_credentials,
)
from kins_tunnel.edge.enroll_checks import (
    EnrolError,
    issued_certificate,
    pinned_ca,
    read_token,
    refusal,
    verify_cloud,
)
from kins_tunnel.errors import OpenFailed, UserError
from kins_tunnel.jsonhttp import ExchangeError, TLSSocketStream, json_request
from kins_tunnel.metrics import Metrics
from kins_tunnel.names import Address
from kins_tunnel.pemfiles import load_certs
from kins_tunnel.tls_contexts import enroll_client_ssl_context
from kins_tunnel.transport.session import Session
from kins_tunnel.transport.tls import TransportError
from kins_tunnel.transport.tls_dial import connect_tls

log = logging.getLogger("kins_tunnel.edge.enroll")


OpenStream = Callable[[str, int], Awaitable[trio.SocketStream]]
Delay = Callable[[int], float]  # consecutive failures -> seconds to wait

RENEW_OPEN_TIMEOUT = 10.0
RENEW_TIMEOUT = 30.0
MIN_RENEW_SPACING = 1.0  # seconds between two renewals at least


async def _store(*args: Any) -> None:
    """`write_credentials` in a worker thread; a file that cannot be written is an `EnrolError`."""
    try:
        await trio.to_thread.run_sync(write_credentials, *args)
    except UserError as exc:
        raise EnrolError("files", f"cannot store the certificate: {exc}") from None


# --- the edge's enrolment and renewal -------------------------------------------------------------


class Enrolment:
    """Enrols an edge (`enrol_until_done`) and keeps its certificate renewed (`renew_forever`)."""

    def __init__(self, cfg: EdgeConfig, metrics: Metrics) -> None:
        assert cfg.enroll is not None
        self.cfg = cfg
        self.settings = cfg.enroll
        self.metrics = metrics
        try:
            finish_interrupted_write(cfg.tls.cert, cfg.tls.key)
        except (UserError, OSError) as exc:  # the files in use are still read as they are
            log.warning("cannot finish an interrupted certificate write: %s", exc)
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
        token = read_token(self.settings)
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
                raise refusal(status, doc)
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
                raise refusal(status, doc)
            cert, chain = issued_certificate(doc, key, ca)
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
            raise refusal(status, doc)
        last: EnrolError | None = None
        for ca in ca_file:
            try:
                cert, chain = issued_certificate(doc, key, ca)
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
