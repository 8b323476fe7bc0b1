"""PEM files of keys and certificates: written atomically with their modes, read with one-line
`UserError`s naming the file.

Keys are unencrypted PKCS#8 PEM created with mode 0600 (never widened afterwards); certificates are
PEM with mode 0644. Files are written to a temporary name and renamed into place, so a reader never
sees half a file.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kins_tunnel.errors import UserError


def make_dir(dir: Path) -> None:
    try:
        dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create directory {dir}: {exc.strerror or exc}") from None


def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_atomic(path, pem, 0o600)


def write_cert(path: Path, cert: x509.Certificate) -> None:
    write_atomic(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to a fresh file created with `mode`, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
        try:
            if mode & 0o044:  # public files: do not let a strict umask hide a certificate
                os.fchmod(fd, mode)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


def read_file(path: Path, label: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"{label}: cannot read {path}: {exc.strerror or exc}") from None


def load_certs(path: Path, label: str) -> list[x509.Certificate]:
    data = read_file(path, label)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise UserError(f"{label}: {path} is not a PEM certificate") from None
    return certs


def load_key(path: Path, label: str) -> ec.EllipticCurvePrivateKey:
    data = read_file(path, label)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise UserError(f"{label}: {path} is encrypted; an unencrypted key is needed") from None
    except (ValueError, UnsupportedAlgorithm):
        raise UserError(f"{label}: {path} is not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UserError(f"{label}: {path} is not an ECDSA key")
    return key


def cert_not_after(path: Path) -> dt.datetime:
    """When the (first) certificate in PEM file `path` expires, as an aware UTC datetime."""
    return load_certs(Path(path), "certificate")[0].not_valid_after_utc
