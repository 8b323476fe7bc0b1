"""Events that `Connection.receive_data` returns, one per meaningful thing the peer did (immutable,
as h11's events). The events of one stream share `_StreamEvent`'s `stream_id`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar, dataclass_transform

from kins_tunnel.proto.errors import ErrorCode

_E = TypeVar("_E")


@dataclass_transform(frozen_default=True)
def event(cls: type[_E]) -> type[_E]:
    """Every event is a frozen dataclass with slots: immutable, no per-instance dict."""
    return dataclass(frozen=True, slots=True)(cls)


@event
class Event:
    pass


@event
class HandshakeComplete(Event):
    """Both HELLOs are in: the version and capabilities both sides share, and what the peer said."""

    version: int
    capabilities: frozenset[str]
    names: tuple[str, ...]
    agent: str
    time: float | None = None  # the peer's wall clock (Unix seconds) in its HELLO, if stated


@event
class _StreamEvent(Event):
    stream_id: int


@event
class StreamOpened(_StreamEvent):
    """The peer asks us to open `stream_id` to `target`; answer with accept_stream/reject_stream."""

    target: str


@event
class _StreamVerdict(_StreamEvent):
    """A stream event with a wire code (maybe one this version does not know) and a message."""

    code: ErrorCode | int
    message: str


@event
class OpenResult(_StreamVerdict):
    """The answer to a stream we opened: `code` NO_ERROR means it is open."""

    @property
    def ok(self) -> bool:
        return self.code == ErrorCode.NO_ERROR


@event
class DataReceived(_StreamEvent):
    """Bytes for a stream. Call `consumed(stream_id, n)` once the application has taken them.
    The peer's FIN is always a separate `StreamEnded`, even when it came in the same frame.
    `data` is a memoryview of the caller's input when `receive_data` was called with copy=False."""

    data: bytes | memoryview


@event
class StreamEnded(_StreamEvent):
    """The peer will send no more on this stream (FIN)."""


@event
class StreamReset(_StreamVerdict):
    """The peer aborted the stream; its buffered data is void."""


@event
class WindowUpdated(_StreamEvent):
    """We may send more on `stream_id`: `send_window(stream_id)` bytes in all."""

    increment: int


@event
class PongReceived(Event):
    """The answer to one of our pings; `rtt` is in the clock's units (seconds)."""

    payload: bytes
    rtt: float | None


@event
class GoAwayReceived(Event):
    """The peer is draining: streams we opened above `last_stream_id` were not processed."""

    last_stream_id: int
    code: ErrorCode | int
    reason: str


@event
class ConnectionTerminated(Event):
    """The byte stream ended (EOF) or the connection was closed by a protocol error."""

    code: ErrorCode | int
    reason: str
