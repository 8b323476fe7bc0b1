"""The edge revocation list: parsing, decisions, re-reading; certificate facts it relies on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from kins_tunnel.certs import EdgeIdentity, cert_facts, init_ca, issue_edge
from kins_tunnel.cloud.revocation import Revocation, RevokedList, parse_revoked
from kins_tunnel.errors import UserError
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
        (b"5f3a\nedge1\n", "line 2: 'edge1' is neither a hex certificate serial nor <unit>/<node>"),
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


async def test_reread_on_change_and_broken_file_keeps_the_list(tmp_path: Path) -> None:
    f = tmp_path / "revoked"
    f.write_text("")
    with pytest.raises(UserError, match="tunnel.revoked_file: cannot read"):
        Revocation(tmp_path / "missing")
    rev = Revocation(f)
    changes: list[RevokedList] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rev.watch, changes.append, 0.01)
        assert rev.reason(E1, 7) is None
        (tmp_path / "new").write_text("test/edge1\n")
        os.replace(tmp_path / "new", f)
        await wait_until(lambda: bool(changes), 10, "a change reported")
        assert rev.reason(E1, 7) == "edge identity test/edge1 is revoked"
        (tmp_path / "new").write_text("test/edge1\nnot an entry\n")
        os.replace(tmp_path / "new", f)
        await wait_until(lambda: rev.file.failures > 0, 10, "a failed re-read counted")
        assert rev.reason(E1, 7) is not None and len(changes) == 1
        nursery.cancel_scope.cancel()
