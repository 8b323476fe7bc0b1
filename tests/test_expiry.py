"""Certificate expiry: metric series, status entries, the 30-day warning, rotation of the files."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client import CollectorRegistry, generate_latest

from kins_tunnel.certs.directory import init_ca, issue_edge
from kins_tunnel.certs.identity import CertFacts, EdgeIdentity, cert_facts
from kins_tunnel.certs.issuing import load_issuing_ca, sign_edge_csr
from kins_tunnel.cloud.expiry import CertificateExpiry, parse_cert_file
from kins_tunnel.testing.support import wait_until


def facts_of(crt: Path) -> CertFacts:
    return cert_facts(x509.load_pem_x509_certificate(crt.read_bytes()).public_bytes(Encoding.DER))


def test_series_metric_and_status(tmp_path: Path) -> None:
    init_ca(tmp_path, cloud_days=400)
    crt, _ = issue_edge(tmp_path, "test", "edge1", days=10)
    edge = facts_of(crt)
    cloud = parse_cert_file((tmp_path / "cloud.crt").read_bytes())
    now = dt.datetime.now(dt.UTC).timestamp()
    # the same edge certificate on two tunnels is one series
    expiry = CertificateExpiry(
        {"cloud": tmp_path / "cloud.crt"},
        lambda: [("test", "edge1", edge), ("test", "edge1", edge)],
        clock=lambda: now,
    )
    registry = CollectorRegistry()
    registry.register(expiry.collector())
    text = generate_latest(registry).decode()
    lines = [
        ln for ln in text.splitlines() if ln.startswith("kins_tunnel_certificate_expiry_seconds{")
    ]
    assert len(lines) == 2, text
    edge_line = next(ln for ln in lines if 'cert="edge"' in ln)
    assert (
        'unit="test"' in edge_line
        and 'node="edge1"' in edge_line
        and f'serial="{edge.serial:x}"' in edge_line
    )
    left = float(edge_line.rsplit(" ", 1)[1])
    assert 10 * 86400 - 400 < left <= 10 * 86400 + 400  # issued 5 min back-dated, valid 10 days
    cloud_line = next(ln for ln in lines if 'cert="cloud"' in ln)
    assert abs(float(cloud_line.rsplit(" ", 1)[1]) - (cloud.not_after.timestamp() - now)) < 1
    (entry,) = expiry.status_entries()
    assert entry["cert"] == "cloud" and entry["serial"] == f"{cloud.serial:x}"
    assert 399 * 86400 < int(entry["expiry_seconds"]) <= 400 * 86400  # type: ignore[call-overload]
    assert expiry.edge_status(edge)["cert_not_after"] == edge.not_after.strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )


def test_warning_within_30_days_once_a_day(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    init_ca(tmp_path)
    soon = facts_of(issue_edge(tmp_path, "test", "edge1", days=20)[0])
    later = facts_of(issue_edge(tmp_path, "test", "edge2", days=60)[0])
    clock = [dt.datetime.now(dt.UTC).timestamp()]
    expiry = CertificateExpiry(
        {}, lambda: [("test", "edge1", soon), ("test", "edge2", later)], clock=lambda: clock[0]
    )
    with caplog.at_level(logging.WARNING, logger="kins_tunnel.certs"):
        expiry.check_all()
        expiry.check_all()  # the same day: no second warning
        clock[0] += 86401
        expiry.check_all()
        clock[0] += 70 * 86400  # both expired now
        expiry.check_all()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [(r.node, r.getMessage()[:40]) for r in warnings[:2]] == [  # type: ignore[attr-defined]
        ("edge1", "edge certificate expires in 20.0 days"),
        ("edge1", "edge certificate expires in 19.0 days"),
    ]
    assert {r.node for r in warnings[2:]} == {"edge1", "edge2"}  # type: ignore[attr-defined]
    assert all("has expired" in r.getMessage() for r in warnings[2:])


async def test_rotated_cloud_certificate_is_picked_up(tmp_path: Path) -> None:
    init_ca(tmp_path, cloud_days=100)
    expiry = CertificateExpiry({"cloud": tmp_path / "cloud.crt"}, lambda: [])
    first = expiry.series()[0][3]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(expiry.run, 3600.0, 0.01)
        init_ca(tmp_path, cloud_days=800)  # re-issues cloud.crt (renamed over the old file)
        await wait_until(lambda: expiry.series()[0][3] != first, 10, "the expiry series changes")
        nursery.cancel_scope.cancel()
    left = int(expiry.status_entries()[0]["expiry_seconds"])  # type: ignore[call-overload]
    assert left > 700 * 86400


def test_parse_cert_file_rejects_non_pem() -> None:
    with pytest.raises(ValueError, match="not a PEM certificate"):
        parse_cert_file(b"hello")


def test_renewed_certificates_are_flagged_within_a_quarter_of_their_lifetime(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An edge certificate from the issuing CA (30 days, renewed after 20) is not flagged when it
    is fresh, only once less than a quarter of its lifetime is left (its renewal failed)."""
    init_ca(tmp_path, issuing_ca=True)
    issuing = load_issuing_ca(tmp_path / "issuing.crt", tmp_path / "issuing.key")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = sign_edge_csr(
        issuing, key.public_key(), EdgeIdentity("test", "edge1"), dt.timedelta(days=30)
    )
    facts = dataclasses.replace(
        cert_facts(cert.public_bytes(Encoding.DER)), renewed_automatically=True
    )
    assert facts.authority_key_id == issuing.key_id
    clock = [dt.datetime.now(dt.UTC).timestamp()]
    expiry = CertificateExpiry({}, lambda: [("test", "edge1", facts)], clock=lambda: clock[0])
    with caplog.at_level(logging.WARNING, logger="kins_tunnel.certs"):
        expiry.check_all()
        assert not caplog.records
        assert expiry.edge_status(facts)["cert_warn_seconds"] == round(30 * 86400 / 4 + 75)
        clock[0] += 23 * 86400  # 7 days left: its renewal (due after 20 days) did not happen
        expiry.check_all()
    assert [r.getMessage()[:37] for r in caplog.records] == ["edge certificate expires in 7.0 days"]
