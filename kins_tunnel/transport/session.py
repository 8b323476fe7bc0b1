"""One tunnel session: a `proto.Connection` driven over a `ByteTransport` (a `TLSSocket` in the
product, `testing.memory_transport` in tests), streams as trio streams.

Theory of operation
-------------------
- **The reader** (the task that runs `serve()`) decrypts up to `READ_BATCH` (1 MiB) per wake-up
  into a buffer shared by every session of the trio run, feeds it to the protocol core and
  dispatches the events. It never waits on any stream: received data goes into the stream's queue
  (or straight into the relay's socket), which flow control bounds to the window we granted;
  waiting tasks are woken. A read that is one PING and nothing else (an idle tunnel's whole
  traffic) is answered at once when no output is queued (`Connection.answer_lone_ping`,
  `SessionWriter.send_direct`): no events, no queue, one write.
- **Writes** (`writer.SessionWriter`, the session's `output`): whoever produces protocol output
  calls `output.kick()`, which writes at once if the socket takes it (no task switch on the
  latency path) and otherwise leaves the rest to a writer task, started the first time the socket
  is full. Senders wait while too much is queued: TCP's back-pressure reaches them.
- **Liveness** (`liveness`, one timer for every session of the trio run): a tunnel holding streams
  pings every `ping_interval` and is dead when nothing at all has arrived for `ping_timeout`
  (every stream on it then breaks at once). An idle one is watched by the kernel (TCP keepalive
  tuned to the same interval and timeout, `keepalive`) and pings only after `idle_ping_interval`
  of silence (on the edge; half the busy margin more on the cloud, so the edge's ping comes first
  and the cloud only answers), the cloud every `RTT_REFRESH` idle intervals for its RTT; it is
  dead after the idle interval plus the busy margin of silence: see `ping_policy`. A tunnel that
  takes its first stream is watched again on the busy schedule at once.
- **Memory of an idle tunnel**: one task (the reader, waiting for the socket), a few small objects
  (handlers in class-level tables, the writer's parts made when first needed), the TLS state.
  `handshake_done` and `goaway_received` are made when first asked for, the connection's bulk
  pacer with its first DATA (`benchmarks/idlemem.py` measures what is left).
- **Streams** (`TunnelStream`) are `trio.abc.HalfCloseableStream`s: `send_eof` sends FIN,
  `receive_some` returns b"" after the peer's FIN, and a RESET surfaces as `BrokenResourceError`.
  Credit goes back to the peer when `receive_some` hands bytes to the application.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from kins_tunnel.errors import OpenFailed
from kins_tunnel.proto import (
    Connection,
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
)
from kins_tunnel.proto import events as ev
from kins_tunnel.proto.frames import PING_FRAME_SIZE
from kins_tunnel.transport.buffers import RunBuffer
from kins_tunnel.transport.byte_transport import ByteTransport
from kins_tunnel.transport.dispatch import HANDLERS
from kins_tunnel.transport.errors import HandshakeFailed
from kins_tunnel.transport.isolation import ErrorReporter, log_internal_error
from kins_tunnel.transport.opening import PendingOpens
from kins_tunnel.transport.ping_policy import RTT_REFRESH, quiet_after
from kins_tunnel.transport.session_liveness import SessionLiveness
from kins_tunnel.transport.session_state import SessionState, hello_failure_reason
from kins_tunnel.transport.statistics import SessionStatistics
from kins_tunnel.transport.stream import TunnelStream
from kins_tunnel.transport.tls import READ_BATCH, TransportError
from kins_tunnel.transport.writer import SessionWriter

log = logging.getLogger("kins_tunnel.session")

__all__ = ["RTT_REFRESH", "Session", "SessionState", "hello_failure_reason", "quiet_after"]


# One read buffer for every session of the trio run. Copy contract (docs/DESIGN.md, "Transport
# objects and who owns what"): `receive_data(copy=False)` copies what it keeps (partial frames),
# DATA events are views of the buffer and a stream copies what it queues (`deliver`); nothing
# awaits between the fill and the end of the dispatch.
_READ_BUFFER = RunBuffer("kins_tunnel_read_buffer", READ_BATCH)


class Session(SessionLiveness):
    """A live tunnel. Run `serve()` in a nursery; it returns when the tunnel is over."""

    __slots__ = (
        "tls",
        "conn",
        "label",
        "_on_open",
        "_report",
        "_streams",
        "_opens",
        "output",
        "_last_rx",
        "_handshake_done",
        "closed",
        "close_reason",
        "peer_names",
        "peer_agent",
        "draining",
        "_goaway_received",
        "rtt",
        "started_at",
        "stalls",
        "state",
        "_error",
        "_nursery",
        "_idle",
    )

    def __init__(
        self,
        tls: ByteTransport,
        conn: Connection,
        *,
        on_open: Callable[[Session, int, str], None] | None = None,
        ping_interval: float = 10.0,
        ping_timeout: float = 20.0,
        idle_ping_interval: float | None = None,
        label: str = "",
        report: ErrorReporter = log_internal_error,
    ) -> None:
        self.tls, self.conn, self.label = tls, conn, label
        self._on_open, self._report = on_open, report
        idle = ping_interval if idle_ping_interval is None else idle_ping_interval
        self._init_liveness(conn.role, ping_interval, ping_timeout, idle)
        self._streams: dict[int, TunnelStream] = {}
        self._opens = PendingOpens()
        self._last_rx = trio.current_time()
        self._handshake_done: trio.Event | None = None  # see `handshake_done`
        self.closed = trio.Event()
        self.output = SessionWriter(conn, tls, self.closed, self._shutdown)
        self.close_reason = ""
        self.peer_names: tuple[str, ...] = ()
        self.peer_agent = ""
        self.draining = False  # the peer sent GOAWAY
        self._goaway_received: trio.Event | None = None  # see `goaway_received`
        self.rtt: float | None = None
        self.started_at = self._last_rx
        self.stalls = 0
        self.state = SessionState.NEW
        self._error: BaseException | None = None  # what ended the session, if it failed
        self._nursery: trio.Nursery | None = None
        self._idle: trio.Event | None = None  # made by `wait_idle`, set when the last stream leaves

    # ------------------------------------------------------------------ lifecycle
    async def serve(
        self,
        *,
        handshake_timeout: float = 10.0,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run the session: `handshake()`, then `task_status.started()`, then read until the
        tunnel ends. The calling task is the session's reader; the session's other tasks (the
        writer, `start_stream_task`) run in a nursery of its own.

        Raises `HandshakeFailed` if the HELLO exchange fails, and nothing else (but
        cancellation): once the session is open, whatever ends it (the peer, the network, a ping
        timeout, `close()`, a bug in one of its tasks, reported) just makes `serve` return, with
        `close_reason` saying why. The session is closed when `serve` is over.
        """
        failure: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.output.start(nursery)
                await self.handshake(handshake_timeout)
                task_status.started()
                if not self.closed.is_set():  # whoever we told may have closed it at once
                    await self._reader(handshaking=False)
                nursery.cancel_scope.cancel()
        except* HandshakeFailed as group:
            failure = group.exceptions[0]
        except* (TransportError, trio.ClosedResourceError, trio.BrokenResourceError) as group:
            self._shutdown(self.close_reason or str(group.exceptions[0]) or "session closed")
        except* Exception as group:  # a bug in one of the session's tasks: this tunnel ends
            for exc in group.exceptions:
                self._report("session", exc)
            self._shutdown(f"internal error: {type(group.exceptions[0]).__name__}")
        finally:
            self._shutdown(self.close_reason or "session ended")
        if failure is not None:
            raise failure

    async def handshake(self, timeout: float) -> None:
        """Send our HELLO and read until the peer's has come and the batch that brought it is
        dispatched (`state` goes from NEW through HANDSHAKING to OPEN), within `timeout` seconds.

        Raises `HandshakeFailed` (its `reason` from `hello_failure_reason`), the session then
        closed. `serve()` calls this first, in the session's nursery; a caller that wants the two
        phases apart starts `serve` with `nursery.start`, which returns once this is done.
        """
        if self.state is not SessionState.NEW:
            raise RuntimeError(f"handshake() on a session in state {self.state.name}")
        self.state = SessionState.HANDSHAKING
        self.output.kick()  # our HELLO
        with trio.move_on_after(timeout) as scope:
            await self._reader(handshaking=True)  # returns once the handshake is complete
        if self.state is SessionState.HANDSHAKING and self.handshake_done.is_set():
            self.state = SessionState.OPEN
            self._handshake_done = None  # set for good: made again, set, if asked for
            self._watch()
            return
        reason = hello_failure_reason(self._error, scope.cancelled_caught)
        self._shutdown(self.close_reason or "tunnel handshake timed out")
        raise HandshakeFailed(reason, self.close_reason)

    @property
    def handshake_done(self) -> trio.Event:
        """Set once the peer's HELLO has been dispatched. An idle tunnel keeps no Event it never
        waits on: this one is made when first asked for and let go once the session is open."""
        done = self._handshake_done
        if done is None:
            done = self._handshake_done = trio.Event()
            if self.conn.version is not None:  # the peer's HELLO is in
                done.set()
        return done

    @property
    def goaway_received(self) -> trio.Event:
        """Set with `draining` (made when first asked for, like `handshake_done`)."""
        event = self._goaway_received
        if event is None:
            event = self._goaway_received = trio.Event()
            if self.draining:
                event.set()
        return event

    def _shutdown(self, reason: str) -> None:
        if not self.close_reason:
            self.close_reason = reason
        self.state = SessionState.CLOSED
        self.closed.set()
        for stream in list(self._streams.values()):
            stream.broken(f"tunnel closed: {self.close_reason}")
        self._streams.clear()
        self._stream_left()
        self._opens.close_all()
        self.output.wake_senders()
        self._unwatch()
        self.tls.close()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def close(self, reason: str, code: ErrorCode = ErrorCode.NO_ERROR) -> None:
        """End the session now: try to tell the peer (GOAWAY), then drop the connection."""
        if self.closed.is_set():
            return
        self.conn.close(code, reason)
        self.output.kick()
        self._shutdown(reason)

    def goaway(self, reason: str = "draining") -> None:
        """Start draining: the peer may not open new streams; existing streams go on."""
        self.conn.goaway(ErrorCode.NO_ERROR, reason)
        self.output.kick()

    def statistics(self) -> SessionStatistics:
        return SessionStatistics.of(
            self.conn, len(self._streams), self.rtt, self.tls.pending, self.stalls
        )

    async def wait_idle(self, deadline: float) -> bool:
        """Wait until the session holds no stream and its output is in the socket (the last
        streams' final DATA and FIN included), or it is closed, or until `deadline` (trio clock).
        True if it is idle or closed; False if the deadline came first."""
        with trio.move_on_at(deadline):
            while self._streams and not self.closed.is_set():
                if self._idle is None:
                    self._idle = trio.Event()
                await self._idle.wait()
            self.output.kick()
            await self.output.wait_flushed()
        return self.closed.is_set() or not (
            self._streams or self.conn.pending_output() or self.tls.pending
        )

    def _stream_left(self) -> None:
        """A stream left `_streams`: wake `wait_idle` if it was the last one."""
        if self._idle is not None and not self._streams:
            self._idle.set()
            self._idle = None

    @property
    def stream_count(self) -> int:
        """Streams the application holds on this tunnel now."""
        return len(self._streams)

    @property
    def peer_max_streams(self) -> int:
        """How many streams the peer lets us hold open on this tunnel."""
        return self.conn.peer_max_streams

    @property
    def usable(self) -> bool:
        """Can carry new streams: handshake done, not closed, neither side draining."""
        return self.state is SessionState.OPEN and not self.draining and not self.conn.going_away

    # ------------------------------------------------------------------ streams
    async def open_stream(self, target: str, timeout: float) -> TunnelStream:
        """Ask the peer to open a stream to `target`; OpenFailed on refusal or after `timeout`."""
        if not self.usable:
            raise OpenFailed(ErrorCode.GOING_AWAY, "tunnel is not available")
        try:
            sid = self.conn.open_stream(target)
        except LocalProtocolError as exc:
            raise OpenFailed(exc.code, str(exc)) from None
        self._going_busy()
        self.output.kick()
        return await self._opens.wait(sid, timeout, self)

    def abandon_open(self, stream_id: int) -> None:
        """An open we sent is not waited for any more (timeout, cancel): reset the stream."""
        if not self.closed.is_set():
            self.conn.reset_stream(stream_id, ErrorCode.CANCEL, "open abandoned")
            self.output.kick()

    def accept(self, stream_id: int) -> TunnelStream:
        """Accept a stream the peer opened (after `on_open`), returning it."""
        self.conn.accept_stream(stream_id)
        stream = TunnelStream(self, stream_id)
        self._going_busy()
        self._streams[stream_id] = stream
        self.output.kick()
        return stream

    def reject(self, stream_id: int, code: ErrorCode | int, message: str) -> None:
        if self.closed.is_set():
            return
        try:
            self.conn.reject_stream(stream_id, code, message)
        except LocalProtocolError:
            return  # reset or gone meanwhile
        self.output.kick()

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
            self._stream_left()
        self._opens.fail(stream_id)
        try:
            if self.conn.is_pending_remote(stream_id):
                self.conn.reject_stream(stream_id, ErrorCode.INTERNAL_ERROR, "internal error")
            else:
                self.conn.reset_stream(stream_id, ErrorCode.INTERNAL_ERROR, "internal error")
        except LocalProtocolError:
            pass
        self.output.kick()

    # ------------------------------------------------------------------ StreamIO (for TunnelStream)
    @property
    def is_closed(self) -> bool:
        return self.closed.is_set()

    def send(self, stream_id: int, data: bytes | bytearray | memoryview, end: bool = False) -> int:
        n = self.conn.send_data(stream_id, data, end)
        self.output.kick()
        if n < len(data):
            self.stalls += 1  # the sender waits for the peer's credit
        return n

    def consumed(self, stream_id: int, n: int) -> None:
        self.conn.consumed(stream_id, n)
        self.output.kick()

    def send_window(self, stream_id: int) -> int:
        return self.conn.send_window(stream_id)

    def reset(self, stream_id: int, code: ErrorCode, message: str) -> None:
        self.conn.reset_stream(stream_id, code, message)
        self.output.kick()

    def detach(self, stream_id: int) -> None:
        if self._streams.pop(stream_id, None) is not None:
            self._stream_left()
        self.conn.release(stream_id)

    # ------------------------------------------------------------------ reader
    async def _reader(self, *, handshaking: bool) -> None:
        """Read, decode and dispatch until the session ends (`handshaking`: or until the peer's
        HELLO is dispatched). Failures end the session (`_error` keeps what it was)."""
        view = _READ_BUFFER.get()
        tls = self.tls
        conn = self.conn
        output = self.output
        handlers = HANDLERS
        now = trio.lowlevel.current_clock().current_time
        try:
            while True:
                if tls.drained:
                    tls.drained = False
                    await tls.wait_readable()
                n = tls.receive_into(view)
                if n is None:
                    await tls.wait_readable()
                    continue
                self._last_rx = now()
                if n == PING_FRAME_SIZE and not handshaking and output.idle:
                    pong = conn.answer_lone_ping(view[:n])
                    if pong is not None:  # an idle tunnel's PING: answered at once, no events
                        output.send_direct(pong)
                        continue
                try:
                    events = conn.receive_data(view[:n] if n else b"", copy=False)
                except RemoteProtocolError as exc:
                    self._error = exc
                    self.output.kick()
                    self._shutdown(f"protocol error from peer: {exc}")
                    return
                for e in events:
                    try:
                        handlers[type(e)](self, e)
                    except Exception as exc:
                        self._stream_event_failed(e, exc)
                if conn.closed:
                    self.output.kick()
                    self._shutdown(self.close_reason or "peer closed the tunnel")
                    return
                self.output.kick()
                if handshaking and self.handshake_done.is_set():
                    return  # serve() goes on reading outside the handshake's deadline
                if n == len(view):  # a full batch: more is waiting; let the other tasks run first
                    await trio.lowlevel.checkpoint()
        except TransportError as exc:
            self._error = exc
            self._shutdown(str(exc))
        except trio.ClosedResourceError:  # another task closed the session under our wait
            self._shutdown(self.close_reason or "session closed")
        except Exception as exc:  # a bug: it ends this tunnel only, never the process
            self._error = exc
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

    # ------------------------------------------------------------------ output (see `writer`)
    @property
    def output_full(self) -> bool:
        """More than the high-water mark is queued for the socket: senders should wait."""
        return self.output.full

    async def wait_output_space(self) -> None:
        """Block while too much output is queued (TCP back-pressure)."""
        if self.output.full:
            self.stalls += 1
            await self.output.wait_space()
