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
over: the `write` callback keeps no view past its return, the zero-copy contract of
docs/DESIGN.md "Transport objects and who owns what", checked in debug mode by `ownership`). So a
64-byte frame of an interactive stream waits for at most one quantum of each other stream's data
in this queue, never for a whole bulk backlog, and a stream's small frame never overtakes its own
earlier ones. With one stream alone, whole frames go
out as built (no splitting, no extra headers).

Pacing (see `pacer`): while the connection's pacer is engaged, `write_paced` serves the
*interactive* streams first, in turns as above and never held, then the *bulk* streams in turns
within the pacer's credit (a frame larger than the credit is split, as for a turn). A stream is
bulk once its current run has queued `BULK_RUN` bytes; a run ends when the stream's queue has
been empty for `QUIET` seconds, so a stream is interactive when it is new or has been quiet, and
becomes interactive again after a pause. Runs of streams whose queue emptied are remembered for
`QUIET` seconds at most (`_idle`, pruned as it grows). Without a clock every stream is
interactive (nothing is ever held). While the pacer is not engaged `write` runs exactly as
without pacing.

Memory: a stream's buffer holds what the peer's credit let it queue (the session's high-water mark
bounds the sum); the bytes already handed over are released as the buffer is compacted, and the
buffer is dropped once empty.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

from kins_tunnel.proto import ownership
from kins_tunnel.proto.frames import FLAG_FIN, HEADER, HEADER_SIZE, FrameType

QUANTUM = 64 * 1024  # bytes of one stream per turn while other streams wait
BULK_RUN = 64 * 1024  # bytes queued in one run that make a stream bulk
QUIET = 1.0  # seconds a stream's queue stays empty to end its run
_MIN_PART = 512  # smallest piece a paced frame is split into
_IDLE_PRUNE = 256  # remembered runs before the stale ones are dropped
_COMPACT = 256 * 1024  # handed-over bytes kept at a buffer's front before it is compacted


class _StreamQueue:
    __slots__ = ("buf", "off", "run")

    def __init__(self, run: int = 0) -> None:
        self.buf = bytearray()  # whole frames; those before `off` were handed over
        self.off = 0
        self.run = run  # bytes queued since the stream was last quiet


class DataQueues:
    """Per-stream DATA queues of one connection, written out in turns."""

    __slots__ = ("_queues", "_ready", "pending", "_idle", "clock", "held")

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._queues: dict[int, _StreamQueue] = {}
        # streams with data, in turn order; made at the first DATA (an idle tunnel holds none)
        self._ready: collections.deque[int] | None = None
        self.pending = 0  # bytes queued, headers included
        self._idle: dict[int, tuple[int, float]] = {}  # stream -> (run, when its queue emptied)
        self.clock = clock
        self.held = 0  # bytes of bulk streams the last paced write left waiting for credit

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
            q = self._queues[stream_id] = _StreamQueue(self._resume_run(stream_id))
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
        q.run += n

    def _resume_run(self, stream_id: int) -> int:
        """The run a stream goes on with when it queues again (0 after a quiet pause)."""
        idle = self._idle.pop(stream_id, None) if self._idle else None
        if idle is None or self.clock is None:
            return 0
        return idle[0] if self.clock() - idle[1] < QUIET else 0

    def _emptied(self, stream_id: int, q: _StreamQueue) -> None:
        """A stream's queue went empty: remember its run for `QUIET` seconds."""
        if self.clock is None or q.run < BULK_RUN:
            return  # an interactive stream resumes as one anyway
        now = self.clock()
        idle = self._idle
        idle[stream_id] = (q.run, now)
        if len(idle) > _IDLE_PRUNE:
            for sid in [s for s, (_, t) in idle.items() if now - t >= QUIET]:
                del idle[sid]
            while len(idle) > _IDLE_PRUNE:  # many bulk streams paused at once: forget the oldest
                del idle[next(iter(idle))]

    def is_bulk(self, stream_id: int) -> bool:
        q = self._queues.get(stream_id)
        return q is not None and q.run >= BULK_RUN

    def purge(self, stream_id: int) -> None:
        """Drop what is queued for a stream (it was reset: the peer would ignore it)."""
        self._idle.pop(stream_id, None)
        q = self._queues.pop(stream_id, None)
        if q is not None and self._ready is not None:
            self.pending -= len(q.buf) - q.off
            self._ready.remove(stream_id)

    def purge_all(self) -> None:
        self._queues.clear()
        self._idle.clear()
        self._ready = None
        self.pending = 0
        self.held = 0

    def take_all(self, out: bytearray) -> None:
        """Append everything queued to `out` (streams in turn order, each whole)."""
        for sid in self._ready or ():
            q = self._queues[sid]
            out += memoryview(q.buf)[q.off :]
        self.purge_all()

    def write(self, write: Callable[[memoryview], object], limit: int) -> int:
        """Hand queued frames to `write` in turns until about `limit` bytes went (a frame of a
        stream alone may overshoot it). Returns the bytes handed over. `write` gets views valid
        only until it returns (see the module)."""
        if self._ready is None:
            return 0
        return self._serve(self._ready, write, limit, False)

    def write_paced(
        self, write: Callable[[memoryview], object], limit: int, credit: int
    ) -> tuple[int, int]:
        """`write` for an engaged pacer: the interactive streams first (up to `limit`, never
        held), then the bulk streams within `credit` (frames split to fit). Returns (bytes handed
        over, bulk bytes among them); `held` is then what the bulk streams still hold."""
        ready = self._ready
        if ready is None:
            return 0, 0
        queues = self._queues
        fast: collections.deque[int] = collections.deque()
        bulk: collections.deque[int] = collections.deque()
        for sid in ready:
            (bulk if queues[sid].run >= BULK_RUN else fast).append(sid)
        handed = self._serve(fast, write, limit, False) if fast else 0
        paced = 0
        if bulk and handed < limit and credit > 0:
            paced = self._serve(bulk, write, min(limit - handed, credit), True)
        fast.extend(bulk)
        self._ready = fast
        self.held = sum(len(queues[sid].buf) - queues[sid].off for sid in bulk)
        return handed + paced, paced

    def _serve(
        self,
        ready: collections.deque[int],
        write: Callable[[memoryview], object],
        limit: int,
        split: bool,
    ) -> int:
        """The turns over `ready` (streams with data). With `split`, no turn exceeds `limit`:
        a frame that does not fit is split (the pacer's credit is a hard bound)."""
        handed = 0
        queues = self._queues
        unpack = HEADER.unpack_from
        while ready and handed < limit:
            sid = ready[0]
            q = queues[sid]
            buf, off = q.buf, q.off
            end = len(buf)
            others = len(ready) > 1
            if split:
                quantum = min(QUANTUM, limit - handed)
                if quantum < HEADER_SIZE + _MIN_PART:
                    break
            else:
                quantum = QUANTUM if others else limit - handed
            cut = others or split
            stop = off
            while stop < end:  # whole frames that fit the turn (the first always, when alone)
                size = HEADER_SIZE + (unpack(buf, stop)[0] >> 8)
                if stop - off + size > quantum and (stop > off or cut):
                    break
                stop += size
            if stop > off:
                with memoryview(buf) as view, view[off:stop] as run:
                    write(run)
                handed += stop - off
                off = stop
                if ownership.CHECKS:
                    ownership.expect_unshared(buf, "DATA queue")
            else:  # the head frame alone is larger than a turn while others wait: split it
                word, flags, fsid = unpack(buf, off)
                length = word >> 8
                part = quantum - HEADER_SIZE
                HEADER.pack_into(buf, off, (part << 8) | FrameType.DATA, flags & ~FLAG_FIN, fsid)
                with memoryview(buf) as view, view[off : off + HEADER_SIZE + part] as piece:
                    write(piece)
                handed += HEADER_SIZE + part
                self.pending += HEADER_SIZE  # the rest needs a header of its own
                off += part  # the rest's header goes over the part's last (handed) bytes
                if ownership.CHECKS:
                    ownership.expect_unshared(buf, "DATA queue (split frame)")
                HEADER.pack_into(buf, off, ((length - part) << 8) | FrameType.DATA, flags, fsid)
            if off >= end:
                del queues[sid]
                ready.popleft()
                self._emptied(sid, q)
            else:
                if off >= _COMPACT:
                    del buf[:off]
                    off = 0
                q.off = off
                if others:
                    ready.rotate(-1)  # next stream's turn
        self.pending -= handed
        return handed
