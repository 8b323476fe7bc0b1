"""Proxy URLs (``scheme://[user[:password]@]host:port``): `parse_proxy_url` and `ProxyURL`.

Pure parsing, no I/O: the config loader checks an edge's `proxy.url` with it, and the transport
(`transport.http_proxy`) and `kins-tunnel connect` dial what it returns. Error messages never show a
password (`names.redact_url`).
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from kins_tunnel.names import authority, redact_url


@dataclass(frozen=True, slots=True)
class ProxyURL:
    """A parsed proxy URL; `host` holds IPv6 literals without brackets."""

    scheme: str  # "http" or "https"
    host: str
    port: int
    username: str | None = None  # percent-decoded; None when the URL has no user part
    password: str | None = None  # None when the URL has no ":password"

    @property
    def authority(self) -> str:
        return authority(self.host, self.port)


def parse_proxy_url(
    text: str, *, schemes: tuple[str, ...] = ("http", "https"), userinfo: bool = True
) -> ProxyURL:
    """Parse ``scheme://[user[:password]@]host:port[/]``; `ValueError` says what is wrong (with
    the URL's password shown as ``***``)."""
    shown = redact_url(text)
    if not isinstance(text, str) or not text.isascii() or any(c.isspace() for c in text):
        raise ValueError(f"{shown!r}: not a URL like http://proxy:3128")
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError as exc:  # e.g. a bracketed host that is not an IPv6 address
        raise ValueError(f"{shown!r}: {exc}") from None
    wanted = " or ".join(f"{s}://" for s in schemes)
    if parts.scheme not in schemes:
        raise ValueError(f"{shown!r}: the proxy URL must start with {wanted}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{shown!r}: a proxy URL has no path, query or fragment")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{shown!r}: the port must be a number from 1 to 65535") from None
    host = parts.hostname or ""
    if not host:
        raise ValueError(f"{shown!r}: no host")
    if port is None or port == 0:
        raise ValueError(f"{shown!r}: give the proxy's port, as in {parts.scheme}://{host}:3128")
    if "[" not in parts.netloc and any(c in "[]/\\%" for c in host):  # urlsplit checks [v6] itself
        raise ValueError(f"{shown!r}: bad host {host!r}")
    if (parts.username is not None or "@" in parts.netloc) and not userinfo:
        raise ValueError(
            f"{shown!r}: no credentials in the URL here (put them in proxy.credentials_file)"
        )
    user = None if parts.username is None else urllib.parse.unquote(parts.username)
    password = None if parts.password is None else urllib.parse.unquote(parts.password)
    return ProxyURL(parts.scheme, host, port, user, password)
