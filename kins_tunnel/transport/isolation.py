"""Failure isolation: how a bug caught at a per-connection or per-stream boundary is reported.

An `ErrorReporter` receives (where, exception): `where` is one of the project's fixed boundary
names ("proxy", "tunnel", "admin", "session", "stream", ...), never a value from a peer, so it can
label a metric (`Metrics.report_internal_error` logs and counts). `log_internal_error` only logs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger("kins_tunnel.session")

# Reports an unexpected exception (a bug) at a failure-isolation boundary: (where, exception).
ErrorReporter = Callable[[str, BaseException], None]


def log_internal_error(where: str, exc: BaseException) -> None:
    log.error(
        "internal error in %s: %s: %s",
        where,
        type(exc).__name__,
        exc,
        exc_info=exc,
        extra={"where": where},
    )
