"""Frame codec: the 9-byte header and the payload layouts of each frame type.

Every frame is::

    +-----------------------+--------+--------+-------------------------------+
    | payload length (24)   | type(8)| flags(8)|        stream id (32)        |
    +-----------------------+--------+--------+-------------------------------+
    | payload (length bytes)                                                  |

Stream 0 is the connection itself (HELLO, PING, GOAWAY). Payload layouts (big-endian):

    HELLO        magic "KTUN", min version u16, max version u16, UTF-8 JSON object
    OPEN         receive window the opener grants u32, target name (UTF-8)
    OPEN_RESULT  error code u32 (0 = opened), window the acceptor grants u32, message (UTF-8)
    DATA         bytes; flag FIN ends the sender's direction
    WINDOW       credit increment u32 (> 0)
    RESET        error code u32, message (UTF-8)
    PING         8 opaque bytes; flag ACK marks the answer
    GOAWAY       last processed stream id u32, error code u32, reason (UTF-8)
    DELAY        (capability "delay") the sender's clock in µs mod 2**32, u32; flag ACK marks
                 the answer: the stamp echoed u32, the receiver's clock at receipt u32 (µs mod
                 2**32), DATA payload bytes it has received mod 2**32 u32 (see `pacer`)

Frames of an unknown type are skipped (after their length is checked), so later versions can add
frame types that older peers ignore.
"""

from __future__ import annotations

import enum
import struct

HEADER = struct.Struct(">I B I")  # (length << 8 | type) packed as u32, flags, stream id
HEADER_SIZE = 9
MAGIC = b"KTUN"
U32 = struct.Struct(">I")
U32x2 = struct.Struct(">II")
U32x3 = struct.Struct(">III")
HELLO_PREFIX = struct.Struct(">4sHH")

MAX_PAYLOAD_LIMIT = (1 << 24) - 1
MAX_CONTROL_PAYLOAD = 64 * 1024  # any non-DATA frame
MAX_MESSAGE = 512  # bytes of a human-readable message/reason we keep
PING_SIZE = 8
MAX_WINDOW_VALUE = (1 << 31) - 1


class FrameType(enum.IntEnum):
    HELLO = 0
    OPEN = 1
    OPEN_RESULT = 2
    DATA = 3
    WINDOW = 4
    RESET = 5
    PING = 6
    GOAWAY = 7
    DELAY = 8


FLAG_FIN = 0x1
FLAG_ACK = 0x1


def pack_header(length: int, ftype: int, flags: int, stream_id: int) -> bytes:
    """The 9 header bytes of a frame."""
    return HEADER.pack((length << 8) | ftype, flags, stream_id)


def unpack_header(
    buf: memoryview | bytes | bytearray, offset: int = 0
) -> tuple[int, int, int, int]:
    """(length, type, flags, stream id) of the header at `offset`."""
    word, flags, stream_id = HEADER.unpack_from(buf, offset)
    return word >> 8, word & 0xFF, flags, stream_id


def frame(ftype: int, stream_id: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """One whole frame (for control frames; DATA is framed in place by the connection)."""
    return pack_header(len(payload), ftype, flags, stream_id) + payload


def encode_text(text: str, limit: int = MAX_MESSAGE) -> bytes:
    """UTF-8, cut to `limit` bytes without splitting a character."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", "ignore").encode("utf-8")


def decode_text(raw: bytes | memoryview) -> str:
    return bytes(raw[:MAX_MESSAGE]).decode("utf-8", "replace")


# Control frames, one builder each: the payload layouts above live here and nowhere else.
def open_frame(stream_id: int, grant: int, target: bytes) -> bytes:
    return frame(FrameType.OPEN, stream_id, U32.pack(grant) + target)


def open_result_frame(stream_id: int, code: int, grant: int = 0, message: str = "") -> bytes:
    return frame(
        FrameType.OPEN_RESULT, stream_id, U32x2.pack(int(code), grant) + encode_text(message)
    )


def window_frame(stream_id: int, increment: int) -> bytes:
    return frame(FrameType.WINDOW, stream_id, U32.pack(increment))


def reset_frame(stream_id: int, code: int, message: str = "") -> bytes:
    return frame(FrameType.RESET, stream_id, U32.pack(int(code)) + encode_text(message))


def ping_frame(payload: bytes, ack: bool = False) -> bytes:
    return frame(FrameType.PING, 0, payload, FLAG_ACK if ack else 0)


# A PING and its answer are the whole traffic of an idle tunnel: their headers, made once.
PING_HEADER = pack_header(PING_SIZE, FrameType.PING, 0, 0)
PONG_HEADER = pack_header(PING_SIZE, FrameType.PING, FLAG_ACK, 0)
PING_FRAME_SIZE = HEADER_SIZE + PING_SIZE


def goaway_frame(last_stream_id: int, code: int, reason: str = "") -> bytes:
    return frame(FrameType.GOAWAY, 0, U32x2.pack(last_stream_id, int(code)) + encode_text(reason))


def delay_stamp_frame(stamp: int) -> bytes:
    return frame(FrameType.DELAY, 0, U32.pack(stamp))


def delay_answer_frame(echo: int, received_at: int, received: int) -> bytes:
    return frame(FrameType.DELAY, 0, U32x3.pack(echo, received_at, received), FLAG_ACK)
