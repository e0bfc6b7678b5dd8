"""Go-style durations ("50ms", "2s", "1m30s") as used by upstream flags and config."""

from __future__ import annotations

import re

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str | int | float) -> float:
    """Return seconds. Accepts Go syntax; a bare number is taken as seconds.

    Raises ValueError with a message naming the bad input.
    """
    if isinstance(text, bool):
        raise ValueError(f"invalid duration {text!r}")
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"invalid duration {text!r}: must not be negative")
        return float(text)
    s = str(text).strip()
    if not s:
        raise ValueError("invalid duration '': empty")
    try:
        value = float(s)
    except ValueError:
        pass
    else:
        if value < 0:
            raise ValueError(f"invalid duration {text!r}: must not be negative")
        return value
    if s == "0":
        return 0.0
    pos, total = 0, 0.0
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or pos == 0:
        raise ValueError(f"invalid duration {text!r}: expected e.g. '50ms', '2s', '1m30s'")
    return total


def format_duration(seconds: float) -> str:
    """Inverse of parse_duration for display (shortest exact-ish form)."""
    if seconds == 0:
        return "0s"
    if seconds < 1 and round(seconds * 1000, 6) == int(round(seconds * 1000, 6)):
        return f"{int(round(seconds * 1000))}ms"
    if seconds < 1e-3:
        return f"{seconds * 1e6:g}us"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"
