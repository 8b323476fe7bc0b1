"""The tunnel port's refusal of a connection it sheds before TLS, with a retry-after hint.

A replica that sheds a connection (too many pending handshakes) has not run TLS with it, and will
not: the point of shedding is not to spend the handshake. So the refusal is written in the clear,
in two parts, then the connection is closed:

1. a TLS fatal alert record (`internal_error`), which any TLS client understands as a failed
   handshake: an edge that does not know the hint (an older version) fails as it would on a plain
   close, and retries with its backoff;
2. one line, ``KINS-RETRY-AFTER <seconds>\\n``, which such a client never reads (its TLS library
   stops at the alert), and which an edge that knows it takes as the hint: come back in about that
   many seconds (`edge.reconnect` adds jitter and caps it at `reconnect.max`).

The hint is not authenticated (nothing is, before TLS): anyone on the path who could cut the
connection could also send it, so it can only delay an edge by at most its own backoff cap.
"""

from __future__ import annotations

import math

# TLS record: alert (21), version TLS 1.2 (3,3), length 2; level fatal (2), internal_error (80)
ALERT = bytes((21, 3, 3, 0, 2, 2, 80))
HINT_PREFIX = b"KINS-RETRY-AFTER "
MAX_HINT = 3600.0  # larger values are refused as malformed
_MAX_LINE = 32  # bytes after the prefix, newline included


def encode_refusal(retry_after: float) -> bytes:
    """The bytes the cloud writes to a connection it sheds: alert, then the hint line."""
    value = min(retry_after, MAX_HINT) if retry_after > 0 else 0.0  # not "-0.0" or "nan"
    return ALERT + HINT_PREFIX + f"{value:.1f}\n".encode()


def parse_refusal(data: bytes | memoryview) -> float | None:
    """The hint in what a cloud sent before any handshake message, or None when it is not a
    refusal with a well-formed hint (every byte here is untrusted)."""
    raw = bytes(data[: len(ALERT) + len(HINT_PREFIX) + _MAX_LINE])
    if not raw.startswith(ALERT + HINT_PREFIX):
        return None
    line, newline, _ = raw[len(ALERT) + len(HINT_PREFIX) :].partition(b"\n")
    if not newline or not line or len(line) > 16 or not line.replace(b".", b"", 1).isdigit():
        return None
    value = float(line)
    return value if math.isfinite(value) and value <= MAX_HINT else None
