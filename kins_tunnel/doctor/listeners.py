"""Listen addresses in a config: each can be bound, or is held by the running process of that
config, as its admin ``/readyz`` shows."""

from __future__ import annotations

import errno
import urllib.error
import urllib.request
from collections.abc import Sequence

import trio

from kins_tunnel.doctor.report import FAIL, OK, Check, said
from kins_tunnel.names import Address
from kins_tunnel.transport.errors import SetupError
from kins_tunnel.transport.listen import open_listener_socket


async def check_listeners(
    who: str, listeners: Sequence[tuple[str, Address]], admin: Address | None, timeout: float
) -> list[Check]:
    """Each listen address (config key, address) can be bound; one in use is fine when the
    running `who` ("cloud", "edge") of this config holds it, as its admin /readyz shows."""
    errors: dict[str, SetupError | None] = {}  # key -> why it cannot be bound (None: in use)
    for key, addr in listeners:
        try:
            open_listener_socket(addr.host, addr.port, key).close()
        except SetupError as exc:
            cause = exc.__cause__
            taken = isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE
            errors[key] = None if taken else exc
    any_taken = None in errors.values()
    ready = await _readyz(admin, timeout) if any_taken and admin is not None else None
    out = []
    for key, addr in listeners:
        if key not in errors:
            out.append(Check(key, OK, f"{addr} can be bound"))
        elif (error := errors[key]) is not None:
            out.append(Check(key, FAIL, str(error), "use an address of this host"))
        elif ready is not None:
            out.append(Check(key, OK, f"{addr} is in use by the running {who}"))
        else:
            out.append(
                Check(
                    key,
                    FAIL,
                    f"{addr} is in use by another program (no {who} admin /readyz answers"
                    + (f" at {admin})" if admin is not None else ": admin is off)"),
                    "stop the other program or choose another port",
                )
            )
    if ready is not None:
        status, body = ready
        out.append(
            Check(
                f"running {who}",
                OK if status == 200 else FAIL,
                f"admin /readyz at {admin} answers {status} {said(body.strip())}",
                "" if status == 200 else f"see the {who}'s log",
            )
        )
    return out


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never $http_proxy


async def _readyz(admin: Address, timeout: float) -> tuple[int, str] | None:
    """(status, body) of GET /readyz at `admin` if a kins-tunnel admin endpoint answers it,
    else None."""
    wildcard = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}
    url = f"http://{Address(wildcard.get(admin.host, admin.host), admin.port)}/readyz"

    def get() -> tuple[int, str] | None:
        try:
            with _NO_PROXY.open(url, timeout=timeout) as resp:
                return resp.status, resp.read(200).decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(200).decode("utf-8", "replace")
        except (urllib.error.URLError, OSError, ValueError):
            return None

    with trio.move_on_after(timeout + 1):
        answer = await trio.to_thread.run_sync(get, abandon_on_cancel=True)
        if answer is not None and answer in _OURS:
            return answer
    return None


# what a kins-tunnel admin endpoint answers on /readyz (admin.py, Cloud and Edge `not_ready`):
# anything else holding the port is another program
_OURS = {(200, "ready\n"), (503, "not ready\n"), (503, "no tunnel\n")}
