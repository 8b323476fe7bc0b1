"""The handshake: what each side states in its HELLO, and the limits both sides configure.

Both sides send HELLO at once: magic, the range of protocol versions spoken, then a JSON object
(capabilities, names served, agent, and the receiver-side limits max_frame / max_streams /
max_target_len). The version used is the highest both speak; capabilities are the intersection;
unknown JSON keys are ignored, so a later version can state more without breaking this one.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

from kins_tunnel.proto.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from kins_tunnel.proto.frames import (
    HELLO_PREFIX,
    MAGIC,
    MAX_CONTROL_PAYLOAD,
    MAX_PAYLOAD_LIMIT,
    MAX_WINDOW_VALUE,
)

PROTOCOL_VERSION = 1
MIN_SUPPORTED_VERSION = 1
CAPABILITIES = frozenset({"names", "goaway-reason", "window-growth"})


class Role(enum.Enum):
    CLIENT = "client"  # dialled the connection (edge): odd stream ids
    SERVER = "server"  # accepted it (cloud): even stream ids


@dataclass(frozen=True, slots=True)
class MuxConfig:
    """Limits and windows of one side; see `kins_tunnel.config.MuxSettings` for the YAML keys."""

    initial_window: int = 256 * 1024
    max_window: int = 16 * 1024 * 1024
    session_budget: int = 64 * 1024 * 1024
    max_streams: int = 1024
    max_frame: int = 256 * 1024
    max_target_len: int = 512
    max_names: int = 256

    def __post_init__(self) -> None:
        if not (16 * 1024 <= self.max_frame <= MAX_PAYLOAD_LIMIT):
            raise ValueError("max_frame must be between 16 KiB and 16 MiB")
        if not (0 < self.initial_window <= self.max_window <= MAX_WINDOW_VALUE):
            raise ValueError("need 0 < initial_window <= max_window < 2 GiB")
        if self.session_budget < self.initial_window:
            raise ValueError("session_budget must be at least initial_window")
        if self.max_streams < 1:
            raise ValueError("max_streams must be at least 1")


@dataclass(frozen=True, slots=True)
class Hello:
    """What this side says about itself in its HELLO (identity comes from TLS, not from here)."""

    names: tuple[str, ...] = ()
    agent: str = "kins-tunnel"
    capabilities: frozenset[str] = CAPABILITIES
    min_version: int = MIN_SUPPORTED_VERSION
    max_version: int = PROTOCOL_VERSION


@dataclass(slots=True)
class PeerLimits:
    """What the peer's HELLO said about its limits and names."""

    max_frame: int = 16 * 1024
    max_streams: int = 1
    max_target_len: int = 255
    names: tuple[str, ...] = ()
    goaway_last: int | None = None  # the peer sent GOAWAY: we may not open above this


def encode_hello(hello: Hello, config: MuxConfig) -> bytes:
    body = {
        "capabilities": sorted(hello.capabilities),
        "names": list(hello.names),
        "agent": hello.agent,
        "max_frame": config.max_frame,
        "max_streams": config.max_streams,
        "max_target_len": config.max_target_len,
    }
    payload = HELLO_PREFIX.pack(MAGIC, hello.min_version, hello.max_version) + json.dumps(
        body, separators=(",", ":")
    ).encode()
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise LocalProtocolError("HELLO too large: too many or too long names")
    return payload


def parse_hello(body: memoryview, ours: Hello, config: MuxConfig) -> tuple[int, frozenset[str], PeerLimits, str]:
    """(version, peer capabilities, peer limits, agent) of a HELLO body; RemoteProtocolError if bad."""
    if len(body) < HELLO_PREFIX.size:
        raise RemoteProtocolError("HELLO too short")
    magic, vmin, vmax = HELLO_PREFIX.unpack_from(body)
    if magic != MAGIC:
        raise RemoteProtocolError("not a kins-tunnel peer (bad magic)")
    version = min(vmax, ours.max_version)
    if version < max(vmin, ours.min_version):
        raise RemoteProtocolError(
            f"no common protocol version: peer speaks {vmin}..{vmax}, "
            f"we speak {ours.min_version}..{ours.max_version}",
            ErrorCode.VERSION_MISMATCH,
        )
    try:
        info = json.loads(bytes(body[HELLO_PREFIX.size :]))
        caps = info.get("capabilities", [])
        names = info.get("names", [])
        agent = info.get("agent", "")
        max_frame = info["max_frame"]
        max_streams = info["max_streams"]
        max_target = info.get("max_target_len", 255)
        ok = (
            isinstance(caps, list)
            and all(isinstance(c, str) for c in caps)
            and isinstance(names, list)
            and all(isinstance(n, str) and 0 < len(n) <= 512 for n in names)
            and isinstance(agent, str)
            and all(type(v) is int for v in (max_frame, max_streams, max_target))
        )
    except (ValueError, AttributeError, KeyError, TypeError):
        ok = False
    if not ok:
        raise RemoteProtocolError("malformed HELLO body")
    if len(names) > config.max_names:
        raise RemoteProtocolError(f"peer advertises {len(names)} names, limit {config.max_names}")
    if not (16 * 1024 <= max_frame <= MAX_PAYLOAD_LIMIT) or max_streams < 1 or max_target < 1:
        raise RemoteProtocolError("HELLO limits out of range")
    peer = PeerLimits(max_frame=max_frame, max_streams=max_streams, max_target_len=max_target,
                      names=tuple(dict.fromkeys(names)))
    return version, frozenset(caps), peer, agent[:200]
