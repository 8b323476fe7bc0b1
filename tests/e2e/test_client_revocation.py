"""Revoking client-certificate principals of the proxy's TLS listener (`proxy.tls.client_ca`)
through `tunnel.revoked_file`, with a real cloud and edge: live relays of a revoked certificate
close within seconds of the file changing, new handshakes with it are refused, and other
clients are unaffected."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import trio
from cryptography import x509

from kins_tunnel.certs.directory import init_ca, issue_user
from kins_tunnel.testing.support import echo_roundtrip, metric_value, read_head, wait_until
from tests.e2e.harness import SVC, make_certs, serve_echo, tunnel_env


def replace(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def client_context(certs: Path, user: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs / "proxy-ca.crt"))
    ctx.load_cert_chain(certs / f"user-{user}.crt", certs / f"user-{user}.key")
    return ctx


async def open_relay(port: int, certs: Path, user: str) -> trio.SSLStream[trio.SocketStream]:
    """TLS with `user`'s certificate, CONNECT to the echo service; the stream after the 200.
    AssertionError if the proxy refuses (the connection ends without a 200)."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(tcp, client_context(certs, user), server_hostname="localhost")
    try:
        with trio.fail_after(10):
            await tls.send_all(f"CONNECT {SVC} HTTP/1.1\r\nHost: {SVC}\r\n\r\n".encode())
            head = await read_head(tls)
    except trio.BrokenResourceError:
        head = b""
    if not head.startswith(b"HTTP/1.1 200"):
        await trio.aclose_forcefully(tls)
        raise AssertionError(f"CONNECT refused: {head!r}")
    return tls


async def refused(port: int, certs: Path, user: str) -> bool:
    try:
        tls = await open_relay(port, certs, user)
    except AssertionError:
        return True
    await tls.aclose()
    return False


async def wait_closed(stream: trio.abc.Stream, timeout: float) -> float:
    """Seconds until the proxy ends `stream` (EOF or a broken connection)."""
    t0 = trio.current_time()
    try:
        with trio.fail_after(timeout):
            try:
                while await stream.receive_some(100):
                    pass
            except trio.BrokenResourceError:
                pass
    finally:
        await trio.aclose_forcefully(stream)
    return trio.current_time() - t0


async def test_a_revoked_client_certificate_loses_its_relay_and_its_access(
    tmp_path: Path,
) -> None:
    certs = make_certs(tmp_path)
    init_ca(certs, proxy_sans=[])
    for user in ("carol", "dave", "erin"):
        issue_user(certs, user)
    dave_serial = x509.load_pem_x509_certificate(
        (certs / "user-dave.crt").read_bytes()
    ).serial_number
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("# nobody yet\n")
    proxy = {
        "listen": None,
        "tls": {
            "listen": "127.0.0.1:0",
            "cert": str(certs / "proxy.crt"),
            "key": str(certs / "proxy.key"),
            "client_ca": str(certs / "ca.crt"),
        },
    }
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        async with tunnel_env(
            tmp_path,
            {SVC: f"127.0.0.1:{echo}"},
            tunnel={"revoked_file": str(revoked)},
            proxy=proxy,
        ) as env:
            port = env.ports.proxy_tls
            metrics = env.cloud.metrics
            relays = {
                user: await open_relay(port, certs, user) for user in ("carol", "dave", "erin")
            }
            for user, s in relays.items():
                await echo_roundtrip(s, f"hello from {user}".encode())
            # by principal: every certificate with subject CN carol
            replace(revoked, "# carol's laptop was stolen\nclient:carol\n")
            closed_after = await wait_closed(relays.pop("carol"), 5)
            print(f"\nFIGURE revoked client relay closed after: {closed_after:.3f} s", flush=True)
            assert closed_after < 3.0  # the list is re-read every second
            for user, s in relays.items():  # the others keep their relays
                await echo_roundtrip(s, f"still {user}".encode())
            assert await refused(port, certs, "carol")
            # by serial, as `openssl x509 -serial` prints it (after "serial=")
            replace(revoked, f"client:carol\n{dave_serial:X}\n")
            assert await wait_closed(relays.pop("dave"), 5) < 3.0
            assert await refused(port, certs, "dave")
            await echo_roundtrip(relays["erin"], b"erin is unaffected")
            assert not await refused(port, certs, "erin")
            reason = {"reason": "revoked"}
            await wait_until(
                lambda: (
                    metric_value(metrics, "kins_tunnel_proxy_tls_failures_total", **reason) == 2
                ),
                5,
            )
            assert metric_value(metrics, "kins_tunnel_revoked_proxy_clients_closed_total") == 2
            assert len(env.cloud.registry) == 1  # the edge was never touched
            replace(revoked, "")  # lifted: carol is back
            await wait_until(lambda: not env.cloud.revocation.file.value.clients, 5)  # type: ignore[union-attr]
            carol = await open_relay(port, certs, "carol")
            await echo_roundtrip(carol, b"carol again")
            await carol.aclose()
            await relays["erin"].aclose()
        n.cancel_scope.cancel()
