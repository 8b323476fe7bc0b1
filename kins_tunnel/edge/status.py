"""The edge's `/status` document: who it is, each tunnel (live ones and those draining after the
cloud's GOAWAY) with its pacing fields and the cloud certificate it validated, the uplinks, and the
enrolment state."""

from collections.abc import Mapping, Sequence

import trio

from kins_tunnel.certs import EdgeIdentity
from kins_tunnel.transport.session import Session


def status_document(
    who: EdgeIdentity,
    tunnels: Sequence[tuple[str, Session]],
    cloud_certs: Mapping[str, dict[str, object]],
    uplinks: object,
    certificate: object | None,
) -> dict[str, object]:
    """The document, from the tunnels as ("address", session) pairs."""
    now = trio.current_time()
    entries = [
        {
            "cloud": a,
            "uptime": round(now - s.started_at, 1),
            "rtt_ms": None if s.rtt is None else round(s.rtt * 1000, 3),
            "streams": (st := s.statistics()).streams,
            "draining": not s.usable,
            **st.qos_status(),
            **cloud_certs.get(a, {}),
        }
        for a, s in tunnels
    ]
    doc: dict[str, object] = {
        "unit": who.unit,
        "node": who.node,
        "tunnels": entries,
        "uplinks": uplinks,
    }
    if certificate is not None:
        doc["certificate"] = certificate
    return doc
