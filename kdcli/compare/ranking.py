"""Which way a row is better and which runs are best in it, shared by the training rows (`core`) and the eval-set
rows (`evalset`) so that both mark the best run by one rule."""

from __future__ import annotations

import math
from typing import Any

HIGHER, LOWER, NONE = "higher", "lower", "none"


def best_runs(values: dict[str, float], direction: str) -> list[str]:
    """The runs with the best value; none when there is no better direction or every run has the same value."""
    if not values or direction == NONE:
        return []
    target = max(values.values()) if direction == HIGHER else min(values.values())
    best = [label for label, v in values.items() if math.isclose(v, target, rel_tol=1e-12, abs_tol=1e-12)]
    return best if len(best) < len(values) else []


def as_number(value: Any) -> float | None:
    """`value` as a float, or None for what is not a number in a results or metrics file (a bool, NaN, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(float(value)) else float(value)
