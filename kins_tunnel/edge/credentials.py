"""The edge's credential files: whether they hold a usable certificate (`current_credentials`,
`enrollment_state` for ``kins-tunnel doctor``) and writing new ones (`write_credentials`).

A new key and certificate are first written beside the files in use (``<file>.next``, each
atomically and synced), then renamed into place, the key first. A process that dies between the
two renames leaves a new key beside an old certificate; `finish_interrupted_write` (run when the
edge starts) completes the step from the ``.next`` files it left, so the pair in use always
matches and the edge never falls back to a token it has already used.
"""

import datetime as dt
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from kins_tunnel.certs.identity import EdgeIdentity, identity_from_der
from kins_tunnel.config import EdgeConfig
from kins_tunnel.errors import UserError
from kins_tunnel.pemfiles import load_certs, load_key, make_dir, write_atomic
from kins_tunnel.tokens import TOKEN_RE

log = logging.getLogger("kins_tunnel.edge.credentials")


@dataclass(frozen=True)
class Credentials:
    identity: EdgeIdentity
    not_before: dt.datetime
    not_after: dt.datetime


def current_credentials(cfg: EdgeConfig) -> Credentials | None:
    """The edge's certificate and key if they load together and the certificate is valid now;
    None if they are missing, do not match, or have expired (then the edge enrols)."""
    try:
        cert = load_certs(cfg.tls.cert, "tls.cert")[0]
        key = load_key(cfg.tls.key, "tls.key")
    except UserError:
        return None
    if cert.public_key() != key.public_key():
        return None
    try:
        identity = identity_from_der(cert.public_bytes(serialization.Encoding.DER))
    except ValueError:
        return None
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        return None
    return Credentials(identity, cert.not_valid_before_utc, cert.not_valid_after_utc)


def enrollment_state(cfg: EdgeConfig) -> tuple[bool, str]:
    """(ok, one line) on the enrolment of an edge config, e.g. ``(True, "enrolled (cert present,
    expires 2027-01-06T10:00:00+00:00)")``, ``(True, "will enrol with token /etc/...")``,
    ``(False, "token file missing: ...")``."""
    creds = current_credentials(cfg)
    if creds is not None:
        return True, (
            f"enrolled (cert present, unit {creds.identity.unit}, node {creds.identity.node}, "
            f"expires {creds.not_after.isoformat()})"
        )
    if cfg.enroll is None:
        return False, f"no usable certificate at tls.cert {cfg.tls.cert} and no enroll section"
    path = cfg.enroll.token_file
    try:
        token = path.read_text().strip()
    except OSError as exc:
        return False, f"token file missing: enroll.token_file {path}: {exc.strerror or exc}"
    if TOKEN_RE.fullmatch(token) is None:
        return False, f"enroll.token_file {path} does not hold a token (<id>.<secret>)"
    return True, f"will enrol with token {token.split('.')[0]} from {path} (ca_hash pinned)"


def write_credentials(
    settings_cert: Path,
    settings_key: Path,
    settings_ca: Path | None,
    key: ec.EllipticCurvePrivateKey,
    cert: x509.Certificate,
    chain: list[x509.Certificate],
    ca: x509.Certificate | None,
) -> None:
    """CA, then key and certificate + chain as ``.next`` files, renamed into place key first."""
    pem = serialization.Encoding.PEM
    for path in (settings_cert, settings_key, *((settings_ca,) if settings_ca else ())):
        make_dir(path.parent)
    if settings_ca is not None and ca is not None:
        write_atomic(settings_ca, ca.public_bytes(pem), 0o644)
    write_atomic(
        pending(settings_key),
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        0o600,
    )
    write_atomic(
        pending(settings_cert), b"".join(c.public_bytes(pem) for c in [cert, *chain]), 0o644
    )
    _promote(settings_cert, settings_key)


def pending(path: Path) -> Path:
    """Where a new credential file waits before it is renamed over `path`."""
    return path.with_name(path.name + ".next")


def _promote(cert_path: Path, key_path: Path) -> None:
    try:
        if pending(key_path).exists():
            os.replace(pending(key_path), key_path)
        os.replace(pending(cert_path), cert_path)
    except OSError as exc:
        raise UserError(f"cannot rename {cert_path}: {exc.strerror or exc}") from None
    for directory in {cert_path.parent, key_path.parent}:
        _sync_dir(directory)


def _sync_dir(directory: Path) -> None:
    """Make the renames in `directory` durable (best effort: not every file system can)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _key_of(path: Path) -> object | None:
    try:
        return load_key(path, "key").public_key()
    except UserError:
        return None


def _cert_key_of(path: Path) -> object | None:
    try:
        return load_certs(path, "certificate")[0].public_key()
    except UserError:
        return None


def finish_interrupted_write(cert_path: Path, key_path: Path) -> str | None:
    """Complete a `write_credentials` that stopped part-way; what was done, or None.

    A pending certificate whose key is the pending key (or, once that was renamed, the key in
    use) is put in place; pending files that belong to nothing are removed."""
    cert_next, key_next = pending(cert_path), pending(key_path)
    if not cert_next.exists() and not key_next.exists():
        return None
    new_cert = _cert_key_of(cert_next) if cert_next.exists() else None
    owner = key_next if key_next.exists() else key_path
    if new_cert is not None and new_cert == _key_of(owner):
        _promote(cert_path, key_path)
        done = f"completed an interrupted certificate write ({cert_path})"
    else:
        for leftover in (cert_next, key_next):
            leftover.unlink(missing_ok=True)
        done = f"removed the unfinished new credential files beside {cert_path}"
    log.warning("%s", done)
    return done


def own_identity(cert_path: str) -> EdgeIdentity:
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        return identity_from_der(cert.public_bytes(Encoding.DER))
    except (OSError, ValueError) as exc:
        raise UserError(f"tls.cert: {cert_path}: not an edge certificate ({exc})") from exc
