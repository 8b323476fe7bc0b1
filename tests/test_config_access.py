"""Config keys of addressing and access: aliases, alias discovery, proxy.tls, proxy.authz_file,
tunnel.revoked_file. Errors are one line naming the key path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kins_tunnel.config import AliasDiscovery, CloudConfig, cloud_config_from_dict
from kins_tunnel.config_proxy import ProxyTLS
from kins_tunnel.errors import UserError
from kins_tunnel.names import Address, is_ip_target

TLS = {"ca": "ca.crt", "cert": "c.crt", "key": "c.key"}
BASE = Path("/etc/kins")
AUTH = {"basic_file": "users"}


def cloud(**data: Any) -> CloudConfig:
    return cloud_config_from_dict({"tls": TLS, **data}, base_dir=BASE)


def cloud_error(**data: Any) -> str:
    with pytest.raises(UserError) as info:
        cloud(**data)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_defaults() -> None:
    cfg = cloud()
    assert cfg.aliases == {}
    assert cfg.alias_discovery == AliasDiscovery(True, "cluster.local", 60.0)
    assert cfg.proxy.tls is None and cfg.proxy.authz_file is None
    assert cfg.proxy.listen == Address("0.0.0.0", 8080)
    assert cfg.tunnel.revoked_file is None


def test_every_new_key() -> None:
    cfg = cloud(
        aliases={
            "10.96.12.34:443": "test-svc-kins.kins-system.svc.cluster.local:443",
            "[fd00::1]:443": "edge1:22",
        },
        alias_discovery={"enabled": False, "cluster_domain": "Corp.Example.", "interval": 5},
        proxy={
            "listen": None,
            "auth": AUTH,
            "authz_file": "authz.yaml",
            "tls": {
                "listen": "0.0.0.0:8443",
                "cert": "p.crt",
                "key": "/k/p.key",
                "client_ca": "users-ca.crt",
            },
        },
        tunnel={"revoked_file": "revoked.txt"},
    )
    assert dict(cfg.aliases) == {
        "10.96.12.34:443": "test-svc-kins.kins-system:443",
        "[fd00::1]:443": "edge1:22",
    }
    assert cfg.alias_discovery == AliasDiscovery(False, "corp.example", 5.0)
    assert cfg.proxy.listen is None
    assert cfg.proxy.authz_file == BASE / "authz.yaml"
    assert cfg.proxy.tls == ProxyTLS(
        Address("0.0.0.0", 8443), BASE / "p.crt", Path("/k/p.key"), BASE / "users-ca.crt"
    )
    assert cfg.tunnel.revoked_file == BASE / "revoked.txt"


def test_proxy_tls_defaults_to_the_cloud_certificate() -> None:
    tls = cloud(proxy={"tls": {}}).proxy.tls
    assert tls == ProxyTLS(Address("0.0.0.0", 8443), None, None, None)
    assert cloud(proxy={"tls": None}).proxy.tls == tls  # like every optional section


def test_authz_with_client_certificates_only() -> None:
    cfg = cloud(proxy={"authz_file": "a.yaml", "tls": {"client_ca": "ca2.crt"}})
    assert cfg.proxy.authz_file == BASE / "a.yaml"


@pytest.mark.parametrize(
    "data, message",
    [
        (
            {"aliases": ["10.0.0.1:443"]},
            'cloud.yaml: aliases: expected a mapping of "ip:port": "name:port", got list',
        ),
        (
            {"aliases": {"10.0.0.1": "test-svc-kins.kins-system:443"}},
            "cloud.yaml: aliases.\"10.0.0.1\": target '10.0.0.1' has no port",
        ),
        (
            {"aliases": {"test-svc-kins.kins-system:443": "edge1:22"}},
            "cloud.yaml: aliases.\"test-svc-kins.kins-system:443\": 'test-svc-kins.kins-system:443' is not an IP address and port",
        ),
        (
            {"aliases": {"10.0.0.1:443": "10.0.0.2:443"}},
            "cloud.yaml: aliases.\"10.0.0.1:443\": '10.0.0.2:443': an alias must name a routing name, not an IP address",
        ),
        (
            {"aliases": {"10.0.0.1:443": 443}},
            'cloud.yaml: aliases."10.0.0.1:443": expected "ip:port": "name:port" strings',
        ),
        ({"aliases": {"10.0.0.1:443": "a:1", "010.0.0.1:443": "b:1"}}, "bad IPv4 address"),
        (
            {"alias_discovery": {"cluster_domain": "bad domain"}},
            "cloud.yaml: alias_discovery.cluster_domain: 'bad domain' is not a DNS domain",
        ),
        (
            {"alias_discovery": {"interval": 0}},
            "cloud.yaml: alias_discovery.interval: must be a finite number greater than 0",
        ),
        (
            {"alias_discovery": {"enabled": "yes"}},
            "cloud.yaml: alias_discovery.enabled: expected true or false",
        ),
        ({"alias_discovery": {"enable": True}}, "cloud.yaml: alias_discovery.enable: unknown key"),
        (
            {"proxy": {"listen": None}},
            "cloud.yaml: proxy.listen: null turns the plain listener off, but there is no proxy.tls listener either",
        ),
        (
            {"proxy": {"tls": {"cert": "p.crt"}}},
            "cloud.yaml: proxy.tls.key: required when the other of cert/key is set (neither: the cloud's tls.cert/tls.key)",
        ),
        (
            {"proxy": {"tls": {"listen": "8443"}}},
            "cloud.yaml: proxy.tls.listen: '8443' is not \"host:port\"",
        ),
        (
            {"proxy": {"tls": {"ca": "x"}}},
            "cloud.yaml: proxy.tls.ca: unknown key (expected one of: listen, cert, key, client_ca)",
        ),
        (
            {"proxy": {"tls": {"client_ca": ""}}},
            "cloud.yaml: proxy.tls.client_ca: expected a file path",
        ),
        (
            {"proxy": {"authz_file": "a.yaml"}},
            "cloud.yaml: proxy.authz_file: rules need principals: set proxy.auth or proxy.tls.client_ca too",
        ),
        ({"proxy": {"authz_file": "a.yaml", "tls": {}}}, "proxy.authz_file: rules need principals"),
        (
            {"proxy": {"auth": AUTH, "authz_file": 3}},
            "cloud.yaml: proxy.authz_file: expected a file path, got integer 3",
        ),
        (
            {"tunnel": {"revoked_file": None}},
            "cloud.yaml: tunnel.revoked_file: expected a file path, got null",
        ),
    ],
)
def test_errors_name_the_key_path(data: dict[str, Any], message: str) -> None:
    assert message in cloud_error(**data)


@pytest.mark.parametrize(
    "target, ip",
    [
        ("10.0.0.1:443", True),
        ("[::1]:22", True),
        ("edge1:22", False),
        ("a-svc-kins.kins-system:443", False),
    ],
)
def test_is_ip_target(target: str, ip: bool) -> None:
    assert is_ip_target(target) is ip
