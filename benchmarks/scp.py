"""scp throughput to a throw-away sshd: direct, and through the tunnel with `kins-tunnel connect`.

    python -m benchmarks.scp [--size-mib 1024] [--rounds 3] [--json PATH] [--keep-logs]

One run starts a throw-away sshd, a `kins-tunnel cloud` (CONNECT proxy with Basic auth) and a
`kins-tunnel edge` serving `edge1:22` → that sshd, all on 127.0.0.1. Each round copies the same
file with scp once per path, the paths alternating (the first one rotates each round):

- direct: ``scp -P <sshd port> FILE root@127.0.0.1:...``
- tunnel: ``scp -o ProxyCommand='python -m kins_tunnel connect %h:%p --proxy http://127.0.0.1:<proxy>
  --proxy-user bench' -P 22 FILE root@edge1:...``

Every copy is checked: sha256 of the file here against ``sha256sum`` run by the sshd side (over
the same path). MB/s = 10^6 bytes per second of the scp process's wall time (login included).
The table shows each round and the median.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import hashlib
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.procs import CLK_TCK, REPO, Cleanup, cpu_seconds, tail, tree, wait_port
from kins_tunnel.testing.sshd import SSHD, ssh_client_options, write_sshd_files
from kins_tunnel.testing.support import free_port

PASSWORD = "bench-password"
MiB = 1 << 20


def _cpu(pid: int) -> tuple[str, float] | None:
    """(command name, user+sys CPU seconds) of one process, None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    fields = text.rsplit(")", 1)[1].split()
    return comm, (int(fields[11]) + int(fields[12])) / CLK_TCK


def _role(comm: str) -> str:
    if comm.startswith("python"):
        return "kins-tunnel connect"
    return {"scp": "scp", "ssh": "ssh client"}.get(comm, "other")


def timed_scp(
    argv: list[str], env: dict[str, str], sshd_pid: int, daemons: dict[str, int]
) -> tuple[float, dict[str, float]]:
    """Run scp; wall seconds and CPU seconds by role. Short-lived processes (scp, ssh, the connect
    command, sshd's session processes) are sampled every 0.1 s, so each misses at most its last
    0.1 s; the cloud and edge are measured before and after."""
    before = {name: cpu_seconds([pid]) for name, pid in daemons.items()}
    listener = _cpu(sshd_pid)
    seen: dict[int, tuple[str, float]] = {}
    t0 = time.monotonic()
    p = subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    while p.poll() is None:
        sshd_side = set(tree([sshd_pid])) - {sshd_pid}
        for pid in tree([p.pid]) + sorted(sshd_side):
            got = _cpu(pid)
            if got is not None:
                seen[pid] = ("sshd session" if pid in sshd_side else _role(got[0]), got[1])
        time.sleep(0.1)
    seconds = time.monotonic() - t0
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    if p.stderr:
        p.stderr.close()
    if p.returncode != 0:
        raise SystemExit(f"scp failed: {err.strip()}")
    cpu: dict[str, float] = {}
    for role, value in seen.values():
        cpu[role] = cpu.get(role, 0.0) + value
    after_listener = _cpu(sshd_pid)
    if listener and after_listener:
        cpu["sshd session"] = cpu.get("sshd session", 0.0) + after_listener[1] - listener[1]
    for name, pid in daemons.items():
        cpu[name] = cpu_seconds([pid]) - before[name]
    return seconds, cpu


def start_sshd(cleanup: Cleanup) -> tuple[Path, int, int]:
    d = cleanup.tempdir("scp-sshd")
    port = free_port()
    config = write_sshd_files(d, port, ["Subsystem sftp internal-sftp"])
    sshd = cleanup.spawn("sshd", [SSHD, "-D", "-e", "-f", str(config)], d / "sshd.log")
    if not wait_port(port, 10.0, sshd):
        raise SystemExit(f"sshd did not listen: {tail(d / 'sshd.log')}")
    return d, port, sshd.pid


def start_tunnel(cleanup: Cleanup, sshd_port: int) -> int:
    """cloud + edge processes; returns the CONNECT proxy port once `edge1:22` answers with sshd's banner."""
    d = cleanup.tempdir("scp-tunnel")
    kins = [sys.executable, "-m", "kins_tunnel"]
    certs = d / "certs"
    subprocess.run([*kins, "certs", "init", "--dir", str(certs)], check=True, capture_output=True)
    subprocess.run(
        [*kins, "certs", "edge", "--dir", str(certs), "--unit", "bench", "--node", "edge1"],
        check=True,
        capture_output=True,
    )
    (d / "users").write_text(f"bench:{PASSWORD}\n")
    tunnel, proxy, admin = free_port(), free_port(), free_port()
    tls = {"ca": str(certs / "ca.crt")}
    (d / "cloud.yaml").write_text(
        json.dumps(
            {
                "tunnel": {"listen": f"127.0.0.1:{tunnel}"},
                "proxy": {"listen": f"127.0.0.1:{proxy}", "auth": {"basic_file": str(d / "users")}},
                "admin": {"listen": f"127.0.0.1:{admin}"},
                "tls": {**tls, "cert": str(certs / "cloud.crt"), "key": str(certs / "cloud.key")},
            }
        )
    )
    (d / "edge.yaml").write_text(
        json.dumps(
            {
                "cloud": [f"127.0.0.1:{tunnel}"],
                "tls": {
                    **tls,
                    "cert": str(certs / "edge-edge1.crt"),
                    "key": str(certs / "edge-edge1.key"),
                },
                "services": {"edge1:22": f"127.0.0.1:{sshd_port}"},
                "admin": None,
            }
        )
    )
    cleanup.spawn("cloud", [*kins, "cloud", "--config", str(d / "cloud.yaml")], d / "cloud.log")
    cleanup.spawn("edge", [*kins, "edge", "--config", str(d / "edge.yaml")], d / "edge.log")
    auth = "Basic " + base64.b64encode(f"bench:{PASSWORD}".encode()).decode()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", proxy), timeout=2) as s:
                s.sendall(
                    f"CONNECT edge1:22 HTTP/1.1\r\nHost: edge1:22\r\nProxy-Authorization: {auth}\r\n\r\n".encode()
                )
                got = b""
                while b"SSH-" not in got and len(got) < 4096:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    got += chunk
                if got.startswith(b"HTTP/1.1 200 ") and b"SSH-" in got:
                    return proxy
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the tunnel did not come up: {tail(d / 'cloud.log')} {tail(d / 'edge.log')}")


def ssh_options(sshd_dir: Path) -> list[str]:
    return [*ssh_client_options(sshd_dir), "-o", "LogLevel=ERROR"]


def make_file(path: Path, size: int) -> str:
    h = hashlib.sha256()
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for i in range(0, size, MiB):
            chunk = (hashlib.sha256(i.to_bytes(8, "big")).digest() + block[32:])[: size - i]
            h.update(chunk)
            f.write(chunk)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.scp", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "scp.json"))
    ap.add_argument("--keep-logs", action="store_true")
    args = ap.parse_args(argv)
    size = args.size_mib * MiB
    cleanup = Cleanup(keep_dirs=args.keep_logs)
    try:
        sshd_dir, sshd_port, sshd_pid = start_sshd(cleanup)
        proxy = start_tunnel(cleanup, sshd_port)
        daemons = {name: proc.pid for name, proc in cleanup.procs if name in ("cloud", "edge")}
        work = cleanup.tempdir("scp-data")
        src, dst = work / "src.bin", work / "dst.bin"
        print(f"writing {args.size_mib} MiB test file ...", flush=True)
        digest = make_file(src, size)
        opts = ssh_options(sshd_dir)
        connect = shlex.join(
            [
                sys.executable,
                "-m",
                "kins_tunnel",
                "connect",
                "%h:%p",
                "--proxy",
                f"http://127.0.0.1:{proxy}",
                "--proxy-user",
                "bench",
            ]
        )
        paths = {
            "direct": (
                opts + ["-P", str(sshd_port)],
                opts + ["-p", str(sshd_port), "root@127.0.0.1"],
                "root@127.0.0.1",
            ),
            "tunnel": (
                opts + ["-o", f"ProxyCommand={connect}", "-P", "22"],
                opts + ["-o", f"ProxyCommand={connect}", "-p", "22", "root@edge1"],
                "root@edge1",
            ),
        }
        env = {
            **os.environ,
            "KINS_TUNNEL_PROXY_PASSWORD": PASSWORD,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        names = list(paths)
        results: dict[str, list[float]] = {n: [] for n in names}
        cpus: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                scp_opts, ssh_argv, host = paths[name]
                dst.unlink(missing_ok=True)
                seconds, cpu = timed_scp(
                    ["scp", *scp_opts, str(src), f"{host}:{dst}"],
                    env,
                    sshd_pid,
                    daemons if name == "tunnel" else {},
                )
                cpus[name].append({k: v / (size / 1024**3) for k, v in cpu.items()})
                check = subprocess.run(
                    ["ssh", *ssh_argv, f"sha256sum {dst}"],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                    cwd=REPO,
                    stdin=subprocess.DEVNULL,
                )
                remote = (check.stdout.split() or ["?"])[0]
                if remote != digest:
                    raise SystemExit(
                        f"checksum mismatch ({name}): sent {digest}, sshd side has {remote} {check.stderr}"
                    )
                results[name].append(size / 1e6 / seconds)
                print(
                    f"round {r + 1} {name:6s}: {size / 1e6 / seconds:7.1f} MB/s ({seconds:.2f} s, sha256 ok)",
                    flush=True,
                )
        medians = {n: statistics.median(v) for n, v in results.items()}
        print(f"\nscp of {args.size_mib} MiB, median of {args.rounds} (MB/s = 10^6 B/s):")
        print(
            "| path | " + " | ".join(f"round {i + 1}" for i in range(args.rounds)) + " | median |"
        )
        print("|---|" + "---|" * (args.rounds + 1))
        for n in names:
            print(
                f"| {n} | " + " | ".join(f"{v:.1f}" for v in results[n]) + f" | {medians[n]:.1f} |"
            )
        print(f"tunnel/direct: {medians['tunnel'] / medians['direct']:.2f}")
        roles = ["scp", "ssh client", "kins-tunnel connect", "cloud", "edge", "sshd session"]
        cpu_medians = {
            n: {r: statistics.median(c.get(r, 0.0) for c in cpus[n]) for r in roles} for n in names
        }
        print("\nCPU seconds per GiB (median over rounds):")
        print("| path | " + " | ".join(roles) + " | total |")
        print("|---|" + "---|" * (len(roles) + 1))
        for n in names:
            row = cpu_medians[n]
            print(
                f"| {n} | "
                + " | ".join(f"{row[r]:.2f}" if row[r] else "—" for r in roles)
                + f" | {sum(row.values()):.2f} |"
            )
        doc: dict[str, Any] = {
            "when": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "size_bytes": size,
            "rounds": args.rounds,
            "mb_per_s": results,
            "median_mb_per_s": medians,
            "cpu_seconds_per_gib": cpus,
            "median_cpu_seconds_per_gib": cpu_medians,
            "ssh": subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "loadavg": os.getloadavg(),
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"raw results: {args.json}")
    finally:
        cleanup.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
