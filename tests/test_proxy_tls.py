"""The proxy's TLS listener on its own: handshake, client-certificate principals, failures by reason.
(Through real cloud and edge with kubectl and curl: tests/e2e/test_access.py.)"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio

from kins_tunnel.certs.directory import init_ca, issue_edge, issue_user
from kins_tunnel.certwatch import ReloadingContext
from kins_tunnel.cloud.auth import Principal
from kins_tunnel.cloud.proxy_tls import ProxyTLSListener, TLSClientStream
from kins_tunnel.config_proxy import ProxyTLS
from kins_tunnel.errors import UserError
from kins_tunnel.names import Address
from kins_tunnel.testing.support import kins_tunnel_cli, wait_until
from kins_tunnel.tls_contexts import proxy_server_ssl_context


def client_context(
    certs: Path, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs / "proxy-ca.crt"))  # the proxy's own CA
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


async def run_listener(certs: Path, client_ca: Path | None, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    seen: list[Principal | None] = []
    failures: list[str] = []

    async def echo_principal(stream: TLSClientStream) -> None:
        seen.append(stream.principal)
        try:
            data = await stream.receive_some(100)
            await stream.send_all(
                b"hello "
                + data
                + b" from "
                + (stream.principal.name.encode() if stream.principal else b"-")
            )
        finally:
            await stream.aclose()

    settings = ProxyTLS(
        Address("127.0.0.1", 0), certs / "proxy.crt", certs / "proxy.key", client_ca
    )
    ctx = ReloadingContext(
        proxy_server_ssl_context,
        client_ca,
        certs / "proxy.crt",
        certs / "proxy.key",
        what="proxy.tls",
    )

    def report(where: str, exc: BaseException) -> None:
        raise AssertionError(f"a bug in the TLS listener ({where}): {exc!r}")

    return (
        ProxyTLSListener(settings, ctx, timeout, echo_principal, report, failures.append),
        seen,
        failures,
    )


async def talk(port: int, ctx: ssl.SSLContext, name: str = "localhost") -> bytes:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    s = trio.SSLStream(tcp, ctx, server_hostname=name)
    try:
        with trio.fail_after(10):
            await s.send_all(b"x")
            out = b""
            while True:
                chunk = await s.receive_some(100)
                if not chunk:
                    return out
                out += chunk
    finally:
        await trio.aclose_forcefully(s)


async def test_server_certificate_and_stream(tmp_path: Path) -> None:
    init_ca(tmp_path, proxy_sans=["tunnel-cloud.kube-system", "203.0.113.7"])
    listener, seen, failures = await run_listener(tmp_path, None)
    async with trio.open_nursery() as n:
        port = await n.start(listener.serve)
        assert (
            await talk(port, client_context(tmp_path), "tunnel-cloud.kube-system")
            == b"hello x from -"
        )
        assert await talk(port, client_context(tmp_path), "203.0.113.7") == b"hello x from -"
        with pytest.raises(trio.BrokenResourceError):  # a name the proxy certificate does not carry
            await talk(port, client_context(tmp_path), "elsewhere.example")
        n.cancel_scope.cancel()
    assert seen == [None, None]


async def test_client_certificate_is_the_principal(tmp_path: Path) -> None:
    init_ca(tmp_path, proxy_sans=[])
    crt, key = issue_user(tmp_path, "carol", ["oncall", "sre"])
    edge_crt, edge_key = issue_edge(tmp_path, "test", "edge1")
    other = tmp_path / "other"
    init_ca(other)
    foreign_crt, foreign_key = issue_user(other, "mallory")
    listener, seen, failures = await run_listener(tmp_path, tmp_path / "ca.crt", timeout=0.5)
    async with trio.open_nursery() as n:
        port = await n.start(listener.serve)
        assert await talk(port, client_context(tmp_path, crt, key)) == b"hello x from carol"
        assert seen == [Principal("carol", "cert", frozenset({"oncall", "sre"}))]
        for args in ((), (edge_crt, edge_key), (foreign_crt, foreign_key)):
            try:
                out = await talk(port, client_context(tmp_path, *args))
            except trio.BrokenResourceError:  # the handshake itself failed (TLS alert)
                out = b""
            assert out == b""  # refused: never reached the handler
        # plain HTTP on the TLS port, and a client that never starts TLS
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        await tcp.send_all(b"CONNECT a:1 HTTP/1.1\r\n\r\n")
        with trio.fail_after(5):  # a TLS alert at most, then the connection is closed
            answer = b""
            while chunk := await tcp.receive_some(100):
                answer += chunk
        assert b"HTTP" not in answer and len(answer) < 10
        await tcp.aclose()
        idle = await trio.open_tcp_stream("127.0.0.1", port)
        await wait_until(lambda: len(failures) >= 5, 5, "five failed handshakes")
        await idle.aclose()
        n.cancel_scope.cancel()
    assert len(seen) == 1
    assert failures == ["no_certificate", "edge_certificate", "unknown_ca", "not_tls", "timeout"]


def test_proxy_context_errors_name_the_key(tmp_path: Path) -> None:
    init_ca(tmp_path, proxy_sans=[])
    with pytest.raises(UserError, match="proxy.tls.key: .* does not belong to proxy.tls.cert"):
        proxy_server_ssl_context(None, tmp_path / "proxy.crt", tmp_path / "cloud.key")
    with pytest.raises(UserError, match="proxy.tls.client_ca: cannot read"):
        proxy_server_ssl_context(
            tmp_path / "nope.crt", tmp_path / "proxy.crt", tmp_path / "proxy.key"
        )
    with pytest.raises(UserError, match="--proxy-san 'bad name'"):
        init_ca(tmp_path, proxy_sans=["bad name"])
    with pytest.raises(UserError, match="user 'a b'"):
        issue_user(tmp_path, "a b")


def test_cli_issues_proxy_and_user_certificates(tmp_path: Path) -> None:
    import stat

    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    kt = kins_tunnel_cli
    r = kt(
        "certs",
        "init",
        "--dir",
        str(tmp_path),
        "--proxy-san",
        "*.proxy.example.com",
        "--proxy-san",
        "203.0.113.9",
    )
    assert r.returncode == 0, r.stderr
    assert "proxy-ca.crt, proxy-ca.key, proxy.crt, proxy.key" in r.stdout
    cert = x509.load_pem_x509_certificate((tmp_path / "proxy.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "*.proxy.example.com"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {
        "127.0.0.1",
        "203.0.113.9",
    }
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    assert stat.S_IMODE((tmp_path / "proxy.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "proxy-ca.key").stat().st_mode) == 0o600
    r = kt("certs", "init", "--dir", str(tmp_path), "--proxy-san", "*.kins-system")
    assert r.returncode == 2 and "--proxy-san '*.kins-system': a Kins service name" in r.stderr
    r = kt(
        "certs",
        "user",
        "--dir",
        str(tmp_path),
        "--name",
        "carol",
        "--group",
        "oncall",
        "--group",
        "sre",
    )
    assert r.returncode == 0, r.stderr
    assert "principal carol, groups oncall,sre" in r.stdout
    user = x509.load_pem_x509_certificate((tmp_path / "user-carol.crt").read_bytes())
    assert [a.value for a in user.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == ["carol"]
    assert [a.value for a in user.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] == [
        "oncall",
        "sre",
    ]
    r = kt("certs", "user", "--dir", str(tmp_path), "--name", "bad name")
    assert r.returncode == 2 and r.stderr.startswith("kins-tunnel: error: user 'bad name'")


async def test_handshakes_in_progress_are_bounded(tmp_path: Path) -> None:
    init_ca(tmp_path, proxy_sans=[])
    listener, seen, failures = await run_listener(tmp_path, None, timeout=5.0)
    listener.max_handshakes = 1
    async with trio.open_nursery() as n:
        port = await n.start(listener.serve)
        idle = await trio.open_tcp_stream("127.0.0.1", port)  # holds the one handshake slot
        await wait_until(lambda: listener.handshaking > 0, 5, "a handshake in progress")
        second = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(5):
            assert await second.receive_some(10) == b""  # closed at once
        await second.aclose()
        assert failures == ["too_many"]
        await idle.aclose()
        await wait_until(lambda: not listener.handshaking, 5, "the slot is free again")
        assert await talk(port, client_context(tmp_path)) == b"hello x from -"
        n.cancel_scope.cancel()
