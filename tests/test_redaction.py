"""A password in a proxy URL never reaches an error message or a log line: `connect --proxy`,
`kubeconfig --proxy-url` and the edge's `proxy.url` (real processes for the two commands)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kins_tunnel.errors import UserError
from kins_tunnel.names import redact_url
from kins_tunnel.proxy_url import parse_proxy_url
from kins_tunnel.testing.support import kins_tunnel_cli

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"http://ops:{SECRET}@proxy:3128", "http://ops:***@proxy:3128"),
        (f"https://{SECRET}@proxy:3128/x", "https://***@proxy:3128/x"),
        (f"http://ops:{SECRET}@a@proxy:3128", "http://ops:***@proxy:3128"),
        ("http://proxy:3128", "http://proxy:3128"),
        ("not a url", "not a url"),
        (f"ftp://u:{SECRET}@h", "ftp://u:***@h"),
    ],
)
def test_redact_url_masks_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        f"ftp://ops:{SECRET}@proxy:3128",  # bad scheme
        f"http://ops:{SECRET}@proxy",  # no port
        f"http://ops:{SECRET}@proxy:99999",  # bad port
        f"http://ops:{SECRET}@proxy:3128/path",  # a path
    ],
)
def test_parse_proxy_url_errors_never_show_the_password(url: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_proxy_url(url)
    assert SECRET not in str(info.value) and "ops:***@" in str(info.value)


def test_connect_with_a_bad_proxy_url_does_not_print_the_password() -> None:
    r = kins_tunnel_cli("connect", "edge1:22", "--proxy", f"http://ops:{SECRET}@127.0.0.1:0")
    assert r.returncode != 0
    assert SECRET not in r.stderr + r.stdout, r.stderr
    assert "ops:***@" in r.stderr


def test_connect_to_a_refused_proxy_does_not_print_the_password() -> None:
    r = kins_tunnel_cli("connect", "edge1:22", "--proxy", f"http://ops:{SECRET}@127.0.0.1:1")
    assert r.returncode != 0 and r.stderr
    assert SECRET not in r.stderr + r.stdout, r.stderr


def test_kubeconfig_with_a_bad_proxy_url_does_not_print_the_password(tmp_path: Path) -> None:
    kc = tmp_path / "in.yaml"
    kc.write_text("apiVersion: v1\nkind: Config\nclusters: []\n")
    r = kins_tunnel_cli(
        "kubeconfig",
        "--unit",
        "test",
        "--proxy-url",
        f"http://ops:{SECRET}@h:3128/x",
        "-i",
        str(kc),
    )
    assert r.returncode != 0
    assert SECRET not in r.stderr + r.stdout, r.stderr
    assert "ops:***@" in r.stderr


def test_edge_proxy_url_with_a_password_is_refused_without_showing_it(tmp_path: Path) -> None:
    from kins_tunnel.config import edge_config_from_dict

    with pytest.raises(UserError) as info:
        edge_config_from_dict(
            {
                "cloud": ["127.0.0.1:9000"],
                "tls": {"ca": "ca.crt", "cert": "e.crt", "key": "e.key"},
                "services": {},
                "proxy": {"url": f"http://ops:{SECRET}@proxy:3128"},
            },
            base_dir=tmp_path,
        )
    assert SECRET not in str(info.value) and "proxy.url" in str(info.value)
