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

The files parse strictly: blank lines and lines whose first non-blank character is ``#`` are
skipped; anything else must be a whole credential. An empty name or secret, a Basic line without
``:``, a name with spaces or control characters, a name given twice, a token given twice, and a
name that is both a Basic user and a token name are errors naming the line (never showing a
secret). At start-up that is a `UserError`; on a re-read the previous contents stay in use and
the failure is counted (`kins_tunnel.filewatch`). Client-certificate subjects cannot be known
ahead, so a certificate CN equal to a user or token name is the same principal to the rules.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re
from dataclasses import dataclass

import trio

from kins_tunnel.config_proxy import ProxyAuth
from kins_tunnel.filewatch import WatchedFile

log = logging.getLogger("kins_tunnel.cloud.auth")
REALM = 'Basic realm="kins-tunnel", Bearer realm="kins-tunnel"'
# a name may hold neither white space nor control characters (it is logged and used in rules)
_BAD_NAME = re.compile(r"[\s\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated client: a name and the groups it carries itself (certificate O values)."""

    name: str
    source: str  # "basic", "bearer" or "cert"
    groups: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Credential:
    """One line of a credentials file: the principal name, the secret compared, the line number."""

    name: str
    secret: bytes
    line: int


def token_name(token: bytes) -> str:
    """The name of a token given without one: ``token-<8 hex digits of its SHA-256>``."""
    return "token-" + hashlib.sha256(token).hexdigest()[:8]


def _lines(data: bytes) -> list[tuple[int, bytes]]:
    """(line number, line) of every line that is neither blank nor a comment (after stripping)."""
    return [
        (number, raw)
        for number, raw in enumerate(data.splitlines(), 1)
        if raw.strip() and not raw.strip().startswith(b"#")
    ]


def _name(raw: bytes, number: int, what: str) -> str:
    if not raw:
        raise ValueError(f"line {number}: empty {what}")
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"line {number}: the {what} is not UTF-8 text") from None
    if _BAD_NAME.search(name):
        raise ValueError(f"line {number}: the {what} holds spaces or control characters")
    return name


def parse_basic(data: bytes) -> list[Credential]:
    """Parse a Basic file: ``user:password`` lines, the password taken byte for byte (it may begin
    or end with a space; only the line break is dropped). `ValueError` naming the line."""
    out: list[Credential] = []
    for number, line in _lines(data):
        user, sep, password = line.partition(b":")
        if not sep:
            raise ValueError(f"line {number}: no ':' (a line is user:password; not shown)")
        name = _name(user, number, "user name")
        if not password:
            raise ValueError(f"line {number}: empty password for user {name!r}")
        out.append(Credential(name, line, number))
    _unique(out, "user")
    return out


def parse_bearer(data: bytes) -> list[Credential]:
    """Parse a Bearer file: ``name:token`` lines, or a bare token (named by `token_name`); white
    space around names and tokens is dropped. `ValueError` naming the line."""
    out: list[Credential] = []
    for number, raw in _lines(data):
        line = raw.strip()
        name_part, sep, token = line.partition(b":")
        if sep:
            name = _name(name_part.strip(), number, "token name")
            token = token.strip()
            if not token:
                raise ValueError(f"line {number}: empty token for {name!r}")
        else:
            token, name = line, token_name(line)
        if _BAD_NAME.search(token.decode("latin-1")):
            raise ValueError(f"line {number}: the token holds spaces or control characters")
        out.append(Credential(name, token, number))
    _unique(out, "token name")
    firsts: dict[bytes, Credential] = {}
    for c in out:
        first = firsts.setdefault(c.secret, c)
        if first is not c:
            raise ValueError(
                f"line {c.line}: the token of {c.name!r} is the token of {first.name!r} "
                f"(line {first.line}) too"
            )
    return out


def _unique(entries: list[Credential], what: str) -> None:
    firsts: dict[str, Credential] = {}
    for c in entries:
        first = firsts.setdefault(c.name, c)
        if first is not c:
            raise ValueError(f"line {c.line}: {what} {c.name!r} again (first on line {first.line})")


class Authenticator:
    """Checks Proxy-Authorization against the credential files. Each check first looks whether a
    file changed (a `stat` in a worker thread, a re-read only on change): a rotated secret applies
    to the very next CONNECT, and the event loop never blocks on the file system. `watch()` also
    checks them on a timer, so a broken new version is reported without waiting for a client.

    A name may not be both a Basic user and a token name: the second file to load it (at start-up
    the bearer file, later the one that changed) is refused, naming the line and the other file.
    """

    def __init__(self, cfg: ProxyAuth) -> None:
        self._basic: WatchedFile[list[Credential]] | None = None
        self._bearer: WatchedFile[list[Credential]] | None = None
        if cfg.basic_file is not None:
            self._basic = WatchedFile(cfg.basic_file, self._parse_basic, "proxy.auth.basic_file")
        if cfg.bearer_file is not None:
            self._bearer = WatchedFile(
                cfg.bearer_file, self._parse_bearer, "proxy.auth.bearer_file"
            )
        for f in self.files:
            if not f.value:
                log.warning("%s holds no credentials: every CONNECT will get 407", f.what)

    @property
    def files(self) -> list[WatchedFile[list[Credential]]]:
        """The watched credential files (for status and metrics)."""
        return [f for f in (self._basic, self._bearer) if f is not None]

    def _parse_basic(self, data: bytes) -> list[Credential]:
        return _apart(parse_basic(data), "user", self._bearer, "token name")

    def _parse_bearer(self, data: bytes) -> list[Credential]:
        return _apart(parse_bearer(data), "token name", self._basic, "user")

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

    async def watch(self, interval: float = 1.0) -> None:
        """Check the files every `interval` seconds until cancelled."""
        while True:
            await trio.sleep(interval)
            for f in self.files:
                await f.check()


def _apart(
    entries: list[Credential],
    what: str,
    other: WatchedFile[list[Credential]] | None,
    other_what: str,
) -> list[Credential]:
    """`entries`, unless one of their names is a name of the other file's entries in use."""
    if other is not None:
        theirs = {c.name: c for c in other.value}
        for c in entries:
            if c.name in theirs:
                raise ValueError(
                    f"line {c.line}: {what} {c.name!r} is a {other_what} in {other.what} "
                    f"({other.path} line {theirs[c.name].line}) too: a principal has one name"
                )
        other.retry()  # a version of the other file refused for a clash with ours may pass now
    return entries


def _match(given: bytes, entries: list[Credential]) -> str | None:
    """The name of the entry whose secret equals `given`, comparing against every entry."""
    found: str | None = None
    for c in entries:
        if hmac.compare_digest(given, c.secret) and found is None:
            found = c.name
    return found
