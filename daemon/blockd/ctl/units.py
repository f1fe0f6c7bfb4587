"""Sizes and rates as people write and read them (binary units, as qemu-img)."""

from __future__ import annotations

import re

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?(?:/s)?\s*$", re.IGNORECASE)


def parse_rate(text: str) -> int:
    """Bytes per second from ``100M``, ``1.5G``, ``64KiB/s`` or ``0`` (no limit).

    Suffixes are binary, as in qemu-img: ``100M`` is 100 MiB/s.
    """
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"not a rate: {text!r} (examples: 100M, 1.5G, 64K, 0 for no limit)")
    number, suffix = match.groups()
    value = float(number) * _SUFFIXES[suffix.upper()]
    if value >= 1 << 63:
        raise ValueError(f"rate too large: {text!r}")
    return int(value)


def human_size(n: int | float) -> str:
    """``1.5 GiB``-style, exact below 1 KiB."""
    if abs(n) < 1024:
        return f"{int(n)} B"
    value = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def human_rate(bytes_per_second: float) -> str:
    return f"{human_size(bytes_per_second)}/s"


def human_duration(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
