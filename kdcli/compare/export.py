"""`kd compare` for machines: JSON (the whole comparison) and a long CSV table, and `render_text`, which picks a
text format (`render` draws the tables people read)."""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

from kdcli.compare.core import Comparison
from kdcli.compare.render import legend, notes_of, to_markdown
from kdcli.compare.seeds import unpaired
from kdcli.compare.spread import PAIRED_BY_SEED, WELCH, method_label

FORMATS = ("table", "markdown", "json", "csv")


def _clean(value: Any) -> Any:
    """NaN and infinities are not JSON: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def to_json(comparison: Comparison) -> str:
    data = comparison.as_dict()
    data["legend"] = legend(comparison)
    data["all_notes"] = notes_of(comparison)
    return json.dumps(_clean(data), indent=2, ensure_ascii=False) + "\n"


CSV_COLUMNS = (
    "section", "set", "mode", "key", "direction", "run", "value", "ci95_low", "ci95_high", "ci95_seeds", "seeds",
    "runs", "delta", "delta_ci95_low", "delta_ci95_high", "p_value", "p_adjusted", "significant", "best", "not_above",
    "test",
)  # fmt: skip


def to_csv(comparison: Comparison) -> str:
    """One long table: a row per (section, set, key, run); empty cells where a column does not apply."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in comparison.setup:
        for label in comparison.runs:
            writer.writerow({"section": "setup", "key": row.key, "run": label, "value": row.values.get(label) or ""})
    tested = {(test.key, test.run): test for test in comparison.training_tests}
    for vrow in comparison.training:
        for label in comparison.runs:
            test = tested.get((vrow.key, label))
            across_seeds: dict[str, Any] = {}  # the arm against the baseline arm, across seeds (`seeds.seed_tests`)
            if test is not None:
                low, high = test.ci95 or (None, None)
                across_seeds = {
                    "runs": test.runs,
                    "delta": _csv_number(test.delta),
                    "delta_ci95_low": _csv_number(low),
                    "delta_ci95_high": _csv_number(high),
                    "p_value": _csv_number(test.p_value),
                    "p_adjusted": _csv_number(test.p_adjusted),
                    "significant": test.significant,
                    "test": method_label(PAIRED_BY_SEED if test.paired else WELCH, test.pairs, unpaired(test)),
                }
            writer.writerow(
                {
                    "section": "training",
                    "key": vrow.key,
                    "direction": vrow.direction,
                    "run": label,
                    "value": _csv_number(vrow.values.get(label)),
                    "best": label in vrow.best,
                    **across_seeds,
                }
            )
    for s in comparison.evaluation:
        for mrow in s.rows:
            for label in [*comparison.runs, *s.references]:
                cell = mrow.cells.get(label)
                base = {"section": "evaluation", "set": s.set, "mode": s.mode, "key": mrow.metric, "run": label}
                base["direction"] = mrow.direction
                if cell is not None:
                    ci, delta_ci = cell.ci95 or (None, None), cell.delta_ci95 or (None, None)
                    base.update(
                        value=_csv_number(cell.mean),
                        ci95_low=_csv_number(ci[0]),
                        ci95_high=_csv_number(ci[1]),
                        ci95_seeds=_csv_number(cell.ci95_seeds),
                        seeds=cell.seeds,
                        runs=cell.runs,
                        delta=_csv_number(cell.delta),
                        delta_ci95_low=_csv_number(delta_ci[0]),
                        delta_ci95_high=_csv_number(delta_ci[1]),
                        p_value=_csv_number(cell.p_value),
                        p_adjusted=_csv_number(cell.p_adjusted),
                        significant="" if cell.significant is None else cell.significant,
                        best=cell.best,
                        not_above="; ".join(cell.not_above),
                        test=method_label(cell.test, cell.pairs, cell.unpaired),
                    )
                writer.writerow(base)
    for h in comparison.head_to_head:
        for key in ("wins", "ties", "losses", "pairs", "excluded"):
            writer.writerow(
                {"section": "head_to_head", "set": h.set, "mode": h.mode, "key": key, "run": h.run,
                 "value": _csv_number(getattr(h, key)) if key in ("wins", "ties", "losses") else getattr(h, key)}
            )  # fmt: skip
    return buffer.getvalue()


def _csv_number(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else repr(float(value))


def render_text(comparison: Comparison, fmt: str) -> str:
    """The comparison as Markdown, JSON or CSV text."""
    if fmt not in FORMATS or fmt == "table":
        raise ValueError(f"not a text format: {fmt}")
    return {"markdown": to_markdown, "json": to_json, "csv": to_csv}[fmt](comparison)
