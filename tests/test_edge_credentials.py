"""The edge's credential files survive a process that dies while it replaces them."""

from __future__ import annotations

import shutil
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kins_tunnel.certs.directory import init_ca, issue_edge
from kins_tunnel.edge.credentials import (
    current_credentials,
    finish_interrupted_write,
    pending,
    write_credentials,
)
from kins_tunnel.edge.enroll import Enrolment
from kins_tunnel.metrics import Metrics
from kins_tunnel.pemfiles import load_key
from tests.e2e.test_enroll import edge_cfg


def two_pairs(base: Path) -> tuple[tuple[Path, Path], tuple[Path, Path]]:
    """An old and a new certificate + key of node edge1 (files in BASE/old, BASE/new)."""
    certs = base / "certs"
    init_ca(certs, issuing_ca=True)
    pairs = []
    for name in ("old", "new"):
        crt, key = issue_edge(certs, "test", "edge1")
        (base / name).mkdir()
        pairs.append(
            (shutil.copy(crt, base / name / "tls.crt"), shutil.copy(key, base / name / "tls.key"))
        )
    return (Path(pairs[0][0]), Path(pairs[0][1])), (Path(pairs[1][0]), Path(pairs[1][1]))


def matches(cert: Path, key: Path) -> bool:
    c = x509.load_pem_x509_certificate(cert.read_bytes())
    return bool(c.public_key() == load_key(key, "key").public_key())


def same(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


def test_a_write_stopped_between_the_renames_is_completed(tmp_path: Path) -> None:
    (old_crt, old_key), (new_crt, new_key) = two_pairs(tmp_path)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    # the key was renamed into place, the certificate was not: a pair that does not match
    shutil.copy(new_key, key)
    shutil.copy(old_crt, cert)
    shutil.copy(new_crt, pending(cert))
    assert not matches(cert, key)
    assert finish_interrupted_write(cert, key) is not None
    assert same(cert, new_crt) and same(key, new_key) and matches(cert, key)
    assert not pending(cert).exists() and not pending(key).exists()
    assert finish_interrupted_write(cert, key) is None  # nothing left to do


def test_a_write_stopped_before_the_renames_is_completed(tmp_path: Path) -> None:
    (old_crt, old_key), (new_crt, new_key) = two_pairs(tmp_path)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    for src, dst in ((old_crt, cert), (old_key, key), (new_crt, pending(cert))):
        shutil.copy(src, dst)
    shutil.copy(new_key, pending(key))
    finish_interrupted_write(cert, key)
    assert same(cert, new_crt) and same(key, new_key)
    assert not pending(cert).exists() and not pending(key).exists()


def test_unfinished_new_files_that_match_nothing_are_removed(tmp_path: Path) -> None:
    (old_crt, old_key), (new_crt, new_key) = two_pairs(tmp_path)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(old_crt, cert)
    shutil.copy(old_key, key)
    shutil.copy(new_key, pending(key))  # stopped before the new certificate was written
    finish_interrupted_write(cert, key)
    assert same(cert, old_crt) and same(key, old_key) and not pending(key).exists()
    pending(cert).write_bytes(b"half a certificate")  # a certificate of no key here
    finish_interrupted_write(cert, key)
    assert same(cert, old_crt) and same(key, old_key) and not pending(cert).exists()


def test_write_credentials_leaves_a_matching_pair_and_no_pending_files(tmp_path: Path) -> None:
    (old_crt, old_key), (new_crt, new_key) = two_pairs(tmp_path)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(old_crt, cert)
    shutil.copy(old_key, key)
    new = x509.load_pem_x509_certificate(new_crt.read_bytes())
    private = serialization.load_pem_private_key(new_key.read_bytes(), None)
    write_credentials(cert, key, None, private, new, [], None)  # type: ignore[arg-type]
    assert same(key, new_key) and matches(cert, key)
    assert not pending(cert).exists() and not pending(key).exists()
    assert key.stat().st_mode & 0o077 == 0


def test_an_edge_starting_after_an_interrupted_renewal_uses_the_new_pair(tmp_path: Path) -> None:
    (old_crt, _old_key), (new_crt, new_key) = two_pairs(tmp_path)
    cfg = edge_cfg(tmp_path, 1)
    cfg.tls.cert.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(new_key, cfg.tls.key)
    shutil.copy(old_crt, cfg.tls.cert)
    shutil.copy(new_crt, pending(cfg.tls.cert))
    assert current_credentials(cfg) is None  # as the files stand, the edge would enrol again
    enrolment = Enrolment(cfg, Metrics("edge", lambda: ()))
    assert enrolment.state == "enrolled" and current_credentials(cfg) is not None
    assert same(cfg.tls.cert, new_crt)
