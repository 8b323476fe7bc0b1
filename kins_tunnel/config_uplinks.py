"""The uplink sections of the config files: the cloud's `uplinks` (unit -> targets its edges may
open), the edge's `uplinks` (listen address -> target, short or long form) and `uplink_proxy`.
Read by `config`; targets are kept as written (see `config` and README "Uplinks")."""

import types
from collections.abc import Mapping
from dataclasses import dataclass

from kins_tunnel.names import UNIT_RE, Address, dial_target, kind, uplink_match_name
from kins_tunnel.yamlcheck import Section


@dataclass(frozen=True, slots=True)
class UplinkProxy:
    """The edge's local HTTP CONNECT proxy into uplinks (`uplink_proxy`)."""

    listen: Address = Address("127.0.0.1", 3128)
    max_connections: int = 256  # beyond: a new connection is closed at once (counted)
    idle_timeout: float = 3600.0  # a relay with no bytes either way for this long is closed


@dataclass(frozen=True, slots=True)
class UplinkListener:
    """One entry of the edge's `uplinks` in its long form (the short form is the target alone)."""

    target: str
    max_connections: int = 256  # beyond: a new connection is closed at once (counted)
    idle_timeout: float = 3600.0  # a relay with no bytes either way for this long is closed


def cloud_uplinks(top: Section, cluster_domain: str) -> Mapping[str, frozenset[str]]:
    """unit -> the targets' `uplink_match_name`s: only ``.svc`` and ``.svc.<cluster_domain>``
    are shortened, any other name is kept as written."""
    out: dict[str, frozenset[str]] = {}
    expected = 'unit (or "*") to a list of "host:port" targets'
    for key, value, where in top.entries("uplinks", expected):
        if not isinstance(key, str) or not (key == "*" or UNIT_RE.fullmatch(key)):
            top.fail(
                where,
                "a key must be a NodeUnit name (a DNS label: lower-case a-z, 0-9 and '-') or \"*\"",
            )
        if not isinstance(value, list) or not value:
            top.fail(where, f'expected a non-empty list of "host:port" targets, got {kind(value)}')
        targets: set[str] = set()
        for i, item in enumerate(value):
            top.target(f"{where}[{i}]", item)  # checks it; a str from here on
            target = uplink_match_name(str(item), cluster_domain)
            if target in targets:
                top.fail(f"{where}[{i}]", f"same target as another entry ({target})")
            targets.add(target)
        out[key] = frozenset(targets)
    return types.MappingProxyType(out)


def edge_uplinks(
    top: Section,
) -> tuple[Mapping[Address, str], Mapping[Address, UplinkListener]]:
    """`uplinks`: listen address -> target, and -> its limits. A value is the target, or a
    mapping with `target`, `max_connections` and `idle_timeout`."""
    out: dict[Address, str] = {}
    limits: dict[Address, UplinkListener] = {}
    for key, value, where in top.entries("uplinks", '"listen host:port": "cloud-side host:port"'):
        if not isinstance(key, str):
            top.fail(where, 'a listen address must be a "host:port" string (quote it)')
        listen = top.address(where, key)
        entry = UplinkListener("")
        if isinstance(value, Mapping):
            sec = Section(top.source, top.base_dir, where, value, UplinkListener)
            value = sec.required("target")
            entry = sec.build(UplinkListener)
            where = sec.where("target")
        top.target(
            where, value, expected='a cloud-side "host:port" string', error_prefix="bad target: "
        )
        target = dial_target(str(value))  # sent as written: the cloud dials this name
        top.unique(out, listen, target, where, "listen address")
        limits[listen] = UplinkListener(target, entry.max_connections, entry.idle_timeout)
    return types.MappingProxyType(out), types.MappingProxyType(limits)


def uplink_proxy(top: Section) -> UplinkProxy | None:
    if top.data.get("uplink_proxy") is None:  # absent or null: off
        return None
    return top.section("uplink_proxy", UplinkProxy).build(UplinkProxy)
