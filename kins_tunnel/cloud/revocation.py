"""Revoked edge credentials (`tunnel.revoked_file`).

One entry per line; ``#`` starts a comment; blank lines are ignored::

    # a certificate, by serial number in hex (':' allowed), or as `openssl x509 -serial -noout`
    # prints it
    5F3A09C2D1E4B7A8
    5f:3a:09:c2:d1:e4:b7:a9
    serial=5F3A09C2D1E4B7AA
    # an identity: every certificate of that unit and node, whatever its serial; a node name is
    # any name `kins-tunnel certs edge --node` takes (a DNS subdomain)
    test/edge1
    test/edge1.site-a
    # every node of a unit
    retired-unit/*
    # every client certificate (proxy.tls with client_ca) whose subject CN is this principal
    client:carol

A revoked edge's handshake is refused (counted as ``kins_tunnel_handshake_failures_total
{reason="revoked"}``) and, when the file changes, its live tunnels are closed. The same list
covers client certificates of the proxy's TLS listener (`client_revoked`: by serial or by
``client:<CN>``): their handshakes are refused and their live relays closed. The file is re-read
off the event loop (`kins_tunnel.filewatch`).

The list fails closed. At start-up a bad line is an error (the cloud does not start). On a re-read,
the entries that parse take effect even when another line does not: they are added to the list in
use (so an entry that a bad version drops stays revoked until the file parses whole), the bad
line is logged with its number and the failure counted and shown in ``/status``. A file that is
gone or unreadable keeps the previous list.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kins_tunnel.certs.identity import _NAME_RULES, EdgeIdentity, cert_facts
from kins_tunnel.filewatch import PartialValue, WatchedFile

_CLIENT = re.compile(r"client:([^\s:]{1,64})")  # the principal rules of `proxy_tls`
_SERIAL = re.compile(
    r"(?:serial=|0x)?([0-9a-f]{1,2}(?::[0-9a-f]{1,2})+|[0-9a-f]{1,64})", re.IGNORECASE
)


def _name(what: str, value: str) -> bool:
    """`value` is a unit (node) name as `kins-tunnel certs edge` takes it."""
    return len(value) <= 253 and _NAME_RULES[what][0].fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class RevokedList:
    serials: frozenset[int]
    identities: frozenset[tuple[str, str]]  # (unit, node); node "*" = the whole unit
    clients: frozenset[str] = frozenset()  # subject CNs of proxy client certificates

    def reason(self, identity: EdgeIdentity, serial: int) -> str | None:
        """Why this edge certificate is revoked, or None."""
        if serial in self.serials:
            return f"certificate serial {serial:x} is revoked"
        for key in ((identity.unit, identity.node), (identity.unit, "*")):
            if key in self.identities:
                return f"edge identity {key[0]}/{key[1]} is revoked"
        return None

    def __len__(self) -> int:
        return len(self.serials) + len(self.identities) + len(self.clients)

    def __or__(self, other: RevokedList) -> RevokedList:
        return RevokedList(
            self.serials | other.serials,
            self.identities | other.identities,
            self.clients | other.clients,
        )


def client_revoked(revoked: RevokedList, der: bytes) -> str | None:
    """Why this proxy client certificate (DER, verified) is revoked, or None."""
    try:
        facts = cert_facts(der)
    except ValueError:
        return "unreadable client certificate"
    if facts.serial in revoked.serials:
        return f"certificate serial {facts.serial:x} is revoked"
    if facts.common_name in revoked.clients:
        return f"client {facts.common_name} is revoked"
    return None


def parse_revoked(data: bytes) -> RevokedList:
    """Parse a revocation list. A line that is not an entry raises `PartialValue` (a `ValueError`)
    naming the first bad line and carrying the entries that did parse."""
    serials: set[int] = set()
    identities: set[tuple[str, str]] = set()
    clients: set[str] = set()
    bad: list[str] = []
    for number, raw in enumerate(data.splitlines(), 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad.append(f"line {number}: not UTF-8 text ({exc.reason})")
            continue
        line = text.split("#", 1)[0].strip()
        if not line:
            continue
        client = _CLIENT.fullmatch(line)
        if client is not None:
            clients.add(client.group(1))
            continue
        unit, slash, node = line.partition("/")
        if slash and _name("unit", unit) and (node == "*" or _name("node", node)):
            identities.add((unit, node))
            continue
        serial = _SERIAL.fullmatch(line)
        if serial is None:
            shown = line if len(line) <= 40 else line[:37] + "..."
            bad.append(
                f"line {number}: {shown!r} is neither a hex certificate serial nor <unit>/<node> "
                "nor client:<name>"
            )
            continue
        serials.add(int(serial.group(1).replace(":", ""), 16))
    revoked = RevokedList(frozenset(serials), frozenset(identities), frozenset(clients))
    if bad:
        more = f" (and {len(bad) - 1} more bad lines)" if len(bad) > 1 else ""
        raise PartialValue(revoked, bad[0] + more)
    return revoked


class Revocation:
    """The revocation list, kept current by `watch()` (run it in a nursery)."""

    def __init__(self, path: Path) -> None:
        self._loaded = False
        self.file = WatchedFile(path, self._parse, "tunnel.revoked_file")
        self._loaded = True

    def _parse(self, data: bytes) -> RevokedList:
        try:
            return parse_revoked(data)
        except PartialValue as exc:
            if not self._loaded:  # at start-up: refuse to start
                raise
            # fail closed: what parses is added to what is in use (nothing is let back in)
            raise PartialValue(self.file.value | exc.value, str(exc)) from None

    def reason(self, identity: EdgeIdentity, serial: int) -> str | None:
        return self.file.value.reason(identity, serial)

    async def watch(
        self, on_change: Callable[[RevokedList], object], interval: float = 1.0
    ) -> None:
        """Re-read the file every `interval` s; `on_change(list)` after each change applied (a
        version with bad lines included: its good entries apply)."""
        await self.file.watch(interval, on_change)
