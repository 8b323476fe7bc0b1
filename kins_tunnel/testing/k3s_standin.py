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
import ipaddress
import json
import logging
import shutil
import ssl
import tempfile
from collections.abc import AsyncGenerator, Iterator
from contextlib import aclosing
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.x509.oid import NameOID
from wsproto.utilities import ProtocolError as WebSocketProtocolError

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

log = logging.getLogger(__name__)

READ_TIMEOUT = 30.0  # seconds allowed for any single read (idle keep-alive included)
WRITE_TIMEOUT = 60.0  # seconds allowed for any single write
CHUNK = 256 * 1024  # size of the writes of large bodies
MAX_BLOB = 2 * 1024**3  # largest blob served
K3S_VERSION = "v1.30.6+k3s1"  # 1.30: the first with the WebSocket remote-command protocol
JSON = "application/json"


def _blob_cipher(seed: int, offset: int) -> Any:
    key = hashlib.sha256(b"kins-standin-blob:%d" % seed).digest()[:16]
    counter = (offset // 16).to_bytes(16, "big")
    return Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()


def iter_blob(n: int, seed: int, *, offset: int = 0, chunk_size: int = CHUNK) -> Iterator[bytes]:
    """Yield bytes ``offset .. n`` of the blob for `seed`, in chunks of at most `chunk_size`."""
    if n < 0 or offset < 0 or chunk_size <= 0:
        raise ValueError("blob size, offset and chunk size must be non-negative")
    enc = _blob_cipher(seed, offset)
    skip = offset % 16
    if skip:
        enc.update(bytes(skip))
    zeros = bytes(chunk_size)
    pos = offset
    while pos < n:
        size = min(chunk_size, n - pos)
        yield enc.update(zeros if size == chunk_size else bytes(size))
        pos += size


def blob_chunk(seed: int, offset: int, length: int) -> bytes:
    """Return `length` bytes of the blob for `seed` starting at `offset` (cheap random access)."""
    return b"".join(iter_blob(offset + length, seed, offset=offset, chunk_size=1 << 20))


def blob_bytes(n: int, seed: int) -> bytes:
    """Return the first `n` bytes of the blob for `seed`, exactly what the blob endpoint sends."""
    return blob_chunk(seed, 0, n)



def make_self_signed_server_context(
    tmpdir: str | Path, *, unit: str = "test"
) -> tuple[ssl.SSLContext, Path]:
    """Write a self-signed server certificate and key into `tmpdir`; return (context, cert path).

    The certificate names 127.0.0.1, localhost and ``<unit>-svc-kins.kins-system`` (the name
    kubectl uses through the tunnel), so clients may verify it with the cert path as their CA.
    """
    tmp = Path(tmpdir)
    key = ec.generate_private_key(ec.SECP256R1())
    svc = f"{unit}-svc-kins.kins-system"
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "k3s-standin")])
    now = dt.datetime.now(dt.UTC)
    sans = [x509.DNSName("localhost"), x509.DNSName(svc), x509.DNSName(f"{svc}.svc"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "k3s-standin.crt", tmp / "k3s-standin.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    key_path.chmod(0o600)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_path, key_path)
    return ctx, cert_path



def _ts(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _age(since: dt.datetime) -> str:
    secs = int((dt.datetime.now(dt.UTC) - since).total_seconds())
    return f"{secs}s" if secs < 120 else f"{secs // 60}m" if secs < 7200 else f"{secs // 3600}h"


@dataclass
class StandinStats:
    """What one stand-in is serving right now (for tests that stop and restart stand-ins)."""

    connections: int = 0  # TLS connections open
    watches: int = 0  # watch requests being streamed
    execs: int = 0  # exec, attach and port-forward sessions running
    requests: int = 0  # requests received in all


class _Cluster:
    """The stand-in's state: its pods and a resourceVersion counter."""

    def __init__(self, unit: str, interval: float, sandbox: Sandbox, stats: StandinStats) -> None:
        self.unit = unit
        self.interval = interval
        self.sandbox = sandbox
        self.stats = stats
        self.born = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=5)
        self.rv = 1000
        self.pods = [(f"{unit}-server-kins-7d9f8b6c5-x2x4k", "edge1", "10.42.0.5"),
                     (f"{unit}-agent-kins-5c6d7f8b9-h7lqz", "edge2", "10.42.1.3"),
                     (f"{unit}-agent-kins-5c6d7f8b9-r4m8n", "edge3", "10.42.2.4")]

    def next_rv(self) -> str:
        self.rv += 1
        return str(self.rv)

    def pod(self, ns: str, index: int, rv: str | None = None) -> dict[str, Any]:
        name, node, ip = self.pods[index]
        role = "server" if "-server-" in name else "agent"
        started = _ts(self.born)
        return {
            "kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": ns, "uid": f"00000000-0000-4000-8000-{index:012d}",
                         "resourceVersion": rv or str(self.rv), "creationTimestamp": started,
                         "labels": {"app": f"{self.unit}-{role}-kins"}},
            "spec": {"nodeName": node, "containers": [{
                "name": role, "image": f"rancher/k3s:{K3S_VERSION.replace('+', '-')}",
                "stdin": True, "tty": True,  # `attach -it` finds the line echo on a TTY
                "ports": [{"name": "echo", "containerPort": 7, "protocol": "TCP"},
                          {"name": "digest", "containerPort": 9, "protocol": "TCP"}]}]},
            "status": {"phase": "Running", "podIP": ip, "hostIP": ip, "startTime": started,
                       "conditions": [{"type": "Ready", "status": "True"}],
                       "containerStatuses": [{"name": role, "ready": True, "restartCount": 0,
                                              "image": f"rancher/k3s:{K3S_VERSION}", "started": True,
                                              "state": {"running": {"startedAt": started}}}]},
        }

    def pod_list(self, ns: str) -> dict[str, Any]:
        return {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": str(self.rv)},
                "items": [self.pod(ns, i) for i in range(len(self.pods))]}

    def simple_list(self, resource: str) -> dict[str, Any]:
        """A list of namespaces or nodes (names only), or an empty ConfigMapList."""
        kind = {"namespaces": "Namespace", "nodes": "Node", "configmaps": "ConfigMap"}[resource]
        names = {"namespaces": ["default", "kube-system", "kins-system"],
                 "nodes": sorted({node for _, node, _ in self.pods}), "configmaps": []}[resource]
        items = [{"kind": kind, "apiVersion": "v1",
                  "metadata": {"name": n, "creationTimestamp": _ts(self.born)}} for n in names]
        return {"kind": f"{kind}List", "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self.rv)}, "items": items}

    def pod_table(self, pods: list[dict[str, Any]], include: str) -> dict[str, Any]:
        cols = [("Name", "string", 0), ("Ready", "string", 0), ("Status", "string", 0),
                ("Restarts", "string", 0), ("Age", "string", 0), ("IP", "string", 1),
                ("Node", "string", 1), ("Nominated Node", "string", 1), ("Readiness Gates", "string", 1)]
        rows = []
        for p in pods:
            row: dict[str, Any] = {"cells": [
                p["metadata"]["name"], "1/1", "Running", 0, _age(self.born), p["status"]["podIP"],
                p["spec"]["nodeName"], "<none>", "<none>"]}
            if include == "Object":
                row["object"] = p
            elif include != "None":
                row["object"] = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                 "metadata": p["metadata"]}
            rows.append(row)
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1",
                "metadata": {"resourceVersion": str(self.rv)},
                "columnDefinitions": [{"name": n, "type": t, "format": "name" if n == "Name" else "",
                                       "description": n, "priority": pr} for n, t, pr in cols],
                "rows": rows}


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "details": {}, "code": code}


_RESOURCES = [("pods", "Pod", True, ["get", "list", "watch"], ["po"]),
              ("pods/log", "Pod", True, ["get"], []),
              ("pods/exec", "PodExecOptions", True, ["create", "get"], []),
              ("pods/attach", "PodAttachOptions", True, ["create", "get"], []),
              ("pods/portforward", "PodPortForwardOptions", True, ["create", "get"], []),
              ("namespaces", "Namespace", False, ["get", "list"], ["ns"]),
              ("configmaps", "ConfigMap", True, ["get", "list"], ["cm"]),
              ("nodes", "Node", False, ["get", "list"], ["no"])]
_API_RESOURCES = {
    "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1",
    "resources": [{"name": n, "singularName": "" if "/" in n else k.lower(), "namespaced": ns,
                   "kind": k, "verbs": v, **({"shortNames": s} if s else {})}
                  for n, k, ns, v, s in _RESOURCES],
}
_VERSION = {"major": "1", "minor": "30", "gitVersion": K3S_VERSION,
            "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
            "buildDate": "2024-10-24T00:00:00Z", "goVersion": "go1.22.8", "compiler": "gc",
            "platform": "linux/amd64"}



class _Exchange:
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

    async def stream_until(self, ctype: str, source: AsyncGenerator[bytes, None], seconds: float) -> None:
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


class _Handler:
    """Routes requests of one connection to the fake cluster."""

    def __init__(self, cluster: _Cluster, ex: _Exchange) -> None:
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
        if (len(parts) == 7 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "pods"
                and parts[6] in ("exec", "attach")):
            return await self.exec(req, parts[5], parts[6], parse_qs(url.query))
        if (len(parts) == 7 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "pods"
                and parts[6] == "portforward"):
            return await self.port_forward(req, parts[5])
        if method != "GET":
            return await self.ex.respond_json(405, _status(405, "MethodNotAllowed",
                                                           f"method {method} is not allowed"))
        if parts == ["kins-standin", "blob"]:
            return await self.blob(query)
        static = {"version": _VERSION, "api": {
            "kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:6443"}]},
            "api/v1": _API_RESOURCES,
            "apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": []}}
        if "/".join(parts) in static:
            return await self.ex.respond_json(200, static["/".join(parts)])
        if parts in (["api", "v1", "pods"], ["api", "v1", "configmaps"]):
            parts = ["api", "v1", "namespaces", "default", parts[2]]  # all namespaces: only one
        if len(parts) >= 5 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "pods":
            return await self.pods(parts[3], parts[5:], query, "as=Table" in accept)
        if parts in (["api", "v1", "namespaces"], ["api", "v1", "nodes"]) or (
                len(parts) == 5 and parts[:3] == ["api", "v1", "namespaces"]
                and parts[4] == "configmaps"):
            return await self.ex.respond_json(200, self.cluster.simple_list(parts[-1]))
        await self.ex.respond_json(404, _status(404, "NotFound",
                                                "the server could not find the requested resource"))

    async def pods(self, ns: str, rest: list[str], query: dict[str, str], table: bool) -> None:
        c = self.cluster
        names = [name for name, _, _ in c.pods]
        if rest and rest[0] not in names:
            return await self.ex.respond_json(404, _status(404, "NotFound",
                                                           f'pods "{rest[0]}" not found'))
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
                return await self.ex.respond_json(400, _status(
                    400, "BadRequest", "timeoutSeconds must be a non-negative integer"))
            limit = int(seconds) if seconds else float("inf")
            c.stats.watches += 1
            try:
                return await self.ex.stream_until(JSON, self.watch_events(ns, table, include), limit)
            finally:
                c.stats.watches -= 1
        body = c.pod_table(c.pod_list(ns)["items"], include) if table else c.pod_list(ns)
        await self.ex.respond_json(200, body)

    async def exec(self, req: h11.Request, pod: str, verb: str, query: dict[str, list[str]]) -> None:
        """`kubectl exec` / `attach` (and `cp`, which runs tar through exec)."""
        names = [name for name, _, _ in self.cluster.pods]
        if pod not in names:
            return await self.ex.respond_json(404, _status(404, "NotFound", f'pods "{pod}" not found'))
        if not is_websocket_upgrade(req.headers):
            spdy = any(k == b"upgrade" and v.lower().startswith(b"spdy/") for k, v in req.headers)
            message = ("the K3s API stand-in speaks the WebSocket remote-command protocol "
                       "(v5.channel.k8s.io, v4.channel.k8s.io), not SPDY" if spdy else
                       "Upgrade request required")
            return await self.ex.respond_json(400, _status(400, "BadRequest", message))
        if req.method != b"GET":
            return await self.ex.respond_json(405, _status(
                405, "MethodNotAllowed", "a WebSocket upgrade must be a GET"))
        options = ExecOptions.from_query(query)
        if verb == "attach":  # the pod's main process: the interactive line echo
            options = ExecOptions(("cat",), options.stdin, options.stdout, options.stderr,
                                  options.tty, options.container)
        elif not options.command:
            return await self.ex.respond_json(400, _status(
                400, "BadRequest", "you must specify at least 1 command"))
        if not (options.stdin or options.stdout or options.stderr):
            return await self.ex.respond_json(400, _status(
                400, "BadRequest", "you must specify at least 1 of stdin, stdout, stderr"))
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
            await serve_remote_command(self.ex.stream, req.target, list(req.headers),
                                       bytes(trailing), options, run)
        except UpgradeRefused as exc:
            self.upgraded = False
            await self.ex.respond_json(400, _status(400, "BadRequest", str(exc)))
        finally:
            self.cluster.stats.execs -= 1

    async def port_forward(self, req: h11.Request, pod: str) -> None:
        """`kubectl port-forward`: SPDY/3.1, plain or inside a WebSocket (see `portforward`)."""
        if pod not in [name for name, _, _ in self.cluster.pods]:
            return await self.ex.respond_json(404, _status(404, "NotFound", f'pods "{pod}" not found'))
        websocket = is_websocket_upgrade(req.headers)
        spdy = any(k == b"upgrade" and v.lower() == b"spdy/3.1" for k, v in req.headers)
        if not (websocket and req.method == b"GET") and not (spdy and req.method == b"POST"):
            return await self.ex.respond_json(400, _status(400, "BadRequest", "Upgrade request required"))
        if spdy and not any(k == b"x-stream-protocol-version" and v == b"portforward.k8s.io"
                            for k, v in req.headers):
            return await self.ex.respond_json(403, _status(
                403, "Forbidden", "port-forward speaks only portforward.k8s.io"))
        while not isinstance(event := await self.ex.next_event(), h11.EndOfMessage):
            if not isinstance(event, h11.Data):
                raise trio.BrokenResourceError("port-forward request cut short")
        trailing = bytes(self.ex.conn.trailing_data[0])
        self.upgraded = True
        self.cluster.stats.execs += 1
        try:
            if websocket:
                try:
                    ws, _ = await accept_websocket(self.ex.stream, req.target, list(req.headers),
                                                   trailing, [PORT_FORWARD_WEBSOCKET])
                except UpgradeRefused as exc:
                    self.upgraded = False
                    return await self.ex.respond_json(400, _status(400, "BadRequest", str(exc)))
                transport: Any = WebSocketTransport(self.ex.stream, ws)
            else:
                with trio.fail_after(WRITE_TIMEOUT):
                    await self.ex.stream.send_all(
                        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                        b"Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: portforward.k8s.io\r\n\r\n")
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
            return await self.ex.respond_json(400, _status(
                400, "BadRequest", f"bytes must be an integer from 0 to {MAX_BLOB}, seed an integer"))
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



_CONNECTION_ENDED = (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
                     h11.ProtocolError, WebSocketProtocolError, SpdyProtocolError, ssl.SSLError,
                     OSError)


async def _serve_connection(cluster: _Cluster, stream: trio.abc.Stream) -> None:
    handler = _Handler(cluster, _Exchange(stream))
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
        ssl_listeners = [trio.SSLListener(lst, ssl_context, https_compatible=True)
                         for lst in listeners]
        handler = functools.partial(_serve_connection, cluster)
        task_status.started(bound)
        await trio.serve_listeners(handler, ssl_listeners)
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """``python -m kins_tunnel.testing.k3s_standin``: run the stand-in on its own (benchmarks)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kins_tunnel.testing.k3s_standin",
                                     description="K3s API stand-in (a test double) over HTTPS")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--dir", required=True, help="where its certificate and key are written")
    parser.add_argument("--sandbox", help="directory for exec and cp (default: a temporary one)")
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args(argv)
    ctx, cert = make_self_signed_server_context(args.dir)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(functools.partial(
                serve_k3s_standin, ctx, host=args.host, port=args.port, interval=args.interval,
                sandbox=Path(args.sandbox) if args.sandbox else None))
            print(f"k3s stand-in listening on {args.host}:{port}, certificate {cert}", flush=True)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
