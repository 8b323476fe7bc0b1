"""Process plumbing for the harness: spawning servers, process trees, CPU/RSS accounting, cleanup."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

PAGE = os.sysconf("SC_PAGE_SIZE")


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree(roots: Iterable[int], exclude: Iterable[int] = ()) -> list[int]:
    """The roots and all their live descendants (sshd forks a session process per login),
    leaving out the subtrees of ``exclude``."""
    kids = _children_map()
    out: list[int] = []
    skip = set(exclude)
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in out or pid in skip:
            continue
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _stat_fields(roots: Iterable[int], exclude: Iterable[int]) -> Iterator[list[str]]:
    """The fields of /proc/PID/stat after the command name, for each live process of the trees
    (so fields[0] is the state, stat field 3)."""
    for pid in tree(roots, exclude):
        try:
            with open(f"/proc/{pid}/stat") as f:
                yield f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue


def cpu_seconds(roots: Iterable[int], exclude: Iterable[int] = ()) -> float:
    """user+sys CPU seconds of the live process trees under ``roots``."""
    # utime and stime are stat fields 14 and 15
    ticks = sum(int(f[11]) + int(f[12]) for f in _stat_fields(roots, exclude))
    return ticks / CLK_TCK


def minor_faults(roots: Iterable[int], exclude: Iterable[int] = ()) -> int:
    """Minor page faults so far of the live process trees under ``roots`` (heap growth and
    shrinking show here: a process that maps fresh memory per batch faults per batch)."""
    return sum(int(f[7]) for f in _stat_fields(roots, exclude))  # minflt, stat field 10


def rss_mib(roots: Iterable[int], exclude: Iterable[int] = ()) -> float:
    total = 0
    for pid in tree(roots, exclude):
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except OSError:
            continue
    return total / (1 << 20)


def tail(log: Path, lines: int = 8) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


def rss_breakdown(roots: Iterable[int], exclude: Iterable[int] = ()) -> list[dict[str, object]]:
    """Per-process RSS (MiB) and command line of the trees under ``roots``."""
    out: list[dict[str, object]] = []
    for pid in tree(roots, exclude):
        try:
            with open(f"/proc/{pid}/statm") as f:
                rss = int(f.read().split()[1]) * PAGE / (1 << 20)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
        except OSError:
            continue
        out.append({"pid": pid, "rss_MiB": round(rss, 1), "cmd": cmd})
    return out


class Cleanup:
    """Owns every server process and temp dir the harness creates; ``close`` tears all down."""

    def __init__(self, keep_dirs: bool = False) -> None:
        self.keep_dirs = keep_dirs
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.dirs: list[Path] = []
        self.logs: list[object] = []

    def tempdir(self, prefix: str) -> Path:
        d = Path(tempfile.mkdtemp(prefix=f"kins-bench-{prefix}-"))
        self.dirs.append(d)
        return d

    def spawn(
        self,
        name: str,
        argv: list[str],
        log: Path,
        *,
        stdout_pipe: bool = False,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a server in its own session (so its whole group can be killed), logging to ``log``."""
        logf = open(log, "ab")
        self.logs.append(logf)
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else logf,
            stderr=logf,
            cwd=cwd or REPO,
            env=env,
            start_new_session=True,
        )
        self.procs.append((name, proc))
        return proc

    def spawn_ready(
        self, name: str, argv: list[str], log: Path, timeout: float = 15.0
    ) -> tuple[subprocess.Popen[bytes], int]:
        """Start one of our own servers that prints ``READY <port>`` and return it with the port."""
        proc = self.spawn(name, argv, log, stdout_pipe=True)
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        line = b""
        while b"\n" not in line:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise RuntimeError(f"{name} did not start within {timeout:.0f} s; see {log}")
            chunk = os.read(fd, 256)
            if not chunk:
                raise RuntimeError(f"{name} exited during start-up: {tail(log)}")
            line += chunk
        text = line.split(b"\n", 1)[0].decode(errors="replace").strip()
        if not text.startswith("READY "):
            raise RuntimeError(f"{name} did not start ({text!r}): {tail(log)}")
        return proc, int(text.split()[1])

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
        if proc.poll() is not None:
            return
        # Let children whose clients are already gone (sshd sessions) exit and be reaped first.
        settle = time.monotonic() + 1.0
        while len(tree([proc.pid])) > 1 and time.monotonic() < settle:
            time.sleep(0.05)
        victims = tree([proc.pid])
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        for pid in victims:  # descendants that left the group (sshd session processes do)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        for pid in victims:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)

    def close(self) -> None:
        # Reverse order: clients of a server (ssh, edge) go before the server (sshd, cloud).
        for _name, proc in reversed(self.procs):
            try:
                self.stop(proc)
            except Exception as exc:  # keep tearing down the rest
                print(f"warning: stopping {_name}: {exc}", file=sys.stderr)
            if proc.stdout is not None:  # the READY pipe of spawn_ready
                proc.stdout.close()
        self.procs.clear()
        for f in self.logs:
            with contextlib.suppress(Exception):
                f.close()  # type: ignore[attr-defined]
        self.logs.clear()
        if self.keep_dirs and self.dirs:
            print(
                "kept (logs, configs, keys): " + " ".join(str(d) for d in self.dirs),
                file=sys.stderr,
            )
        else:
            for d in self.dirs:
                shutil.rmtree(d, ignore_errors=True)
        self.dirs.clear()
