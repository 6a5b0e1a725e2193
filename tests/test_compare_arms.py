"""`kd compare --pool-seeds`: runs that differ only in `seed` become one arm, and its p-values are p-values.

The calibration simulation is a study's: two arms of three training runs on the same 40 prompts, 3 sampling seeds
each. A prompt has a difficulty every run shares; each arm has its own per-prompt effect (zero on average over
prompts: the null); each run has an offset that is the same on every prompt (its training seed) and its own
per-prompt effect; each (prompt, sampling seed) adds noise. A test that sees only the prompts (the runs pooled as
if they were passes of one run) reads a lucky seed as a real difference and rejects far too often.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from compare_fixtures import add_eval, make_run, quality_answers
from test_compare_calibration import memoised_rouge  # noqa: F401  (a fixture)
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.compare.arms import arm_label
from kdcli.compare.spread import RunSpread
from kdcli.compare.stats import MeanStat, PromptBootstrap, arm_bootstrap, prompt_bootstrap
from kdcli.compare.student_t import mean_ci, t_cdf, t_quantile

runner = CliRunner()
PROMPTS, RUNS, SEEDS = 40, 3, (10, 20, 30)
DIFFICULTY, ARM_PROMPT, RUN_OFFSET, RUN_PROMPT, NOISE = 20.0, 3.0, 3.0, 5.0, 4.0
MEAN_TOKENS = 100.0
RESAMPLES = 400


def simulate(
    rng: np.random.Generator, *, shift: float = 0.0, run_offset: float = RUN_OFFSET, arm_prompt: float = ARM_PROMPT
) -> np.ndarray:
    """Token counts [arm, run, seed, prompt]; the second arm's mean is `shift` higher."""
    difficulty = rng.normal(0.0, DIFFICULTY, PROMPTS)
    arm = rng.normal(0.0, arm_prompt, (2, 1, 1, PROMPTS))
    offset = rng.normal(0.0, run_offset, (2, RUNS, 1, 1))
    own = rng.normal(0.0, RUN_PROMPT, (2, RUNS, 1, PROMPTS))
    noise = rng.normal(0.0, NOISE, (2, RUNS, len(SEEDS), PROMPTS))
    tokens = MEAN_TOKENS + difficulty + arm + offset + own + noise
    tokens[1] += shift
    return tokens


def _arms(tokens: np.ndarray) -> list[list[list[MeanStat]]]:
    return [[[MeanStat(tokens[a, r, s]) for s in range(len(SEEDS))] for r in range(RUNS)] for a in range(2)]


@pytest.mark.parametrize(
    ("run_offset", "arm_prompt"),
    [(RUN_OFFSET, ARM_PROMPT), (RUN_OFFSET, 0.0), (0.0, ARM_PROMPT), (0.0, 0.0)],
    ids=["seed-and-prompt", "seed-only", "prompt-only", "noise-only"],
)
def test_arm_p_values_are_calibrated_whichever_chance_dominates(run_offset: float, arm_prompt: float) -> None:
    rng = np.random.default_rng(11)
    replications = 800
    rejected = covered = 0
    for r in range(replications):
        boot = arm_bootstrap(_arms(simulate(rng, run_offset=run_offset, arm_prompt=arm_prompt)), resamples=300, seed=r)
        assert boot is not None
        test = boot.paired(0, 1)
        assert test is not None
        rejected += test.p_value < 0.05
        interval = boot.interval(0)
        assert interval is not None
        covered += interval[0] <= MEAN_TOKENS <= interval[1]
    rate, coverage = rejected / replications, covered / replications
    print(f"null rejection at 0.05 {rate:.3f}, coverage of the arm's 95% interval {coverage:.3f}")
    assert 0.02 <= rate <= 0.08, f"rejection rate under the null {rate:.3f}, should be about 0.05"
    assert 0.91 <= coverage <= 0.98, f"coverage {coverage:.3f}"


def test_the_simulation_catches_a_prompt_only_test_and_the_arm_test_has_power() -> None:
    """Pooling the runs as passes of one run (prompts the only chance) fails this null; the arm test does not, and
    still finds a real shift."""
    rng = np.random.default_rng(5)
    replications = 400
    naive = 0
    for r in range(replications):
        tokens = simulate(rng)
        flat = [[MeanStat(tokens[a, i, s]) for i in range(RUNS) for s in range(len(SEEDS))] for a in range(2)]
        boot = prompt_bootstrap(flat, resamples=300, seed=r)
        assert boot is not None
        test = boot.paired(0, 1)
        assert test is not None
        naive += test.p_value < 0.05
    print(f"null rejection at 0.05 of the prompt-only test: {naive / replications:.3f}")
    assert naive / replications >= 0.2, "the simulation no longer tells the two designs apart"
    found = 0
    for r in range(100):
        boot = arm_bootstrap(_arms(simulate(rng, shift=12.0)), resamples=300, seed=r)
        assert boot is not None
        test = boot.paired(0, 1)
        assert test is not None
        found += test.p_value < 0.05 and test.delta > 0
    print(f"power at a shift of 12 tokens (about 4.5 standard errors): {found / 100:.2f}")
    assert found >= 80


def test_an_arm_of_one_run_is_the_prompt_bootstrap_exactly() -> None:
    rng = np.random.default_rng(3)
    tokens = simulate(rng)
    series = [[MeanStat(tokens[a, 0, s]) for s in range(len(SEEDS))] for a in range(2)]
    one = prompt_bootstrap(series, resamples=500, seed=9)
    arms = arm_bootstrap([[passes] for passes in series], resamples=500, seed=9)
    assert one is not None and arms is not None
    assert np.array_equal(one.draws, arms.draws) and np.array_equal(one.observed, arms.observed)
    assert one.paired(0, 1) == arms.paired(0, 1) and one.interval(1) == arms.interval(1)


def test_arm_label_names_what_differs() -> None:
    assert arm_label(["rep-fkl-s0", "rep-fkl-s1", "rep-fkl-s2"]) == "rep-fkl-s{0,1,2}"
    assert arm_label(["a-0-x", "a-12-x"]) == "a-{0,12}-x"
    assert arm_label(["fkl", "rkl"]) == "{f,r}kl" and arm_label(["one", "two"]) == "{one,two}"


def _grid(root: Path, arms: dict[str, float], seeds: tuple[int, ...] = (0, 1, 2)) -> list[Path]:
    """Runs named like `kd distill --grid`'s: one per (divergence, seed), answers of the arm's quality."""
    runs = []
    for divergence, quality in arms.items():
        for seed in seeds:
            run = make_run(
                root, f"g-{divergence}-s{seed}", divergence=divergence, recipe_changes={"seed": seed}, steps=3
            )
            add_eval(run, quality_answers(quality, salt=f"{divergence}{seed}"), examples=24)
            runs.append(run)
    return runs


def _json(*args: str) -> dict:
    result = runner.invoke(app, ["compare", *args, "--format", "json", "--resamples", "500"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_pool_seeds_makes_one_column_per_arm_from_its_runs(tmp_path: Path) -> None:
    runs = _grid(tmp_path, {"fkl": 0.5, "akl": 0.7})
    pooled = _json(*map(str, runs), "--pool-seeds")
    assert pooled["runs"] == ["g-fkl-s{0,1,2}", "g-akl-s{0,1,2}"]
    assert pooled["arms"]["g-akl-s{0,1,2}"] == [str(r) for r in runs[3:]]
    (evaluation,) = pooled["evaluation"]
    assert evaluation["passes"] == [f"seed-{s}" for s in SEEDS]  # shared by sampling pass; each run has all three
    # The arm's value and its spread are those of its runs, as each run alone reports them.
    single = _json(*map(str, runs))
    (alone,) = single["evaluation"]
    rouge_alone = next(r for r in alone["rows"] if r["metric"] == "rougeL")["cells"]
    rouge = next(r for r in evaluation["rows"] if r["metric"] == "rougeL")["cells"]
    for arm, members in (("g-fkl-s{0,1,2}", runs[:3]), ("g-akl-s{0,1,2}", runs[3:])):
        values = [rouge_alone[run.name]["mean"] for run in members]
        spread = mean_ci(values)
        assert rouge[arm]["runs"] == 3 and rouge[arm]["seeds"] == 9
        assert rouge[arm]["mean"] == pytest.approx(spread.mean)
        assert rouge[arm]["ci95_seeds"] == pytest.approx(spread.half_width)
    assert rouge["g-akl-s{0,1,2}"]["delta"] == pytest.approx(
        rouge["g-akl-s{0,1,2}"]["mean"] - rouge["g-fkl-s{0,1,2}"]["mean"]
    )
    assert rouge["g-akl-s{0,1,2}"]["p_value"] is not None
    assert (rouge["g-akl-s{0,1,2}"]["test"], rouge["g-akl-s{0,1,2}"]["pairs"]) == ("paired by seed", 3)
    # The training table holds the runs' means; the seed is no longer a difference between the columns.
    steps = next(r for r in pooled["training"] if r["key"] == "steps")["values"]
    assert steps == {"g-fkl-s{0,1,2}": 3, "g-akl-s{0,1,2}": 3}
    assert [row["key"] for row in pooled["setup"]] == ["loss.divergence"]
    mixed = _json(*map(str, runs[:4]), "--pool-seeds")  # an arm beside a lone run: the seeds as a list
    (both,) = mixed["evaluation"]
    cells = next(r for r in both["rows"] if r["metric"] == "rougeL")["cells"]
    assert cells["g-fkl-s{0,1,2}"]["runs"] == 3 and cells["g-akl-s0"]["runs"] == 1
    assert cells["g-akl-s0"]["mean"] == pytest.approx(rouge_alone["g-akl-s0"]["mean"])
    assert cells["g-akl-s0"]["p_value"] is not None
    assert any(n.startswith("g-akl-s0: a single training run beside arms") for n in mixed["notes"])
    assert next(r for r in mixed["setup"] if r["key"] == "seed")["values"] == {
        "g-fkl-s{0,1,2}": "[0, 1, 2]",
        "g-akl-s0": "0",
    }
    markdown = runner.invoke(app, ["compare", *map(str, runs), "--pool-seeds", "--format", "markdown"]).output
    assert "training seeds ±" in markdown and "g-akl-s{0,1,2}: 3 runs" in markdown


def test_pool_seeds_with_one_run_per_recipe_changes_nothing(tmp_path: Path) -> None:
    runs = _grid(tmp_path, {"fkl": 0.5, "akl": 0.7, "rkl": 0.6}, seeds=(0,))
    assert _json(*map(str, runs), "--pool-seeds") == _json(*map(str, runs))


def test_pool_seeds_baseline_picks_its_arm(tmp_path: Path) -> None:
    runs = _grid(tmp_path, {"fkl": 0.5, "akl": 0.7})
    pooled = _json(*map(str, runs), "--pool-seeds", "--baseline", str(runs[4]))
    assert pooled["baseline"] == "g-akl-s{0,1,2}"


def test_pool_seeds_refuses_the_same_seed_twice_in_one_line(tmp_path: Path) -> None:
    runs = _grid(tmp_path, {"fkl": 0.5}, seeds=(0, 1))
    twin = make_run(tmp_path, "g-fkl-copy", recipe_changes={"seed": 1}, steps=3)
    result = runner.invoke(app, ["compare", *map(str, runs), str(twin), "--pool-seeds"])
    assert result.exit_code == 2
    assert "seed 1" in result.output and "not independent" in result.output
    assert "Traceback" not in result.output


def test_pool_seeds_with_the_judge_is_refused(tmp_path: Path) -> None:
    runs = _grid(tmp_path, {"fkl": 0.5, "akl": 0.7}, seeds=(0, 1))
    result = runner.invoke(app, ["compare", *map(str, runs), "--pool-seeds", "--judge", "gpt4"])
    assert result.exit_code == 2 and "drop --pool-seeds" in result.output


def test_an_arm_missing_a_set_on_some_runs_names_the_runs_to_evaluate(tmp_path: Path) -> None:
    runs = _grid(tmp_path, {"fkl": 0.5, "akl": 0.7}, seeds=(0, 1))
    add_eval(runs[0], quality_answers(0.5), set_name="extra", examples=5)
    pooled = _json(*map(str, runs), "--pool-seeds")
    assert [s["set"] for s in pooled["evaluation"]] == ["starter"]
    (note,) = [n for n in pooled["notes"] if "extra" in n]
    assert note.startswith("g-fkl-s{0,1}: only some of its runs have extra (sampling)")
    assert f"kd eval {runs[1]} --data extra=data/extra.jsonl" in note
    # Where another column has the set, it is compared, and the arm's missing run is named once, in its hint.
    add_eval(runs[2], quality_answers(0.7), set_name="extra", examples=5)
    add_eval(runs[3], quality_answers(0.7), set_name="extra", examples=5)
    compared = _json(*map(str, runs), "--pool-seeds")
    (extra,) = [s for s in compared["evaluation"] if s["set"] == "extra"]
    assert extra["missing"] == {"g-fkl-s{0,1}": f"kd eval {runs[1]} --data extra=data/extra.jsonl --seeds 10,20,30"}
    assert not [n for n in compared["notes"] if "extra" in n]


def test_arms_with_different_training_seeds_compare_every_run(tmp_path: Path) -> None:
    """One arm's runs are independent of another's: their training seeds need not match to be compared."""
    runs = _grid(tmp_path / "a", {"fkl": 0.5}, seeds=(0, 1, 2)) + _grid(tmp_path / "b", {"akl": 0.7}, seeds=(3, 4))
    (evaluation,) = _json(*map(str, runs), "--pool-seeds")["evaluation"]
    assert evaluation["passes"] == [f"seed-{s}" for s in SEEDS]
    cells = next(r for r in evaluation["rows"] if r["metric"] == "rougeL")["cells"]
    assert (cells["g-fkl-s{0,1,2}"]["runs"], cells["g-akl-s{3,4}"]["runs"]) == (3, 2)
    assert cells["g-akl-s{3,4}"]["seeds"] == 6 and cells["g-akl-s{3,4}"]["p_value"] is not None
    assert (cells["g-akl-s{3,4}"]["test"], cells["g-akl-s{3,4}"]["pairs"]) == ("welch", 0)


def test_arms_sharing_some_seeds_say_which_runs_the_pairing_left_out(tmp_path: Path) -> None:
    runs = _grid(tmp_path / "a", {"fkl": 0.5}, seeds=(0, 1, 2)) + _grid(tmp_path / "b", {"akl": 0.7}, seeds=(0, 1, 3))
    (evaluation,) = _json(*map(str, runs), "--pool-seeds")["evaluation"]
    cell = next(r for r in evaluation["rows"] if r["metric"] == "rougeL")["cells"]["g-akl-s{0,1,3}"]
    assert (cell["test"], cell["pairs"], cell["unpaired"]) == ("paired by seed", 2, 2)
    args = ["compare", *map(str, runs), "--pool-seeds", "--resamples", "300"]
    markdown = runner.invoke(app, [*args, "--format", "markdown"]).output
    assert "(paired by seed, 2 pairs; 2 unpaired runs left out)" in markdown
    assert "paired by training seed where they share two or more" in markdown  # the legend
    csv = runner.invoke(app, [*args, "--format", "csv"]).output
    assert "paired by seed (2 pairs; 2 unpaired)" in csv


def test_a_resample_where_a_run_has_no_value_is_left_out_of_the_arm_test() -> None:
    """A NaN draw (a ratio with nothing under it) drops that resample from every part of the variance, not just
    from the prompt part: the test equals the one on the other resamples."""
    boot = arm_bootstrap(_arms(simulate(np.random.default_rng(8), shift=3.0)), resamples=300, seed=1)
    assert boot is not None and all(s is not None for s in boot.spreads)
    spreads = [s for s in boot.spreads if s is not None]
    holed = [RunSpread(s.observed, s.draws.copy()) for s in spreads]
    holed[1].draws[2, 7] = np.nan
    with_hole = PromptBootstrap(
        boot.observed, np.stack([h.draws.mean(axis=0) for h in holed]), boot.prompts, tuple(holed)
    )
    keep = np.arange(boot.resamples) != 7
    without = [RunSpread(s.observed, s.draws[:, keep]) for s in spreads]
    dropped = PromptBootstrap(boot.observed, boot.draws[:, keep], boot.prompts, tuple(without))
    a, b = with_hole.paired(0, 1), dropped.paired(0, 1)
    assert a is not None and b is not None
    assert (a.delta, a.p_value, a.ci95) == (b.delta, b.p_value, b.ci95)
    assert with_hole.interval(1) == dropped.interval(1)
    nan_run = [RunSpread(np.array([1.0, np.nan, 2.0]), spreads[0].draws), spreads[1]]
    assert PromptBootstrap(boot.observed, boot.draws, boot.prompts, tuple(nan_run)).paired(0, 1) is None


@pytest.mark.parametrize(("runs", "most"), [(3, 0.085), (5, 0.07)])
def test_arm_p_values_when_the_arms_seed_variances_differ(runs: int, most: float) -> None:
    """One arm's training seed moves its ROUGE-L by SD 0.1, the other's by 1.2 (a stable loss against an unstable
    one). Welch–Satterthwaite's degrees of freedom are estimated from the run values, and with three runs an arm
    that estimate leans liberal where one arm's spread dominates: about 6.4 % at 0.05 in 5,000 replications (the
    small-sample Behrens–Fisher problem has no exact answer). With five runs an arm, the study's design, it is
    about 5.4 %. docs/compare.md says what that makes of a small p."""
    rng = np.random.default_rng(21 + runs)
    replications, prompts = 1000, 40
    rejected = 0
    for r in range(replications):
        difficulty = rng.normal(0.0, 8.0, prompts)
        offset = np.stack([rng.normal(0.0, sd, (runs, 1, 1)) for sd in (0.1, 1.2)])
        own = rng.normal(0.0, 1.0, (2, runs, 1, prompts))
        noise = rng.normal(0.0, 2.0, (2, runs, len(SEEDS), prompts))
        rouge = 20.0 + difficulty + offset + own + noise
        arms = [[[MeanStat(rouge[a, i, s]) for s in range(len(SEEDS))] for i in range(runs)] for a in range(2)]
        boot = arm_bootstrap(arms, resamples=300, seed=r)
        assert boot is not None
        test = boot.paired(0, 1)
        assert test is not None
        rejected += test.p_value < 0.05
    rate = rejected / replications
    print(f"{runs} runs an arm, seed SD 0.1 against 1.2: null rejection at 0.05 {rate:.3f}")
    assert 0.03 <= rate <= most


# ------------------------------------------------------------------------------------- arms paired by training seed


def _shared_order(rng: np.random.Generator, runs: int, *, shift: float = 0.0, order: float = 3.0) -> np.ndarray:
    """Token counts [arm, run, seed, prompt] where run r of either arm had training seed r: the data order it sets
    moves both arms' run r alike (SD `order`), beside each run's own offset (SD 1)."""
    difficulty = rng.normal(0.0, DIFFICULTY, PROMPTS)
    arm = rng.normal(0.0, ARM_PROMPT, (2, 1, 1, PROMPTS))
    shared = rng.normal(0.0, order, (1, runs, 1, 1))
    offset = rng.normal(0.0, 1.0, (2, runs, 1, 1))
    own = rng.normal(0.0, RUN_PROMPT, (2, runs, 1, PROMPTS))
    noise = rng.normal(0.0, NOISE, (2, runs, len(SEEDS), PROMPTS))
    tokens = MEAN_TOKENS + difficulty + arm + shared + offset + own + noise
    tokens[1] += shift
    return tokens


def _arms_of(tokens: np.ndarray) -> list[list[list[MeanStat]]]:
    return [[[MeanStat(run[s]) for s in range(len(SEEDS))] for run in arm] for arm in tokens]


def test_arms_sharing_seeds_are_tested_on_the_per_seed_differences() -> None:
    """The paired test is the one-arm test of the differences d_s: Δ their mean, the variance theirs over the pairs
    plus the prompt part (computed here from the draws, as for one arm), whatever order the runs come in."""
    tokens = _shared_order(np.random.default_rng(4), 4, shift=2.0)
    boot = arm_bootstrap(_arms_of(tokens), training_seeds=[[0, 1, 2, 3]] * 2, resamples=600, seed=2)
    assert boot is not None
    test = boot.paired(0, 1)
    assert test is not None and (test.method, test.pairs, test.unpaired) == ("paired by seed", 4, 0)
    a, b = (spread for spread in boot.spreads if spread is not None)
    d_observed, d_draws = b.observed - a.observed, b.draws - a.draws
    assert test.delta == pytest.approx(d_observed.mean()) == pytest.approx(boot.observed[1] - boot.observed[0])
    deviation = d_draws - d_draws.mean(axis=0)
    noise = 4 / 3 * np.mean(np.var(deviation, axis=1, ddof=1))
    parts = [(np.var(d_observed, ddof=1) / 4, 3), (max(0.0, np.var(d_draws.mean(axis=0), ddof=1) - noise / 4), 39)]
    variance = sum(v for v, _ in parts)
    df = variance**2 / sum(v * v / f for v, f in parts)
    expected = 2.0 * (1.0 - t_cdf(abs(d_observed.mean()) / np.sqrt(variance), df))
    assert test.p_value == pytest.approx(expected, rel=1e-9)
    assert test.ci95 is not None
    half = t_quantile(0.975, df) * np.sqrt(variance)
    assert test.ci95 == pytest.approx((d_observed.mean() - half, d_observed.mean() + half), rel=1e-9)
    # seeds are matched by value: the second arm's runs listed in another order give the same test
    order = [2, 0, 3, 1]
    shuffled = [tokens[0], tokens[1][order]]
    again = arm_bootstrap(_arms_of(np.stack(shuffled)), training_seeds=[[0, 1, 2, 3], order], resamples=600, seed=2)
    assert again is not None
    other = again.paired(0, 1)
    assert other is not None and other.p_value == pytest.approx(test.p_value, rel=1e-9)
    assert other.ci95 == pytest.approx(test.ci95, rel=1e-9)


def test_arms_sharing_fewer_than_two_seeds_are_tested_by_welch() -> None:
    tokens = _shared_order(np.random.default_rng(6), 3)
    welch = arm_bootstrap(_arms_of(tokens), resamples=300, seed=1)  # no seeds known
    partial = arm_bootstrap(_arms_of(tokens), training_seeds=[[0, 1, 2], [0, 1, 5]], resamples=300, seed=1)
    one = arm_bootstrap(_arms_of(tokens), training_seeds=[[0, 1, 2], [0, 6, 5]], resamples=300, seed=1)
    assert welch is not None and partial is not None and one is not None
    by_welch, by_pairs, by_one = welch.paired(0, 1), partial.paired(0, 1), one.paired(0, 1)
    assert by_welch is not None and by_pairs is not None and by_one is not None
    assert (by_welch.method, by_one.method) == ("welch", "welch")
    assert (by_one.delta, by_one.p_value, by_one.ci95) == (by_welch.delta, by_welch.p_value, by_welch.ci95)
    assert (by_pairs.method, by_pairs.pairs, by_pairs.unpaired) == ("paired by seed", 2, 2)
    pair_values = partial.spreads[1].observed[:2] - partial.spreads[0].observed[:2]  # type: ignore[union-attr]
    assert by_pairs.delta == pytest.approx(pair_values.mean())


def test_a_run_the_pairing_leaves_out_does_not_count_even_without_a_value() -> None:
    """An unpaired run with no value (NaN: a ratio with nothing under it) makes the arm's mean NaN, but the paired
    test is on the pairs alone and stands as it was."""
    tokens = _shared_order(np.random.default_rng(9), 3, shift=2.0)
    boot = arm_bootstrap(_arms_of(tokens), training_seeds=[[0, 1, 2], [0, 1, 5]], resamples=300, seed=1)
    assert boot is not None
    base, arm = boot.spreads
    assert base is not None and arm is not None
    observed, draws = arm.observed.copy(), arm.draws.copy()
    observed[2], draws[2] = np.nan, np.nan  # the run of seed 5, which the baseline arm lacks
    holed = RunSpread(observed, draws, arm.seeds)
    arm_observed, arm_draws = boot.observed.copy(), boot.draws.copy()
    arm_observed[1], arm_draws[1] = np.nan, np.nan
    with_hole = PromptBootstrap(arm_observed, arm_draws, boot.prompts, (base, holed))
    test, reference = with_hole.paired(0, 1), boot.paired(0, 1)
    assert test is not None and reference is not None and test.pairs == 2
    assert (test.delta, test.p_value, test.ci95) == (reference.delta, reference.p_value, reference.ci95)
    unpaired = PromptBootstrap(arm_observed, arm_draws, boot.prompts, (base, RunSpread(observed, draws)))
    assert unpaired.paired(0, 1) is None  # without seeds, Welch's mean over every run is not a number


def test_paired_arm_p_values_are_calibrated_and_have_the_power_welch_lacks() -> None:
    """Five runs an arm, run r of each with training seed r, the data order moving both alike (SD 3 tokens, as the
    study's seeds move eval CE as much as the divergences do). Under the null the paired test rejects about 5 %;
    Welch's, blind to the pairing, counts the shared order twice and almost never rejects. At a real shift of 3
    tokens the paired test finds it most of the time, Welch's rarely."""
    rng = np.random.default_rng(31)
    runs, seeds = 5, [list(range(5))] * 2
    null_paired = null_welch = 0
    replications, shifted = 2000, 300
    for r in range(replications):
        arms = _arms_of(_shared_order(rng, runs))
        paired = arm_bootstrap(arms, training_seeds=seeds, resamples=300, seed=r)
        welch = arm_bootstrap(arms, resamples=300, seed=r)
        assert paired is not None and welch is not None
        a, b = paired.paired(0, 1), welch.paired(0, 1)
        assert a is not None and b is not None and a.method == "paired by seed" and b.method == "welch"
        null_paired += a.p_value < 0.05
        null_welch += b.p_value < 0.05
    found_paired = found_welch = 0
    for r in range(shifted):
        arms = _arms_of(_shared_order(rng, runs, shift=3.0))
        paired = arm_bootstrap(arms, training_seeds=seeds, resamples=300, seed=r)
        welch = arm_bootstrap(arms, resamples=300, seed=r)
        assert paired is not None and welch is not None
        a, b = paired.paired(0, 1), welch.paired(0, 1)
        assert a is not None and b is not None
        found_paired += a.p_value < 0.05 and a.delta > 0
        found_welch += b.p_value < 0.05 and b.delta > 0
    rate_paired, rate_welch = null_paired / replications, null_welch / replications
    power_paired, power_welch = found_paired / shifted, found_welch / shifted
    print(f"null rejection at 0.05: paired {rate_paired:.3f}, Welch {rate_welch:.3f}; power at 3 tokens: paired "
          f"{power_paired:.2f}, Welch {power_welch:.2f}")  # fmt: skip
    assert 0.035 <= rate_paired <= 0.07
    assert rate_welch < 0.03
    assert power_paired >= 0.6 and power_paired >= power_welch + 0.3
