"""Configuration: YAML files read once into validated, frozen dataclasses.

This module owns the config contract (README "Config keys"): the shape of ``cloud.yaml`` and ``edge.yaml``,
every default and every range check (the routing-name rule is `names.normalise_target`, the
validating reader `yamlcheck`). The rest of the
program receives `CloudConfig` / `EdgeConfig` and never looks at YAML or dictionaries.

Validation is strict and every failure is a one-line `UserError` that names the file and the key
path, e.g. ``cloud.yaml: proxy.lsiten: unknown key (expected one of: listen, auth, ...)``. Keys of
every section are exactly the field names of its dataclass; unknown keys, duplicate keys, wrong
types (booleans are never numbers), non-positive timeouts and out-of-range limits are errors. An
optional section given as ``null`` (``proxy:`` with nothing under it) takes its defaults, except the
edge's ``admin: null`` which disables the admin endpoint.

The uplink keys (``uplinks`` on both sides, ``uplink_dial_timeout``, the edge's ``uplink_proxy``)
are described in the README section "Uplinks"; their targets are kept as written (lower case,
no trailing dot): the edge sends and the cloud dials that name, and only ``.svc`` and
``.svc.<alias_discovery.cluster_domain>`` are shortened, for matching (`names.uplink_match_name`).

Relative paths (``tls.*``, ``proxy.auth.*``, ``proxy.authz_file``, ``proxy.tls.*``,
``tunnel.revoked_file``, the edge's ``proxy.credentials_file``) are resolved against the config
file's directory. This
module only resolves paths; reading those files, and reporting them unreadable, is the job of their
users (`kins_tunnel.certs` for TLS).

Sections with rules of their own are read in their own modules, with the same `Section` and the
same one-line errors: `config_enroll` (`enrollment`, `enroll`), `config_uplinks` (`uplinks`,
`uplink_proxy`), `config_proxy` (`proxy`) and `config_qos` (`qos`). Every `mux` limit is checked once, by the protocol core
(`proto.handshake.validate_setting`).
"""

import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kins_tunnel.config_enroll import (
    EnrollmentSettings,
    EnrollSettings,
    enroll_section,
    enrollment_section,
)
from kins_tunnel.config_proxy import ProxySettings, check_exposure, proxy_section
from kins_tunnel.config_qos import EdgeQos, QosSettings, qos_section
from kins_tunnel.config_uplinks import (
    UplinkListener,
    UplinkProxy,
    cloud_uplinks,
    edge_uplinks,
    uplink_proxy,
)
from kins_tunnel.names import (
    LABEL_RE,
    Address,
    is_ip_target,
    kind,
)
from kins_tunnel.proto import LimitError, MuxConfig
from kins_tunnel.proxy_url import parse_proxy_url
from kins_tunnel.transport.writer import OUTPUT_HIGH_WATER
from kins_tunnel.yamlcheck import Section, read_yaml

KiB, MiB = 1024, 1024 * 1024
LOG_LEVELS = ("debug", "info", "warning", "error")


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
class TunnelListen:
    listen: Address = Address("0.0.0.0", 9000)
    handshake_timeout: float = 10.0  # from accept to an established tunnel, queueing included
    ping_interval: float = 10.0
    ping_timeout: float = 20.0  # no pong within this: the tunnel is dead
    drain_timeout: float = 30.0
    first_byte_timeout: float = 3.0  # a new connection that sends nothing for this long is closed
    max_pending_handshakes: int = 1024  # beyond this, a new connection sheds the oldest pending one
    max_concurrent_handshakes: int = 64  # TLS handshakes running at once
    slow_handshake: float = 2.0  # a handshake slot held this long may go to a waiting newcomer
    revoked_file: Path | None = None  # revoked edge serials / unit/node identities
    max_tunnels_per_identity: int = 4  # beyond: a new tunnel of an edge displaces its oldest
    session_tickets: bool = True  # TLS 1.3 session tickets: a returning edge resumes its session
    session_lifetime: float = 604800.0  # seconds a ticket is good for (at most 7 days)
    session_ticket_key_file: Path | None = None  # shared ticket secret; None: random per process
    idle_ping_interval: float = 60.0  # an idle tunnel's PINGs; the kernel's keepalive watches it


@dataclass(frozen=True, slots=True)
class AliasDiscovery:
    """Automatic ClusterIP aliases: resolve `<unit>-svc-kins.kins-system.svc.<cluster_domain>`."""

    enabled: bool = True
    cluster_domain: str = "cluster.local"
    interval: float = 60.0  # seconds between lookups of every connected unit


@dataclass(frozen=True, slots=True)
class AdminSettings:
    listen: Address
    max_connections: int = 64  # beyond: a new connection is closed at once (counted)
    idle_timeout: float = 10.0  # seconds from accept for a whole request and answer


_CLOUD_ADMIN = AdminSettings(Address("127.0.0.1", 9090))
_EDGE_ADMIN = AdminSettings(Address("127.0.0.1", 9091))


@dataclass(frozen=True, slots=True)
class CloudConfig:
    tls: TLSFiles
    tunnel: TunnelListen = TunnelListen()
    proxy: ProxySettings = ProxySettings()
    admin: AdminSettings = _CLOUD_ADMIN
    mux: MuxConfig = MuxConfig()
    qos: QosSettings = QosSettings()
    log: LogSettings = LogSettings()
    replica: str = ""  # name of this replica; empty means the host name
    # normalised "ip:port" -> normalised routing name (static ClusterIP aliases)
    aliases: Mapping[str, str] = field(default_factory=lambda: types.MappingProxyType({}))
    alias_discovery: AliasDiscovery = AliasDiscovery()
    # unit name or "*" -> `names.uplink_match_name`s of the targets an edge of that unit may open
    # (uplinks; shortened for .svc and .svc.<alias_discovery.cluster_domain> only)
    uplinks: Mapping[str, frozenset[str]] = field(
        default_factory=lambda: types.MappingProxyType({})
    )
    uplink_dial_timeout: float = 5.0  # seconds to connect an uplink target (all its addresses)
    enrollment: EnrollmentSettings | None = None  # None: no enrolment on the tunnel port


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
    qos: QosSettings = QosSettings()  # `units` stays empty on the edge
    log: LogSettings = LogSettings()
    proxy: SiteProxy | None = None  # None: connect to the cloud directly
    # local listen address -> cloud-side "host:port" as written (`names.dial_target`; uplinks)
    uplinks: Mapping[Address, str] = field(default_factory=lambda: types.MappingProxyType({}))
    uplink_dial_timeout: float = (
        10.0  # seconds for the cloud to answer an uplink open (its dial included)
    )
    uplink_proxy: UplinkProxy | None = None  # None: no local CONNECT proxy
    # local listen address -> its limits (every key of `uplinks` has one)
    uplink_limits: Mapping[Address, UplinkListener] = field(
        default_factory=lambda: types.MappingProxyType({})
    )
    max_tunnels: int = 3  # keepers (tunnels to cloud addresses) at once, whatever DNS answers
    memory_budget: int = 256 * MiB  # what all tunnels together may buffer (`tunnel_buffer_bound`)
    enroll: EnrollSettings | None = None  # set: enrol with a token when tls.cert is missing
    idle_ping_interval: float = 60.0  # an idle tunnel's PINGs; the kernel's keepalive watches it


def tunnel_buffer_bound(mux: MuxConfig) -> int:
    """Bytes one tunnel may hold whatever the traffic: received, unconsumed data
    (``session_budget + 16 KiB x max_streams``) plus the queue of output that makes senders wait."""
    return mux.session_budget + 16 * KiB * mux.max_streams + OUTPUT_HIGH_WATER


# --- loading -------------------------------------------------------------------------------------


def load_cloud_config(path: str | Path) -> CloudConfig:
    """Read and validate a cloud config file; `UserError` on any problem.

    This is the start-up path, so it also applies the exposure rule (`check_exposure`): an
    anonymous proxy listener reachable from other hosts is refused unless ``proxy.anonymous``.
    """
    data, base_dir = read_yaml(path)
    cfg = cloud_config_from_dict(data, base_dir=base_dir, source=str(path))
    check_exposure(cfg.proxy, source=str(path))
    return cfg


def load_edge_config(path: str | Path) -> EdgeConfig:
    """Read and validate an edge config file; `UserError` on any problem."""
    data, base_dir = read_yaml(path)
    return edge_config_from_dict(data, base_dir=base_dir, source=str(path))


def cloud_config_from_dict(
    data: Mapping[str, object], *, base_dir: Path, source: str = "cloud.yaml"
) -> CloudConfig:
    """Validate parsed YAML as a cloud config; `UserError` naming `source` and the key path."""
    top = Section(source, Path(base_dir), "", data, CloudConfig)
    return CloudConfig(  # arguments run in order: a typo in a section beats a missing `tls`
        tunnel=_tunnel(top.section("tunnel", TunnelListen)),
        proxy=proxy_section(top.section("proxy", ProxySettings)),
        aliases=_aliases(top),
        alias_discovery=(
            discovery := _alias_discovery(top.section("alias_discovery", AliasDiscovery))
        ),
        uplinks=cloud_uplinks(top, discovery.cluster_domain),
        admin=top.section("admin", AdminSettings).build(AdminSettings, defaults=_CLOUD_ADMIN),
        mux=_mux(top.section("mux", MuxConfig)),
        qos=qos_section(top.section("qos", QosSettings)),
        log=_log(top.section("log", LogSettings)),
        enrollment=enrollment_section(top),
        **top.scalars(),
        tls=_tls(top),
    )


def edge_config_from_dict(
    data: Mapping[str, object], *, base_dir: Path, source: str = "edge.yaml"
) -> EdgeConfig:
    """Validate parsed YAML as an edge config; `UserError` naming `source` and the key path."""
    top = Section(source, Path(base_dir), "", data, EdgeConfig)
    admin = None
    if not (top.has("admin") and top.data["admin"] is None):  # `admin: null` disables it
        admin = top.section("admin", AdminSettings).build(AdminSettings, defaults=_EDGE_ADMIN)
    uplinks, uplink_limits = edge_uplinks(top)
    cfg = EdgeConfig(  # arguments run in order: a typo in a section beats a missing key
        reconnect=_backoff(top.section("reconnect", Backoff)),
        admin=admin,
        mux=_mux(top.section("mux", MuxConfig)),
        qos=qos_section(top.section("qos", EdgeQos)),
        log=_log(top.section("log", LogSettings)),
        proxy=_site_proxy(top.section("proxy", SiteProxy))
        if top.data.get("proxy") is not None
        else None,
        uplinks=uplinks,
        uplink_limits=uplink_limits,
        uplink_proxy=uplink_proxy(top),
        enroll=enroll_section(top),
        **top.scalars(),
        cloud=_cloud_addresses(top),
        tls=_tls(top),
        services=_services(top),
    )
    _check_memory_budget(cfg, top)
    check_idle_ping(top, cfg.ping_interval, cfg.idle_ping_interval)
    return cfg


def check_idle_ping(sec: Section, interval: float, idle_interval: float) -> None:
    """An idle tunnel pings no more often than a busy one (`transport.ping_policy`)."""
    if idle_interval < interval:
        sec.fail(
            "idle_ping_interval",
            f"{idle_interval:g} is less than ping_interval ({interval:g}): an idle tunnel is "
            "pinged at most as often as a busy one (set them equal for the same PINGs)",
        )


def _check_memory_budget(cfg: EdgeConfig, top: Section) -> None:
    per_tunnel = tunnel_buffer_bound(cfg.mux)
    if cfg.max_tunnels * per_tunnel > cfg.memory_budget:
        top.fail(
            "memory_budget",
            f"{cfg.memory_budget} bytes is less than max_tunnels ({cfg.max_tunnels}) x "
            f"{per_tunnel} bytes that one tunnel may buffer (mux.session_budget + 16 KiB x "
            "mux.max_streams + 512 KiB of output): lower max_tunnels or those mux keys, or raise "
            "memory_budget",
        )


def _tls(top: Section) -> TLSFiles:
    top.required("tls")
    sec = top.section("tls", TLSFiles)
    return TLSFiles(ca=sec.path("ca"), cert=sec.path("cert"), key=sec.path("key"))


def _tunnel(sec: Section) -> TunnelListen:
    revoked = sec.path("revoked_file") if sec.has("revoked_file") else None
    ticket_key = sec.path("session_ticket_key_file") if sec.has("session_ticket_key_file") else None
    tunnel = sec.build(TunnelListen, revoked_file=revoked, session_ticket_key_file=ticket_key)
    check_idle_ping(sec, tunnel.ping_interval, tunnel.idle_ping_interval)
    if tunnel.session_lifetime > 604800:
        sec.fail("session_lifetime", "must be at most 604800 (7 days, the limit of TLS 1.3)")
    return tunnel


def _aliases(top: Section) -> Mapping[str, str]:
    out: dict[str, str] = {}
    for key, value, where in top.entries("aliases", '"ip:port": "name:port"'):
        if not isinstance(key, str) or not isinstance(value, str):
            top.fail(where, 'expected "ip:port": "name:port" strings (quote them)')
        ip, name = top.target(where, key), top.target(where, value)
        if not is_ip_target(ip):
            top.fail(where, f"{key!r} is not an IP address and port")
        if is_ip_target(name):
            top.fail(where, f"{value!r}: an alias must name a routing name, not an IP address")
        top.unique(out, ip, name, where, "address")
    return types.MappingProxyType(out)


def _alias_discovery(sec: Section) -> AliasDiscovery:
    d = sec.build(AliasDiscovery)
    domain = d.cluster_domain.lower().strip(".")
    if not domain or not all(LABEL_RE.fullmatch(label) for label in domain.split(".")):
        sec.fail("cluster_domain", f"{d.cluster_domain!r} is not a DNS domain")
    return AliasDiscovery(d.enabled, domain, d.interval)


def _site_proxy(sec: Section) -> SiteProxy:
    url = sec.required("url")
    if not isinstance(url, str):
        sec.fail("url", f'expected a "http://host:port" string, got {kind(url)}')
    try:
        parse_proxy_url(url, schemes=("http",), userinfo=False)
    except ValueError as exc:
        sec.fail("url", str(exc))
    return SiteProxy(url, sec.path("credentials_file") if sec.has("credentials_file") else None)


def _mux(sec: Section) -> MuxConfig:
    try:
        return sec.build(MuxConfig)
    except LimitError as exc:
        sec.fail(exc.key, str(exc))


def _log(sec: Section) -> LogSettings:
    log = sec.build(LogSettings)
    if log.level.lower() not in LOG_LEVELS:
        sec.fail("level", f"{log.level!r} is not one of: {', '.join(LOG_LEVELS)}")
    return LogSettings(level=log.level.lower(), json=log.json)


def _backoff(sec: Section) -> Backoff:
    backoff = sec.build(Backoff)
    if backoff.max < backoff.initial:
        sec.fail("max", f"must be at least initial ({backoff.initial})")
    if backoff.multiplier < 1:
        sec.fail("multiplier", "must be at least 1")
    return backoff


def _cloud_addresses(top: Section) -> tuple[str, ...]:
    raw = top.required("cloud")
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        top.fail("cloud", f'expected a non-empty list of "host:port" strings, got {kind(raw)}')
    return tuple(str(top.address(f"cloud[{i}]", item, min_port=1)) for i, item in enumerate(items))


def _services(top: Section) -> Mapping[str, tuple[Address, ...]]:
    raw = top.required("services")
    if not isinstance(raw, Mapping) or not raw:
        top.fail("services", f"expected a non-empty mapping, got {kind(raw)}")
    out: dict[str, tuple[Address, ...]] = {}
    for key, value in raw.items():
        where = f'services."{key}"'
        if not isinstance(key, str):
            top.fail(where, "a name must be a string (quote it)")
        name = top.target(where, key, error_prefix="bad name: ")
        if name in out:
            top.fail(where, f"same routing name as another key ({name})")
        if value == []:
            top.fail(where, 'expected "host:port" or a non-empty list of them, got an empty list')
        if isinstance(value, list):
            out[name] = tuple(
                top.address(f"{where}[{i}]", v, min_port=1) for i, v in enumerate(value)
            )
        else:
            out[name] = (top.address(where, value, min_port=1),)
    return types.MappingProxyType(out)
