"""The arithmetic of `kd compare`: a 95 % t confidence interval over seeds and a paired bootstrap over examples.

No scipy: the t quantile comes from the regularised incomplete beta function (a continued fraction, as in
Numerical Recipes §6.4), inverted by bisection, which is exact to ~1e-12 and costs microseconds.

The bootstrap resamples examples, not seeds, because a handful of seeds cannot carry a test. It is paired (both
runs see the same resampled prompts) and stratified by seed (each pass is resampled within itself, and the
statistic is the mean over passes, exactly as `kd eval` reports a set). Resamples are drawn as multinomial counts
per example, so every statistic (a mean, a ratio of sums, corpus-level distinct-n) is a function of a count
matrix and runs vectorised in numpy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

ALPHA = 0.05
DEFAULT_RESAMPLES = 10_000
DEFAULT_SEED = 0
_CELLS_PER_CHUNK = 2_000_000  # resamples × examples held at once: bounds memory at ~16 MB per count matrix


# ------------------------------------------------------------------------------------------------ t interval


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # The continued fraction converges fast only on one side of the mean; use the symmetry on the other.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (0 < p < 1)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0 (got p={p}, df={df})")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * max(1.0, hi):
            break
    return (lo + hi) / 2.0


@dataclass(frozen=True)
class MeanCI:
    mean: float
    half_width: float | None  # None with one value: no interval can be given
    n: int


def mean_ci(values: Sequence[float], level: float = 1.0 - ALPHA) -> MeanCI:
    """Mean ± t_{(1+level)/2, n−1} · s / √n, with s the sample (n−1) standard deviation."""
    n = len(values)
    if n == 0:
        return MeanCI(math.nan, None, 0)
    mean = math.fsum(values) / n
    if n == 1:
        return MeanCI(mean, None, 1)
    s = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return MeanCI(mean, t_quantile((1.0 + level) / 2.0, n - 1) * s / math.sqrt(n), n)


# ------------------------------------------------------------------------------------------------ statistics


class Statistic(Protocol):
    """A metric of one pass as a function of per-example resampling counts."""

    size: int

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        """counts: [B, size] multiplicities (a row of ones is the pass itself) → [B] values."""
        ...


class MeanStat:
    """Per-example values averaged: ROUGE-L, exact match, length."""

    def __init__(self, values: Sequence[float]) -> None:
        self.values = np.asarray(values, dtype=np.float64)
        self.size = len(self.values)

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        return counts @ self.values / max(1, self.size)


class RatioStat:
    """scale · Σ numerator / Σ denominator: the judge score, 100 · Σ model / Σ reference."""

    def __init__(self, numerator: Sequence[float], denominator: Sequence[float], scale: float = 100.0) -> None:
        self.num = np.asarray(numerator, dtype=np.float64)
        self.den = np.asarray(denominator, dtype=np.float64)
        self.scale = scale
        self.size = len(self.num)

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        den = counts @ self.den
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 0, self.scale * (counts @ self.num) / np.where(den > 0, den, 1.0), np.nan)


class DistinctStat:
    """Corpus-level distinct-n (distinct n-grams / all n-grams over the selected responses).

    An n-gram that occurs in one response only is present exactly when that response is drawn, so it is folded into
    a per-example count; only n-grams shared by several responses need the (examples × shared n-grams) matrix,
    which keeps it small.
    """

    def __init__(self, tokenised: Sequence[Sequence[str]], n: int) -> None:
        grams = [[tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)] for tokens in tokenised]
        self.size = len(grams)
        self.totals = np.array([len(g) for g in grams], dtype=np.float64)
        owners: dict[tuple[str, ...], set[int]] = {}
        for i, example in enumerate(grams):
            for gram in example:
                owners.setdefault(gram, set()).add(i)
        self.own = np.zeros(self.size, dtype=np.float64)
        shared = [who for who in owners.values() if len(who) > 1]
        for who in owners.values():
            if len(who) == 1:
                self.own[next(iter(who))] += 1
        self.shared = np.zeros((self.size, len(shared)), dtype=np.float32)
        for j, who in enumerate(shared):
            self.shared[list(who), j] = 1.0

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        present = (counts > 0).astype(np.float32)
        unique = present.astype(np.float64) @ self.own
        if self.shared.shape[1]:
            unique = unique + ((present @ self.shared) > 0).sum(axis=1)
        total = counts @ self.totals
        return np.where(total > 0, unique / np.where(total > 0, total, 1.0), 0.0)


def observed(stat: Statistic) -> float:
    return float(stat(np.ones((1, stat.size)))[0])


# ------------------------------------------------------------------------------------------------ bootstrap


@dataclass(frozen=True)
class BootstrapResult:
    delta: float  # run − baseline, mean over strata
    p_value: float  # two-sided
    resamples: int

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA


def paired_bootstrap(
    strata: Iterable[tuple[Statistic, Statistic]],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> BootstrapResult | None:
    """Two-sided paired bootstrap test of `run − baseline`, stratified by pass.

    Each stratum is (baseline statistic, run statistic) over the same examples in the same order. Per resample,
    every stratum's examples are redrawn with replacement (the same draw for both runs: the pairing), and the
    difference is the mean over strata. The p-value is that of the shifted bootstrap distribution (Efron &
    Tibshirani 1993, §16.4): p = (1 + #{|δ* − δ̂| ≥ |δ̂|}) / (1 + B), which is never 0, as a p-value from B
    resamples should not be. None when no stratum has examples.
    """
    return paired_bootstrap_many([[pair] for pair in strata], resamples=resamples, seed=seed)[0]


def paired_bootstrap_many(
    strata: Sequence[Sequence[tuple[Statistic, Statistic]]],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> list[BootstrapResult | None]:
    """`paired_bootstrap` for K metrics at once: `strata[s][k]` is metric k's (baseline, run) pair in stratum s,
    all over that stratum's examples. One draw of counts per stratum serves every metric, which is where the time
    goes."""
    k = max((len(pairs) for pairs in strata), default=1)
    strata = [pairs for pairs in strata if pairs and pairs[0][0].size]
    if not strata:
        return [None] * k
    rng = np.random.default_rng(seed)
    deltas = np.array([[observed(b) - observed(a) for a, b in pairs] for pairs in strata]).mean(axis=0)
    boot = np.zeros((k, resamples), dtype=np.float64)
    for pairs in strata:
        n = pairs[0][0].size
        if any(a.size != n or b.size != n for a, b in pairs):
            raise ValueError("every statistic of a stratum must cover the same examples")
        chunk = max(1, _CELLS_PER_CHUNK // n)
        probs = np.full(n, 1.0 / n)
        for start in range(0, resamples, chunk):
            counts = rng.multinomial(n, probs, size=min(chunk, resamples - start)).astype(np.float64)
            for j, (base, run) in enumerate(pairs):
                boot[j, start : start + len(counts)] += run(counts) - base(counts)
    boot /= len(strata)
    results: list[BootstrapResult | None] = []
    for j in range(k):
        delta = float(deltas[j])
        if np.isnan(delta):
            results.append(None)
            continue
        # A relative tolerance so that resamples equal to the observed difference up to rounding count as extreme.
        extreme = np.abs(boot[j] - delta) >= abs(delta) - 1e-9 * max(1.0, abs(delta))
        extreme &= ~np.isnan(boot[j])
        results.append(BootstrapResult(delta, float((1 + extreme.sum()) / (1 + resamples)), resamples))
    return results
