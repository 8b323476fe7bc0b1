from __future__ import annotations

import errno
import socket

import pytest

from kins_tunnel.errors import UserError
from kins_tunnel.transport.errors import SetupError
from kins_tunnel.transport.listen import open_listener_socket


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
