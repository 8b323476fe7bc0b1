"""What operators see: /metrics after real traffic, /readyz on both sides, JSON logs without
secrets, `kins-tunnel status`, certificate rotation without dropped streams, and the edge following
a DNS name whose answer changes (a headless Service whose replicas come and go).

Everything runs in-process on loopback (clouds on 127.0.0.1-3 for the DNS test).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from kins_tunnel.certs.directory import init_ca, issue_edge
from kins_tunnel.cloud.server import Cloud, CloudPorts
from kins_tunnel.config import cloud_config_from_dict, edge_config_from_dict
from kins_tunnel.edge.agent import Edge
from kins_tunnel.logs import JSONFormatter
from kins_tunnel.testing.support import (
    echo_roundtrip,
    free_port,
    http_get,
    metric_value,
    read_all,
    run_kins_tunnel,
)
from kins_tunnel.testing.support import wait_until as wait_for
from tests.e2e.harness import (
    SVC,
    cloud_dict,
    connect,
    edge_dict,
    make_certs,
    serve_echo,
    serve_loopback,
    tunnel_env,
    wait_routed,
)

FAST = {"ping_interval": 0.2}


# ---------------------------------------------------------------- helpers


def samples(text: bytes) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)], parsed with prometheus_client's own parser."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def value(m: Mapping[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    """The one sample of `name` whose labels include `labels` (0 when absent)."""
    found = [
        v for lab, v in m.get(name, []) if all(lab.get(k) == want for k, want in labels.items())
    ]
    assert len(found) <= 1, (name, labels, m.get(name))
    return found[0] if found else 0.0


async def start_edge(
    nursery: trio.Nursery,
    base: Path,
    certs: Path,
    cloud: list[int] | list[str],
    services: Mapping[str, Any],
    node: str = "edge1",
    **over: Any,
) -> tuple[Edge, int]:
    """An edge with its admin endpoint on a free port; returns (edge, admin port)."""
    over.setdefault("admin", {"listen": "127.0.0.1:0"})
    cfg = edge_config_from_dict(edge_dict(certs, cloud, services, node, **over), base_dir=base)
    edge = Edge(cfg)
    ports = await nursery.start(edge.run)
    assert ports.admin is not None
    return edge, ports.admin


def rogue_client_context(base: Path, trusted_ca: Path) -> ssl.SSLContext:
    """Trusts the real CA but presents an edge certificate signed by another CA."""
    other = base / "rogue"
    init_ca(other)
    crt, key = issue_edge(other, "test", "edge1")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(trusted_ca))
    ctx.load_cert_chain(str(crt), str(key))
    ctx.set_alpn_protocols(["kins-tunnel/1"])
    return ctx


async def rogue_handshake(port: int, ctx: ssl.SSLContext) -> None:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(tcp, ctx, server_hostname="localhost")
    try:
        with trio.fail_after(5):
            await tls.do_handshake()  # TLS 1.3: the server checks our certificate after this
            await tls.receive_some(100)  # ... and answers with an alert
    except trio.BrokenResourceError:
        pass
    finally:
        await trio.aclose_forcefully(tls)


# ---------------------------------------------------------------- metrics
async def test_metrics_after_real_traffic(tmp_path: Path) -> None:
    refused = free_port()
    small = {"initial_window": 16384, "max_window": 16384, "session_budget": 16384}
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        # a target that sends 1 MiB at once: the edge's sender holds more than its 16 KiB of credit
        source = await n.start(serve_loopback, send_mebibyte)
        services = {
            SVC: f"127.0.0.1:{echo}",
            "test-svc-kins.kins-system:6443": f"127.0.0.1:{refused}",
            "test-svc-kins.kins-system:8443": f"127.0.0.1:{source}",
        }
        async with tunnel_env(tmp_path, replica="cloud-a", tunnel=FAST, mux=small) as env:
            assert env.nursery is not None
            edge, edge_admin = await start_edge(
                env.nursery,
                tmp_path,
                env.certs,
                [env.ports.tunnel],
                services,
                ping_interval=0.2,
                mux=small,
            )
            await wait_routed(env.cloud, SVC)
            payload = (
                bytes(range(256)) * 8192
            )  # 2 MiB through a 16 KiB window: the cloud's sender waits
            # 200
            status, head, s = await connect(env.ports.proxy, SVC)
            assert status == 200, head
            async with s:
                async with trio.open_nursery() as pump:
                    pump.start_soon(s.send_all, payload)
                    await echo_roundtrip_read(s, payload)
            status, head, s = await connect(env.ports.proxy, "test-svc-kins.kins-system:8443")
            assert status == 200, head
            async with s:
                assert await read_all(s) == MEBIBYTE
            # 503, 502
            for target, want in (
                ("nowhere-svc-kins.kins-system:443", 503),
                ("test-svc-kins.kins-system:6443", 502),
            ):
                status, head, s = await connect(env.ports.proxy, target)
                await s.aclose()
                assert status == want, head
            # a client certificate from another CA
            await rogue_handshake(
                env.ports.tunnel, rogue_client_context(tmp_path, env.certs / "ca.crt")
            )
            # RTT needs a ping round trip on both sides
            await wait_for(
                lambda: (
                    all(t.session.rtt is not None for t in env.cloud.registry)
                    and all(s.rtt is not None for s in edge.sessions.values())
                )
            )

            async def cloud_metrics() -> dict[str, list[tuple[dict[str, str], float]]]:
                code, body = await http_get(env.ports.admin, "/metrics")
                assert code == 200
                return samples(body)

            async def unknown_ca_counted() -> bool:
                m = await cloud_metrics()
                return bool(value(m, "kins_tunnel_handshake_failures_total", reason="unknown_ca"))

            # the refused handshake is counted when the cloud sees the alert
            await wait_for(unknown_ca_counted, 5, "the unknown_ca handshake failure counted")
            m = await cloud_metrics()
            assert value(m, "kins_tunnel_handshake_failures_total", reason="unknown_ca") == 1, (
                m.get("kins_tunnel_handshake_failures_total")
            )
            assert value(m, "kins_tunnel_replica_info", replica="cloud-a") == 1
            assert value(m, "kins_tunnel_tunnels", role="cloud", replica="cloud-a") == 1
            assert value(m, "kins_tunnel_edges_connected", unit="test", replica="cloud-a") == 1
            for status_code, count in (("200", 2), ("502", 1), ("503", 1)):  # 200: echo and source
                assert value(m, "kins_tunnel_connect_answers_total", status=status_code) == count, (
                    status_code
                )
            assert value(m, "kins_tunnel_streams_total") == 2
            assert value(m, "kins_tunnel_dial_failures_total", reason="no_edge") == 1
            assert value(m, "kins_tunnel_dial_failures_total", reason="refused") == 1
            assert value(m, "kins_tunnel_dial_seconds_count") == 2
            assert value(m, "kins_tunnel_relay_bytes_total", direction="to_edge") == len(payload)
            assert value(m, "kins_tunnel_relay_bytes_total", direction="from_edge") == len(
                payload
            ) + len(MEBIBYTE)
            assert value(
                m, "kins_tunnel_tunnel_bytes_sent_total", unit="test", node="edge1"
            ) >= len(payload)
            assert value(
                m, "kins_tunnel_tunnel_bytes_received_total", unit="test", node="edge1"
            ) >= len(payload) + len(MEBIBYTE)
            assert value(m, "kins_tunnel_streams_open", unit="test", node="edge1") == 0
            assert 0 < value(m, "kins_tunnel_tunnel_rtt_seconds", unit="test", node="edge1") < 1
            assert value(m, "kins_tunnel_flow_control_stalls_total", unit="test", node="edge1") > 0

            code, body = await http_get(edge_admin, "/metrics")
            assert code == 200
            e = samples(body)
            assert value(e, "kins_tunnel_tunnels", role="edge") == 1
            assert value(e, "kins_tunnel_dial_failures_total", reason="refused") == 1
            assert value(e, "kins_tunnel_relay_bytes_total", direction="to_target") == len(payload)
            assert value(e, "kins_tunnel_relay_bytes_total", direction="from_target") == len(
                payload
            ) + len(MEBIBYTE)
            assert value(e, "kins_tunnel_flow_control_stalls_total", unit="test", node="edge1") > 0
            assert 0 < value(e, "kins_tunnel_tunnel_rtt_seconds", unit="test", node="edge1") < 1
            assert "kins_tunnel_replica_info" not in e
        n.cancel_scope.cancel()


MEBIBYTE = bytes(range(256)) * 4096


async def send_mebibyte(stream: trio.SocketStream) -> None:
    await stream.send_all(MEBIBYTE)


async def echo_roundtrip_read(stream: trio.SocketStream, payload: bytes) -> None:
    got = bytearray()
    with trio.fail_after(30):
        while len(got) < len(payload):
            chunk = await stream.receive_some(1 << 16)
            assert chunk, "stream ended early"
            got += chunk
    assert bytes(got) == payload


async def test_edge_counts_failed_tunnel_setups_by_reason(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    async with trio.open_nursery() as n:
        edge, admin = await start_edge(n, tmp_path, certs, [free_port()], {SVC: "127.0.0.1:1"})
        await wait_for(
            lambda: (
                metric_value(edge.metrics, "kins_tunnel_handshake_failures_total", reason="connect")
                >= 2
            )
        )
        code, body = await http_get(admin, "/metrics")
        assert value(samples(body), "kins_tunnel_handshake_failures_total", reason="connect") >= 2
        n.cancel_scope.cancel()


# ---------------------------------------------------------------- readiness
async def test_readyz_cloud_when_listening_edge_when_it_holds_a_tunnel(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    port = free_port()
    async with trio.open_nursery() as n:
        edge, edge_admin = await start_edge(
            n,
            tmp_path,
            certs,
            [port],
            {SVC: "127.0.0.1:1"},
            reconnect={"initial": 0.05, "max": 0.2},
        )
        assert (await http_get(edge_admin, "/healthz"))[0] == 200

        async def readyz_is(code: int) -> bool:
            return (await http_get(edge_admin, "/readyz"))[0] == code

        await wait_for(  # a few failed attempts: still not ready
            lambda: (
                metric_value(edge.metrics, "kins_tunnel_handshake_failures_total", reason="connect")
                >= 3
            ),
            5,
            "three failed tunnel attempts",
        )
        assert (await http_get(edge_admin, "/readyz"))[0] == 503

        cloud = Cloud(
            cloud_config_from_dict(
                cloud_dict(certs, tunnel={"listen": f"127.0.0.1:{port}"}), base_dir=tmp_path
            )
        )
        async with trio.open_nursery() as cn:
            ports: CloudPorts = await cn.start(cloud.run)
            assert (await http_get(ports.admin, "/readyz"))[0] == 200
            await wait_routed(cloud, SVC)
            await wait_for(lambda: readyz_is(200), 5, "the edge ready")
            await cloud.drain()  # listeners close, the edge's tunnel goes
            assert (await http_get(ports.admin, "/readyz"))[0] == 503
            assert (await http_get(ports.admin, "/healthz"))[0] == 200
            await wait_for(lambda: readyz_is(503), 5, "the edge not ready")
            cn.cancel_scope.cancel()
        n.cancel_scope.cancel()


# ---------------------------------------------------------------- logs
@asynccontextmanager
async def json_log() -> AsyncIterator[io.StringIO]:
    with captured_log(JSONFormatter()) as buf:
        yield buf


@contextmanager
def captured_log(formatter: logging.Formatter) -> Iterator[io.StringIO]:
    """Every kins_tunnel log record, at DEBUG and up, formatted by `formatter` into a buffer."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(formatter)
    root = logging.getLogger("kins_tunnel")
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield buf
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def connect_lines(buf: io.StringIO) -> list[dict[str, Any]]:
    docs = [json.loads(line) for line in buf.getvalue().splitlines()]  # every line is JSON
    return [d for d in docs if d["logger"] == "kins_tunnel.cloud.proxy"]


async def test_connect_logs_are_json_and_never_carry_credentials(tmp_path: Path) -> None:
    token = "s3cr3t-Bearer-T0ken-4711"
    password = "pa55-w0rd-0815"
    (tmp_path / "bearer").write_text(token + "\n")
    (tmp_path / "basic").write_text(f"ops:{password}\n")
    basic = base64.b64encode(f"ops:{password}".encode()).decode()
    wrong_basic = base64.b64encode(f"ops:{password}-nope".encode()).decode()
    auth = {
        "auth": {"bearer_file": str(tmp_path / "bearer"), "basic_file": str(tmp_path / "basic")}
    }
    async with json_log() as buf, trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        async with tunnel_env(tmp_path, {SVC: f"127.0.0.1:{echo}"}, proxy=auth) as env:
            status, head, s = await connect(
                env.ports.proxy, SVC, f"Proxy-Authorization: Bearer {token}\r\n"
            )
            assert status == 200, head
            async with s:
                await echo_roundtrip(s, b"hello")
            status, head, s = await connect(
                env.ports.proxy, SVC, f"Proxy-Authorization: Basic {basic}\r\n"
            )
            assert status == 200, head
            async with s:
                await echo_roundtrip(s, b"hello again")
            for hdr in (
                f"Proxy-Authorization: Bearer {token}x\r\n",
                f"Proxy-Authorization: Basic {wrong_basic}\r\n",
            ):
                status, head, s = await connect(env.ports.proxy, SVC, hdr)
                await s.aclose()
                assert status == 407, head
            status, head, s = await connect(
                env.ports.proxy,
                "nowhere-svc-kins.kins-system:443",
                f"Proxy-Authorization: Bearer {token}\r\n",
            )
            await s.aclose()
            assert status == 503
            await wait_for(lambda: sum(d["msg"] == "CONNECT done" for d in connect_lines(buf)) == 2)
        n.cancel_scope.cancel()
    text = buf.getvalue()
    for secret in (token, password, basic, wrong_basic):
        assert secret not in text
    lines = connect_lines(buf)
    done = [d for d in lines if d["msg"] == "CONNECT done"]
    refused = [d for d in lines if d["msg"] == "CONNECT refused"]
    assert len(lines) == len(done) + len(refused) == 5  # one line per CONNECT
    for d in done:  # who served it, which stream, where to, how it ended
        assert (d["unit"], d["node"], d["target"], d["outcome"]) == ("test", "edge1", SVC, "closed")
        assert isinstance(d["stream"], int)
    assert len({d["stream"] for d in done}) == 2
    assert sorted(r["status"] for r in refused) == [407, 407, 503]
    assert all(r["target"] and r["outcome"] for r in refused)


# ---------------------------------------------------------------- kins-tunnel status
async def test_status_command_lists_connected_edges(tmp_path: Path) -> None:
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        async with tunnel_env(tmp_path, replica="cloud-a", tunnel=FAST) as env:
            await env.add_edge({SVC: f"127.0.0.1:{echo}"}, wait_for=SVC, ping_interval=0.2)
            await env.add_edge({"edge2:22": f"127.0.0.1:{echo}"}, node="edge2", wait_for="edge2:22")
            await wait_for(lambda: all(t.session.rtt is not None for t in env.cloud.registry))
            status, head, s = await connect(env.ports.proxy, SVC)
            assert status == 200, head
            async with s:
                await echo_roundtrip(s, b"x" * 5000)
                admin = f"http://127.0.0.1:{env.ports.admin}"
                r = await run_kins_tunnel("status", "--admin", admin)
                assert r.returncode == 0, r.stderr
                lines = r.stdout.decode().splitlines()
                assert lines[-1].startswith(
                    "cloud-a: cloud certificate expires 8"
                )  # 825 days from certs init
                rows = [line.split() for line in lines[:-1]]
                assert rows[0] == [
                    "UNIT",
                    "NODE",
                    "REPLICA",
                    "UPTIME",
                    "RTT",
                    "STREAMS",
                    "SENT",
                    "RECEIVED",
                    "EXPIRES",
                    "PEER",
                    "QDELAY",
                ]
                by_node = {row[1]: row for row in rows[1:]}
                assert set(by_node) == {"edge1", "edge2"}
                e1 = by_node["edge1"]
                assert e1[0] == "test" and e1[2] == "cloud-a"
                assert e1[4].endswith("ms") and float(e1[4][:-2]) > 0
                assert e1[5] == "1"  # the stream above is open
                assert e1[6].endswith("KiB") and e1[7].endswith(
                    "KiB"
                )  # 5000 bytes each way and more
                assert (
                    e1[8].endswith("d") and int(e1[8][:-1]) > 800
                )  # the edge certificate: 825 days
                assert e1[9].startswith("127.0.0.1:")
                # the queueing delay the cloud's direction adds: measured once data flowed
                assert e1[10] == "-" or (e1[10].endswith("ms") and float(e1[10][:-2]) >= 0)

                r = await run_kins_tunnel("status", "--admin", admin, "--json")
                doc = json.loads(r.stdout)
                assert doc["replica"] == "cloud-a" and doc["ready"] is True
                assert {e["node"]: e["streams"] for e in doc["edges"]} == {"edge1": 1, "edge2": 0}

                r = await run_kins_tunnel(
                    "status", "--admin", admin, "--admin", admin
                )  # several replicas
                assert (
                    len(r.stdout.decode().splitlines()) == 5 + 2
                )  # and each one's own certificate
        n.cancel_scope.cancel()
    r = await run_kins_tunnel("status", "--admin", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 2 and b"Traceback" not in r.stderr
    assert r.stderr.decode().startswith("kins-tunnel: error: cannot read http://127.0.0.1:")


# ---------------------------------------------------------------- certificate rotation
def serial(der: bytes | None) -> int:
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def file_serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


async def test_renewed_certificates_apply_to_new_tunnels_and_keep_streams(tmp_path: Path) -> None:
    watch_time = [0.0]  # the clock of the cloud's certificate watcher, moved by the test
    async with trio.open_nursery() as n:
        echo = await n.start(serve_echo)
        async with tunnel_env(
            tmp_path, {SVC: f"127.0.0.1:{echo}"}, watch_clock=lambda: watch_time[0]
        ) as env:
            certs = env.certs
            (edge1,) = env.edges
            old_cloud = file_serial(certs / "cloud.crt")
            assert (
                int(str(next(iter(edge1.cloud_certs.values()))["cloud_cert_serial"]), 16)
                == old_cloud
            )
            status, head, s = await connect(env.ports.proxy, SVC)
            assert status == 200, head
            async with s:
                await echo_roundtrip(s, b"before")
                # Renew the cloud certificate (same CA) and edge1's certificate.
                init_ca(certs)
                issue_edge(certs, "test", "edge1")
                new_cloud, new_edge1 = (
                    file_serial(certs / "cloud.crt"),
                    file_serial(certs / "edge-edge1.crt"),
                )
                assert new_cloud != old_cloud
                # the cloud looks at the files at most once a second, when a handshake comes: a
                # second passes on the watcher's clock
                watch_time[0] += 1.0
                edge2 = await env.add_edge(
                    {"edge2:22": f"127.0.0.1:{echo}"}, node="edge2", wait_for="edge2:22"
                )
                # the new tunnel was served with the new cloud certificate
                assert (
                    int(str(next(iter(edge2.cloud_certs.values()))["cloud_cert_serial"]), 16)
                    == new_cloud
                )
                assert env.cloud.tls.reloads == 1
                # the old tunnel and its stream were not touched
                assert edge1.connects == 1 and len(env.cloud.registry) == 2
                await echo_roundtrip(s, b"after")
                # edge1 uses its renewed certificate on its next tunnel
                (t1,) = [t for t in env.cloud.registry if t.identity.node == "edge1"]
                t1.session.close("test: reconnect")
            await wait_for(lambda: edge1.connects == 2 and len(env.cloud.registry) == 2)
            (t1,) = [t for t in env.cloud.registry if t.identity.node == "edge1"]
            assert serial(t1.session.tls.peer_certificate_der()) == new_edge1
            assert edge1.tls.reloads == 1
            assert (
                int(str(next(iter(edge1.cloud_certs.values()))["cloud_cert_serial"]), 16)
                == new_cloud
            )
        n.cancel_scope.cancel()


async def test_half_written_renewal_keeps_the_previous_context(tmp_path: Path) -> None:
    async with tunnel_env(tmp_path) as env:
        key = (env.certs / "cloud.key").read_bytes()
        init_ca(env.certs)
        (env.certs / "cloud.key").write_bytes(key)  # new certificate, old key: does not load
        assert env.cloud.tls.check() is False
        assert env.cloud.tls.reloads == 0
        async with trio.open_nursery() as n:  # still serving with the previous context
            edge, _ = await start_edge(
                n, tmp_path, env.certs, [env.ports.tunnel], {SVC: "127.0.0.1:1"}
            )
            await wait_routed(env.cloud, SVC)
            n.cancel_scope.cancel()


# ---------------------------------------------------------------- DNS: a name with several addresses
HEADLESS = "tunnel-cloud-headless.test"


class FakeDNS(trio.abc.HostnameResolver):
    """HEADLESS resolves to `answer` (or fails when it is None); other names go to the system."""

    def __init__(self, answer: list[str]) -> None:
        self.answer: list[str] | None = answer
        self.lookups = 0

    async def getaddrinfo(
        self,
        host: bytes | str | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[Any]:
        name = host.decode() if isinstance(host, bytes) else host
        if name == HEADLESS:
            await trio.lowlevel.checkpoint()
            self.lookups += 1
            if self.answer is None:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return [
                (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, int(port or 0)))
                for ip in self.answer
            ]
        return await trio.to_thread.run_sync(
            socket.getaddrinfo, host, port, family, type, proto, flags
        )

    async def getnameinfo(self, sockaddr: tuple[Any, ...], flags: int) -> tuple[str, str]:
        raise NotImplementedError


async def test_edge_follows_a_name_with_several_addresses(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    init_ca(certs, [HEADLESS])
    make_certs(tmp_path)
    port = free_port()
    ips = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    dns = FakeDNS(ips[:2])
    previous = trio.socket.set_custom_hostname_resolver(dns)
    try:
        async with trio.open_nursery() as n:
            echo = await n.start(serve_echo)
            clouds: dict[str, tuple[Cloud, CloudPorts]] = {}
            for ip in ips:
                cfg = cloud_dict(
                    certs, tunnel={"listen": f"{ip}:{port}"}, replica=f"cloud-{ip[-1]}"
                )
                cloud = Cloud(cloud_config_from_dict(cfg, base_dir=tmp_path))
                clouds[ip] = (cloud, await n.start(cloud.run))
            edge, _ = await start_edge(
                n,
                tmp_path,
                certs,
                [f"{HEADLESS}:{port}"],
                {SVC: f"127.0.0.1:{echo}"},
                resolve_interval=0.1,
            )
            for ip in ips[:2]:
                await wait_routed(clouds[ip][0], SVC)
            assert set(edge.sessions) == {f"127.0.0.1:{port}", f"127.0.0.2:{port}"}
            assert not clouds["127.0.0.3"][0].registry.serves(SVC)

            # A stream through replica 2, which is about to leave DNS.
            status, head, s = await connect(clouds["127.0.0.2"][1].proxy, SVC)
            assert status == 200, head
            async with s:
                await echo_roundtrip(s, b"through replica 2")
                dns.answer = [ips[0], ips[2]]  # replica 2 went away, replica 3 came
                await wait_routed(clouds["127.0.0.3"][0], SVC)
                # Replica 2's tunnel takes no new streams, but the open one goes on.
                cloud2 = clouds["127.0.0.2"][0]
                await wait_for(lambda: not cloud2.registry.candidates(SVC))
                assert len(cloud2.registry) == 1
                await echo_roundtrip(s, b"still flowing")
            # Once its last stream is done the edge closes it.
            await wait_for(lambda: len(cloud2.registry) == 0, timeout=5)
            await wait_for(lambda: set(edge.sessions) == {f"127.0.0.1:{port}", f"127.0.0.3:{port}"})
            status, head, s = await connect(clouds["127.0.0.2"][1].proxy, SVC)
            await s.aclose()
            assert status == 503
            connects = edge.connects

            # DNS trouble does not cut working tunnels.
            dns.answer = None
            seen = dns.lookups
            await wait_for(lambda: dns.lookups >= seen + 3)
            assert set(edge.sessions) == {f"127.0.0.1:{port}", f"127.0.0.3:{port}"}
            assert edge.connects == connects
            for ip in (ips[0], ips[2]):
                status, head, s = await connect(clouds[ip][1].proxy, SVC)
                async with s:
                    assert status == 200, head
                    await echo_roundtrip(s, b"ok")
            n.cancel_scope.cancel()
    finally:
        trio.socket.set_custom_hostname_resolver(previous)
