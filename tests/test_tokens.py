"""Enrolment tokens: the CLI (`token create/list/delete`), the strict tokens file, the cloud's
check and use counting (in the file, or in memory when the file is read-only), the per-source
limit of failed tokens, and the issuing CA behind `certs init --issuing-ca`."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kins_tunnel.certs.directory import init_ca
from kins_tunnel.certs.identity import EdgeIdentity
from kins_tunnel.certs.issuing import (
    ca_hash_of_file,
    csr_public_key,
    edge_csr,
    load_issuing_ca,
    sign_edge_csr,
)
from kins_tunnel.cloud.enroll import RateLimit
from kins_tunnel.config import cloud_config_from_dict, edge_config_from_dict
from kins_tunnel.edge.credentials import enrollment_state
from kins_tunnel.errors import UserError
from kins_tunnel.tokens import (
    TOKEN_RE,
    TokenRefused,
    TokenStore,
    create_token,
    parse_duration,
    parse_tokens,
    read_tokens,
)


def kt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kins_tunnel", *args], capture_output=True, text=True, timeout=60
    )


def test_token_cli_create_list_delete(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    r = kt("token", "create", "--tokens-file", str(tokens), "--unit", "test", "--node", "edge1")
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert r.stdout == token + "\n" and TOKEN_RE.fullmatch(token)  # the token alone on stdout
    token_id, secret = token.split(".")
    assert tokens.stat().st_mode & 0o777 == 0o600
    assert secret not in tokens.read_text()  # only its hash is kept
    assert hashlib.sha256(secret.encode()).hexdigest() in tokens.read_text()
    r = kt("token", "create", "--tokens-file", str(tokens), "--unit", "test", "--ttl", "30m",
           "--uses", "5")  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = kt("token", "list", "--tokens-file", str(tokens))
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["ID", "UNIT", "NODE", "EXPIRES", "USES", "STATE"]
    assert any(line.split()[:3] == [token_id, "test", "edge1"] for line in lines)
    assert any(line.split()[2:3] == ["*"] and line.split()[4] == "5" for line in lines)
    assert secret not in r.stdout
    r = kt("token", "delete", "--tokens-file", str(tokens), token_id)
    assert r.returncode == 0 and token_id not in read_tokens(tokens)
    r = kt("token", "delete", "--tokens-file", str(tokens), token_id)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no token" in r.stderr
    for bad in (["--ttl", "soon"], ["--uses", "0"], ["--node", "x-svc-kins"], ["--unit", "A_B"]):
        args = ["--unit", "test", *bad] if bad[0] != "--unit" else bad
        r = kt("token", "create", "--tokens-file", str(tokens), *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (bad, r.stderr)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800), ("1h30m", 5400)],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "24", "h", "-1h", "0s", "1h 2m", "1w"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(UserError, match="--ttl"):
        parse_duration(text)


GOOD = "secret_sha256: " + "a" * 64 + "\n    unit: test\n    expires: '2030-01-01T00:00:00Z'\n"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("tokens:\n  abcdef:\n    " + GOOD + "    uses: 1\n    extra: 1\n", "abcdef: extra: unknown key"),
        ("tokens:\n  abcdef:\n    " + GOOD, "abcdef: uses: required key is missing"),
        ("tokens:\n  abcdef:\n    " + GOOD + "    uses: -1\n", "uses: expected an integer"),
        ("tokens:\n  abcdef:\n    " + GOOD + "    uses: true\n", "uses: expected an integer"),
        ("tokens:\n  ABC:\n    " + GOOD + "    uses: 1\n", "is not a token id"),
        ("tokens:\n  abcdef:\n    " + GOOD.replace("a" * 64, "xyz") + "    uses: 1\n", "secret_sha256"),
        ("tokens:\n  abcdef:\n    " + GOOD.replace("2030-01-01T00:00:00Z", "soon") + "    uses: 1\n", "expires"),
        ("tokens:\n  abcdef:\n    " + GOOD.replace("unit: test", "unit: Test") + "    uses: 1\n", "unit"),
        ("tokens:\n  abcdef:\n    " + GOOD + "    uses: 1\n    node: a-svc-kins\n", "reserved"),
        ("tokens:\n  abcdef: {}\n  abcdef: {}\n", "duplicate key"),
        ("other: 1\n", "the one key 'tokens'"),
    ],
)  # fmt: skip
def test_tokens_file_is_strict(body: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_tokens(body.encode())


def test_a_tokens_file_error_never_shows_a_secret(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    token = create_token(tokens, "test", None, dt.timedelta(hours=1), 1)
    tokens.write_text(tokens.read_text().replace("uses: 1", "uses: many"))
    with pytest.raises(UserError) as info:
        read_tokens(tokens)
    assert token.split(".")[1] not in str(info.value) and "uses" in str(info.value)


async def test_store_checks_and_counts_uses_in_the_file(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    token = create_token(tokens, "test", "edge1", dt.timedelta(hours=1), 2)
    store = TokenStore(tokens)
    assert store.write_back
    entry = store.check(token)
    assert (entry.unit, entry.node, entry.uses) == ("test", "edge1", 2)
    await store.consume(entry)
    assert read_tokens(tokens)[entry.id].uses == 1 and store.check(token).uses == 1
    await store.consume(store.check(token))
    with pytest.raises(TokenRefused) as info:
        store.check(token)
    assert info.value.reason == "used_token"
    with pytest.raises(TokenRefused, match="unknown token") as info:
        store.check(token[:7] + "x" * 16)  # the right id with a wrong secret
    assert info.value.reason == "unknown_token"
    with pytest.raises(TokenRefused) as info:
        store.check("not a token")
    assert info.value.reason == "bad_token"
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    fresh = create_token(tokens, "test", None, dt.timedelta(hours=1), 1)
    await store.file.check()
    with pytest.raises(TokenRefused) as info:
        store.check(fresh, now=later)
    assert info.value.reason == "expired_token"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files anyway")
async def test_store_counts_in_memory_when_the_file_is_read_only(tmp_path: Path) -> None:
    await _read_only_case(tmp_path)


async def test_store_counts_in_memory_on_a_read_only_mount(tmp_path: Path) -> None:
    """As with a Secret volume: the file cannot be written (here: write_back decided so)."""
    await _read_only_case(tmp_path, force=True)


async def _read_only_case(tmp_path: Path, force: bool = False) -> None:
    tokens = tmp_path / "tokens.yaml"
    token = create_token(tokens, "test", None, dt.timedelta(hours=1), 2)
    tokens.chmod(0o400)
    store = TokenStore(tokens)
    if force:
        store.write_back = False
    assert not store.write_back
    before = tokens.read_bytes()
    await store.consume(store.check(token))
    await store.consume(store.check(token))
    with pytest.raises(TokenRefused, match="no uses left"):
        store.check(token)
    assert tokens.read_bytes() == before


async def test_concurrent_uses_never_exceed_the_count(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    token = create_token(tokens, "test", None, dt.timedelta(hours=1), 3)
    store = TokenStore(tokens)
    entry = store.check(token)
    results: list[str] = []

    async def use() -> None:
        try:
            await store.consume(entry)
            results.append("ok")
        except TokenRefused as exc:
            results.append(exc.reason)

    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(use)
    assert sorted(results) == ["ok"] * 3 + ["used_token"] * 3
    assert read_tokens(tokens)[entry.id].uses == 0


def test_rate_limit_per_key() -> None:
    now = [0.0]
    limit = RateLimit(3, max_keys=2, clock=lambda: now[0])
    for _ in range(3):
        assert limit.retry_after("10.0.0.1") is None
        limit.take("10.0.0.1")
    wait = limit.retry_after("10.0.0.1")
    assert wait is not None and 19 < wait <= 20
    assert limit.retry_after("10.0.0.2") is None  # another address is not held back
    now[0] += 20
    assert limit.retry_after("10.0.0.1") is None  # refilled: one more try
    limit.take("10.0.0.2")
    limit.take("10.0.0.3")  # a third address: the least recently seen is forgotten
    assert len(limit._buckets) == 2
    hourly = RateLimit(6, 3600.0, clock=lambda: now[0])  # renewals: 6 an hour, one per 10 min
    for _ in range(6):
        hourly.take("test/edge1")
    wait = hourly.retry_after("test/edge1")
    assert wait is not None and 599 < wait <= 600


def test_issuing_ca_is_constrained_to_edge_identities(tmp_path: Path) -> None:
    init_ca(tmp_path, issuing_ca=True)
    root = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    issuing = load_issuing_ca(tmp_path / "issuing.crt", tmp_path / "issuing.key")
    ext = issuing.cert.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 1
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    nc = ext.get_extension_for_class(x509.NameConstraints)
    assert nc.critical and nc.value.permitted_subtrees == [
        x509.UniformResourceIdentifier("kins-tunnel")
    ]
    issuing.cert.verify_directly_issued_by(root)
    assert (tmp_path / "issuing.key").stat().st_mode & 0o777 == 0o600
    # openssl agrees: the CA hash is the SHA-256 of the public key (as kubeadm's)
    der = root.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert ca_hash_of_file(tmp_path / "ca.crt") == "sha256:" + hashlib.sha256(der).hexdigest()
    # a leaf it signs chains with openssl, through the intermediate
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = sign_edge_csr(
        issuing, key.public_key(), EdgeIdentity("test", "edge1"), dt.timedelta(days=1)
    )
    (tmp_path / "leaf.crt").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    r = subprocess.run(
        ["openssl", "verify", "-x509_strict", "-purpose", "sslclient", "-CAfile",
         str(tmp_path / "ca.crt"), "-untrusted", str(tmp_path / "issuing.crt"),
         str(tmp_path / "leaf.crt")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    # ... but never as a server: nothing from the issuing CA can pose as the cloud
    r = subprocess.run(
        ["openssl", "verify", "-purpose", "sslserver", "-CAfile", str(tmp_path / "ca.crt"),
         "-untrusted", str(tmp_path / "issuing.crt"), str(tmp_path / "leaf.crt")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode != 0
    # running init again keeps the issuing CA
    before = (tmp_path / "issuing.crt").read_bytes()
    init_ca(tmp_path, issuing_ca=True)
    assert (tmp_path / "issuing.crt").read_bytes() == before


def test_an_old_ca_of_path_length_0_cannot_get_an_issuing_ca(tmp_path: Path) -> None:
    init_ca(tmp_path)
    with pytest.raises(UserError, match="path length 0"):
        init_ca(tmp_path, issuing_ca=True)
    assert not (tmp_path / "issuing.crt").exists()


def test_csr_checks() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = edge_csr(key, "edge1")
    assert csr_public_key(pem, "edge1") == key.public_key()
    assert csr_public_key(edge_csr(key, None), "edge1") == key.public_key()
    with pytest.raises(ValueError, match="names node 'edge1', not 'edge2'"):
        csr_public_key(pem, "edge2")
    with pytest.raises(ValueError, match="not a PEM certificate request"):
        csr_public_key(b"garbage", "edge1")
    with pytest.raises(ValueError, match="P-256"):
        csr_public_key(edge_csr(ec.generate_private_key(ec.SECP384R1()), "edge1"), "edge1")


def test_config_keys_and_their_errors(tmp_path: Path) -> None:
    edge = {
        "cloud": ["c:9000"],
        "tls": {"ca": "ca.crt", "cert": "tls.crt", "key": "tls.key"},
        "services": {"edge1:22": "127.0.0.1:22"},
    }
    ok = {"token_file": "token", "ca_hash": "sha256:" + "ab" * 32}
    cfg = edge_config_from_dict({**edge, "enroll": ok}, base_dir=tmp_path)
    assert cfg.enroll is not None and cfg.enroll.token_file == tmp_path / "token"
    assert cfg.enroll.renew_at == pytest.approx(2 / 3) and cfg.enroll.node is None
    for bad, where in (
        ({"ca_hash": "ab" * 32}, "enroll.ca_hash"),
        ({"node": "Edge_1"}, "enroll.node"),
        ({"renew_at": 1.5}, "enroll.renew_at"),
        ({"tokenfile": "x"}, "enroll.tokenfile: unknown key"),
    ):
        with pytest.raises(UserError, match=where):
            edge_config_from_dict({**edge, "enroll": {**ok, **bad}}, base_dir=tmp_path)
    cloud = {"tls": {"ca": "ca.crt", "cert": "c.crt", "key": "c.key"}}
    cfg2 = cloud_config_from_dict(
        {**cloud, "enrollment": {"tokens_file": "t.yaml", "lifetime_days": 0.5}}, base_dir=tmp_path
    )
    assert cfg2.enrollment is not None and cfg2.enrollment.ca is None
    bad_cloud: tuple[tuple[dict[str, object], str], ...] = (
        ({"lifetime_days": 0.00001}, "enrollment.lifetime_days: must be between"),
        ({"lifetime_days": 900}, "enrollment.lifetime_days"),
        ({"ca": {"cert": "i.crt"}}, "enrollment.ca.key: required"),
        ({"max_failures_per_source": 0}, "enrollment.max_failures_per_source"),
    )
    for change, where in bad_cloud:
        with pytest.raises(UserError, match=where):
            cloud_config_from_dict(
                {**cloud, "enrollment": {"tokens_file": "t.yaml", **change}}, base_dir=tmp_path
            )
    with pytest.raises(UserError, match="enrollment.tokens_file: required"):
        cloud_config_from_dict({**cloud, "enrollment": {"lifetime_days": 1}}, base_dir=tmp_path)


def test_enrollment_state_for_doctor(tmp_path: Path) -> None:
    edge = {
        "cloud": ["c:9000"],
        "tls": {"ca": "ca.crt", "cert": "tls.crt", "key": "tls.key"},
        "services": {"edge1:22": "127.0.0.1:22"},
        "enroll": {"token_file": "token", "ca_hash": "sha256:" + "ab" * 32},
    }
    cfg = edge_config_from_dict(edge, base_dir=tmp_path)
    ok, text = enrollment_state(cfg)
    assert not ok and text.startswith("token file missing")
    (tmp_path / "token").write_text("abcdef.0123456789abcdef\n")
    ok, text = enrollment_state(cfg)
    assert ok and text.startswith("will enrol with token abcdef")
    init_ca(tmp_path / "pki", issuing_ca=True)
    issuing = load_issuing_ca(tmp_path / "pki/issuing.crt", tmp_path / "pki/issuing.key")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = sign_edge_csr(
        issuing, key.public_key(), EdgeIdentity("test", "edge1"), dt.timedelta(days=30)
    )
    (tmp_path / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ok, text = enrollment_state(cfg)
    assert ok and text.startswith("enrolled (cert present, unit test, node edge1, expires ")


def test_cloud_refuses_an_issuing_ca_that_its_tls_ca_did_not_sign(tmp_path: Path) -> None:
    from kins_tunnel.cloud.server import Cloud

    init_ca(tmp_path / "a", issuing_ca=True)
    init_ca(tmp_path / "b", issuing_ca=True)
    (tmp_path / "tokens.yaml").write_text("")
    doc = {
        "tls": {
            k: str(tmp_path / "a" / f)
            for k, f in (("ca", "ca.crt"), ("cert", "cloud.crt"), ("key", "cloud.key"))
        },
        "enrollment": {
            "tokens_file": str(tmp_path / "tokens.yaml"),
            "ca": {"cert": str(tmp_path / "b/issuing.crt"), "key": str(tmp_path / "b/issuing.key")},
        },
    }
    with pytest.raises(
        UserError, match="enrollment.ca.cert: the issuing CA is not signed by a CA in tls.ca"
    ):
        Cloud(cloud_config_from_dict(doc, base_dir=tmp_path))
    doc["enrollment"]["tokens_file"] = str(tmp_path / "missing.yaml")  # type: ignore[index]
    with pytest.raises(UserError, match="enrollment.tokens_file: cannot read"):
        Cloud(cloud_config_from_dict(doc, base_dir=tmp_path))


def test_taking_a_use_does_not_stall_the_event_loop_on_a_large_tokens_file(tmp_path: Path) -> None:
    """Each enrolment rewrites the tokens file, then re-reads it: parsing a large file (up to
    MAX_TOKENS entries of YAML) must not run on the event loop, or every tunnel waits."""
    from kins_tunnel.tokens import TokenEntry, TokenStore, dump_tokens, secret_hash

    when = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    entries = {
        f"{i:06d}": TokenEntry(f"{i:06d}", secret_hash("x" * 16), "test", f"n{i}", when, 1)
        for i in range(5000)
    }
    path = tmp_path / "tokens.yaml"
    path.write_bytes(dump_tokens(entries))
    store = TokenStore(path)
    assert store.write_back
    gaps: list[float] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def tick() -> None:
                last = trio.current_time()
                while True:
                    await trio.sleep(0.01)
                    now = trio.current_time()
                    gaps.append(now - last)
                    last = now

            nursery.start_soon(tick)
            await trio.sleep(0.05)
            await store.consume(store.file.value["000007"])
            await trio.sleep(0.05)  # the ticker records the gap that spans the consume
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert store.file.value["000007"].uses == 0  # the new count is in use
    assert max(gaps) < 0.5, f"the event loop stalled {max(gaps):.2f}s"
