"""Streams: the state machine of one stream, and the table of live streams.

State machine
-------------
Each stream is in one `StreamState`; every event that touches it is a `StreamInput`, and the only
legal moves are the entries of `_TRANSITIONS` (as h2's stream state machine and h11's `_state`).
Anything else is a protocol error: `LocalProtocolError` when *we* asked for it (a SEND_* input),
`RemoteProtocolError` when the *peer* did (a RECV_* input)::

    OPENING --RECV_OPEN_OK--> OPEN        PENDING --SEND_ACCEPT--> OPEN
    OPENING --RECV_OPEN_REFUSED--> CLOSED  PENDING --SEND_REJECT--> CLOSED
    OPEN --SEND_FIN--> HALF_CLOSED_LOCAL --RECV_FIN--> CLOSED
    OPEN --RECV_FIN--> HALF_CLOSED_REMOTE --SEND_FIN--> CLOSED
    DATA may be sent in OPEN and HALF_CLOSED_REMOTE, received in OPEN and HALF_CLOSED_LOCAL.

A RESET (either way) removes the stream whatever its state. A CLOSED stream stays in the table
only while the consumer still holds received bytes (so `consumed()` stays legal); it is forgotten
the moment the last one is consumed, or when the application releases it.

Table
-----
Ids only grow; the side that dialled (client) uses odd ids, the other even ones. An id below the
next local id, or at or below the highest remote id, existed once: late frames for it (in flight
when it was reset) are dropped, while frames for ids never seen are protocol errors. Forgetting a
stream releases its share of the session budget.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass

from kins_tunnel.proto.errors import LocalProtocolError, RemoteProtocolError
from kins_tunnel.proto.flow import Budget, ReceiveWindow
from kins_tunnel.proto.handshake import Role


class StreamState(enum.Enum):
    OPENING = "opening"  # we sent OPEN; no answer yet
    PENDING = "pending"  # the peer sent OPEN; we have not answered
    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed (local)"  # we sent FIN
    HALF_CLOSED_REMOTE = "half-closed (remote)"  # the peer sent FIN
    CLOSED = "closed"  # both FINs, or refused


class StreamInput(enum.Enum):
    SEND_ACCEPT = "accept"
    SEND_REJECT = "reject"
    SEND_DATA = "send DATA"
    SEND_FIN = "send FIN"
    RECV_OPEN_OK = "OPEN_RESULT (opened)"
    RECV_OPEN_REFUSED = "OPEN_RESULT (refused)"
    RECV_DATA = "DATA"
    RECV_FIN = "FIN"
    RECV_WINDOW = "WINDOW"


S, In = StreamState, StreamInput
# state -> {input: next state}, as h11's _state.py; an input missing from a state's row is an error
_MOVES: dict[StreamState, dict[StreamInput, StreamState]] = {
    S.PENDING: {In.SEND_ACCEPT: S.OPEN, In.SEND_REJECT: S.CLOSED},
    S.OPENING: {In.RECV_OPEN_OK: S.OPEN, In.RECV_OPEN_REFUSED: S.CLOSED},
    S.OPEN: {
        In.SEND_DATA: S.OPEN,
        In.SEND_FIN: S.HALF_CLOSED_LOCAL,
        In.RECV_DATA: S.OPEN,
        In.RECV_FIN: S.HALF_CLOSED_REMOTE,
    },
    S.HALF_CLOSED_LOCAL: {In.RECV_DATA: S.HALF_CLOSED_LOCAL, In.RECV_FIN: S.CLOSED},
    S.HALF_CLOSED_REMOTE: {In.SEND_DATA: S.HALF_CLOSED_REMOTE, In.SEND_FIN: S.CLOSED},
    S.CLOSED: {},
}
for _state, _row in _MOVES.items():
    _row[In.RECV_WINDOW] = _state  # credit may come at any time; a finished stream does not use it
_TRANSITIONS: dict[tuple[StreamState, StreamInput], StreamState] = {
    (state, event): new for state, row in _MOVES.items() for event, new in row.items()
}
del S, In, _state, _row

_ESTABLISHED = frozenset(
    {
        StreamState.OPEN,
        StreamState.HALF_CLOSED_LOCAL,
        StreamState.HALF_CLOSED_REMOTE,
        StreamState.CLOSED,
    }
)
_LOCAL_FIN = frozenset({StreamState.HALF_CLOSED_LOCAL, StreamState.CLOSED})
_REMOTE_FIN = frozenset({StreamState.HALF_CLOSED_REMOTE, StreamState.CLOSED})


@dataclass(slots=True)
class Stream:
    """The record of one live stream."""

    stream_id: int
    local: bool  # we opened it
    recv: ReceiveWindow
    state: StreamState
    send_credit: int = 0
    target: str = ""

    def transition(self, event: StreamInput) -> None:
        """Move to the next state, or raise the protocol error of whoever broke the rules."""
        new = _TRANSITIONS.get((self.state, event))
        if new is None:
            message = (
                f"stream {self.stream_id}: {event.value} is not allowed when {self.state.value}"
            )
            if event.name.startswith("SEND_"):
                raise LocalProtocolError(message)
            raise RemoteProtocolError(message)
        self.state = new

    @property
    def established(self) -> bool:
        return self.state in _ESTABLISHED

    @property
    def local_fin(self) -> bool:
        return self.state in _LOCAL_FIN

    @property
    def remote_fin(self) -> bool:
        return self.state in _REMOTE_FIN


class StreamTable:
    __slots__ = (
        "_client",
        "_budget",
        "_streams",
        "next_local_id",
        "highest_remote_id",
        "local_open",
        "remote_open",
    )

    def __init__(self, role: Role, budget: Budget) -> None:
        self._client = role is Role.CLIENT
        self._budget = budget
        self._streams: dict[int, Stream] = {}
        self.next_local_id = 1 if self._client else 2
        self.highest_remote_id = 0
        self.local_open = 0  # concurrent streams we opened
        self.remote_open = 0  # concurrent streams the peer opened

    def get(self, sid: int) -> Stream | None:
        return self._streams.get(sid)

    def __contains__(self, sid: int) -> bool:
        return sid in self._streams

    def __len__(self) -> int:
        return len(self._streams)

    def __iter__(self) -> Iterator[Stream]:
        return iter(list(self._streams.values()))

    def open_local(self, recv: ReceiveWindow, target: str) -> Stream:
        sid = self.next_local_id
        self.next_local_id += 2
        s = self._streams[sid] = Stream(sid, True, recv, StreamState.OPENING, target=target)
        self.local_open += 1
        return s

    def claim_remote_id(self, sid: int) -> None:
        """Check a peer-opened id (parity, never reused) and mark it spent."""
        if sid == 0 or (sid % 2 == 1) == self._client:
            raise RemoteProtocolError(f"OPEN with stream id {sid} of the wrong parity")
        if sid <= self.highest_remote_id:
            raise RemoteProtocolError(f"OPEN reuses stream id {sid}")
        self.highest_remote_id = sid

    def add_remote(self, sid: int, send_credit: int, target: str) -> Stream:
        s = self._streams[sid] = Stream(
            sid,
            False,
            ReceiveWindow(0, 0),
            StreamState.PENDING,
            send_credit=send_credit,
            target=target,
        )
        self.remote_open += 1
        return s

    def is_local_id(self, sid: int) -> bool:
        return (sid % 2 == 1) == self._client

    def known_closed(self, sid: int) -> bool:
        """A stream id that existed and is gone (late frames for it are dropped)."""
        if sid == 0:
            return False
        if self.is_local_id(sid):
            return sid < self.next_local_id
        return sid <= self.highest_remote_id

    def forget(self, sid: int) -> None:
        s = self._streams.pop(sid, None)
        if s is None:
            return
        self._budget.release(s.recv.size)
        if s.local:
            self.local_open -= 1
        else:
            self.remote_open -= 1

    def forget_if_done(self, s: Stream) -> None:
        """Forget a CLOSED stream once the consumer holds none of its bytes."""
        if s.state is StreamState.CLOSED and s.recv.buffered == 0:
            self.forget(s.stream_id)

    def forget_all(self) -> None:
        for sid in list(self._streams):
            self.forget(sid)
