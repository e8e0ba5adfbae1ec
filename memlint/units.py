"""Byte sizes: parse ``4GiB``/``16GB``/``512MiB`` and print them the way people read them."""
from __future__ import annotations

import re

from memlint.errors import UsageError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE = re.compile(r"^\s*(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[a-zA-Z]*)\s*$")

GIB = 2**30


def parse_bytes(text: str) -> int:
    """Parse a human byte size; bare ``G``/``M`` mean binary units, as in ``nvidia-smi``."""
    match = _SIZE.match(str(text))
    unit = match.group("unit").lower() if match else None
    if not match or unit not in _UNITS:
        raise UsageError(f"cannot read {text!r} as a memory size", hint="write it like 4GiB, 11GB or 512MiB")
    return int(float(match.group("num")) * _UNITS[unit])


def format_gib(nbytes: float, digits: int = 2) -> str:
    return f"{nbytes / GIB:.{digits}f}"


def format_bytes(nbytes: float) -> str:
    """Short binary-unit rendering for tables: ``1.50 GiB``, ``12.0 MiB``, ``512 B``."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}" if value < 10 else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
