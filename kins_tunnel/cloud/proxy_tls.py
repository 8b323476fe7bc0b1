"""The CONNECT proxy over TLS (`proxy.tls`): the same proxy, with the client's bytes encrypted.

Plain HTTP on a NodePort sends Proxy-Authorization credentials and target names in clear text;
kubectl (client-go), curl and others speak HTTPS to a proxy (``proxy-url: https://...``) and verify
its certificate. This listener accepts TCP, runs the TLS handshake under the proxy's
`header_timeout`, and hands a `TLSClientStream` to the very same CONNECT handler as the plain
listener. A failed handshake is counted by reason
(``kins_tunnel_proxy_tls_failures_total``) and logged; it never reaches the handler.

With ``proxy.tls.client_ca``, a client certificate signed by that CA is required and is the
client's credential: its subject CN is the principal and its O values are groups (as Kubernetes
does). A certificate that carries an edge identity (``spiffe://kins-tunnel/...``) is refused:
an edge's credential never authenticates a user. Without ``client_ca``, clients authenticate with
Proxy-Authorization exactly as on the plain listener.

Revocation (`revoked`, the cloud's ``tunnel.revoked_file``): a revoked client certificate is
refused right after the handshake (the connection is closed before any request is read, counted
as ``reason="revoked"``), and `close_revoked` ends the live relays of certificates revoked since
(each connection runs its handler in its own cancel scope).

Half-close: a TLS stream is closed as a whole, so a target's end of stream (FIN) is not passed to
the client separately; the client's own protocol (TLS or HTTP inside) sees the end, and the
connection closes when the relay ends.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import trio
from cryptography import x509

from kins_tunnel.certs.identity import cert_facts
from kins_tunnel.certwatch import ReloadingContext
from kins_tunnel.cloud.auth import Principal
from kins_tunnel.cloud.tls_failures import CLIENT_CERTIFICATE, NOT_TLS
from kins_tunnel.config_proxy import ProxyTLS
from kins_tunnel.httpanswer import send_and_linger
from kins_tunnel.logs import SourceBudget
from kins_tunnel.tls_contexts import failure_label
from kins_tunnel.transport.isolation import ErrorReporter
from kins_tunnel.transport.listen import peer_authority, serve_port, warn_unauthenticated

log = logging.getLogger("kins_tunnel.cloud.proxy")
CLOSE_TIMEOUT = 2.0  # seconds to send close_notify before the socket is simply closed
_EDGE_URI = "spiffe://kins-tunnel/"


class TLSClientStream(trio.abc.HalfCloseableStream):
    """A client connection of the TLS listener, as the CONNECT handler sees it.

    `principal` is the client certificate's principal (None without ``client_ca``); `socket` is
    the TCP socket under TLS (for the client address and socket options); `accepted_at` is when
    the TCP connection was accepted (the proxy's `header_timeout` counts from there, TLS included).
    """

    def __init__(
        self,
        ssl_stream: trio.SSLStream[trio.SocketStream],
        principal: Principal | None,
        accepted_at: float,
    ) -> None:
        self._ssl = ssl_stream
        self.principal = principal
        self.accepted_at = accepted_at
        self.eof_sent = False
        self.certificate: bytes | None = None  # the verified client certificate (DER), if any

    @property
    def socket(self) -> trio.socket.SocketType:
        return self._ssl.transport_stream.socket

    def setsockopt(self, level: int, option: int, value: int | bytes) -> None:
        self._ssl.transport_stream.setsockopt(level, option, value)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._ssl.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._ssl.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        try:
            return bytes(await self._ssl.receive_some(max_bytes))
        except trio.BrokenResourceError as exc:
            if isinstance(exc.__cause__, ssl.SSLEOFError):
                return b""  # the client closed TCP without close_notify: an ordinary end here
            raise

    async def send_eof(self) -> None:
        """A TLS stream has no half-close here: noted, and the stream stays open for reading."""
        self.eof_sent = True
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        with trio.move_on_after(CLOSE_TIMEOUT):
            try:
                await self._ssl.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        await trio.aclose_forcefully(self._ssl.transport_stream)


def principal_from_certificate(der: bytes) -> Principal:
    """The principal of a verified client certificate; `ValueError` if it cannot be one."""
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if any(u.lower().startswith(_EDGE_URI) for u in uris):
        raise ValueError("an edge certificate is not a proxy client credential")
    facts = cert_facts(der)
    if not facts.common_name.strip() or any(c.isspace() or c == ":" for c in facts.common_name):
        raise ValueError("client certificate subject has no usable CN (the principal name)")
    return Principal(facts.common_name, "cert", frozenset(facts.organizations))


_HANDSHAKE_FAILURES = (  # text in the error -> label
    *CLIENT_CERTIFICATE,
    ("expired", "expired"),
    *NOT_TLS,
    ("proxy request", "not_tls"),
    ("unsupported protocol", "old_tls"),
    ("no shared cipher", "no_shared_cipher"),
)


def handshake_failure_label(exc: BaseException) -> str:
    """A short, bounded label for a failed proxy TLS handshake."""
    if isinstance(exc, ValueError):
        text = str(exc)
        if text.startswith("revoked"):
            return "revoked"
        return "edge_certificate" if "edge certificate" in text else "no_principal"
    cause = exc.__cause__ or exc
    text = str(cause).lower().replace("_", " ")
    if "alert" in text and any(
        k in text for k in ("bad certificate", "unknown ca", "certificate unknown")
    ):
        return "client_rejected_certificate"  # the client does not trust the proxy's certificate
    eof = isinstance(cause, (ssl.SSLEOFError, trio.BrokenResourceError))
    return failure_label(
        exc,
        _HANDSHAKE_FAILURES,
        verify_default="unknown_ca",
        default="eof" if eof else "tls_error",
        text_of=cause,
    )


@dataclass(eq=False)
class ProxyTLSListener:
    """Accepts TLS clients and passes each, as a `TLSClientStream`, to `handler`."""

    settings: ProxyTLS
    tls: ReloadingContext
    handshake_timeout: float
    handler: Callable[[TLSClientStream], Awaitable[Any]]
    report: ErrorReporter
    on_failure: Callable[[str], object] | None = None  # with a failure label
    _: KW_ONLY
    authenticated: bool = True
    max_handshakes: int = 10000  # TLS handshakes in progress at once; beyond: closed
    # why a verified client certificate (DER) is revoked, or None; None: nothing is revoked
    revoked: Callable[[bytes], str | None] | None = None
    on_revoked_close: Callable[[], object] | None = None  # a live relay closed by `close_revoked`
    # log lines of failed handshakes, per source address (the cloud shares the plain proxy's)
    early_log: SourceBudget = field(default_factory=SourceBudget)
    handshaking: int = field(default=0, init=False)
    # connections with a client certificate, past the handshake: each handler's cancel scope
    live: dict[TLSClientStream, trio.CancelScope] = field(default_factory=dict, init=False)
    # cancelled to stop accepting (drain)
    listener_scope: trio.CancelScope = field(default_factory=trio.CancelScope, init=False)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listen = self.settings.listen

        def listening(port: int) -> None:
            if not self.authenticated:
                warn_unauthenticated(
                    "CONNECT proxy (TLS)",
                    listen.host,
                    port,
                    "set proxy.auth or proxy.tls.client_ca",
                )

        await serve_port(
            listen,
            "proxy.tls.listen",
            self._handle,
            where="proxy_tls",
            report=self.report,
            stop=self.listener_scope,  # cancelled to stop accepting (drain); open relays go on
            on_listening=listening,
            task_status=task_status,
        )

    async def _handle(self, tcp: trio.SocketStream) -> None:
        accepted = trio.current_time()
        client = peer_authority(tcp.socket)
        if self.handshaking >= self.max_handshakes:
            if self.on_failure is not None:
                self.on_failure("too_many")
            if self.early_log.allow(client.rpartition(":")[0]):
                log.info(
                    "proxy TLS handshake refused",
                    extra={
                        "client": client,
                        "reason": "too_many",
                        "detail": f"{self.max_handshakes} handshakes in progress",
                        "not_logged_before": self.early_log.take_suppressed(),
                    },
                )
            await trio.aclose_forcefully(tcp)
            return
        await (
            self.tls.refresh()
        )  # renewed files apply to new handshakes (checked at most once a second)
        ssl_stream = trio.SSLStream(tcp, self.tls.context, server_side=True)
        principal = None
        self.handshaking += 1
        try:
            with trio.fail_after(self.handshake_timeout):
                await ssl_stream.do_handshake()
            if self.settings.client_ca is not None:
                der = ssl_stream.getpeercert(binary_form=True)
                if not der:
                    raise ValueError("no client certificate")
                principal = principal_from_certificate(der)
                reason = self.revoked(der) if self.revoked is not None else None
                if reason is not None:
                    raise ValueError(f"revoked: {reason}")
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.TooSlowError,
            ValueError,
            OSError,
        ) as exc:
            label = handshake_failure_label(exc)
            if self.on_failure is not None:
                self.on_failure(label)
            if self.early_log.allow(client.rpartition(":")[0]):  # always counted, logged in budget
                log.info(
                    "proxy TLS handshake failed",
                    extra={
                        "client": client,
                        "reason": label,
                        "detail": str(exc.__cause__ or exc)[:200],
                        "not_logged_before": self.early_log.take_suppressed(),
                    },
                )
            await _lingering_close(tcp)
            return
        finally:
            self.handshaking -= 1
        client_stream = TLSClientStream(ssl_stream, principal, accepted)
        scope = trio.CancelScope()
        if principal is not None:
            client_stream.certificate = der
            self.live[client_stream] = scope
        try:
            with scope:
                await self.handler(client_stream)
        finally:  # close_notify (bounded) rather than a bare TCP close after an error answer
            self.live.pop(client_stream, None)
            await client_stream.aclose()

    def close_revoked(self, revoked: Callable[[bytes], str | None]) -> int:
        """End the connections whose client certificate `revoked` names; returns how many."""
        closed = 0
        for stream, scope in list(self.live.items()):
            reason = None if stream.certificate is None else revoked(stream.certificate)
            if reason is None or scope.cancel_called:
                continue
            log.warning(
                "proxy client closed: revoked",
                extra={
                    "principal": stream.principal.name if stream.principal else "",
                    "reason": reason,
                },
            )
            scope.cancel()
            if self.on_revoked_close is not None:
                self.on_revoked_close()
            closed += 1
        return closed


async def _lingering_close(tcp: trio.SocketStream) -> None:
    """Close after a refused handshake without an RST: a client that already sent its request
    (TLS 1.3 finishes on the client's side before the server checks its certificate) must read
    the server's alert, which an RST would destroy."""
    try:
        await send_and_linger(tcp, b"")
    finally:
        await trio.aclose_forcefully(tcp)
