"""The DATA side of a connection's output: one queue per stream, served in turns.

Theory of operation
-------------------
`Connection` queues control frames (WINDOW, PING/PONG, OPEN, OPEN_RESULT, RESET, GOAWAY) in a
buffer of their own that always goes out first: credit, pongs and answers never wait behind bulk
data. DATA frames go to the queue of their stream (`add`), built whole (header and payload, at
most the peer's `max_frame` each) in one buffer per stream, so a stream's frames stay in their
order and each run of them is contiguous.

`write` hands the queued frames to the transport in turns (round robin over the streams that have
data): while more than one stream waits, a turn is at most `QUANTUM` bytes. A frame larger than
the quantum is split where it lies, without a copy: its header is rewritten for the part that goes
now, and a new header for the rest is written over the last bytes of that part (already handed
over, and copied by the transport). So a 64-byte frame of an interactive stream waits for at most
one quantum of each other stream's data in this queue, never for a whole bulk backlog, and a
stream's small frame never overtakes its own earlier ones. With one stream alone, whole frames go
out as built (no splitting, no extra headers).

Memory: a stream's buffer holds what the peer's credit let it queue (the session's high-water mark
bounds the sum); the bytes already handed over are released as the buffer is compacted, and the
buffer is dropped once empty.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

from kins_tunnel.proto.frames import FLAG_FIN, HEADER, HEADER_SIZE, FrameType

QUANTUM = 64 * 1024  # bytes of one stream per turn while other streams wait
_COMPACT = 256 * 1024  # handed-over bytes kept at a buffer's front before it is compacted


class _StreamQueue:
    __slots__ = ("buf", "off")

    def __init__(self) -> None:
        self.buf = bytearray()  # whole frames; those before `off` were handed over
        self.off = 0


class DataQueues:
    """Per-stream DATA queues of one connection, written out in turns."""

    __slots__ = ("_queues", "_ready", "pending")

    def __init__(self) -> None:
        self._queues: dict[int, _StreamQueue] = {}
        # streams with data, in turn order; made at the first DATA (an idle tunnel holds none)
        self._ready: collections.deque[int] | None = None
        self.pending = 0  # bytes queued, headers included

    @property
    def queued_streams(self) -> int:
        """Streams with DATA queued now (each has a queue until it is written out)."""
        return len(self._queues)

    def __bool__(self) -> bool:
        return self.pending > 0

    def add(
        self,
        stream_id: int,
        data: bytes | bytearray | memoryview,
        n: int,
        max_frame: int,
        fin: bool,
    ) -> None:
        """Queue the first `n` bytes of `data` as DATA frames of at most `max_frame` bytes; with
        `fin`, the last frame (an empty one if `n` is 0) carries FIN. `data` is copied."""
        q = self._queues.get(stream_id)
        if q is None:
            q = self._queues[stream_id] = _StreamQueue()
            if self._ready is None:
                self._ready = collections.deque()
            self._ready.append(stream_id)
        buf = q.buf
        before = len(buf)
        view = memoryview(data)
        pos = 0
        while True:
            chunk = min(n - pos, max_frame)
            last = pos + chunk >= n
            buf += HEADER.pack(
                (chunk << 8) | FrameType.DATA, FLAG_FIN if fin and last else 0, stream_id
            )
            buf += view[pos : pos + chunk]
            pos += chunk
            if last:
                break
        self.pending += len(buf) - before

    def purge(self, stream_id: int) -> None:
        """Drop what is queued for a stream (it was reset: the peer would ignore it)."""
        q = self._queues.pop(stream_id, None)
        if q is not None and self._ready is not None:
            self.pending -= len(q.buf) - q.off
            self._ready.remove(stream_id)

    def purge_all(self) -> None:
        self._queues.clear()
        self._ready = None
        self.pending = 0

    def take_all(self, out: bytearray) -> None:
        """Append everything queued to `out` (streams in turn order, each whole)."""
        for sid in self._ready or ():
            q = self._queues[sid]
            out += memoryview(q.buf)[q.off :]
        self.purge_all()

    def write(self, write: Callable[[memoryview], object], limit: int) -> int:
        """Hand queued frames to `write` in turns until about `limit` bytes went (a frame of a
        stream alone may overshoot it). Returns the bytes handed over."""
        handed = 0
        ready = self._ready
        if ready is None:
            return 0
        queues = self._queues
        unpack = HEADER.unpack_from
        while ready and handed < limit:
            sid = ready[0]
            q = queues[sid]
            buf, off = q.buf, q.off
            end = len(buf)
            others = len(ready) > 1
            quantum = QUANTUM if others else limit - handed
            stop = off
            while stop < end:  # whole frames that fit the turn (the first always, when alone)
                size = HEADER_SIZE + (unpack(buf, stop)[0] >> 8)
                if stop - off + size > quantum and (stop > off or others):
                    break
                stop += size
            with memoryview(buf) as view:
                if stop > off:
                    with view[off:stop] as run:
                        write(run)
                    handed += stop - off
                    off = stop
                else:  # the head frame alone is larger than a turn while others wait: split it
                    word, flags, fsid = unpack(buf, off)
                    length = word >> 8
                    part = quantum - HEADER_SIZE
                    HEADER.pack_into(
                        buf, off, (part << 8) | FrameType.DATA, flags & ~FLAG_FIN, fsid
                    )
                    with view[off : off + HEADER_SIZE + part] as piece:
                        write(piece)
                    handed += HEADER_SIZE + part
                    self.pending += HEADER_SIZE  # the rest needs a header of its own
                    off += part  # the rest's header goes over the part's last (handed) bytes
                    HEADER.pack_into(buf, off, ((length - part) << 8) | FrameType.DATA, flags, fsid)
            if off >= end:
                del queues[sid]
                ready.popleft()
            else:
                if off >= _COMPACT:
                    del buf[:off]
                    off = 0
                q.off = off
                if others:
                    ready.rotate(-1)  # next stream's turn
        self.pending -= handed
        return handed
