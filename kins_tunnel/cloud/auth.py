"""Optional CONNECT authentication: Basic (user:password lines) or Bearer (one token per line).

Credentials come from files (e.g. a mounted Kubernetes Secret) and are re-read when the file
changes, so rotating a secret needs no restart. Comparison is constant-time (`hmac.compare_digest`)
against every entry, so timing does not reveal which entry nearly matched.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import os
from pathlib import Path

from kins_tunnel.config import ProxyAuth
from kins_tunnel.errors import UserError

log = logging.getLogger("kins_tunnel.cloud.auth")
REALM = 'Basic realm="kins-tunnel", Bearer realm="kins-tunnel"'


class _CredentialFile:
    def __init__(self, path: Path, what: str, *, strip: bool) -> None:
        self.path = path
        self.what = what
        self.strip = strip
        self._stamp: tuple[int, int] | None = None
        self.entries: list[bytes] = []
        self.reload(strict=True)

    def reload(self, strict: bool = False) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            lines = self.path.read_bytes().splitlines()
        except OSError as exc:
            if strict:
                raise UserError(f"{self.what}: cannot read {self.path}: {exc.strerror}") from exc
            log.warning("%s: cannot re-read %s: %s (keeping the previous credentials)", self.what, self.path, exc)
            return
        # Basic lines are taken byte for byte (`splitlines` drops only the line break): a password
        # may begin or end with a space. Bearer tokens cannot hold spaces (RFC 6750), so theirs
        # are trimmed. Blank lines and lines starting with '#' are skipped.
        self.entries = [ln.strip() if self.strip else ln for ln in lines if ln.strip() and not ln.startswith(b"#")]
        self._stamp = stamp
        if not self.entries:
            log.warning("%s: %s holds no credentials: every CONNECT will get 407", self.what, self.path)


class Authenticator:
    def __init__(self, cfg: ProxyAuth) -> None:
        self._basic = _CredentialFile(cfg.basic_file, "proxy.auth.basic_file", strip=False) if cfg.basic_file else None
        self._bearer = _CredentialFile(cfg.bearer_file, "proxy.auth.bearer_file", strip=True) if cfg.bearer_file else None

    def check(self, header: bytes | None) -> bool:
        """True if the Proxy-Authorization header value carries valid credentials."""
        if not header:
            return False
        scheme, _, value = header.strip().partition(b" ")
        scheme = scheme.lower()
        value = value.strip()
        if scheme == b"basic" and self._basic is not None:
            try:
                decoded = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                return False
            self._basic.reload()
            return _match(decoded, self._basic.entries)
        if scheme == b"bearer" and self._bearer is not None:
            self._bearer.reload()
            return _match(value, self._bearer.entries)
        return False


def _match(given: bytes, entries: list[bytes]) -> bool:
    ok = False
    for entry in entries:
        ok |= hmac.compare_digest(given, entry)
    return ok
