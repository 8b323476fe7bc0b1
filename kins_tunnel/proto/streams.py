"""The stream table: which streams exist, who opened them, which ids are spent.

Ids only grow; the side that dialled (client) uses odd ids, the other even ones. An id below the
next local id, or at or below the highest remote id, existed once: late frames for it (in flight
when it was reset) are dropped, while frames for ids never seen are protocol errors. Forgetting a
stream releases its share of the session budget.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from kins_tunnel.proto.errors import RemoteProtocolError
from kins_tunnel.proto.flow import Budget, ReceiveWindow
from kins_tunnel.proto.handshake import Role


@dataclass(slots=True)
class StreamState:
    stream_id: int
    local: bool  # we opened it
    recv: ReceiveWindow
    send_credit: int = 0
    established: bool = False  # OPEN_RESULT ok sent or received
    local_fin: bool = False  # we sent FIN
    remote_fin: bool = False  # the peer sent FIN
    target: str = ""

    @property
    def done(self) -> bool:
        return self.local_fin and self.remote_fin


class StreamTable:
    def __init__(self, role: Role, budget: Budget) -> None:
        self._client = role is Role.CLIENT
        self._budget = budget
        self._streams: dict[int, StreamState] = {}
        self.next_local_id = 1 if self._client else 2
        self.highest_remote_id = 0
        self.local_open = 0  # concurrent streams we opened
        self.remote_open = 0  # concurrent streams the peer opened

    def get(self, sid: int) -> StreamState | None:
        return self._streams.get(sid)

    def __contains__(self, sid: int) -> bool:
        return sid in self._streams

    def __len__(self) -> int:
        return len(self._streams)

    def __iter__(self) -> Iterator[StreamState]:
        return iter(list(self._streams.values()))

    def open_local(self, recv: ReceiveWindow, target: str) -> StreamState:
        sid = self.next_local_id
        self.next_local_id += 2
        s = self._streams[sid] = StreamState(sid, True, recv, target=target)
        self.local_open += 1
        return s

    def claim_remote_id(self, sid: int) -> None:
        """Check a peer-opened id (parity, never reused) and mark it spent."""
        if sid == 0 or (sid % 2 == 1) == self._client:
            raise RemoteProtocolError(f"OPEN with stream id {sid} of the wrong parity")
        if sid <= self.highest_remote_id:
            raise RemoteProtocolError(f"OPEN reuses stream id {sid}")
        self.highest_remote_id = sid

    def add_remote(self, sid: int, send_credit: int, target: str) -> StreamState:
        s = self._streams[sid] = StreamState(sid, False, ReceiveWindow(0, 0), send_credit=send_credit,
                                             target=target)
        self.remote_open += 1
        return s

    def is_local_id(self, sid: int) -> bool:
        return (sid % 2 == 1) == self._client

    def known_closed(self, sid: int) -> bool:
        """A stream id that existed and is gone (late frames for it are dropped)."""
        if sid == 0:
            return False
        if self.is_local_id(sid):
            return sid < self.next_local_id
        return sid <= self.highest_remote_id

    def forget(self, sid: int) -> None:
        s = self._streams.pop(sid, None)
        if s is None:
            return
        self._budget.release(s.recv.size)
        if s.local:
            self.local_open -= 1
        else:
            self.remote_open -= 1

    def forget_all(self) -> None:
        for sid in list(self._streams):
            self.forget(sid)
