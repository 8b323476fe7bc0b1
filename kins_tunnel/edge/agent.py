"""tunnel-edge: keep a tunnel to every cloud replica, forever, and serve the cloud's opens.

Theory of operation
-------------------
Each entry of `cloud:` is a `host:port`; the host may be a DNS name that resolves to several
addresses (a headless Service: one address per replica). Every `resolve_interval` the names are
resolved again; a *keeper* task runs per resolved address (new addresses get a keeper, vanished ones
have theirs cancelled). TLS always verifies the configured name, whatever address it reached.

A keeper connects, runs the session until it ends, and reconnects with full-jitter exponential
backoff (`sleep = uniform(0, min(max, initial * multiplier**attempt))`): the first retries are
fast, a fleet restarted at once spreads out instead of stampeding, and the cap keeps an absent
cloud cheap. A tunnel that stayed up `stable_after` seconds resets the backoff. Nothing here ever
exits because the cloud is away.

An address that leaves DNS (a replica scaled away, or not ready) is retired gently: its keeper
stops reconnecting, the tunnel gets GOAWAY (the cloud opens nothing new on it) and is closed once
its streams are done, or after `drain_timeout`.

Through a site proxy (`proxy:`), each keeper's TCP connection is a CONNECT to the address through
that proxy, inside the same `handshake_timeout` as the TLS handshake; a refusal by the proxy is a
failed set-up like any other (reason `proxy`). A name that does not resolve on the edge is handed to
the proxy as it is (one keeper for the name), until it resolves locally.

Certificates: the client context is rebuilt before a (re)connect when the CA, certificate or key
file changed, so renewed files are used by the next tunnel; live tunnels are left alone.

Uplinks (`uplinks`, `uplink_proxy`; see `edge.uplinks`) open streams the other way, on whichever
of these tunnels is usable; on drain their listeners stop accepting and open ones finish.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from kins_tunnel import __version__
from kins_tunnel.admin import serve_admin
from kins_tunnel.certs import EdgeIdentity, identity_from_der
from kins_tunnel.certwatch import ReloadingContext
from kins_tunnel.config import EdgeConfig
from kins_tunnel.edge.forwarder import Forwarder
from kins_tunnel.edge.reconnect import ReconnectPolicy
from kins_tunnel.edge.uplinks import Uplinks
from kins_tunnel.errors import UserError
from kins_tunnel.metrics import Metrics
from kins_tunnel.names import Address
from kins_tunnel.proto import Connection, Hello, RemoteProtocolError, Role
from kins_tunnel.tls_contexts import client_ssl_context, failure_label
from kins_tunnel.transport.http_proxy import ProxyDialer, ProxyError
from kins_tunnel.transport.session import Session
from kins_tunnel.transport.tls import Refused, TransportError, connect_tls

log = logging.getLogger("kins_tunnel.edge")


@dataclass(frozen=True)
class EdgePorts:
    admin: int | None


@dataclass(eq=False)
class _Keeper:
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    retired: bool = False
    session: Session | None = None
    # the cloud's session ticket and the context it belongs to: the next dial resumes with it
    tls_session: tuple[ssl.SSLContext, ssl.SSLSession] | None = None
    retry_after: float | None = None  # the cloud's hint in its refusal of the last tunnel


_SETUP_FAILURES = (  # text in the error -> label
    ("shed by the cloud", "shed"),  # transport.tls.Refused: the cloud said when to come back
    ("cannot connect", "connect"),
    ("certificate verify failed", "verify_failed"),
    ("hostname mismatch", "verify_failed"),
    ("unknown ca", "unknown_ca"),
    ("certificate", "tls_error"),
    ("tls handshake", "tls_error"),
)


def _failure_reason(exc: BaseException) -> str:
    """A short label for a failed tunnel set-up (the edge's handshake_failures metric)."""
    if isinstance(exc, ProxyError):  # the site proxy refused or garbled its answer
        return "proxy"
    return failure_label(exc, _SETUP_FAILURES, verify_default="verify_failed", default="protocol")


def _cert_summary(der: bytes | None) -> dict[str, object]:
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


def own_identity(cert_path: str) -> EdgeIdentity:
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        return identity_from_der(cert.public_bytes(Encoding.DER))
    except (OSError, ValueError) as exc:
        raise UserError(f"tls.cert: {cert_path}: not an edge certificate ({exc})") from exc


class Edge:
    not_ready = "no tunnel\n"  # the admin /readyz body while not ready

    def __init__(self, cfg: EdgeConfig, *, rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.identity = own_identity(str(cfg.tls.cert))
        self.tls = ReloadingContext(
            client_ssl_context, cfg.tls.ca, cfg.tls.cert, cfg.tls.key, what="tls", min_interval=0.0
        )
        self.sessions: dict[str, Session] = {}  # "address" -> live session
        self.metrics = Metrics("edge", self._snapshot)
        self.forwarder = Forwarder(cfg.services, cfg.dial_timeout, self.metrics)
        self.proxy = (
            None if cfg.proxy is None else ProxyDialer(cfg.proxy.url, cfg.proxy.credentials_file)
        )
        self.uplinks = Uplinks(cfg, self.metrics, lambda: list(self.sessions.items()))
        self._rng = rng or random.Random()
        self._keepers: dict[tuple[str, str, int], _Keeper] = {}
        self.cloud_certs: dict[str, dict[str, object]] = {}  # "address" -> serial/not_after seen
        self.draining = False
        self.connects = 0  # successful tunnel set-ups, for tests and status
        self.admin_port: int | None = None  # the bound admin port, once running

    def _snapshot(self) -> Iterator[tuple[dict[str, str], Session]]:
        for addr, s in list(self.sessions.items()):
            yield {"unit": self.identity.unit, "node": self.identity.node, "peer": addr}, s

    @property
    def ready(self) -> bool:
        return any(s.usable for s in self.sessions.values())

    def status(self) -> tuple[int, str, bytes]:
        now = trio.current_time()
        tunnels = [
            {
                "cloud": a,
                "uptime": round(now - s.started_at, 1),
                "rtt_ms": None if s.rtt is None else round(s.rtt * 1000, 3),
                "streams": s.statistics().streams,
                "draining": not s.usable,
                **self.cloud_certs.get(a, {}),
            }
            for a, s in self.sessions.items()
        ]
        doc = {
            "unit": self.identity.unit,
            "node": self.identity.node,
            "tunnels": tunnels,
            "uplinks": self.uplinks.status(),
        }
        return 200, "application/json", json.dumps(doc, indent=1).encode()

    async def run(
        self, *, task_status: trio.TaskStatus[EdgePorts] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            admin_port = None
            if self.cfg.admin is not None:
                admin_port = await nursery.start(serve_admin, self.cfg.admin.listen, self)
            if self.uplinks.enabled:
                await nursery.start(self.uplinks.serve)
            log.info(
                "tunnel-edge up",
                extra={
                    "unit": self.identity.unit,
                    "node": self.identity.node,
                    "services": ",".join(self.cfg.services),
                },
            )
            self.admin_port = admin_port
            task_status.started(EdgePorts(admin_port))
            for entry in self.cfg.cloud:
                nursery.start_soon(self._resolver, entry, nursery)

    async def _resolver(self, entry: str, nursery: trio.Nursery) -> None:
        addr = Address.parse(entry, min_port=1)
        while True:
            try:
                infos = await trio.socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM)
                ips = sorted({str(info[4][0]) for info in infos})
            except OSError as exc:
                log.log(
                    logging.DEBUG if self.proxy else logging.WARNING,
                    "cannot resolve cloud address",
                    extra={"cloud": entry, "reason": str(exc)},
                )
                ips = []
            wanted = {(entry, ip, addr.port) for ip in ips}
            if not ips and self.proxy is not None and not any(k[0] == entry for k in self._keepers):
                # Behind a site proxy the name may resolve only there: CONNECT to the name itself
                # (one tunnel) until a lookup here gives the replicas' addresses.
                wanted = {(entry, addr.host, addr.port)}
            # A failed lookup (ips == []) keeps the tunnels we have: DNS trouble is not a reason
            # to cut working tunnels. An answer without an address retires its keeper.
            for key in (
                [k for k in self._keepers if k[0] == entry and k not in wanted] if ips else []
            ):
                log.info(
                    "cloud replica address vanished", extra={"cloud": entry, "address": key[1]}
                )
                self._retire(self._keepers.pop(key), nursery)
            for key in sorted(wanted - set(self._keepers)):
                keeper = _Keeper()
                self._keepers[key] = keeper
                nursery.start_soon(self._keeper, key, addr.host, keeper)
            await trio.sleep(
                self.cfg.resolve_interval if ips else min(self.cfg.resolve_interval, 5.0)
            )

    def _retire(self, keeper: _Keeper, nursery: trio.Nursery) -> None:
        """Stop reconnecting to an address; let its tunnel's streams finish, then close it."""
        keeper.retired = True
        session = keeper.session
        if session is None or session.closed.is_set():
            keeper.scope.cancel()
            return
        session.goaway("cloud address left DNS")
        nursery.start_soon(self._close_when_idle, keeper, session)

    async def _close_when_idle(self, keeper: _Keeper, session: Session) -> None:
        with trio.move_on_after(self.cfg.drain_timeout):
            while session.statistics().streams and not session.closed.is_set():
                await trio.sleep(0.1)
        session.close("cloud address left DNS")
        keeper.scope.cancel()

    async def _keeper(self, key: tuple[str, str, int], server_name: str, keeper: _Keeper) -> None:
        _entry, ip, port = key
        label = f"{ip}:{port}" if ":" not in ip else f"[{ip}]:{port}"
        policy = ReconnectPolicy(self.cfg.reconnect, self._rng)
        with keeper.scope:
            while not self.draining and not keeper.retired:
                started = trio.current_time()
                keeper.retry_after = None
                try:
                    await self._one_tunnel(label, ip, port, server_name, keeper)
                except (TransportError, RemoteProtocolError, trio.TooSlowError, OSError) as exc:
                    if isinstance(exc, Refused):
                        keeper.retry_after = exc.retry_after
                    self.metrics.handshake_failures.labels(_failure_reason(exc)).inc()
                    log.warning(
                        "tunnel to cloud failed",
                        extra={"cloud": label, "reason": str(exc) or "timeout"},
                    )
                except Exception as exc:  # a bug: this tunnel ends, the edge reconnects as usual
                    self.metrics.report_internal_error("edge_tunnel", exc)
                if self.draining or keeper.retired:
                    return
                delay = policy.next_delay(trio.current_time() - started, keeper.retry_after)
                log.info("reconnecting", extra={"cloud": label, "in_seconds": round(delay, 2)})
                await trio.sleep(delay)

    @property
    def context(self) -> ssl.SSLContext:
        """The client context (kept current by `refresh()` before every connect)."""
        return self.tls.context

    async def _one_tunnel(
        self, label: str, ip: str, port: int, server_name: str, keeper: _Keeper | None = None
    ) -> None:
        cfg = self.cfg
        await self.tls.refresh()  # renewed certificate files apply from this tunnel on
        context = self.context
        ticket = None if keeper is None else keeper.tls_session
        with trio.fail_after(cfg.handshake_timeout):
            tls = await connect_tls(
                ip,
                port,
                context,
                server_hostname=server_name,
                open_stream=None if self.proxy is None else self.proxy.open,
                # a ticket of an older context (renewed certificate) is not offered
                session=ticket[1] if ticket is not None and ticket[0] is context else None,
            )
        self.metrics.tls_handshakes.labels("resumed" if tls.session_reused else "full").inc()
        cloud_cert = _cert_summary(tls.peer_certificate_der())
        hello = Hello(names=tuple(cfg.services), agent=f"kins-tunnel-edge/{__version__}")
        conn = Connection(Role.CLIENT, hello, cfg.mux, clock=trio.current_time)
        session = Session(
            tls,
            conn,
            on_open=self.forwarder.on_open,
            ping_interval=cfg.ping_interval,
            ping_timeout=cfg.ping_timeout,
            label=f"cloud {label}",
            report=self.metrics.report_internal_error,
        )
        try:
            await self._serve_session(session, label, cloud_cert, keeper)
        except* trio.ClosedResourceError:
            # Session.close() (ping timeout, a failed write, drain) closes the socket under the
            # session's own reader/writer, which then raise ClosedResourceError out of serve().
            # The tunnel is over either way: reconnect as usual instead of crashing the edge.
            log.debug("tunnel closed under its reader", extra={"cloud": label})
        finally:
            issued = tls.session  # the cloud's ticket came right after its handshake
            if keeper is not None and issued is not None and issued.has_ticket:
                keeper.tls_session = (context, issued)

    async def _serve_session(
        self, session: Session, label: str, cloud_cert: dict[str, object], keeper: _Keeper | None
    ) -> None:
        cfg = self.cfg
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(session.serve, handshake_timeout=cfg.handshake_timeout)
            )
            self.sessions[label] = session
            self.cloud_certs[label] = cloud_cert
            if keeper is not None:
                keeper.session = session
            self.connects += 1
            log.info(
                "tunnel up",
                extra={"cloud": label, "unit": self.identity.unit, "node": self.identity.node},
            )
            try:
                await session.closed.wait()
            finally:
                if self.sessions.get(label) is session:
                    del self.sessions[label]
                    self.cloud_certs.pop(label, None)
                log.info("tunnel down", extra={"cloud": label, "reason": session.close_reason})

    async def drain(self) -> None:
        """GOAWAY on every tunnel, let streams finish (up to drain_timeout), then close."""
        self.draining = True
        self.uplinks.listener_scope.cancel()  # no new uplink connections; open ones go on
        for s in self.sessions.values():
            s.goaway("tunnel-edge shutting down")
        with trio.move_on_after(self.cfg.drain_timeout):
            while any(s.statistics().streams for s in self.sessions.values()):
                await trio.sleep(0.1)
        for s in list(self.sessions.values()):
            s.close("tunnel-edge shut down")
