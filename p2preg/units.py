"""Human-readable sizes, rates and durations.

SIZE is bytes and RATE is bytes per second, both with binary units (``50MiB`` = 50 MiB/s).
Decimal suffixes (``kB``, ``MB``) are accepted too because operators type them, and mean powers of
1000 as they do everywhere else.
"""

from __future__ import annotations

import re

from p2preg.errors import ConfigError

_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*(?:/s)?\s*")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tib": 1024**4,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}
_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


# A decimal field of a header or a config value saturates here: no size, offset, count or
# delay of ours comes near it, and int() refuses strings past 4,300 digits.
DECIMAL_CAP = 10**18


def parse_decimal(text: str | None) -> int | None:
    """The value of an unsigned decimal field (a Content-Length, a Range position, a port):
    ASCII digits only, None for anything else (an absent header too), DECIMAL_CAP for more
    than 18 digits.

    ``str.isdigit()`` is no test for this: it is true for '\u00b2' and for other scripts'
    digits (latin-1 header bytes decode to some of them), which int() then refuses or reads,
    and for strings too long for int()."""
    if not text or not text.isascii() or not text.isdigit():
        return None
    return int(text) if len(text) <= 18 else DECIMAL_CAP


def parse_size(text: str | int, what: str = "size") -> int:
    """``'20GiB'`` -> 21474836480. Raise ConfigError naming ``what`` on bad input."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ConfigError(f"{what} must not be negative: {text}")
        return text
    if not isinstance(text, str):
        raise ConfigError(f"{what} must be a size such as 20GiB, not {text!r}")
    match = _SIZE_RE.fullmatch(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ConfigError(f"{what}: cannot parse {text!r} (expected e.g. 512MiB, 20GiB, 1048576)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_duration(text: str | float | int, what: str = "duration") -> float:
    """``'5s'`` -> 5.0, ``'250ms'`` -> 0.25, a bare number is seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise ConfigError(f"{what} must not be negative: {text}")
        return float(text)
    if not isinstance(text, str):
        raise ConfigError(f"{what} must be a duration such as 5s, not {text!r}")
    match = _DURATION_RE.fullmatch(text)
    if match is None:
        raise ConfigError(f"{what}: cannot parse {text!r} (expected e.g. 5s, 250ms, 2m)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
