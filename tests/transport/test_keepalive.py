"""TCP keepalive tuned to the ping settings (`transport.keepalive`): the figures, their clamps
(every setting is untrusted), and the options as the kernel reports them on a real socket. That
the kernel then really drops an idle tunnel on a dead path is `tests/e2e/test_keepalive_netns.py`."""

from __future__ import annotations

import math
import socket

import pytest

from kins_tunnel.transport import keepalive


def test_defaults_find_a_dead_peer_within_the_ping_timeout() -> None:
    s = keepalive.settings(10, 20)
    assert s == {
        "TCP_KEEPIDLE": 10,
        "TCP_KEEPINTVL": 3,
        "TCP_KEEPCNT": 3,
        "TCP_USER_TIMEOUT": 20_000,
    }
    # the last probe goes out before the timeout, which then ends the connection
    assert s["TCP_KEEPIDLE"] + s["TCP_KEEPCNT"] * s["TCP_KEEPINTVL"] <= 20


@pytest.mark.parametrize(
    ("interval", "timeout"),
    [(0.01, 0.02), (0.5, 0.5), (5, 1), (1e308, 1.7e308), (math.inf, math.inf), (math.nan, 3)],
)
def test_any_setting_gives_values_the_kernel_accepts(interval: float, timeout: float) -> None:
    s = keepalive.settings(interval, timeout)
    assert 1 <= s["TCP_KEEPIDLE"] <= 32767
    assert 1 <= s["TCP_KEEPINTVL"] <= 32767
    assert 1000 <= s["TCP_USER_TIMEOUT"] <= 2**31 - 1
    with socket.socket() as sock:
        keepalive.tune(sock, interval, timeout)  # no error from the kernel
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == s["TCP_KEEPIDLE"]


def test_tune_sets_every_option_on_a_connected_socket() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        with socket.create_connection(server.getsockname()) as client:
            keepalive.tune(client, 2, 7)
            got = {
                name: client.getsockopt(socket.IPPROTO_TCP, getattr(socket, name))
                for name in keepalive.settings(2, 7)
            }
            assert (
                got
                == keepalive.settings(2, 7)
                == {
                    "TCP_KEEPIDLE": 2,
                    "TCP_KEEPINTVL": 1,
                    "TCP_KEEPCNT": 3,
                    "TCP_USER_TIMEOUT": 7000,
                }
            )
            assert client.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            server.accept()[0].close()
