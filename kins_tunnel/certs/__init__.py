"""Certificates: everything that touches X.509, with ``cryptography``; no network I/O here (the TLS
contexts built from these files are in `tls_contexts`).

- `identity`: who an edge certificate names (the one ``spiffe://kins-tunnel/...`` URI), name rules,
  what the cloud records of a peer certificate, and the names of the tunnel's TLS protocols.
- `signing`: the X.509 building blocks (CA, leaf, validity, key usages, loading a CA).
- `directory`: a certificate directory, as ``kins-tunnel certs init/edge/user`` writes it.
- `proxy_ca`: the proxy CA's name constraints.
- `issuing`: the issuing CA with which the cloud signs edge certificates at enrolment and renewal.

Layout of a certificate directory (``kins-tunnel certs init/edge --dir DIR``)::

    ca.crt    ca.key      the private CA (ECDSA P-256, self-signed, path length 0)
    cloud.crt cloud.key   the cloud's server certificate (serverAuth + clientAuth)
    edge-NODE.crt/.key    one client certificate per edge node (clientAuth only)
    proxy-ca.crt/.key     the proxy CA (``--proxy-san``): signs only the proxy's TLS certificate,
                          name-constrained (critical) to the proxy's names
    proxy.crt proxy.key   the proxy listener's certificate (``proxy.tls``), from the proxy CA
    issuing.crt/.key      the issuing CA (``--issuing-ca``): an intermediate under ca.crt (path
                          length 0, clientAuth only, name-constrained to ``spiffe://kins-tunnel``
                          URIs) with which the cloud signs edge certificates at enrolment and
                          renewal (`issuing.sign_edge_csr`), so ca.key never has to leave the operator

Import from the module that holds a name. The names below are also re-exported here, for the
tunnel runners (`edge.agent`, `cloud.tunnel_server`) that still import them from this package.
"""

from __future__ import annotations

from kins_tunnel.certs.identity import ENROLL_ALPN as ENROLL_ALPN
from kins_tunnel.certs.identity import EdgeIdentity as EdgeIdentity
from kins_tunnel.certs.identity import ReservedName as ReservedName
from kins_tunnel.certs.identity import identity_from_der as identity_from_der
