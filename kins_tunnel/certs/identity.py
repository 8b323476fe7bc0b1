"""Edge identity: what a certificate says about who holds it, and the names of the tunnel's TLS
protocols.

An edge certificate carries exactly one URI subject alternative name::

    spiffe://kins-tunnel/unit/<unit>/node/<node>

That URI is *the* identity: the cloud derives the edge's NodeUnit and node name from it and from
nothing else (`identity_from_der`). The subject (CN=<node>, OU=<unit>) repeats it for humans reading
``openssl x509 -text``; it is never used for decisions. ``unit`` is an RFC 1123 DNS label (lower-case
``a-z``, ``0-9`` and ``-``, 1 to 63 characters, no leading or trailing ``-``: it becomes part of the
Service name ``<unit>-svc-kins``); ``node`` is a DNS subdomain (such labels joined by dots, at most
253 characters), as Kubernetes requires of node names (`check_edge_names`, `reserved_node`).

`cert_facts` reads what the cloud records of any peer certificate (revocation, expiry, principals).
Malformed peer certificates raise `ValueError`; bad names given by an operator, `UserError`.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from kins_tunnel.errors import UserError

ALPN_PROTOCOL = "kins-tunnel/1"
# Enrolment on the tunnel port: a connection that negotiates this protocol may come without a
# client certificate, and can then only enrol (HTTP/1.1, see `cloud.enroll`).
ENROLL_ALPN = "kins-enroll/1"
# The stream target an edge opens on its tunnel to renew its certificate (answered by the cloud
# before its uplinks map; `.invalid` can never name a real host).
RENEW_TARGET = "renew.kins-tunnel.invalid:1"

_URI_PREFIX = "spiffe://kins-tunnel/"
_URI_RE = re.compile(r"spiffe://kins-tunnel/unit/([^/]+)/node/([^/]+)")
DNS_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# A Kubernetes node name is a DNS subdomain: labels joined by dots, 253 characters at most.
_SUBDOMAIN_RE = re.compile(
    r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
)
_NAME_RULES = {  # pattern, what it is, the rule in words
    "unit": (
        DNS_LABEL_RE,
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


def load_der(der: bytes | x509.Certificate) -> x509.Certificate:
    """The certificate in `der` (one already loaded as it is); `ValueError` if it is not one.
    A caller that needs several facts of one certificate loads it once and passes it on."""
    if isinstance(der, x509.Certificate):
        return der
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise ValueError(f"not a DER certificate: {exc}") from None


def identity_from_der(der: bytes | x509.Certificate) -> EdgeIdentity:
    """Extract the edge identity from a DER certificate (e.g. ``getpeercert(binary_form=True)``)
    or a loaded one (`load_der`).

    The certificate must carry exactly one ``spiffe://kins-tunnel/...`` URI SAN of the form
    documented above, with valid labels; other URI SANs are ignored. Raises `ValueError` otherwise.
    The caller is responsible for having verified the chain (the TLS handshake does that).
    """
    cert = load_der(der)
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


def cert_facts(der: bytes | x509.Certificate) -> CertFacts:
    """Serial, expiry and subject names of a DER (or loaded) certificate; `ValueError` if it is
    not one."""
    cert = load_der(der)
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
