"""The cloud's `proxy` section: the CONNECT proxy's listeners, credentials and limits.

Read with the same `Section` and one-line errors as the rest of the configuration (`config`, which
re-exports these names). `check_exposure` is the rule applied once the whole file is read: a proxy
without credentials listens on loopback unless `proxy.anonymous: true` says open access is meant.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kins_tunnel.errors import UserError
from kins_tunnel.names import Address, is_loopback_host
from kins_tunnel.yamlcheck import Section


@dataclass(frozen=True, slots=True)
class ProxyAuth:
    basic_file: Path | None = None  # lines "user:password"
    bearer_file: Path | None = None  # one token per line


@dataclass(frozen=True, slots=True)
class ProxyTLS:
    """The TLS listener of the CONNECT proxy (`proxy.tls`)."""

    listen: Address = Address("0.0.0.0", 8443)
    cert: Path | None = None  # None: the cloud's own tls.cert / tls.key
    key: Path | None = None
    client_ca: Path | None = None  # set: client certificates required, subject = principal


@dataclass(frozen=True, slots=True)
class ProxySettings:
    listen: Address | None = Address("0.0.0.0", 8080)  # None (`listen: null`): no plain listener
    auth: ProxyAuth | None = None
    max_connections: int = 10000
    header_timeout: float = 10.0  # seconds to receive the whole CONNECT request
    max_request_bytes: int = 16384  # request line + headers
    dial_timeout: float = 10.0  # seconds for the edge to answer an open (then 504)
    authz_file: Path | None = None  # per-principal rules; None: every authenticated client may pass
    tls: ProxyTLS | None = None
    max_connections_per_principal: int = 512  # per user; per client address when anonymous (429)
    max_stream_share: float = 0.25  # of one tunnel's streams that one principal may hold (429)
    idle_timeout: float = 3600.0  # a relay with no bytes either way for this long is closed
    anonymous: bool = False  # true: unauthenticated clients on a non-loopback listener are intended


def proxy_section(sec: Section) -> ProxySettings:
    """The cloud's `proxy` section (the CONNECT proxy's listeners, credentials and limits)."""
    auth = None
    if sec.has("auth"):
        a = sec.section("auth", ProxyAuth)
        if not (a.has("basic_file") or a.has("bearer_file")):
            a.fail("", "set basic_file, bearer_file or both")
        auth = ProxyAuth(*(a.path(k) if a.has(k) else None for k in ("basic_file", "bearer_file")))
    tls = None
    if sec.has("tls"):
        t = sec.section("tls", ProxyTLS)
        paths = {k: t.path(k) if t.has(k) else None for k in ("cert", "key", "client_ca")}
        if (paths["cert"] is None) != (paths["key"] is None):
            t.fail(
                "cert" if paths["cert"] is None else "key",
                "required when the other of cert/key is set (neither: the cloud's tls.cert/tls.key)",
            )
        tls = t.build(ProxyTLS, **paths)
    if auth is not None and sec.data.get("anonymous") is True:
        sec.fail("anonymous", "true, but proxy.auth asks every client for credentials: remove one")
    extra: dict[str, Any] = {"auth": auth, "tls": tls}
    if sec.has("listen") and sec.data["listen"] is None:
        if tls is None:
            sec.fail(
                "listen",
                "null turns the plain listener off, but there is no proxy.tls listener either",
            )
        extra["listen"] = None
    if sec.has("authz_file"):
        if auth is None and (tls is None or tls.client_ca is None):
            sec.fail(
                "authz_file", "rules need principals: set proxy.auth or proxy.tls.client_ca too"
            )
        extra["authz_file"] = sec.path("authz_file")
    settings = sec.build(ProxySettings, **extra)
    if not settings.max_stream_share <= 1:
        sec.fail("max_stream_share", "must be a fraction greater than 0 and at most 1")
    return settings


def check_exposure(proxy: ProxySettings, *, source: str = "cloud.yaml") -> None:
    """Refuse a proxy listener that lets anyone in where that is not plainly intended.

    Without ``proxy.auth`` (and without ``proxy.anonymous: true``): the plain listener must be on
    loopback, and must be off altogether when ``proxy.tls.client_ca`` asks for client
    certificates (it would let clients around them); the TLS listener without ``client_ca`` must
    be on loopback. `UserError` naming the file, the listener's key and ``proxy.anonymous``.
    """
    if proxy.auth is not None or proxy.anonymous:
        return
    client_ca = proxy.tls is not None and proxy.tls.client_ca is not None
    remedy = "set proxy.auth, or write proxy.anonymous: true if anonymous access is intended"
    if proxy.listen is not None and client_ca:
        raise UserError(
            f"{source}: proxy.listen: {proxy.listen} takes clients without credentials, around "
            "the client certificates proxy.tls.client_ca asks for: turn it off (listen: null), "
            + remedy
        )
    if proxy.listen is not None and not is_loopback_host(proxy.listen.host):
        raise UserError(
            f"{source}: proxy.listen: {proxy.listen} is not a loopback address and the proxy has "
            "no credentials, so anyone who reaches it reaches every edge: listen on loopback, "
            + remedy
        )
    if proxy.tls is not None and not client_ca and not is_loopback_host(proxy.tls.listen.host):
        raise UserError(
            f"{source}: proxy.tls.listen: {proxy.tls.listen} is not a loopback address and the "
            "proxy has no credentials, so anyone who reaches it reaches every edge: set "
            "proxy.tls.client_ca, listen on loopback, " + remedy
        )
