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

An arm (`kd compare --pool-seeds`) is several training runs of one recipe that differ only in `seed`. Its value is
the mean over its runs, and a training seed is a second source of chance the prompt bootstrap cannot see: a run
that came out better is better on every prompt. So an arm's variance is Welch's, the sample variance of its run
values over the number of runs (exact on these prompts), plus what the prompt bootstrap adds beyond the per-prompt
noise already inside those run values (the prompts' own effect, estimated from the same resamples, so nothing is
counted twice). With three runs that variance is itself uncertain, so intervals and p-values use Student's t with
Welch–Satterthwaite degrees of freedom instead of the bootstrap's percentiles.

Two arms whose runs share training seeds are tested paired by seed, as the training table's eval CE is
(`seeds`): `kd distill --grid seed=...` gives every arm's seed-s run the same data order, so a seed that helps one
arm tends to help the other. The per-seed differences d_s then stand in for the two arms' runs: Δ is their mean,
and the variance is theirs over the number of pairs plus the prompts' part, computed as for one arm of runs d_s.
Runs whose seed the other arm lacks are left out of that test (`BootstrapResult.unpaired`); arms sharing fewer
than two seeds are tested by Welch's sum.

The t quantiles are `student_t`'s.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kdcli.compare.spread import BOOTSTRAP, PAIRED_BY_SEED, WELCH, RunSpread
from kdcli.compare.student_t import ALPHA, t_cdf, t_quantile

DEFAULT_RESAMPLES = 10_000
DEFAULT_SEED = 0
_CELLS_PER_CHUNK = 2_000_000  # resamples × examples held at once: bounds memory at ~16 MB per count matrix


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


Bounds = tuple[float, float]  # a metric that lives in [low, high]: distinct-n and the stop rate in [0, 1]
_EDGE = 1e-9  # how close to a bound a value may come on the logit scale


def _to_logit(x: np.ndarray | float, bounds: Bounds) -> np.ndarray:
    low, high = bounds
    u = np.clip((np.asarray(x, dtype=np.float64) - low) / (high - low), _EDGE, 1.0 - _EDGE)
    return np.log(u) - np.log1p(-u)


def _from_logit(z: np.ndarray | float, bounds: Bounds) -> float:
    low, high = bounds
    return float(low + (high - low) / (1.0 + np.exp(-np.asarray(z, dtype=np.float64))))


def percentile_interval(
    draws: np.ndarray, centre: float | None = None, level: float = 1.0 - ALPHA, bounds: Bounds | None = None
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
    if bounds is not None:  # the same interval on the logit scale, so that the bias shift keeps it in its bounds
        if centre is None or not math.isfinite(centre):
            low, high = np.quantile(finite, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
            return float(low), float(high)
        logits = _to_logit(finite, bounds)
        low, high = np.quantile(logits, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
        shift = float(logits.mean() - _to_logit(centre, bounds))
        return _from_logit(low - shift, bounds), _from_logit(high - shift, bounds)
    low, high = np.quantile(finite, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    shift = 0.0 if centre is None or not math.isfinite(centre) else float(finite.mean()) - centre
    return float(low) - shift, float(high) - shift


@dataclass(frozen=True)
class BootstrapResult:
    delta: float  # run − baseline, mean over passes
    p_value: float  # two-sided
    resamples: int
    ci95: tuple[float, float] | None = None  # percentile interval of the resampled deltas, bias-centred
    pairs: int = 0  # arms tested paired by training seed: the seeds both have (0: not paired)
    unpaired: int = 0  # runs of either arm left out of a paired test, their seed missing from the other arm
    method: str = BOOTSTRAP  # the prompt bootstrap's p; WELCH or PAIRED_BY_SEED where arms of runs are tested

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA  # False for NaN: nothing was tested


@dataclass(frozen=True)
class PromptBootstrap:
    """K series resampled together: `observed[k]` is series k's value (the mean over its passes of its statistic)
    and `draws[k]` its B values on the same B resamples of prompts, so any two series can be paired.

    `spreads[k]` is set where series k is an arm of several training runs (`arm_bootstrap`); its intervals and
    tests then add the between-run variance, with t quantiles (module docstring)."""

    observed: np.ndarray  # [K]
    draws: np.ndarray  # [K, B]
    prompts: int = 0  # n, the prompts resampled: the degrees of freedom of the prompt part
    spreads: tuple[RunSpread | None, ...] = ()

    @property
    def resamples(self) -> int:
        return int(self.draws.shape[1])

    def _spread(self, k: int) -> RunSpread | None:
        return self.spreads[k] if k < len(self.spreads) else None

    def _t_interval(
        self, centre: float, boot: np.ndarray, spreads: Sequence[RunSpread], level: float
    ) -> tuple[tuple[float, float], float, float] | None:
        """(interval, standard error, degrees of freedom) of `centre`, a value or difference whose runs are
        `spreads` (an arm's, two arms', or the per-seed differences of two).

        The variance is Σ s²_k / R_k over the spreads (their seed variance, Welch's term) plus what the prompt
        bootstrap of `boot` adds beyond the per-prompt noise those terms already hold (the prompts' own effect;
        floored at 0), with Welch–Satterthwaite degrees of freedom, all on the resamples where every run's value
        is a number. None when fewer than two are, or when a run's own value is not a number.
        """
        kept = np.isfinite(boot)
        for spread in spreads:
            if not np.all(np.isfinite(spread.observed)):
                return None
            kept &= np.all(np.isfinite(spread.draws), axis=0)
        if int(kept.sum()) < 2 or not math.isfinite(centre):
            return None
        prompt_part = float(np.var(boot[kept], ddof=1))
        parts: list[tuple[float, float]] = []
        for spread in spreads:
            parts.append((spread.seed_variance() / spread.runs, spread.runs - 1))
            prompt_part -= spread.noise_variance(kept) / spread.runs
        parts.append((max(0.0, prompt_part), max(1, self.prompts - 1)))
        variance = math.fsum(v for v, _ in parts)
        if variance <= 0.0:
            return (centre, centre), 0.0, math.inf
        df = variance * variance / math.fsum(v * v / df for v, df in parts)
        se = math.sqrt(variance)
        half = t_quantile((1.0 + level) / 2.0, df) * se
        return (centre - half, centre + half), se, df

    def interval(self, k: int, level: float = 1.0 - ALPHA, bounds: Bounds | None = None) -> tuple[float, float] | None:
        """Percentile interval of series k over resamples of prompts (bias-centred: `percentile_interval`); for an
        arm of several runs, the t interval with the between-run variance added. With `bounds`, both are taken on
        the logit scale (the t interval by the delta method), so they stay inside them."""
        centre = float(self.observed[k])
        if self._spread(k) is None:
            return percentile_interval(self.draws[k], centre, level, bounds)
        found = self._t_interval(centre, self.draws[k], [self.spreads[k]], level)
        if found is None or bounds is None:
            return None if found is None else found[0]
        _, se, df = found
        slope = (centre - bounds[0]) * (bounds[1] - centre) / (bounds[1] - bounds[0])  # d value / d logit
        if slope <= 0.0 or se == 0.0:
            return centre, centre
        half = t_quantile((1.0 + level) / 2.0, df) * se / slope
        logit = float(_to_logit(centre, bounds))
        return _from_logit(logit - half, bounds), _from_logit(logit + half, bounds)

    def paired(self, base: int, run: int) -> BootstrapResult | None:
        """Two-sided test of series `run` − series `base`, paired through the shared resamples, and for two arms of
        runs also by training seed where they share two or more (module docstring).

        The p-value is that of the bootstrap distribution shifted to the null (Efron & Tibshirani 1993, §16.4):
        p = (1 + #{|δ* − mean δ*| ≥ |δ̂|}) / (1 + B), which is never 0, as a p-value from B resamples should not
        be. For a mean, mean δ* is δ̂ up to Monte Carlo error; centring on the draws' own mean keeps a statistic
        that resampling biases (distinct-n) from reading its bias as evidence. None when δ̂ is not a number (for
        arms paired by seed, δ̂ of the pairs: a run the pairing leaves out does not count).
        """
        delta = float(self.observed[run] - self.observed[base])
        boot = self.draws[run] - self.draws[base]
        mine, theirs = self._spread(run), self._spread(base)
        if mine is not None or theirs is not None:
            spreads = [spread for spread in (theirs, mine) if spread is not None]
            pairs = unpaired = 0
            paired = mine.minus(theirs) if mine is not None and theirs is not None else None
            if paired is not None:
                difference, unpaired = paired
                spreads, pairs = [difference], difference.runs
                delta = math.fsum(difference.observed) / pairs
                boot = difference.draws.mean(axis=0)
            if math.isnan(delta):
                return None
            found = self._t_interval(delta, boot, spreads, 1.0 - ALPHA)
            if found is None:
                return None
            interval, se, df = found
            p_value = 2.0 * (1.0 - t_cdf(abs(delta) / se, df)) if se > 0.0 else math.nan if delta == 0.0 else 0.0
            # se 0: every run and resample agree; a difference of 0 is then no evidence either way
            method = PAIRED_BY_SEED if pairs else WELCH
            return BootstrapResult(delta, p_value, self.resamples, interval, pairs, unpaired, method)
        if math.isnan(delta):
            return None
        finite = boot[np.isfinite(boot)]
        if not finite.size:
            return None
        if delta == 0.0 and not finite.any():  # the two series agree on every prompt: nothing to test
            return BootstrapResult(delta, math.nan, self.resamples, (0.0, 0.0))
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
    return arm_bootstrap([[list(passes)] for passes in series], resamples=resamples, seed=seed)


def arm_bootstrap(
    arms: Sequence[Sequence[Sequence[Statistic]]],
    *,
    training_seeds: Sequence[Sequence[object]] = (),
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> PromptBootstrap | None:
    """`prompt_bootstrap` for arms of training runs: `arms[k][r]` holds run r's statistic on each of its passes,
    and `training_seeds[k][r]`, where given, run r's training seed (what pairs two arms' runs).

    Every pass of every run of every arm is drawn on the same resamples of prompts. An arm's value is the mean over
    its runs of each run's mean over its passes; an arm of one run is exactly `prompt_bootstrap`'s series, and an
    arm of several carries its runs' values (`RunSpread`) for the between-run variance.
    """
    arms = [[list(passes) for passes in runs] for runs in arms]
    if not arms:
        return None
    if any(not runs or any(not passes for passes in runs) for runs in arms):
        raise ValueError("every series needs at least one pass")
    n = arms[0][0][0].size
    if any(stat.size != n for runs in arms for passes in runs for stat in passes):
        raise ValueError("every statistic must cover the same prompts, aligned in one order")
    if n == 0:
        return None
    flat = [passes for runs in arms for passes in runs]
    run_observed = np.array([math.fsum(observed(stat) for stat in passes) / len(passes) for passes in flat])
    run_draws = np.zeros((len(flat), resamples), dtype=np.float64)
    rng = np.random.default_rng(seed)
    chunk = max(1, _CELLS_PER_CHUNK // n)
    probs = np.full(n, 1.0 / n)
    for start in range(0, resamples, chunk):
        counts = rng.multinomial(n, probs, size=min(chunk, resamples - start)).astype(np.float64)
        stop = start + len(counts)
        for k, passes in enumerate(flat):
            for stat in passes:
                run_draws[k, start:stop] += stat(counts)
    run_draws /= np.array([len(passes) for passes in flat], dtype=np.float64)[:, None]
    observed_values, draws, spreads = [], [], []
    first = 0
    for k, runs in enumerate(arms):
        own = slice(first, first + len(runs))
        first += len(runs)
        if len(runs) == 1:
            observed_values.append(float(run_observed[own][0]))
            draws.append(run_draws[own][0])
            spreads.append(None)
        else:
            observed_values.append(math.fsum(run_observed[own]) / len(runs))
            draws.append(run_draws[own].mean(axis=0))
            seeds = tuple(training_seeds[k]) if k < len(training_seeds) else ()
            spreads.append(RunSpread(run_observed[own].copy(), run_draws[own].copy(), seeds))
    return PromptBootstrap(np.array(observed_values), np.stack(draws), n, tuple(spreads))


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
