"""The tunnel's TLS contexts as OpenSSL sees them: an idle connection must not keep its record
buffers (about 34 KiB per connection, measured: 60 KiB of OpenSSL state per cloud-side
connection without `SSL_MODE_RELEASE_BUFFERS`, 28 KiB with it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kins_tunnel import tls_tickets
from kins_tunnel.tls_contexts import client_ssl_context, server_ssl_context
from tests.e2e.harness import make_certs

_SSL_CTRL_MODE = 33
_SSL_MODE_RELEASE_BUFFERS = 0x10


@pytest.mark.parametrize("side", ["cloud", "cloud with tickets", "edge"])
def test_tunnel_contexts_release_idle_record_buffers(tmp_path: Path, side: str) -> None:
    """CPython sets SSL_MODE_RELEASE_BUFFERS on every context it makes (read back from OpenSSL
    here): the idle-memory figures in benchmarks/README.md rely on it."""
    certs = make_certs(tmp_path)
    if side == "edge":
        ctx = client_ssl_context(
            certs / "ca.crt", certs / "edge-edge1.crt", certs / "edge-edge1.key"
        )
    else:
        ctx = server_ssl_context(
            certs / "ca.crt",
            certs / "cloud.crt",
            certs / "cloud.key",
            session_lifetime=3600.0 if "tickets" in side else 0.0,
        )
    lib = tls_tickets._libssl()
    ptr = None if lib is None else tls_tickets._ssl_ctx_pointer(ctx, lib)
    if lib is None or ptr is None:
        pytest.skip("OpenSSL's SSL_CTX is not reachable from this Python")
    mode = lib.SSL_CTX_ctrl(ptr, _SSL_CTRL_MODE, 0, None)
    assert mode & _SSL_MODE_RELEASE_BUFFERS, hex(mode)
