"""The DELAY frame (capability "delay"): stamps while DATA flows, answers from the receiver, the
pacer fed from them; peers without the capability get no stamps; malformed frames are refused."""

from __future__ import annotations

import pytest

from kins_tunnel.proto import Connection, Hello, RemoteProtocolError, Role
from kins_tunnel.proto.frames import (
    FLAG_ACK,
    U32,
    FrameType,
    delay_answer_frame,
    delay_stamp_frame,
    frame,
)
from kins_tunnel.proto.handshake import CAPABILITIES
from kins_tunnel.proto.pacer import STAMP_INTERVAL, PacingConfig
from tests.proto.helpers import Pair
from tests.proto.test_mux_scheduling import frames_of, open_streams


def delay_frames(wire: bytes) -> list[tuple[int, int]]:
    """(offset, payload length) of the DELAY frames in a byte stream."""
    return [(off, n) for off, ftype, _sid, n in frames_of(wire) if ftype == FrameType.DELAY]


def test_stamps_flow_with_data_and_answers_feed_the_pacer() -> None:
    pair = Pair()
    pair.handshake()
    assert "delay" in pair.client.capabilities
    (sid,) = open_streams(pair, 1)
    c = pair.client
    wire = bytearray()
    for _ in range(10):
        pair.clock.now += 1.5 * STAMP_INTERVAL
        c.send_data(sid, b"x" * 1000)
        c.write_output(wire.extend, 1 << 20)
    stamps = delay_frames(bytes(wire))
    assert len(stamps) == 10 and all(n == 4 for _o, n in stamps)
    pair.server.receive_data(bytes(wire))
    back = bytes(pair.server.data_to_send())
    answers = delay_frames(back)
    assert len(answers) == 10 and all(n == 12 for _o, n in answers)
    pacer = c.pacer
    assert pacer is not None and pacer.samples == 0
    c.receive_data(back)
    assert pacer.samples == 10
    assert pacer.queueing_delay == 0.0
    st = c.statistics().pacer
    assert st is not None and not st.engaged and st.samples == 10


def test_no_stamps_without_data_or_to_a_peer_without_the_capability() -> None:
    pair = Pair()
    pair.handshake()
    pair.clock.now += 1.0
    wire = bytearray()
    pair.client.ping()
    pair.client.write_output(wire.extend, 1 << 20)
    assert delay_frames(bytes(wire)) == []  # control alone: nothing to measure

    old = Pair()
    old.server = Connection(
        Role.SERVER, Hello(capabilities=CAPABILITIES - {"delay"}), clock=old.clock
    )
    old.handshake()
    assert "delay" not in old.client.capabilities
    (sid,) = open_streams(old, 1)
    old.clock.now += 1.0
    old.client.send_data(sid, b"x" * 1000)
    wire = bytearray()
    old.client.write_output(wire.extend, 1 << 20)
    assert delay_frames(bytes(wire)) == []


def test_pacing_disabled_still_answers_the_peers_stamps() -> None:
    pair = Pair()
    pair.server = Connection(
        Role.SERVER, Hello(), clock=pair.clock, pacing=PacingConfig(enabled=False)
    )
    pair.handshake()
    assert pair.server.pacer is None
    pair.server.receive_data(delay_stamp_frame(1234))
    assert len(delay_frames(bytes(pair.server.data_to_send()))) == 1


def test_unanswered_stamps_are_bounded() -> None:
    pair = Pair()
    pair.handshake()
    pair.server.receive_data(delay_stamp_frame(1) * 100)
    assert len(delay_frames(bytes(pair.server.data_to_send()))) == 16


@pytest.mark.parametrize(
    "raw",
    [
        frame(FrameType.DELAY, 0, b"\0\0\0"),  # short stamp
        frame(FrameType.DELAY, 0, b"\0" * 8, FLAG_ACK),  # short answer
        frame(FrameType.DELAY, 2, U32.pack(1)),  # on a stream
    ],
)
def test_malformed_delay_frames_end_the_connection(raw: bytes) -> None:
    pair = Pair()
    pair.handshake()
    with pytest.raises(RemoteProtocolError):
        pair.server.receive_data(raw)


def test_answers_nobody_asked_for_are_harmless() -> None:
    pair = Pair()
    pair.handshake()
    pair.clock.now = 5.0
    pair.client.receive_data(delay_answer_frame(0xFFFFFFFF, 0, 0xFFFFFFFF) * 3)
    pacer = pair.client.pacer
    assert pacer is not None and not pacer.engaged


def test_an_idle_connection_has_no_pacer_until_its_first_data_and_then_paces_as_before() -> None:
    pair = Pair()
    pair.handshake()
    c = pair.client
    for _ in range(3):  # idle: pings back and forth
        pair.clock.now += 10.0
        c.ping()
        pair.pump()
    assert c._pacer is None and c._control.probe is None  # an idle tunnel holds neither
    st = c.statistics().pacer  # reported as a fresh pacer would be, without making one
    assert st is not None and st.samples == 0 and not st.engaged
    assert c._pacer is None
    (sid,) = open_streams(pair, 1)
    pair.clock.now += 1.5 * STAMP_INTERVAL
    c.send_data(sid, b"x" * 1000)
    wire = bytearray()
    c.write_output(wire.extend, 1 << 20)
    assert c._pacer is not None and c._control.probe is not None
    assert len(delay_frames(bytes(wire))) == 1  # the first DATA carries its stamp, as before
    pair.server.receive_data(bytes(wire))
    c.receive_data(bytes(pair.server.data_to_send()))
    assert c._pacer.samples == 1


def test_a_bad_pacing_setting_is_refused_when_the_connection_is_made() -> None:
    with pytest.raises(ValueError, match="max_rate"):
        Connection(Role.CLIENT, Hello(), clock=lambda: 0.0, pacing=PacingConfig(max_rate=0.0))
