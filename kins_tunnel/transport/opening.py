"""Streams we asked the peer to open (OPEN sent), each with the task waiting for the answer.

The session's reader hands every OPEN_RESULT (or a RESET of a stream still opening) to `answer`;
the opener waits in `wait`, which turns the answer into a stream or an `OpenFailed`, and cleans up
whatever way it ends: a stream opened for an opener that gave up meanwhile (timeout, cancel) is
aborted, an open nobody waits for any more is reset via the session (`abandon_open`).
"""

from __future__ import annotations

from typing import Protocol

import trio

from kins_tunnel.errors import OpenFailed
from kins_tunnel.proto import ErrorCode, code_text
from kins_tunnel.proto.events import OpenResult
from kins_tunnel.transport.stream import TunnelStream

Answer = tuple[OpenResult, TunnelStream | None]


class Opener(Protocol):
    """What `wait` needs from the session."""

    @property
    def close_reason(self) -> str: ...

    def abandon_open(self, stream_id: int) -> None:
        """Nobody waits for the answer any more: reset the stream (if the tunnel lives)."""


class PendingOpens:
    __slots__ = ("_waiting",)

    def __init__(self) -> None:
        self._waiting: dict[int, trio.MemorySendChannel[Answer]] = {}

    def __contains__(self, stream_id: int) -> bool:
        return stream_id in self._waiting

    def __len__(self) -> int:
        return len(self._waiting)

    async def wait(self, stream_id: int, timeout: float, opener: Opener) -> TunnelStream:
        """Wait for the answer to our OPEN of `stream_id` (sent just before); OpenFailed on
        refusal, after `timeout`, or when the tunnel ends."""
        send, recv = trio.open_memory_channel[Answer](1)
        self._waiting[stream_id] = send
        stream: TunnelStream | None = None
        returned = False
        try:
            with trio.move_on_after(timeout):
                try:
                    result, stream = await recv.receive()
                except trio.EndOfChannel:
                    raise OpenFailed(
                        ErrorCode.CONNECT_ERROR, f"tunnel closed: {opener.close_reason}"
                    ) from None
                if not result.ok or stream is None:
                    raise OpenFailed(result.code, result.message or code_text(result.code))
                returned = True
                return stream
            raise OpenFailed(
                ErrorCode.TIMEOUT, f"the peer did not answer the open within {timeout:g}s"
            )
        finally:
            pending = self._waiting.pop(stream_id, None) is not None
            if stream is not None and not returned:
                stream.abort(ErrorCode.CANCEL, "open abandoned")  # opened, but nobody wants it now
            elif pending and stream is None:
                opener.abandon_open(stream_id)

    def answer(self, result: OpenResult, stream: TunnelStream | None) -> None:
        """The peer answered (or reset the stream): hand it to the waiting task, if any."""
        ch = self._waiting.pop(result.stream_id, None)
        if ch is not None:
            ch.send_nowait((result, stream))

    def fail(self, stream_id: int) -> None:
        """End the wait for one stream (a bug while handling it): the opener gets OpenFailed."""
        ch = self._waiting.pop(stream_id, None)
        if ch is not None:
            ch.close()

    def close_all(self) -> None:
        for ch in self._waiting.values():
            ch.close()
        self._waiting.clear()
