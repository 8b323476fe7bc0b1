"""The pure parts of `kins-tunnel doctor`: how a report is made and printed, how checks run
(isolated, each within its deadline), clock skew from a probe, certificate validity thresholds,
the enrolment state read from the raw `enroll:` section. The checks against real processes are in
tests/e2e/test_doctor.py."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kins_tunnel.certs import (
    CLIENT_AUTH,
    _issue_leaf,
    _load_ca,
    edge_identity_uri,
    init_ca,
    issue_edge,
)
from kins_tunnel.config import EdgeConfig, edge_config_from_dict
from kins_tunnel.doctor import FAIL, OK, WARN, Check, Report, detect_role
from kins_tunnel.doctor.certificates import chains_to, validity
from kins_tunnel.doctor.cloud_probe import CloudProbe, clock_check
from kins_tunnel.doctor.edge import check_edge_certificate, check_enrolment
from kins_tunnel.doctor.report import known_sections, run_all

ACCEPTED = Check("", OK, "accepted")


def test_a_line_per_check_with_its_fix_and_json_that_parses() -> None:
    report = Report(
        "edge",
        "edge.yaml",
        (Check("config", OK, "loads"), Check("service a:1 -> x:1", FAIL, "refused", "start it")),
    )
    assert report.text().splitlines() == [
        "ok    config: loads",
        "FAIL  service a:1 -> x:1: refused -> start it",
    ]
    assert report.failed
    doc = json.loads(report.json())
    assert doc["ok"] is False and doc["checks"][1] == {
        "check": "service a:1 -> x:1",
        "status": "FAIL",
        "detail": "refused",
        "fix": "start it",
    }
    assert not Report("cloud", "c.yaml", (Check("x", WARN, "w"),)).failed


def test_role_from_the_file_and_sections_this_version_does_not_know() -> None:
    assert detect_role({"cloud": ["a:1"], "services": {}}) == "edge"
    assert detect_role({"tunnel": {}, "tls": {}}) == "cloud"
    assert detect_role({"clod": ["a:1"], "servces": {}, "reconnect": {}}) == "edge"  # typos
    assert detect_role({"enrollment": {}, "tls": {}}) == "cloud"
    assert detect_role({"tls": {}}, "/etc/kins-tunnel/edge.yaml") == "edge"
    assert detect_role({"tls": {}}, "cloud.yaml") == "cloud"
    raw = {"cloud": ["a:1"], "enroll": {"token_file": "t"}}
    stripped = known_sections(raw, "enroll", EdgeConfig)
    assert "enroll" not in stripped and stripped["cloud"] == ["a:1"]
    assert known_sections(raw, "cloud", EdgeConfig) == raw  # a key the config knows stays


async def test_checks_are_isolated_and_bounded(virtual_clock: trio.testing.MockClock) -> None:
    async def fine() -> list[Check]:
        return [Check("fine", OK, "yes")]

    async def broken() -> list[Check]:
        raise RuntimeError("bad\nthing")

    async def hangs() -> list[Check]:
        await trio.sleep_forever()
        raise AssertionError

    start = trio.current_time()
    got = await run_all([("a", hangs), ("b", broken), ("c", fine)], 3.0)
    assert trio.current_time() - start == 3.0  # the hanging check costs its deadline, no more
    assert got == [
        Check("a", FAIL, "no result within 3s", "see the lines above or below"),
        Check("b", FAIL, "the check failed: bad\\x0athing"),  # escaped: one line
        Check("fine", OK, "yes"),
    ]


def probe(cloud_time: float | None, sent: float = 1000.0, received: float = 1000.2) -> CloudProbe:
    return CloudProbe(ACCEPTED, cloud_time, sent, received)


def test_clock_skew_counts_only_what_lies_outside_the_round_trip() -> None:
    inside = clock_check("clock", probe(1000.1))
    assert inside.status == OK and inside.detail == "within 0.200s of the cloud's clock"
    ahead = clock_check("clock", probe(1000.2 + 30))  # the cloud is 30 s ahead of us
    assert ahead.status == WARN
    assert ahead.detail.startswith("this node's clock is 30.0s behind the cloud's")
    behind = clock_check("clock", probe(1000.0 - 400))
    assert behind.status == FAIL and "400.0s ahead of the cloud's" in behind.detail
    assert "NTP" in behind.fix


def test_clock_without_a_stated_time() -> None:
    future = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    proof = clock_check("clock", CloudProbe(Check("", FAIL, "not yet valid"), not_before=future))
    assert proof.status == FAIL and "in this node's future: this clock is behind" in proof.detail
    older = clock_check("clock", probe(None))
    assert older.status == WARN and "does not state its time" in older.detail
    refused = clock_check("clock", CloudProbe(Check("", FAIL, "refused")))
    assert refused.status == WARN and "no HELLO" in refused.detail


def test_validity_thresholds(tmp_path: Path) -> None:
    init_ca(tmp_path)
    now = dt.datetime.now(dt.UTC)

    def cert(node: str, days: int, issued: dt.datetime) -> x509.Certificate:
        crt, _ = issue_edge(tmp_path, "test", node, days=days, _now=issued)
        return x509.load_pem_x509_certificate(crt.read_bytes())

    cases = {
        "fresh": (cert("fresh", 825, now), OK),
        "ten-of-825": (cert("ten-of-825", 825, now - dt.timedelta(days=815)), WARN),
        "ten-of-30": (cert("ten-of-30", 30, now - dt.timedelta(days=20)), OK),  # renewal's time
        "five-of-30": (cert("five-of-30", 30, now - dt.timedelta(days=25)), WARN),  # overdue
        "hours": (cert("hours", 1, now - dt.timedelta(hours=12)), FAIL),
        "expired": (cert("expired", 1, now - dt.timedelta(days=3)), FAIL),
        "future": (cert("future", 30, now + dt.timedelta(days=1)), FAIL),
    }
    for name, (c, want) in cases.items():
        got = validity("edge certificate", c, "renew")
        assert got.status == want, (name, got)
    assert "expired" in validity("x", cases["expired"][0], "").detail
    assert "clock is behind" in validity("x", cases["future"][0], "").fix


def test_enrolment_state(tmp_path: Path) -> None:
    cfg = edge_config_from_dict(
        {
            "cloud": ["127.0.0.1:9000"],
            "tls": {"ca": "ca.crt", "cert": "edge.crt", "key": "edge.key"},
            "services": {"edge1:22": "127.0.0.1:22"},
        },
        base_dir=tmp_path,
    )
    good = {"token_file": "token", "ca_hash": "sha256:" + "0f" * 32}
    assert check_enrolment(None, cfg, tmp_path).status == OK
    missing = check_enrolment(good, cfg, tmp_path)
    assert missing.status == FAIL and missing.detail.startswith("token file missing")
    (tmp_path / "token").write_text("\n")
    assert "is empty" in check_enrolment(good, cfg, tmp_path).detail
    (tmp_path / "token").write_text("abc.def\n")
    will = check_enrolment(good, cfg, tmp_path)
    assert will.status == OK and will.detail.startswith(f"will enrol with token {tmp_path}/token")
    bad_hash = check_enrolment({**good, "ca_hash": "md5:00"}, cfg, tmp_path)
    assert bad_hash.status == FAIL and "enroll.ca_hash" in bad_hash.detail
    (tmp_path / "edge.crt").write_text("present")
    assert check_enrolment(good, cfg, tmp_path).detail.startswith("enrolled (certificate present")
    assert check_enrolment("nonsense", cfg, tmp_path).status == FAIL


def _cert(
    subject: str,
    issuer: x509.Certificate | None,
    key: ec.EllipticCurvePrivateKey,
    signer: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = True,
) -> x509.Certificate:
    """`subject`'s certificate for `key`, signed by `signer` as `issuer` (None: self-signed)."""
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name if issuer is None else issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(signer, hashes.SHA256())
    )


def test_issuer_check_follows_the_intermediates_in_the_certificate_file(tmp_path: Path) -> None:
    keys = {
        n: ec.generate_private_key(ec.SECP256R1()) for n in ("root", "issuing", "leaf", "other")
    }
    root = _cert("root", None, keys["root"], keys["root"])
    other = _cert("root", None, keys["other"], keys["other"])  # same name, another key
    issuing = _cert("issuing", root, keys["issuing"], keys["root"])
    leaf = _cert("leaf", issuing, keys["leaf"], keys["issuing"], ca=False)
    ca = tmp_path / "ca.crt"
    assert chains_to("edge certificate", leaf, [issuing], [root], ca).status == OK
    assert chains_to("edge certificate", issuing, [], [other, root], ca).status == OK
    missing = chains_to("edge certificate", leaf, [], [root], ca)  # the chain was not stored
    assert missing.status == FAIL and "issued by CN=issuing" in missing.detail
    forged = chains_to(
        "edge certificate", leaf, [issuing], [other], ca
    )  # the name alone is not enough
    assert forged.status == FAIL and "issued by CN=root" in forged.detail


def test_an_identity_the_cloud_would_refuse_is_a_failure(tmp_path: Path) -> None:
    init_ca(tmp_path)
    ca_cert, ca_key = _load_ca(tmp_path)
    crt, key = tmp_path / "edge.crt", tmp_path / "edge.key"
    uri = edge_identity_uri("test", "other-svc-kins")  # reads as unit "other"'s K3s service
    _issue_leaf(
        ca_cert,
        ca_key,
        crt,
        key,
        now=dt.datetime.now(dt.UTC),
        days=30,
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other-svc-kins")]),
        sans=[x509.UniformResourceIdentifier(uri)],
        usages=[CLIENT_AUTH],
    )
    cfg = edge_config_from_dict(
        {
            "cloud": ["127.0.0.1:9000"],
            "tls": {"ca": "ca.crt", "cert": "edge.crt", "key": "edge.key"},
            "services": {"edge1:22": "127.0.0.1:22"},
        },
        base_dir=tmp_path,
    )
    checks = {c.check: c for c in check_edge_certificate(cfg, enrolling=False)}
    assert checks["edge certificate validity"].status == OK
    assert checks["edge certificate issuer"].status == OK
    identity = checks["edge identity"]
    assert identity.status == FAIL and "is reserved" in identity.detail, identity
