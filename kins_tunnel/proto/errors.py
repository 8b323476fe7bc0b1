"""Error codes on the wire and the two exception types of the protocol core.

Like h11 and h2, the core distinguishes who broke the rules:

- `RemoteProtocolError`: the *peer* sent something illegal. The connection has already queued a
  GOAWAY carrying `code`; flush `data_to_send()` and close.
- `LocalProtocolError`: *we* asked for something illegal (sending on a closed stream, opening past
  the peer's stream limit, ...). Nothing was sent; the connection is still usable.

Every error carries the `ErrorCode` that goes on the wire.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """Codes used in RESET, GOAWAY and OPEN_RESULT frames."""

    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2
    FLOW_CONTROL_ERROR = 3
    FRAME_SIZE_ERROR = 4
    STREAM_LIMIT = 5  # too many concurrent streams; the open was refused, retry elsewhere
    VERSION_MISMATCH = 6
    CANCEL = 7  # the stream is no longer wanted
    REFUSED = 8  # the target refused the connection
    UNREACHABLE = 9  # the target could not be reached (no route, DNS failure, ...)
    TIMEOUT = 10  # the target did not answer in time
    NOT_ALLOWED = 11  # the target is not in the list this side may dial
    GOING_AWAY = 12  # the side is draining; open the stream elsewhere
    CONNECT_ERROR = 13  # the connection to the target broke mid-stream
    ENHANCE_YOUR_CALM = 14  # the peer is flooding us

    @classmethod
    def from_wire(cls, value: int) -> ErrorCode | int:
        """Known codes become members; unknown ones (from a newer peer) stay plain ints."""
        try:
            return cls(value)
        except ValueError:
            return value


def code_text(code: int) -> str:
    """A wire code as text for messages and logs: ``timeout`` for known codes, ``unknown(99)``
    for codes this version does not know. Never raises, whatever number a peer sent."""
    try:
        return ErrorCode(code).name.lower()
    except ValueError:
        return f"unknown({int(code)})"


def code_label(code: int) -> str:
    """A wire code as a metric label: the known code's name, or ``unknown`` (bounded cardinality:
    a peer choosing codes must not be able to create label values)."""
    try:
        return ErrorCode(code).name.lower()
    except ValueError:
        return "unknown"


class ProtocolError(Exception):
    """Base class: something broke the protocol's rules. `code` is the wire error code."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


class RemoteProtocolError(ProtocolError):
    """The peer violated the protocol; a GOAWAY with `code` is queued and the connection is closed."""


class LocalProtocolError(ProtocolError):
    """We tried something the protocol does not allow in the current state; nothing was sent."""
