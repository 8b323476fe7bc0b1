"""Rewrite an edge K3s kubeconfig so that kubectl reaches the cluster through the tunnel.

Kins stores the edge cluster's kubeconfig in the ``<unit>-cm-kins`` configmap of ``kins-system``
(key ``kubeconfig.conf``). From the cloud, that cluster is reached as the service
``<unit>-svc-kins.kins-system:443`` through tunnel-cloud's HTTP CONNECT proxy, so the rewritten
kubeconfig points its cluster at that name and sets ``proxy-url``. Everything else (users and
their tokens or client certificates, contexts, namespaces, CA data, ``insecure-skip-tls-verify``,
extensions, ``current-context``) is kept as it was.

TLS: kubectl still does TLS end to end with K3s, now checking the certificate against the
service name instead of the IP it had. If the cluster has ``certificate-authority(-data)`` and
no ``tls-server-name``, the K3s serving certificate must include ``<unit>-svc-kins.kins-system``
(start K3s with ``--tls-san <unit>-svc-kins.kins-system``); this module never weakens
verification by adding insecure flags.

The Service IP form (``--service-ip``) writes ``server: https://<ClusterIP>:443`` instead; the cloud
rewrites that address to the unit's service name (ClusterIP aliases, see README). TLS then checks
the K3s certificate against the IP.

HTTPS proxy (``proxy-url: https://...``): client-go verifies the proxy's certificate with the
cluster's own CA (``certificate-authority``), so the written CA is a bundle of the K3s CA and the
proxy CA that signed the proxy certificate (``--proxy-ca``, certs/proxy-ca.crt). client-go trusts
that bundle for K3s as well, so the proxy CA must be name-constrained and must not permit the
name (or Service IP) the kubeconfig uses for K3s: an unconstrained CA (the tunnel CA, certs/ca.crt)
is refused. An insecure cluster (``insecure-skip-tls-verify``) would verify neither, so it needs
the K3s CA (``--server-ca``), which replaces the insecure flag. client-go also checks the proxy
against a cluster's ``tls-server-name``, a K3s name no proxy certificate may carry: with a proxy
CA, such a cluster is refused (without one, a note says so).

Insecure clusters: with an http proxy and no ``--server-ca``, ``insecure-skip-tls-verify: true``
is kept (kubectl verifies nothing either way), and a warning says what it means.

Relative file paths (a cluster's ``certificate-authority``, a user's ``client-certificate``,
``client-key`` and ``tokenFile``) are made absolute against the input file's directory (the
current directory for stdin), so the written kubeconfig works wherever it is put.

Credentials: the proxy-url may carry ``user:password``; to keep the password out of ``ps``, give
the URL with the user only and the password in ``$KINS_TUNNEL_PROXY_PASSWORD``, or no user and
``--proxy-credentials-file`` (one line ``user:password``). Messages show a URL's password as ``***``.

This module owns the rewrite and its validation; errors are `UserError` with a one-line message.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import yaml
from cryptography import x509

from kins_tunnel.certs.proxy_ca import name_permitted
from kins_tunnel.errors import UserError
from kins_tunnel.names import redact_url
from kins_tunnel.transport.http_proxy import PASSWORD_ENV, read_credentials_file

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def service_server(unit: str) -> str:
    """The API server URL of `unit`'s K3s cluster as seen through the tunnel."""
    return f"https://{unit}-svc-kins.kins-system:443"


def ip_server(ip: str) -> str:
    """The API server URL for the Service IP form; `UserError` if `ip` is not an IP address."""
    try:
        addr = ipaddress.ip_address(ip.strip("[]"))
    except ValueError:
        raise UserError(f"service IP {ip!r} is not an IP address") from None
    return f"https://[{addr.compressed}]:443" if addr.version == 6 else f"https://{addr}:443"


def _pem_certificates(data: bytes, what: str) -> bytes:
    """The PEM certificate blocks of `data` (normalised), or `UserError` if there are none."""
    blocks = re.findall(
        rb"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+-----END CERTIFICATE-----", data
    )
    if not blocks:
        raise UserError(f"{what} holds no PEM certificate")
    return b"".join(b.replace(b"\r\n", b"\n") + b"\n" for b in blocks)


def _check_proxy_ca(pem: bytes, k3s_names: list[str]) -> None:
    """`UserError` unless every certificate of `pem` is a CA whose critical name constraints keep
    it from vouching for any of `k3s_names` (client-go trusts the proxy CA for K3s too)."""
    for block in re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.S):
        try:
            cert = x509.load_pem_x509_certificate(block)
        except ValueError:
            raise UserError("--proxy-ca holds a PEM block that is not a certificate") from None
        cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        who = (
            f"--proxy-ca certificate {str(cn[0].value) if cn else cert.subject.rfc4514_string()!r}"
        )
        try:
            ext = cert.extensions.get_extension_for_class(x509.NameConstraints)
        except x509.ExtensionNotFound:
            raise UserError(
                f"{who} is not name-constrained: kubectl trusts it for K3s too, so any "
                "certificate it signs could pose as this unit's K3s API; give the proxy CA "
                "(certs/proxy-ca.crt, made by certs init --proxy-san), never the tunnel CA"
            ) from None
        if not ext.critical or not ext.value.permitted_subtrees:
            raise UserError(
                f"{who}: its name constraints must be critical and list permitted names"
            )
        for name in k3s_names:
            if name_permitted(ext.value, name):
                raise UserError(
                    f"{who} permits {name!r}, the K3s server's name in this kubeconfig: a "
                    "certificate it signs could pose as K3s; name the proxy otherwise"
                )


def _check_unit(unit: str) -> None:
    svc = f"{unit}-svc-kins"
    if not _LABEL.fullmatch(unit) or len(svc) > 63:
        raise UserError(
            f"unit {unit!r} is not a valid NodeUnit name (RFC 1123 label: lower-case "
            f"letters, digits and '-', and {svc!r} must fit in 63 characters)"
        )


def _check_proxy_url(proxy_url: str) -> None:
    where = f"proxy URL {redact_url(proxy_url)!r}"
    try:
        parts = urlsplit(proxy_url)
        port = parts.port
    except ValueError as exc:
        raise UserError(f"{where} is not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise UserError(f"{where} must start with http:// or https://")
    if not parts.hostname:
        raise UserError(f"{where} has no host")
    if port == 0:
        raise UserError(f"{where} has port 0")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise UserError(f"{where} must be only scheme://[user:password@]host[:port]")
    if any(c.isspace() for c in proxy_url):
        raise UserError(f"{where} contains whitespace")


def _load(text: str) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"kubeconfig is not valid YAML{at}") from exc
    if not isinstance(doc, dict):
        raise UserError("input is not a kubeconfig (expected a YAML mapping with 'clusters')")
    if doc.get("kind", "Config") != "Config":
        raise UserError(f"input is not a kubeconfig (kind is {doc.get('kind')!r}, not 'Config')")
    clusters = doc.get("clusters")
    if not isinstance(clusters, list) or not clusters:
        raise UserError("kubeconfig has no clusters")
    for i, entry in enumerate(clusters):
        if not isinstance(entry, dict) or not isinstance(entry.get("cluster"), dict):
            raise UserError(f"kubeconfig clusters[{i}] has no 'cluster' mapping")
    return doc


def _chosen_clusters(doc: dict[str, Any]) -> list[dict[str, Any]]:
    clusters: list[dict[str, Any]] = doc["clusters"]
    if len(clusters) == 1:
        return clusters
    current = doc.get("current-context")
    if not current:
        raise UserError("kubeconfig has several clusters and no current-context to choose one")
    contexts = [c for c in doc.get("contexts") or [] if isinstance(c, dict)]
    context = next((c for c in contexts if c.get("name") == current), None)
    if context is None or not isinstance(context.get("context"), dict):
        raise UserError(f"kubeconfig current-context {current!r} is not among its contexts")
    name = context["context"].get("cluster")
    chosen = [c for c in clusters if c.get("name") == name]
    if not chosen:
        raise UserError(f"kubeconfig context {current!r} names cluster {name!r}, which is missing")
    return chosen


def _point_at_tunnel(
    cluster: dict[str, Any], server: str, proxy_url: str, ca_data: str | None = None
) -> dict[str, Any]:
    """Return `cluster` with server and proxy-url (and the CA) replaced, keeping the key order."""
    out: dict[str, Any] = {}
    for key, value in cluster.items():
        if key == "proxy-url":
            continue
        if ca_data is not None and key in ("certificate-authority", "insecure-skip-tls-verify"):
            continue
        if ca_data is not None and key == "certificate-authority-data":
            value = ca_data
        out[key] = server if key == "server" else value
        if key == "server":
            out["proxy-url"] = proxy_url
    if "server" not in out:
        out["server"] = server
        out["proxy-url"] = proxy_url
    if ca_data is not None:
        out["certificate-authority-data"] = ca_data
    return out


_CLUSTER_PATHS = ("certificate-authority",)
_USER_PATHS = ("client-certificate", "client-key", "tokenFile")


def _absolute_paths(doc: dict[str, Any], base_dir: Path) -> None:
    """Make the relative file paths of every cluster and user absolute against `base_dir`."""
    for section, inner, keys in (
        ("clusters", "cluster", _CLUSTER_PATHS),
        ("users", "user", _USER_PATHS),
    ):
        for entry in doc.get(section) or []:
            fields = entry.get(inner) if isinstance(entry, dict) else None
            if not isinstance(fields, dict):
                continue
            for key in keys:
                value = fields.get(key)
                if isinstance(value, str) and value and not value.startswith(("/", "~")):
                    fields[key] = str(base_dir.resolve() / value)


def with_password(proxy_url: str, credentials_file: str | None) -> str:
    """`proxy_url` with the password put in: from `credentials_file` (``user:password``; the URL
    must then have no user), else, for a URL with a user and no password, from
    ``$KINS_TUNNEL_PROXY_PASSWORD`` when it is set. `UserError` naming the option."""
    parts = urlsplit(proxy_url)
    has_user = "@" in parts.netloc
    if credentials_file is not None:
        if has_user:
            raise UserError(
                "--proxy-credentials-file: the proxy URL carries credentials too: give them once"
            )
        try:
            user, password = read_credentials_file(Path(credentials_file))
        except OSError as exc:
            raise UserError(
                f"--proxy-credentials-file: {credentials_file}: {exc.strerror or exc}"
            ) from None
        except ValueError as exc:
            raise UserError(f"--proxy-credentials-file: {credentials_file}: {exc}") from None
        userinfo = f"{quote(user, safe='')}:{quote(password, safe='')}"
    else:
        secret = os.environ.get(PASSWORD_ENV)
        if not has_user or parts.password is not None or secret is None:
            return proxy_url
        userinfo = f"{parts.netloc.rpartition('@')[0]}:{quote(secret, safe='')}"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, f"{userinfo}@{host}", parts.path, "", ""))


def _cluster_ca(
    cluster: dict[str, Any], base_dir: Path, server_ca: bytes | None, name: str
) -> bytes:
    """The PEM CA that verifies K3s: `server_ca`, else the cluster's own; `UserError` if none."""
    if server_ca is not None:
        return _pem_certificates(server_ca, "--server-ca")
    data = cluster.get("certificate-authority-data")
    if data:
        try:
            return _pem_certificates(
                base64.b64decode(str(data), validate=True),
                f"cluster {name!r} certificate-authority-data",
            )
        except (binascii.Error, ValueError):
            raise UserError(f"cluster {name!r}: certificate-authority-data is not base64") from None
    path = cluster.get("certificate-authority")
    if path:
        file = Path(str(path)).expanduser()
        file = file if file.is_absolute() else base_dir / file
        try:
            return _pem_certificates(
                file.read_bytes(), f"cluster {name!r} certificate-authority {file}"
            )
        except OSError as exc:
            raise UserError(
                f"cluster {name!r}: cannot read certificate-authority {file}: {exc.strerror}"
            ) from None
    if cluster.get("insecure-skip-tls-verify"):
        raise UserError(
            f"cluster {name!r} has insecure-skip-tls-verify: kubectl would verify neither K3s nor "
            "the https proxy; give --server-ca (the K3s server CA, "
            "/var/lib/rancher/k3s/server/tls/server-ca.crt) so that both are verified"
        )
    raise UserError(
        f"cluster {name!r} has no certificate-authority: give --server-ca (the K3s server CA)"
    )


def rewrite_kubeconfig(
    text: str,
    *,
    unit: str,
    proxy_url: str,
    proxy_ca: bytes | None = None,
    server_ca: bytes | None = None,
    service_ip: str | None = None,
    base_dir: Path = Path("."),
    notes: list[str] | None = None,
    warnings: list[str] | None = None,
) -> str:
    """Return the kubeconfig `text` rewritten to reach `unit`'s K3s cluster through the tunnel.

    The cluster (all of them when there is only one; otherwise the one the current-context uses)
    gets ``server: https://<unit>-svc-kins.kins-system:443`` and ``proxy-url: <proxy_url>``;
    everything else is preserved. `proxy_url` is ``http(s)://[user:password@]host[:port]``
    (client-go sends Basic proxy credentials from the user part). When the cluster verifies
    the server with a CA, the K3s serving certificate must name the service: see the module
    docstring. With `service_ip`, ``server`` is that address instead (the Service IP form).

    With an https `proxy_url`, `proxy_ca` (PEM of the name-constrained proxy CA that signed the
    proxy certificate; see the module docstring) makes the cluster's CA the bundle of the K3s CA (`server_ca`, else the cluster's own
    ``certificate-authority(-data)``, read relative to `base_dir`) and `proxy_ca`;
    ``insecure-skip-tls-verify`` is dropped. `server_ca` alone replaces the CA (and the insecure
    flag) with an http proxy too. Advice that is not an error is appended to `notes`. Raises
    `UserError` for a bad unit, proxy URL, CA or kubeconfig. Relative paths are made absolute
    against `base_dir`; a cluster left with ``insecure-skip-tls-verify`` adds to `warnings`.
    """
    _check_unit(unit)
    _check_proxy_url(proxy_url)
    https = urlsplit(proxy_url).scheme == "https"
    if https and proxy_ca is None and notes is not None:
        notes.append(
            "kubectl verifies an https proxy with the cluster's certificate-authority: give "
            "--proxy-ca (the proxy CA, certs/proxy-ca.crt) unless that CA signed the proxy "
            "certificate"
        )
    if not https and proxy_ca is not None:
        raise UserError("--proxy-ca is only for an https proxy URL")
    proxy_pem = None if proxy_ca is None else _pem_certificates(proxy_ca, "--proxy-ca")
    doc = _load(text)
    _absolute_paths(doc, base_dir)
    server = service_server(unit) if service_ip is None else ip_server(service_ip)
    if proxy_pem is not None:
        host = urlsplit(server).hostname or ""
        _check_proxy_ca(proxy_pem, sorted({host, f"{unit}-svc-kins.kins-system"}))
    for entry in _chosen_clusters(doc):
        cluster, name = entry["cluster"], str(entry.get("name", ""))
        if proxy_pem is not None and cluster.get("tls-server-name"):
            raise UserError(
                f"cluster {name!r} sets tls-server-name {cluster['tls-server-name']!r}: client-go "
                "would check the https proxy's certificate against that K3s name, which no proxy "
                "certificate may carry; remove tls-server-name (start K3s with --tls-san "
                f"{unit}-svc-kins.kins-system) or use an http:// proxy URL"
            )
        ca_data = None
        if proxy_pem is not None or server_ca is not None:
            bundle = _cluster_ca(cluster, base_dir, server_ca, name) + (proxy_pem or b"")
            ca_data = base64.b64encode(bundle).decode()
        if https and cluster.get("tls-server-name") and notes is not None:
            notes.append(
                f"cluster {name!r} sets tls-server-name {cluster['tls-server-name']!r}: client-go "
                "checks the https proxy's certificate against that name too, so the proxy "
                "certificate would have to carry a K3s name; remove tls-server-name"
            )
        entry["cluster"] = _point_at_tunnel(cluster, server, proxy_url, ca_data)
        if entry["cluster"].get("insecure-skip-tls-verify") and warnings is not None:
            warnings.append(
                f"cluster {name!r} keeps insecure-skip-tls-verify: kubectl will not check that it "
                "talks to this unit's K3s, so whoever can answer for the name through the proxy "
                "(a wrong route, a compromised edge or proxy) gets the kubeconfig's credentials; "
                "give --server-ca (the K3s server CA, "
                "/var/lib/rancher/k3s/server/tls/server-ca.crt) to verify it"
            )
    dumped: str = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=1 << 30)
    return dumped


def _read(input_path: str | None) -> str:
    if input_path in (None, "-"):
        return sys.stdin.read()
    assert input_path is not None
    try:
        return Path(input_path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read kubeconfig {input_path}: {exc}") from exc


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` with mode 0600, atomically (it holds credentials)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as exc:
        raise UserError(f"cannot write kubeconfig {path}: {exc}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"cannot write kubeconfig {path}: {exc}") from exc


def _read_pem(path: str | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None


def main_kubeconfig(
    unit: str,
    proxy_url: str,
    input_path: str | None,
    output_path: str | None,
    *,
    proxy_ca: str | None = None,
    server_ca: str | None = None,
    service_ip: str | None = None,
    proxy_credentials_file: str | None = None,
) -> int:
    """`kins-tunnel kubeconfig`: rewrite the kubeconfig at `input_path` into `output_path`.

    None or "-" means stdin / stdout. An output file is created with mode 0600. `proxy_ca` and
    `server_ca` are PEM files (see `rewrite_kubeconfig`). Returns 0; raises `UserError` (printed
    as one line by the CLI) for anything the operator must fix; notes go to stderr.
    """
    notes: list[str] = []
    warnings: list[str] = []
    base_dir = Path(".") if input_path in (None, "-") else Path(str(input_path)).parent
    _check_proxy_url(proxy_url)  # before a password is put in
    result = rewrite_kubeconfig(
        _read(input_path),
        unit=unit,
        proxy_url=with_password(proxy_url, proxy_credentials_file),
        proxy_ca=_read_pem(proxy_ca, "--proxy-ca"),
        server_ca=_read_pem(server_ca, "--server-ca"),
        service_ip=service_ip,
        base_dir=base_dir,
        notes=notes,
        warnings=warnings,
    )
    for warning in warnings:
        print(f"kins-tunnel: warning: {warning}", file=sys.stderr)
    for note in notes:
        print(f"kins-tunnel: note: {note}", file=sys.stderr)
    if output_path in (None, "-"):
        sys.stdout.write(result)
        sys.stdout.flush()
    else:
        assert output_path is not None
        _write_private(Path(output_path), result)
    return 0
