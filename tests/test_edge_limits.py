"""Edge-wide and per-listener bounds: uplink listeners and the uplink proxy cap their connections
and close idle relays (counted), a non-loopback uplink listener is warned about, `max_tunnels`
bounds the keepers whatever DNS answers, and the open-file limit is checked at start-up."""

from __future__ import annotations

import logging
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from kins_tunnel.config import edge_config_from_dict
from kins_tunnel.edge.agent import Edge
from kins_tunnel.edge.resources import open_files_needed
from kins_tunnel.errors import UserError
from kins_tunnel.testing.support import metric_value, read_all, wait_until
from tests.e2e.faultkit import read_until_end
from tests.e2e.harness import SVC, edge_dict, make_certs, serve_echo, tunnel_env, write_yaml

LIMITS = "kins_tunnel_listener_limits_total"


async def test_an_uplink_listener_caps_its_connections_and_closes_idle_relays(
    tmp_path: Path,
) -> None:
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        target = f"127.0.0.1:{echo}"
        async with tunnel_env(tmp_path, uplinks={"test": [target]}) as env:
            edge = await env.add_edge(
                {SVC: target},
                wait_for=SVC,
                uplinks={
                    "127.0.0.1:0": {"target": target, "max_connections": 2, "idle_timeout": 0.5}
                },
                uplink_proxy={"listen": "127.0.0.1:0", "max_connections": 1, "idle_timeout": 0.5},
            )
            port = edge.uplinks.ports["127.0.0.1:0"]
            held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
            for s in held:  # both relayed
                await s.send_all(b"ping")
                with trio.fail_after(5):
                    assert await s.receive_some(4) == b"ping"
            extra = await trio.open_tcp_stream("127.0.0.1", port)
            with trio.fail_after(5):  # the third is closed at accept, before any byte
                assert await read_all(extra) == b""
            await extra.aclose()
            assert metric_value(edge.metrics, LIMITS, listener="uplink", reason="max_connections")
            for s in held:  # idle for 0.5 s: both relays closed (reset), and counted
                async with s:
                    assert (await read_until_end(s, 5))[1] == 0
            await wait_until(
                lambda: (
                    metric_value(edge.metrics, LIMITS, listener="uplink", reason="idle_timeout")
                    == 2
                ),
                5,
                "both idle relays counted",
            )
            # the proxy: one connection at a time
            proxy = edge.uplinks.proxy_port
            assert proxy is not None
            async with await trio.open_tcp_stream("127.0.0.1", proxy):
                await trio.sleep(0.2)  # the first is being served
                async with await trio.open_tcp_stream("127.0.0.1", proxy) as second:
                    assert (await read_until_end(second, 5))[1] == 0
            assert metric_value(
                edge.metrics, LIMITS, listener="uplink_proxy", reason="max_connections"
            )
        n.cancel_scope.cancel()


async def test_a_non_loopback_uplink_listener_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    certs = make_certs(tmp_path)
    doc = edge_dict(certs, [9], {SVC: "127.0.0.1:9"}, uplinks={"0.0.0.0:0": "registry:5000"})
    doc["reconnect"] = {"initial": 1.0, "max": 1.0}
    edge = Edge(edge_config_from_dict(doc, base_dir=tmp_path))
    with caplog.at_level(logging.WARNING, logger="kins_tunnel"):
        async with trio.open_nursery() as n:
            await n.start(edge.run)
            n.cancel_scope.cancel()
    warned = [r.getMessage() for r in caplog.records if "NO authentication" in r.getMessage()]
    assert len(warned) == 1 and "registry:5000" in warned[0], warned


async def test_max_tunnels_bounds_the_keepers_whatever_dns_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`localhost` plus three more names: four addresses, max_tunnels 2: two keepers, a warning."""
    certs = make_certs(tmp_path)
    clouds = ["127.0.0.1:9", "127.0.0.2:9", "127.0.0.3:9", "127.0.0.4:9"]
    doc = edge_dict(certs, clouds, {SVC: "127.0.0.1:9"}, max_tunnels=2)
    doc["reconnect"] = {"initial": 1.0, "max": 1.0}
    edge = Edge(edge_config_from_dict(doc, base_dir=tmp_path))
    with caplog.at_level(logging.WARNING, logger="kins_tunnel"):
        async with trio.open_nursery() as n:
            await n.start(edge.run)
            await trio.sleep(0.2)
            assert len(edge._keepers) == 2
            n.cancel_scope.cancel()
    assert [r for r in caplog.records if "max_tunnels reached" in r.getMessage()]


def test_the_memory_budget_must_hold_max_tunnels_tunnels(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    doc = edge_dict(certs, [9], {SVC: "127.0.0.1:9"}, max_tunnels=4)
    with pytest.raises(UserError, match=r"edge.yaml: memory_budget: .* max_tunnels \(4\)"):
        edge_config_from_dict(doc, base_dir=tmp_path)
    doc["mux"] = {"session_budget": 32 * 1024 * 1024}
    assert edge_config_from_dict(doc, base_dir=tmp_path).max_tunnels == 4


def test_an_edge_whose_open_file_limit_is_too_low_refuses_to_start(tmp_path: Path) -> None:
    """A real process under a hard limit of 1,000 descriptors: one line naming the keys, exit 2."""
    certs = make_certs(tmp_path)
    doc = edge_dict(certs, [9], {SVC: "127.0.0.1:9"})
    cfg = edge_config_from_dict(doc, base_dir=tmp_path)
    assert open_files_needed(cfg) > 1000
    path = write_yaml(tmp_path / "edge.yaml", doc)

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1000, 1000))

    proc = subprocess.run(
        [sys.executable, "-m", "kins_tunnel", "edge", "--config", str(path)],
        capture_output=True,
        timeout=30,
        preexec_fn=low_limit,
        check=False,
    )
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert "RLIMIT_NOFILE" in err and "max_tunnels" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"admin": {"max_connections": 0}}, "admin.max_connections: must be at least 1, got 0"),
        ({"admin": {"idle_timeout": -1}}, "admin.idle_timeout: must be a finite number"),
        ({"max_tunnels": True}, "max_tunnels: expected an integer, got boolean True"),
        (
            {"uplinks": {"127.0.0.1:5000": {"max_connections": 3}}},
            'uplinks."127.0.0.1:5000".target: required',
        ),
        (
            {"uplinks": {"127.0.0.1:5000": {"target": "r:1", "idle": 3}}},
            'uplinks."127.0.0.1:5000".idle: unknown key (expected one of: target, '
            "max_connections, idle_timeout)",
        ),
        (
            {"uplinks": {"127.0.0.1:5000": {"target": "bad target"}}},
            'uplinks."127.0.0.1:5000".target: bad target: ',
        ),
        ({"uplink_proxy": {"max_connections": 0}}, "uplink_proxy.max_connections: must be at"),
    ],
)
def test_edge_limit_keys_are_checked(tmp_path: Path, over: dict[str, Any], message: str) -> None:
    certs = make_certs(tmp_path)
    doc = edge_dict(certs, [9], {SVC: "127.0.0.1:9"}, **over)
    with pytest.raises(UserError) as caught:
        edge_config_from_dict(doc, base_dir=tmp_path)
    assert str(caught.value).startswith(f"edge.yaml: {message}"), str(caught.value)
