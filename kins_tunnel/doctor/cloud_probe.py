"""The probe of one cloud address from an edge: a real TLS handshake with the edge's own
context and certificate, then the cloud's HELLO (never ours: the probe never becomes a tunnel);
failures told in words; clock skew from the HELLO's `time`."""

from __future__ import annotations

import datetime as dt
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio
from cryptography import x509

from kins_tunnel import __version__
from kins_tunnel.config import EdgeConfig
from kins_tunnel.doctor.certificates import ago, cert_names
from kins_tunnel.doctor.report import FAIL, OK, WARN, Check, said
from kins_tunnel.names import Address
from kins_tunnel.proto import Connection, Hello, RemoteProtocolError, Role
from kins_tunnel.proto.events import HandshakeComplete
from kins_tunnel.tls_contexts import client_ssl_context
from kins_tunnel.transport.tls import TransportError

SKEW_WARN = 10.0  # seconds of clock skew worth a warning
SKEW_FAIL = 300.0  # beyond: certificates issued "now" (backdated 5 min) are not yet valid here
HELLO_LIMIT = 65536  # bytes read from the cloud while waiting for its HELLO


@dataclass(frozen=True, slots=True)
class CloudProbe:
    """What a TLS probe of one cloud address found (the TLS and clock lines are made from it)."""

    check: Check  # the TLS line
    cloud_time: float | None = None  # the cloud's clock in its HELLO
    sent: float = 0.0  # our clock just before connecting
    received: float = 0.0  # our clock when the HELLO arrived
    not_before: dt.datetime | None = None  # of the cloud's certificate, if seen
    agent: str = ""


Reopen = Callable[[], Awaitable[trio.abc.Stream]]  # another connection to the same address


async def probe_cloud(
    stream: trio.abc.Stream, reopen: Reopen, cfg: EdgeConfig, addr: Address, timeout: float
) -> CloudProbe:
    """TLS with the edge's own context and certificate, then the cloud's HELLO, within `timeout`;
    owns `stream`. A failed verification is explained from a second, unverified handshake
    (`reopen`), within `timeout` again."""
    sent = time.time()
    context = client_ssl_context(cfg.tls.ca, cfg.tls.cert, cfg.tls.key)
    tls = trio.SSLStream(stream, context, server_hostname=addr.host)
    failure: trio.BrokenResourceError | None = None
    try:
        with trio.move_on_after(timeout):
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                failure = exc
            else:
                return await _after_handshake(tls, cfg, addr, sent)
    finally:
        await trio.aclose_forcefully(tls)
    if failure is not None:
        return await _verify_failure(failure, cfg, addr, reopen, timeout)
    return CloudProbe(
        Check(
            "",
            FAIL,
            f"no TLS answer within {timeout:g}s",
            "is this the tunnel port (tunnel.listen), not the proxy or admin port?",
        )
    )


async def _after_handshake(
    tls: trio.SSLStream[trio.abc.Stream], cfg: EdgeConfig, addr: Address, sent: float
) -> CloudProbe:
    """The cloud's certificate verified: did the cloud accept ours (its HELLO), and its clock."""
    der = tls.getpeercert(binary_form=True)
    not_before = None if der is None else x509.load_der_x509_certificate(der).not_valid_before_utc
    try:
        hello = await _read_hello(tls, cfg)
    except trio.BrokenResourceError as exc:
        return CloudProbe(_refusal(exc), not_before=not_before)
    except RemoteProtocolError as exc:
        return CloudProbe(
            Check("", FAIL, f"not a kins-tunnel cloud: {said(exc)}", "check the port")
        )
    received = time.time()
    if hello is None:
        return CloudProbe(_CLOSED_AFTER_HANDSHAKE, not_before=not_before)
    agent = said(hello.agent)
    detail = (
        f"the cloud's certificate verifies against {cfg.tls.ca} and names {addr.host}; "
        f"the cloud ({agent}) accepted this edge's certificate"
    )
    return CloudProbe(Check("", OK, detail), hello.time, sent, received, not_before, agent)


async def _read_hello(
    tls: trio.SSLStream[trio.abc.Stream], cfg: EdgeConfig
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
    exc: trio.BrokenResourceError, cfg: EdgeConfig, addr: Address, reopen: Reopen, timeout: float
) -> CloudProbe:
    """The TLS handshake failed on our side or by the cloud's alert: say why in words."""
    cause = exc.__cause__
    if not isinstance(cause, ssl.SSLCertVerificationError):
        return CloudProbe(_refusal(exc))
    code = cause.verify_code
    if code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
        names = await _peer_names(reopen, addr, timeout)
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
                f"{said(cause.verify_message)}",
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
            not_before=await _peer_not_before(reopen, addr, timeout),
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
            f"the cloud's certificate does not verify: {said(cause.verify_message)}",
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
    return Check("", FAIL, f"TLS failed: {said(text)}", "see the cloud's log")


async def _peer_cert(reopen: Reopen, addr: Address, timeout: float) -> x509.Certificate | None:
    """The cloud's certificate, fetched without verifying it (to explain a failed verification);
    None if it cannot be had within `timeout`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with trio.move_on_after(timeout):
        try:
            stream = await reopen()
        except (OSError, TransportError):
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


async def _peer_names(reopen: Reopen, addr: Address, timeout: float) -> str:
    cert = await _peer_cert(reopen, addr, timeout)
    if cert is None:
        return "unknown: it could not be read"
    return ", ".join(said(n) for n in cert_names(cert)) or "nothing"


async def _peer_not_before(reopen: Reopen, addr: Address, timeout: float) -> dt.datetime | None:
    cert = await _peer_cert(reopen, addr, timeout)
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
            f"{ago(probe.not_before - now)} in this node's future: this clock is behind",
            "fix this node's clock (NTP)",
        )
    if probe.check.status == OK:
        return Check(
            name, WARN, "not measured: the cloud does not state its time (an older version)"
        )
    return Check(name, WARN, "not measured: no HELLO from the cloud (see the TLS line)")
