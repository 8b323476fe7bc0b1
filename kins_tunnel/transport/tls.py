"""TLS over a non-blocking socket: OpenSSL on memory BIOs, the kernel socket driven directly.

Theory of operation
-------------------
`trio.SSLStream` pushes every byte through a MemoryBIO and a task switch per 16 KiB record; an
`ssl.SSLSocket` avoids the task switches but makes OpenSSL do one `write` system call per TLS record
and two `read`s per record (header, then body). Here OpenSSL runs on two memory BIOs and this class
moves ciphertext between them and the kernel socket itself, with trio only telling it when the
socket is ready:

- **Reading** (`receive_into`): one `readv` of up to `RAW_READ` (256 KiB, about 16 records; no
  more than the caller's view has room for) into a scratch buffer shared by every connection of
  the trio run; its bytes go to the incoming BIO as OpenSSL takes them, topping it up to
  `READ_PIECE` (the largest TLS record) whenever it holds less, so that every `SSL_read` finds a
  whole record (no `SSL_WANT_READ` exception before the read's end); `SSL_read` decrypts record
  by record (the SSL object is called directly, not through `ssl.SSLObject`'s wrapper) into the
  caller's buffer, until it is full or the socket has nothing more: one wake-up, up to the
  caller's batch of plaintext, one system call per 256 KiB of ciphertext.
- **Writing** (`send_chunk`): `SSL_write` encrypts a batch `WRITE_PIECE` (one TLS record) at a
  time, each piece's ciphertext taken out of the outgoing BIO at once, then one `writev` puts as
  much of the pieces into the socket as the kernel takes. What the kernel did not take stays here
  as ciphertext (`flush()` goes on with it once the socket is writable); the caller never has to
  offer the same plaintext again, and at most one batch of ciphertext is held per connection,
  released once sent.
- **Memory**: a memory BIO never gives back what it once held (its buffer grows to 4/3 of the
  most it held, and stays). Fed a whole read or a whole batch at once, a connection that once
  carried a bulk transfer kept 325-350 KiB per direction for its life, about nine times an idle
  tunnel. Fed in pieces, each BIO holds at most a record, or, when the caller's view fills up in
  the middle of a read, what is left of that read: as no read asks for more than the view has room
  for, that is at most the rest of one record (a view with less than `MIN_READ` of room left is
  handed back without a read; the caller comes back with an empty one). So a connection keeps
  about 22 KiB per BIO whatever it carried (`tests/transport/test_tls_memory.py`), and the
  Python-side ciphertext of a batch is freed once sent. The pieces cost 2-4 % of the time
  OpenSSL spends on a batch (`benchmarks.bio_pieces`), nothing the data path can measure.
- **Latency under load**: `TCP_NOTSENT_LOWAT` keeps at most `NOTSENT_LOWAT` unsent bytes in the
  kernel's send buffer (not a limit on bytes in flight, so long fat links are not slowed): the rest
  stays in the session's per-stream queues, where an interactive stream's frame can still go
  before queued bulk (see `proto.output`), instead of behind megabytes the kernel already holds.

The scratch buffer can be shared because nothing awaits between filling it and handing its bytes to
the incoming BIO (which copies them): what is left of a read when the caller's view is full goes
to the incoming BIO before `receive_into` returns. Errors from the socket or OpenSSL become
`TransportError` once, here. An abrupt EOF (no close_notify) is an EOF, as with
`suppress_ragged_eofs`.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from kins_tunnel.transport import keepalive
from kins_tunnel.transport.allocator import tune_allocator
from kins_tunnel.transport.buffers import RunBuffer
from kins_tunnel.transport.errors import TransportError as TransportError  # its callers' name
from kins_tunnel.transport.refusal import parse_refusal

READ_BATCH = 1024 * 1024  # plaintext bytes the session gathers per wake-up
RAW_READ = 256 * 1024  # ciphertext bytes per read system call
NOTSENT_LOWAT = 128 * 1024  # unsent bytes the kernel may hold for us (see "Latency" above)

HANDSHAKE_PIECE = 256  # ciphertext bytes handed to OpenSSL at a time during the handshake
READ_PIECE = 16 * 1024 + 256 + 5  # the largest TLS record: what the incoming BIO is topped up to
WRITE_PIECE = 16 * 1024  # plaintext bytes encrypted per `SSL_write`: one full TLS record
MIN_READ = 16 * 1024  # no read system call for less room than this (unless the view is empty)
WRITEV_MAX = 64  # pieces per `writev` (the kernel's limit is 1,024)

_RAW_BUFFER = RunBuffer("kins_tunnel_tls_raw_buffer", RAW_READ)


class Refused(TransportError):
    """The cloud shed this connection before TLS and said when to come back (`transport.refusal`)."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"shed by the cloud before TLS (retry after {retry_after:g}s)")
        self.retry_after = retry_after


def _raw_buffer() -> memoryview:
    """The ciphertext scratch buffer of this trio run (see the module docstring)."""
    tune_allocator()
    return _RAW_BUFFER.get()


class TLSSocket:
    """A connected, non-blocking TLS socket. Owns the socket; `close()` releases it."""

    __slots__ = (
        "_sock",
        "_fd",
        "_obj",
        "_ssl",
        "_in",
        "_out",
        "_pending",
        "_eof",
        "_held",
        "_closed",
        "_handshaken",
        "_raw",
        "drained",
    )

    def __init__(
        self,
        sock: socket.socket,
        obj: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
    ) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._obj = obj
        # The C object behind `ssl.SSLObject` skips a Python wrapper per record; the public object
        # has the same read/write signature, so it stands in where the C one is not exposed.
        self._ssl: Any = getattr(obj, "_sslobj", obj)
        self._in = incoming
        self._out = outgoing
        self._pending: list[bytes | memoryview] | None = None  # ciphertext the kernel has not taken
        self._eof = False  # the socket said EOF; the incoming BIO knows
        self._held = False  # OpenSSL may hold decrypted bytes of a record (the last view filled up)
        self._closed = False
        self._handshaken = False  # the TLS handshake is done (the peer's certificate is known)
        self._raw: memoryview | None = None  # the run's raw buffer, looked up once
        self.drained = False  # the last receive_into emptied the socket as far as we can tell

    @classmethod
    def wrap(
        cls,
        sock: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> TLSSocket:
        """Take over `sock`; a client resumes `session` (a ticket of an earlier connection made
        with the same `context`) when the server accepts it, else runs a full handshake."""
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if NOTSENT_LOWAT and hasattr(socket, "TCP_NOTSENT_LOWAT"):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
            except OSError:  # pragma: no cover - a kernel without it: latency only, not correctness
                pass
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = context.wrap_bio(
            incoming,
            outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
            session=session,
        )
        return cls(sock, obj, incoming, outgoing)

    def fileno(self) -> int:
        return self._fd

    def tune_keepalive(self, interval: float, timeout: float) -> None:
        """Let the kernel watch this connection while it idles (`keepalive.tune`)."""
        if not self._closed:
            keepalive.tune(self._sock, interval, timeout)

    def peer_certificate_der(self) -> bytes | None:
        """The peer's certificate (DER) as of the handshake; still there after `close()`.

        Encoded from OpenSSL's copy at each call (well under a microsecond), not kept: an idle
        tunnel would hold its bytes for its whole life."""
        return self._obj.getpeercert(binary_form=True) if self._handshaken else None

    def alpn_protocol(self) -> str | None:
        """The application protocol negotiated in the handshake (ALPN), if any."""
        return self._obj.selected_alpn_protocol()

    @property
    def session(self) -> ssl.SSLSession | None:
        """The TLS session to resume the next connection with (client side; in TLS 1.3 known
        once the server's ticket has been read, after the handshake)."""
        return self._obj.session

    @property
    def session_reused(self) -> bool:
        """The handshake resumed an earlier session (no certificate exchange this time)."""
        return self._obj.session_reused

    # ------------------------------------------------------------------ handshake
    async def do_handshake(
        self,
        received: bytes = b"",
        *,
        waiting_for_peer: Callable[[], Awaitable[None]] | None = None,
        peer_answered: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Run the TLS handshake; the caller sets the deadline. `received`: what the peer has
        already sent, read off the socket by the caller (the tunnel port reads a ClientHello's
        record whole before the handshake may take a slot). `waiting_for_peer` is awaited each
        time OpenSSL has produced all it can, its flight is written, and the handshake is about
        to wait for the peer's next flight; `peer_answered` once the socket is readable again,
        before its bytes are read: the tunnel port gives its handshake slot back and takes one
        again then, so a slot covers CPU work, not the peer's round trip.

        The peer's flight goes to OpenSSL `HANDSHAKE_PIECE` bytes at a time: a memory BIO never
        shrinks, so fed whole it would keep the size of the largest flight for the connection's
        life (about 1 KiB per idle tunnel); fed in pieces it stays at a piece. A read takes no more
        than a record (`READ_PIECE`): what follows the peer's Finished in it (its first data) goes
        to the incoming BIO whole, and a peer sending bulk right behind its Finished must not make
        that a batch.
        """
        # read from the socket, not yet handed to OpenSSL
        rest: memoryview | None = memoryview(received) if received else None
        first = not self._obj.server_side  # a client's first read may be the cloud's refusal
        while True:
            try:
                self._obj.do_handshake()
            except ssl.SSLWantReadError:
                if rest is None:
                    await self._flush_all()
                    if waiting_for_peer is not None:
                        await waiting_for_peer()
                    await self.wait_readable()
                    if peer_answered is not None:
                        await peer_answered()
                    rest = self._read_raw(READ_PIECE)  # what follows Finished goes in whole
                    if not rest:  # a spurious wake-up (wait again), or EOF (OpenSSL says so)
                        rest = None
                        await trio.lowlevel.checkpoint()
                        continue
                    if first:
                        first = False
                        hint = parse_refusal(rest)
                        if hint is not None:
                            raise Refused(hint) from None
                # nothing awaits while `rest` (a view of the shared raw buffer) is in use
                self._in.write(rest[:HANDSHAKE_PIECE])
                rest = rest[HANDSHAKE_PIECE:] if len(rest) > HANDSHAKE_PIECE else None
                if self._out.pending:
                    self.flush()
                continue
            except (ssl.SSLError, OSError) as exc:
                self._flush_quietly()  # the alert tells the peer why
                raise TransportError(f"TLS handshake failed: {describe_error(exc)}") from exc
            if rest is not None:  # what followed the handshake (the peer's first data)
                self._in.write(rest)
            self._handshaken = True
            await self._flush_all()
            return

    def _read_raw(self, limit: int = RAW_READ) -> memoryview | None:
        """One read of up to `limit` bytes from the socket (a view of the shared raw buffer);
        None: nothing there. At EOF the incoming BIO is told and an empty view is returned."""
        if self._eof:
            return None
        if self._closed:  # its number may belong to another connection by now (see `close`)
            raise TransportError("tunnel socket closed")
        raw = self._raw
        if raw is None:
            raw = self._raw = _raw_buffer()
        try:
            n = os.readv(self._fd, (raw[:limit],))
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            raise TransportError(f"tunnel read failed: {describe_error(exc)}") from exc
        if n == 0:
            self._eof = True
            self._in.write_eof()
        return raw[:n]

    async def _flush_all(self) -> None:
        while not self.flush():
            await self.wait_writable()

    def _flush_quietly(self) -> None:
        try:
            self.flush()
        except TransportError:
            pass

    # ------------------------------------------------------------------ reading
    def receive_into(self, view: memoryview) -> int | None:
        """Decrypt as many records as are ready into `view`, without blocking.

        Returns the byte count (0 means EOF), or None when nothing was ready (wait readable).
        A small message costs one read system call and one `SSL_read`, no exception: the socket
        is read first when nothing is buffered, and the loop stops as soon as a short read has
        been decrypted completely. What one read brought goes to OpenSSL as it takes it: the
        incoming BIO is topped up to `READ_PIECE` (a whole record) whenever it holds less (see
        "Memory" in the module docstring).
        """
        n = 0
        size = len(view)
        read = self._ssl.read
        incoming = self._in
        self.drained = False
        short = False  # this call already emptied the socket
        rest: memoryview | None = None  # read by this call, not yet handed to OpenSSL
        try:
            while n < size:
                if rest is not None:
                    held = incoming.pending
                    if held < READ_PIECE:  # topped up to a whole record: no SSL_read runs short
                        take = READ_PIECE - held
                        if take < len(rest):
                            incoming.write(rest[:take])
                            rest = rest[take:]
                        else:
                            if rest:  # (empty at EOF)
                                incoming.write(rest)
                            rest = None
                elif not incoming.pending and not self._held and not self._eof:
                    rest, short = self._read_some(size - n, n, short)
                    if rest is None:
                        break
                    continue
                self._held = False
                try:
                    got = read(size - n, view[n:])
                except ssl.SSLWantReadError:  # a record is still incomplete
                    if rest is None:
                        rest, short = self._read_some(size - n, n, short)
                        if rest is None:
                            break
                    continue
                if got == 0:
                    return n if n else 0
                n += got
            else:
                self._held = True  # the view is full: OpenSSL may hold the rest of a record
            if rest is not None:  # the view filled up: at most about a record is left (see above)
                incoming.write(rest)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return n if n else 0  # close_notify, or an abrupt EOF: the end either way
        except (ssl.SSLError, OSError) as exc:
            if n:
                return n  # hand over what we have; the error shows again on the next call
            raise TransportError(f"tunnel read failed: {describe_error(exc)}") from exc
        if self._out.pending:  # reading can produce output (TLS 1.3 key update): send it along
            self._flush_quietly()
        return n if n else None

    def _read_some(self, room: int, n: int, short: bool) -> tuple[memoryview | None, bool]:
        """One read from the socket for `receive_into`, of at most `room` bytes (the view's free
        space) unless the view is still empty: (the ciphertext, whether the read was short).
        None: nothing to read now (`drained` says whether the socket is empty), or too little
        room left to be worth a system call (the caller comes back with an empty view). At EOF
        the incoming BIO is told and an empty view is returned."""
        if short:  # this call already emptied the socket
            self.drained = True
            return None, short
        if room < MIN_READ:
            if n:
                return None, short
            room = MIN_READ
        raw = self._read_raw(min(room, RAW_READ))
        if raw is None:
            self.drained = True
            return None, short
        return raw, len(raw) < min(room, RAW_READ)

    async def wait_readable(self) -> None:
        if self._closed:  # closed by another task of the session: never hand trio fd -1
            raise TransportError("tunnel socket closed")
        await trio.lowlevel.wait_readable(self._fd)

    # ------------------------------------------------------------------ writing
    async def wait_writable(self) -> None:
        if self._closed:
            raise TransportError("tunnel socket closed")
        await trio.lowlevel.wait_writable(self._fd)

    @property
    def pending(self) -> int:
        """Ciphertext bytes waiting for the socket."""
        pending = self._pending
        return (sum(map(len, pending)) if pending is not None else 0) + self._out.pending

    def send_chunk(self, chunk: memoryview | bytes | bytearray) -> bool:
        """Encrypt the whole chunk and write as much as the socket takes.

        True: everything went out. False: ciphertext is left; `flush()` once the socket is writable.
        Either way the chunk itself is done with (it may be reused at once). The chunk is
        encrypted `WRITE_PIECE` bytes at a time, each piece's records taken out of the outgoing
        BIO at once, and the pieces go to the socket in one `writev`.
        """
        if self._closed:
            raise TransportError("tunnel socket closed")
        write = self._ssl.write
        out = self._out
        try:
            if len(chunk) <= WRITE_PIECE:
                write(chunk)
                if self._pending is None:  # the common case: one piece, nothing queued
                    return self._write_all([out.read()])
            else:
                view = memoryview(chunk)
                pieces: list[bytes | memoryview] = []
                for i in range(0, len(view), WRITE_PIECE):
                    write(view[i : i + WRITE_PIECE])
                    pieces.append(out.read())
                if self._pending is None:
                    return self._write_all(pieces)
                self._pending += pieces
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise TransportError(f"tunnel write failed: {describe_error(exc)}") from exc
        return self.flush()

    def flush(self) -> bool:
        """Write pending ciphertext without blocking. True: nothing is left."""
        if self._closed:
            raise TransportError("tunnel socket closed")
        pending = self._pending
        if self._out.pending:  # records made outside `send_chunk` (handshake, key update)
            if pending is None:
                pending = []
            pending.append(self._out.read())
        if pending is None:
            return True
        self._pending = None
        return self._write_all(pending)

    def _write_all(self, pieces: list[bytes | memoryview]) -> bool:
        """Write `pieces` (ciphertext, in order) as far as the socket takes them; what it does not
        take becomes `_pending`. True: everything went out."""
        while pieces:
            batch = pieces if len(pieces) <= WRITEV_MAX else pieces[:WRITEV_MAX]
            try:
                n = os.writev(self._fd, batch) if len(batch) > 1 else os.write(self._fd, batch[0])
            except (BlockingIOError, InterruptedError):
                self._pending = pieces
                return False
            except OSError as exc:
                self._pending = None
                raise TransportError(f"tunnel write failed: {describe_error(exc)}") from exc
            whole = 0  # pieces that went out whole
            for piece in batch:
                if n < len(piece):
                    break
                n -= len(piece)
                whole += 1
            if whole == len(pieces):
                return True
            del pieces[:whole]
            if n or whole < len(batch):  # the socket buffer is full: wait until it is writable
                if n:
                    pieces[0] = memoryview(pieces[0])[n:]
                self._pending = pieces
                return False
        return True

    def close(self) -> None:
        """Release the socket. From here on nothing touches its descriptor number, which the
        kernel hands to the next socket opened (a client or edge accepted in the same scheduling
        round): a reader woken before the close, a writer kicked after it, get `TransportError`
        instead of another connection's bytes, or of putting ciphertext into it."""
        if self._closed:
            return
        self._closed = True
        self._pending = None
        try:
            trio.lowlevel.notify_closing(self._sock)
        except RuntimeError:  # pragma: no cover - outside trio (tests)
            pass
        try:
            self._sock.close()
        except OSError:
            pass


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"{exc.reason}: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.strerror or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return str(exc)
