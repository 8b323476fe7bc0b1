"""The command line as users script it: one clear line and exit 2 for user errors; the demo."""

from __future__ import annotations

import functools
import hashlib
import os
import shlex
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import yaml

from kins_tunnel.cli import main as cli_main
from kins_tunnel.demo import SAMPLE_BYTES, run_demo
from kins_tunnel.testing.support import kins_tunnel_cli
from tests.clients import needs_curl, needs_kubectl


def kt(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return kins_tunnel_cli(*args, timeout=timeout)


def test_certs_commands_write_keys_0600(tmp_path: Path) -> None:
    r = kt("certs", "init", "--dir", str(tmp_path), "--cloud-san", "tunnel-cloud.kube-system")
    assert r.returncode == 0, r.stderr
    r = kt("certs", "edge", "--dir", str(tmp_path), "--unit", "test", "--node", "edge1")
    assert r.returncode == 0, r.stderr
    for key in ("ca.key", "cloud.key", "edge-edge1.key"):
        assert stat.S_IMODE(os.stat(tmp_path / key).st_mode) == 0o600
    r = kt("certs", "edge", "--dir", str(tmp_path), "--unit", "Bad_Unit", "--node", "edge1")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_missing_config_is_one_line(tmp_path: Path) -> None:
    r = kt("cloud", "--config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2
    assert r.stderr.startswith("kins-tunnel: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "nope.yaml" in r.stderr


def test_unknown_key_names_the_key(tmp_path: Path) -> None:
    kt("certs", "init", "--dir", str(tmp_path / "certs"))
    cfg = tmp_path / "cloud.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "proxy": {"lsiten": "127.0.0.1:0"},
                "tls": {"ca": "certs/ca.crt", "cert": "certs/cloud.crt", "key": "certs/cloud.key"},
            }
        )
    )
    r = kt("cloud", "--config", str(cfg))
    assert r.returncode == 2 and "proxy.lsiten" in r.stderr and "Traceback" not in r.stderr


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    kt("certs", "init", "--dir", str(tmp_path / "certs"))
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        cfg = tmp_path / "cloud.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "tunnel": {"listen": "127.0.0.1:0"},
                    "admin": {"listen": "127.0.0.1:0"},
                    "proxy": {"listen": f"127.0.0.1:{busy.getsockname()[1]}"},
                    "tls": {
                        "ca": "certs/ca.crt",
                        "cert": "certs/cloud.crt",
                        "key": "certs/cloud.key",
                    },
                }
            )
        )
        r = kt("cloud", "--config", str(cfg))
    finally:
        busy.close()
    assert r.returncode == 2
    assert "proxy.listen" in r.stderr and "Traceback" not in r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("kins-tunnel: error:")], r.stderr


def test_unreadable_certificate_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "cloud": ["127.0.0.1:9"],
                "services": {"edge1:22": "127.0.0.1:22"},
                "tls": {"ca": "ca.crt", "cert": "edge.crt", "key": "edge.key"},
            }
        )
    )
    r = kt("edge", "--config", str(cfg))
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_demo_without_the_standin_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The image leaves out kins_tunnel.testing: `demo` says so in one line (exit 2), and the check
    is for that package, not for any ImportError."""
    monkeypatch.setitem(sys.modules, "kins_tunnel.testing", None)  # as if not installed
    assert cli_main(["demo", "--proxy-port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kins-tunnel: error: the demo needs kins_tunnel.testing")
    assert err.count("\n") == 1


@needs_kubectl
async def test_demo_serves_kubectl(tmp_path: Path) -> None:
    async with trio.open_nursery() as n:
        kubeconfig = await n.start(functools.partial(run_demo, tmp_path, 0, quiet=True))
        env = {**os.environ, "HOME": str(tmp_path)}
        with trio.fail_after(30):
            r = await trio.run_process(
                ["kubectl", "--kubeconfig", str(kubeconfig), "get", "pods"],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=env,
            )
        assert r.returncode == 0, r.stderr
        assert b"test-server-kins" in r.stdout
        n.cancel_scope.cancel()


@needs_kubectl
@needs_curl
async def test_demo_examples_work_as_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every non-interactive command the demo prints (get, exec, cp in and out, curl) succeeds."""
    async with trio.open_nursery() as n:
        await n.start(functools.partial(run_demo, tmp_path, 0))
        printed = capsys.readouterr().out
        commands = [
            line.strip()
            for line in printed.splitlines()
            if line.startswith(("  kubectl ", "  curl "))
        ]
        interactive = [
            c for c in commands if any(w in c.split() for w in ("--watch", "-it", "port-forward"))
        ]
        assert len(interactive) == 3 and len(commands) >= 8, printed
        env = {**os.environ, "HOME": str(tmp_path)}
        outputs = []
        for command in commands:
            if command in interactive:
                continue
            with trio.fail_after(60):
                r = await trio.run_process(
                    shlex.split(command),
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                    env=env,
                )
            assert r.returncode == 0, (command, r.stderr)
            outputs.append(r.stdout)
        n.cancel_scope.cancel()
    sample = (tmp_path / "upgrade.bin").read_bytes()
    assert len(sample) == SAMPLE_BYTES
    assert b"hello from the edge\n" in outputs
    assert f"{hashlib.sha256(sample).hexdigest()}  /tmp/upgrade.bin\n".encode() in outputs
    assert (tmp_path / "back.bin").read_bytes() == sample
