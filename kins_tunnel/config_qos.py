"""The `qos:` section of either side (README "Interactive first on thin links"): pacing of bulk
streams, its target delay and rate caps, per unit on the cloud. Read by `config`."""

import types
from collections.abc import Mapping
from dataclasses import dataclass, field

from kins_tunnel.names import UNIT_RE, kind
from kins_tunnel.proto.pacer import DEFAULT_TARGET, PacingConfig
from kins_tunnel.quantities import parse_duration, parse_rate
from kins_tunnel.yamlcheck import Section


@dataclass(frozen=True, slots=True)
class QosUnit:
    """The cloud's `qos.units.<unit>`: the pacing of each tunnel of that unit (towards the edge)."""

    max_rate: float | None = None  # bytes/s of bulk data; None: the cloud's qos.max_rate
    target_delay: float | None = None  # None: the cloud's qos.target_delay


@dataclass(frozen=True, slots=True)
class QosSettings:
    """`qos:` (README "Interactive first on thin links"): delay-based pacing of bulk streams on
    the side's sending direction of each tunnel, and an optional hard cap on their rate."""

    enabled: bool = True
    target_delay: float = DEFAULT_TARGET  # seconds of queueing the pacer lets bulk data add
    max_rate: float | None = None  # bytes/s of bulk data per tunnel; None: no cap
    units: Mapping[str, QosUnit] = field(default_factory=lambda: types.MappingProxyType({}))

    def pacing(self, unit: str | None = None) -> PacingConfig:
        """The pacer settings of one tunnel (of `unit`, on the cloud)."""
        per = self.units.get(unit) if unit is not None else None
        return PacingConfig(
            enabled=self.enabled,
            target_delay=per.target_delay if per and per.target_delay else self.target_delay,
            max_rate=per.max_rate if per and per.max_rate else self.max_rate,
        )


@dataclass(frozen=True, slots=True)
class EdgeQos:
    """The edge's `qos:` (no `units`: the edge is one unit)."""

    enabled: bool = True
    target_delay: float = DEFAULT_TARGET
    max_rate: float | None = None


MIN_TARGET_DELAY, MAX_TARGET_DELAY = 0.001, 5.0


def qos_values(sec: Section) -> tuple[float | None, float | None]:
    """(target_delay, max_rate) of a `qos` section or unit entry, when given."""
    out: list[float | None] = []
    for key, parse in (("target_delay", parse_duration), ("max_rate", parse_rate)):
        value = None
        if sec.data.get(key) is not None:
            try:
                value = parse(sec.data[key])
            except ValueError as exc:
                sec.fail(key, str(exc))
        if key == "target_delay" and value is not None:
            if not MIN_TARGET_DELAY <= value <= MAX_TARGET_DELAY:
                sec.fail(key, f"must be between 1ms and 5s, got {sec.data[key]!r}")
        out.append(value)
    return out[0], out[1]


def qos_section(sec: Section) -> QosSettings:
    """`qos:` of either side (the edge's has no `units`: its Section refuses the key)."""
    enabled = sec.data.get("enabled", True)
    if type(enabled) is not bool:
        sec.fail("enabled", f"expected true or false, got {kind(enabled)}")
    target, max_rate = qos_values(sec)
    units: dict[str, QosUnit] = {}
    for key, value, where in sec.entries("units", "unit names to {max_rate, target_delay}"):
        if not isinstance(key, str) or not UNIT_RE.fullmatch(key):
            sec.fail(where, "a key must be a NodeUnit name (a DNS label: lower-case a-z, 0-9, '-')")
        unit = Section(sec.source, sec.base_dir, sec.where(where), value, QosUnit)
        unit_target, unit_rate = qos_values(unit)
        units[key] = QosUnit(max_rate=unit_rate, target_delay=unit_target)
    return QosSettings(
        enabled=enabled,
        target_delay=target if target is not None else DEFAULT_TARGET,
        max_rate=max_rate,
        units=types.MappingProxyType(units),
    )
