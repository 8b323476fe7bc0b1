"""Targets that speak first (sshd's banner, SMTP, a server that answers and closes at once): the
bytes and the FIN the edge sends right behind its "open ok" must reach the client."""

from __future__ import annotations

from pathlib import Path

import trio

from kins_tunnel.testing.support import read_all
from tests.e2e.faultkit import connect
from tests.e2e.harness import SVC, serve_loopback, tunnel_env

BANNER = b"SSH-2.0-OpenSSH_9.6 test\r\n"


async def serve_speaks_first(
    close: bool, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await stream.send_all(BANNER)
        if not close:
            await stream.receive_some(1)  # hold the connection until the client goes

    await serve_loopback(handler, task_status=task_status)


async def test_banner_sent_right_after_the_open_is_never_lost(tmp_path: Path) -> None:
    async with trio.open_nursery() as n:
        port = await n.start(serve_speaks_first, False)
        async with tunnel_env(tmp_path, {SVC: f"127.0.0.1:{port}"}) as env:
            lost = 0
            for _ in range(10):
                held = []
                try:
                    for _ in range(8):
                        status, head, s = await connect(env.ports.proxy, SVC)
                        held.append(s)
                        assert status == 200, head
                    for s in held:
                        got = b""
                        with trio.move_on_after(1):
                            while len(got) < len(BANNER):
                                chunk = await s.receive_some(100)
                                if not chunk:
                                    break
                                got += chunk
                        lost += got != BANNER
                finally:
                    for s in held:
                        await s.aclose()
            assert lost == 0, f"{lost} of 80 banners never arrived"
        n.cancel_scope.cancel()


async def test_answer_and_close_at_once_reaches_the_client_with_eof(tmp_path: Path) -> None:
    async with trio.open_nursery() as n:
        port = await n.start(serve_speaks_first, True)
        async with tunnel_env(tmp_path, {SVC: f"127.0.0.1:{port}"}) as env:
            bad = []
            for i in range(40):
                status, head, s = await connect(env.ports.proxy, SVC)
                async with s:
                    assert status == 200, head
                    got = None
                    with trio.move_on_after(1):
                        got = await read_all(s)
                if got != BANNER:
                    bad.append((i, got))
            assert not bad, f"{len(bad)} of 40 streams: banner or EOF lost: {bad[:5]}"
        n.cancel_scope.cancel()
