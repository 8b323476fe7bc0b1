"""Pump bytes between two half-closeable streams until both directions are done.

Each direction runs in its own task: read from one side, write to the other; at EOF, half-close
the other side (`send_eof`) and stop. The socket-to-tunnel direction reads into a buffer shared by
every relay of the trio run (`readv`, no allocation per read): `TunnelStream.send_all` takes what
it is given into the protocol core before it first waits (copying any rest it must keep), so the
buffer is free again when the next relay reads. The tunnel-to-socket direction is
`TunnelStream.copy_to_socket`, which lends the socket to the session's reader task for direct
delivery (both rules: docs/DESIGN.md, "Transport objects and who owns what"). The relay ends when
both directions ended cleanly, or as soon as either fails (reset, broken socket), in which case
the other direction is cancelled. Both streams are closed on the way out, whatever happened.
Returns the bytes moved each way.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

import trio

from kins_tunnel.proto import ErrorCode
from kins_tunnel.transport.buffers import RunBuffer
from kins_tunnel.transport.stream import TunnelStream

RELAY_CHUNK = 256 * 1024

_RELAY_BUFFER = RunBuffer("kins_tunnel_relay_buffer", RELAY_CHUNK)


@dataclass(slots=True)
class RelayResult:
    a_to_b: int = 0
    b_to_a: int = 0
    error: str | None = None
    idle: bool = False  # ended by the idle timeout

    def moved(self, forward: bool, n: int) -> None:
        """`n` bytes went a to b (`forward`) or b to a."""
        if forward:
            self.a_to_b += n
        else:
            self.b_to_a += n


async def _pump_socket_to_tunnel(
    src: trio.SocketStream, dst: TunnelStream, result: RelayResult, forward: bool
) -> None:
    """The hot direction of a relay, without trio's per-call checkpoints: read the socket until it
    would block, then wait for readiness. One scheduler pass per wake-up instead of three."""
    fd = src.socket.fileno()
    total = 0
    drained = False  # the last read was short: the socket is (almost surely) empty now
    buf = _RELAY_BUFFER.get()
    try:
        while True:
            if drained:
                await trio.lowlevel.wait_readable(fd)
            try:
                n = os.readv(fd, (buf,))
            except BlockingIOError:
                drained = True
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
            drained = n < RELAY_CHUNK
            if not n:
                break
            # The shared buffer is taken (or copied) before the call first waits. The loop's own
            # schedule point (the wait for the socket, or the checkpoint) follows at once.
            await dst.send_then_wait_elsewhere(buf[:n])
            total += n
            if n == RELAY_CHUNK:  # bulk: more is probably waiting; let others run first
                await trio.lowlevel.checkpoint()
    finally:
        result.moved(forward, total)
    await dst.send_eof()


async def _pump_tunnel_to_socket(
    src: TunnelStream, dst: trio.SocketStream, result: RelayResult, forward: bool
) -> None:
    """The tunnel-to-socket direction: `TunnelStream.copy_to_socket`, which lends the socket to
    the session's reader task for direct delivery (the rules live there)."""
    try:
        await src.copy_to_socket(dst, RELAY_CHUNK)
    finally:
        result.moved(forward, src.copied_bytes + src.direct_bytes)
    await dst.send_eof()


async def _pump(
    src: trio.abc.Stream,
    dst: trio.abc.HalfCloseableStream | trio.abc.Stream,
    result: RelayResult,
    forward: bool,
) -> None:
    total = 0
    try:
        while True:
            data = await src.receive_some(RELAY_CHUNK)
            if not data:
                break
            await dst.send_all(data)
            total += len(data)
    finally:
        result.moved(forward, total)
    if isinstance(dst, trio.abc.HalfCloseableStream):
        await dst.send_eof()


async def relay(
    a: trio.abc.HalfCloseableStream,
    b: trio.abc.HalfCloseableStream,
    *,
    idle_timeout: float | None = None,
    activity: Callable[[], int] | None = None,
) -> RelayResult:
    """Copy a→b and b→a with half-close; close both at the end. Never raises for I/O errors.

    With `idle_timeout`, the relay is aborted (both ends reset, `result.idle` set) once
    `activity()` (a counter bumped whenever bytes move, e.g. `TunnelStream.activity`) has not
    changed for that long; it is sampled a few times per timeout, off the byte path, so the
    relay ends between `idle_timeout` and 1.25 times it after the last byte."""
    result = RelayResult()

    async def run(
        src: trio.abc.Stream,
        dst: trio.abc.HalfCloseableStream,
        forward: bool,
        cancel: trio.CancelScope,
    ) -> None:
        try:
            if isinstance(src, trio.SocketStream) and isinstance(dst, TunnelStream):
                await _pump_socket_to_tunnel(src, dst, result, forward)
            elif isinstance(src, TunnelStream) and isinstance(dst, trio.SocketStream):
                await _pump_tunnel_to_socket(src, dst, result, forward)
            else:
                await _pump(src, dst, result, forward)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            if result.error is None:
                result.error = str(exc) or type(exc).__name__
            cancel.cancel()

    async def watch_idle(limit: float, count: Callable[[], int], cancel: trio.CancelScope) -> None:
        last, quiet_since = count(), trio.current_time()
        while True:
            await trio.sleep(limit / 4)
            now = count()
            if now != last:
                last, quiet_since = now, trio.current_time()
            elif trio.current_time() - quiet_since >= limit:
                result.idle = True
                result.error = f"idle: no bytes either way for {limit:g}s"
                cancel.cancel()
                return

    try:
        async with trio.open_nursery() as outer:
            if idle_timeout is not None and activity is not None:
                outer.start_soon(watch_idle, idle_timeout, activity, outer.cancel_scope)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, a, b, True, nursery.cancel_scope)
                nursery.start_soon(run, b, a, False, nursery.cancel_scope)
            outer.cancel_scope.cancel()  # both directions are done: stop the watch
    finally:
        with trio.CancelScope(shield=True):
            for stream in (a, b):
                if result.error is not None:
                    abort(stream)
                await _aclose_quietly(stream)
    return result


def abort(stream: trio.abc.AsyncResource) -> None:
    """Make the coming close an abort: RST for a TCP socket, RESET for a tunnel stream."""
    if isinstance(stream, trio.SocketStream):
        try:
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    elif isinstance(stream, TunnelStream):
        stream.abort(ErrorCode.CONNECT_ERROR, "the other side of the relay failed")


async def _aclose_quietly(stream: trio.abc.AsyncResource) -> None:
    try:
        await stream.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
