"""tunnel-cloud: runs the edge listener, the CONNECT proxy and the admin endpoint together.

`run_cloud` is what `kins-tunnel cloud` calls; tests and the demo start it in a nursery on port 0
and get the bound ports back from `task_status.started(CloudPorts)`. SIGTERM (see `cli`) cancels
it after `drain()`: listeners close first, every edge gets GOAWAY, streams finish up to
`drain_timeout`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from kins_tunnel.admin import serve_admin
from kins_tunnel.certs.identity import RENEW_TARGET, EdgeIdentity, cert_facts
from kins_tunnel.certwatch import ReloadingContext
from kins_tunnel.cloud.aliases import AliasTable, Resolver, dns_resolver
from kins_tunnel.cloud.auth import Authenticator
from kins_tunnel.cloud.authz import Authorizer
from kins_tunnel.cloud.enroll import EnrollService
from kins_tunnel.cloud.expiry import CertificateExpiry
from kins_tunnel.cloud.proxy import ProxyContext, handle_client, serve_proxy
from kins_tunnel.cloud.proxy_tls import ProxyTLSListener
from kins_tunnel.cloud.registry import EdgeTunnel, Registry
from kins_tunnel.cloud.revocation import Revocation, RevokedList, client_revoked
from kins_tunnel.cloud.tunnel_server import TunnelServer
from kins_tunnel.cloud.uplinks import UplinkServer
from kins_tunnel.config import CloudConfig
from kins_tunnel.filewatch import WatchedFile
from kins_tunnel.metrics import EdgesLastSeen, Metrics, ReloadFailures
from kins_tunnel.tls_contexts import proxy_server_ssl_context, server_ssl_context
from kins_tunnel.tls_tickets import TicketKeys
from kins_tunnel.transport.session import Session

log = logging.getLogger("kins_tunnel.cloud")


@dataclass(frozen=True)
class CloudPorts:
    tunnel: int
    proxy: int  # 0: the plain listener is off (proxy.listen: null)
    admin: int
    proxy_tls: int = 0  # 0: no TLS listener (no proxy.tls)


# How often the watched files are checked (a Secret or ConfigMap update shows up within this).
FILE_CHECK_INTERVAL = 1.0


class Cloud:
    not_ready = "not ready\n"  # the admin /readyz body while not ready

    def __init__(
        self,
        cfg: CloudConfig,
        *,
        resolver: Resolver = dns_resolver,
        watch_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`watch_clock` paces the certificate watchers (one look at the files a second)."""
        self.cfg = cfg
        self.replica = cfg.replica or socket.gethostname()
        self.registry = Registry(max_per_identity=cfg.tunnel.max_tunnels_per_identity)
        self.metrics = Metrics("cloud", self._snapshot, replica=self.replica)
        ticket_file = cfg.tunnel.session_ticket_key_file if cfg.tunnel.session_tickets else None
        ticket_files = () if ticket_file is None else (ticket_file,)
        self.tls = ReloadingContext(
            functools.partial(
                server_ssl_context,
                enroll=cfg.enrollment is not None,
                session_lifetime=cfg.tunnel.session_lifetime if cfg.tunnel.session_tickets else 0,
                ticket_keys=TicketKeys(cfg.tunnel.session_ticket_key_file),
            ),
            cfg.tls.ca,
            cfg.tls.cert,
            cfg.tls.key,
            what="tls",
            extra=ticket_files,
            clock=watch_clock,
        )
        self.revocation = Revocation(cfg.tunnel.revoked_file) if cfg.tunnel.revoked_file else None
        self.tunnels = TunnelServer(cfg, self.tls, self.registry, self.metrics)
        self.tunnels.revoked = self._revoked
        self.enroll: EnrollService | None = None
        if cfg.enrollment is not None:
            self.enroll = EnrollService(
                cfg.enrollment,
                cfg.tls.ca,
                self.registry,
                self.metrics,
                lambda identity, serial: self._revoked_serial(identity, serial),
            )
            self.tunnels.enrol = self.enroll.serve_enrolment
        self.uplinks = UplinkServer(
            cfg.uplinks,
            cfg.uplink_dial_timeout,
            self.metrics,
            replica=self.replica,
            cluster_domain=cfg.alias_discovery.cluster_domain,
        )
        self.tunnels.on_edge_open = self._on_edge_open
        self.auth = auth = Authenticator(cfg.proxy.auth) if cfg.proxy.auth else None
        self.authz = Authorizer(cfg.proxy.authz_file) if cfg.proxy.authz_file else None
        self.aliases = AliasTable(
            cfg.aliases,
            cfg.alias_discovery,
            resolver,
            on_lookup=lambda result: self.metrics.alias_lookups.labels(result).inc(),
        )
        self.proxy = ProxyContext(
            cfg.proxy,
            self.registry,
            self.metrics,
            auth,
            replica=self.replica,
            authz=self.authz,
            aliases=self.aliases,
        )
        self.proxy_tls: ProxyTLSListener | None = None
        cert_files = {"cloud": cfg.tls.cert}
        if cfg.proxy.tls is not None:
            pt = cfg.proxy.tls
            context = ReloadingContext(
                proxy_server_ssl_context,
                pt.client_ca,
                pt.cert or cfg.tls.cert,
                pt.key or cfg.tls.key,
                what="proxy.tls",
                clock=watch_clock,
            )
            self.proxy_tls = ProxyTLSListener(
                pt,
                context,
                cfg.proxy.header_timeout,
                functools.partial(handle_client, self.proxy),
                self.metrics.report_internal_error,
                lambda r: self.metrics.proxy_tls_failures.labels(r).inc(),
                authenticated=auth is not None or pt.client_ca is not None,
                max_handshakes=cfg.proxy.max_connections,
                revoked=self._client_revoked if self.revocation is not None else None,
                on_revoked_close=self.metrics.revoked_clients_closed.inc,
            )
            self.proxy_tls.early_log = self.proxy.early_log  # one budget per source for both
            if pt.cert is not None:
                cert_files["proxy"] = pt.cert
        self.expiry = CertificateExpiry(cert_files, self._edge_certs)
        self.metrics.registry.register(self.expiry.collector())
        self.registry.on_add.append(self._edge_added)
        self.metrics.registry.register(ReloadFailures(self.watched_files))
        self.metrics.registry.register(EdgesLastSeen(self.registry.last_seen, self.replica))
        self.ready = False

    def watched_files(self) -> list[WatchedFile[Any]]:
        """Every file re-read while running: credentials, rules, revocation list."""
        files: list[WatchedFile[Any]] = []
        if self.auth is not None:
            files.extend(self.auth.files)
        if self.authz is not None:
            files.append(self.authz.file)
        if self.revocation is not None:
            files.append(self.revocation.file)
        if self.enroll is not None:
            files.append(self.enroll.tokens.file)
        return files

    def _on_edge_open(
        self, identity: EdgeIdentity, peer: str, session: Session, stream_id: int, target: str
    ) -> None:
        """A stream the edge opened: a certificate renewal (reserved target), else an uplink."""
        if target == RENEW_TARGET and self.enroll is not None:
            self.enroll.on_renew_open(identity, peer, session, stream_id)
        else:
            self.uplinks.on_open(identity, peer, session, stream_id, target)

    def _revoked_serial(self, identity: EdgeIdentity, serial: int) -> str | None:
        return None if self.revocation is None else self.revocation.reason(identity, serial)

    def _revoked(self, identity: EdgeIdentity, der: bytes | None) -> str | None:
        """Why the edge with this verified certificate is revoked, or None (`tunnel.revoked_file`)."""
        if self.revocation is None:
            return None
        try:
            serial = cert_facts(der).serial if der is not None else -1
        except ValueError:
            serial = -1
        return self.revocation.reason(identity, serial)

    def _client_revoked(self, der: bytes) -> str | None:
        """Why this proxy client certificate is revoked (`tunnel.revoked_file`), or None."""
        return None if self.revocation is None else client_revoked(self.revocation.file.value, der)

    def _edge_added(self, tunnel: EdgeTunnel) -> None:
        der = tunnel.session.tls.peer_certificate_der()
        if tunnel.cert is None and der is not None:  # the tunnel port gives its facts
            try:
                tunnel.cert = cert_facts(der)
            except ValueError:
                tunnel.cert = None
        issuing = self.enroll.issuing if self.enroll is not None else None
        if tunnel.cert is not None and issuing is not None:
            renewed = tunnel.cert.authority_key_id == issuing.key_id
            tunnel.cert = dataclasses.replace(tunnel.cert, renewed_automatically=renewed)
        reason = self._revoked(
            tunnel.identity, der
        )  # the list may have changed during the handshake
        if reason is not None:
            self.metrics.revoked_closed.inc()
            log.warning(
                "edge tunnel closed: revoked",
                extra={
                    "unit": tunnel.identity.unit,
                    "node": tunnel.identity.node,
                    "peer": tunnel.peer,
                    "reason": reason,
                },
            )
            tunnel.session.close(f"revoked: {reason}")
        if tunnel.cert is not None:
            self.expiry.warn_if_expiring(
                "edge",
                tunnel.identity.unit,
                tunnel.identity.node,
                tunnel.cert.serial,
                tunnel.cert.not_after,
                tunnel.cert.lifetime if tunnel.cert.renewed_automatically else None,
            )
        self.aliases.unit_connected(tunnel.identity.unit)

    def _edge_certs(self):  # type: ignore[no-untyped-def]
        for t in self.registry:
            if t.cert is not None:
                yield t.identity.unit, t.identity.node, t.cert

    def close_revoked(self, revoked: RevokedList) -> int:
        """Close the live tunnels of edges on the revocation list; returns how many."""
        closed = 0
        for t in self.registry:
            reason = revoked.reason(t.identity, t.cert.serial if t.cert is not None else -1)
            if reason is None:
                continue
            log.warning(
                "edge tunnel closed: revoked",
                extra={
                    "unit": t.identity.unit,
                    "node": t.identity.node,
                    "peer": t.peer,
                    "reason": reason,
                },
            )
            self.metrics.revoked_closed.inc()
            t.session.close(f"revoked: {reason}")
            closed += 1
        if self.proxy_tls is not None:  # and the relays of revoked proxy client certificates
            closed += self.proxy_tls.close_revoked(functools.partial(client_revoked, revoked))
        return closed

    def _snapshot(self):  # type: ignore[no-untyped-def]
        for t in self.registry:
            yield {"unit": t.identity.unit, "node": t.identity.node, "peer": t.peer}, t.session

    def status(self) -> tuple[int, str, bytes]:
        now = trio.current_time()
        edges = []
        for t in self.registry:
            st = t.session.statistics()
            edges.append(
                {
                    "unit": t.identity.unit,
                    "node": t.identity.node,
                    "peer": t.peer,
                    "replica": self.replica,
                    "uptime": round(now - t.connected_at, 1),
                    "rtt_ms": None if st.rtt is None else round(st.rtt * 1000, 3),
                    "streams": st.streams,
                    "bytes_sent": st.bytes_sent,
                    "bytes_received": st.bytes_received,
                    "names": sorted(t.names),
                    "draining": t.session.draining,
                    **st.qos_status(),
                    **(self.expiry.edge_status(t.cert) if t.cert is not None else {}),
                }
            )
        doc = {
            "replica": self.replica,
            "ready": self.ready,
            "tls_reloads": self.tls.reloads,
            "edges": edges,
            "certificates": self.expiry.status_entries(),
            "aliases": self.aliases.entries(),
            "refused_tunnels": [  # the most recent, oldest first (bounded)
                dataclasses.asdict(r) for r in self.registry.refusals
            ],
        }
        for key, watched in (
            ("authz_file", self.authz and self.authz.file),
            ("revoked_file", self.revocation and self.revocation.file),
        ):
            if watched:
                doc[key] = watched.status()
        if self.enroll is not None:
            doc["enrollment"] = self.enroll.status()
        # every watched file by its config key: re-reads, failures, the last error
        doc["files"] = {f.what: f.status() for f in self.watched_files()}
        body = json.dumps(doc, indent=1).encode()
        return 200, "application/json", body

    async def run(
        self, *, task_status: trio.TaskStatus[CloudPorts] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            if self.revocation is not None:
                nursery.start_soon(self.revocation.watch, self.close_revoked, FILE_CHECK_INTERVAL)
            if self.authz is not None:
                nursery.start_soon(self.authz.watch, FILE_CHECK_INTERVAL)
            if self.auth is not None:
                nursery.start_soon(self.auth.watch, FILE_CHECK_INTERVAL)
            if self.enroll is not None:
                nursery.start_soon(self.enroll.tokens.file.watch, FILE_CHECK_INTERVAL)
            nursery.start_soon(self.expiry.run)
            nursery.start_soon(self.aliases.run, lambda: {t.identity.unit for t in self.registry})
            tunnel_port = await nursery.start(self.tunnels.serve)
            proxy_port = 0
            if self.cfg.proxy.listen is not None:
                proxy_port = await nursery.start(serve_proxy, self.proxy)
            tls_port = 0 if self.proxy_tls is None else await nursery.start(self.proxy_tls.serve)
            admin_port = await nursery.start(serve_admin, self.cfg.admin, self)
            self.ready = True
            log.info(
                "tunnel-cloud up",
                extra={
                    "replica": self.replica,
                    "tunnel_port": tunnel_port,
                    "proxy_port": proxy_port,
                    "proxy_tls_port": tls_port,
                    "admin_port": admin_port,
                },
            )
            task_status.started(CloudPorts(tunnel_port, proxy_port, admin_port, tls_port))

    async def drain(self) -> None:
        """Stop taking new edges and CONNECTs, ask every edge to drain, wait for streams to end."""
        self.ready = False
        self.tunnels.stop_listening()
        self.proxy.listener_scope.cancel()
        if self.proxy_tls is not None:
            self.proxy_tls.listener_scope.cancel()
        for t in self.registry:
            t.session.goaway("tunnel-cloud shutting down")
        deadline = trio.current_time() + self.cfg.tunnel.drain_timeout
        for t in list(self.registry):
            await t.session.wait_idle(deadline)
        for t in self.registry:
            t.session.close("tunnel-cloud shut down")
