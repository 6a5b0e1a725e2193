"""The training runs of one arm as the prompt bootstrap sees them (`stats.arm_bootstrap`): each run's value and its
draws on the shared resamples, from which come the between-run variance an arm adds to the prompts', and the
per-seed differences that pair two arms run by run (`stats.PromptBootstrap.paired`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

# How a p-value was found, as JSON's `test` and CSV's `test` column name it: the prompt bootstrap (runs), Welch's
# sum of two arms' variances, or the per-seed differences of two arms that share training seeds.
BOOTSTRAP, WELCH, PAIRED_BY_SEED = "bootstrap", "welch", "paired by seed"


def method_label(method: str, pairs: int = 0, unpaired: int = 0) -> str:
    """`method` with the pairs it was paired on and the runs the pairing left out: 'paired by seed (2 pairs; 2
    unpaired)'."""
    if method != PAIRED_BY_SEED:
        return method
    return f"{method} ({pairs} pairs" + (f"; {unpaired} unpaired)" if unpaired else ")")


@dataclass(frozen=True)
class RunSpread:
    """The training runs of one arm on the shared resamples: what the seed adds to the arm mean's variance."""

    observed: np.ndarray  # [R] each run's value (the mean over its passes)
    draws: np.ndarray  # [R, B] each run's value on the shared resamples of prompts
    seeds: tuple[object, ...] = ()  # each run's training seed, where known: what pairs two arms' runs

    @property
    def runs(self) -> int:
        return int(self.observed.shape[0])

    def seed_variance(self) -> float:
        """The runs' sample variance: how much a run's value moves with its training seed, per-prompt noise
        included (on these prompts)."""
        return float(np.var(self.observed, ddof=1))

    def noise_variance(self, kept: np.ndarray) -> float:
        """The part of `seed_variance` that per-prompt noise makes, as the prompt bootstrap sees it too, on the
        resamples `kept` (a mask). A run's deviation from the arm on a resample, θ*_r − θ̄*, varies only through
        that noise (a run's own offset is the same on every resample), with variance (1 − 1/R) times it, so it
        is R/(R − 1) times the mean of those variances."""
        runs = self.runs
        draws = self.draws[:, kept]
        deviation = draws - draws.mean(axis=0, keepdims=True)
        return runs / (runs - 1) * float(np.mean(np.var(deviation, axis=1, ddof=1)))

    def minus(self, other: RunSpread) -> tuple[RunSpread, int] | None:
        """The per-seed differences self_s − other_s on the training seeds both have, as the runs of one arm, and
        how many runs either has beyond them; None where they share fewer than two seeds (or a seed is unknown or
        repeated)."""
        mine, theirs = _seed_index(self.seeds, self.runs), _seed_index(other.seeds, other.runs)
        if mine is None or theirs is None:
            return None
        shared = paired_seeds(mine, theirs)
        if shared is None:
            return None
        left, right = [mine[s] for s in shared], [theirs[s] for s in shared]
        difference = RunSpread(self.observed[left] - other.observed[right], self.draws[left] - other.draws[right])
        return difference, self.runs + other.runs - 2 * len(shared)


def paired_seeds(mine: Iterable[object], theirs: Iterable[object]) -> list[object] | None:
    """The training seeds two arms both have, in `mine`'s order, where they are enough to pair the arms on: two or
    more (one difference has no spread to test with); None where they are not, and the arms are Welch's."""
    others = set(theirs)
    shared = [seed for seed in mine if seed in others]
    return shared if len(shared) >= 2 else None


def _seed_index(seeds: tuple[object, ...], runs: int) -> dict[object, int] | None:
    """Seed → row, where every run's seed is known and none repeats."""
    index = {seed: row for row, seed in enumerate(seeds)}
    return index if len(seeds) == runs and len(index) == runs and None not in index else None
