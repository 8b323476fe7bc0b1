"""The handshake: what each side states in its HELLO, and the limits both sides configure.

Both sides send HELLO at once: magic, the range of protocol versions spoken, then a JSON object
(capabilities, names served, agent, and the receiver-side limits max_frame / max_streams /
max_target_len; optionally ``time``, the sender's wall clock in Unix seconds when it sent the
HELLO, which `kins-tunnel doctor` compares with its own to measure clock skew). The version used
is the highest both speak; capabilities are the intersection; unknown JSON keys are ignored, so a
later version can state more without breaking this one.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import ClassVar

from kins_tunnel.proto.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from kins_tunnel.proto.flow import MIN_WINDOW
from kins_tunnel.proto.frames import (
    HELLO_PREFIX,
    MAGIC,
    MAX_CONTROL_PAYLOAD,
    MAX_PAYLOAD_LIMIT,
    MAX_WINDOW_VALUE,
)

PROTOCOL_VERSION = 1
MIN_SUPPORTED_VERSION = 1
CAPABILITIES = frozenset({"names", "goaway-reason", "window-growth", "delay"})


class Role(enum.Enum):
    CLIENT = "client"  # dialled the connection (edge): odd stream ids
    SERVER = "server"  # accepted it (cloud): even stream ids


class LimitError(ValueError):
    """A `MuxConfig` value out of range; `key` names the field (the config file's `mux.<key>`)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


# The bounds of every limit, defined here once: the config loader and the handshake both use them.
MIN_FRAME = 16 * 1024
MAX_STREAMS_LIMIT = 65536
MAX_TARGET_LEN_LIMIT = 4096
MAX_NAMES_LIMIT = 4096
MAX_SESSION_BUDGET = 1 << 40  # bytes of receive buffering a session may grant in all
MAX_NAME_LEN = 512  # bytes of one advertised name
MAX_AGENT_LEN = 200  # characters of the peer's agent string kept


@dataclass(frozen=True, slots=True)
class MuxConfig:
    """Limits and windows of one side (the `mux:` section of cloud.yaml and edge.yaml).

    Constructing one validates every bound and raises `LimitError` naming the field, so a value
    the core cannot run with is refused where it is read, never at the first handshake.
    """

    initial_window: int = 256 * 1024
    max_window: int = 16 * 1024 * 1024
    session_budget: int = 64 * 1024 * 1024
    max_streams: int = 1024
    max_frame: int = 256 * 1024  # largest DATA payload we accept (and send, if the peer allows)
    max_target_len: int = 512
    max_names: int = 256

    # yamlcheck leaves the ranges of these fields to `validate_setting` (no generic "at least 1")
    VALIDATES_BOUNDS: ClassVar[bool] = True

    def __post_init__(self) -> None:
        for key in _BOUNDS:
            validate_setting(key, getattr(self, key), self)


# key -> (lowest value and how it reads, highest value): one entry per limit. `None` as the lowest
# value means "initial_window": the windows of one config are checked against each other.
_BOUNDS: dict[str, tuple[int | None, str, int]] = {
    "initial_window": (MIN_WINDOW, "16384 (16 KiB)", MAX_WINDOW_VALUE),
    "max_window": (None, "initial_window", MAX_WINDOW_VALUE),
    "session_budget": (None, "initial_window", MAX_SESSION_BUDGET),
    "max_streams": (1, "1", MAX_STREAMS_LIMIT),
    "max_frame": (MIN_FRAME, "16384 (16 KiB)", MAX_PAYLOAD_LIMIT),
    "max_target_len": (1, "1", MAX_TARGET_LEN_LIMIT),
    "max_names": (0, "0", MAX_NAMES_LIMIT),
}


def validate_setting(key: str, value: object, config: MuxConfig | None = None) -> int:
    """The one check of a limit, wherever it comes from: a config file (`mux:`), a `MuxConfig`
    built in code, or the peer's HELLO (`max_frame`, `max_streams`, `max_target_len`), as h2's
    `_validate_setting`. Returns the value; raises `LimitError` naming `key`."""
    low, low_text, high = _BOUNDS[key]
    if low is None:
        low = config.initial_window if config is not None else MIN_WINDOW
        low_text = f"initial_window ({low})"
    if type(value) is not int:
        raise LimitError(key, f"must be an integer, got {value!r}")
    if value < low:
        raise LimitError(key, f"must be at least {low_text}, got {value}")
    if value > high:
        raise LimitError(key, f"must be at most {high}, got {value}")
    return value


@dataclass(frozen=True, slots=True)
class Hello:
    """What this side says about itself in its HELLO (identity comes from TLS, not from here)."""

    names: tuple[str, ...] = ()
    agent: str = "kins-tunnel"
    capabilities: frozenset[str] = CAPABILITIES
    min_version: int = MIN_SUPPORTED_VERSION
    max_version: int = PROTOCOL_VERSION
    time: float | None = None  # the sender's wall clock (Unix seconds); None: not stated
    # seconds of silence after which the sender pings an idle tunnel; None: not stated
    idle_ping: float | None = None


@dataclass(slots=True)
class PeerLimits:
    """What the peer's HELLO said about its limits and names."""

    max_frame: int = 16 * 1024
    max_streams: int = 1
    max_target_len: int = 255
    names: tuple[str, ...] = ()
    time: float | None = None  # the peer's wall clock when it sent HELLO, if it stated it
    idle_ping: float | None = None  # the peer pings an idle tunnel after this silence, if stated
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
    if hello.time is not None:
        body["time"] = round(hello.time, 3)
    if hello.idle_ping is not None:
        body["idle_ping"] = round(hello.idle_ping, 3)
    payload = (
        HELLO_PREFIX.pack(MAGIC, hello.min_version, hello.max_version)
        + json.dumps(body, separators=(",", ":")).encode()
    )
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise LocalProtocolError("HELLO too large: too many or too long names")
    return payload


def parse_hello(
    body: memoryview, ours: Hello, config: MuxConfig
) -> tuple[int, frozenset[str], PeerLimits, str]:
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
            and all(isinstance(n, str) and 0 < len(n) <= MAX_NAME_LEN for n in names)
            and isinstance(agent, str)
            and all(type(v) is int for v in (max_frame, max_streams, max_target))
        )
    except (ValueError, AttributeError, KeyError, TypeError):
        ok = False
    if not ok:
        raise RemoteProtocolError("malformed HELLO body")
    if len(names) > config.max_names:
        raise RemoteProtocolError(f"peer advertises {len(names)} names, limit {config.max_names}")
    try:
        for key, value in (
            ("max_frame", max_frame),
            ("max_streams", max_streams),
            ("max_target_len", max_target),
        ):
            validate_setting(key, value)
    except LimitError as exc:
        raise RemoteProtocolError(
            f"HELLO limits out of range (max_frame {max_frame}, max_streams {max_streams}, "
            f"max_target_len {max_target}): {exc.key} {exc}",
            ErrorCode.PROTOCOL_ERROR,
        ) from None
    peer = PeerLimits(
        max_frame=max_frame,
        max_streams=max_streams,
        max_target_len=max_target,
        names=tuple(dict.fromkeys(names)),
        time=_stated_time(info.get("time")),
        idle_ping=_stated_interval(info.get("idle_ping")),
    )
    return version, frozenset(caps), peer, agent[:MAX_AGENT_LEN]


def _stated_interval(value: object) -> float | None:
    """A peer's ``idle_ping``: a finite number of seconds in (0, 1e9], else (absent, malformed)
    None (the peer is then assumed to ping as this side does)."""
    if type(value) not in (int, float):
        return None
    seconds = float(value)  # type: ignore[arg-type]
    return seconds if 0 < seconds <= 1e9 else None  # also refuses nan and inf


def _stated_time(value: object) -> float | None:
    """A peer's ``time``: a finite number of Unix seconds, else (absent, malformed) None."""
    if type(value) not in (int, float):
        return None
    seconds = float(value)  # type: ignore[arg-type]
    return seconds if 0 <= seconds < 1e11 else None  # also refuses nan and inf
