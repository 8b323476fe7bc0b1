"""What a session reports of itself (`Session.statistics()`): a frozen record that metrics and
`/status` read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kins_tunnel.proto import Connection


@dataclass(frozen=True, slots=True)
class SessionStatistics:
    streams: int
    bytes_sent: int
    bytes_received: int
    rtt: float | None
    buffered: int
    output_queued: int
    stalls: int  # times a sender waited for peer credit or socket space
    # pacing of our sending direction (see `proto.pacer`); None: not measured / not paced
    base_rtt: float | None = None  # minimum round trip of the delay stamps
    queueing_delay: float | None = None  # what our direction's queues add now
    paced_rate: float | None = None  # bytes/s bulk data may go at (None: not paced)
    paced_held: int = 0  # bytes of bulk data waiting for the pacer's credit
    pacing: str = "off"  # "off" (configured, or the peer lacks it), "measuring", "engaged"
    pacing_engagements: int = 0  # times pacing engaged on this tunnel

    @classmethod
    def of(
        cls, conn: Connection, streams: int, rtt: float | None, transport_pending: int, stalls: int
    ) -> SessionStatistics:
        """The record of a session over `conn` (`transport_pending`: bytes its transport holds)."""
        st = conn.statistics()
        p = st.pacer
        return cls(
            streams=streams,
            bytes_sent=st.bytes_sent,
            bytes_received=st.bytes_received,
            rtt=rtt,
            buffered=st.buffered,
            output_queued=conn.pending_output() + transport_pending,
            stalls=stalls,
            base_rtt=None if p is None else p.base_rtt,
            queueing_delay=None if p is None else p.queueing_delay,
            paced_rate=None if p is None else p.rate,
            paced_held=st.held,
            pacing_engagements=0 if p is None else p.engagements,
            pacing=(
                "off"
                if p is None or (not p.engaged and "delay" not in conn.capabilities)
                else "engaged"
                if p.engaged
                else "measuring"
            ),
        )

    def qos_status(self) -> dict[str, object]:
        """The pacing fields of a `/status` tunnel entry."""
        return {
            "pacing": self.pacing,
            "queue_delay_ms": _ms(self.queueing_delay),
            "base_rtt_ms": _ms(self.base_rtt),
            "paced_rate_bps": None if self.paced_rate is None else round(self.paced_rate * 8),
            "paced_held_bytes": self.paced_held,
            "output_queued_bytes": self.output_queued,
            "pacing_engagements": self.pacing_engagements,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
