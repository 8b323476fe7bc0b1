"""The edge's descriptor budget: at start-up the open-file limit must cover every tunnel's streams
and every listener's `max_connections` (`check_open_files`)."""

import resource

from kins_tunnel.config import EdgeConfig
from kins_tunnel.errors import UserError

OPEN_FILES_RESERVE = 64  # descriptors for logs, certificate files, DNS, the listening sockets


def open_files_needed(cfg: EdgeConfig) -> int:
    """Descriptors the edge may hold at once under its configured limits: per tunnel its socket and
    one target socket per stream the cloud may open, plus every listener's connections."""
    need = cfg.max_tunnels * (1 + cfg.mux.max_streams) + OPEN_FILES_RESERVE
    if cfg.admin is not None:
        need += cfg.admin.max_connections
    need += sum(limits.max_connections for limits in cfg.uplink_limits.values())
    if cfg.uplink_proxy is not None:
        need += cfg.uplink_proxy.max_connections
    return need


def check_open_files(cfg: EdgeConfig) -> None:
    """Make sure RLIMIT_NOFILE covers `open_files_needed`: raise the soft limit up to the hard one
    if it must, else a one-line UserError naming the keys that set the need."""
    need = open_files_needed(cfg)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard == resource.RLIM_INFINITY or hard >= need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        return
    raise UserError(
        f"the open-file limit (RLIMIT_NOFILE: soft {soft}, hard {hard}) is below the {need} "
        f"descriptors this configuration may need (max_tunnels {cfg.max_tunnels} x (1 + "
        f"mux.max_streams {cfg.mux.max_streams}) + admin, uplink and uplink_proxy "
        f"max_connections + {OPEN_FILES_RESERVE}): raise the limit (ulimit -n) or lower those keys"
    )
