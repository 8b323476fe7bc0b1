"""The multiplexer: one `Connection` per tunnel, a pure state machine (no I/O, no clock of its own).

Theory of operation
-------------------
Feed bytes from the peer to `receive_data()`; it returns the events they carried. Call commands
(`open_stream`, `accept_stream`, `send_data`, `consumed`, `ping`, ...) and collect the bytes they
produced with `data_to_send()`, or hand them over in bounded batches without a copy with
`write_output()` (the transport's path). EOF is `receive_data(b"")`. Output is scheduled (see
`output`): control frames first, then the streams' DATA in turns, each stream's frames in
order. The connection never blocks and never buffers more than the limits allow:

- inbound, a frame's length is checked right after its 9-byte header, before its body is
  buffered. DATA bodies are not buffered at all: the bytes of a DATA frame are reported
  (`DataReceived`) as they arrive, so a 256 KiB frame never needs a 256 KiB contiguous read and is
  never copied into a reassembly buffer; only a partial header or a control frame (at most
  `MAX_CONTROL_PAYLOAD` bytes) waits for the rest of its bytes;
- received DATA is bounded per stream by the credit we granted (see `flow`), and the sum of grants
  by the session budget;
- outbound DATA is bounded by the credit the peer granted; control answers (PONG) are bounded by a
  small counter, so a peer cannot make us queue without reading.

Handshake: both sides send HELLO at once (magic, version range, a JSON object with capabilities,
the names the side serves, its agent string and limits). The version is the highest both support;
capabilities are the intersection. No other frame may come before HELLO.

Composition (as h2 composes its state machine, frame buffer and window manager): `Connection` is
a facade that holds the commands and the output, over parts that each own their state and are
handed, when they are made, the other parts they use:

- `streams.StreamTable` (with the session `flow.Budget`): every live stream and its state
  machine (an explicit state and a transition table) and windows (policy in `flow`);
- `output.DataQueues`: the DATA waiting for the peer, per stream, written in turns;
- `receive.FrameReceiver`: input framing; DATA bodies stream into the stream table, control
  frames go whole to the `ControlFrames` handed to it per call; types this version does not know
  are skipped after their length check, so later versions can add frame types;
- `control.ControlFrames`: the connection's phase (`ConnState`), what the peer's HELLO and
  GOAWAY said, the RTT estimator (`rtt`), the delay probe, the queue of control frames, and one
  handler per control frame type (`CONTROL_HANDLERS`, a table shared by every connection);
- `pacer.DelayPacer`: the bulk pacer, when pacing is on and there is a clock (made with the
  first DATA to write: an idle tunnel has none).

The handshake is `handshake`; byte layouts are `frames`. A stream is opened by OPEN (which grants
the acceptor its first window) and answered by OPEN_RESULT (which grants the opener its first
window, or refuses with an error code). Each direction ends independently with FIN (always
reported as `StreamEnded`); RESET aborts both.

Time: the core has no clock. The transport passes one (`trio.current_time`), so tests can drive
pings, RTT and window growth with a fake clock; without one, RTTs are unknown and windows grow on
every batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kins_tunnel.proto import ownership
from kins_tunnel.proto.control import ConnState, ControlFrames
from kins_tunnel.proto.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from kins_tunnel.proto.events import ConnectionTerminated, Event
from kins_tunnel.proto.flow import Budget, ReceiveWindow, credit_due, credit_to_return
from kins_tunnel.proto.frames import (
    HEADER_SIZE,
    PING_FRAME_SIZE,
    PING_HEADER,
    PING_SIZE,
    PONG_HEADER,
    FrameType,
    delay_stamp_frame,
    frame,
    open_frame,
    open_result_frame,
    ping_frame,
    reset_frame,
    window_frame,
)
from kins_tunnel.proto.handshake import Hello, MuxConfig, Role, encode_hello
from kins_tunnel.proto.output import DataQueues
from kins_tunnel.proto.pacer import DelayPacer, PacerStatistics, PacingConfig, check_pacing
from kins_tunnel.proto.receive import FrameReceiver
from kins_tunnel.proto.streams import Stream, StreamInput, StreamState, StreamTable


@dataclass(frozen=True, slots=True)
class Statistics:
    """A snapshot of the connection's counters (metrics, tests)."""

    streams: int
    buffered: int
    granted: int
    bytes_sent: int
    bytes_received: int
    srtt: float | None
    peer_names: tuple[str, ...] = ()
    local_open: int = 0  # streams we opened that are still open (at most peer_max_streams)
    remote_open: int = 0  # streams the peer opened that are still open (at most our max_streams)
    peer_max_streams: int = 0  # the peer's limit on streams we open
    input_buffered: int = 0  # bytes of a partial header or control frame waiting for the rest
    queued_streams: int = 0  # streams with DATA queued for the peer
    pacer: PacerStatistics | None = None  # None: pacing off (configured, or no clock)
    held: int = 0  # bytes of bulk DATA waiting for the pacer's credit


class Connection:
    """One end of a tunnel. Not thread-safe; owns no socket.

    A facade over the parts it is composed of (see the module): the stream table, the DATA
    queues, the frame receiver, the control frames and the pacer. The commands and the output
    are here; each part owns its own state.
    """

    __slots__ = (
        "role",
        "config",
        "_clock",
        "_budget",
        "_streams",
        "_data",
        "_pacing",
        "_pacer",
        "_rx",
        "_control",
        "bytes_sent",
    )

    def __init__(
        self,
        role: Role,
        hello: Hello = Hello(),
        config: MuxConfig = MuxConfig(),
        *,
        clock: Callable[[], float] | None = None,
        pacing: PacingConfig = PacingConfig(),
    ) -> None:
        self.role = role
        self.config = config
        self._clock = clock
        self._budget = Budget(config.session_budget)
        self._streams = StreamTable(role, self._budget)
        self._data = DataQueues(clock)  # DATA frames, per stream, written in turns
        # bulk pacing (see `pacer`): needs a clock; stamps go once the peer has "delay". The
        # pacer is made with the first DATA to write (`_paced`): an idle tunnel has none.
        self._pacing = pacing if pacing.enabled and clock is not None else None
        self._pacer: DelayPacer | None = None
        if self._pacing is not None:
            check_pacing(pacing.target_delay, pacing.max_rate)  # refused now, not at the DATA
        self._rx = FrameReceiver(self._streams, config.max_frame)
        self._control = ControlFrames(
            config,
            hello,
            clock,
            streams=self._streams,
            data=self._data,
            rx=self._rx,
        )
        self.bytes_sent = 0
        self._control.out += frame(FrameType.HELLO, 0, encode_hello(hello, config))

    # ------------------------------------------------------------------ queries
    @property
    def srtt(self) -> float | None:
        return self._control.rtt.srtt

    @property
    def min_rtt(self) -> float | None:
        return self._control.rtt.min_rtt

    @property
    def is_open(self) -> bool:
        return self._control.state is ConnState.OPEN

    @property
    def closed(self) -> bool:
        return self._control.state is ConnState.CLOSED

    @property
    def version(self) -> int | None:
        """The protocol version both sides speak (None before the peer's HELLO)."""
        return self._control.version

    @property
    def capabilities(self) -> frozenset[str]:
        """The capabilities both sides have (empty before the peer's HELLO)."""
        return self._control.capabilities

    @property
    def peer_pings(self) -> int:
        """PINGs the peer sent (answered): it is checking the tunnel too."""
        return self._control.peer_pings

    @property
    def bytes_received(self) -> int:
        return self._rx.bytes_received

    @property
    def peer_names(self) -> tuple[str, ...]:
        return self._control.peer.names

    @property
    def peer_idle_ping(self) -> float | None:
        """Seconds of silence after which the peer pings an idle tunnel, if its HELLO said."""
        return self._control.peer.idle_ping

    @property
    def peer_going_away(self) -> bool:
        return self._control.peer.goaway_last is not None

    @property
    def going_away(self) -> bool:
        return self._control.goaway_sent is not None

    def send_window(self, stream_id: int) -> int:
        """Bytes we may send on the stream now (0 if unknown or closed for sending)."""
        s = self._streams.get(stream_id)
        if s is None or s.local_fin or not s.established:
            return 0
        return s.send_credit

    def statistics(self) -> Statistics:
        peer = self._control.peer
        pacing, pacer = self._pacing, self._pacer
        if pacer is None and pacing is not None:  # none made yet (no DATA): what it would say
            pacer = DelayPacer(pacing.target_delay, pacing.max_rate)
        return Statistics(
            streams=len(self._streams),
            buffered=sum(s.recv.buffered for s in self._streams),
            granted=self._budget.granted,
            bytes_sent=self.bytes_sent,
            bytes_received=self._rx.bytes_received,
            srtt=self.srtt,
            peer_names=peer.names,
            local_open=self._streams.local_open,
            remote_open=self._streams.remote_open,
            peer_max_streams=peer.max_streams,
            input_buffered=self._rx.buffered,
            queued_streams=self._data.queued_streams,
            pacer=pacer.statistics() if pacer is not None else None,
            held=self._data.held if self._pacer is not None and self._pacer.engaged else 0,
        )

    @property
    def peer_max_streams(self) -> int:
        """The peer's limit on the streams we may have open at once (from its HELLO)."""
        return self._control.peer.max_streams

    def is_live(self, stream_id: int) -> bool:
        """The stream is known and not yet forgotten (open, opening or half-closed)."""
        return stream_id in self._streams

    # ------------------------------------------------------------------ input
    def receive_data(
        self, data: bytes | bytearray | memoryview, *, copy: bool = True
    ) -> list[Event]:
        """Parse bytes from the peer into events. `b""` means EOF.

        With `copy=False`, each `DataReceived.data` is a memoryview of `data` instead of a copy:
        the caller must copy what it keeps before it reuses `data` (the transport writes most
        received bytes straight into a socket, so it copies only what it queues).

        Raises RemoteProtocolError (with a GOAWAY queued) when the peer broke the protocol.
        """
        control = self._control
        if control.state is ConnState.CLOSED:
            return []
        events: list[Event] = []
        if not data:
            control.close_all()
            events.append(ConnectionTerminated(ErrorCode.NO_ERROR, "peer closed the connection"))
            return events
        with memoryview(data) as view:
            try:
                self._rx.receive(view, copy, control, events)
            except RemoteProtocolError as exc:
                control.fail(exc)
                raise
        return events

    def answer_lone_ping(self, data: bytes | bytearray | memoryview) -> bytes | None:
        """The idle tunnel's path: if `data` is exactly one PING (not an answer) that begins
        between frames on an open connection, count it as `receive_data` would and return its
        PONG for the caller to send at once, ahead of nothing (it checks that nothing is queued:
        `pending_output()`); no event, no queue. None: `data` is anything else and nothing was
        done (give it to `receive_data`).

        The PONG is the caller's to send: it is not queued here, so it does not count towards the
        bound on queued answers (a peer that does not read fills the socket, and then the caller's
        queue is no longer empty and its PINGs take `receive_data`'s path)."""
        if (
            len(data) != PING_FRAME_SIZE
            or self._control.state is not ConnState.OPEN
            or not self._rx.between_frames
            or data[:HEADER_SIZE] != PING_HEADER
        ):
            return None
        self._control.peer_pings += 1
        return PONG_HEADER + data[HEADER_SIZE:]

    # ------------------------------------------------------------------ output
    def data_to_send(self) -> bytearray:
        """Everything queued for the peer, in order; the caller owns the returned buffer."""
        control = self._control
        out = control.out
        if self._data:
            self._data.take_all(out)
        if not out:
            return out
        control.out = bytearray()
        control.pending_pongs = 0
        return out

    def write_output(self, write: Callable[[memoryview], object], limit: int) -> int:
        """Hand about `limit` queued bytes to `write`; returns the count handed over.

        `write` gets views of buffers this connection reuses: they are valid only until it returns
        (it copies or sends them: the zero-copy contract of docs/DESIGN.md "Transport objects and
        who owns what", checked in debug mode by `ownership`). Control frames go first, whole;
        then DATA in turns across streams (see `output`). The transport's path: nothing is copied
        or allocated per batch.
        """
        handed = 0
        control = self._control
        out = control.out
        data = self._data
        pacer = self._pacer
        if pacer is None and data and self._pacing is not None:
            pacer = self._paced()
        now = 0.0
        if pacer is not None and data:
            now = self._clock()  # type: ignore[misc]  # a pacer exists only with a clock
            probe = control.probe
            if probe is not None:
                stamp = probe.stamp_due(now)
                if stamp is not None:
                    out += delay_stamp_frame(stamp)
        if out:
            with memoryview(out) as view:
                write(view)
            handed = len(out)
            if ownership.CHECKS:
                ownership.expect_unshared(out, "control frames")
            del out[:]
            control.pending_pongs = 0
            control.pending_delay_answers = 0
        if data and handed < limit:
            if pacer is None or not pacer.engaged:
                data.held = 0
                handed += data.write(write, limit - handed)
            else:
                credit = pacer.credit(now)
                n, paced = data.write_paced(write, limit - handed, credit or 0)
                pacer.spent(paced)
                handed += n
        return handed

    def paced_until(self) -> float | None:
        """When the pacer lets held bulk DATA go next (the transport's timer), or None if
        nothing is held."""
        pacer = self._pacer
        if pacer is None or not pacer.engaged or not self._data.held:
            return None
        return pacer.next_send_at(self._clock())  # type: ignore[misc]

    def unpaced_output(self) -> int:
        """Queued bytes not held by the pacer: what the socket will take (back-pressure)."""
        held = self._data.held if self._pacer is not None and self._pacer.engaged else 0
        return max(len(self._control.out) + self._data.pending - held, 0)

    def pending_output(self) -> int:
        return len(self._control.out) + self._data.pending

    @property
    def pacer(self) -> DelayPacer | None:
        """The bulk pacer (None: pacing off, configured so or no clock)."""
        return None if self._pacing is None else self._paced()

    def _paced(self) -> DelayPacer:
        """The pacer, made now if it is not yet (pacing is on); its probe too, once the peer has
        "delay"."""
        pacer = self._pacer
        if pacer is None:
            pacing = self._pacing
            assert pacing is not None
            pacer = self._pacer = DelayPacer(pacing.target_delay, pacing.max_rate)
            self._control.paced(pacer)
        return pacer

    def is_bulk(self, stream_id: int) -> bool:
        """The stream has DATA queued and counts as bulk (paced while the pacer is engaged)."""
        return self._data.is_bulk(stream_id)

    # ------------------------------------------------------------------ commands
    def _require_open(self) -> ControlFrames:
        control = self._control
        if control.state is not ConnState.OPEN:
            raise LocalProtocolError(f"connection is not open (state {control.state.name})")
        return control

    def open_stream(self, target: str) -> int:
        """Ask the peer to open a stream to `target`; returns its id. Answer: an OpenResult event."""
        control = self._require_open()
        peer = control.peer
        if peer.goaway_last is not None:
            raise LocalProtocolError("peer is going away", ErrorCode.GOING_AWAY)
        if control.goaway_sent is not None:
            raise LocalProtocolError("we are going away", ErrorCode.GOING_AWAY)
        if self._streams.local_open >= peer.max_streams:
            raise LocalProtocolError("peer's stream limit reached", ErrorCode.STREAM_LIMIT)
        raw = target.encode("utf-8")
        if not raw or len(raw) > peer.max_target_len:
            raise LocalProtocolError("target name empty or too long")
        grant = self._budget.initial_grant(self.config.initial_window)
        sid = self._streams.open_local(
            ReceiveWindow(grant, grant, last_return=control.now()), target
        ).stream_id
        control.out += open_frame(sid, grant, raw)
        return sid

    def accept_stream(self, stream_id: int) -> None:
        """Answer a StreamOpened: the target is connected, data may flow both ways."""
        s = self._pending_remote(stream_id)
        s.transition(StreamInput.SEND_ACCEPT)
        grant = self._budget.initial_grant(self.config.initial_window)
        control = self._control
        s.recv = ReceiveWindow(grant, grant, last_return=control.now())
        control.out += open_result_frame(stream_id, ErrorCode.NO_ERROR, grant)

    def reject_stream(self, stream_id: int, code: ErrorCode | int, message: str = "") -> None:
        """Answer a StreamOpened with an error code; the stream is gone."""
        if code == ErrorCode.NO_ERROR:
            raise LocalProtocolError("reject_stream needs an error code")
        self._pending_remote(stream_id).transition(StreamInput.SEND_REJECT)
        self._control.out += open_result_frame(stream_id, code, 0, message)
        self._streams.forget(stream_id)

    def is_pending_remote(self, stream_id: int) -> bool:
        """The peer opened the stream and it waits for accept_stream/reject_stream."""
        s = self._streams.get(stream_id)
        return s is not None and s.state is StreamState.PENDING

    def _pending_remote(self, stream_id: int) -> Stream:
        s = self._streams.get(stream_id)
        if s is None or s.state is not StreamState.PENDING:
            raise LocalProtocolError(f"stream {stream_id} is not waiting for an answer")
        return s

    def send_data(
        self, stream_id: int, data: bytes | bytearray | memoryview, end_stream: bool = False
    ) -> int:
        """Queue as much of `data` as the stream's credit allows; returns how many bytes were taken.

        With `end_stream`, FIN goes out with the last byte, but only if all of `data` was taken.
        """
        s = self._streams.get(stream_id)
        if s is None:
            raise LocalProtocolError(f"stream {stream_id} is not open")
        if s.state is not StreamState.OPEN:  # OPEN stays OPEN: no table lookup on the hot path
            s.transition(StreamInput.SEND_DATA)
        total = len(data)
        n = min(total, s.send_credit)
        fin = end_stream and n == total
        if n or fin:
            self._data.add(stream_id, data, n, self._control.peer.max_frame, fin)
        s.send_credit -= n
        self.bytes_sent += n
        if fin:
            s.transition(StreamInput.SEND_FIN)
            self._streams.forget_if_done(s)
        return n

    def end_stream(self, stream_id: int) -> None:
        """Send FIN: we will send nothing more on this stream (half-close)."""
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(
        self, stream_id: int, code: ErrorCode = ErrorCode.CANCEL, message: str = ""
    ) -> None:
        """Abort the stream both ways. Unknown or finished streams are ignored (a race, not a bug)."""
        control = self._control
        if stream_id not in self._streams or control.state is ConnState.CLOSED:
            return
        self._data.purge(stream_id)  # its queued DATA is void now
        control.out += reset_frame(stream_id, code, message)
        self._streams.forget(stream_id)

    def consumed(self, stream_id: int, n: int) -> None:
        """The application took `n` bytes of the stream's received data: return credit (batched)."""
        s = self._streams.get(stream_id)
        if s is None:
            return  # stream already gone; its budget share was released then
        w = s.recv
        if n > w.buffered:
            raise LocalProtocolError(f"consumed {n} bytes but only {w.buffered} are buffered")
        w.buffered -= n
        w.unreturned += n
        if s.state is not StreamState.OPEN and s.remote_fin:
            # nothing more will come: no credit needed; a finished stream goes once drained
            self._streams.forget_if_done(s)
            return
        if not credit_due(w):  # the common case for small reads: no clock, no RTT needed
            return
        control = self._control
        inc = credit_to_return(
            w,
            budget=self._budget,
            max_window=self.config.max_window,
            now=control.now(),
            rtt=control.rtt.min_rtt,
        )
        if inc:
            control.out += window_frame(stream_id, inc)

    def release(self, stream_id: int) -> None:
        """The application is done with a finished stream (both FINs seen): drop its state."""
        s = self._streams.get(stream_id)
        if s is not None and s.state is StreamState.CLOSED:
            self._streams.forget(stream_id)

    def ping(self, payload: bytes | None = None) -> bytes:
        """Queue a PING; the PongReceived event reports the round trip. Returns the payload used."""
        control = self._require_open()
        if payload is None:
            payload = control.rtt.next_payload()
        if len(payload) != PING_SIZE:
            raise LocalProtocolError("ping payload must be 8 bytes")
        control.rtt.sent(payload, control.now())
        control.out += ping_frame(payload)
        return payload

    def goaway(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Tell the peer we are draining: we open nothing new and refuse its new streams."""
        control = self._control
        if control.state is ConnState.CLOSED or control.goaway_sent is not None:
            return
        control.send_goaway(code, reason)

    def close(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Send GOAWAY (if not yet sent) and forget every stream."""
        self.goaway(code, reason)
        self._control.close_all()
