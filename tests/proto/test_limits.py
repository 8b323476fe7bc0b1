"""One validation per limit (`handshake.validate_setting`): a config file, a `MuxConfig` built in
code and the peer's HELLO meet the same bounds and the same words."""

from __future__ import annotations

from pathlib import Path

import pytest

from kins_tunnel.config import edge_config_from_dict
from kins_tunnel.errors import UserError
from kins_tunnel.proto import Connection, Hello, LimitError, MuxConfig, RemoteProtocolError, Role
from kins_tunnel.proto.frames import FrameType, frame
from kins_tunnel.proto.handshake import MAX_STREAMS_LIMIT, MAX_TARGET_LEN_LIMIT, validate_setting

EDGE = {
    "cloud": ["c:9000"],
    "tls": {"ca": "ca.crt", "cert": "e.crt", "key": "e.key"},
    "services": {"edge1:22": "127.0.0.1:22"},
}


def _hello_with(**limits: int) -> bytes:
    fields = {"max_frame": 16384, "max_streams": 4, "max_target_len": 255, **limits}
    body = (
        b'{"capabilities":[],"names":[],"agent":"x",'
        + ",".join(f'"{k}":{v}' for k, v in fields.items()).encode()
        + b"}"
    )
    prefix = bytes(Connection(Role.CLIENT).data_to_send()[9:17])  # magic and versions
    return frame(FrameType.HELLO, 0, prefix + body)


@pytest.mark.parametrize(
    ("key", "too_big"),
    [("max_streams", MAX_STREAMS_LIMIT + 1), ("max_target_len", MAX_TARGET_LEN_LIMIT + 1)],
)
def test_a_limit_has_one_bound_for_files_code_and_peers(key: str, too_big: int) -> None:
    with pytest.raises(LimitError) as in_code:
        MuxConfig(**{key: too_big})
    with pytest.raises(UserError) as in_file:
        edge_config_from_dict({**EDGE, "mux": {key: too_big}}, base_dir=Path("/"))
    assert f"mux.{key}: {in_code.value}" in str(in_file.value)
    with pytest.raises(RemoteProtocolError, match=f"{key} {in_code.value}"):
        Connection(Role.SERVER).receive_data(_hello_with(**{key: too_big}))
    # the bound itself is accepted everywhere
    bound = too_big - 1
    assert validate_setting(key, bound) == bound
    assert getattr(MuxConfig(**{key: bound}), key) == bound
    Connection(Role.SERVER, Hello()).receive_data(_hello_with(**{key: bound}))


def test_max_names_zero_is_valid_in_a_file_as_in_code() -> None:
    assert MuxConfig(max_names=0).max_names == 0
    cfg = edge_config_from_dict({**EDGE, "mux": {"max_names": 0}}, base_dir=Path("/"))
    assert cfg.mux.max_names == 0
