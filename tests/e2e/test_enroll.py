"""Enrolment with a token and renewal over the tunnel: a real cloud and real edges (trio tasks) on
127.0.0.1, real TLS. Each refusal is shown with its message and its metric on both sides; a
connection without a client certificate never reaches a tunnel session."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import ssl
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from kins_tunnel.certs.directory import init_ca, issue_edge
from kins_tunnel.certs.identity import RENEW_TARGET, EdgeIdentity, identity_from_der
from kins_tunnel.certs.issuing import ca_hash_of_file, edge_csr
from kins_tunnel.cloud import enroll as cloud_enroll
from kins_tunnel.cloud.revocation import RevokedList
from kins_tunnel.cloud.server import Cloud
from kins_tunnel.config import SiteProxy, cloud_config_from_dict, edge_config_from_dict
from kins_tunnel.edge.agent import Edge
from kins_tunnel.edge.enroll import Enrolment
from kins_tunnel.edge.enroll_checks import EnrolError
from kins_tunnel.jsonhttp import json_request
from kins_tunnel.metrics import Metrics
from kins_tunnel.testing.support import run_kins_tunnel, wait_until
from kins_tunnel.tokens import create_token, parse_duration, read_tokens
from tests.e2e.harness import cloud_dict, connect, echo_bytes, edge_dict, serve_loopback
from tests.e2e.test_site_proxy import needs_tinyproxy, tinyproxy

HOUR = parse_duration("1h")


def sample(metrics: Metrics, name: str, result: str) -> float:
    return metrics.registry.get_sample_value(f"kins_tunnel_{name}_total", {"result": result}) or 0


def cloud_doc(base: Path, *, ca: bool = True, **over: Any) -> dict[str, Any]:
    """A cloud config (as written in cloud.yaml) with `enrollment`: CA and issuing CA in
    BASE/certs, tokens in BASE/tokens.yaml."""
    certs = base / "certs"
    if not (certs / "ca.crt").exists():
        init_ca(certs, issuing_ca=True)
    tokens = base / "tokens.yaml"
    if not tokens.exists():
        tokens.write_text("")
    enrollment: dict[str, Any] = {"tokens_file": str(tokens)}
    if ca:
        enrollment["ca"] = {"cert": str(certs / "issuing.crt"), "key": str(certs / "issuing.key")}
    enrollment.update(over.pop("enrollment", {}))
    return cloud_dict(certs, enrollment=enrollment, **over)


def make_cloud(base: Path, *, ca: bool = True, **over: Any) -> Cloud:
    return Cloud(cloud_config_from_dict(cloud_doc(base, ca=ca, **over), base_dir=base))


def edge_doc(base: Path, port: int, *, node: str | None = "edge1", **enroll: Any) -> dict[str, Any]:
    """An edge config (as written in edge.yaml) with only a token file and the CA hash (no
    certificate yet)."""
    d = base / f"edge-{node or 'any'}"
    settings = {
        "token_file": str(d / "token"),
        "ca_hash": ca_hash_of_file(base / "certs" / "ca.crt"),
        **({"node": node} if node else {}),
        **enroll,
    }
    return {
        "cloud": [f"127.0.0.1:{port}"],
        "tls": {"ca": str(d / "ca.crt"), "cert": str(d / "tls.crt"), "key": str(d / "tls.key")},
        "services": {f"{node or 'edge1'}:22": "127.0.0.1:9"},
        "admin": None,
        "reconnect": {"initial": 0.05, "max": 0.5},
        "enroll": settings,
    }


def edge_cfg(base: Path, port: int, *, node: str | None = "edge1", **enroll: Any) -> Any:
    """`edge_doc`, loaded."""
    return edge_config_from_dict(edge_doc(base, port, node=node, **enroll), base_dir=base)


def give_token(cfg: Any, token: str) -> None:
    """Store `token` in the edge's token file, readable by its owner only (as deployed)."""
    cfg.enroll.token_file.parent.mkdir(parents=True, exist_ok=True)
    cfg.enroll.token_file.write_text(token + "\n")
    cfg.enroll.token_file.chmod(0o600)


def edge_with_token(base: Path, port: int) -> Any:
    """The config of node edge1 (`edge_cfg`) with a fresh token in its token file."""
    cfg = edge_cfg(base, port)
    give_token(cfg, create_token(base / "tokens.yaml", "test", "edge1", HOUR, 1))
    return cfg


async def enrolled_edge(
    nursery: trio.Nursery, cloud: Cloud, base: Path, port: int, cfg: Any = None
) -> Edge:
    """An edge of node edge1 (`cfg`, by default `edge_with_token`) that enrols with its token,
    once the cloud routes it."""
    edge = Edge(cfg or edge_with_token(base, port))
    await nursery.start(edge.run)
    # both ends: the cloud may route the tunnel a moment before the edge has dispatched its HELLO
    await wait_until(
        lambda: cloud.registry.serves("edge1:22") and edge.ready, 10, "enrolled edge routed"
    )
    return edge


async def test_edge_enrols_with_a_token_and_restarts_from_its_files(tmp_path: Path) -> None:
    cloud = make_cloud(tmp_path)
    token = create_token(tmp_path / "tokens.yaml", "test", "edge1", HOUR, 1)
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(cloud.run)
        cfg = edge_cfg(tmp_path, ports.tunnel)
        give_token(cfg, token)
        edge = Edge(cfg)
        assert edge.enrolment is not None and edge.enrolment.state == "enrolling"
        await nursery.start(edge.run)
        await wait_until(lambda: cloud.registry.serves("edge1:22"), 10, "enrolled edge routed")
        assert edge.identity is not None and (edge.identity.unit, edge.identity.node) == (
            "test",
            "edge1",
        )
        # the files: key 0600, certificate + issuing CA, and the pinned CA only
        assert cfg.tls.key.stat().st_mode & 0o777 == 0o600
        chain = x509.load_pem_x509_certificates(cfg.tls.cert.read_bytes())
        issuing = x509.load_pem_x509_certificate((tmp_path / "certs/issuing.crt").read_bytes())
        assert len(chain) == 2 and chain[1] == issuing
        assert cfg.tls.ca.read_bytes() == (tmp_path / "certs/ca.crt").read_bytes()
        life = chain[0].not_valid_after_utc - chain[0].not_valid_before_utc
        assert dt.timedelta(days=30) <= life <= dt.timedelta(days=30, minutes=6)
        assert sample(cloud.metrics, "enrollments", "ok") == 1
        assert sample(edge.metrics, "enrollments", "ok") == 1
        # the cloud could write the tokens file: the use is recorded there
        assert read_tokens(tmp_path / "tokens.yaml")[token[:6]].uses == 0
        assert cloud.enroll is not None and cloud.enroll.status()["uses_counted_in"] == "file"
        nursery.cancel_scope.cancel()
    # a restart needs no token any more: the stored files are used
    cfg.enroll.token_file.unlink()
    cloud = make_cloud(tmp_path)
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(cloud.run)
        edge = Edge(edge_cfg(tmp_path, ports.tunnel))
        assert edge.enrolment is not None and edge.enrolment.state == "enrolled"
        await nursery.start(edge.run)
        await wait_until(lambda: cloud.registry.serves("edge1:22"), 10, "restarted edge routed")
        assert sample(edge.metrics, "enrollments", "ok") == 0
        nursery.cancel_scope.cancel()


async def enrol_refused(cloud: Cloud, cfg: Any) -> EnrolError:
    with pytest.raises(EnrolError) as info:
        await Enrolment(cfg, Metrics("edge", lambda: ())).enrol_once(None)
    assert not cfg.tls.cert.exists() and not cfg.tls.key.exists()
    return info.value


async def test_each_refusal_has_its_message_and_metric(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = tmp_path / "tokens.yaml"
    used_tokens: list[str] = ["abcdef.0123456789abcdef"]
    (tmp_path / "revoked").write_text("test/edge9\n")
    cloud = make_cloud(tmp_path, tunnel={"revoked_file": str(tmp_path / "revoked")})
    issue_edge(tmp_path / "certs", "other", "edge5")  # a node held by another unit
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(cloud.run)
        other = Edge(
            edge_config_from_dict(
                edge_dict(tmp_path / "certs", [ports.tunnel], {"edge5:22": "127.0.0.1:9"}, "edge5"),
                base_dir=tmp_path,
            )
        )
        await nursery.start(other.run)
        await wait_until(lambda: cloud.registry.serves("edge5:22"), 10, "other unit's edge5")

        async def case(token: str, want: str, text: str, **kw: Any) -> None:
            base = tmp_path / f"case-{want}"
            base.mkdir()
            (base / "certs").symlink_to(tmp_path / "certs")
            cfg = edge_cfg(base, ports.tunnel, **kw)
            give_token(cfg, token)
            before = sample(cloud.metrics, "enrollments", want)
            exc = await enrol_refused(cloud, cfg)
            assert exc.reason == want, exc
            assert text in str(exc), exc
            assert sample(cloud.metrics, "enrollments", want) == before + 1

        def new(node: str | None = None, ttl: dt.timedelta = HOUR, uses: int = 1, **kw: Any) -> str:
            token = create_token(tokens, "test", node, ttl, uses, **kw)
            used_tokens.append(token)
            return token

        await case("abcdef.0123456789abcdef", "unknown_token", "unknown token")
        past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
        await case(new(now=past), "expired_token", "expired at")
        used = new(uses=1)
        await case(used, "wrong_unit", "is for unit 'test'", node="edge2", unit="prod")
        (tmp_path / "ok").mkdir()
        (tmp_path / "ok" / "certs").symlink_to(tmp_path / "certs")
        ok = Enrolment(
            edge_cfg(tmp_path / "ok", ports.tunnel, node="edge2"), Metrics("edge", lambda: ())
        )
        give_token(ok.cfg, used)
        await ok.enrol_once(None)  # takes the one use
        await case(used, "used_token", "no uses left", node="edge3")
        await case(
            new(node="edge1"), "identity_not_allowed", "enrols node 'edge1' only", node="edge4"
        )
        await case(new(), "reserved_name", "reserved", node="x-svc-kins")
        await case(new(), "node_taken", "held by an edge of unit 'other'", node="edge5")
        await case(new(), "revoked", "test/edge9 is revoked", node="edge9")
        await case(new(), "no_node", "names no node", node=None)
        nursery.cancel_scope.cancel()
    # refusals are logged on both sides, by token id, never with a token's secret
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "edge enrolment refused" in logged and "unknown_token" in logged  # 5 a second per source
    secrets = [line.split(".")[1] for line in used_tokens]
    assert secrets and not [s for s in secrets if s in logged]


async def test_failed_tokens_are_rate_limited_per_source(tmp_path: Path) -> None:
    cloud = make_cloud(tmp_path, enrollment={"max_failures_per_source": 2})
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(cloud.run)
        cfg = edge_cfg(tmp_path, ports.tunnel)
        give_token(cfg, "abcdef.0123456789abcdef")
        for _ in range(2):
            assert (await enrol_refused(cloud, cfg)).reason == "unknown_token"
        exc = await enrol_refused(cloud, cfg)
        assert exc.reason == "rate_limited" and "too many failed tokens" in str(exc)
        # even a good token waits: the address is limited before any token is looked at
        give_token(cfg, create_token(tmp_path / "tokens.yaml", "test", None, HOUR, 1))
        assert (await enrol_refused(cloud, cfg)).reason == "rate_limited"
        assert sample(cloud.metrics, "enrollments", "rate_limited") == 2
        assert sample(cloud.metrics, "enrollments", "unknown_token") == 2
        nursery.cancel_scope.cancel()


async def test_without_issuing_ca_enrolment_is_refused_clearly(tmp_path: Path) -> None:
    cloud = make_cloud(tmp_path, ca=False)
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(cloud.run)
        cfg = edge_cfg(tmp_path, ports.tunnel)
        give_token(cfg, create_token(tmp_path / "tokens.yaml", "test", None, HOUR, 1))
        exc = await enrol_refused(cloud, cfg)
        assert exc.reason == "no_issuing_ca" and "enrollment.ca" in str(exc)
        # a running edge keeps trying, says why in /status, counts it, and is not ready
        edge = Edge(cfg)
        await nursery.start(edge.run)
        await wait_until(
            lambda: sample(edge.metrics, "enrollments", "no_issuing_ca") >= 2, 10, "retries"
        )
        assert edge.enrolment is not None and not edge.ready
        doc = edge.enrolment.status()
        assert doc["enrollment"] == "enrolling" and "no_issuing_ca" in str(doc["last_error"])
        nursery.cancel_scope.cancel()


async def test_edge_refuses_a_cloud_whose_ca_does_not_match_the_hash(tmp_path: Path) -> None:
    cloud = make_cloud(tmp_path)
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(cloud.run)
        cfg = edge_cfg(tmp_path, ports.tunnel, ca_hash="sha256:" + "ab" * 32)
        give_token(cfg, create_token(tmp_path / "tokens.yaml", "test", "edge1", HOUR, 1))
        edge = Edge(cfg)
        await nursery.start(edge.run)
        await wait_until(
            lambda: sample(edge.metrics, "enrollments", "ca_hash_mismatch") >= 2, 10, "refusals"
        )
        assert edge.enrolment is not None
        assert "no CA the cloud sent matches enroll.ca_hash" in (edge.enrolment.last_error or "")
        # the token was never sent: the cloud saw no enrolment request at all
        samples = [
            s
            for m in cloud.metrics.registry.collect()
            if m.name == "kins_tunnel_enrollments"
            for s in m.samples
        ]
        assert not [s for s in samples if s.name.endswith("_total") and s.value], samples
        assert (
            read_tokens(tmp_path / "tokens.yaml")[cfg.enroll.token_file.read_text()[:6]].uses == 1
        )
        assert not cfg.tls.cert.exists() and not edge.ready
        nursery.cancel_scope.cancel()


def raw_client_context(alpn: list[str] | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


async def raw_exchange(port: int, alpn: list[str] | None, send: bytes) -> bytes:
    """A TLS client without a certificate: send `send`, return all it gets until EOF."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, raw_client_context(alpn), server_hostname="localhost")
    got = b""
    with trio.fail_after(10):
        try:
            await stream.do_handshake()
            await stream.send_all(send)
            while data := await stream.receive_some(65536):
                got += data
        except trio.BrokenResourceError:
            pass
    await trio.aclose_forcefully(stream)
    return got


HELLO = b"\x00\x00\x10\x00\x00\x00\x00\x00\x00KTUN\x00\x01\x00\x01{}"


async def test_connections_without_a_certificate_never_reach_a_tunnel_session(
    tmp_path: Path,
) -> None:
    cloud = make_cloud(tmp_path)
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(cloud.run)
        failures = cloud.metrics.handshake_failures
        for alpn in (["kins-tunnel/1"], None, ["h2", "http/1.1"]):
            before = failures.labels("no_certificate")._value.get()
            got = await raw_exchange(ports.tunnel, alpn, HELLO)
            assert got == b"", (alpn, got)  # not one byte of a HELLO or anything else comes back
            assert failures.labels("no_certificate")._value.get() == before + 1, alpn
        # the enrolment protocol speaks HTTP and nothing else: a HELLO is a bad request
        got = await raw_exchange(ports.tunnel, ["kins-enroll/1"], HELLO)
        assert got.startswith(b"HTTP/1.1 400 "), got
        got = await raw_exchange(
            ports.tunnel,
            ["kins-enroll/1"],
            b"GET /v1/ca HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        assert got.startswith(b"HTTP/1.1 200 ") and b"BEGIN CERTIFICATE" in got, got
        assert len(cloud.registry) == 0
        # a certificate that is presented must still verify, enrolment or not
        other = tmp_path / "other"
        init_ca(other)
        issue_edge(other, "test", "edge1")
        ctx = raw_client_context(["kins-tunnel/1"])
        ctx.load_cert_chain(other / "edge-edge1.crt", other / "edge-edge1.key")
        tcp = await trio.open_tcp_stream("127.0.0.1", ports.tunnel)
        stream = trio.SSLStream(tcp, ctx, server_hostname="localhost")
        with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
            await stream.do_handshake()
            await stream.send_all(HELLO)
            await stream.receive_some(100)
        await trio.aclose_forcefully(stream)
        await wait_until(
            lambda: failures.labels("unknown_ca")._value.get() == 1, 5, "unknown CA refused"
        )
        assert len(cloud.registry) == 0
        nursery.cancel_scope.cancel()


async def test_without_enrollment_the_listener_still_requires_certificates(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    init_ca(certs)
    cloud = Cloud(cloud_config_from_dict(cloud_dict(certs), base_dir=tmp_path))
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(cloud.run)
        got = await raw_exchange(ports.tunnel, ["kins-enroll/1"], b"GET /v1/ca HTTP/1.1\r\n\r\n")
        assert got == b""
        await wait_until(
            lambda: cloud.metrics.handshake_failures.labels("no_certificate")._value.get() == 1,
            5,
            "refused at TLS",
        )
        nursery.cancel_scope.cancel()


async def test_renewal_keeps_live_streams_and_the_next_tunnel_uses_the_new_certificate(
    tmp_path: Path,
) -> None:
    cloud = make_cloud(tmp_path, enrollment={"lifetime_days": 12 / 86400})  # 12 seconds
    async with trio.open_nursery() as nursery:
        echo = await nursery.start(serve_loopback, echo_bytes)
        ports = await nursery.start(cloud.run)
        cfg = edge_cfg(tmp_path, ports.tunnel)
        cfg = edge_config_from_dict(
            {
                "cloud": [f"127.0.0.1:{ports.tunnel}"],
                "tls": {k: str(getattr(cfg.tls, k)) for k in ("ca", "cert", "key")},
                "services": {"edge1:7": f"127.0.0.1:{echo}"},
                "admin": None,
                "reconnect": {"initial": 0.05, "max": 0.5},
                "enroll": {
                    "token_file": str(cfg.enroll.token_file),
                    "ca_hash": cfg.enroll.ca_hash,
                    "node": "edge1",
                },
            },
            base_dir=tmp_path,
        )
        give_token(cfg, create_token(tmp_path / "tokens.yaml", "test", "edge1", HOUR, 1))
        edge = Edge(cfg)
        await nursery.start(edge.run)
        await wait_until(lambda: cloud.registry.serves("edge1:7"), 10, "routed")
        first = x509.load_pem_x509_certificate(cfg.tls.cert.read_bytes()).serial_number
        (tunnel,) = list(cloud.registry)
        assert tunnel.cert is not None and tunnel.cert.serial == first
        status, _head, stream = await connect(ports.proxy, "edge1:7")
        assert status == 200
        await stream.send_all(b"before")
        assert await stream.receive_some(100) == b"before"
        assert edge.enrolment is not None
        await wait_until(lambda: edge.enrolment.renewals >= 1, 15, "renewed")  # type: ignore[union-attr]
        second = x509.load_pem_x509_certificate(cfg.tls.cert.read_bytes()).serial_number
        assert second != first
        # the live stream and its tunnel are untouched
        await stream.send_all(b"after")
        assert await stream.receive_some(100) == b"after"
        assert list(cloud.registry) == [tunnel] and edge.connects == 1
        assert sample(cloud.metrics, "certificate_renewals", "ok") >= 1
        assert sample(edge.metrics, "certificate_renewals", "ok") >= 1
        status_doc = edge.enrolment.status()
        assert status_doc["renewals"] == edge.enrolment.renewals and "warning" not in status_doc
        await stream.aclose()
        # the next tunnel presents the renewed certificate
        tunnel.session.close("test: reconnect")
        await wait_until(
            lambda: any(t.cert is not None and t.cert.serial != first for t in cloud.registry),
            10,
            "reconnected with the renewed certificate",
        )
        now = x509.load_pem_x509_certificate(cfg.tls.cert.read_bytes()).serial_number
        assert {t.cert.serial for t in cloud.registry if t.cert} <= {second, now}
        nursery.cancel_scope.cancel()


async def test_a_revoked_identity_cannot_renew(tmp_path: Path) -> None:
    revoked = tmp_path / "revoked"
    revoked.write_text("")
    cloud = make_cloud(tmp_path, tunnel={"revoked_file": str(revoked)})
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(cloud.run)
        edge = await enrolled_edge(nursery, cloud, tmp_path, ports.tunnel)
        cfg = edge.cfg
        assert edge.enrolment is not None and cloud.revocation is not None
        edge.enrolment._load()
        # The identity is revoked in the list in use; the watcher has not closed the tunnel yet
        # (it does within a second): a renewal in that moment is refused all the same.
        cloud.revocation.file.value = RevokedList(frozenset(), frozenset({("test", "edge1")}))
        before = cfg.tls.cert.read_bytes()
        with pytest.raises(EnrolError) as info:
            await edge.enrolment.renew_once(list(edge.sessions.values()))
        assert info.value.reason == "revoked" and "test/edge1 is revoked" in str(info.value)
        assert cfg.tls.cert.read_bytes() == before
        assert sample(cloud.metrics, "certificate_renewals", "revoked") == 1
        nursery.cancel_scope.cancel()


async def test_a_failing_renewal_warns_in_log_status_and_kins_tunnel_status(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The edge enrols (12-second certificates), then the cloud loses its issuing CA: renewals are
    refused, and as expiry nears the edge warns in its log, /status and `kins-tunnel status`."""
    token = create_token(tmp_path / "tokens.yaml", "test", "edge1", HOUR, 1)
    async with trio.open_nursery() as nursery:
        cloud = make_cloud(tmp_path, enrollment={"lifetime_days": 12 / 86400})
        ports = await nursery.start(cloud.run)
        cfg = edge_cfg(tmp_path, ports.tunnel)
        give_token(cfg, token)
        first = Edge(cfg)
        await nursery.start(first.run)
        await wait_until(lambda: cloud.registry.serves("edge1:22"), 10, "enrolled")
        nursery.cancel_scope.cancel()
    cloud = make_cloud(tmp_path, ca=False, tunnel={"listen": f"127.0.0.1:{ports.tunnel}"})
    async with trio.open_nursery() as nursery:
        await nursery.start(cloud.run)
        doc = edge_dict(tmp_path, [ports.tunnel], {"edge1:22": "127.0.0.1:9"})
        doc.update(
            tls={k: str(getattr(cfg.tls, k)) for k in ("ca", "cert", "key")},
            admin={"listen": "127.0.0.1:0"},
            enroll={"token_file": str(cfg.enroll.token_file), "ca_hash": cfg.enroll.ca_hash},
        )
        edge = Edge(edge_config_from_dict(doc, base_dir=tmp_path))
        ports2 = await nursery.start(edge.run)
        await wait_until(lambda: cloud.registry.serves("edge1:22"), 10, "reconnected")
        assert edge.enrolment is not None
        await wait_until(
            lambda: "warning" in edge.enrolment.status(),  # type: ignore[union-attr]
            15,
            "renewal warning",
        )
        status = edge.enrolment.status()
        assert "no_issuing_ca" in str(status["warning"]) and "expires in" in str(status["warning"])
        assert sample(edge.metrics, "certificate_renewals", "no_issuing_ca") >= 1
        assert sample(cloud.metrics, "certificate_renewals", "no_issuing_ca") >= 1
        assert any(
            r.getMessage() == "certificate renewal failed" and r.levelno == logging.WARNING
            for r in caplog.records
        )
        r = await run_kins_tunnel("status", "--admin", f"http://127.0.0.1:{ports2.admin}")
        out = r.stdout.decode()
        assert r.returncode == 0 and "edge test/edge1: 1 tunnel(s)" in out, r
        assert "WARNING: certificate expires in" in out and "no_issuing_ca" in out, out
        # once it has expired all the same, the edge tries to enrol again (refused here too)
        await wait_until(
            lambda: sample(edge.metrics, "enrollments", "no_issuing_ca") >= 1, 15, "re-enrolment"
        )
        assert edge.enrolment.status()["enrollment"] == "enrolling"
        nursery.cancel_scope.cancel()


@needs_tinyproxy
async def test_an_edge_behind_a_site_proxy_enrols_through_it(tmp_path: Path) -> None:
    cloud = make_cloud(tmp_path)
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(cloud.run)
        with tinyproxy(tmp_path, ports.tunnel) as proxy:
            cfg = edge_cfg(tmp_path, ports.tunnel)
            cfg = dataclasses.replace(cfg, proxy=SiteProxy(proxy.url))
            give_token(cfg, create_token(tmp_path / "tokens.yaml", "test", "edge1", HOUR, 1))
            edge = Edge(cfg)
            await nursery.start(edge.run)
            await wait_until(lambda: cloud.registry.serves("edge1:22"), 15, "enrolled via proxy")
            # one CONNECT for the enrolment, one for the tunnel
            assert proxy.connects(f"127.0.0.1:{ports.tunnel}") >= 2
            nursery.cancel_scope.cancel()


async def renew_request(
    session: Any, body: dict[str, Any], path: str = "/v1/renew"
) -> tuple[int, dict[str, Any]]:
    """One request on a new stream of `session` to the reserved renewal target."""
    stream = await session.open_stream(RENEW_TARGET, 5)
    async with stream:
        return await json_request(stream, h11.Connection(h11.CLIENT), "POST", path, body, host="x")


async def test_renewal_is_for_the_tunnels_own_identity_only(tmp_path: Path) -> None:
    cloud = make_cloud(tmp_path)
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(cloud.run)
        edge = await enrolled_edge(nursery, cloud, tmp_path, ports.tunnel)
        (session,) = edge.sessions.values()

        async def renew(node: str | None) -> tuple[int, dict[str, Any]]:
            key = ec.generate_private_key(ec.SECP256R1())
            csr = edge_csr(key, node).decode()
            return await renew_request(session, {"csr": csr, "unit": "other", "node": "edge2"})

        status, doc = await renew("edge2")  # asks for another node: refused
        assert (status, doc["reason"]) == (403, "identity_not_allowed"), doc
        status, doc = await renew(None)  # whatever the body says, the tunnel's identity is used
        assert status == 200, doc
        cert = x509.load_pem_x509_certificate(doc["cert"].encode())
        assert identity_from_der(cert.public_bytes(Encoding.DER)) == EdgeIdentity("test", "edge1")
        assert sample(cloud.metrics, "certificate_renewals", "identity_not_allowed") == 1
        nursery.cancel_scope.cancel()


async def test_enrolments_beyond_the_bound_are_closed_unanswered(tmp_path: Path) -> None:
    cloud = make_cloud(tmp_path)
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(cloud.run)
        cfg = edge_cfg(tmp_path, ports.tunnel)
        give_token(cfg, create_token(tmp_path / "tokens.yaml", "test", "edge1", HOUR, 1))
        assert cloud.enroll is not None
        cloud.enroll.exchanges = cloud_enroll.MAX_EXCHANGES  # as if that many were running
        exc = await enrol_refused(cloud, cfg)
        assert exc.reason == "connect" and "closed the connection before answering" in str(exc)
        assert sample(cloud.metrics, "enrollments", "busy") == 1
        cloud.enroll.exchanges = 0
        # one client address holds at most its share of the slots, whatever room is left
        cloud.enroll.exchanges_by_source["127.0.0.1"] = cloud_enroll.MAX_EXCHANGES_PER_SOURCE
        exc = await enrol_refused(cloud, cfg)
        assert exc.reason == "connect" and "closed the connection before answering" in str(exc)
        assert sample(cloud.metrics, "enrollments", "busy") == 2
        del cloud.enroll.exchanges_by_source["127.0.0.1"]
        await Enrolment(cfg, Metrics("edge", lambda: ())).enrol_once(None)  # room again
        # the cloud gives its slot back once it has closed the connection, which can be a moment
        # after the edge has read the answer
        service = cloud.enroll
        await wait_until(
            lambda: service.exchanges == 0 and service.exchanges_by_source == {},
            5,
            "enrolment slot given back",
        )
        nursery.cancel_scope.cancel()


async def test_renewals_are_limited_per_identity(tmp_path: Path) -> None:
    cloud = make_cloud(tmp_path, enrollment={"max_renewals_per_hour": 2})
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(cloud.run)
        edge = await enrolled_edge(nursery, cloud, tmp_path, ports.tunnel)
        (session,) = edge.sessions.values()

        async def renew(csr: object) -> tuple[int, dict[str, Any]]:
            return await renew_request(session, {"csr": csr})

        good = edge_csr(ec.generate_private_key(ec.SECP256R1()), "edge1").decode()
        assert (await renew(17))[0] == 400  # malformed: answered, not counted against the limit
        for _ in range(2):
            status, doc = await renew(good)
            assert status == 200, doc
        status, doc = await renew(good)
        assert (status, doc["reason"]) == (429, "rate_limited"), doc
        assert "enrollment.max_renewals_per_hour" in doc["error"]
        wait = float(doc["error"].split("retry in ")[1].split("s")[0])
        assert 1700 <= wait <= 1800, doc  # 2 an hour: one comes back every 30 minutes
        assert sample(cloud.metrics, "certificate_renewals", "ok") == 2
        assert sample(cloud.metrics, "certificate_renewals", "rate_limited") == 1
        assert sample(cloud.metrics, "certificate_renewals", "bad_request") == 1
        # another identity has its own allowance
        assert cloud.enroll is not None
        assert cloud.enroll.renewal_limit.retry_after("test/edge2") is None
        nursery.cancel_scope.cancel()


async def test_malformed_enrolment_and_renewal_requests_are_counted(tmp_path: Path) -> None:
    cloud = make_cloud(tmp_path)
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(cloud.run)
        edge = await enrolled_edge(nursery, cloud, tmp_path, ports.tunnel)
        ctx = ssl.create_default_context(cafile=str(tmp_path / "certs" / "ca.crt"))
        ctx.check_hostname = False
        ctx.set_alpn_protocols(["kins-enroll/1"])
        answers = []
        for raw in (
            b"POST /v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{nope",  # not JSON
            b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",  # no such path
            b"NOT HTTP AT ALL\r\n\r\n",
        ):
            tcp = await trio.open_tcp_stream("127.0.0.1", ports.tunnel)
            async with trio.SSLStream(tcp, ctx, server_hostname="x", https_compatible=True) as tls:
                with trio.fail_after(5):
                    await tls.send_all(raw)
                    answer = b""
                    while chunk := await tls.receive_some(4096):
                        answer += chunk
                answers.append(answer.split(b" ", 2)[1])
        assert answers == [b"400", b"404", b"400"], answers
        assert sample(cloud.metrics, "enrollments", "bad_request") == 3
        # over the tunnel: a request to another path of the renewal target
        (session,) = edge.sessions.values()
        status, doc = await renew_request(session, {}, "/v1/other")
        assert (status, doc["reason"]) == (404, "bad_request")
        assert sample(cloud.metrics, "certificate_renewals", "bad_request") == 1
        nursery.cancel_scope.cancel()
