"""The names of uplink targets: `dial_target` (what the edge sends and the cloud dials: the
target as written) and `uplink_match_name` (what is compared with the cloud's `uplinks`: only
``.svc`` and ``.svc.<cluster_domain>`` shortened). CONNECT routing (`normalise_target`) keeps its
own rule."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kins_tunnel.names import dial_target, normalise_target, uplink_match_name


@pytest.mark.parametrize(
    ("written", "dialled", "matched"),
    [
        ("mirror.eu.svc.example.com:443", "mirror.eu.svc.example.com:443", None),
        ("Mirror.EU.svc.Example.com.:0443", "mirror.eu.svc.example.com:443", None),
        ("x.y.svc.cluster.local:443", "x.y.svc.cluster.local:443", "x.y:443"),
        ("x.y.svc:443", "x.y.svc:443", "x.y:443"),
        ("x.y.svc.:443", "x.y.svc:443", "x.y:443"),
        ("x.y:443", "x.y:443", "x.y:443"),
        ("a.b.c.svc.cluster.local:1", "a.b.c.svc.cluster.local:1", None),
        ("x.y.svc.local:1", "x.y.svc.local:1", None),
        ("x.y.svc.cluster.local.example:1", "x.y.svc.cluster.local.example:1", None),
        ("[0:0::1]:443", "[::1]:443", None),
        ("10.0.0.7:80", "10.0.0.7:80", None),
    ],
)
def test_dial_and_match_names(written: str, dialled: str, matched: str | None) -> None:
    assert dial_target(written) == dialled
    assert uplink_match_name(written) == (matched or dialled)


def test_the_cluster_domain_is_the_clouds() -> None:
    assert uplink_match_name("x.y.svc.corp.internal:1", "corp.internal") == "x.y:1"
    assert uplink_match_name("x.y.svc.corp.internal:1", "Corp.Internal.") == "x.y:1"
    assert (
        uplink_match_name("x.y.svc.cluster.local:1", "corp.internal") == "x.y.svc.cluster.local:1"
    )
    assert uplink_match_name("x.y.svc:1", "corp.internal") == "x.y:1"


@pytest.mark.parametrize("bad", ["no-port", "a:0", "::1:80", "a b:80", "ü:1", "[::1:5", "a..b:1"])
def test_both_refuse_what_normalise_target_refuses(bad: str) -> None:
    for rule in (normalise_target, dial_target, uplink_match_name):
        with pytest.raises(ValueError):
            rule(bad)


LABEL = st.from_regex(r"[a-z0-9-]{1,8}", fullmatch=True) | st.sampled_from(
    ["svc", "cluster", "local", "example", "com"]
)


@given(
    labels=st.lists(LABEL, min_size=1, max_size=7),
    port=st.integers(1, 65535),
    upper=st.booleans(),
    dot=st.booleans(),
)
def test_only_svc_and_the_cluster_domain_are_ever_shortened(
    labels: list[str], port: int, upper: bool, dot: bool
) -> None:
    host = ".".join(labels)
    if all(label.isdigit() for label in labels):
        return  # an IPv4 address (or not one): covered above
    written = (host.upper() if upper else host) + ("." if dot else "") + f":{port}"
    canonical = f"{host}:{port}"
    assert dial_target(written) == canonical
    assert dial_target(canonical) == canonical
    short = len(labels) >= 3 and labels[2] == "svc" and labels[3:] in ([], ["cluster", "local"])
    assert uplink_match_name(written) == (f"{labels[0]}.{labels[1]}:{port}" if short else canonical)
    if short:  # what is shortened is what CONNECT routing shortens, and the same way
        assert uplink_match_name(written) == normalise_target(written)
    # matching is symmetric: a shortened name and its short form match each other
    assert uplink_match_name(uplink_match_name(written)) == uplink_match_name(written)
