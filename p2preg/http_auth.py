"""Pure helpers for registry authentication and HTTP retry hints.

``WWW-Authenticate`` challenges follow RFC 7235: ``scheme param="value", param=token``.
Registries use ``Bearer realm="https://auth.example/token",service="reg",scope="repository:x:pull"``
(the Docker token protocol) or ``Basic realm="..."``.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass

from p2preg.units import parse_decimal

_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]+))\s*,?')


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # lower-case: "bearer" or "basic"
    params: dict[str, str]

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


def parse_challenge(header: str) -> Challenge | None:
    """Parse the first challenge of a ``WWW-Authenticate`` header; None if it is malformed."""
    header = header.strip()
    scheme, _, rest = header.partition(" ")
    if not scheme or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", scheme):
        return None
    params: dict[str, str] = {}
    position = 0
    rest = rest.strip()
    while position < len(rest):
        match = _PARAM_RE.match(rest, position)
        if match is None:
            break
        value = match.group(2) if match.group(2) is not None else match.group(3)
        params[match.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        position = match.end()
    return Challenge(scheme.lower(), params)


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


def parse_retry_after(value: str | None, now_epoch: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if value is None:
        return None
    value = value.strip()
    seconds = parse_decimal(value)
    if seconds is not None:
        return float(seconds)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now_epoch)


@dataclass(frozen=True, slots=True)
class ByteRange:
    """A satisfiable single byte range, ``start`` and ``end`` inclusive."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1


class RangeNotSatisfiable(Exception):
    pass


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """Interpret a ``Range`` header against a representation of ``size`` bytes (RFC 9110 14.1).

    Returns None when the whole representation should be sent (no header, a unit other than
    bytes, several ranges, or a malformed header, all of which RFC 9110 lets a server ignore)
    and raises RangeNotSatisfiable when a well-formed single range lies outside the content.
    """
    if header is None:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_text, dash, last_text = spec.strip().partition("-")
    first_text, last_text = first_text.strip(), last_text.strip()
    first, last = parse_decimal(first_text), parse_decimal(last_text)
    if not dash or (first_text and first is None) or (last_text and last is None):
        return None
    if first is None:
        if last is None:
            return None
        if last == 0 or size == 0:
            raise RangeNotSatisfiable
        return ByteRange(max(0, size - last), size - 1)
    start = first
    end = size - 1 if last is None else last
    if last is not None and end < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable
    return ByteRange(start, min(end, size - 1))
