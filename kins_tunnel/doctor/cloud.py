"""The checks of a cloud.yaml (see the package's docstring)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from pathlib import Path

from cryptography import x509

from kins_tunnel.certs.issuing import load_issuing_ca
from kins_tunnel.cloud.auth import parse_basic, parse_bearer
from kins_tunnel.cloud.authz import parse_rules
from kins_tunnel.cloud.enroll import check_chains
from kins_tunnel.cloud.revocation import parse_revoked
from kins_tunnel.config import CloudConfig, cloud_config_from_dict
from kins_tunnel.config_enroll import EnrollmentSettings
from kins_tunnel.config_proxy import check_exposure
from kins_tunnel.doctor.certificates import cert_names, chains_to, secret_mode, validity
from kins_tunnel.doctor.listeners import check_listeners
from kins_tunnel.doctor.report import FAIL, OK, WARN, Check, load_config, said
from kins_tunnel.errors import UserError
from kins_tunnel.pemfiles import load_certs
from kins_tunnel.tls_contexts import proxy_server_ssl_context, server_ssl_context
from kins_tunnel.tls_tickets import parse_secret
from kins_tunnel.tokens import TokenStore


async def cloud_checks(
    data: Mapping[str, object], base_dir: Path, source: str, timeout: float
) -> list[Check]:

    def build(doc: dict[str, object]) -> CloudConfig:
        cfg = cloud_config_from_dict(doc, base_dir=base_dir, source=source)
        check_exposure(cfg.proxy, source=source)  # as the cloud checks at start-up
        return cfg

    cfg, loaded = load_config(build, data, f"{source} loads (cloud)")
    if cfg is None:
        return [loaded]
    checks = [loaded]
    checks.extend(check_cloud_certificate(cfg))
    checks.extend(check_proxy_tls(cfg))
    checks.extend(check_cloud_files(cfg))
    if cfg.enrollment is not None:
        checks.extend(check_enrollment(cfg.enrollment, cfg.tls.ca))
    listeners = [("tunnel.listen", cfg.tunnel.listen)]
    if cfg.proxy.listen is not None:
        listeners.append(("proxy.listen", cfg.proxy.listen))
    if cfg.proxy.tls is not None:
        listeners.append(("proxy.tls.listen", cfg.proxy.tls.listen))
    listeners.append(("admin.listen", cfg.admin.listen))
    checks.extend(await check_listeners("cloud", listeners, cfg.admin.listen, timeout))
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
    out.extend(secret_mode("tls.key", tls.key))
    leaf = chain[0]
    renew = "re-issue it (kins-tunnel certs init --dir certs keeps the CA) and update the Secret"
    out.append(validity("cloud certificate", leaf, renew))
    out.append(chains_to("cloud certificate", leaf, chain[1:], cas, tls.ca))
    names = cert_names(leaf)
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
                f"{', '.join(said(n) for n in names)} (edges must use one of these in cloud:)",
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
        out.extend(secret_mode("proxy.tls.key", key))
    else:
        out.append(
            Check(
                "proxy TLS",
                WARN,
                "serves the tunnel's cloud certificate: clients must trust the tunnel CA, which "
                "kubectl then trusts for the K3s API too (kubeconfig --proxy-ca refuses it)",
                "run kins-tunnel certs init --proxy-san <the proxy's name> and set "
                "proxy.tls.cert/key to certs/proxy.crt and proxy.key",
            )
        )
    return out


def check_cloud_files(cfg: CloudConfig) -> list[Check]:
    """The credential, rules and revocation files parse (with the cloud's own parsers)."""
    auth = cfg.proxy.auth
    files: list[tuple[str, Path | None, Callable[[bytes], object]]] = [
        ("proxy.auth.basic_file", auth.basic_file if auth else None, parse_basic),
        ("proxy.auth.bearer_file", auth.bearer_file if auth else None, parse_bearer),
        ("proxy.authz_file", cfg.proxy.authz_file, parse_rules),
        ("tunnel.revoked_file", cfg.tunnel.revoked_file, parse_revoked),
        ("tunnel.session_ticket_key_file", cfg.tunnel.session_ticket_key_file, parse_secret),
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
            out.append(Check(key, FAIL, f"{path}: {said(exc)}", "fix the line it names"))
        else:
            out.append(Check(key, OK, f"{path} parses"))
            if parse is not parse_rules:  # passwords, tokens: secrets
                out.extend(secret_mode(key, path))
    return out


def check_enrollment(settings: EnrollmentSettings, ca_bundle: Path) -> list[Check]:
    """`enrollment`: the tokens file parses (the cloud's `TokenStore`); the issuing CA loads with
    its key, is a CA and chains to ``tls.ca`` (the cloud's start-up checks), has path length 0
    and is not near expiry."""
    out = []
    try:
        store = TokenStore(settings.tokens_file)
    except UserError as exc:
        out.append(
            Check(
                "enrollment.tokens_file",
                FAIL,
                str(exc),
                "kins-tunnel token create --tokens-file FILE writes it (an empty file will do)",
            )
        )
    else:
        now = dt.datetime.now(dt.UTC)
        usable = sum(1 for e in store.file.value.values() if e.expires > now and e.uses > 0)
        where = "in the file" if store.write_back else "in memory only (the file is read-only)"
        out.append(
            Check(
                "enrollment.tokens_file",
                OK,
                f"{settings.tokens_file} parses; tokens: {len(store.file.value)}, unexpired with "
                f"uses left: {usable} (uses counted {where})",
            )
        )
    files = settings.ca
    if files is None:
        out.append(
            Check(
                "enrollment.ca",
                WARN,
                "not set: every enrolment and renewal is refused (no_issuing_ca)",
                "run kins-tunnel certs init --issuing-ca and set enrollment.ca.cert/key to "
                "issuing.crt and issuing.key",
            )
        )
        return out
    try:
        issuing = load_issuing_ca(files.cert, files.key)
        check_chains(issuing, ca_bundle)
    except UserError as exc:
        return [*out, Check("enrollment.ca", FAIL, str(exc), "fix the file it names")]
    out.append(Check("enrollment.ca", OK, f"{files.cert} loads with its key and chains to tls.ca"))
    out.extend(secret_mode("enrollment.ca.key", files.key))
    constraints = issuing.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    if constraints.path_length != 0:
        out.append(
            Check(
                "enrollment.ca path length",
                WARN,
                f"{constraints.path_length if constraints.path_length is not None else 'unlimited'}"
                ": a copy of its key on the cloud could make further CAs",
                "make it with kins-tunnel certs init --issuing-ca (path length 0)",
            )
        )
    out.append(
        validity(
            "enrollment.ca",
            issuing.cert,
            "make a new one with kins-tunnel certs init --issuing-ca in the directory of the CA",
        )
    )
    return out
