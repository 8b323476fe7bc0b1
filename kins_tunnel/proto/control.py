"""The control frames of the multiplexer: HELLO, OPEN, OPEN_RESULT, WINDOW, RESET, PING, GOAWAY.

`ControlFrames` is the part of `mux.Connection` that answers them, plus the bookkeeping of ends
(forgetting a stream, closing everything, failing with a GOAWAY). DATA, which streams through the
core as it arrives, is framed in `receive`. Each handler checks its frame whole and raises
`RemoteProtocolError` for anything the protocol does not allow; `Connection` dispatches to them by
frame type and owns the state they share, declared below.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

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
    U32,
    U32x2,
    U32x3,
    decode_text,
    delay_answer_frame,
    goaway_frame,
    open_result_frame,
    ping_frame,
)
from kins_tunnel.proto.handshake import Hello, MuxConfig, PeerLimits, parse_hello
from kins_tunnel.proto.output import DataQueues
from kins_tunnel.proto.pacer import DelayPacer, DelayProbe, clock_us
from kins_tunnel.proto.rtt import RttEstimator
from kins_tunnel.proto.streams import StreamInput, StreamState, StreamTable

MAX_PENDING_PONGS = 16
MAX_PENDING_DELAY_ANSWERS = 16  # beyond, stamps go unanswered until our output moves


class ConnState(enum.Enum):
    HANDSHAKE = 1
    OPEN = 2
    CLOSED = 3


class ControlFrames:
    """Handlers of the control frames; mixed into `mux.Connection`, which sets these attributes."""

    config: MuxConfig
    version: int | None
    capabilities: frozenset[str]
    _clock: Callable[[], float] | None
    _state: ConnState
    _hello: Hello
    _peer: PeerLimits
    _streams: StreamTable
    _out: bytearray
    _data: DataQueues
    _pending_pongs: int
    _pending_delay_answers: int
    _probe: DelayProbe | None
    _pacer: DelayPacer | None
    bytes_received: int
    peer_pings: int
    _rtt: RttEstimator
    _goaway_sent: int | None

    @property
    def closed(self) -> bool:
        return self._state is ConnState.CLOSED

    def _on_hello(self, sid: int, flags: int, body: memoryview, events: list[Event]) -> None:
        if self._state is not ConnState.HANDSHAKE or sid != 0:
            raise RemoteProtocolError("unexpected HELLO")
        version, caps, self._peer, agent = parse_hello(body, self._hello, self.config)
        self.version = version
        self.capabilities = caps & self._hello.capabilities
        if "delay" in self.capabilities and self._pacer is not None:
            self._probe = DelayProbe(self._pacer)
        self._state = ConnState.OPEN
        events.append(
            HandshakeComplete(version, self.capabilities, self._peer.names, agent, self._peer.time)
        )

    def _on_open(self, sid: int, flags: int, body: memoryview, events: list[Event]) -> None:
        self._streams.claim_remote_id(sid)
        if len(body) < 5 or len(body) - 4 > self.config.max_target_len:
            raise RemoteProtocolError("OPEN target missing or too long")
        (window,) = U32.unpack_from(body)
        if window == 0 or window > MAX_WINDOW_VALUE:
            raise RemoteProtocolError("OPEN grants an invalid window", ErrorCode.FLOW_CONTROL_ERROR)
        try:
            target = bytes(body[4:]).decode("utf-8")
        except UnicodeDecodeError:
            raise RemoteProtocolError("OPEN target is not UTF-8") from None
        if self._goaway_sent is not None:
            self._out += open_result_frame(sid, ErrorCode.GOING_AWAY, 0, "going away")
            return
        if self._streams.remote_open >= self.config.max_streams:
            self._out += open_result_frame(sid, ErrorCode.STREAM_LIMIT, 0, "too many streams")
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
            self._forget(sid)
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
        self._forget(sid)
        self._data.purge(sid)  # the peer drops DATA for a stream it reset
        events.append(StreamReset(sid, ErrorCode.from_wire(code), decode_text(body[4:])))

    def _on_ping(self, sid: int, flags: int, body: memoryview, events: list[Event]) -> None:
        if sid != 0 or len(body) != PING_SIZE:
            raise RemoteProtocolError("malformed PING")
        payload = body.tobytes()
        if flags & FLAG_ACK:
            events.append(PongReceived(payload, self._rtt.answered(payload, self._now())))
            return
        self._pending_pongs += 1
        self.peer_pings += 1
        if self._pending_pongs > MAX_PENDING_PONGS:
            raise RemoteProtocolError("PING flood", ErrorCode.ENHANCE_YOUR_CALM)
        self._out += ping_frame(payload, ack=True)

    def _on_delay(self, sid: int, flags: int, body: memoryview, events: list[Event]) -> None:
        if sid != 0 or len(body) != (U32x3.size if flags & FLAG_ACK else U32.size):
            raise RemoteProtocolError("malformed DELAY")
        now = self._now()
        if now is None:
            return
        if flags & FLAG_ACK:
            if self._probe is not None:
                echo, received_at, received = U32x3.unpack_from(body)
                self._probe.answered(now, echo, received_at, received, self._data.held > 0)
            return
        if self._pending_delay_answers >= MAX_PENDING_DELAY_ANSWERS:
            return
        self._pending_delay_answers += 1
        (stamp,) = U32.unpack_from(body)
        self._out += delay_answer_frame(stamp, clock_us(now), self.bytes_received & 0xFFFFFFFF)

    def _on_goaway(self, sid: int, flags: int, body: memoryview, events: list[Event]) -> None:
        if sid != 0 or len(body) < 8:
            raise RemoteProtocolError("malformed GOAWAY")
        last, code = U32x2.unpack_from(body)
        prev = self._peer.goaway_last
        self._peer.goaway_last = last if prev is None else min(prev, last)
        # our streams above `last` were never seen by the peer
        for sid2 in [s.stream_id for s in self._streams if s.local and s.stream_id > last]:
            self._forget(sid2)
            events.append(StreamReset(sid2, ErrorCode.GOING_AWAY, "peer is going away"))
        events.append(GoAwayReceived(last, ErrorCode.from_wire(code), decode_text(body[8:])))

    def _now(self) -> float | None:
        return self._clock() if self._clock is not None else None

    def _forget(self, stream_id: int) -> None:
        self._streams.forget(stream_id)

    # ------------------------------------------------------------------ bookkeeping
    def release(self, stream_id: int) -> None:
        """The application is done with a finished stream (both FINs seen): drop its state."""
        s = self._streams.get(stream_id)
        if s is not None and s.state is StreamState.CLOSED:
            self._forget(stream_id)

    def _close_all(self) -> None:
        self._streams.forget_all()
        self._data.purge_all()
        self._state = ConnState.CLOSED

    def _fail(self, exc: RemoteProtocolError) -> None:
        self._goaway_sent = self._streams.highest_remote_id
        self._out += goaway_frame(self._goaway_sent, exc.code, str(exc))
        self._close_all()
