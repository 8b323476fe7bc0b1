"""How source addresses share the tunnel port's admission (`cloud.admission`): its pending set,
and the line for a first handshake turn.

- `SourceShares`: the pending connections per source address (`names.source_key`), and which
  address holds the most, in O(1) (counts move by one, so the largest is tracked through buckets
  of addresses by count). With the pending set full, the room a newcomer needs is taken from
  that address (a longest-queue drop, as fair queueing does with buffers).
- `SourceLines`: connections waiting for their first handshake turn, one line per address, the
  lines served in turn (round robin).

Both hold no more than the connections they track (empty entries are dropped at once).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from kins_tunnel.cloud.admission import Ticket


class SourceShares:
    """The pending set per source address, and which source holds the most (O(1): counts move
    by one, so the largest is tracked through buckets of sources by count)."""

    __slots__ = ("_tickets", "_buckets", "_max")

    def __init__(self) -> None:
        # source -> its pending tickets, oldest first
        self._tickets: dict[str, collections.OrderedDict[Ticket, None]] = {}
        self._buckets: dict[int, dict[str, None]] = {}  # count -> the sources holding that many
        self._max = 0

    def _move(self, source: str, before: int, after: int) -> None:
        if before:
            bucket = self._buckets[before]
            del bucket[source]
            if not bucket:
                del self._buckets[before]
                if self._max == before and after < before:
                    self._max = after
        if after:
            self._buckets.setdefault(after, {})[source] = None
            self._max = max(self._max, after)

    def add(self, ticket: Ticket) -> None:
        tickets = self._tickets.setdefault(ticket.source, collections.OrderedDict())
        tickets[ticket] = None
        self._move(ticket.source, len(tickets) - 1, len(tickets))

    def remove(self, ticket: Ticket) -> None:
        tickets = self._tickets[ticket.source]
        del tickets[ticket]
        self._move(ticket.source, len(tickets) + 1, len(tickets))
        if not tickets:
            del self._tickets[ticket.source]

    def fattest_other_than(self, source: str) -> str | None:
        """A source holding more pending connections than `source` would with one more (ties
        go against `source`); None if there is none."""
        own = len(self._tickets.get(source, ()))
        if own + 1 >= self._max:
            return None
        return next(iter(self._buckets[self._max]))  # `source` is not in it: own < max

    def oldest_in(self, source: str, among: Mapping[Ticket, object]) -> Ticket | None:
        """`source`'s oldest pending connection that is in `among`."""
        for ticket in self._tickets.get(source, ()):
            if ticket in among:
                return ticket
        return None

    def newest_outside(self, source: str, among: Mapping[Ticket, object]) -> Ticket | None:
        """`source`'s newest pending connection that is not in `among` (e.g. not in a slot)."""
        for ticket in reversed(self._tickets.get(source, {})):
            if ticket not in among:
                return ticket
        return None


class SourceLines:
    """Connections waiting for their first handshake turn, in one line per source address, the
    lines served in turn (round robin): a source with a thousand connections waiting gets one
    turn in each round, like a source with one. Lines with nobody left in them are dropped
    (`tidy`), so this holds no more than the connections waiting."""

    __slots__ = ("_lots", "_turns")

    def __init__(self) -> None:
        self._lots: dict[str, trio.lowlevel.ParkingLot] = {}
        self._turns: collections.OrderedDict[str, None] = collections.OrderedDict()  # next first

    def lot(self, source: str) -> trio.lowlevel.ParkingLot:
        lot = self._lots.get(source)
        if lot is None:
            lot = self._lots[source] = trio.lowlevel.ParkingLot()
            self._turns[source] = None
        return lot

    def tidy(self, source: str) -> None:
        """A connection of `source` stopped waiting: drop its line if nobody is left in it."""
        lot = self._lots.get(source)
        if lot is not None and not lot:
            del self._lots[source]
            self._turns.pop(source, None)

    def unpark(self) -> None:
        """Wake the first connection of the line whose turn it is; that line goes to the back."""
        turns = self._turns
        for _ in range(len(turns)):  # a line just emptied (its last one woken) goes round too
            source = next(iter(turns))
            turns.move_to_end(source)
            lot = self._lots[source]
            if lot:
                lot.unpark()
                return

    def ahead(self, source: str, waiting: int) -> int:
        """About how many connections a newcomer of `source` waits behind: its line's, and as
        many of each other line's as turns go by before its own (at most `waiting`, everyone)."""
        own = len(self._lots[source]) if source in self._lots else 0
        others = len(self._lots) - (source in self._lots)
        return min(waiting, own + others * (own + 1))
