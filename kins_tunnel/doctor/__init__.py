"""`kins-tunnel doctor`: check an edge.yaml or a cloud.yaml for what operators get wrong.

Theory of operation
-------------------
Every check is a small function that returns one or more `Check` records (frozen: what was
checked, ``ok`` / ``warn`` / ``FAIL``, what was found, and the fix in words); the CLI only prints
them. `run_doctor` runs the network checks concurrently, each inside its own deadline, and keeps
their order; an exception or a missed deadline in one check becomes that check's ``FAIL`` line
and never stops the others. A config that does not load is the only check after which nothing
else runs (there is nothing to check with).

For an edge config: enrolment state (`edge.enroll.enrollment_state`); the edge certificate (loads
with its key, valid and not near expiry (for one the edge renews: `cloud.expiry.warn_within`),
chains to ``tls.ca``, a legal identity, every ``services`` name one the cloud routes to that
identity); secret files not readable by every user; the site proxy (``proxy.url``) answers a
CONNECT to the cloud; for every ``cloud:`` entry: the name resolves, each address accepts TCP
(through the site proxy when there is one), and a real TLS handshake with the edge's own
certificate verifies the cloud's certificate against ``tls.ca`` and the name in ``cloud:``; the
probe then reads the cloud's HELLO, so a cloud that refuses this edge after the handshake (an
untrusted CA, a revoked or illegal identity) is told apart from one that accepts it; clock skew
from that HELLO; every ``services`` address accepts TCP (a failing one is a warning when another
address of the same service accepts); the edge's own listen addresses (admin, uplinks) as for the
cloud below.

The probe never sends its own HELLO: it never becomes a tunnel (it never displaces a live tunnel
of the same identity, and nothing is routed to it). The cloud logs it as a tunnel whose handshake
did not complete (``edge tunnel handshake failed``) and counts it in
``kins_tunnel_handshake_failures_total``.

Clock skew: the cloud states its wall clock in its HELLO (``time``, a compatible extension).
The probe notes its own clock just before the handshake began and when the HELLO arrived; the
cloud's clock was read in between, so the skew is known to within that interval: reported only
when the cloud's clock lies outside it. A cloud without ``time`` (an older version) gives no
measurement, except that a cloud certificate whose notBefore is in this node's future proves this
clock is behind.

For a cloud config: the config loads (including the exposure rule), the TLS files load and match,
chain to ``tls.ca``, are not near expiry and name something edges can use; the proxy's TLS files;
the credential, rules and revocation files parse; ``enrollment``: the tokens file parses and
the issuing CA passes the cloud's start-up checks (and has path length 0, not near expiry); each
listen address can be bound, or is in use
by the running cloud of this config, whose admin ``/readyz`` answers as kins-tunnel does.

Layout: `report` (the records and how checks run), `certificates` (validity, chain, file modes),
`edge` and `cloud_probe` (an edge config), `cloud` (a cloud config), `listeners` (both).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import trio

from kins_tunnel.config import CloudConfig, EdgeConfig
from kins_tunnel.doctor.cloud import cloud_checks
from kins_tunnel.doctor.edge import edge_checks
from kins_tunnel.doctor.report import DEFAULT_TIMEOUT, FAIL, OK, WARN, Check, Report
from kins_tunnel.errors import UserError
from kins_tunnel.yamlcheck import read_yaml

__all__ = [
    "FAIL",
    "OK",
    "WARN",
    "Check",
    "Report",
    "add_arguments",
    "detect_role",
    "main_doctor",
    "run_doctor",
]


_EDGE_ONLY = frozenset(set(EdgeConfig.__dataclass_fields__) - set(CloudConfig.__dataclass_fields__))
_CLOUD_ONLY = frozenset(
    set(CloudConfig.__dataclass_fields__) - set(EdgeConfig.__dataclass_fields__)
)


def detect_role(data: Mapping[str, object], path: str = "") -> str:
    """ "edge" or "cloud": by the top-level keys only one of them has (``cloud``, ``services``,
    ``enroll`` ... or ``tunnel``, ``aliases``, ``enrollment`` ...), else by the file name."""
    keys = set(data)
    edge = len(keys & (_EDGE_ONLY | {"enroll"}))
    cloud = len(keys & (_CLOUD_ONLY | {"enrollment"}))
    if edge != cloud:
        return "edge" if edge > cloud else "cloud"
    return "edge" if "edge" in Path(path).name.lower() else "cloud"


async def run_doctor(
    path: str, role: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> Report:
    """Check the config at `path` (role detected from the file unless given)."""
    try:
        data, base_dir = read_yaml(path)
    except UserError as exc:
        return Report(role or "?", path, (Check("config", FAIL, str(exc), "fix the file"),))
    role = role or detect_role(data, path)
    if role == "edge":
        checks = await edge_checks(data, base_dir, path, timeout)
    else:
        checks = await cloud_checks(data, base_dir, path, timeout)
    return Report(role, path, tuple(checks))


# --- command line --------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="an edge.yaml or a cloud.yaml")
    p.add_argument(
        "--role", choices=("edge", "cloud"), default=None, help="default: detected from the file"
    )
    p.add_argument("--json", action="store_true", help="one JSON document instead of lines")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds each network check may take (default {DEFAULT_TIMEOUT:g})",
    )


def main_doctor(args: argparse.Namespace) -> int:
    """Print the report; 1 if any check failed, else 0."""
    if not (0 < args.timeout <= 300):
        raise UserError("--timeout: must be more than 0 and at most 300 seconds")
    report = trio.run(run_doctor, args.config, args.role, args.timeout)
    print(report.json() if args.json else report.text())
    return 1 if report.failed else 0
