"""Enrolment and renewal of edge certificates, the cloud's side (`enrollment` in cloud.yaml).

Theory of operation
-------------------
**Enrolment** happens on the tunnel port, behind the same admission control as tunnels: a TLS
connection that negotiates ALPN `ENROLL_ALPN` may come without a client certificate (the listener
asks for one but does not insist, and still verifies one that is sent), and is then handed here
instead of to a tunnel session; every other connection without a verified certificate is refused
as before (`cloud.tunnel_server`). On it the edge speaks HTTP/1.1 (h11, JSON bodies), at most
`MAX_REQUESTS` requests within the tunnel port's `handshake_timeout` from accept:

- ``GET /v1/ca``: the CA bundle of ``tls.ca`` (public). The edge checks it against the hash it
  pinned and verifies the certificate this very TLS connection presented before it sends its
  token on the same connection (`edge.enroll`).
- ``POST /v1/enroll`` ``{"token", "csr", "node"?, "unit"?}``: the token is checked against the
  tokens file (`tokens.TokenStore`); the unit comes from the token only, the node from the token's
  binding or else from the request; the names must be legal and not reserved, the identity not
  revoked, the node not held by an edge of another unit on this replica; the request must be
  signed by its ECDSA P-256 key. Then one use of the token is taken and the issuing CA signs a
  certificate for ``spiffe://kins-tunnel/unit/<unit>/node/<node>``, valid
  ``enrollment.lifetime_days``. The answer carries the certificate and the issuing CA (the chain
  the edge presents).

**Renewal** runs over an established tunnel: the edge opens a stream to the reserved target
`certs.RENEW_TARGET` (handled here before the uplinks map is consulted) and POSTs a new CSR to
``/v1/renew``. The identity is that of the tunnel's verified certificate, never anything in the
request; a revoked identity or serial is refused. An identity may renew at most
``enrollment.max_renewals_per_hour`` times an hour (its own `RateLimit` bucket): an edge renews
once in a certificate's lifetime, so more is a loop or a stolen key, and each renewal costs a
signature; beyond it the edge gets 429 with the seconds to wait.

Every refusal answers a JSON ``{"error": <sentence>, "reason": <label>}`` with a fitting status,
is counted in ``kins_tunnel_enrollments_total{result}`` / ``kins_tunnel_certificate_renewals_total
{result}`` (fixed labels) and logged (budgeted per source address) without the token's secret.
A malformed request (not HTTP, not JSON, an unknown path) is answered 400/404 and counted as
``bad_request``. Failed tokens are limited per source address (a `RateLimit`): beyond
``enrollment.max_failures_per_source`` a minute, the address gets 429 without a token check.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import Counter

from kins_tunnel.certs.identity import EdgeIdentity, cert_facts, check_edge_names
from kins_tunnel.certs.issuing import IssuingCA, csr_public_key, load_issuing_ca, sign_edge_csr
from kins_tunnel.cloud.registry import Registry
from kins_tunnel.config_enroll import EnrollmentSettings
from kins_tunnel.errors import UserError
from kins_tunnel.jsonhttp import TLSSocketStream, serve_json
from kins_tunnel.logs import SourceBudget
from kins_tunnel.metrics import Metrics
from kins_tunnel.names import source_key
from kins_tunnel.pemfiles import load_certs, read_file
from kins_tunnel.proto import LocalProtocolError
from kins_tunnel.tokens import TOKEN_RE, TokenRefused, TokenStore
from kins_tunnel.transport.session import Session
from kins_tunnel.transport.tls import TLSSocket

log = logging.getLogger("kins_tunnel.cloud.enroll")

MAX_REQUESTS = 3  # on one enrolment connection: the CA bundle, then the enrolment (and a spare)
MAX_EXCHANGES = 64  # enrolment connections answered at once; more are closed at once
MAX_EXCHANGES_PER_SOURCE = 8  # of those, from one client address: no source holds them all
RENEW_TIMEOUT = 30.0  # seconds for a whole renewal exchange on its stream
SERVER = "kins-tunnel-cloud"

Revoked = Callable[[EdgeIdentity, int], str | None]  # (identity, serial or -1) -> why, or None


class Refused(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


_TOKEN_STATUS = {"bad_token": 400, "unknown_token": 403, "expired_token": 403, "used_token": 403}


class RateLimit:
    """Events per key (a source address, an identity): a bucket of `count` events, refilled evenly
    over `period` seconds; at most `max_keys` keys are remembered (the least recently seen
    forgotten, which only ever gives a forgotten key a full bucket)."""

    def __init__(
        self,
        count: int,
        period: float = 60.0,
        max_keys: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.count = count
        self.period = period
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def _level(self, key: str) -> float:
        level, at = self._buckets.get(key, (float(self.count), self._clock()))
        now = self._clock()
        return min(float(self.count), level + (now - at) * self.count / self.period)

    def retry_after(self, key: str) -> float | None:
        """Seconds until `key` may have another event, or None if it may now."""
        level = self._level(key)
        return None if level >= 1 else (1 - level) * self.period / self.count

    def take(self, key: str) -> None:
        """One event of `key` (the bucket may go below zero: the wait grows with each one)."""
        level = self._level(key) - 1
        self._buckets.pop(key, None)
        while len(self._buckets) >= self.max_keys:
            self._buckets.popitem(last=False)
        self._buckets[key] = (level, self._clock())


def _host(peer: str) -> str:
    """The share and limit key of a ``host:port`` peer (`names.source_key`: an IPv6 client by
    its /64)."""
    return source_key(peer.rsplit(":", 1)[0])


class EnrollService:
    """Answers enrolment connections and renewal streams (see the module docstring)."""

    def __init__(
        self,
        cfg: EnrollmentSettings,
        ca_bundle: Path,
        registry: Registry,
        metrics: Metrics,
        revoked: Revoked,
    ) -> None:
        self.cfg, self.registry, self.metrics, self.revoked = cfg, registry, metrics, revoked
        self.ca_bundle = Path(ca_bundle)
        self.tokens = TokenStore(cfg.tokens_file)
        self.issuing: IssuingCA | None = None
        if cfg.ca is not None:
            self.issuing = load_issuing_ca(cfg.ca.cert, cfg.ca.key)
            check_chains(self.issuing, self.ca_bundle)
        self.lifetime = dt.timedelta(days=cfg.lifetime_days)
        self.limit = RateLimit(cfg.max_failures_per_source)  # failed tokens per source address
        self.renewal_limit = RateLimit(cfg.max_renewals_per_hour, 3600.0)  # per identity
        self.exchanges = 0  # enrolment connections being answered now
        self.exchanges_by_source: dict[str, int] = {}  # of those, per client address
        self._log_budget = SourceBudget()
        if not self.tokens.write_back:
            log.warning(
                "enrollment.tokens_file is read-only: remaining token uses are counted in memory, "
                "per replica and until restart (keep tokens short-lived and bound to a node)",
                extra={"path": str(cfg.tokens_file)},
            )

    def status(self) -> dict[str, object]:
        return {
            "issuing_ca": self.issuing is not None,
            "lifetime_days": self.cfg.lifetime_days,
            "tokens": len(self.tokens.file.value),
            "uses_counted_in": "file" if self.tokens.write_back else "memory",
        }

    # ------------------------------------------------------------------ enrolment
    async def serve_enrolment(self, tls: TLSSocket, peer: str) -> None:
        """Answer the HTTP exchange of one enrolment connection (the caller sets the deadline and
        closes `tls`). Beyond `MAX_EXCHANGES` at once, or `MAX_EXCHANGES_PER_SOURCE` from one
        client address, the connection is closed unanswered (counted as ``busy``): cert-less
        connections cannot pile up, and no single source holds every slot."""
        source = _host(peer)
        held = self.exchanges_by_source.get(source, 0)
        if self.exchanges >= MAX_EXCHANGES or held >= MAX_EXCHANGES_PER_SOURCE:
            self.metrics.enrollments.labels("busy").inc()
            return
        self.exchanges += 1
        self.exchanges_by_source[source] = held + 1
        try:
            await self._serve_enrolment(tls, peer)
        finally:
            self.exchanges -= 1
            left = self.exchanges_by_source[source] - 1
            if left:
                self.exchanges_by_source[source] = left
            else:
                del self.exchanges_by_source[source]

    async def _serve_enrolment(self, tls: TLSSocket, peer: str) -> None:
        async def handler(
            method: str, target: str, body: dict[str, Any]
        ) -> tuple[int, dict[str, Any]]:
            if (method, target) == ("GET", "/v1/ca"):
                pem = await trio.to_thread.run_sync(read_file, self.ca_bundle, "tls.ca")
                return 200, {"ca": pem.decode("ascii", "replace")}
            if (method, target) == ("POST", "/v1/enroll"):
                return await self._enrol(body, peer)
            bad_request(404, "no such enrolment endpoint")
            return 404, {"error": "no such enrolment endpoint", "reason": "bad_request"}

        def bad_request(status: int, why: str) -> None:
            exc = Refused(status, "bad_request", why)
            self._refused(self.metrics.enrollments, "edge enrolment refused", exc, peer)

        await serve_json(
            TLSSocketStream(tls),
            handler,
            max_requests=MAX_REQUESTS,
            server=SERVER,
            on_bad_request=bad_request,
        )

    async def _enrol(self, body: dict[str, Any], peer: str) -> tuple[int, dict[str, Any]]:
        token_id = ""
        try:
            wait = self.limit.retry_after(_host(peer))
            if wait is not None:
                raise Refused(
                    429,
                    "rate_limited",
                    f"too many failed tokens from this address: retry in {wait:.0f}s "
                    "(enrollment.max_failures_per_source)",
                )
            if self.issuing is None:
                raise Refused(
                    503,
                    "no_issuing_ca",
                    "this cloud has no issuing CA (enrollment.ca in cloud.yaml), so it cannot "
                    "enrol edges: create one with kins-tunnel certs init --issuing-ca",
                )
            token, csr, node, unit = (body.get(k) for k in ("token", "csr", "node", "unit"))
            if not isinstance(token, str) or not isinstance(csr, str):
                raise Refused(400, "bad_request", "the request needs a token and a csr (strings)")
            if not (node is None or isinstance(node, str)) or not (
                unit is None or isinstance(unit, str)
            ):
                raise Refused(400, "bad_request", "node and unit must be strings")
            m = TOKEN_RE.fullmatch(token)
            token_id = m.group(1) if m else ""
            if token_id and token_id not in self.tokens.file.value:
                await (
                    self.tokens.file.check()
                )  # created a moment ago: no need to wait for the watch
            try:
                entry = self.tokens.check(token)
            except TokenRefused as exc:
                self.limit.take(_host(peer))
                raise Refused(_TOKEN_STATUS.get(exc.reason, 403), exc.reason, str(exc)) from None
            if unit is not None and unit != entry.unit:
                raise Refused(
                    403,
                    "wrong_unit",
                    f"token {entry.id} is for unit {entry.unit!r}, but this edge expects unit "
                    f"{unit[:64]!r} (enroll.unit)",
                )
            if entry.node is not None and node is not None and node != entry.node:
                raise Refused(
                    403,
                    "identity_not_allowed",
                    f"token {entry.id} enrols node {entry.node!r} only, not {node[:253]!r}",
                )
            node = entry.node or node
            if node is None:
                raise Refused(
                    400,
                    "no_node",
                    f"token {entry.id} names no node and the edge sent none (enroll.node; in "
                    "the DaemonSet the pod's spec.nodeName)",
                )
            identity = self._identity(entry.unit, node)
            public_key = self._csr_key(csr, node)
            why = self.revoked(identity, -1)
            if why is not None:
                raise Refused(403, "revoked", why)
            holder = self.registry.node_holder(node)
            if holder is not None and holder != identity.unit:
                raise Refused(
                    409,
                    "node_taken",
                    f"node {node!r} is held by an edge of unit {holder!r}: node names must be "
                    "unique across the units of a cloud",
                )
            try:
                await self.tokens.consume(entry)
            except TokenRefused as exc:
                raise Refused(403, exc.reason, str(exc)) from None
            except UserError as exc:
                raise Refused(503, "tokens_file", f"cannot record the token's use: {exc}") from None
            cert = sign_edge_csr(self.issuing, public_key, identity, self.lifetime)
        except Refused as exc:
            self._refused(
                self.metrics.enrollments, "edge enrolment refused", exc, peer, token=token_id
            )
            return exc.status, {"error": str(exc), "reason": exc.reason}
        self.metrics.enrollments.labels("ok").inc()
        log.info(
            "edge enrolled",
            extra={
                "unit": identity.unit,
                "node": identity.node,
                "peer": peer,
                "token": token_id,
                "serial": format(cert.serial_number, "x"),
                "not_after": cert.not_valid_after_utc.isoformat(),
            },
        )
        return 200, self._issued(cert, identity)

    def _identity(self, unit: str, node: str) -> EdgeIdentity:
        try:
            check_edge_names(unit, node)
        except UserError as exc:
            reason = "reserved_name" if "reserved" in str(exc) else "bad_node"
            raise Refused(
                403 if reason == "reserved_name" else 400, reason, str(exc)[:300]
            ) from None
        return EdgeIdentity(unit, node)

    def _csr_key(self, csr: str, node: str | None) -> ec.EllipticCurvePublicKey:
        try:
            return csr_public_key(csr.encode("utf-8", "replace"), node)
        except ValueError as exc:
            reason = "identity_not_allowed" if "names node" in str(exc) else "bad_csr"
            raise Refused(
                403 if reason == "identity_not_allowed" else 400, reason, str(exc)[:300]
            ) from None

    def _issued(self, cert: x509.Certificate, identity: EdgeIdentity) -> dict[str, Any]:
        assert self.issuing is not None
        return {
            "cert": cert.public_bytes(serialization.Encoding.PEM).decode(),
            "chain": self.issuing.chain_pem.decode(),
            "unit": identity.unit,
            "node": identity.node,
            "not_after": cert.not_valid_after_utc.isoformat(),
        }

    def _refused(
        self, counter: Counter, message: str, exc: Refused, peer: str, **extra: str
    ) -> None:
        counter.labels(exc.reason).inc()
        if self._log_budget.allow(_host(peer)):
            log.warning(
                message,
                extra={
                    "peer": peer,
                    "reason": exc.reason,
                    "detail": str(exc),
                    "status": exc.status,
                    "not_logged_before": self._log_budget.take_suppressed(),
                    **extra,
                },
            )

    # ------------------------------------------------------------------ renewal
    def on_renew_open(
        self, identity: EdgeIdentity, peer: str, session: Session, stream_id: int
    ) -> None:
        """The edge opened `RENEW_TARGET`: accept and answer one renewal on that stream."""
        try:
            stream = session.accept(stream_id)
        except LocalProtocolError:  # the edge reset it meanwhile
            return
        session.start_stream_task(stream_id, self._serve_renewal, stream, identity, peer, session)

    async def _serve_renewal(
        self, stream: trio.abc.Stream, identity: EdgeIdentity, peer: str, session: Session
    ) -> None:
        async def handler(
            method: str, target: str, body: dict[str, Any]
        ) -> tuple[int, dict[str, Any]]:
            if (method, target) != ("POST", "/v1/renew"):
                bad_request(404, "no such renewal endpoint")
                return 404, {"error": "no such renewal endpoint", "reason": "bad_request"}
            return await self._renew(body, identity, peer, session)

        def bad_request(status: int, why: str) -> None:
            exc = Refused(status, "bad_request", why)
            labels = {"unit": identity.unit, "node": identity.node}
            self._refused(
                self.metrics.renewals, "edge certificate renewal refused", exc, peer, **labels
            )

        with trio.move_on_after(RENEW_TIMEOUT):
            await serve_json(
                stream, handler, max_requests=1, server=SERVER, on_bad_request=bad_request
            )
        await trio.aclose_forcefully(stream)

    async def _renew(
        self, body: dict[str, Any], identity: EdgeIdentity, peer: str, session: Session
    ) -> tuple[int, dict[str, Any]]:
        labels = {"unit": identity.unit, "node": identity.node}
        try:
            if self.issuing is None:
                raise Refused(
                    503,
                    "no_issuing_ca",
                    "this cloud has no issuing CA (enrollment.ca in cloud.yaml)",
                )
            key = f"{identity.unit}/{identity.node}"
            wait = self.renewal_limit.retry_after(key)
            if wait is not None:
                raise Refused(
                    429,
                    "rate_limited",
                    f"too many renewals for this identity: retry in {wait:.0f}s "
                    "(enrollment.max_renewals_per_hour)",
                )
            csr = body.get("csr")
            if not isinstance(csr, str):
                raise Refused(400, "bad_request", "the request needs a csr (a string)")
            public_key = self._csr_key(csr, identity.node)
            self.renewal_limit.take(key)  # a well-formed request, whatever the answer
            der = session.tls.peer_certificate_der()
            try:
                serial = cert_facts(der).serial if der is not None else -1
            except ValueError:
                serial = -1
            why = self.revoked(identity, serial)
            if why is not None:
                raise Refused(403, "revoked", why)
            cert = sign_edge_csr(self.issuing, public_key, identity, self.lifetime)
        except Refused as exc:
            self._refused(
                self.metrics.renewals, "edge certificate renewal refused", exc, peer, **labels
            )
            return exc.status, {"error": str(exc), "reason": exc.reason}
        self.metrics.renewals.labels("ok").inc()
        log.info(
            "edge certificate renewed",
            extra={
                **labels,
                "peer": peer,
                "serial": format(cert.serial_number, "x"),
                "not_after": cert.not_valid_after_utc.isoformat(),
            },
        )
        return 200, self._issued(cert, identity)


def check_chains(issuing: IssuingCA, bundle: Path) -> None:
    """The issuing CA must be signed by a CA of ``tls.ca``: otherwise the cloud would refuse the
    certificates it issues. `UserError` naming ``enrollment.ca.cert``."""
    for ca in load_certs(bundle, "tls.ca"):
        if ca.subject != issuing.cert.issuer:
            continue
        try:
            issuing.cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return
    raise UserError(
        "enrollment.ca.cert: the issuing CA is not signed by a CA in tls.ca, so the cloud would "
        "refuse the certificates it issues: make it with kins-tunnel certs init --issuing-ca "
        "in the directory of that CA"
    )
