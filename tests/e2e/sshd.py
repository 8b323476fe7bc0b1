"""A throw-away OpenSSH server on 127.0.0.1 for tests that put a real sshd behind an edge.

Its files come from `kins_tunnel.testing.sshd` (own keys, public-key login only); `sshd -D -e` is
killed on exit. `ssh_options` are what a client needs to log in without asking anything.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from kins_tunnel.testing.sshd import SSHD, ssh_client_options, write_sshd_files
from kins_tunnel.testing.support import free_port, wait_listening

HAVE_SSH = (
    os.path.exists(SSHD)
    and shutil.which("ssh") is not None
    and shutil.which("ssh-keygen") is not None
)
USER = os.environ.get("USER") or "root"


@dataclass
class Sshd:
    dir: Path
    port: int
    popen: subprocess.Popen[bytes]

    def ssh_options(self) -> list[str]:
        return ssh_client_options(self.dir, str(self.dir / "known_hosts"))

    def ssh_argv(self, proxy_cmd: str, command: str, node: str = "edge1", *opts: str) -> list[str]:
        """`ssh` to `node` through `proxy_cmd` (a CONNECT ProxyCommand), running `command`."""
        return [
            "ssh",
            *self.ssh_options(),
            "-o",
            f"ProxyCommand={proxy_cmd}",
            *opts,
            "-p",
            "22",
            f"{USER}@{node}",
            command,
        ]

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(
                (self.dir / "sshd.log").read_text(errors="replace").splitlines()[-lines:]
            )
        except OSError:
            return "(no log)"


@contextlib.asynccontextmanager
async def throwaway_sshd(base: Path) -> AsyncIterator[Sshd]:
    d = base / "ssh"
    port = free_port()
    config = write_sshd_files(d, port, ["Subsystem sftp internal-sftp"])
    with open(d / "sshd.log", "wb") as log:
        popen = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    try:

        def alive() -> None:
            if popen.poll() is not None:
                raise AssertionError(
                    f"sshd exited ({popen.returncode}):\n{Sshd(d, port, popen).log_tail()}"
                )

        await wait_listening(port, 20, "sshd listening", alive)
        yield Sshd(d, port, popen)
    finally:
        popen.terminate()
        popen.wait(10)
