"""The `qos:` keys of cloud.yaml and edge.yaml: units of rates and durations, strict errors that
name the key, the per-unit settings of the cloud, and what a tunnel's pacer is given."""

from __future__ import annotations

from typing import Any

import pytest

from kins_tunnel.proto.pacer import DEFAULT_TARGET, PacingConfig
from kins_tunnel.quantities import parse_duration, parse_rate
from tests.test_config import cloud, cloud_error, edge, edge_error


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("10Mbit", 1.25e6),
        ("10mbit", 1.25e6),
        ("10Mbit/s", 1.25e6),
        ("1.5Gbit", 187.5e6),
        ("500kbit", 62_500.0),
        ("5MB", 5e6),
        ("512KiB", 524_288.0),
        ("2MiB", 2 * 1024.0**2),
        (1000, 1000.0),
        (2.5, 2.5),
    ],
)
def test_rates(text: object, rate: float) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize(
    "bad", ["0", "0Mbit", "-1MB", "abc", "10 furlongs", "Mbit", "", "inf", True, None, [1], 0, -5]
)
def test_bad_rates(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_rate(bad)


def test_durations() -> None:
    assert parse_duration("25ms") == pytest.approx(0.025)
    assert parse_duration("0.5s") == 0.5
    assert parse_duration(2) == 2.0
    for bad in ("0ms", "25 minutes", "fast", False, -1):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_defaults_pace_without_a_cap() -> None:
    for cfg in (cloud(), edge()):
        assert cfg.qos.enabled and cfg.qos.max_rate is None
        assert cfg.qos.pacing() == PacingConfig(True, DEFAULT_TARGET, None)
    assert cloud().qos.pacing("test") == PacingConfig(True, DEFAULT_TARGET, None)


def test_cloud_units_override_the_defaults_per_unit() -> None:
    cfg = cloud(
        qos={
            "target_delay": "20ms",
            "max_rate": "50Mbit",
            "units": {"test": {"max_rate": "10Mbit"}, "slow": {"target_delay": 0.1}},
        }
    )
    assert cfg.qos.pacing("test") == PacingConfig(True, 0.02, 1.25e6)
    assert cfg.qos.pacing("slow") == PacingConfig(True, 0.1, 6.25e6)
    assert cfg.qos.pacing("other") == PacingConfig(True, 0.02, 6.25e6)


def test_edge_qos() -> None:
    cfg = edge(qos={"enabled": False, "max_rate": "5MB"})
    assert cfg.qos.pacing() == PacingConfig(False, DEFAULT_TARGET, 5e6)


@pytest.mark.parametrize(
    ("qos", "message"),
    [
        ({"max_rate": "0"}, "qos.max_rate: must be greater than 0"),
        ({"max_rate": "-1MB"}, "qos.max_rate: expected a rate"),
        ({"max_rate": "lots"}, "qos.max_rate: expected a rate"),
        ({"max_rate": True}, "qos.max_rate: expected a rate"),
        ({"target_delay": "soon"}, "qos.target_delay: expected a duration"),
        ({"target_delay": 10}, "qos.target_delay: must be between 1ms and 5s"),
        ({"target_delay": "0.1ms"}, "qos.target_delay: must be between 1ms and 5s"),
        ({"enabled": "yes"}, "qos.enabled: expected true or false"),
        ({"limit": 1}, "qos.limit: unknown key"),
        ({"units": ["test"]}, "qos.units: expected a mapping"),
        ({"units": {"Bad Unit": {}}}, 'qos.units."Bad Unit": a key must be a NodeUnit name'),
        ({"units": {"test": 5}}, 'qos.units."test": expected a mapping'),
        ({"units": {"test": {"rate": 1}}}, 'qos.units."test".rate: unknown key'),
        ({"units": {"test": {"max_rate": "0"}}}, 'qos.units."test".max_rate: must be greater'),
    ],
)
def test_cloud_qos_errors_name_the_key(qos: dict[str, Any], message: str) -> None:
    err = cloud_error(qos=qos)
    assert err.startswith("cloud.yaml: " + message), err
    assert "\n" not in err


def test_the_edge_has_no_units() -> None:
    assert edge_error(qos={"units": {}}).startswith("edge.yaml: qos.units: unknown key")
    assert edge_error(qos={"max_rate": "x"}).startswith("edge.yaml: qos.max_rate: expected a rate")
