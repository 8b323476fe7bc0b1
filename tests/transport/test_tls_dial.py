"""Dialling a TLS tunnel connection (`transport.tls_dial`) on real loopback sockets: a numeric
address is connected directly (IPv4 and IPv6), a name through trio; a refused port is a
`TransportError`; a dial cancelled while its connect is pending leaves no descriptor behind (the
autouse leak check of tests/conftest.py fails the test otherwise)."""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path

import pytest
import trio

from kins_tunnel.tls_contexts import client_ssl_context, server_ssl_context
from kins_tunnel.transport.tls import TLSSocket, TransportError
from kins_tunnel.transport.tls_dial import connect_ip, connect_tls, numeric_address
from tests.e2e.harness import make_certs


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    certs = make_certs(tmp_path)
    server = server_ssl_context(certs / "ca.crt", certs / "cloud.crt", certs / "cloud.key")
    client = client_ssl_context(
        certs / "ca.crt", certs / "edge-edge1.crt", certs / "edge-edge1.key"
    )
    return server, client


async def _serve_tls(
    host: str, ctx: ssl.SSLContext, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Accept TLS connections on `host` port 0, complete the handshake, close."""
    listeners = await trio.open_tcp_listeners(0, host=host)

    async def handler(stream: trio.SocketStream) -> None:
        tls = TLSSocket.wrap(socket.socket(fileno=stream.socket.detach()), ctx, server_side=True)
        try:
            with trio.move_on_after(5):
                await tls.do_handshake()
        except TransportError:
            pass
        finally:
            tls.close()

    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


def test_numeric_address_takes_literals_only() -> None:
    assert numeric_address("127.0.0.1", 7) == (socket.AF_INET, ("127.0.0.1", 7))
    family, sockaddr = numeric_address("::1", 7) or (None, ())
    assert family == socket.AF_INET6 and sockaddr[:2] == ("::1", 7)
    for name in ("localhost", "cloud.example", "", "1.2.3.4.5", "::1::2", "ü.example"):
        assert numeric_address(name, 7) is None, name


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_connect_tls_to_an_ip_literal(tmp_path: Path, host: str) -> None:
    if host == "::1" and not _ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    server, client = _contexts(tmp_path)
    async with trio.open_nursery() as n:
        port = await n.start(_serve_tls, host, server)
        with trio.fail_after(10):
            tls = await connect_tls(host, port, client, server_hostname="localhost")
        try:
            assert tls.peer_certificate_der()  # a real, verified handshake
            assert tls._sock.family == (socket.AF_INET6 if ":" in host else socket.AF_INET)
        finally:
            tls.close()
        n.cancel_scope.cancel()


async def test_connect_tls_to_a_name_still_resolves(tmp_path: Path) -> None:
    server, client = _contexts(tmp_path)
    async with trio.open_nursery() as n:
        port = await n.start(_serve_tls, "127.0.0.1", server)
        with trio.fail_after(10):
            tls = await connect_tls("localhost", port, client, server_hostname="localhost")
        tls.close()
        n.cancel_scope.cancel()


async def test_a_refused_port_is_a_transport_error(tmp_path: Path) -> None:
    _server, client = _contexts(tmp_path)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with trio.fail_after(10), pytest.raises(TransportError, match="cannot connect to 127.0.0.1"):
        await connect_tls("127.0.0.1", port, client, server_hostname="localhost")


async def test_a_dial_cancelled_while_connecting_closes_its_socket() -> None:
    # a listener whose accept queue is full drops further SYNs: a connect to it stays pending
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(0)
        addr = lst.getsockname()
        fillers: list[socket.socket] = []
        try:
            pending = False
            for _ in range(8):
                with trio.move_on_after(0.3) as scope:
                    fillers.append(await connect_ip(socket.AF_INET, addr))
                if scope.cancelled_caught:
                    pending = True
                    break
            assert pending, "the accept queue never filled"
            before = set(os.listdir("/proc/self/fd"))
            with trio.move_on_after(0.2) as scope:
                await connect_ip(socket.AF_INET, addr)
            assert scope.cancelled_caught
            assert set(os.listdir("/proc/self/fd")) <= before  # closed at once, not at a gc
        finally:
            for s in fillers:
                s.close()
