"""Proxy URLs, proxy credential files and the edge's `proxy:` config section (one-line errors)."""

from __future__ import annotations

import base64
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from kins_tunnel.config import SiteProxy, edge_config_from_dict, load_edge_config
from kins_tunnel.errors import UserError
from kins_tunnel.proxy_url import ProxyURL, parse_proxy_url
from kins_tunnel.transport.errors import SetupError
from kins_tunnel.transport.http_proxy import (
    ProxyDialer,
    basic_authorization,
    read_credentials_file,
)

BASE = Path("/etc/kins")
EDGE = {
    "cloud": ["c:9000"],
    "tls": {"ca": "ca.crt", "cert": "c.crt", "key": "c.key"},
    "services": {"edge1:22": "127.0.0.1:22"},
}


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("http://proxy:3128", ProxyURL("http", "proxy", 3128)),
        ("http://proxy:3128/", ProxyURL("http", "proxy", 3128)),
        ("https://10.0.0.1:443", ProxyURL("https", "10.0.0.1", 443)),
        ("http://[::1]:8080", ProxyURL("http", "::1", 8080)),
        ("http://u:p%3Aw%20d@proxy:1", ProxyURL("http", "proxy", 1, "u", "p:w d")),
        ("http://u@proxy:1", ProxyURL("http", "proxy", 1, "u", None)),
        ("http://u:@proxy:1", ProxyURL("http", "proxy", 1, "u", "")),
        ("HTTP://Proxy.Example:1", ProxyURL("http", "proxy.example", 1)),
    ],
)
def test_parse_proxy_url(text: str, want: ProxyURL) -> None:
    assert parse_proxy_url(text) == want


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("proxy:3128", "must start with http:// or https://"),
        ("socks5://proxy:1080", "must start with http:// or https://"),
        ("http://proxy", "give the proxy's port, as in http://proxy:3128"),
        ("http://proxy:0", "give the proxy's port"),
        ("http://proxy:99999", "the port must be a number from 1 to 65535"),
        ("http://proxy:31x", "the port must be a number from 1 to 65535"),
        ("http://:3128", "no host"),
        ("http://proxy:3128/path", "no path, query or fragment"),
        ("http://proxy:3128?x=1", "no path, query or fragment"),
        ("http://[nope]:1", "does not appear to be an IPv4 or IPv6 address"),
        ("http://[1.2.3.4]:1", "An IPv4 address cannot be in brackets"),
        ("http://a%2Fb:1", "bad host 'a%2"),
        ("http://pro xy:1", "not a URL like http://proxy:3128"),
        ("http://prøxy:1", "not a URL like http://proxy:3128"),
    ],
)
def test_parse_proxy_url_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="^'.*': .*" + re.escape(message)):
        parse_proxy_url(text)


def test_edge_proxy_url_is_plain_http_without_credentials() -> None:
    with pytest.raises(ValueError, match="must start with http://$"):
        parse_proxy_url("https://p:1", schemes=("http",))
    with pytest.raises(ValueError, match=r"put them in proxy\.credentials_file"):
        parse_proxy_url("http://u:p@p:1", userinfo=False)


@pytest.mark.parametrize(
    ("content", "user", "password"),
    [
        (b"user:pass\n", b"user", b"pass"),
        (b"user:pass", b"user", b"pass"),
        (b"user:pass\r\n", b"user", b"pass"),
        (b"user:pa ss  \n", b"user", b"pa ss  "),  # trailing spaces are part of the password
        (b"user:  \n", b"user", b"  "),
        (b"user:a:b\n", b"user", b"a:b"),
        (b"user:\n", b"user", b""),
        ("us\u00e9r:p\u00e4ss\n".encode(), "us\u00e9r".encode(), "p\u00e4ss".encode()),
    ],
)
def test_credentials_file_is_read_exactly(
    tmp_path: Path, content: bytes, user: bytes, password: bytes
) -> None:
    (tmp_path / "c").write_bytes(content)
    assert read_credentials_file(tmp_path / "c") == (user, password)
    assert basic_authorization(user, password) == b"Basic " + base64.b64encode(
        user + b":" + password
    )


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\n",
        b"nocolons3cret\n",
        b":s3cret\n",
        b"u:s3cret\n\n",
        b"u:s3cret\nv:q\n",
        b"u\x01:s3cret",
    ],
)
def test_bad_credentials_file(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "c").write_bytes(content)
    with pytest.raises(ValueError, match="^expected one line user:password") as info:
        read_credentials_file(tmp_path / "c")
    assert "s3cret" not in str(info.value)


def test_dialer_checks_the_credentials_file_at_start(tmp_path: Path) -> None:
    with pytest.raises(
        SetupError, match=r"^proxy\.credentials_file: .*/missing: No such file or directory$"
    ):
        ProxyDialer("http://p:1", tmp_path / "missing")
    (tmp_path / "c").write_text("secret-without-colon\n")
    with pytest.raises(
        SetupError, match=r"^proxy\.credentials_file: .*/c: expected one line user:password$"
    ) as info:
        ProxyDialer("http://p:1", tmp_path / "c")
    assert "secret" not in str(info.value).replace(str(tmp_path), "")


# --- edge.yaml `proxy:` ------------------------------------------------------------------------


def edge(**data: Any) -> Any:
    return edge_config_from_dict({**EDGE, **data}, base_dir=BASE)


def test_edge_proxy_default_and_null() -> None:
    assert edge().proxy is None
    assert edge(proxy=None).proxy is None


def test_edge_proxy_from_file(tmp_path: Path) -> None:
    path = tmp_path / "edge.yaml"
    path.write_text(
        textwrap.dedent("""\
        cloud: ["tunnel-cloud.example.com:9000"]
        tls: {ca: certs/ca.crt, cert: certs/edge-edge1.crt, key: certs/edge-edge1.key}
        services: {"edge1:22": "127.0.0.1:22"}
        proxy: {url: "http://squid.site.local:3128", credentials_file: secrets/proxy}
        """)
    )
    cfg = load_edge_config(path)
    assert cfg.proxy == SiteProxy("http://squid.site.local:3128", tmp_path / "secrets/proxy")
    assert edge(proxy={"url": "http://p:1", "credentials_file": "/abs/c"}).proxy == SiteProxy(
        "http://p:1", Path("/abs/c")
    )
    assert edge(proxy={"url": "http://p:1"}).proxy == SiteProxy("http://p:1", None)


@pytest.mark.parametrize(
    ("proxy", "message"),
    [
        ({}, "proxy.url: required key is missing"),
        ({"credentials_file": "c"}, "proxy.url: required key is missing"),
        ({"url": 3128}, 'proxy.url: expected a "http://host:port" string, got integer 3128'),
        ({"url": "squid:3128"}, "proxy.url: 'squid:3128': the proxy URL must start with http://"),
        (
            {"url": "https://squid:3128"},
            "proxy.url: 'https://squid:3128': the proxy URL must start with http://",
        ),
        (
            {"url": "http://squid"},
            "proxy.url: 'http://squid': give the proxy's port, as in http://squid:3128",
        ),
        (
            {"url": "http://u:p@squid:3128"},
            "proxy.url: 'http://u:***@squid:3128': no credentials in the URL here "
            "(put them in proxy.credentials_file)",
        ),
        (
            {"url": "http://squid:3128", "credentials_file": ""},
            "proxy.credentials_file: expected a file path, got string ''",
        ),
        (
            {"url": "http://squid:3128", "credentials_file": 7},
            "proxy.credentials_file: expected a file path, got integer 7",
        ),
        (
            {"url": "http://squid:3128", "credentails_file": "c"},
            "proxy.credentails_file: unknown key (expected one of: url, credentials_file)",
        ),
        ("http://squid:3128", "proxy: expected a mapping, got string 'http://squid:3128'"),
    ],
)
def test_edge_proxy_errors(proxy: Any, message: str) -> None:
    with pytest.raises(UserError) as info:
        edge(proxy=proxy)
    assert str(info.value) == f"edge.yaml: {message}"
    assert "\n" not in str(info.value)
