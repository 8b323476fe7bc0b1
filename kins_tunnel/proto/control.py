"""The control frames of the multiplexer: HELLO, OPEN, OPEN_RESULT, WINDOW, RESET, PING, DELAY,
GOAWAY, and the connection-level state they drive.

`ControlFrames` is one of the parts `mux.Connection` is composed of (see `mux`): it owns the
connection's phase (`ConnState`), what the peer's HELLO and GOAWAY said, the round-trip
estimator, the delay probe, and the queue of control frames (`out`, which goes to the peer before
any DATA) with the counters that bound the answers in it. It is handed, at construction, the
objects of the connection it works on (the stream table, the DATA queues, the pacer, the frame
receiver whose byte count DELAY answers report) and touches nothing else. DATA, which streams
through the core as it arrives, is framed in `receive`, which calls the handlers below through
`CONTROL_HANDLERS`. Each handler checks its frame whole and raises `RemoteProtocolError` for
anything the protocol does not allow.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING

from kins_tunnel.proto.errors import ErrorCode, RemoteProtocolError
from kins_tunnel.proto.events import (
    Event,
    GoAwayReceived,
    HandshakeComplete,
    OpenResult,
    PongReceived,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from kins_tunnel.proto.frames import (
    FLAG_ACK,
    MAX_WINDOW_VALUE,
    PING_SIZE,
    PONG_HEADER,
    U32,
    FrameType,
    U32x2,
    U32x3,
    decode_text,
    delay_answer_frame,
    goaway_frame,
    open_result_frame,
)
from kins_tunnel.proto.handshake import Hello, MuxConfig, PeerLimits, parse_hello
from kins_tunnel.proto.output import DataQueues
from kins_tunnel.proto.pacer import DelayPacer, DelayProbe, clock_us
from kins_tunnel.proto.rtt import RttEstimator
from kins_tunnel.proto.streams import StreamInput, StreamState, StreamTable

if TYPE_CHECKING:
    from kins_tunnel.proto.receive import FrameReceiver

MAX_PENDING_PONGS = 16
MAX_PENDING_DELAY_ANSWERS = 16  # beyond, stamps go unanswered until our output moves


class ConnState(enum.Enum):
    HANDSHAKE = 1
    OPEN = 2
    CLOSED = 3


class ControlFrames:
    """The connection-level state and the handlers of the control frames (see the module)."""

    __slots__ = (
        "_config",
        "_hello",
        "_clock",
        "_streams",
        "_data",
        "_pacer",
        "_rx",
        "state",
        "peer",
        "version",
        "capabilities",
        "goaway_sent",
        "probe",
        "rtt",
        "peer_pings",
        "out",
        "pending_pongs",
        "pending_delay_answers",
    )

    def __init__(
        self,
        config: MuxConfig,
        hello: Hello,
        clock: Callable[[], float] | None,
        *,
        streams: StreamTable,
        data: DataQueues,
        rx: FrameReceiver,
    ) -> None:
        self._config, self._hello, self._clock = config, hello, clock
        # the other parts of the connection: those it works on, and the receiver whose count of
        # DATA bytes DELAY answers report
        self._streams, self._data, self._rx = streams, data, rx
        self._pacer: DelayPacer | None = None  # made with the connection's first DATA (`paced`)
        self.state = ConnState.HANDSHAKE
        self.peer = PeerLimits()  # what the peer's HELLO (and GOAWAY) said
        self.version: int | None = None
        self.capabilities: frozenset[str] = frozenset()
        self.goaway_sent: int | None = None  # the last peer stream id our GOAWAY let through
        self.probe: DelayProbe | None = None  # made at HELLO if both sides have "delay"
        self.rtt = RttEstimator()
        self.peer_pings = 0  # PINGs the peer sent (answered): it is checking the tunnel too
        self.out = bytearray()  # control frames: they go before any DATA
        self.pending_pongs = 0  # PONGs in `out` (a peer cannot make us queue without reading)
        self.pending_delay_answers = 0

    def paced(self, pacer: DelayPacer) -> None:
        """The connection made its pacer: probe the path with it once the peer has "delay"."""
        self._pacer = pacer
        if "delay" in self.capabilities:
            self.probe = DelayProbe(pacer)

    def now(self) -> float | None:
        return self._clock() if self._clock is not None else None

    # ------------------------------------------------------------------ handlers
    def _on_hello(self, sid: int, flags: int, body: memoryview, events: list[Event]) -> None:
        if self.state is not ConnState.HANDSHAKE or sid != 0:
            raise RemoteProtocolError("unexpected HELLO")
        version, caps, self.peer, agent = parse_hello(body, self._hello, self._config)
        self.version = version
        ours = self._hello.capabilities
        common = caps & ours
        # the common case (the peer has all ours) shares our set: 200 bytes less per connection
        self.capabilities = ours if common == ours else common
        if "delay" in self.capabilities and self._pacer is not None:
            self.probe = DelayProbe(self._pacer)
        self.state = ConnState.OPEN
        events.append(
            HandshakeComplete(version, self.capabilities, self.peer.names, agent, self.peer.time)
        )

    def _on_open(self, sid: int, flags: int, body: memoryview, events: list[Event]) -> None:
        self._streams.claim_remote_id(sid)
        if len(body) < 5 or len(body) - 4 > self._config.max_target_len:
            raise RemoteProtocolError("OPEN target missing or too long")
        (window,) = U32.unpack_from(body)
        if window == 0 or window > MAX_WINDOW_VALUE:
            raise RemoteProtocolError("OPEN grants an invalid window", ErrorCode.FLOW_CONTROL_ERROR)
        try:
            target = bytes(body[4:]).decode("utf-8")
        except UnicodeDecodeError:
            raise RemoteProtocolError("OPEN target is not UTF-8") from None
        if self.goaway_sent is not None:
            self.out += open_result_frame(sid, ErrorCode.GOING_AWAY, 0, "going away")
            return
        if self._streams.remote_open >= self._config.max_streams:
            self.out += open_result_frame(sid, ErrorCode.STREAM_LIMIT, 0, "too many streams")
            return
        self._streams.add_remote(sid, window, target)
        events.append(StreamOpened(sid, target))

    def _on_open_result(self, sid: int, flags: int, body: memoryview, events: list[Event]) -> None:
        s = self._streams.get(sid)
        if len(body) < 8:
            raise RemoteProtocolError("OPEN_RESULT too short")
        if s is None:
            if self._streams.is_local_id(sid) and self._streams.known_closed(sid):
                return  # we reset it meanwhile
            raise RemoteProtocolError(f"OPEN_RESULT for unknown stream {sid}")
        if s.state is not StreamState.OPENING:
            raise RemoteProtocolError(f"unexpected OPEN_RESULT for stream {sid}")
        code, window = U32x2.unpack_from(body)
        message = decode_text(body[8:])
        if code == ErrorCode.NO_ERROR:
            if window == 0 or window > MAX_WINDOW_VALUE:
                raise RemoteProtocolError(
                    "OPEN_RESULT grants an invalid window", ErrorCode.FLOW_CONTROL_ERROR
                )
            s.transition(StreamInput.RECV_OPEN_OK)
            s.send_credit = window
        else:
            s.transition(StreamInput.RECV_OPEN_REFUSED)
            self._streams.forget(sid)
        events.append(OpenResult(sid, ErrorCode.from_wire(code), message))

    def _on_window(self, sid: int, flags: int, body: memoryview, events: list[Event]) -> None:
        if len(body) != 4:
            raise RemoteProtocolError("WINDOW payload must be 4 bytes")
        (inc,) = U32.unpack_from(body)
        s = self._streams.get(sid)
        if s is None:
            if self._streams.known_closed(sid):
                return
            raise RemoteProtocolError(f"WINDOW for unknown stream {sid}")
        if inc == 0 or s.send_credit + inc > MAX_WINDOW_VALUE:
            raise RemoteProtocolError("invalid WINDOW increment", ErrorCode.FLOW_CONTROL_ERROR)
        s.transition(StreamInput.RECV_WINDOW)
        s.send_credit += inc
        if not s.local_fin:
            events.append(WindowUpdated(sid, inc))

    def _on_reset(self, sid: int, flags: int, body: memoryview, events: list[Event]) -> None:
        if len(body) < 4:
            raise RemoteProtocolError("RESET too short")
        if sid not in self._streams:
            if self._streams.known_closed(sid):
                return
            raise RemoteProtocolError(f"RESET for unknown stream {sid}")
        (code,) = U32.unpack_from(body)
        self._streams.forget(sid)
        self._data.purge(sid)  # the peer drops DATA for a stream it reset
        events.append(StreamReset(sid, ErrorCode.from_wire(code), decode_text(body[4:])))

    def _on_ping(self, sid: int, flags: int, body: memoryview, events: list[Event]) -> None:
        if sid != 0 or len(body) != PING_SIZE:
            raise RemoteProtocolError("malformed PING")
        payload = body.tobytes()
        if flags & FLAG_ACK:
            events.append(PongReceived(payload, self.rtt.answered(payload, self.now())))
            return
        self.pending_pongs += 1
        self.peer_pings += 1
        if self.pending_pongs > MAX_PENDING_PONGS:
            raise RemoteProtocolError("PING flood", ErrorCode.ENHANCE_YOUR_CALM)
        self.out += PONG_HEADER
        self.out += payload

    def _on_delay(self, sid: int, flags: int, body: memoryview, events: list[Event]) -> None:
        if sid != 0 or len(body) != (U32x3.size if flags & FLAG_ACK else U32.size):
            raise RemoteProtocolError("malformed DELAY")
        now = self.now()
        if now is None:
            return
        if flags & FLAG_ACK:
            if self.probe is not None:
                echo, received_at, received = U32x3.unpack_from(body)
                self.probe.answered(now, echo, received_at, received, self._data.held > 0)
            return
        if self.pending_delay_answers >= MAX_PENDING_DELAY_ANSWERS:
            return
        self.pending_delay_answers += 1
        (stamp,) = U32.unpack_from(body)
        received = self._rx.bytes_received & 0xFFFFFFFF
        self.out += delay_answer_frame(stamp, clock_us(now), received)

    def _on_goaway(self, sid: int, flags: int, body: memoryview, events: list[Event]) -> None:
        if sid != 0 or len(body) < 8:
            raise RemoteProtocolError("malformed GOAWAY")
        last, code = U32x2.unpack_from(body)
        prev = self.peer.goaway_last
        self.peer.goaway_last = last if prev is None else min(prev, last)
        # our streams above `last` were never seen by the peer
        for sid2 in [s.stream_id for s in self._streams if s.local and s.stream_id > last]:
            self._streams.forget(sid2)
            events.append(StreamReset(sid2, ErrorCode.GOING_AWAY, "peer is going away"))
        events.append(GoAwayReceived(last, ErrorCode.from_wire(code), decode_text(body[8:])))

    # ------------------------------------------------------------------ ends
    def send_goaway(self, code: ErrorCode, reason: str) -> None:
        """Queue GOAWAY: the peer's streams up to the highest it opened go on, no new ones."""
        self.goaway_sent = self._streams.highest_remote_id
        self.out += goaway_frame(self.goaway_sent, code, reason)

    def close_all(self) -> None:
        """The connection is over: forget every stream and every queued DATA byte."""
        self._streams.forget_all()
        self._data.purge_all()
        self.state = ConnState.CLOSED

    def fail(self, exc: RemoteProtocolError) -> None:
        """The peer broke the protocol: GOAWAY with the error's code, then close."""
        self.send_goaway(exc.code, str(exc))
        self.close_all()


ControlHandler = Callable[[ControlFrames, int, int, memoryview, list[Event]], None]

# control frame type -> handler (called by `receive.FrameReceiver` with the `ControlFrames` as
# first argument: one table for every connection, no bound methods per instance)
CONTROL_HANDLERS: dict[int, ControlHandler] = {
    FrameType.HELLO: ControlFrames._on_hello,
    FrameType.OPEN: ControlFrames._on_open,
    FrameType.OPEN_RESULT: ControlFrames._on_open_result,
    FrameType.WINDOW: ControlFrames._on_window,
    FrameType.RESET: ControlFrames._on_reset,
    FrameType.PING: ControlFrames._on_ping,
    FrameType.GOAWAY: ControlFrames._on_goaway,
    FrameType.DELAY: ControlFrames._on_delay,
}
