"""The registry of connected edges and the names they serve.

Routing rule (docs/DESIGN.md): an edge may serve `<unit>-svc-kins.kins-system:<port>` for its own unit
and `<node>:<port>` for its own node; anything else it advertises is refused (logged, not routed).
Several tunnels may serve one name (several edges of a unit, several tunnels of one edge, e.g. a
restarted edge whose old tunnel has not timed out yet): `pick` prefers usable tunnels with the
fewest open streams and rotates among equals, skipping draining ones.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import trio

from kins_tunnel.certs import CertFacts, EdgeIdentity
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


@dataclass(eq=False)
class EdgeTunnel:
    """One live tunnel from one edge."""

    identity: EdgeIdentity
    session: Session
    names: frozenset[str]
    peer: str
    connected_at: float = field(default_factory=trio.current_time)
    id: int = 0
    cert: CertFacts | None = None  # serial and expiry of the edge's certificate


class Registry:
    def __init__(self) -> None:
        self._by_name: dict[str, list[EdgeTunnel]] = {}
        self._tunnels: dict[int, EdgeTunnel] = {}
        self._ids = itertools.count(1)
        self._rr = itertools.count()
        self.on_add: list[Callable[[EdgeTunnel], None]] = []  # called before the tunnel is routed

    def add(self, tunnel: EdgeTunnel) -> None:
        for hook in self.on_add:
            hook(tunnel)
        tunnel.id = next(self._ids)
        self._tunnels[tunnel.id] = tunnel
        for name in tunnel.names:
            self._by_name.setdefault(name, []).append(tunnel)

    def remove(self, tunnel: EdgeTunnel) -> None:
        if self._tunnels.pop(tunnel.id, None) is None:
            return
        for name in tunnel.names:
            lst = self._by_name.get(name, [])
            if tunnel in lst:
                lst.remove(tunnel)
            if not lst:
                self._by_name.pop(name, None)

    def candidates(self, name: str) -> list[EdgeTunnel]:
        """Usable tunnels serving `name`, best first (fewest streams, rotating among equals)."""
        tunnels = [t for t in self._by_name.get(name, ()) if t.session.usable]
        if len(tunnels) > 1:
            k = next(self._rr) % len(tunnels)
            tunnels = tunnels[k:] + tunnels[:k]
            tunnels.sort(key=lambda t: t.session.stream_count)
        return tunnels

    def serves(self, name: str) -> bool:
        return bool(self._by_name.get(name))

    def __iter__(self) -> Iterator[EdgeTunnel]:
        return iter(list(self._tunnels.values()))

    def __len__(self) -> int:
        return len(self._tunnels)
