"""The registry of connected edges and the names they serve.

Routing rule (docs/DESIGN.md): an edge may serve `<unit>-svc-kins.kins-system:<port>` for its own unit
and `<node>:<port>` for its own node; anything else it advertises is refused (logged, not routed).
Several tunnels may serve one name (several edges of a unit, several tunnels of one edge, e.g. a
restarted edge whose old tunnel has not timed out yet): `pick` prefers usable tunnels with the
fewest open streams and rotates among equals, skipping draining ones.

Tenancy: a node name means one node of one unit. Node names that read as service names never get
this far (`certs.reserved_node`, checked when the certificate is read), and `add` refuses a
tunnel whose node is held, right now, by a tunnel of another unit (`NodeTaken`), so `<node>:<port>`
and the authorization rules' `node:` never reach edges of two units. The check and the insert are
one synchronous step, so two edges racing for one node cannot both win. Each edge identity holds
at most `max_per_identity` tunnels: a new one displaces the oldest (returned by `add` for the
caller to close), so a restarted edge whose old tunnel has not timed out yet is never locked out,
and one certificate cannot pile up tunnels (and their metric series and log lines).

Last seen: `GoneEdges` remembers when each identity lost its last tunnel on this replica (for
`kins_tunnel_edge_last_seen_timestamp_seconds`, the "edge gone" and "unit gone" alerts). Its
memory is bounded whatever the fleet does: at most `MAX_GONE_KEPT` identities, each for
`GONE_KEPT_FOR` seconds, oldest forgotten first; identities come from verified certificates only.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from kins_tunnel.certs.identity import CertFacts, EdgeIdentity
from kins_tunnel.names import normalise_target
from kins_tunnel.transport.session import Session

log = logging.getLogger("kins_tunnel.cloud")


def allowed_name(identity: EdgeIdentity, name: str) -> str | None:
    """The normalised name if `identity` may serve it, else None."""
    try:
        norm = normalise_target(name)
    except ValueError:
        return None
    host, _, port = norm.rpartition(":")
    if host == f"{identity.unit}-svc-kins.kins-system":
        return norm
    try:  # the node's name normalised as a target would be (a dotted name may collapse like one)
        node_host = normalise_target(f"{identity.node}:{port}").rpartition(":")[0]
    except ValueError:
        return None
    return norm if host == node_host else None


@dataclass(eq=False, slots=True)
class EdgeTunnel:
    """One live tunnel from one edge."""

    identity: EdgeIdentity
    session: Session
    names: tuple[str, ...]  # distinct (a tuple: a one-name frozenset costs 200 bytes more)
    peer: str
    connected_at: float = field(default_factory=trio.current_time)
    id: int = 0
    cert: CertFacts | None = None  # serial and expiry of the edge's certificate


class NodeTaken(Exception):
    """The node of a new tunnel is held by a tunnel of another unit."""

    def __init__(self, identity: EdgeIdentity, holder: str) -> None:
        super().__init__(
            f"node {identity.node!r} of unit {identity.unit!r} is held by an edge of unit "
            f"{holder!r}: node names must be unique across the units of a cloud"
        )
        self.holder = holder


MAX_REFUSALS_KEPT = 32  # recent refused tunnels shown in /status


@dataclass(frozen=True)
class Refusal:
    """A tunnel the registry would not route (shown in /status)."""

    at: float  # time.time()
    unit: str
    node: str
    peer: str
    reason: str  # a fixed label
    detail: str


MAX_GONE_KEPT = 20_000  # identities remembered as gone (about 300 bytes each, with their names)
GONE_KEPT_FOR = 7 * 86400.0  # seconds an identity is remembered after its last tunnel ended


class GoneEdges:
    """When each edge identity (unit, node) lost its last tunnel on this replica (`clock()`
    seconds, wall time): at most `max_kept` identities, each for `kept_for` seconds."""

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        max_kept: int = MAX_GONE_KEPT,
        kept_for: float = GONE_KEPT_FOR,
    ) -> None:
        self._clock = clock
        self._max_kept = max_kept
        self._kept_for = kept_for
        self._gone: collections.OrderedDict[tuple[str, str], float] = collections.OrderedDict()

    def left(self, unit: str, node: str) -> None:
        """The identity's last tunnel ended now."""
        self._gone.pop((unit, node), None)
        self._gone[(unit, node)] = self._clock()
        self._trim()

    def back(self, unit: str, node: str) -> None:
        """The identity has a tunnel again."""
        self._gone.pop((unit, node), None)

    def items(self) -> list[tuple[str, str, float]]:
        """(unit, node, when its last tunnel ended) of every identity remembered as gone."""
        self._trim()
        return [(unit, node, at) for (unit, node), at in self._gone.items()]

    def _trim(self) -> None:
        oldest = self._clock() - self._kept_for
        while self._gone and (
            len(self._gone) > self._max_kept or next(iter(self._gone.values())) < oldest
        ):
            self._gone.popitem(last=False)

    def __len__(self) -> int:
        return len(self._gone)


_K = TypeVar("_K")


def _unindex(index: dict[_K, dict[int, EdgeTunnel]], key: _K, tunnel_id: int) -> None:
    entries = index.get(key)
    if entries is not None:
        entries.pop(tunnel_id, None)
        if not entries:
            del index[key]


class Registry:
    def __init__(self, *, max_per_identity: int = 4) -> None:
        # every index maps to tunnels by id, oldest first: adding and removing are O(1) whatever
        # the number of tunnels (a replica takes thousands of edges back after a restart)
        self._by_name: dict[str, dict[int, EdgeTunnel]] = {}
        self._by_identity: dict[EdgeIdentity, dict[int, EdgeTunnel]] = {}
        self._tunnels: dict[int, EdgeTunnel] = {}
        self._node_units: dict[str, tuple[str, int]] = {}  # node -> (its unit, live tunnels)
        self._ids = itertools.count(1)
        self._rr = itertools.count()
        self.max_per_identity = max_per_identity
        self.on_add: list[Callable[[EdgeTunnel], None]] = []  # called before the tunnel is routed
        self.refusals: collections.deque[Refusal] = collections.deque(maxlen=MAX_REFUSALS_KEPT)
        self.gone = GoneEdges()

    def add(self, tunnel: EdgeTunnel) -> list[EdgeTunnel]:
        """Route `tunnel`; return the tunnels of the same identity it displaces (oldest first),
        which are no longer routed and which the caller closes. `NodeTaken` if its node is held
        by a tunnel of another unit (then nothing changes)."""
        unit, node = tunnel.identity.unit, tunnel.identity.node
        holder = self._node_units.get(node)
        if holder is not None and holder[0] != unit:
            raise NodeTaken(tunnel.identity, holder[0])
        for hook in self.on_add:
            hook(tunnel)
        same = self._by_identity.get(tunnel.identity, {})
        excess = len(same) + 1 - self.max_per_identity
        displaced = list(itertools.islice(same.values(), max(0, excess)))
        for old in displaced:
            self.remove(old)
        tunnel.id = next(self._ids)
        self._tunnels[tunnel.id] = tunnel
        self._by_identity.setdefault(tunnel.identity, {})[tunnel.id] = tunnel
        self._node_units[node] = (unit, self._node_units.get(node, (unit, 0))[1] + 1)
        self.gone.back(unit, node)
        for name in tunnel.names:
            self._by_name.setdefault(name, {})[tunnel.id] = tunnel
        return displaced

    def refused(self, refusal: Refusal) -> None:
        self.refusals.append(refusal)

    def remove(self, tunnel: EdgeTunnel) -> None:
        if self._tunnels.pop(tunnel.id, None) is None:
            return
        node = tunnel.identity.node
        unit, count = self._node_units[node]
        if count > 1:
            self._node_units[node] = (unit, count - 1)
        else:
            del self._node_units[node]
            self.gone.left(unit, node)
        _unindex(self._by_identity, tunnel.identity, tunnel.id)
        for name in tunnel.names:
            _unindex(self._by_name, name, tunnel.id)

    def last_seen(self) -> Iterator[tuple[str, str, float | None]]:
        """(unit, node, when) of every identity connected now (when: None, i.e. now) or
        remembered as gone (when its last tunnel ended, wall time)."""
        for node, (unit, _count) in self._node_units.items():
            yield unit, node, None
        yield from self.gone.items()

    def candidates(self, name: str) -> list[EdgeTunnel]:
        """Usable tunnels serving `name`, best first (fewest streams, rotating among equals)."""
        tunnels = [t for t in self._by_name.get(name, {}).values() if t.session.usable]
        if len(tunnels) > 1:
            k = next(self._rr) % len(tunnels)
            tunnels = tunnels[k:] + tunnels[:k]
            tunnels.sort(key=lambda t: t.session.stream_count)
        return tunnels

    def node_holder(self, node: str) -> str | None:
        """The unit whose edge holds `node` on this replica right now, or None."""
        holder = self._node_units.get(node)
        return None if holder is None else holder[0]

    def serves(self, name: str) -> bool:
        return bool(self._by_name.get(name))

    def __iter__(self) -> Iterator[EdgeTunnel]:
        return iter(list(self._tunnels.values()))

    def __len__(self) -> int:
        return len(self._tunnels)
