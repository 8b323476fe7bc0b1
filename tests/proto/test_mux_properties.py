"""Property tests: random interleavings across many streams, and garbage into the decoder."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kins_tunnel.proto import (
    Connection,
    ErrorCode,
    Hello,
    LocalProtocolError,
    MuxConfig,
    RemoteProtocolError,
    Role,
)
from kins_tunnel.proto.events import (
    DataReceived,
    OpenResult,
    StreamEnded,
    StreamOpened,
    StreamReset,
)
from kins_tunnel.proto.flow import MIN_WINDOW
from kins_tunnel.proto.frames import HEADER_SIZE
from tests.proto.helpers import check_invariants, pattern

# CI runs bounded example counts; KINS_FUZZ_SCALE=40 (for example) makes a long fuzzing run.
SCALE = int(os.environ.get("KINS_FUZZ_SCALE", "1"))
SIDES = ("client", "server")
OPS = ["open", "answer", "answer", "send", "send", "send", "consume", "consume", "reset", "ping"]
OPS += ["deliver"] * 4 + ["tick"]
CFG = MuxConfig(
    initial_window=16 * 1024,
    max_window=128 * 1024,
    session_budget=256 * 1024,
    max_streams=8,
    max_frame=16 * 1024,
)


class World:
    def __init__(self) -> None:
        self.now = 0.0
        clock = lambda: self.now  # noqa: E731
        self.conn = {
            "client": Connection(Role.CLIENT, Hello(names=("n:1",)), CFG, clock=clock),
            "server": Connection(Role.SERVER, Hello(), CFG, clock=clock),
        }
        self.wire = {"client": bytearray(), "server": bytearray()}  # bytes on the way FROM side
        self.pending: dict[str, list[int]] = {
            "client": [],
            "server": [],
        }  # opens awaiting our answer
        self.open: set[int] = set()  # established on both... as seen by someone
        self.sent: dict[tuple[int, str], int] = {}
        self.fin_sent: set[tuple[int, str]] = set()
        self.received: dict[tuple[int, str], bytearray] = {}  # (sid, receiving side)
        self.unconsumed: dict[tuple[int, str], int] = {}
        self.fin_seen: set[tuple[int, str]] = set()
        self.dead: set[int] = set()  # reset or refused

    def other(self, side: str) -> str:
        return "server" if side == "client" else "client"

    def flush(self, side: str) -> None:
        self.wire[side] += self.conn[side].data_to_send()

    def deliver(self, side: str, n: int) -> None:
        """Deliver the first n bytes of what `side` sent (any cut point)."""
        self.flush(side)
        chunk = bytes(self.wire[side][:n])
        del self.wire[side][:n]
        if not chunk:
            return
        dst = self.other(side)
        for e in self.conn[dst].receive_data(chunk):
            if isinstance(e, StreamOpened):
                self.pending[dst].append(e.stream_id)
            elif isinstance(e, OpenResult):
                if e.ok:
                    self.open.add(e.stream_id)
                else:
                    self.dead.add(e.stream_id)
            elif isinstance(e, DataReceived):
                key = (e.stream_id, dst)
                self.received.setdefault(key, bytearray()).extend(e.data)
                self.unconsumed[key] = self.unconsumed.get(key, 0) + len(e.data)
            elif isinstance(e, StreamEnded):
                self.fin_seen.add((e.stream_id, dst))
            elif isinstance(e, StreamReset):
                self.dead.add(e.stream_id)
        self.flush(dst)

    def check(self) -> None:
        for side in SIDES:
            c = self.conn[side]
            check_invariants(c)
            stats = c.statistics()
            assert stats.buffered <= stats.granted
            assert stats.granted <= CFG.session_budget + 2 * CFG.max_streams * MIN_WINDOW
            # a partial frame never costs more than one maximal frame
            assert stats.input_buffered < HEADER_SIZE + 64 * 1024


@settings(max_examples=150 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_interleavings_deliver_exact_bytes_in_order(data: st.DataObject) -> None:
    w = World()
    w.deliver("client", 1 << 20)
    w.deliver("server", 1 << 20)
    for _ in range(data.draw(st.integers(20, 200), label="steps")):
        op = data.draw(st.sampled_from(OPS))
        side = data.draw(st.sampled_from(SIDES))
        c = w.conn[side]
        if op == "open":
            try:
                c.open_stream(f"n:{data.draw(st.integers(1, 3))}")
            except LocalProtocolError as exc:
                assert exc.code == ErrorCode.STREAM_LIMIT
        elif op == "answer" and w.pending[side]:
            sid = w.pending[side].pop(0)
            if sid in w.dead:
                continue
            if data.draw(st.booleans()):
                c.accept_stream(sid)
                w.open.add(sid)
            else:
                c.reject_stream(sid, ErrorCode.REFUSED, "no")
                w.dead.add(sid)
        elif op == "send":
            live = sorted(s for s in w.open if s not in w.dead and (s, side) not in w.fin_sent)
            if not live:
                continue
            sid = data.draw(st.sampled_from(live))
            if c.send_window(sid) == 0 and not c.is_live(sid):
                continue
            n = data.draw(st.integers(0, 40_000))
            fin = data.draw(st.booleans())
            start = w.sent.get((sid, side), 0)
            try:
                took = c.send_data(sid, pattern(f"{sid}/{side}", start, n), end_stream=fin)
            except LocalProtocolError:
                continue  # stream reset by the peer meanwhile
            assert 0 <= took <= n
            w.sent[(sid, side)] = start + took
            if fin and took == n:
                w.fin_sent.add((sid, side))
        elif op == "consume":
            keys = sorted(k for k, v in w.unconsumed.items() if v and k[1] == side)
            if not keys:
                continue
            key = data.draw(st.sampled_from(keys))
            n = data.draw(st.integers(1, w.unconsumed[key]))
            w.unconsumed[key] -= n
            c.consumed(key[0], n)
        elif op == "reset":
            live = sorted(s for s in w.open if s not in w.dead)
            if live:
                sid = data.draw(st.sampled_from(live))
                c.reset_stream(sid, ErrorCode.CANCEL)
                w.dead.add(sid)
        elif op == "ping":
            c.ping()
        elif op == "deliver":
            w.deliver(side, data.draw(st.integers(0, 70_000)))
        elif op == "tick":
            w.now += data.draw(st.floats(0, 0.1))
        w.flush("client")
        w.flush("server")
        w.check()
    # drain: deliver everything and consume everything until quiet
    for _ in range(200):
        for side in SIDES:
            for key, v in list(w.unconsumed.items()):
                if v and key[1] == side:
                    w.unconsumed[key] = 0
                    w.conn[side].consumed(key[0], v)
            w.deliver(side, 1 << 30)
        if not any(w.wire.values()) and not any(w.conn[s].pending_output() for s in SIDES):
            break
    w.check()
    for (sid, side), n in w.sent.items():
        got = bytes(w.received.get((sid, w.other(side)), b""))
        if sid in w.dead:
            assert got == pattern(f"{sid}/{side}", 0, len(got))  # a prefix, in order
        else:
            assert got == pattern(f"{sid}/{side}", 0, n)
            if (sid, side) in w.fin_sent:
                assert (sid, w.other(side)) in w.fin_seen


def valid_traffic() -> bytes:
    """A realistic byte stream from a cloud: HELLO, opens, data, window, ping, goaway."""
    c = Connection(Role.CLIENT, Hello(names=("x:1",)), CFG)
    s = Connection(Role.SERVER, Hello(), CFG)
    c.receive_data(s.data_to_send())
    s.receive_data(c.data_to_send())
    out = bytearray()
    sid = s.open_stream("x:1")
    out += s.data_to_send()
    c.receive_data(bytes(out))
    c.accept_stream(sid)
    s.receive_data(c.data_to_send())
    s.send_data(sid, b"payload" * 100, end_stream=True)
    s.ping()
    s.reset_stream(sid)
    s.goaway()
    out += s.data_to_send()
    return bytes(out)


VALID = valid_traffic()


def feed(conn: Connection, raw: bytes, cuts: list[int]) -> None:
    pos = 0
    for cut in sorted(cuts) + [len(raw)]:
        try:
            conn.receive_data(raw[pos:cut])
        except RemoteProtocolError:
            return
        pos = cut
        assert conn.statistics().input_buffered < HEADER_SIZE + 64 * 1024
        check_invariants(conn)


@settings(max_examples=500 * SCALE, deadline=None)
@given(st.binary(max_size=4096), st.lists(st.integers(0, 4096), max_size=5))
def test_random_bytes_only_raise_protocol_errors(raw: bytes, cuts: list[int]) -> None:
    conn = Connection(Role.CLIENT, Hello(), CFG)
    feed(conn, raw, [c for c in cuts if c <= len(raw)])


@settings(max_examples=500 * SCALE, deadline=None)
@given(st.data())
def test_mutated_valid_traffic_only_raises_protocol_errors(data: st.DataObject) -> None:
    raw = bytearray(VALID)
    for _ in range(data.draw(st.integers(1, 8))):
        kind = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        i = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if kind == "flip" and raw:
            raw[i] ^= data.draw(st.integers(1, 255))
        elif kind == "insert":
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del raw[i : i + data.draw(st.integers(1, 16))]
        else:
            del raw[i:]
    conn = Connection(Role.CLIENT, Hello(names=("x:1",)), CFG)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=4))
    feed(conn, bytes(raw), cuts)
