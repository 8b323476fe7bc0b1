"""Addresses and routing names: `Address` (``host:port`` of a listener or a dial target) and
`normalise_target`, the one rule that turns a CONNECT target or a `services` key into the routing
name the cloud and the edge compare (see docs/DESIGN.md, "Routing rule"). Uplink targets are
dialled as written (`dial_target`) and compared with the allowed list by `uplink_match_name`."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_PORT_RE = re.compile(r"[0-9]{1,5}")
LABEL_RE = re.compile(r"[a-z0-9-]{1,63}")  # one DNS label


@dataclass(frozen=True, slots=True)
class Address:
    """A host and port; `host` holds IPv6 literals without brackets."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: object, *, min_port: int = 0) -> Address:
        """Parse ``host:port`` or ``[v6]:port``; raise `ValueError` with the reason."""
        if not isinstance(text, str):
            raise ValueError(f'expected a "host:port" string, got {kind(text)}')
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f'{text!r} is not "host:port"')
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
        elif ":" in host:
            raise ValueError(f"{text!r}: IPv6 addresses need brackets, as in [::1]:9000")
        if not host or any(c.isspace() or c in "[]/@" for c in host):
            raise ValueError(f"{text!r}: bad host {host!r}")
        if not _PORT_RE.fullmatch(port) or not min_port <= int(port) <= 65535:
            raise ValueError(f"{text!r}: port must be a number from {min_port} to 65535")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _parse_target(target: str) -> tuple[str, int, bool]:
    """(host, port, is_ipv6) of a ``host:port`` target, the host lower-cased without a trailing
    dot and an IPv6 literal compressed (no brackets); `ValueError` with the reason."""
    if not isinstance(target, str) or not target.isascii():
        raise ValueError("target must be ASCII text")
    host, sep, port = target.lower().rpartition(":")
    if not sep:
        raise ValueError(f"target {target!r} has no port")
    if not _PORT_RE.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise ValueError(f"target {target!r}: port must be a number from 1 to 65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            return ipaddress.IPv6Address(host[1:-1]).compressed, int(port), True
        except ValueError:
            raise ValueError(f"target {target!r}: bad IPv6 address") from None
    if ":" in host:
        raise ValueError(f"target {target!r}: IPv6 addresses need brackets")
    host = host.removesuffix(".")
    if not host or len(host) > 253:
        raise ValueError(f"target {target!r}: host must be 1 to 253 characters")
    labels = host.split(".")
    if not all(LABEL_RE.fullmatch(label) for label in labels):
        raise ValueError(f"target {target!r}: host may only hold a-z, 0-9, '-' and '.'")
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"target {target!r}: bad IPv4 address") from None
    return host, int(port), False


def normalise_target(target: str) -> str:
    """The routing name of a CONNECT target or a ``services`` key; `ValueError` if malformed.

    Lower-cases; ``<svc>.<ns>.svc`` and ``<svc>.<ns>.svc.<cluster domain>`` become
    ``<svc>.<ns>``; drops a trailing dot and leading zeros of the port; IPv6 literals stay in
    brackets (in their compressed form). The port is required and must be 1..65535.
    """
    host, port, v6 = _parse_target(target)
    if v6:
        return f"[{host}]:{port}"
    labels = host.split(".")
    if len(labels) >= 3 and labels[2] == "svc":
        host = f"{labels[0]}.{labels[1]}"
    return f"{host}:{port}"


def dial_target(target: str) -> str:
    """An uplink target as written, in canonical form: the name that is dialled.

    Checks and canonicalises like `normalise_target` (lower case, no trailing dot, no leading
    zeros in the port, IPv6 compressed in brackets) but never shortens the host:
    ``mirror.eu.svc.example.com:443`` stays ``mirror.eu.svc.example.com:443``.
    """
    host, port, v6 = _parse_target(target)
    return f"[{host}]:{port}" if v6 else f"{host}:{port}"


def uplink_match_name(target: str, cluster_domain: str = "cluster.local") -> str:
    """The name an uplink target is compared by with the cloud's allowed list.

    `dial_target`, except that ``<svc>.<ns>.svc`` and ``<svc>.<ns>.svc.<cluster_domain>``
    become ``<svc>.<ns>`` (so ``x.y.svc.cluster.local:443`` and ``x.y:443`` match each other);
    any other ``.svc.`` name (``mirror.eu.svc.example.com``) is compared as written.
    """
    host, port, v6 = _parse_target(target)
    if v6:
        return f"[{host}]:{port}"
    labels = host.split(".")
    domain = cluster_domain.lower().strip(".")
    if len(labels) >= 3 and labels[2] == "svc":
        rest = ".".join(labels[3:])
        if rest in ("", domain):
            host = f"{labels[0]}.{labels[1]}"
    return f"{host}:{port}"


_URL_HEAD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)", re.S)


def authority(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 literal (a CONNECT target, a Host header)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def redact_url(text: object) -> str:
    """`text` (a URL, or what was meant as one) for an error message or a log line: the password
    of ``user:password@`` becomes ``***``, and a userinfo without ``:`` (a token) too."""
    shown = text if isinstance(text, str) else repr(text)
    m = _URL_HEAD.match(shown)
    if m is None or "@" not in m.group(2):
        return shown
    userinfo, _, hostport = m.group(2).rpartition("@")
    user, colon, _secret = userinfo.partition(":")
    masked = f"{user}:***" if colon else "***"
    return f"{m.group(1)}{masked}@{hostport}{shown[m.end() :]}"


def is_ip_target(target: str) -> bool:
    """True if the normalised target `target` (host:port) names an IP address, not a name."""
    host = target.rpartition(":")[0].strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback_host(host: str) -> bool:
    """True if a listener on `host` is reachable from this machine only: ``localhost``,
    127.0.0.0/8 or ``::1``."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def source_key(host: str) -> str:
    """Who a per-source share or limit belongs to, for a client address `host`: an IPv4 address
    as it is, an IPv6 address by its /64 (one subscriber's usual allocation, in which a client
    can pick a fresh address for every connection), an IPv4-mapped IPv6 address as its IPv4.
    Anything else (a name, ``?``) as given."""
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


def kind(value: object) -> str:
    """How a YAML value looks, for error messages: `string 'x'`, `integer 3`, `list`, `null`."""
    names: dict[type, str] = {
        type(None): "null",
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
    }
    if type(value) not in names:
        return (
            "list"
            if isinstance(value, list)
            else "mapping"
            if isinstance(value, dict)
            else type(value).__name__
        )
    shown = "" if value is None else " " + repr(value)
    return names[type(value)] + (shown if len(shown) <= 41 else shown[:38] + "...")


# Names as in certificates: a NodeUnit (a DNS label) and a node (a DNS subdomain).
UNIT_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")  # a NodeUnit name, as in certificates
NODE_RE = re.compile(  # a node name, as in certificates (a DNS subdomain)
    r"(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
)
