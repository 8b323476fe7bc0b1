"""What one reconnect attempt costs, in CPU: the edge's TCP dial and the server's session ticket.

    python -m benchmarks.dial_cost [--attempts 3000] [--handshakes 400] [--repeats 3]

In a reconnect storm every edge dials the restarted replica several times (refused while it is
down, shed while it is busy), and the replica resumes thousands of TLS 1.3 sessions. Two parts
of that are measured here, each in this process's CPU time (`time.process_time`), the median of
`--repeats`:

- `dial`: a TCP connect to 127.0.0.1, refused (nothing listening) and completed (a listener whose
  queue is emptied every 100 attempts), through `transport.tls_dial.connect_ip` (a numeric
  address: one non-blocking connect, what tunnel-edge's keepers use) and through
  `trio.open_tcp_stream` with the socket taken back out (what `connect_tls` does for a name),
  in µs per attempt;
- `ticket`: the server's CPU for a resumed handshake (tunnel-cloud's `server_ssl_context` with
  tickets on, the edge's `client_ssl_context`, memory BIOs in this process, only the server's
  calls timed) with one ticket issued per handshake (`num_tickets = 1`, as the cloud runs) and
  with none (`num_tickets = 0`), in ms; and whether a client that offers, after a resumed
  handshake, the session that connection holds (an edge of any version) resumes again when no
  new ticket came.

Bounded: a fixed number of attempts, each on loopback, and no server process. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from kins_tunnel.certs.directory import init_ca, issue_edge
from kins_tunnel.tls_contexts import client_ssl_context, server_ssl_context
from kins_tunnel.transport.tls_dial import connect_ip, numeric_address

Dial = Callable[[int], Awaitable[socket.socket]]


async def _dial_trio(port: int) -> socket.socket:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    return socket.socket(fileno=stream.socket.detach())


async def _dial_direct(port: int) -> socket.socket:
    family, sockaddr = numeric_address("127.0.0.1", port) or (socket.AF_INET, ("127.0.0.1", port))
    return await connect_ip(family, sockaddr)


async def _attempts(dial: Dial, port: int, n: int, listener: socket.socket | None) -> float:
    """µs of CPU per attempt over `n` dials of `port`."""
    start = time.process_time()
    for i in range(n):
        try:
            with trio.fail_after(5):
                sock = await dial(port)
            sock.close()
        except OSError:
            pass
        if listener is not None and i % 100 == 99:  # empty the accept queue
            try:
                while True:
                    listener.accept()[0].close()
            except BlockingIOError:
                pass
    return (time.process_time() - start) / n * 1e6


async def _dial_figures(attempts: int, repeats: int) -> dict[str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4096)
        listener.setblocking(False)
        open_port = listener.getsockname()[1]
        runs: dict[str, list[float]] = {}
        for _ in range(repeats):  # interleaved, so that a busier moment hits both ways
            for name, dial in (("direct", _dial_direct), ("trio", _dial_trio)):
                refused = await _attempts(dial, closed, attempts, None)
                runs.setdefault(f"{name}_refused_us", []).append(refused)
                done = await _attempts(dial, open_port, attempts, listener)
                runs.setdefault(f"{name}_connected_us", []).append(done)
    return {k: round(statistics.median(v), 1) for k, v in sorted(runs.items())}


def _handshake(
    client: ssl.SSLContext, server: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[ssl.SSLObject, float]:
    """One handshake over memory BIOs; the client then reads the server's tickets. Returns the
    client's connection and the server's CPU seconds."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname="localhost", session=session)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    server_cpu = 0.0
    c_done = s_done = False
    for _ in range(10):
        if not c_done:
            try:
                c.do_handshake()
                c_done = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        if not s_done:
            start = time.process_time()
            try:
                s.do_handshake()
                s_done = True
            except ssl.SSLWantReadError:
                pass
            server_cpu += time.process_time() - start
        c_in.write(s_out.read())
        if c_done and s_done:
            break
    else:
        raise RuntimeError("the handshake did not complete")
    try:
        c.read(1)  # takes in the NewSessionTicket messages, if any
    except ssl.SSLWantReadError:
        pass
    return c, server_cpu


def _ticket_figures(handshakes: int, repeats: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="kins-dialcost-") as tmp:
        certs = Path(tmp)
        init_ca(certs)
        issue_edge(certs, "bench", "edge1")
        client = client_ssl_context(
            certs / "ca.crt", certs / "edge-edge1.crt", certs / "edge-edge1.key"
        )
        runs: dict[int, list[float]] = {1: [], 0: []}
        new_tickets: dict[int, int] = {1: 0, 0: 0}
        chained: dict[int, int] = {}
        for _ in range(repeats):
            for tickets in (1, 0):
                server = server_ssl_context(
                    certs / "ca.crt",
                    certs / "cloud.crt",
                    certs / "cloud.key",
                    session_lifetime=3600,
                )
                first, _ = _handshake(client, server, None)
                offered = first.session
                assert offered is not None and offered.has_ticket
                server.num_tickets = tickets
                total = 0.0
                session: ssl.SSLSession | None = offered
                resumed = 0
                for _ in range(handshakes):
                    conn, cpu = _handshake(client, server, session)
                    total += cpu
                    resumed += conn.session_reused
                    held = conn.session
                    if held is not None and held.id != offered.id:
                        new_tickets[tickets] += 1
                    session = held  # as any edge may: offer what its last connection holds
                runs[tickets].append(total / handshakes * 1e3)
                chained[tickets] = resumed
    return {
        "server_ms_per_resumed_handshake_one_ticket": round(statistics.median(runs[1]), 3),
        "server_ms_per_resumed_handshake_no_ticket": round(statistics.median(runs[0]), 3),
        "new_tickets_seen_one_ticket": new_tickets[1],
        "new_tickets_seen_no_ticket": new_tickets[0],
        "resumed_in_a_chain_one_ticket": f"{chained[1]}/{handshakes}",
        "resumed_in_a_chain_no_ticket": f"{chained[0]}/{handshakes}",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attempts", type=int, default=3000)
    p.add_argument("--handshakes", type=int, default=400)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    out: dict[str, object] = {"dial": trio.run(_dial_figures, args.attempts, args.repeats)}
    out["ticket"] = _ticket_figures(args.handshakes, args.repeats)
    out["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
