"""Is `kd compare`'s p-value a p-value? Null replications through the public `kd compare --format json` path.

The simulation is the situation that broke the old design: two runs from the same distribution, 40 prompts, 3
seeds. A prompt has a difficulty both runs share, each run has its own per-prompt effect that every seed repeats,
and each (prompt, seed) adds its own noise. The length metric carries it, since a pass file's `tokens` are
written as drawn. Prompts are the independent units here, so a calibrated test rejects at p < 0.05 in about 5 % of
replications. Redrawing each seed's prompts independently (the old design, reimplemented below as a reference)
counts every prompt's advantage three times as if it were new evidence and rejects far more often.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from compare_fixtures import add_eval, make_run
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.compare.stats import MeanStat, paired_bootstrap
from kdcli.evaluation import metrics

PROMPTS = 40
SEEDS = (10, 20, 30)
# Token-count scales: prompt difficulty (shared by the runs), a run's own per-prompt effect (shared by the seeds),
# and per-(prompt, seed) noise. The run effect dominating the seed noise is what the old design got most wrong.
DIFFICULTY, RUN_EFFECT, SEED_NOISE = 20.0, 10.0, 4.0
MEAN_TOKENS = 100.0
RESAMPLES = 400  # resolution 1/401 of the p-value: plenty at a 0.05 threshold, and cheap
NULL_REPLICATIONS = 200
POWER_REPLICATIONS = 40
SHIFT = 8.0  # tokens added to the second run: ≈ 3.5 standard errors of the delta in this simulation

runner = CliRunner()


def simulate(rng: np.random.Generator, shift: float = 0.0) -> np.ndarray:
    """Token counts [run, seed, prompt] of two runs on the same prompts; the second run's mean is `shift` higher."""
    difficulty = rng.normal(0.0, DIFFICULTY, PROMPTS)
    own = rng.normal(0.0, RUN_EFFECT, (2, 1, PROMPTS))
    noise = rng.normal(0.0, SEED_NOISE, (2, len(SEEDS), PROMPTS))
    tokens = MEAN_TOKENS + difficulty + own + noise
    tokens[1] += shift
    # Whole tokens, as kd eval writes them; 1 is over four standard deviations below the mean, so the clip is inert.
    return np.clip(np.rint(tokens), 1, None)


@pytest.fixture
def memoised_rouge(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every replication writes the same answers, and ROUGE-L of them (the fixture's score_pass and kd compare's
    recomputation) would otherwise be most of this test's time, for numbers it never reads."""
    original = metrics.rouge_l
    cache: dict[tuple[str, tuple[str, ...]], float] = {}

    def rouge_l(prediction: str, references: Sequence[str]) -> float:
        key = (prediction, tuple(references))
        if key not in cache:
            cache[key] = original(prediction, references)
        return cache[key]

    monkeypatch.setattr(metrics, "rouge_l", rouge_l)


def _write(run: Path, tokens: np.ndarray) -> None:
    """One run's [seed, prompt] token counts as kd eval's pass files and results.json (overwriting the last ones)."""
    row = {seed: i for i, seed in enumerate(SEEDS)}
    add_eval(run, lambda seed, index: (f"answer {index}", int(tokens[row[seed], index])), seeds=SEEDS, examples=PROMPTS)


def _compare_length(a: Path, b: Path) -> dict:
    result = runner.invoke(app, ["compare", str(a), str(b), "--format", "json", "--resamples", str(RESAMPLES)])
    assert result.exit_code == 0, result.output
    (evaluation,) = json.loads(result.output)["evaluation"]
    assert evaluation["passes"] == [f"seed-{s}" for s in SEEDS] and evaluation["examples"] == PROMPTS
    return next(row for row in evaluation["rows"] if row["metric"] == "length")["cells"]


@pytest.mark.usefixtures("memoised_rouge")
def test_kd_compare_p_values_are_calibrated_over_null_replications_and_have_power(tmp_path: Path) -> None:
    a, b = make_run(tmp_path, "a", steps=2), make_run(tmp_path, "b", steps=2)
    rng = np.random.default_rng(2024)
    nulls = []
    for _ in range(NULL_REPLICATIONS):
        tokens = simulate(rng)
        _write(a, tokens[0])
        _write(b, tokens[1])
        nulls.append(_compare_length(a, b))
    rate = np.mean([cells["b"]["p_value"] < 0.05 for cells in nulls])
    print(f"null: rejection rate at 0.05 {rate:.3f}")
    assert 0.01 <= rate <= 0.10, f"rejection rate under the null {rate:.3f}, should be about 0.05"
    # Each run's population mean is MEAN_TOKENS: its interval over prompts should cover it about 95 % of the time.
    coverage = np.mean([c[x]["ci95"][0] <= MEAN_TOKENS <= c[x]["ci95"][1] for c in nulls for x in ("a", "b")])
    print(f"null: coverage of the 95% interval over prompts {coverage:.3f}")
    assert 0.88 <= coverage <= 0.99, f"coverage of the 95% interval {coverage:.3f}"

    # Calibrated, and not by never rejecting: a real shift of the second run is found most of the time.
    found = 0
    for _ in range(POWER_REPLICATIONS):
        tokens = simulate(rng, shift=SHIFT)
        _write(a, tokens[0])
        _write(b, tokens[1])
        cells = _compare_length(a, b)
        found += cells["b"]["p_value"] < 0.05 and cells["b"]["delta"] > 0
    power = found / POWER_REPLICATIONS
    print(f"power at a shift of {SHIFT} tokens: {power:.3f}")
    assert power >= 0.8, f"power {power:.3f} against a shift of {SHIFT} tokens"


def _per_pass_resampling_p(tokens: np.ndarray, resamples: int, rng: np.random.Generator) -> float:
    """The design kd compare had before: each pass's prompts redrawn independently, the delta averaged over passes."""
    seeds, n = tokens.shape[1:]
    differences = tokens[1] - tokens[0]
    delta = differences.mean()
    boot = np.zeros(resamples)
    for s in range(seeds):
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples)
        boot += counts @ differences[s] / n
    boot /= seeds
    return float((1 + (np.abs(boot - delta) >= abs(delta)).sum()) / (1 + resamples))


def test_the_simulation_catches_per_pass_resampling() -> None:
    """The null above is one that independent per-pass resampling fails: so the calibration test can fail."""
    rng = np.random.default_rng(7)
    old = new = 0
    replications = 600  # numpy only: cheap, and a tighter rate than the CLI test's
    for r in range(replications):
        tokens = simulate(rng)
        old += _per_pass_resampling_p(tokens, RESAMPLES, rng) < 0.05
        passes = [(MeanStat(tokens[0, s]), MeanStat(tokens[1, s])) for s in range(len(SEEDS))]
        result = paired_bootstrap(passes, resamples=RESAMPLES, seed=r)
        assert result is not None
        new += result.p_value < 0.05
    print(f"null rejection rate at 0.05: per-pass resampling {old / replications:.3f}, kd {new / replications:.3f}")
    assert old / replications >= 0.15, "the simulation no longer tells the two designs apart"
    assert 0.01 <= new / replications <= 0.10
