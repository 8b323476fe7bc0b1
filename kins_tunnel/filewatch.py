"""A small file that is parsed into a value and re-read when it changes, off the event loop.

`WatchedFile` loads its file once at start-up (a problem there is a one-line `UserError`: the
process must not start with rules it cannot read), then `watch()` checks the file every
`interval` seconds in a worker thread (`stat`, and `read` only when inode, size or modification
time changed: a Kubernetes Secret update swaps a symlink, an editor renames a new file over the
old one). A file that vanished, cannot be read or does not parse keeps the previous value in use;
the reason is logged once per change, counted in `failures` (exported as
``kins_tunnel_reload_failures_total{file}``) and kept in `last_error` (shown in ``/status``). A
parser may instead raise `PartialValue`: then the value it carries is used although the file had
a bad line (a revocation list applies what it can read), and that counts as a failure too.
Readers on the hot path only look at `value`, which never blocks.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

import trio

from kins_tunnel.errors import UserError

log = logging.getLogger("kins_tunnel.filewatch")
T = TypeVar("T")
Stamp = tuple[int, int, int] | None


class PartialValue(ValueError, Generic[T]):
    """Raised by a parser for contents with bad parts whose good parts are still to be used:
    `value` is what to use, the message the one-line reason. At start-up it fails like any
    `ValueError`."""

    def __init__(self, value: T, reason: str) -> None:
        super().__init__(reason)
        self.value = value


def file_stamp(path: Path) -> Stamp:
    """(inode, size, mtime) of `path` after symlinks, or None if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class WatchedFile(Generic[T]):
    """`value` is `parse(contents)` of the last version of `path` that parsed.

    `parse` raises `ValueError` with a one-line reason (naming the key path or line) for bad
    contents. `what` names the setting in messages, e.g. ``proxy.authz_file``. With
    `parse_in_thread`, re-reads are parsed in a worker thread (for a large file whose parse would
    hold the event loop; `parse` must then not touch event-loop state).
    """

    def __init__(
        self, path: Path, parse: Callable[[bytes], T], what: str, *, parse_in_thread: bool = False
    ) -> None:
        self.path = Path(path)
        self.what = what
        self._parse = parse
        self._parse_in_thread = parse_in_thread
        self._stamp = file_stamp(self.path)
        self._failed_stamp: Stamp | object = _NEVER
        self.reloads = 0  # successful re-reads after start-up
        self.failures = 0  # re-reads that failed (kept the previous value, or applied a part)
        self.last_error: str | None = None  # the reason of the last failed re-read
        self.failing = False  # the version on disk now is not (wholly) in use
        self._lock = trio.Lock()
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise UserError(f"{what}: cannot read {self.path}: {exc.strerror or exc}") from None
        try:
            self.value: T = parse(data)
        except ValueError as exc:
            raise UserError(f"{what}: {self.path}: {exc}") from None

    def retry(self) -> None:
        """Re-read the file at the next `check` even if it did not change since a failure (what it
        was checked against, e.g. another file, changed)."""
        self._failed_stamp = _NEVER

    async def check(self) -> bool:
        """Re-read the file if it changed; True if a new value is in use."""
        async with self._lock:  # a re-read is parsed and counted once, however many callers
            return await self._check()

    async def _check(self) -> bool:
        stamp = await trio.to_thread.run_sync(file_stamp, self.path)
        if stamp == self._stamp or stamp == self._failed_stamp:
            return False
        try:
            data = await trio.to_thread.run_sync(self.path.read_bytes)
        except OSError as exc:
            reason = f"cannot read it: {exc.strerror or exc}"
        else:
            try:
                if self._parse_in_thread:
                    value = await trio.to_thread.run_sync(self._parse, data)
                else:
                    value = self._parse(data)
            except PartialValue as exc:
                self._stamp, self._failed_stamp, self.value = stamp, _NEVER, exc.value
                self.reloads += 1
                self._failed(str(exc), "applying the entries that parse")
                return True
            except ValueError as exc:
                reason = str(exc)
            else:
                self._stamp, self._failed_stamp, self.value = stamp, _NEVER, value
                self.reloads += 1
                self.failing = False
                log.info("%s: %s changed, new contents in use", self.what, self.path)
                return True
        if stamp is None:
            reason = "the file is gone"
        self._failed_stamp = stamp
        self._failed(reason, "keeping the previous contents")
        return False

    def _failed(self, reason: str, outcome: str) -> None:
        self.failures += 1
        self.last_error = reason
        self.failing = True
        log.warning(
            "%s: %s: %s (%s)",
            self.what,
            self.path,
            reason,
            outcome,
            extra={"setting": self.what, "reason": reason},
        )

    def status(self) -> dict[str, object]:
        """What ``/status`` shows of this file."""
        return {
            "path": str(self.path),
            "reloads": self.reloads,
            "failures": self.failures,
            "failing": self.failing,
            "last_error": self.last_error,
        }

    async def watch(
        self, interval: float = 1.0, on_change: Callable[[T], object] | None = None
    ) -> None:
        """Check every `interval` seconds until cancelled; call `on_change(value)` after a reload."""
        while True:
            await trio.sleep(interval)
            if await self.check() and on_change is not None:
                result = on_change(self.value)
                if inspect.isawaitable(result):
                    await result


class _Never:
    pass


_NEVER = _Never()
