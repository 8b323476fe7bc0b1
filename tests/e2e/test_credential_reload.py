"""Credential, rule and revocation files changing under a running cloud (real cloud and edges on
127.0.0.1, port 0), and bad lines refusing the start of a real `kins-tunnel cloud` process.

- A Basic file rewritten with a bad line: the credentials in use keep working, the new ones do not
  apply, `/status` shows the failure with its line (never a secret) and
  `kins_tunnel_reload_failures_total{file}` counts it; a fixed file applies.
- A revocation list rewritten with one good dotted-node entry and one bad line: the edge with
  that dotted node name is cut off (its live stream ends), another edge stays, the bad line is
  reported and counted.
- `kins-tunnel cloud` with a bad line in any watched file exits 2 naming the file and the line.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from kins_tunnel.testing.support import echo_roundtrip, http_get, run_kins_tunnel, wait_until
from tests.e2e.harness import (
    SVC,
    cloud_dict,
    connect,
    make_certs,
    serve_echo,
    tunnel_env,
    wait_routed,
    write_yaml,
)
from tests.test_observability import json_log, samples, value

SECRET = "Xq7-secret-9z"
_stamp = 0


def replace(path: Path, text: str) -> None:
    """A new version renamed over the old one, as a Secret update does, with its own stamp."""
    global _stamp
    _stamp += 1
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.utime(tmp, ns=(_stamp * 10**9, _stamp * 10**9))
    os.replace(tmp, path)


def basic(user: str, password: str) -> str:
    return (
        f"Proxy-Authorization: Basic {base64.b64encode(f'{user}:{password}'.encode()).decode()}\r\n"
    )


async def status_of(port: int, target: str, headers: str = "") -> int:
    status, _head, s = await connect(port, target, headers)
    await trio.aclose_forcefully(s)
    return status


async def admin(port: int) -> tuple[dict[str, Any], dict[str, list[tuple[dict[str, str], float]]]]:
    _, body = await http_get(port, "/status")
    _, metrics = await http_get(port, "/metrics")
    return json.loads(body), samples(metrics)


async def test_a_bad_line_in_the_basic_file_keeps_the_credentials_in_use(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("alice:pw-a\n")
    proxy = {"auth": {"basic_file": str(users)}}
    async with json_log() as log, trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        async with tunnel_env(tmp_path, {SVC: f"127.0.0.1:{echo}"}, proxy=proxy) as env:
            port, admin_port = env.ports.proxy, env.ports.admin
            assert await status_of(port, SVC, basic("alice", "pw-a")) == 200
            doc, metrics = await admin(admin_port)
            key = "proxy.auth.basic_file"
            assert doc["files"][key]["failures"] == 0 and doc["files"][key]["last_error"] is None
            assert value(metrics, "kins_tunnel_reload_failures_total", file=key) == 0
            assert value(metrics, "kins_tunnel_reload_failing", file=key) == 0

            # a new user, and a line with no ':' (a password pasted on its own line)
            replace(users, f"alice:pw-a\ncarol:pw-c\n{SECRET}\n")
            # no CONNECT needed: the cloud checks the file on its own every second
            await wait_until(
                lambda: env.cloud.auth is not None and env.cloud.auth.files[0].failures == 1,
                10,
                "the failed re-read counted",
            )
            _, raw_status = await http_get(admin_port, "/status")
            doc, metrics = await admin(admin_port)
            entry = doc["files"][key]
            assert entry["path"] == str(users) and entry["failing"] is True
            assert entry["last_error"] == "line 3: no ':' (a line is user:password; not shown)"
            assert value(metrics, "kins_tunnel_reload_failures_total", file=key) == 1
            assert SECRET.encode() not in raw_status
            assert value(metrics, "kins_tunnel_reload_failing", file=key) == 1
            # the previous contents stay: alice passes, carol (of the refused version) does not
            assert await status_of(port, SVC, basic("alice", "pw-a")) == 200
            assert await status_of(port, SVC, basic("carol", "pw-c")) == 407
            assert env.cloud.auth is not None and env.cloud.auth.files[0].failures == 1

            replace(users, "alice:pw-a\ncarol:pw-c\n")  # fixed
            await wait_until(
                lambda: not env.cloud.auth.files[0].failing,  # type: ignore[union-attr]
                10,
                "the fixed file applied",
            )
            assert await status_of(port, SVC, basic("carol", "pw-c")) == 200
            doc, metrics = await admin(admin_port)
            assert doc["files"][key]["reloads"] == 1 and doc["files"][key]["failures"] == 1
            assert value(metrics, "kins_tunnel_reload_failures_total", file=key) == 1
            assert value(metrics, "kins_tunnel_reload_failing", file=key) == 0
        n.cancel_scope.cancel()
    warnings = [
        json.loads(line) for line in log.getvalue().splitlines() if "line 3: no ':'" in line
    ]
    assert warnings and all(w["level"] == "warning" for w in warnings)
    assert SECRET not in log.getvalue() and "pw-a" not in log.getvalue()


async def test_a_revocation_list_with_a_bad_line_still_cuts_the_dotted_edge_off(
    tmp_path: Path,
) -> None:
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("# nobody yet\n")
    node, other = "edge1.site-a", "edge2"
    make_certs(tmp_path, (("test", node), ("test", other)))
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        async with tunnel_env(tmp_path, tunnel={"revoked_file": str(revoked)}) as env:
            await env.add_edge({f"{node}:7000": f"127.0.0.1:{echo}"}, node=node)
            await env.add_edge({f"{other}:7000": f"127.0.0.1:{echo}"}, node=other)
            await wait_routed(env.cloud, f"{node}:7000")
            await wait_routed(env.cloud, f"{other}:7000")
            status, _, s = await connect(env.ports.proxy, f"{node}:7000")
            assert status == 200
            async with s:
                await echo_roundtrip(s, b"before")
                replace(revoked, f"test/{node}\nthis is not an entry\n")
                with trio.fail_after(10):  # the live stream of the revoked edge ends
                    try:
                        while await s.receive_some(100):
                            pass
                    except trio.BrokenResourceError:
                        pass
            assert {t.identity.node for t in env.cloud.registry} == {other}
            assert await status_of(env.ports.proxy, f"{node}:7000") == 503
            assert await status_of(env.ports.proxy, f"{other}:7000") == 200
            doc, metrics = await admin(env.ports.admin)
            for entry in (doc["files"]["tunnel.revoked_file"], doc["revoked_file"]):
                assert entry["failures"] == 1 and entry["failing"] is True
                assert entry["last_error"] == (
                    "line 2: 'this is not an entry' is neither a hex certificate serial nor "
                    "<unit>/<node> nor client:<name>"
                )
            assert (
                value(metrics, "kins_tunnel_reload_failures_total", file="tunnel.revoked_file") == 1
            )
            assert value(metrics, "kins_tunnel_revoked_tunnels_closed_total") >= 1
            await trio.sleep(1.5)  # the edge keeps trying: still refused
            assert {t.identity.node for t in env.cloud.registry} == {other}
        n.cancel_scope.cancel()


@pytest.mark.parametrize(
    "key, name, text, message",
    [
        ("proxy.auth.basic_file", "users", f"alice:pw\n{SECRET}\n", "line 2: no ':'"),
        ("proxy.auth.bearer_file", "tokens", f"deploy:{SECRET}\nci:\n", "line 2: empty token"),
        ("tunnel.revoked_file", "revoked", "test/edge1.site-a\nnot one\n", "line 2: 'not one'"),
        (
            "proxy.authz_file",
            "authz.yaml",
            "rules:\n  - principals: [alice]\n    allow: ['node:edge1.site-a']\n",
            "line 3: rules[0].allow[0]: 'node:edge1.site-a' is not",
        ),
    ],
)
async def test_a_bad_line_refuses_start_up(
    tmp_path: Path, key: str, name: str, text: str, message: str
) -> None:
    certs = make_certs(tmp_path)
    path = tmp_path / name
    path.write_text(text)
    over: dict[str, Any] = {"proxy": {"auth": {"basic_file": str(tmp_path / "ok-users")}}}
    (tmp_path / "ok-users").write_text("alice:pw\n")
    section, _, leaf = key.rpartition(".")
    if section == "proxy.auth":
        over["proxy"]["auth"] = {leaf: str(path)}
    elif section == "proxy":
        over["proxy"][leaf] = str(path)
    else:
        over[section] = {leaf: str(path)}
    config = write_yaml(tmp_path / "cloud.yaml", cloud_dict(certs, **over))
    proc = await run_kins_tunnel("cloud", "--config", str(config))
    stderr = proc.stderr.decode()
    assert proc.returncode == 2, stderr
    assert f"kins-tunnel: error: {key}: {path}: {message}" in stderr
    assert SECRET not in stderr and len(stderr.strip().splitlines()) == 1
