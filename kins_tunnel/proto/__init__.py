"""The wire protocol, sans-IO: bytes in, events out; commands in, bytes out.

Nothing here imports trio, ssl, sockets or yaml. `Connection` (in `mux`) is the state machine;
`frames` is the codec; `events` (exported as a module) are what `receive_data` returns; `errors`
holds the two exception types and the wire error codes.
"""

from kins_tunnel.proto import events
from kins_tunnel.proto.errors import (
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    code_label,
    code_text,
)
from kins_tunnel.proto.handshake import PROTOCOL_VERSION, Hello, LimitError, MuxConfig, Role
from kins_tunnel.proto.mux import Connection

__all__ = [
    "PROTOCOL_VERSION",
    "Connection",
    "ErrorCode",
    "Hello",
    "LimitError",
    "LocalProtocolError",
    "MuxConfig",
    "ProtocolError",
    "RemoteProtocolError",
    "Role",
    "code_label",
    "code_text",
    "events",
]
