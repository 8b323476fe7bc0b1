"""A WAN stand-in: a TCP relay that delays every chunk and caps the bandwidth, each direction.

    python -m benchmarks.wanrelay --upstream 127.0.0.1:PORT [--delay-ms 25] [--rate-mbit 100]

Listens on 127.0.0.1 (``--port``, default ephemeral), prints ``READY <port>``, and relays every
accepted connection to ``--upstream``. Each direction is a delay line: a chunk read at time t is
written no earlier than t + delay, and writes are paced by a token bucket to ``--rate-mbit``.
Buffering is bounded (``--buffer-kib`` per direction): when the delay line is full the relay stops
reading, so TCP back-pressure reaches the sender. Byte order and half-close (EOF in one direction
while the other keeps flowing) are preserved; a reset on either side closes both.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time

CHUNK = 64 * 1024


class Pacer:
    """Token bucket with a burst of one chunk: the next write may start at ``next_at``."""

    def __init__(self, rate_bytes: float) -> None:
        self.rate = rate_bytes
        self.next_at = 0.0

    async def wait(self, n: int) -> None:
        now = time.monotonic()
        start = max(now, self.next_at)
        if start > now:
            await asyncio.sleep(start - now)
        self.next_at = start + n / self.rate


async def pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    delay: float,
    rate_bytes: float,
    buffer_chunks: int,
) -> None:
    line: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue(maxsize=buffer_chunks)

    async def reading() -> None:
        while True:
            data = await reader.read(CHUNK)
            await line.put((time.monotonic() + delay, data or None))
            if not data:
                return

    async def writing() -> None:
        pacer = Pacer(rate_bytes)
        while True:
            due, data = await line.get()
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
            if data is None:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            await pacer.wait(len(data))
            writer.write(data)
            await writer.drain()

    async with asyncio.TaskGroup() as tg:
        tg.create_task(reading())
        tg.create_task(writing())


def tune(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def relay_conn(
    c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter, args: argparse.Namespace
) -> None:
    host, port = args.upstream.rsplit(":", 1)
    delay = args.delay_ms / 1000.0
    rate = args.rate_mbit * 1e6 / 8
    chunks = max(1, args.buffer_kib * 1024 // CHUNK)
    u_writer: asyncio.StreamWriter | None = None
    try:
        u_reader, u_writer = await asyncio.open_connection(host, int(port))
        tune(c_writer)
        tune(u_writer)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(pump(c_reader, u_writer, delay, rate, chunks))
            tg.create_task(pump(u_reader, c_writer, delay, rate, chunks))
    except (OSError, ExceptionGroup):
        pass
    finally:
        for w in (c_writer, u_writer):
            if w is not None:
                w.close()


async def amain(args: argparse.Namespace) -> None:
    server = await asyncio.start_server(
        lambda r, w: relay_conn(r, w, args), "127.0.0.1", args.port, backlog=256
    )
    port = server.sockets[0].getsockname()[1]
    print(f"READY {port}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="HOST:PORT to relay to")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay per direction")
    ap.add_argument("--rate-mbit", type=float, default=100.0, help="bandwidth cap per direction")
    ap.add_argument("--buffer-kib", type=int, default=4096, help="delay-line bound per direction")
    args = ap.parse_args(argv)
    try:
        asyncio.run(amain(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
