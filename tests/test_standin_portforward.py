"""The stand-in's port-forward: SPDY/3.1 framing and the portforward.k8s.io session, driven by a
small client written here (real kubectl drives it through the tunnel in
tests/e2e/test_remote_ops.py), and bad input."""

from __future__ import annotations

import hashlib
import struct
import zlib

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from kins_tunnel.testing.portforward import (
    GOAWAY,
    RST_STREAM,
    SPDY_DICTIONARY,
    SPDY_DICTIONARY_ID,
    SYN_REPLY,
    Data,
    PingFrame,
    RawTransport,
    SpdyFramer,
    SpdyProtocolError,
    SynStream,
    serve_port_forward,
)


class Client:
    """The client side of SPDY, as far as kubectl's port-forward uses it."""

    def __init__(self) -> None:
        self.deflate = zlib.compressobj(zdict=SPDY_DICTIONARY)
        self.inflate = zlib.decompressobj(zdict=SPDY_DICTIONARY)

    def syn_stream(self, sid: int, headers: dict[str, str], version: int = 3) -> bytes:
        block = struct.pack("!I", len(headers)) + b"".join(
            struct.pack("!I", len(k)) + k.encode() + struct.pack("!I", len(v)) + v.encode()
            for k, v in headers.items()
        )
        body = (
            struct.pack("!IIH", sid, 0, 0)
            + self.deflate.compress(block)
            + self.deflate.flush(zlib.Z_SYNC_FLUSH)
        )
        return struct.pack("!HHI", 0x8000 | version, 1, len(body)) + body

    @staticmethod
    def data(sid: int, payload: bytes, fin: bool = False) -> bytes:
        return struct.pack("!II", sid, (1 << 24 if fin else 0) | len(payload)) + payload

    @staticmethod
    def frames(buf: bytearray) -> list[tuple[bool, int, int, bytes]]:
        """(control?, type or stream id, flags, body) of the whole frames in `buf` (consumed)."""
        out = []
        while len(buf) >= 8:
            first, fl = struct.unpack_from("!II", buf)
            length = fl & 0xFFFFFF
            if len(buf) < 8 + length:
                break
            body = bytes(buf[8 : 8 + length])
            del buf[: 8 + length]
            control = bool(first & 0x80000000)
            out.append((control, first & 0xFFFF if control else first, fl >> 24, body))
        return out


def test_dictionary_is_the_one_spdy3_peers_announce() -> None:
    assert zlib.adler32(SPDY_DICTIONARY) == SPDY_DICTIONARY_ID
    assert len(SPDY_DICTIONARY) == 1423
    deflate = zlib.compressobj(zdict=SPDY_DICTIONARY)
    stream = deflate.compress(b"x") + deflate.flush()
    assert stream[1] & 0x20  # FDICT: a dictionary is announced, by its Adler-32
    assert struct.unpack("!I", stream[2:6])[0] == SPDY_DICTIONARY_ID


def test_framer_reads_what_a_client_sends() -> None:
    client, framer = Client(), SpdyFramer()
    wire = (
        client.syn_stream(1, {"streamType": "error", "port": "7", "requestID": "0"})
        + client.syn_stream(3, {"streamType": "data", "port": "7", "requestID": "0"})
        + client.data(3, b"hello", fin=True)
        + struct.pack("!HHII", 0x8003, 6, 4, 1)
    )  # PING 1
    events = []
    for i in range(len(wire)):  # one byte at a time: frames may be cut anywhere
        events += framer.receive_data(wire[i : i + 1])
    assert events == [
        SynStream(1, {"streamtype": "error", "port": "7", "requestid": "0"}, False),
        SynStream(3, {"streamtype": "data", "port": "7", "requestid": "0"}, False),
        Data(3, b"hello", True),
        PingFrame(1),
    ]
    # our replies decode with the client's own zlib context
    reply = bytearray(framer.syn_reply(1) + framer.syn_reply(3))
    for control, kind, _, body in Client.frames(reply):
        assert control and kind == SYN_REPLY
        assert client.inflate.decompress(body[4:]) == b"\0\0\0\0"


@pytest.mark.parametrize(
    "wire",
    [
        struct.pack("!HHI", 0x8002, 1, 0),  # SPDY/2
        struct.pack("!HHI", 0x8003, 1, 4) + b"\0\0\0\1",  # short SYN_STREAM
        struct.pack("!HHI", 0x8003, 1, 20) + b"\0\0\0\1\0\0\0\0\0\0" + b"not zlib..",
        struct.pack("!HHI", 0x8003, 99, 0),  # unknown control frame
        struct.pack("!HHI", 0x8003, 3, 3) + b"abc",  # bad RST_STREAM
        struct.pack("!II", 1, 2 << 20),  # too large
    ],
)
def test_framer_rejects_bad_frames(wire: bytes) -> None:
    with pytest.raises(SpdyProtocolError):
        SpdyFramer().receive_data(wire)


def test_header_bomb_is_refused() -> None:
    client = Client()
    frame = client.syn_stream(1, {"x": "a" * 200_000})
    with pytest.raises(SpdyProtocolError, match="too large"):
        SpdyFramer().receive_data(frame)


@given(st.binary(max_size=400))
@settings(max_examples=300, deadline=None)
def test_random_bytes_give_events_or_the_protocol_error(data: bytes) -> None:
    try:
        SpdyFramer().receive_data(data)
    except SpdyProtocolError:
        pass


async def read_frames(
    stream: trio.abc.ReceiveStream, buf: bytearray, count: int
) -> list[tuple[bool, int, int, bytes]]:
    out: list[tuple[bool, int, int, bytes]] = []
    while len(out) < count:
        out += Client.frames(buf)
        if len(out) >= count:
            break
        data = await stream.receive_some(65536)
        assert data, f"closed after {out}"
        buf += data
    return out


async def test_session_echo_digest_and_refusals() -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    client = Client()
    buf = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_port_forward, RawTransport(server_end), "pod")
        with trio.fail_after(10):
            await client_end.send_all(
                client.syn_stream(1, {"streamType": "error", "port": "9", "requestID": "0"})
                + client.syn_stream(3, {"streamType": "data", "port": "9", "requestID": "0"})
                + client.data(1, b"", fin=True)
                + client.data(3, b"abc")
                + client.data(3, b"def", fin=True)
            )
            frames = await read_frames(client_end, buf, 5)
            assert [(c, k) for c, k, _, _ in frames[:2]] == [(True, SYN_REPLY), (True, SYN_REPLY)]
            digest = f"{hashlib.sha256(b'abcdef').hexdigest()} 6\n".encode()
            assert frames[2] == (False, 3, 0, digest)
            assert frames[3] == (False, 3, 1, b"")  # data stream ends
            assert frames[4] == (False, 1, 1, b"")  # error stream ends, empty: no error
            # a port nothing serves: the reason on the error stream
            await client_end.send_all(
                client.syn_stream(5, {"streamType": "error", "port": "22", "requestID": "1"})
                + client.syn_stream(7, {"streamType": "data", "port": "22", "requestID": "1"})
            )
            frames = await read_frames(client_end, buf, 4)
            assert frames[2] == (False, 7, 1, b"")
            assert frames[3][:3] == (False, 5, 1) and b"serve only ports 7, 9" in frames[3][3]
            # an unknown stream type is refused; a stream id going backwards ends the session
            await client_end.send_all(client.syn_stream(9, {"streamType": "shell", "port": "7"}))
            (frame,) = await read_frames(client_end, buf, 1)
            assert frame[:2] == (True, RST_STREAM)
            await client_end.send_all(client.syn_stream(3, {"streamType": "data", "port": "7"}))
            (frame,) = await read_frames(client_end, buf, 1)
            assert frame[:2] == (True, GOAWAY)
        nursery.cancel_scope.cancel()
