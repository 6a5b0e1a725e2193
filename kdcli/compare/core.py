"""`compare_runs`: the whole comparison as data (setup diff, training, evaluation, notes), ready to render.

The training rows and curves are built here; each evaluation set is compared in `evalset`, which says on what
part of the sets the runs are compared and why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kdcli.compare.evalset import SetComparison, compare_set, eval_hint
from kdcli.compare.multiple import DEFAULT_ADJUSTMENT
from kdcli.compare.ranking import HIGHER, LOWER, NONE, as_number, best_runs
from kdcli.compare.runs import RunData
from kdcli.compare.seeds import SeedTest, seed_tests
from kdcli.compare.setup_diff import SetupRow, setup_diff
from kdcli.compare.stats import DEFAULT_RESAMPLES, DEFAULT_SEED
from kdcli.evaluation.judge.failures import JudgeFailures

# metrics.jsonl keys that are the trainer's own, not a divergence's diagnostics.
_NOT_CURVES = ("lr", "elapsed_s", "tokens_per_s", "valid_positions", "gen_tokens", "gen_s")
_STEP_KEYS = frozenset({"step", "loss", "kd", "ce", "grad_norm", *_NOT_CURVES})
# Totals of on-policy sampling (run.json); shown only when some run sampled.
_GENERATION_ROWS = ("gen_tokens", "gen_seconds")


@dataclass
class ValueRow:
    key: str
    title: str
    direction: str
    values: dict[str, float | None]
    best: list[str] = field(default_factory=list)


@dataclass
class HeadToHead:
    run: str
    baseline: str
    set: str
    mode: str
    pairs: int  # (example, pass) pairs with both verdicts
    wins: float | None  # rates in [0, 1], from `run`'s side; None when no pair was judged
    ties: float | None
    losses: float | None
    excluded: int  # pairs left out because a verdict failed
    requests: int
    cache_hits: int
    failures: JudgeFailures = field(default_factory=JudgeFailures)  # the verdicts asked, and why some failed


@dataclass
class Comparison:
    runs: list[str]
    paths: list[str]
    baseline: str
    setup: list[SetupRow]
    training: list[ValueRow]
    evaluation: list[SetComparison]
    notes: list[str] = field(default_factory=list)
    head_to_head: list[HeadToHead] = field(default_factory=list)
    resamples: int = DEFAULT_RESAMPLES
    arms: dict[str, list[str]] = field(default_factory=dict)  # an arm's label → its run folders (`--pool-seeds`)
    # Arms against the baseline arm on training numbers, across training seeds (`seeds.seed_tests`).
    training_tests: list[SeedTest] = field(default_factory=list)
    # Curves for the sparkline and the plot: run → [(step, value)]; not part of the JSON output.
    curves: dict[str, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("curves")
        return data


def compare_runs(
    runs: Sequence[RunData],
    baseline: str | None = None,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    adjust: str = DEFAULT_ADJUSTMENT,
) -> Comparison:
    """Compare `runs` (the baseline is the first unless named by label); each eval table's p-values are adjusted
    for their number by `adjust` (`multiple.ADJUSTMENTS`)."""
    labels = [run.label for run in runs]
    trained = [run.label for run in runs if not run.eval_only]  # eval folders have no recipe to diff
    base = baseline or labels[0]
    if base not in labels:
        raise ValueError(f"baseline {base!r} is not one of the runs")
    comparison = Comparison(
        runs=labels,
        paths=[str(run.path) for run in runs],
        baseline=base,
        setup=setup_diff({run.label: run.recipe for run in runs if not run.eval_only}, trained),
        training=training_rows(runs),
        evaluation=[],
        resamples=resamples,
        curves={run.label: curves_of(run) for run in runs},
        arms={run.label: [str(f.path) for f in run.folders()] for run in runs if len(run.folders()) > 1},
        training_tests=seed_tests(runs, base, adjust),
    )
    if len({str(run.run.divergence) for run in runs}) > 1:
        comparison.notes.append(
            "Train and eval loss include each divergence's own KD term, so they are not ranked across divergences; "
            "eval CE is."
        )
    keys: list[tuple[str, str]] = []
    for run in runs:
        keys.extend((name, mode) for name, modes in run.sets().items() for mode in modes if (name, mode) not in keys)
    for name, mode in keys:
        comparison.evaluation.append(compare_set(runs, base, name, mode, resamples=resamples, seed=seed, adjust=adjust))
    lone = [run.label for run in runs if len(run.folders()) == 1]
    if comparison.arms and lone:
        comparison.notes.append(
            f"{', '.join(lone)}: a single training run beside arms of several, so its own training-seed variance is "
            "unknown and its p-values count only the arms'; train it on more seeds to count it."
        )
    for run in runs:
        for name, mode, entry in _partly_evaluated(run):
            if (name, mode) in keys:  # compared, with this arm's missing runs named there
                continue
            comparison.notes.append(
                f"{run.label}: only some of its runs have {name} ({mode}), so the arm leaves it out; run "
                f"`{eval_hint(run, name, entry)}` to add it."
            )
        if not run.sets():
            folders = " ".join(str(f.path) for f in run.folders())
            comparison.notes.append(f"{run.label} has no evaluation yet: run `kd eval {folders}` to fill it.")
    return comparison


def _partly_evaluated(run: RunData) -> list[tuple[str, str, dict[str, Any]]]:
    """(set, mode, an entry) that some but not all of an arm's runs have: an arm compares only what all have."""
    found: list[tuple[str, str, dict[str, Any]]] = []
    for folder in run.folders() if len(run.folders()) > 1 else []:
        for name, modes in folder.sets().items():
            for mode, entry in modes.items():
                if mode not in run.sets().get(name, {}) and all((name, mode) != f[:2] for f in found):
                    found.append((name, mode, entry))
    return found


# ------------------------------------------------------------------------------------------------ training


def training_rows(runs: Sequence[RunData]) -> list[ValueRow]:
    same_objective = len({(str(r.run.divergence), str(_get(r.recipe, "loss", "kd_ratio"))) for r in runs}) == 1
    loss_direction = LOWER if same_objective else NONE
    rows = [
        ValueRow("train_loss", "train loss (last step)", loss_direction, {}),
        ValueRow("eval_loss", "eval loss (end)", loss_direction, {}),
        ValueRow("eval_ce", "eval CE (end)", LOWER, {}),
        ValueRow("steps", "steps", NONE, {}),
        ValueRow("tokens_per_s", "tokens/s", HIGHER, {}),
        ValueRow("wall_seconds", "wall time (s)", LOWER, {}),
        ValueRow("gen_tokens", "tokens the student sampled", NONE, {}),
        ValueRow("gen_seconds", "time sampling (s)", NONE, {}),
        ValueRow("teacher_parameters", "teacher parameters", NONE, {}),
        ValueRow("student_parameters", "student parameters", NONE, {}),
        ValueRow("student_trainable", "student trainable parameters", NONE, {}),
    ]
    for run in runs:
        record = run.run
        after = record.eval_after or {}
        values = {
            "train_loss": record.train_loss,
            "eval_loss": after.get("eval_loss"),
            "eval_ce": after.get("eval_ce"),
            "steps": record.steps,
            "tokens_per_s": record.tokens_per_s,
            "wall_seconds": record.wall_seconds,
            "gen_tokens": record.gen_tokens,
            "gen_seconds": record.gen_seconds,
            "teacher_parameters": record.teacher_parameters,
            "student_parameters": record.student_parameters,
            "student_trainable": record.student_trainable,
        }
        for row in rows:
            row.values[run.label] = as_number(values[row.key])
    # Diagnostics are averaged over the logged steps: a single step's value is noisy.
    diagnostics: list[str] = []
    for run in runs:
        for step in run.steps:
            diagnostics.extend(k for k in step if k not in _STEP_KEYS and k not in diagnostics)
    for key in diagnostics:
        row = ValueRow(key, f"{key} (mean over steps)", NONE, {})
        for run in runs:
            values = [float(s[key]) for s in run.steps if as_number(s.get(key)) is not None]
            row.values[run.label] = math.fsum(values) / len(values) if values else None
        rows.append(row)
    rows = [row for row in rows if any(v is not None for v in row.values.values())]
    if not any(r.values.get(label) for r in rows if r.key == "gen_tokens" for label in r.values):
        rows = [row for row in rows if row.key not in _GENERATION_ROWS]
    for row in rows:
        if len(runs) > 1:
            row.best = best_runs({k: v for k, v in row.values.items() if v is not None}, row.direction)
    return rows


def curves_of(run: RunData) -> dict[str, list[tuple[int, float]]]:
    curves: dict[str, list[tuple[int, float]]] = {}
    for line in run.steps:
        for key, value in line.items():
            if key != "step" and key not in _NOT_CURVES:
                number = as_number(value)
                if number is not None and "step" in line:
                    curves.setdefault(key, []).append((int(line["step"]), number))
    for line in run.evals:
        if as_number(line.get("eval_loss")) is not None and "step" in line:
            curves.setdefault("eval_loss", []).append((int(line["step"]), float(line["eval_loss"])))
    return curves


# ------------------------------------------------------------------------------------------------ helpers


def _get(data: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)  # type: ignore[assignment]
    return data
