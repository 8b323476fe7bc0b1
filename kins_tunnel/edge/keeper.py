"""What tunnel-edge remembers about one cloud address between its dials (`Keeper`).

One keeper per resolved cloud address (`edge.agent`): its cancel scope, whether the address left
DNS, the tunnel up now and the one draining after a GOAWAY, the cloud's retry-after hint, and the
cloud's TLS session ticket with the context it belongs to, so that the next dial resumes.

Tickets: a ticket is only offered with the context it was issued to (a renewed certificate makes
a new context, and the cloud must see the new certificate: a full handshake). A resumed tunnel
keeps the ticket it offered, which stays valid: in Python, reading a TLS 1.3 session copies it
(about 0.1 ms of CPU), so it is read only after a full handshake.
"""

from __future__ import annotations

import math
import ssl
from dataclasses import dataclass, field

import trio

from kins_tunnel.transport.session import Session
from kins_tunnel.transport.tls import TLSSocket


@dataclass(eq=False)
class Keeper:
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    retired: bool = False
    session: Session | None = None
    draining: Session | None = None  # the previous tunnel, finishing its streams after a GOAWAY
    replaced_at: float = -math.inf  # when a GOAWAY last made this keeper dial again at once
    # the cloud's session ticket and the context it belongs to: the next dial resumes with it
    tls_session: tuple[ssl.SSLContext, ssl.SSLSession] | None = None
    retry_after: float | None = None  # the cloud's hint in its refusal of the last tunnel

    def ticket_for(self, context: ssl.SSLContext) -> ssl.SSLSession | None:
        """The ticket to offer on a dial with `context` (none of an older context)."""
        held = self.tls_session
        return held[1] if held is not None and held[0] is context else None

    def keep_ticket(self, context: ssl.SSLContext, tls: TLSSocket) -> None:
        """After a tunnel over `tls` (dialled with `context`): keep the ticket the cloud issued
        after a full handshake (it came right after the handshake); a resumed one keeps its own."""
        issued = None if tls.session_reused else tls.session
        if issued is not None and issued.has_ticket:
            self.tls_session = (context, issued)
