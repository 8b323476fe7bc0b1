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

The key is derived (HKDF-SHA256) from the cloud's private key and the trusted CA bundle, so
replicas sharing their certificate share it with no new secret to distribute, a restart keeps it,
and changing the CA bundle or the cloud key invalidates every ticket (an edge signed by a CA no
longer trusted cannot come back by resuming). Identity on a resumed session still comes from the
certificate, which the ticket carries: the cloud checks revocation and the validity period on every
tunnel, resumed or not. A ticket is good for `tunnel.session_lifetime` (at most 7 days, TLS 1.3's
limit); an edge that has been connected longer makes a full handshake.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import ssl
import sys
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kins_tunnel.pemfiles import load_key, read_file

log = logging.getLogger("kins_tunnel.tls")

TICKET_KEY_BYTES = 80  # OpenSSL: 16-byte key name, 32-byte HMAC secret, 32-byte AES key
MAX_LIFETIME = 7 * 24 * 3600  # TLS 1.3 caps a ticket's lifetime at 7 days
_SET_TICKET_KEYS = 59  # SSL_CTRL_SET_TLSEXT_TICKET_KEYS
_SET_SESS_CACHE_MODE = 44  # SSL_CTRL_SET_SESS_CACHE_MODE
_SESS_CACHE_OFF = 0


def derive_ticket_key(key: ec.EllipticCurvePrivateKey, ca_pem: bytes) -> bytes:
    """The ticket key of a cloud with private key `key` trusting the CA bundle `ca_pem`."""
    secret = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    info = b"kins-tunnel session tickets v1 " + hashlib.sha256(ca_pem).digest()
    return HKDF(hashes.SHA256(), TICKET_KEY_BYTES, salt=None, info=info).derive(secret)


def _libssl() -> ctypes.CDLL | None:
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


def _ssl_ctx_pointer(ctx: ssl.SSLContext, lib: ctypes.CDLL) -> int | None:
    """The `SSL_CTX *` behind `ctx` (CPython keeps it right after the object header), or None
    when what is there does not answer with the context's own options."""
    if sys.implementation.name != "cpython":  # the layout below is CPython's `PySSLContext`
        return None
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr:
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
    False (and no tickets at all) when OpenSSL cannot be reached this way."""
    if len(key) != TICKET_KEY_BYTES:
        raise ValueError(f"a ticket key is {TICKET_KEY_BYTES} bytes")
    ctx.num_tickets = 0
    lib = _libssl()
    ptr = None if lib is None else _ssl_ctx_pointer(ctx, lib)
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


def enable_tickets(ctx: ssl.SSLContext, ca: Path, key: Path, lifetime: float) -> bool:
    """`set_ticket_key` with the key derived from the cloud's key file and CA bundle (UserError
    naming ``tls.key`` / ``tls.ca`` when they cannot be read)."""
    secret = derive_ticket_key(load_key(key, "tls.key"), read_file(ca, "tls.ca"))
    return set_ticket_key(ctx, secret, lifetime)
