"""The K3s API stand-in, driven by real kubectl and curl, and a small h11 client for the edges."""

from __future__ import annotations

import functools
import hashlib
import json
import ssl
import time
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from kins_tunnel.testing.k3s_standin import (
    K3S_VERSION,
    blob_bytes,
    blob_chunk,
    iter_blob,
    make_self_signed_server_context,
    serve_k3s_standin,
)
from kins_tunnel.testing.support import wait_until
from tests.clients import needs_curl, needs_kubectl
from tests.e2e.kubectl_tools import run_kubectl


@pytest.fixture
async def standin(nursery: trio.Nursery, tmp_path: Path) -> tuple[int, Path]:
    ctx, cert = make_self_signed_server_context(tmp_path)
    port = await nursery.start(functools.partial(serve_k3s_standin, ctx, interval=0.2))
    return port, cert


@pytest.fixture
def kubeconfig(standin: tuple[int, Path], tmp_path: Path) -> Path:
    port, _ = standin
    path = tmp_path / "kubeconfig"
    path.write_text(f"""apiVersion: v1
kind: Config
clusters:
- name: default
  cluster:
    server: https://127.0.0.1:{port}
    insecure-skip-tls-verify: true
contexts:
- name: default
  context: {{cluster: default, user: default, namespace: default}}
current-context: default
users:
- name: default
  user: {{token: rfj9s2bhpcs6fm9xxxxxxxxxxxxxxxxx}}
""")
    return path


async def kubectl(kubeconfig: Path, *args: str, limit: float = 30) -> tuple[int, bytes, bytes]:
    """Run real kubectl with its discovery cache kept inside the test's directory."""
    proc = await run_kubectl(kubeconfig, *args, home=kubeconfig.parent, timeout=limit)
    return proc.returncode, proc.stdout, proc.stderr


# ---------------------------------------------------------------------------------------------
# The blob


def test_blob_is_deterministic_and_seeded() -> None:
    assert blob_bytes(1000, 7) == blob_bytes(1000, 7)
    assert blob_bytes(1000, 7) != blob_bytes(1000, 8)
    assert len(blob_bytes(12345, 1)) == 12345
    assert blob_bytes(0, 1) == b""
    # content looks random: no 1 KiB window repeats inside 4 MiB
    data = blob_bytes(4 << 20, 3)
    assert len({data[i : i + 1024] for i in range(0, len(data), 1024)}) == 4096


@given(
    st.integers(0, 3 << 20), st.integers(0, 70_000), st.integers(-5, 2**40), st.integers(1, 100_000)
)
@settings(max_examples=60, deadline=None)
def test_blob_random_access_and_chunking_agree(
    offset: int, length: int, seed: int, chunk: int
) -> None:
    whole = blob_bytes(offset + length, seed)
    assert blob_chunk(seed, offset, length) == whole[offset:]
    assert b"".join(iter_blob(offset + length, seed, chunk_size=chunk)) == whole


def test_blob_generation_yields_exactly_the_size_asked() -> None:
    """256 MiB in chunks (its speed is printed, not asserted: tests do not measure the machine)."""
    n = 256 << 20
    start = time.perf_counter()
    total = sum(len(c) for c in iter_blob(n, 1))
    elapsed = time.perf_counter() - start
    assert total == n
    print(f"\nFIGURE blob generation: {n / elapsed / 1e6:.0f} MB/s")


# ---------------------------------------------------------------------------------------------
# Real kubectl


@needs_kubectl
async def test_kubectl_version_shows_k3s(kubeconfig: Path) -> None:
    rc, out, err = await kubectl(kubeconfig, "version", "-o", "json")
    assert rc == 0, err
    assert json.loads(out)["serverVersion"]["gitVersion"] == K3S_VERSION == "v1.30.6+k3s1"


@needs_kubectl
async def test_kubectl_get_pods_prints_a_table(kubeconfig: Path) -> None:
    rc, out, err = await kubectl(kubeconfig, "get", "pods", "-o", "wide")
    assert rc == 0, err
    lines = out.decode().splitlines()
    assert lines[0].split()[:5] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert "NODE" in lines[0]
    assert any(line.startswith("test-server-kins-") and "Running" in line for line in lines)
    assert sum(line.startswith("test-agent-kins-") for line in lines) == 2
    rc, out, err = await kubectl(kubeconfig, "get", "pods", "-n", "kins-system", "-o", "name")
    assert rc == 0, err
    assert out.decode().split()[0].startswith("pod/test-server-kins-")


@needs_kubectl
async def test_kubectl_watch_streams_rows(kubeconfig: Path) -> None:
    rc, out, err = await kubectl(kubeconfig, "get", "pods", "--watch-only", "--request-timeout=2s")
    rows = [line for line in out.decode().splitlines() if line.startswith("test-")]
    # three ADDED rows, then MODIFIED ones every 0.2 s
    assert len(rows) >= 6, (rc, out, err)


@needs_kubectl
async def test_kubectl_logs_and_follow(kubeconfig: Path) -> None:
    rc, out, _ = await kubectl(kubeconfig, "get", "pods", "-o", "name")
    pod = out.decode().split()[0].removeprefix("pod/")
    rc, out, err = await kubectl(kubeconfig, "logs", pod)
    assert rc == 0, err
    assert out.decode().count("stand-in log line") == 3
    rc, out, err = await kubectl(kubeconfig, "logs", "-f", pod, "--request-timeout=1s")
    assert out.decode().count("stand-in log line") >= 3, (rc, out, err)


@needs_kubectl
async def test_kubectl_get_raw_blob_is_byte_exact(kubeconfig: Path) -> None:
    n = 52428800
    rc, out, err = await kubectl(kubeconfig, "get", "--raw", f"/kins-standin/blob?bytes={n}&seed=7")
    assert rc == 0, err
    assert len(out) == n
    assert out == blob_bytes(n, 7)


@needs_kubectl
async def test_kubectl_unknown_resource_is_an_error(kubeconfig: Path) -> None:
    rc, _, err = await kubectl(kubeconfig, "get", "widgets")
    assert rc != 0
    assert b"widgets" in err


@needs_curl
@pytest.mark.parametrize("extra", [[], ["-H", "Transfer-Encoding: chunked"], ["-X", "PUT"]])
async def test_curl_upload_gets_sha256(
    standin: tuple[int, Path], tmp_path: Path, extra: list[str]
) -> None:
    port, cert = standin
    payload = blob_bytes(3 << 20, 11) + b"tail"
    (tmp_path / "up.bin").write_bytes(payload)
    with trio.fail_after(30):
        proc = await trio.run_process(
            [
                "curl",
                "-sS",
                "--cacert",
                str(cert),
                *extra,
                "--data-binary",
                f"@{tmp_path / 'up.bin'}",
                f"https://localhost:{port}/kins-standin/upload",
            ],
            capture_stdout=True,
            capture_stderr=True,
        )
    assert json.loads(proc.stdout) == {
        "bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }


# ---------------------------------------------------------------------------------------------
# HTTP details, with a small h11 client


class Client:
    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def request(
        self, target: str, accept: str = "application/json"
    ) -> tuple[int, dict[str, str], bytes]:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        await self.stream.send_all(
            self.conn.send(
                h11.Request(
                    method="GET",
                    target=target,
                    headers=[("Host", "k3s"), ("Accept", accept), ("Authorization", "Bearer x")],
                )
            )
        )
        await self.stream.send_all(self.conn.send(h11.EndOfMessage()))
        status, headers, body = 0, {}, bytearray()
        while True:
            event: Any = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(bytes(await self.stream.receive_some(1 << 16)))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, headers, bytes(body)


@pytest.fixture
async def client(standin: tuple[int, Path]) -> Any:
    port, cert = standin
    ctx = ssl.create_default_context(cafile=str(cert))
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=ctx)
    try:
        yield Client(stream)
    finally:
        await trio.aclose_forcefully(stream)


async def test_keep_alive_discovery_and_404(client: Client) -> None:
    with trio.fail_after(10):
        status, headers, body = await client.request("/api")
        assert (status, headers["content-type"]) == (200, "application/json")
        assert json.loads(body)["versions"] == ["v1"]
        status, _, body = await client.request("/api/v1")
        names = {r["name"] for r in json.loads(body)["resources"]}
        assert {"pods", "pods/log", "namespaces", "configmaps", "nodes"} <= names
        status, _, body = await client.request("/apis")
        assert json.loads(body) == {"kind": "APIGroupList", "apiVersion": "v1", "groups": []}
        status, _, body = await client.request("/apis/apps/v1")
        assert status == 404
        assert json.loads(body)["kind"] == "Status"
        assert json.loads(body)["code"] == 404
        status, _, body = await client.request("/kins-standin/blob?bytes=-1")
        assert status == 400


async def test_plain_pod_list_without_table_accept(client: Client) -> None:
    with trio.fail_after(10):
        status, _, body = await client.request("/api/v1/namespaces/default/pods")
    pods = json.loads(body)
    assert pods["kind"] == "PodList"
    assert all(p["status"]["phase"] == "Running" for p in pods["items"])


async def test_watch_honours_timeout_seconds_and_keeps_the_connection(
    client: Client, virtual_clock: trio.testing.MockClock
) -> None:
    """On the virtual clock: the watch ends exactly at timeoutSeconds, with one MODIFIED event per
    `interval` (0.2 s) before it."""
    with trio.fail_after(10):
        start = trio.current_time()
        status, headers, body = await client.request(
            "/api/v1/namespaces/default/pods?watch=true&timeoutSeconds=1"
        )
        took = trio.current_time() - start
        assert 1.0 <= took <= 1.05, took
        assert headers.get("transfer-encoding") == "chunked"
        events = [json.loads(line) for line in body.splitlines()]
        assert [e["type"] for e in events[:3]] == ["ADDED"] * 3
        assert {e["type"] for e in events[3:]} == {"MODIFIED"}
        assert 5 <= len(events) <= 3 + 5, len(events)  # 3 ADDED, then 4 or 5 ticks of 0.2 s
        status, _, _ = await client.request("/version")  # same connection, still usable
        assert status == 200


async def test_watch_as_table(client: Client) -> None:
    with trio.fail_after(10):
        _, _, body = await client.request(
            "/api/v1/namespaces/default/pods?watch=1&timeoutSeconds=1",
            accept="application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
        )
    first = json.loads(body.splitlines()[0])
    assert first["object"]["kind"] == "Table"
    assert first["object"]["rows"][0]["cells"][2] == "Running"


def handler_tasks() -> int:
    """How many per-connection handler tasks are running in this trio run."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    count, todo = 0, [root]
    while todo:
        task = todo.pop()
        count += task.name.endswith("_run_handler")
        todo.extend(t for n in task.child_nurseries for t in n.child_tasks)
    return count


async def test_client_leaving_a_watch_ends_it(standin: tuple[int, Path]) -> None:
    port, cert = standin
    ctx = ssl.create_default_context(cafile=str(cert))
    with trio.fail_after(10):
        for _ in range(3):
            stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=ctx)
            await stream.send_all(
                b"GET /api/v1/namespaces/default/pods?watch=1 HTTP/1.1\r\nHost: k3s\r\n\r\n"
            )
            received = b""
            while b"ADDED" not in received:
                received += await stream.receive_some(1 << 16)
            assert received.startswith(b"HTTP/1.1 200 OK\r\n")
            assert handler_tasks() == 1
            await trio.aclose_forcefully(stream)
            await wait_until(lambda: handler_tasks() == 0, 10, "the connection's handler ends")
