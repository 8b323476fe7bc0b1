"""The proxy CA's name constraints.

Why a second CA: client-go verifies an https proxy with the cluster's CA, so the kubeconfig's CA
bundle holds the proxy's CA, which client-go then also trusts for K3s. A proxy CA constrained to
the proxy's names (never a ``kins-system`` or ``*-svc-kins`` name) cannot vouch for any unit's K3s,
and edges, which trust only ca.crt, never take a proxy certificate for the cloud. This module
builds those constraints (`proxy_constraints`), refuses Kins service names as proxy names, and
decides whether a name is permitted by a CA's constraints (`name_permitted`, RFC 5280 4.2.1.10).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from kins_tunnel.errors import UserError


def proxy_constraints(sans: Sequence[x509.GeneralName]) -> x509.NameConstraints:
    """Permitted subtrees for exactly `sans`: ``*.d`` and ``d`` become ``d``, an IP its /32 or /128."""
    permitted: list[x509.GeneralName] = []
    for san in sans:
        tree: x509.GeneralName
        if isinstance(san, x509.IPAddress):
            tree = x509.IPAddress(ipaddress.ip_network(san.value))
        else:
            tree = x509.DNSName(str(san.value).removeprefix("*."))
        if tree not in permitted:
            permitted.append(tree)
    return x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=None)


def _kins_name(name: str) -> bool:
    """True if DNS name (or wildcard) `name` is or covers a Kins service name."""
    labels = name.lower().rstrip(".").split(".")
    return any(label == "kins-system" or label.endswith("-svc-kins") for label in labels)


def refuse_kins_names(sans: Sequence[x509.GeneralName]) -> None:
    for san in sans:
        if isinstance(san, x509.DNSName) and _kins_name(san.value):
            raise UserError(
                f"--proxy-san {san.value!r}: a Kins service name (kins-system, <unit>-svc-kins) "
                "is never a proxy name: kubectl trusts the proxy CA for K3s too, so a proxy "
                "certificate with it could pose as a unit's K3s API; name the proxy by the "
                "address clients put in proxy-url"
            )


def name_permitted(constraints: x509.NameConstraints, name: str) -> bool:
    """Whether a DNS name or IP literal `name` is allowed by `constraints` (RFC 5280 4.2.1.10:
    a DNS subtree ``d`` allows ``d`` and every name below it; ``.d`` only names below it)."""
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    try:
        ip = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        ip = None
    host = name.lower().rstrip(".")

    def within(tree: x509.GeneralName) -> bool | None:  # None: a tree of another kind
        if isinstance(tree, x509.IPAddress) and ip is not None:
            net = tree.value
            return isinstance(net, ipaddress.IPv4Network | ipaddress.IPv6Network) and ip in net
        if isinstance(tree, x509.DNSName) and ip is None:
            base = tree.value.lower().rstrip(".")
            if base.startswith("."):
                return host.endswith(base)
            return base == "" or host == base or host.endswith("." + base)
        return None

    excluded = [within(t) for t in constraints.excluded_subtrees or ()]
    if any(excluded):
        return False
    permitted = [within(t) for t in constraints.permitted_subtrees or ()]
    same_kind = [p for p in permitted if p is not None]
    return any(same_kind) if same_kind else True


def check_permitted(path: Path, ca: x509.Certificate, sans: Sequence[x509.GeneralName]) -> None:
    try:
        constraints = ca.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        raise UserError(
            f"proxy CA {path} is not name-constrained; remove {path.name} and "
            f"{path.with_suffix('.key').name} to make a new one"
        ) from None
    for san in sans:
        shown = str(san.value.removeprefix("*.") if isinstance(san, x509.DNSName) else san.value)
        if not name_permitted(constraints, shown):
            allowed = ", ".join(str(t.value) for t in constraints.permitted_subtrees or ())
            raise UserError(
                f"--proxy-san {str(san.value)!r}: the proxy CA {path} permits only {allowed}; "
                f"to name the proxy differently, remove {path.name} and "
                f"{path.with_suffix('.key').name}, run certs init again with every proxy name, "
                "and rewrite the kubeconfigs with the new --proxy-ca"
            )
