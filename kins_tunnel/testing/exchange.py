"""`Exchange`: the server side of one HTTP/1.1 connection (h11) for the K3s API stand-in, with a
deadline on every read and write, JSON and streamed (chunked) answers."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Iterator
from contextlib import aclosing
from http import HTTPStatus
from typing import Any

import h11
import trio

from kins_tunnel.testing.blob import CHUNK  # also the read size

READ_TIMEOUT = 30.0  # seconds allowed for any single read (idle keep-alive included)
WRITE_TIMEOUT = 60.0  # seconds allowed for any single write
JSON = "application/json"


class Exchange:
    """One h11 connection on one stream, with deadlines on every read and write."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.SERVER)

    async def _write(self, event: Any) -> None:
        with trio.fail_after(WRITE_TIMEOUT):
            for piece in self.conn.send_with_data_passthrough(event) or ():
                await self.stream.send_all(piece)

    async def next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.conn.they_are_waiting_for_100_continue:
                await self._write(h11.InformationalResponse(status_code=100, headers=[]))
            with trio.fail_after(READ_TIMEOUT):
                data = await self.stream.receive_some(CHUNK)
            self.conn.receive_data(bytes(data))

    async def respond(self, status: int, body: bytes, ctype: str = JSON) -> None:
        await self.start(status, ctype, len(body))
        await self._write(h11.Data(data=body))
        await self._write(h11.EndOfMessage())

    async def respond_json(self, status: int, obj: Any) -> None:
        await self.respond(status, json.dumps(obj).encode())

    async def start(self, status: int, ctype: str, length: int | None = None) -> None:
        headers = [("Content-Type", ctype), ("Cache-Control", "no-cache, private")]
        if length is not None:
            headers.append(("Content-Length", str(length)))
        reason = HTTPStatus(status).phrase.encode()
        await self._write(h11.Response(status_code=status, headers=headers, reason=reason))

    async def send_chunks(self, chunks: Iterator[bytes]) -> None:
        for chunk in chunks:
            await self._write(h11.Data(data=chunk))
        await self._write(h11.EndOfMessage())

    async def stream_until(
        self, ctype: str, source: AsyncGenerator[bytes, None], seconds: float
    ) -> None:
        """Send a chunked answer from `source` until it ends, `seconds` pass or the client leaves."""
        await self.start(200, ctype)
        gone = False

        async def watch_client(scope: trio.CancelScope) -> None:
            nonlocal gone
            try:
                data = await self.stream.receive_some(CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if data:
                self.conn.receive_data(bytes(data))  # a pipelined request: h11 keeps it for later
                return
            gone = True
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_client, nursery.cancel_scope)
            with trio.move_on_after(seconds):
                async with aclosing(source):
                    async for piece in source:
                        await self._write(h11.Data(data=piece))
            if not gone:
                await self._write(h11.EndOfMessage())
            nursery.cancel_scope.cancel()
        if gone:
            raise trio.BrokenResourceError("client went away")
