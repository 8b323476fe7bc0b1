"""The three paths to the same targets: direct TCP, OpenSSH ``ssh -R``, and kins_tunnel.

Each path exposes, per target kind (sink/source/echo), an *endpoint* the measuring client uses:
``{"addr": [host, port], "connect": "name:port" | None}`` (``connect`` set means "speak HTTP
CONNECT to addr first"). ``cost_roots`` are the pids whose process trees do the path's work.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.load import ProxyError, open_stream
from benchmarks.procs import REPO, Cleanup, tail, tree, wait_port
from kins_tunnel.testing.sshd import SSHD, ssh_client_options, write_sshd_files
from kins_tunnel.testing.support import free_port

KINDS = ("sink", "source", "echo")


class PathUnavailable(Exception):
    """The path cannot be set up here; the harness reports why and goes on without it."""


def endpoint(port: int, connect: str | None = None) -> dict[str, Any]:
    return {"addr": ["127.0.0.1", port], "connect": connect}


class Targets:
    """sink, source and echo servers, one process each."""

    def __init__(self, cleanup: Cleanup) -> None:
        self.ports: dict[str, int] = {}
        d = cleanup.tempdir("targets")
        for kind in KINDS:
            _, port = cleanup.spawn_ready(
                f"target-{kind}",
                [sys.executable, "-m", "benchmarks.targets", kind],
                d / f"{kind}.log",
            )
            self.ports[kind] = port


@dataclass(frozen=True)
class Link:
    """A link as `linkrelay` plays it: one-way delay, rate, and optionally the bottleneck queue
    and the relay's own socket buffers."""

    delay_ms: float
    rate_mbit: float
    queue_kib: int | None = None
    sock_kib: int | None = None


def start_relay(
    cleanup: Cleanup, name: str, upstream_port: int, delay_ms: float, rate_mbit: float
) -> int:
    return relay_proc(cleanup, name, upstream_port, Link(delay_ms, rate_mbit))[1]


def relay_proc(
    cleanup: Cleanup, name: str, upstream_port: int, link: Link
) -> tuple[subprocess.Popen[bytes], int]:
    """A `linkrelay` process playing `link` in front of `upstream_port`, and its port."""
    d = cleanup.tempdir(name)
    argv = [
        sys.executable,
        "-m",
        "kins_tunnel.testing.linkrelay",
        "--upstream",
        f"127.0.0.1:{upstream_port}",
        "--delay-ms",
        str(link.delay_ms),
        "--rate-mbit",
        str(link.rate_mbit),
    ]
    if link.queue_kib is not None:
        argv += ["--buffer-kib", str(link.queue_kib)]
    if link.sock_kib is not None:
        argv += ["--sock-buffer-kib", str(link.sock_kib)]
    return cleanup.spawn_ready(name, argv, d / "relay.log")


class Path_:
    name = "?"
    endpoints: dict[str, dict[str, Any]]
    cost_roots: list[int]
    # Subtrees under cost_roots that belong to the WAN variant, not to the path being costed.
    cost_exclude: set[int] = set()
    # The same roots, per side: {"server side": [pid], "client side": [pid]} (CPU and RSS per process).
    cost_parts: dict[str, list[int]] = {}
    info: dict[str, Any]

    def wan_endpoint(self, relay: tuple[float, float]) -> dict[str, Any]:
        raise PathUnavailable("no WAN variant")


class Direct(Path_):
    name = "direct"

    def __init__(self, cleanup: Cleanup, targets: Targets) -> None:
        self.cleanup = cleanup
        self.targets = targets
        self.endpoints = {k: endpoint(p) for k, p in targets.ports.items()}
        self.cost_roots = []
        self.info = {"description": "client connects to the target"}

    def wan_endpoint(self, relay: tuple[float, float]) -> dict[str, Any]:
        port = start_relay(self.cleanup, "relay-direct", self.targets.ports["source"], *relay)
        return endpoint(port)


class SshR(Path_):
    """A throw-away sshd on loopback plus one ``ssh -N -R ...`` client forwarding all three targets."""

    name = "ssh -R"

    def __init__(
        self,
        cleanup: Cleanup,
        targets: Targets,
        cipher: str | None,
        interactive: bool = False,
        name: str = "ssh -R",
    ) -> None:
        self.name = name
        if not os.access(SSHD, os.X_OK):
            raise PathUnavailable(f"{SSHD} not found (apt-get install openssh-server)")
        self.cleanup = cleanup
        self.targets = targets
        self.cipher = cipher
        self.interactive = interactive
        d = self.dir = cleanup.tempdir("sshd")
        self.port = free_port()
        cfg = write_sshd_files(
            d,
            self.port,
            [
                "AllowTcpForwarding yes",
                "GatewayPorts no",
                "X11Forwarding no",
                "LogLevel INFO",
            ],
        )
        self.sshd = cleanup.spawn("sshd", [SSHD, "-D", "-e", "-f", str(cfg)], d / "sshd.log")
        if not wait_port(self.port, 10.0, self.sshd):
            raise PathUnavailable(f"sshd did not listen: {tail(d / 'sshd.log')}")
        self.info = {
            "description": "one ssh -N client (the 'edge') with -R for sink, source and echo; "
            "the client connects to the forwarded ports on the sshd side",
            "ssh_version": subprocess.run(
                ["ssh", "-V"], capture_output=True, text=True
            ).stderr.strip(),
            "cipher_requested": cipher or "default",
            "client_mode": "ssh -tt ... sleep (interactive: TCP_NODELAY)"
            if interactive
            else "ssh -N",
        }
        self.info.update(self._probe_cipher())
        self.rports = {k: free_port() for k in KINDS}
        forwards = [f"127.0.0.1:{self.rports[k]}:127.0.0.1:{targets.ports[k]}" for k in KINDS]
        self.ssh = self._ssh_forward("ssh-R", self.port, forwards)
        self.endpoints = {k: endpoint(p) for k, p in self.rports.items()}
        self.cost_roots = [self.sshd.pid, self.ssh.pid]
        self.cost_parts = {"server side": [self.sshd.pid], "client side": [self.ssh.pid]}

    def _ssh_base(self, port: int) -> list[str]:
        argv = [
            "ssh",
            *ssh_client_options(self.dir),
            "-o",
            "ControlMaster=no",
            "-p",
            str(port),
        ]
        if self.cipher:
            argv += ["-c", self.cipher]
        return argv

    def _probe_cipher(self) -> dict[str, Any]:
        """One short login with -v to learn the negotiated cipher (the forwarding client runs quiet)."""
        r = subprocess.run(
            self._ssh_base(self.port) + ["-v", "root@127.0.0.1", "true"],
            capture_output=True,
            text=True,
            timeout=20,
            stdin=subprocess.DEVNULL,
        )
        out: dict[str, Any] = {}
        m = re.search(r"kex: server->client cipher: (\S+) MAC: (\S+)", r.stderr)
        if m:
            out["cipher_negotiated"] = m.group(1)
            out["mac"] = m.group(2)
        m = re.search(r"kex: algorithm: (\S+)", r.stderr)
        if m:
            out["kex"] = m.group(1)
        if r.returncode != 0:
            raise PathUnavailable(
                f"ssh login to the bench sshd failed (rc {r.returncode}): "
                + " | ".join(r.stderr.strip().splitlines()[-3:])
            )
        return out

    def _ssh_forward(self, name: str, port: int, forwards: list[str]) -> subprocess.Popen[bytes]:
        argv = self._ssh_base(port) + ["-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR"]
        for fw in forwards:
            argv += ["-R", fw]
        if self.interactive:
            # A TTY session makes ssh and sshd set TCP_NODELAY on the transport; the remote
            # sleep bounds its life even if the harness were killed with SIGKILL.
            argv += ["-tt", "root@127.0.0.1", "sleep", "86400"]
        else:
            argv += ["-N", "root@127.0.0.1"]
        log = self.dir / f"{name}.log"
        proc = self.cleanup.spawn(name, argv, log)
        for fw in forwards:
            rport = int(fw.split(":")[1])
            if not wait_port(rport, 20.0, proc):
                raise PathUnavailable(f"ssh -R {fw} did not come up: {tail(log)}")
        return proc

    def wan_endpoint(self, relay: tuple[float, float]) -> dict[str, Any]:
        rport = start_relay(self.cleanup, "relay-ssh", self.port, *relay)
        fport = free_port()
        before = set(tree(self.cost_roots))
        wan = self._ssh_forward(
            "ssh-R-wan", rport, [f"127.0.0.1:{fport}:127.0.0.1:{self.targets.ports['source']}"]
        )
        # sshd's session process(es) for the WAN login: not part of the main path's CPU/RSS.
        self.cost_exclude = (set(tree(self.cost_roots)) - before) | {wan.pid}
        return endpoint(fport)

    def wan_qos_endpoints(
        self, link: Link, ports: dict[str, int]
    ) -> tuple[dict[str, dict[str, Any]], list[subprocess.Popen[bytes]]]:
        """ssh -R through a shaped link to sshd, forwarding every target kind (`ports` override
        the shared targets'); the endpoints and the processes to stop afterwards."""
        relay, rport = relay_proc(self.cleanup, "relay-qos-ssh", self.port, link)
        to = {**self.targets.ports, **ports}
        fports = {k: free_port() for k in KINDS}
        wan = self._ssh_forward(
            "ssh-R-qos", rport, [f"127.0.0.1:{fports[k]}:127.0.0.1:{to[k]}" for k in KINDS]
        )
        return {k: endpoint(fports[k]) for k in KINDS}, [wan, relay]


UNIT = "bench"
NODE = "edge1"
SVC = f"{UNIT}-svc-kins.kins-system"
SVC_PORTS = {"sink": 9001, "source": 9002, "echo": 9003}


DEFAULT_KINS_CMD = [sys.executable, "-m", "kins_tunnel"]


def issue_certs(kins: list[str], where: Path) -> Path:
    """A CA, the cloud's certificate and edge NODE's (unit UNIT) in `where`, by the tunnel's CLI."""
    for argv in (
        ["certs", "init", "--dir", str(where)],
        ["certs", "edge", "--dir", str(where), "--unit", UNIT, "--node", NODE],
    ):
        r = subprocess.run([*kins, *argv], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            msg = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise PathUnavailable(f"`kins-tunnel {' '.join(argv[:2])}` failed: {msg}")
    return where


PY_RELAY = "py relay"
PY_RELAY_TRIO = "py relay (trio)"


class PyRelay(Path_):
    """The reference floor: two `benchmarks.pyrelay` processes, one TLS connection per stream."""

    name = PY_RELAY

    def __init__(self, cleanup: Cleanup, targets: Targets, loop: str = "epoll") -> None:
        self.name = PY_RELAY if loop == "epoll" else PY_RELAY_TRIO
        d = cleanup.tempdir("pyrelay")
        c = issue_certs(DEFAULT_KINS_CMD, d / "certs")
        back_ports = {k: free_port() for k in KINDS}
        front_ports = {k: free_port() for k in KINDS}
        tls = {
            "back": ["--cert", str(c / "cloud.crt"), "--key", str(c / "cloud.key")],
            "front": ["--cert", str(c / f"edge-{NODE}.crt"), "--key", str(c / f"edge-{NODE}.key")],
        }
        procs = {}
        for role, maps in (
            ("back", {k: (back_ports[k], targets.ports[k]) for k in KINDS}),
            ("front", {k: (front_ports[k], back_ports[k]) for k in KINDS}),
        ):
            argv = [sys.executable, "-m", "benchmarks.pyrelay", role, "--ca", str(c / "ca.crt")]
            argv += [*tls[role], "--loop", loop]
            for listen, to in maps.values():
                argv += ["--map", f"{listen}:{to}"]
            try:
                procs[role], _ = cleanup.spawn_ready(f"pyrelay-{role}", argv, d / f"{role}.log")
            except RuntimeError as exc:
                raise PathUnavailable(str(exc)) from exc
        self.endpoints = {k: endpoint(front_ports[k]) for k in KINDS}
        self.cost_roots = [procs["back"].pid, procs["front"].pid]
        self.cost_parts = {"server side": [procs["back"].pid], "client side": [procs["front"].pid]}
        self.info = {
            "description": "reference floor: the leanest Python TLS relay (benchmarks/pyrelay.py), "
            "two processes, one mutual-TLS connection per stream, no tunnel features, "
            + ("one epoll loop" if loop == "epoll" else "the same calls scheduled by trio"),
        }


def baseline_cmd(cleanup: Cleanup, ref: str) -> list[str]:
    """A command that runs the tunnel CLI of git revision `ref` of this repository (for an A/B
    of two revisions in one run): the package is exported from git into a temp dir."""
    d = cleanup.tempdir("baseline")
    try:
        archive = subprocess.run(
            ["git", "archive", ref, "kins_tunnel"],
            cwd=REPO,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(d)], input=archive, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise PathUnavailable(f"cannot export {ref}: {exc}") from exc
    boot = (
        f"import runpy, sys; sys.path.insert(0, {str(d)!r}); "
        "runpy.run_module('kins_tunnel', run_name='__main__', alter_sys=True)"
    )
    return [sys.executable, "-c", boot]


class Ours(Path_):
    """``kins-tunnel cloud`` + ``kins-tunnel edge`` on loopback; the client speaks CONNECT to the cloud."""

    name = "ours"

    def __init__(
        self, cleanup: Cleanup, targets: Targets, cmd: list[str] | None = None, name: str = "ours"
    ) -> None:
        self.name = name
        self.cleanup = cleanup
        self.targets = targets
        self.cmd = cmd or DEFAULT_KINS_CMD
        kins = self.kins
        try:
            r = subprocess.run(kins("--help"), capture_output=True, text=True, timeout=30)
        except OSError as exc:
            raise PathUnavailable(f"cannot run {' '.join(self.cmd)}: {exc}") from exc
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise PathUnavailable(f"`{' '.join(kins('--help'))}` failed ({last})")
        d = self.dir = cleanup.tempdir("ours")
        self.certs = issue_certs(self.cmd, d / "certs")
        self.cloud, self.proxy_port, self.admin_port, tunnel_port = self._start_cloud("cloud")
        self.edge = self._start_edge("edge", tunnel_port, KINDS)
        self.endpoints = {k: endpoint(self.proxy_port, f"{SVC}:{SVC_PORTS[k]}") for k in KINDS}
        self._wait_ready(self.cloud, self.edge, self.admin_port, self.endpoints["echo"])
        self.cost_roots = [self.cloud.pid, self.edge.pid]
        self.cost_parts = {"server side": [self.cloud.pid], "client side": [self.edge.pid]}
        self.info = {
            "description": "kins-tunnel cloud + edge (one mutual-TLS connection); "
            "client sends CONNECT to the cloud's proxy port",
            "command": " ".join(self.cmd),
        }

    def kins(self, *args: str) -> list[str]:
        return [*self.cmd, *args]

    def _start_cloud(self, name: str) -> tuple[subprocess.Popen[bytes], int, int, int]:
        tunnel_port, proxy_port, admin_port = free_port(), free_port(), free_port()
        c = self.certs
        cfg = self.dir / f"{name}.yaml"
        cfg.write_text(
            json.dumps(
                {
                    "tunnel": {"listen": f"127.0.0.1:{tunnel_port}"},
                    "proxy": {"listen": f"127.0.0.1:{proxy_port}"},
                    "admin": {"listen": f"127.0.0.1:{admin_port}"},
                    "tls": {
                        "ca": str(c / "ca.crt"),
                        "cert": str(c / "cloud.crt"),
                        "key": str(c / "cloud.key"),
                    },
                },
                indent=2,
            )
            + "\n"  # JSON is YAML
        )
        proc = self.cleanup.spawn(
            name, self.kins("cloud", "--config", str(cfg)), self.dir / f"{name}.log"
        )
        return proc, proxy_port, admin_port, tunnel_port

    def _start_edge(
        self,
        name: str,
        cloud_port: int,
        kinds: tuple[str, ...],
        ports: dict[str, int] | None = None,
    ) -> subprocess.Popen[bytes]:
        c = self.certs
        to = ports or self.targets.ports
        edge_admin = self.edge_admin = free_port()
        cfg = self.dir / f"{name}.yaml"
        cfg.write_text(
            json.dumps(
                {
                    "cloud": [f"127.0.0.1:{cloud_port}"],
                    "tls": {
                        "ca": str(c / "ca.crt"),
                        "cert": str(c / f"edge-{NODE}.crt"),
                        "key": str(c / f"edge-{NODE}.key"),
                    },
                    "services": {f"{SVC}:{SVC_PORTS[k]}": f"127.0.0.1:{to[k]}" for k in kinds},
                    # The edge has its own admin listener (default 127.0.0.1:9091); two edges run
                    # at once here (main and WAN), so give each a free port.
                    "admin": {"listen": f"127.0.0.1:{edge_admin}"},
                },
                indent=2,
            )
            + "\n"
        )
        return self.cleanup.spawn(
            name, self.kins("edge", "--config", str(cfg)), self.dir / f"{name}.log"
        )

    def _wait_ready(
        self,
        cloud: subprocess.Popen[bytes],
        edge: subprocess.Popen[bytes],
        admin_port: int,
        probe: dict[str, Any],
        timeout: float = 20.0,
    ) -> None:
        """Ready = cloud /readyz answers 200 AND a CONNECT through the tunnel reaches ``probe``."""
        deadline = time.monotonic() + timeout
        last = "nothing tried yet"
        while time.monotonic() < deadline:
            for proc, what in ((cloud, "cloud"), (edge, "edge")):
                if proc.poll() is not None:
                    raise PathUnavailable(
                        f"{what} exited with {proc.returncode}: {tail(self.dir / f'{what}.log')}"
                    )
            try:
                conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=2)
                conn.request("GET", "/readyz")
                status = conn.getresponse().status
                conn.close()
                if status != 200:
                    last = f"/readyz answered {status}"
                    raise OSError(last)
                sock = open_stream(probe, timeout=5)
                with sock:
                    sock.sendall(b"x" * 64)
                    got = b""
                    while len(got) < 64:
                        b = sock.recv(64 - len(got))
                        if not b:
                            raise OSError("echo closed")
                        got += b
                return
            except (OSError, ProxyError, http.client.HTTPException) as exc:
                last = f"{type(exc).__name__}: {exc}"
                time.sleep(0.2)
        raise PathUnavailable(f"tunnel not ready after {timeout:.0f} s ({last})")

    def wan_endpoint(self, relay: tuple[float, float]) -> dict[str, Any]:
        """A second cloud+edge pair whose edge reaches its cloud through the WAN relay."""
        cloud, proxy_port, admin_port, tunnel_port = self._start_cloud("cloud-wan")
        rport = start_relay(self.cleanup, "relay-ours", tunnel_port, *relay)
        edge = self._start_edge("edge-wan", rport, ("source",))
        ep = endpoint(proxy_port, f"{SVC}:{SVC_PORTS['source']}")
        # Readiness probe needs echo; the WAN edge only serves the source, so probe /readyz + a
        # zero-byte download instead.
        self._wait_ready_wan(cloud, edge, admin_port, ep)
        self.wan_roots = [cloud.pid, edge.pid]
        return ep

    def wan_qos_endpoints(
        self, link: Link, ports: dict[str, int]
    ) -> tuple[dict[str, dict[str, Any]], list[subprocess.Popen[bytes]]]:
        """Another cloud + edge pair, the edge through a shaped link, serving every target kind
        (`ports` override the shared targets'); the endpoints and the processes to stop."""
        cloud, proxy_port, admin_port, tunnel_port = self._start_cloud("cloud-qos")
        relay, rport = relay_proc(self.cleanup, "relay-qos-ours", tunnel_port, link)
        edge = self._start_edge("edge-qos", rport, KINDS, {**self.targets.ports, **ports})
        eps = {k: endpoint(proxy_port, f"{SVC}:{SVC_PORTS[k]}") for k in KINDS}
        self._wait_ready(cloud, edge, admin_port, eps["echo"], timeout=40)
        self.qos_admin = {"cloud": admin_port, "edge": self.edge_admin}
        return eps, [edge, relay, cloud]

    def _wait_ready_wan(
        self,
        cloud: subprocess.Popen[bytes],
        edge: subprocess.Popen[bytes],
        admin_port: int,
        ep: dict[str, Any],
    ) -> None:
        deadline = time.monotonic() + 30.0
        last = "nothing tried yet"
        while time.monotonic() < deadline:
            for proc, what in ((cloud, "cloud-wan"), (edge, "edge-wan")):
                if proc.poll() is not None:
                    raise PathUnavailable(
                        f"{what} exited with {proc.returncode}: {tail(self.dir / f'{what}.log')}"
                    )
            try:
                conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=2)
                conn.request("GET", "/readyz")
                status = conn.getresponse().status
                conn.close()
                if status != 200:
                    raise OSError(f"/readyz answered {status}")
                sock = open_stream(ep, timeout=5)
                with sock:
                    sock.sendall((0).to_bytes(8, "big"))
                    sock.recv(1)  # EOF: the source sent its zero bytes and half-closed
                return
            except (OSError, ProxyError, http.client.HTTPException) as exc:
                last = f"{type(exc).__name__}: {exc}"
                time.sleep(0.3)
        raise PathUnavailable(f"WAN tunnel not ready after 30 s ({last})")
