"""The input side of the multiplexer: bytes from the peer into events.

`FrameReceiver` is the part of `mux.Connection` that frames the input: it checks each frame's
length right after its 9-byte header, streams DATA bodies through as they arrive (`DataReceived`
per piece, a copy or a view of the input), buffers only a partial header or control frame, and
dispatches control frames by type to the handlers of `control` through a class-level table.
`Connection` owns the state it shares, declared below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from kins_tunnel.proto.control import ConnState, ControlFrames
from kins_tunnel.proto.errors import ErrorCode, RemoteProtocolError
from kins_tunnel.proto.events import ConnectionTerminated, DataReceived, Event, StreamEnded
from kins_tunnel.proto.frames import FLAG_FIN, HEADER, HEADER_SIZE, MAX_CONTROL_PAYLOAD, FrameType
from kins_tunnel.proto.streams import StreamInput, StreamState


class FrameReceiver(ControlFrames):
    """Input framing, on top of the control frames' handlers; `mux.Connection` sets these
    attributes."""

    _inbuf: bytearray  # a partial header, or a control frame still missing bytes
    _rx_sid: int  # the DATA frame whose body is arriving
    _rx_left: int  # bytes of its body still to come
    _rx_fin: bool  # it carries FIN
    _rx_copy: bool  # DataReceived carries a copy (else a view of the input)

    # control frame type -> handler (in `control`); DATA is parsed inline
    _HANDLERS: ClassVar[dict[int, Callable[[Any, int, int, memoryview, list[Event]], None]]] = {
        FrameType.HELLO: ControlFrames._on_hello,
        FrameType.OPEN: ControlFrames._on_open,
        FrameType.OPEN_RESULT: ControlFrames._on_open_result,
        FrameType.WINDOW: ControlFrames._on_window,
        FrameType.RESET: ControlFrames._on_reset,
        FrameType.PING: ControlFrames._on_ping,
        FrameType.GOAWAY: ControlFrames._on_goaway,
        FrameType.DELAY: ControlFrames._on_delay,
    }

    def receive_data(
        self, data: bytes | bytearray | memoryview, *, copy: bool = True
    ) -> list[Event]:
        """Parse bytes from the peer into events. `b""` means EOF.

        With `copy=False`, each `DataReceived.data` is a memoryview of `data` instead of a copy:
        the caller must copy what it keeps before it reuses `data` (the transport writes most
        received bytes straight into a socket, so it copies only what it queues).

        Raises RemoteProtocolError (with a GOAWAY queued) when the peer broke the protocol.
        """
        if self._state is ConnState.CLOSED:
            return []
        self._rx_copy = copy
        events: list[Event] = []
        if not data:
            self._close_all()
            events.append(ConnectionTerminated(ErrorCode.NO_ERROR, "peer closed the connection"))
            return events
        with memoryview(data) as view:
            try:
                pos = self._complete_inbuf(view, events) if self._inbuf else 0
                if pos < len(view) and not self.closed:
                    pos = self._parse(view, pos, events)
                    if pos < len(view) and not self.closed:
                        self._inbuf += view[pos:]  # a partial header or control frame: small
            except RemoteProtocolError as exc:
                self._inbuf = bytearray()
                self._rx_left = 0
                self._fail(exc)
                raise
        return events

    def _complete_inbuf(self, view: memoryview, events: list[Event]) -> int:
        """Add to the buffered partial unit only the bytes it lacks; process it once complete.
        Returns the bytes of `view` used."""
        ib = self._inbuf
        used = 0
        if len(ib) < HEADER_SIZE:
            used = min(HEADER_SIZE - len(ib), len(view))
            ib += view[:used]
            if len(ib) < HEADER_SIZE:
                return used
        word: int = HEADER.unpack_from(ib)[0]
        length, ftype = word >> 8, word & 0xFF
        self._check_length(length, ftype)
        if ftype != FrameType.DATA:  # a control frame is processed whole
            take = min(HEADER_SIZE + length - len(ib), len(view) - used)
            ib += view[used : used + take]
            used += take
            if len(ib) < HEADER_SIZE + length:
                return used
        with memoryview(ib) as unit:
            done = self._parse(unit, 0, events)  # a DATA header alone starts its body's streaming
        assert done == len(ib)
        self._inbuf = bytearray()
        return used

    def _check_length(self, length: int, ftype: int) -> None:
        if ftype == FrameType.DATA:
            if length > self.config.max_frame:
                raise RemoteProtocolError(
                    f"DATA frame of {length} bytes exceeds max_frame {self.config.max_frame}",
                    ErrorCode.FRAME_SIZE_ERROR,
                )
        elif length > MAX_CONTROL_PAYLOAD:
            raise RemoteProtocolError(
                f"frame type {ftype} of {length} bytes is too large", ErrorCode.FRAME_SIZE_ERROR
            )

    def _parse(self, view: memoryview, pos: int, events: list[Event]) -> int:
        end = len(view)
        if self._rx_left:  # the rest of a DATA body that began in an earlier call
            take = min(self._rx_left, end - pos)
            self._data_piece(view[pos : pos + take], events)
            pos += take
        unpack = HEADER.unpack_from
        handlers = self._HANDLERS
        max_data = self.config.max_frame
        while end - pos >= HEADER_SIZE:
            word, flags, sid = unpack(view, pos)
            length = word >> 8
            ftype = word & 0xFF
            if ftype == FrameType.DATA:
                if length > max_data:
                    self._check_length(length, ftype)
                if self._state is not ConnState.OPEN:
                    raise RemoteProtocolError(f"frame type {ftype} before HELLO")
                pos += HEADER_SIZE
                take = min(length, end - pos)
                self._data_header(sid, flags, length)
                self._data_piece(view[pos : pos + take], events)
                pos += take
                continue
            if length > MAX_CONTROL_PAYLOAD:
                self._check_length(length, ftype)
            if end - pos - HEADER_SIZE < length:
                break
            body = view[pos + HEADER_SIZE : pos + HEADER_SIZE + length]
            pos += HEADER_SIZE + length
            if self._state is ConnState.HANDSHAKE and ftype != FrameType.HELLO:
                raise RemoteProtocolError(f"frame type {ftype} before HELLO")
            handler = handlers.get(ftype)
            if handler is not None:  # unknown frame types are skipped
                handler(self, sid, flags, body, events)
            if self._state is ConnState.CLOSED:
                break
        return pos

    def _data_header(self, sid: int, flags: int, length: int) -> None:
        """A DATA frame begins: check it whole (stream, state, credit) before any of its body; the
        caller then hands over its body in pieces (`_data_piece`, an empty one if it is empty)."""
        s = self._streams.get(sid)
        if s is None:
            if not self._streams.known_closed(sid):
                raise RemoteProtocolError(f"DATA for unknown stream {sid}")
            # in flight when we reset it: its body is skipped
        else:
            if s.state is not StreamState.OPEN:  # OPEN stays OPEN: no table lookup on the hot path
                if not s.established:
                    raise RemoteProtocolError(f"DATA before the stream {sid} was opened")
                s.transition(StreamInput.RECV_DATA)
            if length > s.recv.credit:
                raise RemoteProtocolError(
                    f"stream {sid}: {length} bytes exceed the {s.recv.credit} bytes of credit",
                    ErrorCode.FLOW_CONTROL_ERROR,
                )
        self._rx_sid = sid
        self._rx_left = length
        self._rx_fin = bool(flags & FLAG_FIN)

    def _data_piece(self, piece: memoryview, events: list[Event]) -> None:
        """The next bytes of the DATA body under way (credit was checked for all of it)."""
        sid = self._rx_sid
        n = len(piece)
        self._rx_left -= n
        s = self._streams.get(sid)
        if s is None:
            return  # reset (by either side) meanwhile: the rest of the body is void
        if n:
            w = s.recv
            w.credit -= n
            w.buffered += n
            self.bytes_received += n
            events.append(DataReceived(sid, piece.tobytes() if self._rx_copy else piece))
        if not self._rx_left and self._rx_fin:
            s.transition(StreamInput.RECV_FIN)
            events.append(StreamEnded(sid))
            self._streams.forget_if_done(s)
