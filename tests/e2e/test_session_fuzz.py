"""Session-level fuzzing over real TLS, both ways.

- A hostile edge with a valid certificate completes TLS and HELLO, then sends random and mutated
  frame sequences (known and unknown types, odd stream ids, short and oversized payloads, codes
  this version does not know, random flags), interleaved with legitimate answers to the streams
  the cloud opens towards it (a CONNECT to its name runs alongside), to a real in-process cloud.
  It also opens streams itself (uplinks), well-formed or not: to targets its unit may reach (an
  echo server, a port where nothing listens), to other units' targets, random names and bytes; the
  cloud is configured with uplinks, so allowed opens are dialled and relayed among the garbage,
  and with enrolment, so opens of the reserved renewal target reach its renewal handler.
- Both send DELAY frames (the "delay" capability is in their HELLO): stamps, and answers with
  wrapping or standing clocks, byte counts of any size, floods of answers with ever lower
  delivery rates; the cloud's pacers are watched meanwhile (finite, non-negative figures, held
  bytes within the session budget).
- The mirror: a hostile cloud with a valid certificate does the same to a real edge, opening
  streams to the edge's real services among the garbage.

Invariants: the process under attack never raises (in-process, a crash fails the test); a normal
edge keeps serving checksummed echo traffic through the real cloud the whole time; no internal
error is counted; afterwards no hostile tunnel, pending handshake or stream is left and file
descriptors are back to baseline (the autouse leak check); resident memory grows by less than the
configured session budget.

`KINS_FUZZ_SESSIONS` sets the number of hostile sessions per test (default 300 for the cloud and
150 for the edge in `make test`); `KINS_FUZZ_SEED` picks the seed (default: fixed).
"""

from __future__ import annotations

import math
import os
import random
import socket
import ssl
from pathlib import Path
from typing import Any

import trio

from kins_tunnel.certs.directory import init_ca
from kins_tunnel.certs.identity import RENEW_TARGET
from kins_tunnel.proto.frames import (
    HEADER,
    FrameType,
    delay_answer_frame,
    delay_stamp_frame,
    frame,
    open_frame,
    open_result_frame,
    window_frame,
)
from kins_tunnel.proto.pacer import PacerStatistics
from kins_tunnel.testing.support import self_rss, wait_until
from kins_tunnel.tls_contexts import server_ssl_context
from tests.e2e.harness import (
    SVC,
    connect,
    echo_bytes,
    free_port,
    keep_echoing,
    serve_echo,
    tunnel_env,
)
from tests.e2e.rawpeer import RawPeer, hello_frame, mutate, random_frame
from tests.e2e.test_bad_input import watched_env
from tests.e2e.test_isolation import FUZZ_SVC, metrics_of, raw_edge_context

SEED = int(os.environ.get("KINS_FUZZ_SEED", "20261126"))
CONCURRENT = 8
BUDGET = 8 << 20  # session_budget of the process under attack


async def echo_bytes_quietly(stream: trio.SocketStream) -> None:
    """An uplink target: echo until EOF; a peer that resets is not an error."""
    async with stream:
        try:
            await echo_bytes(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def sessions(default: int) -> int:
    return int(os.environ.get("KINS_FUZZ_SESSIONS", default))


def legit_frames(rng: random.Random, sids: list[int], opener: bool) -> bytes:
    """A few frames a correct peer could send for the streams in `sids`."""
    out = b""
    for sid in sids[-3:]:
        roll = rng.random()
        if roll < 0.3 and not opener:
            out += open_result_frame(sid, 0, rng.choice([16384, 262144]))
        elif roll < 0.6:
            out += frame(
                FrameType.DATA, sid, rng.randbytes(rng.randrange(1, 2000)), rng.choice([0, 0, 1])
            )
        elif roll < 0.8:
            out += window_frame(sid, rng.randrange(1, 65536))
        elif roll < 0.9:
            out += frame(FrameType.PING, 0, rng.randbytes(8))
        else:
            out += delay_frames(rng)
    return out


def u32_shape(rng: random.Random) -> int:
    return rng.choice([0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, rng.randrange(1 << 32)])


def delay_frames(rng: random.Random) -> bytes:
    """DELAY frames (capability "delay", in every HELLO here): stamps, and answers whether or not
    a stamp went, with clocks that wrap, stand still or jump, byte counts of any size, and
    sometimes a flood of answers with ever lower delivery rates."""
    if rng.random() < 0.3:
        return delay_stamp_frame(u32_shape(rng))
    if rng.random() < 0.2:
        at, got = rng.randrange(1 << 32), rng.randrange(1 << 32)
        out = bytearray()
        for i in range(rng.randrange(10, 400)):
            at, got = at + 60_000, got + max(1_000_000 - 900 * i, 1)
            out += delay_answer_frame(0, at & 0xFFFFFFFF, got & 0xFFFFFFFF)
        return bytes(out)
    return delay_answer_frame(u32_shape(rng), u32_shape(rng), u32_shape(rng))


def r_sid(rng: random.Random, sids: list[int]) -> int:
    return rng.choice(sids) if sids else 1


def uplink_open(rng: random.Random, sid: int, targets: tuple[bytes, ...]) -> bytes:
    """A well-formed OPEN from an edge (an uplink): to an allowed or a disallowed target, another
    unit's, a random name or address, text that is no target, or random bytes."""
    name = rng.choice(
        [
            *targets,
            b"%d.%d.%d.%d:%d" % (*rng.randbytes(4), rng.randrange(1, 65536)),
            rng.choice([b"registry", b"a" * 63, b"x.y.svc.cluster.local"])
            + b":%d" % rng.randrange(1, 9999),
            rng.choice(
                [
                    b"no-port",
                    b"a b:80",
                    "\u00fcn\u00efcode:80".encode(),
                    b"[::1:80",
                    b"x:0",
                    b"evil\nline:1",
                ]
            ),
            rng.randbytes(rng.randrange(1, 40)),
        ]
    )
    return open_frame(sid, rng.choice([16384, 262144]), name)


def check_pacer(st: PacerStatistics | None, held: int) -> None:
    """A pacer fed hostile DELAY answers: finite, non-negative figures; held bytes bounded by
    the session budget."""
    assert 0 <= held <= BUDGET, held
    if st is None:
        return
    for value in (st.rate, st.bottleneck, st.base_rtt, st.queueing_delay):
        assert value is None or (math.isfinite(value) and value >= 0), st


async def hostile_session(
    peer: RawPeer, rng: random.Random, opener: bool, open_targets: tuple[bytes, ...] = ()
) -> dict[str, int]:
    """Read what the other side sends (collecting the streams it opens) while sending garbage.
    With `open_targets`, the hostile side also opens streams itself (odd ids, as an edge does),
    to those targets and others, and then uses them like the streams opened to it."""
    sids: list[int] = []
    seen = {"frames_in": 0, "frames_out": 0}
    next_sid = 1

    async def reader() -> None:
        while True:
            f = await peer.read_frame()
            if f is None:
                return
            seen["frames_in"] += 1
            if f[0] == FrameType.OPEN:
                sids.append(f[2])

    try:
        async with trio.open_nursery() as n:
            n.start_soon(reader)
            for _ in range(rng.randrange(1, 60)):
                roll = rng.random()  # mostly plausible traffic, so sessions reach deeper states
                if open_targets and rng.random() < 0.15:
                    data = uplink_open(rng, next_sid, open_targets)
                    sids.append(next_sid)
                    next_sid += 2
                elif roll < 0.2:
                    data = random_frame(rng, sids, open_targets)
                elif roll < 0.85:
                    data = legit_frames(rng, sids, opener)
                else:
                    data = mutate(
                        rng,
                        legit_frames(rng, sids, opener) or random_frame(rng, sids, open_targets),
                    )
                await peer.send(data)
                seen["frames_out"] += 1
                if rng.random() < 0.3:
                    await trio.sleep(rng.choice([0, 0.001, 0.01]))
            if rng.random() < 0.2:  # a frame header that promises more than ever comes
                await peer.send(HEADER.pack((1000 << 8) | FrameType.DATA, 0, r_sid(rng, sids)))
            n.cancel_scope.cancel()
    except* (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
        pass  # the other side ended the session: that is its right
    finally:
        await peer.aclose()
    return seen


async def test_hostile_edges_never_take_the_cloud_down(tmp_path: Path) -> None:
    total = sessions(300)
    rng = random.Random(SEED)
    # Uplink targets in the cloud: an echo server the hostile edge's unit may reach, a port where
    # nothing listens (allowed too: refused dials), and targets of other units only.
    up_sock = socket.socket()
    up_sock.bind(("127.0.0.1", 0))
    up_sock.listen(64)
    up_echo, closed = f"127.0.0.1:{up_sock.getsockname()[1]}", f"127.0.0.1:{free_port()}"
    uplinks = {"fuzz": [up_echo, closed], "test": ["127.0.0.1:9"], "*": ["localhost:1"]}
    targets = tuple(
        t.encode()
        for t in (
            up_echo,
            closed,
            "127.0.0.1:9",
            "localhost:1",
            f"LOCALHOST.:{closed[10:]}",
            RENEW_TARGET,  # the cloud renews certificates (below): its renewal streams too
        )
    )
    certs = tmp_path / "certs"
    init_ca(certs, issuing_ca=True)
    (tmp_path / "tokens.yaml").write_text("")
    async with watched_env(
        tmp_path,
        mux={"session_budget": BUDGET, "max_streams": 16},
        proxy={"dial_timeout": 1.0},
        tunnel={"handshake_timeout": 5.0},
        uplinks=uplinks,
        uplink_dial_timeout=0.5,
        enrollment={
            "tokens_file": str(tmp_path / "tokens.yaml"),
            "ca": {"cert": str(certs / "issuing.crt"), "key": str(certs / "issuing.key")},
        },
    ) as (env, counts):
        assert env.nursery is not None
        env.nursery.start_soon(
            trio.serve_listeners,
            echo_bytes_quietly,
            [trio.SocketListener(trio.socket.from_stdlib_socket(up_sock))],
        )
        ctx = raw_edge_context(env.certs)
        rss0 = self_rss()
        done = {"sessions": 0, "frames": 0, "connects": 0, "refused": 0}

        async def connect_to_fuzz_edge() -> None:
            with trio.move_on_after(3):
                try:
                    status, _h, s = await connect(env.ports.proxy, FUZZ_SVC)
                    async with s:
                        if status == 200:
                            await s.send_all(b"x" * rng.randrange(1, 5000))
                            await s.receive_some(1000)
                except (
                    trio.BrokenResourceError,
                    trio.ClosedResourceError,
                    OSError,
                    AssertionError,
                ):
                    pass
            done["connects"] += 1

        async def one(seed: int) -> None:
            r = random.Random(seed)
            done["sessions"] += 1
            if done["sessions"] % 10000 == 0:
                print(
                    f"progress: {done['sessions']} hostile edge sessions, cloud RSS "
                    f"+{(self_rss() - rss0) / 2**20:.1f} MiB, {counts['ok']} healthy echoes",
                    flush=True,
                )
            try:
                peer = await RawPeer.connect(env.ports.tunnel, ctx)
            except (trio.BrokenResourceError, OSError, ssl.SSLError):
                done["refused"] += 1
                return
            try:
                await peer.send(hello_frame((FUZZ_SVC,)))
            except (trio.BrokenResourceError, OSError):
                await peer.aclose()
                return
            async with trio.open_nursery() as n:
                if r.random() < 0.5:
                    n.start_soon(connect_to_fuzz_edge)
                seen = await hostile_session(peer, r, opener=False, open_targets=targets)
            done["frames"] += seen["frames_out"]

        paced = {"looks": 0, "with_samples": 0}
        enroll, renew_opens = env.cloud.enroll, [0]
        assert enroll is not None
        on_renew_open = enroll.on_renew_open

        def count_renew_open(*args: Any) -> None:
            renew_opens[0] += 1
            on_renew_open(*args)

        setattr(enroll, "on_renew_open", count_renew_open)  # noqa: B010 (a counting wrapper)

        async def watch_pacers() -> None:
            """The pacers of the hostile tunnels stay sane under their DELAY answers."""
            while True:
                for tunnel in env.cloud.registry:
                    st = tunnel.session.conn.statistics()
                    paced["looks"] += 1
                    check_pacer(st.pacer, st.held)
                    if st.pacer is not None and st.pacer.samples:
                        paced["with_samples"] += 1
                await trio.sleep(0.005)

        env.nursery.start_soon(watch_pacers)
        with trio.fail_after(max(120, total * 0.5)):
            left = [total]

            async def worker() -> None:  # a fixed pool: memory does not grow with the count
                while left[0] > 0:
                    left[0] -= 1
                    await one(rng.randrange(1 << 32))

            async with trio.open_nursery() as n:
                for _ in range(CONCURRENT):
                    n.start_soon(worker)
        await wait_until(
            lambda: len(env.cloud.registry) == 1 and not env.cloud.tunnels.admission.pending,
            10,
            "one tunnel left and no handshake pending",
        )
        m = await metrics_of(env.ports.admin)
        grown = self_rss() - rss0
        up = {label["reason"]: v for label, v in m.get("kins_tunnel_uplink_refusals_total", [])}
        uplinks_opened = sum(v for _l, v in m.get("kins_tunnel_uplinks_total", []))
        print(
            f"\nFIGURE cloud under hostile edges: {done['sessions']} sessions, {done['frames']} frame writes, "
            f"{done['connects']} CONNECTs to the hostile edge, {done['refused']} TLS set-ups refused, "
            f"{uplinks_opened:.0f} uplinks opened, uplink refusals {up}, {renew_opens[0]} renewal streams, "
            f"{counts['ok']} healthy echoes, "
            f"RSS +{grown / 2**20:.1f} MiB"
        )
        # the uplink paths were exercised: opened, refused by the rules, refused by the target
        assert (
            uplinks_opened > 0 and up.get("not_allowed", 0) > 0 and up.get("bad_target", 0) > 0
        ), (uplinks_opened, up)
        assert up.get("refused", 0) > 0, up
        assert renew_opens[0] > 0  # renewal streams among the garbage
        assert done["sessions"] == total
        assert done["refused"] == 0  # a valid certificate is always let in
        assert paced["with_samples"] > 0, paced  # DELAY answers reached the pacers
        assert not m.get("kins_tunnel_internal_errors_total"), m.get(
            "kins_tunnel_internal_errors_total"
        )
        assert grown < BUDGET * 4, grown
        healthy = next(iter(env.cloud.registry))
        assert healthy.identity.unit == "test"
        await wait_until(
            lambda: healthy.session.stream_count <= 1, 5, "at most the checker's own stream"
        )


async def test_hostile_clouds_never_take_the_edge_down(tmp_path: Path) -> None:
    total = sessions(150)
    rng = random.Random(SEED + 1)
    accepted = {"n": 0, "frames": 0}
    async with trio.open_nursery() as outer:
        echo = await outer.start(serve_echo)
        async with tunnel_env(tmp_path) as env:
            sctx = server_ssl_context(
                env.certs / "ca.crt", env.certs / "cloud.crt", env.certs / "cloud.key"
            )
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            fake_port = listeners[0].socket.getsockname()[1]
            finished = trio.Event()

            async def hostile_cloud(tcp: trio.SocketStream) -> None:
                if accepted["n"] >= total:
                    await trio.aclose_forcefully(tcp)
                    return
                accepted["n"] += 1
                if accepted["n"] % 10000 == 0:
                    print(f"progress: {accepted['n']} hostile cloud sessions", flush=True)
                r = random.Random(rng.randrange(1 << 32))
                tls = trio.SSLStream(tcp, sctx, server_side=True)
                try:
                    with trio.fail_after(5):
                        await tls.do_handshake()
                    peer = RawPeer(tls)
                    await peer.send(hello_frame())
                    opens = b"".join(
                        open_frame(
                            sid, 1 << 18, r.choice([SVC, "edge1:22", "nope:1", "x" * 300]).encode()
                        )
                        for sid in range(2, 2 + 2 * r.randrange(0, 4), 2)
                    )
                    await peer.send(opens)
                    seen = await hostile_session(peer, r, opener=True)
                    accepted["frames"] += seen["frames_out"]
                except (
                    trio.BrokenResourceError,
                    trio.ClosedResourceError,
                    trio.TooSlowError,
                    ssl.SSLError,
                    OSError,
                ):
                    await trio.aclose_forcefully(tls)
                if accepted["n"] >= total:
                    finished.set()

            async with trio.open_nursery() as n:
                n.start_soon(trio.serve_listeners, hostile_cloud, listeners)
                edge = await env.add_edge(
                    {SVC: f"127.0.0.1:{echo}", "edge1:22": f"127.0.0.1:{echo}"},
                    wait_for=SVC,
                    cloud=[f"127.0.0.1:{env.ports.tunnel}", f"127.0.0.1:{fake_port}"],
                    reconnect={"initial": 0.01, "max": 0.05},
                    handshake_timeout=3.0,
                    mux={"session_budget": BUDGET, "max_streams": 16},
                )
                counts = {"ok": 0, "failed": 0, "paused": 0}
                n.start_soon(keep_echoing, env.ports.proxy, counts)
                rss0 = self_rss()
                with trio.fail_after(max(120, total * 0.8)):
                    await finished.wait()
                ok = counts["ok"]
                await wait_until(
                    lambda: counts["ok"] > ok + 1 or counts["failed"] > 0,
                    10,
                    "two more echo round trips",
                )
                grown = self_rss() - rss0
                m = edge.metrics.render()[2]
                n.cancel_scope.cancel()
            print(
                f"\nFIGURE edge under hostile clouds: {accepted['n']} sessions, {accepted['frames']} frame writes, "
                f"{counts['ok']} healthy echoes, RSS +{grown / 2**20:.1f} MiB, {edge.connects} tunnel set-ups"
            )
            assert counts["failed"] == 0, counts
            assert b"kins_tunnel_internal_errors_total{" not in m, m
            assert grown < BUDGET * 4, grown
            assert accepted["n"] == total
        outer.cancel_scope.cancel()
