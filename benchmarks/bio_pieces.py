"""What feeding OpenSSL's memory BIOs in pieces costs: TLS records decrypted and encrypted
in-process, through a mutual-TLS pair on memory BIOs (the cloud's and an edge's contexts).

    python -m benchmarks.bio_pieces [--mib 64] [--rounds 5]

A memory BIO never shrinks (see `kins_tunnel/transport/tls.py`, "Memory"), so `TLSSocket` hands
OpenSSL a bounded piece at a time. Decrypting: each 256 KiB read (`RAW_READ`) written into the
incoming BIO whole, or in pieces of 16, 32 or 64 KiB, each once OpenSSL has taken the one
before; `SSL_read` into a 1 MiB view. Encrypting: each 256 KiB batch written (`SSL_write`) whole,
or in pieces, the outgoing BIO read out after each. MB/s (10^6) of plaintext, medians over the
rounds (the cases alternate within a round), and each case's BIO size after the run is not
measured here (`benchmarks.idlemem --openssl` does).
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.idlemem import handshaken
from benchmarks.scale import fleet_certs
from kins_tunnel.tls_contexts import client_ssl_context, server_ssl_context
from kins_tunnel.transport.tls import RAW_READ

PIECES = (None, 16 * 1024, 32 * 1024, 64 * 1024)  # None: whole
RECORD = 16 * 1024 + 256 + 5  # the largest TLS record on the wire


def _name(piece: int | None) -> str:
    return "whole" if piece is None else f"{piece // 1024} KiB"


def decrypt(
    server: ssl.SSLContext,
    client: ssl.SSLContext,
    total: int,
    piece: int | None,
    top_up: int = 1,
    fill: bool = False,
) -> float:
    """MB/s decrypting `total` bytes sent in `RAW_READ` batches, fed `piece` at a time: the next
    piece once the incoming BIO holds fewer than `top_up` bytes (1: once it is empty); `fill`:
    topped up to `RECORD` bytes whenever it holds less (a whole record always there)."""
    s, s_in, _s_out, c, _c_in, c_out = handshaken(server, client)
    data = os.urandom(RAW_READ)
    records = []
    for _ in range(total // RAW_READ):
        c.write(data)
        records.append(c_out.read())
    ciphertext = memoryview(b"".join(records))
    read: Any = getattr(s, "_sslobj", s).read  # as `TLSSocket` calls it
    view = memoryview(bytearray(1024 * 1024))
    step = piece or RAW_READ
    got = 0
    t0 = time.perf_counter()
    for off in range(0, len(ciphertext), RAW_READ):
        raw = ciphertext[off : off + RAW_READ]
        i = 0
        while True:
            held = s_in.pending
            if i < len(raw) and held < top_up:
                take = RECORD - held if fill else step
                s_in.write(raw[i : i + take])
                i += take
            try:
                got += read(len(view), view)
            except ssl.SSLWantReadError:
                if i >= len(raw):
                    break
    elapsed = time.perf_counter() - t0
    assert got == total // RAW_READ * RAW_READ
    return got / elapsed / 1e6


def encrypt(server: ssl.SSLContext, client: ssl.SSLContext, total: int, piece: int | None) -> float:
    """MB/s encrypting `total` bytes in `RAW_READ` batches, `piece` at a time."""
    _s, _s_in, _s_out, c, _c_in, c_out = handshaken(server, client)
    write: Any = getattr(c, "_sslobj", c).write
    batch = memoryview(os.urandom(RAW_READ))
    step = piece or RAW_READ
    t0 = time.perf_counter()
    for _ in range(total // RAW_READ):
        pieces = []
        for i in range(0, len(batch), step):
            write(batch[i : i + step])
            pieces.append(c_out.read())
    elapsed = time.perf_counter() - t0
    return total // RAW_READ * RAW_READ / elapsed / 1e6


def run(mib: int = 64, rounds: int = 5) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="kins-bio-pieces-") as tmp:
        certs = fleet_certs(Path(tmp))
        server = server_ssl_context(certs / "ca.crt", certs / "cloud.crt", certs / "cloud.key")
        client = client_ssl_context(
            certs / "ca.crt", certs / "edge-edge1.crt", certs / "edge-edge1.key"
        )
        samples: dict[str, list[float]] = {}
        for _ in range(rounds):
            for kind, fn in (("decrypt", decrypt), ("encrypt", encrypt)):
                for piece in PIECES:
                    key = f"{kind} {_name(piece)}"
                    samples.setdefault(key, []).append(fn(server, client, mib << 20, piece))
            for piece in PIECES[1:3]:  # topped up below a record: no SSL_read finds it short
                key = f"decrypt {_name(piece)}, topped up"
                mb_s = decrypt(server, client, mib << 20, piece, RECORD)
                samples.setdefault(key, []).append(mb_s)
            mb_s = decrypt(server, client, mib << 20, RECORD, RECORD, fill=True)
            samples.setdefault("decrypt filled to a record", []).append(mb_s)
        return {
            "mib": mib,
            "rounds": rounds,
            "median_mb_s": {k: round(statistics.median(v)) for k, v in samples.items()},
            "spread_mb_s": {k: f"{min(v):.0f}-{max(v):.0f}" for k, v in samples.items()},
            "loadavg_1m": round(os.getloadavg()[0], 2),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mib", type=int, default=64, help="MiB per measurement")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (the cases alternate)")
    args = ap.parse_args()
    print(json.dumps(run(args.mib, args.rounds), indent=1))


if __name__ == "__main__":
    main()
