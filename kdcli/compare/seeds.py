"""The training table across training seeds (`kd compare --pool-seeds`): is an arm's eval CE lower than the
baseline arm's, or is the gap within what a training seed alone moves it?

The eval table's tests count prompts and sampling seeds; a training number (eval CE at the end of training) has no
prompts to resample: its only spread is the training seed's, one value a run. So each arm against the baseline arm
gets a t test on those values:

- **Paired by training seed** on the seeds both arms have, where they share two or more: `kd distill --grid
  seed=...` gives every arm's seed-s run the same data order, so the differences d_s = arm_s − baseline_s cancel
  what the order alone does. Δ = mean d, its 95% interval mean ± t(0.975, n−1)·sd(d)/√n, and the p of
  t = mean/(sd/√n) with n − 1 df, n the pairs. A run whose seed the other arm lacks is left out of the test.
- **Welch** where they share fewer than two: Δ = the difference of means, its variance s_a²/n_a + s_b²/n_b, and
  Welch–Satterthwaite degrees of freedom.
- Where every pair (or every run) differs by exactly the same amount there is no spread to test with: p is n/a.

The row's p-values are adjusted for their number as the eval tables' are (`multiple.adjust_p_values`). With 5 runs
an arm the paired test has 4 df; its calibration is tested by simulation in tests/test_compare_seeds.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kdcli.compare.arms import training_seed
from kdcli.compare.multiple import adjust_p_values
from kdcli.compare.ranking import as_number
from kdcli.compare.runs import RunData
from kdcli.compare.spread import paired_seeds
from kdcli.compare.student_t import ALPHA, t_cdf, t_quantile

# Training numbers that are tested across seeds: the one kd compare ranks across divergences.
TESTED = {"eval_ce": "eval CE (end)"}


@dataclass
class SeedTest:
    key: str  # a training row's key (`TESTED`)
    run: str  # the arm's label
    baseline: str
    delta: float  # run − baseline
    ci95: tuple[float, float] | None  # None where no interval can be given
    p_value: float  # NaN where nothing can be tested (`untested` says why)
    p_adjusted: float
    significant: bool
    paired: bool  # by training seed (else Welch)
    pairs: int  # the seeds both arms have, where paired
    runs: int  # the arm's runs
    baseline_runs: int
    df: float
    adjust: str  # how the row's p-values were adjusted (`multiple.ADJUSTMENTS`)
    untested: str = ""  # why p is n/a

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> SeedTest:
        """From `kd compare --format json`'s `training_tests`, where NaN is written as null."""
        fields = dict(data)
        for name in ("delta", "p_value", "p_adjusted", "df"):
            fields[name] = math.nan if fields.get(name) is None else fields[name]
        fields["ci95"] = tuple(fields["ci95"]) if fields.get("ci95") else None  # type: ignore[arg-type]
        return cls(**fields)  # type: ignore[arg-type]


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
    if se == 0.0:  # every pair (or run) differs by the same amount: no spread to test with
        return Difference(delta, None, math.nan, df)
    half = t_quantile(1.0 - ALPHA / 2.0, df) * se
    p = 2.0 * (1.0 - t_cdf(abs(delta) / se, df))
    return Difference(delta, (delta - half, delta + half), min(1.0, p), df)


def unpaired(test: SeedTest) -> int:
    """The runs of either arm a paired test left out, their seed missing from the other arm."""
    return test.runs + test.baseline_runs - 2 * test.pairs if test.paired else 0


def seed_tests(runs: Sequence[RunData], baseline: str, adjust: str) -> list[SeedTest]:
    """Each arm of two or more runs against the baseline arm, on every `TESTED` number, p-values adjusted per row."""
    base = next((run for run in runs if run.label == baseline), None)
    if base is None or len(base.folders()) < 2:
        return []
    tests: list[SeedTest] = []
    for key in TESTED:
        base_values = _values(base, key)
        if base_values is None:
            continue
        row = [
            _test(key, run.label, baseline, values, base_values, adjust)
            for run in runs
            if run.label != baseline and len(run.folders()) >= 2
            for values in [_values(run, key)]
            if values is not None
        ]
        for test, p_adjusted in zip(row, adjust_p_values([t.p_value for t in row], adjust), strict=True):
            test.p_adjusted = p_adjusted
            test.significant = p_adjusted < ALPHA
        tests.extend(row)
    return tests


def _test(
    key: str, run: str, baseline: str, values: dict[Any, float], base_values: dict[Any, float], adjust: str
) -> SeedTest:
    shared = paired_seeds(base_values, values) or []
    paired = bool(shared)
    if paired:
        found = paired_difference([values[s] for s in shared], [base_values[s] for s in shared])
    else:
        found = welch_difference(list(values.values()), list(base_values.values()))
    untested = ""
    if math.isnan(found.p_value):
        untested = "no difference in any run" if found.delta == 0.0 else "the same difference in every run"
    return SeedTest(
        key=key,
        run=run,
        baseline=baseline,
        delta=found.delta,
        ci95=found.ci95,
        p_value=found.p_value,
        p_adjusted=math.nan,
        significant=False,
        paired=paired,
        pairs=len(shared),
        runs=len(values),
        baseline_runs=len(base_values),
        df=found.df,
        adjust=adjust,
        untested=untested,
    )


def _values(run: RunData, key: str) -> dict[Any, float] | None:
    """A number of each of the arm's runs, by training seed (as `pool_seeds` tells them apart); None when a run
    lacks it."""
    values: dict[Any, float] = {}
    for member in run.folders():
        value = as_number((member.run.eval_after or {}).get(key))
        if value is None:
            return None
        values[training_seed(member)] = float(value)
    return values
