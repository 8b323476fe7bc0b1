"""A throw-away OpenSSH server's files, for tests and benchmarks that put a real sshd behind an
edge or beside the tunnel: host and user keys (ed25519, no passphrase), `authorized_keys` and an
`sshd_config` for 127.0.0.1 with public-key login only; and the options a client needs to log in
without asking anything (no known_hosts prompt, no agent, no user config). Starting and stopping
the server is the caller's (`sshd -D -e -f DIR/sshd_config`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"  # may not exist: callers check
HOST_KEY = "host_key"
USER_KEY = "user_key"


def write_sshd_files(d: Path, port: int, extra: Sequence[str] = ()) -> Path:
    """Keys, `authorized_keys` and `sshd_config` in directory `d` (created) for a server on
    127.0.0.1:`port`; `extra` config lines are appended. Returns the config's path."""
    d.mkdir(parents=True, exist_ok=True)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    for key in (HOST_KEY, USER_KEY):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key, "-f", str(d / key)],
            check=True,
            stdin=subprocess.DEVNULL,
        )
    authorized = d / "authorized_keys"
    authorized.write_bytes((d / f"{USER_KEY}.pub").read_bytes())
    os.chmod(authorized, 0o600)
    config = d / "sshd_config"
    lines = [
        f"ListenAddress 127.0.0.1:{port}",
        f"HostKey {d / HOST_KEY}",
        f"PidFile {d / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized}",
        "PermitRootLogin yes",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "UseDNS no",
        "PrintMotd no",
        *extra,
    ]
    config.write_text("\n".join(lines) + "\n")
    return config


def ssh_client_options(d: Path, known_hosts: str = "/dev/null") -> list[str]:
    """`ssh`/`scp` options to log in to the server of `write_sshd_files(d, ...)` unattended."""
    return [
        "-F",
        "/dev/null",
        "-i",
        str(d / USER_KEY),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        f"UserKnownHostsFile={known_hosts}",
    ]
