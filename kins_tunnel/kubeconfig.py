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

This module owns the rewrite and its validation; errors are `UserError` with a one-line message.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from kins_tunnel.errors import UserError

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def service_server(unit: str) -> str:
    """The API server URL of `unit`'s K3s cluster as seen through the tunnel."""
    return f"https://{unit}-svc-kins.kins-system:443"


def _check_unit(unit: str) -> None:
    svc = f"{unit}-svc-kins"
    if not _LABEL.fullmatch(unit) or len(svc) > 63:
        raise UserError(f"unit {unit!r} is not a valid NodeUnit name (RFC 1123 label: lower-case "
                        f"letters, digits and '-', and {svc!r} must fit in 63 characters)")


def _check_proxy_url(proxy_url: str) -> None:
    where = f"proxy URL {proxy_url!r}"
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


def _point_at_tunnel(cluster: dict[str, Any], server: str, proxy_url: str) -> dict[str, Any]:
    """Return `cluster` with server and proxy-url replaced, keeping the order of the other keys."""
    out: dict[str, Any] = {}
    for key, value in cluster.items():
        if key == "proxy-url":
            continue
        out[key] = server if key == "server" else value
        if key == "server":
            out["proxy-url"] = proxy_url
    if "server" not in out:
        out["server"] = server
        out["proxy-url"] = proxy_url
    return out


def rewrite_kubeconfig(text: str, *, unit: str, proxy_url: str) -> str:
    """Return the kubeconfig `text` rewritten to reach `unit`'s K3s cluster through the tunnel.

    The cluster (all of them when there is only one; otherwise the one the current-context uses)
    gets ``server: https://<unit>-svc-kins.kins-system:443`` and ``proxy-url: <proxy_url>``;
    everything else is preserved. `proxy_url` is ``http(s)://[user:password@]host[:port]``
    (client-go sends Basic proxy credentials from the user part). When the cluster verifies
    the server with a CA, the K3s serving certificate must name the service: see the module
    docstring. Raises `UserError` for a bad unit, proxy URL or kubeconfig.
    """
    _check_unit(unit)
    _check_proxy_url(proxy_url)
    doc = _load(text)
    server = service_server(unit)
    for entry in _chosen_clusters(doc):
        entry["cluster"] = _point_at_tunnel(entry["cluster"], server, proxy_url)
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


def main_kubeconfig(
    unit: str, proxy_url: str, input_path: str | None, output_path: str | None
) -> int:
    """`kins-tunnel kubeconfig`: rewrite the kubeconfig at `input_path` into `output_path`.

    None or "-" means stdin / stdout. An output file is created with mode 0600. Returns 0;
    raises `UserError` (printed as one line by the CLI) for anything the operator must fix.
    """
    result = rewrite_kubeconfig(_read(input_path), unit=unit, proxy_url=proxy_url)
    if output_path in (None, "-"):
        sys.stdout.write(result)
        sys.stdout.flush()
    else:
        assert output_path is not None
        _write_private(Path(output_path), result)
    return 0
