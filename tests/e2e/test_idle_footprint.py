"""What an idle edge tunnel holds on a real cloud (`docs/DESIGN.md`, "Fleet scale"): nothing its
set-up needed (the ClientHello, the admission ticket, the certificate's bytes), no pacer and no
Events nobody waits on, and the parts made lazily come when a stream does."""

from __future__ import annotations

import gc
import inspect
from pathlib import Path

import trio

from kins_tunnel.cloud.admission import Ticket
from kins_tunnel.cloud.tunnel_server import TunnelServer
from kins_tunnel.testing.support import echo_roundtrip
from kins_tunnel.transport.tls import TLSSocket
from tests.e2e.faultkit import connect
from tests.e2e.harness import SVC, serve_echo, tunnel_env


async def test_an_idle_tunnel_keeps_only_what_it_uses_and_a_stream_still_works(
    tmp_path: Path,
) -> None:
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        async with tunnel_env(tmp_path, {SVC: f"127.0.0.1:{echo}"}) as env:
            (tunnel,) = list(env.cloud.registry)
            session = tunnel.session
            await trio.testing.wait_all_tasks_blocked()
            gc.collect()
            alive = gc.get_objects()
            # the connection's task runs the tunnel: what only its set-up needed is gone
            assert not [o for o in alive if isinstance(o, Ticket)]
            (handle,) = [
                o
                for o in alive
                if inspect.iscoroutine(o) and o.cr_code is TunnelServer._handle.__code__
            ]
            assert handle.cr_frame is not None  # suspended, running the tunnel
            held = handle.cr_frame.f_locals
            assert not {"hello", "ticket", "queued", "der"} & set(held), sorted(held)
            assert not hasattr(tunnel, "__dict__") and isinstance(tunnel.names, tuple)
            assert session._handshake_done is None and session._goaway_received is None
            assert session.conn._pacer is None
            assert isinstance(session.tls, TLSSocket)
            der = session.tls.peer_certificate_der()  # encoded on demand, the same each time
            assert der is not None and der == session.tls.peer_certificate_der()
            kept = [getattr(session.tls, slot, None) for slot in TLSSocket.__slots__]
            assert not [v for v in kept if isinstance(v, bytes | bytearray)]
            del alive

            status, _head, stream = await connect(env.ports.proxy, SVC)
            assert status == 200
            await echo_roundtrip(stream, b"x" * 300_000)  # enough DATA for the pacer to be made
            await stream.aclose()
            assert session.conn._pacer is not None and session.usable
            assert session.handshake_done.is_set() and not session.goaway_received.is_set()
        n.cancel_scope.cancel()
