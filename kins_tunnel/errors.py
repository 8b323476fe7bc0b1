"""The runtime error vocabulary, in one place.

- `UserError`: anything an operator can fix (bad config, unreadable certificate, port in use): the
  CLI prints its message as one line and exits non-zero, without a traceback.
- `OpenFailed`: a stream could not be opened (the peer refused it, the target refused or could not
  be reached, or no answer in time); `code` is the wire code that says which.
- `TransportError` and `SetupError` (`kins_tunnel.transport.errors`): a connection failed; a
  transport resource (a listen address, a proxy credentials file) could not be set up. The CLI
  reports a `SetupError` as it reports a `UserError`.
- Protocol violations are the core's own `LocalProtocolError` / `RemoteProtocolError`.
"""

from __future__ import annotations

from kins_tunnel.proto.errors import ErrorCode


class UserError(Exception):
    """An operator-fixable problem, reported as one line naming what is wrong."""


class OpenFailed(Exception):
    """A stream could not be opened; `code` (a wire code, maybe one this version does not know)
    says why, `message` is the detail for logs."""

    def __init__(self, code: ErrorCode | int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
