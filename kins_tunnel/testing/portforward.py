"""`kubectl port-forward` for the K3s API stand-in: the portforward.k8s.io protocol over SPDY/3.1.

kubectl 1.30 upgrades ``POST .../pods/NAME/portforward`` to SPDY/3.1 (``Upgrade: SPDY/3.1``,
``X-Stream-Protocol-Version: portforward.k8s.io``); with ``KUBECTL_PORT_FORWARD_WEBSOCKETS=true``
(the default from 1.31) it sends ``GET`` with ``Upgrade: websocket`` and the subprotocol
``SPDY/3.1+portforward.k8s.io``, and then speaks the same SPDY inside binary WebSocket messages.
For every local connection the client opens two SPDY streams with the headers ``streamType``
(``error``, then ``data``), ``port`` and ``requestID``; the server replies to each (SYN_REPLY), relays
the data stream to the pod's port, writes a message on the error stream if forwarding fails, and
ends both with FIN. kubectl waits for the end of the error stream before it lets a connection go.

This is a test double, not a pod network: the stand-in's pods have built-in services only, and
port-forward reaches nothing else:

| pod port | service |
| --- | --- |
| 7 | echo: every byte comes back; the client's end of input ends the answer |
| 9 | digest: reads to the end of input, then answers ``<sha256 hex> <byte count>\\n`` |

SPDY framing is small and written here (there is no maintained SPDY library for Python): 8-byte
frame headers, control frames SYN_STREAM, SYN_REPLY, RST_STREAM, PING, GOAWAY (SETTINGS,
WINDOW_UPDATE and HEADERS are read and ignored: the Go client, spdystream, does no flow control),
header blocks compressed with zlib and the SPDY/3 dictionary. The WebSocket layer is wsproto's.
Every frame, header block and stream count is bounded; a peer that breaks the rules ends only its
own connection (GOAWAY, then close).
"""

from __future__ import annotations

import hashlib
import logging
import struct
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio
from wsproto.connection import Connection, ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

log = logging.getLogger(__name__)

SPDY_VERSION = 3
SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = (
    1,
    2,
    3,
    4,
    6,
    7,
    8,
    9,
)
FLAG_FIN = 0x01
RST_PROTOCOL_ERROR, RST_REFUSED_STREAM = 1, 3
MAX_FRAME = 1 << 20  # largest frame accepted (spdystream sends at most 32 KiB of data)
MAX_HEADER_BLOCK = 64 * 1024  # decompressed header block
MAX_STREAMS = 256
READ_TIMEOUT = 90.0  # kubectl pings its SPDY connection every few seconds: silence means gone
WRITE_TIMEOUT = 60.0
CHUNK = 32 * 1024
WEBSOCKET_PROTOCOL = "SPDY/3.1+portforward.k8s.io"

# The zlib dictionary of SPDY/3 header compression: the spec's list of length-prefixed words,
# then a run of status codes, reason phrases, dates and media types.
_DICTIONARY_WORDS = (
    "options head post put delete trace accept accept-charset accept-encoding accept-language "
    "accept-ranges age allow authorization cache-control connection content-base "
    "content-encoding content-language content-length content-location content-md5 "
    "content-range content-type date etag expect expires from host if-match if-modified-since "
    "if-none-match if-range if-unmodified-since last-modified location max-forwards pragma "
    "proxy-authenticate proxy-authorization range referer retry-after server te trailer "
    "transfer-encoding upgrade user-agent vary via warning www-authenticate method get status "
    "200\0OK version HTTP/1.1 url public set-cookie keep-alive origin"
).split()  # \0: a space
_DICTIONARY_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request"
    "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented"
    "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, "
    "Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,application/xml,"
    "application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=gzip,deflate,sdch"
    "charset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
SPDY_DICTIONARY = (
    b"".join(struct.pack("!I", len(w)) + w.replace("\0", " ").encode() for w in _DICTIONARY_WORDS)
    + _DICTIONARY_TAIL.encode()
)
SPDY_DICTIONARY_ID = 0xE3C6A7C2  # its Adler-32, as every SPDY/3 peer announces it in zlib headers


class SpdyProtocolError(Exception):
    """The peer broke SPDY/3.1 framing rules; the connection ends."""


@dataclass(frozen=True)
class SynStream:
    stream_id: int
    headers: dict[str, str]
    fin: bool


@dataclass(frozen=True)
class Data:
    stream_id: int
    data: bytes
    fin: bool


@dataclass(frozen=True)
class RstStream:
    stream_id: int
    status: int


@dataclass(frozen=True)
class PingFrame:
    ping_id: int


@dataclass(frozen=True)
class GoAway:
    last_stream_id: int


SpdyEvent = SynStream | Data | RstStream | PingFrame | GoAway


class SpdyFramer:
    """Sans-IO SPDY/3.1 framing for the server side: bytes in, events out; frames as bytes."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._inflate = zlib.decompressobj(zdict=SPDY_DICTIONARY)
        self._deflate = zlib.compressobj(zdict=SPDY_DICTIONARY)

    def receive_data(self, data: bytes) -> list[SpdyEvent]:
        self._buf += data
        events: list[SpdyEvent] = []
        while len(self._buf) >= 8:
            first, flags_len = struct.unpack_from("!II", self._buf)
            flags, length = flags_len >> 24, flags_len & 0xFFFFFF
            if length > MAX_FRAME:
                raise SpdyProtocolError(f"frame of {length} bytes")
            if len(self._buf) < 8 + length:
                break
            body = bytes(self._buf[8 : 8 + length])
            del self._buf[: 8 + length]
            if not first & 0x80000000:
                events.append(Data(first & 0x7FFFFFFF, body, bool(flags & FLAG_FIN)))
                continue
            version, kind = (first >> 16) & 0x7FFF, first & 0xFFFF
            if version != SPDY_VERSION:
                raise SpdyProtocolError(f"SPDY version {version}")
            event = self._control(kind, flags, body)
            if event is not None:
                events.append(event)
        return events

    def _control(self, kind: int, flags: int, body: bytes) -> SpdyEvent | None:
        if kind == SYN_STREAM:
            if len(body) < 10:
                raise SpdyProtocolError("short SYN_STREAM")
            stream_id = struct.unpack_from("!I", body)[0] & 0x7FFFFFFF
            return SynStream(stream_id, self._headers(body[10:]), bool(flags & FLAG_FIN))
        if kind == RST_STREAM:
            if len(body) != 8:
                raise SpdyProtocolError("bad RST_STREAM")
            stream_id, status = struct.unpack("!II", body)
            return RstStream(stream_id & 0x7FFFFFFF, status)
        if kind == PING:
            if len(body) != 4:
                raise SpdyProtocolError("bad PING")
            return PingFrame(struct.unpack("!I", body)[0])
        if kind == GOAWAY:
            if len(body) < 4:
                raise SpdyProtocolError("bad GOAWAY")
            return GoAway(struct.unpack_from("!I", body)[0] & 0x7FFFFFFF)
        if kind == HEADERS and len(body) >= 4:
            self._headers(body[4:])  # keep the shared zlib context in step; content unused
            return None
        if kind in (SYN_REPLY, SETTINGS, WINDOW_UPDATE, HEADERS):
            return None
        raise SpdyProtocolError(f"control frame type {kind}")

    def _headers(self, block: bytes) -> dict[str, str]:
        try:
            raw = self._inflate.decompress(block, MAX_HEADER_BLOCK)
        except zlib.error as exc:
            raise SpdyProtocolError(f"header block: {exc}") from None
        if self._inflate.unconsumed_tail:
            raise SpdyProtocolError("header block too large")
        try:
            count = struct.unpack_from("!I", raw)[0]
            pos, headers = 4, {}
            for _ in range(count):
                size = struct.unpack_from("!I", raw, pos)[0]
                name = raw[pos + 4 : pos + 4 + size].decode("latin-1")
                pos += 4 + size
                size = struct.unpack_from("!I", raw, pos)[0]
                value = raw[pos + 4 : pos + 4 + size].decode("latin-1")
                pos += 4 + size
                if pos > len(raw):
                    raise struct.error("header block cut short")
                headers[name.lower()] = value.split("\0")[0]
        except struct.error as exc:
            raise SpdyProtocolError(f"header block: {exc}") from None
        return headers

    def syn_reply(self, stream_id: int, headers: dict[str, str] | None = None) -> bytes:
        pairs = list((headers or {}).items())
        block = struct.pack("!I", len(pairs)) + b"".join(
            struct.pack("!I", len(k)) + k.encode() + struct.pack("!I", len(v)) + v.encode()
            for k, v in pairs
        )
        compressed = self._deflate.compress(block) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
        return self._control_frame(SYN_REPLY, 0, struct.pack("!I", stream_id) + compressed)

    def data(self, stream_id: int, payload: bytes, fin: bool = False) -> bytes:
        return (
            struct.pack("!II", stream_id, (FLAG_FIN if fin else 0) << 24 | len(payload)) + payload
        )

    def rst_stream(self, stream_id: int, status: int) -> bytes:
        return self._control_frame(RST_STREAM, 0, struct.pack("!II", stream_id, status))

    def ping(self, ping_id: int) -> bytes:
        return self._control_frame(PING, 0, struct.pack("!I", ping_id))

    def goaway(self, last_stream_id: int, status: int = 0) -> bytes:
        return self._control_frame(GOAWAY, 0, struct.pack("!II", last_stream_id, status))

    @staticmethod
    def _control_frame(kind: int, flags: int, body: bytes) -> bytes:
        return struct.pack("!HHI", 0x8000 | SPDY_VERSION, kind, flags << 24 | len(body)) + body


# ------------------------------------------------------------------------------------- transports


class _Transport:
    """Bytes to and from the client: the upgraded TLS stream, or binary WebSocket messages."""

    async def receive(self) -> bytes:
        raise NotImplementedError

    async def send(self, data: bytes) -> None:
        raise NotImplementedError


class RawTransport(_Transport):
    def __init__(self, stream: trio.abc.Stream, trailing: bytes = b"") -> None:
        self.stream = stream
        self.pending = trailing

    async def receive(self) -> bytes:
        if self.pending:
            data, self.pending = self.pending, b""
            return data
        with trio.fail_after(READ_TIMEOUT):
            return bytes(await self.stream.receive_some(65536))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)


class WebSocketTransport(_Transport):
    def __init__(self, stream: trio.abc.Stream, ws: Connection) -> None:
        self.stream = stream
        self.ws = ws
        self.lock = trio.Lock()

    async def receive(self) -> bytes:
        while True:
            out = bytearray()
            for event in self.ws.events():
                if isinstance(event, BytesMessage):
                    out += event.data
                elif isinstance(event, Ping) and self.ws.state is ConnectionState.OPEN:
                    await self._send_raw(self.ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    if self.ws.state is ConnectionState.REMOTE_CLOSING:
                        await self._send_raw(self.ws.send(event.response()))
                    return bytes(out)  # b"" when nothing else came: the end
                elif isinstance(event, TextMessage):
                    raise SpdyProtocolError("text message on a port-forward WebSocket")
            if out:
                return bytes(out)
            with trio.fail_after(READ_TIMEOUT):
                data = await self.stream.receive_some(65536)
            self.ws.receive_data(bytes(data) if data else None)

    async def send(self, data: bytes) -> None:
        if self.ws.state is not ConnectionState.OPEN:
            raise trio.BrokenResourceError("WebSocket closing")
        await self._send_raw(self.ws.send(BytesMessage(data=data)))

    async def _send_raw(self, data: bytes) -> None:
        async with self.lock:
            await self.stream.send_all(data)


# ------------------------------------------------------------------------------------- services

Reader = Callable[[], Awaitable[bytes]]
Writer = Callable[[bytes], Awaitable[None]]


async def _echo(read: Reader, write: Writer) -> None:
    while data := await read():
        await write(data)


async def _digest(read: Reader, write: Writer) -> None:
    digest, total = hashlib.sha256(), 0
    while data := await read():
        digest.update(data)
        total += len(data)
    await write(f"{digest.hexdigest()} {total}\n".encode())


SERVICES: dict[int, Callable[[Reader, Writer], Awaitable[None]]] = {7: _echo, 9: _digest}


# ------------------------------------------------------------------------------------- session


@dataclass
class _Pair:
    request_id: str
    port: str
    error_id: int | None = None
    data_id: int | None = None
    inbound: tuple[trio.MemorySendChannel[bytes], trio.MemoryReceiveChannel[bytes]] = field(
        default_factory=lambda: trio.open_memory_channel[bytes](16)
    )
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class _Session:
    def __init__(self, transport: _Transport, pod: str) -> None:
        self.transport = transport
        self.pod = pod
        self.framer = SpdyFramer()
        self.lock = trio.Lock()
        self.pairs: dict[str, _Pair] = {}
        self.by_stream: dict[int, _Pair] = {}
        self.last_stream = 0

    async def send(self, frame: bytes) -> None:
        async with self.lock:
            with trio.fail_after(WRITE_TIMEOUT):
                await self.transport.send(frame)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            try:
                while True:
                    data = await self.transport.receive()
                    if not data:
                        return
                    for event in self.framer.receive_data(data):
                        if not await self.handle(event, nursery):
                            return
            except SpdyProtocolError as exc:
                log.debug("port-forward: %s", exc)
                await self.send(self.framer.goaway(self.last_stream, 1))
            finally:
                nursery.cancel_scope.cancel()

    async def handle(self, event: SpdyEvent, nursery: trio.Nursery) -> bool:
        if isinstance(event, SynStream):
            await self.open_stream(event, nursery)
        elif isinstance(event, Data):
            pair = self.by_stream.get(event.stream_id)
            if pair is not None and event.stream_id == pair.data_id:
                sender = pair.inbound[0]
                try:
                    if event.data:
                        await sender.send(event.data)
                    if event.fin:
                        sender.close()
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    pass  # data after FIN, or the service is gone: dropped
        elif isinstance(event, RstStream):
            pair = self.by_stream.get(event.stream_id)
            if pair is not None:
                pair.scope.cancel()
                pair.inbound[0].close()
        elif isinstance(event, PingFrame):
            await self.send(self.framer.ping(event.ping_id))
        elif isinstance(event, GoAway):
            return False
        return True

    async def open_stream(self, event: SynStream, nursery: trio.Nursery) -> None:
        sid = event.stream_id
        if sid <= self.last_stream or sid % 2 == 0:
            raise SpdyProtocolError(f"stream id {sid} out of order")
        self.last_stream = sid
        kind, port = event.headers.get("streamtype", ""), event.headers.get("port", "")
        request_id = event.headers.get("requestid", port)
        pair = self.pairs.get(request_id)
        if (
            kind not in ("error", "data")
            or len(self.by_stream) >= 2 * MAX_STREAMS
            or (pair is not None and (getattr(pair, f"{kind}_id") is not None or pair.port != port))
        ):
            await self.send(self.framer.rst_stream(sid, RST_REFUSED_STREAM))
            return
        await self.send(self.framer.syn_reply(sid))
        if pair is None:
            pair = self.pairs[request_id] = _Pair(request_id, port)
        setattr(pair, f"{kind}_id", sid)
        self.by_stream[sid] = pair
        if pair.error_id is not None and pair.data_id is not None:
            nursery.start_soon(self.forward, pair)

    async def forward(self, pair: _Pair) -> None:
        assert pair.error_id is not None and pair.data_id is not None
        data_id, error_id = pair.data_id, pair.error_id
        receiver = pair.inbound[1]

        async def read() -> bytes:
            try:
                return await receiver.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return b""

        async def write(data: bytes) -> None:
            for i in range(0, len(data), CHUNK):
                await self.send(self.framer.data(data_id, data[i : i + CHUNK]))

        message = b""
        service = SERVICES.get(int(pair.port)) if pair.port.isdigit() else None
        try:
            with pair.scope:
                if service is None:
                    message = (
                        f"error forwarding port {pair.port} to pod {self.pod}: the K3s API "
                        f"stand-in's pods serve only ports "
                        f"{', '.join(map(str, sorted(SERVICES)))}"
                    ).encode()
                else:
                    await service(read, write)
            if not pair.scope.cancelled_caught:
                await self.send(self.framer.data(data_id, b"", fin=True))
                await self.send(self.framer.data(error_id, message, fin=True))
        finally:
            self.pairs.pop(pair.request_id, None)
            self.by_stream.pop(data_id, None)
            self.by_stream.pop(error_id, None)


async def serve_port_forward(transport: _Transport, pod: str) -> None:
    """Serve one upgraded port-forward connection until the client ends it.

    Raises trio stream errors if the client goes away; a protocol violation ends the session
    with a GOAWAY.
    """
    await _Session(transport, pod).run()
