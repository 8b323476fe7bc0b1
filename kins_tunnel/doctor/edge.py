"""The checks of an edge.yaml (see the package's docstring)."""

from __future__ import annotations

import functools
import json
import socket
from collections.abc import Mapping
from pathlib import Path

import trio
from cryptography.hazmat.primitives.serialization import Encoding

from kins_tunnel.certs.identity import EdgeIdentity, identity_from_der
from kins_tunnel.cloud.registry import allowed_name
from kins_tunnel.config import EdgeConfig, edge_config_from_dict
from kins_tunnel.doctor.certificates import chains_to, issued_by, secret_mode, validity
from kins_tunnel.doctor.cloud_probe import clock_check, probe_cloud
from kins_tunnel.doctor.listeners import check_listeners
from kins_tunnel.doctor.report import FAIL, OK, WARN, Check, Probe, load_config, run_all, said
from kins_tunnel.edge.credentials import current_credentials, enrollment_state
from kins_tunnel.errors import UserError
from kins_tunnel.names import Address
from kins_tunnel.pemfiles import load_certs
from kins_tunnel.tls_contexts import client_ssl_context
from kins_tunnel.transport.errors import SetupError, TransportError
from kins_tunnel.transport.http_proxy import (
    ProxyDialer,
    ProxyError,
    ProxyRefused,
    connect_error_text,
)

MAX_ADDRESSES = 8  # resolved addresses of one cloud name checked one by one


async def edge_checks(
    data: Mapping[str, object], base_dir: Path, source: str, timeout: float
) -> list[Check]:
    cfg, loaded = load_config(
        functools.partial(edge_config_from_dict, base_dir=base_dir, source=source),
        data,
        f"{source} loads (edge)",
    )
    if cfg is None:
        return [loaded]
    checks = [loaded]
    enrol = check_enrolment(cfg)
    checks.append(enrol)
    if cfg.enroll is not None:
        checks.extend(secret_mode("enroll.token_file", cfg.enroll.token_file))
    enrolling = cfg.enroll is not None and enrol.status == OK and current_credentials(cfg) is None
    checks.extend(check_edge_certificate(cfg, enrolling=enrolling))
    skip_tls = (
        "no edge certificate yet (enrolment makes it)"
        if enrolling
        else ""
        if all(c.check != "edge certificate" for c in checks)  # its files load
        else "the edge certificate does not load (see above)"
    )
    probes: list[tuple[str, Probe]] = []
    if cfg.proxy is not None:
        probes.append(("site proxy", lambda: check_site_proxy(cfg, timeout)))
    for entry in cfg.cloud:
        probes.append(
            (f"cloud {entry}", functools.partial(check_cloud, cfg, entry, timeout, skip_tls))
        )
    for name, addrs in cfg.services.items():
        for addr in addrs:
            probes.append(
                (
                    f"service {name} -> {addr}",
                    functools.partial(check_service, name, addr, cfg, timeout),
                )
            )
    # each step below has its own deadline; this one is a safety net: a cloud entry takes at
    # most a name lookup (timeout) and, per address, connect + TLS + explanation (timeout/2 each)
    checks += _spare_addresses(cfg, await run_all(probes, 3 * timeout + 1.0))
    listeners = [(f'uplinks."{listen}"', listen) for listen in cfg.uplinks]
    if cfg.uplink_proxy is not None:
        listeners.append(("uplink_proxy.listen", cfg.uplink_proxy.listen))
    if cfg.admin is not None:
        listeners.append(("admin.listen", cfg.admin.listen))
    admin = None if cfg.admin is None else cfg.admin.listen
    return checks + await check_listeners("edge", listeners, admin, timeout)


def _spare_addresses(cfg: EdgeConfig, checks: list[Check]) -> list[Check]:
    """A service address that fails while another address of the same service accepts is a
    warning: the edge tries a service's addresses in turn (an L5 unit's three K3s servers)."""
    working = {
        name
        for name, addrs in cfg.services.items()
        for addr in addrs
        if any(c.check == f"service {name} -> {addr}" and c.status == OK for c in checks)
    }
    prefixes = tuple(f"service {name} -> " for name in working)
    return [
        Check(c.check, WARN, c.detail + " (another address of this service accepts)", c.fix)
        if c.status == FAIL and c.check.startswith(prefixes)
        else c
        for c in checks
    ]


def check_enrolment(cfg: EdgeConfig) -> Check:
    """Where the edge stands with `enroll` (`edge.enroll.enrollment_state`, the edge's own view):
    enrolled, will enrol, or cannot."""
    name = "enrolment"
    if cfg.enroll is None:
        return Check(name, OK, "not configured (tls.cert and tls.key are made with certs edge)")
    ok, state = enrollment_state(cfg)
    if ok:
        return Check(name, OK, state)
    return Check(
        name,
        FAIL,
        state,
        "store the token kins-tunnel token create printed in enroll.token_file (or, if the "
        "edge was enrolled, restore tls.cert and tls.key)",
    )


def check_edge_certificate(cfg: EdgeConfig, *, enrolling: bool) -> list[Check]:
    """tls.cert with tls.key and tls.ca: loads, valid, chains to tls.ca, a legal identity."""
    tls = cfg.tls
    if enrolling:
        return [
            Check(
                "edge certificate",
                OK,
                "none usable yet (missing, expired or not its key's): enrolment writes tls.cert "
                "and tls.key",
            )
        ]
    try:
        client_ssl_context(tls.ca, tls.cert, tls.key)  # the edge's own loader and its messages
        chain = load_certs(tls.cert, "tls.cert")
        cas = load_certs(tls.ca, "tls.ca")
    except UserError as exc:
        return [Check("edge certificate", FAIL, str(exc), "fix the file it names")]
    leaf = chain[0]
    renews = cfg.enroll is not None and any(issued_by(leaf, c) for c in chain[1:])
    out = [
        validity(
            "edge certificate",
            leaf,
            "re-issue it (certs edge) or let it renew",
            renew_at=cfg.enroll.renew_at if renews and cfg.enroll is not None else None,
        )
    ]
    out.extend(secret_mode("tls.key", tls.key))
    out.append(chains_to("edge certificate", leaf, chain[1:], cas, tls.ca))
    try:
        identity = identity_from_der(leaf.public_bytes(Encoding.DER))
    except ValueError as exc:
        out.append(
            Check(
                "edge identity",
                FAIL,
                said(exc),
                "issue it with kins-tunnel certs edge --unit U --node N (legal names)",
            )
        )
    else:
        out.append(Check("edge identity", OK, f"unit {identity.unit}, node {identity.node}"))
        out.extend(check_routable(cfg, identity))
    return out


def check_routable(cfg: EdgeConfig, identity: EdgeIdentity) -> list[Check]:
    """Each `services` name is one the cloud routes to this identity (`allowed_name`): the cloud
    drops any other name the edge advertises, and that name is then never reachable."""
    out = []
    for name in cfg.services:
        if allowed_name(identity, name) is None:
            out.append(
                Check(
                    f"service {name} name",
                    FAIL,
                    f"the cloud does not route {name} to this edge: its certificate allows only "
                    f"{identity.unit}-svc-kins.kins-system:<port> and {identity.node}:<port>",
                    "rename the service, or use the certificate of the node that serves it",
                )
            )
    return out


async def check_site_proxy(cfg: EdgeConfig, timeout: float) -> list[Check]:
    """The site proxy answers a CONNECT to the first cloud address."""
    assert cfg.proxy is not None
    name = "site proxy"
    target = Address.parse(cfg.cloud[0])
    try:
        dialer = ProxyDialer(cfg.proxy.url, cfg.proxy.credentials_file)
    except SetupError as exc:
        return [Check(name, FAIL, str(exc), "fix proxy.credentials_file (one line user:password)")]
    shown = dialer.url.authority
    with trio.move_on_after(timeout):
        try:
            stream = await dialer.open(target.host, target.port)
        except ProxyRefused as exc:
            fix = (
                "fix proxy.credentials_file (the proxy wants other credentials)"
                if exc.status == 407
                else f"let the proxy CONNECT to {target} (e.g. squid SSL_ports, tinyproxy "
                "ConnectPort)"
            )
            return [Check(name, FAIL, said(exc), fix)]
        except (ProxyError, TransportError) as exc:
            return [
                Check(
                    name,
                    FAIL,
                    said(exc),
                    f"check proxy.url ({shown}) and that the proxy runs and is reachable",
                )
            ]
        await trio.aclose_forcefully(stream)
        return [Check(name, OK, f"{shown} answered a CONNECT to {target}")]
    return [Check(name, FAIL, f"{shown}: no answer within {timeout:g}s", "check proxy.url")]


async def check_cloud(cfg: EdgeConfig, entry: str, timeout: float, skip_tls: str) -> list[Check]:
    """One `cloud:` entry: resolves, each address reachable, TLS (unless `skip_tls` says why
    not), clock."""
    addr = Address.parse(entry)
    label = f"cloud {entry}"
    try:
        with trio.fail_after(timeout):
            infos = await trio.socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM)
    except (OSError, trio.TooSlowError) as exc:
        why = said(connect_error_text(exc) if isinstance(exc, OSError) else "no answer in time")
        if cfg.proxy is None:
            return [
                Check(
                    f"{label} resolves",
                    FAIL,
                    f"{addr.host} does not resolve: {why}",
                    "check the name in cloud: and this node's DNS (/etc/resolv.conf)",
                )
            ]
        # behind a site proxy the edge hands a name it cannot resolve to the proxy: so do we
        ips = [addr.host]
        out = [
            Check(
                f"{label} resolves",
                WARN,
                f"{addr.host} does not resolve here ({why}); the site proxy is asked for it",
                "fine if the proxy resolves it (see the reachable line)",
            )
        ]
    else:
        ips = list(dict.fromkeys(str(info[4][0]) for info in infos))
        shown = "an IP address" if ips == [addr.host] else "-> " + ", ".join(ips[:MAX_ADDRESSES])
        out = [Check(f"{label} resolves", OK, f"{addr.host} {shown}")]
    if len(ips) > MAX_ADDRESSES:
        out.append(
            Check(
                f"{label} resolves",
                WARN,
                f"{len(ips)} addresses; the first {MAX_ADDRESSES} checked",
            )
        )
    results = await run_all(
        [
            (
                f"{label} via {ip}",
                functools.partial(_check_address, cfg, addr, ip, timeout, skip_tls),
            )
            for ip in ips[:MAX_ADDRESSES]
        ],
        2 * timeout,  # a safety net: connect, TLS and its explanation take timeout/2 each
    )
    return out + results


async def _check_address(
    cfg: EdgeConfig, addr: Address, ip: str, timeout: float, skip_tls: str
) -> list[Check]:
    where = f"cloud {addr} ({ip})" if ip != addr.host else f"cloud {addr}"
    dialer = None
    if cfg.proxy is not None:
        try:
            dialer = ProxyDialer(cfg.proxy.url, cfg.proxy.credentials_file)
        except SetupError as exc:
            return [Check(f"{where} reachable", FAIL, str(exc), "see the site proxy line")]
    opener = trio.open_tcp_stream if dialer is None else dialer.open
    try:
        with trio.fail_after(timeout / 2):
            stream = await opener(ip, addr.port)
    except trio.TooSlowError:
        return [
            Check(
                f"{where} reachable",
                FAIL,
                f"no answer within {timeout / 2:g}s",
                "a firewall drops the packets, or the address is not the cloud's",
            )
        ]
    except (OSError, TransportError) as exc:
        text = connect_error_text(exc) if isinstance(exc, OSError) else str(exc)
        fix = "see the site proxy line" if dialer is not None else _connect_fix(exc, addr)
        return [Check(f"{where} reachable", FAIL, said(text), fix)]
    via = " through the site proxy" if dialer is not None else ""
    out = [Check(f"{where} reachable", OK, f"TCP connects{via}")]
    if skip_tls:
        await trio.aclose_forcefully(stream)
        out.append(Check(f"{where} TLS", WARN, f"not checked: {skip_tls}"))
        return out
    reopen = functools.partial(opener, ip, addr.port)
    probe = await probe_cloud(stream, reopen, cfg, addr, timeout / 2)
    out.append(Check(f"{where} TLS", probe.check.status, probe.check.detail, probe.check.fix))
    out.append(clock_check(f"{where} clock", probe))
    return out


def _connect_fix(exc: BaseException, addr: Address) -> str:
    if isinstance(exc, ConnectionRefusedError) or (
        isinstance(exc, OSError) and "refused" in connect_error_text(exc).lower()
    ):
        return (
            f"nothing listens on port {addr.port}: start tunnel-cloud, or make its tunnel.listen "
            "and this port agree"
        )
    return "check routing and firewalls between this node and the cloud"


async def check_service(name: str, addr: Address, cfg: EdgeConfig, timeout: float) -> list[Check]:
    """One `services` address accepts a TCP connection within dial_timeout."""
    label = f"service {name} -> {addr}"
    limit = min(cfg.dial_timeout, timeout)
    try:
        with trio.fail_after(limit):
            stream = await trio.open_tcp_stream(addr.host, addr.port)
    except trio.TooSlowError:
        return [
            Check(
                label,
                FAIL,
                f"no answer within {limit:g}s",
                "a firewall drops the packets, or the address is wrong",
            )
        ]
    except OSError as exc:
        why = connect_error_text(exc)
        fix = (
            f"start the service on {addr}, or correct services.{json.dumps(name)}"
            if "refused" in why.lower()
            else f"check the address in services.{json.dumps(name)}"
        )
        return [Check(label, FAIL, said(why), fix)]
    await trio.aclose_forcefully(stream)
    return [Check(label, OK, "accepts TCP")]
