"""Optional CONNECT authentication: Basic (user:password lines) or Bearer (named tokens).

Credentials come from files (e.g. a mounted Kubernetes Secret) and are re-read when the file
changes, so rotating a secret needs no restart. Comparison is constant-time (`hmac.compare_digest`)
against every entry, so timing does not reveal which entry nearly matched.

Who connected (the *principal*, used by authorization and the audit log; never a secret):

- Basic: the user name (the part of the line before the first ``:``).
- Bearer: a line ``name:token`` names its token; a line with only a token (the older form, no
  ``:``) gets the name ``token-`` + the first 8 hex digits of the token's SHA-256, stable across
  edits of other lines. Token characters (RFC 6750) never include ``:``.
- A client certificate on the TLS listener (`kins_tunnel.cloud.proxy_tls`): its subject CN, with
  the subject's O values as groups.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kins_tunnel.config import ProxyAuth
from kins_tunnel.filewatch import WatchedFile

log = logging.getLogger("kins_tunnel.cloud.auth")
REALM = 'Basic realm="kins-tunnel", Bearer realm="kins-tunnel"'


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated client: a name and the groups it carries itself (certificate O values)."""

    name: str
    source: str  # "basic", "bearer" or "cert"
    groups: frozenset[str] = frozenset()


def token_name(token: bytes) -> str:
    """The name of a token given without one: ``token-<8 hex digits of its SHA-256>``."""
    return "token-" + hashlib.sha256(token).hexdigest()[:8]


def _credential_parser(strip: bool, what: str) -> Callable[[bytes], list[tuple[str, bytes]]]:
    """Parse a credentials file into (principal name, secret compared) entries."""

    def parse(data: bytes) -> list[tuple[str, bytes]]:
        # Basic lines are taken byte for byte (`splitlines` drops only the line break): a password
        # may begin or end with a space. Bearer tokens cannot hold spaces (RFC 6750), so theirs
        # are trimmed. Blank lines and lines starting with '#' are skipped.
        lines = [
            ln.strip() if strip else ln
            for ln in data.splitlines()
            if ln.strip() and not ln.startswith(b"#")
        ]
        if not lines:
            log.warning("%s holds no credentials: every CONNECT will get 407", what)
        return [_entry(ln, strip) for ln in lines]

    return parse


def _entry(line: bytes, bearer: bool) -> tuple[str, bytes]:
    if not bearer:  # Basic: user:password, compared as a whole
        return line.partition(b":")[0].decode("utf-8", "replace"), line
    name, sep, token = line.partition(b":")
    if not sep:
        return token_name(line), line
    return name.strip().decode("utf-8", "replace"), token.strip()


def _credential_file(
    path: Path | None, what: str, *, strip: bool
) -> WatchedFile[list[tuple[str, bytes]]] | None:
    return None if path is None else WatchedFile(path, _credential_parser(strip, what), what)


class Authenticator:
    """Checks Proxy-Authorization against the credential files. Each check first looks whether a
    file changed (a `stat` in a worker thread, a re-read only on change): a rotated secret applies
    to the very next CONNECT, and the event loop never blocks on the file system."""

    def __init__(self, cfg: ProxyAuth) -> None:
        self._basic = _credential_file(cfg.basic_file, "proxy.auth.basic_file", strip=False)
        self._bearer = _credential_file(cfg.bearer_file, "proxy.auth.bearer_file", strip=True)

    async def authenticate(self, header: bytes | None) -> Principal | None:
        """The principal whose credentials the Proxy-Authorization value carries, or None."""
        if not header:
            return None
        scheme, _, value = header.strip().partition(b" ")
        scheme = scheme.lower()
        value = value.strip()
        if scheme == b"basic" and self._basic is not None:
            try:
                decoded = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                return None
            await self._basic.check()
            name = _match(decoded, self._basic.value)
            return None if name is None else Principal(name, "basic")
        if scheme == b"bearer" and self._bearer is not None:
            await self._bearer.check()
            name = _match(value, self._bearer.value)
            return None if name is None else Principal(name, "bearer")
        return None


def _match(given: bytes, entries: list[tuple[str, bytes]]) -> str | None:
    """The name of the entry whose secret equals `given`, comparing against every entry."""
    found: str | None = None
    for name, secret in entries:
        if hmac.compare_digest(given, secret) and found is None:
            found = name
    return found
