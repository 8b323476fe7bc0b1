"""Small JSON exchanges over HTTP/1.1 (h11) on any trio stream: enrolment and renewal.

Enrolment runs on a TLS connection of the tunnel port (a `TLSSocket`, seen as a stream through
`TLSSocketStream`); renewal on a stream of the tunnel itself (a `TunnelStream`). Both sides are
h11 state machines: `json_request` is the client (one request, one answer, the connection kept for
the next request), `serve_json` the server (at most `max_requests` requests, each answered with a
JSON object). Bodies are bounded on both sides (`MAX_BODY`) and need a Content-Length; the caller
sets the deadline. A peer that breaks the protocol gets a 4xx answer (server) or `ExchangeError`
(client); nothing a peer sends is ever more than data.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import trio

from kins_tunnel.httpanswer import ClientGone, ErrorAnswer, read_request
from kins_tunnel.transport.tls import TLSSocket, TransportError

MAX_BODY = 64 * 1024  # bytes of a JSON body either way (a CSR, a certificate chain)
READ_SIZE = 16384

Handler = Callable[[str, str, dict[str, Any]], Awaitable[tuple[int, dict[str, Any]]]]


class ExchangeError(Exception):
    """The peer broke the exchange (closed early, not HTTP, not JSON, too large)."""


class TLSSocketStream(trio.abc.Stream):
    """A `TLSSocket` as a trio stream (for h11), owning it: `aclose` closes the socket."""

    def __init__(self, tls: TLSSocket) -> None:
        self.tls = tls
        self._buf = bytearray(READ_SIZE)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        view = memoryview(self._buf)[: max_bytes or READ_SIZE]
        while True:
            try:
                n = self.tls.receive_into(view)
            except TransportError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
            if n is not None:
                return bytes(view[:n])
            await self.tls.wait_readable()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            done = self.tls.send_chunk(data)
            while not done:
                await self.tls.wait_writable()
                done = self.tls.flush()
        except TransportError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    async def wait_send_all_might_not_block(self) -> None:
        await self.tls.wait_writable()

    async def aclose(self) -> None:
        self.tls.close()
        await trio.lowlevel.checkpoint()


def _decode(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body) if body else {}
    except (ValueError, UnicodeDecodeError):
        raise ValueError("the body is not JSON") from None
    except RecursionError:  # "[[[[..." within MAX_BODY: json's decoder recurses per level
        raise ValueError("the body is JSON nested too deeply") from None
    if not isinstance(doc, dict):
        raise ValueError("the body is not a JSON object")
    return doc


async def _read_body(stream: trio.abc.ReceiveStream, conn: h11.Connection) -> bytes:
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(READ_SIZE)
            conn.receive_data(bytes(data))
            if not data and conn.their_state is not h11.DONE:
                raise ExchangeError("the peer closed the connection in the middle of a message")
            continue
        if isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise ExchangeError(f"a body larger than {MAX_BODY} bytes")
            continue
        if isinstance(event, h11.EndOfMessage):
            return bytes(body)
        raise ExchangeError(f"unexpected {type(event).__name__}")


def _message(doc: dict[str, Any]) -> list[bytes]:
    return [json.dumps(doc, separators=(",", ":")).encode()]


async def json_request(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    method: str,
    target: str,
    body: dict[str, Any] | None,
    *,
    host: str,
) -> tuple[int, dict[str, Any]]:
    """Send one request on `conn` (an h11 CLIENT) and read its answer: (status, JSON object).
    `ExchangeError` if the answer is not a bounded JSON object over HTTP/1.1."""
    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
        conn.start_next_cycle()
    payload = b"" if body is None else _message(body)[0]
    headers = [("Host", host), ("Accept", "application/json")]
    if body is not None:
        headers += [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    try:
        await stream.send_all(conn.send(h11.Request(method=method, target=target, headers=headers)))
        if body is not None:
            await stream.send_all(conn.send(h11.Data(data=payload)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(READ_SIZE)
                if not data:
                    raise ExchangeError("the cloud closed the connection before answering")
                conn.receive_data(bytes(data))
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                break
            if isinstance(event, h11.InformationalResponse):
                continue
            raise ExchangeError(f"unexpected {type(event).__name__}")
        raw = await _read_body(stream, conn)
    except h11.ProtocolError as exc:
        raise ExchangeError(f"not an HTTP/1.1 answer: {str(exc)[:100]}") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise ExchangeError(f"connection lost: {exc}") from None
    try:
        return status, _decode(raw)
    except ValueError as exc:
        raise ExchangeError(f"HTTP {status}: {exc}") from None


async def serve_json(
    stream: trio.abc.Stream,
    handler: Handler,
    *,
    max_requests: int,
    server: str,
    on_bad_request: Callable[[int, str], None] | None = None,
) -> None:
    """Answer up to `max_requests` requests on `stream` with `handler(method, target, body)`;
    a malformed request gets a 4xx JSON answer and ends the exchange, after
    `on_bad_request(status, sentence)` (to count and log it). The caller closes."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=READ_SIZE)
    for _ in range(max_requests):
        try:
            request = await read_request(stream, conn)
            raw = await _read_body(stream, conn)
            body = _decode(raw)
        except ClientGone:
            return
        except ErrorAnswer as exc:
            status, doc = exc.status, {"error": exc.reason, "reason": "bad_request"}
            if on_bad_request is not None:
                on_bad_request(status, exc.reason)
            await _answer(stream, conn, status, doc, server, close=True)
            return
        except (ExchangeError, ValueError, h11.ProtocolError) as exc:
            doc = {"error": f"bad request: {str(exc)[:100]}", "reason": "bad_request"}
            if on_bad_request is not None:
                on_bad_request(400, doc["error"])
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await _answer(stream, conn, 400, doc, server, close=True)
            return
        status, doc = await handler(
            request.method.decode("ascii", "replace"),
            request.target.decode("ascii", "replace"),
            body,
        )
        last = not _keep_alive(request)
        await _answer(stream, conn, status, doc, server, close=last)
        if last or conn.our_state is not h11.DONE:
            return
        try:
            conn.start_next_cycle()
        except h11.ProtocolError:
            return


def _keep_alive(request: h11.Request) -> bool:
    return all(
        value.lower() != b"close"
        for name, value in request.headers
        if name.lower() == b"connection"
    )


async def _answer(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    status: int,
    doc: dict[str, Any],
    server: str,
    *,
    close: bool,
) -> None:
    payload = _message(doc)[0]
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(payload))),
        ("Server", server),
    ]
    if close:
        headers.append(("Connection", "close"))
    try:
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
        await stream.send_all(conn.send(h11.Data(data=payload)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
        pass
