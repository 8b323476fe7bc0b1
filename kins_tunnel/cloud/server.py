"""tunnel-cloud: runs the edge listener, the CONNECT proxy and the admin endpoint together.

`run_cloud` is what `kins-tunnel cloud` calls; tests and the demo start it in a nursery on port 0
and get the bound ports back from `task_status.started(CloudPorts)`. SIGTERM (see `cli`) cancels
it after `drain()`: listeners close first, every edge gets GOAWAY, streams finish up to
`drain_timeout`.
"""

from __future__ import annotations

import functools
import json
import logging
import socket
from dataclasses import dataclass

import trio

from kins_tunnel.admin import serve_admin, text
from kins_tunnel.certs import server_ssl_context
from kins_tunnel.certwatch import ReloadingContext
from kins_tunnel.cloud.auth import Authenticator
from kins_tunnel.cloud.proxy import ProxyContext, serve_proxy
from kins_tunnel.cloud.registry import Registry
from kins_tunnel.cloud.tunnel_server import TunnelServer
from kins_tunnel.config import CloudConfig
from kins_tunnel.metrics import Metrics

log = logging.getLogger("kins_tunnel.cloud")


@dataclass(frozen=True)
class CloudPorts:
    tunnel: int
    proxy: int
    admin: int


class Cloud:
    def __init__(self, cfg: CloudConfig) -> None:
        self.cfg = cfg
        self.replica = cfg.replica or socket.gethostname()
        self.registry = Registry()
        self.metrics = Metrics("cloud", self._snapshot, replica=self.replica)
        self.tls = ReloadingContext(server_ssl_context, cfg.tls.ca, cfg.tls.cert, cfg.tls.key, what="tls")
        self.tunnels = TunnelServer(cfg, self.tls, self.registry, self.metrics)
        auth = Authenticator(cfg.proxy.auth) if cfg.proxy.auth else None
        self.proxy = ProxyContext(cfg.proxy, self.registry, self.metrics, auth, replica=self.replica)
        self.ready = False

    def _snapshot(self):  # type: ignore[no-untyped-def]
        for t in self.registry:
            yield {"unit": t.identity.unit, "node": t.identity.node, "peer": t.peer}, t.session

    def status(self) -> tuple[int, str, bytes]:
        now = trio.current_time()
        edges = []
        for t in self.registry:
            st = t.session.statistics()
            edges.append({"unit": t.identity.unit, "node": t.identity.node, "peer": t.peer,
                          "replica": self.replica, "uptime": round(now - t.connected_at, 1),
                          "rtt_ms": None if st.rtt is None else round(st.rtt * 1000, 3),
                          "streams": st.streams, "bytes_sent": st.bytes_sent,
                          "bytes_received": st.bytes_received, "names": sorted(t.names),
                          "draining": t.session.draining})
        doc = {"replica": self.replica, "ready": self.ready, "tls_reloads": self.tls.reloads, "edges": edges}
        body = json.dumps(doc, indent=1).encode()
        return 200, "application/json", body

    async def run(self, *, task_status: trio.TaskStatus[CloudPorts] = trio.TASK_STATUS_IGNORED) -> None:
        routes = {
            "/healthz": lambda: text(200, "ok\n"),
            "/readyz": lambda: text(200, "ready\n") if self.ready else text(503, "not ready\n"),
            "/metrics": self.metrics.render,
            "/status": self.status,
        }
        async with trio.open_nursery() as nursery:
            tunnel_port = await nursery.start(self.tunnels.serve)
            proxy_port = await nursery.start(serve_proxy, self.proxy)
            admin_port = await nursery.start(functools.partial(
                serve_admin, self.cfg.admin.listen, routes, report=self.metrics.report_internal_error))
            self.ready = True
            log.info("tunnel-cloud up", extra={"replica": self.replica, "tunnel_port": tunnel_port,
                                               "proxy_port": proxy_port, "admin_port": admin_port})
            task_status.started(CloudPorts(tunnel_port, proxy_port, admin_port))

    async def drain(self) -> None:
        """Stop taking new edges and CONNECTs, ask every edge to drain, wait for streams to end."""
        self.ready = False
        self.tunnels.stop_listening()
        self.proxy.listener_scope.cancel()
        for t in self.registry:
            t.session.goaway("tunnel-cloud shutting down")
        with trio.move_on_after(self.cfg.tunnel.drain_timeout):
            while any(t.session.statistics().streams for t in self.registry):
                await trio.sleep(0.1)
        for t in self.registry:
            t.session.close("tunnel-cloud shut down")
