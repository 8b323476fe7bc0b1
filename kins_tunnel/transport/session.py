"""One tunnel session: a `proto.Connection` driven over a `TLSSocket`, streams as trio streams.

Theory of operation
-------------------
- **The reader** (the task that runs `serve()`) decrypts up to `READ_BATCH` (1 MiB) per wake-up
  into a buffer shared by every session of the trio run, feeds it to the protocol core and
  dispatches the events. It never waits on any stream: received data goes into the stream's queue
  (or straight into the relay's socket), which flow control bounds to the window we granted;
  waiting tasks are woken.
- **Writes are serialised** without a lock: whoever produces protocol output calls `_kick()`,
  which writes at once if the socket takes it (no task switch on the latency path) and otherwise
  leaves the rest to the writer task. The output stays queued in the protocol core until the TLS
  socket has sent the previous batch; then up to `WRITE_BATCH` bytes are encrypted in one call
  (several TLS records, one system call; `Connection.write_output` hands them over without a
  copy or an allocation). The writer task is started the first time the socket is full (an idle
  tunnel never has one). Senders wait while more than `OUTPUT_HIGH_WATER` bytes are queued:
  TCP's back-pressure reaches them, memory stays bounded.
- **Liveness** (`liveness`, one timer for every session of the trio run): a ping every
  `ping_interval`; when nothing at all has arrived for `ping_timeout` the session is dead and every
  stream on it breaks at once.
- **Memory of an idle tunnel**: one task (the reader, waiting for the socket), a few small
  objects, the TLS state; handlers are looked up in class-level tables, the writer's event and the
  senders' parking lot are made when first needed.
- **Streams** (`TunnelStream`) are `trio.abc.HalfCloseableStream`s: `send_eof` sends FIN,
  `receive_some` returns b"" after the peer's FIN, and a RESET surfaces as `BrokenResourceError`.
  Credit goes back to the peer when `receive_some` hands bytes to the application.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import trio

from kins_tunnel.errors import OpenFailed
from kins_tunnel.proto import (
    Connection,
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
    code_text,
)
from kins_tunnel.proto import events as ev
from kins_tunnel.transport import liveness
from kins_tunnel.transport.buffers import RunBuffer
from kins_tunnel.transport.isolation import ErrorReporter, log_internal_error
from kins_tunnel.transport.stream import TunnelStream
from kins_tunnel.transport.tls import READ_BATCH, TLSSocket, TransportError

log = logging.getLogger("kins_tunnel.session")

WRITE_BATCH = 256 * 1024  # plaintext bytes encrypted and written per system call (at most)
OUTPUT_HIGH_WATER = 512 * 1024


# One read buffer for every session of the trio run. Copy contract: the reader fills it and hands a
# slice to `Connection.receive_data`, which copies out everything it keeps (payloads and partial
# frames) before returning; nothing awaits between the fill and that call.
_READ_BUFFER = RunBuffer("kins_tunnel_read_buffer", READ_BATCH)


@dataclass(frozen=True, slots=True)
class SessionStatistics:
    streams: int
    bytes_sent: int
    bytes_received: int
    rtt: float | None
    buffered: int
    output_queued: int
    stalls: int  # times a sender waited for peer credit or socket space


class Session:
    """A live tunnel. Run `serve()` in a nursery; it returns when the tunnel is over."""

    __slots__ = (
        "tls",
        "conn",
        "label",
        "_on_open",
        "_report",
        "_ping_interval",
        "_ping_timeout",
        "_next_ping",
        "_liveness",
        "_streams",
        "_opening",
        "_writer_wakeup",
        "_writer_started",
        "_writable_lot",
        "_last_rx",
        "handshake_done",
        "closed",
        "close_reason",
        "peer_names",
        "peer_agent",
        "draining",
        "rtt",
        "started_at",
        "stalls",
        "handshake_failure",
        "_nursery",
        "_task_status",
    )

    def __init__(
        self,
        tls: TLSSocket,
        conn: Connection,
        *,
        on_open: Callable[[Session, int, str], None] | None = None,
        ping_interval: float = 10.0,
        ping_timeout: float = 20.0,
        label: str = "",
        report: ErrorReporter = log_internal_error,
    ) -> None:
        self.tls = tls
        self.conn = conn
        self.label = label
        self._on_open = on_open
        self._report = report
        self._ping_interval = max(ping_interval, 0.01)
        self._ping_timeout = ping_timeout
        self._next_ping = math.inf
        self._liveness: liveness.Entry | None = None
        self._streams: dict[int, TunnelStream] = {}
        self._opening: dict[
            int, trio.MemorySendChannel[tuple[ev.OpenResult, TunnelStream | None]]
        ] = {}
        self._writer_wakeup: trio.Event | None = None  # made by the writer task, once it runs
        self._writer_started = False
        self._writable_lot: trio.lowlevel.ParkingLot | None = None  # made for the first sender
        self._last_rx = trio.current_time()
        self.handshake_done = trio.Event()
        self.closed = trio.Event()
        self.close_reason = ""
        self.peer_names: tuple[str, ...] = ()
        self.peer_agent = ""
        self.draining = False  # the peer sent GOAWAY
        self.rtt: float | None = None
        self.started_at = self._last_rx
        self.stalls = 0
        self.handshake_failure: str | None = None  # a short label when the HELLO exchange failed
        self._nursery: trio.Nursery | None = None
        self._task_status: trio.TaskStatus[None] | None = None  # until the handshake is done

    # ------------------------------------------------------------------ lifecycle
    async def serve(
        self,
        *,
        handshake_timeout: float = 10.0,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Exchange HELLOs (within `handshake_timeout`), then run until the tunnel ends.

        `task_status.started()` is called once the handshake is complete. Raises TransportError or
        RemoteProtocolError if the handshake fails; afterwards failures just end the session.
        The calling task is the session's reader.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._task_status = task_status
                self._kick()  # our HELLO
                with trio.move_on_after(handshake_timeout):
                    await self._reader()  # returns once the handshake is complete
                if self._task_status is None and not self.closed.is_set():
                    await self._reader()  # outside the handshake's scope: it costs memory
                if self._task_status is not None:  # the handshake did not complete
                    if self.handshake_failure is None:
                        self.handshake_failure = (
                            "timeout" if not self.closed.is_set() else "protocol"
                        )
                    self._shutdown(self.close_reason or "tunnel handshake timed out")
                nursery.cancel_scope.cancel()
        finally:
            self._shutdown(self.close_reason or "session ended")
        if self._task_status is not None:
            self._task_status = None
            raise TransportError(self.close_reason)

    def _handshake_complete(self) -> None:
        """The HELLOs are exchanged and the batch that completed them is dispatched."""
        task_status, self._task_status = self._task_status, None
        assert task_status is not None
        now = trio.current_time()
        self.conn.ping()  # first RTT sample right away: it sizes the windows
        self._next_ping = now + self._ping_interval
        self._liveness = liveness.watch(self, min(self._next_ping, now + self._ping_timeout))
        task_status.started()

    def _shutdown(self, reason: str) -> None:
        if not self.close_reason:
            self.close_reason = reason
        self.closed.set()
        for stream in list(self._streams.values()):
            stream.broken(f"tunnel closed: {self.close_reason}")
        self._streams.clear()
        for ch in self._opening.values():
            ch.close()
        self._opening.clear()
        if self._writable_lot is not None:
            self._writable_lot.unpark_all()
        if self._liveness is not None:
            liveness.forget(self._liveness)
            self._liveness = None
        self.tls.close()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def close(self, reason: str, code: ErrorCode = ErrorCode.NO_ERROR) -> None:
        """End the session now: try to tell the peer (GOAWAY), then drop the connection."""
        if self.closed.is_set():
            return
        self.conn.close(code, reason)
        self._kick()
        self._shutdown(reason)

    def goaway(self, reason: str = "draining") -> None:
        """Start draining: the peer may not open new streams; existing streams go on."""
        self.conn.goaway(ErrorCode.NO_ERROR, reason)
        self._kick()

    def statistics(self) -> SessionStatistics:
        st = self.conn.statistics()
        return SessionStatistics(
            streams=len(self._streams),
            bytes_sent=st.bytes_sent,
            bytes_received=st.bytes_received,
            rtt=self.rtt,
            buffered=st.buffered,
            output_queued=self.conn.pending_output() + self.tls.pending,
            stalls=self.stalls,
        )

    @property
    def stream_count(self) -> int:
        """Streams the application holds on this tunnel now."""
        return len(self._streams)

    @property
    def usable(self) -> bool:
        """Can carry new streams: handshake done, not closed, neither side draining."""
        return (
            self.handshake_done.is_set()
            and not self.closed.is_set()
            and not self.draining
            and not self.conn.going_away
        )

    # ------------------------------------------------------------------ streams
    async def open_stream(self, target: str, timeout: float) -> TunnelStream:
        """Ask the peer to open a stream to `target`; OpenFailed on refusal or after `timeout`."""
        if not self.usable:
            raise OpenFailed(ErrorCode.GOING_AWAY, "tunnel is not available")
        try:
            sid = self.conn.open_stream(target)
        except LocalProtocolError as exc:
            raise OpenFailed(exc.code, str(exc)) from None
        send, recv = trio.open_memory_channel[tuple[ev.OpenResult, "TunnelStream | None"]](1)
        self._opening[sid] = send
        self._kick()
        stream: TunnelStream | None = None
        returned = False
        try:
            with trio.move_on_after(timeout):
                try:
                    result, stream = await recv.receive()
                except trio.EndOfChannel:
                    raise OpenFailed(
                        ErrorCode.CONNECT_ERROR, f"tunnel closed: {self.close_reason}"
                    ) from None
                if not result.ok or stream is None:
                    raise OpenFailed(result.code, result.message or code_text(result.code))
                returned = True
                return stream
            raise OpenFailed(
                ErrorCode.TIMEOUT, f"the peer did not answer the open within {timeout:g}s"
            )
        finally:
            pending = self._opening.pop(sid, None) is not None
            if stream is not None and not returned:
                stream.abort(ErrorCode.CANCEL, "open abandoned")  # opened, but nobody wants it now
            elif pending and stream is None and not self.closed.is_set():
                self.conn.reset_stream(sid, ErrorCode.CANCEL, "open abandoned")
                self._kick()

    def accept(self, stream_id: int) -> TunnelStream:
        """Accept a stream the peer opened (after `on_open`), returning it."""
        self.conn.accept_stream(stream_id)
        stream = TunnelStream(self, stream_id)
        self._streams[stream_id] = stream
        self._kick()
        return stream

    def reject(self, stream_id: int, code: ErrorCode | int, message: str) -> None:
        if self.closed.is_set():
            return
        try:
            self.conn.reject_stream(stream_id, code, message)
        except LocalProtocolError:
            return  # reset or gone meanwhile
        self._kick()

    def start_stream_task(
        self, stream_id: int, fn: Callable[..., Awaitable[object]], *args: object
    ) -> None:
        """Run a task for one stream, tied to this session's lifetime (e.g. an edge dial).

        A failure-isolation boundary: if the task raises, that is a bug; it is reported, the
        stream is reset (INTERNAL_ERROR) and the session and its other streams go on.
        """
        assert self._nursery is not None
        self._nursery.start_soon(self._stream_task, stream_id, fn, args)

    async def _stream_task(
        self, stream_id: int, fn: Callable[..., Awaitable[object]], args: tuple[object, ...]
    ) -> None:
        try:
            await fn(*args)
        except Exception as exc:
            self._report("stream", exc)
            self._fail_stream(stream_id, exc)

    def _fail_stream(self, stream_id: int, exc: BaseException) -> None:
        """End one stream after a bug while handling it; the session goes on."""
        if self.closed.is_set():
            return
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            stream.broken(f"internal error: {type(exc).__name__}", ErrorCode.INTERNAL_ERROR)
        ch = self._opening.pop(stream_id, None)
        if ch is not None:
            ch.close()
        try:
            if self.conn.is_pending_remote(stream_id):
                self.conn.reject_stream(stream_id, ErrorCode.INTERNAL_ERROR, "internal error")
            else:
                self.conn.reset_stream(stream_id, ErrorCode.INTERNAL_ERROR, "internal error")
        except LocalProtocolError:
            pass
        self._kick()

    # ------------------------------------------------------------------ StreamIO (for TunnelStream)
    @property
    def is_closed(self) -> bool:
        return self.closed.is_set()

    def send(self, stream_id: int, data: bytes | bytearray | memoryview, end: bool = False) -> int:
        n = self.conn.send_data(stream_id, data, end)
        self._kick()
        if n < len(data):
            self.stalls += 1  # the sender waits for the peer's credit
        return n

    def consumed(self, stream_id: int, n: int) -> None:
        self.conn.consumed(stream_id, n)
        self._kick()

    def send_window(self, stream_id: int) -> int:
        return self.conn.send_window(stream_id)

    def reset(self, stream_id: int, code: ErrorCode, message: str) -> None:
        self.conn.reset_stream(stream_id, code, message)
        self._kick()

    def detach(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)
        self.conn.release(stream_id)

    # ------------------------------------------------------------------ reader
    async def _reader(self) -> None:
        """Read, decode and dispatch until the session ends (or, during the handshake, until it
        is complete)."""
        view = _READ_BUFFER.get()
        tls = self.tls
        conn = self.conn
        handlers = self._HANDLERS
        try:
            while True:
                if tls.drained:
                    tls.drained = False
                    await tls.wait_readable()
                n = tls.receive_into(view)
                if n is None:
                    await tls.wait_readable()
                    continue
                self._last_rx = trio.current_time()
                try:
                    events = conn.receive_data(view[:n] if n else b"")
                except RemoteProtocolError as exc:
                    if not self.handshake_done.is_set():
                        self.handshake_failure = (
                            "version" if exc.code == ErrorCode.VERSION_MISMATCH else "protocol"
                        )
                    self._kick()
                    self._shutdown(f"protocol error from peer: {exc}")
                    return
                for e in events:
                    try:
                        handlers[type(e)](self, e)
                    except Exception as exc:
                        self._stream_event_failed(e, exc)
                if conn.closed:
                    self._kick()
                    self._shutdown(self.close_reason or "peer closed the tunnel")
                    return
                if self._task_status is not None and self.handshake_done.is_set():
                    self._handshake_complete()
                    self._kick()
                    return  # serve() goes on reading outside the handshake's deadline
                self._kick()
                if n == len(view):  # a full batch: more is waiting; let the other tasks run first
                    await trio.lowlevel.checkpoint()
        except TransportError as exc:
            self._shutdown(str(exc))
        except trio.ClosedResourceError:  # another task closed the session under our wait
            self._shutdown(self.close_reason or "session closed")
        except Exception as exc:  # a bug: it ends this tunnel only, never the process
            self._report("session", exc)
            self.close(f"internal error: {type(exc).__name__}", ErrorCode.INTERNAL_ERROR)

    def _stream_event_failed(self, e: ev.Event, exc: Exception) -> None:
        """A bug while handling one stream's event ends that stream, not the tunnel;
        connection-level events have no stream to blame and end the tunnel."""
        sid = getattr(e, "stream_id", 0)
        if not sid:
            raise exc
        self._report("stream", exc)
        self._fail_stream(sid, exc)

    def _on_data(self, e: ev.DataReceived) -> None:
        s = self._streams.get(e.stream_id)
        if s is not None:
            s.deliver(e.data, False)
        else:  # closed by the application: like TCP, data after close aborts the stream
            self.conn.reset_stream(e.stream_id, ErrorCode.CANCEL, "stream closed")

    def _on_window(self, e: ev.WindowUpdated) -> None:
        s = self._streams.get(e.stream_id)
        if s is not None:
            s.credit_arrived()

    def _on_end(self, e: ev.StreamEnded) -> None:
        s = self._streams.get(e.stream_id)
        if s is not None:
            s.deliver(b"", True)

    def _on_stream_opened(self, e: ev.StreamOpened) -> None:
        if self._on_open is None:
            self.conn.reject_stream(
                e.stream_id, ErrorCode.NOT_ALLOWED, "this side accepts no streams"
            )
        else:
            self._on_open(self, e.stream_id, e.target)

    def _on_open_result(self, e: ev.OpenResult) -> None:
        ch = self._opening.pop(e.stream_id, None)
        if ch is None:
            if e.ok:
                self.conn.reset_stream(e.stream_id, ErrorCode.CANCEL, "open abandoned")
        elif e.ok:
            # Register the stream now, before the opener runs: data (or FIN) the target
            # sends first may follow in this very batch and must land in the stream.
            stream = TunnelStream(self, e.stream_id)
            self._streams[e.stream_id] = stream
            ch.send_nowait((e, stream))
        else:
            ch.send_nowait((e, None))

    def _on_reset(self, e: ev.StreamReset) -> None:
        s = self._streams.pop(e.stream_id, None)
        if s is not None:
            s.broken(f"reset by peer: {e.message or code_text(e.code)}", e.code)
        ch = self._opening.pop(e.stream_id, None)
        if ch is not None:
            ch.send_nowait((ev.OpenResult(e.stream_id, e.code, e.message), None))

    def _on_pong(self, e: ev.PongReceived) -> None:
        if e.rtt is not None:
            self.rtt = e.rtt

    def _on_handshake(self, e: ev.HandshakeComplete) -> None:
        self.peer_names = e.names
        self.peer_agent = e.agent
        self.handshake_done.set()

    def _on_goaway(self, e: ev.GoAwayReceived) -> None:
        self.draining = True
        log.info("%s: peer is draining (%s)", self.label, e.reason or "no reason")

    def _on_terminated(self, e: ev.ConnectionTerminated) -> None:
        self.close_reason = e.reason

    # event type -> handler: one lookup per event on the reader's path
    _HANDLERS: ClassVar[dict[type[ev.Event], Callable[[Session, Any], None]]] = {
        ev.DataReceived: _on_data,
        ev.WindowUpdated: _on_window,
        ev.StreamEnded: _on_end,
        ev.StreamOpened: _on_stream_opened,
        ev.OpenResult: _on_open_result,
        ev.StreamReset: _on_reset,
        ev.PongReceived: _on_pong,
        ev.HandshakeComplete: _on_handshake,
        ev.GoAwayReceived: _on_goaway,
        ev.ConnectionTerminated: _on_terminated,
    }

    # ------------------------------------------------------------------ writer
    def _kick(self) -> None:
        """Move protocol output to the socket now if it takes it; otherwise wake the writer.

        Whatever path it takes, senders waiting for output space are woken once the queue is
        below the high-water mark (a wake-up lost here would stall every stream of the tunnel).
        """
        conn = self.conn
        tls = self.tls
        lot = self._writable_lot
        if not conn.pending_output() and not tls.pending:  # nothing to write (the common case)
            if lot:
                lot.unpark_all()
            return
        if not self.closed.is_set():
            try:
                while tls.flush():  # the previous batch is out: encrypt and send the next one
                    if not conn.write_output(tls.send_chunk, WRITE_BATCH):
                        break
                else:
                    self._wake_writer()  # the socket is full: the writer waits for it
            except TransportError as exc:
                self._shutdown(str(exc))
                return
        if lot and conn.pending_output() <= OUTPUT_HIGH_WATER:
            lot.unpark_all()

    def _wake_writer(self) -> None:
        if self._writer_wakeup is not None:
            self._writer_wakeup.set()
        elif not self._writer_started and self._nursery is not None:
            self._writer_started = True
            self._nursery.start_soon(self._writer)

    async def _writer(self) -> None:
        """Waits for the socket while it is full; started the first time it is."""
        self._writer_started = True
        try:
            while True:
                while not self.tls.flush():
                    await self.tls.wait_writable()
                wakeup = self._writer_wakeup = trio.Event()
                self._kick()  # sets `wakeup` if the socket filled up again
                await wakeup.wait()
        except TransportError as exc:
            self._shutdown(str(exc))
        except trio.ClosedResourceError:  # another task closed the session under our wait
            self._shutdown(self.close_reason or "session closed")

    @property
    def output_full(self) -> bool:
        """More than the high-water mark is queued for the socket: senders should wait."""
        return self.conn.pending_output() > OUTPUT_HIGH_WATER

    async def wait_output_space(self) -> None:
        """Block while too much output is queued (TCP back-pressure)."""
        if self.output_full:
            self.stalls += 1
        while self.output_full and not self.closed.is_set():
            if self._writable_lot is None:
                self._writable_lot = trio.lowlevel.ParkingLot()
            await self._writable_lot.park()

    # ------------------------------------------------------------------ liveness
    def liveness_due(self, now: float) -> float | None:
        """Called by the liveness timer when due: ping every `ping_interval`; close the session
        `ping_timeout` after the last byte received (to the scheduler's precision), whatever the
        interval. Returns when to be called next (None: the session is over)."""
        if self.closed.is_set():
            return None
        try:
            deadline = self._last_rx + self._ping_timeout
            if now >= deadline:
                self.close(
                    f"no traffic from peer for {now - self._last_rx:.1f}s (ping timeout)",
                    ErrorCode.NO_ERROR,
                )
                return None
            if now >= self._next_ping:
                self._next_ping = now + self._ping_interval
                if self.conn.is_open:
                    self.conn.ping()
                    self._kick()
            return min(self._next_ping, deadline)
        except Exception as exc:  # a bug: it ends this tunnel only
            self._report("session", exc)
            self.close(f"internal error: {type(exc).__name__}", ErrorCode.INTERNAL_ERROR)
            return None
