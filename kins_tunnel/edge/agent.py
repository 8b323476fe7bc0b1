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
cloud cheap. A tunnel that stayed up `stable_after` seconds resets the backoff, and from its end
on no wait is longer than the edge has been without it (`edge.reconnect`: an edge returns to a
restarted replica soon after it listens again). Nothing here ever exits because the cloud is away.

An address that leaves DNS (a replica scaled away, or not ready) is retired gently: its keeper
stops reconnecting, the tunnel gets GOAWAY (the cloud opens nothing new on it) and is closed once
its streams are done, or after `drain_timeout`.

A GOAWAY from the cloud (a replica shutting down, maybe behind the one address of a NodePort)
hands the keeper back at once: it dials a replacement straight away (at most once per
`reconnect.max`; more often, the usual backoff applies) while the old tunnel finishes its streams
and is closed when they are done or after the edge's own `drain_timeout`, whatever the cloud does.
A keeper holds at most one such draining tunnel besides its live one.

A failed HELLO exchange (the cloud closed the connection: revoked, refused or shed; no HELLO in
time; a version in common missing; a malformed HELLO) is an ordinary refusal: counted under its
reason in `handshake_failures_total` and logged as one warning, like a failed TLS set-up.

Bounds: at most `max_tunnels` keepers whatever DNS answers (`memory_budget` holds that many
tunnels' buffers: `config`); descriptors: `edge.resources`.

Through a site proxy (`proxy:`), each keeper's TCP connection is a CONNECT to the address through
that proxy, inside the same `handshake_timeout` as the TLS handshake; a refusal by the proxy is a
failed set-up like any other (reason `proxy`). A name that does not resolve on the edge is handed to
the proxy as it is (one keeper for the name), until it resolves locally.

Certificates: the client context is rebuilt before a (re)connect when the CA, certificate or key
file changed, so renewed files are used by the next tunnel; live tunnels are left alone. With
``enroll`` (`edge.enroll`), an edge without a usable certificate enrols with its token before its
first tunnel, and renews its certificate over a tunnel when it is due.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import trio

from kins_tunnel import __version__
from kins_tunnel.admin import serve_admin
from kins_tunnel.certs import EdgeIdentity
from kins_tunnel.certwatch import ReloadingContext
from kins_tunnel.config import EdgeConfig
from kins_tunnel.edge.credentials import own_identity
from kins_tunnel.edge.enroll import Enrolment
from kins_tunnel.edge.forwarder import Forwarder
from kins_tunnel.edge.keeper import Keeper
from kins_tunnel.edge.reconnect import ReconnectPolicy, backoff_delay
from kins_tunnel.edge.resources import check_open_files
from kins_tunnel.edge.setup_failures import cert_summary, failure_reason
from kins_tunnel.edge.status import status_document
from kins_tunnel.edge.uplinks import Uplinks
from kins_tunnel.metrics import Metrics
from kins_tunnel.names import Address, authority
from kins_tunnel.proto import Hello, RemoteProtocolError, Role
from kins_tunnel.tls_contexts import client_ssl_context
from kins_tunnel.transport.errors import HandshakeFailed
from kins_tunnel.transport.http_proxy import ProxyDialer
from kins_tunnel.transport.session import Session
from kins_tunnel.transport.tls import Refused, TransportError
from kins_tunnel.transport.tls_dial import connect_tls
from kins_tunnel.transport.tunnel import TunnelSide

log = logging.getLogger("kins_tunnel.edge")


@dataclass(frozen=True)
class EdgePorts:
    admin: int | None


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


class Edge:
    not_ready = "no tunnel\n"  # the admin /readyz body while not ready

    def __init__(self, cfg: EdgeConfig, *, rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.sessions: dict[str, Session] = {}  # "address" -> live session
        self.metrics = Metrics("edge", self._snapshot)
        # With `enroll`: until enrolled (`run`), no certificate; the node is the configured one.
        self.enrolment = None if cfg.enroll is None else Enrolment(cfg, self.metrics)
        self.identity: EdgeIdentity | None = None
        self._tls: ReloadingContext | None = None
        if self.enrolment is None or self.enrolment.state == "enrolled":
            self._load_credentials()
        self.forwarder = Forwarder(cfg.services, cfg.dial_timeout, self.metrics)
        self.side = TunnelSide(
            Role.CLIENT,
            cfg.mux,
            cfg.ping_interval,
            cfg.ping_timeout,
            self.metrics.report_internal_error,
            # behind a site proxy keepalive probes reach the proxy, not the cloud: idle tunnels
            # ping as busy ones (their HELLO says so, and the cloud times their silence by it)
            idle_ping_interval=cfg.ping_interval
            if cfg.proxy is not None
            else cfg.idle_ping_interval,
        )
        self.proxy = (
            None if cfg.proxy is None else ProxyDialer(cfg.proxy.url, cfg.proxy.credentials_file)
        )
        self.uplinks = Uplinks(cfg, self.metrics, lambda: list(self.sessions.items()))
        self._rng = rng or random.Random()
        self._keepers: dict[tuple[str, str, int], Keeper] = {}
        self._skipped: dict[str, int] = {}  # cloud entry -> addresses beyond max_tunnels
        self.cloud_certs: dict[str, dict[str, object]] = {}  # "address" -> serial/not_after seen
        self.draining = False
        self.connects = 0  # successful tunnel set-ups, for tests and status
        self.admin_port: int | None = None  # the bound admin port, once running

    def _load_credentials(self) -> None:
        self.identity = own_identity(str(self.cfg.tls.cert))
        self._tls = ReloadingContext(
            client_ssl_context,
            self.cfg.tls.ca,
            self.cfg.tls.cert,
            self.cfg.tls.key,
            what="tls",
            min_interval=0.0,
        )

    @property
    def tls(self) -> ReloadingContext:
        """The client context's files (only once the edge has its certificate)."""
        assert self._tls is not None, "no certificate yet (enrolling)"
        return self._tls

    @property
    def _who(self) -> EdgeIdentity:
        """The edge's identity; before enrolment, the configured node of no unit yet."""
        if self.identity is not None:
            return self.identity
        return EdgeIdentity("", self.cfg.enroll.node or "" if self.cfg.enroll else "")

    def _snapshot(self) -> Iterator[tuple[dict[str, str], Session]]:
        for addr, s in list(self.sessions.items()):
            yield {"unit": self._who.unit, "node": self._who.node, "peer": addr}, s

    @property
    def ready(self) -> bool:
        return any(s.usable for s in self.sessions.values())

    def status(self) -> tuple[int, str, bytes]:
        draining = [  # tunnels finishing their streams after the cloud's GOAWAY
            (authority(ip, port), k.draining)
            for (_entry, ip, port), k in self._keepers.items()
            if k.draining is not None
        ]
        doc = status_document(
            self._who,
            [*self.sessions.items(), *draining],
            self.cloud_certs,
            self.uplinks.status(),
            None if self.enrolment is None else self.enrolment.status(),
        )
        return 200, "application/json", json.dumps(doc, indent=1).encode()

    async def run(
        self, *, task_status: trio.TaskStatus[EdgePorts] = trio.TASK_STATUS_IGNORED
    ) -> None:
        check_open_files(self.cfg)
        async with trio.open_nursery() as nursery:
            admin_port = None
            if self.cfg.admin is not None:
                admin_port = await nursery.start(serve_admin, self.cfg.admin, self)
            if self.uplinks.enabled:
                await nursery.start(self.uplinks.serve)
            self.admin_port = admin_port
            task_status.started(EdgePorts(admin_port))
            if self._tls is None and self.enrolment is not None:
                await self.enrolment.enrol_until_done(
                    None if self.proxy is None else self.proxy.open, self._backoff
                )
                self._load_credentials()
            if self.enrolment is not None:
                nursery.start_soon(
                    self.enrolment.renew_forever,
                    lambda: list(self.sessions.values()),
                    self._backoff,
                )
            log.info(
                "tunnel-edge up",
                extra={
                    "unit": self._who.unit,
                    "node": self._who.node,
                    "services": ",".join(self.cfg.services),
                },
            )
            for entry in self.cfg.cloud:
                nursery.start_soon(self._resolver, entry, nursery)

    def _backoff(self, attempt: int) -> float:
        b = self.cfg.reconnect
        return backoff_delay(attempt, b.initial, b.max, b.multiplier, self._rng)

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
            new = sorted(wanted - set(self._keepers))
            room = max(0, self.cfg.max_tunnels - len(self._keepers))
            self._note_skipped(entry, new[room:])
            for key in new[:room]:
                keeper = Keeper()
                self._keepers[key] = keeper
                nursery.start_soon(self._keeper, key, addr.host, keeper)
            await trio.sleep(
                self.cfg.resolve_interval if ips else min(self.cfg.resolve_interval, 5.0)
            )

    def _note_skipped(self, entry: str, skipped: list[tuple[str, str, int]]) -> None:
        """Warn (when the number changes) about addresses left without a tunnel by max_tunnels."""
        if len(skipped) != self._skipped.get(entry, 0):
            self._skipped[entry] = len(skipped)
            if skipped:
                log.warning(
                    "cloud addresses left without a tunnel: max_tunnels reached",
                    extra={
                        "cloud": entry,
                        "max_tunnels": self.cfg.max_tunnels,
                        "skipped": ",".join(k[1] for k in skipped[:8]),
                        "count": len(skipped),
                    },
                )

    def _retire(self, keeper: Keeper, nursery: trio.Nursery) -> None:
        """Stop reconnecting to an address; let its tunnel's streams finish, then close it."""
        keeper.retired = True
        session = keeper.session
        if session is None or session.closed.is_set():
            keeper.scope.cancel()
            return
        session.goaway("cloud address left DNS")
        nursery.start_soon(self._close_when_idle, keeper, session)

    async def _close_when_idle(self, keeper: Keeper, session: Session) -> None:
        await session.wait_idle(trio.current_time() + self.cfg.drain_timeout)
        session.close("cloud address left DNS")
        keeper.scope.cancel()

    async def _keeper(self, key: tuple[str, str, int], server_name: str, keeper: Keeper) -> None:
        _entry, ip, port = key
        label = authority(ip, port)
        b = self.cfg.reconnect
        policy = ReconnectPolicy(b, self._rng)
        with keeper.scope:
            async with trio.open_nursery() as tunnels:  # a tunnel draining after GOAWAY lives here
                while not self.draining and not keeper.retired:
                    started = trio.current_time()
                    keeper.retry_after = None
                    at_once = await self._attempt(tunnels, label, ip, port, server_name, keeper)
                    if self.draining or keeper.retired:
                        return
                    now = trio.current_time()
                    if at_once and now - keeper.replaced_at >= b.max:  # at most once per b.max
                        keeper.replaced_at = now
                        log.info(
                            "cloud sent GOAWAY: dialling a replacement", extra={"cloud": label}
                        )
                        continue
                    delay = policy.next_delay(now - started, keeper.retry_after, now=now)
                    log.info("reconnecting", extra={"cloud": label, "in_seconds": round(delay, 2)})
                    await trio.sleep(delay)

    async def _attempt(
        self,
        tunnels: trio.Nursery,
        label: str,
        ip: str,
        port: int,
        server_name: str,
        keeper: Keeper,
    ) -> bool:
        """One tunnel of a keeper, until it ends or the cloud sends GOAWAY (the tunnel then drains
        on in `tunnels`). True after a GOAWAY (a replacement is due at once), False otherwise."""
        try:
            at_once: bool = await tunnels.start(
                self._tunnel_until_goaway, label, ip, port, server_name, keeper
            )
            return at_once
        except (TransportError, RemoteProtocolError, trio.TooSlowError, OSError) as exc:
            if isinstance(exc, Refused):
                keeper.retry_after = exc.retry_after
            reason = failure_reason(exc)
            self.metrics.handshake_failures.labels(reason).inc()
            log.warning(
                "tunnel to cloud failed",
                extra={"cloud": label, "label": reason, "reason": str(exc) or "timeout"},
            )
        except Exception as exc:  # a bug: this tunnel ends, the edge reconnects as usual
            self.metrics.report_internal_error("edge_tunnel", exc)
        return False

    async def _tunnel_until_goaway(
        self,
        label: str,
        ip: str,
        port: int,
        server_name: str,
        keeper: Keeper,
        *,
        task_status: trio.TaskStatus[bool] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run one tunnel; `task_status.started(True)` on the cloud's GOAWAY (then the tunnel
        drains on here) or `started(False)` once it is over. A failure before that is raised."""
        handed_over = False

        def on_goaway() -> None:
            nonlocal handed_over
            handed_over = True
            task_status.started(True)

        try:
            await self._one_tunnel(label, ip, port, server_name, keeper, on_goaway=on_goaway)
        except Exception as exc:
            if not handed_over:
                raise
            self.metrics.report_internal_error("edge_tunnel", exc)  # a bug while draining
        if not handed_over:
            task_status.started(False)

    @property
    def context(self) -> ssl.SSLContext:
        """The client context (kept current by `refresh()` before every connect)."""
        return self.tls.context

    async def _one_tunnel(
        self,
        label: str,
        ip: str,
        port: int,
        server_name: str,
        keeper: Keeper | None = None,
        *,
        on_goaway: Callable[[], None] | None = None,
    ) -> None:
        cfg = self.cfg
        await self.tls.refresh()  # renewed certificate files apply from this tunnel on
        context = self.context
        with trio.fail_after(cfg.handshake_timeout):
            tls = await connect_tls(
                ip,
                port,
                context,
                server_hostname=server_name,
                open_stream=None if self.proxy is None else self.proxy.open,
                session=None if keeper is None else keeper.ticket_for(context),
            )
        self.metrics.tls_handshakes.labels("resumed" if tls.session_reused else "full").inc()
        cloud_cert = cert_summary(tls.peer_certificate_der())
        try:
            await self.side.run(
                tls,
                Hello(names=tuple(cfg.services), agent=f"kins-tunnel-edge/{__version__}"),
                label=f"cloud {label}",
                handshake_timeout=cfg.handshake_timeout,
                on_open=self.forwarder.on_open,
                pacing=cfg.qos.pacing(),
                while_up=functools.partial(
                    self._while_up,
                    label=label,
                    cloud_cert=cloud_cert,
                    keeper=keeper,
                    on_goaway=on_goaway,
                ),
            )
        except HandshakeFailed as exc:  # an ordinary refusal: counted and one warning line
            self.metrics.handshake_failures.labels(exc.reason).inc()
            log.warning(
                "tunnel to cloud failed",
                extra={"cloud": label, "label": exc.reason, "reason": str(exc) or exc.reason},
            )
        finally:
            if keeper is not None:
                keeper.keep_ticket(context, tls)

    async def _while_up(
        self,
        session: Session,
        *,
        label: str,
        cloud_cert: dict[str, object],
        keeper: Keeper | None,
        on_goaway: Callable[[], None] | None = None,
    ) -> None:
        self.sessions[label] = session
        self.cloud_certs[label] = cloud_cert
        if keeper is not None:
            keeper.session = session
        self.connects += 1
        log.info(
            "tunnel up",
            extra={"cloud": label, "unit": self._who.unit, "node": self._who.node},
        )
        try:
            if keeper is None or on_goaway is None:
                await session.closed.wait()
            else:
                await self._until_drained(session, label, keeper, on_goaway)
        finally:
            if self.sessions.get(label) is session:
                del self.sessions[label]
                self.cloud_certs.pop(label, None)
            log.info("tunnel down", extra={"cloud": label, "reason": session.close_reason})

    async def _until_drained(
        self, session: Session, label: str, keeper: Keeper, on_goaway: Callable[[], None]
    ) -> None:
        """Until the tunnel is closed. On the cloud's GOAWAY, hand the keeper back at once (it dials
        a replacement) and let the streams finish, closing the tunnel after `drain_timeout` at the
        latest: a cloud that keeps a drained tunnel open must not hold the edge. A keeper has at
        most one draining tunnel: an older one is closed when a newer one starts draining."""
        async with trio.open_nursery() as watch:  # whichever comes first: closed or GOAWAY
            for event in (session.closed, session.goaway_received):
                watch.start_soon(_cancel_when_set, event, watch.cancel_scope)
        if session.closed.is_set():
            return
        previous, keeper.draining = keeper.draining, session
        if previous is not None:
            previous.close("replaced by a newer tunnel while draining")
        if self.sessions.get(label) is session:  # the replacement takes this label
            del self.sessions[label]
            self.cloud_certs.pop(label, None)
        on_goaway()
        try:
            await session.wait_idle(trio.current_time() + self.cfg.drain_timeout)
            session.close("drained after the cloud's GOAWAY")
        finally:
            if keeper.draining is session:
                keeper.draining = None

    async def drain(self) -> None:
        """GOAWAY on every tunnel, let streams finish (up to drain_timeout), then close."""
        self.draining = True
        self.uplinks.listener_scope.cancel()  # no new uplink connections; open ones go on
        for s in self.sessions.values():
            s.goaway("tunnel-edge shutting down")
        deadline = trio.current_time() + self.cfg.drain_timeout
        for s in list(self.sessions.values()):
            await s.wait_idle(deadline)
        for s in list(self.sessions.values()):
            s.close("tunnel-edge shut down")
