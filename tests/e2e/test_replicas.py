"""Three tunnel-cloud replicas behind haproxy, two tunnel-edge processes that keep a tunnel to every
replica, and what happens when one replica is SIGKILLed and comes back.

The shape is the Kubernetes one (see deploy/): a Service balancing CONNECTs over the replicas, with
readiness from /readyz, and edges that know every replica. Here haproxy plays the Service (mode tcp,
roundrobin, `option httpchk GET /readyz` on each admin port, `option redispatch`), all processes
are real (`python -m kins_tunnel cloud|edge`), everything on 127.0.0.1.

Failure bound during the kill: haproxy marks a replica down after 2 failed checks 200 ms apart
(<= ~0.6 s). Before that, a CONNECT it sends to the dead replica fails at TCP connect (the kernel
answers RST for a closed port at once), and `retries 2` + `option redispatch` sends the retry to
another replica, so no client sees a failure: the bound we assert is zero.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from kins_tunnel.testing.support import echo_roundtrip, free_port, http_get, wait_until
from tests.e2e.harness import (
    SVC,
    cloud_dict,
    connect,
    edge_dict,
    make_certs,
    serve_echo,
    spawn,
    write_yaml,
)

HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None
)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        HAPROXY is None, reason="haproxy is not installed (.ci/system-packages installs it)"
    ),
]
NAMES = ("r1", "r2", "r3")


async def try_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        return await http_get(port, path)
    except OSError:
        return 0, b""


async def status_nodes(admin: int) -> list[str]:
    code, body = await try_get(admin, "/status")
    return (
        sorted(e["node"] for e in json.loads(body)["edges"] if not e["draining"])
        if code == 200
        else []
    )


async def answers_200(admin: int) -> float:
    code, body = await http_get(admin, "/metrics")
    assert code == 200
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == "kins_tunnel_connect_answers_total" and s.labels.get("status") == "200":
                return s.value
    return 0.0


def haproxy_cfg(path: Path, front: int, clouds: dict[str, dict[str, int]], stats: Path) -> Path:
    servers = "\n".join(
        f"    server {name} 127.0.0.1:{p['proxy']} check port {p['admin']} inter 200ms fall 2 rise 1"
        for name, p in clouds.items()
    )
    path.write_text(f"""\
global
    maxconn 2000
    stats socket {stats} mode 600 level admin

defaults
    mode tcp
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    retries 2
    option redispatch

frontend connect_proxy
    bind 127.0.0.1:{front}
    default_backend tunnel_cloud

backend tunnel_cloud
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
{servers}
""")
    return path


def haproxy_states(stats: Path) -> dict[str, str]:
    """Server name -> UP/DOWN/..., from haproxy's stats socket."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        s.connect(str(stats))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    rows = [
        line.split(",") for line in data.decode().splitlines() if line and not line.startswith("#")
    ]
    return {r[1]: r[17].split(" ")[0] for r in rows if r[0] == "tunnel_cloud" and r[1] in NAMES}


@contextmanager
def processes() -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        yield procs
    finally:
        # edges first (so the clouds have nothing to drain), then haproxy and the clouds
        order = sorted(procs, key=lambda k: (not k.startswith("edge"), k))
        for key in order:
            p = procs[key]
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


async def connect_echo(port: int, data: bytes) -> bool:
    """One CONNECT through `port` and one echo round trip; True if all of it worked."""
    try:
        status, _head, s = await connect(port, SVC)
    except (OSError, trio.BrokenResourceError, trio.TooSlowError, ValueError):
        return False
    async with s:
        if status != 200:
            return False
        try:
            with trio.fail_after(5):
                await s.send_all(data)
                got = b""
                while len(got) < len(data):
                    chunk = await s.receive_some(65536)
                    if not chunk:
                        return False
                    got += chunk
                return got == data
        except (trio.BrokenResourceError, trio.TooSlowError):
            return False


async def test_replicas_behind_haproxy_survive_a_killed_replica(tmp_path: Path) -> None:
    assert HAPROXY is not None
    certs = make_certs(tmp_path, (("test", "edge1"), ("test", "edge2")))
    clouds = {
        name: {"tunnel": free_port(), "proxy": free_port(), "admin": free_port()} for name in NAMES
    }
    cloud_cfg: dict[str, Path] = {}
    for name, p in clouds.items():
        cloud_cfg[name] = write_yaml(
            tmp_path / f"cloud-{name}.yaml",
            cloud_dict(
                certs,
                replica=name,
                log={"json": True},
                tunnel={
                    "listen": f"127.0.0.1:{p['tunnel']}",
                    "ping_interval": 0.5,
                    "ping_timeout": 2.0,
                },
                proxy={"listen": f"127.0.0.1:{p['proxy']}"},
                admin={"listen": f"127.0.0.1:{p['admin']}"},
            ),
        )
    front = free_port()
    stats = tmp_path / "haproxy.sock"
    cfg = haproxy_cfg(tmp_path / "haproxy.cfg", front, clouds, stats)

    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        with processes() as procs:
            for name in NAMES:
                procs[name] = spawn("cloud", cloud_cfg[name], tmp_path / f"cloud-{name}.log")
            for node in ("edge1", "edge2"):
                edge_cfg = write_yaml(
                    tmp_path / f"{node}.yaml",
                    edge_dict(
                        certs,
                        [clouds[name]["tunnel"] for name in NAMES],
                        {SVC: f"127.0.0.1:{echo}"},
                        node,
                        admin={"listen": "127.0.0.1:0"},
                        ping_interval=0.5,
                        ping_timeout=2.0,
                        reconnect={"initial": 0.05, "max": 0.5},
                        log={"json": True},
                    ),
                )
                procs[node] = spawn("edge", edge_cfg, tmp_path / f"{node}.log")
            hap_log = open(tmp_path / "haproxy.log", "ab")
            try:
                procs["haproxy"] = subprocess.Popen(
                    [HAPROXY, "-f", str(cfg), "-db"], stdout=hap_log, stderr=subprocess.STDOUT
                )
            finally:
                hap_log.close()

            # Every replica holds a tunnel from both edges; haproxy sees every replica up.
            async def both_edges_on(name: str) -> bool:
                assert procs[name].poll() is None, (tmp_path / f"cloud-{name}.log").read_text()
                return await status_nodes(clouds[name]["admin"]) == ["edge1", "edge2"]

            def haproxy_all_up() -> bool:
                assert procs["haproxy"].poll() is None, (tmp_path / "haproxy.log").read_text()
                return stats.exists() and set(haproxy_states(stats).values()) == {"UP"}

            with trio.fail_after(20):
                for name in NAMES:
                    await wait_until(lambda: both_edges_on(name), 20, f"both edges on {name}")
                await wait_until(haproxy_all_up, 20, "haproxy sees every replica up")

            # Round robin: CONNECTs through haproxy land on, and succeed at, every replica.
            results = [await connect_echo(front, f"warm-up {i}".encode()) for i in range(9)]
            assert all(results)
            for name in NAMES:
                assert await answers_200(clouds[name]["admin"]) >= 1, name

            # A long-lived stream on a replica that survives.
            status, head, keep = await connect(clouds["r1"]["proxy"], SVC)
            assert status == 200, head
            async with keep:
                await echo_roundtrip(keep, b"before the kill")

                procs["r2"].kill()
                procs["r2"].wait()
                killed_at = time.monotonic()
                outcomes: list[bool] = []
                down_after: float | None = None
                # 3 s during and after the kill, and at least 20 CONNECTs however slow the machine
                while time.monotonic() - killed_at < 3.0 or len(outcomes) < 20:
                    outcomes.append(await connect_echo(front, b"during and after the kill"))
                    if down_after is None and haproxy_states(stats).get("r2") != "UP":
                        down_after = time.monotonic() - killed_at
                    await echo_roundtrip(keep, b"long-lived")
                    await trio.sleep(0.02)
                failures = outcomes.count(False)
                print(
                    f"replica kill: {len(outcomes)} CONNECTs through haproxy in {time.monotonic() - killed_at:.1f} s, {failures} failed; "
                    f"haproxy marked r2 down after {down_after}s"
                )
                assert failures == 0
                assert down_after is not None and down_after < 1.5
                # The edges noticed: the survivors still route, r2's tunnels are gone from them.
                for name in ("r1", "r3"):
                    assert await status_nodes(clouds[name]["admin"]) == ["edge1", "edge2"]

                # Bring r2 back on the same ports: the edges (backing off, max 0.5 s) reconnect.
                procs["r2"] = spawn("cloud", cloud_cfg["r2"], tmp_path / "cloud-r2.log")
                restarted_at = time.monotonic()
                await wait_until(lambda: both_edges_on("r2"), 15, "both edges back on r2")
                reconnect = time.monotonic() - restarted_at
                await wait_until(
                    lambda: haproxy_states(stats).get("r2") == "UP", 5, "haproxy sees r2 UP"
                )
                print(f"replica restart: both edges back on r2 {reconnect:.2f}s after the restart")
                assert reconnect < 10

                before = await answers_200(clouds["r2"]["admin"])
                assert all([await connect_echo(front, f"again {i}".encode()) for i in range(9)])
                assert await answers_200(clouds["r2"]["admin"]) >= before + 1
                await echo_roundtrip(keep, b"after the restart")

            # SIGTERM drains and exits cleanly: edges first, then the replicas.
            for key in ("edge1", "edge2", "r1", "r2", "r3"):
                procs[key].send_signal(signal.SIGTERM)
                await wait_until(lambda: procs[key].poll() is not None, 15, f"{key} exits")
                log = tmp_path / (f"{key}.log" if key.startswith("edge") else f"cloud-{key}.log")
                assert procs[key].returncode == 0, log.read_text()[-3000:]
        n.cancel_scope.cancel()

    # JSON logs: every line of the surviving replica is one JSON object; each CONNECT it relayed
    # produced one "CONNECT done" line naming unit, node, stream, target and outcome.
    docs = [json.loads(line) for line in (tmp_path / "cloud-r1.log").read_text().splitlines()]
    done = [d for d in docs if d.get("msg") == "CONNECT done"]
    assert done
    for d in done:
        assert d["unit"] == "test" and d["node"] in ("edge1", "edge2") and d["target"] == SVC
        assert isinstance(d["stream"], int) and d["outcome"]
