"""Configuration: YAML files read once into validated, frozen dataclasses.

This module owns the config contract (README "Config keys"): the shape of ``cloud.yaml`` and ``edge.yaml``,
every default, every range check, and the routing-name rule (`normalise_target`). The rest of the
program receives `CloudConfig` / `EdgeConfig` and never looks at YAML or dictionaries.

Validation is strict and every failure is a one-line `UserError` that names the file and the key
path, e.g. ``cloud.yaml: proxy.lsiten: unknown key (expected one of: listen, auth, ...)``. Keys of
every section are exactly the field names of its dataclass; unknown keys, duplicate keys, wrong
types (booleans are never numbers), non-positive timeouts and out-of-range limits are errors. An
optional section given as ``null`` (``proxy:`` with nothing under it) takes its defaults, except the
edge's ``admin: null`` which disables the admin endpoint.

The uplink keys (``uplinks`` on both sides, ``uplink_dial_timeout``, the edge's ``uplink_proxy``)
are described in the README section "Uplinks"; their targets are normalised like CONNECT targets.

Relative paths (``tls.*``, ``proxy.auth.*``, ``proxy.authz_file``, ``proxy.tls.*``,
``tunnel.revoked_file``, the edge's ``proxy.credentials_file``) are resolved against the config
file's directory. This
module only resolves paths; reading those files, and reporting them unreadable, is the job of their
users (`kins_tunnel.certs` for TLS).
"""

import ipaddress
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import yaml

from kins_tunnel.errors import UserError
from kins_tunnel.proto import LimitError, MuxConfig
from kins_tunnel.transport.http_proxy import parse_proxy_url

KiB, MiB = 1024, 1024 * 1024
LOG_LEVELS = ("debug", "info", "warning", "error")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_LABEL_RE = re.compile(r"[a-z0-9-]{1,63}")
_UNIT_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")  # a NodeUnit name, as in certificates


@dataclass(frozen=True, slots=True)
class Address:
    """A host and port; `host` holds IPv6 literals without brackets."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: object, *, min_port: int = 0) -> "Address":
        """Parse ``host:port`` or ``[v6]:port``; raise `ValueError` with the reason."""
        if not isinstance(text, str):
            raise ValueError(f'expected a "host:port" string, got {_kind(text)}')
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


def normalise_target(target: str) -> str:
    """The routing name of a CONNECT target or a ``services`` key; `ValueError` if malformed.

    Lower-cases; ``<svc>.<ns>.svc`` and ``<svc>.<ns>.svc.<cluster domain>`` become
    ``<svc>.<ns>``; drops a trailing dot and leading zeros of the port; IPv6 literals stay in
    brackets (in their compressed form). The port is required and must be 1..65535.
    """
    if not isinstance(target, str) or not target.isascii():
        raise ValueError("target must be ASCII text")
    host, sep, port = target.lower().rpartition(":")
    if not sep:
        raise ValueError(f"target {target!r} has no port")
    if not _PORT_RE.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise ValueError(f"target {target!r}: port must be a number from 1 to 65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]:{int(port)}"
        except ValueError:
            raise ValueError(f"target {target!r}: bad IPv6 address") from None
    if ":" in host:
        raise ValueError(f"target {target!r}: IPv6 addresses need brackets")
    host = host.removesuffix(".")
    if not host or len(host) > 253:
        raise ValueError(f"target {target!r}: host must be 1 to 253 characters")
    labels = host.split(".")
    if not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise ValueError(f"target {target!r}: host may only hold a-z, 0-9, '-' and '.'")
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"target {target!r}: bad IPv4 address") from None
    if len(labels) >= 3 and labels[2] == "svc":
        host = f"{labels[0]}.{labels[1]}"
    return f"{host}:{int(port)}"


def is_ip_target(target: str) -> bool:
    """True if the normalised target `target` (host:port) names an IP address, not a name."""
    host = target.rpartition(":")[0].strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# --- the dataclasses -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TLSFiles:
    ca: Path
    cert: Path
    key: Path


# The `mux:` section is the protocol core's own settings object: it validates its bounds itself.
MuxSettings = MuxConfig


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: str = "info"
    json: bool = False


@dataclass(frozen=True, slots=True)
class ProxyAuth:
    basic_file: Path | None = None  # lines "user:password"
    bearer_file: Path | None = None  # one token per line


@dataclass(frozen=True, slots=True)
class ProxyTLS:
    """The TLS listener of the CONNECT proxy (`proxy.tls`)."""

    listen: Address = Address("0.0.0.0", 8443)
    cert: Path | None = None  # None: the cloud's own tls.cert / tls.key
    key: Path | None = None
    client_ca: Path | None = None  # set: client certificates required, subject = principal


@dataclass(frozen=True, slots=True)
class ProxySettings:
    listen: Address | None = Address("0.0.0.0", 8080)  # None (`listen: null`): no plain listener
    auth: ProxyAuth | None = None
    max_connections: int = 10000
    header_timeout: float = 10.0  # seconds to receive the whole CONNECT request
    max_request_bytes: int = 16384  # request line + headers
    dial_timeout: float = 10.0  # seconds for the edge to answer an open (then 504)
    authz_file: Path | None = None  # per-principal rules; None: every authenticated client may pass
    tls: ProxyTLS | None = None


@dataclass(frozen=True, slots=True)
class TunnelListen:
    listen: Address = Address("0.0.0.0", 9000)
    handshake_timeout: float = 10.0  # from accept to an established tunnel, queueing included
    ping_interval: float = 10.0
    ping_timeout: float = 20.0  # no pong within this: the tunnel is dead
    drain_timeout: float = 30.0
    first_byte_timeout: float = 3.0  # a new connection that sends nothing for this long is closed
    max_pending_handshakes: int = 1024  # beyond this, a new connection sheds the oldest pending one
    max_concurrent_handshakes: int = 256  # TLS handshakes running at once
    slow_handshake: float = 2.0  # a handshake slot held this long may go to a waiting newcomer
    revoked_file: Path | None = None  # revoked edge serials / unit/node identities


@dataclass(frozen=True, slots=True)
class AliasDiscovery:
    """Automatic ClusterIP aliases: resolve `<unit>-svc-kins.kins-system.svc.<cluster_domain>`."""

    enabled: bool = True
    cluster_domain: str = "cluster.local"
    interval: float = 60.0  # seconds between lookups of every connected unit


@dataclass(frozen=True, slots=True)
class AdminSettings:
    listen: Address


_CLOUD_ADMIN = AdminSettings(Address("127.0.0.1", 9090))
_EDGE_ADMIN = AdminSettings(Address("127.0.0.1", 9091))


@dataclass(frozen=True, slots=True)
class CloudConfig:
    tls: TLSFiles
    tunnel: TunnelListen = TunnelListen()
    proxy: ProxySettings = ProxySettings()
    admin: AdminSettings = _CLOUD_ADMIN
    mux: MuxConfig = MuxConfig()
    log: LogSettings = LogSettings()
    replica: str = ""  # name of this replica; empty means the host name
    # normalised "ip:port" -> normalised routing name (static ClusterIP aliases)
    aliases: Mapping[str, str] = field(default_factory=lambda: types.MappingProxyType({}))
    alias_discovery: AliasDiscovery = AliasDiscovery()
    # unit name or "*" -> normalised "host:port" targets an edge of that unit may open (uplinks)
    uplinks: Mapping[str, frozenset[str]] = field(default_factory=lambda: types.MappingProxyType({}))
    uplink_dial_timeout: float = 5.0  # seconds to connect an uplink target (all its addresses)


@dataclass(frozen=True, slots=True)
class Backoff:
    initial: float = 0.5
    max: float = 30.0
    multiplier: float = 2.0
    stable_after: float = 60.0  # a tunnel up this long resets the backoff


@dataclass(frozen=True, slots=True)
class SiteProxy:
    """The edge's way out through an HTTP CONNECT proxy of the site."""

    url: str  # "http://host:port", checked
    credentials_file: Path | None = None  # one line "user:password"


@dataclass(frozen=True, slots=True)
class UplinkProxy:
    """The edge's local HTTP CONNECT proxy into uplinks (`uplink_proxy`)."""

    listen: Address = Address("127.0.0.1", 3128)


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    cloud: tuple[str, ...]  # "host:port" each; a host may resolve to several addresses
    tls: TLSFiles
    services: Mapping[str, tuple[Address, ...]]  # normalised routing name -> where to dial
    dial_timeout: float = 5.0
    handshake_timeout: float = 10.0
    ping_interval: float = 10.0
    ping_timeout: float = 20.0
    drain_timeout: float = 30.0
    resolve_interval: float = 30.0  # re-resolve cloud DNS names this often
    reconnect: Backoff = Backoff()
    admin: AdminSettings | None = _EDGE_ADMIN  # None: disabled
    mux: MuxConfig = MuxConfig()
    log: LogSettings = LogSettings()
    proxy: SiteProxy | None = None  # None: connect to the cloud directly
    # local listen address -> normalised cloud-side "host:port" (uplinks)
    uplinks: Mapping[Address, str] = field(default_factory=lambda: types.MappingProxyType({}))
    uplink_dial_timeout: float = 10.0  # seconds for the cloud to answer an uplink open (its dial included)
    uplink_proxy: UplinkProxy | None = None  # None: no local CONNECT proxy


# --- loading -------------------------------------------------------------------------------------


def load_cloud_config(path: str | Path) -> CloudConfig:
    """Read and validate a cloud config file; `UserError` on any problem."""
    data, base_dir = _read_yaml(path)
    return cloud_config_from_dict(data, base_dir=base_dir, source=str(path))


def load_edge_config(path: str | Path) -> EdgeConfig:
    """Read and validate an edge config file; `UserError` on any problem."""
    data, base_dir = _read_yaml(path)
    return edge_config_from_dict(data, base_dir=base_dir, source=str(path))


def cloud_config_from_dict(data: Mapping[str, object], *, base_dir: Path,
                           source: str = "cloud.yaml") -> CloudConfig:
    """Validate parsed YAML as a cloud config; `UserError` naming `source` and the key path."""
    top = _Section(source, Path(base_dir), "", data, CloudConfig)
    return CloudConfig(  # arguments run in order: a typo in a section beats a missing `tls`
        tunnel=_tunnel(top.section("tunnel", TunnelListen)),
        proxy=_proxy(top.section("proxy", ProxySettings)),
        aliases=_aliases(top), alias_discovery=_alias_discovery(top.section("alias_discovery", AliasDiscovery)),
        uplinks=_cloud_uplinks(top),
        admin=top.section("admin", AdminSettings).build(AdminSettings, defaults=_CLOUD_ADMIN),
        mux=_mux(top.section("mux", MuxConfig)), log=_log(top.section("log", LogSettings)),
        **top.scalars(), tls=_tls(top),
    )


def edge_config_from_dict(data: Mapping[str, object], *, base_dir: Path,
                          source: str = "edge.yaml") -> EdgeConfig:
    """Validate parsed YAML as an edge config; `UserError` naming `source` and the key path."""
    top = _Section(source, Path(base_dir), "", data, EdgeConfig)
    admin = None
    if not (top.has("admin") and top.data["admin"] is None):  # `admin: null` disables it
        admin = top.section("admin", AdminSettings).build(AdminSettings, defaults=_EDGE_ADMIN)
    return EdgeConfig(  # arguments run in order: a typo in a section beats a missing key
        reconnect=_backoff(top.section("reconnect", Backoff)), admin=admin,
        mux=_mux(top.section("mux", MuxConfig)), log=_log(top.section("log", LogSettings)),
        proxy=_site_proxy(top.section("proxy", SiteProxy)) if top.data.get("proxy") is not None else None,
        uplinks=_edge_uplinks(top), uplink_proxy=_uplink_proxy(top),
        **top.scalars(), cloud=_cloud_addresses(top), tls=_tls(top), services=_services(top),
    )


def _tls(top: "_Section") -> TLSFiles:
    top.required("tls")
    sec = top.section("tls", TLSFiles)
    return TLSFiles(ca=sec.path("ca"), cert=sec.path("cert"), key=sec.path("key"))


def _tunnel(sec: "_Section") -> TunnelListen:
    revoked = sec.path("revoked_file") if sec.has("revoked_file") else None
    return sec.build(TunnelListen, revoked_file=revoked)


def _proxy(sec: "_Section") -> ProxySettings:
    auth = None
    if sec.has("auth"):
        a = sec.section("auth", ProxyAuth)
        if not (a.has("basic_file") or a.has("bearer_file")):
            a.fail("", "set basic_file, bearer_file or both")
        auth = ProxyAuth(*(a.path(k) if a.has(k) else None for k in ("basic_file", "bearer_file")))
    tls = None
    if sec.has("tls"):
        t = sec.section("tls", ProxyTLS)
        paths = {k: t.path(k) if t.has(k) else None for k in ("cert", "key", "client_ca")}
        if (paths["cert"] is None) != (paths["key"] is None):
            t.fail("cert" if paths["cert"] is None else "key",
                   "required when the other of cert/key is set (neither: the cloud's tls.cert/tls.key)")
        tls = t.build(ProxyTLS, **paths)
    extra: dict[str, Any] = {"auth": auth, "tls": tls}
    if sec.has("listen") and sec.data["listen"] is None:
        if tls is None:
            sec.fail("listen", "null turns the plain listener off, but there is no proxy.tls listener either")
        extra["listen"] = None
    if sec.has("authz_file"):
        if auth is None and (tls is None or tls.client_ca is None):
            sec.fail("authz_file", "rules need principals: set proxy.auth or proxy.tls.client_ca too")
        extra["authz_file"] = sec.path("authz_file")
    return sec.build(ProxySettings, **extra)


def _aliases(top: "_Section") -> Mapping[str, str]:
    raw = top.data.get("aliases")
    if raw is None:
        return types.MappingProxyType({})
    if not isinstance(raw, Mapping):
        top.fail("aliases", f'expected a mapping of "ip:port": "name:port", got {_kind(raw)}')
    out: dict[str, str] = {}
    for key, value in raw.items():
        where = f'aliases."{key}"'
        if not isinstance(key, str) or not isinstance(value, str):
            top.fail(where, 'expected "ip:port": "name:port" strings (quote them)')
        try:
            ip = normalise_target(key)
            name = normalise_target(value)
        except ValueError as exc:
            top.fail(where, str(exc))
        if not is_ip_target(ip):
            top.fail(where, f"{key!r} is not an IP address and port")
        if is_ip_target(name):
            top.fail(where, f"{value!r}: an alias must name a routing name, not an IP address")
        if ip in out:
            top.fail(where, f"same address as another key ({ip})")
        out[ip] = name
    return types.MappingProxyType(out)


def _cloud_uplinks(top: "_Section") -> Mapping[str, frozenset[str]]:
    raw = top.data.get("uplinks")
    if raw is None:
        return types.MappingProxyType({})
    if not isinstance(raw, Mapping):
        top.fail("uplinks", f'expected a mapping of unit (or "*") to a list of "host:port" targets, got {_kind(raw)}')
    out: dict[str, frozenset[str]] = {}
    for key, value in raw.items():
        where = f'uplinks."{key}"'
        if not isinstance(key, str) or not (key == "*" or _UNIT_RE.fullmatch(key)):
            top.fail(where, "a key must be a NodeUnit name (a DNS label: lower-case a-z, 0-9 and '-') or \"*\"")
        if not isinstance(value, list) or not value:
            top.fail(where, f'expected a non-empty list of "host:port" targets, got {_kind(value)}')
        targets: set[str] = set()
        for i, item in enumerate(value):
            if not isinstance(item, str):
                top.fail(f"{where}[{i}]", f'expected a "host:port" string, got {_kind(item)}')
            try:
                target = normalise_target(item)
            except ValueError as exc:
                top.fail(f"{where}[{i}]", str(exc))
            if target in targets:
                top.fail(f"{where}[{i}]", f"same target as another entry ({target})")
            targets.add(target)
        out[key] = frozenset(targets)
    return types.MappingProxyType(out)


def _edge_uplinks(top: "_Section") -> Mapping[Address, str]:
    raw = top.data.get("uplinks")
    if raw is None:
        return types.MappingProxyType({})
    if not isinstance(raw, Mapping):
        top.fail("uplinks", f'expected a mapping of "listen host:port": "cloud-side host:port", got {_kind(raw)}')
    out: dict[Address, str] = {}
    for key, value in raw.items():
        where = f'uplinks."{key}"'
        if not isinstance(key, str):
            top.fail(where, 'a listen address must be a "host:port" string (quote it)')
        listen = top.address(where, key)
        if not isinstance(value, str):
            top.fail(where, f'expected a cloud-side "host:port" string, got {_kind(value)}')
        try:
            target = normalise_target(value)
        except ValueError as exc:
            top.fail(where, f"bad target: {exc}")
        if listen in out:
            top.fail(where, f"same listen address as another key ({listen})")
        out[listen] = target
    return types.MappingProxyType(out)


def _uplink_proxy(top: "_Section") -> UplinkProxy | None:
    if top.data.get("uplink_proxy") is None:  # absent or null: off
        return None
    return top.section("uplink_proxy", UplinkProxy).build(UplinkProxy)


def _alias_discovery(sec: "_Section") -> AliasDiscovery:
    d = sec.build(AliasDiscovery)
    domain = d.cluster_domain.lower().strip(".")
    if not domain or not all(_LABEL_RE.fullmatch(label) for label in domain.split(".")):
        sec.fail("cluster_domain", f"{d.cluster_domain!r} is not a DNS domain")
    return AliasDiscovery(d.enabled, domain, d.interval)


def _site_proxy(sec: "_Section") -> SiteProxy:
    url = sec.required("url")
    if not isinstance(url, str):
        sec.fail("url", f'expected a "http://host:port" string, got {_kind(url)}')
    try:
        parse_proxy_url(url, schemes=("http",), userinfo=False)
    except ValueError as exc:
        sec.fail("url", str(exc))
    return SiteProxy(url, sec.path("credentials_file") if sec.has("credentials_file") else None)


def _mux(sec: "_Section") -> MuxConfig:
    try:
        return sec.build(MuxConfig)
    except LimitError as exc:
        sec.fail(exc.key, str(exc))


def _log(sec: "_Section") -> LogSettings:
    log = sec.build(LogSettings)
    if log.level.lower() not in LOG_LEVELS:
        sec.fail("level", f"{log.level!r} is not one of: {', '.join(LOG_LEVELS)}")
    return LogSettings(level=log.level.lower(), json=log.json)


def _backoff(sec: "_Section") -> Backoff:
    backoff = sec.build(Backoff)
    if backoff.max < backoff.initial:
        sec.fail("max", f"must be at least initial ({backoff.initial})")
    if backoff.multiplier < 1:
        sec.fail("multiplier", "must be at least 1")
    return backoff


def _cloud_addresses(top: "_Section") -> tuple[str, ...]:
    raw = top.required("cloud")
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        top.fail("cloud", f'expected a non-empty list of "host:port" strings, got {_kind(raw)}')
    return tuple(str(top.address(f"cloud[{i}]", item, min_port=1)) for i, item in enumerate(items))


def _services(top: "_Section") -> Mapping[str, tuple[Address, ...]]:
    raw = top.required("services")
    if not isinstance(raw, Mapping) or not raw:
        top.fail("services", f"expected a non-empty mapping, got {_kind(raw)}")
    out: dict[str, tuple[Address, ...]] = {}
    for key, value in raw.items():
        where = f'services."{key}"'
        if not isinstance(key, str):
            top.fail(where, "a name must be a string (quote it)")
        try:
            name = normalise_target(key)
        except ValueError as exc:
            top.fail(where, f"bad name: {exc}")
        if name in out:
            top.fail(where, f"same routing name as another key ({name})")
        if value == []:
            top.fail(where, 'expected "host:port" or a non-empty list of them, got an empty list')
        if isinstance(value, list):
            out[name] = tuple(top.address(f"{where}[{i}]", v, min_port=1) for i, v in enumerate(value))
        else:
            out[name] = (top.address(where, value, min_port=1),)
    return types.MappingProxyType(out)


# --- the validating reader -----------------------------------------------------------------------

_T = TypeVar("_T")
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


class _Section:
    """One mapping of the YAML document, checked against the fields of the dataclass it becomes."""

    def __init__(self, source: str, base_dir: Path, prefix: str, data: object, cls: type) -> None:
        self.source, self.base_dir, self.prefix, self.cls = source, base_dir, prefix, cls
        if data is None:  # an optional section left empty takes its defaults
            data = {}
        if not isinstance(data, Mapping):
            self.fail("", f"expected a mapping, got {_kind(data)}")
        # resolved annotations: classes of other modules may use `from __future__ import annotations`
        self.types: dict[str, Any] = typing.get_type_hints(cls)
        known = [f.name for f in fields(cls)]
        for key in data:
            if not isinstance(key, str):
                self.fail("", f"key {key!r} is not a string")
            if key not in known:
                self.fail(key, f"unknown key (expected one of: {', '.join(known)})")
        self.data: Mapping[str, object] = data

    def where(self, key: str) -> str:
        return ".".join(part for part in (self.prefix, key) if part) or "top level"

    def fail(self, key: str, message: str) -> NoReturn:
        raise UserError(f"{self.source}: {self.where(key)}: {message}")

    def has(self, key: str) -> bool:
        return key in self.data

    def required(self, key: str) -> object:
        if key not in self.data:
            self.fail(key, "required key is missing")
        return self.data[key]

    def section(self, key: str, cls: type) -> "_Section":
        return _Section(self.source, self.base_dir, self.where(key), self.data.get(key), cls)

    def build(self, cls: type[_T], *, defaults: object = None, **extra: object) -> _T:
        """Construct `cls` from this section's scalars and addresses, `defaults` and `extra`."""
        values: dict[str, Any] = self.scalars()
        for f in fields(self.cls):
            if f.name in extra:
                continue
            if self.types[f.name] in (Address, Address | None) and self.has(f.name):
                values[f.name] = self.address(self.where(f.name), self.data[f.name])
            elif defaults is not None and f.name not in values:
                values[f.name] = getattr(defaults, f.name)
        return cls(**values, **extra)

    def scalars(self) -> dict[str, Any]:
        """Type-checked values of the int, float, str and bool fields present in this section."""
        out: dict[str, Any] = {}
        for f in fields(self.cls):
            ftype = self.types[f.name]
            if f.name not in self.data or ftype not in _TYPE_NAMES:
                continue
            value: Any = self.data[f.name]
            if ftype is float and type(value) is int:
                value = float(value)
            if type(value) is not ftype:  # so true/false is never a number
                self.fail(f.name, f"expected {_TYPE_NAMES[ftype]}, got {_kind(value)}")
            if ftype is float and not (math.isfinite(value) and value > 0):
                self.fail(f.name, f"must be a finite number greater than 0, got {value}")
            if ftype is int and value < 1:
                self.fail(f.name, f"must be at least 1, got {value}")
            out[f.name] = value
        return out

    def address(self, where: str, value: object, *, min_port: int = 0) -> Address:
        try:
            return Address.parse(value, min_port=min_port)
        except ValueError as exc:
            raise UserError(f"{self.source}: {where}: {exc}") from None

    def path(self, key: str) -> Path:
        value = self.required(key)
        if not isinstance(value, str) or not value.strip():
            self.fail(key, f"expected a file path, got {_kind(value)}")
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base_dir / path


def _kind(value: object) -> str:
    """How a YAML value looks, for error messages: `string 'x'`, `integer 3`, `list`, `null`."""
    names: dict[type, str] = {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string"}
    if type(value) not in names:
        return "list" if isinstance(value, list) else "mapping" if isinstance(value, dict) else type(value).__name__
    shown = "" if value is None else " " + repr(value)
    return names[type(value)] + (shown if len(shown) <= 41 else shown[:38] + "...")


class _StrictLoader(yaml.SafeLoader):  # type: ignore[misc]  # (no stubs for yaml)
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:  # before merge keys (<<) are flattened: those may repeat
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag == "tag:yaml.org,2002:str":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark)
                seen.add(key_node.value)
        result: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return result


def _read_yaml(path: str | Path) -> tuple[Mapping[str, object], Path]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read config {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"cannot read config {path}: not UTF-8 text ({exc.reason})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        line = f" line {mark.line + 1}:" if mark is not None else ""
        raise UserError(f"{path}:{line} invalid YAML: {problem}") from None
    if not isinstance(data, Mapping) and data is not None:
        raise UserError(f"{path}: top level: expected a mapping, got {_kind(data)}")
    return data or {}, path.absolute().parent
