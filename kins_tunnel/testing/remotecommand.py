"""The Kubernetes remote-command protocol over WebSocket, server side, for the K3s API stand-in.

This is what `kubectl exec`, `attach` and `cp` speak (kubectl ≥ 1.30 tries it before SPDY): a
``GET .../pods/NAME/exec?command=...&stdin=..&stdout=..&stderr=..&tty=..`` with ``Upgrade:
websocket`` and subprotocols ``v5.channel.k8s.io`` / ``v4.channel.k8s.io``. After the 101, every
binary message starts with a channel byte: 0 stdin (client → server), 1 stdout, 2 stderr,
3 error (a `metav1.Status` as JSON, sent once when the command ends), 4 resize (JSON terminal size,
client → server). v5 adds the message ``[255, channel]``: the client closed that channel (for
stdin: end of input, so ``exec -i -- sha256sum`` can finish). The server ends the exec by sending
the Status on channel 3 and a WebSocket close 1000; kubectl exits with the code in the Status.

The WebSocket framing (handshake, masking, fragmentation, ping/pong, close) is wsproto's; this
module only routes channels. With ``tty=true`` a small line discipline plays the terminal: it echoes
input, hands the command whole lines (``\\r`` ends a line, DEL erases, ^D at the start of a line is
end of input, ^C ends the command with exit code 130) and turns output ``\\n`` into ``\\r\\n``.

Theory of operation: `serve_remote_command` answers the upgrade, then runs three things in one
nursery: the reader (bytes → wsproto → stdin channel, pings answered at once), the command (reads a
bounded memory channel, so a fast client is slowed by TCP, never buffered without limit), and a
guard that ends the command when the client goes away. Every read has a deadline (kubectl pings
every 5 s, so an idle but live session always has traffic); every write has a deadline.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from wsproto import ConnectionType
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Request,
    TextMessage,
)
from wsproto.handshake import H11Handshake
from wsproto.utilities import ProtocolError

from kins_tunnel.testing.sandbox import CommandIO

log = logging.getLogger(__name__)

PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")  # in order of preference
STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255
READ_TIMEOUT = 90.0  # kubectl pings every 5 s; a silent connection is gone
WRITE_TIMEOUT = 60.0
CLOSE_TIMEOUT = 5.0  # for the client's answer to our close
MAX_MESSAGE = 1 << 20  # largest message kubectl sends is 32 KiB; anything far beyond is refused
OUT_CHUNK = 64 * 1024  # largest stdout/stderr message we send
IN_CHUNK = 256 * 1024  # read size from the client
INTERRUPTED = 130


@dataclass(frozen=True)
class ExecOptions:
    """The query of an exec or attach request."""

    command: tuple[str, ...]
    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool
    container: str

    @classmethod
    def from_query(cls, query: dict[str, list[str]]) -> ExecOptions:
        def flag(name: str) -> bool:
            return (query.get(name) or ["false"])[-1].lower() in ("1", "true")

        tty = flag("tty")
        return cls(
            command=tuple(query.get("command", [])),
            stdin=flag("stdin"),
            stdout=flag("stdout"),
            stderr=flag("stderr") and not tty,
            tty=tty,
            container=(query.get("container") or [""])[-1],
        )


def status_for_exit(code: int) -> dict[str, Any]:
    """The metav1.Status kubectl expects on channel 3 for exit code `code`."""
    if code == 0:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f"command terminated with non-zero exit code: exit status {code}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
    }


def select_protocol(
    headers: Sequence[tuple[bytes, bytes]], spoken: Sequence[str] = PROTOCOLS
) -> str | None:
    """The subprotocol to answer with (the first of `spoken` offered), or None."""
    offered: list[str] = []
    for name, value in headers:
        if name.lower() == b"sec-websocket-protocol":
            offered += [p.strip() for p in value.decode("latin-1").split(",")]
    for proto in spoken:
        if proto in offered:
            return proto
    return None


def is_websocket_upgrade(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    return any(
        name.lower() == b"upgrade" and b"websocket" in value.lower() for name, value in headers
    )


class _Tty:
    """The line discipline of a terminal in canonical mode with echo (see the module docstring)."""

    def __init__(self) -> None:
        self.line = bytearray()

    def feed(self, data: bytes) -> tuple[bytes, list[bytes], bool, bool]:
        """(echo, completed lines, end of input, interrupt) for `data` typed by the user."""
        echo, lines = bytearray(), []
        for byte in data:
            if byte in (0x0D, 0x0A):
                echo += b"\r\n"
                lines.append(bytes(self.line) + b"\n")
                self.line.clear()
            elif byte == 0x03:
                echo += b"^C\r\n"
                return bytes(echo), lines, False, True
            elif byte == 0x04:
                if not self.line:
                    return bytes(echo), lines, True, False
                lines.append(bytes(self.line))
                self.line.clear()
            elif byte in (0x7F, 0x08):
                if self.line:
                    self.line.pop()
                    echo += b"\b \b"
            else:
                self.line.append(byte)
                echo.append(byte)
        return bytes(echo), lines, False, False


class _Session(CommandIO):
    """One upgraded exec: wsproto over `stream`, the channels, and the command's streams."""

    def __init__(
        self, stream: trio.abc.Stream, ws: Connection, protocol: str, options: ExecOptions
    ) -> None:
        self.stream = stream
        self.ws = ws
        self.v5 = protocol == PROTOCOLS[0]
        self.options = options
        self.tty = _Tty() if options.tty else None
        self.stdin_send, self.stdin_recv = trio.open_memory_channel[bytes](4)  # ≤ 4 reads queued
        self.send_lock = trio.Lock()
        self.interrupted = False
        self.client_closed = trio.Event()
        self.command_scope = trio.CancelScope()  # the command runs in it; ^C cancels it
        if not options.stdin:
            self.stdin_send.close()

    # ----------------------------------------------------------------- CommandIO
    async def read(self) -> bytes:
        try:
            return await self.stdin_recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return b""

    async def write(self, data: bytes) -> None:
        if self.options.stdout:
            await self._send_channel(STDOUT, data)

    async def write_err(self, data: bytes) -> None:
        if self.options.stderr:
            await self._send_channel(STDERR, data)
        elif self.options.tty:  # with a TTY stderr is the terminal too
            await self._send_channel(STDOUT, data)

    # ----------------------------------------------------------------- sending
    async def _send_channel(self, channel: int, data: bytes) -> None:
        if self.tty is not None and channel == STDOUT:
            data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        for i in range(0, len(data), OUT_CHUNK):
            await self.send(BytesMessage(data=bytes([channel]) + data[i : i + OUT_CHUNK]))

    async def send(self, event: Event) -> None:
        async with self.send_lock:
            if self.ws.state not in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
                raise trio.BrokenResourceError("WebSocket is closing")
            payload = self.ws.send(event)
            with trio.fail_after(WRITE_TIMEOUT):
                await self.stream.send_all(payload)

    # ----------------------------------------------------------------- receiving
    async def reader(self, done: trio.CancelScope) -> None:
        """Feed stdin from the client's messages until it closes; then cancel `done`."""
        channel: int | None = None
        control = bytearray()  # a resize or close message, kept whole
        pending = bytearray()  # stdin of one read, handed on as one piece
        try:
            while True:
                with trio.fail_after(READ_TIMEOUT):
                    data = await self.stream.receive_some(IN_CHUNK)
                self.ws.receive_data(bytes(data) if data else None)
                for event in self.ws.events():
                    if isinstance(event, BytesMessage):
                        payload = bytes(event.data)
                        if channel is None:
                            if not payload:
                                continue
                            channel, payload = payload[0], payload[1:]
                        if channel == STDIN:
                            pending += payload
                        elif channel in (CLOSE, RESIZE):
                            control += payload
                            if len(control) > MAX_MESSAGE:
                                raise ProtocolError("control message too large")
                        if event.message_finished:
                            if channel == CLOSE and self.v5 and control[:1] == bytes([STDIN]):
                                await self._stdin(bytes(pending))
                                pending.clear()
                                self.stdin_send.close()
                            channel = None
                            control.clear()
                    elif isinstance(event, Ping):
                        if self.ws.state is ConnectionState.OPEN:
                            await self.send(event.response())
                    elif isinstance(event, CloseConnection):
                        await self._stdin(bytes(pending))
                        pending.clear()
                        if self.ws.state is ConnectionState.REMOTE_CLOSING:
                            await self.send(event.response())
                        return
                    elif isinstance(event, TextMessage):
                        raise ProtocolError("text messages are not part of the protocol")
                if pending:
                    await self._stdin(bytes(pending))
                    pending.clear()
                if not data:
                    return
        finally:
            self.stdin_send.close()
            self.client_closed.set()
            done.cancel()

    async def _stdin(self, data: bytes) -> None:
        if self.tty is None:
            if data:
                try:
                    await self.stdin_send.send(data)
                except trio.ClosedResourceError:
                    pass  # input after the end of input, or to an exec without stdin: dropped
            return
        echo, lines, eof, interrupt = self.tty.feed(data)
        if echo:
            await self.send(BytesMessage(data=bytes([STDOUT]) + echo))
        for line in lines:
            try:
                await self.stdin_send.send(line)
            except trio.ClosedResourceError:
                pass
        if eof:
            self.stdin_send.close()
        if interrupt:
            self.interrupted = True
            self.stdin_send.close()
            self.command_scope.cancel()


class UpgradeRefused(Exception):
    """The request cannot be upgraded; nothing was written yet."""


async def accept_websocket(
    stream: trio.abc.Stream,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    trailing: bytes,
    spoken: Sequence[str],
) -> tuple[Connection, str]:
    """Answer a WebSocket upgrade (already parsed by h11) with 101 and the first subprotocol of
    `spoken` the client offers; returns the wsproto connection and that subprotocol.

    Raises `UpgradeRefused` before writing anything if the upgrade cannot be accepted.
    """
    protocol = select_protocol(headers, spoken)
    if protocol is None:
        raise UpgradeRefused(
            f"none of the offered subprotocols is spoken here (use one of: {', '.join(spoken)})"
        )
    handshake = H11Handshake(ConnectionType.SERVER)
    try:
        handshake.initiate_upgrade_connection(list(headers), target)
        request = next(iter(handshake.events()), None)
    except ProtocolError as exc:
        raise UpgradeRefused(f"bad WebSocket upgrade: {exc}") from None
    if not isinstance(request, Request):
        raise UpgradeRefused("bad WebSocket upgrade")
    with trio.fail_after(WRITE_TIMEOUT):
        await stream.send_all(handshake.send(AcceptConnection(subprotocol=protocol)))
    ws = handshake.connection
    assert ws is not None
    if trailing:
        ws.receive_data(trailing)
    return ws, protocol


Runner = Callable[[list[str], CommandIO], Awaitable[int]]


async def serve_remote_command(
    stream: trio.abc.Stream,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    trailing: bytes,
    options: ExecOptions,
    run: Runner,
) -> None:
    """Answer a WebSocket exec upgrade on `stream` (after h11 parsed the request) and run the
    command with `run(argv, io)`. Returns when the exec is over; the caller closes `stream`.

    Raises `UpgradeRefused` before writing anything if the upgrade cannot be accepted (the caller
    answers it with an HTTP error), and trio's stream errors (possibly in an exception group) if
    the client goes away or stalls.
    """
    ws, protocol = await accept_websocket(stream, target, headers, trailing, PROTOCOLS)
    session = _Session(stream, ws, protocol, options)
    code = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.reader, nursery.cancel_scope)
        with session.command_scope:
            code = await run(list(options.command), session)
        if session.interrupted:
            code = INTERRUPTED
        if session.client_closed.is_set():
            return  # nobody left to tell
        await session.send(
            BytesMessage(data=bytes([ERROR]) + json.dumps(status_for_exit(code)).encode())
        )
        await session.send(CloseConnection(code=1000))
        with trio.move_on_after(CLOSE_TIMEOUT):
            await session.client_closed.wait()
        nursery.cancel_scope.cancel()
    log.debug("exec %s ended with %d (%s)", options.command, code, protocol)
