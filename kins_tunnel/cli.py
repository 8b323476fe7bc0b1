"""The `kins-tunnel` command line (the contract is in the README; the design in docs/DESIGN.md).

User errors (bad config, unreadable certificate, port in use) print one line to stderr and exit 2;
no tracebacks. SIGTERM/SIGINT make cloud and edge drain before exiting.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from kins_tunnel import __version__
from kins_tunnel.errors import UserError
from kins_tunnel.names import redact_url
from kins_tunnel.transport.errors import SetupError

log = logging.getLogger("kins_tunnel")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kins-tunnel", description="Reverse tunnel into edge K3s clusters (SuperEdge Kins)."
    )
    p.add_argument("--version", action="version", version=f"kins-tunnel {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    certs = sub.add_parser("certs", help="create the CA and certificates").add_subparsers(
        dest="certs_cmd", required=True
    )
    ci = certs.add_parser(
        "init", help="CA and cloud certificate: DIR/ca.{crt,key}, DIR/cloud.{crt,key}"
    )
    ci.add_argument("--dir", required=True)
    ci.add_argument("--cloud-san", action="append", default=[], metavar="NAME_OR_IP")
    ci.add_argument(
        "--proxy-san",
        action="append",
        default=None,
        metavar="NAME_OR_IP",
        help="also issue DIR/proxy.{crt,key} for the proxy's TLS listener (proxy.tls), "
        "naming what clients put in proxy-url, from the proxy CA DIR/proxy-ca.{crt,key} "
        "(created on first use, name-constrained to these names); repeat it",
    )
    ci.add_argument(
        "--issuing-ca",
        action="store_true",
        help="also create DIR/issuing.{crt,key}: the CA the cloud signs enrolled edges with "
        "(enrollment.ca), and print the CA hash edges pin (enroll.ca_hash)",
    )
    tk = certs.add_parser(
        "ticket-key",
        help="write a random session ticket secret (tunnel.session_ticket_key_file), mode 0600",
    )
    tk.add_argument("--out", required=True, metavar="FILE")
    ch = certs.add_parser("ca-hash", help="print the CA hash edges pin (enroll.ca_hash)")
    ch.add_argument("--dir", required=True)
    ce = certs.add_parser("edge", help="edge client certificate: DIR/edge-NODE.{crt,key}")
    ce.add_argument("--dir", required=True)
    ce.add_argument("--unit", required=True)
    ce.add_argument("--node", required=True)
    cu = certs.add_parser(
        "user", help="client certificate for the proxy's TLS listener: DIR/user-NAME.{crt,key}"
    )
    cu.add_argument("--dir", required=True)
    cu.add_argument("--name", required=True, help="the principal (subject CN)")
    cu.add_argument("--group", action="append", default=[], help="a group (subject O); repeat it")
    cu.add_argument("--days", type=int, default=365)
    tok = sub.add_parser("token", help="enrolment tokens (enrollment.tokens_file)").add_subparsers(
        dest="token_cmd", required=True
    )
    tc = tok.add_parser("create", help="create a token; prints it alone on stdout")
    tc.add_argument("--unit", required=True)
    tc.add_argument("--node", default=None, help="enrol this node only (default: any node)")
    tc.add_argument("--ttl", default="24h", help="validity, e.g. 30m, 24h, 7d (default 24h)")
    tc.add_argument("--uses", type=int, default=1, help="enrolments it allows (default 1)")
    tl = tok.add_parser("list", help="list tokens (ids, bindings, expiry, uses; never secrets)")
    td = tok.add_parser("delete", help="delete a token by its id")
    td.add_argument("id")
    for t in (tc, tl, td):
        t.add_argument("--tokens-file", required=True)
    for name in ("cloud", "edge"):
        sp = sub.add_parser(name, help=f"run tunnel-{name}")
        sp.add_argument("--config", required=True)
    d = sub.add_parser("demo", help="cloud + edge + a K3s-API stand-in on loopback")
    d.add_argument("--proxy-port", type=int, default=8080, help="CONNECT port (0: any free port)")
    k = sub.add_parser("kubeconfig", help="rewrite an edge kubeconfig to go through the tunnel")
    k.add_argument("--unit", required=True)
    k.add_argument("--proxy-url", required=True)
    k.add_argument("-i", "--input", default=None)
    k.add_argument("-o", "--output", default=None)
    k.add_argument(
        "--proxy-ca",
        default=None,
        metavar="PEM",
        help="the proxy CA (certs/proxy-ca.crt, name-constrained); needed with an https proxy "
        "URL. Never the tunnel CA: kubectl trusts this CA for K3s too",
    )
    k.add_argument(
        "--server-ca",
        default=None,
        metavar="PEM",
        help="K3s server CA; replaces the kubeconfig's CA or insecure-skip-tls-verify",
    )
    k.add_argument(
        "--proxy-credentials-file",
        default=None,
        metavar="FILE",
        help="proxy credentials (one line user:password) to put in the written proxy-url, so "
        "that they are not on the command line; or a user in --proxy-url and the password in "
        "$KINS_TUNNEL_PROXY_PASSWORD",
    )
    k.add_argument(
        "--service-ip",
        default=None,
        metavar="IP",
        help="write server: https://IP:443 (the Service IP form) instead of the service name",
    )
    st = sub.add_parser(
        "status", help="table of connected edges (reads the cloud's admin endpoint)"
    )
    st.add_argument(
        "--admin",
        action="append",
        metavar="URL",
        help="admin URL of a tunnel-cloud replica (default http://127.0.0.1:9090); "
        "repeat it to list the edges of several replicas in one table",
    )
    st.add_argument("--json", action="store_true")
    from kins_tunnel.connect import add_arguments as add_connect_arguments

    add_connect_arguments(
        sub.add_parser(
            "connect",
            help="CONNECT through a proxy, then relay stdin/stdout (for ssh's ProxyCommand)",
        )
    )
    from kins_tunnel.doctor import add_arguments as add_doctor_arguments

    add_doctor_arguments(
        sub.add_parser("doctor", help="check an edge.yaml or a cloud.yaml: one line per check")
    )
    return p


async def _serve_until_signal(
    run: Callable[..., Awaitable[object]], drain: Callable[[], Awaitable[None]]
) -> None:
    # The receiver outlives the nursery: `_second_signal` iterates it until the nursery is done
    # (iterating a receiver whose block has exited raises RuntimeError).
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(run)
            async for sig in signals:
                log.info("signal %s: draining", signal.Signals(sig).name)
                nursery.start_soon(_second_signal, signals, nursery.cancel_scope)
                await drain()
                nursery.cancel_scope.cancel()
                return


async def _second_signal(signals: object, scope: trio.CancelScope) -> None:
    async for _ in signals:  # type: ignore[attr-defined]
        scope.cancel()  # a second Ctrl-C: stop now
        return


def _run_cloud(path: str) -> None:
    from kins_tunnel.cloud.server import Cloud
    from kins_tunnel.config import load_cloud_config
    from kins_tunnel.logs import setup_logging

    cfg = load_cloud_config(path)
    setup_logging(cfg.log)
    cloud = Cloud(cfg)
    trio.run(_serve_until_signal, cloud.run, cloud.drain)


def _run_edge(path: str) -> None:
    from kins_tunnel.config import load_edge_config
    from kins_tunnel.edge.agent import Edge
    from kins_tunnel.logs import setup_logging

    cfg = load_edge_config(path)
    setup_logging(cfg.log)
    edge = Edge(cfg)
    trio.run(_serve_until_signal, edge.run, edge.drain)


def _run_demo(proxy_port: int) -> None:
    from kins_tunnel.config import LogSettings

    if (
        importlib.util.find_spec("kins_tunnel.testing") is None
    ):  # demo.py's stand-in: not in the image
        raise UserError(
            "the demo needs kins_tunnel.testing (its K3s API stand-in), which this "
            "installation leaves out (the container image does); run it from a "
            "source checkout: make demo"
        )
    from kins_tunnel.demo import run_demo
    from kins_tunnel.logs import setup_logging

    setup_logging(LogSettings(level="warning"))

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_demo, None, proxy_port)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)


def _token(args: argparse.Namespace) -> None:
    from kins_tunnel import tokens

    path = Path(args.tokens_file)
    if args.token_cmd == "create":
        ttl = tokens.parse_duration(args.ttl)
        print(tokens.create_token(path, args.unit, args.node, ttl, args.uses))
    elif args.token_cmd == "delete":
        tokens.delete_token(path, args.id)
        print(f"deleted token {args.id}", file=sys.stderr)
    else:
        _table(tokens.token_rows(path))


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


# the columns of `kins-tunnel status` for a cloud, in order
_STATUS_COLUMNS = tuple(
    "UNIT NODE REPLICA UPTIME RTT STREAMS SENT RECEIVED EXPIRES PEER QDELAY".split()
)


def _status(admins: list[str], as_json: bool) -> None:
    docs = []
    for admin in admins:
        url = admin.rstrip("/") + "/status"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                docs.append(json.load(resp))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise UserError(
                f"cannot read {redact_url(url)}: {redact_url(str(getattr(exc, 'reason', exc)))}"
            ) from exc
    if as_json:
        print(json.dumps(docs[0] if len(docs) == 1 else docs, indent=1))
        return
    edge_docs = [d for d in docs if isinstance(d, dict) and "tunnels" in d and "edges" not in d]
    docs = [d for d in docs if d not in edge_docs]
    for doc in edge_docs:  # an edge's own admin (port 9091): its tunnels and its certificate
        _edge_status(doc)
    if not docs:
        return
    rows: list[tuple[str, ...]] = [_STATUS_COLUMNS]
    for doc in docs:
        for e in sorted(doc.get("edges", []), key=lambda e: (e["unit"], e["node"], e["replica"])):
            rows.append(
                (
                    e["unit"],
                    e["node"],
                    e["replica"],
                    _dur(e["uptime"]),
                    "-" if e["rtt_ms"] is None else f"{e['rtt_ms']:.2f}ms",
                    str(e["streams"]),
                    _size(e["bytes_sent"]),
                    _size(e["bytes_received"]),
                    _expires(e.get("cert_expiry_seconds"), e.get("cert_warn_seconds")),
                    e["peer"],
                    _qdelay(e),
                )
            )
    _table(rows)
    if len(rows) == 1:
        names = ", ".join(str(d.get("replica", "?")) for d in docs)
        print(f"(no edges connected to replica {names})")
    for doc in docs:
        for c in doc.get("certificates", []):
            print(
                f"{doc.get('replica', '?')}: {c['cert']} certificate expires {_expires(c['expiry_seconds'])}"
                f" ({c['not_after']}, serial {c['serial']})"
            )


def _qdelay(edge: dict[str, object]) -> str:
    """The queueing delay the cloud's direction of a tunnel adds, `*` when bulk is paced."""
    ms = edge.get("queue_delay_ms")
    if not isinstance(ms, (int, float)):
        return "-"
    return f"{ms:.1f}ms" + ("*" if edge.get("pacing") == "engaged" else "")


def _edge_status(doc: dict[str, object]) -> None:
    tunnels = doc.get("tunnels")
    count = len(tunnels) if isinstance(tunnels, list) else 0
    print(f"edge {doc.get('unit') or '?'}/{doc.get('node') or '?'}: {count} tunnel(s) to the cloud")
    cert = doc.get("certificate")
    if not isinstance(cert, dict):
        return
    line = f"  certificate: {cert.get('enrollment', '?')}"
    if "not_after" in cert:
        line += (
            f", expires {_expires(cert.get('expires_in_seconds'), 0)} ({cert['not_after']}),"
            f" renewal due {cert.get('renew_at')}, renewed {cert.get('renewals', 0)} time(s)"
        )
    print(line)
    if cert.get("warning"):
        print(f"  WARNING: {cert['warning']}")
    elif cert.get("last_error"):
        print(f"  last error: {cert['last_error']}")


def _expires(seconds: object, warn: object = None) -> str:
    """Time left of a certificate, flagged when within `warn` seconds (default 30 days; less for
    short-lived certificates, as the cloud says): `812d`, `12d!`, `EXPIRED`."""
    if not isinstance(seconds, (int, float)):
        return "-"
    if seconds <= 0:
        return "EXPIRED"
    text = f"{int(seconds // 86400)}d" if seconds >= 86400 else _dur(seconds)
    within = warn if isinstance(warn, (int, float)) else 30 * 86400
    return text + "!" if seconds < within else text


def _dur(seconds: float) -> str:
    s = int(seconds)
    return (
        f"{s // 86400}d{s % 86400 // 3600}h"
        if s >= 86400
        else f"{s // 3600}h{s % 3600 // 60}m"
        if s >= 3600
        else f"{s // 60}m{s % 60}s"
    )


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.1f}TiB"


# what the operator can fix: printed as one line, exit 2 (the transport's SetupError names a setting)
_ONE_LINE_ERRORS = (UserError, SetupError)


def _first_user_error(
    group: BaseExceptionGroup[BaseException],
) -> UserError | SetupError | None:
    for exc in group.exceptions:
        if isinstance(exc, _ONE_LINE_ERRORS):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_user_error(exc)
            if found is not None:
                return found
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "certs":
            from kins_tunnel.certs.directory import init_ca, issue_edge, issue_user
            from kins_tunnel.certs.issuing import ca_hash_of_file

            if args.certs_cmd == "init":
                init_ca(
                    Path(args.dir),
                    args.cloud_san,
                    proxy_sans=args.proxy_san,
                    issuing_ca=args.issuing_ca,
                )
                proxy = (
                    ", proxy-ca.crt, proxy-ca.key, proxy.crt, proxy.key"
                    if args.proxy_san is not None
                    else ""
                )
                issuing = ", issuing.crt, issuing.key" if args.issuing_ca else ""
                print(f"wrote {args.dir}/ca.crt, ca.key, cloud.crt, cloud.key{proxy}{issuing}")
                if args.issuing_ca:
                    print(f"CA hash (enroll.ca_hash): {ca_hash_of_file(Path(args.dir) / 'ca.crt')}")
            elif args.certs_cmd == "ticket-key":
                from kins_tunnel.tls_tickets import write_secret

                write_secret(Path(args.out))
                print(
                    f"wrote {args.out} (tunnel.session_ticket_key_file; share it with the cloud only)"
                )
            elif args.certs_cmd == "ca-hash":
                print(ca_hash_of_file(Path(args.dir) / "ca.crt"))
            elif args.certs_cmd == "user":
                crt, key = issue_user(Path(args.dir), args.name, args.group, days=args.days)
                print(
                    f"wrote {crt} and {key} (principal {args.name}"
                    + (f", groups {','.join(args.group)})" if args.group else ")")
                )
            else:
                crt, key = issue_edge(Path(args.dir), args.unit, args.node)
                print(f"wrote {crt} and {key} (unit {args.unit}, node {args.node})")
        elif args.cmd == "token":
            _token(args)
        elif args.cmd == "cloud":
            _run_cloud(args.config)
        elif args.cmd == "edge":
            _run_edge(args.config)
        elif args.cmd == "demo":
            _run_demo(args.proxy_port)
        elif args.cmd == "kubeconfig":
            from kins_tunnel.kubeconfig import main_kubeconfig

            return main_kubeconfig(
                args.unit,
                args.proxy_url,
                args.input,
                args.output,
                proxy_ca=args.proxy_ca,
                server_ca=args.server_ca,
                service_ip=args.service_ip,
                proxy_credentials_file=args.proxy_credentials_file,
            )
        elif args.cmd == "connect":
            from kins_tunnel.connect import main_connect

            return main_connect(args)
        elif args.cmd == "doctor":
            from kins_tunnel.doctor import main_doctor

            return main_doctor(args)
        elif args.cmd == "status":
            _status(args.admin or ["http://127.0.0.1:9090"], args.json)
    except _ONE_LINE_ERRORS as exc:
        print(f"kins-tunnel: error: {exc}", file=sys.stderr)
        return 2
    except BaseExceptionGroup as group:  # raised from inside trio.run's nurseries
        user = _first_user_error(group)
        if user is None:
            raise
        print(f"kins-tunnel: error: {user}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
