"""What the session's reader does with each event of the protocol core (`Session._reader`).

The handlers run on the reader task, inside the dispatch of one read batch: they never await.
They move what the peer sent to the session's streams (`TunnelStream.deliver`, which copies what
it keeps: the events' data are views of the run's read buffer), answer the opens waiting in
`PendingOpens`, and set the session's peer-facing fields (names, RTT, draining). A handler that
raises on a stream's event ends that stream only (`Session._stream_event_failed`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kins_tunnel.proto import ErrorCode, code_text
from kins_tunnel.proto import events as ev
from kins_tunnel.transport.stream import TunnelStream

if TYPE_CHECKING:
    from kins_tunnel.transport.session import Session

log = logging.getLogger("kins_tunnel.session")


def on_data(session: Session, e: ev.DataReceived) -> None:
    s = session._streams.get(e.stream_id)
    if s is not None:
        s.deliver(e.data, False)
    else:  # closed by the application: like TCP, data after close aborts the stream
        session.conn.reset_stream(e.stream_id, ErrorCode.CANCEL, "stream closed")


def on_window(session: Session, e: ev.WindowUpdated) -> None:
    s = session._streams.get(e.stream_id)
    if s is not None:
        s.credit_arrived()


def on_end(session: Session, e: ev.StreamEnded) -> None:
    s = session._streams.get(e.stream_id)
    if s is not None:
        s.deliver(b"", True)


def on_stream_opened(session: Session, e: ev.StreamOpened) -> None:
    if session._on_open is None:
        session.conn.reject_stream(
            e.stream_id, ErrorCode.NOT_ALLOWED, "this side accepts no streams"
        )
    else:
        session._on_open(session, e.stream_id, e.target)


def on_open_result(session: Session, e: ev.OpenResult) -> None:
    if e.stream_id not in session._opens:
        if e.ok:
            session.conn.reset_stream(e.stream_id, ErrorCode.CANCEL, "open abandoned")
        return
    stream = None
    if e.ok:
        # Register the stream now, before the opener runs: data (or FIN) the target
        # sends first may follow in this very batch and must land in the stream.
        stream = session._streams[e.stream_id] = TunnelStream(session, e.stream_id)
    session._opens.answer(e, stream)


def on_reset(session: Session, e: ev.StreamReset) -> None:
    s = session._streams.pop(e.stream_id, None)
    if s is not None:
        s.broken(f"reset by peer: {e.message or code_text(e.code)}", e.code)
        session._stream_left()
    if e.stream_id in session._opens:
        session._opens.answer(ev.OpenResult(e.stream_id, e.code, e.message), None)


def on_pong(session: Session, e: ev.PongReceived) -> None:
    if e.rtt is not None:
        session.rtt = e.rtt


def on_handshake(session: Session, e: ev.HandshakeComplete) -> None:
    session.peer_names = e.names
    session.peer_agent = e.agent
    session.handshake_done.set()


def on_goaway(session: Session, e: ev.GoAwayReceived) -> None:
    session.draining = True
    session.goaway_received.set()
    log.info("%s: peer is draining (%s)", session.label, e.reason or "no reason")


def on_terminated(session: Session, e: ev.ConnectionTerminated) -> None:
    session.close_reason = e.reason


# event type -> handler: one lookup per event on the reader's path
HANDLERS: dict[type[ev.Event], Callable[[Session, Any], None]] = {
    ev.DataReceived: on_data,
    ev.WindowUpdated: on_window,
    ev.StreamEnded: on_end,
    ev.StreamOpened: on_stream_opened,
    ev.OpenResult: on_open_result,
    ev.StreamReset: on_reset,
    ev.PongReceived: on_pong,
    ev.HandshakeComplete: on_handshake,
    ev.GoAwayReceived: on_goaway,
    ev.ConnectionTerminated: on_terminated,
}
