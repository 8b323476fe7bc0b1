"""A certificate directory: what ``kins-tunnel certs init/edge/user --dir DIR`` writes.

`init_ca` makes the CA, the cloud's certificate and, on request, the proxy CA with the proxy's
certificate and the issuing CA; `issue_edge` and `issue_user` add client certificates. See the
package's docstring for the layout. Errors an operator can fix (missing or unreadable files, bad
names) raise `UserError` with one line naming the file or value.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from kins_tunnel.certs.identity import (
    DNS_LABEL_RE,
    EdgeIdentity,
    check_edge_names,
    edge_identity_uri,
)
from kins_tunnel.certs.issuing import check_issuing_ca, new_issuing_ca
from kins_tunnel.certs.proxy_ca import check_permitted, proxy_constraints, refuse_kins_names
from kins_tunnel.certs.signing import (
    CLIENT_AUTH,
    SERVER_AUTH,
    Leaf,
    edge_subject,
    issue_leaf,
    load_ca,
    named,
    new_ca,
    utcnow,
)
from kins_tunnel.errors import UserError
from kins_tunnel.pemfiles import make_dir

CLOUD_COMMON_NAME = "kins-tunnel-cloud"
CA_COMMON_NAME = "kins-tunnel CA"
PROXY_CA_COMMON_NAME = "kins-tunnel proxy CA"
PROXY_COMMON_NAME = "kins-tunnel-proxy"
_USER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def init_ca(
    dir: Path,
    cloud_sans: Sequence[str] = (),
    *,
    days: int = 3650,
    cloud_days: int = 825,
    proxy_sans: Sequence[str] | None = None,
    issuing_ca: bool = False,
) -> None:
    """Create the CA in DIR (unless ca.crt and ca.key exist) and (re)issue DIR/cloud.{crt,key}.

    The cloud certificate always names DNS ``localhost`` and IP ``127.0.0.1``, plus each of
    `cloud_sans` (IP literals become IP SANs, anything else a DNS SAN). An existing CA is reused as
    is, so edge certificates issued before stay valid. Raises `UserError` for a bad SAN, a CA
    that is half present or unreadable, or a directory that cannot be written.

    With `proxy_sans` (possibly empty), DIR/proxy.{crt,key} is (re)issued too: the certificate of
    the CONNECT proxy's TLS listener (`proxy.tls`), serverAuth only, naming ``localhost``,
    ``127.0.0.1`` and each of `proxy_sans` (the names and addresses clients put in ``proxy-url``).
    It is signed by the proxy CA, DIR/proxy-ca.{crt,key}, created on first use with a critical
    NameConstraints extension permitting exactly those names (a wildcard ``*.d`` permits ``d``
    and below, an IP its single address). A proxy name that is, or covers, a Kins service name
    (``kins-system``, ``*-svc-kins``) is refused; a name the existing proxy CA does not permit is
    refused with what to do (a new proxy CA means new kubeconfigs).

    With `issuing_ca`, DIR/issuing.{crt,key} is created too (kept if present): see
    `new_issuing_ca`. A new CA is then made with path length 1 (room for the issuing CA); an
    existing CA of path length 0 cannot sign one, which is a `UserError` saying what to do.
    """
    dir = Path(dir)
    sans = _cloud_sans(cloud_sans)
    psans = None if proxy_sans is None else _cloud_sans(proxy_sans, flag="--proxy-san")
    if psans is not None:
        refuse_kins_names(psans)
    crt_path, key_path = dir / "ca.crt", dir / "ca.key"
    make_dir(dir)
    now = utcnow()
    if crt_path.exists() or key_path.exists():
        ca_cert, ca_key = load_ca(dir)
    else:
        ca_cert, ca_key = new_ca(
            dir, "ca", CA_COMMON_NAME, now, days, path_length=1 if issuing_ca else 0
        )
    if issuing_ca and not (dir / "issuing.crt").exists() and not (dir / "issuing.key").exists():
        new_issuing_ca(dir, ca_cert, ca_key, now, days)
    elif issuing_ca:
        check_issuing_ca(dir)  # present: it must load and belong to this CA
    cloud = Leaf(named(CLOUD_COMMON_NAME), sans, [SERVER_AUTH, CLIENT_AUTH])
    issue_leaf((ca_cert, ca_key), dir / "cloud", cloud, now, cloud_days)
    if psans is None:
        return
    if (dir / "proxy-ca.crt").exists() or (dir / "proxy-ca.key").exists():
        pca_cert, pca_key = load_ca(dir, "proxy-ca", "proxy CA")
        check_permitted(dir / "proxy-ca.crt", pca_cert, psans)
    else:
        pca_cert, pca_key = new_ca(
            dir, "proxy-ca", PROXY_CA_COMMON_NAME, now, days, constraints=proxy_constraints(psans)
        )
    proxy = Leaf(named(PROXY_COMMON_NAME), psans, [SERVER_AUTH])
    issue_leaf((pca_cert, pca_key), dir / "proxy", proxy, now, cloud_days)


def issue_user(
    dir: Path, name: str, groups: Sequence[str] = (), *, days: int = 365
) -> tuple[Path, Path]:
    """Issue DIR/user-NAME.{crt,key}: a client certificate for the proxy's TLS listener.

    Subject CN=`name` (the principal) and one O per group; clientAuth only, no edge identity URI
    (the proxy refuses certificates that carry one). Signed by the CA in DIR. Returns the paths.
    """
    dir = Path(dir)
    if not _USER_RE.fullmatch(name or ""):
        raise UserError(f"user {name!r}: 1 to 64 of letters, digits, '.', '_', '@' and '-'")
    for group in groups:
        if not _USER_RE.fullmatch(group or ""):
            raise UserError(f"group {group!r}: 1 to 64 of letters, digits, '.', '_', '@' and '-'")
    subject = x509.Name(
        [
            *(x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    user = Leaf(subject, [], [CLIENT_AUTH])  # no SAN: the subject names the principal
    return issue_leaf(load_ca(dir), dir / f"user-{name}", user, utcnow(), days)


def issue_edge(
    dir: Path, unit: str, node: str, *, days: int = 825, _now: dt.datetime | None = None
) -> tuple[Path, Path]:
    """Issue DIR/edge-NODE.{crt,key} for `node` of NodeUnit `unit`, signed by the CA in DIR.

    Returns (certificate path, key path). Raises `UserError` if unit or node is not a DNS label or
    the CA files are missing or unreadable. `_now` moves the issue time (tests use it to make
    expired certificates).
    """
    dir = Path(dir)
    check_edge_names(unit, node)
    uri = x509.UniformResourceIdentifier(edge_identity_uri(unit, node))
    edge = Leaf(edge_subject(EdgeIdentity(unit, node)), [uri], [CLIENT_AUTH])
    return issue_leaf(load_ca(dir), dir / f"edge-{node}", edge, _now or utcnow(), days)


def _cloud_sans(extra: Sequence[str], flag: str = "--cloud-san") -> list[x509.GeneralName]:
    if isinstance(extra, str):  # a lone string would otherwise become one SAN per character
        extra = [extra]
    sans: list[x509.GeneralName] = []
    for raw in ["localhost", "127.0.0.1", *extra]:
        value = raw.strip().lower().rstrip(".") if isinstance(raw, str) else ""
        name: x509.GeneralName
        try:
            name = x509.IPAddress(ipaddress.ip_address(value.strip("[]")))
        except ValueError:
            if (
                not value
                or len(value) > 253
                or not all(
                    DNS_LABEL_RE.fullmatch(label) or (i == 0 and label == "*")
                    for i, label in enumerate(value.split("."))
                )
            ):
                raise UserError(f"{flag} {raw!r}: not a DNS name or IP address") from None
            name = x509.DNSName(value)
        if name not in sans:
            sans.append(name)
    return sans
