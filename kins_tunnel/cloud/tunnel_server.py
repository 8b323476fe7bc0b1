"""The edge listener: accept TCP, mutual TLS, identity from the client certificate, then a session.

Admission (see `admission`): one deadline from accept (`handshake_timeout`) covers everything up
to an established tunnel; the first byte must come within `first_byte_timeout`; pending and
concurrent handshakes are bounded, the oldest pending shed first and slow handshakes displaced,
so neither an idle flood nor a reconnect storm locks real edges out. A handshake slot covers the
server's work up to its flight, not the wait for the edge's answer (a round trip). The edge's
unit and node come only from its certificate; the names it advertises are filtered by the routing
rule, and refused names are logged with the reason.

Enrolment (`cloud.enroll`): with an ``enrollment`` section the listener lets a client come without
a certificate; a connection that negotiated `ENROLL_ALPN` is handed to `enrol` (and can do nothing
else), every other one still needs a verified certificate, as before, or it is refused
(``no_certificate``) before any tunnel session exists.

Certificate rotation: the server context comes from a `ReloadingContext`, checked on accept at
most once a second; renewed files apply to new handshakes, live tunnels keep theirs.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable

import trio

from kins_tunnel import __version__
from kins_tunnel.certs import ENROLL_ALPN, EdgeIdentity, ReservedName, identity_from_der
from kins_tunnel.certs.identity import CertFacts, cert_facts, load_der
from kins_tunnel.certwatch import ReloadingContext
from kins_tunnel.cloud.admission import Admission
from kins_tunnel.cloud.registry import EdgeTunnel, NodeTaken, Refusal, Registry, allowed_name
from kins_tunnel.cloud.tls_failures import CLIENT_CERTIFICATE, NOT_TLS
from kins_tunnel.config import CloudConfig
from kins_tunnel.logs import LogBudget
from kins_tunnel.metrics import Metrics
from kins_tunnel.names import source_key
from kins_tunnel.proto import ErrorCode, Hello, Role
from kins_tunnel.tls_contexts import failure_label
from kins_tunnel.transport.errors import HandshakeFailed
from kins_tunnel.transport.listen import peer_authority, serve_port
from kins_tunnel.transport.refusal import encode_refusal
from kins_tunnel.transport.session import Session
from kins_tunnel.transport.tcpinfo import peer_state
from kins_tunnel.transport.tls import TLSSocket, TransportError
from kins_tunnel.transport.tunnel import TunnelSide

log = logging.getLogger("kins_tunnel.cloud.tunnel")

# connections accepted per wake-up of the tunnel port, at most (a reconnect storm is not left in the
# listen backlog while handshakes run); fewer when admission's pending set is nearly full
ACCEPT_BURST = 128


class TunnelServer:
    def __init__(
        self,
        cfg: CloudConfig,
        context: ReloadingContext | ssl.SSLContext,
        registry: Registry,
        metrics: Metrics,
    ) -> None:
        self.cfg = cfg
        self.tls = context if isinstance(context, ReloadingContext) else None
        self._static = context if isinstance(context, ssl.SSLContext) else None
        self.registry = registry
        self.metrics = metrics
        t = cfg.tunnel
        self.side = TunnelSide(
            Role.SERVER,
            cfg.mux,
            t.ping_interval,
            t.ping_timeout,
            metrics.report_internal_error,
            idle_ping_interval=t.idle_ping_interval,
        )
        self.admission = Admission(
            max_pending=t.max_pending_handshakes,
            max_concurrent=t.max_concurrent_handshakes,
            slow_handshake=t.slow_handshake,
        )
        self._agent = f"kins-tunnel-cloud/{__version__}"  # our HELLO's agent, one string
        self.listening = trio.Event()
        self._listener_scope: trio.CancelScope | None = None
        self._refusal_log = LogBudget(REFUSALS_LOGGED_PER_SECOND)
        # why an edge (identity, DER certificate) is revoked, or None (set by the cloud)
        self.revoked: Callable[[EdgeIdentity, bytes | None], str | None] = lambda identity, der: (
            None
        )
        # answers streams an edge opens (uplinks): (identity, peer, session, stream id, target); None: refused
        self.on_edge_open: Callable[[EdgeIdentity, str, Session, int, str], None] | None = None
        # answers an enrolment connection (TLS done, ALPN ENROLL_ALPN): (tls, peer); None: none
        self.enrol: Callable[[TLSSocket, str], Awaitable[None]] | None = None

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        self._listener_scope = trio.CancelScope()
        await serve_port(
            self.cfg.tunnel.listen,
            "tunnel.listen",
            self._handle,
            where="tunnel",
            report=self.metrics.report_internal_error,
            stop=self._listener_scope,
            on_listening=lambda port: self.listening.set(),
            accept_burst=self.admission.room_for(ACCEPT_BURST),
            task_status=task_status,
        )

    @property
    def context(self) -> ssl.SSLContext:
        if self.tls is not None:
            return self.tls.context
        assert self._static is not None
        return self._static

    def stop_listening(self) -> None:
        """Close the listening socket (drain); live tunnels go on."""
        if self._listener_scope is not None:
            self._listener_scope.cancel()

    def _refuse(self, peer: str, reason: str, detail: str) -> None:
        self.metrics.handshake_failures.labels(reason).inc()
        if self._refusal_log.allow():  # a flood of bad connections must not flood the log too
            log.warning(
                "edge handshake refused",
                extra={
                    "peer": peer,
                    "reason": detail,
                    "label": reason,
                    "not_logged_before": self._refusal_log.take_suppressed(),
                },
            )

    def _refuse_tunnel(
        self, session: Session, identity: EdgeIdentity, peer: str, reason: str, detail: str
    ) -> None:
        """An established tunnel the registry will not route: tell the edge why and close it."""
        self.registry.refused(
            Refusal(time.time(), identity.unit, identity.node, peer, reason, detail)
        )
        self._refuse(peer, reason, detail)
        session.close(detail, ErrorCode.NOT_ALLOWED)

    async def _handle(self, tcp: trio.SocketStream) -> None:
        t = self.cfg.tunnel
        deadline = trio.current_time() + t.handshake_timeout  # from accept, queueing included
        peer = peer_authority(tcp.socket)
        # whose share of the pending set this uses (an IPv6 peer by its /64)
        ticket = self.admission.arrive(deadline, source_key(peer.rpartition(":")[0]))
        tls: TLSSocket | None = None
        identity: EdgeIdentity | None = None
        facts: CertFacts | None = None
        enrolling = False
        spoke = False  # sent a whole ClientHello record: an edge that will read the hint
        try:
            with ticket.scope:
                # a handshake slot is for a connection whose ClientHello is in: one that sends
                # part of a record and stalls waits here (pending, shed first), not in a slot
                hello = await read_first_record(tcp.socket, t.first_byte_timeout)
                if hello is None:
                    self._refuse(
                        peer,
                        "idle",
                        f"no data within first_byte_timeout ({t.first_byte_timeout:g}s)",
                    )
                    return
                spoke = True
                self.admission.spoke(ticket)
                with trio.move_on_at(ticket.accepted + t.handshake_timeout / 2) as queued:
                    await self.admission.acquire(ticket)
                # The edge's own deadline runs from its connect, listen backlog included: a
                # ClientHello that has waited half the timeout is refused with a hint (the edge
                # will not wait for the whole handshake), and a peer gone meanwhile is not served.
                gone, waited = peer_state(tcp.socket)
                if gone:
                    ticket.shed("gone")
                elif queued.cancelled_caught or waited > t.handshake_timeout / 2:
                    ticket.shed("queued")
                if ticket.reason is not None:
                    await trio.lowlevel.checkpoint()  # a shed ticket's scope ends it here
                if self.tls is not None:
                    await (
                        self.tls.refresh()
                    )  # renewed files apply to new handshakes (checked ≤ 1/s)
                tls = TLSSocket.wrap(
                    socket.socket(fileno=tcp.socket.detach()), self.context, server_side=True
                )
                # the slot goes back once the server's flight is written: the edge's answer is
                # awaited in the pending set, under the same deadline, and finished with a slot
                # again, before new ClientHellos (see `admission`)
                verified = await self._tls_handshake(
                    tls,
                    hello,
                    functools.partial(self.admission.answering, ticket),
                    functools.partial(self.admission.resume, ticket),
                )
                await self.admission.step_done()  # the last step, with its slot (`admission`)
                enrolling = verified is None
                if verified is not None:
                    identity, facts = verified
        except (TransportError, ValueError) as exc:
            self._refuse(peer, _reason_label(exc), str(exc))
            return
        finally:
            self.admission.leave(ticket)
        if enrolling and tls is not None and self.enrol is not None:
            try:
                with trio.move_on_at(deadline):  # the same deadline from accept as a tunnel
                    await self.enrol(tls, peer)
            finally:
                tls.close()
            return
        if identity is None or facts is None or tls is None:  # deadline or shed: scope ended it
            reason = ticket.reason or "timeout"
            if tls is None:  # no TLS yet: tell the edge when to come back
                # only a connection that spoke counts as an edge coming back (a flood of silent
                # sockets shed from the pending set must not lengthen every edge's hint)
                # (a connection refused on arrival, the pending set full, may have spoken too)
                spoke = _drain(tcp) or spoke
                hint = self.admission.refusal_hint() if spoke else self.admission.retry_after()
                _send_refusal(tcp, hint)
            self._refuse(
                peer,
                reason,
                _SHED_DETAIL.get(
                    reason, f"not established within handshake_timeout ({t.handshake_timeout:g}s)"
                ),
            )
            return
        self.admission.completed()
        resumed = tls.session_reused
        self.metrics.tls_handshakes.labels("resumed" if resumed else "full").inc()
        der = tls.peer_certificate_der()
        revoked = self.revoked(identity, der)
        if revoked is not None:
            tls.close()
            self._refuse(peer, "revoked", f"{identity.unit}/{identity.node}: {revoked}")
            return
        # a resumed session's certificate was verified when its ticket was issued: check its dates
        stale = _outside_validity(facts) if resumed else None
        if stale is not None:
            tls.close()
            self._refuse(peer, "expired", f"{identity.unit}/{identity.node}: {stale}")
            return
        # this frame lasts as long as the tunnel: let go of what only the set-up needed (the
        # ClientHello, the admission ticket and its scopes, the certificate's bytes)
        del hello, queued, ticket, verified, der
        await self._run_tunnel(tls, identity, facts, peer, deadline)

    async def _tls_handshake(
        self,
        tls: TLSSocket,
        received: bytes,
        waiting_for_peer: Callable[[], Awaitable[None]],
        peer_answered: Callable[[], Awaitable[None]],
    ) -> tuple[EdgeIdentity, CertFacts] | None:
        """The verified edge identity and its certificate's facts (the certificate loaded once);
        None for an enrolment connection (nothing else). `waiting_for_peer`, `peer_answered`:
        see `TLSSocket.do_handshake`."""
        try:
            await tls.do_handshake(
                received, waiting_for_peer=waiting_for_peer, peer_answered=peer_answered
            )
            if self.enrol is not None and tls.alpn_protocol() == ENROLL_ALPN:
                return None
            der = tls.peer_certificate_der()
            if der is None:
                raise TransportError("no client certificate")
            cert = load_der(der)
            return identity_from_der(cert), cert_facts(cert)
        except BaseException:
            tls.close()
            raise

    async def _run_tunnel(
        self, tls: TLSSocket, identity: EdgeIdentity, facts: CertFacts, peer: str, deadline: float
    ) -> None:
        try:
            await self.side.serve(  # the tunnel in this task: its reader (idle costs one task)
                tls,
                # `time` lets an edge's `kins-tunnel doctor` measure clock skew (older peers ignore it)
                Hello(agent=self._agent, time=time.time()),
                label=f"{identity.unit}/{identity.node}@{peer}",
                handshake_timeout=max(deadline - trio.current_time(), 0.0),
                on_open=None
                if self.on_edge_open is None
                else functools.partial(self.on_edge_open, identity, peer),
                pacing=self.cfg.qos.pacing(identity.unit),
                on_up=functools.partial(self._tunnel_up, identity=identity, facts=facts, peer=peer),
            )
        except HandshakeFailed as exc:
            self.metrics.handshake_failures.labels(exc.reason).inc()
            log.warning(
                "edge tunnel handshake failed",
                extra={**_labels(identity), "peer": peer, "reason": str(exc)},
            )

    def _tunnel_up(
        self, session: Session, *, identity: EdgeIdentity, facts: CertFacts, peer: str
    ) -> Callable[[], None] | None:
        """The tunnel is open: route its names (displacing this identity's oldest tunnels beyond
        the limit). Returns what to do when it is over (None: it was refused)."""
        names, refused = [], []
        for name in session.peer_names:
            ok = allowed_name(identity, name)
            if ok is None:
                refused.append(name)
            else:
                names.append(ok)
        if refused:  # one line per tunnel, however many names a peer sends
            log.warning(
                "edge advertised names outside its unit/node: not routed",
                extra={
                    **_labels(identity),
                    "peer": peer,
                    "count": len(refused),
                    "advertised": ",".join(refused[:MAX_NAMES_LOGGED])[:MAX_LOGGED_CHARS],
                },
            )
        tunnel = EdgeTunnel(identity, session, tuple(dict.fromkeys(names)), peer, cert=facts)
        try:
            displaced = self.registry.add(tunnel)
        except NodeTaken as exc:
            self._refuse_tunnel(session, identity, peer, "node_taken", str(exc))
            return None
        # what the tunnel's end does, held for the tunnel's life: one small object, no closure
        down = functools.partial(self._tunnel_down, tunnel)
        try:  # routed now: whatever fails from here must take the route back
            for old in displaced:
                self.metrics.tunnels_displaced.inc()
                log.warning(
                    "edge tunnel displaced by a newer one of the same identity",
                    extra={
                        **_labels(identity),
                        "peer": old.peer,
                        "by": peer,
                        "limit": self.registry.max_per_identity,
                    },
                )
                old.session.close(
                    "displaced by a newer tunnel of this edge identity "
                    f"(tunnel.max_tunnels_per_identity {self.registry.max_per_identity})",
                    ErrorCode.NO_ERROR,
                )
            log.info(
                "edge connected",
                extra={
                    **_labels(identity),
                    "peer": peer,
                    "names": ",".join(sorted(names)),
                    "agent": session.peer_agent,
                },
            )
        except BaseException:
            down()
            raise
        return down

    def _tunnel_down(self, tunnel: EdgeTunnel) -> None:
        """A routed tunnel is over: take its route back."""
        self.registry.remove(tunnel)
        log.info(
            "edge disconnected",
            extra={
                **_labels(tunnel.identity),
                "peer": tunnel.peer,
                "reason": tunnel.session.close_reason,
            },
        )


def _labels(identity: EdgeIdentity) -> dict[str, str]:
    """The log fields that name an edge."""
    return {"unit": identity.unit, "node": identity.node}


TLS_HANDSHAKE_RECORD = 22  # a TLS record's content type: handshake (a ClientHello's)
MAX_FIRST_RECORD = 5 + 16384  # a TLS record's header and its largest plaintext body


async def read_first_record(
    sock: trio.socket.SocketType, first_byte_timeout: float
) -> bytes | None:
    """What the peer sent, read until its first TLS record is whole (a ClientHello), at most
    `MAX_FIRST_RECORD` bytes; returned early at EOF or when the bytes are not a TLS handshake
    record (OpenSSL then refuses them). None: not one byte within `first_byte_timeout`. The
    caller's deadline bounds the rest.

    A connection taken from the listen backlog usually has its ClientHello in already: it is
    read at once, without waiting for the socket (no cancel scope, no poller registration, no
    task switch: this is not a checkpoint then; the tunnel port's next step, admission, is)."""
    fd = sock.fileno()
    got = b""
    while True:
        try:
            data = os.read(fd, MAX_FIRST_RECORD - len(got))
        except (BlockingIOError, InterruptedError):
            if got:
                await trio.lowlevel.wait_readable(sock)
                continue
            with trio.move_on_after(first_byte_timeout):
                await trio.lowlevel.wait_readable(sock)
                continue
            return None
        except OSError:  # the peer is gone: OpenSSL sees EOF
            data = b""
        got += data
        if (
            not data
            or got[0] != TLS_HANDSHAKE_RECORD
            or len(got) >= MAX_FIRST_RECORD
            or (len(got) >= 5 and len(got) >= 5 + int.from_bytes(got[3:5], "big"))
        ):
            return got


def _drain(tcp: trio.SocketStream) -> bool:
    """Read (and drop) what a connection about to be refused has sent, so that the close is a FIN
    and not a reset that could discard the refusal on the edge's side. True if it sent bytes."""
    fd = tcp.socket.fileno()
    got = False
    try:
        for _ in range(4):  # a ClientHello is a few hundred bytes; anything more is not an edge's
            if not os.read(fd, 16384):
                break
            got = True
    except OSError:  # nothing more to read (would block), or the peer is gone
        pass
    return got


def _send_refusal(tcp: trio.SocketStream, retry_after: float) -> None:
    """Write the refusal with its hint to a connection shed before TLS, once `_drain`ed (never
    blocks; a socket that does not take it is closed all the same)."""
    fd = tcp.socket.fileno()
    try:
        os.write(fd, encode_refusal(retry_after))
    except OSError:
        pass


def _outside_validity(facts: CertFacts) -> str | None:
    """Why a resumed session's certificate is no longer acceptable (expired or not yet valid)."""
    now = dt.datetime.now(dt.UTC)
    if now > facts.not_after:
        return "certificate expired since its session ticket was issued"
    if facts.not_before is not None and now < facts.not_before:
        return "certificate not yet valid"
    return None


MAX_NAMES_LOGGED = 5  # refused names shown in the one log line of a tunnel
MAX_LOGGED_CHARS = 1024
REFUSALS_LOGGED_PER_SECOND = 20  # beyond: counted in the metric, summarised in the next line


_SHED_DETAIL = {
    "queued": "shed: no handshake slot within half of tunnel.handshake_timeout",
    "gone": "the peer closed before its handshake could start",
    "shed": "shed: too many pending handshakes (tunnel.max_pending_handshakes)",
    "slow": "shed: handshake slower than tunnel.slow_handshake while others waited",
}

_NO_IDENTITY = (("kins uri", "no_identity"), ("identity", "no_identity"))
_HANDSHAKE_FAILURES = (  # text in the error -> label
    CLIENT_CERTIFICATE
    + (("no client certificate", "no_certificate"), ("certificate verify failed", "verify_failed"))
    + (("expired", "expired"),)
    + NOT_TLS
    + _NO_IDENTITY
)


def _reason_label(exc: BaseException) -> str:
    """A short, bounded label for a refused handshake (the handshake_failures metric)."""
    if isinstance(exc, ReservedName):
        return "reserved_name"
    return failure_label(
        exc, _HANDSHAKE_FAILURES, verify_default="verify_failed", default="tls_error"
    )
