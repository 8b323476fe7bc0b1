"""`TLSClient`: a TLS client stream with TLS 1.3's half-close, for `kins-tunnel connect` through an
``https://`` proxy (trio's SSLStream can only close both ways)."""

from __future__ import annotations

import contextlib
import ssl

import trio

CHUNK = 256 * 1024  # bytes read from the socket at a time


class TLSClient(trio.abc.HalfCloseableStream):
    """TLS over a TCP stream (ssl.MemoryBIO), with TLS 1.3's half-close: `send_eof` sends
    close_notify and the stream stays open for reading (trio.SSLStream can only close both ways).

    One task may send while another receives; socket writes are serialised by a lock. TLS errors
    become `trio.BrokenResourceError` with the `ssl.SSLError` as cause. An EOF without
    close_notify reads as an ordinary end (like trio's ``https_compatible``).
    """

    def __init__(
        self, tcp: trio.SocketStream, context: ssl.SSLContext, server_hostname: str
    ) -> None:
        self.tcp = tcp
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_hostname=server_hostname)
        self._send_lock = trio.Lock()
        self._eof_sent = False
        self._received = False  # any application data yet

    async def _flush(self) -> None:
        async with self._send_lock:
            while pending := self._out.read():
                await self.tcp.send_all(pending)

    async def _feed(self) -> None:
        data = await self.tcp.receive_some(CHUNK)
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()

    async def do_handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._feed()
            except ssl.SSLError as exc:
                await self._flush_quietly()  # the alert, if any
                raise trio.BrokenResourceError(f"TLS handshake: {exc}") from exc
        await self._flush()

    async def _flush_quietly(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self._flush()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while True:
            try:
                data = self._tls.read(max_bytes or CHUNK)
            except ssl.SSLWantReadError:
                await self._flush()  # post-handshake messages (key updates, session tickets)
                await self._feed()
                continue
            except ssl.SSLZeroReturnError:
                return b""
            except ssl.SSLEOFError as exc:
                if not self._received:  # cut before a word: a refused client certificate looks so
                    raise trio.BrokenResourceError("TLS: connection ended before any data") from exc
                return b""
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(f"TLS: {exc}") from exc
            self._received = True
            data = self._more(data, max_bytes or CHUNK)
            if self._out.pending:
                await self._flush()
            return data

    def _more(self, data: bytes, limit: int) -> bytes:
        """Records already received, up to `limit` (SSL_read yields one 16 KiB record per call)."""
        parts = [data]
        size = len(data)
        while size < limit and (self._in.pending or self._tls.pending()):
            try:
                chunk = self._tls.read(limit - size)
            except ssl.SSLError:
                break  # incomplete record, or the end: the next receive_some sees it
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof was called")
        try:
            self._tls.write(data)
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(f"TLS: {exc}") from exc
        await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        await self.tcp.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """close_notify: the far end sees the end of our data and may go on sending (TLS 1.3)."""
        if self._eof_sent:
            return
        self._eof_sent = True
        try:
            self._tls.unwrap()
        except ssl.SSLWantReadError:
            pass  # the peer's close_notify comes later, through receive_some
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(f"TLS: {exc}") from exc
        await self._flush()

    async def aclose(self) -> None:
        await self.tcp.aclose()
