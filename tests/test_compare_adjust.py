"""kd compare's p-values across a table: adjusted for their number (`--adjust`), by hand and by simulation; rows
that are identical in every run test nothing ("n/a"); metrics bounded to [0, 1] get intervals inside [0, 1]."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from compare_fixtures import add_eval, make_run, quality_answers
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.compare import compare_runs, load_runs, render_text
from kdcli.compare.multiple import adjust_p_values
from kdcli.compare.stats import MeanStat, arm_bootstrap, percentile_interval

runner = CliRunner()


def test_holm_and_bonferroni_by_hand() -> None:
    p = [0.01, 0.04, 0.03, 0.005, math.nan]
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 (m = 4) -> 4·0.005, 3·0.01, 2·0.03, 1·0.04, each at least the one before.
    holm = adjust_p_values(p, "holm")
    assert holm[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02]) and math.isnan(holm[4])
    assert adjust_p_values(p, "bonferroni")[:4] == pytest.approx([0.04, 0.16, 0.12, 0.02])
    assert adjust_p_values([0.5, 0.9], "bonferroni") == [1.0, 1.0]  # capped at 1
    assert adjust_p_values(p, "none")[:4] == p[:4]
    with pytest.raises(ValueError, match="holm, bonferroni, none"):
        adjust_p_values(p, "bh")


def test_a_table_of_null_tests_keeps_its_false_stars_at_five_percent() -> None:
    """21 tests under a global null, as in the first study's table: unadjusted, about two tables in three show a
    false star; Holm and Bonferroni keep it at 0.05 or below, for independent tests and for tests that share
    their prompts (correlated p-values)."""
    rng = np.random.default_rng(0)
    tables, tests = 4000, 21
    for rho in (0.0, 0.6):
        shared = rng.standard_normal((tables, 1))
        z = math.sqrt(rho) * shared + math.sqrt(1 - rho) * rng.standard_normal((tables, tests))
        p = np.array([[math.erfc(abs(x) / math.sqrt(2)) for x in row] for row in z])  # two-sided normal p
        any_star = {m: np.mean([min(adjust_p_values(list(row), m)) < 0.05 for row in p]) for m in ("none", "holm")}
        bonferroni = np.mean([min(adjust_p_values(list(row), "bonferroni")) < 0.05 for row in p])
        print(f"rho {rho}: tables with a false star: none {any_star['none']:.3f}, holm {any_star['holm']:.3f}")
        if rho == 0.0:
            assert 0.62 <= any_star["none"] <= 0.69  # 1 − 0.95^21 = 0.66
        assert any_star["holm"] <= 0.05 + 0.01 and bonferroni <= any_star["holm"]


@pytest.fixture()
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    base, other = make_run(tmp_path, "base"), make_run(tmp_path, "other")
    add_eval(base, quality_answers(0.5, "base"), examples=30)
    add_eval(other, quality_answers(0.9, "other"), examples=30)
    return base, other


def test_the_adjustment_is_per_table_and_said_in_its_footer(two_runs: tuple[Path, Path]) -> None:
    raw = compare_runs(load_runs(list(two_runs)), resamples=1000, adjust="none").evaluation[0]
    holm = compare_runs(load_runs(list(two_runs)), resamples=1000).evaluation[0]
    cells = [(r.metric, r.cells["other"], h.cells["other"]) for r, h in zip(raw.rows, holm.rows, strict=True)]
    tested = [(metric, a, b) for metric, a, b in cells if a is not None and a.p_value is not None]
    expected = adjust_p_values([a.p_value for _, a, _ in tested], "holm")
    assert [b.p_adjusted for _, _, b in tested] == pytest.approx(expected, nan_ok=True)
    assert all(a.p_adjusted == a.p_value or math.isnan(a.p_value) for _, a, _ in tested)  # none: as tested
    assert holm.tests == sum(not math.isnan(p) for p in expected) > 1
    text = render_text(compare_runs(load_runs(list(two_runs)), resamples=1000), "markdown")
    assert f"p-values Holm-adjusted for the {holm.tests} tests of this table" in text
    result = runner.invoke(
        app, ["compare", *map(str, two_runs), "--adjust", "none", "-f", "json", "--resamples", "500"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["evaluation"][0]["adjust"] == "none"
    bad = runner.invoke(app, ["compare", *map(str, two_runs), "--adjust", "fdr"])
    assert bad.exit_code == 2 and "--adjust: 'fdr' is not one of holm, bonferroni, none." in bad.output


def test_a_row_identical_in_every_run_is_not_tested(two_runs: tuple[Path, Path]) -> None:
    """Every answer of both runs stops at EOS (the fixture's rows): the stop rate is 1 everywhere."""
    comparison = compare_runs(load_runs(list(two_runs)), resamples=500)
    stop = next(row for row in comparison.evaluation[0].rows if row.metric == "stop_rate")
    cell = stop.cells["other"]
    assert cell is not None and cell.delta == 0.0 and math.isnan(cell.p_value) and not cell.significant
    assert "p n/a (identical in every run)" in render_text(comparison, "markdown")
    assert "p=1.000" not in render_text(comparison, "markdown")


def test_bounded_intervals_stay_inside_zero_and_one() -> None:
    # An arm of three runs whose stop rates are 1, 1 and 0.9 over 30 prompts: the t interval on the raw scale
    # (mean ± t_2 · se) reaches past 1; on the logit scale it does not.
    stops = [np.ones(30), np.ones(30), np.r_[np.zeros(3), np.ones(27)]]
    arm = [[MeanStat(run)] for run in stops]
    boot = arm_bootstrap([arm, [[MeanStat(np.ones(30))]]], resamples=500, seed=0)
    assert boot is not None
    raw = boot.interval(0)
    bounded = boot.interval(0, bounds=(0.0, 1.0))
    assert raw is not None and raw[1] > 1.0
    assert bounded is not None and 0.0 <= bounded[0] < boot.observed[0] < bounded[1] <= 1.0
    # A percentile interval whose bias shift would leave [0, 1]: draws bunched at the top, the centre above them.
    draws = np.r_[np.full(900, 0.999), np.full(100, 0.9)]
    assert percentile_interval(draws, 0.9999)[1] > 1.0
    low, high = percentile_interval(draws, 0.9999, bounds=(0.0, 1.0))
    assert 0.0 <= low <= high <= 1.0
