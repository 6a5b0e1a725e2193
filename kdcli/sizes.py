"""Sizes in bytes, read from and written for people: `--device-memory 80GiB`, "needs ~1.3 MiB, 2.1 MiB free"."""

from __future__ import annotations

import math


def parse_size(text: str) -> int:
    """'80GiB', '80 GB', '512MiB', '1.5T', or a plain number of bytes → bytes. GB/MB are decimal, GiB/MiB binary."""
    units = {
        "": 1, "b": 1,
        "k": 2**10, "kib": 2**10, "kb": 10**3,
        "m": 2**20, "mib": 2**20, "mb": 10**6,
        "g": 2**30, "gib": 2**30, "gb": 10**9,
        "t": 2**40, "tib": 2**40, "tb": 10**12,
    }  # fmt: skip
    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number) :]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"'{text}' is not a size; write e.g. 80GiB, 24GB or 512MiB") from None
    if unit not in units or value <= 0 or not math.isfinite(value):
        raise ValueError(f"'{text}' is not a size; write e.g. 80GiB, 24GB or 512MiB")
    return int(value * units[unit])


def format_bytes(n: int) -> str:
    """Binary units, three significant digits: 1.23 GiB, 512 MiB."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable")
