"""Byte counts: parsing sizes typed by users and printing them.

Bytes are integers everywhere in autofit; GiB appears only here, when a number is printed or read.
"""

from __future__ import annotations

import re

from autofit.errors import ConfigError

KiB = 1024
MiB = 1024**2
GiB = 1024**3

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_POWERS = {"": 0, "b": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str) -> int:
    """Bytes in a size such as ``12GiB``, ``12GB``, ``12 G`` or ``11264MiB``.

    GPU memory is sold in binary units (a "12 GB" card has 12 x 1024**3 bytes), so ``GB`` and ``GiB`` both
    mean powers of 1024 here. A bare number is a count of GiB. Raises ``ConfigError`` on anything else.
    """
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"cannot read {text!r} as a memory size; write it like 12GiB, 12GB or 11264MiB")
    number, unit = float(match.group(1)), (match.group(2) or "g").lower()
    return int(number * 1024 ** _POWERS[unit[0]])


def fmt_bytes(n: int | float) -> str:
    """``n`` bytes as a short human string: ``11.73 GiB``, ``512.0 MiB``, ``96 B``."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n >= GiB:
        return f"{sign}{n / GiB:.2f} GiB"
    if n >= MiB:
        return f"{sign}{n / MiB:.1f} MiB"
    if n >= KiB:
        return f"{sign}{n / KiB:.1f} KiB"
    return f"{sign}{int(n)} B"


def gib(n: int | float) -> float:
    """``n`` bytes in GiB, for tables and plots."""
    return n / GiB
