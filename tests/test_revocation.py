"""The edge revocation list: parsing, decisions, re-reading; certificate facts it relies on."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from kins_tunnel.certs.directory import init_ca, issue_edge
from kins_tunnel.certs.identity import EdgeIdentity, cert_facts
from kins_tunnel.cloud.revocation import Revocation, RevokedList, parse_revoked
from kins_tunnel.errors import UserError
from kins_tunnel.filewatch import PartialValue
from kins_tunnel.testing.support import wait_until

E1 = EdgeIdentity("test", "edge1")


def test_parse_serials_and_identities() -> None:
    revoked = parse_revoked(
        b"# revoked on 2024-05-01\n5F3A09C2\n0x0a\n  5f:3a:09:c3  # with colons\n\n"
        b"test/edge2\nold/*\n"
    )
    assert revoked == RevokedList(
        frozenset({0x5F3A09C2, 0x0A, 0x5F3A09C3}), frozenset({("test", "edge2"), ("old", "*")})
    )
    assert revoked.reason(E1, 0x5F3A09C2) == "certificate serial 5f3a09c2 is revoked"
    assert revoked.reason(E1, 0x5F3A09C4) is None
    assert revoked.reason(EdgeIdentity("test", "edge2"), 1) == "edge identity test/edge2 is revoked"
    assert revoked.reason(EdgeIdentity("old", "anything"), 1) == "edge identity old/* is revoked"
    assert len(parse_revoked(b"")) == 0


@pytest.mark.parametrize(
    "text, message",
    [
        (
            b"5f3a\nedge1\n",
            "line 2: 'edge1' is neither a hex certificate serial nor <unit>/<node> "
            "nor client:<name>",
        ),
        (b"Test/Edge1\n", "line 1: 'Test/Edge1' is neither"),
        (b"test/edge1/x\n", "line 1:"),
        (b"5f:3a:\n", "line 1:"),
        (b"\xff", "not UTF-8 text"),
    ],
)
def test_parse_errors_name_the_line(text: bytes, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_revoked(text)
    assert message in str(info.value)


def test_cert_facts_of_an_issued_edge_certificate(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    init_ca(tmp_path)
    crt, _ = issue_edge(tmp_path, "test", "edge1")
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    facts = cert_facts(cert.public_bytes(Encoding.DER))
    assert facts.serial == cert.serial_number
    assert facts.serial_hex == format(cert.serial_number, "x")
    assert facts.not_after == cert.not_valid_after_utc
    assert facts.common_name == "edge1" and facts.organizations == ()
    with pytest.raises(ValueError):
        cert_facts(b"junk")


async def test_reread_on_change_and_a_bad_line_fails_closed(tmp_path: Path) -> None:
    """A version with a bad line: its good entries apply, nothing revoked before is let back in,
    and the failure is counted with its line; a version that is gone keeps the list."""
    f = tmp_path / "revoked"
    f.write_text("")
    with pytest.raises(UserError, match="tunnel.revoked_file: cannot read"):
        Revocation(tmp_path / "missing")
    rev = Revocation(f)
    changes: list[RevokedList] = []
    e2 = EdgeIdentity("test", "edge2.site-a")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rev.watch, changes.append, 0.01)
        assert rev.reason(E1, 7) is None
        (tmp_path / "new").write_text("test/edge1\n")
        os.replace(tmp_path / "new", f)
        await wait_until(lambda: bool(changes), 10, "a change reported")
        assert rev.reason(E1, 7) == "edge identity test/edge1 is revoked"
        (tmp_path / "new").write_text("not an entry\ntest/edge2.site-a\n")
        os.replace(tmp_path / "new", f)
        await wait_until(lambda: rev.file.failures > 0, 10, "a failed re-read counted")
        assert len(changes) == 2 and rev.file.failing
        assert rev.reason(e2, 7) == "edge identity test/edge2.site-a is revoked"
        assert rev.reason(E1, 7) is not None  # dropped by a broken version: still revoked
        assert rev.file.last_error == (
            "line 1: 'not an entry' is neither a hex certificate serial nor <unit>/<node> "
            "nor client:<name>"
        )
        f.unlink()
        await wait_until(lambda: rev.file.failures == 2, 10, "a vanished file counted")
        assert rev.reason(e2, 7) is not None and len(changes) == 2
        (tmp_path / "new").write_text("test/edge2.site-a\n")
        os.replace(tmp_path / "new", f)
        await wait_until(lambda: len(changes) == 3, 10, "a whole file applied")
        assert rev.reason(E1, 7) is None and not rev.file.failing  # now lifted
        nursery.cancel_scope.cancel()


def test_a_bad_line_at_start_up_refuses_to_start(tmp_path: Path) -> None:
    f = tmp_path / "revoked"
    f.write_text("test/edge1.site-a\nserial=5F3A\nserial=xyz\n")
    with pytest.raises(UserError) as info:
        Revocation(f)
    assert str(info.value) == (
        f"tunnel.revoked_file: {f}: line 3: 'serial=xyz' is neither a hex certificate serial "
        "nor <unit>/<node> nor client:<name>"
    )


def test_dotted_node_names_and_openssl_serials() -> None:
    revoked = parse_revoked(
        b"test/edge1.site-a\nserial=5F3A09C2\nSERIAL=0a\nserial=5f:3a:09:c3\nu/a.b.c-d\n"
    )
    assert revoked.identities == {("test", "edge1.site-a"), ("u", "a.b.c-d")}
    assert revoked.serials == {0x5F3A09C2, 0x0A, 0x5F3A09C3}
    assert revoked.reason(EdgeIdentity("test", "edge1.site-a"), 1) is not None
    assert revoked.reason(EdgeIdentity("test", "edge1"), 1) is None
    node = "a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 61  # 253 characters
    assert parse_revoked(f"u/{node}\n".encode()).identities == {("u", node)}


@pytest.mark.parametrize(
    "line",
    [
        b"test/edge1.",
        b"test/.edge1",
        b"test/edge1..x",
        b"test/Edge1.site",
        b"te.st/edge1",
        b"test/" + b"a" * 63 + b"." + b"b" * 63 + b"." + b"c" * 63 + b"." + b"d" * 62,
        b"serial=",
        b"serial=5f3g",
        b"serial 5f3a",
    ],
)
def test_lines_that_are_no_entry(line: bytes) -> None:
    with pytest.raises(ValueError, match="line 2: .* is neither"):
        parse_revoked(b"5f3a\n" + line + b"\n")


def test_bad_lines_carry_the_entries_that_parse() -> None:
    with pytest.raises(PartialValue) as info:
        parse_revoked(b"bad one\ntest/edge1.site-a\n\xff\nbad two\nserial=0B\n")
    assert str(info.value) == (
        "line 1: 'bad one' is neither a hex certificate serial nor <unit>/<node> "
        "nor client:<name> (and 2 more bad lines)"
    )
    assert info.value.value == RevokedList(frozenset({0x0B}), frozenset({("test", "edge1.site-a")}))


def test_serial_as_openssl_prints_it_revokes_that_certificate(tmp_path: Path) -> None:
    """A real certificate: its serial as `openssl x509 -serial -noout` prints it (upper-case
    hex, leading zeros kept as printed) revokes exactly that certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    init_ca(tmp_path)
    crt, _ = issue_edge(tmp_path, "test", "edge1.site-a")
    other, _ = issue_edge(tmp_path, "test", "edge2")
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    facts = cert_facts(cert.public_bytes(Encoding.DER))
    other_serial = x509.load_pem_x509_certificate(other.read_bytes()).serial_number
    openssl = shutil.which("openssl")
    if openssl is not None:
        printed = subprocess.run(
            [openssl, "x509", "-serial", "-noout", "-in", str(crt)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    else:
        printed = f"serial={cert.serial_number:X}"
    assert printed.startswith("serial=")
    for line in (printed, printed.lower(), "0" + printed[7:]):
        revoked = parse_revoked(f"# edge1.site-a\n{line}\n".encode())
        ident = EdgeIdentity("test", "edge1.site-a")
        assert revoked.reason(ident, facts.serial) == (
            f"certificate serial {facts.serial:x} is revoked"
        )
        assert revoked.reason(EdgeIdentity("test", "edge2"), other_serial) is None


def test_client_lines_revoke_proxy_client_principals_and_survive_a_bad_line() -> None:
    revoked = parse_revoked(b"client:carol\n  client:dave.ops  # left\n")
    assert revoked.clients == frozenset({"carol", "dave.ops"})
    with pytest.raises(PartialValue) as info:
        parse_revoked(b"client:carol\nclient:\n")
    assert info.value.value.clients == frozenset({"carol"})  # fail closed: carol stays revoked
