"""Scenario tests of the multiplexer, two peers joined in memory."""

from __future__ import annotations

import pytest

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
    ConnectionTerminated,
    DataReceived,
    GoAwayReceived,
    HandshakeComplete,
    OpenResult,
    PongReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from kins_tunnel.proto.flow import MIN_WINDOW
from kins_tunnel.proto.frames import FrameType, frame, pack_header
from tests.proto.helpers import Pair, check_invariants, open_streams

TARGET = "test-svc-kins.kins-system:443"


def open_pair(pair: Pair, target: str = TARGET) -> int:
    sid = pair.server.open_stream(target)
    pair.pump()
    (opened,) = [e for e in pair.take("client") if isinstance(e, StreamOpened)]
    assert opened.stream_id == sid and opened.target == target
    pair.client.accept_stream(sid)
    pair.pump()
    (res,) = [e for e in pair.take("server") if isinstance(e, OpenResult)]
    assert res.ok
    return sid


def test_handshake_reports_names_versions_and_shared_capabilities() -> None:
    pair = Pair()
    pair.pump()
    (hs,) = pair.take("server")
    assert isinstance(hs, HandshakeComplete)
    assert hs.version == 1
    assert hs.names == (TARGET,)
    assert "names" in hs.capabilities
    (hs2,) = pair.take("client")
    assert isinstance(hs2, HandshakeComplete) and hs2.names == ()


def test_capabilities_are_the_intersection() -> None:
    c = Connection(Role.CLIENT, Hello(capabilities=frozenset({"a", "b"})))
    s = Connection(Role.SERVER, Hello(capabilities=frozenset({"b", "c"})))
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    assert c.capabilities == s.capabilities == frozenset({"b"})


def test_hello_time_is_reported_when_stated_and_ignored_when_malformed() -> None:
    c = Connection(Role.CLIENT, Hello(time=1_800_000_000.1234))
    s = Connection(Role.SERVER)
    (hs,) = s.receive_data(c.data_to_send())
    assert isinstance(hs, HandshakeComplete) and hs.time == 1_800_000_000.123
    (plain,) = c.receive_data(s.data_to_send())  # a HELLO without `time`
    assert isinstance(plain, HandshakeComplete) and plain.time is None
    for bad in (b'"soon"', b"true", b"-5", b"1e300", b"NaN"):
        body = (
            b'{"capabilities":[],"names":[],"agent":"x","max_frame":16384,"max_streams":1,'
            b'"time":' + bad + b"}"
        )
        prefix = bytes(Connection(Role.CLIENT).data_to_send()[9:17])  # magic and versions
        raw = frame(FrameType.HELLO, 0, prefix + body)
        (ev,) = Connection(Role.SERVER).receive_data(raw)
        assert isinstance(ev, HandshakeComplete) and ev.time is None, bad


def test_hello_idle_ping_is_kept_when_stated_and_ignored_when_malformed() -> None:
    """How long the peer stays silent before pinging an idle tunnel (`ping_policy`): a number of
    seconds, or nothing (an older peer, or a malformed value: never a protocol error)."""
    c = Connection(Role.CLIENT, Hello(idle_ping=60.00049))
    s = Connection(Role.SERVER)
    s.receive_data(c.data_to_send())
    assert s.peer_idle_ping == 60.0
    c.receive_data(s.data_to_send())  # a HELLO without `idle_ping`
    assert c.peer_idle_ping is None
    for bad in (b'"soon"', b"true", b"0", b"-5", b"1e300", b"NaN", b"[1]"):
        body = (
            b'{"capabilities":[],"names":[],"agent":"x","max_frame":16384,"max_streams":1,'
            b'"idle_ping":' + bad + b"}"
        )
        prefix = bytes(Connection(Role.CLIENT).data_to_send()[9:17])  # magic and versions
        peer = Connection(Role.SERVER)
        (ev,) = peer.receive_data(frame(FrameType.HELLO, 0, prefix + body))
        assert isinstance(ev, HandshakeComplete) and peer.peer_idle_ping is None, bad


def test_version_mismatch_is_a_clear_error_with_goaway() -> None:
    c = Connection(Role.CLIENT, Hello(min_version=2, max_version=3))
    s = Connection(Role.SERVER)
    with pytest.raises(RemoteProtocolError) as info:
        s.receive_data(c.data_to_send())
    assert info.value.code == ErrorCode.VERSION_MISMATCH
    assert "1..1" in str(info.value) and "2..3" in str(info.value)
    assert s.closed
    out = bytes(s.data_to_send())
    assert FrameType.GOAWAY in out[9 + out[2] : 9 + out[2] + 4]  # HELLO, then GOAWAY


def test_frames_before_hello_are_rejected() -> None:
    s = Connection(Role.SERVER)
    with pytest.raises(RemoteProtocolError):
        s.receive_data(frame(FrameType.PING, 0, b"x" * 8))


def test_bad_magic_is_rejected() -> None:
    s = Connection(Role.SERVER)
    with pytest.raises(RemoteProtocolError, match="magic"):
        s.receive_data(frame(FrameType.HELLO, 0, b"HTTP/1.1 200 OK\r\n"))


def test_commands_before_handshake_are_local_errors() -> None:
    c = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError):
        c.open_stream(TARGET)


def test_open_accept_data_both_ways_and_half_close() -> None:
    pair = Pair()
    pair.handshake()
    pair.take("client"), pair.take("server")
    sid = open_pair(pair)
    assert sid % 2 == 0  # the cloud opens even ids
    assert pair.server.send_data(sid, b"hello edge", end_stream=True) == 10
    pair.pump()
    got = pair.take("client")
    assert got == [DataReceived(sid, b"hello edge"), StreamEnded(sid)]  # one FIN signal, always
    # the client's direction is still open after the server's FIN
    assert pair.client.send_data(sid, b"reply", end_stream=False) == 5
    pair.client.end_stream(sid)
    pair.pump()
    assert pair.take("server") == [DataReceived(sid, b"reply"), StreamEnded(sid)]
    pair.server.consumed(sid, 5)
    pair.client.consumed(sid, 10)
    assert open_streams(pair.server) == open_streams(pair.client) == 0


def test_reject_carries_code_and_message() -> None:
    pair = Pair()
    pair.handshake()
    sid = pair.server.open_stream("edge1:22")
    pair.pump()
    pair.client.reject_stream(sid, ErrorCode.NOT_ALLOWED, "edge1:22 is not in services")
    pair.pump()
    res = [e for e in pair.take("server") if isinstance(e, OpenResult)]
    assert res == [OpenResult(sid, ErrorCode.NOT_ALLOWED, "edge1:22 is not in services")]
    assert open_streams(pair.server) == 0 and open_streams(pair.client) == 0


def test_reset_discards_stream_and_late_frames_are_ignored() -> None:
    pair = Pair()
    pair.handshake()
    sid = open_pair(pair)
    pair.client.send_data(sid, b"in flight")
    pair.server.reset_stream(sid, ErrorCode.CANCEL, "client went away")
    pair.pump()  # the client's DATA crosses the server's RESET
    assert StreamReset(sid, ErrorCode.CANCEL, "client went away") in pair.take("client")
    assert pair.take("server") == []
    with pytest.raises(LocalProtocolError):
        pair.server.send_data(sid, b"x")


def test_send_is_limited_by_credit_and_credit_returns_only_when_consumed() -> None:
    cfg = MuxConfig(initial_window=64 * 1024, max_window=64 * 1024, session_budget=1 << 20)
    pair = Pair(cfg, cfg)
    pair.handshake()
    sid = open_pair(pair)
    big = b"x" * (200 * 1024)
    n = pair.server.send_data(sid, big)
    assert n == 64 * 1024
    assert pair.server.send_window(sid) == 0
    pair.pump()
    assert pair.server.send_window(sid) == 0  # arrived, not consumed: no credit back
    pair.client.consumed(sid, 16 * 1024)
    pair.pump()
    assert pair.server.send_window(sid) == 0  # batched: less than half a window consumed
    pair.client.consumed(sid, 16 * 1024)
    pair.pump()
    assert pair.server.send_window(sid) == 32 * 1024
    assert any(isinstance(e, WindowUpdated) for e in pair.take("server"))


def test_unread_stream_never_blocks_another() -> None:
    cfg = MuxConfig(initial_window=64 * 1024, max_window=1 << 20, session_budget=4 << 20)
    pair = Pair(cfg, cfg)
    pair.handshake()
    stuck = open_pair(pair)
    live = open_pair(pair)
    pair.server.send_data(stuck, b"s" * (1 << 20))  # nobody consumes this one
    received = 0
    for _ in range(50):
        received_now = 0
        pair.server.send_data(live, b"l" * (1 << 20))
        pair.pump()
        for e in pair.take("client"):
            if isinstance(e, DataReceived) and e.stream_id == live:
                received_now += len(e.data)
                pair.client.consumed(live, len(e.data))
        pair.pump()
        received += received_now
        check_invariants(pair.client)
    assert received > 10 << 20
    assert pair.client.statistics().buffered == 64 * 1024  # only the stuck stream's one window


def test_window_grows_when_consumer_keeps_up_and_stays_within_max() -> None:
    cfg = MuxConfig(initial_window=64 * 1024, max_window=1 << 20, session_budget=8 << 20)
    pair = Pair(cfg, cfg)
    pair.handshake()
    sid = open_pair(pair)
    pair.client.ping()
    pair.clock.now += 0.05  # 50 ms RTT
    pair.pump()
    windows = []
    for _ in range(40):
        pair.server.send_data(sid, b"z" * (4 << 20))
        pair.clock.now += 0.01
        pair.pump()
        for e in pair.take("client"):
            if isinstance(e, DataReceived):
                pair.client.consumed(sid, len(e.data))
        pair.pump()
        windows.append(pair.server.send_window(sid))
    assert max(windows) > 64 * 1024
    assert max(windows) <= 1 << 20


def test_window_does_not_grow_for_a_slow_consumer() -> None:
    cfg = MuxConfig(initial_window=64 * 1024, max_window=1 << 20, session_budget=8 << 20)
    pair = Pair(cfg, cfg)
    pair.handshake()
    sid = open_pair(pair)
    pair.client.ping()  # the receiver's own RTT estimate drives its window
    pair.clock.now += 0.001
    pair.pump()
    for _ in range(20):
        pair.server.send_data(sid, b"z" * (4 << 20))
        pair.pump()
        pair.clock.now += 1.0  # the consumer takes a second per window
        for e in pair.take("client"):
            if isinstance(e, DataReceived):
                pair.client.consumed(sid, len(e.data))
        pair.pump()
        assert pair.server.send_window(sid) <= 64 * 1024


def test_session_budget_caps_the_sum_of_windows() -> None:
    budget = 512 * 1024
    cfg = MuxConfig(
        initial_window=256 * 1024, max_window=1 << 20, session_budget=budget, max_streams=64
    )
    pair = Pair(cfg, cfg)
    pair.handshake()
    sids = [open_pair(pair) for _ in range(8)]
    for sid in sids:
        pair.server.send_data(sid, b"q" * (1 << 20))
    pair.pump()
    stats = pair.client.statistics()
    assert stats.granted <= budget + 8 * MIN_WINDOW
    assert stats.buffered <= stats.granted
    check_invariants(pair.client)


def test_ping_measures_rtt_with_the_injected_clock() -> None:
    pair = Pair()
    pair.handshake()
    pair.take("server")
    payload = pair.server.ping()
    pair.deliver("server")
    pair.clock.now += 0.25
    pair.deliver("client")
    (pong,) = pair.take("server")
    assert pong == PongReceived(payload, 0.25)
    assert pair.server.srtt == 0.25


def test_ping_flood_is_refused() -> None:
    pair = Pair()
    pair.handshake()
    flood = b"".join(frame(FrameType.PING, 0, i.to_bytes(8, "big")) for i in range(100))
    with pytest.raises(RemoteProtocolError) as info:
        pair.server.receive_data(flood)
    assert info.value.code == ErrorCode.ENHANCE_YOUR_CALM


def test_goaway_drains_existing_streams_and_refuses_new() -> None:
    pair = Pair()
    pair.handshake()
    sid = open_pair(pair)
    pair.client.goaway(ErrorCode.NO_ERROR, "edge shutting down")
    pair.pump()
    gone = [e for e in pair.take("server") if isinstance(e, GoAwayReceived)]
    assert gone == [GoAwayReceived(sid, ErrorCode.NO_ERROR, "edge shutting down")]
    assert pair.server.peer_going_away
    with pytest.raises(LocalProtocolError):
        pair.server.open_stream(TARGET)
    # the open stream still works
    pair.server.send_data(sid, b"still here", end_stream=True)
    pair.pump()
    assert DataReceived(sid, b"still here") in pair.take("client")


def test_goaway_resets_our_unprocessed_streams() -> None:
    pair = Pair()
    pair.handshake()
    pair.take("client")
    sid = pair.server.open_stream(TARGET)
    pair.client.goaway()  # crosses the OPEN: the client had seen no stream
    pair.deliver("client")
    assert StreamReset(sid, ErrorCode.GOING_AWAY, "peer is going away") in pair.take("server")
    pair.deliver("server")  # the OPEN arrives after the client's GOAWAY: refused
    pair.deliver("client")
    assert pair.take("client") == []


def test_peer_stream_limit_refuses_extra_opens() -> None:
    pair = Pair(MuxConfig(max_streams=2), MuxConfig())
    pair.handshake()
    open_pair(pair)
    open_pair(pair)
    with pytest.raises(LocalProtocolError) as info:
        pair.server.open_stream(TARGET)
    assert info.value.code == ErrorCode.STREAM_LIMIT


def test_stream_limit_enforced_on_a_peer_that_ignores_it() -> None:
    pair = Pair(MuxConfig(max_streams=1), MuxConfig())
    pair.handshake()
    open_pair(pair)
    pair.client.receive_data(frame(FrameType.OPEN, 4, (65536).to_bytes(4, "big") + b"x:1"))
    out = bytes(pair.client.data_to_send())
    assert out[3] == FrameType.OPEN_RESULT and out[9:13] == ErrorCode.STREAM_LIMIT.to_bytes(
        4, "big"
    )


def test_frame_length_checked_from_the_header_alone() -> None:
    pair = Pair()
    pair.handshake()
    header = pack_header((1 << 24) - 1, FrameType.DATA, 0, 2)
    with pytest.raises(RemoteProtocolError) as info:
        pair.client.receive_data(header)  # no body needed to refuse it
    assert info.value.code == ErrorCode.FRAME_SIZE_ERROR
    assert pair.client.closed


def test_data_beyond_credit_is_a_flow_control_error() -> None:
    cfg = MuxConfig(initial_window=16 * 1024, max_window=16 * 1024, session_budget=1 << 20)
    pair = Pair(cfg, cfg)
    pair.handshake()
    sid = open_pair(pair)
    raw = frame(FrameType.DATA, sid, b"a" * (16 * 1024)) + frame(FrameType.DATA, sid, b"b")
    with pytest.raises(RemoteProtocolError) as info:
        pair.client.receive_data(raw)
    assert info.value.code == ErrorCode.FLOW_CONTROL_ERROR


def test_unknown_frame_types_are_skipped() -> None:
    pair = Pair()
    pair.handshake()
    pair.take("server")
    payload = pair.server.ping()
    raw = frame(0x42, 0, b"from the future") + bytes(pair.server.data_to_send())
    pair.client.receive_data(raw)  # the unknown frame is skipped, the PING after it answered
    got = pair.server.receive_data(bytes(pair.client.data_to_send()))
    assert [e.payload for e in got if isinstance(e, PongReceived)] == [payload]


def test_eof_terminates_and_forgets_streams() -> None:
    pair = Pair()
    pair.handshake()
    open_pair(pair)
    got = pair.server.receive_data(b"")
    assert isinstance(got[0], ConnectionTerminated)
    assert open_streams(pair.server) == 0 and pair.server.closed


def test_target_too_long_is_refused_locally() -> None:
    pair = Pair()
    pair.handshake()
    with pytest.raises(LocalProtocolError):
        pair.server.open_stream("a" * 10_000)


def test_frames_split_at_every_byte_boundary() -> None:
    pair = Pair()
    pair.handshake()
    sid = open_pair(pair)
    pair.server.send_data(sid, b"0123456789" * 10, end_stream=True)
    pair.server.ping()
    raw = bytes(pair.server.data_to_send())
    got = []
    for i in range(len(raw)):
        got += pair.client.receive_data(raw[i : i + 1])
    data = b"".join(e.data for e in got if isinstance(e, DataReceived))
    assert data == b"0123456789" * 10


def test_receive_data_copies_what_it_keeps_so_the_caller_may_reuse_its_buffer() -> None:
    """The copy contract the transport's shared read buffer relies on: after `receive_data`
    returns, nothing (event payloads, a partial frame) refers to the caller's buffer."""
    pair = Pair()
    pair.handshake()
    sid = pair.server.open_stream("test-svc-kins.kins-system:443")
    pair.pump()
    pair.client.accept_stream(sid)
    pair.pump()
    pair.take("client")
    pair.client.send_data(sid, b"A" * 1000)
    pair.client.send_data(sid, b"B" * 1000)
    wire = bytes(pair.client.data_to_send())
    shared = bytearray(len(wire))
    cut = len(wire) - 300  # the second frame arrives in two reads
    shared[:cut] = wire[:cut]
    first = pair.server.receive_data(memoryview(shared)[:cut])
    shared[:] = b"\xee" * len(shared)  # the next read reuses the buffer
    shared[:300] = wire[cut:]
    second = pair.server.receive_data(memoryview(shared)[:300])
    shared[:] = b"\xff" * len(shared)
    data = b"".join(e.data for e in first + second if isinstance(e, DataReceived))
    assert data == b"A" * 1000 + b"B" * 1000
