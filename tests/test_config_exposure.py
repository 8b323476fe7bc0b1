"""The exposure rule of `load_cloud_config`: a proxy listener that lets anyone in is refused at
start-up unless it is on loopback or the operator writes `proxy.anonymous: true`."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from kins_tunnel.config import load_cloud_config
from kins_tunnel.errors import UserError
from kins_tunnel.names import is_loopback_host

TLS = {"ca": "ca.crt", "cert": "c.crt", "key": "c.key"}
AUTH = {"basic_file": "users"}


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "cloud.yaml"
    path.write_text(yaml.safe_dump({"tls": TLS, **data}))
    return path


def refused(tmp_path: Path, data: dict[str, Any]) -> str:
    path = write(tmp_path, data)
    with pytest.raises(UserError) as info:
        load_cloud_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert "proxy.anonymous" in message
    return message


@pytest.mark.parametrize(
    "proxy",
    [
        None,  # the default listener, 0.0.0.0:8080
        {"listen": "0.0.0.0:8080"},
        {"listen": "[::]:8080"},
        {"listen": "10.0.0.5:8080"},
        {"listen": "[::ffff:127.0.0.1]:8080"},
        {"listen": "tunnel.example.com:8080"},
        {"listen": "0.0.0.0:8080", "anonymous": False},
    ],
)
def test_anonymous_plain_listener_off_loopback_is_refused(
    tmp_path: Path, proxy: dict[str, Any] | None
) -> None:
    message = refused(tmp_path, {} if proxy is None else {"proxy": proxy})
    assert ": proxy.listen: " in message and "is not a loopback address" in message
    assert "proxy.auth" in message


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:8080", "127.5.6.7:0", "[::1]:8080", "localhost:8080", "LOCALHOST:1"]
)
def test_loopback_listener_may_be_anonymous(tmp_path: Path, listen: str) -> None:
    cfg = load_cloud_config(write(tmp_path, {"proxy": {"listen": listen}}))
    assert cfg.proxy.auth is None and cfg.proxy.anonymous is False


@pytest.mark.parametrize(
    "proxy",
    [
        {"listen": "0.0.0.0:8080", "anonymous": True},
        {"listen": "0.0.0.0:8080", "auth": AUTH},
        {"auth": {"bearer_file": "tokens"}},
        {"listen": None, "tls": {"client_ca": "users-ca.crt"}},  # certificates are credentials
        {"listen": None, "tls": {"listen": "0.0.0.0:8443"}, "auth": AUTH},
        {"listen": "127.0.0.1:8080", "tls": {"listen": "[::1]:8443"}},
        {"listen": "127.0.0.1:8080", "tls": {"client_ca": "users-ca.crt"}, "anonymous": True},
        {"tls": {"client_ca": "users-ca.crt"}, "auth": AUTH},
    ],
)
def test_credentials_or_an_explicit_yes_let_it_start(tmp_path: Path, proxy: dict[str, Any]) -> None:
    cfg = load_cloud_config(write(tmp_path, {"proxy": proxy}))
    assert cfg.proxy.anonymous is bool(proxy.get("anonymous"))


@pytest.mark.parametrize("listen", ["127.0.0.1:8080", "0.0.0.0:8080"])
def test_client_ca_refuses_an_anonymous_plain_listener_anywhere(
    tmp_path: Path, listen: str
) -> None:
    """client_ca says users authenticate with certificates: an open plain port would bypass it."""
    message = refused(tmp_path, {"proxy": {"listen": listen, "tls": {"client_ca": "ca2.crt"}}})
    assert f": proxy.listen: {listen} " in message
    assert "proxy.tls.client_ca" in message and "listen: null" in message


def test_anonymous_tls_listener_off_loopback_is_refused(tmp_path: Path) -> None:
    message = refused(tmp_path, {"proxy": {"listen": "127.0.0.1:8080", "tls": {}}})
    assert ": proxy.tls.listen: 0.0.0.0:8443 is not a loopback address" in message
    assert "proxy.tls.client_ca" in message


@pytest.mark.parametrize(
    ("proxy", "message"),
    [
        (
            {"anonymous": True, "auth": AUTH},
            "proxy.anonymous: true, but proxy.auth asks every client for credentials: remove one",
        ),
        ({"anonymous": "yes"}, "proxy.anonymous: expected true or false, got string 'yes'"),
        ({"anonymous": 1}, "proxy.anonymous: expected true or false, got integer 1"),
    ],
)
def test_anonymous_key_errors(tmp_path: Path, proxy: dict[str, Any], message: str) -> None:
    path = write(tmp_path, {"proxy": proxy})
    with pytest.raises(UserError) as info:
        load_cloud_config(path)
    assert str(info.value) == f"{path}: {message}"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("128.0.0.1", False),
        ("::ffff:127.0.0.1", False),
        ("localhost.example", False),
        ("", False),
    ],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_cloud_command_refuses_to_start(tmp_path: Path) -> None:
    """The real command: exit 2, one line naming the file and proxy.anonymous, nothing bound."""
    path = tmp_path / "cloud.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            tunnel: {listen: "127.0.0.1:0"}
            admin: {listen: "127.0.0.1:0"}
            proxy: {listen: "0.0.0.0:0"}
            tls: {ca: ca.crt, cert: c.crt, key: c.key}
            """
        )
    )
    r = subprocess.run(
        [sys.executable, "-m", "kins_tunnel", "cloud", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"kins-tunnel: error: {path}: proxy.listen: 0.0.0.0:0 ")
    assert "proxy.anonymous: true" in line
