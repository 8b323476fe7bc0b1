"""Bridge from the YAML `mux` settings to the protocol core's `MuxConfig`."""

from kins_tunnel.config import MuxSettings
from kins_tunnel.proto import MuxConfig


def mux_config(s: MuxSettings) -> MuxConfig:
    return MuxConfig(
        initial_window=s.initial_window,
        max_window=s.max_window,
        session_budget=s.session_budget,
        max_streams=s.max_streams,
        max_frame=s.max_frame,
    )
