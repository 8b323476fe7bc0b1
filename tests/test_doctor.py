"""The pure parts of `kins-tunnel doctor`: how a report is made and printed, how checks run
(isolated, each within its deadline), clock skew from a probe, certificate validity thresholds,
the enrolment line from the loaded `enroll`, the `enrollment` checks of a cloud config. The checks against real processes are in
tests/e2e/test_doctor.py."""

from __future__ import annotations

import datetime as dt
import json
import socket
from pathlib import Path

import trio
import trio.testing
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import NameOID

from kins_tunnel.certs.directory import init_ca, issue_edge
from kins_tunnel.certs.identity import edge_identity_uri
from kins_tunnel.certs.signing import CLIENT_AUTH, Leaf, issue_leaf, load_ca, named
from kins_tunnel.cloud.expiry import warn_within
from kins_tunnel.config import cloud_config_from_dict, edge_config_from_dict
from kins_tunnel.config_enroll import EnrollmentSettings
from kins_tunnel.doctor import FAIL, OK, WARN, Check, Report, detect_role, run_doctor
from kins_tunnel.doctor.certificates import chains_to, validity
from kins_tunnel.doctor.cloud import check_enrollment
from kins_tunnel.doctor.cloud_probe import CloudProbe, clock_check
from kins_tunnel.doctor.edge import check_edge_certificate, check_enrolment
from kins_tunnel.doctor.report import run_all
from kins_tunnel.edge.credentials import enrollment_state
from kins_tunnel.tokens import create_token
from tests.e2e.harness import cloud_dict

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


def test_role_from_the_file() -> None:
    assert detect_role({"cloud": ["a:1"], "services": {}}) == "edge"
    assert detect_role({"tunnel": {}, "tls": {}}) == "cloud"
    assert detect_role({"clod": ["a:1"], "servces": {}, "reconnect": {}}) == "edge"  # typos
    assert detect_role({"enrollment": {}, "tls": {}}) == "cloud"
    assert detect_role({"enroll": {}, "tls": {}}) == "edge"
    assert detect_role({"tls": {}}, "/etc/kins-tunnel/edge.yaml") == "edge"
    assert detect_role({"tls": {}}, "cloud.yaml") == "cloud"


def lines(report: Report) -> dict[str, Check]:
    return {c.check: c for c in report.checks}


async def test_enroll_is_loaded_and_checked_with_the_config(tmp_path: Path) -> None:
    """`enroll:` goes through the config loader (a bad ca_hash is the loader's error naming the
    key) and the enrolment line is the edge's own `enrollment_state`."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused at once
    port = closed.getsockname()[1]
    doc = {
        "cloud": [f"127.0.0.1:{port}"],
        "tls": {"ca": "ca.crt", "cert": "node/tls.crt", "key": "node/tls.key"},
        "services": {"edge1:22": f"127.0.0.1:{port}"},
        "admin": None,
        "enroll": {"token_file": "token", "ca_hash": "sha256:" + "0F" * 32},
    }
    path = tmp_path / "edge.yaml"
    with closed:
        path.write_text(yaml.safe_dump(doc))
        report = await run_doctor(str(path), timeout=2.0)
        got = lines(report)
        assert report.role == "edge" and got["config"].status == OK, report.text()
        assert got["enrolment"].status == FAIL
        assert got["enrolment"].detail.startswith(
            f"token file missing: enroll.token_file {tmp_path}/token"
        )

        (tmp_path / "token").write_text("abcdef.0123456789abcdef\n")
        (tmp_path / "token").chmod(0o600)
        report = await run_doctor(str(path), timeout=2.0)
        got = lines(report)
        assert got["enrolment"] == Check(
            "enrolment", OK, f"will enrol with token abcdef from {tmp_path}/token (ca_hash pinned)"
        )
        assert "enroll.token_file mode" not in got
        assert got["edge certificate"].detail.startswith("none usable yet")
        assert got[f"cloud 127.0.0.1:{port} reachable"].status == FAIL  # the rest goes on

        (tmp_path / "token").chmod(0o644)
        got = lines(await run_doctor(str(path), timeout=2.0))
        assert got["enroll.token_file mode"].status == WARN

        path.write_text(
            yaml.safe_dump({**doc, "enroll": {"token_file": "token", "ca_hash": "md5:00"}})
        )
        report = await run_doctor(str(path), timeout=2.0)
        assert [c.check for c in report.checks] == ["config"]  # nothing to check with
        assert report.failed and "enroll.ca_hash" in report.checks[0].detail


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
        "ten-of-30": (cert("ten-of-30", 30, now - dt.timedelta(days=20)), WARN),  # not renewed
        "hours": (cert("hours", 1, now - dt.timedelta(hours=12)), FAIL),
        "expired": (cert("expired", 1, now - dt.timedelta(days=3)), FAIL),
        "future": (cert("future", 30, now + dt.timedelta(days=1)), FAIL),
    }
    for name, (c, want) in cases.items():
        got = validity("edge certificate", c, "renew")
        assert got.status == want, (name, got)
    assert "expired" in validity("x", cases["expired"][0], "").detail
    assert "clock is behind" in validity("x", cases["future"][0], "").fix

    # a certificate the edge renews itself (enroll): flagged only once that renewal is overdue,
    # by the rule of the cloud's log and /status (a quarter of its lifetime, at most 14 days)
    ten, five = cases["ten-of-30"][0], cert("five-of-30", 30, now - dt.timedelta(days=25))
    assert validity("x", ten, "", renew_at=2 / 3).status == OK  # renewal due, not overdue
    overdue = validity("x", five, "", renew_at=2 / 3)
    assert overdue.status == WARN and "automatic renewal is overdue" in overdue.detail
    # an edge that renews later (renew_at 0.9: with three days left) is not overdue at five
    assert validity("x", five, "", renew_at=0.9).status == OK
    long = cases["ten-of-825"][0]  # a quarter of 825 days is more than the 14-day ceiling
    assert validity("x", long, "", renew_at=2 / 3).status == WARN
    day = dt.timedelta(days=1)
    assert warn_within(30 * day) == 7.5 * day  # the cloud's call: the same rule
    assert warn_within(30 * day, 14 * day, 0.9) == 3 * day
    assert warn_within(None, 14 * day, 0.9) == 14 * day


def test_enrolment_line_is_the_edges_own_state(tmp_path: Path) -> None:
    base = {
        "cloud": ["127.0.0.1:9000"],
        "tls": {"ca": "ca.crt", "cert": "edge.crt", "key": "edge.key"},
        "services": {"edge1:22": "127.0.0.1:22"},
    }
    plain = edge_config_from_dict(base, base_dir=tmp_path)
    assert check_enrolment(plain).detail.startswith("not configured")
    enroll = {"token_file": "token", "ca_hash": "sha256:" + "0f" * 32}
    cfg = edge_config_from_dict({**base, "enroll": enroll}, base_dir=tmp_path)
    (tmp_path / "token").write_text("not a token\n")
    bad = check_enrolment(cfg)
    assert bad.status == FAIL and "does not hold a token" in bad.detail
    assert "token create" in bad.fix
    init_ca(tmp_path / "certs")
    crt, key = issue_edge(tmp_path / "certs", "test", "edge1")
    (tmp_path / "edge.crt").write_bytes(crt.read_bytes())
    (tmp_path / "edge.key").write_bytes(key.read_bytes())
    ok, state = enrollment_state(cfg)
    assert ok and check_enrolment(cfg) == Check("enrolment", OK, state)
    assert state.startswith("enrolled (cert present, unit test, node edge1, expires ")


def test_enrollment_of_a_cloud_config(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    init_ca(certs, issuing_ca=True)
    tokens = tmp_path / "tokens.yaml"

    def settings(**ca: str) -> EnrollmentSettings:
        files = {"cert": str(certs / "issuing.crt"), "key": str(certs / "issuing.key"), **ca}
        doc = cloud_dict(certs, enrollment={"tokens_file": str(tokens), "ca": files})
        cfg = cloud_config_from_dict(doc, base_dir=tmp_path).enrollment
        assert cfg is not None
        return cfg

    def check(s: EnrollmentSettings) -> dict[str, Check]:
        return {c.check: c for c in check_enrollment(s, certs / "ca.crt")}

    missing = check(settings())["enrollment.tokens_file"]
    assert missing.status == FAIL and "cannot read" in missing.detail  # the cloud would not start
    create_token(tokens, "test", "edge1", dt.timedelta(hours=1), 1)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    create_token(tokens, "test", None, dt.timedelta(hours=1), 1, now=past)  # expired
    good = check(settings())
    assert [c.status for c in good.values()] == [OK, OK, OK], good
    assert list(good) == ["enrollment.tokens_file", "enrollment.ca", "enrollment.ca validity"]
    detail = good["enrollment.tokens_file"].detail
    assert "tokens: 2, unexpired with uses left: 1 (uses counted in the file)" in detail

    tokens.write_text("tokens:\n  abcdef: {unit: test}\n")
    broken = check(settings())["enrollment.tokens_file"]
    assert broken.status == FAIL and "token abcdef" in broken.detail, broken

    tokens.write_text("")
    other = tmp_path / "other"
    init_ca(other, issuing_ca=True)
    wrong_key = check(settings(key=str(other / "issuing.key")))["enrollment.ca"]
    assert wrong_key.status == FAIL and "does not belong to" in wrong_key.detail
    foreign = check(settings(cert=str(other / "issuing.crt"), key=str(other / "issuing.key")))
    assert "not signed by a CA in tls.ca" in foreign["enrollment.ca"].detail
    not_ca = check(settings(cert=str(certs / "cloud.crt"), key=str(certs / "cloud.key")))
    assert "is not a CA certificate" in not_ca["enrollment.ca"].detail

    # an intermediate without path length 0 works, but its key could make further CAs
    root, root_key = load_ca(certs)
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "loose.crt").write_bytes(
        _cert("loose", root, key, root_key).public_bytes(Encoding.PEM)
    )
    (tmp_path / "loose.key").write_bytes(
        key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    )
    (tmp_path / "loose.key").chmod(0o644)
    loose = check(settings(cert=str(tmp_path / "loose.crt"), key=str(tmp_path / "loose.key")))
    assert loose["enrollment.ca"].status == OK
    assert loose["enrollment.ca path length"].status == WARN
    assert loose["enrollment.ca path length"].detail.startswith("unlimited")
    assert loose["enrollment.ca.key mode"].status == WARN

    doc = cloud_dict(certs, enrollment={"tokens_file": str(tokens)})
    bare = cloud_config_from_dict(doc, base_dir=tmp_path).enrollment
    assert bare is not None
    no_ca = check(bare)["enrollment.ca"]
    assert no_ca.status == WARN and "no_issuing_ca" in no_ca.detail


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
    uri = edge_identity_uri("test", "other-svc-kins")  # reads as unit "other"'s K3s service
    leaf = Leaf(named("other-svc-kins"), [x509.UniformResourceIdentifier(uri)], [CLIENT_AUTH])
    crt, key = issue_leaf(load_ca(tmp_path), tmp_path / "edge", leaf, dt.datetime.now(dt.UTC), 30)
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
