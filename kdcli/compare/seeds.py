"""The training table across training seeds (`kd compare --pool-seeds`): is an arm's eval CE lower than the
baseline arm's, or is the gap within what a training seed alone moves it?

The eval table's tests count prompts and sampling seeds; a training number (eval CE at the end of training) has no
prompts to resample: its only spread is the training seed's, one value a run. So each arm against the baseline arm
gets a t test on those values:

- **Paired by training seed** where both arms have the same seeds: `kd distill --grid seed=...` gives every arm's
  seed-s run the same data order, so the differences d_s = arm_s − baseline_s cancel what the order alone does.
  Δ = mean d, its 95% interval mean ± t(0.975, n−1)·sd(d)/√n, and the p of t = mean/(sd/√n) with n − 1 df.
- **Welch** where the seeds differ: Δ = the difference of means, its variance s_a²/n_a + s_b²/n_b, and
  Welch–Satterthwaite degrees of freedom.

The row's p-values are adjusted for their number as the eval tables' are (`multiple.adjust_p_values`). With 5 runs
an arm the paired test has 4 df; its calibration is tested by simulation in tests/test_compare_seeds.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from kdcli.compare.arms import training_seed
from kdcli.compare.multiple import adjust_p_values
from kdcli.compare.ranking import as_number
from kdcli.compare.runs import RunData
from kdcli.compare.student_t import ALPHA, t_cdf, t_quantile

# Training numbers that are tested across seeds: the one kd compare ranks across divergences.
TESTED = {"eval_ce": "eval CE (end)"}


@dataclass
class SeedTest:
    key: str  # a training row's key (`TESTED`)
    run: str  # the arm's label
    baseline: str
    delta: float  # run − baseline
    ci95: tuple[float, float] | None  # None where no interval can be given (one value on a side)
    p_value: float  # NaN where nothing can be tested
    p_adjusted: float
    significant: bool
    paired: bool  # by training seed
    df: float
    runs: int  # the arm's runs (the pairs, where paired)
    adjust: str  # how the row's p-values were adjusted (`multiple.ADJUSTMENTS`)


@dataclass(frozen=True)
class Difference:
    delta: float
    ci95: tuple[float, float] | None
    p_value: float
    df: float


def paired_difference(values: Sequence[float], baseline: Sequence[float]) -> Difference:
    """Student's t on the per-seed differences `values[i] − baseline[i]` (n − 1 df)."""
    differences = [a - b for a, b in zip(values, baseline, strict=True)]
    n = len(differences)
    mean = math.fsum(differences) / n
    if n < 2:
        return Difference(mean, None, math.nan, 0.0)
    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in differences) / (n - 1))
    return _t(mean, sd / math.sqrt(n), n - 1)


def welch_difference(values: Sequence[float], baseline: Sequence[float]) -> Difference:
    """Welch's t on mean(values) − mean(baseline), Welch–Satterthwaite degrees of freedom."""
    mean_a, mean_b = math.fsum(values) / len(values), math.fsum(baseline) / len(baseline)
    if len(values) < 2 or len(baseline) < 2:
        return Difference(mean_a - mean_b, None, math.nan, 0.0)
    share_a, share_b = _variance(values) / len(values), _variance(baseline) / len(baseline)
    se2 = share_a + share_b
    if se2 == 0.0:
        return _t(mean_a - mean_b, 0.0, len(values) + len(baseline) - 2)
    df = se2**2 / (share_a**2 / (len(values) - 1) + share_b**2 / (len(baseline) - 1))
    return _t(mean_a - mean_b, math.sqrt(se2), df)


def _variance(values: Sequence[float]) -> float:
    mean = math.fsum(values) / len(values)
    return math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)


def _t(delta: float, se: float, df: float) -> Difference:
    if se == 0.0:  # every run moved by the same amount: certain if it moved, nothing to test if not
        return Difference(delta, (delta, delta), 0.0 if delta != 0.0 else math.nan, df)
    half = t_quantile(1.0 - ALPHA / 2.0, df) * se
    p = 2.0 * (1.0 - t_cdf(abs(delta) / se, df))
    return Difference(delta, (delta - half, delta + half), min(1.0, p), df)


def seed_tests(runs: Sequence[RunData], baseline: str, adjust: str) -> list[SeedTest]:
    """Each arm of two or more runs against the baseline arm, on every `TESTED` number, p-values adjusted per row."""
    by_label = {run.label: run for run in runs}
    base = by_label.get(baseline)
    if base is None or len(base.folders()) < 2:
        return []
    tests: list[SeedTest] = []
    for key in TESTED:
        row: list[SeedTest] = []
        base_values = _values(base, key)
        if base_values is None:
            continue
        for run in runs:
            if run.label == baseline or len(run.folders()) < 2:
                continue
            values = _values(run, key)
            if values is None:
                continue
            paired = sorted(values) == sorted(base_values)
            if paired:
                seeds = sorted(values)
                found = paired_difference([values[s] for s in seeds], [base_values[s] for s in seeds])
            else:
                found = welch_difference(list(values.values()), list(base_values.values()))
            row.append(
                SeedTest(
                    key=key,
                    run=run.label,
                    baseline=baseline,
                    delta=found.delta,
                    ci95=found.ci95,
                    p_value=found.p_value,
                    p_adjusted=math.nan,
                    significant=False,
                    paired=paired,
                    df=found.df,
                    runs=len(values),
                    adjust=adjust,
                )
            )
        for test, p_adjusted in zip(row, adjust_p_values([t.p_value for t in row], adjust), strict=True):
            test.p_adjusted = p_adjusted
            test.significant = p_adjusted < ALPHA
        tests.extend(row)
    return tests


def _values(run: RunData, key: str) -> dict[str, float] | None:
    """A number of each of the arm's runs, by training seed; None when a run lacks it."""
    values: dict[str, float] = {}
    for member in run.folders():
        value = as_number((member.run.eval_after or {}).get(key))
        if value is None:
            return None
        values[str(training_seed(member))] = float(value)
    return values
