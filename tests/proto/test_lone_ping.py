"""`Connection.answer_lone_ping`, the idle tunnel's path: a lone PING answered without events or
queue, exactly as `receive_data` would answer it, and nothing else taken for one."""

from __future__ import annotations

import pytest

from kins_tunnel.proto import Connection
from kins_tunnel.proto.events import DataReceived, PongReceived
from kins_tunnel.proto.frames import (
    FLAG_ACK,
    PING_FRAME_SIZE,
    PING_HEADER,
    FrameType,
    frame,
    ping_frame,
)
from tests.proto.helpers import Pair
from tests.proto.test_mux import open_pair

PAYLOAD = bytes(range(0xA0, 0xA8))


def test_a_lone_ping_is_answered_with_its_payload_as_receive_data_would() -> None:
    fast, slow = Pair(), Pair()
    fast.handshake()
    slow.handshake()
    ping = ping_frame(PAYLOAD)
    assert len(ping) == PING_FRAME_SIZE

    pong = fast.server.answer_lone_ping(memoryview(bytearray(ping)))
    assert slow.server.receive_data(ping) == []
    assert pong is not None and pong == bytes(slow.server.data_to_send())
    assert pong == ping_frame(PAYLOAD, ack=True)
    assert fast.server.pending_output() == 0  # the caller sends it: nothing was queued
    assert fast.server.peer_pings == slow.server.peer_pings == 1

    # the peer takes it as the answer to its PING: the same payload, an RTT sample
    sent = fast.client.ping(PAYLOAD)
    fast.client.data_to_send()
    fast.clock.now += 0.25
    (event,) = fast.client.receive_data(pong)
    assert isinstance(event, PongReceived) and event.payload == sent and event.rtt == 0.25


@pytest.mark.parametrize(
    "data",
    [
        ping_frame(PAYLOAD, ack=True),  # an answer, not a PING
        frame(FrameType.PING, 1, PAYLOAD),  # PING on a stream: a protocol error
        ping_frame(PAYLOAD) + ping_frame(PAYLOAD)[:1],  # more than the PING
        ping_frame(PAYLOAD)[:-1],  # less
        ping_frame(PAYLOAD) * 2,  # two of them
        frame(FrameType.PING, 0, PAYLOAD[:4] * 2, FLAG_ACK | 2),  # other flags
        frame(FrameType.WINDOW, 1, PAYLOAD),  # another frame of the same size
    ],
)
def test_anything_but_a_lone_ping_is_left_to_receive_data(data: bytes) -> None:
    pair = Pair()
    pair.handshake()
    assert pair.server.answer_lone_ping(data) is None
    assert pair.server.peer_pings == 0 and pair.server.pending_output() == 0


def test_no_answer_before_the_hello_or_after_the_end() -> None:
    fresh = Connection(Pair().server.role)
    assert fresh.answer_lone_ping(ping_frame(PAYLOAD)) is None  # still in the handshake
    pair = Pair()
    pair.handshake()
    pair.server.close()
    assert pair.server.answer_lone_ping(ping_frame(PAYLOAD)) is None


def test_bytes_that_look_like_a_ping_inside_a_data_body_are_data() -> None:
    """A DATA body under way (its header in an earlier read) may hold the very bytes of a PING:
    they are the stream's, never answered."""
    pair = Pair()
    pair.handshake()
    sid = open_pair(pair)
    body = ping_frame(PAYLOAD)
    pair.client.send_data(sid, b"x" + body)
    wire = bytes(pair.client.data_to_send())
    head, tail = wire[:-PING_FRAME_SIZE], wire[-PING_FRAME_SIZE:]
    assert tail == body
    (first,) = pair.server.receive_data(head)
    assert isinstance(first, DataReceived) and bytes(first.data) == b"x"

    assert pair.server.answer_lone_ping(tail) is None
    (rest,) = pair.server.receive_data(tail)
    assert isinstance(rest, DataReceived) and bytes(rest.data) == body
    assert pair.server.peer_pings == 0


def test_a_partial_frame_buffered_takes_the_ping_bytes_as_its_rest() -> None:
    """A PING's bytes right after part of a frame's header complete that frame, never a PING."""
    pair = Pair()
    pair.handshake()
    pair.server.receive_data(PING_HEADER[:4])  # part of a header
    assert pair.server.answer_lone_ping(ping_frame(PAYLOAD)) is None
