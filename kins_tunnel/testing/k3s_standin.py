"""A stand-in for the K3s API server, used by the demo and the tests.

This is a test double, not a Kubernetes implementation: it answers just enough of the API, over
HTTPS, for real `kubectl` to work against it (`version`, discovery, `get pods` as a server-side
Table, `get pods --watch`, `logs [-f]`, `exec`/`attach`/`cp` over the WebSocket remote-command
protocol with a fixed set of sandboxed commands, see `remotecommand` and `sandbox`, and
`port-forward` to built-in echo and digest ports, see `portforward`), plus two
endpoints of its own for moving bulk data through a tunnel and checking it byte for byte:

- ``GET /kins-standin/blob?bytes=N&seed=S`` streams exactly N bytes of `blob_bytes(N, S)`;
- ``POST|PUT /kins-standin/upload`` reads the body and answers ``{"bytes": n, "sha256": hex}``.

Theory of operation: `serve_k3s_standin` accepts TCP connections, wraps each in a
`trio.SSLStream` and runs one handler task per connection. The handler drives an `h11` server
connection (keep-alive supported): every read and every write has a deadline, and the handler ends
by closing the stream forcefully. Streaming answers (watch, `logs -f`) are chunked; while they
run, a second task watches the socket so that a client that goes away ends the stream at once.
Cancelling `serve_k3s_standin` (stopping the stand-in) closes every connection, watches included,
so clients see the server go away instead of waiting on a silent socket. An exec upgrade hands the
connection to `remotecommand.serve_remote_command`; SPDY for exec (kubectl's fallback, ``POST``
with ``Upgrade: SPDY/3.1``) is answered with an error; port-forward speaks SPDY/3.1, plain or
inside a WebSocket (`portforward.serve_port_forward`).

The blob is AES-128-CTR over zeros, keyed by the seed: deterministic, pseudo-random, seekable
(any offset can be produced without the bytes before it) and ~1 GB/s, so it is never the
bottleneck of a throughput test.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
import shutil
import ssl
import tempfile
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio
from wsproto.utilities import ProtocolError as WebSocketProtocolError

from kins_tunnel.testing.blob import (  # CHUNK: size of large writes
    blob_bytes,
    blob_chunk,
    iter_blob,
)
from kins_tunnel.testing.cluster import (
    _API_RESOURCES,
    _VERSION,
    K3S_VERSION,
    StandinStats,
    _Cluster,
    _status,
    _ts,
)
from kins_tunnel.testing.exchange import JSON, WRITE_TIMEOUT, Exchange
from kins_tunnel.testing.portforward import WEBSOCKET_PROTOCOL as PORT_FORWARD_WEBSOCKET
from kins_tunnel.testing.portforward import (
    RawTransport,
    SpdyProtocolError,
    WebSocketTransport,
    serve_port_forward,
)
from kins_tunnel.testing.remotecommand import (
    ExecOptions,
    UpgradeRefused,
    accept_websocket,
    is_websocket_upgrade,
    serve_remote_command,
)
from kins_tunnel.testing.sandbox import Sandbox, run_command
from kins_tunnel.testing.selfsigned import make_self_signed_server_context

__all__ = [
    "K3S_VERSION",
    "StandinStats",
    "blob_bytes",
    "blob_chunk",
    "iter_blob",
    "make_self_signed_server_context",
    "serve_k3s_standin",
]

log = logging.getLogger(__name__)

MAX_BLOB = 2 * 1024**3  # largest blob served


class _Handler:
    """Routes requests of one connection to the fake cluster."""

    def __init__(self, cluster: _Cluster, ex: Exchange) -> None:
        self.cluster = cluster
        self.ex = ex
        self.upgraded = False  # the connection was handed to another protocol: no next request

    async def serve(self) -> None:
        while True:
            event = await self.ex.next_event()
            if isinstance(event, h11.ConnectionClosed):
                return
            assert isinstance(event, h11.Request)
            await self.dispatch(event)
            if self.upgraded or not await self.drain_request():
                return
            self.ex.conn.start_next_cycle()

    async def drain_request(self, limit: int = 1 << 20) -> bool:
        """Read the rest of an answered request (up to `limit` bytes); True if keep-alive may go on."""
        while self.ex.conn.their_state is h11.SEND_BODY and limit > 0:
            event = await self.ex.next_event()
            if isinstance(event, h11.Data):
                limit -= len(event.data)
        return self.ex.conn.our_state is h11.DONE and self.ex.conn.their_state is h11.DONE

    async def dispatch(self, req: h11.Request) -> None:
        self.cluster.stats.requests += 1
        method = req.method.decode()
        url = urlsplit(req.target.decode("ascii", "replace"))
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        accept = ",".join(v.decode("latin-1") for k, v in req.headers if k == b"accept")
        parts = [p for p in url.path.split("/") if p]
        log.debug("k3s stand-in: %s %s (Accept: %s)", method, req.target.decode(), accept)
        if parts == ["kins-standin", "upload"] and method in ("POST", "PUT"):
            return await self.upload()
        if (
            len(parts) == 7
            and parts[:3] == ["api", "v1", "namespaces"]
            and parts[4] == "pods"
            and parts[6] in ("exec", "attach")
        ):
            return await self.exec(req, parts[5], parts[6], parse_qs(url.query))
        if (
            len(parts) == 7
            and parts[:3] == ["api", "v1", "namespaces"]
            and parts[4] == "pods"
            and parts[6] == "portforward"
        ):
            return await self.port_forward(req, parts[5])
        if method != "GET":
            return await self.ex.respond_json(
                405, _status(405, "MethodNotAllowed", f"method {method} is not allowed")
            )
        if parts == ["kins-standin", "blob"]:
            return await self.blob(query)
        static = {
            "version": _VERSION,
            "api": {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:6443"}
                ],
            },
            "api/v1": _API_RESOURCES,
            "apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": []},
        }
        if "/".join(parts) in static:
            return await self.ex.respond_json(200, static["/".join(parts)])
        if parts in (["api", "v1", "pods"], ["api", "v1", "configmaps"]):
            parts = ["api", "v1", "namespaces", "default", parts[2]]  # all namespaces: only one
        if len(parts) >= 5 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "pods":
            return await self.pods(parts[3], parts[5:], query, "as=Table" in accept)
        if parts in (["api", "v1", "namespaces"], ["api", "v1", "nodes"]) or (
            len(parts) == 5
            and parts[:3] == ["api", "v1", "namespaces"]
            and parts[4] == "configmaps"
        ):
            return await self.ex.respond_json(200, self.cluster.simple_list(parts[-1]))
        await self.ex.respond_json(
            404, _status(404, "NotFound", "the server could not find the requested resource")
        )

    async def pods(self, ns: str, rest: list[str], query: dict[str, str], table: bool) -> None:
        c = self.cluster
        names = [name for name, _, _ in c.pods]
        if rest and rest[0] not in names:
            return await self.ex.respond_json(
                404, _status(404, "NotFound", f'pods "{rest[0]}" not found')
            )
        if len(rest) == 2 and rest[1] == "log":
            return await self.logs(names.index(rest[0]), query)
        if len(rest) > 1:
            return await self.ex.respond_json(404, _status(404, "NotFound", "no such subresource"))
        include = query.get("includeObject", "Metadata")
        if rest:
            pod = c.pod(ns, names.index(rest[0]))
            return await self.ex.respond_json(200, c.pod_table([pod], include) if table else pod)
        if query.get("watch") in ("1", "true"):
            seconds = query.get("timeoutSeconds", "")
            if not seconds.isdigit() and seconds:
                return await self.ex.respond_json(
                    400, _status(400, "BadRequest", "timeoutSeconds must be a non-negative integer")
                )
            limit = int(seconds) if seconds else float("inf")
            c.stats.watches += 1
            try:
                return await self.ex.stream_until(
                    JSON, self.watch_events(ns, table, include), limit
                )
            finally:
                c.stats.watches -= 1
        body = c.pod_table(c.pod_list(ns)["items"], include) if table else c.pod_list(ns)
        await self.ex.respond_json(200, body)

    async def exec(
        self, req: h11.Request, pod: str, verb: str, query: dict[str, list[str]]
    ) -> None:
        """`kubectl exec` / `attach` (and `cp`, which runs tar through exec)."""
        names = [name for name, _, _ in self.cluster.pods]
        if pod not in names:
            return await self.ex.respond_json(
                404, _status(404, "NotFound", f'pods "{pod}" not found')
            )
        if not is_websocket_upgrade(req.headers):
            spdy = any(k == b"upgrade" and v.lower().startswith(b"spdy/") for k, v in req.headers)
            message = (
                "the K3s API stand-in speaks the WebSocket remote-command protocol "
                "(v5.channel.k8s.io, v4.channel.k8s.io), not SPDY"
                if spdy
                else "Upgrade request required"
            )
            return await self.ex.respond_json(400, _status(400, "BadRequest", message))
        if req.method != b"GET":
            return await self.ex.respond_json(
                405, _status(405, "MethodNotAllowed", "a WebSocket upgrade must be a GET")
            )
        options = ExecOptions.from_query(query)
        if verb == "attach":  # the pod's main process: the interactive line echo
            options = ExecOptions(
                ("cat",),
                options.stdin,
                options.stdout,
                options.stderr,
                options.tty,
                options.container,
            )
        elif not options.command:
            return await self.ex.respond_json(
                400, _status(400, "BadRequest", "you must specify at least 1 command")
            )
        if not (options.stdin or options.stdout or options.stderr):
            return await self.ex.respond_json(
                400,
                _status(400, "BadRequest", "you must specify at least 1 of stdin, stdout, stderr"),
            )
        event = await self.ex.next_event()  # the (empty) end of the GET
        if not isinstance(event, h11.EndOfMessage):
            raise trio.BrokenResourceError("exec request with a body")
        trailing, _closed = self.ex.conn.trailing_data
        sandbox = self.cluster.sandbox

        async def run(argv: list[str], cio: Any) -> int:
            return await run_command(sandbox, pod, argv, cio)

        try:
            self.upgraded = True
            self.cluster.stats.execs += 1
            await serve_remote_command(
                self.ex.stream, req.target, list(req.headers), bytes(trailing), options, run
            )
        except UpgradeRefused as exc:
            self.upgraded = False
            await self.ex.respond_json(400, _status(400, "BadRequest", str(exc)))
        finally:
            self.cluster.stats.execs -= 1

    async def port_forward(self, req: h11.Request, pod: str) -> None:
        """`kubectl port-forward`: SPDY/3.1, plain or inside a WebSocket (see `portforward`)."""
        if pod not in [name for name, _, _ in self.cluster.pods]:
            return await self.ex.respond_json(
                404, _status(404, "NotFound", f'pods "{pod}" not found')
            )
        websocket = is_websocket_upgrade(req.headers)
        spdy = any(k == b"upgrade" and v.lower() == b"spdy/3.1" for k, v in req.headers)
        if not (websocket and req.method == b"GET") and not (spdy and req.method == b"POST"):
            return await self.ex.respond_json(
                400, _status(400, "BadRequest", "Upgrade request required")
            )
        if spdy and not any(
            k == b"x-stream-protocol-version" and v == b"portforward.k8s.io" for k, v in req.headers
        ):
            return await self.ex.respond_json(
                403, _status(403, "Forbidden", "port-forward speaks only portforward.k8s.io")
            )
        while not isinstance(event := await self.ex.next_event(), h11.EndOfMessage):
            if not isinstance(event, h11.Data):
                raise trio.BrokenResourceError("port-forward request cut short")
        trailing = bytes(self.ex.conn.trailing_data[0])
        self.upgraded = True
        self.cluster.stats.execs += 1
        try:
            if websocket:
                try:
                    ws, _ = await accept_websocket(
                        self.ex.stream,
                        req.target,
                        list(req.headers),
                        trailing,
                        [PORT_FORWARD_WEBSOCKET],
                    )
                except UpgradeRefused as exc:
                    self.upgraded = False
                    return await self.ex.respond_json(400, _status(400, "BadRequest", str(exc)))
                transport: Any = WebSocketTransport(self.ex.stream, ws)
            else:
                with trio.fail_after(WRITE_TIMEOUT):
                    await self.ex.stream.send_all(
                        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                        b"Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: portforward.k8s.io\r\n\r\n"
                    )
                transport = RawTransport(self.ex.stream, trailing)
            await serve_port_forward(transport, pod)
        finally:
            self.cluster.stats.execs -= 1

    async def watch_events(self, ns: str, table: bool, include: str) -> AsyncGenerator[bytes, None]:
        c = self.cluster

        def event(kind: str, index: int) -> bytes:
            pod = c.pod(ns, index, c.next_rv())
            obj = c.pod_table([pod], include) if table else pod
            return json.dumps({"type": kind, "object": obj}).encode() + b"\n"

        yield b"".join(event("ADDED", i) for i in range(len(c.pods)))
        tick = 0
        while True:
            await trio.sleep(c.interval)
            yield event("MODIFIED", tick % len(c.pods))
            tick += 1

    async def logs(self, index: int, query: dict[str, str]) -> None:
        name = self.cluster.pods[index][0]

        def line(n: int) -> bytes:
            return f"{_ts(dt.datetime.now(dt.UTC))} {name}: stand-in log line {n}\n".encode()

        if query.get("follow") not in ("1", "true"):
            return await self.ex.respond(200, b"".join(line(n) for n in range(3)), "text/plain")

        async def follow() -> AsyncGenerator[bytes, None]:
            n = 0
            while True:
                yield line(n)
                n += 1
                await trio.sleep(self.cluster.interval)

        await self.ex.stream_until("text/plain", follow(), float("inf"))

    async def blob(self, query: dict[str, str]) -> None:
        try:
            n, seed = int(query.get("bytes", "")), int(query.get("seed", "0"))
            if not 0 <= n <= MAX_BLOB:
                raise ValueError
        except ValueError:
            return await self.ex.respond_json(
                400,
                _status(
                    400,
                    "BadRequest",
                    f"bytes must be an integer from 0 to {MAX_BLOB}, seed an integer",
                ),
            )
        await self.ex.start(200, "application/octet-stream", n)
        await self.ex.send_chunks(iter_blob(n, seed))

    async def upload(self) -> None:
        digest, total = hashlib.sha256(), 0
        while True:
            event = await self.ex.next_event()
            if isinstance(event, h11.Data):
                digest.update(event.data)
                total += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise trio.BrokenResourceError("upload body ended early")
        await self.ex.respond_json(200, {"bytes": total, "sha256": digest.hexdigest()})


_CONNECTION_ENDED = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    h11.ProtocolError,
    WebSocketProtocolError,
    SpdyProtocolError,
    ssl.SSLError,
    OSError,
)


async def _serve_connection(cluster: _Cluster, stream: trio.abc.Stream) -> None:
    handler = _Handler(cluster, Exchange(stream))
    cluster.stats.connections += 1
    try:
        await handler.serve()
    except _CONNECTION_ENDED as exc:
        log.debug("k3s stand-in: connection ended: %r", exc)
    except BaseExceptionGroup as group:  # from the nursery of an exec
        _ended, rest = group.split(_CONNECTION_ENDED)
        if rest is not None:
            raise
        log.debug("k3s stand-in: connection ended: %r", group)
    finally:
        cluster.stats.connections -= 1
        await trio.aclose_forcefully(stream)


async def serve_k3s_standin(
    ssl_context: ssl.SSLContext,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    interval: float = 1.0,
    unit: str = "test",
    sandbox: Path | None = None,
    stats: StandinStats | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the K3s API stand-in over HTTPS on host:port until cancelled.

    Calls ``task_status.started(port)`` with the bound port once listening. `interval` is the
    period of watch MODIFIED events and of `logs -f` lines; `unit` names the pods
    (``<unit>-server-kins-...``). `sandbox` is the directory exec commands and `kubectl cp` may
    use (one subdirectory per pod); by default a fresh temporary directory, removed on exit.
    `stats`, if given, is kept up to date with what this stand-in serves.
    Raises OSError if the address cannot be bound.
    """
    own = sandbox is None
    root = Path(tempfile.mkdtemp(prefix="k3s-standin-sandbox-")) if sandbox is None else sandbox
    try:
        cluster = _Cluster(unit, interval, Sandbox(root), stats or StandinStats())
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        ssl_listeners = [
            trio.SSLListener(lst, ssl_context, https_compatible=True) for lst in listeners
        ]
        handler = functools.partial(_serve_connection, cluster)
        task_status.started(bound)
        await trio.serve_listeners(handler, ssl_listeners)
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """``python -m kins_tunnel.testing.k3s_standin``: run the stand-in on its own (benchmarks)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m kins_tunnel.testing.k3s_standin",
        description="K3s API stand-in (a test double) over HTTPS",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--dir", required=True, help="where its certificate and key are written")
    parser.add_argument("--sandbox", help="directory for exec and cp (default: a temporary one)")
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args(argv)
    ctx, cert = make_self_signed_server_context(args.dir)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                functools.partial(
                    serve_k3s_standin,
                    ctx,
                    host=args.host,
                    port=args.port,
                    interval=args.interval,
                    sandbox=Path(args.sandbox) if args.sandbox else None,
                )
            )
            print(f"k3s stand-in listening on {args.host}:{port}, certificate {cert}", flush=True)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
