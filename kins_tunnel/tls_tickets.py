"""TLS 1.3 session tickets for returning edges: one ticket key for every replica and restart.

Theory of operation
-------------------
A full mutual-TLS handshake costs the cloud an ECDSA signature, two signature verifications and a
chain check; a resumed one (TLS 1.3 PSK with a fresh ECDHE exchange, `psk_dhe_ke`: forward secret)
costs a key exchange and a few hashes. After a replica restarts, every edge comes back at once, so
the resumed handshake is what keeps a reconnect storm short.

A ticket is the session state (the edge's certificate among it) encrypted and authenticated by the
server with a ticket key; it lives on the client, so tickets cost the cloud no memory. OpenSSL
draws a random ticket key per context, which a restart (or a certificate reload, which builds a new
context) would lose; Python's `ssl` has no call to set it. `set_ticket_key` sets it through
OpenSSL's own `SSL_CTX_ctrl(SSL_CTRL_SET_TLSEXT_TICKET_KEYS)` on the context's `SSL_CTX` (reached
with ctypes, checked against the context's options before anything is written; when anything does
not match, the context simply issues no tickets and every handshake is a full one).

The ticket key never comes from the cloud's TLS key: whoever reads that key (every cloud pod
mounts it) could otherwise forge a ticket holding any edge's certificate (certificates are public)
and connect as that edge. It is derived (HKDF-SHA256, domain-separated) from a dedicated secret and
the trusted CA bundle, so changing the CA bundle invalidates every ticket (an edge signed by a CA
no longer trusted cannot come back by resuming):

- `tunnel.session_ticket_key_file` (`TicketKeys(path)`): one line of 64 to 256 hex digits
  (`kins-tunnel certs ticket-key --out FILE` writes one); every replica and restart reading the
  same file shares tickets. The file is read each time the context is built, so a new secret
  (rotation) takes effect when the certificate watcher sees the file change.
- no file (`TicketKeys(None)`): a random secret held by the `TicketKeys` object, i.e. by the cloud
  process: a brief disconnect resumes (also across certificate reloads), a restart does not.

Identity on a resumed session still comes from the certificate, which the ticket carries: the cloud
checks revocation and the validity period on every tunnel, resumed or not. A ticket is good for
`tunnel.session_lifetime` (at most 7 days, TLS 1.3's limit); an edge that has been connected longer
makes a full handshake.

Reaching the `SSL_CTX`: CPython keeps the pointer right after the object header of its
`PySSLContext`. Before OpenSSL is called with it, `_ssl_ctx_pointer` checks that the object is a
CPython `_ssl._SSLContext` large enough to hold the pointer, that the platform's `unsigned long`
matches what the prototypes assume, and that the memory the pointer names is mapped and readable
(copied through a pipe by the kernel, which fails with EFAULT instead of crashing); only then does
it read the context's options through it and compare them with a flip made through Python. What
cannot be proven from outside is that the options field lies within the probed bytes of a foreign
object: the probe covers the first `_PROBE_BYTES` bytes, more than OpenSSL's `SSL_CTX` needs to
reach its options. Any mismatch or error: a warning, and the context issues no tickets.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
import secrets
import ssl
import sys
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kins_tunnel.errors import UserError
from kins_tunnel.pemfiles import read_file, write_atomic

log = logging.getLogger("kins_tunnel.tls")

TICKET_KEY_BYTES = 80  # OpenSSL: 16-byte key name, 32-byte HMAC secret, 32-byte AES key
MAX_LIFETIME = 7 * 24 * 3600  # TLS 1.3 caps a ticket's lifetime at 7 days
SECRET_BYTES = 32  # what `write_secret` draws
KEY_FILE = "tunnel.session_ticket_key_file"
_SECRET_RE = re.compile(rb"([0-9a-fA-F]{64,256})\r?\n?")  # 32 to 128 bytes, one line
_SET_TICKET_KEYS = 59  # SSL_CTRL_SET_TLSEXT_TICKET_KEYS
_SET_SESS_CACHE_MODE = 44  # SSL_CTRL_SET_SESS_CACHE_MODE
_SESS_CACHE_OFF = 0
_PROBE_BYTES = 1024  # bytes of the SSL_CTX that must be readable before OpenSSL reads them


def derive_ticket_key(secret: bytes, ca_pem: bytes) -> bytes:
    """The 80-byte ticket key for ticket secret `secret` and trusted CA bundle `ca_pem`."""
    info = b"kins-tunnel session ticket key v2 " + hashlib.sha256(ca_pem).digest()
    return HKDF(hashes.SHA256(), TICKET_KEY_BYTES, salt=None, info=info).derive(secret)


def read_secret(path: Path) -> bytes:
    """The secret of a ticket key file: one line of 64 to 256 hex digits. UserError naming
    ``tunnel.session_ticket_key_file`` otherwise; a warning when others may read the file."""
    try:
        secret = parse_secret(read_file(path, KEY_FILE))
    except ValueError as exc:
        raise UserError(f"{KEY_FILE}: {path} {exc}") from None
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = 0
    if mode & 0o004:
        log.warning(
            "%s: %s is readable by every user: whoever reads it can forge session tickets",
            KEY_FILE,
            path,
        )
    return secret


def parse_secret(data: bytes) -> bytes:
    """The secret in the contents of a ticket key file (ValueError saying what is wrong)."""
    match = _SECRET_RE.fullmatch(data)
    if match is None:
        raise ValueError(
            "is not one line of 64 to 256 hex digits "
            "(kins-tunnel certs ticket-key --out FILE writes one)"
        )
    return bytes.fromhex(match.group(1).decode())


def write_secret(path: Path) -> None:
    """Write a new random ticket secret to `path` (mode 0600), replacing any file there."""
    write_atomic(Path(path), secrets.token_hex(SECRET_BYTES).encode() + b"\n", 0o600)


class TicketKeys:
    """Where a cloud's ticket secret comes from: the file `path` (read on every call of
    `secret()`, so a rotated file is picked up by the next context built), or, with no file, a
    random secret drawn once for this object (kept across certificate reloads, lost on restart)."""

    def __init__(self, path: Path | None) -> None:
        self.path = None if path is None else Path(path)
        self._random = secrets.token_bytes(SECRET_BYTES) if path is None else b""

    def secret(self) -> bytes:
        return self._random if self.path is None else read_secret(self.path)


def _libssl() -> ctypes.CDLL | None:
    if ctypes.sizeof(ctypes.c_ulong) != 8 and ssl.OPENSSL_VERSION_INFO < (3,):
        return None  # SSL_CTX_get_options returns unsigned long there, not 64 bits
    try:
        import _ssl  # the extension module Python's ssl is built on, linked to its libssl

        lib = ctypes.CDLL(_ssl.__file__)
        lib.SSL_CTX_ctrl.restype = ctypes.c_long
        lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_set_timeout.restype = ctypes.c_long
        lib.SSL_CTX_set_timeout.argtypes = [ctypes.c_void_p, ctypes.c_long]
    except (ImportError, OSError, AttributeError):
        return None
    return lib


def _readable(address: int, size: int) -> bool:
    """Whether `size` bytes at `address` can be read: the kernel copies them into a pipe and
    answers EFAULT for unmapped memory instead of faulting this process."""
    r, w = os.pipe()
    try:
        return os.write(w, (ctypes.c_char * size).from_address(address)) == size
    except OSError:
        return False
    finally:
        os.close(r)
        os.close(w)


def _ssl_ctx_pointer(ctx: ssl.SSLContext, lib: ctypes.CDLL) -> int | None:
    """The `SSL_CTX *` behind `ctx` (CPython keeps it right after the object header), or None
    when anything about it does not match (see the module's docstring)."""
    if sys.implementation.name != "cpython":  # the layout below is CPython's `PySSLContext`
        return None
    import _ssl

    header = object.__basicsize__
    if not isinstance(ctx, _ssl._SSLContext) or (
        type(ctx).__basicsize__ < header + ctypes.sizeof(ctypes.c_void_p)
    ):
        return None
    ptr = ctypes.c_void_p.from_address(id(ctx) + header).value  # within ctx's own memory
    if not ptr or ptr % ctypes.alignment(ctypes.c_void_p) or not _readable(ptr, _PROBE_BYTES):
        return None
    probe = ssl.OP_NO_TICKET  # flip an option through Python; the pointer must see the flip
    before = ctx.options
    try:
        ctx.options = before ^ probe
        seen = lib.SSL_CTX_get_options(ptr)
    finally:
        ctx.options = before
    return ptr if seen == (before ^ probe) and lib.SSL_CTX_get_options(ptr) == before else None


def set_ticket_key(ctx: ssl.SSLContext, key: bytes, lifetime: float) -> bool:
    """Make the server context `ctx` issue one ticket per handshake, encrypted with `key` (80
    bytes) and valid `lifetime` seconds (capped at 7 days), with no server-side session cache.
    False, a warning and no tickets at all when OpenSSL cannot be reached this way."""
    if len(key) != TICKET_KEY_BYTES:
        raise ValueError(f"a ticket key is {TICKET_KEY_BYTES} bytes")
    ctx.num_tickets = 0
    try:
        lib = _libssl()
        ptr = None if lib is None else _ssl_ctx_pointer(ctx, lib)
    except Exception as exc:  # never let the probe take the cloud down: no tickets instead
        log.warning("TLS session tickets unavailable (%s): every edge handshake is a full one", exc)
        return False
    if lib is None or ptr is None:
        log.warning("TLS session tickets unavailable: every edge handshake is a full one")
        return False
    buf = ctypes.create_string_buffer(key, TICKET_KEY_BYTES)
    if lib.SSL_CTX_ctrl(ptr, _SET_TICKET_KEYS, TICKET_KEY_BYTES, buf) != 1:
        log.warning("TLS session ticket key refused by OpenSSL: no tickets")
        return False
    lib.SSL_CTX_ctrl(ptr, _SET_SESS_CACHE_MODE, _SESS_CACHE_OFF, None)  # tickets hold it all
    lib.SSL_CTX_set_timeout(ptr, int(min(max(lifetime, 1), MAX_LIFETIME)))
    ctx.options &= ~ssl.OP_NO_TICKET
    ctx.num_tickets = 1
    return True


def enable_tickets(ctx: ssl.SSLContext, ca: Path, keys: TicketKeys, lifetime: float) -> bool:
    """`set_ticket_key` with the key derived from `keys`' secret and the CA bundle (UserError
    naming ``tunnel.session_ticket_key_file`` / ``tls.ca`` when they cannot be read)."""
    return set_ticket_key(ctx, derive_ticket_key(keys.secret(), read_file(ca, "tls.ca")), lifetime)
