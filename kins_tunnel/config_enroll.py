"""The enrolment sections of the config files: the cloud's `enrollment` (tokens, the issuing CA,
certificate lifetimes) and the edge's `enroll` (token file, the pinned CA hash, node and unit).
Read by `config`; the one-line errors name the key path as everywhere in the config."""

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kins_tunnel.names import NODE_RE, UNIT_RE
from kins_tunnel.yamlcheck import Section


@dataclass(frozen=True, slots=True)
class IssuingCAFiles:
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class EnrollmentSettings:
    """The cloud's enrolment of edges with tokens (`enrollment`; `cloud.enroll`)."""

    tokens_file: Path
    ca: IssuingCAFiles | None = None  # None: enrolment answers a refusal (no issuing CA)
    lifetime_days: float = 30.0  # edge certificates issued and renewed; fractions allowed
    max_failures_per_source: int = 10  # failed tokens per source address and minute; then 429
    max_renewals_per_hour: int = 6  # renewals one edge identity may ask for an hour; then 429


@dataclass(frozen=True, slots=True)
class EnrollSettings:
    """The edge's enrolment and renewal (`enroll`; `edge.enroll`)."""

    token_file: Path
    ca_hash: str  # "sha256:<64 hex>" of the cloud CA's SubjectPublicKeyInfo
    node: str | None = None  # None: the token must name the node (or node_env)
    unit: str | None = None  # set: a token of another unit is refused
    node_env: str | None = None  # environment variable with the node name (DaemonSet: NODE_NAME)
    renew_at: float = 2 / 3  # share of the certificate's lifetime after which it is renewed


MIN_LIFETIME_SECONDS = 10.0  # enrollment.lifetime_days: shorter cannot renew in time
MAX_LIFETIME_DAYS = 825.0


def enrollment_section(top: Section) -> EnrollmentSettings | None:
    if top.data.get("enrollment") is None:
        return None
    sec = top.section("enrollment", EnrollmentSettings)
    ca = None
    if sec.data.get("ca") is not None:
        c = sec.section("ca", IssuingCAFiles)
        ca = IssuingCAFiles(c.path("cert"), c.path("key"))
    settings = sec.build(EnrollmentSettings, tokens_file=sec.path("tokens_file"), ca=ca)
    if not MIN_LIFETIME_SECONDS <= settings.lifetime_days * 86400 <= MAX_LIFETIME_DAYS * 86400:
        sec.fail(
            "lifetime_days",
            f"must be between {MIN_LIFETIME_SECONDS:g} seconds ({MIN_LIFETIME_SECONDS / 86400:.6f}) "
            f"and {MAX_LIFETIME_DAYS:g} days",
        )
    return settings


_CA_HASH_RE = re.compile(r"sha256:[0-9a-f]{64}")


def enroll_section(top: Section) -> EnrollSettings | None:
    if top.data.get("enroll") is None:
        return None
    sec = top.section("enroll", EnrollSettings)
    ca_hash = sec.required("ca_hash")
    if not isinstance(ca_hash, str) or not _CA_HASH_RE.fullmatch(ca_hash.strip().lower()):
        sec.fail(
            "ca_hash",
            'expected "sha256:<64 hex digits>", as kins-tunnel certs init or certs ca-hash prints',
        )
    names: dict[str, Any] = {}
    env = sec.data.get("node_env")
    if env is not None:
        if not isinstance(env, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env):
            sec.fail("node_env", "expected the name of an environment variable, e.g. NODE_NAME")
        if sec.data.get("node") is None:
            from_env = os.environ.get(env)
            if not from_env:
                sec.fail("node_env", f"the environment variable {env} is not set or empty")
            if not NODE_RE.fullmatch(from_env):
                sec.fail(
                    "node_env", f"{env}={from_env[:253]!r} is not a DNS subdomain (a node name)"
                )
            names["node"] = from_env
    for key, pattern, rule in (
        ("node", NODE_RE, "a DNS subdomain (lower-case a-z, 0-9, '-' and '.')"),
        ("unit", UNIT_RE, "a DNS label (lower-case a-z, 0-9 and '-')"),
    ):
        value = sec.data.get(key)
        if value is not None and (not isinstance(value, str) or not pattern.fullmatch(value)):
            sec.fail(key, f"expected {rule}, got {value!r}"[:200])
        if value is not None or key not in names:  # node from node_env unless node is written
            names[key] = value
    settings = dataclasses.replace(
        sec.build(EnrollSettings, token_file=sec.path("token_file"), node_env=env, **names),
        ca_hash=ca_hash.strip().lower(),
    )
    if not 0 < settings.renew_at < 1:
        sec.fail(
            "renew_at", f"must be a share of the lifetime between 0 and 1, got {settings.renew_at}"
        )
    return settings
