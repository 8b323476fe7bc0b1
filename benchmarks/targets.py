"""Target servers the three paths lead to: sink, source and echo.

Run one kind per process so that the servers never share a GIL with each other or with the
measuring clients::

    python -m benchmarks.targets sink|source|echo [--port N]

The process prints ``READY <port>`` on stdout once it listens on 127.0.0.1 and then serves until it
is killed. One thread per connection, blocking sockets with 256 KiB buffers.

Protocols (all byte counts are 8-byte big-endian unsigned integers):

- **sink**: reads until EOF, then answers with the number of bytes it read and closes. The client
  half-closes after its upload, so the answer proves every byte crossed the path.
- **source**: reads an 8-byte count N, sends N bytes, half-closes and drains until the client closes.
  A client may close early (bulk load that is stopped); that is not an error.
- **echo**: sends back everything it reads; on EOF it half-closes.
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
import threading

BUF = 256 * 1024
COUNT = struct.Struct("!Q")


def tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUF)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUF)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        r = sock.recv_into(view[got:])
        if r == 0:
            return None
        got += r
    return bytes(buf)


def serve_sink(sock: socket.socket) -> None:
    buf = bytearray(BUF)
    total = 0
    while True:
        n = sock.recv_into(buf)
        if n == 0:
            break
        total += n
    sock.sendall(COUNT.pack(total))


def serve_source(sock: socket.socket) -> None:
    head = recv_exact(sock, COUNT.size)
    if head is None:
        return
    (remaining,) = COUNT.unpack(head)
    chunk = memoryview(b"\x5a" * BUF)
    while remaining > 0:
        n = min(remaining, BUF)
        sock.sendall(chunk[:n])
        remaining -= n
    sock.shutdown(socket.SHUT_WR)
    scratch = bytearray(4096)
    while sock.recv_into(scratch):
        pass


def serve_echo(sock: socket.socket) -> None:
    buf = bytearray(BUF)
    view = memoryview(buf)
    while True:
        n = sock.recv_into(buf)
        if n == 0:
            break
        sock.sendall(view[:n])
    sock.shutdown(socket.SHUT_WR)


HANDLERS = {"sink": serve_sink, "source": serve_source, "echo": serve_echo}


def handle(kind: str, sock: socket.socket) -> None:
    try:
        with sock:
            tune(sock)
            HANDLERS[kind](sock)
    except OSError:
        # Peers that stop early (reset, broken pipe) are part of the load pattern.
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=sorted(HANDLERS))
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Set before listen so accepted sockets inherit the buffer sizes.
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUF)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUF)
    lsock.bind(("127.0.0.1", args.port))
    lsock.listen(1024)
    print(f"READY {lsock.getsockname()[1]}", flush=True)
    try:
        while True:
            conn, _ = lsock.accept()
            threading.Thread(target=handle, args=(args.kind, conn), daemon=True).start()
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
