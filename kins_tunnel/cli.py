"""The `kins-tunnel` command line (the contract is in the README; the design in docs/DESIGN.md).

User errors (bad config, unreadable certificate, port in use) print one line to stderr and exit 2;
no tracebacks. SIGTERM/SIGINT make cloud and edge drain before exiting.
"""

from __future__ import annotations

import argparse
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

    try:
        from kins_tunnel.demo import run_demo
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("kins_tunnel.testing"):
            raise
        raise UserError(
            "the demo needs kins_tunnel.testing (its K3s API stand-in), which this "
            "installation leaves out (the container image does); run it from a "
            "source checkout: make demo"
        ) from None
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


def _status(admins: list[str], as_json: bool) -> None:
    docs = []
    for admin in admins:
        url = admin.rstrip("/") + "/status"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                docs.append(json.load(resp))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise UserError(f"cannot read {url}: {getattr(exc, 'reason', exc)}") from exc
    if as_json:
        print(json.dumps(docs[0] if len(docs) == 1 else docs, indent=1))
        return
    rows = [
        (
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
        )
    ]
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
                    _expires(e.get("cert_expiry_seconds")),
                    e["peer"],
                    _qdelay(e),
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
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


def _expires(seconds: object) -> str:
    """Time left of a certificate, flagged when within 30 days: `812d`, `12d!`, `EXPIRED`."""
    if not isinstance(seconds, (int, float)):
        return "-"
    if seconds <= 0:
        return "EXPIRED"
    text = f"{int(seconds // 86400)}d" if seconds >= 86400 else _dur(seconds)
    return text + "!" if seconds < 30 * 86400 else text


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


def _first_user_error(group: BaseExceptionGroup[BaseException]) -> UserError | None:
    for exc in group.exceptions:
        if isinstance(exc, UserError):
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
            from kins_tunnel import certs

            if args.certs_cmd == "init":
                certs.init_ca(Path(args.dir), args.cloud_san, proxy_sans=args.proxy_san)
                proxy = (
                    ", proxy-ca.crt, proxy-ca.key, proxy.crt, proxy.key"
                    if args.proxy_san is not None
                    else ""
                )
                print(f"wrote {args.dir}/ca.crt, ca.key, cloud.crt, cloud.key{proxy}")
            elif args.certs_cmd == "user":
                crt, key = certs.issue_user(Path(args.dir), args.name, args.group, days=args.days)
                print(
                    f"wrote {crt} and {key} (principal {args.name}"
                    + (f", groups {','.join(args.group)})" if args.group else ")")
                )
            else:
                crt, key = certs.issue_edge(Path(args.dir), args.unit, args.node)
                print(f"wrote {crt} and {key} (unit {args.unit}, node {args.node})")
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
            )
        elif args.cmd == "connect":
            from kins_tunnel.connect import main_connect

            return main_connect(args)
        elif args.cmd == "status":
            _status(args.admin or ["http://127.0.0.1:9090"], args.json)
    except UserError as exc:
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
