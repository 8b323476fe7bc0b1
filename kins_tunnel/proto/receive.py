"""The input side of the multiplexer: bytes from the peer into events.

`FrameReceiver` is one of the parts `mux.Connection` is composed of (see `mux`): it frames the
input. It checks each frame's length right after its 9-byte header, streams DATA bodies through
as they arrive (`DataReceived` per piece, a copy or a view of the input) into the stream table it
was given, buffers only a partial header or control frame, and hands each control frame whole to
the handlers of `control` (`CONTROL_HANDLERS`, called with the `ControlFrames` passed to
`receive`, which also says the connection's phase). It owns the partial input (`_inbuf`), the
state of the DATA body under way and the count of DATA bytes received.
"""

from __future__ import annotations

from kins_tunnel.proto.control import CONTROL_HANDLERS, ConnState, ControlFrames
from kins_tunnel.proto.errors import ErrorCode, RemoteProtocolError
from kins_tunnel.proto.events import DataReceived, Event, StreamEnded
from kins_tunnel.proto.frames import FLAG_FIN, HEADER, HEADER_SIZE, MAX_CONTROL_PAYLOAD, FrameType
from kins_tunnel.proto.streams import StreamInput, StreamState, StreamTable

_DATA = FrameType.DATA
_HELLO = FrameType.HELLO
_OPEN = ConnState.OPEN
_HANDSHAKE = ConnState.HANDSHAKE
_CLOSED = ConnState.CLOSED


class FrameReceiver:
    """Input framing of one connection (see the module)."""

    __slots__ = (
        "_streams",
        "_max_frame",
        "_inbuf",
        "_sid",
        "_left",
        "_fin",
        "_copy",
        "bytes_received",
    )

    def __init__(self, streams: StreamTable, max_frame: int) -> None:
        self._streams = streams
        self._max_frame = max_frame  # our limit on a DATA frame's body
        self._inbuf = bytearray()  # a partial header, or a control frame still missing bytes
        self._sid = 0  # the DATA frame whose body is arriving
        self._left = 0  # bytes of its body still to come
        self._fin = False  # it carries FIN
        self._copy = True  # DataReceived carries a copy (else a view of the input)
        self.bytes_received = 0  # DATA payload bytes, all streams

    @property
    def buffered(self) -> int:
        """Bytes of a partial header or control frame waiting for the rest."""
        return len(self._inbuf)

    @property
    def between_frames(self) -> bool:
        """The next byte from the peer starts a frame (no partial unit, no DATA body under way)."""
        return not self._inbuf and not self._left

    def receive(
        self, view: memoryview, copy: bool, control: ControlFrames, events: list[Event]
    ) -> None:
        """Frame `view` (not empty), appending what it carried to `events`; control frames go to
        `control`'s handlers. Stops at the frame that closed the connection.

        Raises RemoteProtocolError when the peer broke the protocol; the partial input is dropped
        then (the caller fails the connection)."""
        self._copy = copy
        try:
            pos = self._complete_inbuf(view, control, events) if self._inbuf else 0
            if pos < len(view) and control.state is not _CLOSED:
                pos = self._parse(view, pos, control, events)
                if pos < len(view) and control.state is not _CLOSED:
                    self._inbuf += view[pos:]  # a partial header or control frame: small
        except RemoteProtocolError:
            self._inbuf = bytearray()
            self._left = 0
            raise

    def _complete_inbuf(self, view: memoryview, control: ControlFrames, events: list[Event]) -> int:
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
        if ftype != _DATA:  # a control frame is processed whole
            take = min(HEADER_SIZE + length - len(ib), len(view) - used)
            ib += view[used : used + take]
            used += take
            if len(ib) < HEADER_SIZE + length:
                return used
        with memoryview(ib) as unit:
            # a DATA header alone starts its body's streaming
            done = self._parse(unit, 0, control, events)
        assert done == len(ib)
        self._inbuf = bytearray()
        return used

    def _check_length(self, length: int, ftype: int) -> None:
        if ftype == _DATA:
            if length > self._max_frame:
                raise RemoteProtocolError(
                    f"DATA frame of {length} bytes exceeds max_frame {self._max_frame}",
                    ErrorCode.FRAME_SIZE_ERROR,
                )
        elif length > MAX_CONTROL_PAYLOAD:
            raise RemoteProtocolError(
                f"frame type {ftype} of {length} bytes is too large", ErrorCode.FRAME_SIZE_ERROR
            )

    def _parse(
        self, view: memoryview, pos: int, control: ControlFrames, events: list[Event]
    ) -> int:
        end = len(view)
        if self._left:  # the rest of a DATA body that began in an earlier call
            take = min(self._left, end - pos)
            self._data_piece(view[pos : pos + take], events)
            pos += take
        unpack = HEADER.unpack_from
        handlers = CONTROL_HANDLERS
        max_data = self._max_frame
        while end - pos >= HEADER_SIZE:
            word, flags, sid = unpack(view, pos)
            length = word >> 8
            ftype = word & 0xFF
            if ftype == _DATA:
                if length > max_data:
                    self._check_length(length, ftype)
                if control.state is not _OPEN:
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
            if control.state is _HANDSHAKE and ftype != _HELLO:
                raise RemoteProtocolError(f"frame type {ftype} before HELLO")
            handler = handlers.get(ftype)
            if handler is not None:  # unknown frame types are skipped
                handler(control, sid, flags, body, events)
            if control.state is _CLOSED:
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
        self._sid = sid
        self._left = length
        self._fin = bool(flags & FLAG_FIN)

    def _data_piece(self, piece: memoryview, events: list[Event]) -> None:
        """The next bytes of the DATA body under way (credit was checked for all of it)."""
        sid = self._sid
        n = len(piece)
        self._left -= n
        s = self._streams.get(sid)
        if s is None:
            return  # reset (by either side) meanwhile: the rest of the body is void
        if n:
            w = s.recv
            w.credit -= n
            w.buffered += n
            self.bytes_received += n
            events.append(DataReceived(sid, piece.tobytes() if self._copy else piece))
        if not self._left and self._fin:
            s.transition(StreamInput.RECV_FIN)
            events.append(StreamEnded(sid))
            self._streams.forget_if_done(s)
