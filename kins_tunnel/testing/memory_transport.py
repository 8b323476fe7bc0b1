"""Two `ByteTransport`s joined in memory: a session pair without sockets (tests, benchmarks of
the session layer). Each direction holds at most `capacity` bytes in flight, so back-pressure
works as over TCP; `cut()` makes one side's output vanish (a cable cut: the peer hears nothing,
not even EOF), and `close()` is an EOF for the peer."""

from __future__ import annotations

import trio

from kins_tunnel.transport.errors import TransportError


class MemoryTransport:
    """One end of `memory_transport_pair`; implements `transport.byte_transport.ByteTransport`."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.peer: MemoryTransport | None = None
        self.drained = False
        self._in = bytearray()  # what the peer sent and we have not read
        self._out = bytearray()  # what we took and the peer has no room for yet
        self._eof = False  # the peer closed
        self._closed = False
        self._cut = False
        self._readable = trio.lowlevel.ParkingLot()
        self._writable = trio.lowlevel.ParkingLot()

    # reading
    def receive_into(self, view: memoryview) -> int | None:
        if self._closed:
            raise TransportError("tunnel socket closed")
        n = min(len(view), len(self._in))
        if n:
            view[:n] = self._in[:n]
            del self._in[:n]
            if self.peer is not None:
                self.peer._room()
        self.drained = not self._in and not self._eof
        if n:
            return n
        return 0 if self._eof else None

    async def wait_readable(self) -> None:
        while not self._in and not self._eof and not self._closed:
            await self._readable.park()
        if self._closed:
            raise trio.ClosedResourceError("tunnel socket closed")
        await trio.lowlevel.checkpoint()

    # writing
    def send_chunk(self, chunk: memoryview | bytes | bytearray) -> bool:
        if self._closed:
            raise TransportError("tunnel write failed: closed")
        if not self._cut:
            self._out += chunk
        return self.flush()

    def flush(self) -> bool:
        peer = self.peer
        if peer is None or peer._closed:
            self._out.clear()
            raise TransportError("tunnel write failed: connection reset by peer")
        room = peer.capacity - len(peer._in)
        if room > 0 and self._out:
            peer._in += self._out[:room]
            del self._out[:room]
            peer._readable.unpark_all()
        return not self._out

    async def wait_writable(self) -> None:
        peer = self.peer
        while self._out and peer is not None and len(peer._in) >= peer.capacity:
            if self._closed:
                break
            await self._writable.park()
        if self._closed:
            raise trio.ClosedResourceError("tunnel socket closed")
        await trio.lowlevel.checkpoint()

    def _room(self) -> None:
        """The peer read: our output may move on."""
        self._writable.unpark_all()

    @property
    def pending(self) -> int:
        return len(self._out)

    def peer_certificate_der(self) -> bytes | None:
        return None

    # faults and the end
    def cut(self) -> None:
        """From now on nothing we send reaches the peer (no data, no EOF)."""
        self._cut = True
        self._out.clear()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._out.clear()
        self._readable.unpark_all()
        self._writable.unpark_all()
        peer = self.peer
        if peer is not None and not self._cut:
            peer._eof = True
            peer._readable.unpark_all()
            peer._writable.unpark_all()


def memory_transport_pair(capacity: int = 256 * 1024) -> tuple[MemoryTransport, MemoryTransport]:
    """Two transports joined to each other, `capacity` bytes in flight each way."""
    a, b = MemoryTransport(capacity), MemoryTransport(capacity)
    a.peer, b.peer = b, a
    return a, b
