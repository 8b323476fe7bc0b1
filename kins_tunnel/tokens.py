"""Enrolment tokens: created by ``kins-tunnel token create``, checked by the cloud (`enrollment`).

A token is ``<id>.<secret>`` (kubeadm's form: 6 and 16 characters of ``a-z0-9``, about 83 bits of
secret). The tokens file (``enrollment.tokens_file``) keeps, per token id, only the SHA-256 of the
secret (the secret is random, so a fast hash is enough), what the token binds (NodeUnit, optional
node), its expiry and its remaining uses::

    # kins-tunnel enrolment tokens (only hashes of the secrets are stored)
    tokens:
      k3x9qa:
        secret_sha256: 5d41402abc4b2a76b9719d911017c592...
        unit: test
        node: edge1            # optional: the token enrols this node only
        expires: "2026-12-08T12:00:00Z"
        uses: 1                # enrolments left

The file parses strictly (`parse_tokens`): unknown or missing keys, a bad name, a malformed hash
or date are errors naming the token id and the key, never a secret. The cloud re-reads it when it
changes (`TokenStore`, on `filewatch.WatchedFile`): a token created or deleted takes effect
within a second, without restart.

Remaining uses
--------------
When the cloud can write the file (a file on a volume it owns), each enrolment takes one use in
the file itself, under an exclusive lock on ``.<name>.lock`` next to it (``token create`` and
``token delete`` take the same lock), re-read and rewritten atomically: the count holds across
restarts and for every process sharing the file. A Kubernetes Secret is mounted read-only: then
the cloud counts the uses it saw in memory, per replica and until restart, and says so in its log
at start-up. Keep such tokens short-lived (``--ttl``) and bound to a node (``--node``): a node
holds one identity whatever the number of uses, and ``token delete`` (then updating the Secret)
ends a token everywhere within the kubelet's sync period.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import os
import re
import secrets
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import trio
import yaml

from kins_tunnel.certs.identity import check_edge_names
from kins_tunnel.errors import UserError
from kins_tunnel.filewatch import WatchedFile
from kins_tunnel.pemfiles import read_file, write_atomic
from kins_tunnel.yamlcheck import StrictLoader

TOKEN_RE = re.compile(r"([a-z0-9]{6})\.([a-z0-9]{16})")
_ID_RE = re.compile(r"[a-z0-9]{6}")
_HASH_RE = re.compile(r"[0-9a-f]{64}")
_ALPHABET = string.ascii_lowercase + string.digits
MAX_TOKENS = 10000  # entries in one tokens file (memory is bounded by configuration)
MAX_FILE_BYTES = 4 * 1024 * 1024
_KEYS = ("secret_sha256", "unit", "node", "expires", "uses")
_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(s|m|h|d)")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, what: str = "--ttl") -> dt.timedelta:
    """``90s``, ``30m``, ``24h``, ``7d`` (or several: ``1h30m``) as a timedelta; `UserError`."""
    total, pos = 0.0, 0
    text = text.strip()
    for m in _DURATION_RE.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if not text or pos != len(text) or total <= 0:
        raise UserError(f"{what} {text!r}: expected a duration such as 90s, 30m, 24h or 7d")
    return dt.timedelta(seconds=total)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class TokenEntry:
    id: str
    secret_sha256: str
    unit: str
    node: str | None
    expires: dt.datetime  # aware, UTC
    uses: int  # enrolments left (in the file)


def _fail(token_id: str, key: str, message: str) -> ValueError:
    return ValueError(f"token {token_id}: {key}: {message}")


def parse_tokens(data: bytes) -> dict[str, TokenEntry]:
    """The entries of a tokens file by id; `ValueError` with a one-line reason (no secret)."""
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
    try:
        doc = yaml.load(data.decode("utf-8"), Loader=StrictLoader)  # noqa: S506 (a SafeLoader)
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ValueError(
            f"{where}invalid YAML: {getattr(exc, 'problem', None) or 'error'}"
        ) from None
    if doc is None:
        return {}
    if not isinstance(doc, Mapping) or set(doc) - {"tokens"}:
        raise ValueError("expected a mapping with the one key 'tokens'")
    raw = doc.get("tokens") or {}
    if not isinstance(raw, Mapping):
        raise ValueError("tokens: expected a mapping of token id to its entry")
    if len(raw) > MAX_TOKENS:
        raise ValueError(f"tokens: more than {MAX_TOKENS} entries")
    out: dict[str, TokenEntry] = {}
    for token_id, entry in raw.items():
        if not isinstance(token_id, str) or not _ID_RE.fullmatch(token_id):
            raise ValueError(f"tokens: key {str(token_id)[:20]!r} is not a token id (6 of a-z0-9)")
        out[token_id] = _entry(token_id, entry)
    return out


def _entry(token_id: str, entry: object) -> TokenEntry:
    if not isinstance(entry, Mapping):
        raise _fail(token_id, "", "expected a mapping")
    for key in entry:
        if key not in _KEYS:
            raise _fail(
                token_id, str(key)[:40], f"unknown key (expected one of: {', '.join(_KEYS)})"
            )
    for key in ("secret_sha256", "unit", "expires", "uses"):
        if key not in entry:
            raise _fail(token_id, key, "required key is missing")
    digest, unit, node = entry["secret_sha256"], entry["unit"], entry.get("node")
    if not isinstance(digest, str) or not _HASH_RE.fullmatch(digest):
        raise _fail(token_id, "secret_sha256", "expected 64 lower-case hex digits")
    if not isinstance(unit, str) or (node is not None and not isinstance(node, str)):
        raise _fail(token_id, "unit" if not isinstance(unit, str) else "node", "expected a string")
    try:
        check_edge_names(unit, node or "node")
    except UserError as exc:
        raise _fail(token_id, "unit" if str(exc).startswith("unit") else "node", str(exc)) from None
    expires = entry["expires"]
    try:
        when = dt.datetime.fromisoformat(str(expires).replace("Z", "+00:00"))
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise _fail(
            token_id, "expires", "expected a date and time with zone, e.g. 2026-12-08T12:00:00Z"
        )
    uses = entry["uses"]
    if type(uses) is not int or uses < 0:
        raise _fail(token_id, "uses", "expected an integer of at least 0")
    return TokenEntry(token_id, digest, unit, node, when.astimezone(dt.UTC), uses)


def dump_tokens(entries: Mapping[str, TokenEntry]) -> bytes:
    doc = {
        "tokens": {
            e.id: {
                "secret_sha256": e.secret_sha256,
                "unit": e.unit,
                **({"node": e.node} if e.node else {}),
                "expires": e.expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "uses": e.uses,
            }
            for e in entries.values()
        }
    }
    head = "# kins-tunnel enrolment tokens (only hashes of the secrets are stored)\n"
    return (head + str(yaml.safe_dump(doc, sort_keys=False))).encode()


def read_tokens(path: Path, *, missing_ok: bool = False) -> dict[str, TokenEntry]:
    """The entries of the tokens file at `path` (none if it is absent and `missing_ok`);
    `UserError` naming the file if it cannot be read or does not parse."""
    if missing_ok and not Path(path).exists():
        return {}
    data = read_file(Path(path), "tokens file")
    try:
        return parse_tokens(data)
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from None


# --- the file, shared by the CLI and the cloud ---------------------------------------------------


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``.<name>.lock`` next to the tokens file (blocking, short)."""
    lock = path.with_name(f".{path.name}.lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as exc:
        raise UserError(f"cannot lock {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def create_token(
    path: Path,
    unit: str,
    node: str | None,
    ttl: dt.timedelta,
    uses: int,
    *,
    now: dt.datetime | None = None,
) -> str:
    """Add a new token to the tokens file (created 0600 if absent); returns ``<id>.<secret>``."""
    check_edge_names(unit, node or "node")
    if uses < 1:
        raise UserError(f"--uses {uses}: must be at least 1")
    path = Path(path)
    with locked(path):
        entries = read_tokens(path, missing_ok=True)
        while True:
            token_id = "".join(secrets.choice(_ALPHABET) for _ in range(6))
            if token_id not in entries:
                break
        secret = "".join(secrets.choice(_ALPHABET) for _ in range(16))
        entries[token_id] = TokenEntry(
            token_id, secret_hash(secret), unit, node, (now or _utcnow()) + ttl, uses
        )
        write_atomic(path, dump_tokens(entries), 0o600)
    return f"{token_id}.{secret}"


def delete_token(path: Path, token_id: str) -> None:
    path = Path(path)
    with locked(path):
        entries = read_tokens(path)
        if entries.pop(token_id, None) is None:
            raise UserError(f"no token {token_id!r} in {path}")
        write_atomic(path, dump_tokens(entries), 0o600)


def token_rows(path: Path, now: dt.datetime | None = None) -> list[tuple[str, ...]]:
    """``token list``: one row per token (never a secret, which the file does not hold)."""
    now = now or _utcnow()
    rows: list[tuple[str, ...]] = [("ID", "UNIT", "NODE", "EXPIRES", "USES", "STATE")]
    for e in sorted(read_tokens(path).values(), key=lambda e: e.expires):
        state = "expired" if e.expires <= now else "used up" if e.uses == 0 else "valid"
        rows.append(
            (
                e.id,
                e.unit,
                e.node or "*",
                e.expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
                str(e.uses),
                state,
            )
        )
    return rows


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --- the cloud's view ----------------------------------------------------------------------------


class TokenRefused(Exception):
    """A token the cloud does not accept: `reason` is a fixed label, the message says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class TokenStore:
    """The tokens file as the cloud uses it: `check` a presented token, then `consume` a use."""

    def __init__(self, path: Path) -> None:
        self.file: WatchedFile[dict[str, TokenEntry]] = WatchedFile(
            Path(path), parse_tokens, "enrollment.tokens_file", parse_in_thread=True
        )  # up to MAX_TOKENS entries of YAML: seconds of parsing, re-read after each enrolment
        self.path = Path(path)
        self.write_back = os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK)
        self._used: dict[tuple[str, str], int] = {}  # in-memory uses when the file is read-only
        self._lock = trio.Lock()

    def check(self, token: str, now: dt.datetime | None = None) -> TokenEntry:
        """The entry of a well-formed, known, unexpired token with uses left; `TokenRefused`."""
        m = TOKEN_RE.fullmatch(token)
        if m is None:
            raise TokenRefused(
                "bad_token", "not a token (expected <id>.<secret>, as token create prints)"
            )
        entry = self.file.value.get(m.group(1))
        if entry is None or not hmac.compare_digest(entry.secret_sha256, secret_hash(m.group(2))):
            raise TokenRefused("unknown_token", "unknown token (deleted, or never created here)")
        if entry.expires <= (now or _utcnow()):
            raise TokenRefused(
                "expired_token", f"token {entry.id} expired at {entry.expires:%Y-%m-%dT%H:%M:%SZ}"
            )
        if self._remaining(entry) <= 0:
            raise TokenRefused("used_token", f"token {entry.id} has no uses left")
        return entry

    def _remaining(self, entry: TokenEntry) -> int:
        return entry.uses - self._used.get((entry.id, entry.secret_sha256), 0)

    async def consume(self, entry: TokenEntry) -> None:
        """Take one use of `entry` (see "Remaining uses"); `TokenRefused` if none is left now."""
        async with self._lock:
            if not self.write_back:
                if self._remaining(entry) <= 0:
                    raise TokenRefused("used_token", f"token {entry.id} has no uses left")
                key = (entry.id, entry.secret_sha256)
                self._used[key] = self._used.get(key, 0) + 1
                if len(self._used) > MAX_TOKENS:  # forget tokens no longer in the file
                    live = {(e.id, e.secret_sha256) for e in self.file.value.values()}
                    self._used = {k: v for k, v in self._used.items() if k in live}
                return
            await trio.to_thread.run_sync(self._consume_in_file, entry)
            await self.file.check()  # the new count is in use at once

    def _consume_in_file(self, entry: TokenEntry) -> None:
        with locked(self.path):
            entries = read_tokens(self.path)
            now = entries.get(entry.id)
            if now is None or now.secret_sha256 != entry.secret_sha256:
                raise TokenRefused("unknown_token", "unknown token (deleted meanwhile)")
            if now.uses <= 0:
                raise TokenRefused("used_token", f"token {entry.id} has no uses left")
            entries[entry.id] = replace(now, uses=now.uses - 1)
            write_atomic(self.path, dump_tokens(entries), 0o600)
