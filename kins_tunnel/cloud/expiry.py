"""Certificate expiry: the cloud's own certificates and those of the edges connected to it.

- Metric ``kins_tunnel_certificate_expiry_seconds{cert, unit, node, serial}``: seconds until the
  certificate's notAfter (negative once expired). ``cert`` is ``cloud`` (``tls.cert``),
  ``proxy`` (``proxy.tls.cert``, when it is a file of its own) or ``edge`` (one series per
  connected edge certificate, with its unit and node). Computed at scrape time.
- A warning is logged when a certificate is within `WARN_WITHIN` (30 days) of expiry; an edge
  certificate from the issuing CA (renewed automatically), within a quarter of its lifetime if
  that is less (`warn_within`: a 30-day one is renewed when a third is left, so only one whose
  renewal failed is flagged): for an edge when
  it connects, and for every certificate by the periodic check (`run`), at most once a day per
  certificate.
- `status_entries()` feeds `/status` and ``kins-tunnel status``.

The cloud's certificate files are re-read when they change (rotation), off the event loop.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import trio
from cryptography import x509
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kins_tunnel.certs.identity import CertFacts
from kins_tunnel.filewatch import WatchedFile

log = logging.getLogger("kins_tunnel.certs")
WARN_WITHIN = dt.timedelta(days=30)
WARN_EVERY = 86400.0  # seconds between two warnings about the same certificate


@dataclass(frozen=True, slots=True)
class FileCert:
    serial: int
    not_after: dt.datetime


def parse_cert_file(data: bytes) -> FileCert:
    """Serial and expiry of the first certificate of a PEM file; `ValueError` if there is none."""
    try:
        cert = x509.load_pem_x509_certificates(data)[0]
    except (ValueError, IndexError):
        raise ValueError("not a PEM certificate") from None
    return FileCert(cert.serial_number, cert.not_valid_after_utc)


RENEWAL_WARN_SHARE = 0.25  # of a renewed certificate's lifetime: the edge renews with a third left


def warn_within(
    lifetime: dt.timedelta | None,
    within: dt.timedelta = WARN_WITHIN,
    renew_at: float | None = None,
) -> dt.timedelta:
    """How close to its expiry a certificate is flagged: `within`; one renewed automatically
    (`lifetime` given: an edge certificate from the issuing CA) only once its renewal is overdue,
    with less than a quarter of its lifetime left, or less than the edge's ``enroll.renew_at``
    leaves if that is later (known to ``kins-tunnel doctor``, not to the cloud). One rule for the
    cloud's log, ``/status`` and ``kins-tunnel doctor``."""
    if lifetime is None:
        return within
    share = RENEWAL_WARN_SHARE if renew_at is None else min(RENEWAL_WARN_SHARE, 1 - renew_at)
    return min(within, lifetime * share)


def _renewal_lifetime(facts: CertFacts) -> dt.timedelta | None:
    return facts.lifetime if facts.renewed_automatically else None


EdgeCerts = Callable[[], Iterable[tuple[str, str, CertFacts]]]  # (unit, node, facts) per tunnel


class CertificateExpiry:
    def __init__(
        self, files: dict[str, Path], edges: EdgeCerts, clock: Callable[[], float] = time.time
    ) -> None:
        self._files = {
            role: WatchedFile(path, parse_cert_file, f"{role} certificate")
            for role, path in files.items()
        }
        self._edges = edges
        self._clock = clock
        self._warned: dict[tuple[str, str, str, int], float] = {}

    def _seconds_left(self, not_after: dt.datetime) -> float:
        return not_after.timestamp() - self._clock()

    def series(self) -> list[tuple[str, str, str, int, dt.datetime]]:
        """(cert, unit, node, serial, not_after) of every certificate, without duplicates."""
        out = {(role, "", "", w.value.serial): w.value.not_after for role, w in self._files.items()}
        for unit, node, facts in self._edges():
            out[("edge", unit, node, facts.serial)] = facts.not_after
        return [(*key, not_after) for key, not_after in sorted(out.items())]

    def status_entries(self) -> list[dict[str, object]]:
        return [
            {
                "cert": role,
                "serial": f"{serial:x}",
                "not_after": _iso(na),
                "expiry_seconds": round(self._seconds_left(na)),
            }
            for role, unit, node, serial, na in self.series()
            if role != "edge"
        ]

    def edge_status(self, facts: CertFacts) -> dict[str, object]:
        return {
            "cert_serial": facts.serial_hex,
            "cert_not_after": _iso(facts.not_after),
            "cert_expiry_seconds": round(self._seconds_left(facts.not_after)),
            "cert_warn_seconds": round(warn_within(_renewal_lifetime(facts)).total_seconds()),
        }

    def warn_if_expiring(
        self,
        role: str,
        unit: str,
        node: str,
        serial: int,
        not_after: dt.datetime,
        lifetime: dt.timedelta | None = None,
    ) -> bool:
        """Log a warning if this certificate is within `warn_within` of expiry (once a day);
        True if so."""
        left = self._seconds_left(not_after)
        if left > warn_within(lifetime).total_seconds():
            return False
        key = (role, unit, node, serial)
        now = self._clock()
        if now - self._warned.get(key, -WARN_EVERY) < WARN_EVERY:
            return True
        self._warned[key] = now
        what = "has expired" if left <= 0 else f"expires in {left / 86400:.1f} days"
        extra = {"cert": role, "serial": f"{serial:x}", "not_after": _iso(not_after)}
        if unit:
            extra.update(unit=unit, node=node)
        log.warning("%s certificate %s", role, what, extra=extra)
        return True

    def check_all(self) -> None:
        lifetimes = {("edge", u, n, f.serial): _renewal_lifetime(f) for u, n, f in self._edges()}
        for role, unit, node, serial, not_after in self.series():
            lifetime = lifetimes.get((role, unit, node, serial))
            self.warn_if_expiring(role, unit, node, serial, not_after, lifetime)
        live = {(r, u, n, s) for r, u, n, s, _ in self.series()}
        self._warned = {k: v for k, v in self._warned.items() if k in live}

    async def run(self, interval: float = 3600.0, file_interval: float = 60.0) -> None:
        """Re-read changed certificate files every `file_interval` s; warn every `interval` s."""
        self.check_all()
        next_warn = trio.current_time() + interval
        while True:
            await trio.sleep(min(file_interval, interval))
            for watched in self._files.values():
                await watched.check()
            if trio.current_time() >= next_warn:
                self.check_all()
                next_warn = trio.current_time() + interval

    def collector(self) -> Collector:
        return _ExpiryCollector(self)


class _ExpiryCollector(Collector):
    def __init__(self, expiry: CertificateExpiry) -> None:
        self._expiry = expiry

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily(
            "kins_tunnel_certificate_expiry_seconds",
            "Seconds until the certificate expires (negative: expired)",
            labels=["cert", "unit", "node", "serial"],
        )
        for role, unit, node, serial, not_after in self._expiry.series():
            g.add_metric([role, unit, node, f"{serial:x}"], self._expiry._seconds_left(not_after))
        yield g


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
