"""Principals (Basic users, named Bearer tokens), the authorization rules file and its re-reading."""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from kins_tunnel.cloud.auth import Authenticator, Principal, token_name
from kins_tunnel.cloud.authz import NO_RULE, NOT_ALLOWED, Authorizer, classify, parse_rules
from kins_tunnel.config_proxy import ProxyAuth
from kins_tunnel.errors import UserError
from kins_tunnel.filewatch import WatchedFile
from kins_tunnel.testing.support import wait_until

A_SVC = "a-svc-kins.kins-system:443"
B_SVC = "b-svc-kins.kins-system:443"

# The worked example of the README ("Per-user authorization"), byte for byte.
README_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "authz-multi-team.yaml"


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def p(name: str, *groups: str) -> Principal:
    return Principal(name, "basic", frozenset(groups))


# --- principals ----------------------------------------------------------------------------------


async def test_basic_user_and_named_tokens(tmp_path: Path) -> None:
    (tmp_path / "basic").write_text("alice:s3cret:with:colons\n# comment\nbob:pw\n")
    (tmp_path / "bearer").write_text("ci-bot:tok-123\nlegacytoken456\n  \n")
    auth = Authenticator(ProxyAuth(tmp_path / "basic", tmp_path / "bearer"))
    assert await auth.authenticate(basic("alice", "s3cret:with:colons")) == Principal(
        "alice", "basic"
    )
    assert await auth.authenticate(basic("bob", "pw")) == Principal("bob", "basic")
    assert await auth.authenticate(basic("bob", "wrong")) is None
    assert await auth.authenticate(b"Bearer tok-123") == Principal("ci-bot", "bearer")
    # the old one-token-per-line form still works and gets a stable generated name
    assert await auth.authenticate(b"Bearer legacytoken456") == Principal(
        token_name(b"legacytoken456"), "bearer"
    )
    assert token_name(b"legacytoken456").startswith("token-") and len(token_name(b"x")) == 14
    assert "legacytoken456" not in token_name(b"legacytoken456")
    # the name of a token is not a credential
    assert await auth.authenticate(b"Bearer ci-bot") is None
    assert await auth.authenticate(b"Bearer ci-bot:tok-123") is None
    assert await auth.authenticate(b"Bearer tok-123")
    assert not await auth.authenticate(None) and not await auth.authenticate(b"Digest x")


async def test_token_names_follow_file_changes(tmp_path: Path) -> None:
    bearer = tmp_path / "bearer"
    bearer.write_text("first:tok-a\n")
    auth = Authenticator(ProxyAuth(None, bearer))
    assert await auth.authenticate(b"Bearer tok-a") == Principal("first", "bearer")
    bearer.write_text("renamed:tok-a\nother:tok-b\n")
    os.utime(bearer, ns=(1, 2))  # a different stamp even within the same mtime tick
    assert await auth.authenticate(b"Bearer tok-a") == Principal("renamed", "bearer")
    assert await auth.authenticate(b"Bearer tok-b") == Principal("other", "bearer")


# --- rules ---------------------------------------------------------------------------------------

RULES = b"""
groups:
  oncall: [carol]
  sre: []
rules:
  - principals: [alice]
    allow: ["unit:a"]
  - principals: [bob]
    allow: ["unit:b:443", "node:edge1:22"]
  - principals: ["group:oncall", "group:sre"]
    allow: ["unit:*", "node:*:22"]
  - principals: ["*"]
    allow: ["node:bastion:*"]
"""


def test_rules_decide_by_unit_node_port_and_group() -> None:
    rules = parse_rules(RULES)
    assert rules.check(p("alice"), A_SVC) is None
    assert rules.check(p("alice"), "a-svc-kins.kins-system:10250") is None  # every port of the unit
    assert rules.check(p("alice"), B_SVC) == NOT_ALLOWED
    assert rules.check(p("alice"), "edge1:22") == NOT_ALLOWED  # a unit is not its nodes
    assert rules.check(p("bob"), B_SVC) is None
    assert rules.check(p("bob"), "b-svc-kins.kins-system:6443") == NOT_ALLOWED
    assert rules.check(p("bob"), "edge1:22") is None
    assert rules.check(p("bob"), "edge2:22") == NOT_ALLOWED
    assert rules.check(p("bob"), "edge1:2222") == NOT_ALLOWED
    assert rules.check(p("carol"), B_SVC) is None  # through the file's group
    assert rules.check(p("carol"), "edge9:22") is None
    assert rules.check(p("carol"), "edge9:80") == NOT_ALLOWED
    assert rules.check(p("dave", "sre"), "edge9:22") is None  # through a certificate's group
    assert rules.check(p("mallory"), "bastion:8080") is None  # "*": anyone authenticated
    assert rules.check(p("mallory"), A_SVC) == NOT_ALLOWED
    assert rules.check(None, "bastion:8080") == "anonymous"


def test_no_rule_for_principal_and_empty_rules_deny() -> None:
    assert (
        parse_rules(b"rules:\n  - {principals: [alice], allow: ['unit:a']}\n").check(
            p("eve"), A_SVC
        )
        == NO_RULE
    )
    assert parse_rules(b"rules: []\n").check(p("alice"), A_SVC) == NO_RULE


def test_classify() -> None:
    assert classify(A_SVC) == ("unit", "a", 443)
    assert classify("edge1:22") == ("node", "edge1", 22)
    # node names are DNS subdomains (what `certs edge --node` takes): dotted names are nodes too
    assert classify("edge1.site-a:22") == ("node", "edge1.site-a", 22)
    assert classify("node1.example.com:443") == ("node", "node1.example.com", 443)
    assert classify("a..b:443") is None and classify("-a.b:443") is None
    assert classify("[::1]:443") is None
    assert classify("10.0.0.1:443") is None


@pytest.mark.parametrize(
    "text, message",
    [
        (b"rules: {}", "rules: expected a list of {principals, allow}, got mapping"),
        (b"rule: []", "rule: unknown key (expected one of: groups, rules)"),
        (b"groups: {}", "rules: required key is missing (an empty list denies everyone)"),
        (b"rules:\n  - principals: [alice]\n", "rules[0].allow: required key is missing"),
        (
            b"rules:\n  - {principals: [alice], allow: [unit:a], deny: []}\n",
            "rules[0].deny: unknown key (expected one of: principals, allow)",
        ),
        (
            b"rules:\n  - {principals: [a], allow: ['unit:a']}\n  - {principals: [b], allow: ['nod:edge1:22']}\n",
            "line 3: rules[1].allow[0]: 'nod:edge1:22' is not unit:<unit>[:<port>] or "
            "node:<node>:<port> (a unit is a DNS label, a node a DNS subdomain; a name or port "
            "may be *)",
        ),
        (
            b"rules:\n  - {principals: [b], allow: ['node:edge1']}\n",
            "rules[0].allow[0]: 'node:edge1' is not",
        ),
        (
            b"rules:\n  - {principals: [b], allow: ['node:edge1:70000']}\n",
            "port must be from 1 to 65535 or *",
        ),
        (
            b"rules:\n  - {principals: [b], allow: ['unit:A']}\n",
            "rules[0].allow[0]: 'unit:A' is not",
        ),
        (
            b"rules:\n  - {principals: ['group:ops'], allow: ['unit:a']}\n",
            "rules[0].principals[0]: no group 'ops'",
        ),
        (
            b"rules:\n  - {principals: [], allow: ['unit:a']}\n",
            "rules[0].principals: expected a non-empty list of strings, got list",
        ),
        (
            b"rules:\n  - {principals: [3], allow: ['unit:a']}\n",
            "rules[0].principals[0]: expected a non-empty string, got integer 3",
        ),
        (
            b"rules:\n  - {principals: ['a b'], allow: ['unit:a']}\n",
            "rules[0].principals[0]: 'a b': a principal name has no spaces",
        ),
        (
            b"groups: {ops: [group:x]}\nrules: []\n",
            "groups.ops[0]: 'group:x': members are principal names",
        ),
        (b"rules: []\nrules: []\n", "line 2: invalid YAML: duplicate key 'rules'"),
        (b"rules: [\n", "invalid YAML"),
        (b"- a\n", "top level: expected a mapping with 'rules', got list"),
        (b"\xff\xfe", "not UTF-8 text"),
    ],
)
def test_rule_file_errors_name_the_key_path(text: bytes, message: str) -> None:
    """(And the line, where the key path exists in the file.)"""
    with pytest.raises(ValueError) as info:
        parse_rules(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_node_rules_take_dotted_node_names_port_after_the_last_colon() -> None:
    rules = parse_rules(
        b"rules:\n"
        b"  - principals: [bob]\n"
        b"    allow: ['node:edge1.site-a:22', 'node:n1.example.com:*', 'node:*:2222']\n"
    )
    assert rules.check(p("bob"), "edge1.site-a:22") is None
    assert rules.check(p("bob"), "edge1.site-a:23") == NOT_ALLOWED
    assert rules.check(p("bob"), "edge1:22") == NOT_ALLOWED  # another node
    assert rules.check(p("bob"), "edge1.site-b:22") == NOT_ALLOWED
    assert rules.check(p("bob"), "n1.example.com:6443") is None
    assert rules.check(p("bob"), "x.y.z:2222") is None  # "*" covers dotted nodes too
    assert rules.check(p("bob"), A_SVC.replace("443", "2222")) == NOT_ALLOWED  # a unit, not a node


@pytest.mark.parametrize(
    "entry",
    [
        "node:edge1.:22",
        "node:.edge1:22",
        "node:Edge1.site:22",
        "node:edge1.site-a",
        "node::22",
        "unit:a.b",
        "unit:a.b:443",
        "node:edge1.site-a:22:",
        "node:edge1..a:22",
    ],
)
def test_malformed_node_and_unit_entries_name_their_line(entry: str) -> None:
    text = f"rules:\n  - principals: [b]\n    allow:\n      - unit:a\n      - '{entry}'\n"
    with pytest.raises(ValueError) as info:
        parse_rules(text.encode())
    assert str(info.value).startswith(f"line 5: rules[0].allow[1]: {entry!r} is not")


def test_errors_name_the_line_of_the_nearest_key() -> None:
    text = b"groups:\n  ops: [carol]\nrules:\n  - principals: [alice]\n    allow: []\n"
    with pytest.raises(ValueError, match=r"^line 5: rules\[0\]\.allow: expected a non-empty"):
        parse_rules(text)
    with pytest.raises(ValueError, match=r"^line 2: groups\.o p: a group name is"):
        parse_rules(b"groups:\n  o p: []\nrules: []\n")


def test_readme_example_is_valid_and_means_what_it_says() -> None:
    rules = parse_rules(README_EXAMPLE.read_bytes())
    # team A (alice, bob): unit a only, no ssh
    for user in ("alice", "bob"):
        assert rules.check(p(user), A_SVC) is None
        assert rules.check(p(user), B_SVC) == NOT_ALLOWED
        assert rules.check(p(user), "a-edge1:22") == NOT_ALLOWED
    # team B (token "team-b-ci"): unit b only
    assert rules.check(Principal("team-b-ci", "bearer"), B_SVC) is None
    assert rules.check(Principal("team-b-ci", "bearer"), A_SVC) == NOT_ALLOWED
    # on-call: every unit, and ssh (port 22 only) to every node
    assert rules.check(p("carol"), A_SVC) is None and rules.check(p("carol"), B_SVC) is None
    assert rules.check(p("carol"), "a-edge1:22") is None
    assert rules.check(p("carol"), "a-edge1:10250") == NOT_ALLOWED
    # a client certificate with O=oncall is on call too; anyone else gets nothing
    assert rules.check(Principal("erin", "cert", frozenset({"oncall"})), "b-edge7:22") is None
    assert rules.check(p("mallory"), A_SVC) == NO_RULE


# --- the watched file ----------------------------------------------------------------------------


def test_broken_file_at_start_is_a_one_line_user_error(tmp_path: Path) -> None:
    f = tmp_path / "authz.yaml"
    f.write_text("rules:\n  - {principals: [a], allow: ['unit']}\n")
    with pytest.raises(UserError) as info:
        Authorizer(f)
    assert str(info.value) == (
        f"proxy.authz_file: {f}: line 2: rules[0].allow[0]: 'unit' is not unit:<unit>[:<port>] "
        "or node:<node>:<port> (a unit is a DNS label, a node a DNS subdomain; a name or port "
        "may be *)"
    )
    with pytest.raises(UserError, match="proxy.authz_file: cannot read"):
        Authorizer(tmp_path / "missing.yaml")


async def test_rules_are_reread_and_a_broken_version_keeps_the_previous(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = tmp_path / "authz.yaml"
    f.write_text("rules:\n  - {principals: [alice], allow: ['unit:a']}\n")
    authz = Authorizer(f)
    assert authz.check(p("alice"), A_SVC) is None and authz.check(p("alice"), B_SVC) == NOT_ALLOWED

    async def until(cond: Callable[[], bool]) -> None:
        await wait_until(cond, 10, "the condition")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(authz.watch, 0.02)
        _replace(f, "rules:\n  - {principals: [alice], allow: ['unit:b']}\n")
        await until(lambda: authz.check(p("alice"), B_SVC) is None)
        assert authz.check(p("alice"), A_SVC) == NOT_ALLOWED
        with caplog.at_level(logging.WARNING, logger="kins_tunnel.filewatch"):
            _replace(f, "rules:\n  - {principals: [alice], allow: ['unit:b', 'bogus']}\n")
            await until(lambda: authz.file.failures == 1)
            assert authz.check(p("alice"), B_SVC) is None  # the previous rules stay
            f.unlink()
            await until(lambda: authz.file.failures == 2)
            assert authz.check(p("alice"), B_SVC) is None
        messages = [r.getMessage() for r in caplog.records]
        assert any(
            "rules[0].allow[1]: 'bogus' is not" in m and "keeping the previous" in m
            for m in messages
        )
        assert any("the file is gone" in m for m in messages)
        _replace(f, "rules: []\n")
        await until(lambda: authz.check(p("alice"), B_SVC) == NO_RULE)
        nursery.cancel_scope.cancel()
    assert authz.file.reloads == 2


def _replace(path: Path, text: str) -> None:
    """Write a new version the way a Secret update or an editor does: a new file renamed over."""
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)


async def test_watched_file_reads_off_the_event_loop(tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_text("1")
    seen: list[int] = []
    w = WatchedFile(f, lambda b: int(b), "test.file")
    assert w.value == 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(w.watch, 0.01, seen.append)
        _replace(f, "2")
        await wait_until(lambda: bool(seen), 10, "a first change")
        nursery.cancel_scope.cancel()
    assert seen == [2] and w.value == 2
