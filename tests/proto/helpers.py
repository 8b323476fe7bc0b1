"""Two `Connection`s joined in memory (after h11's ConnectionPair), with a fake clock."""

from __future__ import annotations

import hashlib

from kins_tunnel.proto import Connection, Hello, MuxConfig, Role
from kins_tunnel.proto.events import Event


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Pair:
    """client (edge) and server (cloud) ends; `pump()` moves bytes until both are quiet."""

    def __init__(
        self,
        client_config: MuxConfig = MuxConfig(),
        server_config: MuxConfig = MuxConfig(),
        names: tuple[str, ...] = ("test-svc-kins.kins-system:443",),
    ) -> None:
        self.clock = FakeClock()
        self.client = Connection(Role.CLIENT, Hello(names=names), client_config, clock=self.clock)
        self.server = Connection(Role.SERVER, Hello(), server_config, clock=self.clock)
        self.events: dict[str, list[Event]] = {"client": [], "server": []}

    def peer(self, side: str) -> Connection:
        return self.server if side == "client" else self.client

    def conn(self, side: str) -> Connection:
        return self.client if side == "client" else self.server

    def deliver(self, side: str) -> list[Event]:
        """Move what `side` queued to the other side; returns the other side's events."""
        data = self.conn(side).data_to_send()
        other = "server" if side == "client" else "client"
        got = self.peer(side).receive_data(bytes(data)) if data else []
        self.events[other].extend(got)
        return got

    def pump(self) -> None:
        for _ in range(1000):
            a = self.client.pending_output()
            b = self.server.pending_output()
            if not a and not b:
                return
            self.deliver("client")
            self.deliver("server")
        raise AssertionError("pump did not settle")

    def handshake(self) -> None:
        self.pump()
        assert self.client.is_open and self.server.is_open

    def take(self, side: str) -> list[Event]:
        got, self.events[side] = self.events[side], []
        return got


def check_invariants(conn: Connection) -> None:
    """Assert the flow-control and stream-count invariants of one connection. The per-stream
    windows have no public view (a test-only check of the core's own records reads them); the
    rest comes from `Connection.statistics()`."""
    from kins_tunnel.proto.flow import MIN_WINDOW

    streams = list(conn._streams)  # noqa: SLF001  (the per-stream window records)
    total = 0
    for s in streams:
        s.recv.check_invariant()
        total += s.recv.size
        assert s.send_credit >= 0
    stats = conn.statistics()
    assert total == stats.granted
    floor_streams = conn.config.max_streams + stats.peer_max_streams
    assert stats.granted <= conn.config.session_budget + floor_streams * MIN_WINDOW
    assert stats.remote_open <= conn.config.max_streams
    assert stats.local_open <= max(stats.peer_max_streams, 0) or not streams


def open_streams(conn: Connection) -> int:
    return conn.statistics().streams


def pattern(key: str, start: int, n: int) -> bytes:
    """`n` deterministic bytes from offset `start` of the endless stream named `key` (a stream id,
    a direction): what a receiver got can be checked piece by piece, wherever a frame split it."""
    block = hashlib.sha256(key.encode()).digest() * 16  # 512 bytes
    out = bytearray()
    pos = start
    while len(out) < n:
        i = pos % len(block)
        take = min(len(block) - i, n - len(out))
        out += block[i : i + take]
        pos += take
    return bytes(out)
