"""Rates and durations as operators write them in config files: ``10Mbit``, ``5MB``, ``25ms``.

Rates are per second (an optional ``/s`` suffix is accepted): ``bit``/``kbit``/``Mbit``/``Gbit``
(decimal, bits), ``B``/``kB``/``MB``/``GB`` (decimal, bytes) and ``KiB``/``MiB``/``GiB`` (binary,
bytes); a bare number is bytes per second. Durations are a number of seconds or a string with
``ms`` or ``s``. Units are case-sensitive where case means something (``Mbit`` vs ``MB``), and
everything else (zero, negative, not finite, unknown unit) is refused with a `ValueError` whose
message fits in a one-line config error.
"""

from __future__ import annotations

import math
import re

_RATE_UNITS = {
    "bit": 1 / 8,
    "kbit": 1e3 / 8,
    "Kbit": 1e3 / 8,
    "Mbit": 1e6 / 8,
    "mbit": 1e6 / 8,
    "Gbit": 1e9 / 8,
    "gbit": 1e9 / 8,
    "B": 1.0,
    "kB": 1e3,
    "KB": 1e3,
    "MB": 1e6,
    "GB": 1e9,
    "KiB": 1024.0,
    "MiB": 1024.0**2,
    "GiB": 1024.0**3,
}
_DURATION_UNITS = {"ms": 1e-3, "s": 1.0}
_QUANTITY = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)(?:/s)?\s*")
RATE_HELP = 'a rate such as "10Mbit", "5MB" or "512KiB" (per second)'
DURATION_HELP = 'a duration in seconds, or a string such as "25ms"'


def _number(value: object, units: dict[str, float], default_unit: str, help_text: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected {help_text}, got {value!r}")
    if isinstance(value, int | float):
        number, scale = float(value), units[default_unit]
    elif isinstance(value, str):
        m = _QUANTITY.fullmatch(value)
        if m is None or (m.group(2) or default_unit) not in units:
            raise ValueError(f"expected {help_text}, got {value[:40]!r}")
        number, scale = float(m.group(1)), units[m.group(2) or default_unit]
    else:
        raise ValueError(f"expected {help_text}, got {type(value).__name__}")
    result = number * scale
    if not math.isfinite(result) or result <= 0:
        raise ValueError(f"must be greater than 0, got {value!r}")
    return result


def parse_rate(value: object) -> float:
    """Bytes per second."""
    return _number(value, _RATE_UNITS, "B", RATE_HELP)


def parse_duration(value: object) -> float:
    """Seconds."""
    return _number(value, _DURATION_UNITS, "s", DURATION_HELP)


def format_rate(rate: float) -> str:
    """Bytes per second as Mbit/s, for status lines."""
    return f"{rate * 8 / 1e6:.1f} Mbit/s"
