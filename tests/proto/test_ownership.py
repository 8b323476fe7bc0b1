"""The zero-copy contract of `Connection.write_output` (docs/DESIGN.md, "Transport objects and who
owns what"): the `write` callback gets views valid only until it returns. In debug mode
(`proto.ownership`, on for the whole test suite) a callback that keeps one is caught before the
core writes over or reuses the bytes it handed out; one that copies is never flagged."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kins_tunnel.proto import ownership
from kins_tunnel.proto.events import DataReceived
from kins_tunnel.proto.frames import FrameType, unpack_header
from kins_tunnel.proto.output import QUANTUM
from tests.proto.helpers import Pair
from tests.proto.test_mux_scheduling import CFG, open_streams


def open_pair(streams: int) -> tuple[Pair, list[int]]:
    pair = Pair(CFG, CFG)
    pair.handshake()
    sids = open_streams(pair, streams)
    pair.client.data_to_send()  # no control frame ahead of the DATA the tests queue
    return pair, sids


def keeps(kept: list[memoryview], how: Callable[[memoryview], memoryview]) -> Callable[..., None]:
    """A `write` callback that keeps `how(view)` of the DATA it gets (control frames, such as the
    pacer's delay stamps, it copies as it should)."""

    def write(view: memoryview) -> None:
        if unpack_header(view, 0)[1] == FrameType.DATA:
            kept.append(how(view))

    return write


def test_checks_are_on_in_the_test_suite() -> None:
    assert ownership.CHECKS


def test_the_view_handed_over_is_released_when_the_callback_returns() -> None:
    """Keeping the view itself is harmless by construction: it is released on return."""
    pair, (sid,) = open_pair(1)
    pair.client.ping()
    pair.client.send_data(sid, b"d" * 1000)
    kept: list[memoryview] = []
    pair.client.write_output(kept.append, 1 << 20)
    assert len(kept) == 2  # the control frames, then the stream's DATA
    for view in kept:
        with pytest.raises(ValueError, match="released"):
            bytes(view)


def test_a_callback_that_keeps_a_view_of_the_control_frames_is_caught() -> None:
    pair, _ = open_pair(0)
    pair.client.ping()
    kept: list[memoryview] = []
    with pytest.raises(ownership.OwnershipError, match="control frames"):
        pair.client.write_output(lambda v: kept.append(v[:]), 1 << 20)
    assert len(ownership.take_violations()) == 1


def test_a_callback_that_keeps_a_view_of_queued_data_is_caught() -> None:
    pair, (sid,) = open_pair(1)
    pair.client.send_data(sid, b"d" * 1000)
    kept: list[memoryview] = []
    with pytest.raises(ownership.OwnershipError, match="DATA queue"):
        pair.client.write_output(keeps(kept, memoryview), 1 << 20)
    assert len(ownership.take_violations()) == 1


def test_a_kept_view_of_a_split_frame_is_caught_before_the_rest_s_header_overwrites_it() -> None:
    """Two streams with frames larger than a turn: the first frame is split, and the header of
    its rest goes over the last bytes just handed out. A callback that kept even a slice of them
    would see them change: caught before they are overwritten, and they are still intact."""
    pair, (a, b) = open_pair(2)
    frame = 2 * QUANTUM
    pair.client.send_data(a, b"a" * frame)
    pair.client.send_data(b, b"b" * frame)
    kept: list[memoryview] = []
    with pytest.raises(ownership.OwnershipError, match="split frame"):
        pair.client.write_output(keeps(kept, lambda v: v[-16:]), 1 << 20)
    assert [bytes(v) for v in kept] == [b"a" * 16]  # not overwritten
    assert len(ownership.take_violations()) == 1


def test_a_copying_callback_is_never_flagged_and_every_byte_arrives() -> None:
    pair, sids = open_pair(3)
    frame = 2 * QUANTUM + 7
    for i, sid in enumerate(sids):
        pair.client.send_data(sid, bytes([65 + i]) * frame)
    got = dict.fromkeys(sids, b"")
    wire = bytearray()
    while pair.client.pending_output():
        pair.client.write_output(wire.extend, 100 * 1024)  # splits: three streams take turns
    for e in pair.server.receive_data(bytes(wire)):
        if isinstance(e, DataReceived):
            got[e.stream_id] += e.data
    assert got == {sid: bytes([65 + i]) * frame for i, sid in enumerate(sids)}
    assert ownership.take_violations() == []
