"""Fuzzing of enrolment and renewal over real TLS.

- Enrolment: TLS clients without a certificate negotiate ALPN ``kins-enroll/1`` with a real
  in-process cloud (an ``enrollment`` section, an issuing CA) and send random bytes, mutated HTTP
  (methods, targets, oversized headers, huge, negative or doubled Content-Length, chunked bodies,
  pipelined requests, early closes, slowloris within the deadline) and valid HTTP with mutated
  JSON (wrong types, huge strings, deep nesting, random and mutated CSRs, CSRs with other keys,
  identities and extensions, tokens of every shape, among them the real token with a defect).
  Then more enrolment connections at once than the cloud answers.
- Renewal: an edge with a valid certificate opens the reserved renewal stream again and again
  and sends the same kinds of garbage, and CSRs for other identities, over its tunnel.

Invariants: the cloud never raises (in-process, a crash fails the test) and counts no internal
error; a normal edge keeps serving checksummed echo traffic the whole time; no certificate is
issued during the fuzzing, and the real token keeps all its uses (failed attempts take none);
afterwards a real enrolment with that token succeeds, for the token's identity only, and the
fuzzing edge is never given a certificate for another identity; no exchange, handshake, stream or
descriptor is left (the autouse leak check); resident memory stays bounded.

`KINS_FUZZ_SESSIONS` sets the number of hostile exchanges per test (default 150 in `make test`);
`KINS_FUZZ_SEED` picks the seed (default: fixed).
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import h11
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from kins_tunnel.certs.directory import init_ca
from kins_tunnel.certs.identity import RENEW_TARGET, EdgeIdentity, identity_from_der
from kins_tunnel.certs.issuing import edge_csr
from kins_tunnel.cloud import enroll as cloud_enroll
from kins_tunnel.jsonhttp import json_request
from kins_tunnel.testing.support import self_rss, wait_until
from kins_tunnel.tokens import create_token, read_tokens
from tests.e2e.harness import TunnelEnv
from tests.e2e.rawpeer import mutate
from tests.e2e.test_bad_input import watched_env
from tests.e2e.test_enroll import HOUR, raw_client_context, sample
from tests.e2e.test_isolation import metrics_of
from tests.e2e.test_session_fuzz import SEED, sessions

CONCURRENT = 8
HANDSHAKE_TIMEOUT = 3.0  # tunnel.handshake_timeout: the deadline of a whole enrolment exchange
GOOD_NODE = "fuzzgood"
RSS_BOUND = 32 << 20


# ---------------------------------------------------------------- material
def _csr(key: Any, names: list[Any], exts: tuple[x509.ExtensionType, ...] = ()) -> str:
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names))
    for ext in exts:
        b = b.add_extension(ext, critical=False)
    algo = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(key, algo).public_bytes(Encoding.PEM).decode()


def csr_corpus() -> dict[str, str]:
    """Certificate requests a hostile client might send (made once: keys take time)."""
    p256 = ec.generate_private_key(ec.SECP256R1())
    cn = [x509.NameAttribute(NameOID.COMMON_NAME, GOOD_NODE)]
    spiffe = x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier("spiffe://kins-tunnel/unit/other/node/edge1")]
    )
    return {
        "good": edge_csr(p256, GOOD_NODE).decode(),
        "no_cn": edge_csr(p256, None).decode(),
        "other_node": edge_csr(p256, "edge1").decode(),
        "fuzz1": edge_csr(p256, "fuzz1").decode(),
        "two_cns": _csr(p256, cn + [x509.NameAttribute(NameOID.COMMON_NAME, "edge1")]),
        "p384": _csr(ec.generate_private_key(ec.SECP384R1()), cn),
        "rsa": _csr(rsa.generate_private_key(public_exponent=65537, key_size=1024), cn),
        "ed25519": _csr(ed25519.Ed25519PrivateKey.generate(), cn),
        "ca_ext": _csr(p256, cn, (x509.BasicConstraints(ca=True, path_length=None),)),
        "spiffe_other": _csr(p256, cn, (spiffe,)),
        "unit_attr": _csr(p256, cn + [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "other")]),
        "unknown_curve": unknown_curve(edge_csr(p256, GOOD_NODE).decode()),
    }


P256_OID = bytes.fromhex("06082a8648ce3d030107")  # 1.2.840.10045.3.1.7, prime256v1


def unknown_curve(pem: str) -> str:
    """A PEM request or certificate with its P-256 key's curve changed to one no library knows
    (same length). Found by the renewal fuzzing: such a request was an internal error
    (UnsupportedAlgorithm), not a 400."""
    lines = pem.strip().splitlines()
    der = base64.b64decode("".join(lines[1:-1]))
    assert der.count(P256_OID) == 1
    der = der.replace(P256_OID, P256_OID[:-1] + b"\x09")
    return f"{lines[0]}\n{base64.b64encode(der).decode()}\n{lines[-1]}\n"


def mutated_csr(rng: random.Random, pem: str) -> str:
    """A CSR with flipped bytes: in its base64 text, or in its DER (still valid base64)."""
    if rng.random() < 0.5:
        return mutate(rng, pem.encode()).decode("latin-1")

    lines = pem.strip().splitlines()
    der = base64.b64decode("".join(lines[1:-1]))
    bad = mutate(rng, der)
    while bad == der:
        bad = mutate(rng, der)
    body = base64.b64encode(bad).decode()
    return f"{lines[0]}\n{body}\n{lines[-1]}\n"


def token_shapes(rng: random.Random, real: str) -> Any:
    tid, secret = real.split(".")
    if rng.random() < 0.4:  # the real token (with a defect elsewhere: `enrol_body`)
        return real
    return rng.choice(
        [
            f"{tid}.{'0' * 16}",
            f"{tid}.{secret[:-1]}",
            real.upper(),
            f" {real}\n",
            real + "x",
            "abcdef.0123456789abcdef",
            rng.randbytes(rng.randrange(0, 40)).decode("latin-1"),
            "\ud800" * 3,
            "x" * rng.choice([1000, 60000]),
            "",
            7,
            None,
            [real],
            {"token": real},
            True,
        ]
    )


def json_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 3 or roll < 0.5:
        return rng.choice(
            [0, -1, 1 << 70, 1.5e308, None, True, "", "x" * 5000, "é\u0000\n", "\udfff"]
        )
    if roll < 0.75:
        return [json_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {str(rng.randrange(99)): json_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))}


def name_shapes(rng: random.Random) -> Any:
    return rng.choice(
        [
            None,
            GOOD_NODE,
            "edge1",
            "kins-system",
            "cloud",
            "a" * 300,
            "Edge_1",
            "x\ny",
            "",
            "\u00e9dge",
            7,
            ["edge1"],
            json_value(rng),
        ]
    )


def enrol_body(rng: random.Random, real: str, csrs: dict[str, str]) -> bytes:
    """A JSON body for POST /v1/enroll. With the real token it always carries a defect that the
    cloud must find before it takes one of the token's uses."""
    doc: dict[str, Any] = {}
    token = token_shapes(rng, real)
    kind = rng.random()
    if kind < 0.5:
        csr: Any = csrs[rng.choice(list(csrs))]
    elif kind < 0.8:
        csr = mutated_csr(rng, csrs[rng.choice(list(csrs))])
    else:
        csr = rng.choice([None, 5, "", rng.randbytes(200).decode("latin-1"), "A" * 9000, [1]])
    for key, value in (("token", token), ("csr", csr)):
        if rng.random() < 0.9:
            doc[key] = value
    if rng.random() < 0.5:
        doc["node"] = name_shapes(rng)
    if rng.random() < 0.3:
        doc["unit"] = rng.choice(["test", "other", *[name_shapes(rng)] * 2])
    if rng.random() < 0.2:
        doc[rng.choice(["extra", "token ", "Token"])] = json_value(rng)
    if doc.get("token") == real:  # give it one defect at least (or it would rightly succeed)
        defect = rng.randrange(3)
        if defect == 0:
            doc["node"] = rng.choice(["edge1", "other1", GOOD_NODE.upper()])
        elif defect == 1:
            doc["unit"] = rng.choice(["other", "Test", "test "])
        else:
            doc["csr"] = rng.choice(
                [csrs[k] for k in ("other_node", "two_cns", "p384", "rsa", "ed25519")]
                + [5, "", csrs["good"][:-40], mutated_csr(rng, csrs["good"])]
            )
    return json.dumps(doc).encode()


# ---------------------------------------------------------------- HTTP
def request(method: str, target: str, body: bytes = b"", headers: str | None = None) -> bytes:
    if headers is None:
        headers = f"Host: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return f"{method} {target} HTTP/1.1\r\n{headers}\r\n".encode() + body


Plan = list[tuple[bytes, float]]  # bytes to send, then seconds to wait


def http_plan(rng: random.Random, target: str, body: Callable[[], bytes]) -> Plan:
    """What one hostile client sends on an exchange answering POST `target`."""
    roll = rng.random()
    if roll < 0.1:
        return [(rng.randbytes(rng.randrange(1, 4000)), 0)]
    if roll < 0.25:
        return [(mutate(rng, request("POST", target, body())), 0)]
    if roll < 0.65:
        return [(request("POST", target, body()), 0)]
    b = body()
    shapes: list[Callable[[], Plan]] = [
        lambda: [(request(rng.choice(["PUT", "get", "G\0T", "X" * 5000, "CONNECT"]), target), 0)],
        lambda: [
            (
                request(
                    "POST",
                    rng.choice(["*", "/", "/" * 5000, target + "?a", "http://x/v1/ca", "/v1/%00"]),
                    b,
                ),
                0,
            )
        ],
        lambda: [(request("GET", "/v1/ca", headers="Host: x\r\nX: " + "y" * 20000 + "\r\n"), 0)],
        lambda: [(request("GET", "/v1/ca", headers="Host: x\r\n" + "X-A: b\r\n" * 600), 0)],
        lambda: [
            (
                request(
                    "POST",
                    target,
                    b,
                    f"Host: x\r\nContent-Length: {rng.choice(['99999999999999999999999', '-1', 'abc', '1, 2', str(len(b) + 10)])}\r\n",
                ),
                0,
            )
        ],
        lambda: [
            (
                request(
                    "POST",
                    target,
                    b,
                    f"Host: x\r\nContent-Length: {len(b)}\r\nContent-Length: 3\r\n",
                ),
                0,
            )
        ],
        lambda: [
            (
                request(
                    "POST",
                    target,
                    b"%x\r\n%b\r\n0\r\n\r\n" % (len(b), b),
                    "Host: x\r\nTransfer-Encoding: chunked\r\n",
                ),
                0,
            )
        ],
        lambda: [
            (
                request(
                    "POST",
                    target,
                    b"fffffffff\r\n" + b,
                    "Host: x\r\nTransfer-Encoding: chunked\r\n",
                ),
                0,
            )
        ],
        lambda: [(request("POST", target, b"{}" + b" " * 70000), 0)],
        lambda: [
            (b"".join(request("POST", target, body()) for _ in range(rng.randrange(2, 6))), 0)
        ],
        lambda: [(request("POST", target, b)[: rng.randrange(1, len(b) + 60)], 0)],  # early close
        lambda: [(b"GET /v1/ca HTTP/1.0\r\n\r\n", 0)],
        lambda: [(request("POST", target, b"[" * 60000), 0)],  # deep nesting
        lambda: [(request("POST", target, b'{"token": "\xff\xfe"}'), 0)],
        # slowloris within the deadline: a byte at a time, then the rest
        lambda: (
            [(bytes([c]), 0.05) for c in request("POST", target, b)[:20]]
            + [(request("POST", target, b)[20:], 0)]
        ),
    ]
    return rng.choice(shapes)()


def statuses(answer: bytes) -> list[int]:
    """The status codes of the HTTP answers in `answer` (at the start of each head)."""
    out = []
    for part in answer.split(b"HTTP/1.1 ")[1:]:
        try:
            out.append(int(part[:3]))
        except ValueError:
            out.append(0)
    return out


async def play(stream: trio.abc.Stream, plan: Plan, quiet: float = 0.2) -> bytes:
    """Send `plan` on `stream` while reading its answers, until EOF or until nothing came for
    `quiet` seconds after the last byte was sent (a request left incomplete is then abandoned: an
    early close; an answered one whose connection is kept alive, done)."""
    got = bytearray()
    last = [0.0]

    async def reader() -> None:
        while data := await stream.receive_some(65536):
            got.extend(data)
            last[0] = trio.current_time()

    try:
        async with trio.open_nursery() as n:
            n.start_soon(reader)
            with trio.fail_after(10):
                for data, wait in plan:
                    await stream.send_all(data)
                    await trio.sleep(wait)
            last[0] = trio.current_time()
            while n.child_tasks and trio.current_time() < last[0] + quiet:
                await trio.sleep(0.02)
            n.cancel_scope.cancel()
    except* (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the cloud ended the exchange: that is its right
    return bytes(got)


def check_answer(answer: bytes, allow_200: bool) -> None:
    for status in statuses(answer):
        assert status in (400, 403, 404, 409, 413, 429, 431, 503) or (
            allow_200 and status == 200
        ), answer[:300]


# ---------------------------------------------------------------- environment
@contextlib.asynccontextmanager
async def enrol_env(tmp_path: Path) -> AsyncIterator[tuple[TunnelEnv, dict[str, int], str]]:
    """`watched_env` with enrolment (an issuing CA, failure and renewal limits a fuzzer does not
    reach, so that every request goes as far as its contents let it) and
    one real token for node GOOD_NODE with 3 uses."""
    init_ca(tmp_path / "certs", issuing_ca=True)
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("")
    certs = tmp_path / "certs"
    async with watched_env(
        tmp_path,
        tunnel={"handshake_timeout": HANDSHAKE_TIMEOUT},
        enrollment={
            "tokens_file": str(tokens),
            "ca": {"cert": str(certs / "issuing.crt"), "key": str(certs / "issuing.key")},
            "max_failures_per_source": 1_000_000,
            "max_renewals_per_hour": 1_000_000,
        },
    ) as (env, counts):
        real = create_token(tokens, "test", GOOD_NODE, HOUR, 3)
        yield env, counts, real


async def enrol_with(port: int, token: str, csr: str) -> tuple[int, dict[str, Any]]:
    """One real enrolment request over a fresh enrolment connection."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, raw_client_context(["kins-enroll/1"]), server_hostname="x")
    async with stream:
        with trio.fail_after(10):
            return await json_request(
                stream,
                h11.Connection(h11.CLIENT),
                "POST",
                "/v1/enroll",
                {"token": token, "csr": csr},
                host="x",
            )


def issued_identity(doc: dict[str, Any]) -> EdgeIdentity:
    cert = x509.load_pem_x509_certificate(doc["cert"].encode())
    return identity_from_der(cert.public_bytes(Encoding.DER))


async def run_pool(total: int, one: Callable[[int], Any], rng: random.Random) -> None:
    left = [total]

    async def worker() -> None:  # a fixed pool: memory does not grow with the count
        while left[0] > 0:
            left[0] -= 1
            await one(rng.randrange(1 << 32))

    with trio.fail_after(max(120, total * 0.5)):
        async with trio.open_nursery() as n:
            for _ in range(CONCURRENT):
                n.start_soon(worker)


async def no_internal_errors(env: TunnelEnv) -> dict[str, list[tuple[dict[str, str], float]]]:
    m = await metrics_of(env.ports.admin)
    assert not m.get("kins_tunnel_internal_errors_total"), m.get(
        "kins_tunnel_internal_errors_total"
    )
    return m


# ---------------------------------------------------------------- tests
async def test_hostile_enrolment_clients_never_take_the_cloud_down(tmp_path: Path) -> None:
    total = sessions(150)
    rng = random.Random(SEED + 2)
    csrs = csr_corpus()
    async with enrol_env(tmp_path) as (env, counts, real):
        port, cloud = env.ports.tunnel, env.cloud
        assert cloud.enroll is not None
        ctx = raw_client_context(["kins-enroll/1"])
        done = {"exchanges": 0, "answers": 0, "refused": 0}
        rss0 = self_rss()

        async def one(seed: int) -> None:
            r = random.Random(seed)
            done["exchanges"] += 1
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            stream = trio.SSLStream(tcp, ctx, server_hostname="localhost")
            try:
                with trio.fail_after(5):
                    await stream.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError):
                done["refused"] += 1
                await trio.aclose_forcefully(stream)
                return
            if r.random() < 0.1:
                plan: Plan = [(request("GET", "/v1/ca"), 0)] + http_plan(
                    r, "/v1/enroll", lambda: enrol_body(r, real, csrs)
                )
            else:
                plan = http_plan(r, "/v1/enroll", lambda: enrol_body(r, real, csrs))
            try:
                answer = await play(stream, plan)
            finally:
                await trio.aclose_forcefully(stream)
            check_answer(answer, allow_200=True)
            assert b'"cert"' not in answer, answer[:300]
            done["answers"] += len(statuses(answer))

        # found by this test: JSON nested deeper than the decoder's recursion limit was an
        # internal error (RecursionError) instead of a 400
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        async with trio.SSLStream(tcp, ctx, server_hostname="localhost") as stream:
            answer = await play(stream, [(request("POST", "/v1/enroll", b"[" * 60000), 0)], 2)
        assert statuses(answer) == [400] and b"nested too deeply" in answer, answer
        await run_pool(total, one, rng)
        # more enrolment connections at once than are answered: the rest are closed unanswered
        held: list[trio.SSLStream[trio.SocketStream]] = []
        try:
            for _ in range(cloud_enroll.MAX_EXCHANGES + 16):
                tcp = await trio.open_tcp_stream("127.0.0.1", port)
                s = trio.SSLStream(tcp, ctx, server_hostname="localhost")
                held.append(s)
                with trio.fail_after(5):
                    await s.do_handshake()
            await wait_until(
                lambda: sample(cloud.metrics, "enrollments", "busy") > 0, 5, "busy refusals"
            )
        finally:
            for s in held:
                await trio.aclose_forcefully(s)
        await wait_until(
            lambda: cloud.enroll is not None and cloud.enroll.exchanges == 0,
            HANDSHAKE_TIMEOUT + 5,
            "no enrolment exchange left",
        )
        await wait_until(lambda: not cloud.tunnels.admission.pending, 10, "no handshake pending")
        m = await no_internal_errors(env)
        results = {label["result"]: v for label, v in m.get("kins_tunnel_enrollments_total", [])}
        grown = self_rss() - rss0
        print(
            f"\nFIGURE cloud under hostile enrolment clients: {done['exchanges']} exchanges, "
            f"{done['answers']} answers, {done['refused']} TLS set-ups refused, results {results}, "
            f"{counts['ok']} healthy echoes, RSS +{grown / 2**20:.1f} MiB"
        )
        assert results.get("ok", 0) == 0, results
        # the token checks were reached, and refused for each kind of defect
        for reason in ("bad_token", "unknown_token", "bad_csr", "identity_not_allowed"):
            assert results.get(reason, 0) > 0, (reason, results)
        assert read_tokens(tmp_path / "tokens.yaml")[real[:6]].uses == 3  # none taken
        # a real enrolment still succeeds, for the token's identity only, whatever the CSR asks
        status, doc = await enrol_with(port, real, csrs["spiffe_other"])
        assert status == 200, doc
        assert issued_identity(doc) == EdgeIdentity("test", GOOD_NODE)
        assert read_tokens(tmp_path / "tokens.yaml")[real[:6]].uses == 2
        assert grown < RSS_BOUND, grown
        assert len(cloud.registry) == 1  # the normal edge only


async def test_hostile_renewals_over_the_tunnel_never_take_the_cloud_down(tmp_path: Path) -> None:
    total = sessions(150)
    rng = random.Random(SEED + 3)
    csrs = csr_corpus()

    def renew_body(r: random.Random) -> bytes:
        roll = r.random()
        if roll < 0.7:
            doc: dict[str, Any] = {
                "csr": csrs[r.choice(list(csrs))]
                if r.random() < 0.6
                else mutated_csr(r, csrs[r.choice(list(csrs))])
            }
        else:
            doc = {"csr": json_value(r)}
        if r.random() < 0.4:
            doc.update(unit=name_shapes(r), node=name_shapes(r))
        return json.dumps(doc).encode()

    async with enrol_env(tmp_path) as (env, counts, _real):
        cloud = env.cloud
        hostile = await env.add_edge({"fuzz1:22": "127.0.0.1:9"}, "fuzz1", "fuzz", "fuzz1:22")
        await wait_until(lambda: len(hostile.sessions) == 1, 10, "the fuzzing edge's tunnel")
        (session,) = hostile.sessions.values()
        issued: list[EdgeIdentity] = []
        done = {"streams": 0, "answers": 0}
        rss0 = self_rss()

        async def one(seed: int) -> None:
            r = random.Random(seed)
            done["streams"] += 1
            stream = await session.open_stream(RENEW_TARGET, 5)
            async with stream:
                answer = await play(stream, http_plan(r, "/v1/renew", lambda: renew_body(r)))
            check_answer(answer, allow_200=True)
            done["answers"] += len(statuses(answer))
            head, _, rest = answer.partition(b"\r\n\r\n")
            if statuses(answer)[:1] == [200]:
                issued.append(issued_identity(json.loads(rest)))

        stream = await session.open_stream(RENEW_TARGET, 5)
        async with stream:
            body = json.dumps({"csr": csrs["unknown_curve"]}).encode()
            answer = await play(stream, [(request("POST", "/v1/renew", body), 0)], 2)
        assert statuses(answer) == [400] and b"bad_csr" in answer, answer
        await run_pool(total, one, rng)
        await wait_until(
            lambda: all(s.stream_count == 0 for s in hostile.sessions.values()),
            10,
            "no renewal stream left",
        )
        m = await no_internal_errors(env)
        results = {
            label["result"]: v for label, v in m.get("kins_tunnel_certificate_renewals_total", [])
        }
        grown = self_rss() - rss0
        print(
            f"\nFIGURE cloud under hostile renewals: {done['streams']} streams, "
            f"{done['answers']} answers, results {results}, {len(issued)} certificates issued, "
            f"{counts['ok']} healthy echoes, RSS +{grown / 2**20:.1f} MiB"
        )
        assert set(issued) <= {EdgeIdentity("fuzz", "fuzz1")}, issued
        assert results.get("identity_not_allowed", 0) > 0 and results.get("bad_csr", 0) > 0
        assert len(cloud.registry) == 2 and grown < RSS_BOUND, grown
