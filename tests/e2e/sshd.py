"""A throw-away OpenSSH server on 127.0.0.1 for tests that put a real sshd behind an edge.

Own host key and user key in a temp dir, public-key login only, `sshd -D -e` killed on exit. The
`ssh_options` are what a client needs to log in without asking anything (no known_hosts prompt, no
agent, no user config).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from kins_tunnel.testing.support import free_port, wait_listening

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
HAVE_SSH = (
    SSHD is not None and shutil.which("ssh") is not None and shutil.which("ssh-keygen") is not None
)
USER = os.environ.get("USER") or "root"


@dataclass
class Sshd:
    dir: Path
    port: int
    popen: subprocess.Popen[bytes]

    def ssh_options(self) -> list[str]:
        return [
            "-F",
            "/dev/null",
            "-i",
            str(self.dir / "user"),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            f"UserKnownHostsFile={self.dir / 'known_hosts'}",
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
    d.mkdir()
    for key in ("host", "user"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)],
            check=True,
            stdin=subprocess.DEVNULL,
        )
    (d / "authorized_keys").write_text((d / "user.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    Path("/run/sshd").mkdir(exist_ok=True)
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nUsePAM no\nStrictModes no\nPermitRootLogin yes\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUseDNS no\nSubsystem sftp internal-sftp\n"
    )
    with open(d / "sshd.log", "wb") as log:
        popen = subprocess.Popen(
            [SSHD or "sshd", "-D", "-e", "-f", str(d / "sshd_config")],
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
