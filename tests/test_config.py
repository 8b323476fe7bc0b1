"""Tests for kins_tunnel.config: YAML files, defaults, error messages, and the routing-name rule."""

import dataclasses
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from kins_tunnel.config import (
    AdminSettings,
    Backoff,
    CloudConfig,
    EdgeConfig,
    LogSettings,
    MuxSettings,
    TLSFiles,
    TunnelListen,
    cloud_config_from_dict,
    edge_config_from_dict,
    load_cloud_config,
    load_edge_config,
)
from kins_tunnel.config_proxy import ProxyAuth, ProxySettings
from kins_tunnel.errors import UserError
from kins_tunnel.names import Address, normalise_target

CLOUD_YAML = """\
tunnel: {listen: "0.0.0.0:9000"}       # edges connect here
proxy:  {listen: "0.0.0.0:8080", anonymous: true}   # HTTP CONNECT, no credentials on purpose
admin:  {listen: "127.0.0.1:9090"}
tls: {ca: certs/ca.crt, cert: certs/cloud.crt, key: certs/cloud.key}
"""

EDGE_YAML = """\
cloud: ["tunnel-cloud.kube-system:9000"]
tls: {ca: certs/ca.crt, cert: certs/edge-edge1.crt, key: certs/edge-edge1.key}
services:
  "test-svc-kins.kins-system:443": "127.0.0.1:6443"
  "edge1:22": "127.0.0.1:22"
"""

TLS = {"ca": "ca.crt", "cert": "c.crt", "key": "c.key"}
BASE = Path("/etc/kins")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def cloud(**data: Any) -> CloudConfig:
    return cloud_config_from_dict({"tls": TLS, **data}, base_dir=BASE)


def edge(**data: Any) -> EdgeConfig:
    base = {"cloud": ["c:9000"], "tls": TLS, "services": {"edge1:22": "127.0.0.1:22"}}
    return edge_config_from_dict({**base, **data}, base_dir=BASE)


def cloud_error(**data: Any) -> str:
    with pytest.raises(UserError) as info:
        cloud(**data)
    return str(info.value)


def edge_error(**data: Any) -> str:
    with pytest.raises(UserError) as info:
        edge(**data)
    return str(info.value)


# --- good files and defaults -------------------------------------------------------------------


def test_cloud_file_from_design(tmp_path: Path) -> None:
    cfg = load_cloud_config(write(tmp_path, "cloud.yaml", CLOUD_YAML))
    assert cfg.tunnel.listen == Address("0.0.0.0", 9000)
    assert cfg.proxy.listen == Address("0.0.0.0", 8080)
    assert cfg.admin == AdminSettings(Address("127.0.0.1", 9090))
    assert cfg.tls == TLSFiles(
        tmp_path / "certs/ca.crt", tmp_path / "certs/cloud.crt", tmp_path / "certs/cloud.key"
    )


def test_edge_file_from_design(tmp_path: Path) -> None:
    cfg = load_edge_config(write(tmp_path, "edge.yaml", EDGE_YAML))
    assert cfg.cloud == ("tunnel-cloud.kube-system:9000",)
    assert cfg.tls.cert == tmp_path / "certs/edge-edge1.crt"
    assert dict(cfg.services) == {
        "test-svc-kins.kins-system:443": (Address("127.0.0.1", 6443),),
        "edge1:22": (Address("127.0.0.1", 22),),
    }
    with pytest.raises(TypeError):
        cfg.services["x:1"] = ()  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.cloud = ()  # type: ignore[misc]


def test_cloud_defaults() -> None:
    cfg = cloud()
    assert cfg.tunnel == TunnelListen(Address("0.0.0.0", 9000), 10.0, 10.0, 20.0, 30.0)
    assert cfg.proxy == ProxySettings(Address("0.0.0.0", 8080), None, 10000, 10.0, 16384, 10.0)
    assert cfg.admin == AdminSettings(Address("127.0.0.1", 9090))
    assert cfg.mux == MuxSettings(256 * 1024, 16 * 1024 * 1024, 64 * 1024 * 1024, 1024, 256 * 1024)
    assert cfg.log == LogSettings("info", False)
    assert cfg.replica == ""
    assert cfg.tls == TLSFiles(BASE / "ca.crt", BASE / "c.crt", BASE / "c.key")


def test_edge_defaults() -> None:
    cfg = edge()
    assert (
        cfg.dial_timeout,
        cfg.handshake_timeout,
        cfg.ping_interval,
        cfg.ping_timeout,
        cfg.drain_timeout,
        cfg.resolve_interval,
    ) == (5.0, 10.0, 10.0, 20.0, 30.0, 30.0)
    assert cfg.reconnect == Backoff(0.5, 30.0, 2.0, 60.0)
    assert cfg.admin == AdminSettings(Address("127.0.0.1", 9091))
    assert cfg.mux == MuxSettings()
    assert cfg.log == LogSettings()


def test_every_knob_set(tmp_path: Path) -> None:
    cfg = load_cloud_config(
        write(
            tmp_path,
            "cloud.yaml",
            """\
        tunnel: {listen: "[::]:9443", handshake_timeout: 3, ping_interval: 1.5, ping_timeout: 4,
                 drain_timeout: 5}
        proxy:
          listen: "127.0.0.1:0"
          auth: {basic_file: users, bearer_file: /run/secrets/tokens}
          max_connections: 7
          header_timeout: 2
          max_request_bytes: 4096
          dial_timeout: 6
        admin: {listen: "[::1]:9999"}
        tls: {ca: /abs/ca.crt, cert: ../up/c.crt, key: k.key}
        mux: {initial_window: 65536, max_window: 65536, session_budget: 131072, max_streams: 1,
              max_frame: 16384}
        log: {level: DEBUG, json: true}
        replica: cloud-a
        """,
        )
    )
    assert cfg.tunnel == TunnelListen(Address("::", 9443), 3.0, 1.5, 4.0, 5.0)
    assert isinstance(cfg.tunnel.handshake_timeout, float)
    assert cfg.proxy == ProxySettings(
        Address("127.0.0.1", 0),
        ProxyAuth(tmp_path / "users", Path("/run/secrets/tokens")),
        7,
        2.0,
        4096,
        6.0,
    )
    assert str(cfg.admin.listen) == "[::1]:9999"
    assert cfg.tls == TLSFiles(Path("/abs/ca.crt"), tmp_path / "../up/c.crt", tmp_path / "k.key")
    assert cfg.mux == MuxSettings(65536, 65536, 131072, 1, 16384)
    assert cfg.log == LogSettings("debug", True)
    assert cfg.replica == "cloud-a"


def test_edge_knobs() -> None:
    cfg = edge(
        cloud="one:1",
        dial_timeout=1,
        resolve_interval=0.25,
        reconnect={"initial": 1, "max": 1, "multiplier": 1, "stable_after": 9},
        admin={"listen": "0.0.0.0:1"},
        log={"level": "warning"},
    )
    assert cfg.cloud == ("one:1",)
    assert (cfg.dial_timeout, cfg.resolve_interval) == (1.0, 0.25)
    assert cfg.reconnect == Backoff(1.0, 1.0, 1.0, 9.0)
    assert cfg.admin == AdminSettings(Address("0.0.0.0", 1))
    assert edge(admin={}).admin == AdminSettings(Address("127.0.0.1", 9091))


def test_edge_admin_null_disables(tmp_path: Path) -> None:
    cfg = load_edge_config(write(tmp_path, "edge.yaml", EDGE_YAML + "admin: null\n"))
    assert cfg.admin is None


def test_empty_sections_take_defaults(tmp_path: Path) -> None:
    cfg = load_cloud_config(write(tmp_path, "c.yaml", CLOUD_YAML + "mux:\nlog:\n"))
    assert (cfg.mux, cfg.log) == (MuxSettings(), LogSettings())


def test_cloud_list_and_services_lists() -> None:
    cfg = edge(
        cloud=["a.example:9000", "10.0.0.1:9000", "[fd00::1]:9000"],
        services={
            "Test-Svc-Kins.Kins-System.svc.cluster.local:443": ["10.0.0.1:6443", "[::1]:6443"]
        },
    )
    assert cfg.cloud == ("a.example:9000", "10.0.0.1:9000", "[fd00::1]:9000")
    assert dict(cfg.services) == {
        "test-svc-kins.kins-system:443": (Address("10.0.0.1", 6443), Address("::1", 6443))
    }


# --- errors ------------------------------------------------------------------------------------


def test_unknown_key_names_path(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "cloud.yaml",
        CLOUD_YAML.replace('{listen: "0.0.0.0:8080"', '{lsiten: "0.0.0.0:8080"'),
    )
    with pytest.raises(UserError) as info:
        load_cloud_config(path)
    assert str(info.value) == (
        f"{path}: proxy.lsiten: unknown key (expected one of: listen, auth, max_connections, "
        "header_timeout, max_request_bytes, dial_timeout, authz_file, tls, "
        "max_connections_per_principal, max_stream_share, idle_timeout, anonymous)"
    )


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"tunel": {}}, "cloud.yaml: tunel: unknown key (expected one of: tls, tunnel,"),
        ({"proxy": {"auth": {"basic": "x"}}}, "cloud.yaml: proxy.auth.basic: unknown key"),
        ({"mux": {"window": 1}}, "cloud.yaml: mux.window: unknown key"),
        (
            {"tls": {**TLS, "crt": "x"}},
            "cloud.yaml: tls.crt: unknown key (expected one of: ca, cert, key)",
        ),
    ],
)
def test_unknown_keys_cloud(data: dict[str, Any], where: str) -> None:
    assert cloud_error(**data).startswith(where)


def test_unknown_keys_edge() -> None:
    assert edge_error(reconnect={"jitter": 1}).startswith(
        "edge.yaml: reconnect.jitter: unknown key"
    )
    assert edge_error(clouds=[]).startswith("edge.yaml: clouds: unknown key")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"tunnel": {"ping_interval": "10s"}},
            "tunnel.ping_interval: expected a number, got string '10s'",
        ),
        (
            {"tunnel": {"ping_interval": True}},
            "tunnel.ping_interval: expected a number, got boolean True",
        ),
        (
            {"tunnel": {"ping_interval": 0}},
            "tunnel.ping_interval: must be a finite number greater than 0",
        ),
        (
            {"tunnel": {"ping_interval": -1.5}},
            "tunnel.ping_interval: must be a finite number greater than 0",
        ),
        (
            {"tunnel": {"ping_interval": float("inf")}},
            "tunnel.ping_interval: must be a finite number",
        ),
        (
            {"proxy": {"max_connections": 1.5}},
            "proxy.max_connections: expected an integer, got number 1.5",
        ),
        (
            {"proxy": {"max_connections": False}},
            "proxy.max_connections: expected an integer, got boolean",
        ),
        ({"proxy": {"max_connections": 0}}, "proxy.max_connections: must be at least 1, got 0"),
        ({"proxy": []}, "proxy: expected a mapping, got list"),
        (
            {"proxy": {"listen": 8080}},
            'proxy.listen: expected a "host:port" string, got integer 8080',
        ),
        ({"proxy": {"auth": {}}}, "proxy.auth: set basic_file, bearer_file or both"),
        (
            {"proxy": {"auth": {"basic_file": 3}}},
            "proxy.auth.basic_file: expected a file path, got integer 3",
        ),
        (
            {"log": {"level": "verbose"}},
            "log.level: 'verbose' is not one of: debug, info, warning, error",
        ),
        ({"log": {"json": "yes"}}, "log.json: expected true or false, got string 'yes'"),
        ({"replica": 5}, "replica: expected a string, got integer 5"),
        ({"tls": None}, "tls.ca: required key is missing"),
        ({"tls": {"ca": "a", "cert": "b"}}, "tls.key: required key is missing"),
        ({"tls": {**TLS, "key": ""}}, "tls.key: expected a file path, got string ''"),
        (
            {"mux": {"initial_window": 1024}},
            "mux.initial_window: must be at least 16384 (16 KiB), got 1024",
        ),
        (
            {"mux": {"max_window": 128 * 1024}},
            "mux.max_window: must be at least initial_window (262144)",
        ),
        (
            {"mux": {"session_budget": 128 * 1024}},
            "mux.session_budget: must be at least initial_window (262144)",
        ),
        ({"mux": {"max_frame": 1 << 25}}, "mux.max_frame: must be at most 16777215, got 33554432"),
        ({"mux": {"max_streams": 65537}}, "mux.max_streams: must be at most 65536, got 65537"),
        ({"mux": {"max_streams": 0}}, "mux.max_streams: must be at least 1"),
        # the protocol core's own bound (16 MiB - 1: a 24-bit length), not a rounder number next to it
        (
            {"mux": {"max_frame": 16 * 1024 * 1024}},
            "mux.max_frame: must be at most 16777215, got 16777216",
        ),
        ({"mux": {"max_target_len": 5000}}, "mux.max_target_len: must be at most 4096, got 5000"),
    ],
)
def test_cloud_errors(data: dict[str, Any], message: str) -> None:
    assert cloud_error(**data).startswith(f"cloud.yaml: {message}")


def test_section_errors_come_before_missing_keys() -> None:
    with pytest.raises(UserError, match="^cloud.yaml: proxy.lsiten: unknown key"):
        cloud_config_from_dict({"proxy": {"lsiten": "x"}}, base_dir=BASE)
    with pytest.raises(UserError, match="^edge.yaml: mux.max_frame: expected an integer"):
        edge_config_from_dict({"mux": {"max_frame": "1M"}}, base_dir=BASE)


def test_cloud_tls_required() -> None:
    with pytest.raises(UserError, match="^cloud.yaml: tls: required key is missing$"):
        cloud_config_from_dict({}, base_dir=BASE)
    with pytest.raises(UserError, match="^cloud.yaml: top level: expected a mapping, got list$"):
        cloud_config_from_dict([], base_dir=BASE)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"cloud": []}, 'cloud: expected a non-empty list of "host:port" strings, got list'),
        ({"cloud": {"a": 1}}, "cloud: expected a non-empty list"),
        ({"cloud": ["ok:1", "nope"]}, "cloud[1]: 'nope' is not \"host:port\""),
        ({"cloud": ["ok:0"]}, "cloud[0]: 'ok:0': port must be a number from 1 to 65535"),
        ({"services": {}}, "services: expected a non-empty mapping, got mapping"),
        ({"services": "x"}, "services: expected a non-empty mapping, got string 'x'"),
        (
            {"services": {"edge1": "127.0.0.1:22"}},
            "services.\"edge1\": bad name: target 'edge1' has no port",
        ),
        (
            {"services": {1342: "127.0.0.1:22"}},
            'services."1342": a name must be a string (quote it)',
        ),
        (
            {"services": {"a:1": "b:2", "A:01": "b:2"}},
            'services."A:01": same routing name as another key (a:1)',
        ),
        ({"services": {"a:1": []}}, 'services."a:1": expected "host:port" or a non-empty list'),
        ({"services": {"a:1": ["b:2", "c"]}}, 'services."a:1"[1]: \'c\' is not "host:port"'),
        ({"services": {"a:1": None}}, 'services."a:1": expected a "host:port" string, got null'),
        ({"reconnect": {"initial": 5, "max": 1}}, "reconnect.max: must be at least initial (5.0)"),
        ({"reconnect": {"multiplier": 0.5}}, "reconnect.multiplier: must be at least 1"),
        ({"admin": {"listen": None}}, 'admin.listen: expected a "host:port" string, got null'),
        ({"admin": 1}, "admin: expected a mapping, got integer 1"),
        ({"resolve_interval": 0}, "resolve_interval: must be a finite number greater than 0"),
    ],
)
def test_edge_errors(data: dict[str, Any], message: str) -> None:
    assert edge_error(**data).startswith(f"edge.yaml: {message}")


@pytest.mark.parametrize("key", ["cloud", "tls", "services"])
def test_edge_required(key: str) -> None:
    data = {"cloud": ["c:1"], "tls": TLS, "services": {"a:1": "b:2"}}
    del data[key]
    with pytest.raises(UserError, match=f"^edge.yaml: {key}: required key is missing$"):
        edge_config_from_dict(data, base_dir=BASE)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(
        UserError, match=r"^cannot read config .*nope\.yaml: No such file or directory$"
    ):
        load_cloud_config(tmp_path / "nope.yaml")


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "edge.yaml", "cloud: [a:1]\ntls: {ca: x\nservices: {}\n")
    with pytest.raises(UserError, match=r"edge\.yaml: line \d+: invalid YAML: ") as info:
        load_edge_config(path)
    assert "\n" not in str(info.value)


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "edge.yaml", EDGE_YAML + 'cloud: ["other:1"]\n')
    with pytest.raises(UserError, match=r"line 6: invalid YAML: duplicate key 'cloud'"):
        load_edge_config(path)


def test_yaml_merge_keys_still_work(tmp_path: Path) -> None:
    # Anchors and merge keys are plain YAML; a key that overrides a merged one is not a duplicate.
    path = write(
        tmp_path,
        "cloud.yaml",
        """\
        tls: {ca: a, cert: b, key: c}
        proxy: {listen: "127.0.0.1:8080"}
        tunnel: {<<: {handshake_timeout: 7, drain_timeout: 8}, drain_timeout: 9}
        """,
    )
    assert load_cloud_config(path).tunnel == TunnelListen(handshake_timeout=7.0, drain_timeout=9.0)


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_file_reports_missing_keys(tmp_path: Path, text: str) -> None:
    with pytest.raises(UserError, match=r"cloud\.yaml: tls: required key is missing"):
        load_cloud_config(write(tmp_path, "cloud.yaml", text))


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"cloud\.yaml: top level: expected a mapping, got list"):
        load_cloud_config(write(tmp_path, "cloud.yaml", "- a\n- b\n"))


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "cloud.yaml"
    path.write_bytes(b"tls: \xff\n")
    with pytest.raises(UserError, match="cannot read config .*: not UTF-8 text"):
        load_cloud_config(path)


# --- addresses ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("0.0.0.0:8080", "0.0.0.0", 8080),
        ("[::1]:9000", "::1", 9000),
        ("[::]:0", "::", 0),
        ("tunnel-cloud.kube-system:65535", "tunnel-cloud.kube-system", 65535),
        ("localhost:1", "localhost", 1),
    ],
)
def test_address_round_trip(text: str, host: str, port: int) -> None:
    address = Address.parse(text)
    assert address == Address(host, port)
    assert str(address) == text


@pytest.mark.parametrize(
    "text",
    [
        "8080",
        ":8080",
        "host:",
        "host:65536",
        "host:-1",
        "host:http",
        "::1:80",
        "[::1]",
        "[nope]:80",
        "[1.2.3.4]:80",
        "a b:80",
        "host:8080 ",
        "host:+80",
        "host:\u0660",
    ],
)
def test_bad_addresses(text: str) -> None:
    with pytest.raises(ValueError):
        Address.parse(text)
    assert cloud_error(proxy={"listen": text}).startswith("cloud.yaml: proxy.listen: ")


# --- routing names -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("Test-Svc-Kins.Kins-System.svc.cluster.local:443", "test-svc-kins.kins-system:443"),
        ("test-svc-kins.kins-system.svc:443", "test-svc-kins.kins-system:443"),
        ("test-svc-kins.kins-system.svc.cluster.local.:443", "test-svc-kins.kins-system:443"),
        ("test-svc-kins.kins-system.svc.my.domain:6443", "test-svc-kins.kins-system:6443"),
        ("test-svc-kins.kins-system:443", "test-svc-kins.kins-system:443"),
        ("EDGE1:22", "edge1:22"),
        ("edge1.:022", "edge1:22"),
        ("svc.ns:1", "svc.ns:1"),
        ("a.svc.b:1", "a.svc.b:1"),
        ("10.0.0.1:65535", "10.0.0.1:65535"),
        ("[::1]:22", "[::1]:22"),
        ("[FD00:0:0::1]:22", "[fd00::1]:22"),
    ],
)
def test_normalise_target(target: str, expected: str) -> None:
    assert normalise_target(target) == expected


@pytest.mark.parametrize(
    "target",
    [
        "",
        "edge1",
        "edge1:",
        ":22",
        "edge1:0",
        "edge1:65536",
        "edge1:x",
        "edge1:-1",
        "::1:22",
        "[::1]",
        "[nope]:22",
        "a..b:1",
        ".a:1",
        "a_b:1",
        "a b:1",
        "a/b:1",
        "ünï.code:1",
        "\u212aube:1",
        "a" * 64 + ".b:1",
        ("a." * 127) + "ab:1",
        "1.2.3.999:1",
        "edge1:\u0662\u0662",
    ],
)
def test_normalise_target_rejects(target: str) -> None:
    with pytest.raises(ValueError):
        normalise_target(target)


@given(st.text())
@example("[")
@example("[:]:1")
@example("0:1")
def test_normalise_target_only_raises_value_error(text: str) -> None:
    try:
        result = normalise_target(text)
    except ValueError:
        return
    assert normalise_target(result) == result  # normalising is idempotent


@given(
    st.from_regex(
        r"[A-Za-z0-9-]{1,20}\.[A-Za-z0-9-]{1,20}\.svc(\.[a-z]{1,8}){0,3}\.?:[1-9][0-9]{0,3}",
        fullmatch=True,
    )
)
def test_cluster_domain_is_stripped(text: str) -> None:
    svc, ns = text.lower().split(".")[:2]
    assert normalise_target(text) == f"{svc}.{ns}:{int(text.rpartition(':')[2])}"


def test_idle_ping_interval_defaults_to_a_minute_and_is_never_shorter_than_the_busy_one() -> None:
    assert cloud().tunnel.idle_ping_interval == 60.0
    assert edge().idle_ping_interval == 60.0
    assert (
        cloud(tunnel={"ping_interval": 5, "idle_ping_interval": 5}).tunnel.idle_ping_interval == 5
    )
    with pytest.raises(
        UserError, match=r"tunnel\.idle_ping_interval: 5 is less than ping_interval"
    ):
        cloud(tunnel={"ping_interval": 10, "idle_ping_interval": 5})
    with pytest.raises(UserError, match=r"idle_ping_interval: 2 is less than ping_interval \(10\)"):
        edge(idle_ping_interval=2)
    for bad in (0, -1, "soon", float("nan")):
        with pytest.raises(UserError, match="idle_ping_interval"):
            edge(idle_ping_interval=bad)
