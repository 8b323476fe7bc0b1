"""Requests and answers of the small HTTP servers (the CONNECT proxy, the edge's uplink proxy,
admin).

`read_request` reads one request head with h11 (the caller bounds its size through
`max_incomplete_event_size` and its time with a deadline); a request h11 cannot parse raises
`ErrorAnswer` with h11's status hint, a client that leaves first raises `ClientGone`.
`send_error` answers an `ErrorAnswer` with a one-line plain-text body.

`accept_connect` answers a CONNECT with 200 and hands the bytes the client sent behind its
request to the opened stream: from then on the connection is a byte pipe.

`error_answer` frames a whole answer with h11 when h11 can answer the request, and writes the head
by hand when it cannot (a request it failed to parse has no state to answer from).
`send_and_linger` delivers it and closes without an RST: closing a socket with unread input sends
RST, which can destroy the answer before the client reads it, so the server half-closes and
discards the client's input for a moment first.
"""

from __future__ import annotations

from http import HTTPStatus

import h11
import trio

READ_SIZE = 16384  # bytes read per receive while a request head is incomplete
MAX_SHOWN_DETAIL = 100  # characters of h11's parse error shown to the client
WRITE_TIMEOUT = 5.0  # seconds to deliver an answer
LINGER_TIME = 1.0  # seconds the client's input is drained before the close
LINGER_BYTES = 1 << 20


class ErrorAnswer(Exception):
    """End an exchange with an error answer: `reason` goes to the client, `detail` (when set)
    to the log instead of `reason`."""

    def __init__(
        self,
        status: int,
        reason: str,
        headers: list[tuple[str, str]] | None = None,
        detail: str = "",
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.detail = detail or reason
        self.headers = headers or []


class ClientGone(Exception):
    """The client closed or broke its connection before it had an answer."""


async def read_request(stream: trio.abc.ReceiveStream, conn: h11.Connection) -> h11.Request:
    """The next request head on `conn`; raises `ErrorAnswer` (malformed) or `ClientGone`."""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            shown = str(exc).split(":")[0][:MAX_SHOWN_DETAIL]
            raise ErrorAnswer(exc.error_status_hint, f"malformed request: {shown}") from None
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ClientGone(f"client went away before a complete request: {exc}") from None
            if not data:
                raise ClientGone("client closed the connection before a complete request")
            conn.receive_data(bytes(data))  # a request head: small
            continue
        if isinstance(event, h11.Request):
            return event
        raise ErrorAnswer(
            400, "unexpected request data"
        )  # pragma: no cover - a Request comes first


async def send_error(
    stream: trio.abc.HalfCloseableStream,
    conn: h11.Connection,
    ans: ErrorAnswer,
    subject: str,
) -> None:
    """Answer `ans` with the body `<subject>: <reason>` and close (see `send_and_linger`)."""
    body = f"{subject}: {ans.reason}\n".encode()
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
        *ans.headers,
    ]
    await send_and_linger(stream, error_answer(conn, ans.status, headers, body))


def phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def error_answer(
    conn: h11.Connection,
    status: int,
    headers: list[tuple[str, str]],
    body: bytes,
    *,
    with_body: bool = True,
) -> bytes:
    """The bytes of a whole answer (`with_body=False`: the answer to a HEAD request)."""
    reason = phrase(status)
    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
        try:
            data = conn.send(
                h11.Response(status_code=status, headers=headers, reason=reason.encode())
            )
            if with_body:  # h11 frames a HEAD answer without a body
                data += conn.send(h11.Data(data=body))
            return data + conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            pass
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode() + (body if with_body else b"")


async def send_and_linger(stream: trio.abc.HalfCloseableStream, data: bytes) -> None:
    """Send `data`, half-close, drain the client's input for a moment (never raises for I/O)."""
    try:
        with trio.move_on_after(WRITE_TIMEOUT):
            await stream.send_all(data)
            await stream.send_eof()
        with trio.move_on_after(LINGER_TIME):
            discarded = 0
            while discarded < LINGER_BYTES:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                discarded += len(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def accept_connect(
    client: trio.abc.Stream, conn: h11.Connection, stream: trio.abc.SendStream
) -> int:
    """Send `200 Connection established`, then forward what the client sent after its request;
    returns how many such bytes went to `stream`. Raises the streams' errors."""
    await client.send_all(
        conn.send(h11.Response(status_code=200, headers=[], reason=b"Connection established"))
    )
    leftover, _closed = conn.trailing_data
    if leftover:
        await stream.send_all(leftover)
    return len(leftover)
