"""The answers written without a model (`kd eval --baselines`) as columns of `kd compare`: where a set's are read
from, and which runs do not beat them on ROUGE-L. `evalset.compare_set` adds their statistics to the same prompt
bootstrap as the runs', under `REFERENCE_PASS`, their only pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kdcli.compare.runs import RunData

if TYPE_CHECKING:
    from kdcli.compare.evalset import Draws, SetComparison

REFERENCE_PASS = "answer"  # the one pass of an answer written without a model


def reference_sources(have: Sequence[RunData], entries: dict[str, dict[str, Any]]) -> dict[str, tuple[RunData, str]]:
    """The answers written without a model (`kd eval --baselines`) a column's eval has, by title: the run folder
    they were written to (an arm's first) and their pass label. The first column that has them gives them; they
    depend on the prompts and references alone, which every compared column shares."""
    from kdcli.evaluation.baselines import BASELINES, baseline_title

    for run in have:
        baselines = entries[run.label].get("baselines") or {}
        if baselines:
            source = run.folders()[0]
            return {
                baseline_title(name): (source, label) for name, (label, _) in BASELINES.items() if name in baselines
            }
    return {}


def mark_below_references(result: SetComparison, draws: Draws) -> None:
    """On ROUGE-L, name in each run's cell the answers written without a model that it does not beat: the 95 %
    interval of run − answer, paired over the same prompt resamples, reaches 0 or lies below it."""
    row = next((r for r in result.rows if r.metric == "rougeL"), None)
    if row is None:
        return
    for label, cell in row.cells.items():
        if cell is None or label in result.references:
            continue
        for title in result.references:
            answer, mine = draws.get((title, "rougeL")), draws.get((label, "rougeL"))
            other = row.cells.get(title)
            test = mine[0].paired(answer[1], mine[1]) if answer and mine and mine[0] is answer[0] else None
            if test is not None and test.ci95 is not None:
                beaten = test.ci95[0] > 0
            else:
                beaten = other is not None and cell.mean > other.mean
            if other is not None:
                delta = test.delta if test is not None else cell.mean - other.mean
                cell.versus_references[title] = (delta, test.ci95 if test is not None else None)
            if not beaten:
                cell.not_above.append(title)
    marked = {title for cell in row.cells.values() if cell is not None for title in cell.not_above}
    result.notes.append(
        f"{result.set}: {' and '.join(repr(t) for t in result.references)} are answers written without any model "
        "(kd eval --baselines, docs/eval.md); "
        + (
            "every run beats them on ROUGE-L."
            if not marked
            else "a run marked 'not above' does not beat that answer on ROUGE-L (the 95% interval of the difference "
            "reaches 0 or lies below it): below the fixed string of frequent words it is not yet a model; the copied "
            "prompt is a reference row, not a bar, and scores high where the references restate the question."
        )
    )
