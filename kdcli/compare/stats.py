"""The arithmetic of `kd compare`: a prompt-level bootstrap (intervals and paired tests) and a t interval over seeds.

The bootstrap's unit is the prompt. A set is evaluated on S passes (seeds) of the same n prompts, and a prompt
that one run answers well tends to be answered well under every seed: the seeds are repeated measures of a prompt,
not S independent samples of prompts. So each resample draws the n prompts once, with replacement, as multinomial
counts, and that one count vector is applied to every pass of every run. A run's resampled metric is the mean over
its passes of the metric recomputed on the resample, exactly as `kd eval` reports a set; the percentile interval
of those values is the metric's 95 % interval over prompts, and run − baseline on the same resamples gives the
paired test and the delta's interval. (Redrawing every pass's prompts independently would count each prompt's
advantage S times as if it were fresh evidence: p-values far too small, intervals too narrow.) Every statistic —
a mean, a ratio of sums, corpus-level distinct-n — is a function of the count matrix, so it runs vectorised in
numpy.

The t interval over per-seed values measures something else: how much the score moves from seed to seed on these
prompts. It says nothing about prompt sampling, so `kd compare` shows it beside the bootstrap interval, not in its
place.

No scipy: the t quantile comes from the regularised incomplete beta function (a continued fraction, as in
Numerical Recipes §6.4), inverted by bisection, which is exact to ~1e-12 and costs microseconds.
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


def percentile_interval(
    draws: np.ndarray, centre: float | None = None, level: float = 1.0 - ALPHA
) -> tuple[float, float] | None:
    """The central `level` percentile interval of bootstrap draws; None when no draw is finite (NaN draws, a ratio
    with nothing under it, are left out).

    With `centre` (the observed value) the interval is moved by the bootstrap's own estimate of its bias, the mean
    of the draws − `centre`. For a mean over prompts that bias is zero up to Monte Carlo error, so this is the plain
    percentile interval. It matters for corpus-level distinct-n: a resample repeats prompts, and a repeated answer
    adds n-grams but no new distinct ones, which drags every resampled value down (by a quarter and more on a few
    dozen prompts), so that the plain interval need not even contain the observed value.
    """
    finite = draws[np.isfinite(draws)]
    if not finite.size:
        return None
    low, high = np.quantile(finite, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    shift = 0.0 if centre is None or not math.isfinite(centre) else float(finite.mean()) - centre
    return float(low) - shift, float(high) - shift


@dataclass(frozen=True)
class BootstrapResult:
    delta: float  # run − baseline, mean over passes
    p_value: float  # two-sided
    resamples: int
    ci95: tuple[float, float] | None = None  # percentile interval of the resampled deltas, bias-centred

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA


@dataclass(frozen=True)
class PromptBootstrap:
    """K series resampled together: `observed[k]` is series k's value (the mean over its passes of its statistic)
    and `draws[k]` its B values on the same B resamples of prompts, so any two series can be paired."""

    observed: np.ndarray  # [K]
    draws: np.ndarray  # [K, B]

    @property
    def resamples(self) -> int:
        return int(self.draws.shape[1])

    def interval(self, k: int, level: float = 1.0 - ALPHA) -> tuple[float, float] | None:
        """Percentile interval of series k over resamples of prompts (bias-centred: `percentile_interval`)."""
        return percentile_interval(self.draws[k], float(self.observed[k]), level)

    def paired(self, base: int, run: int) -> BootstrapResult | None:
        """Two-sided test of series `run` − series `base`, paired through the shared resamples.

        The p-value is that of the bootstrap distribution shifted to the null (Efron & Tibshirani 1993, §16.4):
        p = (1 + #{|δ* − mean δ*| ≥ |δ̂|}) / (1 + B), which is never 0, as a p-value from B resamples should not
        be. For a mean, mean δ* is δ̂ up to Monte Carlo error; centring on the draws' own mean keeps a statistic
        that resampling biases (distinct-n) from reading its bias as evidence. None when δ̂ is not a number.
        """
        delta = float(self.observed[run] - self.observed[base])
        if math.isnan(delta):
            return None
        boot = self.draws[run] - self.draws[base]
        finite = boot[np.isfinite(boot)]
        if not finite.size:
            return None
        centre = float(finite.mean())
        # A relative tolerance so that resamples as far out as the observed difference up to rounding count.
        extreme = np.abs(finite - centre) >= abs(delta) - 1e-9 * max(1.0, abs(delta))
        p_value = float((1 + extreme.sum()) / (1 + finite.size))
        return BootstrapResult(delta, p_value, self.resamples, percentile_interval(boot, delta))


def prompt_bootstrap(
    series: Sequence[Sequence[Statistic]],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> PromptBootstrap | None:
    """Resample prompts once per draw and apply that draw to every pass of every series.

    `series[k]` holds series k's statistic on each of its passes (a run's metric on each seed). Every statistic
    must cover the same prompts in the same order: then one count vector over prompts is the same resample for
    every pass and every run, which is what makes the seeds repeated measures of a prompt rather than fresh
    evidence, and what pairs the runs. None when there is no series or no prompt.
    """
    series = [list(passes) for passes in series]
    if not series:
        return None
    if any(not passes for passes in series):
        raise ValueError("every series needs at least one pass")
    n = series[0][0].size
    if any(stat.size != n for passes in series for stat in passes):
        raise ValueError("every statistic must cover the same prompts, aligned in one order")
    if n == 0:
        return None
    observed_values = np.array([math.fsum(observed(stat) for stat in passes) / len(passes) for passes in series])
    draws = np.zeros((len(series), resamples), dtype=np.float64)
    rng = np.random.default_rng(seed)
    chunk = max(1, _CELLS_PER_CHUNK // n)
    probs = np.full(n, 1.0 / n)
    for start in range(0, resamples, chunk):
        counts = rng.multinomial(n, probs, size=min(chunk, resamples - start)).astype(np.float64)
        stop = start + len(counts)
        for k, passes in enumerate(series):
            for stat in passes:
                draws[k, start:stop] += stat(counts)
    draws /= np.array([len(passes) for passes in series], dtype=np.float64)[:, None]
    return PromptBootstrap(observed_values, draws)


def paired_bootstrap(
    passes: Iterable[tuple[Statistic, Statistic]],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> BootstrapResult | None:
    """Two-sided paired bootstrap test of `run − baseline` over prompts, with the passes as repeated measures.

    Each pass is a (baseline statistic, run statistic) pair, and every statistic of every pass covers the same
    prompts in the same order (a ValueError otherwise). Per resample, the prompts are redrawn with replacement
    once, and that draw serves both runs (the pairing) and every pass (prompts, not (prompt, seed) pairs, are the
    independent units); the difference is the mean over passes. See `PromptBootstrap.paired` for the p-value.
    None when there are no passes or no prompts.
    """
    pairs = list(passes)
    if not pairs:
        return None
    boot = prompt_bootstrap([[a for a, _ in pairs], [b for _, b in pairs]], resamples=resamples, seed=seed)
    return None if boot is None else boot.paired(0, 1)
