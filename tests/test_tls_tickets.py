"""The session ticket key, on real TLS 1.3 handshakes (OpenSSL through memory BIOs): a dedicated
secret (`tunnel.session_ticket_key_file`) or a random one per cloud process, never the cloud's TLS
key; the key file is parsed strictly and followed by the certificate watcher."""

from __future__ import annotations

import hashlib
import logging
import ssl
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kins_tunnel import tls_tickets
from kins_tunnel.certwatch import ReloadingContext
from kins_tunnel.config import cloud_config_from_dict
from kins_tunnel.errors import UserError
from kins_tunnel.pemfiles import load_key
from kins_tunnel.tls_contexts import client_ssl_context, server_ssl_context
from kins_tunnel.tls_tickets import TicketKeys, read_secret, set_ticket_key, write_secret
from tests.e2e.harness import cloud_dict, make_certs

LIFETIME = 3600.0


def _pump(src: ssl.MemoryBIO, dst: ssl.MemoryBIO) -> bool:
    data = src.read()
    dst.write(data)
    return bool(data)


def _step(obj: ssl.SSLObject, fn: str) -> None:
    try:
        getattr(obj, fn)()
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        pass


def handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[bool, ssl.SSLSession | None]:
    """One real TLS handshake between `client` (offering `session`) and `server`; (whether the
    session was resumed, the session the client holds afterwards, ticket included)."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    cli = client.wrap_bio(c_in, c_out, server_hostname="localhost", session=session)
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(20):
        _step(cli, "do_handshake")
        moved = _pump(c_out, s_in)
        _step(srv, "do_handshake")
        moved = _pump(s_out, c_in) or moved
        if not moved:
            break
    srv.write(b"x")  # the server's tickets go out before its first application data
    _pump(s_out, c_in)
    assert cli.read(1) == b"x"
    assert cli.version() == "TLSv1.3"
    return cli.session_reused, cli.session


def _contexts(certs: Path, keys: TicketKeys | None) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = server_ssl_context(
        certs / "ca.crt",
        certs / "cloud.crt",
        certs / "cloud.key",
        session_lifetime=LIFETIME,
        ticket_keys=keys,
    )
    client = client_ssl_context(
        certs / "ca.crt", certs / "edge-edge1.crt", certs / "edge-edge1.key"
    )
    return server, client


def _old_derivation(certs: Path) -> bytes:
    """The ticket key as the cloud derived it before: from its TLS key and the CA bundle."""
    secret = load_key(certs / "cloud.key", "tls.key").private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ca = (certs / "ca.crt").read_bytes()
    info = b"kins-tunnel session tickets v1 " + hashlib.sha256(ca).digest()
    return HKDF(hashes.SHA256(), 80, salt=None, info=info).derive(secret)


def test_a_shared_key_file_resumes_in_a_new_context_and_the_cloud_key_does_not(
    tmp_path: Path,
) -> None:
    certs = make_certs(tmp_path)
    write_secret(tmp_path / "ticket.key")
    server, client = _contexts(certs, TicketKeys(tmp_path / "ticket.key"))
    resumed, session = handshake(server, client)
    assert not resumed and session is not None and session.has_ticket
    restarted, _ = _contexts(certs, TicketKeys(tmp_path / "ticket.key"))  # another process
    assert handshake(restarted, client, session)[0]
    # someone holding only the cloud's key: tickets made with the old derivation are refused
    forger = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    forger.load_cert_chain(certs / "cloud.crt", certs / "cloud.key")
    assert set_ticket_key(forger, _old_derivation(certs), LIFETIME)
    _, forged = handshake(forger, client)
    assert forged is not None and forged.has_ticket
    assert not handshake(restarted, client, forged)[0]
    assert not handshake(server, client, forged)[0]
    # the same forger context does take its own ticket back: the refusal above is the key's
    assert handshake(forger, client, forged)[0]


def test_without_a_key_file_tickets_resume_within_the_process_only(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    keys = TicketKeys(None)
    server, client = _contexts(certs, keys)
    _, session = handshake(server, client)
    assert handshake(server, client, session)[0]  # a brief disconnect
    reloaded, _ = _contexts(certs, keys)  # a certificate reload in the same process
    assert handshake(reloaded, client, session)[0]
    restarted, _ = _contexts(certs, TicketKeys(None))  # a restart: a new random key
    assert not handshake(restarted, client, session)[0]
    assert keys.secret() != TicketKeys(None).secret()


def test_a_rotated_key_file_is_followed_by_the_certificate_watcher(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    key_file = tmp_path / "ticket.key"
    write_secret(key_file)
    keys = TicketKeys(key_file)

    def build(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
        return server_ssl_context(ca, cert, key, session_lifetime=LIFETIME, ticket_keys=keys)

    watched = ReloadingContext(
        build, certs / "ca.crt", certs / "cloud.crt", certs / "cloud.key", what="tls",
        extra=(key_file,),
    )  # fmt: skip
    _, client = _contexts(certs, None)
    _, session = handshake(watched.context, client)
    assert not watched.check()  # nothing changed
    write_secret(key_file)  # rotation: a new secret renamed over the old file
    assert watched.check() and watched.reloads == 1
    assert not handshake(watched.context, client, session)[0]
    key_file.write_text("not hex\n")  # a broken file keeps the previous context
    assert not watched.check()
    _, fresh = handshake(watched.context, client)
    assert handshake(watched.context, client, fresh)[0]


@pytest.mark.parametrize(
    "content",
    [b"", b"ab" * 31 + b"\n", b"ab" * 129, b"zz" * 32, b"ab" * 32 + b"\n\n", b" " + b"ab" * 32],
    ids=["empty", "short", "long", "not-hex", "two-lines", "space"],
)
def test_a_bad_key_file_is_a_one_line_error_naming_the_key(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "ticket.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(UserError, match=r"^tunnel\.session_ticket_key_file: .* hex digits") as e:
        read_secret(path)
    assert "\n" not in str(e.value)


def test_a_missing_key_file_stops_the_cloud_with_the_key_named(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    cfg = cloud_config_from_dict(
        cloud_dict(certs, tunnel={"session_ticket_key_file": "nope.key"}), base_dir=tmp_path
    )
    assert cfg.tunnel.session_ticket_key_file == tmp_path / "nope.key"
    with pytest.raises(UserError, match=r"^tunnel\.session_ticket_key_file: cannot read .*nope"):
        _contexts(certs, TicketKeys(cfg.tunnel.session_ticket_key_file))


def test_the_key_file_is_written_private_and_read_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ticket.key"
    write_secret(path)
    assert path.stat().st_mode & 0o777 == 0o600
    secret = read_secret(path)
    assert len(secret) == tls_tickets.SECRET_BYTES
    write_secret(path)
    assert read_secret(path) != secret
    with caplog.at_level(logging.WARNING, "kins_tunnel.tls"):
        read_secret(path)
        assert not caplog.records
        path.chmod(0o644)
        read_secret(path)
    assert "readable by every user" in caplog.text


def test_a_context_whose_ssl_ctx_cannot_be_reached_issues_no_tickets(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every failure of the ctypes path only turns tickets off, with a warning."""
    certs = make_certs(tmp_path)

    def broken(ctx: ssl.SSLContext, lib: object) -> int | None:
        raise RuntimeError("layout")

    for patch in (broken, lambda ctx, lib: None):
        monkeypatch.setattr(tls_tickets, "_ssl_ctx_pointer", patch)
        caplog.clear()
        with caplog.at_level(logging.WARNING, "kins_tunnel.tls"):
            server, client = _contexts(certs, TicketKeys(None))
        assert "session tickets unavailable" in caplog.text
        assert server.num_tickets == 0
        _, session = handshake(server, client)
        assert session is None or not session.has_ticket


def test_the_pointer_probe_refuses_unmapped_memory() -> None:
    assert tls_tickets._readable(id(object()), 16)
    assert not tls_tickets._readable(8, 16)  # the zero page is never mapped
