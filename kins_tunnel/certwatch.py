"""TLS contexts that follow their certificate files (renewed certificates, no restart).

A `ReloadingContext` builds an `ssl.SSLContext` from the CA, certificate and key files and builds
it again when any of them changed (inode, size or mtime: a Kubernetes Secret update swaps a
symlink, `certs init` renames a new file over the old one). `refresh()` checks (three `stat`s,
rate-limited to one per `min_interval` seconds) and rebuilds in a worker thread, so the event
loop never blocks on the file system; `context` only returns the current context. A new context
only affects connections made after it: live TLS connections keep the context they were made
with, so no stream is dropped.

If the new files do not load (e.g. the certificate was replaced but the key not yet), the previous
context stays in use, a warning is logged, and the next check tries again.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import trio

from kins_tunnel.errors import UserError

log = logging.getLogger("kins_tunnel.certs")

Stamp = tuple[tuple[int, int, int] | None, ...]


def _stamp(paths: tuple[Path | None, ...]) -> Stamp:
    out: list[tuple[int, int, int] | None] = []
    for p in paths:
        if p is None:  # an optional file that is not configured
            out.append(None)
            continue
        try:
            st = os.stat(p)  # follows symlinks: a Secret update changes the target
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


class ReloadingContext:
    def __init__(
        self,
        build: Callable[..., ssl.SSLContext],
        ca: Path | None,
        cert: Path,
        key: Path,
        *,
        what: str,
        extra: tuple[Path, ...] = (),
        min_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`build(ca, cert, key)`; `ca` may be None (e.g. no client CA), and is passed on as such.
        A change of one of the `extra` files (which `build` reads itself, e.g. the session ticket
        key file) rebuilds the context too."""
        self._build = build
        self._files: tuple[Path | None, Path, Path] = (
            None if ca is None else Path(ca),
            Path(cert),
            Path(key),
        )
        self._paths: tuple[Path | None, ...] = (*self._files, *map(Path, extra))
        self._what = what
        self._min_interval = min_interval
        self._clock = clock
        self._stamp = _stamp(self._paths)
        self._context = build(*self._files)  # UserError at start-up: a clear one-line error
        self._checked = clock()
        self.reloads = 0  # successful reloads, for status and tests

    @property
    def context(self) -> ssl.SSLContext:
        """The current context (no I/O: `refresh()` keeps it current)."""
        return self._context

    async def refresh(self) -> bool:
        """Rebuild if the files changed (checked at most every `min_interval`), off the event loop;
        True if a new context is in use."""
        now = self._clock()
        if now - self._checked < self._min_interval:
            return False
        self._checked = now
        stamp = await trio.to_thread.run_sync(_stamp, self._paths)
        if stamp == self._stamp:
            return False
        return await trio.to_thread.run_sync(self._rebuild, stamp)

    def check(self) -> bool:
        """Rebuild now if the files changed (blocking: for start-up and tests, not the event loop)."""
        stamp = _stamp(self._paths)
        return stamp != self._stamp and self._rebuild(stamp)

    def _rebuild(self, stamp: Stamp) -> bool:
        try:
            context = self._build(*self._files)
        except (UserError, ssl.SSLError, OSError) as exc:
            log.warning(
                "%s: renewed certificate files do not load yet, keeping the previous ones: %s",
                self._what,
                exc,
            )
            return False
        self._stamp = stamp
        self._context = context
        self.reloads += 1
        log.info(
            "%s: certificate files changed, new connections use them",
            self._what,
            extra={"cert": str(self._paths[1])},
        )
        return True
