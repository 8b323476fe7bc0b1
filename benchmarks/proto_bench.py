"""Micro-benchmark of the sans-IO core: DATA frames through encode -> decode -> consume.

    python -m benchmarks.proto_bench

No sockets, no TLS: this measures what the protocol core costs per byte and per frame, so it can be
compared with the tunnel's end-to-end figures (the core should never be the bottleneck). The output
goes from the sender to the receiver as the transport hands it over (`write_output`: views of the
sender's queue, no copy in between).
"""

from __future__ import annotations

import statistics
import time

from kins_tunnel.proto import Connection, Hello, MuxConfig, Role
from kins_tunnel.proto.events import DataReceived, Event


def _pair(cfg: MuxConfig) -> tuple[Connection, Connection, int]:
    c = Connection(Role.CLIENT, Hello(names=("b:1",)), cfg)
    s = Connection(Role.SERVER, Hello(), cfg)
    c.receive_data(s.data_to_send())
    s.receive_data(c.data_to_send())
    sid = s.open_stream("b:1")
    c.receive_data(s.data_to_send())
    c.accept_stream(sid)
    s.receive_data(c.data_to_send())
    return s, c, sid


def bulk(frame_size: int, total: int) -> float:
    """MB/s of `frame_size` DATA frames, `total` bytes, sender -> receiver -> consumed."""
    cfg = MuxConfig(
        max_frame=max(frame_size, 16 * 1024),
        initial_window=16 << 20,
        max_window=16 << 20,
        session_budget=64 << 20,
    )
    s, c, sid = _pair(cfg)
    payload = b"x" * frame_size
    batch = max(1, (1 << 20) // frame_size)  # ~1 MiB of frames per receive_data, like a big recv
    sent = 0
    events: list[Event] = []

    def deliver(view: memoryview) -> None:  # the transport's path: the output is handed over
        events.extend(c.receive_data(view))

    t0 = time.perf_counter()
    while sent < total:
        for _ in range(batch):
            s.send_data(sid, payload)
        sent += batch * frame_size
        s.write_output(deliver, 1 << 30)
        for e in events:
            if isinstance(e, DataReceived):
                c.consumed(sid, len(e.data))
        events.clear()
        back = c.data_to_send()
        if back:  # an empty buffer would mean EOF
            s.receive_data(back)
    dt = time.perf_counter() - t0
    return sent / dt / 1e6


def small_frames(n: int) -> float:
    """Frames/s of 64-byte DATA frames, 64 per batch."""
    s, c, sid = _pair(MuxConfig())
    payload = b"y" * 64
    t0 = time.perf_counter()
    done = 0
    events: list[Event] = []

    def deliver(view: memoryview) -> None:
        events.extend(c.receive_data(view))

    while done < n:
        for _ in range(64):
            s.send_data(sid, payload)
        s.write_output(deliver, 1 << 30)
        for e in events:
            if isinstance(e, DataReceived):
                c.consumed(sid, len(e.data))
        events.clear()
        back = c.data_to_send()
        if back:
            s.receive_data(back)
        done += 64
    return n / (time.perf_counter() - t0)


def main() -> None:
    rounds = 5
    big = [bulk(64 * 1024, 1 << 30) for _ in range(rounds)]
    mid = [bulk(16 * 1024, 256 << 20) for _ in range(rounds)]
    small = [small_frames(200_000) for _ in range(rounds)]
    print("| case | median | min | max |")
    print("| --- | --- | --- | --- |")
    print(
        f"| 64 KiB DATA frames, MB/s | {statistics.median(big):,.0f} | {min(big):,.0f} | {max(big):,.0f} |"
    )
    print(
        f"| 16 KiB DATA frames, MB/s | {statistics.median(mid):,.0f} | {min(mid):,.0f} | {max(mid):,.0f} |"
    )
    print(
        f"| 64 B DATA frames, frames/s | {statistics.median(small):,.0f} | {min(small):,.0f} | {max(small):,.0f} |"
    )


if __name__ == "__main__":
    main()
