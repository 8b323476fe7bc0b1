"""Events that `Connection.receive_data` returns, one per meaningful thing the peer did (immutable,
as h11's events)."""

from __future__ import annotations

from dataclasses import dataclass

from kins_tunnel.proto.errors import ErrorCode


@dataclass(frozen=True, slots=True)
class Event:
    pass


@dataclass(frozen=True, slots=True)
class HandshakeComplete(Event):
    """Both HELLOs are in: the version and capabilities both sides share, and what the peer said."""

    version: int
    capabilities: frozenset[str]
    names: tuple[str, ...]
    agent: str


@dataclass(frozen=True, slots=True)
class StreamOpened(Event):
    """The peer asks us to open `stream_id` to `target`; answer with accept_stream/reject_stream."""

    stream_id: int
    target: str


@dataclass(frozen=True, slots=True)
class _StreamVerdict(Event):
    """A stream event with a wire code (maybe one this version does not know) and a message."""

    stream_id: int
    code: ErrorCode | int
    message: str


@dataclass(frozen=True, slots=True)
class OpenResult(_StreamVerdict):
    """The answer to a stream we opened: `code` NO_ERROR means it is open."""

    @property
    def ok(self) -> bool:
        return self.code == ErrorCode.NO_ERROR


@dataclass(frozen=True, slots=True)
class DataReceived(Event):
    """Bytes for a stream. Call `consumed(stream_id, n)` once the application has taken them.
    The peer's FIN is always a separate `StreamEnded`, even when it came in the same frame."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded(Event):
    """The peer will send no more on this stream (FIN)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset(_StreamVerdict):
    """The peer aborted the stream; its buffered data is void."""


@dataclass(frozen=True, slots=True)
class WindowUpdated(Event):
    """We may send more on `stream_id`: `send_window(stream_id)` bytes in all."""

    stream_id: int
    increment: int


@dataclass(frozen=True, slots=True)
class PongReceived(Event):
    """The answer to one of our pings; `rtt` is in the clock's units (seconds)."""

    payload: bytes
    rtt: float | None


@dataclass(frozen=True, slots=True)
class GoAwayReceived(Event):
    """The peer is draining: streams we opened above `last_stream_id` were not processed."""

    last_stream_id: int
    code: ErrorCode | int
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionTerminated(Event):
    """The byte stream ended (EOF) or the connection was closed by a protocol error."""

    code: ErrorCode | int
    reason: str
