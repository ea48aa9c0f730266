"""Numbers for people: sizes in KB/MB/GB, counts with thousands separators, rates as percent, durations in
ms/s/min/h. Every CLI table prints its numbers through these functions (never ``2.68435e+08``).

Pure functions of the standard library only. ``None`` (a value that is not known) is always ``-``.
Sizes use decimal units (1 MB = 1,000,000 bytes), as disk and download sizes are usually quoted.
"""

from __future__ import annotations

import math
from datetime import datetime

MISSING = "-"

_SIZE_UNITS = ("B", "KB", "MB", "GB", "TB", "PB")


def _finite(value: float | int | None) -> bool:
    return value is not None and not (isinstance(value, float) and not math.isfinite(value))


def size(n_bytes: float | int | None) -> str:
    """``532 B``, ``4.7 KB``, ``268.4 MB``, ``2.68 GB``: three significant digits at most, never exponents."""
    if not _finite(n_bytes):
        return MISSING if n_bytes is None else str(n_bytes)
    assert n_bytes is not None
    value = float(n_bytes)
    unit = 0
    while abs(value) >= 1000 and unit < len(_SIZE_UNITS) - 1:
        value /= 1000
        unit += 1
    if unit == 0:
        return f"{int(value)} B"
    digits = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
    return f"{value:.{digits}f} {_SIZE_UNITS[unit]}"


def count(n: float | int | None) -> str:
    """``1,234,567``; a fractional count is rounded to the nearest whole number."""
    if not _finite(n):
        return MISSING if n is None else str(n)
    assert n is not None
    return f"{round(n):,}"


def percent(fraction: float | None, digits: int = 1) -> str:
    """``0.0525`` -> ``5.2%`` (``digits`` decimals); a tiny non-zero rate keeps two significant digits
    (``0.0012%``), so that it never reads as 0."""
    if not _finite(fraction):
        return MISSING if fraction is None else str(fraction)
    assert fraction is not None
    value = fraction * 100
    if value != 0 and abs(value) < 10 ** (-digits):
        return f"{value:.2g}%"
    return f"{value:.{digits}f}%"


def duration(seconds: float | None) -> str:
    """``850 ms``, ``12.3 s``, ``4.5 min``, ``2.1 h``, ``3.0 d``."""
    if not _finite(seconds):
        return MISSING if seconds is None else str(seconds)
    assert seconds is not None
    s = float(seconds)
    if abs(s) < 1:
        return milliseconds(s * 1000)
    if abs(s) < 60:
        return f"{s:.1f} s"
    if abs(s) < 3600:
        return f"{s / 60:.1f} min"
    if abs(s) < 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def milliseconds(ms: float | None) -> str:
    """A latency: ``27.1 ms``, ``0.016 ms``, ``1,250 ms`` (three significant digits, no exponent)."""
    if not _finite(ms):
        return MISSING if ms is None else str(ms)
    assert ms is not None
    return f"{number(ms)} ms"


def number(value: float | int | None) -> str:
    """A plain number: integers with separators, others with three or four significant digits, no exponent
    (``0.0042``, ``3.142``, ``12,345``); smaller than 0.0001 in magnitude: ``<0.0001``."""
    if not _finite(value):
        return MISSING if value is None else str(value)
    assert value is not None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) or float(value).is_integer():
        return count(value)
    v = float(value)
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) < 0.0001:
        return "<0.0001" if v > 0 else ">-0.0001"
    decimals = max(0, 3 - math.floor(math.log10(abs(v))))
    text = f"{v:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def metric(name: str, value: float | int | None) -> str:
    """A named metric in its unit, chosen by the name's suffix: ``*_bytes`` size, ``*_ms`` latency,
    ``*_seconds`` duration, ``*_rate``/``*coverage``/``*share`` percent, ``*_count``/``requests``/``devices``/
    ``rows``/``samples`` counts; anything else :func:`number`."""
    if name.endswith("_bytes") or name == "size":
        return size(value)
    if name.endswith("_ms"):
        return milliseconds(value)
    if name.endswith(("_seconds", "_s")):
        return duration(value)
    if name.endswith(("_rate", "coverage", "share", "_share_of_rows")):
        return percent(value)
    if name.endswith(("_count", "requests", "devices", "rows", "samples")):
        return count(value)
    return number(value)


def timestamp(value: str | datetime | None) -> str:
    """An ISO 8601 time to the second, UTC marked ``Z``: ``2026-12-07 08:34:53Z``; unparsable text as is."""
    if value is None or value == "":
        return MISSING
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return value
    else:
        moment = value
    offset = moment.utcoffset()
    if offset is not None and offset.total_seconds() == 0:
        return moment.strftime("%Y-%m-%d %H:%M:%SZ")
    return moment.isoformat(sep=" ", timespec="seconds")
