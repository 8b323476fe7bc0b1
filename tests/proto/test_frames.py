from hypothesis import given
from hypothesis import strategies as st

from kins_tunnel.proto.frames import (
    HEADER_SIZE,
    FrameType,
    decode_text,
    encode_text,
    frame,
    pack_header,
    unpack_header,
)


@given(
    length=st.integers(0, (1 << 24) - 1),
    ftype=st.integers(0, 255),
    flags=st.integers(0, 255),
    sid=st.integers(0, (1 << 32) - 1),
)
def test_header_round_trip(length: int, ftype: int, flags: int, sid: int) -> None:
    raw = pack_header(length, ftype, flags, sid)
    assert len(raw) == HEADER_SIZE
    assert unpack_header(raw) == (length, ftype, flags, sid)


def test_frame_layout() -> None:
    raw = frame(FrameType.PING, 0, b"12345678", 1)
    assert raw == b"\x00\x00\x08\x06\x01\x00\x00\x00\x0012345678"


@given(st.text())
def test_text_is_cut_on_character_boundary(text: str) -> None:
    raw = encode_text(text, 10)
    assert len(raw) <= 10
    assert decode_text(raw) == raw.decode("utf-8")
