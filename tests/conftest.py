"""Shared fixtures: a leak check around every test (open file descriptors back to baseline)."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterator

import pytest


def _fds() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass
    return out


@pytest.fixture(autouse=True)
def no_leaked_fds() -> Iterator[None]:
    """Fail a test that leaves sockets or files open behind it."""
    before = _fds()
    yield
    for _ in range(50):
        gc.collect()
        leaked = {f for f in _fds() - before if "socket:" in f or "pipe:" in f}
        if not leaked:
            return
        time.sleep(0.02)
    pytest.fail(f"leaked file descriptors: {sorted(leaked)}")
