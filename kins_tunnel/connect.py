"""`kins-tunnel connect HOST:PORT --proxy URL`: a CONNECT client on stdin/stdout for ssh's ProxyCommand.

    ssh -o ProxyCommand='kins-tunnel connect %h:%p --proxy http://tunnel-cloud:31469 --proxy-user ops' root@edge1

Steps, each under a deadline: TCP connect to the proxy, TLS for an ``https://`` proxy (system CAs,
or ``--proxy-cacert``) — both within ``--connect-timeout`` — then the CONNECT exchange
(`kins_tunnel.transport.http_proxy`, h11) within ``--answer-timeout``. After a 2xx answer two relays
run: stdin → proxy and proxy → stdout. Bytes the proxy sent behind its answer head (sshd's banner
may arrive in the same packet) go to stdout first. EOF on stdin half-closes the connection: a
shutdown of the TCP write side, or through an ``https://`` proxy a TLS close_notify after which
reading goes on (`transport.tls_client.TLSClient`; the cloud's TLS listener passes it on as the end of the client's
data). EOF from the proxy closes stdout and ends the command with 0. A write that fails towards the
proxy stops the upload only: the download decides how the command ends.

Credentials, sent as Basic: ``--proxy-user user:password``, or ``--proxy-user user`` with the
password in ``$KINS_TUNNEL_PROXY_PASSWORD`` (not visible in ``ps``), or in the URL
(``http://user:password@host:port``, percent-encoded; a URL user without password also takes the
variable), or ``--proxy-credentials-file FILE`` (one line ``user:password``, as the edge's
``proxy.credentials_file``); ``--proxy-user`` and the file win over the URL. ``--proxy-token-file
FILE`` sends the first line of FILE as a Bearer token. Error messages never show a password. An ``https://`` proxy that asks for a client certificate (the cloud's
``proxy.tls.client_ca``) gets ``--proxy-cert``/``--proxy-key``.

Errors are one line on stderr (``kins-tunnel connect: ...``; a refusal shows the proxy's status,
reason and the first line of a text/plain body). Exit codes: `Exit`. A HOST:PORT with a space, a
control or a non-ASCII character is a usage error (exit 2): it could not go on a request line.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import math
import os
import ssl
import stat
import sys
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import trio

from kins_tunnel.errors import UserError
from kins_tunnel.names import Address, authority
from kins_tunnel.proxy_url import ProxyURL, parse_proxy_url
from kins_tunnel.transport.http_proxy import (
    PASSWORD_ENV,
    ProxyError,
    ProxyRefused,
    basic_authorization,
    bearer_authorization,
    connect_error_text,
    http_connect,
    read_credentials_file,
)
from kins_tunnel.transport.tls_client import TLSClient

CHUNK = 256 * 1024
PIPE_SIZE = 1024 * 1024  # the default limit for unprivileged processes (/proc/sys/fs/pipe-max-size)


class Exit(IntEnum):
    OK = 0  # the far end closed the connection
    BROKEN = 1  # the connection broke (reset) after the tunnel was up, or stdout was closed
    USAGE = 2  # bad arguments or unreadable files, as for every kins-tunnel command
    UNREACHABLE = 3  # no TCP connection to the proxy, or TLS with it failed
    TIMEOUT = 4  # --connect-timeout or --answer-timeout passed
    AUTH = 5  # the proxy answered 407 (credentials missing or wrong)
    REFUSED = 6  # the proxy answered another non-2xx status (403, 502, 503, 504, ...)
    PROTOCOL = 7  # the proxy's answer was not HTTP, or it closed without one


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "target",
        metavar="HOST:PORT",
        help="where the tunnel goes, e.g. %%h:%%p in ssh's ProxyCommand",
    )
    p.add_argument(
        "--proxy",
        required=True,
        metavar="URL",
        help="http://[user[:password]@]host:port or https://... (the tunnel-cloud's CONNECT proxy)",
    )
    auth = p.add_mutually_exclusive_group()
    auth.add_argument(
        "--proxy-user",
        metavar="USER[:PASSWORD]",
        help=f"Basic credentials; without :PASSWORD the password comes from ${PASSWORD_ENV}",
    )
    auth.add_argument(
        "--proxy-token-file", metavar="FILE", help="send the first line of FILE as a Bearer token"
    )
    auth.add_argument(
        "--proxy-credentials-file",
        metavar="FILE",
        help="Basic credentials from FILE: one line user:password (kept out of ps)",
    )
    p.add_argument(
        "--proxy-cacert",
        metavar="FILE",
        help="CA certificate(s) to verify an https:// proxy (default: the system's CAs)",
    )
    p.add_argument(
        "--proxy-cert",
        metavar="FILE",
        help="client certificate for an https:// proxy that asks for one (with --proxy-key)",
    )
    p.add_argument("--proxy-key", metavar="FILE", help="the private key of --proxy-cert")
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="TCP connect and TLS handshake with the proxy (default 10)",
    )
    p.add_argument(
        "--answer-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="the proxy's answer to CONNECT (default 30)",
    )


@dataclass(frozen=True)
class Plan:
    target: str
    proxy: ProxyURL
    authorization: bytes | None
    ssl_context: ssl.SSLContext | None
    connect_timeout: float
    answer_timeout: float


def plan_from_args(args: argparse.Namespace) -> Plan:
    """Check the arguments and read the credential files; `UserError` naming the option."""
    text = args.target
    if any(not 0x21 <= ord(c) <= 0x7E for c in text):
        raise UserError(f"HOST:PORT: {text!r} holds a space, a control or a non-ASCII character")
    host, _, port = text.rpartition(":")
    with contextlib.suppress(ValueError):  # ssh's %h is a bare IPv6 address: ::1:22
        text = f"[{ipaddress.IPv6Address(host)}]:{port}"
    try:
        target = Address.parse(text, min_port=1)
    except ValueError as exc:
        raise UserError(f"HOST:PORT: {exc}") from None
    if not target.host.isascii():
        raise UserError(f"HOST:PORT: {args.target!r}: the host must be ASCII")
    try:
        proxy = parse_proxy_url(args.proxy)
    except ValueError as exc:
        raise UserError(f"--proxy: {exc}") from None
    for name in ("connect_timeout", "answer_timeout"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise UserError(
                f"--{name.replace('_', '-')}: must be a number greater than 0, got {value}"
            )
    context = None
    if proxy.scheme == "https":
        try:
            context = ssl.create_default_context(cafile=args.proxy_cacert)
        except (OSError, ssl.SSLError) as exc:
            raise UserError(f"--proxy-cacert: {args.proxy_cacert}: {_file_error(exc)}") from None
        if bool(args.proxy_cert) != bool(args.proxy_key):
            raise UserError("--proxy-cert and --proxy-key: give both or neither")
        if args.proxy_cert:
            try:
                context.load_cert_chain(args.proxy_cert, args.proxy_key)
            except (OSError, ssl.SSLError) as exc:
                raise UserError(
                    f"--proxy-cert/--proxy-key: {args.proxy_cert}, {args.proxy_key}: "
                    f"{_file_error(exc)}"
                ) from None
    else:
        for option in ("proxy_cacert", "proxy_cert", "proxy_key"):
            if getattr(args, option):
                raise UserError(f"--{option.replace('_', '-')}: only for an https:// proxy")
    return Plan(
        authority(target.host, target.port),
        proxy,
        _authorization(args, proxy),
        context,
        args.connect_timeout,
        args.answer_timeout,
    )


def _file_error(exc: OSError | ssl.SSLError) -> str:
    return str(getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc)


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind `exc`, if any (TLS 1.3 reports a refused client certificate only
    after the handshake, at the first read)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__
    return None


def _authorization(args: argparse.Namespace, proxy: ProxyURL) -> bytes | None:
    if args.proxy_token_file:
        try:
            lines = Path(args.proxy_token_file).read_bytes().splitlines()
        except OSError as exc:
            raise UserError(
                f"--proxy-token-file: {args.proxy_token_file}: {exc.strerror or exc}"
            ) from None
        token = next((ln.strip() for ln in lines if ln.strip()), b"")
        if not token or any(b <= 0x20 or b >= 0x7F for b in token):
            raise UserError(
                f"--proxy-token-file: {args.proxy_token_file}: expected a token on the first line"
            )
        return bearer_authorization(token)
    if args.proxy_credentials_file:
        path = args.proxy_credentials_file
        try:
            user_bytes, password_bytes = read_credentials_file(Path(path))
        except OSError as exc:
            raise UserError(f"--proxy-credentials-file: {path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise UserError(f"--proxy-credentials-file: {path}: {exc}") from None
        return basic_authorization(user_bytes, password_bytes)
    if args.proxy_user is not None:
        user, sep, password = args.proxy_user.partition(":")
        where = "--proxy-user"
        given: str | None = password if sep else None
    elif proxy.username is not None:
        user, given, where = proxy.username, proxy.password, "--proxy URL"
    else:
        return None
    if not user:
        raise UserError(f"{where}: the user name is empty")
    if given is None:
        given = os.environ.get(PASSWORD_ENV)
        if given is None:
            raise UserError(f"{where}: no password: give USER:PASSWORD or set ${PASSWORD_ENV}")
    return basic_authorization(os.fsencode(user), os.fsencode(given))


def main_connect(args: argparse.Namespace) -> int:
    try:
        plan = plan_from_args(args)
    except UserError as exc:
        _say(str(exc))
        return Exit.USAGE
    return trio.run(run, plan)


def _say(message: str) -> None:
    print(f"kins-tunnel connect: {message}", file=sys.stderr, flush=True)


async def _open_proxy(plan: Plan) -> trio.abc.HalfCloseableStream:
    tcp = await trio.open_tcp_stream(plan.proxy.host, plan.proxy.port)
    if plan.ssl_context is None:
        return tcp
    tls = TLSClient(tcp, plan.ssl_context, plan.proxy.host)
    try:
        await tls.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return tls


async def run(plan: Plan) -> int:
    """Connect, ask for the tunnel, relay stdin/stdout; returns the exit code."""
    proxy = plan.proxy.authority
    stream: trio.abc.HalfCloseableStream | None = None
    try:
        try:
            with trio.fail_after(plan.connect_timeout):
                stream = await _open_proxy(plan)
        except trio.TooSlowError:
            _say(f"no connection to proxy {proxy} within {plan.connect_timeout:g}s")
            return Exit.TIMEOUT
        except OSError as exc:
            _say(f"cannot connect to proxy {proxy}: {connect_error_text(exc)}")
            return Exit.UNREACHABLE
        except trio.BrokenResourceError as exc:
            cause = _ssl_error(exc)
            reason = (
                getattr(cause, "verify_message", None)
                or getattr(cause, "reason", None)
                or cause
                or exc
            )
            _say(f"TLS with proxy {proxy} failed: {reason}")
            return Exit.UNREACHABLE
        try:
            with trio.fail_after(plan.answer_timeout):
                trailing = await http_connect(
                    stream, plan.target, proxy=proxy, authorization=plan.authorization
                )
        except trio.TooSlowError:
            _say(
                f"proxy {proxy} did not answer CONNECT {plan.target} within {plan.answer_timeout:g}s"
            )
            return Exit.TIMEOUT
        except ProxyRefused as exc:
            _say(str(exc))
            return Exit.AUTH if exc.status == 407 else Exit.REFUSED
        except ProxyError as exc:
            tls_error = _ssl_error(exc)
            if isinstance(tls_error, ssl.SSLEOFError):
                _say(
                    f"TLS with proxy {proxy} failed: it ended the TLS session before answering "
                    "(does it require a client certificate? --proxy-cert)"
                )
                return Exit.UNREACHABLE
            if tls_error is not None:
                _say(f"TLS with proxy {proxy} failed: {tls_error.reason or tls_error}")
                return Exit.UNREACHABLE
            _say(str(exc))
            return Exit.PROTOCOL
        return await _relay(stream, trailing)
    finally:
        if stream is not None:
            await trio.aclose_forcefully(stream)


class _BlockingFd:
    """stdin/stdout on a regular file or /dev/null (not pollable): read and write in a thread."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    async def receive_some(self, max_bytes: int) -> bytes:
        return await trio.to_thread.run_sync(os.read, self.fd, max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[await trio.to_thread.run_sync(os.write, self.fd, view) :]

    async def aclose(self) -> None:
        os.close(self.fd)


def _fd_stream(fd: int) -> trio.lowlevel.FdStream | _BlockingFd:
    dup = os.dup(fd)  # ours to close; FdStream puts it back in blocking mode when closing
    mode = os.fstat(dup).st_mode
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(dup):
        if stat.S_ISFIFO(mode) and hasattr(fcntl, "F_SETPIPE_SZ"):
            # ssh gives ProxyCommand pipes of 64 KiB: a larger one means fewer wake-ups per MiB
            with contextlib.suppress(OSError):
                fcntl.fcntl(dup, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        return trio.lowlevel.FdStream(dup)
    return _BlockingFd(dup)


_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


async def _relay(stream: trio.abc.HalfCloseableStream, trailing: bytes) -> int:
    try:
        stdin, stdout = _fd_stream(0), _fd_stream(1)
    except OSError as exc:
        _say(f"stdin or stdout is not usable: {exc.strerror or exc}")
        return Exit.USAGE
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_upload, stdin, stream)
            code = await _download(stream, stdout, trailing)
            nursery.cancel_scope.cancel()
        return code
    finally:
        for s in (stdin, stdout):
            try:
                await s.aclose()
            except OSError:
                pass


async def _upload(
    stdin: trio.lowlevel.FdStream | _BlockingFd, stream: trio.abc.HalfCloseableStream
) -> None:
    try:
        while data := await stdin.receive_some(CHUNK):
            await stream.send_all(data)
        await stream.send_eof()
    except _BROKEN:
        pass  # the download side sees how the connection ends


async def _download(
    stream: trio.abc.Stream, stdout: trio.lowlevel.FdStream | _BlockingFd, trailing: bytes
) -> int:
    data: bytes | bytearray = trailing
    while True:
        if data:
            try:
                await stdout.send_all(data)
            except _BROKEN:
                _say("stdout was closed")
                return Exit.BROKEN
        try:
            data = await stream.receive_some(CHUNK)
        except _BROKEN as exc:
            _say(f"connection through the proxy broke: {exc.__cause__ or exc}")
            return Exit.BROKEN
        if not data:
            return Exit.OK
