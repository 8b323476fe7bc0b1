"""Revoked edge credentials (`tunnel.revoked_file`).

One entry per line; ``#`` starts a comment; blank lines are ignored::

    # a certificate, by serial number in hex (as `openssl x509 -serial` prints it; ':' allowed)
    5F3A09C2D1E4B7A8
    5f:3a:09:c2:d1:e4:b7:a9
    # an identity: every certificate of that unit and node, whatever its serial
    test/edge1
    # every node of a unit
    retired-unit/*
    # every client certificate (proxy.tls with client_ca) whose subject CN is this principal
    client:carol

A revoked edge's handshake is refused (counted as ``kins_tunnel_handshake_failures_total
{reason="revoked"}``) and, when the file changes, its live tunnels are closed. The same list
covers client certificates of the proxy's TLS listener (`client_revoked`: by serial or by
``client:<CN>``): their handshakes are refused and their live relays closed. The file is re-read
off the event loop (`kins_tunnel.filewatch`); a broken new version keeps the previous list in use
and logs why (a revocation list that cannot be read must not silently let everyone back in, nor
cut every edge off).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kins_tunnel.certs import EdgeIdentity, cert_facts
from kins_tunnel.filewatch import WatchedFile

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_IDENTITY = re.compile(rf"({_LABEL})/({_LABEL}|\*)")
_CLIENT = re.compile(r"client:([^\s:]{1,64})")  # the principal rules of `proxy_tls`
_SERIAL = re.compile(r"(?:0x)?([0-9a-f]{1,2}(?::[0-9a-f]{1,2})+|[0-9a-f]{1,64})")


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
    """Parse a revocation list; `ValueError` naming the line for anything that is not an entry."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text ({exc.reason})") from None
    serials: set[int] = set()
    identities: set[tuple[str, str]] = set()
    clients: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        client = _CLIENT.fullmatch(line)
        if client is not None:
            clients.add(client.group(1))
            continue
        ident = _IDENTITY.fullmatch(line)
        if ident is not None:
            identities.add((ident.group(1), ident.group(2)))
            continue
        serial = _SERIAL.fullmatch(line.lower())
        if serial is None:
            shown = line if len(line) <= 40 else line[:37] + "..."
            raise ValueError(
                f"line {number}: {shown!r} is neither a hex certificate serial nor <unit>/<node> "
                "nor client:<name>"
            )
        serials.add(int(serial.group(1).replace(":", ""), 16))
    return RevokedList(frozenset(serials), frozenset(identities), frozenset(clients))


class Revocation:
    """The revocation list, kept current by `watch()` (run it in a nursery)."""

    def __init__(self, path: Path) -> None:
        self.file = WatchedFile(path, parse_revoked, "tunnel.revoked_file")

    def reason(self, identity: EdgeIdentity, serial: int) -> str | None:
        return self.file.value.reason(identity, serial)

    async def watch(
        self, on_change: Callable[[RevokedList], object], interval: float = 1.0
    ) -> None:
        """Re-read the file every `interval` s; `on_change(list)` after each successful change."""
        await self.file.watch(interval, on_change)
