"""A small file that is parsed into a value and re-read when it changes, off the event loop.

`WatchedFile` loads its file once at start-up (a problem there is a one-line `UserError`: the
process must not start with rules it cannot read), then `watch()` checks the file every
`interval` seconds in a worker thread (`stat`, and `read` only when inode, size or modification
time changed: a Kubernetes Secret update swaps a symlink, an editor renames a new file over the
old one). A file that vanished, cannot be read or does not parse keeps the previous value in use;
the reason is logged once per change. Readers on the hot path only look at `value`, which never
blocks.
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
    contents. `what` names the setting in messages, e.g. ``proxy.authz_file``.
    """

    def __init__(self, path: Path, parse: Callable[[bytes], T], what: str) -> None:
        self.path = Path(path)
        self.what = what
        self._parse = parse
        self._stamp = file_stamp(self.path)
        self._failed_stamp: Stamp | object = _NEVER
        self.reloads = 0  # successful re-reads after start-up
        self.failures = 0  # re-reads that kept the previous value
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise UserError(f"{what}: cannot read {self.path}: {exc.strerror or exc}") from None
        try:
            self.value: T = parse(data)
        except ValueError as exc:
            raise UserError(f"{what}: {self.path}: {exc}") from None

    async def check(self) -> bool:
        """Re-read the file if it changed; True if a new value is in use."""
        stamp = await trio.to_thread.run_sync(file_stamp, self.path)
        if stamp == self._stamp or stamp == self._failed_stamp:
            return False
        try:
            data = await trio.to_thread.run_sync(self.path.read_bytes)
        except OSError as exc:
            reason = f"cannot read it: {exc.strerror or exc}"
        else:
            try:
                value = self._parse(data)
            except ValueError as exc:
                reason = str(exc)
            else:
                self._stamp, self._failed_stamp, self.value = stamp, _NEVER, value
                self.reloads += 1
                log.info("%s: %s changed, new contents in use", self.what, self.path)
                return True
        if stamp is None:
            reason = "the file is gone"
        self._failed_stamp = stamp
        self.failures += 1
        log.warning(
            "%s: %s: %s (keeping the previous contents)",
            self.what,
            self.path,
            reason,
            extra={"setting": self.what, "reason": reason},
        )
        return False

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
