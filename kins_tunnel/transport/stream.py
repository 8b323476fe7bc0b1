"""`TunnelStream`: one multiplexed stream of a `Session`, as a trio `HalfCloseableStream`.

`send_eof` sends FIN, `receive_some` returns b"" after the peer's FIN, a RESET surfaces as
`BrokenResourceError`. Credit goes back to the peer when `receive_some` hands bytes to the
application (or when direct delivery wrote them into the destination socket). The session owns
the protocol state; this object only queues received bytes and parks the tasks that wait.
"""

from __future__ import annotations

import collections
import os
from typing import TYPE_CHECKING

import trio

from kins_tunnel.proto import ErrorCode, LocalProtocolError

if TYPE_CHECKING:
    from kins_tunnel.transport.session import Session


class TunnelStream(trio.abc.HalfCloseableStream):
    """One multiplexed stream. Not safe for two concurrent senders or two concurrent receivers."""

    def __init__(self, session: Session, stream_id: int) -> None:
        self._session = session
        self.stream_id = stream_id
        self._recv: collections.deque[bytes] = collections.deque()
        self._eof = False
        self._error: str | None = None
        self.error_code: ErrorCode | int | None = None
        self._closed = False
        self._sent_eof = False
        self._recv_lot = trio.lowlevel.ParkingLot()
        self._send_lot = trio.lowlevel.ParkingLot()
        self._sink: int | None = None
        self._sink_busy = False
        self.direct_bytes = 0

    # Direct delivery: when a relay copies this stream into a TCP socket, the reader task writes
    # arriving bytes straight into that socket (non-blocking) instead of waking the relay task:
    # one task switch less per hop on the latency path. Only while nothing is queued and the
    # relay holds no bytes of its own, so order is kept; what the socket does not take is
    # queued for the relay as usual.
    def set_direct_sink(self, fd: int | None) -> None:
        self._sink = fd
        self._sink_busy = False

    def sink_idle(self) -> None:
        self._sink_busy = False

    def _try_direct(self, data: bytes) -> bytes:
        try:
            n = os.write(self._sink, data)  # type: ignore[arg-type]
        except BlockingIOError:
            return data
        except OSError:
            self._sink = None  # the relay will see the error itself
            return data
        self.direct_bytes += n
        s = self._session
        s.conn.consumed(self.stream_id, n)
        return data[n:]

    # called by the session
    def _deliver(self, data: bytes, end: bool) -> None:
        if data:
            if self._sink is not None and not self._recv and not self._sink_busy:
                data = self._try_direct(data)
                if not data and not end:
                    return
            if data:
                self._recv.append(data)
        if end:
            self._eof = True
        self._recv_lot.unpark_all()

    def _broken(self, reason: str, code: ErrorCode | int | None = None) -> None:
        if self._error is None:
            self._error = reason
            self.error_code = code
        self._recv_lot.unpark_all()
        self._send_lot.unpark_all()

    # trio stream API
    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        while not self._recv:
            if self._error is not None:
                raise trio.BrokenResourceError(self._error)
            if self._eof:
                await trio.lowlevel.checkpoint()
                return b""
            await self._recv_lot.park()
            if self._closed:
                raise trio.ClosedResourceError("stream was closed")
        await trio.lowlevel.checkpoint_if_cancelled()
        data = self._recv.popleft()
        if self._sink is not None:
            self._sink_busy = True  # the relay holds bytes now: no direct writes until sink_idle()
        if max_bytes is not None and len(data) > max_bytes:
            self._recv.appendleft(data[max_bytes:])
            data = data[:max_bytes]
        s = self._session
        if self._error is None and not s.closed.is_set():
            s.conn.consumed(self.stream_id, len(data))
            s._kick()
        await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        if self._sent_eof:
            raise trio.ClosedResourceError("send_eof was called")
        s = self._session
        view = memoryview(data)
        pos = 0
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self._error is not None:
                raise trio.BrokenResourceError(self._error)
            if pos >= len(view):
                break
            try:
                pos += s.conn.send_data(self.stream_id, view[pos:])
            except LocalProtocolError as exc:
                raise trio.BrokenResourceError(self._error or str(exc)) from None
            s._kick()
            if pos < len(view):
                s.stalls += 1
                await self._send_lot.park()  # WindowUpdated, reset or tunnel loss wakes us
            elif s.output_full:
                s.stalls += 1
                await s.wait_output_space()
        # No trailing yield: callers on the hot path (the relay) yield on their own reads.

    async def wait_send_all_might_not_block(self) -> None:
        s = self._session
        while self._error is None and not self._closed and s.conn.send_window(self.stream_id) == 0:
            await self._send_lot.park()

    async def send_eof(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        await trio.lowlevel.checkpoint()
        if self._sent_eof:
            return
        self._sent_eof = True
        if self._error is not None:
            raise trio.BrokenResourceError(self._error)
        s = self._session
        try:
            s.conn.end_stream(self.stream_id)
        except LocalProtocolError as exc:
            raise trio.BrokenResourceError(str(exc)) from None
        s._kick()

    def abort(self, code: ErrorCode = ErrorCode.CANCEL, message: str = "") -> None:
        """Reset the stream (both directions) with `code`, then close it."""
        if self._closed:
            return
        s = self._session
        if self._error is None and not s.closed.is_set():
            s.conn.reset_stream(self.stream_id, code, message)
            s._kick()
        self._close_local()

    def _close_local(self) -> None:
        self._closed = True
        s = self._session
        s._streams.pop(self.stream_id, None)
        s.conn.release(self.stream_id)
        self._recv.clear()
        self._recv_lot.unpark_all()
        self._send_lot.unpark_all()

    async def aclose(self) -> None:
        """Close: a stream that did not finish cleanly both ways is reset (CANCEL)."""
        if not self._closed:
            s = self._session
            finished = self._eof and self._sent_eof and not self._recv
            if not finished and self._error is None and not s.closed.is_set():
                s.conn.reset_stream(self.stream_id, ErrorCode.CANCEL, "closed by application")
                s._kick()
            self._close_local()
        await trio.lowlevel.checkpoint()
