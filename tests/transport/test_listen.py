from __future__ import annotations

import errno
import socket

import pytest
import trio

from kins_tunnel.errors import UserError
from kins_tunnel.transport.errors import SetupError
from kins_tunnel.transport.listen import open_listener_socket, peer_authority


def test_an_address_in_use_is_a_one_line_setup_error_naming_the_setting() -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        with pytest.raises(SetupError) as info:
            open_listener_socket("127.0.0.1", port, "proxy.listen")
    finally:
        busy.close()
    assert (
        str(info.value)
        == f"proxy.listen: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.EADDRINUSE
    assert not isinstance(info.value, UserError)  # the transport does not speak the CLI's errors


def _accepted_pair(family: socket.AddressFamily, host: str) -> tuple[socket.socket, socket.socket]:
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.bind((host, 0))
        listener.listen(1)
        client = socket.create_connection((host, listener.getsockname()[1]))
        server, _ = listener.accept()
    finally:
        listener.close()
    return client, server


@pytest.mark.parametrize(
    ("family", "host", "shown"),
    [(socket.AF_INET, "127.0.0.1", "127.0.0.1:{port}"), (socket.AF_INET6, "::1", "[::1]:{port}")],
)
async def test_peer_authority_brackets_ipv6(
    family: socket.AddressFamily, host: str, shown: str
) -> None:
    try:
        client, server = _accepted_pair(family, host)
    except OSError as exc:
        pytest.skip(f"no {host} loopback here: {exc}")
    try:
        port = client.getsockname()[1]
        assert peer_authority(trio.socket.from_stdlib_socket(server)) == shown.format(port=port)
    finally:
        client.close()
        server.close()


async def test_peer_authority_of_a_closed_socket_is_a_question_mark() -> None:
    sock = trio.socket.socket()
    sock.close()
    assert peer_authority(sock) == "?"
