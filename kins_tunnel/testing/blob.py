"""The stand-in's bulk data: AES-128-CTR over zeros, keyed by a seed.

Deterministic, pseudo-random, seekable (any offset can be produced without the bytes before it)
and about 1 GB/s, so it is never the bottleneck of a throughput test; both ends of a test can
produce the expected bytes independently and compare.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

CHUNK = 256 * 1024  # size of the pieces `iter_blob` yields by default


def _blob_cipher(seed: int, offset: int) -> Any:
    key = hashlib.sha256(b"kins-standin-blob:%d" % seed).digest()[:16]
    counter = (offset // 16).to_bytes(16, "big")
    return Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()


def iter_blob(n: int, seed: int, *, offset: int = 0, chunk_size: int = CHUNK) -> Iterator[bytes]:
    """Yield bytes ``offset .. n`` of the blob for `seed`, in chunks of at most `chunk_size`."""
    if n < 0 or offset < 0 or chunk_size <= 0:
        raise ValueError("blob size, offset and chunk size must be non-negative")
    enc = _blob_cipher(seed, offset)
    skip = offset % 16
    if skip:
        enc.update(bytes(skip))
    zeros = bytes(chunk_size)
    pos = offset
    while pos < n:
        size = min(chunk_size, n - pos)
        yield enc.update(zeros if size == chunk_size else bytes(size))
        pos += size


def blob_chunk(seed: int, offset: int, length: int) -> bytes:
    """Return `length` bytes of the blob for `seed` starting at `offset` (cheap random access)."""
    return b"".join(iter_blob(offset + length, seed, offset=offset, chunk_size=1 << 20))


def blob_bytes(n: int, seed: int) -> bytes:
    """Return the first `n` bytes of the blob for `seed`, exactly what the blob endpoint sends."""
    return blob_chunk(seed, 0, n)
