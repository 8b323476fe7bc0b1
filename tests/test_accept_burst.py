"""Accepting in bursts (`transport.listen.accept_bursts`): a burst of connections waiting in the
listen backlog is taken in a few scheduling rounds even when hundreds of tasks are runnable
(trio's own accept loop takes one per round), and every one is served."""

from __future__ import annotations

import errno
import os
import socket

import pytest
import trio

from kins_tunnel.transport.listen import _accept_now, open_listener_socket, serve_listener

CONNECTIONS = 300
BUSY_TASKS = 200  # runnable at every round, as handshakes are in a reconnect storm


def _report(where: str, exc: BaseException) -> None:
    raise AssertionError(f"{where}: {exc!r}")


async def _rounds_to_accept(accept_burst: int | None) -> int:
    """Scheduling rounds from a full backlog until all `CONNECTIONS` are being served."""
    sock = open_listener_socket("127.0.0.1", 0, "test.listen")
    port = sock.getsockname()[1]
    served = 0
    all_served = trio.Event()
    release = trio.Event()
    rounds = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal served
        served += 1
        if served == CONNECTIONS:
            all_served.set()
        await release.wait()

    async def busy() -> None:
        while not all_served.is_set():
            await trio.lowlevel.checkpoint()

    async def count_rounds() -> None:
        nonlocal rounds
        while not all_served.is_set():
            rounds += 1
            await trio.lowlevel.checkpoint()

    clients = []
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(BUSY_TASKS):
                nursery.start_soon(busy)
            await trio.lowlevel.checkpoint()
            for _ in range(CONNECTIONS):  # completed by the kernel, waiting in the backlog
                c = socket.create_connection(("127.0.0.1", port), timeout=5)
                clients.append(c)
            nursery.start_soon(count_rounds)
            nursery.start_soon(
                lambda: serve_listener(
                    trio.SocketListener(sock),
                    handler,
                    where="test",
                    report=_report,
                    accept_burst=None if accept_burst is None else lambda: accept_burst,
                )
            )
            with trio.fail_after(30):
                await all_served.wait()
            release.set()
            nursery.cancel_scope.cancel()
    finally:
        for c in clients:
            c.close()
        sock.close()
    assert served == CONNECTIONS
    return rounds


async def test_a_burst_is_accepted_in_a_few_rounds() -> None:
    assert await _rounds_to_accept(256) <= 5


async def test_a_smaller_burst_takes_proportionally_more_rounds() -> None:
    assert 3 <= await _rounds_to_accept(100) <= 8


async def test_one_per_round_without_bursts() -> None:
    # the behaviour bursts replace (and proof the round count above measures something)
    assert await _rounds_to_accept(None) >= CONNECTIONS // 2


@pytest.mark.parametrize("burst", [1, 64])
async def test_every_connection_is_served_whatever_the_burst(burst: int) -> None:
    assert await _rounds_to_accept(burst) >= CONNECTIONS // burst


class _FailingAccept:
    def __init__(self, code: int) -> None:
        self.code = code

    def accept(self) -> tuple[object, object]:
        raise OSError(self.code, os.strerror(self.code))


@pytest.mark.parametrize("code", [errno.EPERM, errno.ECONNRESET, errno.ETIMEDOUT])
def test_a_connection_lost_or_firewalled_mid_accept_is_skipped(code: int) -> None:
    # a firewall-refused (EPERM) or reset connection is that connection's failure: the burst
    # loop skips it instead of ending the tunnel listener
    assert _accept_now(_FailingAccept(code)) is None  # type: ignore[arg-type]


def test_the_process_running_out_of_descriptors_is_still_raised() -> None:
    with pytest.raises(OSError):
        _accept_now(_FailingAccept(errno.EMFILE))  # type: ignore[arg-type]
