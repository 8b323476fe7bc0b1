"""Round-trip time from PING/PONG: the smoothed RTT (reported) and the minimum of recent samples
(the path's propagation delay, which sizes the flow-control windows; see `flow`)."""

from __future__ import annotations

RTT_SAMPLES = 16
MAX_OUTSTANDING = 64


class RttEstimator:
    __slots__ = ("srtt", "min_rtt", "_samples", "_sent", "_seq")

    def __init__(self) -> None:
        self.srtt: float | None = None
        self.min_rtt: float | None = None
        self._samples: list[float] = []  # the last RTT_SAMPLES (a deque would cost ~600 B)
        self._sent: dict[bytes, float | None] = {}
        self._seq = 0

    def next_payload(self) -> bytes:
        self._seq += 1
        return self._seq.to_bytes(8, "big")

    def sent(self, payload: bytes, now: float | None) -> None:
        if len(self._sent) >= MAX_OUTSTANDING:  # unanswered pings are not kept forever
            self._sent.pop(next(iter(self._sent)))
        self._sent[payload] = now

    def answered(self, payload: bytes, now: float | None) -> float | None:
        """The round trip of the ping with `payload` (None if unknown or no clock)."""
        sent = self._sent.pop(payload, None)
        if not self._sent:  # an emptied dict keeps its table: an idle tunnel's is let go
            self._sent = {}
        if sent is None or now is None:
            return None
        rtt = max(now - sent, 0.0)
        self.srtt = rtt if self.srtt is None else 0.875 * self.srtt + 0.125 * rtt
        samples = self._samples
        if len(samples) >= RTT_SAMPLES:
            del samples[0]
        samples.append(rtt)
        self.min_rtt = min(samples)
        return rtt
