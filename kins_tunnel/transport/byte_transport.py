"""What a `Session` needs from the connection under it: a non-blocking byte transport.

`tls.TLSSocket` is the one the product runs on; `testing.memory_transport` is one in memory, so
that a session pair runs in tests without sockets (as trio's `memory_stream_pair` does for
`SSLStream`). The calls are synchronous and never block; the two `wait_*` are the only waits.

Ownership: the session's reader task is the only caller of `receive_into` and `wait_readable`;
the session's writer (`writer.SessionWriter`, whichever task calls `kick`) the only caller of
`send_chunk`, `flush` and `wait_writable`; `close` may come from any task of the session, and
wakes both waits with `TransportError` or `trio.ClosedResourceError`.
"""

from __future__ import annotations

from typing import Protocol


class ByteTransport(Protocol):
    """A connected, non-blocking byte stream a session runs over (see the module's text)."""

    drained: bool  # the last `receive_into` emptied what had arrived: wait before the next

    def receive_into(self, view: memoryview) -> int | None:
        """Copy what has arrived into `view`: the byte count, 0 at EOF, None if nothing is there.
        Raises `TransportError` when the connection failed."""
        ...

    async def wait_readable(self) -> None: ...

    def send_chunk(self, chunk: memoryview | bytes | bytearray) -> bool:
        """Take the whole chunk (it may be reused at once); True if it all went out, False if
        some is `pending` (then `flush()` once writable). Raises `TransportError`."""
        ...

    def flush(self) -> bool:
        """Write what is pending without blocking; True if nothing is left."""
        ...

    async def wait_writable(self) -> None: ...

    @property
    def pending(self) -> int:
        """Bytes taken by `send_chunk` that the connection has not taken yet."""
        ...

    def peer_certificate_der(self) -> bytes | None:
        """The peer's certificate (DER), None if it has none."""
        ...

    def close(self) -> None:
        """Release the connection (idempotent)."""
        ...
