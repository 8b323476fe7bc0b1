"""`kins-tunnel doctor`: check an edge.yaml or a cloud.yaml for what operators get wrong.

Theory of operation
-------------------
Every check is a small function that returns one or more `Check` records (frozen: what was
checked, ``ok`` / ``warn`` / ``FAIL``, what was found, and the fix in words); the CLI only prints
them. `run_doctor` runs the network checks concurrently, each inside its own deadline, and keeps
their order; an exception or a missed deadline in one check becomes that check's ``FAIL`` line
and never stops the others. A config that does not load is the only check after which nothing
else runs (there is nothing to check with).

For an edge config: enrolment state; the edge certificate (loads with its key, valid and not near
expiry, chains to ``tls.ca``, a legal identity); the site proxy (``proxy.url``) answers a
CONNECT to the cloud; for every ``cloud:`` entry: the name resolves, each address accepts TCP
(through the site proxy when there is one), and a real TLS handshake with the edge's own
certificate verifies the cloud's certificate against ``tls.ca`` and the name in ``cloud:``; the
probe then reads the cloud's HELLO, so a cloud that refuses this edge after the handshake (an
untrusted CA, a revoked or illegal identity) is told apart from one that accepts it; clock skew
from that HELLO; every ``services`` address accepts TCP.

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
the credential, rules and revocation files parse; each listen address can be bound, or is in use
by a running cloud whose admin ``/readyz`` answers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import ipaddress
import json
import math
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from kins_tunnel import __version__
from kins_tunnel.certs import identity_from_der
from kins_tunnel.config import (
    CloudConfig,
    EdgeConfig,
    check_exposure,
    cloud_config_from_dict,
    edge_config_from_dict,
)
from kins_tunnel.errors import UserError
from kins_tunnel.logs import escape_text
from kins_tunnel.names import Address
from kins_tunnel.pemfiles import load_certs
from kins_tunnel.proto import Connection, Hello, RemoteProtocolError, Role
from kins_tunnel.proto.events import HandshakeComplete
from kins_tunnel.tls_contexts import (
    client_ssl_context,
    proxy_server_ssl_context,
    server_ssl_context,
)
from kins_tunnel.transport.http_proxy import (
    ProxyDialer,
    ProxyError,
    ProxyRefused,
    connect_error_text,
)
from kins_tunnel.transport.listen import open_listener_socket
from kins_tunnel.transport.tls import TransportError
from kins_tunnel.yamlcheck import read_yaml

OK, WARN, FAIL = "ok", "warn", "FAIL"
EXPIRY_WARN_DAYS = 14  # less time left: a warning (a quarter of its life, if that is shorter)
EXPIRY_FAIL = dt.timedelta(days=1)  # less time left: a failure
SKEW_WARN = 10.0  # seconds of clock skew worth a warning
SKEW_FAIL = 300.0  # beyond: certificates issued "now" (backdated 5 min) are not yet valid here
MAX_ADDRESSES = 8  # resolved addresses of one cloud name checked one by one
HELLO_LIMIT = 65536  # bytes read from the cloud while waiting for its HELLO
DEFAULT_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the report."""

    check: str  # what was checked, e.g. "cloud 10.0.0.5:9000 TLS"
    status: str  # OK, WARN or FAIL
    detail: str  # what was found (one printable line)
    fix: str = ""  # what to do, in words ("" when nothing is to be done)

    def line(self) -> str:
        fix = f" -> {self.fix}" if self.fix else ""
        return f"{self.status:<4}  {self.check}: {self.detail}{fix}"

    def as_dict(self) -> dict[str, str]:
        return {"check": self.check, "status": self.status, "detail": self.detail, "fix": self.fix}


@dataclass(frozen=True, slots=True)
class Report:
    role: str  # "edge" or "cloud"
    config: str
    checks: tuple[Check, ...]

    @property
    def failed(self) -> bool:
        return any(c.status == FAIL for c in self.checks)

    def text(self) -> str:
        return "\n".join(c.line() for c in self.checks)

    def json(self) -> str:
        doc = {
            "role": self.role,
            "config": self.config,
            "ok": not self.failed,
            "checks": [c.as_dict() for c in self.checks],
        }
        return json.dumps(doc, indent=1)


def _said(text: object) -> str:
    """Text from a peer or a file, made one printable line."""
    return escape_text(str(text))[:300]


# --- running -------------------------------------------------------------------------------------

Probe = Callable[[], Awaitable[list[Check]]]


async def _bounded(label: str, probe: Probe, timeout: float) -> list[Check]:
    """`probe()` within `timeout`; a missed deadline or an error is `label`'s FAIL line."""
    with trio.move_on_after(timeout):
        try:
            return await probe()
        except Exception as exc:  # a bug in one check must not hide the others' results
            return [Check(label, FAIL, f"the check failed: {_said(exc)}")]
    return [Check(label, FAIL, f"no result within {timeout:g}s", "see the lines above or below")]


async def _run_all(probes: Sequence[tuple[str, Probe]], timeout: float) -> list[Check]:
    """Run `probes` concurrently; their lines in the order given."""
    slots: list[list[Check]] = [[] for _ in probes]

    async def one(i: int, label: str, probe: Probe) -> None:
        slots[i] = await _bounded(label, probe, timeout)

    async with trio.open_nursery() as nursery:
        for i, (label, probe) in enumerate(probes):
            nursery.start_soon(one, i, label, probe)
    return [c for slot in slots for c in slot]


def detect_role(data: Mapping[str, object]) -> str:
    """ "edge" if the file has the edge's required keys (``cloud``, ``services``), else "cloud"."""
    return "edge" if "cloud" in data or "services" in data else "cloud"


async def run_doctor(
    path: str, role: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> Report:
    """Check the config at `path` (role detected from the file unless given)."""
    try:
        data, base_dir = read_yaml(path)
    except UserError as exc:
        return Report(role or "?", path, (Check("config", FAIL, str(exc), "fix the file"),))
    role = role or detect_role(data)
    if role == "edge":
        checks = await edge_checks(data, base_dir, path, timeout)
    else:
        checks = await cloud_checks(data, base_dir, path, timeout)
    return Report(role, path, tuple(checks))


def _without(data: Mapping[str, object], key: str, fields: object) -> dict[str, object]:
    """`data` without `key` when this version's config does not know that section yet (so a
    config written for a newer version still gets every other check)."""
    out = dict(data)
    if key not in getattr(fields, "__dataclass_fields__", {}):
        out.pop(key, None)
    return out


# --- edge ----------------------------------------------------------------------------------------


async def edge_checks(
    data: Mapping[str, object], base_dir: Path, source: str, timeout: float
) -> list[Check]:
    try:
        cfg = edge_config_from_dict(
            _without(data, "enroll", EdgeConfig), base_dir=base_dir, source=source
        )
    except UserError as exc:
        return [Check("config", FAIL, str(exc), "fix the key it names")]
    checks = [Check("config", OK, f"{source} loads (edge)")]
    enrol = check_enrolment(data.get("enroll"), cfg, base_dir)
    checks.append(enrol)
    enrolling = not cfg.tls.cert.exists() and enrol.status == OK and "enroll" in data
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
        probes.append((f"cloud {entry}", _bind(check_cloud, cfg, entry, timeout, skip_tls)))
    for name, addrs in cfg.services.items():
        for addr in addrs:
            probes.append(
                (f"service {name} -> {addr}", _bind(check_service, name, addr, cfg, timeout))
            )
    checks.extend(await _run_all(probes, timeout + 1.0))
    return checks


def _bind(fn: Callable[..., Awaitable[list[Check]]], *args: Any) -> Probe:
    return lambda: fn(*args)


def check_enrolment(raw: object, cfg: EdgeConfig, base_dir: Path) -> Check:
    """The `enroll:` section, read from the file as written: enrolled, will enrol, or cannot."""
    name = "enrolment"
    if raw is None:
        return Check(name, OK, "not configured (tls.cert and tls.key are made with certs edge)")
    if not isinstance(raw, Mapping):
        return Check(name, FAIL, "enroll: is not a mapping", "write enroll: {token_file: ...}")
    if cfg.tls.cert.exists():
        return Check(name, OK, f"enrolled (certificate present: {cfg.tls.cert})")
    problems = []
    token_file = raw.get("token_file")
    ca_hash = raw.get("ca_hash")
    if not isinstance(ca_hash, str) or not _is_ca_hash(ca_hash):
        problems.append(
            ('enroll.ca_hash is not "sha256:<64 hex digits>"', "copy it from certs init")
        )
    if not isinstance(token_file, str) or not token_file:
        problems.append(("enroll.token_file is not set", "set it to the file holding the token"))
        token_path = None
    else:
        token_path = base_dir / token_file
        try:
            token = token_path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or "not readable text"
            problems.append(
                (
                    f"token file missing: {token_path} ({reason})",
                    "create a token with kins-tunnel token create and store it there",
                )
            )
        else:
            if not token:
                problems.append((f"token file {token_path} is empty", "store the token in it"))
    if problems:
        return Check(
            name, FAIL, "; ".join(p for p, _ in problems), "; ".join(f for _, f in problems)
        )
    return Check(name, OK, f"will enrol with token {token_path} (no certificate yet)")


def _is_ca_hash(text: str) -> bool:
    algo, _, digest = text.partition(":")
    return algo == "sha256" and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)


def check_edge_certificate(cfg: EdgeConfig, *, enrolling: bool) -> list[Check]:
    """tls.cert with tls.key and tls.ca: loads, valid, chains to tls.ca, a legal identity."""
    tls = cfg.tls
    if enrolling:
        return [Check("edge certificate", OK, "none yet: enrolment writes tls.cert and tls.key")]
    try:
        client_ssl_context(tls.ca, tls.cert, tls.key)  # the edge's own loader and its messages
        chain = load_certs(tls.cert, "tls.cert")
        cas = load_certs(tls.ca, "tls.ca")
    except UserError as exc:
        return [Check("edge certificate", FAIL, str(exc), "fix the file it names")]
    leaf = chain[0]
    out = [validity("edge certificate", leaf, "re-issue it (certs edge) or let it renew")]
    out.append(chains_to("edge certificate", leaf, chain[1:], cas, tls.ca, client=True))
    try:
        identity = identity_from_der(leaf.public_bytes(Encoding.DER))
    except ValueError as exc:
        out.append(
            Check(
                "edge identity",
                FAIL,
                _said(exc),
                "issue it with kins-tunnel certs edge --unit U --node N (legal names)",
            )
        )
    else:
        out.append(Check("edge identity", OK, f"unit {identity.unit}, node {identity.node}"))
    return out


def validity(what: str, cert: x509.Certificate, fix: str) -> Check:
    """Valid now and not within `EXPIRY_WARN_DAYS` of its end."""
    now = dt.datetime.now(dt.UTC)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    name = f"{what} validity"
    if start > now:
        return Check(
            name,
            FAIL,
            f"not valid before {start:%Y-%m-%dT%H:%M:%SZ}, {_ago(start - now)} from now",
            "this node's clock is behind (check NTP), or the certificate was issued with a "
            "clock ahead",
        )
    if end <= now:
        return Check(name, FAIL, f"expired {end:%Y-%m-%dT%H:%M:%SZ}, {_ago(now - end)} ago", fix)
    left = end - now
    shown = f"expires {end:%Y-%m-%dT%H:%M:%SZ}, in {_ago(left)}"
    if left < EXPIRY_FAIL:
        return Check(name, FAIL, shown + " (less than a day)", fix)
    # a short-lived certificate (enrolment) is renewed with a third of its life left: warn only
    # when that renewal is overdue, and never later than EXPIRY_WARN_DAYS before the end
    warn = min(dt.timedelta(days=EXPIRY_WARN_DAYS), (end - start) / 4)
    if left < warn:
        return Check(name, WARN, shown + f" (less than {_ago(warn)}): renew it soon", fix)
    return Check(name, OK, shown)


def _ago(delta: dt.timedelta) -> str:
    s = int(delta.total_seconds())
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600}h"
    return f"{s // 3600}h{s % 3600 // 60}m" if s >= 3600 else f"{s // 60}m{s % 60}s"


def chains_to(
    what: str,
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    cas: Sequence[x509.Certificate],
    ca_path: Path,
    *,
    client: bool,
    fix: str = "",
) -> Check:
    """Whether `leaf` (with the intermediates after it in its file) chains to a CA of `ca_path`,
    checked at a moment inside its validity (expiry is `validity`'s line)."""
    name = f"{what} issuer"
    at = leaf.not_valid_before_utc + (leaf.not_valid_after_utc - leaf.not_valid_before_utc) / 2
    now = dt.datetime.now(dt.UTC)
    if leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc:
        at = now
    try:
        builder = PolicyBuilder().store(Store(list(cas))).time(at)
        if client:
            builder.build_client_verifier().verify(leaf, list(intermediates))
        else:
            builder.build_server_verifier(_any_name(leaf)).verify(leaf, list(intermediates))
    except (VerificationError, ValueError) as exc:
        issuer = leaf.issuer.rfc4514_string()
        return Check(
            name,
            FAIL,
            f"does not chain to {ca_path} (issued by {_said(issuer)}: {_said(exc)})",
            fix or f"issue it with the CA in {ca_path}, or point tls.ca at the CA that issued it",
        )
    return Check(name, OK, f"signed by the CA in {ca_path}")


def _any_name(cert: x509.Certificate) -> x509.DNSName | x509.IPAddress:
    """A name the server certificate carries (to verify its chain, not its names)."""
    names = _cert_names(cert)
    for text in names:
        try:
            return x509.IPAddress(ipaddress.ip_address(text))
        except ValueError:
            return x509.DNSName(text.removeprefix("*.") if text.startswith("*.") else text)
    return x509.DNSName("localhost")


def _cert_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n) for n in san.get_values_for_type(x509.DNSName)] + [
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    ]


async def check_site_proxy(cfg: EdgeConfig, timeout: float) -> list[Check]:
    """The site proxy answers a CONNECT to the first cloud address."""
    assert cfg.proxy is not None
    name = "site proxy"
    target = Address.parse(cfg.cloud[0])
    try:
        dialer = ProxyDialer(cfg.proxy.url, cfg.proxy.credentials_file)
    except UserError as exc:
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
            return [Check(name, FAIL, _said(exc), fix)]
        except (ProxyError, TransportError) as exc:
            return [
                Check(
                    name,
                    FAIL,
                    _said(exc),
                    f"check proxy.url ({shown}) and that the proxy runs and is reachable",
                )
            ]
        await trio.aclose_forcefully(stream)
        return [Check(name, OK, f"{shown} answered a CONNECT to {target}")]
    return [Check(name, FAIL, f"{shown}: no answer within {timeout:g}s", "check proxy.url")]


@dataclass(frozen=True, slots=True)
class CloudProbe:
    """What a TLS probe of one cloud address found (the TLS and clock lines are made from it)."""

    check: Check  # the TLS line
    cloud_time: float | None = None  # the cloud's clock in its HELLO
    sent: float = 0.0  # our clock just before connecting
    received: float = 0.0  # our clock when the HELLO arrived
    not_before: dt.datetime | None = None  # of the cloud's certificate, if seen
    agent: str = ""


async def check_cloud(cfg: EdgeConfig, entry: str, timeout: float, skip_tls: str) -> list[Check]:
    """One `cloud:` entry: resolves, each address reachable, TLS (unless `skip_tls` says why
    not), clock."""
    addr = Address.parse(entry)
    label = f"cloud {entry}"
    try:
        with trio.fail_after(timeout):
            infos = await trio.socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM)
    except (OSError, trio.TooSlowError) as exc:
        why = _said(connect_error_text(exc) if isinstance(exc, OSError) else "no answer in time")
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
    results = await _run_all(
        [
            (f"{label} via {ip}", _bind(_check_address, cfg, addr, ip, timeout, skip_tls))
            for ip in ips[:MAX_ADDRESSES]
        ],
        timeout + 0.5,
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
        except UserError as exc:
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
        return [Check(f"{where} reachable", FAIL, _said(text), fix)]
    via = " through the site proxy" if dialer is not None else ""
    out = [Check(f"{where} reachable", OK, f"TCP connects{via}")]
    if skip_tls:
        await trio.aclose_forcefully(stream)
        out.append(Check(f"{where} TLS", WARN, f"not checked: {skip_tls}"))
        return out
    probe = await probe_cloud(stream, cfg, addr, timeout / 2)
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


async def probe_cloud(
    stream: trio.SocketStream, cfg: EdgeConfig, addr: Address, timeout: float
) -> CloudProbe:
    """TLS with the edge's own context and certificate, then the cloud's HELLO; owns `stream`."""
    sent = time.time()
    context = client_ssl_context(cfg.tls.ca, cfg.tls.cert, cfg.tls.key)
    tls = trio.SSLStream(stream, context, server_hostname=addr.host)
    try:
        with trio.move_on_after(timeout) as scope:
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                return await _verify_failure(exc, cfg, addr, timeout)
            der = tls.getpeercert(binary_form=True)
            not_before = (
                None if der is None else x509.load_der_x509_certificate(der).not_valid_before_utc
            )
            try:
                hello = await _read_hello(tls, cfg)
            except trio.BrokenResourceError as exc:
                return CloudProbe(_refusal(exc), not_before=not_before)
            except RemoteProtocolError as exc:
                return CloudProbe(
                    Check("", FAIL, f"not a kins-tunnel cloud: {_said(exc)}", "check the port")
                )
            received = time.time()
            if hello is None:
                return CloudProbe(_CLOSED_AFTER_HANDSHAKE, not_before=not_before)
            agent = _said(hello.agent)
            detail = (
                f"the cloud's certificate verifies against {cfg.tls.ca} and names {addr.host}; "
                f"the cloud ({agent}) accepted this edge's certificate"
            )
            return CloudProbe(Check("", OK, detail), hello.time, sent, received, not_before, agent)
        assert scope.cancelled_caught
        return CloudProbe(
            Check(
                "",
                FAIL,
                f"no TLS answer within {timeout:g}s",
                "is this the tunnel port (tunnel.listen), not the proxy or admin port?",
            )
        )
    finally:
        await trio.aclose_forcefully(tls)


async def _read_hello(
    tls: trio.SSLStream[trio.SocketStream], cfg: EdgeConfig
) -> HandshakeComplete | None:
    """The cloud's HELLO (we never send ours: this probe never becomes a tunnel); None on EOF."""
    conn = Connection(Role.CLIENT, Hello(agent=f"kins-tunnel-doctor/{__version__}"), cfg.mux)
    conn.data_to_send()  # our HELLO is never sent
    seen = 0
    while seen < HELLO_LIMIT:
        data = await tls.receive_some(16384)
        if not data:
            return None
        seen += len(data)
        for event in conn.receive_data(data):
            if isinstance(event, HandshakeComplete):
                return event
    raise RemoteProtocolError(f"no HELLO in the first {HELLO_LIMIT} bytes")


_VERIFY_CODES = {2, 18, 19, 20, 21}  # OpenSSL: issuer unknown, self-signed, ...


async def _verify_failure(
    exc: trio.BrokenResourceError, cfg: EdgeConfig, addr: Address, timeout: float
) -> CloudProbe:
    """The TLS handshake failed on our side or by the cloud's alert: say why in words."""
    cause = exc.__cause__
    if not isinstance(cause, ssl.SSLCertVerificationError):
        return CloudProbe(_refusal(exc))
    code = cause.verify_code
    if code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
        names = await _peer_names(cfg, addr, timeout)
        return CloudProbe(
            Check(
                "",
                FAIL,
                f"the cloud's certificate does not name {addr.host} (it names: {names})",
                f"re-issue it with kins-tunnel certs init --cloud-san {addr.host}, or use one of "
                "its names in cloud:",
            )
        )
    if code in _VERIFY_CODES:
        return CloudProbe(
            Check(
                "",
                FAIL,
                f"the cloud's certificate is not signed by the CA in tls.ca ({cfg.tls.ca}): "
                f"{_said(cause.verify_message)}",
                "give the edge the ca.crt of the CA that issued the cloud's certificate",
            )
        )
    if code == 9:  # not yet valid
        return CloudProbe(
            Check(
                "",
                FAIL,
                "the cloud's certificate is not yet valid here",
                "this node's clock is behind (check NTP); see the clock line",
            ),
            not_before=await _peer_not_before(cfg, addr, timeout),
        )
    if code == 10:
        return CloudProbe(
            Check(
                "",
                FAIL,
                "the cloud's certificate has expired",
                "re-issue it (kins-tunnel certs init --dir certs) and update the cloud's Secret",
            )
        )
    return CloudProbe(
        Check(
            "",
            FAIL,
            f"the cloud's certificate does not verify: {_said(cause.verify_message)}",
            "re-issue it with kins-tunnel certs init",
        )
    )


_ALERTS = (  # text of the cloud's TLS alert -> what it means and what to do
    (
        "unknown ca",
        "the cloud does not trust the CA that issued this edge's certificate (unknown ca)",
        "issue the edge certificate with the CA in the cloud's tls.ca",
    ),
    (
        "certificate expired",
        "the cloud refused this edge's certificate as expired",
        "re-issue it (certs edge) or let it renew; check both clocks",
    ),
    (
        "certificate required",
        "the cloud asked for a client certificate and got none",
        "set tls.cert and tls.key",
    ),
    (
        "bad certificate",
        "the cloud refused this edge's certificate (bad certificate)",
        "issue it with kins-tunnel certs edge from the cloud's CA",
    ),
    (
        "unsupported certificate",
        "the cloud refused this edge's certificate (unsupported: e.g. no clientAuth usage)",
        "issue it with kins-tunnel certs edge",
    ),
    (
        "no application protocol",
        "the cloud does not speak this edge's protocol (ALPN)",
        "check that the port is a kins-tunnel cloud's tunnel.listen",
    ),
    (
        "wrong version number",
        "the peer does not speak TLS",
        "check that the port is a kins-tunnel cloud's tunnel.listen (not the plain proxy port)",
    ),
)


# TLS 1.3: the client's handshake is done before the cloud has checked the client certificate,
# so a cloud that drops the connection instead of answering is read here, before its HELLO
_CLOSED_AFTER_HANDSHAKE = Check(
    "",
    FAIL,
    "the cloud closed the connection after the TLS handshake, before its HELLO: it refused this "
    "edge (revoked in tunnel.revoked_file, an identity it does not accept, or no handshake slot "
    "free)",
    "see the cloud's log line 'edge handshake refused' for this node",
)


def _refusal(exc: BaseException) -> Check:
    text = str(exc.__cause__ or exc)
    lowered = text.lower().replace("_", " ")
    for key, what, fix in _ALERTS:
        if key in lowered:
            return Check("", FAIL, what, fix)
    if "eof" in lowered or "reset" in lowered:
        return _CLOSED_AFTER_HANDSHAKE
    return Check("", FAIL, f"TLS failed: {_said(text)}", "see the cloud's log")


async def _peer_cert(cfg: EdgeConfig, addr: Address, timeout: float) -> x509.Certificate | None:
    """The cloud's certificate, fetched without verifying it (to explain a failed verification)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with trio.move_on_after(timeout):
        try:
            stream = await trio.open_tcp_stream(addr.host, addr.port)
        except OSError:
            return None
        tls = trio.SSLStream(stream, context, server_hostname=addr.host)
        try:
            await tls.do_handshake()
            der = tls.getpeercert(binary_form=True)
            return None if der is None else x509.load_der_x509_certificate(der)
        except (trio.BrokenResourceError, ValueError):
            return None
        finally:
            await trio.aclose_forcefully(tls)
    return None


async def _peer_names(cfg: EdgeConfig, addr: Address, timeout: float) -> str:
    cert = await _peer_cert(cfg, addr, timeout)
    if cert is None:
        return "unknown: it could not be read"
    return ", ".join(_said(n) for n in _cert_names(cert)) or "nothing"


async def _peer_not_before(cfg: EdgeConfig, addr: Address, timeout: float) -> dt.datetime | None:
    cert = await _peer_cert(cfg, addr, timeout)
    return None if cert is None else cert.not_valid_before_utc


def clock_check(name: str, probe: CloudProbe) -> Check:
    """Clock skew from the cloud's HELLO time (or proof of it from its certificate)."""
    if probe.cloud_time is not None and math.isfinite(probe.cloud_time):
        # the cloud read its clock between `sent` and `received` (ours)
        if probe.cloud_time < probe.sent:
            skew = probe.cloud_time - probe.sent  # negative: the cloud is behind us
        elif probe.cloud_time > probe.received:
            skew = probe.cloud_time - probe.received  # positive: the cloud is ahead
        else:
            skew = 0.0
        bound = f"measured to within {probe.received - probe.sent:.3f}s"
        shown = (
            f"this node's clock is {abs(skew):.1f}s {'behind' if skew > 0 else 'ahead of'} "
            f"the cloud's ({bound})"
        )
        if abs(skew) > SKEW_FAIL:
            return Check(
                name,
                FAIL,
                shown,
                "fix the clocks (NTP on both sides): certificates look not yet valid or expired",
            )
        if abs(skew) > SKEW_WARN:
            return Check(name, WARN, shown, "run NTP (chrony, systemd-timesyncd) on both sides")
        return Check(
            name,
            OK,
            f"within {max(abs(skew), probe.received - probe.sent):.3f}s of the cloud's clock",
        )
    now = dt.datetime.now(dt.UTC)
    if probe.not_before is not None and probe.not_before > now:
        return Check(
            name,
            FAIL,
            f"the cloud's certificate starts {probe.not_before:%Y-%m-%dT%H:%M:%SZ}, "
            f"{_ago(probe.not_before - now)} in this node's future: this clock is behind",
            "fix this node's clock (NTP)",
        )
    if probe.check.status == OK:
        return Check(
            name, WARN, "not measured: the cloud does not state its time (an older version)"
        )
    return Check(name, WARN, "not measured: no HELLO from the cloud (see the TLS line)")


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
        return [Check(label, FAIL, _said(why), fix)]
    await trio.aclose_forcefully(stream)
    return [Check(label, OK, "accepts TCP")]


# --- cloud ---------------------------------------------------------------------------------------


async def cloud_checks(
    data: Mapping[str, object], base_dir: Path, source: str, timeout: float
) -> list[Check]:
    try:
        cfg = cloud_config_from_dict(
            _without(data, "enrollment", CloudConfig), base_dir=base_dir, source=source
        )
        check_exposure(cfg.proxy, source=source)
    except UserError as exc:
        return [Check("config", FAIL, str(exc), "fix the key it names")]
    checks = [Check("config", OK, f"{source} loads (cloud)")]
    checks.extend(check_cloud_certificate(cfg))
    checks.extend(check_proxy_tls(cfg))
    checks.extend(check_cloud_files(cfg))
    enrollment = data.get("enrollment")
    if enrollment is not None:
        checks.extend(check_enrollment_files(enrollment, base_dir))
    checks.extend(await check_listeners(cfg, timeout))
    return checks


def check_cloud_certificate(cfg: CloudConfig) -> list[Check]:
    tls = cfg.tls
    try:
        server_ssl_context(tls.ca, tls.cert, tls.key)
        chain = load_certs(tls.cert, "tls.cert")
        cas = load_certs(tls.ca, "tls.ca")
    except UserError as exc:
        return [Check("cloud certificate", FAIL, str(exc), "fix the file it names")]
    out = [ca_check("tls.ca", cas[0], tls.ca)]
    leaf = chain[0]
    renew = "re-issue it (kins-tunnel certs init --dir certs keeps the CA) and update the Secret"
    out.append(validity("cloud certificate", leaf, renew))
    out.append(chains_to("cloud certificate", leaf, chain[1:], cas, tls.ca, client=False))
    names = _cert_names(leaf)
    local = {"localhost", "127.0.0.1", "::1"}
    if not set(names) - local:
        out.append(
            Check(
                "cloud certificate names",
                WARN,
                f"only {', '.join(names) or 'nothing'}: edges on other hosts cannot verify it",
                "re-issue with kins-tunnel certs init --cloud-san <the name edges put in cloud:>",
            )
        )
    else:
        out.append(
            Check(
                "cloud certificate names",
                OK,
                f"{', '.join(_said(n) for n in names)} (edges must use one of these in cloud:)",
            )
        )
    return out


def ca_check(what: str, ca: x509.Certificate, path: Path) -> Check:
    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        return Check(
            what, FAIL, f"{path} is not a CA certificate", "point it at the CA (certs/ca.crt)"
        )
    return validity(what, ca, "make a new CA and re-issue every certificate")


def check_proxy_tls(cfg: CloudConfig) -> list[Check]:
    pt = cfg.proxy.tls
    if pt is None:
        return []
    cert, key = pt.cert or cfg.tls.cert, pt.key or cfg.tls.key
    try:
        proxy_server_ssl_context(pt.client_ca, cert, key)
        leaf = load_certs(cert, "proxy.tls.cert")[0]
    except UserError as exc:
        return [Check("proxy TLS", FAIL, str(exc), "fix the file it names")]
    out = [Check("proxy TLS", OK, f"{cert} and its key load")]
    if pt.cert is not None:
        out.append(validity("proxy certificate", leaf, "re-issue it (certs init --proxy-san)"))
    return out


def check_cloud_files(cfg: CloudConfig) -> list[Check]:
    """The credential, rules and revocation files parse (with the cloud's own parsers)."""
    from kins_tunnel.cloud.auth import parse_basic, parse_bearer
    from kins_tunnel.cloud.authz import parse_rules
    from kins_tunnel.cloud.revocation import parse_revoked

    auth = cfg.proxy.auth
    files: list[tuple[str, Path | None, Callable[[bytes], object]]] = [
        ("proxy.auth.basic_file", auth.basic_file if auth else None, parse_basic),
        ("proxy.auth.bearer_file", auth.bearer_file if auth else None, parse_bearer),
        ("proxy.authz_file", cfg.proxy.authz_file, parse_rules),
        ("tunnel.revoked_file", cfg.tunnel.revoked_file, parse_revoked),
    ]
    out = []
    for key, path, parse in files:
        if path is None:
            continue
        try:
            parse(path.read_bytes())
        except OSError as exc:
            out.append(Check(key, FAIL, f"cannot read {path}: {exc.strerror or exc}", "create it"))
        except ValueError as exc:
            out.append(Check(key, FAIL, f"{path}: {_said(exc)}", "fix the line it names"))
        else:
            out.append(Check(key, OK, f"{path} parses"))
    return out


def check_enrollment_files(raw: object, base_dir: Path) -> list[Check]:
    """The `enrollment:` section, read as written: its files exist and the CA pair matches."""
    if not isinstance(raw, Mapping):
        return [Check("enrollment", FAIL, "enrollment: is not a mapping", "see the README")]
    out = []
    tokens = raw.get("tokens_file")
    if isinstance(tokens, str):
        path = base_dir / tokens
        out.append(
            Check("enrollment.tokens_file", OK, f"{path} exists")
            if path.exists()
            else Check(
                "enrollment.tokens_file",
                WARN,
                f"{path} does not exist yet",
                "kins-tunnel token create --tokens-file ... writes it",
            )
        )
    ca = raw.get("ca")
    if (
        isinstance(ca, Mapping)
        and isinstance(ca.get("cert"), str)
        and isinstance(ca.get("key"), str)
    ):
        from kins_tunnel.pemfiles import load_key

        try:
            cert = load_certs(base_dir / ca["cert"], "enrollment.ca.cert")[0]
            key = load_key(base_dir / ca["key"], "enrollment.ca.key")
        except UserError as exc:
            out.append(Check("enrollment.ca", FAIL, str(exc), "fix the file it names"))
        else:
            if cert.public_key() != key.public_key():
                out.append(
                    Check(
                        "enrollment.ca",
                        FAIL,
                        "the key does not belong to the certificate",
                        "point cert and key at one pair (certs/issuing.crt, issuing.key)",
                    )
                )
            else:
                out.append(ca_check("enrollment.ca", cert, base_dir / ca["cert"]))
    return out


async def check_listeners(cfg: CloudConfig, timeout: float) -> list[Check]:
    """Each listen address can be bound, or is held by a running cloud that answers /readyz."""
    listeners: list[tuple[str, Address]] = [("tunnel.listen", cfg.tunnel.listen)]
    if cfg.proxy.listen is not None:
        listeners.append(("proxy.listen", cfg.proxy.listen))
    if cfg.proxy.tls is not None:
        listeners.append(("proxy.tls.listen", cfg.proxy.tls.listen))
    listeners.append(("admin.listen", cfg.admin.listen))
    in_use: list[str] = []
    out: list[Check] = []
    for key, addr in listeners:
        try:
            open_listener_socket(addr.host, addr.port, key).close()
        except UserError as exc:
            cause = exc.__cause__
            if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
                in_use.append(key)
                out.append(Check(key, OK, f"{addr} is in use (a running cloud? see admin)"))
            else:
                out.append(Check(key, FAIL, str(exc), "use an address of this host"))
        else:
            out.append(Check(key, OK, f"{addr} can be bound"))
    if not in_use:
        return out
    ready = await _readyz(cfg.admin.listen, timeout)
    if ready is None:
        return [
            Check(
                c.check,
                FAIL,
                c.detail.replace("(a running cloud? see admin)", "by another program"),
                "stop the other program or choose another port (no cloud admin /readyz "
                f"answers at {cfg.admin.listen})",
            )
            if c.check in in_use
            else c
            for c in out
        ]
    status, body = ready
    verdict = Check(
        "running cloud",
        OK if status == 200 else FAIL,
        f"admin /readyz at {cfg.admin.listen} answers {status} {_said(body.strip())}",
        "" if status == 200 else "see the cloud's log",
    )
    return [
        Check(
            c.check,
            c.status,
            c.detail.replace("(a running cloud? see admin)", "by the running cloud"),
        )
        if c.check in in_use
        else c
        for c in out
    ] + [verdict]


async def _readyz(admin: Address, timeout: float) -> tuple[int, str] | None:
    host = (
        "127.0.0.1"
        if admin.host in ("0.0.0.0", "")
        else "::1"
        if admin.host == "::"
        else admin.host
    )
    url = f"http://{str(Address(host, admin.port))}/readyz"

    def get() -> tuple[int, str] | None:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (http only)
                return resp.status, resp.read(200).decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(200).decode("utf-8", "replace")
        except (urllib.error.URLError, OSError, ValueError):
            return None

    with trio.move_on_after(timeout + 1):
        return await trio.to_thread.run_sync(get, abandon_on_cancel=True)
    return None


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
