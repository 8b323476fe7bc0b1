"""The transport's error vocabulary: the few types that leave `kins_tunnel.transport`.

- `TransportError`: a connection failed (reset, EOF mid-record, TLS alert, a proxy that gave no
  tunnel, ...). Socket and OpenSSL errors are translated into it once, at the boundary, with the
  original as `__cause__`.
- `HandshakeFailed(TransportError)`: a tunnel's HELLO exchange failed; `reason` is its one label
  (`version`, `protocol`, `timeout`, `refused`, `internal`: see `session_state.hello_failure_reason`).
  The only exception `Session.serve` raises.
- `SetupError`: a transport resource could not be set up from its settings (a listen address that
  cannot be bound, an unreadable proxy credentials file). Its message is one line that starts with
  the name of the setting; the layer that owns the settings (the CLI, `doctor`) decides how to
  report it. The transport knows nothing of CLI errors.
"""

from __future__ import annotations


class TransportError(Exception):
    """The tunnel's TLS connection failed (reset, EOF mid-record, TLS alert, ...)."""


class SetupError(Exception):
    """A transport resource could not be set up; the one-line message names the setting."""


class HandshakeFailed(TransportError):
    """A tunnel's HELLO exchange failed; `reason` is its handshake_failures label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
