"""The client side of HTTP CONNECT: proxy URLs, proxy credentials and the CONNECT exchange (h11).

Two users: the edge reaches the cloud's tunnel port through a site proxy (`proxy:` in edge.yaml,
`ProxyDialer`), and `kins-tunnel connect` reaches an edge service through the cloud's CONNECT proxy
(ssh's ProxyCommand, `kins_tunnel.connect`).

`http_connect` sends ``CONNECT host:port`` on an open stream and reads the answer with h11; the
caller sets the deadline. On 2xx the stream is a byte pipe to the target, and the bytes the proxy
sent behind its answer head (a target that speaks first, such as sshd) are returned: they belong to
the caller. Any other answer raises `ProxyRefused` with the status, the reason phrase and the first
line of a text/plain body; an answer h11 cannot parse, or none at all, raises `ProxyProtocolError`.
What a proxy sends is untrusted: the head is capped at `MAX_HEAD` bytes, at most `MAX_BODY` bytes of
an error body are read, and text shown to the user is stripped of control characters and shortened.

Credentials: Basic (`user:password`, sent as UTF-8 bytes exactly as given) or Bearer (a token).
A credentials file holds ``user:password``; only its final newline is dropped, so a password may
end in spaces.
"""

from __future__ import annotations

import base64
import os
import socket
from pathlib import Path

import h11
import trio

from kins_tunnel import __version__
from kins_tunnel.names import authority
from kins_tunnel.proxy_url import parse_proxy_url
from kins_tunnel.transport.errors import SetupError, TransportError

MAX_HEAD = 16 * 1024  # answer status line + headers
MAX_BODY = 4 * 1024  # bytes of an error body read for the message
BODY_TIMEOUT = 2.0  # seconds to wait for that body
_SHOWN = 200  # characters of proxy text in a message


class ProxyError(TransportError):
    """The proxy did not give us a tunnel."""


class ProxyRefused(ProxyError):
    """The proxy answered something other than 2xx."""

    def __init__(self, proxy: str, status: int, reason: str, body_line: str) -> None:
        self.status, self.reason, self.body_line = status, reason, body_line
        text = f"proxy {proxy} answered {status}" + (f" {reason}" if reason else "")
        super().__init__(text + (f": {body_line}" if body_line else ""))


class ProxyProtocolError(ProxyError):
    """The proxy's answer was not valid HTTP, or it closed without one."""


def basic_authorization(user: bytes, password: bytes) -> bytes:
    """A Proxy-Authorization value for Basic credentials (RFC 7617: user must not hold ':')."""
    return b"Basic " + base64.b64encode(user + b":" + password)


# the environment variable the client commands (connect, kubeconfig) take a proxy password from
PASSWORD_ENV = "KINS_TUNNEL_PROXY_PASSWORD"


def bearer_authorization(token: bytes) -> bytes:
    return b"Bearer " + token


def read_credentials_file(path: Path) -> tuple[bytes, bytes]:
    """``user:password`` from `path`, exactly: only the final newline (LF or CRLF) is dropped.

    `OSError` if unreadable, `ValueError` (without the secret) if it is not ``user:password``.
    """
    data = path.read_bytes()
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    user, sep, password = data.partition(b":")
    if not sep or not user:
        raise ValueError("expected one line user:password")
    if any(b in b"\r\n" for b in data) or any(b < 0x20 or b == 0x7F for b in user):
        raise ValueError(
            "expected one line user:password (found another line or a control character)"
        )
    return user, password


def connect_error_text(exc: OSError) -> str:
    """Why a TCP connect failed (trio wraps one error per address tried into a generic OSError)."""
    cause = exc.__cause__
    while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        cause = cause.exceptions[0]
    for err in (cause, exc):
        if isinstance(err, socket.gaierror):  # name lookup: its own error numbers
            return err.strerror or str(err)
        if isinstance(err, OSError) and err.errno and err.errno > 0:
            return os.strerror(err.errno)
    return exc.strerror or str(exc)


def _printable(data: bytes | bytearray) -> str:
    text = bytes(data).decode("utf-8", "replace")
    text = "".join(c if c.isprintable() else " " for c in text).strip()
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def _first_line(body: bytes | bytearray) -> str:
    for line in bytes(body).splitlines():
        if line.strip():
            return _printable(line)
    return ""


async def http_connect(
    stream: trio.abc.Stream, target: str, *, proxy: str, authorization: bytes | None = None
) -> bytes:
    """Ask the proxy on `stream` for a tunnel to `target` (``host:port``); return trailing bytes.

    `proxy` names the proxy in messages. The caller sets the deadline and closes `stream` on error.
    """
    if not target.isascii():
        raise ProxyError(f"CONNECT target {target!r} is not ASCII")
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    headers = [
        (b"Host", target.encode("ascii")),
        (b"User-Agent", f"kins-tunnel/{__version__}".encode()),
    ]
    if authorization is not None:
        headers.append((b"Proxy-Authorization", authorization))
    data = conn.send(h11.Request(method="CONNECT", target=target, headers=headers))
    data += conn.send(h11.EndOfMessage())
    try:
        await stream.send_all(data)
        answer = _Answer(stream, conn, proxy)
        response = await answer.response()
        if 200 <= response.status_code < 300:
            trailing, _closed = conn.trailing_data
            return bytes(trailing)
        body = bytearray()
        with trio.move_on_after(BODY_TIMEOUT):  # a refusal is known: its text is a bonus
            try:
                while len(body) < MAX_BODY:
                    event = await answer.next_event()
                    if not isinstance(event, h11.Data):
                        break
                    body += event.data
            except (h11.ProtocolError, ProxyError, trio.BrokenResourceError, OSError):
                pass
        ctype = dict(response.headers).get(b"content-type", b"")
        line = _first_line(body[:MAX_BODY]) if ctype.lower().startswith(b"text/plain") else ""
        raise ProxyRefused(proxy, response.status_code, _printable(response.reason), line)
    except h11.ProtocolError as exc:
        raise ProxyProtocolError(
            f"proxy {proxy} answered with invalid HTTP: {_printable(str(exc).encode())}"
        ) from exc
    except (trio.BrokenResourceError, OSError) as exc:
        raise ProxyProtocolError(
            f"proxy {proxy} broke the connection: {exc.__cause__ or exc}"
        ) from exc


class _Answer:
    """Reads the proxy's answer with h11, keeping its first bytes for messages."""

    def __init__(self, stream: trio.abc.Stream, conn: h11.Connection, proxy: str) -> None:
        self.stream, self.conn, self.proxy = stream, conn, proxy
        self.first = bytearray()

    async def next_event(self) -> object:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self.stream.receive_some(65536)
            if len(self.first) < _SHOWN:
                self.first += data[: _SHOWN - len(self.first)]
            if not data and self.conn.their_state is h11.SEND_RESPONSE:  # no complete answer head
                if not self.first:
                    raise ProxyProtocolError(
                        f"proxy {self.proxy} closed the connection without answering"
                    )
                raise ProxyProtocolError(
                    f"proxy {self.proxy} answered with invalid HTTP "
                    f"(it sent: {_first_line(self.first)})"
                )
            self.conn.receive_data(bytes(data))  # b"": EOF, h11 reports or raises

    async def response(self) -> h11.Response:
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Response):
                return event
            if not isinstance(event, h11.InformationalResponse):  # 1xx: skip
                raise ProxyProtocolError(
                    f"proxy {self.proxy} closed the connection without answering"
                )


class ProxyDialer:
    """Opens TCP streams through a plain-http CONNECT proxy (the edge's `proxy:` setting).

    The credentials file is read once here (an unreadable or malformed file is a `SetupError` at
    start-up) and again before every CONNECT, so a changed password is used by the next attempt.
    """

    def __init__(self, url: str, credentials_file: Path | None = None) -> None:
        self.url = parse_proxy_url(url, schemes=("http",), userinfo=False)
        self.credentials_file = credentials_file
        if credentials_file is not None:
            try:
                read_credentials_file(credentials_file)
            except (OSError, ValueError) as exc:
                raise SetupError(
                    f"proxy.credentials_file: {credentials_file}: "
                    f"{getattr(exc, 'strerror', None) or exc}"
                ) from None

    def _authorization(self) -> bytes | None:
        if self.credentials_file is None:
            return None
        try:
            return basic_authorization(*read_credentials_file(self.credentials_file))
        except (OSError, ValueError) as exc:
            raise ProxyError(
                f"proxy.credentials_file: {self.credentials_file}: "
                f"{getattr(exc, 'strerror', None) or exc}"
            ) from None

    async def open(self, host: str, port: int) -> trio.SocketStream:
        """A TCP stream to `host:port` through the proxy; the caller sets the deadline."""
        authorization = self._authorization()
        proxy = self.url.authority
        try:
            stream = await trio.open_tcp_stream(self.url.host, self.url.port)
        except OSError as exc:
            raise TransportError(
                f"cannot connect to proxy {proxy}: {connect_error_text(exc)}"
            ) from exc
        try:
            trailing = await http_connect(
                stream, authority(host, port), proxy=proxy, authorization=authorization
            )
            if trailing:  # the cloud never speaks first: these bytes are not from it
                raise ProxyProtocolError(
                    f"proxy {proxy} sent {len(trailing)} bytes before the TLS handshake"
                )
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream
