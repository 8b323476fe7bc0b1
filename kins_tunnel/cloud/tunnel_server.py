"""The edge listener: accept TCP, mutual TLS, identity from the client certificate, then a session.

Handshakes run under `handshake_timeout` and a concurrency cap (a reconnect storm of thousands of
edges is served a few hundred at a time instead of starving everything else of CPU). The edge's
unit and node come only from its certificate; the names it advertises are filtered by the routing
rule, and refused names are logged with the reason.

Certificate rotation: the server context comes from a `ReloadingContext`, checked on accept at
most once a second; renewed files apply to new handshakes, live tunnels keep theirs.
"""

from __future__ import annotations

import functools
import logging
import socket
import ssl

import trio

from kins_tunnel import __version__
from kins_tunnel.certs import EdgeIdentity, identity_from_der
from kins_tunnel.certwatch import ReloadingContext
from kins_tunnel.cloud.registry import EdgeTunnel, Registry, allowed_name
from kins_tunnel.config import CloudConfig
from kins_tunnel.metrics import Metrics
from kins_tunnel.mux_config import mux_config
from kins_tunnel.proto import Connection, Hello, Role
from kins_tunnel.transport.listen import accept_forever, open_listener_socket
from kins_tunnel.transport.session import Session
from kins_tunnel.transport.tls import TLSSocket, TransportError

log = logging.getLogger("kins_tunnel.cloud.tunnel")
MAX_CONCURRENT_HANDSHAKES = 256


class TunnelServer:
    def __init__(self, cfg: CloudConfig, context: ReloadingContext | ssl.SSLContext, registry: Registry,
                 metrics: Metrics) -> None:
        self.cfg = cfg
        self.tls = context if isinstance(context, ReloadingContext) else None
        self._static = context if isinstance(context, ssl.SSLContext) else None
        self.registry = registry
        self.metrics = metrics
        self._handshakes = trio.CapacityLimiter(MAX_CONCURRENT_HANDSHAKES)
        self.listening = trio.Event()
        self._listener_scope: trio.CancelScope | None = None

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listen = self.cfg.tunnel.listen
        sock = open_listener_socket(listen.host, listen.port, "tunnel.listen")
        port = sock.getsockname()[1]
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as self._listener_scope:
                async with trio.SocketListener(sock) as listener:
                    self.listening.set()
                    task_status.started(port)
                    await accept_forever(listener, nursery, self._handle, "tunnel.listen")

    @property
    def context(self) -> ssl.SSLContext:
        if self.tls is not None:
            return self.tls.context  # re-reads renewed files, at most once a second
        assert self._static is not None
        return self._static

    def stop_listening(self) -> None:
        """Close the listening socket (drain); live tunnels go on."""
        if self._listener_scope is not None:
            self._listener_scope.cancel()

    async def _handle(self, tcp: trio.SocketStream) -> None:
        try:
            host, port = tcp.socket.getpeername()[:2]
            peer = f"{host}:{port}"
        except OSError:
            peer = "?"
        sock = socket.socket(fileno=tcp.socket.detach())
        tls = TLSSocket.wrap(sock, self.context, server_side=True)
        t = self.cfg.tunnel
        try:
            async with self._handshakes:
                with trio.fail_after(t.handshake_timeout):
                    await tls.do_handshake()
            der = tls.peer_certificate_der()
            if der is None:
                raise TransportError("no client certificate")
            identity = identity_from_der(der)
        except (TransportError, trio.TooSlowError, ValueError) as exc:
            reason = "timeout" if isinstance(exc, trio.TooSlowError) else _reason_label(exc)
            self.metrics.handshake_failures.labels(reason).inc()
            log.warning("edge handshake refused", extra={"peer": peer, "reason": str(exc) or "timeout"})
            tls.close()
            return
        labels = {"unit": identity.unit, "node": identity.node}
        conn = Connection(Role.SERVER, Hello(agent=f"kins-tunnel-cloud/{__version__}"), mux_config(self.cfg.mux))
        session = Session(tls, conn, ping_interval=t.ping_interval, ping_timeout=t.ping_timeout,
                          label=f"{identity.unit}/{identity.node}@{peer}")
        try:
            await self._serve_session(session, identity, labels, peer)
        except* trio.ClosedResourceError:
            # Session.close() (drain, ping timeout, a failed write) closes the socket under the
            # session's own reader/writer, which then raise ClosedResourceError out of serve().
            # The tunnel is over either way; it must not take the listener down with it.
            log.debug("edge tunnel closed under its reader", extra={**labels, "peer": peer})

    async def _serve_session(self, session: Session, identity: EdgeIdentity, labels: dict[str, str],
                             peer: str) -> None:
        t = self.cfg.tunnel
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(functools.partial(session.serve, handshake_timeout=t.handshake_timeout))
            except TransportError as exc:
                self.metrics.handshake_failures.labels("protocol").inc()
                log.warning("edge tunnel handshake failed", extra={**labels, "peer": peer, "reason": str(exc)})
                return
            names = []
            for name in session.peer_names:
                ok = allowed_name(identity, name)
                if ok is None:
                    log.warning("edge advertised a name outside its unit/node: not routed",
                                extra={**labels, "peer": peer, "advertised": name})
                else:
                    names.append(ok)
            tunnel = EdgeTunnel(identity, session, frozenset(names), peer)
            self.registry.add(tunnel)
            log.info("edge connected", extra={**labels, "peer": peer, "names": ",".join(sorted(names)),
                                              "agent": session.peer_agent})
            try:
                await session.closed.wait()
            finally:
                self.registry.remove(tunnel)
                log.info("edge disconnected", extra={**labels, "peer": peer, "reason": session.close_reason})


# OpenSSL X509_V_ERR_* codes worth their own label
_VERIFY_CODES = {9: "not_yet_valid", 10: "expired", 2: "unknown_ca", 18: "unknown_ca", 19: "unknown_ca",
                 20: "unknown_ca", 21: "unknown_ca"}


def _reason_label(exc: BaseException) -> str:
    """A short, bounded label for a refused handshake (the handshake_failures metric)."""
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return _VERIFY_CODES.get(cause.verify_code, "verify_failed")
    t = str(exc).lower().replace("_", " ")  # OpenSSL reasons come as CERTIFICATE_VERIFY_FAILED
    for key, label in (("certificate required", "no_certificate"), ("no client certificate", "no_certificate"),
                       ("peer did not return a certificate", "no_certificate"),
                       ("unknown ca", "unknown_ca"), ("certificate verify failed", "verify_failed"),
                       ("expired", "expired"), ("wrong version", "not_tls"), ("http request", "not_tls"),
                       ("kins uri", "no_identity"), ("identity", "no_identity")):
        if key in t:
            return label
    return "tls_error"
