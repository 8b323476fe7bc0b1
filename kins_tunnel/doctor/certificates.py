"""Certificate checks shared by the edge and the cloud side: validity and expiry, the chain to
the configured CA, key file modes, the names a certificate carries."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from kins_tunnel.cloud.expiry import warn_within
from kins_tunnel.doctor.report import FAIL, OK, WARN, Check, said

EXPIRY_WARN_DAYS = 14  # less time left: a warning (see `validity` for renewed certificates)
EXPIRY_FAIL = dt.timedelta(days=1)  # less time left: a failure
MAX_CHAIN = 4  # intermediates followed from a leaf towards the CA


def secret_mode(what: str, path: Path) -> list[Check]:
    """A warning when anyone on the host may read a private key or another secret file (keys are
    written 0600; the Secret volumes in deploy/ use 0440)."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return []  # unreadable keys are the loaders' failures
    if mode & 0o004:
        return [
            Check(
                f"{what} mode",
                WARN,
                f"{path} is readable by every user of this host (mode {mode:04o})",
                f"chmod 600 {path} (or defaultMode: 0440 on its Secret volume)",
            )
        ]
    return []


def validity(
    what: str, cert: x509.Certificate, fix: str, *, renew_at: float | None = None
) -> Check:
    """Valid now and not near its end: within `EXPIRY_WARN_DAYS`, or, for a certificate the edge
    renews itself (`renew_at`: ``enroll.renew_at``), only once that renewal is overdue
    (`cloud.expiry.warn_within`, the rule of the cloud's log and ``/status``)."""
    now = dt.datetime.now(dt.UTC)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    name = f"{what} validity"
    if start > now:
        return Check(
            name,
            FAIL,
            f"not valid before {start:%Y-%m-%dT%H:%M:%SZ}, {ago(start - now)} from now",
            "this node's clock is behind (check NTP), or the certificate was issued with a "
            "clock ahead",
        )
    if end <= now:
        return Check(name, FAIL, f"expired {end:%Y-%m-%dT%H:%M:%SZ}, {ago(now - end)} ago", fix)
    left = end - now
    shown = f"expires {end:%Y-%m-%dT%H:%M:%SZ}, in {ago(left)}"
    if left < EXPIRY_FAIL:
        return Check(name, FAIL, shown + " (less than a day)", fix)
    ceiling = dt.timedelta(days=EXPIRY_WARN_DAYS)
    if renew_at is None:
        if left < ceiling:
            return Check(name, WARN, shown + f" (less than {ago(ceiling)}): renew it soon", fix)
        return Check(name, OK, shown)
    warn = warn_within(end - start, ceiling, renew_at)
    if left < warn:
        return Check(
            name,
            WARN,
            shown + f" (less than {ago(warn)}): its automatic renewal is overdue",
            "see the edge's log and its /status certificate.warning (renewal over the tunnel)",
        )
    return Check(name, OK, shown + f" (renewed automatically from {renew_at:.0%} of its lifetime)")


def ago(delta: dt.timedelta) -> str:
    s = int(delta.total_seconds())
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600}h"
    return f"{s // 3600}h{s % 3600 // 60}m" if s >= 3600 else f"{s // 60}m{s % 60}s"


def chains_to(
    what: str,
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    cas: Sequence[x509.Certificate],
    ca_path: Path,
    *,
    fix: str = "",
) -> Check:
    """Whether `leaf` was signed by a CA of `ca_path`, directly or through the intermediates that
    follow it in its file (issuer names and signatures; validity is `validity`'s line)."""
    name = f"{what} issuer"
    current, pool = leaf, list(intermediates)
    for _ in range(MAX_CHAIN):
        if any(issued_by(current, ca) for ca in cas):
            return Check(name, OK, f"signed by the CA in {ca_path}")
        parent = next((c for c in pool if issued_by(current, c)), None)
        if parent is None:
            break
        pool.remove(parent)
        current = parent
    issuer = current.issuer.rfc4514_string()
    return Check(
        name,
        FAIL,
        f"not signed by the CA in {ca_path} (issued by {said(issuer)})",
        fix or f"issue it with the CA in {ca_path}, or point tls.ca at the CA that issued it",
    )


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """`cert` carries `issuer`'s signature."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def cert_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n) for n in san.get_values_for_type(x509.DNSName)] + [
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    ]
