"""The commands the K3s API stand-in runs for `kubectl exec`, `attach` and `cp`: a fixed, small set
that touches nothing outside one sandbox directory.

This is a test double, not a container runtime. There is no shell and no subprocess: every
command is a Python function over the exec's standard streams and files under the sandbox.

| command | what it does |
| --- | --- |
| ``echo [-n] ARG...`` | prints its arguments |
| ``cat [FILE|-]...`` | copies files or stdin to stdout; with a TTY, the interactive line echo |
| ``sha256sum [FILE|-]...`` | ``<hex>  <name>`` per input, as coreutils prints it |
| ``test -d|-e|-f PATH`` | exit 0 or 1 (kubectl cp asks ``test -d DEST`` first) |
| ``tar cf - PATH...`` | a tar stream of files or directories (`kubectl cp POD:PATH local`) |
| ``tar [--no-same-*] xmf - [-C DIR]`` | extracts regular files and directories (`kubectl cp local POD:PATH`) |

Anything else exits 127 with a message on stderr. Paths are pod paths (``/tmp/x``): each pod has its
own directory under the sandbox root, with an empty ``/tmp``; ``..`` cannot climb out of it, the
sandbox never contains a link (tar refuses links and special files), and the bytes written to the
sandbox are capped (`Sandbox.max_bytes`).

Theory of operation: a command is ``async def (argv, io) -> exit code``; `CommandIO` is how it
reads stdin (``b""`` at the end) and writes stdout and stderr. `tar` runs Python's `tarfile` in a
worker thread; the thread reads stdin and writes stdout through small file objects that call back
into trio (`trio.from_thread.run`), so flow control of the exec's WebSocket reaches the tar stream.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import tarfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import trio

CHUNK = 256 * 1024  # read and write size for files and tar streams
DEFAULT_MAX_BYTES = 4 * 1024**3  # bytes a sandbox may receive in all (tar and nothing else writes)
NOT_FOUND = 127


class CommandIO(Protocol):
    """The standard streams of one exec."""

    async def read(self) -> bytes:
        """The next piece of stdin; ``b""`` once it has ended (or when the exec has no stdin)."""
        ...

    async def write(self, data: bytes) -> None:
        """Write to stdout."""
        ...

    async def write_err(self, data: bytes) -> None:
        """Write to stderr."""
        ...


class SandboxError(Exception):
    """A path or a write the sandbox does not allow; the message is what the command prints."""


class Sandbox:
    """Per-pod directories under `root`; maps pod paths into them and counts bytes written."""

    def __init__(self, root: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = root.resolve()
        self.max_bytes = max_bytes
        self.written = 0

    def pod_root(self, pod: str) -> Path:
        if not pod or "/" in pod or pod in (".", ".."):
            raise SandboxError(f"bad pod name {pod!r}")
        top = self.root / pod
        (top / "tmp").mkdir(parents=True, exist_ok=True)
        return top

    def path(self, pod: str, path: str, cwd: str = "/") -> Path:
        """The real path of pod path `path` (relative paths start at `cwd`), inside the sandbox."""
        if "\0" in path:
            raise SandboxError(f"{path!r}: bad path")
        clean = posixpath.normpath(posixpath.join("/", cwd, path))  # "/.." is "/", as on Linux
        top = self.pod_root(pod)
        real = (top / clean.lstrip("/")).resolve()
        if real != top and not real.is_relative_to(top):
            raise SandboxError(f"{path}: outside the sandbox")
        return real

    def charge(self, n: int) -> None:
        if self.written + n > self.max_bytes:
            raise SandboxError("No space left on device (the stand-in's sandbox is full)")
        self.written += n


Command = Callable[[Sandbox, str, list[str], CommandIO], Awaitable[int]]


async def run_command(sandbox: Sandbox, pod: str, argv: list[str], cio: CommandIO) -> int:
    """Run `argv` in `pod`'s sandbox; returns the exit code (127 for an unknown command)."""
    if not argv:
        await cio.write_err(b"stand-in: no command given\n")
        return NOT_FOUND
    command = COMMANDS.get(argv[0])
    if command is None:
        names = ", ".join(sorted(COMMANDS))
        await cio.write_err(
            f"stand-in: {argv[0]}: not available in the K3s API stand-in "
            f"(it runs only: {names})\n".encode()
        )
        return NOT_FOUND
    try:
        return await command(sandbox, pod, argv[1:], cio)
    except SandboxError as exc:
        await cio.write_err(f"{argv[0]}: {exc}\n".encode())
        return 1


async def _echo(sandbox: Sandbox, pod: str, args: list[str], cio: CommandIO) -> int:
    newline = True
    if args and args[0] == "-n":
        newline, args = False, args[1:]
    await cio.write((" ".join(args) + ("\n" if newline else "")).encode())
    return 0


async def _inputs(
    sandbox: Sandbox,
    pod: str,
    names: list[str],
    cio: CommandIO,
    tool: str,
    each: Callable[[str, bytes], Awaitable[None]],
    done: Callable[[str], Awaitable[None]],
) -> int:
    """Feed stdin ("-" or no names) or each named file to `each`, calling `done` after each input."""
    code = 0
    for name in names or ["-"]:
        if name == "-":
            while data := await cio.read():
                await each(name, data)
            await done(name)
            continue
        try:
            real = sandbox.path(pod, name)
            f = await trio.open_file(real, "rb")
        except (SandboxError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            await cio.write_err(f"{tool}: {name}: {reason}\n".encode())
            code = 1
            continue
        async with f:
            while data := await f.read(CHUNK):
                await each(name, data)
        await done(name)
    return code


async def _cat(sandbox: Sandbox, pod: str, args: list[str], cio: CommandIO) -> int:
    async def each(_name: str, data: bytes) -> None:
        await cio.write(data)

    async def done(_name: str) -> None:
        pass

    return await _inputs(sandbox, pod, args, cio, "cat", each, done)


async def _sha256sum(sandbox: Sandbox, pod: str, args: list[str], cio: CommandIO) -> int:
    digest = hashlib.sha256()

    async def each(_name: str, data: bytes) -> None:
        digest.update(data)

    async def done(name: str) -> None:
        nonlocal digest
        await cio.write(f"{digest.hexdigest()}  {name}\n".encode())
        digest = hashlib.sha256()

    return await _inputs(sandbox, pod, args, cio, "sha256sum", each, done)


async def _test(sandbox: Sandbox, pod: str, args: list[str], cio: CommandIO) -> int:
    if len(args) != 2 or args[0] not in ("-d", "-e", "-f"):
        await cio.write_err(b"test: the stand-in knows only: test -d|-e|-f PATH\n")
        return 2
    try:
        real = sandbox.path(pod, args[1])
    except SandboxError:
        return 1
    check = {"-d": real.is_dir, "-e": real.exists, "-f": real.is_file}[args[0]]
    return 0 if check() else 1


# ---------------------------------------------------------------------------------------------- tar


class _StdinReader(io.RawIOBase):
    """A blocking file over the exec's stdin, for `tarfile` in a worker thread."""

    def __init__(self, cio: CommandIO) -> None:
        self._cio = cio
        self._buf = memoryview(b"")
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        if not self._buf and not self._eof:
            self._buf = memoryview(trio.from_thread.run(self._cio.read))
            self._eof = not self._buf
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


class _StdoutWriter(io.RawIOBase):
    """A blocking file over the exec's stdout, for `tarfile` in a worker thread."""

    def __init__(self, cio: CommandIO) -> None:
        self._cio = cio

    def writable(self) -> bool:
        return True

    def write(self, b: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        data = bytes(b)
        trio.from_thread.run(self._cio.write, data)
        return len(data)


def _parse_tar(args: list[str]) -> tuple[str, str | None, list[str]]:
    """(mode "x" or "c", -C directory, paths) of the tar command lines kubectl cp sends."""
    mode, directory, paths, want_file = "", None, [], False
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in ("--no-same-permissions", "--no-same-owner"):
            continue  # what the stand-in does anyway: files are owned by it, mode 0644/0755
        if arg == "-C":
            if i >= len(args):
                raise SandboxError("option -C needs a directory")
            directory = args[i]
            i += 1
            continue
        if want_file:
            if arg != "-":
                raise SandboxError(
                    "the stand-in reads and writes tar archives on stdin/stdout only (f -)"
                )
            want_file = False
            continue
        if not mode and (set(arg.lstrip("-")) <= set("xcmfv")) and arg.lstrip("-"):
            letters = arg.lstrip("-")
            modes = set(letters) & {"x", "c"}
            if len(modes) != 1:
                raise SandboxError("give exactly one of x and c")
            mode = modes.pop()
            want_file = "f" in letters
            continue
        if arg.startswith("-"):
            raise SandboxError(f"option {arg} is not supported by the stand-in")
        paths.append(arg)
    if not mode or want_file:
        raise SandboxError("usage: tar cf - PATH... | tar xmf - [-C DIR]")
    return mode, directory, paths


def _member_name(name: str) -> str:
    clean = posixpath.normpath(name.lstrip("/"))
    if clean == "." or clean.startswith("../") or clean == "..":
        raise SandboxError(f"{name}: member name outside the target directory")
    return clean


def _extract(sandbox: Sandbox, pod: str, directory: str, cio: CommandIO) -> list[str]:
    """Extract the tar stream on stdin under `directory` (a worker thread); returns warnings."""
    warnings = []
    target = sandbox.path(pod, directory)
    if not target.is_dir():
        raise SandboxError(f"{directory}: Cannot open: No such file or directory")
    with (
        io.BufferedReader(_StdinReader(cio), CHUNK) as raw,
        tarfile.open(fileobj=raw, mode="r|", bufsize=CHUNK) as archive,
    ):
        for member in archive:
            name = _member_name(member.name)
            dest = sandbox.path(pod, name, cwd=str(target.relative_to(sandbox.pod_root(pod))))
            if member.isdir():
                dest.mkdir(parents=True, exist_ok=True)
            elif member.isreg():
                sandbox.charge(member.size)
                dest.parent.mkdir(parents=True, exist_ok=True)
                source = archive.extractfile(member)
                assert source is not None
                with open(dest, "wb") as out:  # `m`: the modification time is not restored
                    while data := source.read(CHUNK):
                        out.write(data)
            else:
                warnings.append(
                    f"tar: {member.name}: only regular files and directories may "
                    "enter the stand-in's sandbox; skipped"
                )
        # read to the end of the stream, as GNU tar does, so the client's last writes are taken
        while raw.read(CHUNK):
            pass
    return warnings


def _create(sandbox: Sandbox, pod: str, paths: list[str], cio: CommandIO) -> list[str]:
    """Write a tar stream of `paths` to stdout (a worker thread); returns warnings."""
    warnings = []
    top = sandbox.pod_root(pod)
    with (
        _StdoutWriter(cio) as raw,
        tarfile.open(fileobj=raw, mode="w|", bufsize=CHUNK, format=tarfile.GNU_FORMAT) as archive,
    ):
        for path in paths:
            real = sandbox.path(pod, path)
            if not real.exists():
                warnings.append(f"tar: {path}: Cannot stat: No such file or directory")
                continue
            todo = [real]
            while todo:
                item = todo.pop(0)
                arcname = _member_name(
                    posixpath.normpath(path)
                    if item == real
                    else posixpath.join(path, item.relative_to(real).as_posix())
                )
                if item.is_symlink() or not item.resolve().is_relative_to(top):
                    warnings.append(
                        f"tar: {arcname}: a link; skipped"
                    )  # never made by the stand-in
                    continue
                info = archive.gettarinfo(str(item), arcname)
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                if item.is_dir():
                    archive.addfile(info)
                    todo[:0] = sorted(item.iterdir())
                elif item.is_file():
                    with open(item, "rb") as f:
                        archive.addfile(info, f)
    return warnings


async def _tar(sandbox: Sandbox, pod: str, args: list[str], cio: CommandIO) -> int:
    mode, directory, paths = _parse_tar(args)
    try:
        if mode == "x":
            warnings = await trio.to_thread.run_sync(_extract, sandbox, pod, directory or "/", cio)
        else:
            if not paths:
                raise SandboxError("Cowardly refusing to create an empty archive")
            warnings = await trio.to_thread.run_sync(_create, sandbox, pod, paths, cio)
    except tarfile.TarError as exc:
        await cio.write_err(f"tar: {exc}\n".encode())
        return 2
    except OSError as exc:
        await cio.write_err(f"tar: {exc.strerror or exc}\n".encode())
        return 2
    for line in warnings:
        await cio.write_err(line.encode() + b"\n")
    return 2 if warnings else 0


COMMANDS: dict[str, Command] = {
    "echo": _echo,
    "cat": _cat,
    "sha256sum": _sha256sum,
    "test": _test,
    "tar": _tar,
}
