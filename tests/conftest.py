"""Shared fixtures: a leak check around every test (open file descriptors back to baseline), the
ownership checks on (`kins_tunnel.proto.ownership`: in this process and in the processes tests
start) with a test failing on any violation, trio's virtual clock for in-process tests of our
timers; and the order in which the test files are handed to the workers (long files first)."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterator

import pytest
import trio.testing

os.environ["KINS_TUNNEL_OWNERSHIP_CHECKS"] = "1"  # before any kins_tunnel import reads it

from kins_tunnel.proto import ownership  # noqa: E402  (after the switch above)

ownership.CHECKS = True  # also if a plugin imported kins_tunnel first


def _fds() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass
    return out


def thread_aware_clock(autojump_threshold: float) -> trio.testing.MockClock:
    """trio's `MockClock` whose autojump also waits for worker threads (`trio.to_thread`: the file
    and certificate watchers stat and read in threads). trio counts only tasks: while a thread is
    busy every task may look idle, and on a loaded machine the clock would jump ahead of work
    that is in fact under way, firing a later deadline early. (`MockClock` cannot be subclassed;
    its run-loop hook `_autojump` is wrapped on the instance, and tests/test_virtual_clock.py
    checks that this still works with the installed trio.)"""
    clock = trio.testing.MockClock(autojump_threshold=autojump_threshold)
    jump = clock._autojump

    def autojump_unless_a_thread_works() -> None:
        if trio.testing.active_thread_count():
            return  # real work in a thread: trio looks again after another threshold
        jump()

    clock._autojump = autojump_unless_a_thread_works  # type: ignore[method-assign]
    return clock


@pytest.fixture
def virtual_clock() -> trio.testing.MockClock:
    """trio's virtual clock for a test that asks for it (pytest-trio runs the test on it).

    It jumps to the next deadline once every task has waited 10 ms of real time and no worker
    thread is running, so real loopback I/O and thread work complete first, and a timer of ours
    fires exactly when configured: the bounds are exact and do not depend on how loaded the
    machine is."""
    return thread_aware_clock(0.01)


@pytest.fixture(autouse=True)
def no_leaked_fds() -> Iterator[None]:
    """Fail a test that leaves sockets or files open behind it."""
    before = _fds()
    yield
    for _ in range(50):
        leaked = {f for f in _fds() - before if "socket:" in f or "pipe:" in f}
        if not leaked:
            return
        # an unreachable socket object may still hold its descriptor until a collection (a full
        # one costs about 0.05 s: only when something is left open, not after every test)
        gc.collect()
        time.sleep(0.02)
    pytest.fail(f"leaked file descriptors: {sorted(leaked)}")


@pytest.fixture(autouse=True)
def no_ownership_violations() -> Iterator[None]:
    """Fail a test during which an ownership check fired, even if an isolation boundary caught
    the error and the tunnel went on (a test that breaks a rule on purpose takes its own)."""
    ownership.take_violations()
    yield
    broken = ownership.take_violations()
    if broken:
        pytest.fail(f"ownership contract broken: {broken}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files that hold a `slow` test run first, the rest in collection order.

    `make test` hands whole files to two workers (`--dist loadfile --no-loadscope-reorder`): a
    long file started last would leave one worker running it alone at the end."""
    slow_files = {
        item.nodeid.split("::", 1)[0] for item in items if item.get_closest_marker("slow")
    }
    items.sort(key=lambda item: item.nodeid.split("::", 1)[0] not in slow_files)
