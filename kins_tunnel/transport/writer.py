"""The output side of a session: protocol output to the TLS socket, and back-pressure.

Writes are serialised without a lock: whoever produces protocol output calls `kick()`, which
writes at once if the socket takes it (no task switch on the latency path) and otherwise leaves
the rest to the writer task. The output stays queued in the protocol core until the TLS socket has
sent the previous batch; then up to `WRITE_BATCH` bytes are encrypted in one call (several TLS
records, one system call; `Connection.write_output` hands them over without a copy or an
allocation). The writer task is started the first time the socket is full: an idle tunnel never
has one. Senders wait (`wait_space`) while more than `OUTPUT_HIGH_WATER` bytes are queued: TCP's
back-pressure reaches them, memory stays bounded.

Pacing (see `proto.pacer`): when the connection holds bulk DATA for its pacer's credit, `kick`
starts the writer task if needed and the writer sleeps until `Connection.paced_until()`, then
writes again. Held bulk data does not count towards the high-water mark (the peer's credit bounds
it), so a sender of an interactive stream never waits behind it.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from kins_tunnel.proto import Connection
from kins_tunnel.transport.byte_transport import ByteTransport
from kins_tunnel.transport.errors import TransportError

WRITE_BATCH = 256 * 1024  # plaintext bytes encrypted and written per system call (at most)
OUTPUT_HIGH_WATER = 512 * 1024


class SessionWriter:
    """Moves one session's protocol output to its socket. `fail(reason)` ends the session."""

    __slots__ = (
        "_conn",
        "_tls",
        "_closed",
        "_fail",
        "_nursery",
        "_wakeup",
        "_started",
        "_lot",
        "_flush_lot",
        "_timed",
    )

    def __init__(
        self, conn: Connection, tls: ByteTransport, closed: trio.Event, fail: Callable[[str], None]
    ) -> None:
        self._conn = conn
        self._tls = tls
        self._closed = closed
        self._fail = fail
        self._nursery: trio.Nursery | None = None  # where the writer task starts, when needed
        self._wakeup: trio.Event | None = None  # made by the writer task, once it runs
        self._started = False
        self._lot: trio.lowlevel.ParkingLot | None = None  # made for the first waiting sender
        self._flush_lot: trio.lowlevel.ParkingLot | None = None  # made by `wait_flushed`
        self._timed = False  # the writer task sleeps until the pacer's next credit

    def start(self, nursery: trio.Nursery) -> None:
        """From now on a writer task may be started in `nursery` (the session's)."""
        self._nursery = nursery

    def kick(self) -> None:
        """Move protocol output to the socket now if it takes it; otherwise wake the writer.

        Whatever path it takes, senders waiting for output space are woken once the queue is
        below the high-water mark (a wake-up lost here would stall every stream of the tunnel).
        """
        conn = self._conn
        tls = self._tls
        lot = self._lot
        if not conn.pending_output() and not tls.pending:  # nothing to write (the common case)
            if lot:
                lot.unpark_all()
            if self._flush_lot:
                self._flush_lot.unpark_all()
            return
        if not self._closed.is_set():
            try:
                while tls.flush():  # the previous batch is out: encrypt and send the next one
                    if not conn.write_output(tls.send_chunk, WRITE_BATCH):
                        break
                else:
                    self._wake_writer()  # the socket is full: the writer waits for it
            except TransportError as exc:
                self._fail(str(exc))
                return
            if not self._timed and conn.paced_until() is not None:
                self._wake_writer()  # bulk DATA is held: the writer sleeps until its credit
        if lot and conn.unpaced_output() <= OUTPUT_HIGH_WATER:
            lot.unpark_all()
        if self._flush_lot and not conn.pending_output() and not tls.pending:
            self._flush_lot.unpark_all()

    @property
    def idle(self) -> bool:
        """Nothing is queued or in flight ahead of a new frame, and the session is open: a frame
        given to `send_direct` now goes out in order."""
        return (
            not self._tls.pending and not self._conn.pending_output() and not self._closed.is_set()
        )

    def send_direct(self, frame: bytes) -> None:
        """Send one small control frame of the protocol core past its queue (a PONG from
        `Connection.answer_lone_ping`: the idle tunnel's path), while `idle`. What the socket
        does not take waits for the writer task as any output does."""
        try:
            if not self._tls.send_chunk(frame):
                self._wake_writer()  # the socket is full: the writer waits for it
        except TransportError as exc:
            self._fail(str(exc))

    def _wake_writer(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
        elif not self._started and self._nursery is not None:
            self._started = True
            self._nursery.start_soon(self.writer)

    async def writer(self) -> None:
        """The writer task: waits for the socket while it is full."""
        self._started = True
        tls = self._tls
        try:
            while True:
                while not tls.flush():
                    await tls.wait_writable()
                wakeup = self._wakeup = trio.Event()
                self._timed = True  # this task decides below when it writes held data again
                self.kick()  # sets `wakeup` if the socket filled up again
                self._timed = False
                due = None if wakeup.is_set() else self._conn.paced_until()
                if due is None:
                    await wakeup.wait()
                else:
                    self._timed = True
                    with trio.move_on_at(due):
                        await wakeup.wait()
        except (TransportError, trio.ClosedResourceError) as exc:
            # ClosedResourceError: another task closed the session under our wait
            self._fail(str(exc) or "session closed")

    @property
    def full(self) -> bool:
        """More than the high-water mark is queued for the socket: senders should wait."""
        return self._conn.unpaced_output() > OUTPUT_HIGH_WATER

    async def wait_space(self) -> None:
        """Block while too much output is queued (TCP back-pressure) and the session lives."""
        while self.full and not self._closed.is_set():
            if self._lot is None:
                self._lot = trio.lowlevel.ParkingLot()
            await self._lot.park()

    async def wait_flushed(self) -> None:
        """Block until every byte of protocol output (paced data included) is in the socket, or
        the session is closed. The caller sets the deadline."""
        while (self._conn.pending_output() or self._tls.pending) and not self._closed.is_set():
            if self._flush_lot is None:
                self._flush_lot = trio.lowlevel.ParkingLot()
            await self._flush_lot.park()

    def wake_senders(self) -> None:
        """The session is over: every waiting sender goes on (and finds it closed)."""
        if self._lot is not None:
            self._lot.unpark_all()
        if self._flush_lot is not None:
            self._flush_lot.unpark_all()
