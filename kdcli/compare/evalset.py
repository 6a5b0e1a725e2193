"""`compare_set`: one evaluation set (one set name and mode) compared across runs, as `SetComparison` data.

Evaluation is compared only on what every run that has the set shares: the same passes (seeds) and the same
examples (matched by index and prompt), the examples being the same in every pass, so that one resample of prompts
applies to every pass (`stats`). Per-seed values are recomputed from the generation files on that shared part,
with kd eval's own metric functions, so the mean, both intervals, the delta and the bootstrap all describe the
same numbers. When a run's generation files are gone, its results.json values are shown with the spread over
seeds only, and no p-value is given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kdcli.compare.multiple import DEFAULT_ADJUSTMENT, adjust_table
from kdcli.compare.per_example import pass_statistics
from kdcli.compare.ranking import HIGHER, NONE, as_number, best_runs
from kdcli.compare.references import REFERENCE_PASS, mark_below_references, reference_sources
from kdcli.compare.runs import RunData
from kdcli.compare.stats import Bounds, PromptBootstrap, RatioStat, Statistic, arm_bootstrap, observed
from kdcli.compare.student_t import mean_ci

# (key, title, better direction, format). Length has no better direction: shorter is not better, nor longer.
EVAL_METRICS = (
    ("rougeL", "ROUGE-L", HIGHER, "{:.2f}"),
    ("exact_match", "exact match", HIGHER, "{:.1f}"),
    ("distinct_1", "distinct-1", HIGHER, "{:.3f}"),
    ("distinct_2", "distinct-2", HIGHER, "{:.3f}"),
    ("length", "length (tokens)", NONE, "{:.1f}"),
    ("stop_rate", "stop rate", NONE, "{:.2f}"),
    ("judge", "judge", HIGHER, "{:.1f}"),
)
# Metrics with bounds: their intervals are taken on the logit scale, so that they stay inside (a ROUGE-L near 0
# over three runs no longer reaches below it).
BOUNDED: dict[str, Bounds] = {
    "rougeL": (0.0, 100.0),
    "exact_match": (0.0, 100.0),
    "distinct_1": (0.0, 1.0),
    "distinct_2": (0.0, 1.0),
    "stop_rate": (0.0, 1.0),
}
DEFAULT_SEEDS = ("seed-10", "seed-20", "seed-30", "seed-40", "seed-50")


@dataclass
class MetricCell:
    mean: float  # mean over the shared passes of the metric on the shared examples
    # (low, high): 95 % percentile interval of `mean` under the prompt bootstrap (prompts resampled, one draw for
    # every pass); None when the generation files are missing.
    ci95: tuple[float, float] | None
    # Half-width of the 95 % Student t interval over the per-seed values: the seed-to-seed spread on these
    # prompts, not an interval over prompts; None with one pass.
    ci95_seeds: float | None
    seeds: int  # passes the mean is over
    # Training runs the mean is over: 1 for a run; an arm's (`--pool-seeds`), whose `ci95_seeds` is then the
    # spread over training seeds and whose intervals and p-values include it (`stats.arm_bootstrap`).
    runs: int = 1
    delta: float | None = None  # against the baseline
    delta_ci95: tuple[float, float] | None = None  # (low, high) of the delta, from the same paired bootstrap
    p_value: float | None = None  # paired bootstrap over prompts, two-sided, as tested; NaN: identical, no test
    p_adjusted: float | None = None  # p_value adjusted for the table's number of tests (`--adjust`)
    significant: bool | None = None  # p_adjusted < 0.05
    test: str = ""  # which test gave p (`spread.BOOTSTRAP`, `WELCH`, `PAIRED_BY_SEED`); "" where none
    pairs: int = 0  # paired by seed: the training seeds both arms have; the runs left out (`stats.BootstrapResult`)
    unpaired: int = 0
    best: bool = False
    # ROUGE-L only: the answers written without a model (`kd eval --baselines`) this run does not beat, the 95 %
    # interval of its ROUGE-L minus theirs not above 0 (their means, where no interval can be drawn)
    not_above: list[str] = field(default_factory=list)
    # ROUGE-L only: this run minus each answer written without a model, by title: (difference, its 95 % interval
    # from the same paired prompt bootstrap, None where none can be drawn)
    versus_references: dict[str, tuple[float, tuple[float, float] | None]] = field(default_factory=dict)


@dataclass
class MetricRow:
    metric: str
    title: str
    direction: str
    format: str
    cells: dict[str, MetricCell | None]  # run label → cell; None: not evaluated


@dataclass
class SetComparison:
    set: str
    mode: str  # sampling or greedy
    passes: list[str]  # the shared passes, e.g. seed-10
    examples: int | None  # shared examples, the same in every pass; None when the generation files are missing
    rows: list[MetricRow]
    notes: list[str] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)  # run label → the kd eval command that fills it
    # Columns after the runs' for the answers written without a model (`kd eval --baselines`), by title: rows'
    # cells hold them under these labels.
    references: list[str] = field(default_factory=list)
    adjust: str = DEFAULT_ADJUSTMENT  # how the table's p-values are adjusted for their number (`multiple`)
    tests: int = 0  # the p-values the table shows: the number they are adjusted for


def pass_labels(entry: dict[str, Any]) -> list[str]:
    """A column's pass labels: an arm's entry (`arms`) names its passes itself, a run's are its sampling passes."""
    return list(entry["passes"]) if entry.get("passes") else sampling_labels(entry)


def sampling_labels(entry: dict[str, Any]) -> list[str]:
    """The passes kd eval wrote for an entry (`seed-10`, ..., or `greedy`); an arm's entry holds its first run's."""
    if entry.get("sampling_passes"):
        return list(entry["sampling_passes"])
    if entry.get("mode") == "greedy":
        return ["greedy"]
    if entry.get("seeds"):
        return [f"seed-{s}" for s in entry["seeds"]]
    return list((entry.get("metrics", {}).get("rougeL") or {}).get("per_seed", {}))


def row_key(row: dict[str, Any]) -> tuple[int, str]:
    return int(row.get("index", -1)), str(row.get("prompt", row.get("instruction", "")))


def eval_hint(run: RunData, set_name: str, entry: dict[str, Any]) -> str:
    """The kd eval command that gives `run` (each of its folders that lacks it) the set `entry` describes (as
    another run has it)."""
    mode = entry.get("mode", "sampling")
    lacking = [f for f in run.folders() if mode not in f.sets().get(set_name, {})] or run.folders()
    command = f"kd eval {' '.join(str(f.path) for f in lacking)} --data {set_name}={entry.get('data', set_name)}"
    if mode == "greedy":
        return command + " --greedy"
    labels = sampling_labels(entry)
    if tuple(labels) != DEFAULT_SEEDS:
        command += " --seeds " + ",".join(label.removeprefix("seed-") for label in labels)
    return command


def compare_set(
    runs: Sequence[RunData],
    baseline: str,
    set_name: str,
    mode: str,
    *,
    resamples: int,
    seed: int,
    adjust: str = DEFAULT_ADJUSTMENT,
) -> SetComparison:
    have = [run for run in runs if mode in run.sets().get(set_name, {})]
    entries = {run.label: run.sets()[set_name][mode] for run in have}
    result = SetComparison(set_name, mode, [], None, [], adjust=adjust)
    some_entry = entries[have[0].label]
    for run in runs:
        if run.label not in entries:
            result.missing[run.label] = eval_hint(run, set_name, some_entry)
    # Columns share passes by sampling pass (`pass_key`): an arm's runs are independent of another column's, so
    # its training seeds need not match anyone's; each of its runs must have every shared pass.
    own = {run.label: pass_labels(entries[run.label]) for run in have}
    available = {run.label: _keys_every_run_has(run, own[run.label]) for run in have}
    shared = [k for k in available[have[0].label] if all(k in keys for keys in available.values())]
    columns = {run.label: [p for p in own[run.label] if run.pass_key(p) in shared] for run in have}
    result.passes = shared
    if any(len(columns[label]) != len(passes) for label, passes in own.items()):
        unused = "; ".join(
            f"{label} {', '.join(p for p in passes if p not in columns[label])}"
            for label, passes in own.items()
            if len(columns[label]) != len(passes)
        )
        result.notes.append(
            f"{set_name}: the runs were evaluated on different passes; compared on the {len(shared)} they share"
            + (f" ({', '.join(shared)})" if shared else " (none: nothing is compared)")
            + f"; left out: {unused}."
        )
    _note_settings(result, entries)
    references = reference_sources(have, entries)
    statistics = _statistics(have, set_name, columns, result, references) if shared else None
    groups = {run.label: run.pass_groups(columns[run.label]) for run in have}
    groups.update({title: [[REFERENCE_PASS]] for title in result.references})
    seeds = {run.label: run.group_seeds(groups[run.label]) for run in have}
    draws = _bootstrap(statistics, groups, seeds, resamples, seed) if statistics is not None else {}

    present = [m for m in EVAL_METRICS if any(m[0] in entry.get("metrics", {}) for entry in entries.values())]
    for key, title, direction, fmt in present:
        row = MetricRow(key, title, direction, fmt, dict.fromkeys((r.label for r in runs), None))
        for run in have:
            values = _per_pass_values(run, entries[run.label], key, columns[run.label], statistics)
            if values:
                ci = mean_ci(values)
                found = draws.get((run.label, key))
                interval = found[0].interval(found[1], bounds=BOUNDED.get(key)) if found else None
                cell = MetricCell(ci.mean, interval, ci.half_width, ci.n)
                if len(groups[run.label]) > 1:  # an arm: the mean and its spread are over its runs
                    per_run = [_per_pass_values(run, entries[run.label], key, g, statistics) for g in groups[run.label]]
                    spread = mean_ci([math.fsum(v) / len(v) for v in per_run if v])
                    cell.mean, cell.ci95_seeds, cell.runs = spread.mean, spread.half_width, spread.n
                row.cells[run.label] = cell
        for title in result.references:
            assert statistics is not None  # a reference column is only added beside statistics
            stat = statistics[title].get(key, {}).get(REFERENCE_PASS)
            if stat is not None:
                found = draws.get((title, key))
                interval = found[0].interval(found[1], bounds=BOUNDED.get(key)) if found else None
                row.cells[title] = MetricCell(observed(stat), interval, None, 1)
        result.rows.append(row)
    judged = [label for label, entry in entries.items() if "judge" in entry.get("metrics", {})]
    if judged and len(judged) < len(entries):
        for run in have:
            if run.label not in judged:
                result.notes.append(
                    f"{set_name}: {run.label} has no judge score: run `{eval_hint(run, set_name, entries[run.label])} "
                    "--judge gpt4` to add it."
                )
    if statistics is not None and baseline in entries:
        _test_against_baseline(result, draws, baseline)
        adjust_table(result)
    elif baseline not in entries and len(have) > 1:
        result.notes.append(f"{set_name}: the baseline {baseline} has no {mode} eval on it, so no deltas are given.")
    if result.references:
        mark_below_references(result, draws)
    for row in result.rows:
        means = {
            k: cell.mean
            for k, cell in row.cells.items()
            if cell is not None and not math.isnan(cell.mean) and k not in result.references
        }
        for label in best_runs(means, row.direction) if len(means) > 1 else []:
            cell = row.cells[label]
            assert cell is not None
            cell.best = True
    return result


Stats = dict[str, dict[str, dict[str, Statistic]]]  # run label → metric → pass label → statistic
Draws = dict[tuple[str, str], tuple[PromptBootstrap, int]]  # (run label, metric) → its bootstrap and series index


def _keys_every_run_has(run: RunData, passes: list[str]) -> list[str]:
    """The sampling passes (`pass_key`) that every training run behind a column has, in order."""
    groups = [{run.pass_key(p) for p in group} for group in run.pass_groups(passes)]
    keys = list(dict.fromkeys(run.pass_key(p) for p in passes))
    return [k for k in keys if all(k in group for group in groups)]


def _statistics(
    have: Sequence[RunData],
    set_name: str,
    columns: dict[str, list[str]],
    result: SetComparison,
    references: dict[str, tuple[RunData, str]] | None = None,
) -> Stats | None:
    """Per-example statistics on the shared examples, or None (with a note) when a generation file is missing or
    nothing is shared.

    The examples are those every pass of every run has, in one order (the first run's first pass), so that
    position i is the same prompt in every statistic and one count vector over prompts resamples them all.
    """
    rows: dict[str, dict[str, dict[tuple[int, str], dict[str, Any]]]] = {}
    for run in have:
        rows[run.label] = {}
        for label in columns[run.label]:
            found = run.pass_rows(set_name, label)
            if found is None:
                result.notes.append(
                    f"{set_name}: {run.pass_file(set_name, label)} is missing, so values come from "
                    "results.json, with the spread over seeds only, and no p-values are given. Re-run kd eval on "
                    "that run to restore it."
                )
                return None
            rows[run.label][label] = {row_key(row): row for row in found}
    first = rows[have[0].label][columns[have[0].label][0]]
    keys = [k for k in first if all(k in rows[r.label][p] for r in have for p in columns[r.label])]
    result.examples = len(keys)
    _note_examples(result, rows, len(keys))
    if not keys:
        return None

    judged = {(run.label, p): run.judge_scores(set_name, p) for run in have for p in columns[run.label]}
    # The judge has its own subset (the examples judged in both orders): the one every pass of every run has.
    judge_keys = (
        []
        if any(scores is None for scores in judged.values())
        else [k for k in keys if all(k[0] in scores for scores in judged.values() if scores is not None)]
    )
    if not judge_keys and judged and all(scores is not None for scores in judged.values()):
        result.notes.append(
            f"{set_name}: no example is judged in every pass of every run, so judge values come from results.json "
            "and the judge gets no p-value."
        )
    elif judge_keys and len(judge_keys) < len(keys):
        result.notes.append(
            f"{set_name}: the judge score is compared on the {len(judge_keys)} examples judged in every pass of every "
            f"run (of the {len(keys)} shared)."
        )
    stats: Stats = {run.label: {} for run in have}
    for run in have:
        for label in columns[run.label]:
            per = stats[run.label]
            for metric, stat in pass_statistics([rows[run.label][label][k] for k in keys]).items():
                per.setdefault(metric, {})[label] = stat
            scores = judged[(run.label, label)]
            if scores is not None and judge_keys:
                pairs = [scores[k[0]] for k in judge_keys]
                per.setdefault("judge", {})[label] = RatioStat([m for m, _ in pairs], [r for _, r in pairs])
    for title, (source, label) in (references or {}).items():
        found = {row_key(row): row for row in source.pass_rows(set_name, label) or []}
        if not all(k in found for k in keys):
            result.notes.append(
                f"{set_name}: {source.pass_file(set_name, label)} lacks some of the compared examples, so the "
                f"'{title}' column is left out; re-run `kd eval {source.path} --baselines` to rewrite it."
            )
            continue
        answer = pass_statistics([found[k] for k in keys])
        stats[title] = {metric: {REFERENCE_PASS: stat} for metric, stat in answer.items()}
        result.references.append(title)
    return stats


def _note_examples(
    result: SetComparison, rows: dict[str, dict[str, dict[tuple[int, str], dict[str, Any]]]], shared: int
) -> None:
    """Say why fewer examples than the biggest pass file are compared: the runs differ, the passes do, or both."""
    biggest = max(len(found) for per_pass in rows.values() for found in per_pass.values())
    if shared == biggest:
        return
    first = next(iter(rows.values()))
    runs_differ = any(found.keys() != first[p].keys() for per_pass in rows.values() for p, found in per_pass.items())
    short: list[str] = []  # the passes that lack an example another pass of the same run has
    for label, per_pass in rows.items():
        union = set().union(*(found.keys() for found in per_pass.values()))
        short += [f"{label} {p} ({len(found)})" for p, found in per_pass.items() if len(found) < len(union)]
    why = []
    if runs_differ:
        why.append("the runs' example sets differ")
    if short:
        why.append(f"the passes of a run cover different examples ({', '.join(short)})")
    if shared == 0:
        result.notes.append(
            f"{result.set}: {' and '.join(why)}, and no example is in every pass, so values come from results.json "
            "and no p-values are given."
        )
        return
    result.notes.append(
        f"{result.set}: {' and '.join(why)}; compared on the {shared} examples they share (of up to {biggest}), the "
        "same in every pass."
    )


def _bootstrap(
    stats: Stats, groups: dict[str, list[list[str]]], seeds: dict[str, list[Any]], resamples: int, seed: int
) -> Draws:
    """One prompt bootstrap per group of metrics over the same examples, every run's series drawn together.

    Drawing all runs on the same resamples is what pairs a run with the baseline, and lets the runs' intervals be
    read side by side. The judge covers its own subset of examples, so it is its own group. `groups[label]` splits
    a column's passes by training run (one group for a run, one per run for an arm); `seeds[label]` are their
    training seeds, which pair two arms' runs.
    """
    draws: Draws = {}
    metrics = list(dict.fromkeys(m for per in stats.values() for m in per))
    for group in ([m for m in metrics if m != "judge"], [m for m in metrics if m == "judge"]):
        # A metric a run lacks on some pass (the judge) is left to results.json for that run.
        keys = [
            (label, m)
            for label, per in stats.items()
            for m in group
            if all(p in per.get(m, {}) for passes in groups[label] for p in passes)
        ]
        if not keys:
            continue
        series = [[[stats[label][m][p] for p in passes] for passes in groups[label]] for label, m in keys]
        training_seeds = [seeds.get(label, ()) for label, _ in keys]
        boot = arm_bootstrap(series, training_seeds=training_seeds, resamples=resamples, seed=seed)
        if boot is not None:
            draws.update({key: (boot, k) for k, key in enumerate(keys)})
    return draws


def _per_pass_values(
    run: RunData, entry: dict[str, Any], key: str, passes: list[str], statistics: Stats | None
) -> list[float]:
    if statistics is not None:
        per_pass = statistics[run.label].get(key, {})
        if all(p in per_pass for p in passes):
            values = [observed(per_pass[p]) for p in passes]
            return [v for v in values if not math.isnan(v)]
        if key != "judge":
            return []
    per_seed = (entry.get("metrics", {}).get(key) or {}).get("per_seed", {})
    return [float(per_seed[p]) for p in passes if as_number(per_seed.get(p)) is not None]


def _test_against_baseline(result: SetComparison, draws: Draws, baseline: str) -> None:
    for row in result.rows:
        base = draws.get((baseline, row.metric))
        for label, cell in row.cells.items():
            mine = draws.get((label, row.metric))
            if label == baseline or label in result.references or cell is None or base is None or mine is None:
                continue
            if mine[0] is not base[0]:
                continue
            test = mine[0].paired(base[1], mine[1])
            if test is not None:
                cell.delta, cell.delta_ci95 = test.delta, test.ci95
                cell.p_value = cell.p_adjusted = test.p_value
                cell.significant, cell.test = test.significant, test.method
                cell.pairs, cell.unpaired = test.pairs, test.unpaired


def _note_settings(result: SetComparison, entries: dict[str, dict[str, Any]]) -> None:
    settings = {label: entry.get("settings") or {} for label, entry in entries.items()}
    keys = sorted({k for s in settings.values() for k in s})
    differing = [k for k in keys if len({repr(s.get(k)) for s in settings.values()}) > 1]
    if differing:
        detail = "; ".join(
            f"{k}: " + ", ".join(f"{label} {settings[label].get(k)}" for label in settings) for k in differing
        )
        result.notes.append(f"{result.set}: generated with different settings ({detail}).")
