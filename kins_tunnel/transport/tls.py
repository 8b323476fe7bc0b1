"""TLS over a non-blocking `ssl.SSLSocket`, driven by trio's readiness waits.

Theory of operation
-------------------
`trio.SSLStream` pushes every byte through a MemoryBIO and a task switch per 16 KiB record; on this
path that costs more than the cipher. Here the kernel socket is wrapped by `ssl` directly and put
in non-blocking mode: OpenSSL reads and writes the socket itself (no BIO copies, the GIL released
while it encrypts), and trio only tells us when the socket is ready.

- Reading: `SSL_read` yields at most one TLS record (16 KiB) per call, so `receive_into` loops over
  records until OpenSSL wants more bytes from the kernel or the buffer is full: one wake-up, up to
  `READ_BATCH` (256 KiB) of plaintext.
- Writing: OpenSSL (as Python configures it) does not do partial writes; after "want write" the same
  buffer must be offered again. `send_chunk` therefore writes bounded chunks and the caller retries
  the very chunk that did not go out (see `Session`'s writer).

Errors from the socket or OpenSSL become `TransportError` once, here.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Awaitable, Callable

import trio

READ_BATCH = 256 * 1024  # plaintext bytes gathered per wake-up
TLS_MAX_RECORD = 16384  # plaintext bytes of a full TLS record: a shorter one ends a burst


class TransportError(Exception):
    """The tunnel's TLS connection failed (reset, EOF mid-record, TLS alert, ...)."""


class TLSSocket:
    """A connected, non-blocking TLS socket. Owns the socket; `close()` releases it."""

    def __init__(self, sslsock: ssl.SSLSocket) -> None:
        self._s = sslsock
        self._closed = False
        self._peer_der: bytes | None = None
        self.drained = False  # the last receive_into emptied the socket as far as we can tell

    @classmethod
    def wrap(cls, sock: socket.socket, context: ssl.SSLContext, *, server_side: bool,
             server_hostname: str | None = None) -> TLSSocket:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sslsock = context.wrap_socket(
            sock, server_side=server_side, server_hostname=server_hostname,
            do_handshake_on_connect=False, suppress_ragged_eofs=True,
        )
        return cls(sslsock)

    @property
    def raw(self) -> ssl.SSLSocket:
        return self._s

    def fileno(self) -> int:
        return self._s.fileno()

    def peer_certificate_der(self) -> bytes | None:
        """The peer's certificate (DER) as of the handshake; still there after `close()`."""
        return self._peer_der

    async def do_handshake(self) -> None:
        """Run the TLS handshake; the caller sets the deadline."""
        while True:
            try:
                self._s.do_handshake()
                self._peer_der = self._s.getpeercert(binary_form=True)
                return
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self._s)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self._s)
            except (ssl.SSLError, OSError) as exc:
                raise TransportError(f"TLS handshake failed: {_describe(exc)}") from exc

    def receive_into(self, view: memoryview) -> int | None:
        """Decrypt as many records as are ready into `view`, without blocking.

        Returns the byte count (0 means EOF), or None when nothing was ready (wait readable).
        """
        n = 0
        size = len(view)
        recv_into = self._s.recv_into
        pending = self._s.pending
        try:
            while n < size:
                got = recv_into(view[n:], size - n)
                if got == 0:
                    return n if n else 0
                n += got
                if got < TLS_MAX_RECORD and not pending():
                    self.drained = True  # a short record, nothing buffered: wait before reading
                    return n
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except (ssl.SSLError, OSError) as exc:
            if n:
                return n  # hand over what we have; the error shows again on the next call
            raise TransportError(f"tunnel read failed: {_describe(exc)}") from exc
        return n if n else None

    async def wait_readable(self) -> None:
        if self._closed:  # closed by another task of the session: never hand trio fd -1
            raise TransportError("tunnel socket closed")
        await trio.lowlevel.wait_readable(self._s)

    async def wait_writable(self) -> None:
        if self._closed:
            raise TransportError("tunnel socket closed")
        await trio.lowlevel.wait_writable(self._s)

    def send_chunk(self, chunk: memoryview | bytes | bytearray) -> bool:
        """Try to write the whole chunk. False: want-write, offer the *same* chunk again later."""
        try:
            self._s.send(chunk)
            return True
        except ssl.SSLWantWriteError:
            return False
        except ssl.SSLWantReadError:
            return False
        except (ssl.SSLError, OSError) as exc:
            raise TransportError(f"tunnel write failed: {_describe(exc)}") from exc

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            trio.lowlevel.notify_closing(self._s)
        except RuntimeError:  # pragma: no cover - outside trio (tests)
            pass
        try:
            self._s.close()
        except OSError:
            pass


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"{exc.reason}: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.strerror or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return str(exc)


async def connect_tls(host: str, port: int, context: ssl.SSLContext, *, server_hostname: str,
                      open_stream: Callable[[str, int], Awaitable[trio.SocketStream]] | None = None) -> TLSSocket:
    """TCP connect (trio, happy-eyeballs over every address) then wrap; the caller sets deadlines.

    `open_stream(host, port)` replaces the direct TCP connect (the edge's site proxy)."""
    try:
        stream = await (open_stream or trio.open_tcp_stream)(host, port)
    except OSError as exc:
        raise TransportError(f"cannot connect to {host}:{port}: {_describe(exc)}") from exc
    fd = stream.socket.detach()
    sock = socket.socket(fileno=fd)
    tls = TLSSocket.wrap(sock, context, server_side=False, server_hostname=server_hostname)
    try:
        await tls.do_handshake()
    except BaseException:
        tls.close()
        raise
    return tls
