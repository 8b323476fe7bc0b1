"""ClusterIP aliases: `CONNECT 10.96.12.34:443` reaches `test-svc-kins.kins-system:443`.

The Kins documentation lets a kubeconfig's ``server:`` be the service name *or the service IP* of
``<unit>-svc-kins`` (a Service in the cloud cluster's ``kins-system`` namespace). The cloud never
dials an IP address: an IP target is rewritten to the routing name it stands for, and that name is
routed exactly like one given by name (only an edge of that unit may serve it). An IP that is not
in the table is refused (503) and nothing is dialled.

The table has two sources:

- static entries from ``aliases:`` in cloud.yaml, ``"ip:port": "name:port"`` (exact address and
  port; any routing name, e.g. also a node's ``edge1:22``);
- discovery (``alias_discovery``), which needs no Kubernetes RBAC: for every unit with a connected
  edge, resolve ``<unit>-svc-kins.kins-system.svc.<cluster domain>`` through the cluster's DNS.
  Every address found stands for that Service at *any* port (``ip:p`` → the service name at
  ``p``: DNS tells addresses, not ports). Lookups run when a unit first connects and every
  `interval` seconds for every connected unit; a failed lookup keeps the unit's previous entries,
  a successful one replaces them.

Static entries win over discovered ones. The resolver is injectable (`Resolver`): tests pass a
table they control; production uses `dns_resolver`.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

import trio

from kins_tunnel.config import AliasDiscovery
from kins_tunnel.names import is_ip_target

log = logging.getLogger("kins_tunnel.cloud.aliases")

Resolver = Callable[[str], Awaitable[list[str]]]  # host name -> IP addresses; OSError on failure
LOOKUP_TIMEOUT = 5.0
MAX_CONCURRENT_LOOKUPS = 16


async def dns_resolver(host: str) -> list[str]:
    """The IP addresses of `host` from the system resolver (in a worker thread)."""
    infos = await trio.socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def service_host(unit: str, cluster_domain: str) -> str:
    """The fully qualified DNS name of a unit's `<unit>-svc-kins` Service (trailing dot: no search)."""
    return f"{unit}-svc-kins.kins-system.svc.{cluster_domain}."


class NoAlias(Exception):
    """An IP target that is not in the alias table."""


@dataclass(frozen=True, slots=True)
class Rewrite:
    name: str  # the routing name to route
    via: str  # "" (not an IP), "static" or "discovered"


class AliasTable:
    def __init__(
        self,
        static: Mapping[str, str],
        discovery: AliasDiscovery,
        resolver: Resolver = dns_resolver,
        on_lookup: Callable[[str], object] | None = None,
    ) -> None:
        self.static = dict(static)
        self.discovery = discovery
        self._resolver = resolver
        self._on_lookup = on_lookup  # called with "ok" / "failed" per lookup (a metric)
        self._by_unit: dict[str, frozenset[str]] = {}  # unit -> its Service's IPs (compressed)
        self._by_ip: dict[str, str] = {}  # IP -> unit
        self._units: Callable[[], Iterable[str]] = lambda: ()
        self._pending: set[str] = set()
        self._asked: set[str] = set()  # units looked up at least once (found or not)
        self._wake = trio.Event()

    # --- the hot path: memory only ---

    def rewrite(self, target: str) -> Rewrite:
        """The routing name for normalised `target`; `NoAlias` for an IP not in the table."""
        if not is_ip_target(target):
            return Rewrite(target, "")
        name = self.static.get(target)
        if name is not None:
            return Rewrite(name, "static")
        host, _, port = target.rpartition(":")
        unit = self._by_ip.get(host.strip("[]"))
        if unit is not None:
            return Rewrite(f"{unit}-svc-kins.kins-system:{port}", "discovered")
        raise NoAlias(
            f"{host} is not a known ClusterIP of a unit's service (no alias; "
            "the cloud does not dial IP addresses)"
        )

    def entries(self) -> dict[str, str]:
        """The whole table for status: static "ip:port" and discovered "ip:*" keys -> names."""
        out = {
            (f"[{ip}]:*" if ":" in ip else f"{ip}:*"): f"{unit}-svc-kins.kins-system:*"
            for ip, unit in sorted(self._by_ip.items())
        }
        out.update(self.static)
        return out

    # --- discovery ---

    def unit_connected(self, unit: str) -> None:
        """A unit got an edge: look its Service up now, unless it was looked up before (then the
        interval takes care of it: a reconnect storm of one unit's edges is one lookup)."""
        if self.discovery.enabled and unit not in self._asked and unit not in self._pending:
            self._pending.add(unit)
            self._wake.set()

    async def lookup(self, unit: str) -> bool:
        """Resolve one unit's Service now; True if the lookup succeeded (entries replaced)."""
        host = service_host(unit, self.discovery.cluster_domain)
        self._asked.add(unit)
        try:
            with trio.fail_after(LOOKUP_TIMEOUT):
                found = await self._resolver(host)
            ips = frozenset(ipaddress.ip_address(a.split("%", 1)[0]).compressed for a in found)
        except (OSError, ValueError, trio.TooSlowError) as exc:
            self._count("failed")
            log.debug(
                "ClusterIP lookup failed, keeping the previous entries",
                extra={"unit": unit, "host": host, "reason": str(exc) or type(exc).__name__},
            )
            return False
        self._count("ok")
        old = self._by_unit.get(unit, frozenset())
        if ips != old:
            for ip in old - ips:
                if self._by_ip.get(ip) == unit:
                    del self._by_ip[ip]
            for ip in ips:
                other = self._by_ip.get(ip)
                if other is not None and other != unit:
                    log.warning(
                        "two units' Services resolve to one address; the later lookup wins",
                        extra={"address": ip, "unit": unit, "previous_unit": other},
                    )
                    self._by_unit[other] = self._by_unit[other] - {ip}
                self._by_ip[ip] = unit
            log.info(
                "ClusterIP aliases of a unit's service",
                extra={"unit": unit, "host": host, "addresses": ",".join(sorted(ips)) or "-"},
            )
        self._by_unit[unit] = ips
        return True

    async def run(self, units: Callable[[], Iterable[str]]) -> None:
        """Discovery loop until cancelled: new units at once, every connected unit each interval."""
        if not self.discovery.enabled:
            return
        self._units = units
        limiter = trio.CapacityLimiter(MAX_CONCURRENT_LOOKUPS)
        next_round = trio.current_time()
        while True:
            if trio.current_time() >= next_round:
                todo = set(self._units()) | self._pending
                next_round = trio.current_time() + self.discovery.interval
            else:
                todo = set(self._pending)
            self._pending.clear()
            if todo:
                async with trio.open_nursery() as nursery:
                    for unit in sorted(todo):
                        nursery.start_soon(self._limited, limiter, unit)
            with trio.move_on_at(next_round):
                await self._wake.wait()
            self._wake = trio.Event()

    async def _limited(self, limiter: trio.CapacityLimiter, unit: str) -> None:
        async with limiter:
            await self.lookup(unit)

    def _count(self, result: str) -> None:
        if self._on_lookup is not None:
            self._on_lookup(result)
