"""`kins-tunnel doctor` as a process against real cloud and edge processes on 127.0.0.0/8 (and,
for clock skew, a stand-in cloud whose HELLO states a clock that is off).

A working pair gives only ok lines and exit 0 (and the probe leaves the live edge's tunnel alone);
each broken case gives FAIL on its own line with exit code 1 while the other checks still report;
`--json` parses; a peer that never answers costs at most the deadline.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio
import yaml

from kins_tunnel.certs.directory import init_ca, issue_edge
from kins_tunnel.proto import Hello, MuxConfig
from kins_tunnel.proto.frames import FrameType, frame
from kins_tunnel.proto.handshake import encode_hello
from kins_tunnel.testing.support import free_port, run_kins_tunnel
from kins_tunnel.tls_contexts import server_ssl_context
from tests.e2e.faultkit import CloudProc, Procs, edges_of, procs, wait_cloud_up, wait_edges
from tests.e2e.harness import SVC, edge_dict, make_certs, serve_loopback, write_yaml
from tests.e2e.test_enroll import cloud_doc, edge_doc, edge_with_token, enrolled_edge, make_cloud
from tests.e2e.test_site_proxy import needs_tinyproxy, tinyproxy


@contextmanager
def listening() -> Iterator[int]:
    """A port that accepts TCP (the kernel completes the handshake; nothing is read)."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        yield srv.getsockname()[1]


async def doctor(config: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    """Run `kins-tunnel doctor --json CONFIG EXTRA...`: (exit code, the parsed document)."""
    done = await run_kins_tunnel("doctor", "--config", str(config), "--json", *extra, timeout=60)
    doc = json.loads(done.stdout)
    assert doc["ok"] == (done.returncode == 0), doc
    return done.returncode, doc


def line(doc: dict[str, Any], check: str) -> dict[str, str]:
    found = [c for c in doc["checks"] if c["check"] == check]
    assert len(found) == 1, (check, [c["check"] for c in doc["checks"]])
    return {k: str(v) for k, v in found[0].items()}


def failed(doc: dict[str, Any]) -> list[str]:
    return [c["check"] for c in doc["checks"] if c["status"] == "FAIL"]


def edge_yaml(
    ps: Procs, name: str, cloud: list[str], services: dict[str, Any], **over: Any
) -> Path:
    doc = edge_dict(ps.certs, cloud, services, **over)
    return write_yaml(ps.base / f"{name}.yaml", doc)


async def up(ps: Procs, **over: Any) -> CloudProc:
    cloud = ps.cloud(**over)
    await wait_cloud_up(cloud)
    return cloud


async def test_working_pair_is_all_ok_and_the_probe_leaves_the_tunnel_alone(
    tmp_path: Path,
) -> None:
    with procs(tmp_path) as ps, listening() as k3s:
        cloud = await up(ps)
        edge = ps.edge(cloud.tunnel, {SVC: f"127.0.0.1:{k3s}"})
        await wait_edges(cloud, 1)
        (before,) = await edges_of(cloud)
        tunnel = f"127.0.0.1:{cloud.tunnel}"

        done = await run_kins_tunnel("doctor", "--config", str(edge.config))
        lines = done.stdout.decode().splitlines()
        assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
        assert lines and all(ln.startswith("ok ") for ln in lines), lines

        code, doc = await doctor(edge.config)
        assert code == 0 and doc["role"] == "edge" and failed(doc) == []
        tls = line(doc, f"cloud {tunnel} TLS")
        assert tls["status"] == "ok" and "accepted this edge's certificate" in tls["detail"]
        assert "names 127.0.0.1" in tls["detail"]
        clock = line(doc, f"cloud {tunnel} clock")  # same host: measured, and small
        assert clock["status"] == "ok" and "of the cloud's clock" in clock["detail"], clock
        assert line(doc, f"service {SVC} -> 127.0.0.1:{k3s}")["status"] == "ok"
        assert line(doc, "edge identity")["detail"] == "unit test, node edge1"
        assert line(doc, "admin.listen")["detail"].endswith("is in use by the running edge")
        assert line(doc, "running edge")["detail"] == (
            f"admin /readyz at 127.0.0.1:{edge.admin} answers 200 ready"
        )

        (after,) = await edges_of(cloud)  # the live tunnel was neither displaced nor doubled
        assert after["peer"] == before["peer"] and after["names"] == before["names"], after

        code, doc = await doctor(cloud.config)  # the cloud's own config, with the cloud running
        assert code == 0 and doc["role"] == "cloud", doc
        assert line(doc, "running cloud")["detail"].startswith(
            f"admin /readyz at 127.0.0.1:{cloud.admin} answers 200"
        )
        assert "in use by the running cloud" in line(doc, "tunnel.listen")["detail"]
        # certs init names only localhost and 127.0.0.1: fine here, a warning for real use
        assert line(doc, "cloud certificate names")["status"] == "warn"


async def test_network_failures_each_on_their_own_line(tmp_path: Path) -> None:
    with procs(tmp_path) as ps, listening() as ok_port:
        cloud = await up(ps)
        closed, refused_service = free_port(), free_port()
        cfg = edge_yaml(
            ps,
            "edge",
            [
                "no-such-cloud.invalid:9000",
                f"127.0.0.1:{closed}",  # cloud not listening
                f"127.0.0.1:{cloud.tunnel}",  # the working one still checks out
                f"127.0.0.1:{cloud.proxy}",  # the proxy's port, not the tunnel's
            ],
            {
                SVC: f"127.0.0.1:{ok_port}",
                "edge1:22": f"127.0.0.1:{refused_service}",
                # one of two addresses down: the edge tries the other, so a warning
                "edge1:80": [f"127.0.0.1:{refused_service}", f"127.0.0.1:{ok_port}"],
                "edge2:22": f"127.0.0.1:{ok_port}",  # another node's name: never routed here
            },
            admin={"listen": f"127.0.0.1:{cloud.proxy}"},  # taken, by something that is no edge
        )
        code, doc = await doctor(cfg)
        assert code == 1
        service = f"service edge1:22 -> 127.0.0.1:{refused_service}"
        assert sorted(failed(doc)) == sorted(
            [
                "cloud no-such-cloud.invalid:9000 resolves",
                f"cloud 127.0.0.1:{closed} reachable",
                f"cloud 127.0.0.1:{cloud.proxy} TLS",
                service,
                "service edge2:22 name",
                "admin.listen",
            ]
        ), doc
        assert (
            "does not resolve" in line(doc, "cloud no-such-cloud.invalid:9000 resolves")["detail"]
        )
        refused = line(doc, f"cloud 127.0.0.1:{closed} reachable")
        assert "refused" in refused["detail"].lower() and "nothing listens" in refused["fix"]
        not_tls = line(doc, f"cloud 127.0.0.1:{cloud.proxy} TLS")
        assert not_tls["detail"] == "the peer does not speak TLS", not_tls
        assert "tunnel.listen" in not_tls["fix"]
        taken = line(doc, "admin.listen")
        assert "is in use by another program (no edge admin /readyz answers" in taken["detail"]
        other_node = line(doc, "service edge2:22 name")
        assert "does not route edge2:22 to this edge" in other_node["detail"], other_node
        assert "test-svc-kins.kins-system:<port> and edge1:<port>" in other_node["detail"]
        got = line(doc, service)
        assert "refused" in got["detail"].lower() and "start the service" in got["fix"]
        assert line(doc, f"cloud 127.0.0.1:{cloud.tunnel} TLS")["status"] == "ok"
        assert line(doc, f"service {SVC} -> 127.0.0.1:{ok_port}")["status"] == "ok"
        spare = line(doc, f"service edge1:80 -> 127.0.0.1:{refused_service}")
        assert spare["status"] == "warn" and "another address of this service" in spare["detail"]
        assert line(doc, f"service edge1:80 -> 127.0.0.1:{ok_port}")["status"] == "ok"


async def test_certificate_failures_name_the_cause(tmp_path: Path) -> None:
    other = tmp_path / "other"
    init_ca(other)
    issue_edge(other, "test", "edge1")
    with procs(tmp_path) as ps, listening() as k3s:
        make_certs(tmp_path, (("test", "edge1"), ("test", "edge2")))
        revoked = tmp_path / "revoked.txt"
        revoked.write_text("test/edge2\n")
        cloud = await up(ps, tunnel={"revoked_file": str(revoked)})
        # a second cloud on 127.0.0.2: its certificate names only localhost and 127.0.0.1
        aside = await up(ps, name="aside", tunnel={"listen": f"127.0.0.2:{free_port()}"})
        aside_port = int(yaml.safe_load(aside.config.read_text())["tunnel"]["listen"].split(":")[1])
        services = {SVC: f"127.0.0.1:{k3s}"}
        tunnel = f"127.0.0.1:{cloud.tunnel}"
        certs = ps.certs

        cases: list[tuple[str, dict[str, Any], str, str, str]] = [
            (  # the edge trusts another CA than the one that issued the cloud's certificate
                "wrong-ca",
                {"ca": str(other / "ca.crt")},
                f"cloud {tunnel} TLS",
                "not signed by the CA in tls.ca",
                "ca.crt of the CA that issued the cloud's certificate",
            ),
            (  # the edge's certificate comes from a CA the cloud does not trust
                "foreign-edge-cert",
                {"cert": str(other / "edge-edge1.crt"), "key": str(other / "edge-edge1.key")},
                f"cloud {tunnel} TLS",
                "does not trust the CA that issued this edge's certificate",
                "the CA in the cloud's tls.ca",
            ),
            (
                "revoked",
                {"cert": str(certs / "edge-edge2.crt"), "key": str(certs / "edge-edge2.key")},
                f"cloud {tunnel} TLS",
                "closed the connection after the TLS handshake",
                "edge handshake refused",
            ),
            (
                "other-host",
                {},
                f"cloud 127.0.0.2:{aside_port} TLS",
                "does not name 127.0.0.2 (it names: localhost, 127.0.0.1)",
                "--cloud-san 127.0.0.2",
            ),
        ]
        for name, tls_over, check, detail, fix in cases:
            tls = {
                "ca": str(certs / "ca.crt"),
                "cert": str(certs / "edge-edge1.crt"),
                "key": str(certs / "edge-edge1.key"),
                **tls_over,
            }
            target = f"127.0.0.2:{aside_port}" if name == "other-host" else tunnel
            cfg = edge_yaml(ps, name, [target], services, tls=tls)
            code, doc = await doctor(cfg)
            assert code == 1, (name, doc)
            got = line(doc, check)
            assert got["status"] == "FAIL" and detail in got["detail"] and fix in got["fix"], (
                name,
                got,
            )
            assert line(doc, f"service {SVC} -> 127.0.0.1:{k3s}")["status"] == "ok", name
        assert "revoked" in cloud.log.read_text()  # the cloud refused it for that reason


async def test_edge_certificate_expiry(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    with procs(tmp_path) as ps, listening() as k3s:
        cloud = await up(ps)
        certs = ps.certs
        results = {}
        for node, days, issued in (
            ("expired", 1, now - dt.timedelta(days=2)),
            ("last-hours", 1, now - dt.timedelta(hours=12)),  # 12 hours left
            ("ten-days", 825, now - dt.timedelta(days=815)),  # 10 of 825 days left
            ("thirty-days", 30, now - dt.timedelta(days=20)),  # 10 of 30, and no enroll: manual
        ):
            issue_edge(certs, "test", node, days=days, _now=issued)
            tls = {
                "ca": str(certs / "ca.crt"),
                "cert": str(certs / f"edge-{node}.crt"),
                "key": str(certs / f"edge-{node}.key"),
            }
            cfg = edge_yaml(
                ps, node, [f"127.0.0.1:{cloud.tunnel}"], {SVC: f"127.0.0.1:{k3s}"}, tls=tls
            )
            results[node] = await doctor(cfg)

        code, doc = results["expired"]
        assert code == 1 and line(doc, "edge certificate validity")["status"] == "FAIL"
        assert "expired" in line(doc, "edge certificate validity")["detail"]
        tls_line = line(doc, f"cloud 127.0.0.1:{cloud.tunnel} TLS")  # the cloud refuses it too
        assert tls_line["status"] == "FAIL" and "expired" in tls_line["detail"], tls_line

        code, doc = results["last-hours"]
        assert code == 1 and failed(doc) == ["edge certificate validity"], doc
        assert "less than a day" in line(doc, "edge certificate validity")["detail"]

        code, doc = results["ten-days"]  # a warning: still works, exit 0
        assert code == 0 and failed(doc) == [], doc
        warn = line(doc, "edge certificate validity")
        assert warn["status"] == "warn" and "renew it soon" in warn["detail"], warn

        # nothing renews a certificate of an edge without enroll, however long it was issued
        # for (an enrolled edge's one: tests/test_doctor.py::test_validity_thresholds)
        code, doc = results["thirty-days"]
        warn = line(doc, "edge certificate validity")
        assert code == 0 and warn["status"] == "warn" and "renew it soon" in warn["detail"], doc


async def test_site_proxy_down_and_up(tmp_path: Path) -> None:
    with procs(tmp_path) as ps, listening() as k3s:
        cloud = await up(ps)
        target = f"127.0.0.1:{cloud.tunnel}"
        cfg = edge_yaml(
            ps,
            "down",
            [target],
            {SVC: f"127.0.0.1:{k3s}"},
            proxy={"url": f"http://127.0.0.1:{free_port()}"},
        )
        code, doc = await doctor(cfg)
        assert code == 1
        site = line(doc, "site proxy")
        assert site["status"] == "FAIL" and "cannot connect to proxy" in site["detail"], site
        assert line(doc, f"cloud {target} reachable")["fix"] == "see the site proxy line"
        assert line(doc, f"service {SVC} -> 127.0.0.1:{k3s}")["status"] == "ok"


@needs_tinyproxy
async def test_through_a_real_site_proxy(tmp_path: Path) -> None:
    with procs(tmp_path) as ps, listening() as k3s:
        cloud = await up(ps)
        target = f"127.0.0.1:{cloud.tunnel}"
        with tinyproxy(tmp_path, cloud.tunnel) as tp:
            cfg = edge_yaml(ps, "edge", [target], {SVC: f"127.0.0.1:{k3s}"}, proxy={"url": tp.url})
            code, doc = await doctor(cfg)
            assert code == 0 and failed(doc) == [], doc
            assert line(doc, "site proxy")["detail"].endswith(f"answered a CONNECT to {target}")
            assert line(doc, f"cloud {target} reachable")["detail"] == (
                "TCP connects through the site proxy"
            )
            assert line(doc, f"cloud {target} TLS")["status"] == "ok"
            assert tp.connects(target) >= 2  # the proxy check and the TLS probe
        code, doc = await doctor(cfg)  # the proxy is gone now
        assert code == 1 and line(doc, "site proxy")["status"] == "FAIL"


async def test_a_silent_cloud_costs_the_deadline_only(tmp_path: Path) -> None:
    with procs(tmp_path) as ps, listening() as silent, listening() as k3s:
        make_certs(tmp_path)
        cfg = edge_yaml(ps, "edge", [f"127.0.0.1:{silent}"], {SVC: f"127.0.0.1:{k3s}"})
        started = time.monotonic()
        code, doc = await doctor(cfg, "--timeout", "2")
        took = time.monotonic() - started
        assert code == 1
        tls = line(doc, f"cloud 127.0.0.1:{silent} TLS")
        assert tls["status"] == "FAIL" and "no TLS answer within 1s" in tls["detail"], tls
        assert line(doc, f"service {SVC} -> 127.0.0.1:{k3s}")["status"] == "ok"
        assert took < 10, took  # interpreter start-up included


async def test_enrolment_before_and_after_a_real_enrolment(tmp_path: Path) -> None:
    """An edge config with only a token file and the CA hash "will enrol"; after a real
    enrolment against a cloud with `enrollment:` the same config is enrolled and all ok, and the
    cloud's config passes its enrolment checks."""
    cloud = make_cloud(tmp_path)
    cloud_yaml = write_yaml(tmp_path / "cloud.yaml", cloud_doc(tmp_path))
    with listening() as k3s:
        async with trio.open_nursery() as nursery:
            ports = await nursery.start(cloud.run)
            target = f"127.0.0.1:{ports.tunnel}"
            doc = edge_doc(tmp_path, ports.tunnel)
            config = write_yaml(
                tmp_path / "edge.yaml", {**doc, "services": {"edge1:22": f"127.0.0.1:{k3s}"}}
            )
            code, report = await doctor(config)
            got = line(report, "enrolment")
            assert code == 1 and got["status"] == "FAIL", report
            assert got["detail"].startswith("token file missing: enroll.token_file"), got

            cfg = edge_with_token(tmp_path, ports.tunnel)
            token_id = cfg.enroll.token_file.read_text()[:6]
            code, report = await doctor(config)
            assert code == 0, report
            assert line(report, "enrolment")["detail"] == (
                f"will enrol with token {token_id} from {cfg.enroll.token_file} (ca_hash pinned)"
            )
            assert line(report, "edge certificate")["detail"].startswith("none usable yet")
            tls = line(report, f"cloud {target} TLS")
            assert tls["status"] == "warn" and "no edge certificate yet" in tls["detail"]

            await enrolled_edge(nursery, cloud, tmp_path, ports.tunnel, cfg)
            code, report = await doctor(config)
            assert code == 0 and report["ok"], report
            assert [c for c in report["checks"] if c["status"] != "ok"] == []
            enrolled = line(report, "enrolment")["detail"]
            assert enrolled.startswith("enrolled (cert present, unit test, node edge1, expires ")
            validity = line(report, "edge certificate validity")["detail"]
            assert validity.endswith("(renewed automatically from 67% of its lifetime)")
            assert line(report, "edge identity")["detail"] == "unit test, node edge1"
            assert (
                "accepted this edge's certificate" in line(report, f"cloud {target} TLS")["detail"]
            )

            code, report = await doctor(cloud_yaml)
            assert code == 0, report
            tokens = line(report, "enrollment.tokens_file")
            assert "tokens: 1, unexpired with uses left: 0" in tokens["detail"], tokens  # used
            assert line(report, "enrollment.ca")["status"] == "ok"
            assert line(report, "enrollment.ca validity")["status"] == "ok"
            nursery.cancel_scope.cancel()


async def test_cloud_config_failures(tmp_path: Path) -> None:
    with procs(tmp_path) as ps:
        cloud = ps.cloud(start=False)
        doc0 = yaml.safe_load(cloud.config.read_text())
        authz = tmp_path / "authz.yaml"
        authz.write_text("rules:\n  - principals: [alice]\n    allow: [nonsense]\n")
        basic = tmp_path / "basic"
        basic.write_text("alice:secret\n")
        basic.chmod(0o644)  # passwords every user of the host may read
        ticket_key = tmp_path / "ticket.key"
        ticket_key.write_text("not a hex secret\n")
        with socket.create_server(("127.0.0.1", 0)) as squatter:
            busy = squatter.getsockname()[1]
            doc0["proxy"] = {
                **doc0["proxy"],
                "auth": {"basic_file": str(basic)},
                "authz_file": str(authz),
            }
            doc0["tunnel"] = {
                "listen": f"127.0.0.1:{busy}",
                "session_ticket_key_file": str(ticket_key),
            }
            cfg = write_yaml(tmp_path / "bad-cloud.yaml", doc0)
            code, doc = await doctor(cfg)
        assert code == 1 and doc["role"] == "cloud"
        assert sorted(failed(doc)) == [
            "proxy.authz_file",
            "tunnel.listen",
            "tunnel.session_ticket_key_file",
        ], doc
        assert "64 to 256 hex digits" in line(doc, "tunnel.session_ticket_key_file")["detail"]
        assert "in use by another program" in line(doc, "tunnel.listen")["detail"]
        assert line(doc, "proxy.auth.basic_file")["status"] == "ok"
        mode = line(doc, "proxy.auth.basic_file mode")
        assert mode["status"] == "warn" and "(mode 0644)" in mode["detail"], mode
        assert f"chmod 600 {basic}" in mode["fix"]

        broken = write_yaml(tmp_path / "typo.yaml", {**doc0, "tunnel": {"lisen": "x"}})
        code, doc = await doctor(broken, "--role", "cloud")
        assert code == 1 and failed(doc) == ["config"]
        assert "tunnel.lisen: unknown key" in line(doc, "config")["detail"]


async def test_text_output_is_one_line_per_check(tmp_path: Path) -> None:
    cfg = tmp_path / "nothing.yaml"
    done = await run_kins_tunnel("doctor", "--config", str(cfg))
    assert done.returncode == 1
    (only,) = done.stdout.decode().splitlines()
    assert only.startswith("FAIL  config: cannot read config") and "->" in only


async def skewed_cloud(context: ssl.SSLContext, skew: float, tcp: trio.SocketStream) -> None:
    """A stand-in cloud (the real cloud certificate, mutual TLS) whose HELLO states a clock `skew`
    seconds off this host's; for `serve_loopback`."""
    tls = trio.SSLStream(tcp, context, server_side=True)
    with trio.move_on_after(10):
        await tls.do_handshake()
        hello = Hello(agent="skewed-test-cloud", time=time.time() + skew)
        await tls.send_all(frame(FrameType.HELLO, 0, encode_hello(hello, MuxConfig())))
        while await tls.receive_some(4096):
            pass


async def test_clock_skew_is_measured_from_the_clouds_hello(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    context = server_ssl_context(certs / "ca.crt", certs / "cloud.crt", certs / "cloud.key")
    with listening() as k3s:
        async with trio.open_nursery() as nursery:
            results = {}
            for skew in (3600.0, -60.0, 0.0):
                port = await nursery.start(
                    serve_loopback, functools.partial(skewed_cloud, context, skew)
                )
                cfg = write_yaml(
                    tmp_path / "edge.yaml",
                    edge_dict(certs, [port], {SVC: f"127.0.0.1:{k3s}"}),
                )
                results[skew] = (port, await doctor(cfg))
            nursery.cancel_scope.cancel()

    port, (code, doc) = results[3600.0]
    clock = line(doc, f"cloud 127.0.0.1:{port} clock")
    assert code == 1 and clock["status"] == "FAIL", clock
    assert re.fullmatch(
        r"this node's clock is 3600\.\ds behind the cloud's \(.*\)", clock["detail"]
    )
    assert "skewed-test-cloud" in line(doc, f"cloud 127.0.0.1:{port} TLS")["detail"]

    port, (code, doc) = results[-60.0]
    clock = line(doc, f"cloud 127.0.0.1:{port} clock")
    assert code == 0 and clock["status"] == "warn", clock
    assert re.fullmatch(
        r"this node's clock is 60\.\ds ahead of the cloud's \(.*\)", clock["detail"]
    )

    port, (code, doc) = results[0.0]
    assert code == 0 and line(doc, f"cloud 127.0.0.1:{port} clock")["status"] == "ok", doc
