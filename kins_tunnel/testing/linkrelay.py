"""A TCP relay that plays a network link between two loopback endpoints, for tests and benchmarks.

`LinkRelay` listens on 127.0.0.1 and forwards every connection to `upstream`. Each direction is a
link: bytes read wait in a bottleneck queue of at most `buffer` bytes (when it is full the relay
stops reading, so TCP back-pressure reaches the sender), leave it at `rate` bytes per second in
pieces of about a millisecond of the rate, and are written `delay` seconds later. With
`sock_buffer`, the relay's own sockets get send and receive buffers of that size, so that the
kernel adds little queue of its own and the configured queue is the one the sender meets (with
default buffers, autotuning adds megabytes of hidden queue), and segments of an Ethernet path's
size. Byte order and half-close are kept;
a failure on either side resets both.

The link can also fail: `stop(up=..., down=...)` stops a direction (nothing is read from its source,
FINs included, as on a path that drops everything), and while either direction is stopped new
connections are held without dialling upstream, like SYNs into a black hole. `heal()` resets every
connection opened before (their endpoints would see RSTs) and forwards again.

    python -m kins_tunnel.testing.linkrelay --upstream 127.0.0.1:PORT [--delay-ms 25] [--rate-mbit 100]
        [--buffer-kib 4096] [--sock-buffer-kib 32]

runs one as a process and prints ``READY <port>`` once listening.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import socket
import struct
import sys

import trio

CHUNK = 64 * 1024
PIECE_TIME = 0.001  # seconds of the rate one write carries (at least MIN_PIECE bytes)
MIN_PIECE = 1500
ETHERNET_MSS = 1448  # bytes of payload per segment on a 1500-byte MTU path (with timestamps)


def _rst_on_close(stream: trio.SocketStream) -> None:
    with contextlib.suppress(OSError):
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


SLACK = 0.005  # seconds a late write may catch up on (a busy machine must not slow the link)


class _Pacer:
    """Token bucket with a burst of one piece: the next write may start at `next_at`. A write
    that starts late (the relay's process was not scheduled in time) keeps the schedule when it is
    at most `SLACK` late, so the link carries its rate on a busy machine too."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.next_at = 0.0

    async def wait(self, n: int) -> None:
        if self.rate is None:
            return
        now = trio.current_time()
        start = max(now - SLACK, self.next_at)
        if start > now:
            await trio.sleep_until(start)
        self.next_at = start + n / self.rate


class LinkRelay:
    def __init__(
        self,
        upstream: int,
        *,
        host: str = "127.0.0.1",
        delay: float = 0.0,
        rate: float | None = None,
        buffer: int = 4 << 20,
        sock_buffer: int | None = None,
        piece: int | None = None,
    ) -> None:
        self.upstream = upstream
        self.host = host
        self.delay = delay
        self.rate = rate
        self.buffer = max(1, buffer)
        self.sock_buffer = sock_buffer
        if piece is None:  # about a millisecond of the link per write
            piece = CHUNK if rate is None else max(MIN_PIECE, int(rate * PIECE_TIME))
        self.piece = piece
        # bytes past the queue, on their way (the delay line): what the link holds in flight
        self.line_limit = self.buffer if rate is None else int(rate * delay * 1.5) + CHUNK
        self.port = 0
        self.up = trio.Event()
        self.down = trio.Event()
        self.up.set()
        self.down.set()
        self._scopes: set[trio.CancelScope] = set()
        self._socks: set[trio.socket.SocketType] = set()  # every upstream socket, closed at the end
        self.connections = 0

    @property
    def partitioned(self) -> bool:
        return not (self.up.is_set() and self.down.is_set())

    def stop(self, up: bool = True, down: bool = True) -> None:
        if up:
            self.up = trio.Event()
        if down:
            self.down = trio.Event()

    def heal(self) -> None:
        for scope in list(self._scopes):
            scope.cancel()
        self.up.set()
        self.down.set()

    async def serve(
        self, *, port: int = 0, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._small_buffers(sock)  # accepted sockets inherit them (and the window scale they imply)
        await sock.bind(("127.0.0.1", port))
        sock.listen(128)
        listeners = [trio.SocketListener(sock)]
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        try:
            await trio.serve_listeners(self._handle, listeners)
        finally:
            for sock in self._socks:
                sock.close()

    def _small_buffers(self, sock: trio.socket.SocketType) -> None:
        """Small socket buffers, and segments of a real network's size: with loopback's 64 KiB
        segments a receive buffer this small could never open its window by a whole segment,
        and the sender would crawl on zero-window probes (a few KiB per 200 ms) after the
        relay's queue had been full once."""
        if self.sock_buffer is not None:
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                sock.setsockopt(socket.SOL_SOCKET, opt, self.sock_buffer)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, ETHERNET_MSS)

    async def _open_direction(self, direction: str) -> None:
        while True:
            event = self.up if direction == "up" else self.down
            if event.is_set():
                return
            await event.wait()

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, direction: str) -> None:
        """One direction: read into the queue, serialise at the rate, deliver after the delay."""
        queue: collections.deque[bytes] = collections.deque()
        line: collections.deque[tuple[float, bytes]] = collections.deque()
        queued = in_line = 0
        lot = trio.lowlevel.ParkingLot()  # the reader waits here for room; the others for bytes
        queue_lot = trio.lowlevel.ParkingLot()
        line_lot = trio.lowlevel.ParkingLot()

        async def reading() -> None:
            nonlocal queued
            while True:
                await self._open_direction(direction)
                while queued >= self.buffer or in_line >= self.line_limit:
                    await lot.park()
                data = await src.receive_some(min(CHUNK, self.buffer - queued))
                queued += len(data)
                queue.append(data)
                queue_lot.unpark_all()
                if not data:
                    return

        async def serialising() -> None:
            nonlocal queued, in_line
            pacer = _Pacer(self.rate)
            while True:
                while not queue:
                    await queue_lot.park()
                data = queue.popleft()
                if not data:
                    line.append((trio.current_time() + self.delay, b""))
                    line_lot.unpark_all()
                    return
                with memoryview(data) as view:
                    for pos in range(0, len(data), self.piece):
                        piece = bytes(view[pos : pos + self.piece])
                        await pacer.wait(len(piece))
                        queued -= len(piece)
                        in_line += len(piece)
                        line.append((trio.current_time() + self.delay, piece))
                        line_lot.unpark_all()
                        lot.unpark_all()

        async def writing() -> None:
            nonlocal in_line
            while True:
                while not line:
                    await line_lot.park()
                due, data = line.popleft()
                await trio.sleep_until(due)
                await self._open_direction(direction)
                if not data:
                    with contextlib.suppress(
                        trio.BrokenResourceError, trio.ClosedResourceError, OSError
                    ):
                        await dst.send_eof()
                    return
                await dst.send_all(data)
                in_line -= len(data)
                lot.unpark_all()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reading)
            nursery.start_soon(serialising)
            nursery.start_soon(writing)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        upstream: trio.SocketStream | None = None
        scope = trio.CancelScope()
        self._scopes.add(scope)
        try:
            with scope:
                while self.partitioned:
                    await trio.sleep(0.01)
                sock = trio.socket.socket()
                self._socks.add(sock)
                self._small_buffers(sock)
                await sock.connect((self.host, self.upstream))
                upstream = trio.SocketStream(sock)
                for s in (client, upstream):
                    with contextlib.suppress(OSError):
                        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                async with trio.open_nursery() as n:
                    n.start_soon(self._pump, client, upstream, "up")
                    n.start_soon(self._pump, upstream, client, "down")
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self._scopes.discard(scope)
            for end in (client, upstream):
                if end is not None:
                    _rst_on_close(end)
                    await trio.aclose_forcefully(end)
            if upstream is not None:
                self._socks.discard(upstream.socket)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="HOST:PORT to relay to")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay per direction")
    ap.add_argument("--rate-mbit", type=float, default=100.0, help="bandwidth cap per direction")
    ap.add_argument("--buffer-kib", type=int, default=4096, help="bottleneck queue per direction")
    ap.add_argument(
        "--sock-buffer-kib", type=int, default=0, help="the relay's socket buffers (0: default)"
    )
    args = ap.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    relay = LinkRelay(
        int(port),
        host=host,
        delay=args.delay_ms / 1000,
        rate=args.rate_mbit * 1e6 / 8,
        buffer=args.buffer_kib * 1024,
        sock_buffer=args.sock_buffer_kib * 1024 or None,
    )

    async def run() -> None:
        async with trio.open_nursery() as n:
            bound = await n.start(
                lambda task_status: relay.serve(port=args.port, task_status=task_status)
            )
            print(f"READY {bound}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
