"""Output scheduling across streams (`proto.output`): byte order per stream under any interleaving
of sends, splits and batch limits; interactive frames do not wait behind bulk; control first."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kins_tunnel.proto import Connection, ErrorCode, MuxConfig
from kins_tunnel.proto.events import DataReceived, StreamEnded, StreamReset
from kins_tunnel.proto.frames import HEADER_SIZE, FrameType, unpack_header
from kins_tunnel.proto.output import QUANTUM
from tests.proto.helpers import Pair, check_invariants, pattern

SCALE = int(os.environ.get("KINS_FUZZ_SCALE", "1"))
# Large windows: the scheduler, not the credit, decides what goes when.
CFG = MuxConfig(
    initial_window=4 * 1024 * 1024, max_window=16 * 1024 * 1024, session_budget=256 * 1024 * 1024
)


def open_streams(pair: Pair, count: int) -> list[int]:
    sids = []
    for _ in range(count):
        sid = pair.client.open_stream("test-svc-kins.kins-system:443")
        pair.deliver("client")
        pair.server.accept_stream(sid)
        pair.deliver("server")
        sids.append(sid)
    pair.take("client")
    pair.take("server")
    return sids


def frames_of(wire: bytes) -> list[tuple[int, int, int, int]]:
    """(offset, type, stream id, payload length) of each frame of a byte stream."""
    out = []
    pos = 0
    while pos < len(wire):
        length, ftype, _flags, sid = unpack_header(wire, pos)
        out.append((pos, ftype, sid, length))
        pos += HEADER_SIZE + length
    assert pos == len(wire)
    return out


@settings(max_examples=120 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_each_streams_bytes_arrive_whole_and_in_order_under_any_scheduling(
    data: st.DataObject,
) -> None:
    pair = Pair(CFG, CFG)
    pair.handshake()
    sids = open_streams(pair, data.draw(st.integers(1, 5), label="streams"))
    c, srv = pair.client, pair.server
    sent = dict.fromkeys(sids, 0)
    fin_sent: set[int] = set()
    reset: set[int] = set()
    got: dict[int, bytearray] = {sid: bytearray() for sid in sids}
    fin_seen: set[int] = set()
    wire = bytearray()  # client -> server bytes not yet delivered

    def deliver(n: int) -> None:
        chunk = bytes(wire[:n])
        del wire[:n]
        for e in srv.receive_data(chunk) if chunk else []:
            if isinstance(e, DataReceived):
                assert e.stream_id not in fin_seen
                got[e.stream_id] += e.data
                srv.consumed(e.stream_id, len(e.data))
            elif isinstance(e, StreamEnded):
                fin_seen.add(e.stream_id)
            elif isinstance(e, StreamReset):
                assert e.stream_id in reset  # only the client resets, and only these
        if srv.pending_output():  # credit back, pongs
            c.receive_data(bytes(srv.data_to_send()))

    for _ in range(data.draw(st.integers(5, 60), label="steps")):
        op = data.draw(
            st.sampled_from(["send", "send", "send", "write", "write", "deliver", "ping", "reset"])
        )
        if op == "send":
            live = [s for s in sids if s not in fin_sent and s not in reset]
            if not live:
                continue
            sid = data.draw(st.sampled_from(live))
            n = data.draw(
                st.sampled_from(
                    [
                        0,
                        1,
                        64,
                        1000,
                        16 * 1024,
                        QUANTUM - 9,
                        QUANTUM + 1,
                        200 * 1024,
                        256 * 1024,
                        700 * 1024,
                    ]
                )
            )
            fin = data.draw(st.booleans())
            n = min(n, c.send_window(sid))
            taken = c.send_data(sid, pattern(str(sid), sent[sid], n), end_stream=fin)
            assert taken == n
            sent[sid] += n
            if fin:
                fin_sent.add(sid)
        elif op == "write":
            limit = data.draw(st.integers(1, 600 * 1024))
            before = c.pending_output()
            handed = c.write_output(wire.extend, limit)
            assert c.pending_output() <= before  # headers of split frames are the only growth
            if before:
                assert handed > 0
        elif op == "deliver":
            deliver(data.draw(st.integers(0, len(wire))))
        elif op == "ping":
            c.ping()
        elif op == "reset" and data.draw(st.integers(0, 4)) == 0:
            live = [s for s in sids if s not in reset and s not in fin_seen]
            if live:
                sid = data.draw(st.sampled_from(live))
                c.reset_stream(sid, ErrorCode.CANCEL, "test")
                reset.add(sid)
        check_invariants(c)
        check_invariants(srv)
    # Drain everything, in random batch sizes.
    while c.pending_output():
        c.write_output(wire.extend, data.draw(st.integers(1, 300 * 1024), label="drain limit"))
    deliver(len(wire))
    frames_of(bytes(wire))  # nothing half-written
    for sid in sids:
        if sid in reset:
            # a prefix, in order: what went out before the reset
            assert bytes(got[sid]) == pattern(str(sid), 0, len(got[sid]))
            continue
        assert bytes(got[sid]) == pattern(str(sid), 0, sent[sid]), sid
        assert (sid in fin_seen) == (sid in fin_sent)


@settings(max_examples=60 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_an_interactive_frame_waits_for_at_most_one_turn_of_each_bulk_stream(
    data: st.DataObject,
) -> None:
    pair = Pair(CFG, CFG)
    pair.handshake()
    nbulk = data.draw(st.integers(1, 4), label="bulk streams")
    *bulk, chat = open_streams(pair, nbulk + 1)
    c = pair.client
    for sid in bulk:
        n = data.draw(st.integers(QUANTUM, 3 * 1024 * 1024), label="bulk bytes")
        assert c.send_data(sid, pattern(str(sid), 0, n)) == n
    wire = bytearray()
    # Some bulk is already out; the queue still holds lots of it.
    c.write_output(wire.extend, data.draw(st.integers(1, 512 * 1024), label="first batch"))
    already = len(wire)
    c.ping()  # a control frame queued at the same time
    assert c.send_data(chat, b"x" * 64) == 64
    while c.pending_output():
        c.write_output(wire.extend, data.draw(st.integers(1, 512 * 1024), label="limit"))
    frames = frames_of(bytes(wire))
    chat_at = next(off for off, ftype, sid, _n in frames if ftype == FrameType.DATA and sid == chat)
    ping_at = next(
        off for off, ftype, _sid, _n in frames if off >= already and ftype == FrameType.PING
    )
    # Control goes out at the next batch; a turn is at most one quantum (one frame) per bulk stream.
    assert ping_at - already <= len(bulk) * (QUANTUM + HEADER_SIZE)
    assert chat_at - already <= HEADER_SIZE + 8 + len(bulk) * (QUANTUM + HEADER_SIZE)
    # While several streams wait, no frame is larger than a turn.
    for off, ftype, _sid, n in frames:
        if ftype == FrameType.DATA and off > already and off < chat_at:
            assert HEADER_SIZE + n <= QUANTUM


def test_a_stream_alone_keeps_whole_frames() -> None:
    """No splitting and no extra headers when one stream has the connection to itself."""
    pair = Pair(CFG, CFG)
    pair.handshake()
    (sid,) = open_streams(pair, 1)
    c = pair.client
    n = 4 * 256 * 1024
    c.send_data(sid, pattern(str(sid), 0, n))
    wire = bytearray()
    while c.pending_output():
        c.write_output(wire.extend, 256 * 1024)
    frames = frames_of(bytes(wire))
    data_frames = [length for _o, ftype, _s, length in frames if ftype == FrameType.DATA]
    assert data_frames == [256 * 1024] * 4


def test_control_frames_go_before_queued_bulk() -> None:
    pair = Pair(CFG, CFG)
    pair.handshake()
    (sid,) = open_streams(pair, 1)
    c = pair.client
    c.send_data(sid, pattern(str(sid), 0, 1024 * 1024))
    c.ping()
    wire = bytearray()
    c.write_output(wire.extend, 1)
    assert frames_of(bytes(wire[: HEADER_SIZE + 8]))[0][1] == FrameType.PING


def test_a_reset_drops_the_streams_queued_data_only() -> None:
    pair = Pair(CFG, CFG)
    pair.handshake()
    a, b = open_streams(pair, 2)
    c = pair.client
    c.send_data(a, pattern(str(a), 0, 300 * 1024))
    c.send_data(b, pattern(str(b), 0, 300 * 1024))
    c.reset_stream(a, ErrorCode.CANCEL, "gone")
    wire = bytearray()
    while c.pending_output():
        c.write_output(wire.extend, 100 * 1024)
    data_sids = {sid for _o, ftype, sid, _n in frames_of(bytes(wire)) if ftype == FrameType.DATA}
    assert data_sids == {b}
    events = pair.server.receive_data(bytes(wire))
    assert b"".join(e.data for e in events if isinstance(e, DataReceived)) == pattern(
        str(b), 0, 300 * 1024
    )
    assert any(isinstance(e, StreamReset) and e.stream_id == a for e in events)
    check_invariants(c)
    check_invariants(pair.server)


def test_a_finished_streams_queue_is_dropped_once_sent() -> None:
    """A stream's queue lives only while it holds bytes (idle streams cost no buffer)."""
    pair = Pair(CFG, CFG)
    pair.handshake()
    (sid,) = open_streams(pair, 1)
    c: Connection = pair.client
    c.send_data(sid, b"hello", end_stream=True)
    wire = bytearray()
    c.write_output(wire.extend, 1 << 20)
    assert c.pending_output() == 0
    assert c.statistics().queued_streams == 0
