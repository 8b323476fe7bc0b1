"""A hand-driven protocol peer over real TLS, for hostile-peer tests: it holds a valid certificate
(edge or cloud), completes the handshake like a real peer, and then sends whatever frames a test
wants, byte for byte, including ones no real peer would send. A test double, not a tunnel end."""

from __future__ import annotations

import random
import ssl
import struct
from dataclasses import dataclass, field

import trio

from kins_tunnel.proto import Hello, MuxConfig
from kins_tunnel.proto.frames import HEADER, HEADER_SIZE, FrameType, frame
from kins_tunnel.proto.handshake import encode_hello

U32 = struct.Struct(">I")


def hello_frame(names: tuple[str, ...] = (), config: MuxConfig = MuxConfig()) -> bytes:
    return frame(
        FrameType.HELLO, 0, encode_hello(Hello(names=names, agent="raw-test-peer"), config)
    )


@dataclass
class RawPeer:
    """One TLS connection; `frames()` parses what the other side sends."""

    stream: trio.SSLStream[trio.SocketStream]
    _buf: bytearray = field(default_factory=bytearray)

    @classmethod
    async def connect(
        cls, port: int, context: ssl.SSLContext, server_hostname: str = "localhost"
    ) -> RawPeer:
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        tls = trio.SSLStream(tcp, context, server_hostname=server_hostname, https_compatible=True)
        try:
            await tls.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(tls)
            raise
        return cls(tls)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def read_frame(self) -> tuple[int, int, int, bytes] | None:
        """(type, flags, stream id, payload) of the next frame, None at EOF."""
        while True:
            if len(self._buf) >= HEADER_SIZE:
                word, flags, sid = HEADER.unpack_from(self._buf)
                length = word >> 8
                if len(self._buf) >= HEADER_SIZE + length:
                    payload = bytes(self._buf[HEADER_SIZE : HEADER_SIZE + length])
                    del self._buf[: HEADER_SIZE + length]
                    return word & 0xFF, flags, sid, payload
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self._buf += data

    async def wait_for(self, ftype: int) -> tuple[int, int, int, bytes]:
        while True:
            f = await self.read_frame()
            assert f is not None, f"connection closed while waiting for frame type {ftype}"
            if f[0] == ftype:
                return f

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


# ---------------------------------------------------------------- random frames
CODES = [0, 1, 2, 7, 9, 10, 14, 15, 99, 255, 1 << 16, (1 << 32) - 1]


def random_frame(rng: random.Random, sids: list[int], targets: tuple[bytes, ...] = ()) -> bytes:
    """One frame as a hostile peer might send it: known and unknown types, odd stream ids,
    short or oversized payloads, codes this version does not know, random flags. OPEN frames name
    one of a few fixed targets, `targets`, or random bytes."""
    roll = rng.random()
    ftype = rng.randrange(8) if roll < 0.85 else rng.randrange(8, 256)
    sid = (
        rng.choice([0, 1, 2, 3, 4, rng.randrange(1 << 32), *sids])
        if rng.random() < 0.5 or not sids
        else rng.choice(sids)
    )
    flags = rng.choice([0, 0, 1, rng.randrange(256)])
    code = rng.choice(CODES) if rng.random() < 0.8 else rng.randrange(1 << 32)
    shape = rng.random()
    if shape < 0.15:  # a short or random payload, whatever the type wants
        payload = rng.randbytes(rng.randrange(0, 12))
    elif shape < 0.2:  # too large for a control frame (or for max_frame if DATA)
        payload = bytes(rng.choice([65537, 300 * 1024]))
    elif ftype == FrameType.OPEN:
        payload = U32.pack(rng.choice([0, 1, 16384, 1 << 20, (1 << 32) - 1])) + rng.choice(
            [
                b"test-svc-kins.kins-system:443",
                b"fuzz1:22",
                b"\xff\xfe",
                b"",
                rng.randbytes(20),
                *targets,
            ]
        )
    elif ftype == FrameType.OPEN_RESULT:
        payload = (
            U32.pack(code)
            + U32.pack(rng.choice([0, 16384, 1 << 20, (1 << 32) - 1]))
            + rng.randbytes(rng.randrange(0, 8))
        )
    elif ftype == FrameType.DATA:
        payload = rng.randbytes(rng.choice([0, 1, 100, 20000]))
    elif ftype == FrameType.WINDOW:
        payload = U32.pack(rng.choice([0, 1, 65536, (1 << 31) - 1, (1 << 32) - 1]))
    elif ftype == FrameType.RESET:
        payload = U32.pack(code) + rng.choice([b"", b"why", b"\xff" * 3])
    elif ftype == FrameType.PING:
        payload = rng.randbytes(8)
    elif ftype == FrameType.GOAWAY:
        payload = (
            U32.pack(rng.randrange(1 << 32)) + U32.pack(code) + rng.randbytes(rng.randrange(0, 6))
        )
    elif ftype == FrameType.HELLO:
        payload = hello_frame()[HEADER_SIZE:]
    else:
        payload = rng.randbytes(rng.randrange(0, 40))
    return HEADER.pack((len(payload) << 8) | ftype, flags, sid) + payload


def mutate(rng: random.Random, data: bytes) -> bytes:
    """Flip, drop or duplicate a few bytes of a legitimate frame sequence."""
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 6)):
        if not buf:
            break
        i = rng.randrange(len(buf))
        op = rng.random()
        if op < 0.6:
            buf[i] = rng.randrange(256)
        elif op < 0.8:
            del buf[i : i + rng.randrange(1, 10)]
        else:
            buf[i:i] = buf[i : i + rng.randrange(1, 10)]
    return bytes(buf)
