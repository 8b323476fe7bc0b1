"""The leanest Python TLS relay: a reference floor for the tunnel's figures.

    python -m benchmarks.pyrelay front|back --ca CA --cert CRT --key KEY --map LISTEN:TO ...
        [--loop epoll|trio]

Two processes play the tunnel's topology without any of its features: **front** accepts plain TCP
on each ``LISTEN`` port and, per connection, opens a mutual-TLS connection (TLS 1.3, the same
certificates and Python ``ssl`` as the tunnel) to the **back**'s port ``TO``; **back** accepts those
on its ``LISTEN`` ports and connects each to the target at ``TO``. One TLS connection per stream (no
multiplexing, no flow control, no CONNECT, no limits or deadlines), one thread, one ``epoll`` set
with persistent level-triggered registrations (no re-arming per wait), non-blocking
``ssl.SSLSocket``s that OpenSSL reads and writes directly (no memory BIOs), half-close carried as
a TLS ``close_notify``. What it measures is what Python itself costs on this path: the tunnel's
columns are read against it as well as against ``ssh -R``. Not a product component; benchmark use
only (it handles no errors beyond closing the connection that caused them).

``--loop trio`` runs the same calls under trio instead (a task per direction, ``wait_readable`` /
``wait_writable`` only when a call would block, a checkpoint after every 256 KiB): the difference
between the two is what trio's scheduling costs, before anything the tunnel itself does.

Prints ``READY <first listen port>`` once every port listens.
"""

from __future__ import annotations

import argparse
import select
import socket
import ssl
import sys

import trio

BUF = 256 * 1024
TLS_RECORD = 16 * 1024  # largest TLS plaintext record
_IN, _OUT = select.EPOLLIN, select.EPOLLOUT


class Leg:
    """One direction: bytes read from `src` and written to `dst`."""

    __slots__ = ("src", "dst", "pending", "eof")

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src, self.dst = src, dst
        self.pending: memoryview | None = None  # read but not yet taken by dst
        self.eof = False  # src ended and dst was half-closed


def open_pair(
    role: str, ctx: ssl.SSLContext, ls: socket.socket, to: int
) -> tuple[socket.socket, socket.socket]:
    """Accept a connection and open its other end (blocking, TLS handshake included); both are
    returned non-blocking."""
    plain, _ = ls.accept()
    plain.setblocking(True)
    other = socket.create_connection(("127.0.0.1", to))
    for s in (plain, other):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if role == "front":  # plain client in, TLS out
        other = ctx.wrap_socket(other)
    else:
        plain = ctx.wrap_socket(plain, server_side=True)
    for s in (plain, other):
        s.setblocking(False)
    return plain, other


def half_close(sock: socket.socket) -> None:
    if isinstance(sock, ssl.SSLSocket):
        try:
            sock.unwrap()  # sends close_notify; the peer's arrives later (or never)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, ssl.SSLError, OSError):
            pass
    else:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class Relay:
    def __init__(self, role: str, ctx: ssl.SSLContext, maps: list[tuple[int, int]]) -> None:
        self.role, self.ctx = role, ctx
        self.ep = select.epoll()
        self.listeners: dict[int, tuple[socket.socket, int]] = {}
        self.reading: dict[int, Leg] = {}  # fd -> the leg that reads it
        self.writing: dict[int, Leg] = {}  # fd -> the leg that writes it
        self.masks: dict[int, int] = {}
        self.buf = memoryview(bytearray(BUF))
        for listen, to in maps:
            ls = listener(listen)
            self.listeners[ls.fileno()] = (ls, to)
            self.ep.register(ls.fileno(), _IN)

    def accept(self, ls: socket.socket, to: int) -> None:
        plain, other = open_pair(self.role, self.ctx, ls, to)
        for leg in (Leg(plain, other), Leg(other, plain)):
            self.reading[leg.src.fileno()] = leg
            self.writing[leg.dst.fileno()] = leg
        for s in (plain, other):
            self.masks[s.fileno()] = _IN
            self.ep.register(s.fileno(), _IN)

    def interest(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        r, w = self.reading.get(fd), self.writing.get(fd)
        mask = (_IN if r is not None and r.pending is None and not r.eof else 0) | (
            _OUT if w is not None and w.pending is not None else 0
        )
        if mask != self.masks.get(fd):
            self.masks[fd] = mask
            self.ep.modify(fd, mask)

    def write(self, leg: Leg) -> bool:
        """Write leg.pending; True when all of it went."""
        data = leg.pending
        assert data is not None
        while data:
            try:
                n = leg.dst.send(data)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                leg.pending = data
                return False
            data = data[n:]
        leg.pending = None
        return True

    def pump(self, leg: Leg) -> None:
        """One read from src per readiness event (level-triggered: epoll reports it again while
        more waits, so a bulk leg takes turns with the others), plus what OpenSSL already holds
        decrypted (epoll cannot see that); each batch is written on at once."""
        first = True
        while leg.pending is None and not leg.eof:
            if not first and not (isinstance(leg.src, ssl.SSLSocket) and leg.src.pending()):
                break
            first = False
            try:
                n = leg.src.recv_into(self.buf)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except ssl.SSLZeroReturnError:
                n = 0
            if n == 0:
                leg.eof = True
                half_close(leg.dst)
                break
            leg.pending = self.buf[:n]
            if not self.write(leg):
                leg.pending = memoryview(bytes(leg.pending))  # the shared buffer is reused
        self.interest(leg.src)
        self.interest(leg.dst)
        self.maybe_close(leg)

    def maybe_close(self, leg: Leg) -> None:
        back = self.reading.get(leg.dst.fileno())
        if back is None or not (leg.eof and back.eof):
            return
        for s in (leg.src, leg.dst):
            fd = s.fileno()
            self.ep.unregister(fd)
            self.reading.pop(fd, None)
            self.writing.pop(fd, None)
            self.masks.pop(fd, None)
            s.close()

    def abort(self, fd: int) -> None:
        leg = self.reading.get(fd) or self.writing.get(fd)
        if leg is None:
            return
        leg.eof = True
        back = self.reading.get(leg.dst.fileno())
        if back is not None:
            back.eof = True
        self.maybe_close(leg)

    def run(self) -> None:
        while True:
            for fd, ev in self.ep.poll():
                if fd in self.listeners:
                    self.accept(*self.listeners[fd])
                    continue
                try:
                    if ev & _OUT and (w := self.writing.get(fd)) is not None and w.pending:
                        if self.write(w):
                            self.pump(w)  # its source may hold decrypted bytes already
                        else:
                            self.interest(w.dst)
                    if ev & (_IN | select.EPOLLHUP | select.EPOLLERR):
                        r = self.reading.get(fd)
                        if r is not None:
                            self.pump(r)
                except OSError:
                    self.abort(fd)


async def _trio_leg(leg: Leg) -> None:
    """One direction under trio, with the fewest scheduler passes: after a short read (a small
    message) it waits for readiness at once instead of reading again to find the socket empty
    (an exception per message); after a full read or a full TLS record it reads on. Trio registers
    each wait anew and makes a scheduler pass per wake-up: that is what this variant measures
    against the epoll one."""
    src, dst = leg.src, leg.dst
    fd_in, fd_out = src.fileno(), dst.fileno()
    buf = memoryview(bytearray(BUF))  # per leg: a send may wait while it holds the buffer
    since_yield = 0
    wait = False
    while True:
        if wait:
            await trio.lowlevel.wait_readable(fd_in)
        try:
            n = src.recv_into(buf)
        except (BlockingIOError, ssl.SSLWantReadError):
            wait = True
            continue
        except ssl.SSLWantWriteError:  # TLS needs to write first (the other leg owns that wait)
            await trio.sleep(0.0005)
            continue
        except ssl.SSLZeroReturnError:
            n = 0
        if n == 0:
            leg.eof = True
            half_close(dst)
            return
        data = buf[:n]
        while data:
            try:
                data = data[dst.send(data) :]
            except (BlockingIOError, ssl.SSLWantWriteError):
                await trio.lowlevel.wait_writable(fd_out)
            except ssl.SSLWantReadError:  # TLS needs to read first (the other leg owns that wait)
                await trio.sleep(0.0005)
        # An SSLSocket returns at most one record (16 KiB) per call.
        wait = not (
            n == BUF or (isinstance(src, ssl.SSLSocket) and (n >= TLS_RECORD or src.pending()))
        )
        since_yield += n
        if since_yield >= BUF:  # bulk: let the other legs run (as the tunnel's relay does)
            since_yield = 0
            await trio.lowlevel.checkpoint()


async def _trio_serve(
    role: str, ctx: ssl.SSLContext, listeners: list[tuple[socket.socket, int]]
) -> None:
    async def serve(plain: socket.socket, other: socket.socket) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_trio_leg, Leg(plain, other))
                nursery.start_soon(_trio_leg, Leg(other, plain))
        except* OSError:  # a reset or broken pipe ends this connection only
            pass
        finally:
            plain.close()
            other.close()

    async def accept(ls: socket.socket, to: int) -> None:
        ls.setblocking(False)
        while True:
            await trio.lowlevel.wait_readable(ls.fileno())
            try:
                plain, other = open_pair(role, ctx, ls, to)  # blocking, as in the epoll variant
            except (BlockingIOError, OSError):
                continue
            nursery.start_soon(serve, plain, other)

    async with trio.open_nursery() as nursery:
        for ls, to in listeners:
            nursery.start_soon(accept, ls, to)


def listener(port: int) -> socket.socket:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(128)
    return ls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("role", choices=["front", "back"])
    ap.add_argument("--ca", required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--map", action="append", required=True, metavar="LISTEN:TO")
    ap.add_argument("--loop", choices=["epoll", "trio"], default="epoll")
    args = ap.parse_args(argv)
    if args.role == "front":
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=args.ca)
        ctx.check_hostname = False  # the chain is verified; names do not matter here
    else:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=args.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(args.cert, args.key)
    maps = [(int(a), int(b)) for a, b in (m.split(":") for m in args.map)]
    try:
        if args.loop == "epoll":
            relay = Relay(args.role, ctx, maps)
            print(f"READY {maps[0][0]}", flush=True)
            relay.run()
        else:
            listeners = [(listener(listen), to) for listen, to in maps]
            print(f"READY {maps[0][0]}", flush=True)
            trio.run(_trio_serve, args.role, ctx, listeners)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
