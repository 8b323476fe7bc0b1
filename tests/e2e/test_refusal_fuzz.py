"""Fuzzing of the pre-TLS refusal hint (`transport.refusal`) and the edge's handling of it.

- `parse_refusal` (hypothesis): any bytes give None or a finite wait in [0, MAX_HINT]; a refusal
  as the cloud writes it round-trips; a refusal with a mutated line is no hint or a sane one.
- `connect_tls` against a fake cloud on real TCP that answers the ClientHello with random bytes,
  mutated ``KINS-RETRY-AFTER`` lines (huge, negative, NaN, unterminated, split over writes),
  the alert alone, a valid hint followed by garbage, or nothing: every attempt fails with
  `TransportError` within its deadline, and any hint it reads is one the edge's backoff caps at
  ``reconnect.max``.
- A real edge whose only cloud is such a fake keeps dialling (its task never fails, no internal
  error), at the pace of its backoff, capped at ``reconnect.max`` even when told 3600 s.

`KINS_FUZZ_SESSIONS` sets the number of fake refusals (default 150); `KINS_FUZZ_SEED` the seed.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from kins_tunnel.config import Backoff
from kins_tunnel.edge.reconnect import ReconnectPolicy
from kins_tunnel.tls_contexts import client_ssl_context
from kins_tunnel.transport.refusal import (
    ALERT,
    HINT_PREFIX,
    MAX_HINT,
    encode_refusal,
    parse_refusal,
)
from kins_tunnel.transport.tls import Refused, TransportError
from kins_tunnel.transport.tls_dial import connect_tls
from tests.e2e.harness import make_certs, tunnel_env
from tests.e2e.rawpeer import mutate
from tests.e2e.test_session_fuzz import SEED, sessions
from tests.proto.test_mux_properties import SCALE

MAX_WAIT = 0.3  # reconnect.max of the edges here


def sane(hint: float | None) -> bool:
    return hint is None or (math.isfinite(hint) and 0 <= hint <= MAX_HINT)


@settings(max_examples=500 * SCALE, deadline=None, database=None)
@given(st.binary(max_size=200))
def test_any_bytes_are_no_hint_or_a_sane_one(data: bytes) -> None:
    assert sane(parse_refusal(data))
    assert sane(parse_refusal(ALERT + HINT_PREFIX + data))
    assert sane(parse_refusal(memoryview(ALERT + HINT_PREFIX + data)[: len(data) // 2 + 24]))


@settings(max_examples=300 * SCALE, deadline=None, database=None)
@given(
    st.one_of(
        st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**30), 10**30).map(float)
    ),
    st.binary(max_size=40),
)
def test_what_the_cloud_writes_round_trips(value: float, tail: bytes) -> None:
    hint = parse_refusal(encode_refusal(value) + tail)
    assert hint is not None and sane(hint), (value, encode_refusal(value))  # -0.0 was "-0.0"
    assert abs(hint - (min(value, MAX_HINT) if value > 0 else 0.0)) <= 0.05


@settings(max_examples=300 * SCALE, deadline=None, database=None)
@given(st.text(max_size=30), st.randoms(use_true_random=False))
def test_mutated_hint_lines_are_no_hint_or_a_sane_one(line: str, rng: random.Random) -> None:
    wire = ALERT + HINT_PREFIX + line.encode("utf-8", "replace") + b"\n"
    assert sane(parse_refusal(wire))
    assert sane(parse_refusal(mutate(rng, wire)))


def fake_answer(rng: random.Random) -> list[bytes]:
    """What a fake cloud writes after it reads the ClientHello (each item a separate write)."""
    valid = encode_refusal(rng.choice([0.0, 0.5, 5.0, 3600.0]))
    cut = rng.randrange(1, len(valid))
    line = rng.choice(
        [
            b"1e308",
            b"-5",
            b"nan",
            b"inf",
            b"3600.0",
            b"99999999999999",
            b"0.0000000000001",
            b"\xff\xfe",
            b"1" * 40,
            b"",
        ]
    )
    shapes = [
        [rng.randbytes(rng.randrange(1, 3000))],
        [mutate(rng, valid)],
        [ALERT + HINT_PREFIX + line + rng.choice([b"\n", b"", b"\r\n"])],
        [valid[:cut], valid[cut:]],  # split over two writes
        [ALERT],
        [valid + rng.randbytes(rng.randrange(0, 2000))],
        [HINT_PREFIX + b"1\n"],  # no alert first
        [b"\x16\x03\x03\x00\x7a" + rng.randbytes(rng.randrange(0, 200))],  # a fake ServerHello
        [],  # nothing: close at once
    ]
    return rng.choice(shapes)


async def serve_fakes(
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    *,
    seed: int,
    accepted: list[int],
) -> None:
    """A fake cloud on the loopback: each connection gets a `fake_answer`, then is closed."""
    rng = random.Random(seed)

    async def handler(stream: trio.SocketStream) -> None:
        accepted[0] += 1
        r = random.Random(rng.randrange(1 << 32))
        async with stream:
            try:
                with trio.move_on_after(2):
                    await stream.receive_some(4096)  # the ClientHello
                for piece in fake_answer(r):
                    await stream.send_all(piece)
                    await trio.sleep(r.choice([0, 0, 0.01]))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


async def test_connect_tls_fails_cleanly_on_any_refusal(tmp_path: Path) -> None:
    total = sessions(150)
    certs = make_certs(tmp_path)
    ctx = client_ssl_context(certs / "ca.crt", certs / "edge-edge1.crt", certs / "edge-edge1.key")
    policy = ReconnectPolicy(Backoff(initial=0.05, max=MAX_WAIT), random.Random(SEED))
    seen = {"refused": 0, "failed": 0}
    hints: set[float] = set()
    accepted = [0]
    async with trio.open_nursery() as n:
        port = await n.start(
            lambda task_status: serve_fakes(task_status, seed=SEED, accepted=accepted)
        )
        with trio.fail_after(max(60, total * 0.2)):
            for _ in range(total):
                try:
                    with trio.fail_after(5):  # the fake closes: never the deadline
                        tls = await connect_tls("127.0.0.1", port, ctx, server_hostname="localhost")
                    tls.close()
                    raise AssertionError("a fake cloud completed a TLS handshake")
                except Refused as exc:
                    seen["refused"] += 1
                    assert sane(exc.retry_after), exc.retry_after
                    hints.add(exc.retry_after)
                    assert 0 <= policy.next_delay(0.0, exc.retry_after) <= MAX_WAIT
                except TransportError:
                    seen["failed"] += 1
        n.cancel_scope.cancel()
    print(
        f"\nFIGURE connect_tls against fake refusals: {seen}, hints {sorted(hints)}, "
        f"{accepted[0]} accepted"
    )
    assert seen["refused"] + seen["failed"] == total == accepted[0]
    assert seen["refused"] > 0 and seen["failed"] > 0
    assert 3600.0 in hints  # the largest hint a cloud may send was read, and capped


async def test_an_edge_keeps_dialling_a_cloud_that_only_refuses(tmp_path: Path) -> None:
    accepted = [0]
    async with tunnel_env(tmp_path) as env:
        assert env.nursery is not None
        port = await env.nursery.start(
            lambda task_status: serve_fakes(task_status, seed=SEED + 1, accepted=accepted)
        )
        edge = await env.add_edge(
            {"edge1:22": "127.0.0.1:9"},
            cloud=[f"127.0.0.1:{port}"],
            reconnect={"initial": 0.05, "max": MAX_WAIT},
            handshake_timeout=2.0,
        )
        await trio.sleep(3)
        m = edge.metrics.render()[2]
        env.nursery.cancel_scope.cancel()
    print(f"\nFIGURE edge against a cloud that only refuses: {accepted[0]} dials in 3 s")
    # each wait is at most reconnect.max (whatever the hint said) plus a dial: at least 3 s /
    # (0.3 s + a failed handshake) dials; a 3600 s hint obeyed would stop it after the first
    assert accepted[0] >= 5, accepted
    assert edge.connects == 0
    assert b"kins_tunnel_internal_errors_total{" not in m, m
