"""A lean TCP relay that adds a fixed delay each way: a fleet's round trip for the storm benchmark.

    python -m benchmarks.delayrelay --upstream PORT --delay-ms 50 [--port 0]

Listens on 127.0.0.1 and forwards every connection to 127.0.0.1:`upstream`; every chunk read from
either side is written to the other `delay` seconds later (order and half-close kept; a reset or
a refused upstream resets both sides). One thread, one `epoll` set, one timer heap: thousands of
connections cost far less CPU than a relay of trio tasks, so the relay adds the round trip and
little else to a storm that shares two cores with the replica and the simulated edges. Not a
link model (no rate, no queue: see `kins_tunnel.testing.linkrelay` for those) and not a product
component. Memory: what is in flight, i.e. what both sides sent in the last `delay` seconds.

Prints ``READY <port>`` once listening; runs until killed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import heapq
import itertools
import select
import socket
import struct
import sys
import time

READ = 65536  # bytes per read
ACCEPT_BURST = 256  # connections accepted per wake-up
BACKLOG = 4096
_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


class Leg:
    """One direction of a connection: what `src` sent, due at `dst` at its time."""

    __slots__ = ("src", "dst", "line", "pending", "eof_in", "eof_out", "peer")

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src, self.dst = src, dst
        self.line: collections.deque[tuple[float, bytes]] = collections.deque()
        self.pending = b""  # due, but the socket did not take it all
        self.eof_in = False  # src ended (its EOF is in the line)
        self.eof_out = False  # dst was half-closed
        self.peer: Leg | None = None  # the other direction


class DelayRelay:
    def __init__(self, upstream: int, delay: float, port: int = 0) -> None:
        self.upstream, self.delay = upstream, delay
        self.ep = select.epoll()
        self.ls = socket.socket()
        self.ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.ls.bind(("127.0.0.1", port))
        self.ls.listen(BACKLOG)
        self.ls.setblocking(False)
        self.port = self.ls.getsockname()[1]
        self.ep.register(self.ls.fileno(), _IN)
        self.reading: dict[int, Leg] = {}  # fd -> the leg that reads it
        self.writing: dict[int, Leg] = {}  # fd -> the leg that writes it
        self.masks: dict[int, int] = {}
        self.timers: list[tuple[float, int, Leg]] = []  # (due, seq, leg) heap
        self.seq = itertools.count()

    def _accept(self) -> None:
        for _ in range(ACCEPT_BURST):
            try:
                client, _ = self.ls.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # a connection gone before it was taken, or out of descriptors
                return
            up = socket.socket()
            for s in (client, up):
                s.setblocking(False)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = up.connect_ex(("127.0.0.1", self.upstream))
            if code not in (0, errno.EINPROGRESS):
                self._reset(client)
                up.close()
                continue
            there, back = Leg(client, up), Leg(up, client)
            there.peer, back.peer = back, there
            for leg in (there, back):  # each socket is the source of one leg
                fd = leg.src.fileno()
                self.reading[fd], self.writing[leg.dst.fileno()] = leg, leg
                self.masks[fd] = _IN
                self.ep.register(fd, _IN)

    def _reset(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
        sock.close()

    def _drop(self, leg: Leg) -> None:
        """End the connection `leg` belongs to, both sides reset (a failure on either side)."""
        for s in (leg.src, leg.dst):
            fd = s.fileno()
            if fd < 0 or fd not in self.masks:
                continue
            if self.masks[fd]:
                self.ep.unregister(fd)
            self.reading.pop(fd, None)
            self.writing.pop(fd, None)
            del self.masks[fd]
            self._reset(s)
        for one in (leg, leg.peer):
            if one is not None:
                one.line.clear()
                one.pending = b""
                one.eof_in = one.eof_out = True

    def _interest(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if fd < 0 or fd not in self.masks:
            return
        r, w = self.reading.get(fd), self.writing.get(fd)
        mask = (_IN if r is not None and not r.eof_in else 0) | (
            _OUT if w is not None and w.pending else 0
        )
        before = self.masks[fd]
        if mask == before:
            return
        self.masks[fd] = mask
        # a socket with nothing to wait for leaves the set: epoll reports a hang-up whatever the
        # mask, and a half-closed socket waiting for its peer's EOF to come due would spin
        if not mask:
            self.ep.unregister(fd)
        elif not before:
            self.ep.register(fd, mask)
        else:
            self.ep.modify(fd, mask)

    def _read(self, leg: Leg) -> None:
        try:
            data = leg.src.recv(READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(leg)
            return
        if not data:
            leg.eof_in = True
            self._interest(leg.src)
        due = time.monotonic() + self.delay
        leg.line.append((due, data))
        heapq.heappush(self.timers, (due, next(self.seq), leg))

    def _deliver(self, leg: Leg) -> None:
        """Write what is due (and what the socket did not take before)."""
        now = time.monotonic()
        while not leg.eof_out:
            if not leg.pending:
                if not leg.line or leg.line[0][0] > now:
                    break
                _, data = leg.line.popleft()
                if not data:  # the source's EOF, due now
                    leg.eof_out = True
                    with contextlib.suppress(OSError):
                        leg.dst.shutdown(socket.SHUT_WR)
                    self._close_if_done(leg)
                    return
                leg.pending = data
            try:
                n = leg.dst.send(leg.pending)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno == errno.ENOTCONN:  # upstream connect still under way
                    break
                self._drop(leg)
                return
            leg.pending = leg.pending[n:]
            if leg.pending:
                break
        self._interest(leg.dst)

    def _close_if_done(self, leg: Leg) -> None:
        peer = leg.peer
        if peer is None or not (leg.eof_out and peer.eof_out):
            return
        for s in (leg.src, leg.dst):
            fd = s.fileno()
            if fd in self.masks:
                if self.masks[fd]:
                    self.ep.unregister(fd)
                self.reading.pop(fd, None)
                self.writing.pop(fd, None)
                del self.masks[fd]
            s.close()

    def run(self) -> None:
        lsfd = self.ls.fileno()
        while True:
            timeout = max(self.timers[0][0] - time.monotonic(), 0.0) if self.timers else -1
            for fd, ev in self.ep.poll(timeout):
                if fd == lsfd:
                    self._accept()
                    continue
                if ev & (select.EPOLLERR | select.EPOLLHUP) and not ev & _IN:
                    leg = self.reading.get(fd) or self.writing.get(fd)
                    if leg is not None:
                        self._drop(leg)
                    continue
                if ev & _OUT and (w := self.writing.get(fd)) is not None:
                    self._deliver(w)
                if ev & _IN and (r := self.reading.get(fd)) is not None and not r.eof_in:
                    self._read(r)
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, _, leg = heapq.heappop(self.timers)
                self._deliver(leg)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", type=int, required=True, help="port on 127.0.0.1 to relay to")
    ap.add_argument("--delay-ms", type=float, required=True, help="one-way delay, each direction")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    relay = DelayRelay(args.upstream, args.delay_ms / 1000, args.port)
    print(f"READY {relay.port}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        relay.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
