"""Fair shares on one shared cloud: no user (or anonymous client address) can starve the others.

Real cloud and edge (trio tasks) over real TLS, real kubectl through `proxy-url` to the K3s API
stand-in (a test double), and a target that accepts and then holds every connection open without
a byte until the client's end (a test double for a client's idle sessions).
"""

from __future__ import annotations

import base64
from pathlib import Path

import trio

from kins_tunnel.demo import write_kubeconfig
from kins_tunnel.testing.k3s_standin import make_self_signed_server_context, serve_k3s_standin
from tests.clients import needs_kubectl
from tests.e2e.harness import SVC, connect, echo_bytes, serve_loopback, tunnel_env
from tests.e2e.kubectl_tools import run_kubectl
from tests.e2e.test_isolation import metrics_of
from tests.test_observability import value

HOLD = "edge1:7000"


async def hold_open(stream: trio.SocketStream) -> None:
    """Send nothing; close when the client half-closes."""
    while await stream.receive_some(4096):
        pass


def basic(user: str, password: str) -> str:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return f"Proxy-Authorization: Basic {token}\r\n"


async def flood(
    port: int, target: str, count: int, headers: str, held: list[trio.SocketStream]
) -> dict[int, int]:
    """`count` CONNECTs, 64 at a time; the answered (200) ones are kept open in `held`."""
    answers: dict[int, int] = {}
    limiter = trio.CapacityLimiter(64)

    async def one() -> None:
        async with limiter:
            status, _, stream = await connect(port, target, headers)
        answers[status] = answers.get(status, 0) + 1
        if status == 200:
            held.append(stream)
        else:
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return answers


@needs_kubectl
async def test_a_user_holding_1100_idle_connects_leaves_room_for_another_users_kubectl(
    tmp_path: Path,
) -> None:
    ctx, k3s_ca = make_self_signed_server_context(tmp_path)
    (tmp_path / "basic").write_text("hog:h0g-pw\nalice:al1ce-pw\n")
    (tmp_path / "home").mkdir()
    held: list[trio.SocketStream] = []
    async with trio.open_nursery() as nursery:
        k3s = await nursery.start(serve_k3s_standin, ctx)
        idle = await nursery.start(serve_loopback, hold_open)
        async with tunnel_env(
            tmp_path,
            {SVC: f"127.0.0.1:{k3s}", HOLD: f"127.0.0.1:{idle}"},
            proxy={"auth": {"basic_file": str(tmp_path / "basic")}},
        ) as env:
            answers = await flood(env.ports.proxy, HOLD, 1100, basic("hog", "h0g-pw"), held)
            # The edge allows 1,024 streams; one principal gets a quarter of them, then 429.
            assert answers == {200: 256, 429: 844}, answers
            kubeconfig = tmp_path / "kubeconfig"
            write_kubeconfig(kubeconfig, env.ports.proxy, k3s_ca)
            text = kubeconfig.read_text().replace(
                f"http://127.0.0.1:{env.ports.proxy}",
                f"http://alice:al1ce-pw@127.0.0.1:{env.ports.proxy}",
            )
            assert "alice:al1ce-pw@" in text
            kubeconfig.write_text(text)
            r = await run_kubectl(kubeconfig, "get", "pods", home=tmp_path / "home")
            assert r.returncode == 0, r.stderr
            assert b"test-server-kins" in r.stdout
            m = await metrics_of(env.ports.admin)
            assert value(m, "kins_tunnel_proxy_limits_total", reason="stream_share") == 844
            for s in held:
                await s.aclose()
        nursery.cancel_scope.cancel()


async def test_connections_per_anonymous_client_address_are_capped_with_429(
    tmp_path: Path,
) -> None:
    held: list[trio.SocketStream] = []
    async with trio.open_nursery() as nursery:
        idle = await nursery.start(serve_loopback, hold_open)
        async with tunnel_env(
            tmp_path,
            {HOLD: f"127.0.0.1:{idle}"},
            proxy={"max_connections_per_principal": 20, "max_stream_share": 1.0},
        ) as env:
            answers = await flood(env.ports.proxy, HOLD, 30, "", held)
            assert answers == {200: 20, 429: 10}, answers
            status, head, s = await connect(env.ports.proxy, HOLD)
            await s.aclose()
            assert status == 429 and b"max_connections_per_principal" in head, head
            await held.pop().aclose()  # one closes: that client may connect once more
            await trio.sleep(0.2)
            status, _, s = await connect(env.ports.proxy, HOLD)
            held.append(s)
            assert status == 200
            m = await metrics_of(env.ports.admin)
            assert value(m, "kins_tunnel_proxy_limits_total", reason="principal") == 11
            for s in held:
                await s.aclose()
        nursery.cancel_scope.cancel()


async def test_an_idle_relay_is_closed_and_a_busy_one_is_not(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        echo = await nursery.start(serve_loopback, echo_bytes)
        async with tunnel_env(
            tmp_path, {SVC: f"127.0.0.1:{echo}"}, proxy={"idle_timeout": 0.6}
        ) as env:
            _, _, quiet = await connect(env.ports.proxy, SVC)
            _, _, busy = await connect(env.ports.proxy, SVC)
            async with quiet, busy:
                t0 = trio.current_time()
                for _ in range(10):  # 2 s of a byte every 0.2 s
                    await busy.send_all(b"x")
                    assert await busy.receive_some(10) == b"x"
                    await trio.sleep(0.2)
                with trio.fail_after(2):  # the quiet one was closed (EOF or reset) long ago
                    try:
                        assert await quiet.receive_some(10) == b""
                    except trio.BrokenResourceError:
                        pass
                assert trio.current_time() - t0 >= 2.0
            m = await metrics_of(env.ports.admin)
            assert value(m, "kins_tunnel_proxy_limits_total", reason="idle_timeout") == 1
        nursery.cancel_scope.cancel()
