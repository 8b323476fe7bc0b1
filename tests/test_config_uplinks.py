"""Config keys of uplinks: `uplinks` and `uplink_dial_timeout` on both sides, the edge's
`uplink_proxy`. Errors are one line naming the key path; a listener that cannot be opened is a
one-line error of the edge command (exit 2)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kins_tunnel.config import (
    CloudConfig,
    EdgeConfig,
    cloud_config_from_dict,
    edge_config_from_dict,
    load_edge_config,
)
from kins_tunnel.config_uplinks import UplinkProxy
from kins_tunnel.errors import UserError
from kins_tunnel.names import Address
from tests.e2e.harness import make_certs

TLS = {"ca": "ca.crt", "cert": "c.crt", "key": "c.key"}
BASE = Path("/etc/kins")


def cloud(**data: Any) -> CloudConfig:
    return cloud_config_from_dict({"tls": TLS, **data}, base_dir=BASE)


def edge(**data: Any) -> EdgeConfig:
    base = {"cloud": ["c:9000"], "tls": TLS, "services": {"edge1:22": "127.0.0.1:22"}}
    return edge_config_from_dict({**base, **data}, base_dir=BASE)


def error(build: Any, **data: Any) -> str:
    with pytest.raises(UserError) as info:
        build(**data)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_defaults_allow_and_listen_nothing() -> None:
    assert cloud().uplinks == {} and cloud().uplink_dial_timeout == 5.0
    cfg = edge()
    assert cfg.uplinks == {} and cfg.uplink_proxy is None and cfg.uplink_dial_timeout == 10.0
    assert edge(uplinks=None, uplink_proxy=None).uplink_proxy is None


def test_cloud_uplinks_are_normalised_per_unit() -> None:
    cfg = cloud(
        uplinks={
            "test": ["Registry.Kube-System.svc.cluster.local:05000", "10.0.0.7:80"],
            "*": ["[0:0::1]:443"],
            "a-1": ["mirror.example.com.:5000"],
        },
        uplink_dial_timeout=2,
    )
    assert dict(cfg.uplinks) == {
        "test": frozenset({"registry.kube-system:5000", "10.0.0.7:80"}),
        "*": frozenset({"[::1]:443"}),
        "a-1": frozenset({"mirror.example.com:5000"}),
    }
    assert cfg.uplink_dial_timeout == 2.0
    with pytest.raises(TypeError):
        cfg.uplinks["x"] = frozenset()  # type: ignore[index]


def test_cloud_uplinks_shorten_only_svc_and_the_cluster_domain() -> None:
    cfg = cloud(
        uplinks={
            "test": [
                "mirror.eu.svc.example.com:443",
                "a.b.svc:1",
                "c.d.svc.cluster.local:2",
                "e.f.svc.corp.internal:3",
            ]
        }
    )
    assert cfg.uplinks["test"] == frozenset(
        {"mirror.eu.svc.example.com:443", "a.b:1", "c.d:2", "e.f.svc.corp.internal:3"}
    )
    cfg = cloud(
        alias_discovery={"cluster_domain": "Corp.Internal."},
        uplinks={"*": ["e.f.svc.corp.internal:3", "c.d.svc.cluster.local:2"]},
    )
    assert cfg.uplinks["*"] == frozenset({"e.f:3", "c.d.svc.cluster.local:2"})
    # a name that only the old rule shortened is a target of its own, not a duplicate
    assert cloud(uplinks={"test": ["x.y:443", "x.y.svc.example.com:443"]}).uplinks[
        "test"
    ] == frozenset({"x.y:443", "x.y.svc.example.com:443"})
    with pytest.raises(UserError, match=r'uplinks."test"\[1\]: same target as another entry'):
        cloud(uplinks={"test": ["x.y:443", "X.Y.svc:0443"]})


def test_edge_uplinks_map_listeners_to_targets_as_written() -> None:
    cfg = edge(
        uplinks={
            "127.0.0.1:5000": "registry.kube-system.svc.cluster.local:5000",
            "[::1]:5001": "10.0.0.7:80",
            "0.0.0.0:0": "Mirror:1",
            "127.0.0.1:5002": "Mirror.EU.svc.example.com.:0443",
        },
        uplink_proxy={"listen": "127.0.0.1:3129"},
        uplink_dial_timeout=3,
    )
    assert dict(cfg.uplinks) == {
        Address("127.0.0.1", 5000): "registry.kube-system.svc.cluster.local:5000",
        Address("::1", 5001): "10.0.0.7:80",
        Address("0.0.0.0", 0): "mirror:1",
        Address("127.0.0.1", 5002): "mirror.eu.svc.example.com:443",
    }
    assert cfg.uplink_proxy == UplinkProxy(Address("127.0.0.1", 3129))
    assert edge(uplink_proxy={}).uplink_proxy == UplinkProxy(Address("127.0.0.1", 3128))
    assert cfg.uplink_dial_timeout == 3.0


def test_edge_file_with_uplinks(tmp_path: Path) -> None:
    path = tmp_path / "edge.yaml"
    path.write_text("""\
cloud: ["tunnel-cloud.kube-system:9000"]
tls: {ca: ca.crt, cert: e.crt, key: e.key}
services: {"edge1:22": "127.0.0.1:22"}
uplinks:
  "127.0.0.1:5000": "registry.kube-system:5000"
uplink_proxy: {listen: "127.0.0.1:3128"}
""")
    cfg = load_edge_config(path)
    assert dict(cfg.uplinks) == {Address("127.0.0.1", 5000): "registry.kube-system:5000"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"uplinks": ["a:1"]},
            'uplinks: expected a mapping of unit (or "*") to a list of "host:port" targets, got list',
        ),
        (
            {"uplinks": {"Test": ["a:1"]}},
            'uplinks."Test": a key must be a NodeUnit name (a DNS label',
        ),
        ({"uplinks": {"-a": ["a:1"]}}, 'uplinks."-a": a key must be a NodeUnit name'),
        ({"uplinks": {"a.b": ["a:1"]}}, 'uplinks."a.b": a key must be a NodeUnit name'),
        ({"uplinks": {7: ["a:1"]}}, 'uplinks."7": a key must be a NodeUnit name'),
        (
            {"uplinks": {"test": "a:1"}},
            'uplinks."test": expected a non-empty list of "host:port" targets, got string',
        ),
        (
            {"uplinks": {"test": []}},
            'uplinks."test": expected a non-empty list of "host:port" targets, got list',
        ),
        (
            {"uplinks": {"test": None}},
            'uplinks."test": expected a non-empty list of "host:port" targets, got null',
        ),
        (
            {"uplinks": {"test": ["a:1", 5]}},
            'uplinks."test"[1]: expected a "host:port" string, got integer 5',
        ),
        ({"uplinks": {"test": ["registry"]}}, "uplinks.\"test\"[0]: target 'registry' has no port"),
        (
            {"uplinks": {"test": ["a:0"]}},
            "uplinks.\"test\"[0]: target 'a:0': port must be a number from 1 to 65535",
        ),
        (
            {"uplinks": {"test": ["::1:80"]}},
            "uplinks.\"test\"[0]: target '::1:80': IPv6 addresses need brackets",
        ),
        (
            {"uplinks": {"test": ["a b:80"]}},
            "uplinks.\"test\"[0]: target 'a b:80': host may only hold",
        ),
        (
            {"uplinks": {"test": ["a.b:1", "A.B.svc.cluster.local:01"]}},
            'uplinks."test"[1]: same target as another entry (a.b:1)',
        ),
        ({"uplink_dial_timeout": 0}, "uplink_dial_timeout: must be a finite number greater than 0"),
        ({"uplink_dial_timeout": "5s"}, "uplink_dial_timeout: expected a number, got string '5s'"),
        ({"uplinkz": {}}, "uplinkz: unknown key (expected one of: "),
    ],
)
def test_cloud_errors(data: dict[str, Any], message: str) -> None:
    assert error(cloud, **data).startswith(f"cloud.yaml: {message}")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"uplinks": ["127.0.0.1:5000"]},
            'uplinks: expected a mapping of "listen host:port": "cloud-side host:port", got list',
        ),
        (
            {"uplinks": {5000: "a:1"}},
            'uplinks."5000": a listen address must be a "host:port" string (quote it)',
        ),
        (
            {"uplinks": {"127.0.0.1": "a:1"}},
            'uplinks."127.0.0.1": \'127.0.0.1\' is not "host:port"',
        ),
        (
            {"uplinks": {"::1:5000": "a:1"}},
            "uplinks.\"::1:5000\": '::1:5000': IPv6 addresses need brackets",
        ),
        (
            {"uplinks": {"127.0.0.1:70000": "a:1"}},
            "uplinks.\"127.0.0.1:70000\": '127.0.0.1:70000': port must be a number",
        ),
        (
            {"uplinks": {"127.0.0.1:1": ["a:1"]}},
            'uplinks."127.0.0.1:1": expected a cloud-side "host:port" string, got list',
        ),
        (
            {"uplinks": {"127.0.0.1:1": None}},
            'uplinks."127.0.0.1:1": expected a cloud-side "host:port" string, got null',
        ),
        (
            {"uplinks": {"127.0.0.1:1": "registry"}},
            "uplinks.\"127.0.0.1:1\": bad target: target 'registry' has no port",
        ),
        (
            {"uplinks": {"127.0.0.1:1": "a:1", "127.0.0.1:01": "b:2"}},
            'uplinks."127.0.0.1:01": same listen address as another key (127.0.0.1:1)',
        ),
        (
            {"uplink_proxy": {"listen": 3128}},
            'uplink_proxy.listen: expected a "host:port" string, got integer 3128',
        ),
        (
            {"uplink_proxy": {"lsiten": "127.0.0.1:3128"}},
            "uplink_proxy.lsiten: unknown key (expected one of: listen, max_connections, idle_timeout)",
        ),
        ({"uplink_proxy": "127.0.0.1:3128"}, "uplink_proxy: expected a mapping, got string"),
        (
            {"uplink_dial_timeout": -1},
            "uplink_dial_timeout: must be a finite number greater than 0",
        ),
    ],
)
def test_edge_errors(data: dict[str, Any], message: str) -> None:
    assert error(edge, **data).startswith(f"edge.yaml: {message}")


@pytest.mark.parametrize("key", ["uplinks", "uplink_proxy"])
def test_an_uplink_listener_that_cannot_listen_is_one_line(tmp_path: Path, key: str) -> None:
    make_certs(tmp_path)  # certs/ca.crt, cloud.crt, edge-edge1.crt: the files the config names
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    doc: dict[str, Any] = {
        "cloud": ["127.0.0.1:9"],
        "services": {"edge1:22": "127.0.0.1:22"},
        "admin": None,
        "tls": {
            "ca": "certs/ca.crt",
            "cert": "certs/edge-edge1.crt",
            "key": "certs/edge-edge1.key",
        },
    }
    if key == "uplinks":
        doc["uplinks"] = {"127.0.0.1:0": "a:1", f"127.0.0.1:{port}": "registry.kube-system:5000"}
    else:
        doc["uplink_proxy"] = {"listen": f"127.0.0.1:{port}"}
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    try:
        r = subprocess.run(
            [sys.executable, "-m", "kins_tunnel", "edge", "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        busy.close()
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("kins-tunnel: error:")]
    where = f'uplinks."127.0.0.1:{port}"' if key == "uplinks" else "uplink_proxy.listen"
    assert errors == [
        f"kins-tunnel: error: {where}: cannot listen on 127.0.0.1:{port}: Address already in use"
    ], r.stderr
    assert "Traceback" not in r.stderr
