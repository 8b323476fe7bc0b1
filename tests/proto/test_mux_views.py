"""`receive_data(copy=False)`: DATA arrives as views of the caller's buffer, nothing else does."""

from __future__ import annotations

from kins_tunnel.proto.events import DataReceived, StreamEnded
from tests.proto.helpers import Pair
from tests.proto.test_mux import open_pair


def test_data_events_are_views_of_the_input_without_copy_and_bytes_by_default() -> None:
    pair = Pair()
    pair.handshake()
    pair.take("client"), pair.take("server")
    sid = open_pair(pair)
    pair.server.send_data(sid, b"first", end_stream=False)
    pair.server.send_data(sid, b"second", end_stream=True)
    wire = bytearray(pair.server.data_to_send())
    half = len(wire) - 3  # the last frame's body is split over two reads

    events = pair.client.receive_data(memoryview(wire)[:half], copy=False)
    events += pair.client.receive_data(memoryview(wire)[half:], copy=False)
    assert [type(e) for e in events] == [DataReceived, DataReceived, DataReceived, StreamEnded]
    pieces = [e.data for e in events if isinstance(e, DataReceived)]
    assert all(isinstance(p, memoryview) for p in pieces)
    assert b"".join(pieces) == b"firstsecond"
    wire[:] = bytes(len(wire))  # the caller reuses its buffer: the views see it (nothing kept)
    assert b"".join(pieces) == bytes(11)

    pair2 = Pair()
    pair2.handshake()
    pair2.take("client"), pair2.take("server")
    sid2 = open_pair(pair2)
    pair2.server.send_data(sid2, b"kept", end_stream=False)
    wire2 = bytearray(pair2.server.data_to_send())
    (event,) = pair2.client.receive_data(wire2)
    wire2[:] = bytes(len(wire2))
    assert isinstance(event, DataReceived) and event.data == b"kept"  # a copy by default
