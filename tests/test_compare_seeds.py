"""`kd compare --pool-seeds` tests a training number (eval CE at the end) of each arm against the baseline arm,
across training seeds: paired by seed where the arms share their seeds, Welch's t where not (`compare/seeds.py`).

The simulation is a study's: each training seed s gives every arm the same data order, which moves every arm's eval
CE by the same amount (SD 0.1 here); each run adds its own (SD 0.03). The arms differ by `shift`."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from compare_fixtures import make_run
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.compare.render import seed_text
from kdcli.compare.seeds import SeedTest, paired_difference, welch_difference
from kdcli.compare.student_t import t_quantile

runner = CliRunner()
SEED_SD, RUN_SD = 0.1, 0.03


def test_the_paired_test_is_students_t_on_the_differences() -> None:
    """Differences 1, 2, 3: mean 2, sd 1, t = 2√3 with 2 df, whose two-sided p has the closed form
    1 − t / √(2 + t²) (Student's t with 2 df)."""
    found = paired_difference([11.0, 22.0, 33.0], [10.0, 20.0, 30.0])
    t = 2.0 * math.sqrt(3.0)
    assert found.delta == pytest.approx(2.0)
    assert found.df == 2
    assert found.p_value == pytest.approx(1.0 - t / math.sqrt(2.0 + t * t), rel=1e-9)
    half = t_quantile(0.975, 2) * 1.0 / math.sqrt(3.0)
    assert found.ci95 == pytest.approx((2.0 - half, 2.0 + half))
    assert half == pytest.approx(4.302653 / math.sqrt(3.0), rel=1e-6)  # t(0.975, 2) from the tables


def test_welch_has_satterthwaites_degrees_of_freedom() -> None:
    """Equal spreads and sizes: df = 2n − 2; a spread ten times the other's: df near that side's n − 1."""
    even = welch_difference([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])
    assert even.delta == pytest.approx(-1.0) and even.df == pytest.approx(4.0)
    assert even.ci95 == pytest.approx(
        (-1.0 - t_quantile(0.975, 4) * math.sqrt(2 / 3), -1.0 + t_quantile(0.975, 4) * math.sqrt(2 / 3))
    )
    lopsided = welch_difference([0.0, 10.0, 20.0, 30.0, 40.0], [0.0, 1.0, 2.0, 3.0, 4.0])
    assert 4.0 <= lopsided.df < 4.2


def test_no_spread_is_nothing_to_test() -> None:
    """Identical runs, or every pair apart by exactly the same amount: no spread, so no p and no interval."""
    same = paired_difference([1.0, 2.0], [1.0, 2.0])
    assert same.delta == 0.0 and math.isnan(same.p_value)
    shifted = paired_difference([1.5, 2.5], [1.0, 2.0])
    assert shifted.delta == pytest.approx(0.5) and math.isnan(shifted.p_value) and shifted.ci95 is None
    one = paired_difference([1.5], [1.0])
    assert one.ci95 is None and math.isnan(one.p_value)


def _study(rng: np.random.Generator, runs: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    order = rng.normal(0.0, SEED_SD, runs)  # the training seed's data order, shared by both arms
    baseline = 3.4 + order + rng.normal(0.0, RUN_SD, runs)
    arm = 3.4 + shift + order + rng.normal(0.0, RUN_SD, runs)
    return arm, baseline


@pytest.mark.parametrize("runs", [3, 5])
def test_the_paired_test_is_calibrated_and_has_the_power_welch_lacks(runs: int) -> None:
    """Under the null the paired test rejects in 5 % of studies at 0.05; Welch's, blind to the shared seed effect,
    in far fewer, and at a real shift of 0.1 nats (the seed's SD) it misses most of what pairing finds."""
    rng = np.random.default_rng(7 + runs)
    studies = 4000
    null = [_study(rng, runs, 0.0) for _ in range(studies)]
    paired_rate = sum(paired_difference(a, b).p_value < 0.05 for a, b in null) / studies
    welch_rate = sum(welch_difference(a, b).p_value < 0.05 for a, b in null) / studies
    print(f"{runs} runs an arm, null: paired {paired_rate:.3f}, Welch {welch_rate:.3f}")
    assert 0.04 <= paired_rate <= 0.06
    assert welch_rate < 0.02
    real = [_study(rng, runs, 0.1) for _ in range(1000)]
    paired_power = sum(paired_difference(a, b).p_value < 0.05 for a, b in real) / len(real)
    welch_power = sum(welch_difference(a, b).p_value < 0.05 for a, b in real) / len(real)
    print(f"{runs} runs an arm, shift 0.1: power paired {paired_power:.3f}, Welch {welch_power:.3f}")
    assert paired_power > welch_power + 0.3


def test_welch_is_calibrated_when_the_seeds_differ() -> None:
    """Arms trained on different seeds (nothing shared), one four times as seed-sensitive: about 5 %."""
    rng = np.random.default_rng(3)
    studies, rejected = 4000, 0
    for _ in range(studies):
        arm = rng.normal(3.4, 0.12, 5)
        baseline = rng.normal(3.4, 0.03, 5)
        rejected += welch_difference(arm, baseline).p_value < 0.05
    rate = rejected / studies
    print(f"Welch, 5 runs an arm, SD 0.12 against 0.03: null rejection {rate:.3f}")
    assert 0.035 <= rate <= 0.07


def _grid(root: Path, eval_ce: dict[tuple[str, int], float]) -> list[Path]:
    runs = []
    for (divergence, seed), value in eval_ce.items():
        run = make_run(root, f"g-{divergence}-s{seed}", divergence=divergence, recipe_changes={"seed": seed}, steps=3)
        record = json.loads((run / "run.json").read_text(encoding="utf-8"))
        record["eval_after"]["eval_ce"] = value
        (run / "run.json").write_text(json.dumps(record), encoding="utf-8")
        runs.append(run)
    return runs


def _compare(*args: str) -> str:
    result = runner.invoke(app, ["compare", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_kd_compare_tests_eval_ce_across_training_seeds(tmp_path: Path) -> None:
    """Pairs are matched by seed, not by the order the runs are given in (seeds 2, 10, 1 sort differently as text
    and as numbers); arms on other seeds get Welch's t; Holm adjusts the row."""
    fkl = {2: 3.45, 10: 3.37, 1: 3.52}
    rkl = {1: 3.65, 2: 3.59, 10: 3.49}  # every seed 0.12-0.14 above fkl's: the pairs agree
    akl = {3: 3.50, 4: 3.40, 5: 3.47}  # other seeds: Welch
    values = {**{("fkl", s): v for s, v in fkl.items()}, **{("rkl", s): v for s, v in rkl.items()}}
    values |= {("akl", s): v for s, v in akl.items()}
    runs = [str(p) for p in _grid(tmp_path, values)]
    data = json.loads(_compare(*runs, "--pool-seeds", "--format", "json"))
    tests = {t["run"]: t for t in data["training_tests"]}
    rkl_label, akl_label = "g-rkl-s{1,2,10}", "g-akl-s{3,4,5}"
    assert set(tests) == {rkl_label, akl_label} and data["baseline"] == "g-fkl-s{2,10,1}"
    paired, welch = tests[rkl_label], tests[akl_label]
    seeds = (2, 10, 1)
    expected = paired_difference([rkl[s] for s in seeds], [fkl[s] for s in seeds])
    assert paired["paired"] and paired["pairs"] == 3 and paired["df"] == 2
    assert paired["delta"] == pytest.approx(0.13) and paired["p_value"] == pytest.approx(expected.p_value)
    by_position = paired_difference(list(rkl.values()), list(fkl.values()))
    assert abs(by_position.p_value - expected.p_value) > 0.05  # matching by position would give another answer
    assert not welch["paired"] and welch["pairs"] == 0 and (welch["runs"], welch["baseline_runs"]) == (3, 3)
    expected_welch = welch_difference(list(akl.values()), list(fkl.values()))
    assert welch["delta"] == pytest.approx(expected_welch.delta) and welch["df"] == pytest.approx(expected_welch.df)
    low, high = sorted([expected.p_value, expected_welch.p_value])
    adjusted = sorted([paired["p_adjusted"], welch["p_adjusted"]])
    assert adjusted == pytest.approx([2 * low, max(2 * low, high)])
    assert paired["significant"] and expected.p_value < 0.025  # the pairs agree: Holm's 2·p stays below 0.05
    markdown = _compare(*runs, "--pool-seeds", "--format", "markdown")
    row = next(line for line in markdown.splitlines() if line.startswith("| eval CE (end) Δ, training seeds"))
    assert "| baseline |" in row and "(paired by seed, 3 pairs)" in row and "(Welch, 3 against 3 runs)" in row
    assert "p=0.0" in row and "\\*" in row  # the star escaped, as every Markdown cell's
    assert "- eval CE (end) Δ, training seeds: each arm against the baseline arm" in markdown
    table = list(csv.DictReader(io.StringIO(_compare(*runs, "--pool-seeds", "--format", "csv"))))
    cells = {r["run"]: r for r in table if r["section"] == "training" and r["key"] == "eval_ce"}
    assert float(cells[rkl_label]["delta"]) == pytest.approx(0.13) and cells[rkl_label]["significant"] == "True"
    assert cells[rkl_label]["test"] == "paired by seed (3 pairs)" and cells[akl_label]["test"] == "welch"
    assert cells["g-fkl-s{2,10,1}"]["delta"] == ""
    shown = _compare(*runs[:6], "--pool-seeds")  # the rich table, fkl and rkl: wide enough for the cell
    assert "eval CE (end) Δ, training seeds" in shown and "Δ +0.130 [+0.105," in shown and "+0.155] p=0.002 *" in shown


def test_arms_that_share_some_seeds_are_paired_on_those(tmp_path: Path) -> None:
    """A study part-way: the baseline arm has seeds 0-2, the other 0-1. The two shared seeds are paired; the third
    baseline run is left out, and the cell says so."""
    fkl = {0: 3.45, 1: 3.37, 2: 3.40}
    rkl = {0: 3.59, 1: 3.49}
    values = {**{("fkl", s): v for s, v in fkl.items()}, **{("rkl", s): v for s, v in rkl.items()}}
    runs = [str(p) for p in _grid(tmp_path, values)]
    (test,) = json.loads(_compare(*runs, "--pool-seeds", "--format", "json"))["training_tests"]
    expected = paired_difference([3.59, 3.49], [3.45, 3.37])
    assert test["paired"] and test["pairs"] == 2 and test["delta"] == pytest.approx(expected.delta)
    assert test["p_value"] == pytest.approx(expected.p_value)
    markdown = _compare(*runs, "--pool-seeds", "--format", "markdown")
    assert "(paired by seed, 2 pairs; 1 unpaired run left out)" in markdown


def test_a_test_reads_back_from_json_with_no_p(tmp_path: Path) -> None:
    """Every pair apart by the same amount: p is n/a, written as null, and reads back as NaN (bench/replication.py
    renders the study's table from the JSON)."""
    values = {("fkl", 0): 3.4, ("fkl", 1): 3.5, ("rkl", 0): 3.5, ("rkl", 1): 3.6}
    runs = [str(p) for p in _grid(tmp_path, values)]
    (raw,) = json.loads(_compare(*runs, "--pool-seeds", "--format", "json"))["training_tests"]
    assert raw["p_value"] is None and raw["untested"] == "the same difference in every run"
    test = SeedTest.from_dict(raw)
    assert math.isnan(test.p_value) and test.ci95 is None and test.delta == pytest.approx(0.1)
    assert seed_text(test).startswith("Δ +0.100 p n/a (the same difference in every run) (paired by seed, 2 pairs")


def test_no_training_test_without_arms_of_several_runs(tmp_path: Path) -> None:
    runs = [str(p) for p in _grid(tmp_path, {("fkl", 0): 3.4, ("fkl", 1): 3.5, ("rkl", 0): 3.6})]
    pooled = json.loads(_compare(*runs, "--pool-seeds", "--format", "json"))
    assert pooled["training_tests"] == []  # the lone rkl run has no spread of its own to test with
    alone = json.loads(_compare(*runs, "--format", "json"))
    assert alone["training_tests"] == []
