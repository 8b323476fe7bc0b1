"""A rolling upgrade of an L5 unit, played through the tunnel with real kubectl.

Three K3s API stand-ins (test doubles) sit behind one entry of the edge's `services` list, as the
three K3s servers of an L5 unit do. They are stopped and started again one at a time while kubectl
runs `get` in two loops and a `get --watch` that is started again whenever it ends.

What must hold, and why:
- A `get` can only fail if it was in flight when a server stopped: every new connection is dialled
  by the edge, which tries the addresses in turn (the one that last worked first) and skips a
  stopped one at once (connection refused). So each failed `get` overlaps a stop, and there are at
  most (loops × stops) of them: a loop has one `get` in flight at a time.
- A watch on a server that stops ends (kubectl exits, reporting the unexpected end of the stream)
  instead of hanging: the stand-in closes its connections when it stops, the edge passes the end
  of the target connection through the tunnel, the cloud passes it to kubectl.
"""

from __future__ import annotations

import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from kins_tunnel.demo import write_kubeconfig
from kins_tunnel.testing.k3s_standin import (
    StandinStats,
    make_self_signed_server_context,
    serve_k3s_standin,
)
from kins_tunnel.testing.support import free_port, wait_until
from tests.clients import KUBECTL, needs_kubectl
from tests.e2e.faultkit import figure
from tests.e2e.harness import SVC, tunnel_env

pytestmark = needs_kubectl

SERVERS = 3
GET_LOOPS = 2
# Traffic before the first stop, between a stop and its restart, and after: this many successful
# gets (and an open watch), however long they take on the machine (7 phases: 21 gets at least).
SETTLE_GETS = 3


@dataclass
class Get:
    start: float
    end: float
    ok: bool
    detail: bytes


@dataclass
class Watch:
    start: float
    end: float
    code: int
    stderr: bytes


class Server:
    """One stand-in that can be stopped and started again on the same port."""

    def __init__(
        self, nursery: trio.Nursery, ctx: ssl.SSLContext, port: int, sandbox: Path
    ) -> None:
        self.nursery = nursery
        self.ctx = ctx
        self.port = port
        self.sandbox = sandbox
        self.scope: trio.CancelScope | None = None
        self.stats = StandinStats()
        self.done = trio.Event()

    async def start(self) -> None:
        self.stats = StandinStats()
        self.done = trio.Event()
        self.scope = trio.CancelScope()
        await self.nursery.start(self._run, self.scope, self.stats, self.done)

    async def _run(
        self,
        scope: trio.CancelScope,
        stats: StandinStats,
        done: trio.Event,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            with scope:
                await serve_k3s_standin(
                    self.ctx,
                    port=self.port,
                    interval=0.2,
                    sandbox=self.sandbox,
                    stats=stats,
                    task_status=task_status,
                )
        finally:
            done.set()

    async def stop(self) -> None:
        """Stop serving: the listener and every connection are closed, as when the process ends."""
        assert self.scope is not None
        self.scope.cancel()
        with trio.fail_after(10):
            await self.done.wait()


async def test_rolling_restart_of_three_api_servers(tmp_path: Path) -> None:
    ctx, ca = make_self_signed_server_context(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "KUBECONFIG"}
    env["HOME"] = str(home)
    gets: list[Get] = []
    watches: list[Watch] = []
    stops: list[tuple[int, float, int]] = []  # (server, when, watches it had open)
    cut = 0  # connections other than watches open on a server when it stopped
    t0 = time.monotonic()

    def now() -> float:
        return time.monotonic() - t0

    async with trio.open_nursery() as servers_nursery:
        servers = []
        for i in range(SERVERS):
            (tmp_path / f"sandbox{i}").mkdir()
            servers.append(Server(servers_nursery, ctx, free_port(), tmp_path / f"sandbox{i}"))
            await servers[-1].start()
        addresses = [f"127.0.0.1:{s.port}" for s in servers]
        async with tunnel_env(tmp_path, {SVC: addresses}) as tunnel:
            kubeconfig = tmp_path / "kubeconfig"
            write_kubeconfig(kubeconfig, tunnel.ports.proxy, ca)
            kubectl = [KUBECTL, "--kubeconfig", str(kubeconfig)]
            running = True

            async def get_loop() -> None:
                while running:
                    start = now()
                    with trio.fail_after(30):
                        r = await trio.run_process(
                            [*kubectl, "get", "pods", "-o", "name", "--request-timeout=10s"],
                            capture_stdout=True,
                            capture_stderr=True,
                            check=False,
                            env=env,
                        )
                    ok = r.returncode == 0 and r.stdout.count(b"pod/test-") == 3
                    gets.append(Get(start, now(), ok, r.stderr[-300:]))

            async def watch_loop() -> None:
                while True:
                    start = now()
                    with trio.fail_after(60):  # a watch that hangs past a stop fails the test
                        r = await trio.run_process(
                            [*kubectl, "get", "pods", "--watch", "-v=1"],
                            capture_stdout=True,
                            capture_stderr=True,
                            check=False,
                            env=env,
                        )
                    watches.append(Watch(start, now(), r.returncode, r.stderr[-500:]))

            async def settle(what: str) -> None:
                since = now()
                await wait_until(
                    lambda: (
                        sum(1 for g in gets if g.ok and g.start >= since) >= SETTLE_GETS
                        and sum(s.stats.watches for s in servers) > 0
                    ),
                    60,
                    f"{SETTLE_GETS} gets and an open watch {what}",
                )

            async with trio.open_nursery() as clients:
                for _ in range(GET_LOOPS):
                    clients.start_soon(get_loop)
                with trio.CancelScope() as watching:
                    async with trio.open_nursery() as watcher:
                        watcher.start_soon(watch_loop)
                        await settle("before the first stop")
                        for i, server in enumerate(servers):
                            stops.append((i, now(), server.stats.watches))
                            cut += server.stats.connections - server.stats.watches
                            await server.stop()
                            await settle(f"with server {i} stopped")
                            await server.start()
                            await settle(f"after server {i} is back")
                        running = False  # the get loops end after their current get
                        watching.cancel()  # the last watch (kubectl is killed)
        servers_nursery.cancel_scope.cancel()

    # ---------------------------------------------------------------- gets
    failed = [g for g in gets if not g.ok]
    overlapping = [g for g in gets if any(g.start < when < g.end for _, when, _ in stops)]
    in_flight = [g for g in failed if g in overlapping]
    figure("rolling restart: gets", len(gets))
    figure("rolling restart: gets in flight at a stop", len(overlapping))
    figure("rolling restart: other connections open on a server when it stopped", cut)
    figure("rolling restart: failed gets", len(failed))
    figure("rolling restart: failed gets in flight at a stop", len(in_flight))
    assert len(gets) >= 20, "the get loops hardly ran"
    assert in_flight == failed, [(g.start, g.end, g.detail) for g in failed if g not in in_flight]
    assert len(failed) <= GET_LOOPS * SERVERS
    for _, when, _ in stops:  # after every stop, gets succeed again (the edge fails over)
        assert any(g.ok and g.start > when for g in gets)

    # ---------------------------------------------------------------- watches
    stopped_with_watch = [(i, when) for i, when, had in stops if had]
    assert stopped_with_watch, "no stop hit a server with a watch"
    for i, when in stopped_with_watch:
        ended = [w for w in watches if w.start < when <= w.end]
        assert len(ended) == 1, (i, when, watches)
        w = ended[0]
        figure(f"rolling restart: watch on server {i} ended after its stop", w.end - when, "s")
        figure(f"rolling restart: watch on server {i} kubectl exit code", w.code)
        assert b"Unexpected EOF during watch stream" in w.stderr, w.stderr
        assert w.end - when < 10  # it ended, it did not hang
