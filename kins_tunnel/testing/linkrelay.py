"""A TCP relay that plays a network link between two loopback endpoints, for tests and benchmarks.

`LinkRelay` listens on 127.0.0.1 and forwards every connection to `upstream`. Each direction is a
delay line: a chunk read at time t is written no earlier than t + `delay`, writes are paced by a
token bucket to `rate` bytes per second, and at most `buffer` bytes wait in the line (when it is
full the relay stops reading, so TCP back-pressure reaches the sender). Byte order and half-close
are kept; a failure on either side resets both.

The link can also fail: `stop(up=..., down=...)` stops a direction (nothing is read from its source,
FINs included, as on a path that drops everything), and while either direction is stopped new
connections are held without dialling upstream, like SYNs into a black hole. `heal()` resets every
connection opened before (their endpoints would see RSTs) and forwards again.

    python -m kins_tunnel.testing.linkrelay --upstream 127.0.0.1:PORT [--delay-ms 25] [--rate-mbit 100]

runs one as a process and prints ``READY <port>`` once listening.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import struct
import sys

import trio

CHUNK = 64 * 1024


def _rst_on_close(stream: trio.SocketStream) -> None:
    with contextlib.suppress(OSError):
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Pacer:
    """Token bucket with a burst of one chunk: the next write may start at `next_at`."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.next_at = 0.0

    async def wait(self, n: int) -> None:
        if self.rate is None:
            return
        now = trio.current_time()
        start = max(now, self.next_at)
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
    ) -> None:
        self.upstream = upstream
        self.host = host
        self.delay = delay
        self.rate = rate
        self.buffer_chunks = max(1, buffer // CHUNK)
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
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        try:
            await trio.serve_listeners(self._handle, listeners)
        finally:
            for sock in self._socks:
                sock.close()

    async def _open_direction(self, direction: str) -> None:
        while True:
            event = self.up if direction == "up" else self.down
            if event.is_set():
                return
            await event.wait()

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, direction: str) -> None:
        send, recv = trio.open_memory_channel[tuple[float, bytes]](self.buffer_chunks)

        async def reading() -> None:
            async with send:
                while True:
                    await self._open_direction(direction)
                    data = await src.receive_some(CHUNK)
                    await send.send((trio.current_time() + self.delay, data))
                    if not data:
                        return

        async def writing() -> None:
            pacer = _Pacer(self.rate)
            async with recv:
                async for due, data in recv:
                    await trio.sleep_until(due)
                    await self._open_direction(direction)
                    if not data:
                        with contextlib.suppress(
                            trio.BrokenResourceError, trio.ClosedResourceError, OSError
                        ):
                            await dst.send_eof()
                        return
                    await pacer.wait(len(data))
                    await dst.send_all(data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reading)
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
    ap.add_argument("--buffer-kib", type=int, default=4096, help="delay-line bound per direction")
    args = ap.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    relay = LinkRelay(
        int(port),
        host=host,
        delay=args.delay_ms / 1000,
        rate=args.rate_mbit * 1e6 / 8,
        buffer=args.buffer_kib * 1024,
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
