"""The tunnel port's pending set and handshake slots shared between source addresses, with real
sockets from several loopback addresses and a real edge (`cloud.admission`: the fattest source
pays, source addresses take turns)."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import trio
import trio.testing

from kins_tunnel.testing.support import wait_until
from tests.e2e.harness import SVC, connect, serve_echo, tunnel_env


def client_hello() -> bytes:
    """A real TLS ClientHello record (what any client, certificate or not, can send)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


async def test_an_address_that_stalls_after_its_clienthellos_cannot_keep_an_edge_out(
    tmp_path: Path, virtual_clock: trio.testing.MockClock
) -> None:
    """One address (127.0.0.2) fills the whole pending set with connections that send a real
    ClientHello and never answer the server's flight. An edge from another address (127.0.0.1)
    takes the place of that address's newest and is serving at once; before, it was refused (every
    pending connection had spoken) until the stalled ones became slow (`slow_handshake`)."""
    pending = 8
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        async with tunnel_env(
            tmp_path,
            tunnel={
                "max_pending_handshakes": pending,
                "max_concurrent_handshakes": 2,
                "slow_handshake": 5.0,
                "handshake_timeout": 20.0,
            },
        ) as env:
            admission = env.cloud.tunnels.admission
            hello = client_hello()
            stalled: list[socket.socket] = []
            try:
                for _ in range(pending):
                    c = socket.socket()
                    c.bind(("127.0.0.2", 0))
                    c.connect(("127.0.0.1", env.ports.tunnel))
                    c.sendall(hello)
                    stalled.append(c)
                await wait_until(
                    lambda: admission.pending == pending and admission.answering_count == pending,
                    5,
                    "every stalled connection has had the server's flight",
                )
                t0 = trio.current_time()
                await env.add_edge({SVC: f"127.0.0.1:{echo}"}, wait_for=SVC)
                took = trio.current_time() - t0
                print(f"\nFIGURE edge routed past a stalled address after {took:.2f} s (virtual)")
                assert took < 1.0, took  # before: refused, and back only once they were slow
                status, _h, s = await connect(env.ports.proxy, SVC)
                await s.aclose()
                assert status == 200
                assert admission.pending <= pending
            finally:
                for c in stalled:
                    c.close()
        n.cancel_scope.cancel()
