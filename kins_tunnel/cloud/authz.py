"""Per-principal authorization of CONNECT targets (`proxy.authz_file`).

The rules file (YAML)::

    groups:                          # optional: group -> member principals
      oncall: [carol, dave]
      sre: []                        # members only through client certificates (O=sre)
    rules:
      - principals: [alice, "group:team-a"]   # names, group:<group>, or "*" (anyone authenticated)
        allow: ["unit:a"]                      # every port of a-svc-kins.kins-system (and its aliases)
      - principals: ["group:oncall"]
        allow: ["unit:*", "node:*:22"]         # node:<node>:<port>; node and port may be *

Allow entries:

- ``unit:<unit>`` / ``unit:<unit>:<port>``: the unit's K3s API service
  ``<unit>-svc-kins.kins-system`` (at any port, or that one), including a ClusterIP alias of it
  (rules see the target after alias rewriting). It does **not** include the unit's nodes.
- ``node:<node>:<port>``: a node's own name and port, e.g. its sshd at ``node:edge1:22``. A node
  name is any name ``kins-tunnel certs edge --node`` takes (a DNS subdomain, e.g.
  ``node:edge1.site-a:22``); the port is after the last ``:``.
- ``*`` in place of a unit, node or port matches any.

A principal may reach a target if some rule lists it (by name, through a group of the file or one
its client certificate carries, or ``*``) and allows the target. Once the file exists, everything
else is denied (an empty ``rules: []`` denies all); without ``proxy.authz_file`` every
authenticated client may reach every target, as before.

The file is validated as strictly as the config: unknown keys, wrong types, unknown groups and
malformed entries are one-line errors naming the line and the key path (``line 7:
rules[1].allow[0]: ...``). It is re-read on change by a watcher task (`kins_tunnel.filewatch`); a
broken new version keeps the previous rules, logs why and is counted and shown in ``/status``.
Checking a CONNECT only reads memory.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from kins_tunnel.certs.identity import _NAME_RULES
from kins_tunnel.cloud.auth import Principal
from kins_tunnel.filewatch import WatchedFile
from kins_tunnel.names import is_ip_target, kind
from kins_tunnel.yamlcheck import StrictLoader

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_UNIT_HOST = re.compile(rf"({_LABEL})-svc-kins\.kins-system")
_UNIT_NAME = re.compile(rf"{_LABEL}|\*")
_PORT = re.compile(r"[0-9]{1,5}|\*")
_PARENT = re.compile(r"(.+)(?:\.[^.\[]+|\[[0-9]+\])")  # a key path without its last step
_GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")

# Reasons a CONNECT is denied (metric label values and audit `reason` prefixes).
NO_RULE = "no_rule"  # no rule lists this principal
NOT_ALLOWED = "target_not_allowed"  # rules list the principal, none allows this target
ANONYMOUS = "anonymous"  # rules exist but the client carries no identity


@dataclass(frozen=True, slots=True)
class Allow:
    kind: str  # "unit" or "node"
    name: str  # unit or node name, or "*"
    port: int | None  # None: any port

    def matches(self, kind: str, name: str, port: int) -> bool:
        return (
            self.kind == kind
            and self.name in ("*", name)
            and (self.port is None or self.port == port)
        )


@dataclass(frozen=True, slots=True)
class Rule:
    principals: frozenset[str]  # names; "group:<g>" entries; "*"
    allow: tuple[Allow, ...]


@dataclass(frozen=True, slots=True)
class Rules:
    rules: tuple[Rule, ...]
    groups: Mapping[str, frozenset[str]]  # group -> members

    def check(self, principal: Principal | None, target: str) -> str | None:
        """None if `principal` may reach the normalised `target`, else the reason label."""
        if principal is None:
            return ANONYMOUS
        groups = principal.groups | {
            g for g, members in self.groups.items() if principal.name in members
        }
        keys = {principal.name, "*"} | {f"group:{g}" for g in groups}
        mine = [r for r in self.rules if r.principals & keys]
        if not mine:
            return NO_RULE
        kind_name_port = classify(target)
        if kind_name_port is not None:
            for rule in mine:
                if any(a.matches(*kind_name_port) for a in rule.allow):
                    return None
        return NOT_ALLOWED


def classify(target: str) -> tuple[str, str, int] | None:
    """("unit", unit, port) or ("node", node, port) for a normalised target; None for others."""
    host, _, port_text = target.rpartition(":")
    if not port_text.isdigit():
        return None
    m = _UNIT_HOST.fullmatch(host)
    if m is not None:
        return "unit", m.group(1), int(port_text)
    if _node_name(host) and not is_ip_target(target):
        return "node", host, int(port_text)
    return None


def _node_name(name: str) -> bool:
    """`name` is a node name as `kins-tunnel certs edge` takes it (a DNS subdomain)."""
    return len(name) <= 253 and _NAME_RULES["node"][0].fullmatch(name) is not None


def _key_lines(data: bytes) -> dict[str, int]:
    """The line (1-based) of every key path of the YAML document (``rules[1].allow[0]``)."""
    out: dict[str, int] = {}

    def walk(node: yaml.Node, where: str) -> None:
        out.setdefault(where, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                step = f"{where}.{key.value}" if where else str(key.value)
                out.setdefault(step, key.start_mark.line + 1)
                walk(value, step)
        elif isinstance(node, yaml.SequenceNode):
            for j, item in enumerate(node.value):
                walk(item, f"{where}[{j}]")

    root = yaml.compose(data.decode("utf-8"), Loader=StrictLoader)  # noqa: S506 (a SafeLoader)
    if root is not None:
        walk(root, "")
    return out


def _with_line(data: bytes, message: str) -> str:
    """`message` (``<key path>: <reason>``) with the line of that key path in front."""
    where = message.partition(": ")[0]
    try:
        lines = _key_lines(data)
    except (yaml.YAMLError, UnicodeDecodeError):
        return message
    while where not in lines:
        m = _PARENT.fullmatch(where)
        if m is None:
            return message
        where = m.group(1)
    return f"line {lines[where]}: {message}"


def parse_rules(data: bytes) -> Rules:
    """Parse and validate a rules file; `ValueError` with a one-line reason naming the line and
    the key path (``line 7: rules[1].allow[0]: ...``)."""
    try:
        doc = yaml.load(data.decode("utf-8"), Loader=StrictLoader)  # noqa: S506 (a SafeLoader)
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text ({exc.reason})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise ValueError(f"{line}invalid YAML: {problem}") from None
    try:
        return _rules(doc)
    except ValueError as exc:
        raise ValueError(_with_line(data, str(exc))) from None


def _rules(doc: object) -> Rules:
    if not isinstance(doc, dict):
        raise ValueError(f"top level: expected a mapping with 'rules', got {kind(doc)}")
    _known(doc, ("groups", "rules"), "")
    groups: dict[str, frozenset[str]] = {}
    raw_groups = doc.get("groups") or {}
    if not isinstance(raw_groups, dict):
        raise ValueError(
            f"groups: expected a mapping of group: [principal, ...], got {kind(raw_groups)}"
        )
    for name, members in raw_groups.items():
        where = f"groups.{name}"
        if not isinstance(name, str) or not _GROUP.fullmatch(name):
            raise ValueError(f"{where}: a group name is letters, digits, '.', '_' and '-'")
        if members is None or members == []:  # members may all come from certificates (O=<group>)
            members = []
        else:
            members = _names(members, where)
        for j, member in enumerate(members):
            if member.startswith("group:") or member == "*":
                raise ValueError(
                    f"{where}[{j}]: {member!r}: members are principal names (no nesting)"
                )
        groups[name] = frozenset(members)
    if "rules" not in doc:
        raise ValueError("rules: required key is missing (an empty list denies everyone)")
    raw_rules = doc["rules"]
    if not isinstance(raw_rules, list):
        raise ValueError(f"rules: expected a list of {{principals, allow}}, got {kind(raw_rules)}")
    rules = []
    for i, raw in enumerate(raw_rules):
        where = f"rules[{i}]"
        if not isinstance(raw, dict):
            raise ValueError(
                f"{where}: expected a mapping with principals and allow, got {kind(raw)}"
            )
        _known(raw, ("principals", "allow"), where)
        for key in ("principals", "allow"):
            if key not in raw:
                raise ValueError(f"{where}.{key}: required key is missing")
        principals = _names(raw["principals"], f"{where}.principals")
        for j, p in enumerate(principals):
            if p.startswith("group:") and p[6:] not in groups:
                raise ValueError(f"{where}.principals[{j}]: no group {p[6:]!r} under groups")
        allow = _strings(raw["allow"], f"{where}.allow")
        rules.append(
            Rule(
                frozenset(principals),
                tuple(_allow(a, f"{where}.allow[{j}]") for j, a in enumerate(allow)),
            )
        )
    return Rules(tuple(rules), groups)


def _allow(text: str, where: str) -> Allow:
    what, _, rest = text.partition(":")
    if what == "unit":
        name, sep, port = rest.partition(":")
        ok = _UNIT_NAME.fullmatch(name) is not None and (not sep or _PORT.fullmatch(port))
    else:  # node:<node>:<port>, the port after the last ':'
        name, sep, port = rest.rpartition(":")
        ok = (
            what == "node"
            and bool(sep)
            and (name == "*" or _node_name(name))
            and _PORT.fullmatch(port) is not None
        )
    if not ok:
        raise ValueError(
            f"{where}: {text!r} is not unit:<unit>[:<port>] or node:<node>:<port> "
            "(a unit is a DNS label, a node a DNS subdomain; a name or port may be *)"
        )
    if port not in ("", "*") and not 1 <= int(port) <= 65535:
        raise ValueError(f"{where}: {text!r}: port must be from 1 to 65535 or *")
    return Allow(what, name, None if port in ("", "*") else int(port))


def _strings(value: object, where: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: expected a non-empty list of strings, got {kind(value)}")
    for j, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"{where}[{j}]: expected a non-empty string, got {kind(item)}")
    return [item.strip() for item in value]


def _names(value: object, where: str) -> list[str]:
    names = _strings(value, where)
    for j, name in enumerate(names):
        if any(c.isspace() or c == ":" for c in name) and not name.startswith("group:"):
            raise ValueError(f"{where}[{j}]: {name!r}: a principal name has no spaces or ':'")
    return names


def _known(doc: dict[object, object], keys: tuple[str, ...], where: str) -> None:
    for key in doc:
        if key not in keys:
            prefix = f"{where}.{key}" if where else str(key)
            raise ValueError(f"{prefix}: unknown key (expected one of: {', '.join(keys)})")


class Authorizer:
    """The rules of `proxy.authz_file`, kept current by `watch()` (run it in a nursery)."""

    def __init__(self, path: Path) -> None:
        self.file = WatchedFile(path, parse_rules, "proxy.authz_file")

    def check(self, principal: Principal | None, target: str) -> str | None:
        """None if allowed, else the reason label (`NO_RULE`, `NOT_ALLOWED`, `ANONYMOUS`)."""
        return self.file.value.check(principal, target)

    async def watch(self, interval: float = 1.0) -> None:
        await self.file.watch(interval)
