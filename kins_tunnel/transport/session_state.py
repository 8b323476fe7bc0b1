"""A session's place in its life (`SessionState`) and the one mapping of a failed HELLO exchange
to its reason (`hello_failure_reason`), used by cloud and edge alike."""

from __future__ import annotations

import enum

from kins_tunnel.proto import ErrorCode, RemoteProtocolError
from kins_tunnel.transport.tls import TransportError


class SessionState(enum.Enum):
    """Where a session is in its life (as trio's `SSLStream` has its state)."""

    NEW = "new"  # built, `serve()` not called yet
    HANDSHAKING = "handshaking"  # our HELLO is out; the peer's has not been dispatched
    OPEN = "open"  # streams may be opened (unless either side is draining: `usable`)
    CLOSED = "closed"  # over (`close_reason` says why); every stream is broken


def hello_failure_reason(error: BaseException | None, timed_out: bool) -> str:
    """The one mapping of a failed HELLO exchange to its `handshake_failures` reason, on both
    sides: `version` (no protocol version in common), `protocol` (a malformed HELLO or frame
    from the peer), `timeout` (no HELLO within the handshake's time), `internal` (a bug here,
    reported as an internal error) or `refused` (the peer ended the connection first: a cloud
    refusing a revoked or refused identity, or shedding load; its own log says which)."""
    if isinstance(error, RemoteProtocolError):
        return "version" if error.code == ErrorCode.VERSION_MISMATCH else "protocol"
    if error is not None and not isinstance(error, TransportError):
        return "internal"
    if timed_out:
        return "timeout"
    return "refused"
