"""Certificates: the private CA, the cloud, edge, proxy and user certificates, edge identity.

This module owns everything that touches X.509, with ``cryptography``; the TLS contexts built from
these files are in `tls_contexts`. Nothing here does network I/O.

Layout of a certificate directory (``kins-tunnel certs init/edge --dir DIR``)::

    ca.crt    ca.key      the private CA (ECDSA P-256, self-signed, path length 0)
    cloud.crt cloud.key   the cloud's server certificate (serverAuth + clientAuth)
    edge-NODE.crt/.key    one client certificate per edge node (clientAuth only)
    proxy-ca.crt/.key     the proxy CA (``--proxy-san``): signs only the proxy's TLS certificate,
                          name-constrained (critical) to the proxy's names
    proxy.crt proxy.key   the proxy listener's certificate (``proxy.tls``), from the proxy CA
    issuing.crt/.key      the issuing CA (``--issuing-ca``): an intermediate under ca.crt (path
                          length 0, clientAuth only, name-constrained to ``spiffe://kins-tunnel``
                          URIs) with which the cloud signs edge certificates at enrolment and
                          renewal (`sign_edge_csr`), so ca.key never has to leave the operator

Why a second CA: client-go verifies an https proxy with the cluster's CA, so the kubeconfig's CA
bundle holds the proxy's CA, which client-go then also trusts for K3s. A proxy CA constrained to
the proxy's names (never a ``kins-system`` or ``*-svc-kins`` name) cannot vouch for any unit's K3s,
and edges, which trust only ca.crt, never take a proxy certificate for the cloud.

The files are written and read by `pemfiles` (atomic writes, key files 0600). All keys are ECDSA
P-256 with SHA-256 signatures: one cloud accepts thousands of edges, and P-256 handshakes are an
order of magnitude cheaper than RSA-2048 ones.

Edge identity
-------------
An edge certificate carries exactly one URI subject alternative name::

    spiffe://kins-tunnel/unit/<unit>/node/<node>

That URI is *the* identity: the cloud derives the edge's NodeUnit and node name from it and from
nothing else (`identity_from_der`). The subject (CN=<node>, OU=<unit>) repeats it for humans reading
``openssl x509 -text``; it is never used for decisions. ``unit`` is an RFC 1123 DNS label (lower-case
``a-z``, ``0-9`` and ``-``, 1 to 63 characters, no leading or trailing ``-``: it becomes part of the
Service name ``<unit>-svc-kins``); ``node`` is a DNS subdomain (such labels joined by dots, at most
253 characters), as Kubernetes requires of node names.

Errors an operator can fix (missing or unreadable files, bad names) raise `UserError` with one line
naming the file or value; malformed peer certificates raise `ValueError`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kins_tunnel.errors import UserError
from kins_tunnel.pemfiles import load_certs, load_key, make_dir, write_cert, write_key

__all__ = [
    "ALPN_PROTOCOL",
    "ENROLL_ALPN",
    "RENEW_TARGET",
    "CLOUD_COMMON_NAME",
    "CertFacts",
    "EdgeIdentity",
    "cert_facts",
    "edge_identity_uri",
    "identity_from_der",
    "reserved_node",
    "ReservedName",
    "init_ca",
    "issue_edge",
    "issue_user",
    "name_permitted",
    "ca_hash",
    "edge_csr",
    "sign_edge_csr",
    "IssuingCA",
]

ALPN_PROTOCOL = "kins-tunnel/1"
# Enrolment on the tunnel port: a connection that negotiates this protocol may come without a
# client certificate, and can then only enrol (HTTP/1.1, see `cloud.enroll`).
ENROLL_ALPN = "kins-enroll/1"
# The stream target an edge opens on its tunnel to renew its certificate (answered by the cloud
# before its uplinks map; `.invalid` can never name a real host).
RENEW_TARGET = "renew.kins-tunnel.invalid:1"
CLOUD_COMMON_NAME = "kins-tunnel-cloud"
CA_COMMON_NAME = "kins-tunnel CA"
PROXY_CA_COMMON_NAME = "kins-tunnel proxy CA"
PROXY_COMMON_NAME = "kins-tunnel-proxy"
SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
_USER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_URI_PREFIX = "spiffe://kins-tunnel/"
_URI_RE = re.compile(r"spiffe://kins-tunnel/unit/([^/]+)/node/([^/]+)")
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# A Kubernetes node name is a DNS subdomain: labels joined by dots, 253 characters at most.
_SUBDOMAIN_RE = re.compile(
    r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
)
_NAME_RULES = {  # pattern, what it is, the rule in words
    "unit": (
        _LABEL_RE,
        "a DNS label",
        "lower-case a-z, 0-9 and '-', 1 to 63 characters, not starting or ending with '-'",
    ),
    "node": (
        _SUBDOMAIN_RE,
        "a DNS subdomain",
        "DNS labels (lower-case a-z, 0-9 and '-') joined by dots, 253 "
        "characters at most, as Kubernetes node names are",
    ),
}


def _valid_name(what: str, value: object) -> bool:
    pattern, _kind, _rule = _NAME_RULES[what]
    return isinstance(value, str) and len(value) <= 253 and pattern.fullmatch(value) is not None


UNIT_SERVICE_SUFFIX = "-svc-kins"  # `<unit>-svc-kins.kins-system`: a NodeUnit's K3s API service


class ReservedName(ValueError):
    """An edge identity whose node name would route like a service name (see `reserved_node`)."""


def reserved_node(node: str) -> str | None:
    """Why `node` may not be an edge's node name, or None if it may.

    A node serves ``<node>:<port>``, routed after the same normalisation as a CONNECT target, so a
    node name must never read as a service name: not one whose first label ends in ``-svc-kins``
    (every DNS form of a NodeUnit's K3s service, ``<unit>-svc-kins.kins-system[.svc[.<domain>]]``,
    starts so), and not one of the form ``<service>.<namespace>.svc[.<anything>]``, which
    normalises to ``<service>.<namespace>``. Otherwise an edge of one unit could advertise a name
    of another unit (or any service name) as its own node.
    """
    labels = node.lower().split(".")
    if labels[0].endswith(UNIT_SERVICE_SUFFIX):
        return f"a first label ending in {UNIT_SERVICE_SUFFIX!r} names a NodeUnit's K3s service"
    if len(labels) >= 3 and labels[2] == "svc":
        return "<service>.<namespace>.svc... is a service name"
    return None


_SKEW = dt.timedelta(minutes=5)  # backdate not_valid_before a little for clocks that lag


@dataclass(frozen=True, slots=True)
class EdgeIdentity:
    """Who an edge is, as proven by its client certificate."""

    unit: str
    node: str

    @property
    def uri(self) -> str:
        return edge_identity_uri(self.unit, self.node)


def edge_identity_uri(unit: str, node: str) -> str:
    """The URI SAN that names (unit, node) in an edge certificate."""
    return f"{_URI_PREFIX}unit/{unit}/node/{node}"


def identity_from_der(der: bytes) -> EdgeIdentity:
    """Extract the edge identity from a DER certificate (e.g. ``getpeercert(binary_form=True)``).

    The certificate must carry exactly one ``spiffe://kins-tunnel/...`` URI SAN of the form
    documented above, with valid labels; other URI SANs are ignored. Raises `ValueError` otherwise.
    The caller is responsible for having verified the chain (the TLS handshake does that).
    """
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise ValueError(f"not a DER certificate: {exc}") from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ValueError("certificate has no subjectAltName, so no edge identity") from None
    uris = [
        u
        for u in san.get_values_for_type(x509.UniformResourceIdentifier)
        if u.lower().startswith(_URI_PREFIX)
    ]
    if not uris:
        raise ValueError(f"certificate has no {_URI_PREFIX} URI SAN, so no edge identity")
    if len(uris) > 1:
        raise ValueError(
            f"certificate has {len(uris)} {_URI_PREFIX} URI SANs, expected exactly one"
        )
    match = _URI_RE.fullmatch(uris[0])
    if match is None:
        raise ValueError(f"identity URI {uris[0]!r} is not {_URI_PREFIX}unit/<unit>/node/<node>")
    unit, node = match.groups()
    for what, value in (("unit", unit), ("node", node)):
        if not _valid_name(what, value):
            raise ValueError(
                f"identity URI {uris[0]!r}: {what} {value!r} is not {_NAME_RULES[what][1]}"
            )
    why = reserved_node(node)
    if why is not None:
        raise ReservedName(f"identity URI {uris[0]!r}: node {node!r} is reserved: {why}")
    return EdgeIdentity(unit, node)


@dataclass(frozen=True, slots=True)
class CertFacts:
    """What the cloud records of a peer certificate: for revocation, expiry and principals."""

    serial: int
    not_after: dt.datetime  # aware, UTC
    common_name: str  # subject CN ("" if none)
    organizations: tuple[str, ...]  # subject O values
    not_before: dt.datetime | None = None  # aware, UTC
    authority_key_id: bytes | None = None  # of the issuer: tells an issuing CA's certificates
    renewed_automatically: bool = False  # set by the cloud: issued by its issuing CA

    @property
    def lifetime(self) -> dt.timedelta | None:
        return None if self.not_before is None else self.not_after - self.not_before

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")


def cert_facts(der: bytes) -> CertFacts:
    """Serial, expiry and subject names of a DER certificate; `ValueError` if it is not one."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise ValueError(f"not a DER certificate: {exc}") from None
    subject = cert.subject

    def values(oid: x509.ObjectIdentifier) -> list[str]:
        return [str(a.value) for a in subject.get_attributes_for_oid(oid)]

    cn = values(NameOID.COMMON_NAME)
    return CertFacts(
        cert.serial_number,
        cert.not_valid_after_utc,
        cn[0] if cn else "",
        tuple(values(NameOID.ORGANIZATION_NAME)),
        cert.not_valid_before_utc,
        _authority_key_id(cert),
    )


def _authority_key_id(cert: x509.Certificate) -> bytes | None:
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except (x509.ExtensionNotFound, ValueError):
        return None
    return aki.key_identifier


# --- issuing -------------------------------------------------------------------------------------


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
        _refuse_kins_names(psans)
    crt_path, key_path = dir / "ca.crt", dir / "ca.key"
    make_dir(dir)
    now = _utcnow()
    if crt_path.exists() or key_path.exists():
        ca_cert, ca_key = _load_ca(dir)
    else:
        ca_cert, ca_key = _new_ca(
            dir, "ca", CA_COMMON_NAME, now, days, path_length=1 if issuing_ca else 0
        )
    if issuing_ca and not (dir / "issuing.crt").exists() and not (dir / "issuing.key").exists():
        new_issuing_ca(dir, ca_cert, ca_key, now, days)
    elif issuing_ca:
        _load_issuing(dir)  # present: it must load and belong to this CA
    _issue_leaf(
        ca_cert,
        ca_key,
        dir / "cloud.crt",
        dir / "cloud.key",
        now=now,
        days=cloud_days,
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CLOUD_COMMON_NAME)]),
        sans=sans,
        usages=[SERVER_AUTH, CLIENT_AUTH],
    )
    if psans is None:
        return
    if (dir / "proxy-ca.crt").exists() or (dir / "proxy-ca.key").exists():
        pca_cert, pca_key = _load_ca(dir, "proxy-ca", "proxy CA")
        _check_permitted(dir / "proxy-ca.crt", pca_cert, psans)
    else:
        pca_cert, pca_key = _new_ca(
            dir, "proxy-ca", PROXY_CA_COMMON_NAME, now, days, constraints=_constraints(psans)
        )
    _issue_leaf(
        pca_cert,
        pca_key,
        dir / "proxy.crt",
        dir / "proxy.key",
        now=now,
        days=cloud_days,
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, PROXY_COMMON_NAME)]),
        sans=psans,
        usages=[SERVER_AUTH],
    )


def _new_ca(
    dir: Path,
    stem: str,
    common_name: str,
    now: dt.datetime,
    days: int,
    *,
    constraints: x509.NameConstraints | None = None,
    path_length: int = 0,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Create and write DIR/STEM.{crt,key}: a self-signed CA, path length `path_length` (1 leaves
    room for the issuing CA below it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        _builder(name, name, key.public_key(), now, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
    )
    if constraints is not None:
        builder = builder.add_extension(constraints, critical=True)
    cert = (
        builder.add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    write_key(dir / f"{stem}.key", key)
    write_cert(dir / f"{stem}.crt", cert)
    return cert, key


def _constraints(sans: Sequence[x509.GeneralName]) -> x509.NameConstraints:
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


def _refuse_kins_names(sans: Sequence[x509.GeneralName]) -> None:
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


def _check_permitted(path: Path, ca: x509.Certificate, sans: Sequence[x509.GeneralName]) -> None:
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
    ca_cert, ca_key = _load_ca(dir)
    crt_path, key_path = dir / f"user-{name}.crt", dir / f"user-{name}.key"
    subject = x509.Name(
        [
            *(x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    _issue_leaf(
        ca_cert,
        ca_key,
        crt_path,
        key_path,
        now=_utcnow(),
        days=days,
        subject=subject,
        sans=[],
        usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    return crt_path, key_path


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
    ca_cert, ca_key = _load_ca(dir)
    crt_path, key_path = dir / f"edge-{node}.crt", dir / f"edge-{node}.key"
    _issue_leaf(
        ca_cert,
        ca_key,
        crt_path,
        key_path,
        now=_now or _utcnow(),
        days=days,
        subject=_edge_subject(EdgeIdentity(unit, node)),
        sans=[x509.UniformResourceIdentifier(edge_identity_uri(unit, node))],
        usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    return crt_path, key_path


def _edge_subject(identity: EdgeIdentity) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.unit),
            x509.NameAttribute(NameOID.COMMON_NAME, identity.node),
        ]
    )


def _issue_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    crt_path: Path,
    key_path: Path,
    *,
    now: dt.datetime,
    days: int,
    subject: x509.Name,
    sans: Sequence[x509.GeneralName],
    usages: Sequence[x509.ObjectIdentifier],
) -> None:
    if days < 1:
        raise UserError(f"validity of {days} days: must be at least 1")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _sign_leaf(
        ca_cert,
        ca_key,
        key.public_key(),
        now=now,
        lifetime=dt.timedelta(days=days),
        subject=subject,
        sans=sans,
        usages=usages,
    )
    write_key(key_path, key)
    write_cert(crt_path, cert)


def _sign_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    public_key: ec.EllipticCurvePublicKey,
    *,
    now: dt.datetime,
    lifetime: dt.timedelta,
    subject: x509.Name,
    sans: Sequence[x509.GeneralName],
    usages: Sequence[x509.ObjectIdentifier],
) -> x509.Certificate:
    # Never outlive the CA: a chain with a leaf expiring after its issuer confuses some verifiers.
    not_after = min(now + lifetime, ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    # A short-lived certificate is backdated by a tenth of its lifetime at most, so that the share
    # of its lifetime after which it is renewed is counted from about when it was issued.
    skew = min(_SKEW, lifetime / 10)
    builder = (
        _builder(subject, ca_cert.subject, public_key, now, 1, not_after=not_after, skew=skew)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    )
    if sans:  # a user certificate names its holder in the subject only
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return (
        builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    now: dt.datetime,
    days: int,
    *,
    not_after: dt.datetime | None = None,
    skew: dt.timedelta = _SKEW,
) -> x509.CertificateBuilder:
    if days < 1:
        raise UserError(f"validity of {days} days: must be at least 1")
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - skew)
        .not_valid_after(not_after or now + dt.timedelta(days=days))
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


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
                    _LABEL_RE.fullmatch(label) or (i == 0 and label == "*")
                    for i, label in enumerate(value.split("."))
                )
            ):
                raise UserError(f"{flag} {raw!r}: not a DNS name or IP address") from None
            name = x509.DNSName(value)
        if name not in sans:
            sans.append(name)
    return sans


# --- the issuing CA: enrolment and renewal ------------------------------------------------------

ISSUING_CA_COMMON_NAME = "kins-tunnel issuing CA"
_IDENTITY_HOST = "kins-tunnel"  # the host part of every identity URI: the issuing CA's only name


def new_issuing_ca(
    dir: Path,
    root_cert: x509.Certificate,
    root_key: ec.EllipticCurvePrivateKey,
    now: dt.datetime,
    days: int,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Create and write DIR/issuing.{crt,key}: an intermediate CA signed by the root.

    Path length 0 (it signs leaves only), extended key usage clientAuth only (so nothing it signs
    verifies as a server: not as the cloud to an edge), and critical NameConstraints permitting
    only URIs on the host ``kins-tunnel``, i.e. edge identities ``spiffe://kins-tunnel/...``.
    The root must allow an intermediate (path length 1 or more): `UserError` otherwise.
    """
    bc = root_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    if bc.path_length is not None and bc.path_length < 1:
        raise UserError(
            f"{dir / 'ca.crt'} was made with path length 0, so it cannot sign an issuing CA: "
            "create a new CA for enrolment (certs init --issuing-ca with a new --dir) and give "
            "edges its ca.crt, or keep issuing edge certificates with certs edge"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUING_CA_COMMON_NAME)])
    root_ski = root_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    not_after = min(now + dt.timedelta(days=days), root_cert.not_valid_after_utc)
    constraints = x509.NameConstraints(
        permitted_subtrees=[x509.UniformResourceIdentifier(_IDENTITY_HOST)],
        excluded_subtrees=None,
    )
    cert = (
        _builder(name, root_cert.subject, key.public_key(), now, days, not_after=not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([CLIENT_AUTH]), critical=False)
        .add_extension(constraints, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski),
            critical=False,
        )
        .sign(root_key, hashes.SHA256())
    )
    write_key(dir / "issuing.key", key)
    write_cert(dir / "issuing.crt", cert)
    return cert, key


def _load_issuing(dir: Path) -> None:
    root = load_certs(dir / "ca.crt", "CA certificate")[0]
    issuing = load_issuing_ca(dir / "issuing.crt", dir / "issuing.key", "issuing CA")
    if issuing.cert.issuer != root.subject:
        raise UserError(f"issuing CA: {dir / 'issuing.crt'} is not signed by {dir / 'ca.crt'}")


@dataclass(frozen=True, slots=True)
class IssuingCA:
    """The CA the cloud signs edge certificates with (`enrollment.ca`)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def key_id(self) -> bytes:
        """The subject key identifier: the authority key identifier of what it signs."""
        try:
            return self.cert.extensions.get_extension_for_class(
                x509.SubjectKeyIdentifier
            ).value.digest
        except x509.ExtensionNotFound:
            return x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()).digest

    @property
    def chain_pem(self) -> bytes:
        """The issuing CA's certificate (PEM): sent after an edge's certificate."""
        return self.cert.public_bytes(serialization.Encoding.PEM)


def load_issuing_ca(cert: Path, key: Path, what: str = "enrollment.ca") -> IssuingCA:
    """Load the issuing CA; `UserError` naming `what` if a file is missing, unreadable, not a CA,
    or the key does not belong to the certificate."""
    crt = load_certs(cert, f"{what}.cert")[0]
    private = load_key(key, f"{what}.key")
    if crt.public_key() != private.public_key():
        raise UserError(f"{what}.key: {key} does not belong to {what}.cert {cert}")
    try:
        bc = crt.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise UserError(f"{what}.cert: {cert} is not a CA certificate")
    return IssuingCA(crt, private)


def ca_hash(cert: x509.Certificate) -> str:
    """``sha256:<hex>`` of a CA's SubjectPublicKeyInfo (DER), as kubeadm's discovery hash."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(spki).hexdigest()


def ca_hash_of_file(path: Path) -> str:
    """`ca_hash` of the first certificate of PEM file `path` (`UserError` if unreadable)."""
    return ca_hash(load_certs(Path(path), "CA certificate")[0])


def check_edge_names(unit: str, node: str) -> None:
    """`UserError` if unit or node is not a legal name, or the node name is reserved."""
    for what, value in (("unit", unit), ("node", node)):
        if not _valid_name(what, value):
            _pattern, kind, rule = _NAME_RULES[what]
            raise UserError(f"{what} {value!r}: must be {kind} ({rule})")
    why = reserved_node(node)
    if why is not None:
        raise UserError(
            f"node {node!r} is reserved: {why}; an edge serves <node>:<port>, so its node name "
            "must not read as a service name"
        )


def edge_csr(key: ec.EllipticCurvePrivateKey, node: str | None) -> bytes:
    """A PEM certificate request for `node` (subject CN; None: an empty subject, the token names
    the node), signed with `key` (proof of possession). The cloud decides the identity: the
    request only says which node it asks for."""
    names = [] if node is None else [x509.NameAttribute(NameOID.COMMON_NAME, node)]
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(names))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


MAX_CSR_BYTES = 8192


def csr_public_key(pem: bytes, node: str | None) -> ec.EllipticCurvePublicKey:
    """The public key of a PEM certificate request, after checking it: it parses, its signature
    verifies (the requester holds the key), its key is ECDSA P-256, and its subject CN, if any,
    is `node`. `ValueError` with a one-line reason otherwise (the request is untrusted input)."""
    if len(pem) > MAX_CSR_BYTES:
        raise ValueError(f"certificate request larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError:
        raise ValueError("not a PEM certificate request") from None
    if not csr.is_signature_valid:
        raise ValueError("the certificate request's signature does not verify")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("the certificate request's key must be ECDSA P-256")
    names = [str(a.value) for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if node is not None and names and names != [node]:
        raise ValueError(f"the certificate request names node {names[0]!r}, not {node!r}")
    return key


def sign_edge_csr(
    ca: IssuingCA,
    public_key: ec.EllipticCurvePublicKey,
    identity: EdgeIdentity,
    lifetime: dt.timedelta,
    *,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """An edge certificate for `identity` and `public_key` (from `csr_public_key`), signed by the
    issuing CA, valid for `lifetime` (never beyond the CA itself). The caller has checked the
    identity (`check_edge_names`, the token, tenancy, revocation)."""
    return _sign_leaf(
        ca.cert,
        ca.key,
        public_key,
        now=now or _utcnow(),
        lifetime=lifetime,
        subject=_edge_subject(identity),
        sans=[x509.UniformResourceIdentifier(identity.uri)],
        usages=[CLIENT_AUTH],
    )


# --- files ---------------------------------------------------------------------------------------


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _load_ca(
    dir: Path, stem: str = "ca", what: str = "CA"
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    crt_path, key_path = dir / f"{stem}.crt", dir / f"{stem}.key"
    cert = load_certs(crt_path, f"{what} certificate")[0]
    key = load_key(key_path, f"{what} key")
    if cert.public_key() != key.public_key():
        raise UserError(f"{what} key: {key_path} does not belong to {crt_path}")
    return cert, key
