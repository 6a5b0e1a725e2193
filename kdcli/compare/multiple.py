"""Many tests in one table: `kd compare --adjust holm|bonferroni|none`.

A table of kd compare shows one test per metric and run against the baseline; a reader scans it for stars. At 0.05
each, a table of 21 tests under a global null shows at least one false star about two times in three. Adjusting
every p-value of a table for the number the table shows keeps the chance of any false star in it at 0.05 or below
(the family-wise error rate), whatever the tests' dependence: they share prompts, so they are dependent.

- `holm` (the default): Holm's step-down (1979). Sort the m p-values, p(1) ≤ … ≤ p(m); the adjusted p(i) is
  max over j ≤ i of min(1, (m − j + 1)·p(j)). It controls the family-wise error rate as Bonferroni does and rejects
  everything Bonferroni rejects, and more.
- `bonferroni`: min(1, m·p).
- `none`: each p-value as tested, for a reader who asks one question of the table.

A p-value that is not a number (a row whose values are identical in every run: nothing to test) is not counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kdcli.compare.student_t import ALPHA

if TYPE_CHECKING:
    from kdcli.compare.evalset import SetComparison

ADJUSTMENTS = ("holm", "bonferroni", "none")
DEFAULT_ADJUSTMENT = "holm"


def adjust_p_values(p_values: Sequence[float], method: str = DEFAULT_ADJUSTMENT) -> list[float]:
    """The p-values adjusted for their number, in their order (NaN stays NaN and does not count)."""
    if method not in ADJUSTMENTS:
        raise ValueError(f"unknown adjustment {method!r}; use {', '.join(ADJUSTMENTS)}")
    tested = [i for i, p in enumerate(p_values) if not math.isnan(p)]
    m = len(tested)
    out = list(p_values)
    if method == "none" or m == 0:
        return out
    if method == "bonferroni":
        for i in tested:
            out[i] = min(1.0, m * p_values[i])
        return out
    running = 0.0
    for rank, i in enumerate(sorted(tested, key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        out[i] = running
    return out


def adjust_table(result: SetComparison) -> None:
    """Adjust every p-value a table shows for how many it shows (`result.adjust`); a star is then p_adjusted < 0.05."""
    cells = [
        cell for row in result.rows for cell in row.cells.values() if cell is not None and cell.p_value is not None
    ]
    tested = [cell.p_value for cell in cells if cell.p_value is not None]
    adjusted = adjust_p_values(tested, result.adjust)
    result.tests = sum(1 for p in tested if not math.isnan(p))
    for cell, p_adjusted in zip(cells, adjusted, strict=True):
        cell.p_adjusted = p_adjusted
        cell.significant = p_adjusted < ALPHA  # False for NaN: nothing was tested
