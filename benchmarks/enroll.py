"""Cost of enrolment and renewal: `python -m benchmarks.enroll [--rounds N]`.

A cloud with an issuing CA and an edge client run as trio tasks of this one process on 127.0.0.1
(so each figure includes the work of both sides): N enrolments (a fresh token each: TLS without a
client certificate, CA bundle, pinning and verification, key generation, CSR, signing, the token
use written back to the tokens file, the three files written atomically), then N renewals over
one established tunnel (a stream, a new key, CSR, signing, two files written). Prints the median
and the 90th percentile of each, in milliseconds. Bounded: `--rounds` (default 50, at most 1000).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import tempfile
import time
from pathlib import Path

import trio

from kins_tunnel.certs.directory import init_ca
from kins_tunnel.certs.issuing import ca_hash_of_file
from kins_tunnel.cloud.server import Cloud
from kins_tunnel.config import cloud_config_from_dict, edge_config_from_dict
from kins_tunnel.edge.agent import Edge
from kins_tunnel.edge.enroll import Enrolment
from kins_tunnel.metrics import Metrics
from kins_tunnel.tokens import create_token


def _p90(values: list[float]) -> float:
    return sorted(values)[max(0, int(len(values) * 0.9) - 1)]


async def _run(base: Path, rounds: int) -> dict[str, list[float]]:
    certs = base / "certs"
    init_ca(certs, issuing_ca=True)
    tokens = base / "tokens.yaml"
    tokens.write_text("")
    cloud = Cloud(
        cloud_config_from_dict(
            {
                "tunnel": {"listen": "127.0.0.1:0"},
                "proxy": {"listen": "127.0.0.1:0"},
                "admin": {"listen": "127.0.0.1:0"},
                "tls": {
                    k: str(certs / f"{v}")
                    for k, v in (("ca", "ca.crt"), ("cert", "cloud.crt"), ("key", "cloud.key"))
                },
                "alias_discovery": {"enabled": False},
                "enrollment": {
                    "tokens_file": str(tokens),
                    "ca": {"cert": str(certs / "issuing.crt"), "key": str(certs / "issuing.key")},
                    "max_failures_per_source": 1000,
                },
            },
            base_dir=base,
        )
    )
    out: dict[str, list[float]] = {"enrol": [], "renew": []}
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(cloud.run)

        def edge_doc(i: int) -> dict[str, object]:
            d = base / f"edge{i}"
            return {
                "cloud": [f"127.0.0.1:{ports.tunnel}"],
                "tls": {
                    "ca": str(d / "ca.crt"),
                    "cert": str(d / "tls.crt"),
                    "key": str(d / "tls.key"),
                },
                "services": {f"edge{i}:22": "127.0.0.1:9"},
                "admin": None,
                "enroll": {
                    "token_file": str(d / "token"),
                    "ca_hash": ca_hash_of_file(certs / "ca.crt"),
                    "node": f"edge{i}",
                },
            }

        for i in range(rounds):
            cfg = edge_config_from_dict(edge_doc(i), base_dir=base)
            assert cfg.enroll is not None
            cfg.enroll.token_file.parent.mkdir()
            token = create_token(tokens, "test", f"edge{i}", dt.timedelta(hours=1), 1)
            cfg.enroll.token_file.write_text(token)
            enrolment = Enrolment(cfg, Metrics("edge", lambda: ()))
            start = time.perf_counter()
            await enrolment.enrol_once(None)
            out["enrol"].append((time.perf_counter() - start) * 1000)
        edge = Edge(edge_config_from_dict(edge_doc(0), base_dir=base))
        await nursery.start(edge.run)
        while not cloud.registry.serves("edge0:22"):
            await trio.sleep(0.01)
        assert edge.enrolment is not None
        for _ in range(rounds):
            edge.enrolment._load()
            start = time.perf_counter()
            await edge.enrolment.renew_once(list(edge.sessions.values()))
            out["renew"].append((time.perf_counter() - start) * 1000)
        nursery.cancel_scope.cancel()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=50)
    args = p.parse_args()
    rounds = max(1, min(args.rounds, 1000))
    with tempfile.TemporaryDirectory(prefix="kins-bench-enroll-") as tmp:
        results = trio.run(_run, Path(tmp), rounds)
    for name, values in results.items():
        print(
            f"{name:6s} n={len(values)}  median {statistics.median(values):.1f} ms  "
            f"p90 {_p90(values):.1f} ms"
        )


if __name__ == "__main__":
    main()
