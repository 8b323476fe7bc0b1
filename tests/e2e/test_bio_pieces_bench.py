"""The BIO-feeding micro-benchmark (`benchmarks.bio_pieces`) at a tiny size: every way of feeding
decrypts and encrypts every byte (it asserts the decrypted count itself). The figures themselves
are measured by `python -m benchmarks.bio_pieces`."""

from __future__ import annotations

from benchmarks.bio_pieces import run


def test_every_way_of_feeding_the_bios_is_measured() -> None:
    r = run(mib=1, rounds=1)
    rates = r["median_mb_s"]
    assert isinstance(rates, dict)
    assert {
        "decrypt whole",
        "decrypt filled to a record",
        "encrypt whole",
        "encrypt 16 KiB",
    } <= set(rates)
    assert all(v > 0 for v in rates.values())
