"""Credential files parse strictly: every line is a whole credential or a comment, errors name the
file and the line and never show a secret; a broken new version keeps the previous contents."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from kins_tunnel.cloud.auth import (
    Authenticator,
    Credential,
    Principal,
    parse_basic,
    parse_bearer,
    token_name,
)
from kins_tunnel.config_proxy import ProxyAuth
from kins_tunnel.errors import UserError

SECRET = "s3cr3t-Zq9"


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def _error(parse: object, data: bytes) -> str:
    assert callable(parse)
    with pytest.raises(ValueError) as info:
        parse(data)
    message = str(info.value)
    assert SECRET not in message and "\n" not in message
    return message


def test_an_indented_comment_is_a_comment_not_a_credential() -> None:
    assert parse_bearer(b"ci:tok-1\n  # old:3f9a77\n\t#x\n") == [Credential("ci", b"tok-1", 1)]
    assert parse_basic(b"  # alice:old\nbob:pw\n") == [Credential("bob", b"bob:pw", 2)]


@pytest.mark.parametrize(
    "data, message",
    [
        (b"ok:tok\nci:\n", "line 2: empty token for 'ci'"),
        (b"ci:   \n", "line 1: empty token for 'ci'"),
        (f":{SECRET}\n".encode(), "line 1: empty token name"),
        (f"ci bot:{SECRET}\n".encode(), "line 1: the token name holds spaces or control"),
        (f"ci:{SECRET} more\n".encode(), "line 1: the token holds spaces or control"),
        (f"a:{SECRET}\n\nb:x\na:y\n".encode(), "line 4: token name 'a' again (first on line 1)"),
        (f"{SECRET}\n{SECRET}\n".encode(), "line 2: token name 'token-"),
        (f"a:{SECRET}\nb:{SECRET}\n".encode(), "line 2: the token of 'b' is the token of 'a'"),
        (b"\xff\xfe:tok\n", "line 1: the token name is not UTF-8 text"),
    ],
)
def test_bearer_file_errors_name_the_line(data: bytes, message: str) -> None:
    assert message in _error(parse_bearer, data)


@pytest.mark.parametrize(
    "data, message",
    [
        (f"alice:x\n{SECRET}\n".encode(), "line 2: no ':' (a line is user:password; not shown)"),
        (b"alice:\n", "line 1: empty password for user 'alice'"),
        (f":{SECRET}\n".encode(), "line 1: empty user name"),
        (f"  alice:{SECRET}\n".encode(), "line 1: the user name holds spaces or control"),
        (f"alice:{SECRET}\nalice:other\n".encode(), "line 2: user 'alice' again (first on line 1)"),
    ],
)
def test_basic_file_errors_name_the_line(data: bytes, message: str) -> None:
    assert message in _error(parse_basic, data)


def test_a_basic_password_keeps_its_spaces() -> None:
    assert parse_basic(b"ops: lead and trail \r\n") == [
        Credential("ops", b"ops: lead and trail ", 1)
    ]
    assert parse_bearer(b"  name : tok \n") == [Credential("name", b"tok", 1)]
    assert parse_bearer(b"legacy\n") == [Credential(token_name(b"legacy"), b"legacy", 1)]


def test_start_up_refuses_a_bad_line_naming_file_and_line(tmp_path: Path) -> None:
    bearer = tmp_path / "tokens"
    bearer.write_text(f"good:{SECRET}\nci:\n")
    with pytest.raises(UserError) as info:
        Authenticator(ProxyAuth(None, bearer))
    assert str(info.value) == f"proxy.auth.bearer_file: {bearer}: line 2: empty token for 'ci'"


def test_a_name_is_either_a_user_or_a_token_name(tmp_path: Path) -> None:
    users, tokens = tmp_path / "users", tmp_path / "tokens"
    users.write_text(f"alice:pw\nci:{SECRET}\n")
    tokens.write_text(f"deploy:tok-1\nci:{SECRET}\n")
    with pytest.raises(UserError) as info:
        Authenticator(ProxyAuth(users, tokens))
    message = str(info.value)
    assert message == (
        f"proxy.auth.bearer_file: {tokens}: line 2: token name 'ci' is a user in "
        f"proxy.auth.basic_file ({users} line 2) too: a principal has one name"
    )
    assert SECRET not in message


async def test_a_bad_new_version_keeps_the_previous_and_is_counted(tmp_path: Path) -> None:
    users, tokens = tmp_path / "users", tmp_path / "tokens"
    users.write_text("alice:pw\n")
    tokens.write_text("deploy:tok-1\n")
    auth = Authenticator(ProxyAuth(users, tokens))
    basic_file, bearer_file = auth.files

    _replace(users, f"alice:pw\nbob{SECRET}\n")  # no ':'
    assert await auth.authenticate(basic("alice", "pw")) == Principal("alice", "basic")
    assert basic_file.failures == 1 and basic_file.failing
    assert basic_file.last_error == "line 2: no ':' (a line is user:password; not shown)"
    assert await auth.authenticate(basic("alice", "pw"))  # the same version: counted once
    assert basic_file.failures == 1

    _replace(tokens, "deploy:tok-1\nalice:tok-2\n")  # clashes with the user alice
    assert await auth.authenticate(b"Bearer tok-2") is None
    assert await auth.authenticate(b"Bearer tok-1") == Principal("deploy", "bearer")
    assert bearer_file.failures == 1 and "token name 'alice' is a user" in str(
        bearer_file.last_error
    )

    # the Basic file drops alice: it now parses, and the waiting token file gets its turn
    _replace(users, "carol:pw\n")
    assert await auth.authenticate(basic("carol", "pw")) == Principal("carol", "basic")
    assert not basic_file.failing and basic_file.last_error is not None  # the last one is kept
    assert await auth.authenticate(b"Bearer tok-2") == Principal("alice", "bearer")
    assert not bearer_file.failing and bearer_file.reloads == 1


_n = 0


def _replace(path: Path, text: str) -> None:
    """A new version renamed over the old one (a Secret update), with a stamp of its own."""
    global _n
    _n += 1
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.utime(tmp, ns=(_n, _n))
    os.replace(tmp, path)
