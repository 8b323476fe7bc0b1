"""`TunnelStream`: one multiplexed stream of a `Session`, as a trio `HalfCloseableStream`.

`send_eof` sends FIN, `receive_some` returns b"" after the peer's FIN, a RESET surfaces as
`BrokenResourceError`. Credit goes back to the peer when `receive_some` hands bytes to the
application (or when direct delivery wrote them into the destination socket).

The stream honours trio's stream contract (`trio.testing.check_half_closeable_stream` runs on it):
every method is a checkpoint, `receive_some(0)` raises `ValueError`, two tasks sending (or two
receiving) at once get `BusyResourceError`, `aclose` is graceful when nothing is left unread (FIN,
as `close()` on a TCP socket) and an abort (RESET) otherwise.

The stream talks to its session only through the narrow `StreamIO` interface below: the session
owns the protocol state; this object only queues received bytes and parks the tasks that wait.
Relayed into a TCP socket (`copy_to_socket`), it lets the session's reader task write arriving
bytes straight into that socket; this module alone coordinates the two writers (see "Direct
delivery" below, and docs/DESIGN.md "Transport objects and who owns what").
"""

from __future__ import annotations

import collections
import operator
import os
from collections.abc import Callable
from typing import Protocol

import trio

from kins_tunnel.proto import ErrorCode, LocalProtocolError, ownership


class StreamIO(Protocol):
    """What a stream needs from its session (implemented by `Session`)."""

    @property
    def is_closed(self) -> bool: ...

    @property
    def output_full(self) -> bool: ...

    def send(self, stream_id: int, data: bytes | bytearray | memoryview, end: bool = False) -> int:
        """Queue what the peer's credit allows; returns the bytes taken (LocalProtocolError)."""

    def consumed(self, stream_id: int, n: int) -> None:
        """The application took `n` received bytes: return credit (batched) and flush."""

    def send_window(self, stream_id: int) -> int: ...

    def reset(self, stream_id: int, code: ErrorCode, message: str) -> None: ...

    def detach(self, stream_id: int) -> None:
        """The application is done with the stream; later frames for it are refused."""

    async def wait_output_space(self) -> None: ...


class ConflictDetector:
    """Raises `error(message)` when a second holder enters while one is inside, as the one trio's
    `SocketStream` has for `send_all` (trio's own is private)."""

    __slots__ = ("_held", "_message", "_error")

    def __init__(
        self, message: str, error: Callable[[str], Exception] = trio.BusyResourceError
    ) -> None:
        self._held = False
        self._message = message
        self._error = error

    def __enter__(self) -> None:
        if self._held:
            raise self._error(self._message)
        self._held = True

    def __exit__(self, *exc: object) -> None:
        self._held = False


class TunnelStream(trio.abc.HalfCloseableStream):
    """One multiplexed stream. Two concurrent senders (or receivers) raise BusyResourceError."""

    def __init__(self, io: StreamIO, stream_id: int) -> None:
        self._io = io
        self.stream_id = stream_id
        self._recv: collections.deque[bytes] = collections.deque()
        self._eof = False
        self._error: str | None = None
        self.error_code: ErrorCode | int | None = None
        self._closed = False
        self._sent_eof = False
        self._recv_lot = trio.lowlevel.ParkingLot()
        self._send_lot = trio.lowlevel.ParkingLot()
        self._send_conflict = ConflictDetector("another task is sending on this stream")
        self._recv_conflict = ConflictDetector("another task is receiving from this stream")
        self._sink: int | None = None  # a relay's socket lent for direct delivery
        self._sink_busy = False  # the relay holds bytes of this stream: no direct write now
        self._sink_writes: ConflictDetector | None = None  # both writers of `_sink` (debug mode)
        self.direct_bytes = 0  # written into the lent socket by the reader task
        self.copied_bytes = 0  # written into it by `copy_to_socket` (the relay task)
        self.activity = 0  # bumped when bytes move either way (read by relay idle timeouts)

    # Direct delivery: when a relay copies this stream into a TCP socket (`copy_to_socket`), the
    # reader task writes arriving bytes straight into that socket (non-blocking) instead of waking
    # the relay task: one task switch less per hop on the latency path. Only while nothing is
    # queued and the relay holds no bytes of its own (`_sink_busy`), so order is kept; what the
    # socket does not take is queued for the relay as usual. This module is the only one that
    # knows: the rules are those of the "relayed TCP socket" row of docs/DESIGN.md "Transport
    # objects and who owns what", checked in debug mode (`ownership.CHECKS`) by a conflict
    # detector that both writers enter for each write.
    def set_direct_sink(self, fd: int | None) -> None:
        """Lend the socket `fd` to the reader task (None: take it back, before it is closed).
        One lender at a time: another descriptor while one is lent raises BusyResourceError."""
        if fd is not None and self._sink is not None and self._sink != fd:
            raise trio.BusyResourceError("this stream already delivers into another socket")
        if fd is None or fd != self._sink:
            self._sink_writes = (
                ConflictDetector(
                    "two writers at once on a relay's socket: a direct write while the relay "
                    "writes",
                    ownership.violation,
                )
                if fd is not None and ownership.CHECKS
                else None
            )
        self._sink = fd
        self._sink_busy = False

    async def copy_to_socket(self, dst: trio.SocketStream, chunk: int) -> None:
        """The relay's tunnel-to-socket direction: copy what arrives on this stream into `dst`
        until the peer's FIN, `chunk` bytes at most per write. `direct_bytes + copied_bytes` is
        what went, also when this raises (as `receive_some` and `dst.send_all` do).

        The socket is lent to the reader task for direct delivery while this runs, and taken back
        before it returns or raises (the caller may close `dst` then)."""
        self.set_direct_sink(dst.socket.fileno())
        try:
            while True:
                data = await self.receive_some(chunk)  # the relay holds bytes now: `_sink_busy`
                if not data:
                    return
                writes = self._sink_writes
                if writes is None:
                    await dst.send_all(data)
                else:
                    with writes:  # debug mode: a direct write now would cut into ours
                        await dst.send_all(data)
                self.copied_bytes += len(data)
                self._sink_busy = False  # ours are in the socket: direct writes may go on
        finally:
            self.set_direct_sink(None)

    def _try_direct(self, sink: int, data: bytes | memoryview) -> bytes | memoryview:
        try:
            if self._sink_writes is None:
                n = os.write(sink, data)
            else:
                n = self._checked_write(self._sink_writes, sink, data)
        except BlockingIOError:
            return data
        except OSError:
            self._sink = None  # the relay will see the error itself
            return data
        self.direct_bytes += n
        self._io.consumed(self.stream_id, n)
        return data[n:]

    def _checked_write(self, writes: ConflictDetector, sink: int, data: bytes | memoryview) -> int:
        """A direct write in debug mode: the relay holds no bytes and is not writing."""
        if self._sink_busy:
            raise ownership.violation(
                "direct write into a relay's socket while the relay holds bytes of the stream"
            )
        with writes:
            return os.write(sink, data)

    # ------------------------------------------------------------------ called by the session
    def deliver(self, data: bytes | memoryview, end: bool) -> None:
        """Bytes (and/or the peer's FIN) arrived for this stream. `data` may be a view of the
        session's read buffer: what is queued is copied, what goes straight out is not."""
        if data:
            self.activity += 1
            sink = self._sink
            if sink is not None and not self._recv and not self._sink_busy:
                data = self._try_direct(sink, data)
                if not data and not end:
                    return
            if data:
                self._recv.append(bytes(data))
        if end:
            self._eof = True
        self._recv_lot.unpark_all()

    def credit_arrived(self) -> None:
        self._send_lot.unpark_all()

    def broken(self, reason: str, code: ErrorCode | int | None = None) -> None:
        """The stream was reset or its tunnel is gone: every waiting and later call fails."""
        if self._error is None:
            self._error = reason
            self.error_code = code
        self._recv_lot.unpark_all()
        self._send_lot.unpark_all()

    # ------------------------------------------------------------------ trio stream API
    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        with self._recv_conflict:
            if self._closed:
                raise trio.ClosedResourceError("stream was closed")
            while not self._recv:
                if self._eof:  # the peer's FIN came: all it sent is here, whatever came after
                    await trio.lowlevel.checkpoint()
                    return b""
                if self._error is not None:
                    await trio.lowlevel.checkpoint()
                    raise trio.BrokenResourceError(self._error)
                await self._recv_lot.park()
                if self._closed:
                    raise trio.ClosedResourceError("stream was closed")
            await trio.lowlevel.checkpoint_if_cancelled()
            data = self._recv.popleft()
            if self._sink is not None:
                self._sink_busy = True  # the relay holds bytes now: no direct writes (see above)
            if max_bytes is not None and len(data) > max_bytes:
                self._recv.appendleft(data[max_bytes:])
                data = data[:max_bytes]
            if self._error is None and not self._io.is_closed:
                self._io.consumed(self.stream_id, len(data))
            await trio.lowlevel.cancel_shielded_checkpoint()
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._send_conflict:
            await trio.lowlevel.checkpoint_if_cancelled()
            if not await self._send(data):
                await trio.lowlevel.cancel_shielded_checkpoint()

    async def send_then_wait_elsewhere(self, data: bytes | bytearray | memoryview) -> None:
        """`send_all` for a caller whose next step is a schedule point of its own (the relay: it
        waits for its socket, or checkpoints after a full chunk): a schedule point only if it
        has to wait for credit or output space. Saves a pass through trio's scheduler (and an
        `epoll_wait`) per message on the latency path."""
        with self._send_conflict:
            await self._send(data)

    async def _send(self, data: bytes | bytearray | memoryview) -> bool:
        """The body of `send_all`, without its schedule points; returns whether it waited.

        `data` is only read before the first wait: what the peer's credit does not take at once is
        copied first, so the caller may reuse its buffer (the relay's is shared) as soon as this
        yields.
        """
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        if self._sent_eof:
            raise trio.ClosedResourceError("send_eof was called")
        io = self._io
        view = memoryview(data)
        pos = 0
        waited = False
        self.activity += 1
        while True:
            if self._error is not None:
                raise trio.BrokenResourceError(self._error)
            if pos >= len(view):
                return waited
            try:
                pos += io.send(self.stream_id, view[pos:] if pos else view)
            except LocalProtocolError as exc:
                raise trio.BrokenResourceError(self._error or str(exc)) from None
            if pos < len(view):
                if not waited:
                    view, pos = (
                        memoryview(bytes(view[pos:])),
                        0,
                    )  # the caller's buffer is free again
                waited = True
                await self._send_lot.park()  # credit, a reset or the tunnel's end wakes us
                if self._closed:
                    raise trio.ClosedResourceError("stream was closed")
            elif io.output_full:
                waited = True
                await io.wait_output_space()

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_conflict:
            if self._closed:
                await trio.lowlevel.checkpoint()
                raise trio.ClosedResourceError("stream was closed")
            await trio.lowlevel.checkpoint()
            while (
                self._error is None
                and not self._closed
                and self._io.send_window(self.stream_id) == 0
            ):
                await self._send_lot.park()
            if self._closed:
                raise trio.ClosedResourceError("stream was closed")

    async def send_eof(self) -> None:
        with self._send_conflict:
            if self._closed:
                raise trio.ClosedResourceError("stream was closed")
            await trio.lowlevel.checkpoint()
            if self._sent_eof:
                return
            self._sent_eof = True
            if self._error is not None:
                raise trio.BrokenResourceError(self._error)
            try:
                self._io.send(self.stream_id, b"", end=True)
            except LocalProtocolError as exc:
                raise trio.BrokenResourceError(str(exc)) from None

    def abort(self, code: ErrorCode = ErrorCode.CANCEL, message: str = "") -> None:
        """Reset the stream (both directions) with `code`, then close it."""
        if self._closed:
            return
        if self._error is None and not self._io.is_closed:
            self._io.reset(self.stream_id, code, message)
        self._close_local()

    def _close_local(self) -> None:
        self._closed = True
        self._io.detach(self.stream_id)
        self._recv.clear()
        self._recv_lot.unpark_all()
        self._send_lot.unpark_all()

    async def aclose(self) -> None:
        """Close, as `close()` on a TCP socket: with nothing left unread, our direction ends with
        FIN (the peer still reads what we sent); with unread bytes, the stream is reset (CANCEL)."""
        if not self._closed:
            if self._error is None and not self._io.is_closed:
                if self._recv:
                    self._io.reset(self.stream_id, ErrorCode.CANCEL, "closed by application")
                elif not self._sent_eof:
                    self._sent_eof = True
                    try:
                        self._io.send(self.stream_id, b"", end=True)
                    except LocalProtocolError:
                        self._io.reset(self.stream_id, ErrorCode.CANCEL, "closed by application")
            self._close_local()
        await trio.lowlevel.checkpoint()
